//! Service-account credentials for pods run as local processes.
//!
//! A real kubelet mounts a projected token of the pod's ServiceAccount at
//! `/var/run/secrets/kubernetes.io/serviceaccount/` and the API server is
//! reachable through the `kubernetes` Service. A local process has neither,
//! so the emulator does what the kubelet's token manager does (a
//! TokenRequest bound to the pod, allowed to the node by the Node
//! authorizer because the pod is bound to it) and hands the token over as a
//! kubeconfig in the pod's directory, named by `KUBECONFIG` unless the
//! container sets that itself. The process then talks to the API server
//! with exactly the identity and RBAC its pod would have.
//!
//! Tokens last an hour and are not refreshed: enough for test clusters,
//! which is all the emulator is for.

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

/// Lifetime of a pod's token.
pub const TOKEN_SECONDS: i64 = 3600;

/// The ServiceAccount a pod runs as (`default` when unset), or `None` when
/// the pod opted out of a token (`automountServiceAccountToken: false`).
pub fn service_account(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    Some(
        spec.service_account_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    )
}

/// A kubeconfig for `user` with bearer `token` against `cluster` (the
/// `cluster` member of a kubeconfig's clusters entry: server and CA).
pub fn kubeconfig(cluster: &Value, user: &str, token: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "cluster", "cluster": cluster }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{ "name": "pod", "context": { "cluster": "cluster", "user": user } }],
        "current-context": "pod",
    })
}

/// Requests a token of the pod's ServiceAccount bound to the pod and returns
/// the kubeconfig carrying it; `Ok(None)` when the pod wants no token.
pub async fn pod_kubeconfig(
    client: &kube::Client,
    cluster: &Value,
    pod: &Pod,
) -> Result<Option<Value>, String> {
    let Some(sa) = service_account(pod) else {
        return Ok(None);
    };
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let granted = api
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("request a token for ServiceAccount {ns}/{sa}: {e}"))?;
    let token = granted.status.map(|s| s.token).ok_or_else(|| {
        format!("the token request for ServiceAccount {ns}/{sa} returned no token")
    })?;
    let user = format!("system:serviceaccount:{ns}:{sa}");
    Ok(Some(kubeconfig(cluster, &user, &token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Pod {
        serde_json::from_value(json!({ "metadata": { "name": "p" }, "spec": spec })).unwrap()
    }

    #[test]
    fn service_account_defaults_and_opt_out() {
        let cases = [
            (json!({ "containers": [] }), Some("default")),
            (
                json!({ "containers": [], "serviceAccountName": "" }),
                Some("default"),
            ),
            (
                json!({ "containers": [], "serviceAccountName": "sa" }),
                Some("sa"),
            ),
            (
                json!({ "containers": [], "serviceAccountName": "sa", "automountServiceAccountToken": false }),
                None,
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(
                service_account(&pod(spec.clone())).as_deref(),
                want,
                "{spec}"
            );
        }
    }

    #[test]
    fn kubeconfig_carries_server_ca_and_token() {
        let cluster =
            json!({ "server": "https://127.0.0.1:6443", "certificate-authority-data": "Q0E=" });
        let got = kubeconfig(&cluster, "system:serviceaccount:ns:sa", "tok");
        assert_eq!(got["clusters"][0]["cluster"], cluster);
        assert_eq!(got["users"][0]["user"]["token"], "tok");
        assert_eq!(
            got["contexts"][0]["context"]["user"],
            "system:serviceaccount:ns:sa"
        );
        assert_eq!(got["current-context"], "pod");
    }
}

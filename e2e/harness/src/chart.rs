//! Installing `charts/nvdra` into a local cluster as a user does: `helm
//! install`.
//!
//! Helm renders the chart against the live API server (its version, its
//! capabilities), applies every object server-side and records the release,
//! so a template error, a failed guard or an object the API server rejects
//! fails here as it would for a user. The workloads it creates cannot run as
//! pods here: the agent needs the node's kubelet directories and the
//! controller a container, neither of which the kubelet emulator provides.
//! `e2e/harness/local-cluster-values.yaml` therefore gives the DaemonSet a
//! node selector no node carries and the Deployment no replicas, and each
//! simulated node runs the agent (the harness the controller) as a local
//! process with the identity the chart's
//! workload would have. That identity is read from the installed manifest,
//! so a permission the chart forgets fails the e2e suite with a 403 instead
//! of passing on an admin credential.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::controlplane::ControlPlane;
use crate::tools::repo_root;

/// The values file every local cluster installs the chart with.
pub const LOCAL_CLUSTER_VALUES: &str = "e2e/harness/local-cluster-values.yaml";

/// What a local cluster needs to know of the installed chart.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Namespace and name of the service account the agent DaemonSet runs as.
    pub agent_service_account: (String, String),
    /// The image of the chart's containers (`repository:tag`): pods using
    /// it run our binaries as local processes on the simulated nodes.
    pub image: String,
    /// Namespace and name of the controller Deployment's service account,
    /// when the chart renders the controller.
    pub controller_service_account: Option<(String, String)>,
}

/// `helm install`s the chart as release `release` into `namespace` (created
/// if missing) with the local cluster's values and the `--set` values,
/// waits for its CRDs, and returns what the release installed.
pub fn install(
    cp: &ControlPlane,
    helm: &Path,
    release: &str,
    namespace: &str,
    sets: &[&str],
) -> Result<Rendered> {
    let root = repo_root();
    let chart = root.join("charts/nvdra");
    let mut install = Command::new(helm);
    install
        .args(["install", release])
        .arg(&chart)
        .args(["--namespace", namespace, "--create-namespace"])
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .arg("--values")
        .arg(root.join(LOCAL_CLUSTER_VALUES));
    for set in sets {
        install.args(["--set", set]);
    }
    run(&mut install, "helm install")?;
    let mut manifest = Command::new(helm);
    manifest
        .args(["get", "manifest", release, "--namespace", namespace])
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig());
    let text = run(&mut manifest, "helm get manifest")?;
    cp.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
        None,
    )
    .context("wait for the chart's CRDs")?;
    parse(&text, namespace)
}

/// Runs a helm command; its stdout, or an error with its stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{what} printed non-UTF-8 output"))
}

/// Finds the workloads' identities and image in a chart's manifest.
pub fn parse(text: &str, namespace: &str) -> Result<Rendered> {
    let docs: Vec<Option<Value>> =
        serde_saphyr::from_str_multiple(text).context("parse helm's output as YAML")?;
    let mut agent_service_account = None;
    let mut image = None;
    let mut controller_service_account = None;
    for doc in docs.into_iter().flatten() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let spec = &doc["spec"]["template"]["spec"];
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or(namespace);
        if kind == "DaemonSet" {
            let sa = spec["serviceAccountName"]
                .as_str()
                .context("the chart's DaemonSet names no serviceAccountName")?;
            agent_service_account = Some((ns.to_owned(), sa.to_owned()));
            image = spec["containers"][0]["image"].as_str().map(str::to_owned);
        }
        if kind == "Deployment" && spec["containers"][0]["command"][0] == "nvdra-controller" {
            let sa = spec["serviceAccountName"]
                .as_str()
                .context("the chart's controller Deployment names no serviceAccountName")?;
            controller_service_account = Some((ns.to_owned(), sa.to_owned()));
        }
    }
    Ok(Rendered {
        agent_service_account: agent_service_account
            .context("the chart rendered no agent DaemonSet")?,
        image: image.context("the chart's DaemonSet has no container image")?,
        controller_service_account,
    })
}

/// Writes a kubeconfig for `namespace/service_account` (a bound token from
/// the TokenRequest API, valid for `hours`) next to the admin's, with the
/// admin's server and CA. Returns its path.
pub fn service_account_kubeconfig(
    cp: &ControlPlane,
    (namespace, service_account): &(String, String),
    hours: u32,
    out: &Path,
) -> Result<PathBuf> {
    let token = cp
        .kubectl(
            &[
                "create",
                "token",
                service_account,
                "--namespace",
                namespace,
                &format!("--duration={hours}h"),
            ],
            None,
        )
        .with_context(|| format!("request a token for {namespace}/{service_account}"))?;
    write_token_kubeconfig(cp, namespace, service_account, token.trim(), out)
}

/// Writes a kubeconfig for `namespace/service_account` whose token is bound
/// to Node `node`, as a DaemonSet pod's projected token is bound to its pod
/// and node: the API server then names the node in the user's extra
/// `authentication.kubernetes.io/node-name`, which the chart's admission
/// policies confine the agent to. The Node is created here when its kubelet
/// has not registered it yet (the emulator adopts it). Returns its path.
pub async fn node_bound_kubeconfig(
    cp: &ControlPlane,
    client: &kube::Client,
    (namespace, service_account): &(String, String),
    node: &str,
    hours: u32,
    out: &Path,
) -> Result<PathBuf> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::{Node, ServiceAccount};
    use kube::api::{Api, PostParams};

    let nodes: Api<Node> = Api::all(client.clone());
    let existing = nodes
        .get_opt(node)
        .await
        .with_context(|| format!("read Node {node}"))?;
    let object = match existing {
        Some(object) => object,
        None => {
            let mut fresh = Node::default();
            fresh.metadata.name = Some(node.to_owned());
            match nodes.create(&PostParams::default(), &fresh).await {
                Ok(object) => object,
                // Registered by its kubelet meanwhile.
                Err(kube::Error::Api(status)) if status.code == 409 => nodes.get(node).await?,
                Err(err) => return Err(err).with_context(|| format!("create Node {node}")),
            }
        }
    };
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(i64::from(hours) * 3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_owned()),
                uid: object.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let granted = accounts
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("request a token for {namespace}/{service_account} bound to Node {node}")
        })?;
    let token = granted
        .status
        .map(|s| s.token)
        .context("the token request returned no token")?;
    write_token_kubeconfig(cp, namespace, service_account, &token, out)
}

/// Writes a kubeconfig for the ServiceAccount's `token`, with the admin's
/// server and CA.
fn write_token_kubeconfig(
    cp: &ControlPlane,
    namespace: &str,
    service_account: &str,
    token: &str,
    out: &Path,
) -> Result<PathBuf> {
    let admin = kube::config::Kubeconfig::read_from(cp.admin_kubeconfig())
        .context("read the admin kubeconfig")?;
    let cluster = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("the admin kubeconfig has no cluster")?;
    let user = format!("system:serviceaccount:{namespace}:{service_account}");
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "local", "cluster": cluster }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{ "name": "local", "context": { "cluster": "local", "user": user } }],
        "current-context": "local",
    });
    std::fs::write(out, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("write {}", out.display()))?;
    Ok(out.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_finds_the_workloads_identities_and_image() {
        let text = "\
---
# Source: nvdra/templates/sa.yaml
apiVersion: v1
kind: ServiceAccount
metadata: { name: sa-kubeletplugin, namespace: nvdra }
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: agent, namespace: nvdra }
spec:
  template:
    spec:
      serviceAccountName: sa-kubeletplugin
      containers:
      - name: gpus
        image: ghcr.io/nvdra/nvdra:v0.1.0
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: controller }
spec:
  template:
    spec:
      serviceAccountName: sa-controller
      containers:
      - name: compute-domain
        command: [nvdra-controller]
---
";
        let rendered = parse(text, "other").unwrap();
        assert_eq!(
            rendered.controller_service_account,
            Some(("other".to_owned(), "sa-controller".to_owned()))
        );
        assert_eq!(
            rendered.agent_service_account,
            ("nvdra".to_owned(), "sa-kubeletplugin".to_owned())
        );
        assert_eq!(rendered.image, "ghcr.io/nvdra/nvdra:v0.1.0");
    }

    #[test]
    fn parse_refuses_a_chart_without_the_agent() {
        let err = parse("kind: ServiceAccount\nmetadata: { name: x }\n", "nvdra").unwrap_err();
        assert_eq!(err.to_string(), "the chart rendered no agent DaemonSet");
    }
}

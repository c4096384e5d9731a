//! The Node object, its status and its Lease heartbeat.
//!
//! [`register`] creates the Node if missing (with all labels, since
//! NodeRestriction lets a node set most labels only on its own create),
//! adds missing labels to an existing one, and writes a Ready status through
//! the status subresource. [`heartbeat`] renews `kube-node-lease/<node>`
//! every interval and re-posts the status every [`STATUS_EVERY`] intervals,
//! logging failures and carrying on. Status writes are JSON merge patches:
//! the emulator owns every condition it writes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::Error;
use crate::args::Capacity;

/// The version reported as `nodeInfo.kubeletVersion`.
pub const KUBELET_VERSION: &str = "v1.37.2";
/// `leaseDurationSeconds` of the node Lease (the kubelet's default).
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// The status is re-posted every this many heartbeats.
pub const STATUS_EVERY: u32 = 4;

const LABEL_HINT: &str = " (NodeRestriction lets a node set kubernetes.io/ and k8s.io/ labels only \
from an allow-list, e.g. kubernetes.io/hostname, kubernetes.io/os, kubernetes.io/arch, \
node.kubernetes.io/*, kubelet.kubernetes.io/*, topology.kubernetes.io/region|zone, and never \
node-restriction.kubernetes.io/*; check the --label flags)";

/// Kubernetes' name for this machine's architecture.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The Node's labels: the well-known ones, then `extra` (which may override).
pub fn labels(node: &str, extra: &[(String, String)]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", node),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    out.extend(extra.iter().cloned());
    out
}

/// The merge patch for the Node's status at `now`; conditions keep their
/// `lastTransitionTime` from `current` when their status is unchanged.
pub fn status_patch(
    node: &str,
    internal_ip: &str,
    capacity: &Capacity,
    current: Option<&NodeStatus>,
    now: Timestamp,
) -> serde_json::Value {
    let since = |ty: &str, status: &str| {
        current
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == ty && c.status == status))
            .and_then(|c| c.last_transition_time.clone())
            .map_or(now, |t| t.0)
    };
    let condition = |ty: &str, status: &str, reason: &str, message: &str| {
        serde_json::json!({
            "type": ty,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now.to_string(),
            "lastTransitionTime": since(ty, status).to_string(),
        })
    };
    serde_json::json!({
        "status": {
            "capacity": capacity.0,
            "allocatable": capacity.0,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": node},
            ],
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "nvdra kubelet emulator",
                "containerRuntimeVersion": format!("nvdra-kubelet-emulator://{}", env!("CARGO_PKG_VERSION")),
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch(),
            },
        }
    })
}

/// The node Lease as renewed at `now`, owned by the Node so it goes with it.
pub fn lease(node: &str, node_uid: Option<&str>, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(node.to_owned()),
            namespace: Some("kube-node-lease".into()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: node.to_owned(),
                    uid: uid.to_owned(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

fn node_err(action: &'static str, node: &str, source: kube::Error) -> Error {
    let forbidden = matches!(&source, kube::Error::Api(s) if s.code == 403);
    Error::Node {
        action,
        node: node.to_owned(),
        hint: if forbidden && action != "patch status of" {
            LABEL_HINT
        } else {
            ""
        },
        source,
    }
}

/// Creates or updates the Node and posts a Ready status; returns its UID.
pub async fn register(
    client: &Client,
    node: &str,
    internal_ip: &str,
    extra: &[(String, String)],
    capacity: &Capacity,
) -> Result<Option<String>, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let want = labels(node, extra);
    let current = match api
        .get_opt(node)
        .await
        .map_err(|e| node_err("get", node, e))?
    {
        Some(current) => {
            let have = current.metadata.labels.clone().unwrap_or_default();
            let missing: BTreeMap<&String, &String> = want
                .iter()
                .filter(|(k, v)| have.get(*k) != Some(*v))
                .collect();
            if missing.is_empty() {
                current
            } else {
                let body = serde_json::json!({ "metadata": { "labels": missing } });
                api.patch(node, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                    .map_err(|e| node_err("patch labels of", node, e))?
            }
        }
        None => {
            let object = Node {
                metadata: ObjectMeta {
                    name: Some(node.to_owned()),
                    labels: Some(want),
                    ..Default::default()
                },
                ..Default::default()
            };
            let created = api
                .create(&PostParams::default(), &object)
                .await
                .map_err(|e| node_err("create", node, e))?;
            tracing::info!(node, "created Node");
            created
        }
    };
    post_status(&api, node, internal_ip, capacity, current.status.as_ref()).await?;
    Ok(current.metadata.uid)
}

async fn post_status(
    api: &Api<Node>,
    node: &str,
    internal_ip: &str,
    capacity: &Capacity,
    current: Option<&NodeStatus>,
) -> Result<Node, Error> {
    let body = status_patch(node, internal_ip, capacity, current, Timestamp::now());
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(|e| node_err("patch status of", node, e))
}

async fn renew(client: &Client, node: &str, node_uid: Option<&str>) -> Result<(), Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let want = lease(node, node_uid, Timestamp::now());
    let err = |source| Error::RenewLease {
        node: node.to_owned(),
        source,
    };
    let body = serde_json::json!({ "spec": want.spec });
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => api
            .create(&PostParams::default(), &want)
            .await
            .map(|_| ())
            .map_err(err),
        Err(e) => Err(err(e)),
    }
}

/// Renews the Lease every `interval` and re-posts the status every
/// [`STATUS_EVERY`] renewals until `shutdown`.
pub async fn heartbeat(
    client: Client,
    node: String,
    node_uid: Option<String>,
    internal_ip: String,
    capacity: Capacity,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Node> = Api::all(client.clone());
    let mut tick: u32 = 0;
    let mut last_status: Option<NodeStatus> = None;
    loop {
        if let Err(err) = renew(&client, &node, node_uid.as_deref()).await {
            tracing::warn!(error = %crate::plugins::error_chain(&err), "heartbeat");
        }
        if tick.is_multiple_of(STATUS_EVERY) && tick > 0 {
            match post_status(&api, &node, &internal_ip, &capacity, last_status.as_ref()).await {
                Ok(n) => last_status = n.status,
                Err(err) => {
                    tracing::warn!(error = %crate::plugins::error_chain(&err), "post node status")
                }
            }
        }
        tick = tick.wrapping_add(1);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeCondition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use pretty_assertions::assert_eq;

    #[test]
    fn labels_are_well_known_then_extra() {
        let got = labels(
            "node-a",
            &[
                ("nvidia.com/gpu.present".into(), "true".into()),
                ("kubernetes.io/os".into(), "linux".into()),
            ],
        );
        let want: BTreeMap<String, String> = [
            ("kubernetes.io/arch", arch()),
            ("kubernetes.io/hostname", "node-a"),
            ("kubernetes.io/os", "linux"),
            ("nvidia.com/gpu.present", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(got, want);
        assert!(["amd64", "arm64"].contains(&arch()), "{}", arch());
    }

    #[test]
    fn status_is_ready_and_keeps_transition_times() {
        let capacity = crate::args::parse_capacity("cpu=4").unwrap();
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-01T00:01:00Z".parse().unwrap();
        let current = NodeStatus {
            conditions: Some(vec![
                NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(t0)),
                    ..Default::default()
                },
                NodeCondition {
                    type_: "DiskPressure".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(t0)),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let got = status_patch("node-a", "127.1.3.1", &capacity, Some(&current), t1);
        let status = &got["status"];
        assert_eq!(
            status["capacity"],
            serde_json::json!({"cpu": "4", "ephemeral-storage": "100Gi", "memory": "128Gi", "pods": "110"})
        );
        assert_eq!(status["allocatable"], status["capacity"]);
        let conditions: Vec<(String, String, String)> = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap().into(),
                    c["status"].as_str().unwrap().into(),
                    c["lastTransitionTime"].as_str().unwrap().into(),
                )
            })
            .collect();
        let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        assert_eq!(
            conditions,
            vec![
                s("MemoryPressure", "False", "2025-01-01T00:01:00Z"),
                s("DiskPressure", "False", "2025-01-01T00:01:00Z"),
                s("PIDPressure", "False", "2025-01-01T00:01:00Z"),
                s("Ready", "True", "2025-01-01T00:00:00Z"),
            ]
        );
        assert_eq!(
            status["conditions"][3]["lastHeartbeatTime"],
            "2025-01-01T00:01:00Z"
        );
        assert_eq!(
            status["addresses"],
            serde_json::json!([{"type": "InternalIP", "address": "127.1.3.1"}, {"type": "Hostname", "address": "node-a"}])
        );
        assert_eq!(status["nodeInfo"]["kubeletVersion"], "v1.37.2");
        assert_eq!(
            status["nodeInfo"]["containerRuntimeVersion"],
            "nvdra-kubelet-emulator://0.1.0"
        );
        assert_eq!(status["nodeInfo"]["architecture"], arch());
        // The patch must decode as a NodeStatus (every required nodeInfo field present).
        serde_json::from_value::<NodeStatus>(status.clone()).unwrap();
    }

    #[test]
    fn lease_is_held_by_the_node_for_40s() {
        let now: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            serde_json::to_value(lease("node-a", Some("nu"), now)).unwrap(),
            serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "node-a", "namespace": "kube-node-lease",
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "nu"}]},
                "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 40, "renewTime": "2025-01-01T00:00:00.000000Z"},
            })
        );
    }
}

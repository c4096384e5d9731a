//! The `ComputeDomain` custom resource (`resource.nvidia.com/v1beta1`).
//!
//! A ComputeDomain asks for an ephemeral IMEX domain spanning the nodes that run a multi-node
//! workload. The user writes `spec`; the controller and the IMEX daemons write `status`.
//!
//! Invariants:
//! - The schema is field-for-field compatible with the upstream Go driver's CRD: same types,
//!   defaults, enums, required lists, list-map keys and the CEL rule making `spec` immutable.
//!   The `crd_schema` tests pin each of these.
//! - Serialization matches the Go types: `numNodes` and `nodes` are omitted when empty (Go
//!   `omitempty`), `nodes[].index` is always written (it is optional but not `omitempty`).
//! - [`global_status`] is pure; it is the only place that decides `status.status`.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::names::{allocation_modes, compute_domain_status};

/// Desired state of a ComputeDomain. Immutable once created (enforced by the API server).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "resource.nvidia.com",
    version = "v1beta1",
    kind = "ComputeDomain",
    plural = "computedomains",
    singular = "computedomain",
    namespaced,
    status = "ComputeDomainStatus",
    derive = "PartialEq",
    doc = "A set of nodes joined into one ephemeral IMEX domain for a multi-node workload."
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("A computeDomain.spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct ComputeDomainSpec {
    /// Deprecated. Number of nodes expected to join. With IMEX DNS names (the default) it only
    /// decides when the global status turns Ready; without them, workloads wait until this many
    /// IMEX daemons have joined. Must be zero or greater.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0), extend("default" = 0))]
    pub num_nodes: i64,
    /// The IMEX channel handed to workload pods.
    pub channel: ComputeDomainChannelSpec,
}

/// The channel workloads use to join the ComputeDomain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeDomainChannelSpec {
    /// The ResourceClaimTemplate the controller creates for workload pods.
    pub resource_claim_template: ComputeDomainResourceClaimTemplate,
    /// Request all IMEX channels of the domain or exactly one.
    #[serde(default)]
    pub allocation_mode: AllocationMode,
}

/// Where the controller puts the workload ResourceClaimTemplate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct ComputeDomainResourceClaimTemplate {
    /// Name of the ResourceClaimTemplate, created in the ComputeDomain's namespace.
    pub name: String,
}

/// How many IMEX channels a workload claim gets.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum AllocationMode {
    /// Every IMEX channel of the domain.
    All,
    /// Exactly one IMEX channel (channel 0).
    #[default]
    Single,
}

impl AllocationMode {
    /// The wire value (`All` or `Single`), as also written into `ComputeDomainChannelConfig`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => allocation_modes::ALL,
            Self::Single => allocation_modes::SINGLE,
        }
    }
}

/// Readiness of the whole domain or of one node in it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Readiness {
    /// Ready.
    Ready,
    /// Not ready.
    #[default]
    NotReady,
}

impl Readiness {
    /// The wire value (`Ready` or `NotReady`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => compute_domain_status::READY,
            Self::NotReady => compute_domain_status::NOT_READY,
        }
    }
}

/// Observed state of a ComputeDomain. A debugging aid: workloads must not depend on it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeDomainStatus {
    /// Ready when at least `numNodes` nodes joined and all of them are ready.
    #[schemars(extend("default" = "NotReady"))]
    pub status: Readiness,
    /// Nodes that joined the domain (legacy location: with the `ComputeDomainCliques` gate
    /// the per-node rows live in ComputeDomainClique objects instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub nodes: Vec<ComputeDomainNode>,
    /// nvdra only (upstream has no conditions): the `Ready` condition, written by the
    /// controller with the `observedGeneration` it was computed for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// One node's IMEX daemon in a ComputeDomain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::crd::drop_index_default)]
pub struct ComputeDomainNode {
    /// Node name; the list-map key.
    pub name: String,
    /// IP address of the node's IMEX daemon pod.
    pub ip_address: String,
    /// NVLink clique ID of the node; empty when the node is not fabric-attached.
    #[serde(rename = "cliqueID")]
    pub clique_id: String,
    /// Selects the node's stable IMEX DNS name within its clique; `(cliqueID, index)` is
    /// unique. Optional, but always written so older readers see it.
    #[serde(default)]
    pub index: i64,
    /// Readiness of the node's IMEX daemon.
    #[serde(default)]
    #[schemars(extend("default" = "NotReady"))]
    pub status: Readiness,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The global `status.status` of a ComputeDomain: NotReady while fewer than `num_nodes` nodes
/// joined or any joined node is NotReady, otherwise Ready. `num_nodes == 0` with no nodes is
/// therefore Ready.
pub fn global_status<'a, I>(num_nodes: i64, node_statuses: I) -> Readiness
where
    I: IntoIterator<Item = &'a Readiness>,
{
    let mut count: i64 = 0;
    for status in node_statuses {
        if *status == Readiness::NotReady {
            return Readiness::NotReady;
        }
        count += 1;
    }
    if count < num_nodes {
        Readiness::NotReady
    } else {
        Readiness::Ready
    }
}

impl ComputeDomain {
    /// [`global_status`] over `status.nodes` (the legacy per-node location).
    pub fn global_status_from_nodes(&self) -> Readiness {
        let nodes = self
            .status
            .as_ref()
            .map(|s| s.nodes.as_slice())
            .unwrap_or_default();
        global_status(self.spec.num_nodes, nodes.iter().map(|n| &n.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Readiness::{NotReady, Ready};
    use pretty_assertions::assert_eq;

    #[test]
    fn global_status_table() {
        let cases: &[(i64, &[Readiness], Readiness)] = &[
            (0, &[], Ready),
            (0, &[Ready], Ready),
            (0, &[NotReady], NotReady),
            (2, &[Ready], NotReady),
            (2, &[Ready, Ready], Ready),
            (2, &[Ready, Ready, Ready], Ready),
            (2, &[Ready, NotReady], NotReady),
            (1, &[], NotReady),
        ];
        for (num_nodes, nodes, want) in cases {
            assert_eq!(
                global_status(*num_nodes, nodes.iter()),
                *want,
                "numNodes={num_nodes} nodes={nodes:?}"
            );
        }
    }

    #[test]
    fn global_status_from_object() {
        let mut cd = ComputeDomain::new(
            "cd",
            ComputeDomainSpec {
                num_nodes: 1,
                channel: ComputeDomainChannelSpec {
                    resource_claim_template: ComputeDomainResourceClaimTemplate {
                        name: "rct".into(),
                    },
                    allocation_mode: AllocationMode::Single,
                },
            },
        );
        assert_eq!(cd.global_status_from_nodes(), NotReady);
        cd.status = Some(ComputeDomainStatus {
            status: NotReady,
            nodes: vec![ComputeDomainNode {
                name: "n1".into(),
                ip_address: "10.0.0.1".into(),
                clique_id: "c.1".into(),
                index: 0,
                status: Ready,
            }],
            conditions: Vec::new(),
        });
        assert_eq!(cd.global_status_from_nodes(), Ready);
    }

    #[test]
    fn wire_values() {
        assert_eq!(AllocationMode::All.as_str(), "All");
        assert_eq!(AllocationMode::Single.as_str(), "Single");
        assert_eq!(Ready.as_str(), "Ready");
        assert_eq!(NotReady.as_str(), "NotReady");
        assert_eq!(
            serde_json::to_value(AllocationMode::default()).unwrap(),
            "Single"
        );
    }

    #[test]
    fn node_index_always_serialized_and_defaults() {
        let node: ComputeDomainNode = serde_json::from_value(serde_json::json!({
            "name": "n", "ipAddress": "1.2.3.4", "cliqueID": ""
        }))
        .unwrap();
        assert_eq!(node.index, 0);
        assert_eq!(node.status, NotReady);
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            serde_json::json!({
                "name": "n", "ipAddress": "1.2.3.4", "cliqueID": "", "index": 0,
                "status": "NotReady"
            })
        );
    }

    #[test]
    fn omitempty_fields_are_omitted() {
        let spec = ComputeDomainSpec {
            num_nodes: 0,
            channel: ComputeDomainChannelSpec {
                resource_claim_template: ComputeDomainResourceClaimTemplate { name: "t".into() },
                allocation_mode: AllocationMode::All,
            },
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({
                "channel": {"resourceClaimTemplate": {"name": "t"}, "allocationMode": "All"}
            })
        );
        assert_eq!(
            serde_json::to_value(ComputeDomainStatus::default()).unwrap(),
            serde_json::json!({"status": "NotReady"})
        );
    }
}

//! The `ComputeDomainClique` custom resource (`resource.nvidia.com/v1beta1`).
//!
//! One object per (ComputeDomain, NVLink clique), in the driver namespace, named
//! `<computeDomainUID>.<cliqueID>` and labelled with both values. Each IMEX daemon of the clique
//! owns one row of `daemons` (keyed by `nodeName`) and its pod is an owner of the object, so the
//! object is garbage-collected once every daemon pod is gone.
//!
//! Invariants:
//! - The object has no `spec` and no status subresource: `daemons` sits at the top level, like
//!   upstream's Go type. kube's `no_spec` keeps it in [`ComputeDomainCliqueSpec`] on the Rust
//!   side but flattens it on the wire and in the schema.
//! - `daemons` is a list-map keyed by `nodeName`, so each daemon can server-side-apply its own
//!   row without conflicting with its peers.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::computedomain::Readiness;
use crate::names::labels;

/// The top-level fields of a ComputeDomainClique.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "resource.nvidia.com",
    version = "v1beta1",
    kind = "ComputeDomainClique",
    plural = "computedomaincliques",
    singular = "computedomainclique",
    namespaced,
    no_spec,
    derive = "PartialEq",
    doc = "The IMEX daemons of one NVLink clique of a ComputeDomain."
)]
#[serde(rename_all = "camelCase")]
pub struct ComputeDomainCliqueSpec {
    /// One row per IMEX daemon of the clique, keyed by node name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["nodeName".into()]))]
    pub daemons: Vec<ComputeDomainDaemonInfo>,
}

/// One IMEX daemon in a clique.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::crd::drop_index_default)]
pub struct ComputeDomainDaemonInfo {
    /// Node the daemon runs on; the list-map key.
    pub node_name: String,
    /// IP address of the daemon pod.
    pub ip_address: String,
    /// NVLink clique ID of the node.
    #[serde(rename = "cliqueID")]
    pub clique_id: String,
    /// Selects the daemon's stable IMEX DNS name within the clique; unique per clique.
    /// Optional, but always written so older readers see it.
    #[serde(default)]
    pub index: i64,
    /// Readiness of the daemon.
    #[serde(default)]
    #[schemars(extend("default" = "NotReady"))]
    pub status: Readiness,
}

/// Name of the clique object of `clique_id` in ComputeDomain `compute_domain_uid`:
/// `<cdUID>.<cliqueID>`.
pub fn clique_name(compute_domain_uid: &str, clique_id: &str) -> String {
    format!("{compute_domain_uid}.{clique_id}")
}

/// Labels every clique object carries, so cliques of one ComputeDomain (or one clique across
/// ComputeDomains) can be listed with a label selector.
pub fn clique_labels(compute_domain_uid: &str, clique_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            labels::COMPUTE_DOMAIN.to_owned(),
            compute_domain_uid.to_owned(),
        ),
        (
            labels::COMPUTE_DOMAIN_CLIQUE_ID.to_owned(),
            clique_id.to_owned(),
        ),
    ])
}

/// Label selector (`key=value,…`) matching every clique of a ComputeDomain.
pub fn compute_domain_selector(compute_domain_uid: &str) -> String {
    format!("{}={compute_domain_uid}", labels::COMPUTE_DOMAIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use pretty_assertions::assert_eq;

    #[test]
    fn naming_helpers() {
        assert_eq!(clique_name("uid-1", "2df8.2"), "uid-1.2df8.2");
        assert_eq!(
            clique_labels("uid-1", "2df8.2"),
            BTreeMap::from([
                (
                    "resource.nvidia.com/computeDomain".to_owned(),
                    "uid-1".to_owned()
                ),
                (
                    "resource.nvidia.com/computeDomain.cliqueID".to_owned(),
                    "2df8.2".to_owned()
                ),
            ])
        );
        assert_eq!(
            compute_domain_selector("uid-1"),
            "resource.nvidia.com/computeDomain=uid-1"
        );
    }

    #[test]
    fn resource_identity() {
        assert_eq!(ComputeDomainClique::kind(&()), "ComputeDomainClique");
        assert_eq!(ComputeDomainClique::group(&()), "resource.nvidia.com");
        assert_eq!(ComputeDomainClique::version(&()), "v1beta1");
        assert_eq!(ComputeDomainClique::plural(&()), "computedomaincliques");
    }

    #[test]
    fn daemons_are_top_level_on_the_wire() {
        let mut clique = ComputeDomainClique::new("uid.c", ComputeDomainCliqueSpec::default());
        clique.spec.daemons.push(ComputeDomainDaemonInfo {
            node_name: "n1".into(),
            ip_address: "10.0.0.1".into(),
            clique_id: "c".into(),
            index: 3,
            status: Readiness::Ready,
        });
        let value = serde_json::to_value(&clique).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "apiVersion": "resource.nvidia.com/v1beta1",
                "kind": "ComputeDomainClique",
                "metadata": {"name": "uid.c"},
                "daemons": [{
                    "nodeName": "n1", "ipAddress": "10.0.0.1", "cliqueID": "c",
                    "index": 3, "status": "Ready"
                }]
            })
        );
        let back: ComputeDomainClique = serde_json::from_value(value).unwrap();
        assert_eq!(back, clique);
    }

    #[test]
    fn empty_clique_omits_daemons() {
        let clique = ComputeDomainClique::new("uid.c", ComputeDomainCliqueSpec::default());
        assert_eq!(
            serde_json::to_value(&clique).unwrap(),
            serde_json::json!({
                "apiVersion": "resource.nvidia.com/v1beta1",
                "kind": "ComputeDomainClique",
                "metadata": {"name": "uid.c"},
            })
        );
    }
}

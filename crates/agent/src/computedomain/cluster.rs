//! The API calls of the compute-domain driver: find a ComputeDomain by UID, put or take this
//! node's per-domain label, and ask whether this node's IMEX daemon of a domain is Ready.
//!
//! - ComputeDomains are found by UID with a cluster-wide metadata-only LIST (UIDs are not a
//!   field selector for custom resources); the UID → namespace/name mapping never changes, so
//!   it is cached and a domain costs one LIST per agent lifetime.
//! - The Node label `resource.nvidia.com/computeDomain.<uid>=true` is set and removed with JSON
//!   merge patches (field manager `nvdra-agent`): setting is idempotent, removal sets the key
//!   to `null`, which is a no-op when the label is gone. One key per domain, so domains sharing
//!   a node never overwrite each other's label (beyond upstream).
//! - Readiness is read from the domain's ComputeDomainCliques (driver namespace, label
//!   `resource.nvidia.com/computeDomain=<uid>`): Ready when any clique lists this node with
//!   `status: Ready`.
//!
//! RBAC: `nodes` patch; `computedomains` list (cluster-wide); `computedomaincliques` list (driver
//! namespace). Failure modes: [`ClusterError`], carrying the API error's text.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use nvdra_api::names::{field_managers, labels};
use nvdra_api::{ComputeDomain, ComputeDomainClique, Readiness};
use serde_json::{Value, json};

/// A ComputeDomain's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl std::fmt::Display for DomainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An API call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// Listing ComputeDomains failed.
    #[error("cannot list ComputeDomains: {0}")]
    ListDomains(String),
    /// No ComputeDomain has the UID.
    #[error("no ComputeDomain with UID {0} exists")]
    DomainNotFound(String),
    /// Patching the Node failed.
    #[error("cannot patch the label {label} of node {node}: {message}")]
    PatchNode {
        /// The node.
        node: String,
        /// The label key.
        label: String,
        /// The API error.
        message: String,
    },
    /// Listing cliques failed.
    #[error(
        "cannot list the ComputeDomainCliques of ComputeDomain {uid} in {namespace}: {message}"
    )]
    ListCliques {
        /// The domain.
        uid: String,
        /// The driver namespace.
        namespace: String,
        /// The API error.
        message: String,
    },
}

/// The API side of the driver.
pub struct Cluster {
    client: Client,
    namespace: String,
    node: String,
    domains: Mutex<HashMap<String, DomainRef>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The merge patch that sets the node label of `domain_uid`.
pub fn label_patch(domain_uid: &str) -> Value {
    json!({"metadata": {"labels": {labels::compute_domain_node_label(domain_uid): "true"}}})
}

/// The merge patch that removes the node label of `domain_uid`.
pub fn unlabel_patch(domain_uid: &str) -> Value {
    json!({"metadata": {"labels": {labels::compute_domain_node_label(domain_uid): null}}})
}

/// Whether `cliques` list `node` as Ready.
pub fn daemon_ready_in(cliques: &[ComputeDomainClique], node: &str) -> bool {
    cliques.iter().any(|clique| {
        clique
            .spec
            .daemons
            .iter()
            .any(|d| d.node_name == node && d.status == Readiness::Ready)
    })
}

impl Cluster {
    /// The API side for node `node`, cliques in `namespace`.
    pub fn new(client: Client, namespace: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            node: node.into(),
            domains: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, uid: &str) -> Option<DomainRef> {
        self.domains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .cloned()
    }

    /// The ComputeDomain with `uid`.
    ///
    /// A cached domain is confirmed with a one-object list (by name, in its namespace)
    /// before it is used: a domain deleted since must not get its node label back from a
    /// late channel claim after the controller removed it.
    pub async fn domain(&self, uid: &str) -> Result<DomainRef, ClusterError> {
        if let Some(found) = self.cached(uid) {
            let api: Api<ComputeDomain> = Api::namespaced(self.client.clone(), &found.namespace);
            let same = api
                .list_metadata(
                    &ListParams::default().fields(&format!("metadata.name={}", found.name)),
                )
                .await
                .map_err(|err| ClusterError::ListDomains(err.to_string()))?
                .items
                .iter()
                .any(|d| d.metadata.uid.as_deref() == Some(uid));
            if same {
                return Ok(found);
            }
            self.domains
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(uid);
            return Err(ClusterError::DomainNotFound(uid.to_owned()));
        }
        let api: Api<ComputeDomain> = Api::all(self.client.clone());
        let list = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(|err| ClusterError::ListDomains(err.to_string()))?;
        let mut cache = self
            .domains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for item in list.items {
            let meta = item.metadata;
            if let (Some(uid), Some(namespace), Some(name)) = (meta.uid, meta.namespace, meta.name)
            {
                cache.insert(
                    uid.clone(),
                    DomainRef {
                        uid,
                        namespace,
                        name,
                    },
                );
            }
        }
        cache
            .get(uid)
            .cloned()
            .ok_or_else(|| ClusterError::DomainNotFound(uid.to_owned()))
    }

    async fn patch_node(&self, domain_uid: &str, patch: Value) -> Result<(), ClusterError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let params = PatchParams {
            field_manager: Some(field_managers::AGENT.to_owned()),
            ..PatchParams::default()
        };
        api.patch(&self.node, &params, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|err| ClusterError::PatchNode {
                node: self.node.clone(),
                label: labels::compute_domain_node_label(domain_uid),
                message: err.to_string(),
            })
    }

    /// Sets this node's label for `domain_uid`.
    pub async fn label_node(&self, domain_uid: &str) -> Result<(), ClusterError> {
        self.patch_node(domain_uid, label_patch(domain_uid)).await
    }

    /// Removes this node's label for `domain_uid`.
    pub async fn unlabel_node(&self, domain_uid: &str) -> Result<(), ClusterError> {
        self.patch_node(domain_uid, unlabel_patch(domain_uid)).await
    }

    /// Whether this node's IMEX daemon of `domain_uid` is Ready.
    pub async fn daemon_ready(&self, domain_uid: &str) -> Result<bool, ClusterError> {
        let api: Api<ComputeDomainClique> = Api::namespaced(self.client.clone(), &self.namespace);
        let params =
            ListParams::default().labels(&format!("{}={domain_uid}", labels::COMPUTE_DOMAIN));
        let list = api
            .list(&params)
            .await
            .map_err(|err| ClusterError::ListCliques {
                uid: domain_uid.to_owned(),
                namespace: self.namespace.clone(),
                message: err.to_string(),
            })?;
        Ok(daemon_ready_in(&list.items, &self.node))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }
}

#[cfg(test)]
mod tests {
    use nvdra_api::ComputeDomainDaemonInfo;
    use pretty_assertions::assert_eq;

    use super::*;

    #[test]
    fn label_patches() {
        assert_eq!(
            serde_json::to_string(&label_patch("abc")).unwrap(),
            r#"{"metadata":{"labels":{"resource.nvidia.com/computeDomain.abc":"true"}}}"#
        );
        assert_eq!(
            serde_json::to_string(&unlabel_patch("abc")).unwrap(),
            r#"{"metadata":{"labels":{"resource.nvidia.com/computeDomain.abc":null}}}"#
        );
    }

    #[test]
    fn readiness_from_cliques() {
        let clique = |entries: &[(&str, Readiness)]| {
            let mut c = ComputeDomainClique::new("uid.clique", Default::default());
            c.spec.daemons = entries
                .iter()
                .enumerate()
                .map(|(i, (node, status))| ComputeDomainDaemonInfo {
                    node_name: (*node).into(),
                    ip_address: format!("10.0.0.{i}"),
                    clique_id: "clique".into(),
                    index: i64::try_from(i).unwrap(),
                    status: *status,
                })
                .collect();
            c
        };
        let cases = [
            (vec![], false),
            (vec![clique(&[("node-b", Readiness::Ready)])], false),
            (vec![clique(&[("node-a", Readiness::NotReady)])], false),
            (
                vec![
                    clique(&[("node-b", Readiness::Ready)]),
                    clique(&[("node-a", Readiness::Ready)]),
                ],
                true,
            ),
        ];
        for (cliques, want) in cases {
            assert_eq!(daemon_ready_in(&cliques, "node-a"), want, "{cliques:?}");
        }
    }
}

//! The API calls of the compute-domain driver: find a ComputeDomain by UID, put or take this
//! node's per-domain label, and wait until this node's IMEX daemon of a domain is Ready.
//!
//! - Two watches, each started on first use and kept for the agent's life, answer the hot
//!   questions from memory, so a burst of channel claims costs the API server no requests
//!   per claim: a cluster-wide metadata-only watch of ComputeDomains (UIDs are not a field
//!   selector for custom resources) and a watch of the ComputeDomainCliques of this node's
//!   NVLink clique (label `resource.nvidia.com/computeDomain.cliqueID`) in the driver
//!   namespace. A node with four pods per domain used to poll a clique LIST twice a second
//!   per claim; on 64 nodes that was 500 LISTs a second on the API server.
//! - The watches are only a fast path. A UID missing from the domain watch is looked up with a
//!   cluster-wide LIST (the watch may lag a domain created a moment ago), and a readiness wait
//!   that reaches its deadline asks the API once more with a LIST, so a broken watch (RBAC,
//!   network) makes waits slow, never wrong.
//! - The Node label `resource.nvidia.com/computeDomain.<uid>=true` is set and removed with JSON
//!   merge patches (field manager `nvdra-agent`): setting is idempotent, removal sets the key
//!   to `null`, which is a no-op when the label is gone. One key per domain, so domains sharing
//!   a node never overwrite each other's label (beyond upstream).
//! - Readiness is read from the domain's ComputeDomainCliques (driver namespace, label
//!   `resource.nvidia.com/computeDomain=<uid>`): Ready when any clique lists this node with
//!   `status: Ready`.
//!
//! RBAC: `nodes` patch; `computedomains` list and watch (cluster-wide); `computedomaincliques`
//! list and watch (driver namespace). Failure modes: [`ClusterError`], carrying the API error's
//! text.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use nvdra_api::names::{field_managers, labels};
use nvdra_api::{ComputeDomain, ComputeDomainClique, Readiness};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

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

/// How long a lookup waits for a watch that is still making its first LIST before it asks
/// the API itself.
const WATCH_START_WAIT: Duration = Duration::from_secs(5);

/// The API side of the driver.
pub struct Cluster {
    client: Client,
    namespace: String,
    node: String,
    domains: OnceLock<Watched<PartialObjectMeta<ComputeDomain>>>,
    cliques: OnceLock<Watched<ComputeDomainClique>>,
    /// Domains whose label this agent has set on its Node since it started (and not removed
    /// since), so the other claims of a domain on this node skip the no-op patch.
    labelled: Mutex<HashSet<String>>,
}

/// A watch's cache, a counter bumped on every event it delivers (so waiters wake), and the
/// text of its last error (logged when a wait's final LIST fails too).
struct Watched<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    changed: watch::Receiver<u64>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts watching `api` on the current runtime; the task ends with the runtime.
    fn start(api: Api<K>, config: watcher::Config, what: &'static str) -> Self {
        let (store, writer) = reflector::store::<K>();
        let (tx, changed) = watch::channel(0u64);
        let last_error = Arc::new(Mutex::new(None));
        let errors = Arc::clone(&last_error);
        tokio::spawn(async move {
            let mut events = watcher(api, config)
                .default_backoff()
                .reflect(writer)
                .boxed();
            while let Some(event) = events.next().await {
                let mut last = errors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match event {
                    Ok(_) => *last = None,
                    Err(err) => {
                        tracing::warn!(watch = what, error = %err, "watch failed; retrying");
                        *last = Some(err.to_string());
                    }
                }
                drop(last);
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        Self {
            store,
            changed,
            last_error,
        }
    }

    /// Whether the initial LIST has landed in the store.
    fn ready(&self) -> bool {
        self.store
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|r| r.is_ok())
    }
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

/// The identity in `meta`, when it has all three parts.
fn domain_ref(meta: &kube::core::ObjectMeta) -> Option<DomainRef> {
    Some(DomainRef {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
    })
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
            domains: OnceLock::new(),
            cliques: OnceLock::new(),
            labelled: Mutex::new(HashSet::new()),
        }
    }

    fn domain_watch(&self) -> &Watched<PartialObjectMeta<ComputeDomain>> {
        self.domains.get_or_init(|| {
            Watched::start(
                Api::all(self.client.clone()),
                watcher::Config::default(),
                "computedomains",
            )
        })
    }

    /// The watch of this node's NVLink clique's cliques (one per domain); `clique_id` is the
    /// node's and never changes during the agent's life.
    fn clique_watch(&self, clique_id: &str) -> &Watched<ComputeDomainClique> {
        self.cliques.get_or_init(|| {
            Watched::start(
                Api::namespaced(self.client.clone(), &self.namespace),
                watcher::Config::default()
                    .labels(&format!("{}={clique_id}", labels::COMPUTE_DOMAIN_CLIQUE_ID)),
                "computedomaincliques",
            )
        })
    }

    /// The ComputeDomain with `uid`: from the domain watch, else from a cluster-wide LIST.
    ///
    /// The first claims after start wait (briefly) for the watch's first LIST instead of
    /// each listing every domain themselves: a node's burst of claims costs one LIST.
    pub async fn domain(&self, uid: &str) -> Result<DomainRef, ClusterError> {
        let watched = self.domain_watch();
        let ready = watched.ready()
            || tokio::time::timeout(WATCH_START_WAIT, watched.store.wait_until_ready())
                .await
                .is_ok_and(|r| r.is_ok());
        if ready
            && let Some(found) = watched
                .store
                .find(|d| d.metadata.uid.as_deref() == Some(uid))
                .and_then(|d| domain_ref(&d.metadata))
        {
            return Ok(found);
        }
        let api: Api<ComputeDomain> = Api::all(self.client.clone());
        let list = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(|err| ClusterError::ListDomains(err.to_string()))?;
        list.items
            .iter()
            .filter(|d| d.metadata.uid.as_deref() == Some(uid))
            .find_map(|d| domain_ref(&d.metadata))
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

    fn labelled(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.labelled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets this node's label for `domain_uid`; once per domain while the label stays (only
    /// this agent removes it while the domain exists, and the caller has just found the
    /// domain).
    pub async fn label_node(&self, domain_uid: &str) -> Result<(), ClusterError> {
        if self.labelled().contains(domain_uid) {
            return Ok(());
        }
        self.patch_node(domain_uid, label_patch(domain_uid)).await?;
        self.labelled().insert(domain_uid.to_owned());
        Ok(())
    }

    /// Removes this node's label for `domain_uid`.
    pub async fn unlabel_node(&self, domain_uid: &str) -> Result<(), ClusterError> {
        self.labelled().remove(domain_uid);
        self.patch_node(domain_uid, unlabel_patch(domain_uid)).await
    }

    /// Waits until this node's IMEX daemon of `domain_uid` is Ready (`Ok(true)`) or
    /// `deadline` passes; then one LIST gives the answer, so a watch that is failing or lagging
    /// cannot turn a Ready daemon into a timeout.
    ///
    /// Only the cliques of `clique_id` (this node's) can hold this node's row, so only they
    /// are watched: a rack's agents do not hear about every other rack's daemons.
    pub async fn wait_daemon_ready(
        &self,
        domain_uid: &str,
        clique_id: &str,
        deadline: Instant,
    ) -> Result<bool, ClusterError> {
        let watched = self.clique_watch(clique_id);
        let mut changed = watched.changed.clone();
        loop {
            changed.borrow_and_update();
            if watched.ready() {
                let cliques: Vec<ComputeDomainClique> = watched
                    .store
                    .state()
                    .iter()
                    .filter(|c| {
                        c.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(labels::COMPUTE_DOMAIN))
                            .is_some_and(|v| v == domain_uid)
                    })
                    .map(|c| c.as_ref().clone())
                    .collect();
                if daemon_ready_in(&cliques, &self.node) {
                    return Ok(true);
                }
            }
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        // The watch task is gone (runtime shutting down): ask directly.
                        break;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        match self.list_ready(domain_uid).await {
            Ok(ready) => Ok(ready),
            Err(err) => {
                let watch_error = watched
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                if let Some(watch_error) = watch_error {
                    tracing::warn!(error = %watch_error, "the clique watch is failing too");
                }
                Err(err)
            }
        }
    }

    /// Whether this node's IMEX daemon of `domain_uid` is Ready, from a LIST.
    async fn list_ready(&self, domain_uid: &str) -> Result<bool, ClusterError> {
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

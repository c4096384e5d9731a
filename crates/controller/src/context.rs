//! What every reconcile shares: the API client, the daemon settings, metrics, the Event
//! recorder, the reflector stores of everything the controller watches, and two small pieces of
//! memory (the last applied child per domain, and per-domain error backoff).
//!
//! Invariants: stores are read-only views fed by the watches in [`crate::run`]; a reconcile
//! never lists what a store holds. The memory is an optimisation and a politeness measure
//! only: losing it (a restart, a new leader) costs one redundant apply per child.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
use kube::core::DeserializeGuard;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt as _};
use nvdra_api::names::labels;
use nvdra_api::{ComputeDomain, ComputeDomainClique};

use crate::daemonset::DaemonSettings;
use crate::metrics::Metrics;

/// Reflector stores of the watched kinds.
#[derive(Clone)]
pub struct Stores {
    /// Every ComputeDomain (decodable or not), cluster-wide.
    pub domains: Store<DeserializeGuard<ComputeDomain>>,
    /// Cliques in the driver namespace.
    pub cliques: Store<DeserializeGuard<ComputeDomainClique>>,
    /// Daemon pods in the driver namespace.
    pub pods: Store<Pod>,
    /// Daemon DaemonSets in the driver namespace.
    pub daemonsets: Store<DaemonSet>,
    /// Daemon claim templates in the driver namespace.
    pub daemon_templates: Store<ResourceClaimTemplate>,
    /// Workload claim templates, cluster-wide.
    pub workload_templates: Store<ResourceClaimTemplate>,
}

impl Stores {
    /// Waits until every store has its initial list.
    pub async fn wait_until_ready(
        &self,
    ) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.domains.wait_until_ready().await?;
        self.cliques.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.daemonsets.wait_until_ready().await?;
        self.daemon_templates.wait_until_ready().await?;
        self.workload_templates.wait_until_ready().await
    }

    /// Cliques of domain `uid` that decoded.
    pub fn cliques_of(&self, uid: &str) -> Vec<ComputeDomainClique> {
        self.cliques
            .state()
            .iter()
            .filter(|c| has_domain_label(c.as_ref(), uid))
            .filter_map(|c| c.0.as_ref().ok().cloned())
            .collect()
    }

    /// Daemon pods of domain `uid`.
    pub fn pods_of(&self, uid: &str) -> Vec<Pod> {
        self.pods
            .state()
            .iter()
            .filter(|p| has_domain_label(p.as_ref(), uid))
            .map(|p| p.as_ref().clone())
            .collect()
    }

    /// UIDs of every ComputeDomain in the cache, decodable or not.
    pub fn domain_uids(&self) -> std::collections::HashSet<String> {
        self.domains
            .state()
            .iter()
            .filter_map(|d| d.meta().uid.clone())
            .collect()
    }
}

/// Whether `obj` carries `resource.nvidia.com/computeDomain=<uid>`.
pub fn has_domain_label<K: Resource>(obj: &K, uid: &str) -> bool {
    obj.labels().get(labels::COMPUTE_DOMAIN).map(String::as_str) == Some(uid)
}

/// Kinds of children whose last apply is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Child {
    /// The daemon DaemonSet.
    DaemonSet,
    /// The daemon claim template.
    DaemonTemplate,
    /// The workload claim template.
    WorkloadTemplate,
}

/// State shared by all reconciles.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// Daemon pod settings from the flags.
    pub settings: DaemonSettings,
    /// Metrics.
    pub metrics: Metrics,
    /// Event recorder.
    pub recorder: Recorder,
    /// Watched objects.
    pub stores: Stores,
    applied: Mutex<HashMap<(Child, String), (u64, String)>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context with empty memory.
    pub fn new(
        client: kube::Client,
        settings: DaemonSettings,
        metrics: Metrics,
        recorder: Recorder,
        stores: Stores,
    ) -> Self {
        Self {
            client,
            settings,
            metrics,
            recorder,
            stores,
            applied: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Whether applying `desired` as `child` of domain `uid` can be skipped: the last apply
    /// wrote the same content and the object is unchanged since (`live_version` is the
    /// resourceVersion in the store, `None` when the object is missing).
    pub fn already_applied(
        &self,
        child: Child,
        uid: &str,
        desired: &impl serde::Serialize,
        live_version: Option<&str>,
    ) -> bool {
        let applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        match (applied.get(&(child, uid.to_owned())), live_version) {
            (Some((hash, version)), Some(live)) => {
                *hash == content_hash(desired) && version == live
            }
            _ => false,
        }
    }

    /// Remembers a successful apply of `desired` that produced `version`.
    pub fn record_applied(
        &self,
        child: Child,
        uid: &str,
        desired: &impl serde::Serialize,
        version: Option<String>,
    ) {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        match version {
            Some(version) => {
                applied.insert((child, uid.to_owned()), (content_hash(desired), version));
            }
            None => {
                applied.remove(&(child, uid.to_owned()));
            }
        }
    }

    /// Forgets everything about domain `uid`.
    pub fn forget(&self, uid: &str) {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(_, u), _| u != uid);
        self.reset_backoff(uid);
    }

    /// The delay before retrying domain `uid` after another failure.
    pub fn next_backoff(&self, uid: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(uid.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        backoff(*count, uid)
    }

    /// Clears the failure count of domain `uid` after a success.
    pub fn reset_backoff(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid);
    }
}

/// Lower bound of the retry delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Upper bound of the retry delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// Exponential backoff for the `failures`-th consecutive failure: 0.5 s doubling up to 5 min,
/// plus up to 10 % jitter derived from `key` and `failures` (deterministic, so testable, yet
/// different per domain so failing domains do not retry in lockstep).
pub fn backoff(failures: u32, key: &str) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let base = BACKOFF_BASE.saturating_mul(1 << exponent).min(BACKOFF_CAP);
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    failures.hash(&mut hasher);
    let jitter_permille = hasher.finish() % 100;
    base + base.mul_f64(jitter_permille as f64 / 1000.0)
}

fn content_hash(value: &impl serde::Serialize) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(value)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// The UID label of `obj`, if any.
pub fn domain_uid_label<K: Resource>(obj: &K) -> Option<&str> {
    obj.labels().get(labels::COMPUTE_DOMAIN).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_cap() {
        let cases = [
            (1, 500),
            (2, 1000),
            (3, 2000),
            (10, 256_000),
            (11, 300_000),
            (40, 300_000),
        ];
        for (failures, base_ms) in cases {
            let got = backoff(failures, "uid").as_millis();
            assert!(
                got >= base_ms && got < base_ms + base_ms / 10,
                "failure {failures}: {got} ms not in [{base_ms}, +10%)"
            );
        }
        assert_eq!(backoff(3, "uid"), backoff(3, "uid"));
    }
}

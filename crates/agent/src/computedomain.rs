//! [`ComputeDomainDriver`]: the node side of `compute-domain.nvidia.com`, which prepares IMEX
//! channel claims (workload pods) and IMEX daemon claims (the per-node daemon pods the
//! controller's DaemonSet starts) on top of the checkpoint, the CDI store and the API.
//!
//! # Job
//!
//! - Publish `channel-0` and `daemon-0` ([`devices`]); CDI specs are rendered by [`specs`].
//! - Daemon claim: create `<plugin data dir>/domains/<cdUID>/` with `imexd.cfg.tmpl`, write a
//!   claim spec giving the daemon its domain's identity, the directory at `/imexd` and (in a
//!   clique) the fabric-management capability; return the claim device plus the base device
//!   `k8s.compute-domain.nvidia.com/device=all` (written at start-up: `nvidia-imex`,
//!   `nvidia-imex-ctl` and the driver libraries from the host's driver root).
//! - Channel claim: the claim's namespace must be the ComputeDomain's; label the Node for the
//!   domain so its daemon lands here; on a clique node wait (at most
//!   [`ComputeDomainDriverConfig::readiness_timeout`], well inside the kubelet's 45 s) until this
//!   node's daemon of the domain is Ready, else fail the claim with a retriable error the
//!   kubelet retries; inject the domain's channel ([`channels`]) or all channels.
//! - Unprepare: drop the claim; the last channel claim of a domain on the node removes the
//!   domain's Node label, the last daemon claim removes the domain's directory.
//!
//! # Invariants
//!
//! - Checkpoint protocol as the GPU driver's ([`crate::driver`]): `PrepareStarted` is durable
//!   before any side effect (label, directory, spec), `PrepareCompleted` before the kubelet hears
//!   of success; completed claims are answered from the checkpoint without API calls.
//! - API calls and the readiness wait run outside every lock, so a channel claim waiting for its
//!   daemon never blocks the daemon's own claim (the plugin is built without the library's
//!   call serialization; each checkpoint phase takes the driver mutex and the node lock file).
//! - Channel assignment happens under the driver mutex, so two domains never get one channel.
//!
//! # Failure modes
//!
//! Per-claim [`PrepareError`]s (their text is what the pod's events show). A claim waiting for
//! its daemon stays `PrepareStarted`, so an Unprepare of it still finds the domain whose label it
//! set. Start-up failures are [`crate::driver::Error`]s, as for the GPU driver.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::Device;
use nvdra_gpu::ImexInfo;
use nvdra_kubelet_plugin::error::error_chain;
use nvdra_kubelet_plugin::resourceslice::NodeResources;
use nvdra_kubelet_plugin::{ClaimRef, DraDriver, PrepareClaim, PrepareResults, UnprepareResults};

use crate::cdi::CdiStore;
use crate::cdi::spec::Spec;
use crate::checkpoint::{self, CheckpointStore};
use crate::driver::{Error, Ledger, Startup, lock_node};
use crate::metrics::{ErrorType, Metrics, Operation};

pub mod channels;
pub mod cluster;
pub mod config;
pub mod devices;
mod prepare;
pub mod specs;
mod unprepare;

pub use cluster::{Cluster, ClusterError, DomainRef};
pub use prepare::PrepareError;

/// How long a channel prepare waits for the local daemon by default: long enough for a daemon
/// pod that is already starting, short enough to answer well inside the kubelet's 45 s.
pub const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_secs(25);

/// File name of the IMEX config template in a domain directory.
pub const CONFIG_TEMPLATE_FILE: &str = "imexd.cfg.tmpl";

/// Directory of the domain directories, under the plugin data dir.
pub const DOMAINS_DIR: &str = "domains";

/// The IMEX daemon's config template: upstream's keys and values, with the two placeholders
/// the daemon fills (its pod IP and the container path of the node list).
pub const CONFIG_TEMPLATE: &str = "\
# Written by nvdra-agent; rendered into imexd.cfg by the IMEX daemon.
LOG_FILE_NAME=
LOG_LEVEL=4
LOG_APPEND_TO_LOG=1
DAEMONIZE=0
IMEX_CMD_BIND_INTERFACE_IP={{.IMEXCmdBindInterfaceIP}}
IMEX_NODE_CONFIG_FILE={{.IMEXDaemonNodesConfigPath}}
SERVER_PORT=50000
IMEX_CMD_PORT=50005
IMEX_CMD_ENABLED=1
IMEX_WAIT_FOR_QUORUM=RECOVERY
IMEX_ENABLE_AUTH_ENCRYPTION=0
IMEX_NODE_DISCONNECTED_GRACE_TIME=-1
";

/// Everything the driver needs; the agent builds it from its flags.
pub struct ComputeDomainDriverConfig {
    /// This node's name (and pool name).
    pub node_name: String,
    /// `<plugins>/compute-domain.nvidia.com`; `checkpoint.json` and `domains/` live here.
    /// Must be the same path on the host (the daemon's `/imexd` mount names it).
    pub plugin_data_dir: PathBuf,
    /// The compute-domain vendor's store in the CDI root.
    pub cdi: CdiStore,
    /// The base spec to write at start-up.
    pub base_spec: Spec,
    /// IMEX facts of the node.
    pub imex: ImexInfo,
    /// The node's NVLink clique; `None` outside any clique.
    pub clique_id: Option<String>,
    /// Feature gates.
    pub gates: nvdra_api::FeatureGates,
    /// The boot ID (empty: reboot check off).
    pub boot_id: String,
    /// Metrics handle for this driver.
    pub metrics: Metrics,
    /// The API side.
    pub cluster: Cluster,
    /// Longest wait for the local daemon in one channel prepare.
    pub readiness_timeout: Duration,
}

/// State shared by the handle and its blocking workers.
pub(crate) struct Shared {
    node_name: String,
    plugin_data_dir: PathBuf,
    cdi: CdiStore,
    imex: ImexInfo,
    clique_id: Option<String>,
    gates: nvdra_api::FeatureGates,
    metrics: Metrics,
    cluster: Cluster,
    readiness_timeout: Duration,
    published: Vec<Device>,
    node_lock_path: PathBuf,
    ledger: Mutex<Ledger>,
}

/// The `compute-domain.nvidia.com` node driver; hand it to
/// [`nvdra_kubelet_plugin::KubeletPlugin`] with serialization off.
pub struct ComputeDomainDriver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ComputeDomainDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeDomainDriver")
            .field("node_name", &self.shared.node_name)
            .field("clique_id", &self.shared.clique_id)
            .finish_non_exhaustive()
    }
}

impl ComputeDomainDriver {
    /// Starts the driver: checkpoint recovery, CDI clean-up, base spec. Blocking; call before
    /// serving.
    pub fn start(config: ComputeDomainDriverConfig) -> Result<(Self, Startup), Error> {
        let ComputeDomainDriverConfig {
            node_name,
            plugin_data_dir,
            cdi,
            base_spec,
            imex,
            clique_id,
            gates,
            boot_id,
            metrics,
            cluster,
            readiness_timeout,
        } = config;
        std::fs::create_dir_all(&plugin_data_dir).map_err(|source| Error::CreateDataDir {
            path: plugin_data_dir.clone(),
            source,
        })?;
        let node_lock_path = plugin_data_dir.join(nvdra_kubelet_plugin::serialize::LOCK_FILE_NAME);
        let node_lock = lock_node(&node_lock_path).map_err(|source| Error::NodeLock {
            path: node_lock_path.clone(),
            source,
        })?;
        let store = CheckpointStore::new(&plugin_data_dir);
        let loaded = store.load(&boot_id).map_err(Error::LoadCheckpoint)?;
        let outcome = loaded.outcome.clone();
        crate::driver::log_load(&outcome, store.path());
        let mut ledger =
            Ledger::new(loaded, store, boot_id, metrics.clone()).map_err(Error::WriteCheckpoint)?;
        let mut startup = Startup {
            checkpoint: outcome,
            rolled_back: Vec::new(),
            orphan_specs_removed: 0,
            unaccounted_specs: Vec::new(),
            temp_files_removed: 0,
            orphan_metadata_removed: 0,
            problems: Vec::new(),
        };
        crate::driver::recover(&cdi, &mut ledger, &mut startup, &|_, _| {})?;
        if let Err(err) = cdi.write_base_spec(&base_spec) {
            // Daemon claims fail at prepare without it; the agent itself can still serve.
            let text = error_chain(&err);
            tracing::error!(error = %text, "cannot write the compute-domain base CDI spec");
            startup.problems.push(text);
        }
        drop(node_lock);
        tracing::info!(
            node = %node_name,
            clique_id = clique_id.as_deref().unwrap_or(""),
            channels = imex.channel_count,
            claims = ledger.state().claims().count(),
            rolled_back = startup.rolled_back.len(),
            "compute-domain driver started"
        );
        let shared = Shared {
            node_name,
            plugin_data_dir,
            cdi,
            imex,
            clique_id,
            gates,
            metrics,
            cluster,
            readiness_timeout,
            published: devices::node_devices(),
            node_lock_path,
            ledger: Mutex::new(ledger),
        };
        Ok((
            Self {
                shared: Arc::new(shared),
            },
            startup,
        ))
    }

    /// The devices this node publishes.
    pub fn node_resources(&self) -> NodeResources {
        NodeResources {
            devices: self.shared.published.clone(),
            shared_counters: Vec::new(),
        }
    }
    /// Every checkpointed claim with its state, for the stale-claim clean-up.
    pub(crate) async fn checkpointed_claims(
        &self,
    ) -> Result<Vec<(checkpoint::ClaimRef, checkpoint::ClaimState)>, String> {
        blocking(&self.shared, "clean-up", |shared| {
            let (_node_lock, ledger) = shared.lock_all()?;
            Ok(ledger
                .state()
                .claims()
                .map(|(uid, entry)| (entry.claim_ref(uid), entry.state.clone()))
                .collect())
        })
        .await?
    }

    /// Unprepares `claims` as the kubelet's Unprepare does (for the stale-claim clean-up).
    pub(crate) async fn unprepare_claims(&self, claims: Vec<ClaimRef>) -> UnprepareResults {
        unprepare::unprepare_batch(&self.shared, claims).await
    }

    /// A copy of the checkpoint state.
    pub fn checkpoint_state(&self) -> checkpoint::CheckpointState {
        self.shared.ledger_unsynced().state().clone()
    }

    /// The directory of domain `domain_uid`.
    pub fn domain_dir(&self, domain_uid: &str) -> PathBuf {
        self.shared.domain_dir(domain_uid)
    }
}

impl Shared {
    fn ledger_unsynced(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| {
            tracing::error!("a panic interrupted an earlier batch; re-reading the checkpoint");
            self.ledger.clear_poison();
            let mut ledger = poisoned.into_inner();
            ledger.invalidate();
            ledger
        })
    }

    /// Takes the node lock file and the driver mutex, and brings the ledger up to date.
    fn lock_all(&self) -> Result<(std::fs::File, MutexGuard<'_, Ledger>), String> {
        let node_lock = lock_node(&self.node_lock_path).map_err(|err| {
            format!(
                "cannot take the node lock {}: {err}",
                self.node_lock_path.display()
            )
        })?;
        let mut ledger = self.ledger_unsynced();
        ledger.sync().map_err(|err| {
            format!(
                "cannot bring the node's checkpoint up to date: {}",
                error_chain(&err)
            )
        })?;
        Ok((node_lock, ledger))
    }

    fn domain_dir(&self, domain_uid: &str) -> PathBuf {
        self.plugin_data_dir.join(DOMAINS_DIR).join(domain_uid)
    }
}

/// Runs `work` on a blocking thread; a panic becomes an error message.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    what: &'static str,
    work: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Result<T, String> {
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || work(&shared))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, what, "driver worker died");
            format!("internal error: the {what} worker died")
        })
}

/// Creates the domain directory with its config template (idempotent; the template is
/// replaced atomically so a daemon never reads half of it).
fn ensure_domain_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let target = dir.join(CONFIG_TEMPLATE_FILE);
    let temp = dir.join(format!(".{CONFIG_TEMPLATE_FILE}.tmp"));
    std::fs::write(&temp, CONFIG_TEMPLATE)?;
    std::fs::rename(&temp, &target)
}

impl DraDriver for ComputeDomainDriver {
    async fn prepare_resource_claims(&self, claims: Vec<PrepareClaim>) -> PrepareResults {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        let _inflight = metrics.inflight(Operation::Prepare, claims.len());
        let (results, lock_failures) = prepare::prepare_batch(&self.shared, claims).await;
        let succeeded = results.values().filter(|r| r.is_ok()).count();
        let failed = results.len() - succeeded;
        metrics.observe_success(Operation::Prepare, succeeded, started.elapsed());
        metrics.inc_errors(Operation::Prepare, ErrorType::LockAcquire, lock_failures);
        metrics.inc_errors(
            Operation::Prepare,
            ErrorType::PrepareDevices,
            failed.saturating_sub(lock_failures),
        );
        results
    }

    async fn unprepare_resource_claims(&self, claims: Vec<ClaimRef>) -> UnprepareResults {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        let _inflight = metrics.inflight(Operation::Unprepare, claims.len());
        let results = unprepare::unprepare_batch(&self.shared, claims).await;
        let failed = results.values().filter(|r| r.is_err()).count();
        metrics.observe_success(
            Operation::Unprepare,
            results.len() - failed,
            started.elapsed(),
        );
        metrics.inc_errors(Operation::Unprepare, ErrorType::UnprepareDevices, failed);
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_dir_gets_the_template() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("domains/cd-1");
        ensure_domain_dir(&dir).unwrap();
        ensure_domain_dir(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join(CONFIG_TEMPLATE_FILE)).unwrap(),
            CONFIG_TEMPLATE
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }
}

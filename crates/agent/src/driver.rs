//! [`GpuDriver`]: the `gpu.nvidia.com` node driver, which prepares and unprepares claims for
//! the kubelet ([`DraDriver`]) on top of the device layer, the CDI store and the checkpoint.
//!
//! # Job
//!
//! - [`GpuDriver::start`]: take the GPU inventory, load the checkpoint (writing it back if
//!   loading changed it), roll back claims whose Prepare was interrupted, remove CDI specs no
//!   checkpoint entry accounts for and temporary files of interrupted spec writes, and set the
//!   prepared-devices gauge. [`GpuDriver::node_resources`] is what the node publishes.
//! - After a corrupt checkpoint, start-up keeps the specs no entry accounts for (they may
//!   belong to running pods) and lists them in [`Startup::unaccounted_specs`];
//!   [`GpuDriver::adopt_after_corruption`] then records the claims [`crate::rebuild`] found
//!   still live and removes the rest.
//! - Prepare and Unprepare batches ([`prepare`]; Unprepare in the private `unprepare`), one
//!   checkpoint write per batch and phase, with upstream's metrics ([`crate::metrics`]).
//! - Stale-claim clean-up support for [`crate::cleanup`].
//!
//! # Invariants
//!
//! - A claim is `PrepareStarted` on disk before its CDI spec is written and `PrepareCompleted`
//!   on disk before the kubelet hears it is prepared; a completed claim is answered from the
//!   checkpoint without touching anything; a device is never prepared for two claims unless
//!   one has admin access.
//! - All checkpoint state lives behind one mutex (the private `ledger` module); every batch
//!   holds it from begin to end, so no one ever observes a half-done batch. The kubelet-plugin
//!   library already serializes kubelet calls; the mutex orders them against the clean-up.
//!   Start-up and the clean-up's changes additionally hold the plugin's cross-process lock
//!   file (`serialize.lock`, which the library takes per call in rolling-update mode), so a
//!   second agent pod never interleaves with them.
//!
//! # Blocking
//!
//! A batch is file I/O with six fsyncs (checkpoint, spec, checkpoint); the work runs under
//! `tokio::task::spawn_blocking`, never on a runtime worker, so a slow disk (an fsync waits for
//! a journal commit: ~0.2 ms on an idle disk, 8–16 ms behind other writers) cannot stall the
//! registration server, the health endpoint or the ResourceSlice publisher. The hand-off costs
//! about 12 µs (p99 17 µs), invisible next to one fsync; running the batch inline measured no
//! faster (docs/performance.md). The specs of a multi-claim batch are written concurrently
//! (scoped threads), so their fsyncs share journal commits.
//!
//! # Failure modes
//!
//! - Start-up fails ([`Error`]) when the inventory, the data directory, the lock file or the
//!   checkpoint cannot be read or written; clean-up problems at start-up (a spec that cannot
//!   be removed) are logged and reported in [`Startup::problems`], not fatal.
//! - Per-claim failures are [`prepare::PrepareError`]s (and, for Unprepare, checkpoint errors),
//!   returned as the claim's error text; they never fail the whole call.
//! - A panic inside a batch poisons the mutex; the next batch re-reads the checkpoint from
//!   disk (the file is always a complete, consistent state) instead of trusting memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use k8s_openapi::api::resource::v1::{Device, DeviceRequestAllocationResult};
use nvdra_gpu::GpuBackend;
use nvdra_kubelet_plugin::error::error_chain;
use nvdra_kubelet_plugin::resource_health;
use nvdra_kubelet_plugin::resourceslice::{NodeResources, Publisher};
use nvdra_kubelet_plugin::{
    ClaimError, ClaimRef, DraDriver, PrepareClaim, PrepareResults, UnprepareResults,
};

use crate::cdi::{self, CdiStore, CommonEdits};
use crate::checkpoint::{
    self, CheckpointState, CheckpointStore, ClaimEntry, ClaimState, LoadOutcome,
};
use crate::devices::{AllocatableDevice, Partitioning, allocatable_index_with};
use crate::health::{HealthState, HealthStore};
use crate::metadata::MetadataStore;
use crate::metrics::{ErrorType, Metrics, Operation};
use crate::mps::MpsDaemons;

pub(crate) mod dynamic_mig;
pub(crate) mod ledger;
pub mod prepare;
pub(crate) mod sharing;
mod unprepare;
pub mod vfio;

pub(crate) use ledger::Ledger;
pub use prepare::PrepareError;
pub(crate) use unprepare::{Expect, Outcome};

/// Failures that keep the driver from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device layer could not list the node's GPUs.
    #[error("cannot take the GPU inventory")]
    Inventory(#[source] nvdra_gpu::Error),
    /// The plugin data directory could not be created.
    #[error("cannot create the plugin data directory {}", path.display())]
    CreateDataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node-wide lock file could not be opened or locked.
    #[error("cannot take the node lock {}", path.display())]
    NodeLock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint could not be read.
    #[error("cannot load the checkpoint")]
    LoadCheckpoint(#[source] checkpoint::Error),
    /// No health watch could be set up (NVMLDeviceHealthCheck).
    #[error("cannot watch the GPUs' health")]
    WatchHealth(#[source] nvdra_gpu::Error),
    /// The health thread could not be started.
    #[error("cannot start the health thread")]
    SpawnHealth(#[source] std::io::Error),
    /// The node's PCI GPUs could not be listed (PassthroughSupport).
    #[error("cannot list the node's NVIDIA PCI devices")]
    ScanPci(#[source] nvdra_gpu::Error),
    /// The checkpoint could not be written back after loading or rollback.
    #[error("cannot write the checkpoint")]
    WriteCheckpoint(#[source] checkpoint::Error),
}

/// Everything the driver needs; the agent builds it from its flags.
pub struct GpuDriverConfig {
    /// This node's name, which is also the name of the pool the node publishes.
    pub node_name: String,
    /// The device layer.
    pub backend: Arc<dyn GpuBackend>,
    /// The plugin data directory; `checkpoint.json` lives here.
    pub plugin_data_dir: PathBuf,
    /// Where claim CDI specs are written.
    pub cdi: CdiStore,
    /// The node-wide CDI edits, discovered at start-up.
    pub common_edits: CommonEdits,
    /// Feature gates.
    pub gates: nvdra_api::FeatureGates,
    /// `/proc/sys/kernel/random/boot_id`; empty if unknown (the reboot check is then off).
    pub boot_id: String,
    /// Where the driver reports.
    pub metrics: Metrics,
    /// The MPS control daemons; `None` unless the `MPSSupport` gate is on
    /// and the driver root has the daemon.
    pub mps: Option<Arc<MpsDaemons>>,
    /// The host's kernel interfaces for passthrough; `None` unless the
    /// `PassthroughSupport` gate is on.
    pub vfio: Option<vfio::VfioHost>,
    /// Device health; `None` unless the `NVMLDeviceHealthCheck` gate is on
    /// (see [`GpuDriver::watch_health`]).
    pub health: Option<HealthOptions>,
}

/// How device health is judged.
#[derive(Debug, Clone)]
pub struct HealthOptions {
    /// Xids that taint with effect `None` only.
    pub ignored_xids: BTreeSet<u64>,
    /// How long a lost GPU must be gone before NVML answering for every GPU
    /// again clears its taint.
    pub lost_recovery: std::time::Duration,
}

impl Default for HealthOptions {
    fn default() -> Self {
        Self {
            ignored_xids: crate::health::DEFAULT_IGNORED_XIDS.into_iter().collect(),
            lost_recovery: GPU_LOST_RECOVERY,
        }
    }
}

/// What [`GpuDriver::start`] found and repaired.
#[derive(Debug, Clone, PartialEq)]
pub struct Startup {
    /// What the checkpoint load found (the agent turns `Corrupt` into a Node Event).
    pub checkpoint: LoadOutcome,
    /// UIDs of claims whose interrupted Prepare was rolled back.
    pub rolled_back: Vec<String>,
    /// Claim CDI specs removed because no checkpoint entry accounts for them.
    pub orphan_specs_removed: usize,
    /// UIDs of claims with a CDI spec but no checkpoint entry, kept because the checkpoint
    /// was corrupt (the claims may still be in use; [`crate::rebuild`] sorts them out).
    /// Empty unless the load outcome is [`LoadOutcome::Corrupt`].
    pub unaccounted_specs: Vec<String>,
    /// Temporary spec files of interrupted writes removed.
    pub temp_files_removed: usize,
    /// Device metadata directories (`DeviceMetadata`) removed because no checkpoint entry
    /// accounts for them.
    pub orphan_metadata_removed: usize,
    /// Repairs that failed and were skipped (logged as warnings too).
    pub problems: Vec<String>,
}

/// Where a test may stop a batch to simulate a crash.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// `PrepareStarted` of the batch is durable; no CDI spec is written yet.
    AfterPrepareStarted,
    /// The batch's CDI specs are written; `PrepareCompleted` is not recorded yet.
    AfterSpecsWritten,
}

/// A test-only hook called at each [`FaultPoint`]; `None` in production.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(FaultPoint) + Send + Sync>;

/// State shared by the driver handle and its blocking workers.
pub(crate) struct Shared {
    node_name: String,
    backend: Arc<dyn GpuBackend>,
    cdi: CdiStore,
    /// Device metadata files; written only with the `DeviceMetadata` gate, removed always (the
    /// gate may have been on when a claim was prepared).
    metadata: MetadataStore,
    common_edits: CommonEdits,
    gates: nvdra_api::FeatureGates,
    metrics: Metrics,
    mps: Option<Arc<MpsDaemons>>,
    vfio: Option<vfio::VfioHost>,
    siblings: BTreeMap<String, String>,
    publisher: OnceLock<Publisher>,
    /// What was last handed to the publisher.
    last_published: Mutex<Option<NodeResources>>,
    health: Option<Health>,
    devices: BTreeMap<String, AllocatableDevice>,
    published: Vec<Device>,
    counter_sets: Vec<k8s_openapi::api::resource::v1::CounterSet>,
    node_lock_path: PathBuf,
    ledger: Mutex<Ledger>,
    fault: OnceLock<FaultHook>,
    inline_io: AtomicBool,
}

/// Device health: the taints, where they are saved, which Xids only inform.
struct Health {
    state: Mutex<HealthState>,
    store: HealthStore,
    options: HealthOptions,
    /// What the kubelet's resource-health stream serves.
    feed: tokio::sync::watch::Sender<Vec<resource_health::DeviceHealth>>,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, HealthState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the state with `change`; saves when it says it changed.
    fn update(&self, change: impl FnOnce(&mut HealthState) -> bool) -> bool {
        let mut state = self.lock();
        if !change(&mut state) {
            return false;
        }
        if let Err(err) = self.store.save(&state) {
            tracing::warn!(error = %err, "cannot save the device health state; it is lost if the agent restarts");
        }
        true
    }
}

/// The `gpu.nvidia.com` node driver; hand it to [`nvdra_kubelet_plugin::KubeletPlugin`].
pub struct GpuDriver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GpuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDriver")
            .field("node_name", &self.shared.node_name)
            .field("devices", &self.shared.devices.len())
            .finish_non_exhaustive()
    }
}

impl GpuDriver {
    /// Starts the driver: inventory, checkpoint recovery, CDI clean-up (see the module docs).
    /// Blocking (file I/O and the node lock); call it before serving.
    pub fn start(config: GpuDriverConfig) -> Result<(Self, Startup), Error> {
        let GpuDriverConfig {
            node_name,
            backend,
            plugin_data_dir,
            cdi,
            common_edits,
            gates,
            boot_id,
            metrics,
            mps,
            vfio,
            health,
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

        let inventory = backend.inventory().map_err(Error::Inventory)?;
        let partitioning = if gates.enabled(nvdra_api::FeatureGate::DynamicMIG) {
            Partitioning::Dynamic
        } else {
            Partitioning::Static
        };
        let mut devices = allocatable_index_with(&inventory, partitioning);
        if let Some(host) = &vfio {
            add_vfio(host, &inventory, &mut devices)?;
        }

        let store = CheckpointStore::new(&plugin_data_dir);
        let loaded = store.load(&boot_id).map_err(Error::LoadCheckpoint)?;
        let outcome = loaded.outcome.clone();
        log_load(&outcome, store.path());
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
        recover(&cdi, &mut ledger, &mut startup, &|entry, claim| {
            undo_entry(
                backend.as_ref(),
                mps.as_deref(),
                vfio.as_ref(),
                &devices,
                &gates,
                entry,
                claim,
            );
        })?;
        let metadata = MetadataStore::new(
            plugin_data_dir.join(crate::metadata::DIR_NAME),
            nvdra_api::names::drivers::GPU,
        );
        remove_orphan_metadata(&metadata, ledger.state(), &mut startup);
        if let Some(daemons) = &mps {
            // A claim with a spec is prepared (or, after a corrupt checkpoint,
            // maybe still in use): its daemons stay; every other goes.
            let problems =
                daemons.recover(|uid| cdi.claim_spec_path(uid).is_ok_and(|p| p.exists()));
            for problem in &problems {
                tracing::warn!(%problem, "MPS daemon recovery");
            }
            startup.problems.extend(problems);
        }
        if let Some(host) = &vfio {
            let released = vfio::release_unowned(host, &devices, ledger.state());
            if !released.is_empty() {
                tracing::info!(gpus = ?released, "bound GPUs no claim holds back to nvidia");
                // Offer them as GPUs again (where NVML listed them).
                devices = allocatable_index_with(&inventory, partitioning);
                add_vfio(host, &inventory, &mut devices)?;
            }
        }
        let (published, counter_sets) = crate::devices::publish(&inventory, &devices, partitioning);
        let siblings = vfio::siblings(&devices);
        let destroyed = dynamic_mig::tear_down_unowned(backend.as_ref(), &devices, ledger.state());
        if !destroyed.is_empty() {
            tracing::info!(
                count = destroyed.len(),
                "destroyed MIG devices no claim holds"
            );
        }
        drop(node_lock);

        tracing::info!(
            node = %node_name,
            devices = devices.len(),
            claims = ledger.state().claims().count(),
            rolled_back = startup.rolled_back.len(),
            orphan_specs_removed = startup.orphan_specs_removed,
            orphan_metadata_removed = startup.orphan_metadata_removed,
            unaccounted_specs = startup.unaccounted_specs.len(),
            "gpu driver started"
        );
        let shared = Shared {
            node_name,
            backend,
            cdi,
            metadata,
            common_edits,
            gates,
            metrics,
            mps,
            vfio,
            siblings,
            publisher: OnceLock::new(),
            last_published: Mutex::new(None),
            health: health.map(|options| Health {
                state: Mutex::new(HealthStore::new(&plugin_data_dir).load()),
                store: HealthStore::new(&plugin_data_dir),
                options,
                feed: tokio::sync::watch::Sender::new(Vec::new()),
            }),
            devices,
            published,
            counter_sets,
            node_lock_path,
            ledger: Mutex::new(ledger),
            fault: OnceLock::new(),
            inline_io: AtomicBool::new(false),
        };
        Ok((
            Self {
                shared: Arc::new(shared),
            },
            startup,
        ))
    }

    /// The devices this node publishes now, in priority (name) order, with
    /// their counter sets: every device, except the siblings of devices a
    /// claim holds (a GPU is offered as a GPU or for passthrough, never both).
    pub fn node_resources(&self) -> NodeResources {
        self.shared.node_resources()
    }

    /// Starts watching the node's GPUs for health events (a no-op without
    /// `NVMLDeviceHealthCheck`) on a thread of its own; taints are
    /// republished as they change. Fails when no watch can be set up.
    pub fn watch_health(&self) -> Result<(), Error> {
        let Some(health) = &self.shared.health else {
            return Ok(());
        };
        let mut gpus: Vec<nvdra_gpu::GpuInfo> = Vec::new();
        for device in self.shared.devices.values() {
            if let Some(gpu) = device.physical_gpu()
                && !gpus.iter().any(|g| g.uuid == gpu.uuid)
            {
                gpus.push(gpu.clone());
            }
        }
        let watch = self
            .shared
            .backend
            .watch_health(&gpus)
            .map_err(Error::WatchHealth)?;
        let now = now_seconds();
        let unmonitored: Vec<String> = watch
            .unmonitored()
            .iter()
            .flat_map(|uuid| crate::health::devices_of_gpu(&self.shared.devices, uuid))
            .collect();
        // Re-judged at every start: a GPU may report events again.
        if health.update(|state| {
            let cleared = state.clear_key(crate::health::UNMONITORED_KEY);
            state.unmonitored(&unmonitored, now) || cleared
        }) && !unmonitored.is_empty()
        {
            tracing::warn!(devices = ?unmonitored, "devices whose health NVML cannot report are tainted unmonitored");
        }
        self.shared.republish();
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("nvdra-health".to_owned())
            .spawn(move || health_loop(&shared, &watch))
            .map(|_| ())
            .map_err(Error::SpawnHealth)
    }

    /// The device health the kubelet's resource-health stream serves;
    /// `None` without `NVMLDeviceHealthCheck`.
    pub fn health_feed(&self) -> Option<resource_health::HealthFeed> {
        let health = self.shared.health.as_ref()?;
        self.shared.refresh_health_feed();
        Some(health.feed.subscribe())
    }

    /// Acts on the value of the Node's clear annotation
    /// ([`crate::health::CLEAR_ANNOTATION`]); returns the devices cleared.
    pub fn clear_health_taints(&self, request: &str) -> Vec<String> {
        let Some(health) = &self.shared.health else {
            return Vec::new();
        };
        let mut cleared = Vec::new();
        let changed = health.update(|state| {
            let before = state.last_clear.clone();
            cleared = state.clear_request(request);
            before != state.last_clear
        });
        if changed && !cleared.is_empty() {
            tracing::info!(devices = ?cleared, request, "device health taints cleared by the Node annotation");
            self.shared.republish();
        }
        cleared
    }

    /// Publishes [`Self::node_resources`] through `publisher` now, and again
    /// whenever they change (a device hidden or shown, a taint); the first
    /// publisher wins.
    pub fn set_publisher(
        &self,
        publisher: Publisher,
    ) -> Result<(), nvdra_kubelet_plugin::resourceslice::Error> {
        let resources = self.node_resources();
        publisher.publish(resources.clone())?;
        *self.shared.last_published() = Some(resources);
        if self.shared.publisher.set(publisher).is_err() {
            tracing::warn!("a publisher is already set; ignoring another");
        }
        Ok(())
    }

    /// This node's name (and pool name).
    pub fn node_name(&self) -> &str {
        &self.shared.node_name
    }

    /// Every device this node offers, by published name.
    pub fn allocatable_devices(&self) -> &BTreeMap<String, AllocatableDevice> {
        &self.shared.devices
    }

    /// A copy of the checkpoint state as the driver holds it.
    pub fn checkpoint_state(&self) -> CheckpointState {
        self.shared.ledger_unsynced().state().clone()
    }

    /// Installs a test hook that runs at every [`FaultPoint`]; the first hook wins.
    #[doc(hidden)]
    pub fn set_fault_hook(&self, hook: FaultHook) {
        if self.shared.fault.set(hook).is_err() {
            tracing::warn!("a fault hook is already installed; ignoring another");
        }
    }

    /// Runs batches on the calling async task instead of a blocking thread; for measuring the
    /// cost of the hand-off only.
    #[doc(hidden)]
    pub fn set_inline_io(&self, inline: bool) {
        self.shared.inline_io.store(inline, Ordering::Relaxed);
    }

    /// Runs `work` on a blocking thread (or inline, see [`Self::set_inline_io`]); a panic
    /// becomes an error message.
    async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> Result<T, String> {
        if self.shared.inline_io.load(Ordering::Relaxed) {
            return Ok(work(&self.shared));
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || work(&shared))
            .await
            .map_err(|err| {
                tracing::error!(error = %err, what, "driver worker died");
                format!("internal error: the {what} worker died")
            })
    }

    /// Every checkpointed claim and its state, for the clean-up.
    pub(crate) async fn checkpointed_claims(
        &self,
    ) -> Result<Vec<(checkpoint::ClaimRef, ClaimState)>, String> {
        self.run("clean-up", |shared| {
            let ledger = shared.lock_ledger().map_err(|err| error_chain(&err))?;
            Ok(ledger
                .state()
                .claims()
                .map(|(uid, entry)| (entry.claim_ref(uid), entry.state.clone()))
                .collect())
        })
        .await?
    }

    /// Unprepares claims for the clean-up, under the node lock, re-checking `Expect` under the
    /// driver lock.
    pub(crate) async fn unprepare_for_cleanup(
        &self,
        claims: Vec<(String, Expect)>,
    ) -> Result<BTreeMap<String, Outcome>, String> {
        self.run("clean-up", move |shared| {
            let _node_lock = lock_node(&shared.node_lock_path).map_err(|err| {
                format!(
                    "cannot take the node lock {}: {err}",
                    shared.node_lock_path.display()
                )
            })?;
            let done = unprepare::unprepare_batch(shared, &claims);
            shared.republish();
            Ok(done)
        })
        .await?
    }

    /// Rebuilds the state lost with a corrupt checkpoint (see [`crate::rebuild`]): records
    /// `adopt` (claim UID, entry) as completed claims, with one checkpoint write, then removes
    /// the CDI specs of `stale_specs`, all under the node lock and the driver lock. Claims
    /// already recorded are left alone, as are their specs, so a retry is harmless; a claim
    /// whose device another claim holds is not adopted and keeps its spec (reported in
    /// [`Adopted::refused`]). Fails, changing nothing on disk but leaving the ledger to write
    /// the adopted claims at its next sync, when a lock or the checkpoint write fails.
    pub async fn adopt_after_corruption(
        &self,
        adopt: Vec<(String, ClaimEntry)>,
        stale_specs: Vec<String>,
    ) -> Result<Adopted, String> {
        self.run("rebuild", move |shared| {
            let _node_lock = lock_node(&shared.node_lock_path).map_err(|err| {
                format!(
                    "cannot take the node lock {}: {err}",
                    shared.node_lock_path.display()
                )
            })?;
            let mut ledger = shared.lock_ledger().map_err(|err| error_chain(&err))?;
            let mut report = Adopted::default();
            for (uid, entry) in adopt {
                let claim = entry.claim_ref(&uid);
                match ledger.state_mut().adopt_completed(&uid, entry) {
                    Ok(true) => {
                        tracing::info!(%claim, "adopted a live claim lost with the checkpoint");
                        report.adopted.push(uid);
                    }
                    Ok(false) => tracing::debug!(%claim, "claim already recorded; not adopted"),
                    Err(err) => {
                        let text = error_chain(&err);
                        tracing::warn!(%claim, error = %text, "cannot adopt claim");
                        report.refused.push((uid, text));
                    }
                }
            }
            if !report.adopted.is_empty() {
                ledger.persist().map_err(|err| error_chain(&err))?;
            }
            for uid in stale_specs {
                // A spec whose claim is recorded (adopted above or by an earlier try) is live.
                if ledger.state().claim(&uid).is_some() {
                    continue;
                }
                if let Some(daemons) = &shared.mps {
                    daemons.stop_claim(&uid);
                }
                shared.remove_metadata(&uid);
                match shared.cdi.remove_claim_spec(&uid) {
                    Ok(_) => {
                        tracing::info!(claim_uid = %uid, "removed CDI spec of a claim no longer in use");
                        report.stale_specs_removed += 1;
                    }
                    Err(err) => {
                        let text = error_chain(&err);
                        tracing::warn!(claim_uid = %uid, error = %text, "cannot remove stale CDI spec");
                        report.problems.push(text);
                    }
                }
            }
            Ok(report)
        })
        .await?
    }
}

/// What [`GpuDriver::adopt_after_corruption`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Adopted {
    /// UIDs of the claims recorded as completed.
    pub adopted: Vec<String>,
    /// Claims not adopted (a device held by another claim), with the reason; their specs stay.
    pub refused: Vec<(String, String)>,
    /// CDI specs removed.
    pub stale_specs_removed: usize,
    /// Specs that could not be removed.
    pub problems: Vec<String>,
}

impl Shared {
    fn node_resources(&self) -> NodeResources {
        let hidden = if self.siblings.is_empty() {
            Default::default()
        } else {
            vfio::hidden(&self.siblings, self.ledger_unsynced().state())
        };
        let health = self.health.as_ref().map(|h| h.lock().clone());
        NodeResources {
            devices: self
                .published
                .iter()
                .filter(|d| !hidden.contains(&d.name))
                .map(|d| {
                    let mut device = d.clone();
                    device.taints = health.as_ref().and_then(|h| h.device_taints(&d.name));
                    device
                })
                .collect(),
            shared_counters: self.counter_sets.clone(),
        }
    }

    /// Publishes [`Self::node_resources`] again when they changed (each
    /// publish costs the publisher a LIST), and updates the resource-health
    /// stream.
    fn republish(&self) {
        self.refresh_health_feed();
        if self.siblings.is_empty() && self.health.is_none() {
            return;
        }
        let Some(publisher) = self.publisher.get() else {
            return;
        };
        let resources = self.node_resources();
        let mut last = self.last_published();
        if last.as_ref() == Some(&resources) {
            return;
        }
        match publisher.publish(resources.clone()) {
            Ok(()) => *last = Some(resources),
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "cannot republish the node's devices");
            }
        }
    }

    fn last_published(&self) -> MutexGuard<'_, Option<NodeResources>> {
        self.last_published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends the resource-health stream the current health, stamped now
    /// (the kubelet treats a report older than its timeout as unknown, so
    /// the health loop refreshes it every few seconds).
    fn refresh_health_feed(&self) {
        if let Some(health) = &self.health {
            let state = health.lock().clone();
            let devices = crate::health::stream_report(
                &self.node_name,
                self.devices.keys(),
                &state,
                now_seconds(),
            );
            health.feed.send_replace(devices);
        }
    }

    /// Takes the ledger and brings it up to date with the file.
    fn lock_ledger(&self) -> Result<MutexGuard<'_, Ledger>, checkpoint::Error> {
        let mut ledger = self.ledger_unsynced();
        ledger.sync()?;
        Ok(ledger)
    }

    fn ledger_unsynced(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| {
            tracing::error!("a panic interrupted an earlier batch; re-reading the checkpoint");
            self.ledger.clear_poison();
            let mut ledger = poisoned.into_inner();
            ledger.invalidate();
            ledger
        })
    }

    /// Removes a claim's device metadata; a failure is logged, and start-up removes the
    /// directory as an orphan once the claim's entry is gone.
    fn remove_metadata(&self, claim_uid: &str) {
        if let Err(err) = self.metadata.remove_claim(claim_uid) {
            tracing::warn!(claim_uid, error = %error_chain(&err), "cannot remove device metadata; start-up will remove it as an orphan");
        }
    }

    /// The device behind an allocation result, if it is ours.
    fn find_device(
        &self,
        result: &DeviceRequestAllocationResult,
    ) -> Result<&AllocatableDevice, PrepareError> {
        if result.pool != self.node_name {
            return Err(PrepareError::ForeignPool {
                request: result.request.clone(),
                device: result.device.clone(),
                pool: result.pool.clone(),
                node: self.node_name.clone(),
            });
        }
        self.devices
            .get(&result.device)
            .ok_or_else(|| PrepareError::UnknownDevice {
                request: result.request.clone(),
                device: result.device.clone(),
                node: self.node_name.clone(),
            })
    }

    fn fault(&self, point: FaultPoint) {
        if let Some(hook) = self.fault.get() {
            hook(point);
        }
    }
}

impl DraDriver for GpuDriver {
    async fn prepare_resource_claims(&self, claims: Vec<PrepareClaim>) -> PrepareResults {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        let _inflight = metrics.inflight(Operation::Prepare, claims.len());
        let uids: Vec<String> = claims.iter().map(|c| c.claim_ref.uid.clone()).collect();
        let (results, lock_failures) = match self
            .run("prepare", move |shared| {
                let done = prepare::prepare_batch(shared, claims);
                shared.republish();
                done
            })
            .await
        {
            Ok(done) => done,
            Err(message) => (
                uids.into_iter()
                    .map(|uid| (uid, Err(ClaimError::driver(message.clone()))))
                    .collect(),
                0,
            ),
        };
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
        let batch: Vec<(String, Expect)> = claims
            .iter()
            .map(|c| (c.uid.clone(), Expect::Any))
            .collect();
        let outcomes = self
            .run("unprepare", move |shared| {
                let done = unprepare::unprepare_batch(shared, &batch);
                shared.republish();
                done
            })
            .await;
        let mut results = UnprepareResults::new();
        let (mut lock_failures, mut failures) = (0, 0);
        match outcomes {
            Ok(outcomes) => {
                for (uid, outcome) in outcomes {
                    let result = match outcome {
                        Ok(_) => Ok(()),
                        Err(err) => {
                            match err {
                                unprepare::UnprepareError::Sync(_) => lock_failures += 1,
                                unprepare::UnprepareError::Checkpoint(_) => failures += 1,
                            }
                            Err(ClaimError::from_error(&err))
                        }
                    };
                    results.insert(uid, result);
                }
            }
            Err(message) => {
                failures = claims.len();
                for claim in claims {
                    results.insert(claim.uid, Err(ClaimError::driver(message.clone())));
                }
            }
        }
        let succeeded = results.len() - lock_failures - failures;
        metrics.observe_success(Operation::Unprepare, succeeded, started.elapsed());
        metrics.inc_errors(Operation::Unprepare, ErrorType::LockAcquire, lock_failures);
        metrics.inc_errors(Operation::Unprepare, ErrorType::UnprepareDevices, failures);
        results
    }
}

/// Opens and locks the node-wide lock file (blocking until the holder releases it).
pub(crate) fn lock_node(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.lock()?;
    Ok(file)
}

/// Rolls back interrupted prepares, removes orphaned specs and temporary files. After a
/// corrupt checkpoint, orphaned specs are kept and listed in [`Startup::unaccounted_specs`]
/// instead: the lost entries may describe claims whose pods still run, and removing their
/// specs would break every container restart in them.
/// Undoes every host change a claim's entry may stand for: resets
/// time-sliced GPUs and destroys the MIG devices of its partitions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn undo_entry(
    backend: &dyn nvdra_gpu::GpuBackend,
    mps: Option<&MpsDaemons>,
    vfio_host: Option<&vfio::VfioHost>,
    devices: &BTreeMap<String, AllocatableDevice>,
    gates: &nvdra_api::FeatureGates,
    entry: &checkpoint::ClaimEntry,
    claim: &checkpoint::ClaimRef,
) {
    let name = claim.to_string();
    if let Some(daemons) = mps {
        sharing::stop_mps(
            backend,
            daemons,
            &claim.uid,
            sharing::gpus_to_reset_after_mps(devices, gates, entry),
        );
    }
    sharing::reset(
        backend,
        sharing::gpus_to_reset(devices, gates, entry),
        &name,
    );
    for partition in dynamic_mig::partitions_of(devices, entry) {
        dynamic_mig::destroy(backend, partition, &name);
    }
    if let Some(host) = vfio_host {
        for device in vfio::devices_of(devices, entry) {
            vfio::release(host, device, &name);
        }
    }
}

/// How long a lost GPU must answer again before its taint goes.
const GPU_LOST_RECOVERY: std::time::Duration = std::time::Duration::from_secs(30);

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Waits for health events forever, recording each on the devices it
/// concerns and republishing on change; clears `gpu-lost` once NVML
/// answers for every GPU again, [`GPU_LOST_RECOVERY`] after the loss.
fn health_loop(shared: &Shared, watch: &nvdra_gpu::health::HealthWatch) {
    let Some(health) = &shared.health else {
        return;
    };
    loop {
        // Short waits while a lost GPU may recover, so it is seen soon.
        let slice = health.options.lost_recovery.clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(5),
        );
        match watch.wait(slice) {
            Ok(Some(event)) => {
                let devices = event_devices(shared, &event);
                tracing::warn!(?event, ?devices, "GPU health event");
                let now = now_seconds();
                if health.update(|state| {
                    state.record(&event, &devices, &health.options.ignored_xids, now)
                }) {
                    shared.republish();
                }
            }
            Ok(None) => {
                shared.refresh_health_feed();
                let lost_since = health
                    .lock()
                    .taints
                    .values()
                    .filter_map(|t| t.get(crate::health::GPU_LOST_KEY))
                    .map(|t| t.since)
                    .max();
                let wait =
                    i64::try_from(health.options.lost_recovery.as_secs()).unwrap_or(i64::MAX);
                let recovered = lost_since
                    .is_some_and(|since| now_seconds().saturating_sub(since) >= wait)
                    && shared.backend.gpus().is_ok();
                if recovered && health.update(|state| state.clear_key(crate::health::GPU_LOST_KEY))
                {
                    tracing::info!("NVML answers for every GPU again; gpu-lost taints cleared");
                    shared.republish();
                }
            }
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "waiting for GPU health events failed; retrying");
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// The devices `event` concerns: the MIG device it names (static, or the
/// partition whose created device it is), else every device of its GPU.
fn event_devices(shared: &Shared, event: &nvdra_gpu::health::HealthEvent) -> Vec<String> {
    let (Some(gi), Some(ci)) = (event.gi_id, event.ci_id) else {
        return crate::health::devices_of_gpu(&shared.devices, &event.gpu_uuid);
    };
    if let Some(name) = crate::health::static_mig_device(&shared.devices, &event.gpu_uuid, gi, ci) {
        return vec![name];
    }
    let parent = shared
        .devices
        .values()
        .filter_map(AllocatableDevice::physical_gpu)
        .find(|g| g.uuid == event.gpu_uuid);
    let created = parent.and_then(|gpu| shared.backend.mig_devices(gpu).ok());
    created
        .into_iter()
        .flatten()
        .find(|mig| mig.gi_id == gi && mig.ci_id == ci)
        .map(|mig| mig.device_name())
        .filter(|name| shared.devices.contains_key(name))
        .map_or_else(
            || crate::health::devices_of_gpu(&shared.devices, &event.gpu_uuid),
            |name| vec![name],
        )
}

/// Adds the node's passthrough devices to `devices`.
fn add_vfio(
    host: &vfio::VfioHost,
    inventory: &nvdra_gpu::Inventory,
    devices: &mut BTreeMap<String, AllocatableDevice>,
) -> Result<(), Error> {
    let pci = nvdra_gpu::vfio::nvidia_pci_gpus(&host.sysfs_root).map_err(Error::ScanPci)?;
    let offered = crate::devices::vfio_devices(
        &pci,
        &inventory.gpus,
        |bdf| nvdra_gpu::pcie::pcie_root(&host.sysfs_root, bdf).ok(),
        |bdf| {
            nvdra_gpu::vfio::iommufd_enabled(&host.sysfs_root, &host.dev_root, bdf).unwrap_or(false)
        },
    );
    crate::devices::add_vfio_devices(devices, offered);
    Ok(())
}

/// `undo` is called with each rolled-back claim's entry first, to undo host changes beyond
/// the spec (the GPU driver resets time slices).
pub(crate) fn recover(
    cdi: &CdiStore,
    ledger: &mut Ledger,
    startup: &mut Startup,
    undo: &dyn Fn(&checkpoint::ClaimEntry, &checkpoint::ClaimRef),
) -> Result<(), Error> {
    let keep_orphans = matches!(startup.checkpoint, LoadOutcome::Corrupt { .. });
    for claim in ledger.state().started_claims() {
        let removed = if cdi::validate_claim_uid(&claim.uid).is_ok() {
            cdi.remove_claim_spec(&claim.uid).map(|_| ())
        } else {
            // No spec can exist for a UID that cannot name one.
            Ok(())
        };
        match removed {
            Ok(()) => {
                if let Some(entry) = ledger.state().claim(&claim.uid) {
                    undo(entry, &claim);
                }
                ledger.state_mut().remove(&claim.uid);
                tracing::info!(%claim, "rolled back an interrupted prepare");
                startup.rolled_back.push(claim.uid);
            }
            Err(err) => problem(
                startup,
                format!("cannot roll back claim {claim}: {}", error_chain(&err)),
            ),
        }
    }
    if !startup.rolled_back.is_empty() {
        ledger.persist().map_err(Error::WriteCheckpoint)?;
    }

    match cdi.remove_temp_files() {
        Ok(removed) => startup.temp_files_removed = removed,
        Err(err) => problem(startup, error_chain(&err)),
    }
    match cdi.list_claim_specs() {
        Ok(uids) => {
            for uid in uids {
                if ledger.state().claim(&uid).is_some() {
                    continue;
                }
                if keep_orphans {
                    startup.unaccounted_specs.push(uid);
                    continue;
                }
                match cdi.remove_claim_spec(&uid) {
                    Ok(_) => {
                        tracing::info!(claim_uid = %uid, "removed orphaned CDI spec");
                        startup.orphan_specs_removed += 1;
                    }
                    Err(err) => problem(startup, error_chain(&err)),
                }
            }
        }
        Err(err) => problem(startup, error_chain(&err)),
    }
    Ok(())
}

/// Removes the device metadata of claims the checkpoint does not hold (rolled back above, or
/// interrupted between the metadata and the spec write). Kept after a corrupt load, as specs
/// are: the claims may still be in use, and the rebuild removes what turns out stale.
fn remove_orphan_metadata(
    metadata: &MetadataStore,
    state: &CheckpointState,
    startup: &mut Startup,
) {
    if matches!(startup.checkpoint, LoadOutcome::Corrupt { .. }) {
        return;
    }
    let uids = match metadata.list_claims() {
        Ok(uids) => uids,
        Err(err) => return problem(startup, error_chain(&err)),
    };
    for uid in uids.iter().filter(|uid| state.claim(uid).is_none()) {
        match metadata.remove_claim(uid) {
            Ok(_) => {
                tracing::info!(claim_uid = %uid, "removed orphaned device metadata");
                startup.orphan_metadata_removed += 1;
            }
            Err(err) => problem(startup, error_chain(&err)),
        }
    }
}

fn problem(startup: &mut Startup, text: String) {
    tracing::warn!(problem = %text, "start-up clean-up incomplete");
    startup.problems.push(text);
}

pub(crate) fn log_load(outcome: &LoadOutcome, path: &Path) {
    let path = path.display();
    match outcome {
        LoadOutcome::Missing => tracing::info!(%path, "no checkpoint; starting empty"),
        LoadOutcome::Valid(file) => {
            if file.source.is_newer() {
                tracing::warn!(%path, source = ?file.source, "checkpoint written by a newer nvdra; unknown fields are kept");
            } else {
                tracing::info!(%path, source = ?file.source, "checkpoint loaded");
            }
        }
        LoadOutcome::BootIdChanged {
            previous_boot_id,
            discarded,
            ..
        } => tracing::warn!(
            %path,
            %previous_boot_id,
            discarded = discarded.len(),
            "node rebooted since the checkpoint was written; its claims were discarded"
        ),
        LoadOutcome::Corrupt { aside_path, reason } => tracing::error!(
            %path,
            aside = %aside_path.display(),
            %reason,
            "checkpoint is corrupt; moved aside, starting empty"
        ),
    }
}

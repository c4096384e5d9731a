//! [`FakeBackend`]: a deterministic [`GpuBackend`] serving one node described
//! by a profile (see [`profile`]), for tests and `--device-backend=fake`.
//!
//! The profile is validated and expanded once, at construction, into a
//! [`FakeNode`]; reads are clones of its state, so they never fail except
//! for questions about GPUs the node does not have ([`Error::UnknownGpu`]).
//! MIG changes follow the driver's rules as [`FakeNode`] models them. Clones
//! of a backend share one node, as two handles to one machine's GPUs would.
//! MIG capability minors follow the driver's fixed minor layout
//! ([`MigCapabilities::from_driver_layout`]) instead of reading procfs, and
//! IMEX device numbers are fixed ([`crate::imex::fake_numbers`]); the channel
//! count is the profile's `imex_channel_count` (default 2048).
//!
//! Realistic profiles ship in `crates/gpu/profiles/` and are also compiled in
//! ([`BUILTIN_PROFILES`], [`FakeBackend::builtin`]) so a binary can simulate
//! a node without files.
//!
//! Health events are injected ([`FakeBackend::inject_health_event`]) into
//! the node's event log, which every health watch reads from where it
//! started; a waiting watch sleeps on a condition variable that injection
//! signals, so it wakes at once for an event and otherwise after its
//! timeout, and never holds the node's lock while sleeping. A watch filters
//! as NVML would: events of GPUs it does not monitor are skipped, `GpuLost`
//! always arrives.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::Error;
use crate::backend::{GpuBackend, GpuInventory, Inventory};
use crate::device::{DriverInfo, GpuInfo};
use crate::fabric::FabricInfo;
use crate::health::{HealthEvent, HealthEventKind, HealthSource, HealthWatch, deadline};
use crate::imex::ImexInfo;
use crate::mig::{MigDeviceInfo, MigProfile, MigRefusal};
use crate::nodes::MigCapabilities;
use crate::sharing::{ComputeMode, TimeSlice};

pub mod models;
pub mod node;
pub mod profile;

pub use models::{GpuModel, ModelSpec};
pub use node::FakeNode;
pub use profile::{FakeDriver, FakeGpu, FakeMigDevice, FakeProfile};

/// The shipped profiles, by name (file name without `.yaml`).
pub const BUILTIN_PROFILES: [(&str, &str); 5] = [
    (
        "h100-sxm-80gb-x8",
        include_str!("../profiles/h100-sxm-80gb-x8.yaml"),
    ),
    ("h200-x8", include_str!("../profiles/h200-x8.yaml")),
    ("gb200-x4", include_str!("../profiles/gb200-x4.yaml")),
    (
        "a100-40gb-x8-mig",
        include_str!("../profiles/a100-40gb-x8-mig.yaml"),
    ),
    ("l4-x2", include_str!("../profiles/l4-x2.yaml")),
];

/// A backend answering from a validated profile.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    node: Arc<Mutex<FakeNode>>,
    /// Signalled (with `node`'s lock) whenever a health event is injected.
    health: Arc<Condvar>,
    imex: ImexInfo,
    dev_root: PathBuf,
}

impl FakeBackend {
    /// Loads and validates the profile file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::LoadProfile {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates profile text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, Error> {
        let profile = FakeProfile::from_yaml(text, origin)?;
        Self::from_profile(&profile, origin)
    }

    /// Validates a profile built in code; `origin` names it in errors.
    pub fn from_profile(profile: &FakeProfile, origin: &str) -> Result<Self, Error> {
        Ok(Self {
            node: Arc::new(Mutex::new(profile.node(origin)?)),
            health: Arc::new(Condvar::new()),
            imex: ImexInfo::fake(profile.imex_channel_count()),
            dev_root: PathBuf::from("/"),
        })
    }

    /// One of the [`BUILTIN_PROFILES`] by name; `None` for an unknown name.
    pub fn builtin(name: &str) -> Option<Result<Self, Error>> {
        BUILTIN_PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, text)| Self::from_yaml(text, &format!("builtin:{n}")))
    }

    /// The time slice last set on the GPU with `uuid` (what `nvidia-smi`
    /// would have been told), for tests.
    pub fn time_slice(&self, uuid: &str) -> TimeSlice {
        self.node().time_slice(uuid)
    }

    /// A copy of the node's current state (what the mock NVML library
    /// starts from, so both serve the same profile identically).
    pub fn fake_node(&self) -> FakeNode {
        self.node().clone()
    }

    /// Reports `event` to every health watch of this node (and of its
    /// clones) that started before it and monitors its GPU. A `GpuLost`
    /// loses its UUID and instance IDs, as NVML's `GPU_IS_LOST` names no
    /// GPU.
    pub fn inject_health_event(&self, event: HealthEvent) {
        self.node().inject_health_event(event);
        self.health.notify_all();
    }

    /// Makes the GPU with `uuid` support health events or not, for watches
    /// started afterwards (the profile's `health_events`).
    pub fn set_health_events_supported(&self, uuid: &str, supported: bool) -> Result<(), Error> {
        self.on_gpu(uuid, |node, _| {
            node.set_health_events_supported(uuid, supported);
        })
    }

    /// Serves device nodes from under `dev_root` instead of `/`.
    pub fn with_dev_root(mut self, dev_root: impl Into<PathBuf>) -> Self {
        self.dev_root = dev_root.into();
        self
    }

    fn node(&self) -> MutexGuard<'_, FakeNode> {
        // The node's state is valid after every completed change, so a
        // panic elsewhere while holding the lock leaves nothing to repair.
        self.node.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the node and the index of the GPU with `uuid`, under one
    /// lock.
    fn on_gpu<T>(&self, uuid: &str, f: impl FnOnce(&mut FakeNode, usize) -> T) -> Result<T, Error> {
        let mut node = self.node();
        let index = node.gpu_index(uuid).ok_or_else(|| Error::UnknownGpu {
            uuid: uuid.to_owned(),
        })?;
        Ok(f(&mut node, index))
    }

    fn gpu<T>(&self, gpu: &GpuInfo, f: impl FnOnce(&GpuInventory) -> T) -> Result<T, Error> {
        self.on_gpu(&gpu.uuid, |node, i| f(&node.inventory.gpus[i]))
    }

    /// Runs a MIG change on the GPU with `uuid`.
    fn change<T>(
        &self,
        uuid: &str,
        op: impl FnOnce() -> String,
        f: impl FnOnce(&mut FakeNode, usize) -> Result<T, MigRefusal>,
    ) -> Result<T, Error> {
        self.on_gpu(uuid, f)?.map_err(|refusal| Error::MigRefused {
            op: op(),
            gpu: uuid.to_owned(),
            refusal,
        })
    }
}

impl GpuBackend for FakeBackend {
    fn driver(&self) -> Result<DriverInfo, Error> {
        Ok(self.node().inventory.driver.clone())
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, Error> {
        let node = self.node();
        Ok(node.inventory.gpus.iter().map(|g| g.info.clone()).collect())
    }

    fn mig_devices(&self, gpu: &GpuInfo) -> Result<Vec<MigDeviceInfo>, Error> {
        self.gpu(gpu, |g| g.mig_devices.clone())
    }

    fn mig_profiles(&self, gpu: &GpuInfo) -> Result<Vec<MigProfile>, Error> {
        self.gpu(gpu, |g| g.mig_profiles.clone())
    }

    fn fabric(&self, gpu: &GpuInfo) -> Result<Option<FabricInfo>, Error> {
        self.gpu(gpu, |g| g.fabric)
    }

    fn set_mig_mode(&self, gpu: &GpuInfo, enabled: bool) -> Result<(), Error> {
        self.change(
            &gpu.uuid,
            || format!("set MIG mode {}", if enabled { "on" } else { "off" }),
            |node, i| node.set_mig_mode(i, enabled),
        )
    }

    fn create_mig_device(
        &self,
        gpu: &GpuInfo,
        gi_profile_id: u32,
        placement_start: u32,
    ) -> Result<MigDeviceInfo, Error> {
        self.change(
            &gpu.uuid,
            || create_op(gi_profile_id, placement_start),
            |node, i| {
                let gi = node.create_gpu_instance(i, gi_profile_id, placement_start)?;
                node.create_compute_instance(i, gi).inspect_err(|_| {
                    // Leave no bare GPU instance behind; it was just created.
                    let _ = node.destroy_gpu_instance(i, gi);
                })
            },
        )
    }

    fn compute_mode(&self, gpu: &GpuInfo) -> Result<ComputeMode, Error> {
        self.on_gpu(&gpu.uuid, |node, _| node.compute_mode(&gpu.uuid))
    }

    fn set_compute_mode(&self, gpu: &GpuInfo, mode: ComputeMode) -> Result<(), Error> {
        self.on_gpu(&gpu.uuid, |node, _| node.set_compute_mode(&gpu.uuid, mode))
    }

    fn set_time_slice(&self, gpu: &GpuInfo, slice: TimeSlice) -> Result<(), Error> {
        self.on_gpu(&gpu.uuid, |node, _| node.set_time_slice(&gpu.uuid, slice))
    }

    fn destroy_mig_device(&self, mig: &MigDeviceInfo) -> Result<(), Error> {
        self.change(
            &mig.parent_uuid,
            || destroy_op(mig),
            |node, i| {
                node.destroy_compute_instance(i, mig.gi_id, mig.ci_id)?;
                node.destroy_gpu_instance(i, mig.gi_id)
            },
        )
    }

    fn mig_capabilities(&self, mig: &MigDeviceInfo) -> Result<MigCapabilities, Error> {
        Ok(MigCapabilities::from_driver_layout(
            mig.parent_minor,
            mig.gi_id,
            mig.ci_id,
        ))
    }

    fn imex(&self) -> Result<ImexInfo, Error> {
        Ok(self.imex)
    }

    fn dev_root(&self) -> &Path {
        &self.dev_root
    }

    fn inventory(&self) -> Result<Inventory, Error> {
        Ok(self.node().inventory.clone())
    }

    fn watch_health(&self, gpus: &[GpuInfo]) -> Result<HealthWatch, Error> {
        let node = self.node();
        let mut monitored = BTreeSet::new();
        let mut unmonitored = Vec::new();
        for gpu in gpus {
            if node.gpu_index(&gpu.uuid).is_none() {
                return Err(Error::UnknownGpu {
                    uuid: gpu.uuid.clone(),
                });
            }
            if node.health_events_supported(&gpu.uuid) {
                monitored.insert(gpu.uuid.clone());
            } else {
                tracing::warn!(gpu = %gpu.uuid, "GPU supports no health event type; its health is not monitored");
                unmonitored.push(gpu.uuid.clone());
            }
        }
        let source = FakeHealth {
            node: Arc::clone(&self.node),
            health: Arc::clone(&self.health),
            monitored,
            cursor: AtomicUsize::new(node.health_events.len()),
        };
        Ok(HealthWatch::new(unmonitored, Box::new(source)))
    }
}

/// A fake health watch: a cursor into the node's event log.
struct FakeHealth {
    node: Arc<Mutex<FakeNode>>,
    health: Arc<Condvar>,
    /// GPUs whose events are delivered.
    monitored: BTreeSet<String>,
    /// Index of the next log entry to look at; changed only under the
    /// node's lock, so concurrent waits on one watch never deliver an event
    /// twice.
    cursor: AtomicUsize,
}

impl HealthSource for FakeHealth {
    fn wait(&self, timeout: Duration) -> Result<Option<HealthEvent>, Error> {
        let until = deadline(timeout);
        // As in `FakeBackend::node`: the node is valid after every change.
        let mut node = self.node.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let start = self.cursor.load(Ordering::Relaxed);
            let log = &node.health_events;
            let found = log.iter().skip(start).position(|e| {
                e.kind == HealthEventKind::GpuLost || self.monitored.contains(&e.gpu_uuid)
            });
            match found {
                Some(k) => {
                    self.cursor.store(start + k + 1, Ordering::Relaxed);
                    return Ok(Some(log[start + k].clone()));
                }
                None => self.cursor.store(log.len(), Ordering::Relaxed),
            }
            let left = match until {
                Some(until) => until.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Ok(None);
            }
            node = self
                .health
                .wait_timeout(node, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// How a MIG device creation is named in errors, by every backend.
pub(crate) fn create_op(gi_profile_id: u32, placement_start: u32) -> String {
    format!("create MIG device of profile {gi_profile_id} at placement {placement_start}")
}

/// How a MIG device destruction is named in errors, by every backend.
pub(crate) fn destroy_op(mig: &MigDeviceInfo) -> String {
    format!(
        "destroy MIG device {} (GI {}, CI {})",
        mig.uuid, mig.gi_id, mig.ci_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const SHORT: Duration = Duration::from_millis(20);

    fn l4() -> (FakeBackend, Vec<GpuInfo>) {
        let backend = FakeBackend::builtin("l4-x2").unwrap().unwrap();
        let gpus = backend.gpus().unwrap();
        (backend, gpus)
    }

    #[test]
    fn watches_deliver_injected_events_in_order() {
        let (backend, gpus) = l4();
        let before = HealthEvent::gpu(gpus[0].uuid.clone(), HealthEventKind::Xid(13));
        backend.inject_health_event(before);
        let watch = backend.watch_health(&gpus[..1]).unwrap();
        assert!(watch.unmonitored().is_empty());
        let xid = HealthEvent::gpu(gpus[0].uuid.clone(), HealthEventKind::Xid(79));
        let other_gpu = HealthEvent::gpu(gpus[1].uuid.clone(), HealthEventKind::DoubleBitEcc);
        let mig = HealthEvent {
            gi_id: Some(3),
            ci_id: Some(0),
            ..HealthEvent::gpu(gpus[0].uuid.clone(), HealthEventKind::SingleBitEcc)
        };
        let lost_on_gpu = HealthEvent::gpu(gpus[1].uuid.clone(), HealthEventKind::GpuLost);
        for event in [xid.clone(), other_gpu, mig.clone(), lost_on_gpu] {
            // A clone shares the node, as a second handle would.
            backend.clone().inject_health_event(event);
        }
        // The event before the watch and the unwatched GPU's are skipped; a
        // lost GPU names none.
        assert_eq!(watch.wait(SHORT).unwrap(), Some(xid));
        assert_eq!(watch.wait(SHORT).unwrap(), Some(mig));
        assert_eq!(watch.wait(SHORT).unwrap(), Some(HealthEvent::gpu_lost()));
        assert_eq!(watch.wait(SHORT).unwrap(), None);
    }

    #[test]
    fn a_waiting_watch_wakes_for_an_event_and_otherwise_times_out() {
        let (backend, gpus) = l4();
        let watch = backend.watch_health(&gpus).unwrap();
        let t0 = Instant::now();
        assert_eq!(watch.wait(SHORT).unwrap(), None);
        assert!(t0.elapsed() >= SHORT);

        let event = HealthEvent::gpu(gpus[1].uuid.clone(), HealthEventKind::Xid(48));
        let injector = {
            let backend = backend.clone();
            let event = event.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                backend.inject_health_event(event);
            })
        };
        let t0 = Instant::now();
        assert_eq!(watch.wait(Duration::from_secs(30)).unwrap(), Some(event));
        assert!(t0.elapsed() < Duration::from_secs(10), "woke late");
        injector.join().unwrap();
        // Other calls are served while a watch waits.
        let waiting = std::thread::spawn(move || watch.wait(Duration::from_millis(300)));
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        assert_eq!(backend.gpus().unwrap(), gpus);
        assert!(t0.elapsed() < Duration::from_millis(200));
        assert_eq!(waiting.join().unwrap().unwrap(), None);
    }

    #[test]
    fn gpus_without_events_are_unmonitored() {
        let (backend, gpus) = l4();
        backend
            .set_health_events_supported(&gpus[0].uuid, false)
            .unwrap();
        let watch = backend.watch_health(&gpus).unwrap();
        assert_eq!(watch.unmonitored(), [gpus[0].uuid.clone()]);
        backend.inject_health_event(HealthEvent::gpu(
            gpus[0].uuid.clone(),
            HealthEventKind::DoubleBitEcc,
        ));
        assert_eq!(watch.wait(SHORT).unwrap(), None);

        let mut profile = FakeProfile::uniform(GpuModel::L4, 2);
        profile.gpus[1].health_events = false;
        let text = serde_saphyr::to_string(&profile).unwrap();
        assert!(text.contains("health_events: false"), "{text}");
        let from_yaml = FakeBackend::from_yaml(&text, "test").unwrap();
        let gpus = from_yaml.gpus().unwrap();
        let watch = from_yaml.watch_health(&gpus).unwrap();
        assert_eq!(watch.unmonitored(), [gpus[1].uuid.clone()]);

        let mut stranger = gpus[0].clone();
        stranger.uuid = "GPU-none".into();
        assert_eq!(
            from_yaml.watch_health(&[stranger]).unwrap_err().to_string(),
            "no GPU with UUID GPU-none"
        );
        assert!(
            from_yaml
                .set_health_events_supported("GPU-none", false)
                .is_err()
        );
    }
}

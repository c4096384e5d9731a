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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::Error;
use crate::backend::{GpuBackend, GpuInventory, Inventory};
use crate::device::{DriverInfo, GpuInfo};
use crate::fabric::FabricInfo;
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
            node: Arc::new(Mutex::new(FakeNode::new(profile.resolve(origin)?))),
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

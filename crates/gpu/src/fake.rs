//! [`FakeBackend`]: a deterministic [`GpuBackend`] serving one node described
//! by a profile (see [`profile`]), for tests and `--device-backend=fake`.
//!
//! The profile is validated and expanded once, at construction; afterwards
//! every answer is a clone of that snapshot, so the backend never fails
//! except for questions about GPUs it does not have ([`Error::UnknownGpu`]).
//! MIG capability minors follow the driver's fixed minor layout
//! ([`MigCapabilities::from_driver_layout`]) instead of reading procfs, and
//! IMEX device numbers are fixed ([`crate::imex::fake_numbers`]); the channel
//! count is the profile's `imex_channel_count` (default 2048).
//!
//! Realistic profiles ship in `crates/gpu/profiles/` and are also compiled in
//! ([`BUILTIN_PROFILES`], [`FakeBackend::builtin`]) so a binary can simulate
//! a node without files.

use std::path::{Path, PathBuf};

use crate::Error;
use crate::backend::{GpuBackend, GpuInventory, Inventory};
use crate::device::{DriverInfo, GpuInfo};
use crate::fabric::FabricInfo;
use crate::imex::ImexInfo;
use crate::mig::{MigDeviceInfo, MigProfile};
use crate::nodes::MigCapabilities;

pub mod models;
pub mod profile;

pub use models::{GpuModel, ModelSpec};
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
    inventory: Inventory,
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
            inventory: profile.resolve(origin)?,
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

    /// Serves device nodes from under `dev_root` instead of `/`.
    pub fn with_dev_root(mut self, dev_root: impl Into<PathBuf>) -> Self {
        self.dev_root = dev_root.into();
        self
    }

    fn gpu(&self, gpu: &GpuInfo) -> Result<&GpuInventory, Error> {
        self.inventory
            .gpus
            .iter()
            .find(|g| g.info.uuid == gpu.uuid)
            .ok_or_else(|| Error::UnknownGpu {
                uuid: gpu.uuid.clone(),
            })
    }
}

impl GpuBackend for FakeBackend {
    fn driver(&self) -> Result<DriverInfo, Error> {
        Ok(self.inventory.driver.clone())
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, Error> {
        Ok(self.inventory.gpus.iter().map(|g| g.info.clone()).collect())
    }

    fn mig_devices(&self, gpu: &GpuInfo) -> Result<Vec<MigDeviceInfo>, Error> {
        Ok(self.gpu(gpu)?.mig_devices.clone())
    }

    fn mig_profiles(&self, gpu: &GpuInfo) -> Result<Vec<MigProfile>, Error> {
        Ok(self.gpu(gpu)?.mig_profiles.clone())
    }

    fn fabric(&self, gpu: &GpuInfo) -> Result<Option<FabricInfo>, Error> {
        Ok(self.gpu(gpu)?.fabric)
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
        Ok(self.inventory.clone())
    }
}

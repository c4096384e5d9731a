//! The [`GpuBackend`] trait: everything the node agent asks of the hardware.
//!
//! Two implementations exist: [`crate::NvmlBackend`] (real GPUs) and
//! [`crate::FakeBackend`] (deterministic, from a profile).
//! The agent holds an `Arc<dyn GpuBackend>` and never learns which one.
//!
//! Contract for implementors:
//! - methods are safe to call from any thread, concurrently;
//! - no method blocks without bound: NVML calls are bounded by the NVML
//!   backend's timeout and fail with [`Error::Timeout`];
//! - GPUs are returned sorted by NVML index, MIG devices by
//!   (GPU-instance ID, compute-instance ID), profiles in NVML's order;
//! - an unsupported feature is an empty answer (`None`, empty list), not an
//!   error; an error means the question could not be answered;
//! - the three MIG changes ([`GpuBackend::set_mig_mode`],
//!   [`GpuBackend::create_mig_device`], [`GpuBackend::destroy_mig_device`])
//!   report a driver refusal as [`Error::MigRefused`] with the same
//!   [`crate::mig::MigRefusal`] on every backend, and leave nothing half
//!   created behind;
//! - the sharing settings ([`GpuBackend::set_compute_mode`],
//!   [`GpuBackend::set_time_slice`]) are idempotent. Everything else only
//!   reads;
//! - [`GpuBackend::watch_health`] follows upstream's health check (see
//!   [`crate::health`]); waiting on the watch never delays the backend's
//!   other methods.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::device::{DriverInfo, GpuInfo};
use crate::fabric::FabricInfo;
use crate::health::HealthWatch;
use crate::imex::ImexInfo;
use crate::mig::{MigDeviceInfo, MigProfile};
use crate::nodes::{self, DeviceNode, MigCapabilities};
use crate::sharing::{ComputeMode, TimeSlice};

/// Access to a node's GPUs: reads, and the MIG changes.
pub trait GpuBackend: Send + Sync {
    /// Driver version and CUDA driver version.
    fn driver(&self) -> Result<DriverInfo, Error>;

    /// Every full GPU, sorted by NVML index.
    fn gpus(&self) -> Result<Vec<GpuInfo>, Error>;

    /// The MIG devices that exist on `gpu` (empty when MIG is off).
    fn mig_devices(&self, gpu: &GpuInfo) -> Result<Vec<MigDeviceInfo>, Error>;

    /// The MIG profiles `gpu` offers (empty when it is not MIG capable).
    fn mig_profiles(&self, gpu: &GpuInfo) -> Result<Vec<MigProfile>, Error>;

    /// NVLink fabric facts of `gpu`; `None` when the driver or GPU does not
    /// support fabric queries.
    fn fabric(&self, gpu: &GpuInfo) -> Result<Option<FabricInfo>, Error>;

    /// The capability minors a container needs to use `mig`.
    fn mig_capabilities(&self, mig: &MigDeviceInfo) -> Result<MigCapabilities, Error>;

    /// IMEX channel count and the device numbers of channel and capability nodes.
    fn imex(&self) -> Result<ImexInfo, Error>;

    /// Turns MIG mode on or off on `gpu`. Turning it off is refused while
    /// MIG instances exist.
    fn set_mig_mode(&self, gpu: &GpuInfo, enabled: bool) -> Result<(), Error>;

    /// Creates a MIG device on `gpu`: a GPU instance of `gi_profile_id` at
    /// `placement_start` and one compute instance spanning it.
    fn create_mig_device(
        &self,
        gpu: &GpuInfo,
        gi_profile_id: u32,
        placement_start: u32,
    ) -> Result<MigDeviceInfo, Error>;

    /// Destroys `mig`'s compute instance and then its GPU instance.
    fn destroy_mig_device(&self, mig: &MigDeviceInfo) -> Result<(), Error>;

    /// `gpu`'s compute mode.
    fn compute_mode(&self, gpu: &GpuInfo) -> Result<ComputeMode, Error>;

    /// Sets `gpu`'s compute mode.
    fn set_compute_mode(&self, gpu: &GpuInfo, mode: ComputeMode) -> Result<(), Error>;

    /// Sets `gpu`'s time slice between the processes sharing it.
    fn set_time_slice(&self, gpu: &GpuInfo, slice: TimeSlice) -> Result<(), Error>;

    /// Root under which `/dev` holds the device nodes (`/` or the driver
    /// root).
    fn dev_root(&self) -> &Path;

    /// Starts watching `gpus` (full GPUs) for health events. A GPU whose
    /// events cannot be registered is listed as unmonitored, not an error;
    /// an error means no watch could be set up at all (or `gpus` names a GPU
    /// the backend does not have: [`Error::UnknownGpu`]).
    ///
    /// The default is for backends without health events: it monitors
    /// nothing and says so ([`HealthWatch::none`]).
    fn watch_health(&self, gpus: &[GpuInfo]) -> Result<HealthWatch, Error> {
        tracing::warn!(
            gpus = gpus.len(),
            "this GPU backend reports no health events; GPU health is not monitored"
        );
        Ok(HealthWatch::none(gpus))
    }

    /// Everything above in one answer, the agent's startup snapshot.
    fn inventory(&self) -> Result<Inventory, Error> {
        let driver = self.driver()?;
        let gpus = self
            .gpus()?
            .into_iter()
            .map(|info| {
                Ok(GpuInventory {
                    mig_devices: self.mig_devices(&info)?,
                    mig_profiles: self.mig_profiles(&info)?,
                    fabric: self.fabric(&info)?,
                    info,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Inventory { driver, gpus })
    }

    /// The device node of a full GPU, `/dev/nvidia<minor>`.
    fn gpu_device_nodes(&self, gpu: &GpuInfo) -> Vec<DeviceNode> {
        vec![nodes::gpu_node(self.dev_root(), gpu.minor)]
    }

    /// The control nodes every GPU container needs (`/dev/nvidiactl`,
    /// `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools`).
    fn control_device_nodes(&self) -> Vec<DeviceNode> {
        nodes::control_nodes(self.dev_root())
    }

    /// The nodes of a MIG device: its parent GPU's node and the GPU- and
    /// compute-instance capability nodes.
    fn mig_device_nodes(&self, mig: &MigDeviceInfo) -> Result<Vec<DeviceNode>, Error> {
        let caps = self.mig_capabilities(mig)?;
        let mut nodes = vec![nodes::gpu_node(self.dev_root(), mig.parent_minor)];
        nodes.extend(caps.nodes(self.dev_root()));
        Ok(nodes)
    }
}

/// A snapshot of a node's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Driver facts.
    pub driver: DriverInfo,
    /// Every full GPU with its MIG state, sorted by index.
    pub gpus: Vec<GpuInventory>,
}

/// One GPU with everything known about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInventory {
    /// The GPU.
    pub info: GpuInfo,
    /// Its existing MIG devices.
    pub mig_devices: Vec<MigDeviceInfo>,
    /// The MIG profiles it offers.
    pub mig_profiles: Vec<MigProfile>,
    /// Its NVLink fabric facts, if supported.
    pub fabric: Option<FabricInfo>,
}

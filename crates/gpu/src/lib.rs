//! nvdra's device layer: what the node agent knows about a node's NVIDIA
//! GPUs and how it learns it.
//!
//! - [`GpuBackend`] is the one interface the agent uses: GPUs, existing MIG
//!   devices, MIG profile tables, NVLink fabric facts, IMEX channels
//!   ([`imex`]), device nodes.
//! - [`NvmlBackend`] answers it from the real NVML library (read-only),
//!   confining every NVML call to one worker thread under a timeout.
//! - [`FakeBackend`] answers it deterministically from a profile YAML, for
//!   tests and for running the agent without GPUs.
//! - [`conformance`] checks any backend's answers against the contract and
//!   against the fake model of the same product (read-only, so it also runs
//!   on real GPUs).
//! - [`naming`] and [`attributes`] produce the device names and attribute
//!   values upstream publishes, so the agent stays a drop-in replacement.
//! - [`vfio`] moves a whole GPU between `nvidia` and `vfio-pci` for VFIO
//!   passthrough, through sysfs and procfs.
//! - [`health`] defines GPU health events (critical Xids, ECC errors, lost
//!   GPUs) and the [`HealthWatch`] both backends hand out to wait for them.
//!
//! No Kubernetes types and no async runtime appear here: plain data in, plain
//! data out, std threads for the NVML worker.

pub mod attributes;
pub mod backend;
pub mod conformance;
pub mod device;
pub mod driver_root;
pub mod error;
pub mod fabric;
pub mod fake;
pub mod health;
pub mod imex;
pub mod mig;
pub mod naming;
pub mod nodes;
pub mod nvml;
pub mod pcie;
pub mod sharing;
pub mod vfio;

pub use backend::{GpuBackend, GpuInventory, Inventory};
pub use device::{
    AddressingMode, Architecture, ComputeCapability, CudaVersion, DriverInfo, GpuInfo,
};
pub use driver_root::DriverRoot;
pub use error::Error;
pub use fabric::{ClusterUuid, FabricInfo, FabricState, FabricStatus};
pub use fake::{FakeBackend, FakeProfile, GpuModel};
pub use health::{HealthEvent, HealthEventKind, HealthWatch};
pub use imex::{ImexInfo, ImexReader, node_clique_id};
pub use mig::{MigCapacities, MigDeviceInfo, MigPlacement, MigProfile};
pub use naming::{DeviceName, MigDeviceName, gpu_device_name, mig_device_name};
pub use nodes::{CapabilityReader, DeviceNode, MigCapabilities};
pub use nvml::{NvmlBackend, NvmlOptions};
pub use sharing::{ComputeMode, TimeSlice};

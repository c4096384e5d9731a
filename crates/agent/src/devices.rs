//! The devices this node offers under `gpu.nvidia.com`: a pure translation from the device
//! layer's [`Inventory`] to the `resource.k8s.io/v1` [`Device`]s we publish, and the lookup the
//! prepare path uses to find the hardware behind an allocated device name.
//!
//! Which devices appear (upstream's rules), statically partitioned:
//! - a GPU with MIG disabled is offered whole, as `gpu-<minor>`;
//! - a GPU with MIG enabled is never offered whole; each of its existing MIG devices is offered
//!   as `gpu-<parentMinor>-mig-<profile>-<giProfileId>-<placementStart>`. MIG enabled without
//!   any MIG device offers nothing for that GPU and logs a warning, because the GPU is then
//!   stranded until an administrator creates MIG devices or turns MIG off.
//!
//! With DynamicMIG ([`Partitioning::Dynamic`]), a MIG-capable GPU is offered as partitions
//! that share its counters ([`partitions`]), plus the whole GPU on Hopper and later; see
//! [`Partitioning`] for which GPUs. [`publish`] attaches each device's counter consumption and
//! emits the counter sets.
//!
//! With PassthroughSupport ([`vfio_devices`]), every NVIDIA PCI GPU without MIG enabled is
//! also offered for passthrough as `gpu-vfio-<n>` (`n` its position in PCI address order),
//! sibling of its `gpu-<minor>`. A GPU that sysfs shows bound to `vfio-pci` is not offered as
//! `gpu-<minor>` (NVML may still list it). Which sibling is hidden while the other is held is
//! the driver's business (it knows the claims).
//!
//! Attributes and capacities are exactly upstream's sets (computed by
//! [`nvdra_gpu::attributes`]); this module only maps them onto the Kubernetes types. Capacities
//! are published as plain integer quantities (`"85520809984"`), which the API server accepts and
//! canonicalises; the ResourceSlice publisher compares quantities by value.
//!
//! Invariants: [`publish`] publishes exactly the devices of the index it is given, in
//! the same (byte-wise name) order, so a name the scheduler allocated from our slice is always
//! found by the prepare path of the same inventory. Device names are unique per node because
//! GPU minors are and a MIG name embeds its parent's minor and placement; should an inventory
//! ever repeat a name, the first device wins and the duplicate is logged and dropped.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::resource::v1::{CounterSet, Device, DeviceAttribute, DeviceCapacity};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nvdra_api::names::device_types;
use nvdra_gpu::attributes::{self, AttributeValue, Attributes, Capacities};
use nvdra_gpu::{DriverInfo, GpuInfo, GpuInventory, Inventory, MigDeviceInfo, gpu_device_name};

pub mod partitions;
#[cfg(test)]
mod tests;

/// The kind of device behind an allocated name, as its `type` attribute says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// A full GPU (`gpu`).
    Gpu,
    /// A MIG device (`mig`).
    Mig,
    /// A GPU bound to `vfio-pci` for passthrough (`vfio`).
    Vfio,
}

impl DeviceType {
    /// The `type` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpu => device_types::GPU,
            Self::Mig => device_types::MIG,
            Self::Vfio => device_types::VFIO,
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One device this node offers, with the hardware facts the prepare path needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocatableDevice {
    /// A full GPU (MIG disabled).
    Gpu {
        /// The GPU.
        info: GpuInfo,
    },
    /// An existing (static) MIG device.
    Mig {
        /// The GPU the MIG device lives on.
        parent: GpuInfo,
        /// The MIG device.
        mig: MigDeviceInfo,
    },
    /// A MIG device that Prepare creates (DynamicMIG): a profile at a
    /// placement.
    Partition(partitions::Partition),
    /// A whole GPU for passthrough (PassthroughSupport); Prepare binds it
    /// to `vfio-pci`.
    Vfio(VfioDevice),
}

/// A GPU offered for passthrough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioDevice {
    /// Its position among the node's NVIDIA PCI GPUs, in address order.
    pub index: u32,
    /// The PCI device.
    pub pci: nvdra_gpu::vfio::PciGpu,
    /// Its name-based UUID (upstream's `uuid` attribute).
    pub uuid: String,
    /// The GPU as NVML saw it; `None` when it was not on the nvidia driver
    /// when the agent started.
    pub gpu: Option<GpuInfo>,
    /// Its PCIe root, when sysfs says.
    pub pcie_root: Option<String>,
    /// Whether iommufd is available for it.
    pub iommufd: bool,
}

impl VfioDevice {
    /// The published name, `gpu-vfio-<index>`.
    pub fn name(&self) -> String {
        format!("gpu-vfio-{}", self.index)
    }
}

impl AllocatableDevice {
    /// The published device name.
    pub fn name(&self) -> String {
        match self {
            Self::Gpu { info } => gpu_device_name(info.minor),
            Self::Mig { mig, .. } => mig.device_name(),
            Self::Partition(p) => p.name(),
            Self::Vfio(v) => v.name(),
        }
    }

    /// Whether this is a full GPU or a MIG device.
    pub fn device_type(&self) -> DeviceType {
        match self {
            Self::Gpu { .. } => DeviceType::Gpu,
            Self::Mig { .. } | Self::Partition(_) => DeviceType::Mig,
            Self::Vfio(_) => DeviceType::Vfio,
        }
    }

    /// The device's own UUID (`GPU-…` or `MIG-…`, a VFIO device's
    /// name-based one); a partition has none until it is created, and
    /// answers with its GPU's.
    pub fn uuid(&self) -> &str {
        match self {
            Self::Gpu { info } => &info.uuid,
            Self::Mig { mig, .. } => &mig.uuid,
            Self::Partition(p) => &p.parent.uuid,
            Self::Vfio(v) => &v.uuid,
        }
    }

    /// The physical GPU as NVML knows it: the device itself, a MIG device's
    /// parent, or a VFIO device's GPU when NVML saw it.
    pub fn physical_gpu(&self) -> Option<&GpuInfo> {
        match self {
            Self::Gpu { info } => Some(info),
            Self::Mig { parent, .. } => Some(parent),
            Self::Partition(p) => Some(&p.parent),
            Self::Vfio(v) => v.gpu.as_ref(),
        }
    }

    /// The PCI address of the physical GPU.
    pub fn pci_bus_id(&self) -> &str {
        match self {
            Self::Vfio(v) => &v.pci.bdf,
            Self::Gpu { info } | Self::Mig { parent: info, .. } => &info.pci_bus_id,
            Self::Partition(p) => &p.parent.pci_bus_id,
        }
    }

    /// Upstream's attribute set for this device.
    pub fn attributes(&self, driver: &DriverInfo) -> Attributes {
        match self {
            Self::Gpu { info } => attributes::gpu_attributes(driver, info),
            Self::Mig { parent, mig } => attributes::mig_attributes(driver, parent, mig),
            Self::Partition(p) => {
                attributes::partition_attributes(driver, &p.parent, &p.profile.name)
            }
            Self::Vfio(v) => attributes::vfio_attributes(&attributes::VfioFacts {
                pci: &v.pci,
                product_name: v.gpu.as_ref().map(|g| g.product_name.as_str()),
                pcie_root: v.pcie_root.as_deref(),
                iommufd: v.iommufd,
            }),
        }
    }

    /// Upstream's capacity set for this device.
    pub fn capacities(&self) -> Capacities {
        match self {
            Self::Gpu { info } => attributes::gpu_capacities(info),
            Self::Mig { mig, .. } => attributes::mig_capacities(mig),
            Self::Partition(p) => attributes::partition_capacities(&p.profile.capacities),
            Self::Vfio(v) => {
                attributes::vfio_capacities(v.gpu.as_ref().and_then(|g| g.memory_bytes))
            }
        }
    }

    /// The device as published in a ResourceSlice.
    pub fn to_device(&self, driver: &DriverInfo) -> Device {
        let attributes = self
            .attributes(driver)
            .iter()
            .map(|(name, value)| (name.clone(), device_attribute(value)))
            .collect();
        let capacity = self
            .capacities()
            .into_iter()
            .map(|(name, value)| (name, device_capacity(value)))
            .collect();
        Device {
            name: self.name(),
            attributes: Some(attributes),
            capacity: Some(capacity),
            ..Device::default()
        }
    }
}

/// How MIG-capable GPUs are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// MIG devices that exist (MIG on), or the full GPU (MIG off).
    Static,
    /// DynamicMIG: the full GPU and every profile x placement, sharing the
    /// GPU's counters; Prepare creates the MIG device. Hopper and later
    /// only, or an Ampere GPU whose MIG mode is already on (changing it
    /// needs a GPU reset there), which then offers partitions only. Other
    /// GPUs (no MIG, or Ampere with MIG off) are offered statically, so a
    /// node mixing MIG-capable and other GPUs still publishes all of them.
    Dynamic,
}

/// Whether `gpu` is offered as partitions under `mode`, and whether its
/// full GPU is offered too.
fn dynamic_offer(gpu: &GpuInventory, mode: Partitioning) -> Option<bool> {
    let capable = mode == Partitioning::Dynamic && !gpu.mig_profiles.is_empty();
    let ampere = gpu.info.architecture == nvdra_gpu::Architecture::Ampere;
    match (capable, ampere, gpu.info.mig_enabled) {
        (false, ..) | (true, true, false) => None,
        (true, true, true) => Some(false),
        (true, false, _) => Some(true),
    }
}

/// Every device this node offers, statically partitioned (see
/// [`allocatable_index_with`]).
pub fn allocatable_index(inventory: &Inventory) -> BTreeMap<String, AllocatableDevice> {
    allocatable_index_with(inventory, Partitioning::Static)
}

/// Every device this node offers, by published name (byte-wise order, as upstream sorts).
///
/// Logs a warning for each MIG-enabled GPU without MIG devices (static mode).
pub fn allocatable_index_with(
    inventory: &Inventory,
    mode: Partitioning,
) -> BTreeMap<String, AllocatableDevice> {
    let mut index = BTreeMap::new();
    for gpu in &inventory.gpus {
        let info = &gpu.info;
        let offered: Vec<AllocatableDevice> = if let Some(with_full) = dynamic_offer(gpu, mode) {
            let full = with_full.then(|| AllocatableDevice::Gpu { info: info.clone() });
            full.into_iter()
                .chain(
                    partitions::partitions(gpu)
                        .into_iter()
                        .map(AllocatableDevice::Partition),
                )
                .collect()
        } else if info.mig_enabled {
            if gpu.mig_devices.is_empty() {
                tracing::warn!(
                    gpu = %info.uuid,
                    minor = info.minor,
                    "mig mode is enabled but no mig devices exist; the gpu offers no devices"
                );
            }
            gpu.mig_devices
                .iter()
                .map(|mig| AllocatableDevice::Mig {
                    parent: info.clone(),
                    mig: mig.clone(),
                })
                .collect()
        } else {
            vec![AllocatableDevice::Gpu { info: info.clone() }]
        };
        for device in offered {
            let name = device.name();
            if index.contains_key(&name) {
                tracing::warn!(device = %name, uuid = device.uuid(), "duplicate device name; device dropped");
                continue;
            }
            index.insert(name, device);
        }
    }
    index
}

/// The passthrough devices of a node: one per NVIDIA PCI GPU in `pci`
/// (address order), except GPUs NVML lists with MIG enabled. `gpus` is
/// NVML's view, matched by PCI address.
pub fn vfio_devices(
    pci: &[nvdra_gpu::vfio::PciGpu],
    gpus: &[GpuInventory],
    pcie_root: impl Fn(&str) -> Option<String>,
    iommufd: impl Fn(&str) -> bool,
) -> Vec<VfioDevice> {
    pci.iter()
        .zip(0u32..)
        .filter_map(|(pci, index)| {
            let gpu = gpus
                .iter()
                .find(|g| g.info.pci_bus_id == pci.bdf)
                .map(|g| g.info.clone());
            if gpu.as_ref().is_some_and(|g| g.mig_enabled) {
                return None;
            }
            Some(VfioDevice {
                index,
                uuid: nvdra_gpu::vfio::vfio_uuid(&pci.bdf),
                pcie_root: gpu
                    .as_ref()
                    .and_then(|g| g.pcie_root.clone())
                    .or_else(|| pcie_root(&pci.bdf)),
                iommufd: iommufd(&pci.bdf),
                pci: pci.clone(),
                gpu,
            })
        })
        .collect()
}

/// Adds `vfio` to `index`, and removes the full GPUs sysfs shows bound to
/// `vfio-pci` (they cannot be used as GPUs until bound back).
pub fn add_vfio_devices(index: &mut BTreeMap<String, AllocatableDevice>, vfio: Vec<VfioDevice>) {
    for device in vfio {
        if device.pci.driver == nvdra_gpu::vfio::PciDriver::VfioPci {
            index.retain(|_, d| {
                !(matches!(d, AllocatableDevice::Gpu { .. }) && d.pci_bus_id() == device.pci.bdf)
            });
        }
        index.insert(device.name(), AllocatableDevice::Vfio(device));
    }
}

/// The devices to publish for this node, sorted by name (the scheduler allocates first-fit).
pub fn node_devices(inventory: &Inventory) -> Vec<Device> {
    publish(
        inventory,
        &allocatable_index(inventory),
        Partitioning::Static,
    )
    .0
}

/// What a node publishes for `index`: its devices, each with the counters it
/// consumes, and the counter sets of its dynamically partitioned GPUs.
pub fn publish(
    inventory: &Inventory,
    index: &BTreeMap<String, AllocatableDevice>,
    mode: Partitioning,
) -> (Vec<Device>, Vec<CounterSet>) {
    let counters: BTreeMap<u32, partitions::Counters> = inventory
        .gpus
        .iter()
        .filter(|gpu| dynamic_offer(gpu, mode).is_some())
        .filter_map(|gpu| partitions::gpu_counters(gpu).map(|c| (gpu.info.minor, c)))
        .collect();
    let devices = index
        .values()
        .map(|device| {
            let mut published = device.to_device(&inventory.driver);
            let consumes = match device {
                AllocatableDevice::Partition(p) => {
                    Some(partitions::consumption(p.parent.minor, &p.counters()))
                }
                AllocatableDevice::Gpu { info } => counters.get(&info.minor).map(|all| {
                    // Upstream also publishes the engines a whole GPU has
                    // (the largest profile's) as capacities in this mode.
                    let capacity = published.capacity.get_or_insert_with(BTreeMap::new);
                    for (name, value) in partitions::engine_capacities(all) {
                        capacity
                            .entry(name)
                            .or_insert_with(|| device_capacity(value));
                    }
                    partitions::consumption(info.minor, all)
                }),
                AllocatableDevice::Mig { .. } | AllocatableDevice::Vfio(_) => None,
            };
            published.consumes_counters = consumes.map(|c| vec![c]);
            published
        })
        .collect();
    let sets = inventory
        .gpus
        .iter()
        .filter(|gpu| counters.contains_key(&gpu.info.minor))
        .filter_map(partitions::counter_set)
        .collect();
    (devices, sets)
}

/// Maps an attribute value onto the one-of [`DeviceAttribute`].
pub fn device_attribute(value: &AttributeValue) -> DeviceAttribute {
    match value {
        AttributeValue::String(s) => DeviceAttribute {
            string: Some(s.clone()),
            ..DeviceAttribute::default()
        },
        AttributeValue::Version(v) => DeviceAttribute {
            version: Some(v.clone()),
            ..DeviceAttribute::default()
        },
        AttributeValue::Int(i) => DeviceAttribute {
            int: Some(*i),
            ..DeviceAttribute::default()
        },
        AttributeValue::Bool(b) => DeviceAttribute {
            bool: Some(*b),
            ..DeviceAttribute::default()
        },
    }
}

/// A capacity as a plain integer quantity (bytes or a count), without a request policy.
pub fn device_capacity(value: u64) -> DeviceCapacity {
    DeviceCapacity {
        value: Quantity(value.to_string()),
        request_policy: None,
    }
}

//! The devices this node offers under `gpu.nvidia.com`: a pure translation from the device
//! layer's [`Inventory`] to the `resource.k8s.io/v1` [`Device`]s we publish, and the lookup the
//! prepare path uses to find the hardware behind an allocated device name.
//!
//! Which devices appear (upstream's rules for static partitioning, no DynamicMIG, no VFIO):
//! - a GPU with MIG disabled is offered whole, as `gpu-<minor>`;
//! - a GPU with MIG enabled is never offered whole; each of its existing MIG devices is offered
//!   as `gpu-<parentMinor>-mig-<profile>-<giProfileId>-<placementStart>`. MIG enabled without
//!   any MIG device offers nothing for that GPU and logs a warning, because the GPU is then
//!   stranded until an administrator creates MIG devices or turns MIG off.
//!
//! Attributes and capacities are exactly upstream's sets (computed by
//! [`nvdra_gpu::attributes`]); this module only maps them onto the Kubernetes types. Capacities
//! are published as plain integer quantities (`"85520809984"`), which the API server accepts and
//! canonicalises; the ResourceSlice publisher compares quantities by value.
//!
//! Invariants: [`node_devices`] publishes exactly the devices [`allocatable_index`] knows, in
//! the same (byte-wise name) order, so a name the scheduler allocated from our slice is always
//! found by the prepare path of the same inventory. Device names are unique per node because
//! GPU minors are and a MIG name embeds its parent's minor and placement; should an inventory
//! ever repeat a name, the first device wins and the duplicate is logged and dropped.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::resource::v1::{Device, DeviceAttribute, DeviceCapacity};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nvdra_api::names::device_types;
use nvdra_gpu::attributes::{self, AttributeValue, Attributes, Capacities};
use nvdra_gpu::{DriverInfo, GpuInfo, Inventory, MigDeviceInfo, gpu_device_name};

#[cfg(test)]
mod tests;

/// The kind of device behind an allocated name, as its `type` attribute says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// A full GPU (`gpu`).
    Gpu,
    /// A MIG device (`mig`).
    Mig,
    /// A GPU bound to `vfio-pci` for passthrough (`vfio`); not offered by this module yet.
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
}

impl AllocatableDevice {
    /// The published device name.
    pub fn name(&self) -> String {
        match self {
            Self::Gpu { info } => gpu_device_name(info.minor),
            Self::Mig { mig, .. } => mig.device_name(),
        }
    }

    /// Whether this is a full GPU or a MIG device.
    pub fn device_type(&self) -> DeviceType {
        match self {
            Self::Gpu { .. } => DeviceType::Gpu,
            Self::Mig { .. } => DeviceType::Mig,
        }
    }

    /// The device's own UUID (`GPU-…` or `MIG-…`).
    pub fn uuid(&self) -> &str {
        match self {
            Self::Gpu { info } => &info.uuid,
            Self::Mig { mig, .. } => &mig.uuid,
        }
    }

    /// The physical GPU: the device itself, or a MIG device's parent.
    pub fn physical_gpu(&self) -> &GpuInfo {
        match self {
            Self::Gpu { info } => info,
            Self::Mig { parent, .. } => parent,
        }
    }

    /// Upstream's attribute set for this device.
    pub fn attributes(&self, driver: &DriverInfo) -> Attributes {
        match self {
            Self::Gpu { info } => attributes::gpu_attributes(driver, info),
            Self::Mig { parent, mig } => attributes::mig_attributes(driver, parent, mig),
        }
    }

    /// Upstream's capacity set for this device.
    pub fn capacities(&self) -> Capacities {
        match self {
            Self::Gpu { info } => attributes::gpu_capacities(info),
            Self::Mig { mig, .. } => attributes::mig_capacities(mig),
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

/// Every device this node offers, by published name (byte-wise order, as upstream sorts).
///
/// Logs a warning for each MIG-enabled GPU without MIG devices.
pub fn allocatable_index(inventory: &Inventory) -> BTreeMap<String, AllocatableDevice> {
    let mut index = BTreeMap::new();
    for gpu in &inventory.gpus {
        let info = &gpu.info;
        let offered: Vec<AllocatableDevice> = if info.mig_enabled {
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

/// The devices to publish for this node, sorted by name (the scheduler allocates first-fit).
pub fn node_devices(inventory: &Inventory) -> Vec<Device> {
    allocatable_index(inventory)
        .values()
        .map(|device| device.to_device(&inventory.driver))
        .collect()
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

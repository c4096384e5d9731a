//! The attribute and capacity values upstream publishes for GPU and static
//! MIG devices, computed from backend data (no Kubernetes types here; the
//! agent maps these onto `resource.k8s.io` attributes).
//!
//! Names and forms follow upstream: unqualified attribute names except the
//! two `resource.kubernetes.io/*` ones; versions normalised the way Go's
//! Masterminds semver prints them (`570.172.08` → `570.172.8`, `12.8` →
//! `12.8.0`); memory in bytes; one `memorySlice<i>` capacity per slice a
//! static MIG device occupies. Optional facts (PCIe root, addressing mode,
//! memory) are omitted when unknown, never published empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::device::{DriverInfo, GpuInfo};
use crate::mig::MigDeviceInfo;

/// A device attribute value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AttributeValue {
    /// A string.
    String(String),
    /// A semantic version, already normalised.
    Version(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

/// Attributes by name.
pub type Attributes = BTreeMap<String, AttributeValue>;

/// Capacities by name: byte counts or plain counts.
pub type Capacities = BTreeMap<String, u64>;

/// The PCI bus ID attribute's name.
pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
/// The PCIe root attribute's name.
pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";

/// Attributes of a full GPU device (`type` = `gpu`).
pub fn gpu_attributes(driver: &DriverInfo, gpu: &GpuInfo) -> Attributes {
    let mut attrs = common(driver, gpu);
    attrs.insert("type".into(), AttributeValue::String("gpu".into()));
    attrs.insert("uuid".into(), AttributeValue::String(gpu.uuid.clone()));
    attrs
}

/// Attributes of a static MIG device (`type` = `mig`): its own UUID, parent
/// UUID and profile, plus the parent's facts.
pub fn mig_attributes(driver: &DriverInfo, parent: &GpuInfo, mig: &MigDeviceInfo) -> Attributes {
    let mut attrs = common(driver, parent);
    let s = |v: &str| AttributeValue::String(v.to_owned());
    attrs.insert("type".into(), s("mig"));
    attrs.insert("uuid".into(), s(&mig.uuid));
    attrs.insert("parentUUID".into(), s(&mig.parent_uuid));
    attrs.insert("profile".into(), s(&mig.profile));
    attrs
}

/// Attributes of a dynamic MIG partition (`type` = `mig`): as a static MIG
/// device's, without a `uuid` (the device does not exist until a claim
/// creates it).
pub fn partition_attributes(driver: &DriverInfo, parent: &GpuInfo, profile: &str) -> Attributes {
    let mut attrs = common(driver, parent);
    let s = |v: &str| AttributeValue::String(v.to_owned());
    attrs.insert("type".into(), s("mig"));
    attrs.insert("parentUUID".into(), s(&parent.uuid));
    attrs.insert("profile".into(), s(profile));
    attrs
}

/// Capacities of a dynamic MIG partition: its profile's engines and memory
/// (no `memorySlice<i>`; slices are counters in that mode).
pub fn partition_capacities(c: &crate::mig::MigCapacities) -> Capacities {
    engine_capacities(c)
}

/// What a VFIO device's attributes are made of: the PCI facts, and what
/// NVML said of the GPU while it was on the nvidia driver (if it was).
#[derive(Debug, Clone, Copy)]
pub struct VfioFacts<'a> {
    /// The PCI device.
    pub pci: &'a crate::vfio::PciGpu,
    /// The GPU's product name, when known.
    pub product_name: Option<&'a str>,
    /// The PCIe root, when sysfs says.
    pub pcie_root: Option<&'a str>,
    /// Whether iommufd is available for it.
    pub iommufd: bool,
}

/// Attributes of a VFIO passthrough device (`type` = `vfio`): upstream's
/// set, with IDs as `0x%04x` strings and the name-based UUID of the PCI
/// address.
pub fn vfio_attributes(facts: &VfioFacts<'_>) -> Attributes {
    let s = |v: &str| AttributeValue::String(v.to_owned());
    let mut attrs = Attributes::new();
    attrs.insert("type".into(), s("vfio"));
    attrs.insert("uuid".into(), s(&crate::vfio::vfio_uuid(&facts.pci.bdf)));
    attrs.insert(
        "deviceID".into(),
        s(&format!("0x{:04x}", facts.pci.device_id)),
    );
    attrs.insert(
        "vendorID".into(),
        s(&format!("0x{:04x}", facts.pci.vendor_id)),
    );
    if let Some(numa) = facts.pci.numa_node {
        attrs.insert("numa".into(), AttributeValue::Int(numa));
    }
    if let Some(name) = facts.product_name {
        attrs.insert("productName".into(), s(name));
    }
    attrs.insert("iommuFDEnabled".into(), AttributeValue::Bool(facts.iommufd));
    attrs.insert(PCI_BUS_ID.into(), s(&facts.pci.bdf));
    if let Some(root) = facts.pcie_root {
        attrs.insert(PCIE_ROOT.into(), s(root));
    }
    attrs
}

/// Capacities of a VFIO device: `addressableMemory` (the GPU's memory)
/// when known.
pub fn vfio_capacities(memory_bytes: Option<u64>) -> Capacities {
    memory_bytes
        .map(|m| ("addressableMemory".to_owned(), m))
        .into_iter()
        .collect()
}

fn engine_capacities(c: &crate::mig::MigCapacities) -> Capacities {
    [
        ("multiprocessors", u64::from(c.multiprocessors)),
        ("copyEngines", u64::from(c.copy_engines)),
        ("decoders", u64::from(c.decoders)),
        ("encoders", u64::from(c.encoders)),
        ("jpegEngines", u64::from(c.jpeg_engines)),
        ("ofaEngines", u64::from(c.ofa_engines)),
        ("memory", c.memory_bytes),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Capacities of a full GPU: `memory` when known.
pub fn gpu_capacities(gpu: &GpuInfo) -> Capacities {
    gpu.memory_bytes
        .map(|m| ("memory".to_owned(), m))
        .into_iter()
        .collect()
}

/// Capacities of a static MIG device: engines, memory and one
/// `memorySlice<i>` per occupied slice.
pub fn mig_capacities(mig: &MigDeviceInfo) -> Capacities {
    let mut caps = engine_capacities(&mig.capacities);
    caps.extend(mig.memory_slices().map(|i| (format!("memorySlice{i}"), 1)));
    caps
}

fn common(driver: &DriverInfo, gpu: &GpuInfo) -> Attributes {
    let s = |v: &str| AttributeValue::String(v.to_owned());
    let mut attrs = Attributes::new();
    attrs.insert("productName".into(), s(&gpu.product_name));
    attrs.insert("brand".into(), s(&gpu.brand));
    attrs.insert("architecture".into(), s(gpu.architecture.as_str()));
    let versions = [
        (
            "cudaComputeCapability",
            gpu.cuda_compute_capability.to_string(),
        ),
        ("driverVersion", driver.driver_version.clone()),
        ("cudaDriverVersion", driver.cuda_driver_version.to_string()),
    ];
    for (name, raw) in versions {
        match semver(&raw) {
            Some(v) => {
                attrs.insert(name.into(), AttributeValue::Version(v));
            }
            None => {
                tracing::warn!(gpu = %gpu.uuid, attribute = name, value = %raw, "not a version; attribute omitted")
            }
        }
    }
    attrs.insert(PCI_BUS_ID.into(), s(&gpu.pci_bus_id));
    if let Some(root) = &gpu.pcie_root {
        attrs.insert(PCIE_ROOT.into(), s(root));
    }
    if let Some(mode) = gpu.addressing_mode {
        attrs.insert("addressingMode".into(), s(mode.as_str()));
    }
    attrs
}

/// Normalises a version the way Go's Masterminds `semver.NewVersion(v)
/// .String()` does: an optional `v` is dropped, missing minor/patch become
/// 0, leading zeros go, pre-release and build metadata are kept. `None` when
/// `raw` is not a version.
pub fn semver(raw: &str) -> Option<String> {
    let raw = raw.strip_prefix('v').unwrap_or(raw);
    let (core, meta) = match raw.split_once('+') {
        Some((c, m)) => (c, Some(m)),
        None => (raw, None),
    };
    let (core, pre) = match core.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (core, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut nums = [0u64; 3];
    for (slot, part) in nums.iter_mut().zip(&parts) {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    let tail_ok = |t: &str| {
        !t.is_empty()
            && t.split('.').all(|id| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    let mut out = format!("{}.{}.{}", nums[0], nums[1], nums[2]);
    if let Some(pre) = pre {
        if !tail_ok(pre) {
            return None;
        }
        out.push('-');
        out.push_str(pre);
    }
    if let Some(meta) = meta {
        if !tail_ok(meta) {
            return None;
        }
        out.push('+');
        out.push_str(meta);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_normalisation() {
        let cases = [
            ("570.172.08", Some("570.172.8")),
            ("12.8", Some("12.8.0")),
            ("9.0", Some("9.0.0")),
            ("10", Some("10.0.0")),
            ("v1.2.3-rc.1+abc", Some("1.2.3-rc.1+abc")),
            ("580.82.07", Some("580.82.7")),
            ("1.2.3.4", None),
            ("1..2", None),
            ("r570", None),
            ("", None),
            ("1.2.3-", None),
        ];
        for (raw, want) in cases {
            assert_eq!(semver(raw).as_deref(), want, "{raw:?}");
        }
    }
}

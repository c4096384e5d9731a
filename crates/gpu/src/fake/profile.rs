//! The fake profile format: one YAML document describing one node, and its
//! validation.
//!
//! A profile names a GPU model (node-wide and/or per GPU) instead of
//! repeating product name, memory and MIG table; GPUs list only what differs
//! between them (index, minor, UUID, PCI address, MIG state, fabric).
//!
//! ```yaml
//! driver: { version: "570.172.08", cuda_version: "12.8" }
//! model: a100-sxm4-40gb
//! gpus:
//!   - index: 0
//!     minor: 0
//!     uuid: GPU-...
//!     pci_bus_id: "0000:07:00.0"
//!     pcie_root: pci0000:00
//!     mig_enabled: true
//!     mig_devices:
//!       - { uuid: MIG-..., gi_profile_id: 9, placement_start: 0, gi_id: 1, ci_id: 0 }
//! ```
//!
//! An optional `imex_channel_count` (default 2048) sets the IMEX channels the
//! simulated driver offers. A GPU with `health_events: false` supports no
//! health event type (an old GPU, or one NVML refuses to register), so
//! health watches leave it unmonitored; the default is `true`.
//!
//! Invariants enforced by [`FakeProfile::resolve`], each failure reported as
//! [`Error::InvalidProfile`] naming the origin and the field path:
//! GPUs are listed in index order `0..n`; minors, UUIDs and PCI bus IDs are
//! unique and well-formed; MIG devices exist only on MIG-enabled, MIG-capable
//! GPUs, use a profile and placement of the model's table, never share a
//! memory slice or GPU-instance ID, and never exceed a profile's instance
//! count. Unknown YAML keys are parse errors, so typos do not pass silently.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::models::GpuModel;
use super::node::FakeNode;
use crate::Error;
use crate::backend::{GpuInventory, Inventory};
use crate::device::{
    AddressingMode, CudaVersion, DriverInfo, GpuInfo, is_canonical_pci_bus_id, is_pcie_root,
};
use crate::fabric::FabricInfo;
use crate::mig::MigDeviceInfo;

/// One node as the fake backend simulates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeProfile {
    /// The driver.
    pub driver: FakeDriver,
    /// Model of every GPU that does not name its own.
    #[serde(default)]
    pub model: Option<GpuModel>,
    /// Fabric of every GPU that does not state its own.
    #[serde(default)]
    pub fabric: Option<FabricInfo>,
    /// Addressing mode of every GPU that does not state its own.
    #[serde(default)]
    pub addressing_mode: Option<AddressingMode>,
    /// The GPUs, in index order.
    pub gpus: Vec<FakeGpu>,
    /// IMEX channels the simulated driver offers (`NVreg_ImexChannelCount`); 2048 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imex_channel_count: Option<u32>,
}

/// The driver of a fake node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeDriver {
    /// Driver version, e.g. `570.172.08`.
    pub version: String,
    /// CUDA driver version, e.g. `12.8`.
    pub cuda_version: CudaVersion,
}

/// One GPU of a fake node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpu {
    /// NVML index; must equal the GPU's position in the list.
    pub index: u32,
    /// Device node minor.
    pub minor: u32,
    /// `GPU-...` UUID.
    pub uuid: String,
    /// Canonical PCI bus ID.
    pub pci_bus_id: String,
    /// PCIe root complex, e.g. `pci0000:3a`.
    #[serde(default)]
    pub pcie_root: Option<String>,
    /// Model, overriding the profile's.
    #[serde(default)]
    pub model: Option<GpuModel>,
    /// Whether MIG mode is on.
    #[serde(default)]
    pub mig_enabled: bool,
    /// Existing MIG devices.
    #[serde(default)]
    pub mig_devices: Vec<FakeMigDevice>,
    /// Fabric, overriding the profile's.
    #[serde(default)]
    pub fabric: Option<FabricInfo>,
    /// Addressing mode, overriding the profile's.
    #[serde(default)]
    pub addressing_mode: Option<AddressingMode>,
    /// Whether the GPU reports health events (critical Xids, ECC errors).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub health_events: bool,
}

fn yes() -> bool {
    true
}

fn is_yes(value: &bool) -> bool {
    *value
}

/// One existing MIG device of a fake GPU; everything else about it follows
/// from the model's MIG table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMigDevice {
    /// `MIG-...` UUID.
    pub uuid: String,
    /// GPU-instance profile ID (e.g. 19 for `1g.10gb` on H100).
    pub gi_profile_id: u32,
    /// First memory slice; must be one of the profile's placements.
    pub placement_start: u32,
    /// GPU-instance ID.
    pub gi_id: u32,
    /// Compute-instance ID.
    #[serde(default)]
    pub ci_id: u32,
}

/// Highest GPU-instance ID the driver hands out (15 per GPU).
const MAX_GI_ID: u32 = 14;
/// Highest compute-instance ID (8 per GPU instance).
const MAX_CI_ID: u32 = 7;

impl FakeProfile {
    /// A profile of `count` identical GPUs of `model` with generated,
    /// deterministic UUIDs and PCI addresses; a quick start for tests, which
    /// may then edit the fields.
    pub fn uniform(model: GpuModel, count: u32) -> Self {
        Self {
            driver: FakeDriver {
                version: "570.172.08".to_owned(),
                cuda_version: CudaVersion {
                    major: 12,
                    minor: 8,
                },
            },
            model: Some(model),
            fabric: None,
            addressing_mode: None,
            gpus: (0..count)
                .map(|i| FakeGpu {
                    index: i,
                    minor: i,
                    uuid: format!("GPU-00000000-0000-4000-8000-{i:012x}"),
                    pci_bus_id: format!("0000:{:02x}:00.0", 0x10 + i),
                    pcie_root: Some("pci0000:00".to_owned()),
                    model: None,
                    mig_enabled: false,
                    mig_devices: Vec::new(),
                    fabric: None,
                    addressing_mode: None,
                    health_events: true,
                })
                .collect(),
            imex_channel_count: None,
        }
    }

    /// The IMEX channel count the profile simulates.
    pub fn imex_channel_count(&self) -> u32 {
        self.imex_channel_count
            .unwrap_or(crate::imex::DEFAULT_CHANNEL_COUNT)
    }

    /// Parses a profile; `origin` names it in errors (a path or a label).
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, Error> {
        serde_saphyr::from_str(text).map_err(|source| Error::ParseProfile {
            origin: origin.to_owned(),
            source: Box::new(source),
        })
    }

    /// Validates the profile and expands it into the node the fake backend
    /// serves: [`FakeProfile::resolve`]'s inventory plus what the profile
    /// says beyond it (which GPUs lack health events).
    pub fn node(&self, origin: &str) -> Result<FakeNode, Error> {
        let mut node = FakeNode::new(self.resolve(origin)?);
        for gpu in self.gpus.iter().filter(|g| !g.health_events) {
            node.set_health_events_supported(&gpu.uuid, false);
        }
        Ok(node)
    }

    /// Validates the profile and expands it into the inventory the fake
    /// backend serves.
    pub fn resolve(&self, origin: &str) -> Result<Inventory, Error> {
        let invalid = |field: String, reason: String| Error::InvalidProfile {
            origin: origin.to_owned(),
            field,
            reason,
        };
        if !is_driver_version(&self.driver.version) {
            return Err(invalid(
                "driver.version".into(),
                format!(
                    "{:?} is not a driver version like 570.172.08",
                    self.driver.version
                ),
            ));
        }
        if self.imex_channel_count == Some(0) {
            return Err(invalid(
                "imex_channel_count".into(),
                "must be at least 1".into(),
            ));
        }

        let mut seen_minor = HashMap::new();
        let mut seen_uuid = HashMap::new();
        let mut seen_pci = HashMap::new();
        let mut gpus = Vec::with_capacity(self.gpus.len());
        for (i, gpu) in self.gpus.iter().enumerate() {
            let at = |field: &str| format!("gpus[{i}].{field}");
            let first_seen = |seen: &mut HashMap<String, usize>, key: String| seen.insert(key, i);

            if usize::try_from(gpu.index).ok() != Some(i) {
                return Err(invalid(
                    at("index"),
                    format!(
                        "is {}, expected {i} (GPUs are listed in index order)",
                        gpu.index
                    ),
                ));
            }
            if let Some(j) = first_seen(&mut seen_minor, gpu.minor.to_string()) {
                return Err(invalid(
                    at("minor"),
                    format!("{} is also used by gpus[{j}]", gpu.minor),
                ));
            }
            if !is_uuid_with_prefix(&gpu.uuid, "GPU-") {
                return Err(invalid(
                    at("uuid"),
                    format!("{:?} is not a GPU-<uuid>", gpu.uuid),
                ));
            }
            if let Some(j) = first_seen(&mut seen_uuid, gpu.uuid.clone()) {
                return Err(invalid(
                    at("uuid"),
                    format!("{} is also used by gpus[{j}]", gpu.uuid),
                ));
            }
            if !is_canonical_pci_bus_id(&gpu.pci_bus_id) {
                return Err(invalid(
                    at("pci_bus_id"),
                    format!(
                        "{:?} is not a lower-case PCI bus ID like 0000:3b:00.0",
                        gpu.pci_bus_id
                    ),
                ));
            }
            if let Some(j) = first_seen(&mut seen_pci, gpu.pci_bus_id.clone()) {
                return Err(invalid(
                    at("pci_bus_id"),
                    format!("{} is also used by gpus[{j}]", gpu.pci_bus_id),
                ));
            }
            if let Some(root) = gpu.pcie_root.as_ref().filter(|r| !is_pcie_root(r)) {
                return Err(invalid(
                    at("pcie_root"),
                    format!("{root:?} is not a PCIe root like pci0000:3a"),
                ));
            }
            let model = gpu.model.or(self.model).ok_or_else(|| {
                invalid(
                    at("model"),
                    "no model (set `model` on the GPU or on the profile)".into(),
                )
            })?;
            let spec = model.spec();
            if gpu.mig_enabled && spec.mig_table.is_none() {
                return Err(invalid(
                    at("mig_enabled"),
                    format!("{} is not MIG capable", spec.product_name),
                ));
            }
            if !gpu.mig_enabled && !gpu.mig_devices.is_empty() {
                return Err(invalid(
                    at("mig_devices"),
                    "MIG devices need `mig_enabled: true`".into(),
                ));
            }

            let info = GpuInfo {
                uuid: gpu.uuid.clone(),
                index: gpu.index,
                minor: gpu.minor,
                pci_bus_id: gpu.pci_bus_id.clone(),
                pcie_root: gpu.pcie_root.clone(),
                product_name: spec.product_name.to_owned(),
                brand: spec.brand.to_owned(),
                architecture: spec.architecture,
                cuda_compute_capability: spec.cuda_compute_capability,
                memory_bytes: Some(spec.memory_mib * 1024 * 1024),
                mig_capable: spec.mig_table.is_some(),
                mig_enabled: gpu.mig_enabled,
                addressing_mode: gpu.addressing_mode.or(self.addressing_mode),
            };
            let mig_profiles = spec.mig_table.map(|t| t.profiles()).unwrap_or_default();

            let mut mig_devices: Vec<MigDeviceInfo> = Vec::with_capacity(gpu.mig_devices.len());
            for (k, mig) in gpu.mig_devices.iter().enumerate() {
                let at = |field: &str| format!("gpus[{i}].mig_devices[{k}].{field}");
                if !is_uuid_with_prefix(&mig.uuid, "MIG-") {
                    return Err(invalid(
                        at("uuid"),
                        format!("{:?} is not a MIG-<uuid>", mig.uuid),
                    ));
                }
                if let Some(j) = first_seen(&mut seen_uuid, mig.uuid.clone()) {
                    return Err(invalid(
                        at("uuid"),
                        format!("{} is also used by gpus[{j}]", mig.uuid),
                    ));
                }
                let profile = mig_profiles
                    .iter()
                    .find(|p| p.gi_profile_id == mig.gi_profile_id)
                    .ok_or_else(|| {
                        invalid(
                            at("gi_profile_id"),
                            format!(
                                "{} is not a MIG profile of {} (known: {})",
                                mig.gi_profile_id,
                                spec.product_name,
                                mig_profiles
                                    .iter()
                                    .map(|p| format!("{}={}", p.gi_profile_id, p.name))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                let placement = profile
                    .placements
                    .iter()
                    .find(|p| p.start == mig.placement_start)
                    .copied()
                    .ok_or_else(|| {
                        invalid(
                            at("placement_start"),
                            format!(
                                "{} is not a placement of {} (possible starts: {})",
                                mig.placement_start,
                                profile.name,
                                profile
                                    .placements
                                    .iter()
                                    .map(|p| p.start.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                if mig.gi_id > MAX_GI_ID {
                    return Err(invalid(
                        at("gi_id"),
                        format!(
                            "{} is above the highest GPU-instance ID {MAX_GI_ID}",
                            mig.gi_id
                        ),
                    ));
                }
                if mig.ci_id > MAX_CI_ID {
                    return Err(invalid(
                        at("ci_id"),
                        format!(
                            "{} is above the highest compute-instance ID {MAX_CI_ID}",
                            mig.ci_id
                        ),
                    ));
                }
                for (j, other) in mig_devices.iter().enumerate() {
                    if other.gi_id == mig.gi_id {
                        return Err(invalid(
                            at("gi_id"),
                            format!("{} is also used by mig_devices[{j}]", mig.gi_id),
                        ));
                    }
                    if other.placement.overlaps(&placement) {
                        return Err(invalid(
                            at("placement_start"),
                            format!(
                                "{} at {} overlaps mig_devices[{j}] ({} at {})",
                                profile.name, placement.start, other.profile, other.placement.start
                            ),
                        ));
                    }
                }
                let same_profile = mig_devices
                    .iter()
                    .filter(|m| m.gi_profile_id == profile.gi_profile_id)
                    .count();
                if same_profile >= profile.instance_count as usize {
                    return Err(invalid(
                        at("gi_profile_id"),
                        format!(
                            "{} allows {} instance(s) per GPU",
                            profile.name, profile.instance_count
                        ),
                    ));
                }
                mig_devices.push(MigDeviceInfo {
                    uuid: mig.uuid.clone(),
                    parent_uuid: gpu.uuid.clone(),
                    parent_minor: gpu.minor,
                    profile: profile.name.clone(),
                    gi_profile_id: profile.gi_profile_id,
                    gi_id: mig.gi_id,
                    ci_id: mig.ci_id,
                    placement,
                    capacities: profile.capacities,
                });
            }
            mig_devices.sort_by_key(|m| (m.gi_id, m.ci_id));

            gpus.push(GpuInventory {
                info,
                mig_devices,
                mig_profiles,
                fabric: gpu.fabric.or(self.fabric),
            });
        }

        Ok(Inventory {
            driver: DriverInfo {
                driver_version: self.driver.version.clone(),
                cuda_driver_version: self.driver.cuda_version,
            },
            gpus,
        })
    }
}

/// `<digits>.<digits>[.<digits>]`.
fn is_driver_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `<prefix>xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex.
fn is_uuid_with_prefix(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|rest| rest.parse::<crate::fabric::ClusterUuid>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a100() -> FakeProfile {
        let mut p = FakeProfile::uniform(GpuModel::A100Sxm4_40gb, 2);
        p.gpus[1].mig_enabled = true;
        p.gpus[1].mig_devices = vec![
            FakeMigDevice {
                uuid: "MIG-00000000-0000-4000-8000-000000000001".into(),
                gi_profile_id: 9,
                placement_start: 0,
                gi_id: 1,
                ci_id: 0,
            },
            FakeMigDevice {
                uuid: "MIG-00000000-0000-4000-8000-000000000002".into(),
                gi_profile_id: 19,
                placement_start: 6,
                gi_id: 13,
                ci_id: 0,
            },
        ];
        p
    }

    fn reason(p: &FakeProfile) -> String {
        p.resolve("test").unwrap_err().to_string()
    }

    #[test]
    fn uniform_profile_resolves() {
        let inv = a100().resolve("test").unwrap();
        assert_eq!(inv.gpus.len(), 2);
        let migs = &inv.gpus[1].mig_devices;
        assert_eq!(
            migs.iter().map(|m| m.device_name()).collect::<Vec<_>>(),
            ["gpu-1-mig-3g20gb-9-0", "gpu-1-mig-1g5gb-19-6"]
        );
        assert_eq!(migs[0].capacities.multiprocessors, 42);
        assert_eq!(migs[0].memory_slices(), 0..4);
    }

    #[test]
    fn validation_errors_name_the_field() {
        type Edit = fn(&mut FakeProfile);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |p| p.driver.version = "r570".into(),
                "driver.version: \"r570\" is not a driver version like 570.172.08",
            ),
            (
                |p| p.gpus[1].index = 5,
                "gpus[1].index: is 5, expected 1 (GPUs are listed in index order)",
            ),
            (
                |p| p.gpus[1].minor = 0,
                "gpus[1].minor: 0 is also used by gpus[0]",
            ),
            (
                |p| p.gpus[0].uuid = "gpu-1".into(),
                "gpus[0].uuid: \"gpu-1\" is not a GPU-<uuid>",
            ),
            (
                |p| p.gpus[1].uuid = p.gpus[0].uuid.clone(),
                "gpus[1].uuid: GPU-00000000-0000-4000-8000-000000000000 is also used by gpus[0]",
            ),
            (
                |p| p.gpus[0].pci_bus_id = "00000000:3B:00.0".into(),
                "gpus[0].pci_bus_id: \"00000000:3B:00.0\" is not a lower-case PCI bus ID like 0000:3b:00.0",
            ),
            (
                |p| p.gpus[1].pci_bus_id = p.gpus[0].pci_bus_id.clone(),
                "gpus[1].pci_bus_id: 0000:10:00.0 is also used by gpus[0]",
            ),
            (
                |p| p.gpus[0].pcie_root = Some("0000:00".into()),
                "gpus[0].pcie_root: \"0000:00\" is not a PCIe root like pci0000:3a",
            ),
            (
                |p| p.model = None,
                "gpus[0].model: no model (set `model` on the GPU or on the profile)",
            ),
            (
                |p| p.gpus[1].model = Some(GpuModel::L4),
                "gpus[1].mig_enabled: NVIDIA L4 is not MIG capable",
            ),
            (
                |p| p.gpus[1].mig_enabled = false,
                "gpus[1].mig_devices: MIG devices need `mig_enabled: true`",
            ),
            (
                |p| {
                    p.gpus[1].mig_devices[0].uuid =
                        "GPU-00000000-0000-4000-8000-000000000001".into()
                },
                "gpus[1].mig_devices[0].uuid: \"GPU-00000000-0000-4000-8000-000000000001\" is not a MIG-<uuid>",
            ),
            (
                |p| p.gpus[1].mig_devices[1].uuid = p.gpus[1].mig_devices[0].uuid.clone(),
                "gpus[1].mig_devices[1].uuid: MIG-00000000-0000-4000-8000-000000000001 is also used by gpus[1]",
            ),
            (
                |p| p.gpus[1].mig_devices[0].gi_profile_id = 3,
                "gpus[1].mig_devices[0].gi_profile_id: 3 is not a MIG profile of NVIDIA A100-SXM4-40GB \
                 (known: 19=1g.5gb, 14=2g.10gb, 9=3g.20gb, 5=4g.20gb, 0=7g.40gb, 20=1g.5gb+me, 15=1g.10gb)",
            ),
            (
                |p| p.gpus[1].mig_devices[0].placement_start = 2,
                "gpus[1].mig_devices[0].placement_start: 2 is not a placement of 3g.20gb (possible starts: 0, 4)",
            ),
            (
                |p| p.gpus[1].mig_devices[1].placement_start = 3,
                "gpus[1].mig_devices[1].placement_start: 1g.5gb at 3 overlaps mig_devices[0] (3g.20gb at 0)",
            ),
            (
                |p| p.gpus[1].mig_devices[1].gi_id = 1,
                "gpus[1].mig_devices[1].gi_id: 1 is also used by mig_devices[0]",
            ),
            (
                |p| p.gpus[1].mig_devices[1].gi_id = 15,
                "gpus[1].mig_devices[1].gi_id: 15 is above the highest GPU-instance ID 14",
            ),
            (
                |p| p.gpus[1].mig_devices[1].ci_id = 8,
                "gpus[1].mig_devices[1].ci_id: 8 is above the highest compute-instance ID 7",
            ),
            (
                |p| {
                    let d = &mut p.gpus[1].mig_devices;
                    d[0].gi_profile_id = 20;
                    d[0].placement_start = 0;
                    d[1].gi_profile_id = 20;
                },
                "gpus[1].mig_devices[1].gi_profile_id: 1g.5gb+me allows 1 instance(s) per GPU",
            ),
        ];
        for (edit, want) in cases {
            let mut p = a100();
            edit(&mut p);
            assert_eq!(reason(&p), format!("invalid fake profile test: {want}"));
        }
    }

    #[test]
    fn parse_errors_carry_the_origin() {
        let err = FakeProfile::from_yaml("driver: {}\ngpus: []\n", "broken.yaml").unwrap_err();
        assert_eq!(err.to_string(), "cannot parse fake profile broken.yaml");
        assert!(std::error::Error::source(&err).is_some());

        let typo =
            "driver: { version: \"570.172.08\", cuda_version: \"12.8\" }\ngpus: []\nmodle: l4\n";
        let err = FakeProfile::from_yaml(typo, "typo.yaml").unwrap_err();
        let source = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(source.contains("modle"), "{source}");
    }
}

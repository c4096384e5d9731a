//! What every backend's answers must satisfy, and how a GPU's answers compare
//! with the model the fake backend simulates for its product name.
//!
//! Both checks are read-only and work on an [`Inventory`], so the same
//! assertions run against [`crate::FakeBackend`] in unit tests and against
//! [`crate::NvmlBackend`] on a real GPU host (`nvml_smoke` prints them). A
//! real GPU that disagrees with its model means the fake backend, and with
//! it every test above the device layer, describes hardware that does not
//! exist; the differences name the field and both values so the model can be
//! corrected.
//!
//! Results are lists of human-readable findings; empty means conformant.

use std::collections::BTreeSet;

use crate::backend::{GpuInventory, Inventory};
use crate::device::{is_canonical_pci_bus_id, is_pcie_root};
use crate::fake::GpuModel;
use crate::mig::MigProfile;

/// Checks the invariants the [`crate::GpuBackend`] contract and the data
/// types promise. Returns one finding per violation.
pub fn check_inventory(inv: &Inventory) -> Vec<String> {
    let mut findings = Vec::new();
    let mut bad = |msg: String| findings.push(msg);

    let version = &inv.driver.driver_version;
    let parts: Vec<&str> = version.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
        bad(format!(
            "driver version {version:?} is not dot-separated numbers"
        ));
    }

    let indices: Vec<u32> = inv.gpus.iter().map(|g| g.info.index).collect();
    if indices.windows(2).any(|w| w[0] >= w[1]) {
        bad(format!(
            "GPUs are not sorted by distinct NVML index: {indices:?}"
        ));
    }
    let mut minors = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    // Full GPUs are named by minor (checked above); MIG devices by parent, profile and
    // placement, which overlapping or repeated MIG devices would repeat.
    let mut mig_names = BTreeSet::new();
    for gpu in &inv.gpus {
        let g = &gpu.info;
        let who = format!("GPU index {} ({})", g.index, g.uuid);
        if !minors.insert(g.minor) {
            bad(format!("{who}: minor {} is not unique", g.minor));
        }
        if !is_gpu_uuid(&g.uuid, "GPU-") || !uuids.insert(g.uuid.clone()) {
            bad(format!("{who}: UUID is malformed or not unique"));
        }
        if !is_canonical_pci_bus_id(&g.pci_bus_id) {
            bad(format!(
                "{who}: PCI bus ID {:?} is not canonical",
                g.pci_bus_id
            ));
        }
        if let Some(root) = &g.pcie_root
            && !is_pcie_root(root)
        {
            bad(format!("{who}: PCIe root {root:?} is malformed"));
        }
        if g.product_name.trim().is_empty() {
            bad(format!("{who}: empty product name"));
        }
        if g.memory_bytes == Some(0) {
            bad(format!("{who}: reports 0 bytes of memory"));
        }
        if g.mig_enabled && !g.mig_capable {
            bad(format!(
                "{who}: MIG enabled on a GPU that is not MIG capable"
            ));
        }
        if !g.mig_capable && !gpu.mig_profiles.is_empty() {
            bad(format!(
                "{who}: MIG profiles on a GPU that is not MIG capable"
            ));
        }
        if !g.mig_enabled && !gpu.mig_devices.is_empty() {
            bad(format!("{who}: MIG devices while MIG is disabled"));
        }
        check_profiles(&who, gpu, &mut bad);
        for m in &gpu.mig_devices {
            let name = m.device_name();
            if !mig_names.insert(name.clone()) {
                bad(format!("{who}: device name {name} is not unique"));
            }
        }
    }
    findings
}

fn check_profiles(who: &str, gpu: &GpuInventory, bad: &mut impl FnMut(String)) {
    let total = gpu.info.memory_bytes.unwrap_or(u64::MAX);
    let mut ids = BTreeSet::new();
    for p in &gpu.mig_profiles {
        let what = format!("{who}: MIG profile {} (id {})", p.name, p.gi_profile_id);
        if !ids.insert(p.gi_profile_id) {
            bad(format!("{what}: profile ID listed twice"));
        }
        if p.capacities.memory_bytes > total {
            bad(format!("{what}: more memory than the GPU has"));
        }
        if p.instance_count > 0 && p.placements.is_empty() {
            bad(format!("{what}: instances but no placements"));
        }
        if p.placements.iter().any(|pl| pl.size == 0) {
            bad(format!("{what}: empty placement"));
        }
        if p.placements
            .iter()
            .any(|pl| pl.size != p.placements[0].size)
        {
            bad(format!("{what}: placements of different sizes"));
        }
        if !p.name.starts_with(&format!("{}g.", p.slice_count)) {
            bad(format!("{what}: name does not start with its slice count"));
        }
    }
    for (i, m) in gpu.mig_devices.iter().enumerate() {
        let what = format!("{who}: MIG device {}", m.uuid);
        if !is_gpu_uuid(&m.uuid, "MIG-") {
            bad(format!("{what}: UUID is malformed"));
        }
        if m.parent_uuid != gpu.info.uuid || m.parent_minor != gpu.info.minor {
            bad(format!("{what}: parent is not its GPU"));
        }
        match gpu
            .mig_profiles
            .iter()
            .find(|p| p.gi_profile_id == m.gi_profile_id)
        {
            None => bad(format!(
                "{what}: profile ID {} is not in the GPU's profile table",
                m.gi_profile_id
            )),
            Some(p) if !p.placements.contains(&m.placement) => bad(format!(
                "{what}: placement {:?} is not one of {}'s",
                m.placement, p.name
            )),
            Some(_) => {}
        }
        for other in &gpu.mig_devices[i + 1..] {
            if other.gi_id != m.gi_id && other.placement.overlaps(&m.placement) {
                bad(format!(
                    "{what}: placement overlaps MIG device {}",
                    other.uuid
                ));
            }
        }
    }
}

/// Whether `uuid` is `<prefix>` followed by an 8-4-4-4-12 hex UUID.
fn is_gpu_uuid(uuid: &str, prefix: &str) -> bool {
    let Some(rest) = uuid.strip_prefix(prefix) else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// The fake backend's model for a product name as NVML reports it.
pub fn model_for(product_name: &str) -> Option<GpuModel> {
    GpuModel::ALL
        .into_iter()
        .find(|m| m.spec().product_name == product_name)
}

/// Compares `gpu` with the model the fake backend simulates under its
/// product name: `None` when no model has that name, else the model and
/// every difference (empty when they agree). The MIG table is compared only
/// when the GPU listed profiles (drivers list them only in MIG mode).
pub fn compare_with_model(gpu: &GpuInventory) -> Option<(GpuModel, Vec<String>)> {
    let model = model_for(&gpu.info.product_name)?;
    let spec = model.spec();
    let g = &gpu.info;
    let mut diffs = Vec::new();
    let mut differ = |field: &str, real: String, modelled: String| {
        if real != modelled {
            diffs.push(format!("{field}: GPU has {real}, model has {modelled}"));
        }
    };
    differ("brand", g.brand.clone(), spec.brand.to_owned());
    differ(
        "architecture",
        g.architecture.to_string(),
        spec.architecture.to_string(),
    );
    differ(
        "CUDA compute capability",
        g.cuda_compute_capability.to_string(),
        spec.cuda_compute_capability.to_string(),
    );
    differ(
        "memory MiB",
        g.memory_bytes
            .map_or("unknown".into(), |b| (b >> 20).to_string()),
        spec.memory_mib.to_string(),
    );
    differ(
        "MIG capable",
        g.mig_capable.to_string(),
        spec.mig_table.is_some().to_string(),
    );
    if let Some(table) = spec.mig_table
        && !gpu.mig_profiles.is_empty()
    {
        diffs.extend(compare_profiles(&gpu.mig_profiles, &table.profiles()));
    }
    Some((model, diffs))
}

fn compare_profiles(real: &[MigProfile], modelled: &[MigProfile]) -> Vec<String> {
    let mut diffs = Vec::new();
    for m in modelled {
        match real.iter().find(|r| r.gi_profile_id == m.gi_profile_id) {
            None => diffs.push(format!(
                "MIG profile {} (id {}): modelled, not on the GPU",
                m.name, m.gi_profile_id
            )),
            Some(r) if r != m => diffs.push(format!(
                "MIG profile id {}: GPU has {r:?}, model has {m:?}",
                m.gi_profile_id
            )),
            Some(_) => {}
        }
    }
    for r in real {
        if !modelled.iter().any(|m| m.gi_profile_id == r.gi_profile_id) {
            diffs.push(format!(
                "MIG profile {} (id {}): on the GPU, not modelled",
                r.name, r.gi_profile_id
            ));
        }
    }
    diffs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::BUILTIN_PROFILES;
    use crate::{FakeBackend, GpuBackend, MigPlacement};

    fn builtin(name: &str) -> Inventory {
        FakeBackend::builtin(name)
            .expect("known profile")
            .expect("valid profile")
            .inventory()
            .expect("inventory")
    }

    #[test]
    fn every_builtin_profile_conforms_and_matches_its_models() {
        for (name, _) in BUILTIN_PROFILES {
            let inv = builtin(name);
            assert_eq!(check_inventory(&inv), Vec::<String>::new(), "{name}");
            for gpu in &inv.gpus {
                let (model, diffs) = compare_with_model(gpu).expect("modelled product");
                assert_eq!(diffs, Vec::<String>::new(), "{name}: {model:?}");
            }
        }
    }

    #[test]
    fn violations_are_named() {
        let mut inv = builtin("a100-40gb-x8-mig");
        inv.gpus[1].info.minor = inv.gpus[0].info.minor;
        inv.gpus[2].info.pci_bus_id = "00000000:3B:00.0".into();
        let mig_gpu = inv
            .gpus
            .iter_mut()
            .find(|g| g.mig_devices.len() >= 2)
            .expect("a GPU with MIG devices");
        mig_gpu.mig_devices[1].placement = MigPlacement { start: 5, size: 3 };
        let findings = check_inventory(&inv).join("\n");
        for needle in [
            "GPU index 1 (GPU-",
            "minor 0 is not unique",
            "PCI bus ID \"00000000:3B:00.0\" is not canonical",
            "is not one of",
        ] {
            assert!(findings.contains(needle), "{needle:?} in:\n{findings}");
        }
    }

    #[test]
    fn model_differences_name_field_and_values() {
        let mut inv = builtin("h100-sxm-80gb-x8");
        let gpu = &mut inv.gpus[0];
        gpu.info.memory_bytes = Some(81_920 << 20);
        gpu.mig_profiles = crate::mig::tables::MigTable::H100Sxm5_80gb.profiles();
        gpu.mig_profiles.retain(|p| p.gi_profile_id != 19);
        gpu.mig_profiles[0].instance_count += 1;
        let (model, diffs) = compare_with_model(gpu).expect("H100 is modelled");
        assert_eq!(model, GpuModel::H100Sxm5_80gb);
        let text = diffs.join("\n");
        assert!(
            text.contains("memory MiB: GPU has 81920, model has 81559"),
            "{text}"
        );
        assert!(text.contains("(id 19): modelled, not on the GPU"), "{text}");
        assert!(text.contains("GPU has MigProfile {"), "{text}");
        assert_eq!(diffs.len(), 3, "{text}");
    }

    #[test]
    fn unknown_products_have_no_model() {
        let mut inv = builtin("l4-x2");
        inv.gpus[0].info.product_name = "NVIDIA Tesla T4".into();
        assert!(compare_with_model(&inv.gpus[0]).is_none());
    }
}

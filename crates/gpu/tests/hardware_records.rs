//! Inventories recorded on real GPU hosts (`scripts/hardware-check`, see
//! docs/hardware-runs.md) checked against the contract and against the fake
//! models, so a fake profile can never drift from hardware we have seen.

use std::path::Path;

use anyhow::Context;
use nvdra_gpu::conformance::{check_inventory, compare_with_model};
use nvdra_gpu::fake::BUILTIN_PROFILES;
use nvdra_gpu::{FakeBackend, GpuBackend, ImexInfo, Inventory};
use serde::Deserialize;

#[derive(Deserialize)]
struct Record {
    inventory: Inventory,
    imex: ImexInfo,
}

fn records() -> anyhow::Result<Vec<(String, Record)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hardware");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let record: Record = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| path.display().to_string())?;
        out.push((path.display().to_string(), record));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    anyhow::ensure!(!out.is_empty(), "no records in {}", dir.display());
    Ok(out)
}

#[test]
fn recorded_inventories_conform_and_match_their_models() {
    for (name, record) in records().unwrap() {
        assert_eq!(
            check_inventory(&record.inventory),
            Vec::<String>::new(),
            "{name}"
        );
        for gpu in &record.inventory.gpus {
            let (model, diffs) = compare_with_model(gpu)
                .unwrap_or_else(|| panic!("{name}: {} has no fake model", gpu.info.product_name));
            assert_eq!(diffs, Vec::<String>::new(), "{name}: {model:?}");
        }
        assert!(record.imex.channel_count > 0, "{name}");
    }
}

/// The fake profile of the same product lists MIG profiles in the order the
/// real driver does (the backend contract), with identical values. (This
/// caught the fake tables listing profiles in `nvidia-smi`'s order.)
#[test]
fn fake_profiles_list_mig_profiles_as_the_real_driver_does() {
    let fakes: Vec<Inventory> = BUILTIN_PROFILES
        .iter()
        .map(|(name, _)| {
            FakeBackend::builtin(name)
                .unwrap()
                .unwrap()
                .inventory()
                .unwrap()
        })
        .collect();
    for (name, record) in records().unwrap() {
        for gpu in record
            .inventory
            .gpus
            .iter()
            .filter(|g| !g.mig_profiles.is_empty())
        {
            let fake = fakes
                .iter()
                .flat_map(|inv| &inv.gpus)
                .find(|f| f.info.product_name == gpu.info.product_name && !f.info.mig_enabled)
                .unwrap_or_else(|| panic!("{name}: no fake {}", gpu.info.product_name));
            assert_eq!(fake.mig_profiles, gpu.mig_profiles, "{name}");
            // Whether fabric queries answer at all depends on the driver
            // (the recorded R580 answers "not supported", the fake's R570
            // does not answer); what the agent derives from them must agree.
            let clique = |f: &nvdra_gpu::GpuInventory| {
                f.fabric
                    .as_ref()
                    .filter(|f| f.is_ready())
                    .and_then(|f| f.clique_id())
            };
            assert_eq!(clique(fake), clique(gpu), "{name}");
        }
    }
}

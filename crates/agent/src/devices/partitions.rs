//! Dynamic MIG's partitionable devices (KEP-4815) as upstream publishes
//! them: pure functions from a MIG-capable GPU to its counter set, the
//! counters its full GPU consumes, and one abstract MIG device per
//! (profile, placement) with the counters it consumes.
//!
//! The scheduler never allocates two devices whose consumption together
//! exceeds a counter. So: the full GPU consumes every counter whole; a
//! partition consumes its profile's engines and memory plus one
//! `memory-slice-<i>` per slice of its placement, which makes overlapping
//! placements mutually exclusive while disjoint ones fit side by side up to
//! the engine totals.
//!
//! Names follow upstream: the counter set is `gpu-<minor>-counter-set`,
//! counters are kebab-case (`multiprocessors`, `copy-engines`, `decoders`,
//! `encoders`, `jpeg-engines`, `ofa-engines`, `memory`,
//! `memory-slice-<i>`), partitions are named like static MIG devices
//! (`gpu-<minor>-mig-<profile>-<giProfileId>-<placementStart>`).
//!
//! Invariant (tested): a GPU's counters are at least the sum of what any set
//! of pairwise disjoint placements of its profiles consumes, within the
//! profiles' instance counts; that is, everything the driver could create
//! at once fits.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{Counter, CounterSet, DeviceCounterConsumption};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nvdra_gpu::{GpuInfo, GpuInventory, MigCapacities, MigPlacement, MigProfile};

/// A counter name and its value.
pub type Counters = BTreeMap<String, u64>;

/// The counter set name of the GPU with `minor`.
pub fn counter_set_name(minor: u32) -> String {
    format!("gpu-{minor}-counter-set")
}

/// One abstract MIG device: a profile at a placement on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The GPU.
    pub parent: GpuInfo,
    /// The profile.
    pub profile: MigProfile,
    /// Where on the GPU.
    pub placement: MigPlacement,
}

impl Partition {
    /// The published name (same scheme as a static MIG device).
    pub fn name(&self) -> String {
        nvdra_gpu::mig_device_name(
            self.parent.minor,
            &self.profile.name,
            self.profile.gi_profile_id,
            self.placement.start,
        )
    }

    /// The counters it consumes.
    pub fn counters(&self) -> Counters {
        let mut counters = engine_counters(&self.profile.capacities);
        counters.extend(
            self.placement
                .memory_slices()
                .map(|i| (format!("memory-slice-{i}"), 1)),
        );
        counters
    }
}

fn engine_counters(c: &MigCapacities) -> Counters {
    [
        ("multiprocessors", u64::from(c.multiprocessors)),
        ("copy-engines", u64::from(c.copy_engines)),
        ("decoders", u64::from(c.decoders)),
        ("encoders", u64::from(c.encoders)),
        ("jpeg-engines", u64::from(c.jpeg_engines)),
        ("ofa-engines", u64::from(c.ofa_engines)),
        ("memory", c.memory_bytes),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Every partition of a MIG-capable GPU, profile by profile in NVML order,
/// placements in order; empty for a GPU without MIG.
pub fn partitions(gpu: &GpuInventory) -> Vec<Partition> {
    gpu.mig_profiles
        .iter()
        .flat_map(|profile| {
            profile.placements.iter().map(|placement| Partition {
                parent: gpu.info.clone(),
                profile: profile.clone(),
                placement: *placement,
            })
        })
        .collect()
}

/// The GPU's counters: for each engine and memory, the most any one profile
/// has (the full-GPU profile's), and one per memory slice. `None` for a GPU
/// without MIG.
pub fn gpu_counters(gpu: &GpuInventory) -> Option<Counters> {
    if gpu.mig_profiles.is_empty() {
        return None;
    }
    let mut counters = Counters::new();
    for profile in &gpu.mig_profiles {
        for (name, value) in engine_counters(&profile.capacities) {
            let slot = counters.entry(name).or_default();
            *slot = (*slot).max(value);
        }
    }
    let slices = gpu
        .mig_profiles
        .iter()
        .flat_map(|p| &p.placements)
        .map(|p| p.start + p.size)
        .max()
        .unwrap_or(0);
    counters.extend((0..slices).map(|i| (format!("memory-slice-{i}"), 1)));
    Some(counters)
}

/// The engine and memory counters of `counters` under their capacity names
/// (`copy-engines` → `copyEngines`); memory slices are left out.
pub fn engine_capacities(counters: &Counters) -> Vec<(String, u64)> {
    [
        ("multiprocessors", "multiprocessors"),
        ("copy-engines", "copyEngines"),
        ("decoders", "decoders"),
        ("encoders", "encoders"),
        ("jpeg-engines", "jpegEngines"),
        ("ofa-engines", "ofaEngines"),
        ("memory", "memory"),
    ]
    .into_iter()
    .filter_map(|(counter, capacity)| counters.get(counter).map(|v| (capacity.to_owned(), *v)))
    .collect()
}

fn quantities(counters: &Counters) -> BTreeMap<String, Counter> {
    counters
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                Counter {
                    value: Quantity(value.to_string()),
                },
            )
        })
        .collect()
}

/// The GPU's counter set, for the ResourceSlice.
pub fn counter_set(gpu: &GpuInventory) -> Option<CounterSet> {
    gpu_counters(gpu).map(|counters| CounterSet {
        name: counter_set_name(gpu.info.minor),
        counters: quantities(&counters),
    })
}

/// A device's consumption of `counters` from the counter set of GPU `minor`.
pub fn consumption(minor: u32, counters: &Counters) -> DeviceCounterConsumption {
    DeviceCounterConsumption {
        counter_set: counter_set_name(minor),
        counters: quantities(counters),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvdra_gpu::{FakeBackend, GpuBackend};
    use pretty_assertions::assert_eq;

    fn h100() -> GpuInventory {
        let backend = FakeBackend::builtin("h100-sxm-80gb-x8").unwrap().unwrap();
        backend.inventory().unwrap().gpus.remove(2)
    }

    #[test]
    fn names_and_counts_as_upstream() {
        let gpu = h100();
        let all = partitions(&gpu);
        // 1g ×7, 2g ×3, 3g ×2, 4g, 7g, 1g+me ×7, 1g.20gb ×4.
        assert_eq!(all.len(), 25);
        assert_eq!(all[0].name(), "gpu-2-mig-1g10gb-19-0");
        assert!(all.iter().any(|p| p.name() == "gpu-2-mig-7g80gb-0-0"));
        assert_eq!(counter_set(&gpu).unwrap().name, "gpu-2-counter-set");
        let counters = gpu_counters(&gpu).unwrap();
        assert_eq!(counters["multiprocessors"], 132);
        assert_eq!(counters["copy-engines"], 8);
        assert_eq!(counters["memory"], 81152 * 1024 * 1024);
        assert_eq!(
            counters
                .keys()
                .filter(|k| k.starts_with("memory-slice-"))
                .count(),
            8
        );
        let l4 = FakeBackend::builtin("l4-x2").unwrap().unwrap();
        let l4 = l4.inventory().unwrap().gpus.remove(0);
        assert_eq!(gpu_counters(&l4), None);
        assert!(partitions(&l4).is_empty());
    }

    /// Checks whether `set` fits the GPU's counters.
    fn fits(gpu: &Counters, set: &[&Partition]) -> bool {
        let mut used = Counters::new();
        for p in set {
            for (k, v) in p.counters() {
                *used.entry(k).or_default() += v;
            }
        }
        used.iter()
            .all(|(k, v)| gpu.get(k).is_some_and(|cap| v <= cap))
    }

    #[test]
    fn overlapping_placements_never_fit_together() {
        let gpu = h100();
        let counters = gpu_counters(&gpu).unwrap();
        let all = partitions(&gpu);
        for a in &all {
            assert!(fits(&counters, &[a]), "{} alone", a.name());
            for b in &all {
                if a.name() != b.name() && a.placement.overlaps(&b.placement) {
                    assert!(!fits(&counters, &[a, b]), "{} with {}", a.name(), b.name());
                }
            }
        }
    }

    #[test]
    fn what_the_driver_can_create_fits() {
        let gpu = h100();
        let counters = gpu_counters(&gpu).unwrap();
        let by_name = |n: &str| {
            partitions(&gpu)
                .into_iter()
                .find(|p| p.name() == n)
                .unwrap()
        };
        // Seven 1g, and a mixed layout: 3g@0 + 2g@4 + 1g@6.
        let seven: Vec<Partition> = (0..7)
            .map(|s| by_name(&format!("gpu-2-mig-1g10gb-19-{s}")))
            .collect();
        assert!(fits(&counters, &seven.iter().collect::<Vec<_>>()));
        let mixed = [
            by_name("gpu-2-mig-3g40gb-9-0"),
            by_name("gpu-2-mig-2g20gb-14-4"),
            by_name("gpu-2-mig-1g10gb-19-6"),
        ];
        assert!(fits(&counters, &mixed.iter().collect::<Vec<_>>()));
    }

    #[test]
    fn consumption_names_the_set() {
        let gpu = h100();
        let p = &partitions(&gpu)[3];
        let c = consumption(gpu.info.minor, &p.counters());
        assert_eq!(c.counter_set, "gpu-2-counter-set");
        assert_eq!(c.counters["memory-slice-3"].value, Quantity("1".into()));
        assert!(!c.counters.contains_key("memory-slice-4"));
    }
}

//! Plain data describing MIG (Multi-Instance GPU) profiles and devices, and
//! the rules that derive a profile's name.
//!
//! A *profile* is a GPU-instance shape a GPU can host (`1g.10gb`, `3g.40gb`),
//! identified by its GPU-instance profile ID as `nvidia-smi mig -lgip` prints
//! it (19, 9, ...), with the placements it may take. A *MIG device* is a
//! created GPU instance plus one compute instance inside it.
//!
//! Profile names follow go-nvlib exactly, because they end up in device names
//! (`gpu-0-mig-1g10gb-19-3`) that must match upstream: `<G>g.<GB>gb` with the
//! memory rounded by [`mig_memory_gb`], a `<C>c.` prefix when the compute
//! instance is smaller than the GPU instance, and `+me`, `+me.all`, `+gfx` or
//! `-me` by profile variant.
//!
//! Invariants of data returned by backends: every placement lies inside the
//! GPU's memory slices; a MIG device's capacities are its GPU-instance
//! profile's capacities (compute-instance sharing is not modelled, as
//! upstream does not publish it).

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub mod tables;

/// Where a GPU instance sits: its first memory slice and how many it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MigPlacement {
    /// First memory slice.
    pub start: u32,
    /// Number of memory slices.
    pub size: u32,
}

impl MigPlacement {
    /// The memory slices this placement occupies.
    pub fn memory_slices(&self) -> Range<u32> {
        self.start..self.start.saturating_add(self.size)
    }

    /// Whether two placements share a memory slice.
    pub fn overlaps(&self, other: &MigPlacement) -> bool {
        let (a, b) = (self.memory_slices(), other.memory_slices());
        a.start < b.end && b.start < a.end
    }
}

/// The engines and memory a GPU-instance profile provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigCapacities {
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Copy engines.
    pub copy_engines: u32,
    /// Video decoders (NVDEC).
    pub decoders: u32,
    /// Video encoders (NVENC).
    pub encoders: u32,
    /// JPEG decoders (NVJPG).
    pub jpeg_engines: u32,
    /// Optical-flow accelerators (OFA).
    pub ofa_engines: u32,
    /// Memory in bytes (NVML's MiB × 2^20).
    pub memory_bytes: u64,
}

/// One GPU-instance profile a GPU offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigProfile {
    /// Profile name, e.g. `1g.10gb` or `1g.10gb+me`.
    pub name: String,
    /// GPU-instance profile ID (`nvidia-smi mig -lgip` "ID"), e.g. 19.
    pub gi_profile_id: u32,
    /// Compute slices (the `g` in the name).
    pub slice_count: u32,
    /// How many instances of this profile fit on the GPU.
    pub instance_count: u32,
    /// What one instance provides.
    pub capacities: MigCapacities,
    /// Every placement an instance may take.
    pub placements: Vec<MigPlacement>,
}

/// One existing MIG device: a GPU instance and a compute instance in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigDeviceInfo {
    /// MIG device UUID, e.g. `MIG-c6d4f1e2-...`.
    pub uuid: String,
    /// UUID of the parent GPU.
    pub parent_uuid: String,
    /// Minor number of the parent GPU.
    pub parent_minor: u32,
    /// Profile name, e.g. `3g.20gb`.
    pub profile: String,
    /// GPU-instance profile ID.
    pub gi_profile_id: u32,
    /// GPU-instance ID (assigned by the driver at creation).
    pub gi_id: u32,
    /// Compute-instance ID within the GPU instance.
    pub ci_id: u32,
    /// Where the GPU instance sits.
    pub placement: MigPlacement,
    /// What the device provides.
    pub capacities: MigCapacities,
}

impl MigDeviceInfo {
    /// The memory slices the device occupies (`memorySlice<i>` capacities).
    pub fn memory_slices(&self) -> Range<u32> {
        self.placement.memory_slices()
    }

    /// The upstream device name,
    /// `gpu-<parentMinor>-mig-<profile slug>-<giProfileId>-<placementStart>`.
    pub fn device_name(&self) -> String {
        crate::naming::mig_device_name(
            self.parent_minor,
            &self.profile,
            self.gi_profile_id,
            self.placement.start,
        )
    }
}

/// Rounds a MIG profile's memory to the whole gigabytes in its name, the way
/// go-nvlib (and so `nvidia-smi`) does: take the profile's fraction of the
/// device's memory, round it up to eighths, and scale the device memory
/// rounded up to whole GiB by it.
///
/// The float arithmetic mirrors go-nvlib operation for operation so names
/// agree even at rounding boundaries (e.g. 70.5 → 71).
pub fn mig_memory_gb(device_memory_bytes: u64, profile_memory_mib: u64) -> u64 {
    const EIGHTHS: f64 = 8.0;
    const MIB: f64 = (1024 * 1024) as f64;
    const GIB: u64 = 1024 * 1024 * 1024;
    if device_memory_bytes == 0 {
        return 0;
    }
    let fraction = (profile_memory_mib as f64 * MIB) / device_memory_bytes as f64;
    let fraction = (fraction * EIGHTHS).ceil() / EIGHTHS;
    let device_gb = device_memory_bytes.div_ceil(GIB) as f64;
    // Go's math.Round rounds half away from zero, as f64::round does.
    (fraction * device_gb).round() as u64
}

/// NVML's GPU-instance profile *index* (the `NVML_GPU_INSTANCE_PROFILE_*`
/// constants passed to `nvmlDeviceGetGpuInstanceProfileInfo`), which is
/// distinct from the profile *ID* NVML returns for it.
pub(crate) mod profile_index {
    pub const SLICE_1: u32 = 0;
    pub const SLICE_2: u32 = 1;
    pub const SLICE_3: u32 = 2;
    pub const SLICE_4: u32 = 3;
    pub const SLICE_7: u32 = 4;
    pub const SLICE_8: u32 = 5;
    pub const SLICE_6: u32 = 6;
    pub const SLICE_1_REV1: u32 = 7;
    pub const SLICE_2_REV1: u32 = 8;
    pub const SLICE_1_REV2: u32 = 9;
    pub const SLICE_1_GFX: u32 = 10;
    pub const SLICE_2_GFX: u32 = 11;
    pub const SLICE_4_GFX: u32 = 12;
    pub const SLICE_1_NO_ME: u32 = 13;
    pub const SLICE_2_NO_ME: u32 = 14;
    pub const SLICE_1_ALL_ME: u32 = 15;
    pub const SLICE_2_ALL_ME: u32 = 16;
    /// One past the last index this build knows.
    pub const COUNT: u32 = 17;
}

/// Compute slices (`G`) of the profile at NVML profile index `index`, as
/// go-nvlib assigns them; `None` for an index this build does not know.
pub(crate) fn gi_slices_of_index(index: u32) -> Option<u32> {
    use profile_index::*;
    Some(match index {
        SLICE_1 | SLICE_1_REV1 | SLICE_1_REV2 | SLICE_1_GFX | SLICE_1_NO_ME | SLICE_1_ALL_ME => 1,
        SLICE_2 | SLICE_2_REV1 | SLICE_2_GFX | SLICE_2_NO_ME | SLICE_2_ALL_ME => 2,
        SLICE_3 => 3,
        SLICE_4 | SLICE_4_GFX => 4,
        SLICE_6 => 6,
        SLICE_7 => 7,
        SLICE_8 => 8,
        _ => return None,
    })
}

/// Name suffix of the profile variant at NVML profile index `index`.
pub(crate) fn suffix_of_index(index: u32) -> &'static str {
    use profile_index::*;
    match index {
        SLICE_1_REV1 | SLICE_2_REV1 => "+me",
        SLICE_1_ALL_ME | SLICE_2_ALL_ME => "+me.all",
        SLICE_1_GFX | SLICE_2_GFX | SLICE_4_GFX => "+gfx",
        SLICE_1_NO_ME | SLICE_2_NO_ME => "-me",
        _ => "",
    }
}

/// Builds a profile name: `<G>g.<GB>gb<suffix>`, or `<C>c.<G>g.<GB>gb<suffix>`
/// when the compute instance spans fewer slices than the GPU instance.
pub(crate) fn profile_name(ci_slices: u32, gi_slices: u32, gb: u64, suffix: &str) -> String {
    if ci_slices == gi_slices {
        format!("{gi_slices}g.{gb}gb{suffix}")
    } else {
        format!("{ci_slices}c.{gi_slices}g.{gb}gb{suffix}")
    }
}

/// NVML's GPU-instance profile index (`NVML_GPU_INSTANCE_PROFILE_*`) of
/// the GPU-instance profile ID `gi_profile_id`, for the IDs every MIG GPU
/// NVIDIA ships so far uses (A100, H100, H200, GB200: 19 = 1g, 14 = 2g,
/// 9 = 3g, 5 = 4g, 0 = 7g, 20 = 1g+me, 15 = 1g with double memory). The
/// mock NVML library answers profile queries by index with it.
pub fn profile_index_of_id(gi_profile_id: u32) -> Option<u32> {
    use profile_index::*;
    Some(match gi_profile_id {
        19 => SLICE_1,
        14 => SLICE_2,
        9 => SLICE_3,
        5 => SLICE_4,
        0 => SLICE_7,
        20 => SLICE_1_REV1,
        15 => SLICE_1_REV2,
        _ => return None,
    })
}

/// NVML's compute-instance profile index (`NVML_COMPUTE_INSTANCE_PROFILE_*`)
/// of a compute instance spanning `slices` compute slices.
pub fn ci_profile_index_of_slices(slices: u32) -> Option<u32> {
    Some(match slices {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        7 => 4,
        8 => 5,
        6 => 6,
        _ => return None,
    })
}

/// Why a MIG change (mode switch, instance create or destroy) was refused,
/// in NVML's terms: each reason is one NVML return code, so the fake
/// backend, the mock NVML library and the NVML backend report a refusal
/// identically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigRefusal {
    /// MIG is off on the GPU, or the GPU cannot do MIG
    /// (`NVML_ERROR_NOT_SUPPORTED`).
    NotSupported,
    /// No such profile or placement on this GPU (`NVML_ERROR_INVALID_ARGUMENT`).
    InvalidArgument,
    /// The placement overlaps an existing instance, or the profile's
    /// instances are used up (`NVML_ERROR_INSUFFICIENT_RESOURCES`).
    InsufficientResources,
    /// MIG instances still exist, so MIG cannot be turned off
    /// (`NVML_ERROR_IN_USE`).
    InUse,
    /// No such GPU or compute instance (`NVML_ERROR_NOT_FOUND`).
    NotFound,
}

impl MigRefusal {
    /// The NVML return code (`nvmlReturn_t`) that carries this refusal.
    pub fn nvml_code(self) -> u32 {
        use nvml_wrapper_sys::bindings as sys;
        match self {
            Self::InvalidArgument => sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
            Self::NotSupported => sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
            Self::NotFound => sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
            Self::InUse => sys::nvmlReturn_enum_NVML_ERROR_IN_USE,
            Self::InsufficientResources => sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES,
        }
    }

    /// The refusal an NVML error stands for; `None` for errors that are not
    /// refusals (timeouts, driver failures, ...). nvml-wrapper has no
    /// variant for `NVML_ERROR_INSUFFICIENT_RESOURCES` and passes it through
    /// as an unexpected value.
    pub fn from_nvml(error: &nvml_wrapper::error::NvmlError) -> Option<Self> {
        use nvml_wrapper::error::NvmlError as E;
        use nvml_wrapper_sys::bindings as sys;
        Some(match error {
            E::NotSupported => Self::NotSupported,
            E::InvalidArg => Self::InvalidArgument,
            E::UnexpectedVariant(sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES) => {
                Self::InsufficientResources
            }
            E::InUse => Self::InUse,
            E::NotFound => Self::NotFound,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MigRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotSupported => "MIG mode is off or the GPU does not support MIG",
            Self::InvalidArgument => "no such MIG profile or placement on this GPU",
            Self::InsufficientResources => {
                "the placement overlaps an existing MIG instance or the profile has no instance left"
            }
            Self::InUse => "MIG instances still exist on the GPU",
            Self::NotFound => "no such MIG instance",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn memory_rounding_matches_go_nvlib() {
        // (device MiB, profile MiB, expected GB)
        let cases = [
            (40960, 4864, 5),      // A100-40GB 1g.5gb
            (40960, 9856, 10),     // A100-40GB 2g.10gb
            (40960, 19968, 20),    // A100-40GB 3g.20gb
            (40960, 40192, 40),    // A100-40GB 7g.40gb
            (81559, 9984, 10),     // H100-80GB 1g.10gb
            (81559, 40448, 40),    // H100-80GB 3g.40gb
            (81559, 81152, 80),    // H100-80GB 7g.80gb
            (143771, 16384, 18),   // H200 1g.18gb
            (143771, 68096, 71),   // H200 3g.71gb: 70.5 rounds away from zero
            (189471, 45824, 47),   // GB200 2g.47gb: 46.5 rounds up
            (189471, 184832, 186), // GB200 7g.186gb
        ];
        for (device_mib, profile_mib, want) in cases {
            assert_eq!(
                mig_memory_gb(device_mib * MIB, profile_mib),
                want,
                "{profile_mib} MiB of {device_mib} MiB"
            );
        }
        assert_eq!(mig_memory_gb(0, 1024), 0);
    }

    #[test]
    fn names_by_profile_index() {
        use profile_index::*;
        let cases = [
            (SLICE_1, 1, "1g.10gb"),
            (SLICE_1_REV1, 1, "1g.10gb+me"),
            (SLICE_1_REV2, 1, "1g.10gb"),
            (SLICE_1_ALL_ME, 1, "1g.10gb+me.all"),
            (SLICE_1_GFX, 1, "1g.10gb+gfx"),
            (SLICE_2_NO_ME, 2, "2g.10gb-me"),
            (SLICE_4_GFX, 4, "4g.10gb+gfx"),
        ];
        for (index, slices, want) in cases {
            let g = gi_slices_of_index(index);
            assert_eq!(g, Some(slices), "index {index}");
            assert_eq!(
                profile_name(slices, slices, 10, suffix_of_index(index)),
                want
            );
        }
        assert_eq!(gi_slices_of_index(COUNT), None);
        assert_eq!(profile_name(1, 2, 20, ""), "1c.2g.20gb");
    }

    #[test]
    fn profile_ids_map_to_indices_with_the_right_shape() {
        for table in tables::MigTable::ALL {
            for p in table.profiles() {
                let index = profile_index_of_id(p.gi_profile_id).unwrap();
                assert_eq!(gi_slices_of_index(index), Some(p.slice_count), "{}", p.name);
                assert!(p.name.ends_with(suffix_of_index(index)), "{}", p.name);
                assert!(ci_profile_index_of_slices(p.slice_count).is_some());
            }
        }
        assert_eq!(profile_index_of_id(1), None);
    }

    #[test]
    fn refusals_round_trip_through_nvml_codes() {
        use nvml_wrapper::error::{NvmlError, nvml_try};
        for r in [
            MigRefusal::NotSupported,
            MigRefusal::InvalidArgument,
            MigRefusal::InsufficientResources,
            MigRefusal::InUse,
            MigRefusal::NotFound,
        ] {
            let err = nvml_try(r.nvml_code()).unwrap_err();
            assert_eq!(MigRefusal::from_nvml(&err), Some(r), "{err:?}");
        }
        assert_eq!(MigRefusal::from_nvml(&NvmlError::Timeout), None);
    }

    #[test]
    fn placements() {
        let p = MigPlacement { start: 4, size: 4 };
        assert_eq!(p.memory_slices(), 4..8);
        let cases = [
            ((0, 4), false),
            ((2, 4), true),
            ((7, 1), true),
            ((8, 1), false),
        ];
        for ((start, size), want) in cases {
            assert_eq!(
                p.overlaps(&MigPlacement { start, size }),
                want,
                "{start}+{size}"
            );
        }
    }
}

//! Built-in MIG profile tables for the GPU models the fake backend simulates.
//!
//! Values are transcribed from NVIDIA's public MIG user guide and
//! `nvidia-smi mig -lgip` listings: profile names, GPU-instance profile IDs
//! (19 = 1g, 20 = 1g+me, 15 = 1g at double memory, 14 = 2g, 9 = 3g,
//! 5 = 4g, 0 = 7g), engine counts, memory in MiB and the placements every
//! 7-compute-slice / 8-memory-slice board shares. GB200 streaming
//! multiprocessor counts are best-effort (NVIDIA does not publish a
//! `-lgip` listing for it); everything else follows the guide.
//!
//! Invariant (checked by tests): every profile's name is what go-nvlib would
//! derive from its memory on the matching GPU model, so device names built
//! from these tables match what the NVML backend builds on real hardware.

use serde::{Deserialize, Serialize};

use super::{MigCapacities, MigPlacement, MigProfile};

/// Memory slices on every board these tables describe.
pub const MEMORY_SLICES: u32 = 8;

/// A built-in MIG profile table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigTable {
    /// NVIDIA A100-SXM4-40GB.
    #[serde(rename = "a100-sxm4-40gb")]
    A100Sxm4_40gb,
    /// NVIDIA H100 80GB HBM3 (SXM5).
    #[serde(rename = "h100-sxm5-80gb")]
    H100Sxm5_80gb,
    /// NVIDIA H200 (141 GB HBM3e).
    #[serde(rename = "h200-141gb")]
    H200_141gb,
    /// NVIDIA GB200 (186 GB HBM3e per GPU).
    #[serde(rename = "gb200")]
    Gb200,
}

/// Placement shapes shared by all 7-compute-slice boards.
#[derive(Clone, Copy)]
enum Shape {
    /// One compute slice, one memory slice: starts 0..=6.
    OneSlice,
    /// One compute slice with two memory slices: starts 0, 2, 4, 6.
    OneSliceDoubleMemory,
    /// Two slices: starts 0, 2, 4.
    TwoSlices,
    /// Three compute slices, four memory slices: starts 0, 4.
    ThreeSlices,
    /// Four slices: start 0.
    FourSlices,
    /// The whole board.
    Full,
}

impl Shape {
    fn placements(self) -> Vec<MigPlacement> {
        let (size, starts): (u32, &[u32]) = match self {
            Self::OneSlice => (1, &[0, 1, 2, 3, 4, 5, 6]),
            Self::OneSliceDoubleMemory => (2, &[0, 2, 4, 6]),
            Self::TwoSlices => (2, &[0, 2, 4]),
            Self::ThreeSlices => (4, &[0, 4]),
            Self::FourSlices => (4, &[0]),
            Self::Full => (8, &[0]),
        };
        starts
            .iter()
            .map(|&start| MigPlacement { start, size })
            .collect()
    }
}

/// One `-lgip` row: name, ID, compute slices, instances, SM, CE, DEC, ENC,
/// JPEG, OFA, memory MiB, placement shape.
type Row = (
    &'static str,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u64,
    Shape,
);

use Shape::*;

#[rustfmt::skip]
const A100_SXM4_40GB: &[Row] = &[
    ("1g.5gb",     19, 1, 7, 14, 1, 0, 0, 0, 0,  4864, OneSlice),
    ("2g.10gb",    14, 2, 3, 28, 2, 1, 0, 0, 0,  9856, TwoSlices),
    ("3g.20gb",     9, 3, 2, 42, 3, 2, 0, 0, 0, 19968, ThreeSlices),
    ("4g.20gb",     5, 4, 1, 56, 4, 2, 0, 0, 0, 19968, FourSlices),
    ("7g.40gb",     0, 7, 1, 98, 7, 5, 0, 1, 1, 40192, Full),
    ("1g.5gb+me",  20, 1, 1, 14, 1, 1, 0, 1, 1,  4864, OneSlice),
    ("1g.10gb",    15, 1, 4, 14, 1, 1, 0, 0, 0,  9856, OneSliceDoubleMemory),
];

#[rustfmt::skip]
const H100_SXM5_80GB: &[Row] = &[
    ("1g.10gb",    19, 1, 7,  16, 1, 1, 0, 1, 0,  9984, OneSlice),
    ("2g.20gb",    14, 2, 3,  32, 2, 2, 0, 2, 0, 20096, TwoSlices),
    ("3g.40gb",     9, 3, 2,  60, 3, 3, 0, 3, 0, 40448, ThreeSlices),
    ("4g.40gb",     5, 4, 1,  64, 4, 4, 0, 4, 0, 40448, FourSlices),
    ("7g.80gb",     0, 7, 1, 132, 8, 7, 0, 7, 1, 81152, Full),
    ("1g.10gb+me", 20, 1, 1,  16, 1, 1, 0, 1, 1,  9984, OneSlice),
    ("1g.20gb",    15, 1, 4,  26, 1, 1, 0, 1, 0, 20096, OneSliceDoubleMemory),
];

#[rustfmt::skip]
const H200_141GB: &[Row] = &[
    ("1g.18gb",    19, 1, 7,  16, 1, 1, 0, 1, 0,  16384, OneSlice),
    ("2g.35gb",    14, 2, 3,  32, 2, 2, 0, 2, 0,  33280, TwoSlices),
    ("3g.71gb",     9, 3, 2,  60, 3, 3, 0, 3, 0,  68096, ThreeSlices),
    ("4g.71gb",     5, 4, 1,  64, 4, 4, 0, 4, 0,  68096, FourSlices),
    ("7g.141gb",    0, 7, 1, 132, 8, 7, 0, 7, 1, 139008, Full),
    ("1g.18gb+me", 20, 1, 1,  16, 1, 1, 0, 1, 1,  16384, OneSlice),
    ("1g.35gb",    15, 1, 4,  26, 1, 1, 0, 1, 0,  33280, OneSliceDoubleMemory),
];

#[rustfmt::skip]
const GB200: &[Row] = &[
    ("1g.23gb",    19, 1, 7,  18, 1, 1, 0, 1, 0,  22784, OneSlice),
    ("2g.47gb",    14, 2, 3,  36, 2, 2, 0, 2, 0,  45824, TwoSlices),
    ("3g.93gb",     9, 3, 2,  66, 3, 3, 0, 3, 0,  91904, ThreeSlices),
    ("4g.93gb",     5, 4, 1,  72, 4, 4, 0, 4, 0,  91904, FourSlices),
    ("7g.186gb",    0, 7, 1, 148, 8, 7, 0, 7, 1, 184832, Full),
    ("1g.23gb+me", 20, 1, 1,  18, 1, 1, 0, 1, 1,  22784, OneSlice),
    ("1g.47gb",    15, 1, 4,  18, 1, 1, 0, 1, 0,  45824, OneSliceDoubleMemory),
];

impl MigTable {
    /// The table's profiles in the order NVML enumerates them (by NVML's
    /// profile index: 1g, 2g, 3g, 4g, 7g, then the `+me` and
    /// double-memory 1g variants), which is the order the NVML backend
    /// returns on real hardware (seen on an H100, docs/hardware-runs.md),
    /// not the order `nvidia-smi mig -lgip` prints.
    pub fn profiles(self) -> Vec<MigProfile> {
        let rows = match self {
            Self::A100Sxm4_40gb => A100_SXM4_40GB,
            Self::H100Sxm5_80gb => H100_SXM5_80GB,
            Self::H200_141gb => H200_141GB,
            Self::Gb200 => GB200,
        };
        rows.iter()
            .map(
                |&(name, id, slices, instances, sm, ce, dec, enc, jpg, ofa, mib, shape)| {
                    MigProfile {
                        name: name.to_owned(),
                        gi_profile_id: id,
                        slice_count: slices,
                        instance_count: instances,
                        capacities: MigCapacities {
                            multiprocessors: sm,
                            copy_engines: ce,
                            decoders: dec,
                            encoders: enc,
                            jpeg_engines: jpg,
                            ofa_engines: ofa,
                            memory_bytes: mib * 1024 * 1024,
                        },
                        placements: shape.placements(),
                    }
                },
            )
            .collect()
    }

    /// Every built-in table.
    pub const ALL: [MigTable; 4] = [
        Self::A100Sxm4_40gb,
        Self::H100Sxm5_80gb,
        Self::H200_141gb,
        Self::Gb200,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_internally_consistent() {
        for table in MigTable::ALL {
            let profiles = table.profiles();
            assert_eq!(profiles.len(), 7, "{table:?}");
            for p in &profiles {
                assert!(!p.placements.is_empty(), "{table:?} {}", p.name);
                for pl in &p.placements {
                    assert!(pl.start + pl.size <= MEMORY_SLICES, "{table:?} {}", p.name);
                }
                // Instances never exceed the distinct placements.
                assert!(p.instance_count as usize <= p.placements.len());
                assert!(p.name.starts_with(&format!("{}g.", p.slice_count)));
            }
            let mut ids: Vec<u32> = profiles.iter().map(|p| p.gi_profile_id).collect();
            ids.sort_unstable();
            assert_eq!(ids, [0, 5, 9, 14, 15, 19, 20], "{table:?}");
        }
    }

    #[test]
    fn h100_row_matches_the_guide() {
        let profiles = MigTable::H100Sxm5_80gb.profiles();
        let full = profiles.iter().find(|p| p.gi_profile_id == 0);
        assert_eq!(
            full.map(|p| (p.name.as_str(), p.capacities)),
            Some((
                "7g.80gb",
                MigCapacities {
                    multiprocessors: 132,
                    copy_engines: 8,
                    decoders: 7,
                    encoders: 0,
                    jpeg_engines: 7,
                    ofa_engines: 1,
                    memory_bytes: 81152 * 1024 * 1024,
                }
            ))
        );
    }
}

//! GPU models the fake backend can simulate, with the facts NVML reports for
//! each (product name, brand, architecture, compute capability, memory as
//! `nvidia-smi` shows it) and the MIG table of the MIG-capable ones.

use serde::{Deserialize, Serialize};

use crate::device::{Architecture, ComputeCapability};
use crate::mig::tables::MigTable;

/// A GPU model a fake profile refers to by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GpuModel {
    /// NVIDIA A100-SXM4-40GB.
    #[serde(rename = "a100-sxm4-40gb")]
    A100Sxm4_40gb,
    /// NVIDIA H100 80GB HBM3 (SXM5).
    #[serde(rename = "h100-sxm5-80gb")]
    H100Sxm5_80gb,
    /// NVIDIA H200 (SXM, 141 GB).
    #[serde(rename = "h200-141gb")]
    H200_141gb,
    /// NVIDIA GB200 (one Blackwell GPU of a Grace-Blackwell superchip).
    #[serde(rename = "gb200")]
    Gb200,
    /// NVIDIA L4 (no MIG).
    #[serde(rename = "l4")]
    L4,
}

/// What NVML reports for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// `nvmlDeviceGetName`.
    pub product_name: &'static str,
    /// Brand as go-nvlib names it.
    pub brand: &'static str,
    /// Architecture.
    pub architecture: Architecture,
    /// CUDA compute capability.
    pub cuda_compute_capability: ComputeCapability,
    /// Total memory in MiB as `nvidia-smi` reports it.
    pub memory_mib: u64,
    /// MIG table, for MIG-capable models.
    pub mig_table: Option<MigTable>,
}

impl GpuModel {
    /// Every model.
    pub const ALL: [GpuModel; 5] = [
        Self::A100Sxm4_40gb,
        Self::H100Sxm5_80gb,
        Self::H200_141gb,
        Self::Gb200,
        Self::L4,
    ];

    /// The model's NVML facts.
    pub fn spec(self) -> ModelSpec {
        let cc = |major, minor| ComputeCapability { major, minor };
        match self {
            Self::A100Sxm4_40gb => ModelSpec {
                product_name: "NVIDIA A100-SXM4-40GB",
                brand: "Nvidia",
                architecture: Architecture::Ampere,
                cuda_compute_capability: cc(8, 0),
                memory_mib: 40960,
                mig_table: Some(MigTable::A100Sxm4_40gb),
            },
            Self::H100Sxm5_80gb => ModelSpec {
                product_name: "NVIDIA H100 80GB HBM3",
                brand: "Nvidia",
                architecture: Architecture::Hopper,
                cuda_compute_capability: cc(9, 0),
                memory_mib: 81559,
                mig_table: Some(MigTable::H100Sxm5_80gb),
            },
            Self::H200_141gb => ModelSpec {
                product_name: "NVIDIA H200",
                brand: "Nvidia",
                architecture: Architecture::Hopper,
                cuda_compute_capability: cc(9, 0),
                memory_mib: 143771,
                mig_table: Some(MigTable::H200_141gb),
            },
            Self::Gb200 => ModelSpec {
                product_name: "NVIDIA GB200",
                brand: "Nvidia",
                architecture: Architecture::Blackwell,
                cuda_compute_capability: cc(10, 0),
                memory_mib: 189471,
                mig_table: Some(MigTable::Gb200),
            },
            Self::L4 => ModelSpec {
                product_name: "NVIDIA L4",
                brand: "Nvidia",
                architecture: Architecture::AdaLovelace,
                cuda_compute_capability: cc(8, 9),
                memory_mib: 23034,
                mig_table: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mig::mig_memory_gb;

    /// The built-in MIG tables name their profiles exactly as go-nvlib (and
    /// so the NVML backend) would on the model they belong to.
    #[test]
    fn mig_table_names_match_derived_names() {
        for model in GpuModel::ALL {
            let spec = model.spec();
            let Some(table) = spec.mig_table else {
                continue;
            };
            for p in table.profiles() {
                let gb = mig_memory_gb(
                    spec.memory_mib * 1024 * 1024,
                    p.capacities.memory_bytes >> 20,
                );
                let want = format!("{}g.{gb}gb", p.slice_count);
                assert!(
                    p.name == want || p.name.starts_with(&format!("{want}+")),
                    "{model:?}: table says {}, derived {want}",
                    p.name
                );
                assert!(
                    p.capacities.memory_bytes <= spec.memory_mib << 20,
                    "{model:?} {}",
                    p.name
                );
            }
        }
    }
}

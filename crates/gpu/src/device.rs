//! Plain data describing full GPUs and the driver they run on.
//!
//! These types are what every backend returns and what the agent turns into
//! ResourceSlice devices, so their string forms follow the upstream driver:
//! architecture names as go-nvlib spells them (`Ada Lovelace`, `Hopper`),
//! PCI bus IDs in the canonical lower-case `0000:3b:00.0` form, CUDA versions
//! as `major.minor`.
//!
//! Invariants: a [`GpuInfo`] produced by a backend has a canonical
//! `pci_bus_id` (see [`canonical_pci_bus_id`]) and a `uuid` starting with
//! `GPU-`. Parsing helpers return [`None`]/errors instead of guessing.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Facts about the installed driver, identical for every GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    /// Kernel driver version as NVML reports it, e.g. `570.172.08`.
    pub driver_version: String,
    /// Highest CUDA version the driver supports, e.g. `12.8`.
    pub cuda_driver_version: CudaVersion,
}

/// One full (physical) GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML UUID, e.g. `GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c`.
    pub uuid: String,
    /// NVML enumeration index (0-based, not stable across reboots).
    pub index: u32,
    /// Minor number of `/dev/nvidia<minor>`; names the device (`gpu-<minor>`).
    pub minor: u32,
    /// Canonical PCI bus ID, e.g. `0000:3b:00.0`.
    pub pci_bus_id: String,
    /// PCIe root complex, e.g. `pci0000:3a`; `None` when sysfs cannot say.
    pub pcie_root: Option<String>,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub product_name: String,
    /// Brand as go-nvlib names it, e.g. `Nvidia`, `Tesla`, `GeForce`.
    pub brand: String,
    /// GPU architecture.
    pub architecture: Architecture,
    /// CUDA compute capability.
    pub cuda_compute_capability: ComputeCapability,
    /// Total framebuffer memory in bytes; `None` when NVML does not report it.
    pub memory_bytes: Option<u64>,
    /// Whether the GPU supports MIG at all.
    pub mig_capable: bool,
    /// Whether MIG mode is currently enabled.
    pub mig_enabled: bool,
    /// Memory addressing mode; `None` when the driver or platform cannot
    /// report it.
    pub addressing_mode: Option<AddressingMode>,
}

/// GPU architecture, named as the upstream driver publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    /// Kepler.
    Kepler,
    /// Maxwell.
    Maxwell,
    /// Pascal.
    Pascal,
    /// Volta.
    Volta,
    /// Turing.
    Turing,
    /// Ampere (A100, A30, A10).
    Ampere,
    /// Ada Lovelace (L4, L40S).
    #[serde(rename = "Ada Lovelace")]
    AdaLovelace,
    /// Hopper (H100, H200).
    Hopper,
    /// Blackwell (B200, GB200).
    Blackwell,
    /// An architecture NVML does not name (newer than this build knows).
    Unknown,
}

impl Architecture {
    /// The attribute value upstream publishes (`Ada Lovelace`, `Hopper`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kepler => "Kepler",
            Self::Maxwell => "Maxwell",
            Self::Pascal => "Pascal",
            Self::Volta => "Volta",
            Self::Turing => "Turing",
            Self::Ampere => "Ampere",
            Self::AdaLovelace => "Ada Lovelace",
            Self::Hopper => "Hopper",
            Self::Blackwell => "Blackwell",
            Self::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the GPU addresses system memory (NVML `nvmlDeviceGetAddressingMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressingMode {
    /// Heterogeneous Memory Management (x86 hosts with HMM).
    #[serde(rename = "HMM")]
    Hmm,
    /// Address Translation Services (coherent platforms such as Grace).
    #[serde(rename = "ATS")]
    Ats,
    /// Supported by the platform but currently inactive.
    None,
}

impl AddressingMode {
    /// The attribute value upstream publishes: `HMM`, `ATS` or `None`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hmm => "HMM",
            Self::Ats => "ATS",
            Self::None => "None",
        }
    }
}

impl fmt::Display for AddressingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CUDA compute capability such as `9.0`.
///
/// Serialised as the string `"major.minor"` so profiles read naturally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComputeCapability {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// A CUDA driver version such as `12.8`.
///
/// NVML reports it as one integer (`12080`); [`CudaVersion::from_nvml`]
/// decodes that. Serialised as `"major.minor"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CudaVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl CudaVersion {
    /// Decodes NVML's `major * 1000 + minor * 10` encoding.
    pub fn from_nvml(encoded: u32) -> Self {
        Self {
            major: encoded / 1000,
            minor: (encoded % 1000) / 10,
        }
    }
}

/// Parses `"<major>.<minor>"` with both parts plain decimal numbers.
fn parse_major_minor(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.split_once('.')?;
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

macro_rules! major_minor_string_form {
    ($ty:ident, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}.{}", self.major, self.minor)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_major_minor(s)
                    .map(|(major, minor)| Self { major, minor })
                    .ok_or_else(|| {
                        format!("{:?} is not a {} of the form <major>.<minor>", s, $what)
                    })
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

major_minor_string_form!(ComputeCapability, "compute capability");
major_minor_string_form!(CudaVersion, "CUDA version");

/// Turns a PCI bus ID as NVML or sysfs spells it into the canonical form
/// `dddd:bb:dd.f` in lower case.
///
/// NVML reports an 8-digit domain (`00000000:3B:00.0`); like go-nvlib, the
/// upper four (always zero) digits are dropped. Returns `None` when the
/// result is not a well-formed bus ID.
pub fn canonical_pci_bus_id(raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    let id = match lower.split_once(':') {
        Some((domain, rest)) if domain.len() == 8 && domain.starts_with("0000") => {
            format!("{}:{rest}", &domain[4..])
        }
        _ => lower,
    };
    is_canonical_pci_bus_id(&id).then_some(id)
}

/// Whether `id` is a canonical `dddd:bb:dd.f` bus ID (lower-case hex).
pub fn is_canonical_pci_bus_id(id: &str) -> bool {
    let b = id.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// Whether `root` looks like a PCIe root complex name, `pci<domain>:<bus>`
/// (e.g. `pci0000:3a`).
pub fn is_pcie_root(root: &str) -> bool {
    let Some(rest) = root.strip_prefix("pci") else {
        return false;
    };
    let b = rest.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    b.len() == 7 && b[..4].iter().all(hex) && b[4] == b':' && b[5..].iter().all(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_pci_bus_id_forms() {
        let cases = [
            ("00000000:3B:00.0", Some("0000:3b:00.0")),
            ("0000:3b:00.0", Some("0000:3b:00.0")),
            ("00000001:C1:00.0", Some("0001:c1:00.0")),
            ("00010000:c1:00.0", None),
            ("0001:c1:00.0", Some("0001:c1:00.0")),
            ("3b:00.0", None),
            ("0000:3b:00.8", None),
            ("0000:3g:00.0", None),
            ("", None),
        ];
        for (raw, want) in cases {
            assert_eq!(canonical_pci_bus_id(raw).as_deref(), want, "{raw}");
        }
    }

    #[test]
    fn pcie_root_forms() {
        let cases = [
            ("pci0000:3a", true),
            ("pci0001:00", true),
            ("pci0000:3A", false),
            ("pci0000:3", false),
            ("0000:3a", false),
            ("pci00003a", false),
        ];
        for (root, want) in cases {
            assert_eq!(is_pcie_root(root), want, "{root}");
        }
    }

    #[test]
    fn cuda_version_decodes_nvml_encoding() {
        assert_eq!(
            CudaVersion::from_nvml(12080),
            CudaVersion {
                major: 12,
                minor: 8
            }
        );
        assert_eq!(CudaVersion::from_nvml(13000).to_string(), "13.0");
        assert_eq!(CudaVersion::from_nvml(11020).to_string(), "11.2");
    }

    #[test]
    fn major_minor_parsing() {
        assert_eq!(
            "9.0".parse::<ComputeCapability>(),
            Ok(ComputeCapability { major: 9, minor: 0 })
        );
        assert_eq!(
            "10.0".parse::<ComputeCapability>().map(|c| c.to_string()),
            Ok("10.0".to_owned())
        );
        for bad in ["9", "9.", ".0", "9.0.1", "v9.0", "9.x"] {
            assert_eq!(
                bad.parse::<CudaVersion>(),
                Err(format!(
                    "{bad:?} is not a CUDA version of the form <major>.<minor>"
                ))
            );
        }
    }

    #[test]
    fn names_match_upstream() {
        assert_eq!(Architecture::AdaLovelace.to_string(), "Ada Lovelace");
        assert_eq!(Architecture::Blackwell.to_string(), "Blackwell");
        assert_eq!(AddressingMode::Ats.to_string(), "ATS");
        assert_eq!(AddressingMode::None.to_string(), "None");
    }
}

//! NVLink fabric (multi-node NVLink) facts of a GPU and the clique ID derived
//! from them.
//!
//! NVML's `nvmlDeviceGetGpuFabricInfo` reports a cluster UUID, a clique ID,
//! the state of fabric registration and the NVML status it ended with. The
//! ComputeDomain side of the agent needs the *clique ID*, which upstream
//! formats as `<cluster UUID in 8-4-4-4-12 form>.<clique ID in decimal>`.
//!
//! Invariants: [`FabricInfo::clique_id`] is `None` exactly when the fabric is
//! not supported or the cluster UUID is all zeros (a GPU without multi-node
//! NVLink); a clique ID is returned even while registration is incomplete or
//! failed, and [`FabricInfo::is_ready`] tells the caller whether to trust it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Fabric facts of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricInfo {
    /// UUID of the NVLink cluster (all zeros when there is none).
    pub cluster_uuid: ClusterUuid,
    /// Clique within the cluster.
    pub clique_id: u32,
    /// How far fabric registration got.
    pub state: FabricState,
    /// How registration ended.
    pub status: FabricStatus,
}

impl FabricInfo {
    /// The clique ID upstream publishes, `<clusterUUID>.<cliqueId>`; `None`
    /// when the fabric is not supported or the cluster UUID is zero.
    pub fn clique_id(&self) -> Option<String> {
        if self.state == FabricState::NotSupported || self.cluster_uuid.is_zero() {
            return None;
        }
        Some(format!("{}.{}", self.cluster_uuid, self.clique_id))
    }

    /// Whether registration completed successfully (state `completed`,
    /// status `success`).
    pub fn is_ready(&self) -> bool {
        self.state == FabricState::Completed && self.status == FabricStatus::SUCCESS
    }
}

/// Fabric registration state (`NVML_GPU_FABRIC_STATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FabricState {
    /// The GPU does not take part in a fabric.
    NotSupported,
    /// Registration has not started.
    NotStarted,
    /// Registration is running.
    InProgress,
    /// Registration finished (see the status for how).
    Completed,
}

impl FabricState {
    /// Decodes NVML's state byte; `None` for values this build does not know.
    pub fn from_nvml(state: u8) -> Option<Self> {
        Some(match state {
            0 => Self::NotSupported,
            1 => Self::NotStarted,
            2 => Self::InProgress,
            3 => Self::Completed,
            _ => return None,
        })
    }

    /// NVML's state byte (the inverse of [`FabricState::from_nvml`]).
    pub fn to_nvml(self) -> u8 {
        match self {
            Self::NotSupported => 0,
            Self::NotStarted => 1,
            Self::InProgress => 2,
            Self::Completed => 3,
        }
    }
}

impl fmt::Display for FabricState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotSupported => "not_supported",
            Self::NotStarted => "not_started",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
        })
    }
}

/// The NVML return code fabric registration ended with.
///
/// Serialised as `success` for 0 and as the bare number otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FabricStatus(pub u32);

impl FabricStatus {
    /// `NVML_SUCCESS`.
    pub const SUCCESS: FabricStatus = FabricStatus(0);
}

impl fmt::Display for FabricStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::SUCCESS {
            f.write_str("success")
        } else {
            write!(f, "nvml error {}", self.0)
        }
    }
}

impl Serialize for FabricStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if *self == Self::SUCCESS {
            serializer.serialize_str("success")
        } else {
            serializer.serialize_u32(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for FabricStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FabricStatus;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`success` or an NVML return code")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FabricStatus, E> {
                match v {
                    "success" => Ok(FabricStatus::SUCCESS),
                    other => other
                        .parse()
                        .map(FabricStatus)
                        .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FabricStatus, E> {
                u32::try_from(v)
                    .map(FabricStatus)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FabricStatus, E> {
                u32::try_from(v)
                    .map(FabricStatus)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A 16-byte NVLink cluster UUID, shown in the 8-4-4-4-12 lower-case form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClusterUuid(pub [u8; 16]);

impl ClusterUuid {
    /// Whether every byte is zero (no multi-node NVLink cluster).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for ClusterUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for ClusterUuid {
    type Err = String;

    /// Parses the 8-4-4-4-12 hex form (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("{s:?} is not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx");
        let groups: Vec<&str> = s.split('-').collect();
        if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let hex: String = groups.concat();
        // Checked first so the byte slicing below stays on char boundaries.
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for ClusterUuid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClusterUuid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "5f3a8c2e-91b4-4d7a-b6e1-0c9d2f4a7b13";

    fn info(uuid: &str, clique: u32, state: FabricState, status: u32) -> FabricInfo {
        FabricInfo {
            cluster_uuid: uuid.parse().unwrap(),
            clique_id: clique,
            state,
            status: FabricStatus(status),
        }
    }

    #[test]
    fn clique_id_forms() {
        let zero = "00000000-0000-0000-0000-000000000000";
        let cases = [
            (
                info(UUID, 32766, FabricState::Completed, 0),
                Some(format!("{UUID}.32766")),
            ),
            (
                info(UUID, 0, FabricState::Completed, 0),
                Some(format!("{UUID}.0")),
            ),
            (
                info(UUID, 7, FabricState::InProgress, 0),
                Some(format!("{UUID}.7")),
            ),
            (info(UUID, 7, FabricState::NotSupported, 0), None),
            (info(zero, 7, FabricState::Completed, 0), None),
        ];
        for (fabric, want) in cases {
            assert_eq!(fabric.clique_id(), want, "{fabric:?}");
        }
    }

    #[test]
    fn readiness() {
        assert!(info(UUID, 1, FabricState::Completed, 0).is_ready());
        assert!(!info(UUID, 1, FabricState::Completed, 999).is_ready());
        assert!(!info(UUID, 1, FabricState::InProgress, 0).is_ready());
    }

    #[test]
    fn uuid_round_trip_and_errors() {
        let parsed: ClusterUuid = UUID.to_uppercase().parse().unwrap();
        assert_eq!(parsed.to_string(), UUID);
        for bad in [
            "",
            "5f3a8c2e91b44d7ab6e10c9d2f4a7b13",
            "5f3a8c2e-91b4-4d7a-b6e1-0c9d2f4a7bzz",
        ] {
            assert_eq!(
                bad.parse::<ClusterUuid>(),
                Err(format!(
                    "{bad:?} is not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
                ))
            );
        }
    }

    #[test]
    fn state_from_nvml() {
        assert_eq!(FabricState::from_nvml(3), Some(FabricState::Completed));
        assert_eq!(FabricState::from_nvml(0), Some(FabricState::NotSupported));
        assert_eq!(FabricState::from_nvml(4), None);
    }
}

//! `MigDeviceConfig`: configuration of MIG devices (static or dynamic).
//!
//! Like `GpuConfig` but without time-slice settings: the time slice cannot be set per MIG
//! device, so `TimeSlicing` is accepted (with its gate) and has no effect.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::sharing::{MpsConfig, SharingStrategy, validate_sharing};
use crate::featuregates::{FeatureGate, FeatureGates};
use crate::names::kinds;

/// Configuration of a MIG device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigDeviceConfig {
    /// How the MIG device is shared; exclusive use when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<MigDeviceSharing>,
}

/// Sharing settings of a MIG device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigDeviceSharing {
    /// `TimeSlicing` or `MPS`.
    #[serde(default = "SharingStrategy::missing")]
    pub strategy: SharingStrategy,
    /// Settings for `MPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mps_config: Option<MpsConfig>,
}

impl MigDeviceSharing {
    /// The given strategy with no settings.
    pub fn new(strategy: SharingStrategy) -> Self {
        Self {
            strategy,
            mps_config: None,
        }
    }
}

impl MigDeviceConfig {
    /// The config applied to a MIG device no claim config matches: `TimeSlicing` when
    /// `TimeSlicingSettings` is on, otherwise exclusive use.
    pub fn default_for(gates: &FeatureGates) -> Self {
        let sharing = gates
            .enabled(FeatureGate::TimeSlicingSettings)
            .then(|| MigDeviceSharing::new(SharingStrategy::TimeSlicing));
        Self { sharing }
    }

    /// Fills implied defaults:
    /// - no `sharing` and `TimeSlicingSettings` on → `strategy: TimeSlicing`;
    /// - `MPS` (gate `MPSSupport` on) without settings → empty `mpsConfig`.
    pub fn normalize(&mut self, gates: &FeatureGates) {
        let sharing = match &mut self.sharing {
            Some(sharing) => sharing,
            None if gates.enabled(FeatureGate::TimeSlicingSettings) => self
                .sharing
                .insert(MigDeviceSharing::new(SharingStrategy::TimeSlicing)),
            None => return,
        };
        if gates.enabled(FeatureGate::MPSSupport) && sharing.strategy == SharingStrategy::Mps {
            sharing.mps_config.get_or_insert_with(MpsConfig::default);
        }
    }

    /// Checks `sharing`: strategy known and its gate on, no MPS settings with `TimeSlicing`,
    /// MPS thread percentage 0..=100 and limits of at least 1 MiB.
    pub fn validate(&self, gates: &FeatureGates) -> Result<(), ConfigError> {
        let Some(sharing) = &self.sharing else {
            return Ok(());
        };
        validate_sharing(
            kinds::MIG_DEVICE_CONFIG,
            &sharing.strategy,
            None,
            sharing.mps_config.as_ref(),
            gates,
        )
    }
}

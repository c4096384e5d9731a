//! `GpuConfig`: configuration of full GPUs (`gpu.nvidia.com` devices of type `gpu`).
//!
//! Without `sharing` the GPU is used exclusively, unless the `TimeSlicingSettings` gate makes
//! time-slicing with the default interval the implied sharing.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::sharing::{
    MpsConfig, SharingStrategy, TimeSliceInterval, TimeSlicingConfig, validate_sharing,
};
use crate::featuregates::{FeatureGate, FeatureGates};
use crate::names::kinds;

/// Configuration of a full GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuConfig {
    /// How the GPU is shared; exclusive use when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<GpuSharing>,
}

/// Sharing settings of a full GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSharing {
    /// `TimeSlicing` or `MPS`.
    #[serde(default = "SharingStrategy::missing")]
    pub strategy: SharingStrategy,
    /// Settings for `TimeSlicing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_slicing_config: Option<TimeSlicingConfig>,
    /// Settings for `MPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mps_config: Option<MpsConfig>,
}

impl GpuSharing {
    /// The given strategy with no settings.
    pub fn new(strategy: SharingStrategy) -> Self {
        Self {
            strategy,
            time_slicing_config: None,
            mps_config: None,
        }
    }
}

impl GpuConfig {
    /// The config applied to a GPU no claim config matches: time-slicing with the default
    /// interval when `TimeSlicingSettings` is on, otherwise exclusive use.
    pub fn default_for(gates: &FeatureGates) -> Self {
        let sharing = gates
            .enabled(FeatureGate::TimeSlicingSettings)
            .then(|| GpuSharing {
                time_slicing_config: Some(TimeSlicingConfig {
                    interval: Some(TimeSliceInterval::Default),
                }),
                ..GpuSharing::new(SharingStrategy::TimeSlicing)
            });
        Self { sharing }
    }

    /// Fills implied defaults:
    /// - no `sharing` and `TimeSlicingSettings` on → `strategy: TimeSlicing`;
    /// - `TimeSlicing` (gate on) without settings or interval → interval `Default`;
    /// - `MPS` (gate `MPSSupport` on) without settings → empty `mpsConfig`.
    pub fn normalize(&mut self, gates: &FeatureGates) {
        let time_slicing = gates.enabled(FeatureGate::TimeSlicingSettings);
        let sharing = match &mut self.sharing {
            Some(sharing) => sharing,
            None if time_slicing => self
                .sharing
                .insert(GpuSharing::new(SharingStrategy::TimeSlicing)),
            None => return,
        };
        if time_slicing && sharing.strategy == SharingStrategy::TimeSlicing {
            sharing
                .time_slicing_config
                .get_or_insert_with(TimeSlicingConfig::default)
                .interval
                .get_or_insert(TimeSliceInterval::Default);
        }
        if gates.enabled(FeatureGate::MPSSupport) && sharing.strategy == SharingStrategy::Mps {
            sharing.mps_config.get_or_insert_with(MpsConfig::default);
        }
    }

    /// Checks `sharing`: strategy known and its gate on, no settings of the other strategy,
    /// a known interval, MPS thread percentage 0..=100 and limits of at least 1 MiB.
    pub fn validate(&self, gates: &FeatureGates) -> Result<(), ConfigError> {
        let Some(sharing) = &self.sharing else {
            return Ok(());
        };
        validate_sharing(
            kinds::GPU_CONFIG,
            &sharing.strategy,
            sharing.time_slicing_config.as_ref(),
            sharing.mps_config.as_ref(),
            gates,
        )
    }
}

//! Opaque configs of the `compute-domain.nvidia.com` driver. The controller writes them into
//! the ResourceClaimTemplates it creates per ComputeDomain; they tie a channel or daemon claim
//! to its ComputeDomain by UID.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::featuregates::FeatureGates;
use crate::names::kinds;

/// Configuration of an IMEX channel claim (the workload claim template).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeDomainChannelConfig {
    /// UID of the ComputeDomain; required.
    #[serde(default, rename = "domainID")]
    pub domain_id: String,
    /// `Single` or `All`, copied from the ComputeDomain. Free-form here; anything but `All`
    /// means one channel.
    #[serde(default)]
    pub allocation_mode: String,
}

impl ComputeDomainChannelConfig {
    /// No implied defaults.
    pub fn normalize(&mut self, _gates: &FeatureGates) {}

    /// Checks `domainID` is set.
    pub fn validate(&self, _gates: &FeatureGates) -> Result<(), ConfigError> {
        require_domain_id(kinds::COMPUTE_DOMAIN_CHANNEL_CONFIG, &self.domain_id)
    }
}

/// Configuration of an IMEX daemon claim (the daemon claim template).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ComputeDomainDaemonConfig {
    /// UID of the ComputeDomain; required.
    #[serde(default, rename = "domainID")]
    pub domain_id: String,
}

impl ComputeDomainDaemonConfig {
    /// No implied defaults.
    pub fn normalize(&mut self, _gates: &FeatureGates) {}

    /// Checks `domainID` is set.
    pub fn validate(&self, _gates: &FeatureGates) -> Result<(), ConfigError> {
        require_domain_id(kinds::COMPUTE_DOMAIN_DAEMON_CONFIG, &self.domain_id)
    }
}

fn require_domain_id(kind: &'static str, domain_id: &str) -> Result<(), ConfigError> {
    if domain_id.is_empty() {
        Err(invalid(
            kind,
            "domainID",
            "must be set to the ComputeDomain's UID",
        ))
    } else {
        Ok(())
    }
}

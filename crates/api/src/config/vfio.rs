//! `VfioDeviceConfig`: configuration of GPUs handed to VMs through `vfio-pci`
//! (`PassthroughSupport` gate).
//!
//! The only setting is the IOMMU backend policy and whether the IOMMU API device
//! (`/dev/iommu` or `/dev/vfio/vfio`) is added to the container.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};
use crate::featuregates::{FeatureGate, FeatureGates};
use crate::names::kinds;

/// Configuration of a VFIO passthrough device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VfioDeviceConfig {
    /// IOMMU settings; `LegacyOnly` without the API device when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<IommuConfig>,
}

/// IOMMU backend settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IommuConfig {
    /// Which IOMMU backend to use.
    #[serde(default = "empty_policy")]
    pub backend_policy: IommuBackendPolicy,
    /// Add the IOMMU API device to the container; `false` when absent.
    #[serde(
        default,
        rename = "enableAPIDevice",
        skip_serializing_if = "Option::is_none"
    )]
    pub enable_api_device: Option<bool>,
}

/// Go decodes a missing `backendPolicy` as the empty string, which validation then rejects.
fn empty_policy() -> IommuBackendPolicy {
    IommuBackendPolicy::Unknown(String::new())
}

impl IommuConfig {
    /// `LegacyOnly` without the API device: what an absent `iommu` means.
    pub fn legacy() -> Self {
        Self {
            backend_policy: IommuBackendPolicy::LegacyOnly,
            enable_api_device: Some(false),
        }
    }
}

/// IOMMU backend selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum IommuBackendPolicy {
    /// Only the legacy VFIO container/group backend.
    LegacyOnly,
    /// iommufd when the host has it, else legacy.
    PreferIommuFD,
    /// Anything else, kept verbatim for the validation error.
    Unknown(String),
}

impl IommuBackendPolicy {
    /// The wire value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::LegacyOnly => "LegacyOnly",
            Self::PreferIommuFD => "PreferIommuFD",
            Self::Unknown(s) => s,
        }
    }
}

super::string_enum_json_schema!(
    IommuBackendPolicy,
    "Which IOMMU backend to use: LegacyOnly (VFIO container/group) or PreferIommuFD (iommufd when the host has it, else legacy).",
    ["LegacyOnly", "PreferIommuFD"]
);

impl From<String> for IommuBackendPolicy {
    fn from(s: String) -> Self {
        match s.as_str() {
            "LegacyOnly" => Self::LegacyOnly,
            "PreferIommuFD" => Self::PreferIommuFD,
            _ => Self::Unknown(s),
        }
    }
}

impl From<IommuBackendPolicy> for String {
    fn from(p: IommuBackendPolicy) -> Self {
        p.as_str().to_owned()
    }
}

impl VfioDeviceConfig {
    /// The config applied to a VFIO device no claim config matches; there are no VFIO devices
    /// (hence no default) without `PassthroughSupport`.
    pub fn default_for(gates: &FeatureGates) -> Option<Self> {
        gates
            .enabled(FeatureGate::PassthroughSupport)
            .then(|| Self {
                iommu: Some(IommuConfig::legacy()),
            })
    }

    /// Fills implied defaults: no `iommu` → `LegacyOnly` without the API device; no
    /// `enableAPIDevice` → `false`. Independent of gates.
    pub fn normalize(&mut self, _gates: &FeatureGates) {
        self.iommu
            .get_or_insert_with(IommuConfig::legacy)
            .enable_api_device
            .get_or_insert(false);
    }

    /// Checks `iommu.backendPolicy` is `LegacyOnly` or `PreferIommuFD` (an `iommu` object
    /// without a policy is rejected). Gates do not matter: without `PassthroughSupport` there
    /// are no VFIO devices for the config to apply to.
    pub fn validate(&self, _gates: &FeatureGates) -> Result<(), ConfigError> {
        let Some(iommu) = &self.iommu else {
            return Ok(());
        };
        match &iommu.backend_policy {
            IommuBackendPolicy::LegacyOnly | IommuBackendPolicy::PreferIommuFD => Ok(()),
            IommuBackendPolicy::Unknown(s) if s.is_empty() => Err(invalid(
                kinds::VFIO_DEVICE_CONFIG,
                "iommu.backendPolicy",
                "must be set; expected LegacyOnly or PreferIommuFD",
            )),
            IommuBackendPolicy::Unknown(s) => Err(invalid(
                kinds::VFIO_DEVICE_CONFIG,
                "iommu.backendPolicy",
                format!("unknown IOMMU backend policy {s:?}; expected LegacyOnly or PreferIommuFD"),
            )),
        }
    }

    /// Whether the IOMMU API device is requested (absent means no).
    pub fn api_device_enabled(&self) -> bool {
        self.iommu
            .as_ref()
            .and_then(|i| i.enable_api_device)
            .unwrap_or(false)
    }
}

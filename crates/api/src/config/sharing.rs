//! Sharing settings shared by `GpuConfig` and `MigDeviceConfig`: the strategy, time-slicing
//! and MPS settings, and resolution of MPS pinned-memory limits to per-device values.
//!
//! Enumerated strings (strategy, interval) decode any string, so an unknown value reaches
//! validation and is reported with its field path and the accepted values, instead of failing
//! decoding with a generic serde message.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConfigError, gate_disabled, invalid};
use crate::featuregates::{FeatureGate, FeatureGates};
use crate::quantity::Quantity;

/// How a device is shared between the containers of a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum SharingStrategy {
    /// CUDA time-slicing (gate `TimeSlicingSettings`).
    TimeSlicing,
    /// CUDA Multi-Process Service (gate `MPSSupport`).
    Mps,
    /// Anything else, kept verbatim for the validation error.
    Unknown(String),
}

impl SharingStrategy {
    /// A missing `strategy`: Go decodes it as the empty string, which validation then
    /// rejects, so nvdra does the same.
    pub(crate) fn missing() -> Self {
        Self::Unknown(String::new())
    }

    /// The wire value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::TimeSlicing => "TimeSlicing",
            Self::Mps => "MPS",
            Self::Unknown(s) => s,
        }
    }

    /// Checks the strategy is known and its gate is on. `at` is the path of the `sharing`
    /// object.
    pub(crate) fn validate_at(
        &self,
        kind: &'static str,
        at: &str,
        gates: &FeatureGates,
    ) -> Result<(), ConfigError> {
        let field = format!("{at}.strategy");
        let gate = match self {
            Self::TimeSlicing => FeatureGate::TimeSlicingSettings,
            Self::Mps => FeatureGate::MPSSupport,
            Self::Unknown(s) => {
                return Err(invalid(
                    kind,
                    field,
                    format!("unknown sharing strategy {s:?}; expected TimeSlicing or MPS"),
                ));
            }
        };
        if gates.enabled(gate) {
            Ok(())
        } else {
            Err(gate_disabled(
                kind,
                field,
                &format!("strategy {}", self.as_str()),
                gate,
            ))
        }
    }
}

super::string_enum_json_schema!(
    SharingStrategy,
    "How the device is shared: TimeSlicing (gate TimeSlicingSettings) or MPS (gate MPSSupport).",
    ["TimeSlicing", "MPS"]
);

impl From<String> for SharingStrategy {
    fn from(s: String) -> Self {
        match s.as_str() {
            "TimeSlicing" => Self::TimeSlicing,
            "MPS" => Self::Mps,
            _ => Self::Unknown(s),
        }
    }
}

impl From<SharingStrategy> for String {
    fn from(s: SharingStrategy) -> Self {
        s.as_str().to_owned()
    }
}

impl fmt::Display for SharingStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Time-slice length for CUDA time-slicing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TimeSliceInterval {
    /// The driver's default.
    Default,
    /// Short.
    Short,
    /// Medium.
    Medium,
    /// Long.
    Long,
    /// Anything else, kept verbatim for the validation error.
    Unknown(String),
}

impl TimeSliceInterval {
    /// The wire value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Default => "Default",
            Self::Short => "Short",
            Self::Medium => "Medium",
            Self::Long => "Long",
            Self::Unknown(s) => s,
        }
    }

    /// The argument of `nvidia-smi compute-policy --set-timeslice`: 0 (Default) to 3 (Long);
    /// `None` for an unknown interval.
    pub fn timeslice(&self) -> Option<u8> {
        match self {
            Self::Default => Some(0),
            Self::Short => Some(1),
            Self::Medium => Some(2),
            Self::Long => Some(3),
            Self::Unknown(_) => None,
        }
    }
}

super::string_enum_json_schema!(
    TimeSliceInterval,
    "Time-slice length; Default when absent.",
    ["Default", "Short", "Medium", "Long"]
);

impl From<String> for TimeSliceInterval {
    fn from(s: String) -> Self {
        match s.as_str() {
            "Default" => Self::Default,
            "Short" => Self::Short,
            "Medium" => Self::Medium,
            "Long" => Self::Long,
            _ => Self::Unknown(s),
        }
    }
}

impl From<TimeSliceInterval> for String {
    fn from(i: TimeSliceInterval) -> Self {
        i.as_str().to_owned()
    }
}

/// Time-slicing settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeSlicingConfig {
    /// Time-slice length; `Default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<TimeSliceInterval>,
}

impl TimeSlicingConfig {
    /// The interval to apply: the configured one, or `Default`.
    pub fn effective_interval(&self) -> TimeSliceInterval {
        self.interval.clone().unwrap_or(TimeSliceInterval::Default)
    }

    pub(crate) fn validate_at(&self, kind: &'static str, at: &str) -> Result<(), ConfigError> {
        match &self.interval {
            Some(TimeSliceInterval::Unknown(s)) => Err(invalid(
                kind,
                format!("{at}.interval"),
                format!(
                    "unknown time-slice interval {s:?}; expected Default, Short, Medium or Long"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// MPS control daemon settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MpsConfig {
    /// Share of a device's threads each client may use, 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_active_thread_percentage: Option<i64>,
    /// Pinned device-memory limit applied to every device of the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_pinned_device_memory_limit: Option<Quantity>,
    /// Per-device overrides of the limit; key = device UUID, or an index into the claim's
    /// device UUIDs sorted ascending.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub default_per_device_pinned_memory_limit: BTreeMap<String, Quantity>,
}

const PINNED_DEFAULT: &str = "defaultPinnedDeviceMemoryLimit";
const PINNED_PER_DEVICE: &str = "defaultPerDevicePinnedMemoryLimit";

impl MpsConfig {
    /// Static checks: thread percentage in range and every limit at least 1 MiB. Device keys
    /// can only be checked against a claim's devices, in
    /// [`pinned_memory_limits`](Self::pinned_memory_limits).
    pub(crate) fn validate_at(&self, kind: &'static str, at: &str) -> Result<(), ConfigError> {
        if let Some(pct) = self.default_active_thread_percentage
            && !(0..=100).contains(&pct)
        {
            return Err(invalid(
                kind,
                format!("{at}.defaultActiveThreadPercentage"),
                format!("{pct} is out of range 0..=100"),
            ));
        }
        if let Some(limit) = &self.default_pinned_device_memory_limit {
            megabytes(limit).map_err(|p| invalid(kind, format!("{at}.{PINNED_DEFAULT}"), p))?;
        }
        for (key, limit) in &self.default_per_device_pinned_memory_limit {
            megabytes(limit)
                .map_err(|p| invalid(kind, format!("{at}.{PINNED_PER_DEVICE}.{key}"), p))?;
        }
        Ok(())
    }

    /// The pinned-memory limit of each of the claim's devices, as `nvidia-cuda-mps-control`
    /// takes it (`"<whole MiB>M"`), keyed by UUID.
    ///
    /// The default limit applies to every device, then per-device entries override it. A key
    /// that is not one of `device_uuids` is read as an index into `device_uuids` sorted
    /// ascending (so the index does not depend on allocation order). With no devices the
    /// result is empty. Errors: `invalid device` for a key that is neither, `invalid limit`
    /// for a limit below 1 MiB; paths are relative to the `MpsConfig`.
    pub fn pinned_memory_limits<S: AsRef<str>>(
        &self,
        device_uuids: &[S],
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        const KIND: &str = "MpsConfig";
        let mut sorted: Vec<&str> = device_uuids.iter().map(AsRef::as_ref).collect();
        sorted.sort_unstable();
        sorted.dedup();

        let mut limits = BTreeMap::new();
        if sorted.is_empty() {
            return Ok(limits);
        }
        if let Some(limit) = &self.default_pinned_device_memory_limit {
            let mb = megabytes(limit).map_err(|p| invalid(KIND, PINNED_DEFAULT, p))?;
            for uuid in &sorted {
                limits.insert((*uuid).to_owned(), mb.clone());
            }
        }
        for (key, limit) in &self.default_per_device_pinned_memory_limit {
            let field = || format!("{PINNED_PER_DEVICE}.{key}");
            let uuid = resolve_device(key, &sorted).map_err(|p| invalid(KIND, field(), p))?;
            let mb = megabytes(limit).map_err(|p| invalid(KIND, field(), p))?;
            limits.insert(uuid.to_owned(), mb);
        }
        Ok(limits)
    }
}

/// `limit` as whole MiB (`"<N>M"`), or the problem if it is below 1 MiB.
fn megabytes(limit: &Quantity) -> Result<String, String> {
    match limit.whole_mebibytes() {
        Some(mb) if mb >= 1 => Ok(format!("{mb}M")),
        Some(_) => Err(format!("invalid limit: {limit} is less than 1Mi")),
        None => Err(format!("invalid limit: {limit} is too large")),
    }
}

/// A per-device key as a UUID of `sorted`, or an index into it.
fn resolve_device<'a>(key: &str, sorted: &[&'a str]) -> Result<&'a str, String> {
    if let Some(uuid) = sorted.iter().find(|u| **u == key) {
        return Ok(uuid);
    }
    let Ok(index) = key.parse::<i64>() else {
        return Err(format!(
            "invalid device: {key:?} is neither a UUID of the claim's devices nor an index"
        ));
    };
    usize::try_from(index)
        .ok()
        .and_then(|i| sorted.get(i).copied())
        .ok_or_else(|| {
            format!(
                "invalid device: index {index} is out of range for {} devices",
                sorted.len()
            )
        })
}

/// Checks shared by GPU and MIG sharing: strategy and gate, the other strategy's settings
/// absent, nested settings valid.
pub(crate) fn validate_sharing(
    kind: &'static str,
    strategy: &SharingStrategy,
    time_slicing: Option<&TimeSlicingConfig>,
    mps: Option<&MpsConfig>,
    gates: &FeatureGates,
) -> Result<(), ConfigError> {
    const AT: &str = "sharing";
    strategy.validate_at(kind, AT, gates)?;
    match strategy {
        SharingStrategy::TimeSlicing => {
            if mps.is_some() {
                return Err(invalid(
                    kind,
                    format!("{AT}.mpsConfig"),
                    "not allowed with strategy TimeSlicing",
                ));
            }
            if let Some(ts) = time_slicing {
                ts.validate_at(kind, &format!("{AT}.timeSlicingConfig"))?;
            }
        }
        SharingStrategy::Mps => {
            if time_slicing.is_some() {
                return Err(invalid(
                    kind,
                    format!("{AT}.timeSlicingConfig"),
                    "not allowed with strategy MPS",
                ));
            }
            if let Some(mps) = mps {
                mps.validate_at(kind, &format!("{AT}.mpsConfig"))?;
            }
        }
        // Rejected by `validate_at` above.
        SharingStrategy::Unknown(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap()
    }

    fn mps(default: Option<&str>, per_device: &[(&str, &str)]) -> MpsConfig {
        MpsConfig {
            default_active_thread_percentage: None,
            default_pinned_device_memory_limit: default.map(q),
            default_per_device_pinned_memory_limit: per_device
                .iter()
                .map(|(k, v)| ((*k).to_owned(), q(v)))
                .collect(),
        }
    }

    #[test]
    fn interval_timeslice_values() {
        let cases = [
            ("Default", Some(0)),
            ("Short", Some(1)),
            ("Medium", Some(2)),
            ("Long", Some(3)),
            ("long", None),
        ];
        for (text, want) in cases {
            let interval = TimeSliceInterval::from(text.to_owned());
            assert_eq!(interval.timeslice(), want, "{text}");
            assert_eq!(interval.as_str(), text);
        }
        assert_eq!(
            TimeSlicingConfig::default().effective_interval(),
            TimeSliceInterval::Default
        );
    }

    #[test]
    fn strategy_wire_values() {
        for text in ["TimeSlicing", "MPS", "Fabric", ""] {
            let s = SharingStrategy::from(text.to_owned());
            assert_eq!(String::from(s.clone()), text);
            assert_eq!(s.to_string(), text);
        }
        assert_eq!(
            SharingStrategy::from("MPS".to_owned()),
            SharingStrategy::Mps
        );
    }

    #[test]
    fn pinned_memory_limits_resolve() {
        let uuids = ["GPU-b", "GPU-a", "GPU-c"];
        let cases: &[(MpsConfig, &[(&str, &str)])] = &[
            (mps(None, &[]), &[]),
            (
                mps(Some("1Gi"), &[]),
                &[("GPU-a", "1024M"), ("GPU-b", "1024M"), ("GPU-c", "1024M")],
            ),
            // Index 0 is the smallest UUID, whatever the allocation order.
            (
                mps(Some("1Gi"), &[("0", "2Gi"), ("GPU-c", "1.5Mi")]),
                &[("GPU-a", "2048M"), ("GPU-b", "1024M"), ("GPU-c", "1M")],
            ),
            (mps(None, &[("2", "10M")]), &[("GPU-c", "9M")]),
            (mps(None, &[("GPU-b", "1048576")]), &[("GPU-b", "1M")]),
        ];
        for (config, want) in cases {
            let want: BTreeMap<String, String> = want
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            assert_eq!(
                config.pinned_memory_limits(&uuids).unwrap(),
                want,
                "{config:?}"
            );
        }
        // No devices: nothing to limit, not even a bad default is looked at (as upstream).
        let none: [&str; 0] = [];
        assert_eq!(
            mps(Some("1Ki"), &[]).pinned_memory_limits(&none).unwrap(),
            BTreeMap::new()
        );
    }

    #[test]
    fn pinned_memory_limit_errors() {
        let uuids = ["GPU-a", "GPU-b"];
        let cases: &[(MpsConfig, &str)] = &[
            (
                mps(Some("1023Ki"), &[]),
                "MpsConfig.defaultPinnedDeviceMemoryLimit: invalid limit: 1023Ki is less than 1Mi",
            ),
            (
                mps(None, &[("GPU-a", "0")]),
                "MpsConfig.defaultPerDevicePinnedMemoryLimit.GPU-a: invalid limit: 0 is less \
                 than 1Mi",
            ),
            (
                mps(None, &[("GPU-a", "-5Mi")]),
                "MpsConfig.defaultPerDevicePinnedMemoryLimit.GPU-a: invalid limit: -5Mi is less \
                 than 1Mi",
            ),
            (
                mps(None, &[("GPU-z", "1Gi")]),
                "MpsConfig.defaultPerDevicePinnedMemoryLimit.GPU-z: invalid device: \"GPU-z\" \
                 is neither a UUID of the claim's devices nor an index",
            ),
            (
                mps(None, &[("2", "1Gi")]),
                "MpsConfig.defaultPerDevicePinnedMemoryLimit.2: invalid device: index 2 is out \
                 of range for 2 devices",
            ),
            (
                mps(None, &[("-1", "1Gi")]),
                "MpsConfig.defaultPerDevicePinnedMemoryLimit.-1: invalid device: index -1 is \
                 out of range for 2 devices",
            ),
        ];
        for (config, want) in cases {
            let err = config.pinned_memory_limits(&uuids).unwrap_err();
            assert_eq!(err.to_string(), *want);
        }
    }
}

//! Which opaque configuration applies to each device of a claim, as the upstream driver decides
//! it in Prepare. Pure: configs, allocation results and feature gates in, groups of devices
//! sharing one normalized and validated config out.
//!
//! Inputs are this driver's configs as the kubelet-plugin library hands them over
//! ([`OpaqueConfig`], class configs before claim configs, later entries taking precedence) and,
//! per allocation result, the request, the device name and the device's type.
//!
//! Rules (upstream's, verified against its Prepare code):
//! - Every config is decoded **strictly** with the kinds of `gpu.nvidia.com`, whether or not it
//!   ends up applying to a device; any decode error fails the claim.
//! - Per device, configs are scanned from the highest precedence (the last) down. The first
//!   config that either *names the device's request* or *names no request and is of a kind
//!   fitting the device* wins. A config that names the request but whose kind does not fit
//!   (`GpuConfig` on a MIG device, `MigDeviceConfig` on a GPU, ...) fails the claim; a
//!   request-less config of another kind is skipped. So a later request-less config overrides an
//!   earlier request-specific one: that is what lets a request-less claim config override a class
//!   config, which the API server always attributes to the requests using the class.
//! - No config wins → the built-in default for the type ([`GpuConfig::default_for`],
//!   [`MigDeviceConfig::default_for`], [`VfioDeviceConfig::default_for`]).
//! - A request name in a config matches the allocation's request `req` exactly; for a result of
//!   subrequest `req/sub` it matches both `req/sub` and the main request `req` (the API's
//!   documented meaning; upstream compares the full string only, so it ignores a config naming
//!   `req` for a `req/sub` result, which we consider a defect).
//! - Each winning config is normalized, then validated, once; configs that win no device are
//!   not validated (as upstream).
//!
//! Output: one [`ConfigGroup`] per winning config (upstream applies configs per group), ordered
//! by the first allocation result each group covers; devices keep allocation order.
//!
//! Failure modes: every error fails the whole claim and names the config by its position among
//! this driver's configs (`claim config 1 (FromClaim)`) and the offending field, e.g.
//! `claim config 1 (FromClaim): GpuConfig.sharing.strategy: strategy MPS requires feature gate
//! MPSSupport; ...`. Errors are permanent: retrying the same claim fails the same way.

use std::fmt;

use nvdra_api::config::{
    ConfigError, ConfigKind, DeviceConfig, GpuConfig, MigDeviceConfig, Strictness, VfioDeviceConfig,
};
use nvdra_api::names::drivers;
use nvdra_api::{FeatureGate, FeatureGates};
use nvdra_kubelet_plugin::{ConfigSource, OpaqueConfig};

use crate::devices::DeviceType;

#[cfg(test)]
mod tests;

/// Resolving a claim's configs failed; the claim cannot be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A config's parameters did not decode (unknown kind or field, wrong type, ...).
    #[error("{origin}: {error}")]
    DecodeConfig {
        /// Which config.
        origin: ConfigOrigin,
        /// What is wrong with it.
        error: ConfigError,
    },
    /// A winning config broke a validation rule after normalization.
    #[error("{origin}: {error}")]
    ValidateConfig {
        /// Which config.
        origin: ConfigOrigin,
        /// The broken rule.
        error: ConfigError,
    },
    /// A config names a request whose device its kind cannot configure.
    #[error(
        "{origin}: {kind} cannot configure device {device:?} of type {device_type} \
         (request {request:?})"
    )]
    ApplyConfig {
        /// Which config.
        origin: ConfigOrigin,
        /// The config's kind.
        kind: ConfigKind,
        /// The allocated device.
        device: String,
        /// Its type.
        device_type: DeviceType,
        /// The allocation's request.
        request: String,
    },
    /// No config applies to a device and its type has no default.
    #[error(
        "no configuration for device {device:?} of type {device_type}: it has no default \
         without feature gate {gate}"
    )]
    DefaultConfig {
        /// The allocated device.
        device: String,
        /// Its type.
        device_type: DeviceType,
        /// The gate that provides the default.
        gate: FeatureGate,
    },
}

/// One allocation result of this driver, with the type of the allocated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAllocation {
    /// The request (`req`) or subrequest (`req/sub`) the device was allocated for.
    pub request: String,
    /// The allocated device's name.
    pub device: String,
    /// The allocated device's type.
    pub device_type: DeviceType,
}

impl DeviceAllocation {
    /// An allocation result from its parts.
    pub fn new(
        request: impl Into<String>,
        device: impl Into<String>,
        device_type: DeviceType,
    ) -> Self {
        Self {
            request: request.into(),
            device: device.into(),
            device_type,
        }
    }
}

/// Where a resolved config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigOrigin {
    /// The config at `index` in the list handed to [`resolve`] (this driver's configs, class
    /// configs first).
    Claim {
        /// Position in the list, from 0.
        index: usize,
        /// Class or claim.
        source: ConfigSource,
    },
    /// The built-in default for devices of this type.
    Default(DeviceType),
}

impl fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Claim { index, source } => {
                write!(f, "claim config {index} ({})", source.as_str())
            }
            Self::Default(device_type) => write!(f, "default config for {device_type} devices"),
        }
    }
}

/// A normalized, validated config for one kind of device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedConfig {
    /// For full GPUs.
    Gpu(GpuConfig),
    /// For MIG devices.
    Mig(MigDeviceConfig),
    /// For VFIO passthrough devices.
    Vfio(VfioDeviceConfig),
}

impl ResolvedConfig {
    /// The config's kind.
    pub fn kind(&self) -> ConfigKind {
        match self {
            Self::Gpu(_) => ConfigKind::Gpu,
            Self::Mig(_) => ConfigKind::MigDevice,
            Self::Vfio(_) => ConfigKind::VfioDevice,
        }
    }

    /// The type of device this config can configure.
    pub fn device_type(&self) -> DeviceType {
        match self {
            Self::Gpu(_) => DeviceType::Gpu,
            Self::Mig(_) => DeviceType::Mig,
            Self::Vfio(_) => DeviceType::Vfio,
        }
    }

    /// The built-in default for `device_type`; `None` for VFIO without `PassthroughSupport`.
    pub fn default_for(device_type: DeviceType, gates: &FeatureGates) -> Option<Self> {
        match device_type {
            DeviceType::Gpu => Some(Self::Gpu(GpuConfig::default_for(gates))),
            DeviceType::Mig => Some(Self::Mig(MigDeviceConfig::default_for(gates))),
            DeviceType::Vfio => VfioDeviceConfig::default_for(gates).map(Self::Vfio),
        }
    }

    fn normalize(&mut self, gates: &FeatureGates) {
        match self {
            Self::Gpu(c) => c.normalize(gates),
            Self::Mig(c) => c.normalize(gates),
            Self::Vfio(c) => c.normalize(gates),
        }
    }

    fn validate(&self, gates: &FeatureGates) -> Result<(), ConfigError> {
        match self {
            Self::Gpu(c) => c.validate(gates),
            Self::Mig(c) => c.validate(gates),
            Self::Vfio(c) => c.validate(gates),
        }
    }
}

impl From<ResolvedConfig> for DeviceConfig {
    fn from(config: ResolvedConfig) -> Self {
        match config {
            ResolvedConfig::Gpu(c) => Self::Gpu(c),
            ResolvedConfig::Mig(c) => Self::MigDevice(c),
            ResolvedConfig::Vfio(c) => Self::VfioDevice(c),
        }
    }
}

/// Devices that share one config; upstream applies a config once per group (one MPS daemon,
/// one time-slice setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigGroup {
    /// The config, normalized and validated.
    pub config: ResolvedConfig,
    /// Where it came from.
    pub origin: ConfigOrigin,
    /// The allocation results it applies to, in allocation order.
    pub devices: Vec<DeviceAllocation>,
}

/// A decoded config from the claim, before it wins anything.
struct Candidate<'a> {
    origin: ConfigOrigin,
    requests: &'a [String],
    config: ResolvedConfig,
}

/// Resolves which config applies to each allocated device (see the module docs for the rules).
///
/// `configs` are this driver's opaque configs in precedence order (lowest first); `devices` the
/// allocation results of this driver, in allocation order.
pub fn resolve(
    configs: &[OpaqueConfig],
    devices: &[DeviceAllocation],
    gates: &FeatureGates,
) -> Result<Vec<ConfigGroup>, Error> {
    let candidates = configs
        .iter()
        .enumerate()
        .map(|(index, config)| decode(index, config))
        .collect::<Result<Vec<_>, _>>()?;

    let mut groups: Vec<ConfigGroup> = Vec::new();
    for device in devices {
        let (origin, config) =
            match winner(&candidates, device)? {
                Some(candidate) => (candidate.origin, candidate.config.clone()),
                None => {
                    let config = ResolvedConfig::default_for(device.device_type, gates)
                        .ok_or_else(|| Error::DefaultConfig {
                            device: device.device.clone(),
                            device_type: device.device_type,
                            gate: FeatureGate::PassthroughSupport,
                        })?;
                    (ConfigOrigin::Default(device.device_type), config)
                }
            };
        match groups.iter_mut().find(|g| g.origin == origin) {
            Some(group) => group.devices.push(device.clone()),
            None => groups.push(ConfigGroup {
                config,
                origin,
                devices: vec![device.clone()],
            }),
        }
    }

    for group in &mut groups {
        group.config.normalize(gates);
        group
            .config
            .validate(gates)
            .map_err(|error| Error::ValidateConfig {
                origin: group.origin,
                error,
            })?;
    }
    Ok(groups)
}

/// Strictly decodes config `index` as one of the kinds of `gpu.nvidia.com`.
fn decode(index: usize, config: &OpaqueConfig) -> Result<Candidate<'_>, Error> {
    let origin = ConfigOrigin::Claim {
        index,
        source: config.source,
    };
    let accepted = ConfigKind::for_driver(drivers::GPU);
    let decode_error = |error| Error::DecodeConfig { origin, error };
    let resolved =
        match DeviceConfig::decode_among(&config.parameters, Strictness::Strict, accepted)
            .map_err(decode_error)?
        {
            DeviceConfig::Gpu(c) => ResolvedConfig::Gpu(c),
            DeviceConfig::MigDevice(c) => ResolvedConfig::Mig(c),
            DeviceConfig::VfioDevice(c) => ResolvedConfig::Vfio(c),
            // `decode_among` only returns accepted kinds; kept total in case the accepted list and
            // this match ever drift apart.
            other @ (DeviceConfig::ComputeDomainChannel(_)
            | DeviceConfig::ComputeDomainDaemon(_)) => {
                return Err(decode_error(ConfigError::UnsupportedKind {
                    kind: format!("{:?}", other.kind().name()),
                    accepted: accepted
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                }));
            }
        };
    Ok(Candidate {
        origin,
        requests: &config.requests,
        config: resolved,
    })
}

/// The highest-precedence candidate applying to `device`, or `None` for the default.
fn winner<'c, 'a>(
    candidates: &'c [Candidate<'a>],
    device: &DeviceAllocation,
) -> Result<Option<&'c Candidate<'a>>, Error> {
    for candidate in candidates.iter().rev() {
        let fits = candidate.config.device_type() == device.device_type;
        if names_request(candidate.requests, &device.request) {
            if !fits {
                return Err(Error::ApplyConfig {
                    origin: candidate.origin,
                    kind: candidate.config.kind(),
                    device: device.device.clone(),
                    device_type: device.device_type,
                    request: device.request.clone(),
                });
            }
            return Ok(Some(candidate));
        }
        if candidate.requests.is_empty() && fits {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// Whether a config's `requests` name `request` (`req` or `req/sub`): exactly, or, for a
/// subrequest, by its main request.
pub fn names_request(requests: &[String], request: &str) -> bool {
    let main = request.split_once('/').map_or(request, |(main, _)| main);
    requests.iter().any(|r| r == request || r == main)
}

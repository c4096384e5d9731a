//! Which `ComputeDomainChannelConfig` / `ComputeDomainDaemonConfig` applies to each allocated
//! device of a claim. Pure.
//!
//! Rules (upstream's precedence, as [`crate::config`] applies it for GPUs): every config of this
//! driver is decoded strictly with this driver's kinds (an unknown field fails the claim, naming
//! the field); per device the highest-precedence config that names the device's request, or
//! names no request and is of the kind the device needs, wins; a config naming the request with
//! the wrong kind fails the claim. Unlike GPUs there is no built-in default: a channel or daemon
//! claim without its config cannot be tied to a ComputeDomain, so it fails.
//!
//! Failure modes: [`ConfigError`], rendered as `<origin>: <problem>` like the GPU side, e.g.
//! `claim config 0 (FromClaim): ComputeDomainChannelConfig: unknown field "domainUID"`.

use nvdra_api::config::{
    ComputeDomainChannelConfig, ComputeDomainDaemonConfig, ConfigKind, DeviceConfig, Strictness,
};
use nvdra_api::names::drivers;
use nvdra_kubelet_plugin::OpaqueConfig;

use super::devices::CdDeviceType;
use crate::config::{ConfigOrigin, names_request};

/// A claim's configs do not yield one valid config per device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A config did not decode.
    #[error("{origin}: {error}")]
    Decode {
        /// Which config.
        origin: ConfigOrigin,
        /// What is wrong with it.
        error: nvdra_api::ConfigError,
    },
    /// The winning config broke a validation rule.
    #[error("{origin}: {error}")]
    Validate {
        /// Which config.
        origin: ConfigOrigin,
        /// The rule.
        error: nvdra_api::ConfigError,
    },
    /// A config names a request whose device its kind cannot configure.
    #[error(
        "{origin}: {kind} cannot configure device {device:?} of type {device_type} \
         (request {request:?})"
    )]
    Apply {
        /// Which config.
        origin: ConfigOrigin,
        /// Its kind.
        kind: ConfigKind,
        /// The device.
        device: String,
        /// Its type.
        device_type: CdDeviceType,
        /// The request.
        request: String,
    },
    /// No config applies to a device.
    #[error("no {kind} applies to device {device:?} (request {request:?})")]
    Missing {
        /// The kind the device needs.
        kind: ConfigKind,
        /// The device.
        device: String,
        /// The request.
        request: String,
    },
}

/// The config that applies to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CdConfig {
    /// For a channel device.
    Channel(ComputeDomainChannelConfig),
    /// For a daemon device.
    Daemon(ComputeDomainDaemonConfig),
}

impl CdConfig {
    /// The UID of the ComputeDomain the config names.
    pub fn domain_id(&self) -> &str {
        match self {
            Self::Channel(c) => &c.domain_id,
            Self::Daemon(c) => &c.domain_id,
        }
    }

    fn device_type(&self) -> CdDeviceType {
        match self {
            Self::Channel(_) => CdDeviceType::Channel,
            Self::Daemon(_) => CdDeviceType::Daemon,
        }
    }

    fn kind(&self) -> ConfigKind {
        kind_for(self.device_type())
    }
}

fn kind_for(device_type: CdDeviceType) -> ConfigKind {
    match device_type {
        CdDeviceType::Channel => ConfigKind::ComputeDomainChannel,
        CdDeviceType::Daemon => ConfigKind::ComputeDomainDaemon,
    }
}

/// Resolves the config of each allocated device `(request, device name, type)`, in order.
pub fn resolve(
    configs: &[OpaqueConfig],
    devices: &[(String, String, CdDeviceType)],
    gates: &nvdra_api::FeatureGates,
) -> Result<Vec<CdConfig>, ConfigError> {
    let accepted = ConfigKind::for_driver(drivers::COMPUTE_DOMAIN);
    let mut candidates = Vec::with_capacity(configs.len());
    for (index, config) in configs.iter().enumerate() {
        let origin = ConfigOrigin::Claim {
            index,
            source: config.source,
        };
        let decoded = DeviceConfig::decode_among(&config.parameters, Strictness::Strict, accepted)
            .map_err(|error| ConfigError::Decode { origin, error })?;
        let decoded = match decoded {
            DeviceConfig::ComputeDomainChannel(c) => CdConfig::Channel(c),
            DeviceConfig::ComputeDomainDaemon(c) => CdConfig::Daemon(c),
            // `decode_among` returns accepted kinds only.
            other => {
                return Err(ConfigError::Decode {
                    origin,
                    error: nvdra_api::ConfigError::UnsupportedKind {
                        kind: format!("{:?}", other.kind().name()),
                        accepted: accepted
                            .iter()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                });
            }
        };
        candidates.push((origin, &config.requests, decoded));
    }

    let mut resolved = Vec::with_capacity(devices.len());
    for (request, device, device_type) in devices {
        let mut winner = None;
        for (origin, requests, config) in candidates.iter().rev() {
            let fits = config.device_type() == *device_type;
            if names_request(requests, request) {
                if !fits {
                    return Err(ConfigError::Apply {
                        origin: *origin,
                        kind: config.kind(),
                        device: device.clone(),
                        device_type: *device_type,
                        request: request.clone(),
                    });
                }
                winner = Some((*origin, config));
                break;
            }
            if requests.is_empty() && fits {
                winner = Some((*origin, config));
                break;
            }
        }
        let Some((origin, config)) = winner else {
            return Err(ConfigError::Missing {
                kind: kind_for(*device_type),
                device: device.clone(),
                request: request.clone(),
            });
        };
        let mut config = config.clone();
        let checked = match &mut config {
            CdConfig::Channel(c) => {
                c.normalize(gates);
                c.validate(gates)
            }
            CdConfig::Daemon(c) => {
                c.normalize(gates);
                c.validate(gates)
            }
        };
        checked.map_err(|error| ConfigError::Validate { origin, error })?;
        resolved.push(config);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use nvdra_kubelet_plugin::ConfigSource;
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    use super::*;

    fn opaque(source: ConfigSource, requests: &[&str], parameters: Value) -> OpaqueConfig {
        OpaqueConfig {
            source,
            requests: requests.iter().map(|r| (*r).to_owned()).collect(),
            parameters,
        }
    }

    fn channel(domain: &str, mode: &str) -> Value {
        json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomainChannelConfig",
               "domainID": domain, "allocationMode": mode})
    }

    fn daemon(domain: &str) -> Value {
        json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomainDaemonConfig",
               "domainID": domain})
    }

    fn dev(request: &str, device_type: CdDeviceType) -> (String, String, CdDeviceType) {
        let name = match device_type {
            CdDeviceType::Channel => "channel-0",
            CdDeviceType::Daemon => "daemon-0",
        };
        (request.to_owned(), name.to_owned(), device_type)
    }

    #[test]
    fn resolution() {
        use CdDeviceType::{Channel, Daemon};
        use ConfigSource::{FromClaim, FromClass};
        let gates = nvdra_api::FeatureGates::default();
        let chan = |d: &str, m: &str| {
            CdConfig::Channel(ComputeDomainChannelConfig {
                domain_id: d.into(),
                allocation_mode: m.into(),
            })
        };
        type Case = (
            &'static str,
            Vec<OpaqueConfig>,
            Vec<(String, String, CdDeviceType)>,
            Result<Vec<CdConfig>, String>,
        );
        let cases: Vec<Case> = vec![
            (
                "controller's workload claim",
                vec![opaque(FromClaim, &["channel"], channel("cd-1", "Single"))],
                vec![dev("channel", Channel)],
                Ok(vec![chan("cd-1", "Single")]),
            ),
            (
                "later config wins",
                vec![
                    opaque(FromClaim, &[], channel("cd-1", "Single")),
                    opaque(FromClaim, &[], channel("cd-2", "All")),
                ],
                vec![dev("channel", Channel)],
                Ok(vec![chan("cd-2", "All")]),
            ),
            (
                "daemon config",
                vec![opaque(FromClaim, &["daemon"], daemon("cd-1"))],
                vec![dev("daemon", Daemon)],
                Ok(vec![CdConfig::Daemon(ComputeDomainDaemonConfig {
                    domain_id: "cd-1".into(),
                })]),
            ),
            (
                "unknown field",
                vec![opaque(
                    FromClaim,
                    &["channel"],
                    json!({"apiVersion": "resource.nvidia.com/v1beta1",
                           "kind": "ComputeDomainChannelConfig", "domainID": "x", "domainUID": "y"}),
                )],
                vec![dev("channel", Channel)],
                Err(
                    "claim config 0 (FromClaim): ComputeDomainChannelConfig: unknown field \
                     \"domainUID\""
                        .into(),
                ),
            ),
            (
                "GPU kind",
                vec![opaque(
                    FromClass,
                    &[],
                    json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig"}),
                )],
                vec![dev("channel", Channel)],
                Err(
                    "claim config 0 (FromClass): unsupported kind \"GpuConfig\"; accepted kinds: \
                     ComputeDomainChannelConfig, ComputeDomainDaemonConfig"
                        .into(),
                ),
            ),
            (
                "wrong kind for the named request",
                vec![opaque(FromClaim, &["channel"], daemon("cd-1"))],
                vec![dev("channel", Channel)],
                Err(
                    "claim config 0 (FromClaim): ComputeDomainDaemonConfig cannot configure \
                     device \"channel-0\" of type channel (request \"channel\")"
                        .into(),
                ),
            ),
            (
                "no config",
                vec![opaque(FromClaim, &[], daemon("cd-1"))],
                vec![dev("channel", Channel)],
                Err(
                    "no ComputeDomainChannelConfig applies to device \"channel-0\" (request \
                     \"channel\")"
                        .into(),
                ),
            ),
            (
                "empty domain",
                vec![opaque(FromClaim, &[], channel("", "Single"))],
                vec![dev("channel", Channel)],
                Err(
                    "claim config 0 (FromClaim): ComputeDomainChannelConfig.domainID: must be \
                     set to the ComputeDomain's UID"
                        .into(),
                ),
            ),
        ];
        for (name, configs, devices, want) in cases {
            let got = resolve(&configs, &devices, &gates).map_err(|e| e.to_string());
            assert_eq!(got, want, "{name}");
        }
    }
}

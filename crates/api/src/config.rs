//! Opaque device configuration: the `resource.nvidia.com/v1beta1` kinds users (and the
//! controller) put into `ResourceClaim` `spec.devices.config[].opaque.parameters`.
//!
//! Job: turn the raw JSON into a typed [`DeviceConfig`], fill implied defaults
//! ([`DeviceConfig::normalize`]) and enforce upstream's rules ([`DeviceConfig::validate`]).
//!
//! Decoding comes in two strengths, over one set of types:
//! - [`Strictness::Strict`] for user input (Prepare, webhook): any field the types do not know
//!   is an error naming every such field by its full path. Unknown fields are detected by
//!   decoding through `serde_ignored`, which reports each key serde skipped.
//! - [`Strictness::Lenient`] for our own checkpoints: unknown fields (written by a newer nvdra)
//!   are dropped, so downgrades keep working.
//!
//! Type errors carry the path of the offending field too (via `serde_path_to_error`).
//!
//! Every error renders as `<Kind>[.<field path>]: <problem>`, e.g.
//! `GpuConfig.sharing.mpsConfig.defaultActiveThreadPercentage: 120 is out of range 0..=100`,
//! so a user can find the field in their manifest from the message alone.
//!
//! Normalization and validation depend on the [`FeatureGates`] passed in; nothing reads
//! global state. Validation never mutates and reports the first violation found.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::featuregates::{FeatureGate, FeatureGates};
use crate::names::{api_group, drivers, kinds};

mod computedomain;
mod gpu;
mod mig;
mod sharing;
mod vfio;

pub use computedomain::{ComputeDomainChannelConfig, ComputeDomainDaemonConfig};
pub use gpu::{GpuConfig, GpuSharing};
pub use mig::{MigDeviceConfig, MigDeviceSharing};
pub use sharing::{MpsConfig, SharingStrategy, TimeSliceInterval, TimeSlicingConfig};
pub use vfio::{IommuBackendPolicy, IommuConfig, VfioDeviceConfig};

/// Decoding or validating an opaque device configuration failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The parameters are not a JSON object.
    #[error("opaque device configuration must be a JSON object, got {found}")]
    NotAnObject {
        /// JSON type found instead.
        found: &'static str,
    },
    /// `kind` is absent.
    #[error("missing \"kind\"; accepted kinds: {accepted}")]
    MissingKind {
        /// Comma-separated accepted kinds.
        accepted: String,
    },
    /// `kind` is not one of the accepted kinds.
    #[error("unsupported kind {kind}; accepted kinds: {accepted}")]
    UnsupportedKind {
        /// The kind as written (JSON text).
        kind: String,
        /// Comma-separated accepted kinds.
        accepted: String,
    },
    /// `apiVersion` is absent.
    #[error("{kind}: missing \"apiVersion\"; expected {expected}", expected = api_group::API_VERSION)]
    MissingApiVersion {
        /// The config's kind.
        kind: &'static str,
    },
    /// `apiVersion` is not `resource.nvidia.com/v1beta1`.
    #[error("{kind}: unsupported apiVersion {api_version}; expected {expected}", expected = api_group::API_VERSION)]
    UnsupportedApiVersion {
        /// The config's kind.
        kind: &'static str,
        /// The apiVersion as written (JSON text).
        api_version: String,
    },
    /// A field has the wrong JSON type or an unparsable value.
    #[error("{kind}{}: {message}", at(path))]
    Decode {
        /// The config's kind.
        kind: &'static str,
        /// Path of the field within the config; empty for the config itself.
        path: String,
        /// The decoder's message.
        message: String,
    },
    /// Strict decoding met fields the kind does not have.
    #[error("{kind}: {}", unknown_fields(paths))]
    UnknownFields {
        /// The config's kind.
        kind: &'static str,
        /// Full paths of the unknown fields, in document order.
        paths: Vec<String>,
    },
    /// A field's value breaks a validation rule.
    #[error("{kind}.{field}: {problem}")]
    Invalid {
        /// The config's (or nested type's) kind.
        kind: &'static str,
        /// Path of the field within it.
        field: String,
        /// What is wrong and what is expected.
        problem: String,
    },
}

fn at(path: &str) -> String {
    if path.is_empty() || path == "." {
        String::new()
    } else {
        format!(".{path}")
    }
}

fn unknown_fields(paths: &[String]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    match quoted.as_slice() {
        [one] => format!("unknown field {one}"),
        _ => format!("unknown fields {}", quoted.join(", ")),
    }
}

/// Shorthand for [`ConfigError::Invalid`].
pub(crate) fn invalid(
    kind: &'static str,
    field: impl Into<String>,
    problem: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        kind,
        field: field.into(),
        problem: problem.into(),
    }
}

/// The error for a strategy whose gate is off; names the gate and how to turn it on.
pub(crate) fn gate_disabled(
    kind: &'static str,
    field: impl Into<String>,
    what: &str,
    gate: FeatureGate,
) -> ConfigError {
    invalid(
        kind,
        field,
        format!(
            "{what} requires feature gate {gate}; enable it with --feature-gates={gate}=true \
             (Helm value featureGates.{gate}=true)"
        ),
    )
}

/// How to treat fields the types do not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Unknown fields are an error (user input).
    Strict,
    /// Unknown fields are ignored (our own checkpoints, across versions).
    Lenient,
}

/// The configuration kinds of the API group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigKind {
    /// [`GpuConfig`].
    Gpu,
    /// [`MigDeviceConfig`].
    MigDevice,
    /// [`VfioDeviceConfig`].
    VfioDevice,
    /// [`ComputeDomainChannelConfig`].
    ComputeDomainChannel,
    /// [`ComputeDomainDaemonConfig`].
    ComputeDomainDaemon,
}

impl ConfigKind {
    /// Every kind.
    pub const ALL: &'static [ConfigKind] = &[
        Self::Gpu,
        Self::MigDevice,
        Self::VfioDevice,
        Self::ComputeDomainChannel,
        Self::ComputeDomainDaemon,
    ];

    /// Kinds configuring devices of the `gpu.nvidia.com` driver.
    pub const GPU_DRIVER: &'static [ConfigKind] = &[Self::Gpu, Self::MigDevice, Self::VfioDevice];

    /// Kinds configuring devices of the `compute-domain.nvidia.com` driver.
    pub const COMPUTE_DOMAIN_DRIVER: &'static [ConfigKind] =
        &[Self::ComputeDomainChannel, Self::ComputeDomainDaemon];

    /// The JSON schema of the kind's fields (without `apiVersion` and `kind`), from the
    /// Rust type, for the API reference.
    pub fn schema(self) -> schemars::Schema {
        match self {
            Self::Gpu => schemars::schema_for!(GpuConfig),
            Self::MigDevice => schemars::schema_for!(MigDeviceConfig),
            Self::VfioDevice => schemars::schema_for!(VfioDeviceConfig),
            Self::ComputeDomainChannel => schemars::schema_for!(ComputeDomainChannelConfig),
            Self::ComputeDomainDaemon => schemars::schema_for!(ComputeDomainDaemonConfig),
        }
    }

    /// The `kind` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gpu => kinds::GPU_CONFIG,
            Self::MigDevice => kinds::MIG_DEVICE_CONFIG,
            Self::VfioDevice => kinds::VFIO_DEVICE_CONFIG,
            Self::ComputeDomainChannel => kinds::COMPUTE_DOMAIN_CHANNEL_CONFIG,
            Self::ComputeDomainDaemon => kinds::COMPUTE_DOMAIN_DAEMON_CONFIG,
        }
    }

    /// The DRA driver whose devices this kind configures.
    pub fn driver(self) -> &'static str {
        match self {
            Self::Gpu | Self::MigDevice | Self::VfioDevice => drivers::GPU,
            Self::ComputeDomainChannel | Self::ComputeDomainDaemon => drivers::COMPUTE_DOMAIN,
        }
    }

    /// The kinds a driver accepts; empty for a driver that is not ours.
    pub fn for_driver(driver: &str) -> &'static [ConfigKind] {
        match driver {
            drivers::GPU => Self::GPU_DRIVER,
            drivers::COMPUTE_DOMAIN => Self::COMPUTE_DOMAIN_DRIVER,
            _ => &[],
        }
    }
}

impl fmt::Display for ConfigKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One decoded opaque device configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceConfig {
    /// `GpuConfig`.
    Gpu(GpuConfig),
    /// `MigDeviceConfig`.
    MigDevice(MigDeviceConfig),
    /// `VfioDeviceConfig`.
    VfioDevice(VfioDeviceConfig),
    /// `ComputeDomainChannelConfig`.
    ComputeDomainChannel(ComputeDomainChannelConfig),
    /// `ComputeDomainDaemonConfig`.
    ComputeDomainDaemon(ComputeDomainDaemonConfig),
}

impl DeviceConfig {
    /// Decodes any kind of the group.
    pub fn decode(value: &Value, strictness: Strictness) -> Result<Self, ConfigError> {
        Self::decode_among(value, strictness, ConfigKind::ALL)
    }

    /// Decodes `value`, accepting only the given kinds (e.g. [`ConfigKind::for_driver`]).
    ///
    /// Checks, in order: the value is an object, `kind` is present and accepted, `apiVersion`
    /// is `resource.nvidia.com/v1beta1`, the fields decode, and (strict) no field is unknown.
    pub fn decode_among(
        value: &Value,
        strictness: Strictness,
        accepted: &[ConfigKind],
    ) -> Result<Self, ConfigError> {
        let accepted_list = || {
            accepted
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Value::Object(object) = value else {
            return Err(ConfigError::NotAnObject {
                found: json_type(value),
            });
        };
        let kind = match object.get("kind") {
            None => {
                return Err(ConfigError::MissingKind {
                    accepted: accepted_list(),
                });
            }
            Some(kind) => accepted
                .iter()
                .copied()
                .find(|k| kind.as_str() == Some(k.name()))
                .ok_or_else(|| ConfigError::UnsupportedKind {
                    kind: kind.to_string(),
                    accepted: accepted_list(),
                })?,
        };
        match object.get("apiVersion") {
            None => return Err(ConfigError::MissingApiVersion { kind: kind.name() }),
            Some(v) if v.as_str() == Some(api_group::API_VERSION) => {}
            Some(v) => {
                return Err(ConfigError::UnsupportedApiVersion {
                    kind: kind.name(),
                    api_version: v.to_string(),
                });
            }
        }
        Ok(match kind {
            ConfigKind::Gpu => Self::Gpu(decode_fields(kind, value, strictness)?),
            ConfigKind::MigDevice => Self::MigDevice(decode_fields(kind, value, strictness)?),
            ConfigKind::VfioDevice => Self::VfioDevice(decode_fields(kind, value, strictness)?),
            ConfigKind::ComputeDomainChannel => {
                Self::ComputeDomainChannel(decode_fields(kind, value, strictness)?)
            }
            ConfigKind::ComputeDomainDaemon => {
                Self::ComputeDomainDaemon(decode_fields(kind, value, strictness)?)
            }
        })
    }

    /// The config's kind.
    pub fn kind(&self) -> ConfigKind {
        match self {
            Self::Gpu(_) => ConfigKind::Gpu,
            Self::MigDevice(_) => ConfigKind::MigDevice,
            Self::VfioDevice(_) => ConfigKind::VfioDevice,
            Self::ComputeDomainChannel(_) => ConfigKind::ComputeDomainChannel,
            Self::ComputeDomainDaemon(_) => ConfigKind::ComputeDomainDaemon,
        }
    }

    /// Fills implied defaults (see each kind's `normalize`).
    pub fn normalize(&mut self, gates: &FeatureGates) {
        match self {
            Self::Gpu(c) => c.normalize(gates),
            Self::MigDevice(c) => c.normalize(gates),
            Self::VfioDevice(c) => c.normalize(gates),
            Self::ComputeDomainChannel(c) => c.normalize(gates),
            Self::ComputeDomainDaemon(c) => c.normalize(gates),
        }
    }

    /// Enforces the kind's rules (see each kind's `validate`).
    pub fn validate(&self, gates: &FeatureGates) -> Result<(), ConfigError> {
        match self {
            Self::Gpu(c) => c.validate(gates),
            Self::MigDevice(c) => c.validate(gates),
            Self::VfioDevice(c) => c.validate(gates),
            Self::ComputeDomainChannel(c) => c.validate(gates),
            Self::ComputeDomainDaemon(c) => c.validate(gates),
        }
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Decodes the fields of one kind; `apiVersion` and `kind` were checked by the caller and are
/// not fields of the Rust types, so they are not reported as unknown.
fn decode_fields<T: DeserializeOwned>(
    kind: ConfigKind,
    value: &Value,
    strictness: Strictness,
) -> Result<T, ConfigError> {
    let mut unknown = Vec::new();
    let decoded = {
        let mut on_ignored = |path: serde_ignored::Path<'_>| {
            let path = render_path(&path);
            if path != "apiVersion" && path != "kind" {
                unknown.push(path);
            }
        };
        let deserializer = serde_ignored::Deserializer::new(value, &mut on_ignored);
        serde_path_to_error::deserialize::<_, T>(deserializer)
    };
    let decoded = decoded.map_err(|e| ConfigError::Decode {
        kind: kind.name(),
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    if strictness == Strictness::Strict && !unknown.is_empty() {
        return Err(ConfigError::UnknownFields {
            kind: kind.name(),
            paths: unknown,
        });
    }
    Ok(decoded)
}

/// `sharing.mpsConfig.foo`: like serde_ignored's own rendering, minus the `?` segments it adds
/// for `Option`s and newtypes, which mean nothing to a user.
fn render_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", render_path(parent)),
        Path::Map { parent, key } => {
            let parent = render_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => render_path(parent),
    }
}

impl Serialize for DeviceConfig {
    /// The wire form: `apiVersion`, `kind`, then the kind's fields.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tagged<'a, T> {
            #[serde(rename = "apiVersion")]
            api_version: &'static str,
            kind: &'static str,
            #[serde(flatten)]
            fields: &'a T,
        }
        fn tagged<T: Serialize, S: Serializer>(
            kind: ConfigKind,
            fields: &T,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            Tagged {
                api_version: api_group::API_VERSION,
                kind: kind.name(),
                fields,
            }
            .serialize(serializer)
        }
        let kind = self.kind();
        match self {
            Self::Gpu(c) => tagged(kind, c, serializer),
            Self::MigDevice(c) => tagged(kind, c, serializer),
            Self::VfioDevice(c) => tagged(kind, c, serializer),
            Self::ComputeDomainChannel(c) => tagged(kind, c, serializer),
            Self::ComputeDomainDaemon(c) => tagged(kind, c, serializer),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceConfig {
    /// Lenient decoding of any kind, for embedding in our own persisted state (checkpoints).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::decode(&value, Strictness::Lenient).map_err(serde::de::Error::custom)
    }
}

macro_rules! from_kind {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for DeviceConfig {
            fn from(config: $ty) -> Self {
                Self::$variant(config)
            }
        }
    )*};
}

from_kind!(
    Gpu(GpuConfig),
    MigDevice(MigDeviceConfig),
    VfioDevice(VfioDeviceConfig),
    ComputeDomainChannel(ComputeDomainChannelConfig),
    ComputeDomainDaemon(ComputeDomainDaemonConfig)
);

/// The JSON schema of a string that takes one of `values` (documented as
/// `description`). The enums that keep unknown strings for validation decode
/// any string, but their schema states what is accepted, for the API
/// reference and for tools.
pub(crate) fn string_enum_schema(description: &str, values: &[&str]) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": values,
        "description": description,
    })
}

/// Implements [`schemars::JsonSchema`] for a string enum through
/// [`string_enum_schema`].
macro_rules! string_enum_json_schema {
    ($ty:ty, $description:expr, [$($value:expr),+ $(,)?]) => {
        impl schemars::JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                $crate::config::string_enum_schema($description, &[$($value),+])
            }
        }
    };
}
pub(crate) use string_enum_json_schema;

//! Our own serde model of a CDI spec, the CDI naming rules, and the rule for
//! the lowest `cdiVersion` a spec may declare.
//!
//! The model follows the JSON tags of the CDI project's `specs-go` types
//! (camelCase, empty fields omitted) for the fields nvdra writes; `intelRdt`
//! and `netDevices` are left out because we never use them, so a spec that
//! needs them cannot be expressed here (and unknown fields are rejected when
//! reading one back, as CDI's loader does).
//!
//! Invariants checked by [`validate`], which every writer runs before a spec
//! reaches disk:
//! - the kind is `<vendor>/<class>` and every device name follows the CDI
//!   name rules ([`validate_vendor`], [`validate_class`],
//!   [`validate_device_name`]); names are unique and each device has edits;
//! - every path a runtime acts on (device nodes, mount sources and targets,
//!   hook binaries) is absolute and normalised: no `.`/`..` or empty
//!   components, no NUL or line breaks. A `..` in a host path is how a spec
//!   generator gets tricked into exposing more of the host than it meant to;
//!   we refuse it outright rather than resolving it;
//! - `cdiVersion` is a released CDI version and not lower than
//!   [`minimum_version`]: runtimes reject a spec whose fields need a newer
//!   version than it declares, and older runtimes reject versions they do
//!   not know, so we declare the lowest one that works.
//!
//! Failure modes: every violation is a [`SpecError`] naming where it was
//! found (`spec` or `device <name>`) and what was wrong.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The CDI versions a spec may declare, oldest first (CDI's `specs-go`
/// knows no others).
pub const KNOWN_VERSIONS: [&str; 10] = [
    "0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0",
];

/// The hook names CDI accepts (`prestart` is the legacy OCI name).
pub const HOOK_NAMES: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// A CDI spec file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The CDI version the spec is written for, e.g. `0.5.0`.
    pub cdi_version: String,
    /// `<vendor>/<class>`, e.g. `k8s.gpu.nvidia.com/claim`.
    pub kind: String,
    /// Spec-level annotations (CDI 0.6.0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The devices this spec defines; at least one.
    pub devices: Vec<Device>,
    /// Edits applied whenever any device of this spec is requested.
    #[serde(default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// One device of a spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// Device name, unique in the spec; qualified as `<kind>=<name>`.
    pub name: String,
    /// Device-level annotations (CDI 0.6.0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Edits applied when this device is requested. Always serialised: CDI
    /// requires the field.
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

/// Changes a runtime makes to a container's OCI spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    /// `NAME=value` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes to create and allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    /// Mounts to add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// OCI hooks to add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    /// Supplementary group IDs (CDI 0.7.0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
}

impl ContainerEdits {
    /// Whether there is nothing to edit.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.mounts.is_empty()
            && self.hooks.is_empty()
            && self.additional_gids.is_empty()
    }

    /// Appends `other`'s edits after ours (CDI applies them in order).
    pub fn append(&mut self, other: &ContainerEdits) {
        self.env.extend(other.env.iter().cloned());
        self.device_nodes.extend(other.device_nodes.iter().cloned());
        self.mounts.extend(other.mounts.iter().cloned());
        self.hooks.extend(other.hooks.iter().cloned());
        self.additional_gids
            .extend(other.additional_gids.iter().copied());
    }
}

/// A device node in a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host when it differs from `path` (CDI 0.5.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `c`, `b`, `u` or `p`; the runtime reads it from the host node when
    /// absent.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Major number; read from the host node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    /// Minor number; read from the host node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    /// File mode bits (Go `os.FileMode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    /// cgroup permissions, a combination of `r`, `w`, `m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    /// Owner in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A mount in a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// Source on the host.
    pub host_path: String,
    /// Target in the container.
    pub container_path: String,
    /// Mount options, e.g. `ro`, `rbind`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Filesystem type (CDI 0.4.0).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub mount_type: Option<String>,
}

/// An OCI hook.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// Lifecycle stage, one of [`HOOK_NAMES`].
    pub hook_name: String,
    /// Host path of the binary.
    pub path: String,
    /// Full argv, including argv\[0\].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The hook's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

/// Why a spec is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The kind is not `<vendor>/<class>` with valid names.
    #[error("invalid kind {kind:?}: {reason}")]
    Kind {
        /// The kind.
        kind: String,
        /// What is wrong.
        reason: String,
    },
    /// A device name breaks the CDI name rules.
    #[error("invalid device name {name:?}: {reason}")]
    DeviceName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A claim UID cannot be part of a device or file name.
    #[error("invalid claim UID {uid:?}: {reason}")]
    ClaimUid {
        /// The UID.
        uid: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The spec defines no device.
    #[error("spec defines no devices")]
    NoDevices,
    /// Two devices share a name.
    #[error("device {name:?} is defined twice")]
    DuplicateDevice {
        /// The name.
        name: String,
    },
    /// A device has no container edits (CDI rejects those).
    #[error("device {name:?} has no container edits")]
    EmptyDeviceEdits {
        /// The name.
        name: String,
    },
    /// A path a runtime would act on is unsafe or malformed.
    #[error("{at}: {field} {path:?} {reason}")]
    Path {
        /// `spec` or `device <name>`.
        at: String,
        /// Which field, e.g. `mount hostPath`.
        field: &'static str,
        /// The path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A path is not valid UTF-8 and cannot be written into a spec.
    #[error("path {path:?} is not valid UTF-8")]
    NonUtf8Path {
        /// The path, lossily decoded.
        path: String,
    },
    /// An env entry is not `NAME=value`.
    #[error("{at}: env entry {entry:?} is not NAME=value")]
    Env {
        /// `spec` or `device <name>`.
        at: String,
        /// The entry.
        entry: String,
    },
    /// A hook has an unknown lifecycle name.
    #[error("{at}: unknown hook name {name:?}")]
    HookName {
        /// `spec` or `device <name>`.
        at: String,
        /// The name.
        name: String,
    },
    /// A device node has an unknown type.
    #[error("{at}: device node {path:?} has invalid type {device_type:?}")]
    DeviceType {
        /// `spec` or `device <name>`.
        at: String,
        /// The node's path.
        path: String,
        /// The type.
        device_type: String,
    },
    /// A device node has invalid cgroup permissions.
    #[error("{at}: device node {path:?} has invalid permissions {permissions:?}")]
    Permissions {
        /// `spec` or `device <name>`.
        at: String,
        /// The node's path.
        path: String,
        /// The permissions.
        permissions: String,
    },
    /// A symlink for the create-symlinks hook would point outside its
    /// directory.
    #[error("symlink target {target:?} is not a plain file name")]
    LinkTarget {
        /// The target.
        target: String,
    },
    /// `cdiVersion` is not a released CDI version.
    #[error("unknown cdiVersion {version:?}")]
    UnknownVersion {
        /// The version.
        version: String,
    },
    /// `cdiVersion` is lower than the fields used require.
    #[error("cdiVersion {version} is too low: the fields used need {minimum}")]
    VersionTooLow {
        /// The declared version.
        version: String,
        /// The version the fields need.
        minimum: &'static str,
    },
}

/// Checks a CDI vendor name: starts with a letter, ends with a letter or
/// digit, only ASCII letters, digits, `_`, `-` and `.` in between.
pub fn validate_vendor(vendor: &str) -> Result<(), String> {
    validate_qualifier_part(vendor, "vendor")
}

/// Checks a CDI class name: the vendor rules, at most 63 characters.
pub fn validate_class(class: &str) -> Result<(), String> {
    validate_qualifier_part(class, "class")?;
    if class.len() > 63 {
        return Err(format!("class {class:?} is longer than 63 characters"));
    }
    Ok(())
}

fn validate_qualifier_part(name: &str, what: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err(format!("{what} is empty"));
    };
    if !first.is_ascii_alphabetic() {
        return Err(format!("{what} {name:?} must start with a letter"));
    }
    if !last.is_ascii_alphanumeric() {
        return Err(format!("{what} {name:?} must end with a letter or digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("{what} {name:?} contains invalid character {c:?}"));
    }
    Ok(())
}

/// Checks a `<vendor>/<class>` kind.
pub fn validate_kind(kind: &str) -> Result<(), SpecError> {
    let invalid = |reason: String| SpecError::Kind {
        kind: kind.to_owned(),
        reason,
    };
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| invalid("missing '/' between vendor and class".to_owned()))?;
    validate_vendor(vendor).map_err(invalid)?;
    validate_class(class).map_err(invalid)
}

/// Checks a CDI device name: starts and ends with an ASCII letter or digit
/// (a leading digit needs CDI 0.5.0), only letters, digits, `_`, `-`, `.`
/// and `:` in between.
pub fn validate_device_name(name: &str) -> Result<(), SpecError> {
    let invalid = |reason: String| SpecError::DeviceName {
        name: name.to_owned(),
        reason,
    };
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err(invalid("name is empty".to_owned()));
    };
    if !first.is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit".to_owned()));
    }
    if !last.is_ascii_alphanumeric() {
        return Err(invalid("must end with a letter or digit".to_owned()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(invalid(format!("contains invalid character {c:?}")));
    }
    Ok(())
}

/// The lowest `cdiVersion` that covers every field `spec` uses:
/// `additionalGids` need 0.7.0; annotations or a `.` in the class 0.6.0; a
/// device node `hostPath` or a device name starting with a digit 0.5.0; a
/// mount `type` 0.4.0; anything else 0.3.0 (the oldest version runtimes
/// still accept).
pub fn minimum_version(spec: &Spec) -> &'static str {
    let all_edits = || {
        std::iter::once(&spec.container_edits)
            .chain(spec.devices.iter().map(|d| &d.container_edits))
    };
    if all_edits().any(|e| !e.additional_gids.is_empty()) {
        return "0.7.0";
    }
    let class_has_dot = spec
        .kind
        .split_once('/')
        .is_some_and(|(_, class)| class.contains('.'));
    if !spec.annotations.is_empty()
        || spec.devices.iter().any(|d| !d.annotations.is_empty())
        || class_has_dot
    {
        return "0.6.0";
    }
    if spec
        .devices
        .iter()
        .any(|d| d.name.as_bytes().first().is_some_and(u8::is_ascii_digit))
        || all_edits().any(|e| e.device_nodes.iter().any(|n| n.host_path.is_some()))
    {
        return "0.5.0";
    }
    if all_edits().any(|e| e.mounts.iter().any(|m| m.mount_type.is_some())) {
        return "0.4.0";
    }
    "0.3.0"
}

/// Serialises a spec to YAML as runtimes read it: block style, every
/// string on one line (no folded `>-` scalars, whose line-break rules we
/// would rather not test every reader against), and strings that a YAML 1.1
/// reader would take for numbers or booleans quoted.
pub fn to_yaml(spec: &Spec) -> Result<String, serde_saphyr::SerializeError> {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.prefer_block_scalars = false;
    serde_saphyr::to_string_with_options(spec, options)
}

/// Orders `a.b.c` versions numerically; `None` if either is malformed.
fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let parse = |v: &str| -> Option<Vec<u32>> { v.split('.').map(|p| p.parse().ok()).collect() };
    Some(parse(a)?.cmp(&parse(b)?))
}

/// Checks the invariants listed in the module docs.
pub fn validate(spec: &Spec) -> Result<(), SpecError> {
    if !KNOWN_VERSIONS.contains(&spec.cdi_version.as_str()) {
        return Err(SpecError::UnknownVersion {
            version: spec.cdi_version.clone(),
        });
    }
    let minimum = minimum_version(spec);
    if compare_versions(&spec.cdi_version, minimum) == Some(std::cmp::Ordering::Less) {
        return Err(SpecError::VersionTooLow {
            version: spec.cdi_version.clone(),
            minimum,
        });
    }
    validate_kind(&spec.kind)?;
    if spec.devices.is_empty() {
        return Err(SpecError::NoDevices);
    }
    let mut names = HashSet::new();
    for device in &spec.devices {
        validate_device_name(&device.name)?;
        if !names.insert(device.name.as_str()) {
            return Err(SpecError::DuplicateDevice {
                name: device.name.clone(),
            });
        }
        if device.container_edits.is_empty() {
            return Err(SpecError::EmptyDeviceEdits {
                name: device.name.clone(),
            });
        }
        validate_edits(&device.container_edits, &format!("device {}", device.name))?;
    }
    validate_edits(&spec.container_edits, "spec")
}

/// Checks one set of edits; `at` names it in errors (`spec`,
/// `device <name>`).
pub fn validate_edits(edits: &ContainerEdits, at: &str) -> Result<(), SpecError> {
    let path = |field: &'static str, path: &str| {
        check_path(path).map_err(|reason| SpecError::Path {
            at: at.to_owned(),
            field,
            path: path.to_owned(),
            reason,
        })
    };
    for entry in &edits.env {
        if !is_env_entry(entry) {
            return Err(SpecError::Env {
                at: at.to_owned(),
                entry: entry.clone(),
            });
        }
    }
    for node in &edits.device_nodes {
        path("device node path", &node.path)?;
        if let Some(host_path) = &node.host_path {
            path("device node hostPath", host_path)?;
        }
        if let Some(t) = &node.device_type
            && !matches!(t.as_str(), "c" | "b" | "u" | "p")
        {
            return Err(SpecError::DeviceType {
                at: at.to_owned(),
                path: node.path.clone(),
                device_type: t.clone(),
            });
        }
        if let Some(p) = &node.permissions
            && (p.is_empty() || !p.chars().all(|c| matches!(c, 'r' | 'w' | 'm')))
        {
            return Err(SpecError::Permissions {
                at: at.to_owned(),
                path: node.path.clone(),
                permissions: p.clone(),
            });
        }
    }
    for mount in &edits.mounts {
        path("mount hostPath", &mount.host_path)?;
        path("mount containerPath", &mount.container_path)?;
    }
    for hook in &edits.hooks {
        if !HOOK_NAMES.contains(&hook.hook_name.as_str()) {
            return Err(SpecError::HookName {
                at: at.to_owned(),
                name: hook.hook_name.clone(),
            });
        }
        path("hook path", &hook.path)?;
        for entry in &hook.env {
            if !is_env_entry(entry) {
                return Err(SpecError::Env {
                    at: at.to_owned(),
                    entry: entry.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Whether `entry` is `NAME=value` with a non-empty name.
fn is_env_entry(entry: &str) -> bool {
    entry
        .split_once('=')
        .is_some_and(|(name, _)| !name.is_empty())
}

/// Checks that `path` is absolute and normalised; returns why not.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if path.contains(['\0', '\n', '\r']) {
        return Err("contains NUL or a line break");
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("is not absolute");
    };
    if rest.is_empty() {
        return Ok(());
    }
    for component in rest.split('/') {
        match component {
            "" => return Err("has an empty component"),
            "." | ".." => return Err("has a `.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn device(name: &str) -> Device {
        Device {
            name: name.to_owned(),
            container_edits: ContainerEdits {
                device_nodes: vec![DeviceNode {
                    path: "/dev/nvidia0".to_owned(),
                    ..DeviceNode::default()
                }],
                ..ContainerEdits::default()
            },
            ..Device::default()
        }
    }

    fn spec(devices: Vec<Device>) -> Spec {
        Spec {
            cdi_version: "0.3.0".to_owned(),
            kind: "k8s.gpu.nvidia.com/claim".to_owned(),
            devices,
            ..Spec::default()
        }
    }

    #[test]
    fn minimum_versions() {
        type Edit = fn(&mut Spec);
        let cases: [(&str, Edit, &str); 10] = [
            ("plain", |_| {}, "0.3.0"),
            (
                "mount type",
                |s| {
                    s.container_edits.mounts.push(Mount {
                        host_path: "/a".into(),
                        container_path: "/a".into(),
                        mount_type: Some("bind".into()),
                        ..Mount::default()
                    })
                },
                "0.4.0",
            ),
            (
                "mount without type",
                |s| {
                    s.devices[0].container_edits.mounts.push(Mount {
                        host_path: "/a".into(),
                        container_path: "/a".into(),
                        ..Mount::default()
                    })
                },
                "0.3.0",
            ),
            (
                "device name with a leading digit",
                |s| s.devices[0].name = "0b5c-gpu-0".into(),
                "0.5.0",
            ),
            (
                "device node hostPath in the spec edits",
                |s| {
                    s.container_edits.device_nodes.push(DeviceNode {
                        path: "/dev/nvidiactl".into(),
                        host_path: Some("/run/nvidia/driver/dev/nvidiactl".into()),
                        ..DeviceNode::default()
                    })
                },
                "0.5.0",
            ),
            (
                "device node hostPath in a device",
                |s| s.devices[0].container_edits.device_nodes[0].host_path = Some("/x".into()),
                "0.5.0",
            ),
            (
                "spec annotation",
                |s| {
                    s.annotations.insert("a".into(), "b".into());
                },
                "0.6.0",
            ),
            (
                "device annotation",
                |s| {
                    s.devices[0].annotations.insert("a".into(), "b".into());
                },
                "0.6.0",
            ),
            (
                "dot in class",
                |s| s.kind = "example.com/a.b".into(),
                "0.6.0",
            ),
            (
                "additional gids beat everything",
                |s| {
                    s.devices[0].name = "0a".into();
                    s.annotations.insert("a".into(), "b".into());
                    s.devices[0].container_edits.additional_gids.push(44);
                },
                "0.7.0",
            ),
        ];
        for (what, edit, want) in cases {
            let mut s = spec(vec![device("a-gpu-0")]);
            edit(&mut s);
            assert_eq!(minimum_version(&s), want, "{what}");
        }
    }

    #[test]
    fn device_names() {
        let cases = [
            ("gpu-0", None),
            ("0b5c1a2e-1111-4a4a-8b8b-000000000000-gpu-0", None),
            ("a", None),
            ("7", None),
            ("a_b.c:d-e", None),
            ("", Some("name is empty")),
            ("-gpu", Some("must start with a letter or digit")),
            ("gpu-", Some("must end with a letter or digit")),
            ("gpu/0", Some("contains invalid character '/'")),
            ("gpu 0", Some("contains invalid character ' '")),
            ("gpü0", Some("contains invalid character 'ü'")),
        ];
        for (name, want) in cases {
            let got = validate_device_name(name).err().map(|e| e.to_string());
            let want = want.map(|r| format!("invalid device name {name:?}: {r}"));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn kinds() {
        let long_class = format!("c{}", "x".repeat(63));
        let cases = [
            ("k8s.gpu.nvidia.com/claim", None),
            ("nvidia.com/gpu", None),
            ("a/b", None),
            (
                "nvidia.com",
                Some("missing '/' between vendor and class".to_owned()),
            ),
            ("/gpu", Some("vendor is empty".to_owned())),
            ("nvidia.com/", Some("class is empty".to_owned())),
            (
                "8s.nvidia.com/gpu",
                Some("vendor \"8s.nvidia.com\" must start with a letter".to_owned()),
            ),
            (
                "nvidia.com-/gpu",
                Some("vendor \"nvidia.com-\" must end with a letter or digit".to_owned()),
            ),
            (
                "nvidia.com/gpu/x",
                Some("class \"gpu/x\" contains invalid character '/'".to_owned()),
            ),
            (
                "nvidia.com/gpu=0",
                Some("class \"gpu=0\" contains invalid character '='".to_owned()),
            ),
            (
                &*format!("a/{long_class}"),
                Some(format!("class {long_class:?} is longer than 63 characters")),
            ),
        ];
        for (kind, want) in cases {
            let got = validate_kind(kind).err().map(|e| e.to_string());
            let want = want.map(|r| format!("invalid kind {kind:?}: {r}"));
            assert_eq!(got, want, "{kind}");
        }
    }

    #[test]
    fn paths() {
        let cases = [
            ("/", Ok(())),
            ("/dev/nvidia0", Ok(())),
            ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", Ok(())),
            ("dev/nvidia0", Err("is not absolute")),
            ("", Err("is not absolute")),
            (
                "/usr/lib/../../etc/shadow",
                Err("has a `.` or `..` component"),
            ),
            ("/usr/./lib", Err("has a `.` or `..` component")),
            ("/usr/lib/..", Err("has a `.` or `..` component")),
            ("/usr//lib", Err("has an empty component")),
            ("/usr/lib/", Err("has an empty component")),
            ("/usr/li\0b", Err("contains NUL or a line break")),
            ("/usr/lib\nx", Err("contains NUL or a line break")),
            ("/a..b/c", Ok(())),
        ];
        for (path, want) in cases {
            assert_eq!(check_path(path), want, "{path:?}");
        }
    }

    #[test]
    fn validation_errors() {
        type Edit = fn(&mut Spec);
        let cases: [(Edit, &str); 14] = [
            (
                |s| s.cdi_version = "0.9.0".into(),
                "unknown cdiVersion \"0.9.0\"",
            ),
            (
                |s| s.devices[0].name = "1-gpu-0".into(),
                "cdiVersion 0.3.0 is too low: the fields used need 0.5.0",
            ),
            (
                |s| s.kind = "gpu".into(),
                "invalid kind \"gpu\": missing '/' between vendor and class",
            ),
            (|s| s.devices.clear(), "spec defines no devices"),
            (
                |s| s.devices.push(s.devices[0].clone()),
                "device \"a-gpu-0\" is defined twice",
            ),
            (
                |s| s.devices[0].container_edits = ContainerEdits::default(),
                "device \"a-gpu-0\" has no container edits",
            ),
            (
                |s| {
                    s.container_edits.mounts.push(Mount {
                        host_path: "/run/nvidia/driver/../../etc".into(),
                        container_path: "/etc".into(),
                        ..Mount::default()
                    })
                },
                "spec: mount hostPath \"/run/nvidia/driver/../../etc\" has a `.` or `..` component",
            ),
            (
                |s| {
                    s.devices[0].container_edits.mounts.push(Mount {
                        host_path: "/a".into(),
                        container_path: "usr/lib".into(),
                        ..Mount::default()
                    })
                },
                "device a-gpu-0: mount containerPath \"usr/lib\" is not absolute",
            ),
            (
                |s| {
                    s.cdi_version = "0.5.0".into();
                    s.devices[0].container_edits.device_nodes[0].host_path = Some(String::new());
                },
                "device a-gpu-0: device node hostPath \"\" is not absolute",
            ),
            (
                |s| s.container_edits.env.push("NOVALUE".into()),
                "spec: env entry \"NOVALUE\" is not NAME=value",
            ),
            (
                |s| s.container_edits.env.push("=x".into()),
                "spec: env entry \"=x\" is not NAME=value",
            ),
            (
                |s| {
                    s.container_edits.hooks.push(Hook {
                        hook_name: "preStart".into(),
                        path: "/usr/bin/nvidia-cdi-hook".into(),
                        ..Hook::default()
                    })
                },
                "spec: unknown hook name \"preStart\"",
            ),
            (
                |s| s.devices[0].container_edits.device_nodes[0].device_type = Some("x".into()),
                "device a-gpu-0: device node \"/dev/nvidia0\" has invalid type \"x\"",
            ),
            (
                |s| s.devices[0].container_edits.device_nodes[0].permissions = Some("rwx".into()),
                "device a-gpu-0: device node \"/dev/nvidia0\" has invalid permissions \"rwx\"",
            ),
        ];
        assert_eq!(validate(&spec(vec![device("a-gpu-0")])), Ok(()));
        for (edit, want) in cases {
            let mut s = spec(vec![device("a-gpu-0")]);
            edit(&mut s);
            assert_eq!(
                validate(&s).err().map(|e| e.to_string()).as_deref(),
                Some(want)
            );
        }
    }

    #[test]
    fn json_tags_follow_cdi() {
        let s = Spec {
            cdi_version: "0.7.0".into(),
            kind: "k8s.gpu.nvidia.com/claim".into(),
            devices: vec![Device {
                name: "gpu-0".into(),
                container_edits: ContainerEdits {
                    device_nodes: vec![DeviceNode {
                        path: "/dev/nvidia-caps/nvidia-cap12".into(),
                        host_path: Some("/dev/nvidia-caps/nvidia-cap12".into()),
                        device_type: Some("c".into()),
                        major: Some(237),
                        minor: Some(12),
                        file_mode: Some(0o444),
                        permissions: Some("rw".into()),
                        uid: Some(0),
                        gid: Some(0),
                    }],
                    additional_gids: vec![44],
                    ..ContainerEdits::default()
                },
                ..Device::default()
            }],
            container_edits: ContainerEdits {
                env: vec!["A=b".into()],
                mounts: vec![Mount {
                    host_path: "/h".into(),
                    container_path: "/c".into(),
                    options: vec!["ro".into()],
                    mount_type: Some("bind".into()),
                }],
                hooks: vec![Hook {
                    hook_name: "createContainer".into(),
                    path: "/bin/hook".into(),
                    args: vec!["hook".into()],
                    env: vec!["X=1".into()],
                    timeout: Some(5),
                }],
                ..ContainerEdits::default()
            },
            ..Spec::default()
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cdiVersion": "0.7.0",
                "kind": "k8s.gpu.nvidia.com/claim",
                "devices": [{
                    "name": "gpu-0",
                    "containerEdits": {
                        "deviceNodes": [{
                            "path": "/dev/nvidia-caps/nvidia-cap12",
                            "hostPath": "/dev/nvidia-caps/nvidia-cap12",
                            "type": "c",
                            "major": 237,
                            "minor": 12,
                            "fileMode": 292,
                            "permissions": "rw",
                            "uid": 0,
                            "gid": 0
                        }],
                        "additionalGids": [44]
                    }
                }],
                "containerEdits": {
                    "env": ["A=b"],
                    "mounts": [{
                        "hostPath": "/h",
                        "containerPath": "/c",
                        "options": ["ro"],
                        "type": "bind"
                    }],
                    "hooks": [{
                        "hookName": "createContainer",
                        "path": "/bin/hook",
                        "args": ["hook"],
                        "env": ["X=1"],
                        "timeout": 5
                    }]
                }
            })
        );
        // Empty optional fields are omitted; a device's edits never are.
        let minimal = spec(vec![Device {
            name: "a".into(),
            ..Device::default()
        }]);
        assert_eq!(
            serde_json::to_value(&minimal).unwrap(),
            serde_json::json!({
                "cdiVersion": "0.3.0",
                "kind": "k8s.gpu.nvidia.com/claim",
                "devices": [{"name": "a", "containerEdits": {}}]
            })
        );
        let back: Spec = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let unknown = serde_json::json!({
            "cdiVersion": "1.1.0", "kind": "a/b", "devices": [],
            "containerEdits": {"netDevices": []}
        });
        assert!(serde_json::from_value::<Spec>(unknown).is_err());
    }
}

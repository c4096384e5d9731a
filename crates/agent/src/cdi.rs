//! CDI (Container Device Interface) output of the GPU driver: one spec file
//! per prepared claim, holding everything a CUDA container needs when the
//! runtime applies nothing but that spec.
//!
//! Flow, as the prepare path uses it:
//! 1. at startup, [`CommonEdits::discover`] finds the driver's libraries,
//!    tools and firmware under the driver root ([`driver_files`]) and renders
//!    the node-wide edits once; [`CdiStore::list_claim_specs`] and
//!    [`CdiStore::remove_temp_files`] let the agent clean up after a crash;
//! 2. on Prepare, [`ClaimDevice::gpu`] / [`ClaimDevice::mig`] describe the
//!    claim's devices, [`render_claim_spec`] builds the spec (pure), and
//!    [`CdiStore::write_claim_spec`] writes it atomically; the kubelet gets
//!    [`qualified_device_id`]s (`k8s.gpu.nvidia.com/claim=<uid>-gpu-0`);
//! 3. on Unprepare, [`CdiStore::remove_claim_spec`] deletes the file (a
//!    missing file is success).
//!
//! Names match upstream exactly (kind `k8s.gpu.nvidia.com/claim`, file
//! `k8s.gpu.nvidia.com-claim_<claimUID>.yaml`, device `<claimUID>-<device>`),
//! so claims prepared by the Go driver are cleaned up by us and vice versa.
//!
//! Security posture (lessons from the container toolkit's CVEs): specs are
//! the only injection path (no legacy hook mode, CVE-2024-0132); every path
//! in a spec is absolute and free of `..` and is validated before writing;
//! symlink targets are bare file names (CVE-2024-0134); driver-root symlinks
//! are resolved inside the driver root, never in the agent's filesystem;
//! no CUDA compat-library hook is ever emitted (CVE-2025-23359,
//! CVE-2025-23266) and hooks can be disabled entirely ([`Hooks::Disabled`]);
//! the writer never follows a symlink at the spec's path.
//!
//! Failure modes are the variants of [`Error`], each named for the failed
//! operation; spec-rule violations carry a [`SpecError`] as their source.

use std::path::PathBuf;

use nvdra_api::names::cdi as names;

pub mod driver_files;
pub mod render;
pub mod spec;
pub mod store;

pub use driver_files::{DriverFile, DriverFiles, LibraryLink, RootMapping};
pub use render::{ClaimDevice, CommonEdits, CommonOptions, Hooks, render_claim_spec};
pub use spec::{Spec, SpecError};
pub use store::CdiStore;

/// Vendor of the GPU driver's specs.
pub const VENDOR: &str = names::GPU_VENDOR;

/// Class of per-claim specs.
pub const CLASS: &str = names::CLAIM_CLASS;

/// Kind of per-claim specs, `<vendor>/<class>`.
pub const KIND: &str = "k8s.gpu.nvidia.com/claim";

/// Longest claim UID accepted; Kubernetes UIDs are 36-character UUIDs, and
/// the limit keeps file names far below the 255-byte limit.
pub const MAX_CLAIM_UID_LEN: usize = 128;

/// The CDI names of one driver's specs: vendor `k8s.<driver>`, per-claim specs of class
/// `claim` and (compute-domain driver) one base spec of class `device` written at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vendor(&'static str);

impl Vendor {
    /// `k8s.gpu.nvidia.com`.
    pub const GPU: Self = Self(names::GPU_VENDOR);
    /// `k8s.compute-domain.nvidia.com`.
    pub const COMPUTE_DOMAIN: Self = Self(names::COMPUTE_DOMAIN_VENDOR);

    /// The vendor string.
    pub fn name(self) -> &'static str {
        self.0
    }

    /// Kind of per-claim specs, `<vendor>/claim`.
    pub fn claim_kind(self) -> String {
        format!("{}/{}", self.0, names::CLAIM_CLASS)
    }

    /// The fully qualified CDI device ID of `device` in claim `claim_uid`:
    /// `<vendor>/claim=<uid>-<device>`.
    pub fn qualified_device_id(self, claim_uid: &str, device: &str) -> String {
        format!(
            "{}={}",
            self.claim_kind(),
            claim_device_name(claim_uid, device)
        )
    }

    /// Prefix of claim spec file names, `<vendor>-claim_`.
    pub fn claim_file_prefix(self) -> String {
        format!("{}-{}_", self.0, names::CLAIM_CLASS)
    }

    /// File name of a claim's spec: `<vendor>-claim_<uid>.yaml` (CDI's transient-spec naming).
    pub fn claim_spec_file_name(self, claim_uid: &str) -> String {
        format!(
            "{}{claim_uid}{}",
            self.claim_file_prefix(),
            store::FILE_SUFFIX
        )
    }

    /// Kind of the base spec, `<vendor>/device`.
    pub fn base_kind(self) -> String {
        format!("{}/{}", self.0, names::DEVICE_CLASS)
    }

    /// File name of the base spec, `<vendor>-device_base.yaml`.
    pub fn base_spec_file_name(self) -> String {
        format!(
            "{}-{}_base{}",
            self.0,
            names::DEVICE_CLASS,
            store::FILE_SUFFIX
        )
    }

    /// The base device's qualified ID, `<vendor>/device=all`.
    pub fn base_device_id(self) -> String {
        format!("{}={}", self.base_kind(), names::BASE_DEVICE)
    }
}

/// The CDI device name of `device` in claim `claim_uid`: `<uid>-<device>`.
pub fn claim_device_name(claim_uid: &str, device: &str) -> String {
    format!("{claim_uid}-{device}")
}

/// The fully qualified CDI device ID the kubelet passes to the runtime:
/// `k8s.gpu.nvidia.com/claim=<uid>-<device>`.
pub fn qualified_device_id(claim_uid: &str, device: &str) -> String {
    Vendor::GPU.qualified_device_id(claim_uid, device)
}

/// File name of a GPU claim's spec in the CDI root:
/// `k8s.gpu.nvidia.com-claim_<uid>.yaml` (CDI's transient-spec naming).
pub fn claim_spec_file_name(claim_uid: &str) -> String {
    Vendor::GPU.claim_spec_file_name(claim_uid)
}

/// Checks that a claim UID can be part of a CDI device name and a file
/// name: starts with an ASCII letter or digit, then letters, digits, `-`,
/// `_` or `.`, at most [`MAX_CLAIM_UID_LEN`] bytes. This is what keeps a
/// hostile UID from naming a path outside the CDI root.
pub fn validate_claim_uid(uid: &str) -> Result<(), SpecError> {
    let invalid = |reason| SpecError::ClaimUid {
        uid: uid.to_owned(),
        reason,
    };
    let Some(first) = uid.as_bytes().first() else {
        return Err(invalid("is empty"));
    };
    if uid.len() > MAX_CLAIM_UID_LEN {
        return Err(invalid("is longer than 128 bytes"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit"));
    }
    if !uid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "may contain only ASCII letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// Everything that can go wrong producing, writing or removing CDI specs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver version cannot be part of a file name.
    #[error("invalid driver version {version:?}: expected dotted decimal numbers")]
    InvalidDriverVersion {
        /// The version.
        version: String,
    },
    /// A required driver library is missing.
    #[error(
        "cannot find {file} under driver root {} (searched {searched})",
        root.display()
    )]
    DiscoverDriverFiles {
        /// The driver root, in the agent's view.
        root: PathBuf,
        /// The missing file, e.g. `libcuda.so.570.172.08`.
        file: String,
        /// The directories searched, comma-separated.
        searched: String,
    },
    /// Reading the driver root failed for a reason other than absence.
    #[error("cannot read driver root path {}", path.display())]
    ScanDriverRoot {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device layer could not report the driver version.
    #[error("cannot query the driver version")]
    QueryDriver {
        /// The cause.
        #[source]
        source: nvdra_gpu::Error,
    },
    /// A MIG device's capability nodes could not be determined.
    #[error("cannot determine the device nodes of MIG device {device}")]
    MigDeviceNodes {
        /// The DRA device name.
        device: String,
        /// The cause.
        #[source]
        source: nvdra_gpu::Error,
    },
    /// The node-wide edits break a spec rule.
    #[error("cannot render the common CDI edits")]
    RenderCommonEdits {
        /// The rule.
        #[source]
        source: SpecError,
    },
    /// A claim's spec breaks a spec rule.
    #[error("cannot render the CDI spec of claim {claim_uid}")]
    RenderSpec {
        /// The claim.
        claim_uid: String,
        /// The rule.
        #[source]
        source: SpecError,
    },
    /// A spec handed to the store breaks a spec rule; nothing was written.
    #[error("refusing to write the CDI spec of claim {claim_uid}")]
    ValidateSpec {
        /// The claim.
        claim_uid: String,
        /// The rule.
        #[source]
        source: SpecError,
    },
    /// YAML serialisation failed.
    #[error("cannot serialise the CDI spec of claim {claim_uid}")]
    SerializeSpec {
        /// The claim.
        claim_uid: String,
        /// The cause.
        #[source]
        source: serde_saphyr::SerializeError,
    },
    /// Writing a spec file failed; no partial file is left behind.
    #[error("cannot write CDI spec {}", path.display())]
    WriteSpec {
        /// The file or directory the failed step touched.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Removing a spec file failed.
    #[error("cannot remove CDI spec {}", path.display())]
    RemoveSpec {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Listing the CDI root failed.
    #[error("cannot list CDI specs in {}", path.display())]
    ListSpecs {
        /// The CDI root.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A claim UID cannot name a spec file.
    #[error("cannot name the CDI spec file of a claim")]
    ClaimSpecPath {
        /// The rule.
        #[source]
        source: SpecError,
    },
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    #[test]
    fn names_follow_upstream() {
        assert_eq!(KIND, format!("{VENDOR}/{CLASS}"));
        assert_eq!(VENDOR, format!("k8s.{}", nvdra_api::names::drivers::GPU));
        let uid = "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e";
        assert_eq!(
            qualified_device_id(uid, "gpu-0"),
            "k8s.gpu.nvidia.com/claim=0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-gpu-0"
        );
        assert_eq!(
            claim_spec_file_name(uid),
            "k8s.gpu.nvidia.com-claim_0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e.yaml"
        );
        assert_eq!(
            claim_device_name(uid, "gpu-4-mig-3g20gb-9-0"),
            "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-gpu-4-mig-3g20gb-9-0"
        );
    }

    #[test]
    fn compute_domain_names_follow_upstream() {
        let cd = Vendor::COMPUTE_DOMAIN;
        let uid = "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e";
        assert_eq!(
            cd.qualified_device_id(uid, "channel-0"),
            "k8s.compute-domain.nvidia.com/claim=0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-channel-0"
        );
        assert_eq!(
            cd.claim_spec_file_name(uid),
            "k8s.compute-domain.nvidia.com-claim_0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e.yaml"
        );
        assert_eq!(
            cd.base_spec_file_name(),
            "k8s.compute-domain.nvidia.com-device_base.yaml"
        );
        assert_eq!(
            cd.base_device_id(),
            "k8s.compute-domain.nvidia.com/device=all"
        );
        assert_eq!(Vendor::GPU.claim_kind(), KIND);
        assert_eq!(Vendor::GPU.claim_file_prefix(), store::FILE_PREFIX);
    }

    #[test]
    fn claim_uids() {
        let long = "a".repeat(129);
        let cases = [
            ("0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e", None),
            ("claim_1.x", None),
            ("", Some("is empty")),
            (long.as_str(), Some("is longer than 128 bytes")),
            ("-x", Some("must start with a letter or digit")),
            (".hidden", Some("must start with a letter or digit")),
            (
                "a/../../etc/passwd",
                Some("may contain only ASCII letters, digits, '-', '_' and '.'"),
            ),
            (
                "a:b",
                Some("may contain only ASCII letters, digits, '-', '_' and '.'"),
            ),
        ];
        for (uid, want) in cases {
            let got = validate_claim_uid(uid).err().map(|e| e.to_string());
            let want = want.map(|r| format!("invalid claim UID {uid:?}: {r}"));
            assert_eq!(got, want, "{uid}");
        }
    }
}

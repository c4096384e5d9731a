//! [`CdiStore`]: the claim spec files in the CDI root (`/var/run/cdi` in the
//! chart), written so that a container runtime watching the directory never
//! sees a partial or foreign file.
//!
//! Writing: the spec is validated, serialised to YAML, written to a hidden
//! temporary file in the same directory (`.<name>.<pid>.<n>.<ns>.tmp`, which
//! runtimes ignore: wrong extension), fsynced, given mode 0644, renamed over
//! the final name and the directory fsynced. The rename is atomic, so
//! readers see the old file or the new one, and after a crash either one of
//! them or a leftover temporary file ([`CdiStore::remove_temp_files`]).
//!
//! Invariants: file names come only from validated claim UIDs, so they never
//! contain `/` or start with `.`; the temporary file is created with
//! `O_CREAT|O_EXCL`, which fails on an existing file or symlink instead of
//! following it, and `rename` replaces a symlink at the final name instead of
//! writing through it, so nothing planted in the directory redirects our
//! writes (the CDI root itself is trusted configuration and may be a link,
//! as `/var/run` usually is). Removal unlinks without following either.
//!
//! Failure modes: [`Error::ValidateSpec`], [`Error::SerializeSpec`],
//! [`Error::WriteSpec`] (temporary file removed), [`Error::RemoveSpec`],
//! [`Error::ListSpecs`], [`Error::ClaimSpecPath`] for an unusable UID.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::spec::{self, Spec, SpecError};
use super::{Error, Vendor, claim_device_name, validate_claim_uid};

/// Prefix of every GPU claim spec file name (`<vendor>-<class>_`).
pub const FILE_PREFIX: &str = "k8s.gpu.nvidia.com-claim_";

/// Extension of claim spec files.
pub const FILE_SUFFIX: &str = ".yaml";

/// How errors about the base spec name it.
const BASE_SPEC_LABEL: &str = "base";

/// Suffix of temporary files.
const TEMP_SUFFIX: &str = ".tmp";

/// Mode of spec files: runtimes run as root, but tools reading the specs
/// need not.
pub const FILE_MODE: u32 = 0o644;

/// Mode of the CDI root when we have to create it.
pub const DIR_MODE: u32 = 0o755;

/// Distinguishes temporary files of concurrent writes in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The spec files of one driver (one [`Vendor`]) in one CDI root; several stores may share a
/// root, each seeing only its vendor's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdiStore {
    root: PathBuf,
    vendor: Vendor,
}

impl CdiStore {
    /// A store of the GPU driver's specs writing into `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::for_vendor(root, Vendor::GPU)
    }

    /// A store of `vendor`'s specs writing into `root`.
    pub fn for_vendor(root: impl Into<PathBuf>, vendor: Vendor) -> Self {
        Self {
            root: root.into(),
            vendor,
        }
    }

    /// The vendor whose specs this store holds.
    pub fn vendor(&self) -> Vendor {
        self.vendor
    }

    /// The CDI root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the spec of `claim_uid` lives.
    pub fn claim_spec_path(&self, claim_uid: &str) -> Result<PathBuf, Error> {
        validate_claim_uid(claim_uid).map_err(|source| Error::ClaimSpecPath { source })?;
        Ok(self.root.join(self.vendor.claim_spec_file_name(claim_uid)))
    }

    /// Atomically writes (or replaces) the spec of `claim_uid` and returns
    /// its path. The spec must be valid, of our kind, and define only
    /// devices of this claim.
    pub fn write_claim_spec(&self, claim_uid: &str, spec: &Spec) -> Result<PathBuf, Error> {
        let refuse = |source| Error::ValidateSpec {
            claim_uid: claim_uid.to_owned(),
            source,
        };
        validate_claim_uid(claim_uid).map_err(refuse)?;
        spec::validate(spec).map_err(refuse)?;
        check_belongs_to_claim(&self.vendor.claim_kind(), claim_uid, spec).map_err(refuse)?;
        let yaml = spec::to_yaml(spec).map_err(|source| Error::SerializeSpec {
            claim_uid: claim_uid.to_owned(),
            source,
        })?;
        let path = self.write_file(&self.vendor.claim_spec_file_name(claim_uid), &yaml)?;
        tracing::debug!(claim_uid, path = %path.display(), devices = spec.devices.len(), "wrote CDI spec");
        Ok(path)
    }

    /// Atomically writes (or replaces) the vendor's base spec
    /// (`<vendor>-device_base.yaml`, kind `<vendor>/device`) and returns its path. Errors
    /// name the spec `base` where claim specs name their claim UID.
    pub fn write_base_spec(&self, spec: &Spec) -> Result<PathBuf, Error> {
        let refuse = |source| Error::ValidateSpec {
            claim_uid: BASE_SPEC_LABEL.to_owned(),
            source,
        };
        spec::validate(spec).map_err(refuse)?;
        let kind = self.vendor.base_kind();
        if spec.kind != kind {
            return Err(refuse(SpecError::Kind {
                kind: spec.kind.clone(),
                reason: format!("a base spec must be of kind {kind}"),
            }));
        }
        let yaml = spec::to_yaml(spec).map_err(|source| Error::SerializeSpec {
            claim_uid: BASE_SPEC_LABEL.to_owned(),
            source,
        })?;
        let path = self.write_file(&self.vendor.base_spec_file_name(), &yaml)?;
        tracing::debug!(path = %path.display(), devices = spec.devices.len(), "wrote base CDI spec");
        Ok(path)
    }

    /// Where the base spec lives.
    pub fn base_spec_path(&self) -> PathBuf {
        self.root.join(self.vendor.base_spec_file_name())
    }

    /// Writes `yaml` as `file_name` in the root: temp file, fsync, rename, directory fsync.
    fn write_file(&self, file_name: &str, yaml: &str) -> Result<PathBuf, Error> {
        let path = self.root.join(file_name);
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.root)
            .map_err(|source| Error::WriteSpec {
                path: self.root.clone(),
                source,
            })?;
        // pid + counter is unique within this boot's live processes; the
        // clock part keeps a restarted agent that got the same pid from
        // colliding with a crashed predecessor's leftover.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let temp = self.root.join(format!(
            ".{file_name}.{}.{}.{nanos}{TEMP_SUFFIX}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_new_file(&temp, yaml.as_bytes())
            .map_err(|source| (temp.clone(), source))
            .and_then(|()| std::fs::rename(&temp, &path).map_err(|source| (path.clone(), source)));
        if let Err((failed, source)) = written {
            if let Err(e) = std::fs::remove_file(&temp)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(temp = %temp.display(), error = %e, "cannot remove temporary CDI spec");
            }
            return Err(Error::WriteSpec {
                path: failed,
                source,
            });
        }
        // Make the rename itself durable: a spec the kubelet was told about
        // must survive a power loss.
        File::open(&self.root)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| Error::WriteSpec {
                path: self.root.clone(),
                source,
            })?;
        Ok(path)
    }

    /// Removes the spec of `claim_uid`. Returns whether a file was removed;
    /// a missing file is success (Unprepare is idempotent).
    pub fn remove_claim_spec(&self, claim_uid: &str) -> Result<bool, Error> {
        let path = self.claim_spec_path(claim_uid)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(claim_uid, path = %path.display(), "removed CDI spec");
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::RemoveSpec { path, source }),
        }
    }

    /// The claim UIDs that have a spec file, sorted; a missing CDI root has
    /// none. Directories and names that are not ours are ignored; a symlink
    /// with our name is listed (we never create one, so removing it is
    /// right).
    pub fn list_claim_specs(&self) -> Result<Vec<String>, Error> {
        let prefix = self.vendor.claim_file_prefix();
        let mut uids: Vec<String> = self
            .entries()?
            .into_iter()
            .filter_map(|(name, is_dir)| {
                let uid = name.strip_prefix(&prefix)?.strip_suffix(FILE_SUFFIX)?;
                (!is_dir && validate_claim_uid(uid).is_ok()).then(|| uid.to_owned())
            })
            .collect();
        uids.sort();
        Ok(uids)
    }

    /// Removes temporary files a crashed write left behind; returns how
    /// many. Call at startup, before any write of this process.
    pub fn remove_temp_files(&self) -> Result<usize, Error> {
        // Claim specs and the base spec both start with `<vendor>-`.
        let temp_prefix = format!(".{}-", self.vendor.name());
        let mut removed = 0;
        for (name, is_dir) in self.entries()? {
            if is_dir || !name.starts_with(&temp_prefix) || !name.ends_with(TEMP_SUFFIX) {
                continue;
            }
            let path = self.root.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::RemoveSpec { path, source }),
            }
        }
        if removed > 0 {
            tracing::info!(removed, root = %self.root.display(), "removed leftover temporary CDI specs");
        }
        Ok(removed)
    }

    /// `(file name, is a directory)` of every UTF-8-named entry of the root,
    /// without following symlinks.
    fn entries(&self) -> Result<Vec<(String, bool)>, Error> {
        let list_error = |source| Error::ListSpecs {
            path: self.root.clone(),
            source,
        };
        let dir = match std::fs::read_dir(&self.root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list_error(e)),
        };
        let mut entries = Vec::new();
        for entry in dir {
            let entry = entry.map_err(list_error)?;
            let is_dir = entry.file_type().map_err(list_error)?.is_dir();
            if let Ok(name) = entry.file_name().into_string() {
                entries.push((name, is_dir));
            }
        }
        Ok(entries)
    }
}

/// The spec must be a claim spec and name only this claim's devices, so the
/// file name never lies about its content.
fn check_belongs_to_claim(kind: &str, claim_uid: &str, spec: &Spec) -> Result<(), SpecError> {
    if spec.kind != kind {
        return Err(SpecError::Kind {
            kind: spec.kind.clone(),
            reason: format!("this store holds only {kind} specs"),
        });
    }
    let prefix = claim_device_name(claim_uid, "");
    if let Some(device) = spec.devices.iter().find(|d| !d.name.starts_with(&prefix)) {
        return Err(SpecError::DeviceName {
            name: device.name.clone(),
            reason: format!("does not belong to claim {claim_uid}"),
        });
    }
    Ok(())
}

/// Creates `path` (never following or reusing an existing entry), writes
/// `bytes` and syncs them to disk.
fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create_new_file(path, bytes)?.sync_all()
}

/// Creates `path` with mode 0644, never following or reusing an existing entry, and writes
/// `bytes`; whether to sync is the caller's choice.
pub(crate) fn create_new_file(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    // The process umask may have narrowed the mode; set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    file.write_all(bytes)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use pretty_assertions::assert_eq;

    use super::super::spec::{ContainerEdits, Device, DeviceNode};
    use super::super::{KIND, claim_spec_file_name};
    use super::*;

    const UID: &str = "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e";

    fn spec(uid: &str) -> Spec {
        Spec {
            cdi_version: "0.5.0".into(),
            kind: KIND.into(),
            devices: vec![Device {
                name: format!("{uid}-gpu-0"),
                container_edits: ContainerEdits {
                    device_nodes: vec![DeviceNode {
                        path: "/dev/nvidia0".into(),
                        ..DeviceNode::default()
                    }],
                    ..ContainerEdits::default()
                },
                ..Device::default()
            }],
            ..Spec::default()
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_replaces_a_planted_symlink_instead_of_following_it() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let root = tmp.path().join("cdi");
        std::fs::create_dir(&root).unwrap();
        symlink(&victim, root.join(claim_spec_file_name(UID))).unwrap();

        let store = CdiStore::new(&root);
        let path = store.write_claim_spec(UID, &spec(UID)).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, FILE_MODE);
    }

    #[test]
    fn refuses_specs_that_are_not_this_claims() {
        let store = CdiStore::new("/nonexistent/never-created");
        let mut other_kind = spec(UID);
        other_kind.kind = "k8s.compute-domain.nvidia.com/claim".into();
        let cases = [
            (
                "../x".to_owned(),
                spec(UID),
                "invalid claim UID \"../x\": must start with a letter or digit",
            ),
            (
                "other".to_owned(),
                spec(UID),
                "invalid device name \"0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-gpu-0\": does not belong to claim other",
            ),
            (
                UID.to_owned(),
                other_kind,
                "invalid kind \"k8s.compute-domain.nvidia.com/claim\": this store holds only k8s.gpu.nvidia.com/claim specs",
            ),
            (
                UID.to_owned(),
                Spec {
                    cdi_version: "0.3.0".into(),
                    ..spec(UID)
                },
                "cdiVersion 0.3.0 is too low: the fields used need 0.5.0",
            ),
        ];
        for (uid, spec, want) in cases {
            let err = store.write_claim_spec(&uid, &spec).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("refusing to write the CDI spec of claim {uid}")
            );
            assert_eq!(std::error::Error::source(&err).unwrap().to_string(), want);
        }
        assert!(!Path::new("/nonexistent/never-created").exists());
    }

    #[test]
    fn failed_write_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CdiStore::new(tmp.path());
        // A directory at the final name makes the rename fail.
        let blocker = tmp.path().join(claim_spec_file_name(UID));
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("keep"), "x").unwrap();
        let err = store.write_claim_spec(UID, &spec(UID)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot write CDI spec {}", blocker.display())
        );
        assert_eq!(names(tmp.path()), [claim_spec_file_name(UID)]);
    }

    #[test]
    fn temp_files_are_ours_only() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = format!(".{}{UID}.yaml.42.0.tmp", FILE_PREFIX);
        for name in [
            ours.as_str(),
            ".other.tmp",
            "k8s.gpu.nvidia.com-claim_x.yaml",
        ] {
            std::fs::write(tmp.path().join(name), "").unwrap();
        }
        let store = CdiStore::new(tmp.path());
        assert_eq!(store.remove_temp_files().unwrap(), 1);
        assert_eq!(
            names(tmp.path()),
            [".other.tmp", "k8s.gpu.nvidia.com-claim_x.yaml"]
        );
        assert_eq!(store.list_claim_specs().unwrap(), ["x"]);
    }
}

//! Socket names, binding, and removal of the plugin's two Unix sockets.
//!
//! Names follow the kubelet's conventions: the DRA socket is `dra.sock` in
//! the plugin data directory and the registration socket `<driver>-reg.sock`
//! in the registrar directory; with rolling updates both carry the pod UID
//! (`dra-<uid>.sock`, `<driver>-<uid>-reg.sock`) so two instances of one
//! driver can run side by side. A registration path that would not fit into
//! `sockaddr_un` falls back to `<driver>-<hash8>-reg.sock`, then to
//! `dra-<hash16>-reg.sock` (URL-safe unpadded base64 of SHA-256, so no `/`).
//!
//! Invariants:
//! - No name starts with `.` (the kubelet's watcher ignores such files).
//! - A stale file at the path is removed before binding; the socket is
//!   chmod 0600 right after binding.
//! - [`SocketFile`] remembers the device and inode it bound and removes the
//!   path on shutdown (or drop) only if it still is that same file, so an
//!   instance never deletes a socket another instance bound at the same path.
//!
//! Failure modes: every filesystem step has its own [`Error`] variant naming
//! the path; removal failures at shutdown are logged, not returned, because
//! nothing can be done about them then.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;

use crate::error::Error;

/// `sizeof(sun_path)` on Linux. Rust's standard library needs room for the
/// terminating NUL, so usable paths are strictly shorter than this.
pub const UNIX_PATH_MAX: usize = 108;

/// File name of the DRA socket in the plugin data directory.
pub fn dra_socket_name(rolling_update_uid: Option<&str>) -> String {
    match rolling_update_uid {
        None => "dra.sock".to_owned(),
        Some(uid) => format!("dra-{uid}.sock"),
    }
}

/// Path of the registration socket in `registrar_dir`, shortened when the
/// natural rolling-update name would not fit into `sockaddr_un`.
///
/// Without rolling update the name is always `<driver>-reg.sock`; a path
/// that is too long is left for binding to reject with a clear error.
pub fn registration_socket_path(
    registrar_dir: &Path,
    driver_name: &str,
    rolling_update_uid: Option<&str>,
) -> PathBuf {
    let Some(uid) = rolling_update_uid else {
        return registrar_dir.join(format!("{driver_name}-reg.sock"));
    };
    let candidates = [
        format!("{driver_name}-{uid}-reg.sock"),
        format!("{driver_name}-{}-reg.sock", short_hash(uid.as_bytes(), 8)),
    ];
    for name in candidates {
        let path = registrar_dir.join(name);
        if fits(&path) {
            return path;
        }
    }
    let mut seed = Vec::with_capacity(driver_name.len() + 1 + uid.len());
    seed.extend_from_slice(driver_name.as_bytes());
    seed.push(0);
    seed.extend_from_slice(uid.as_bytes());
    registrar_dir.join(format!("dra-{}-reg.sock", short_hash(&seed, 16)))
}

fn fits(path: &Path) -> bool {
    path.as_os_str().len() < UNIX_PATH_MAX
}

fn short_hash(data: &[u8], len: usize) -> String {
    let mut encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(data));
    encoded.truncate(len);
    encoded
}

/// A socket file this process bound, identified by device and inode.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    state: Ownership,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    /// Bound, but chmod or stat failed before the identity was read; nobody
    /// can have replaced the file in that instant.
    Unidentified,
    /// Bound as this (device, inode).
    Identified(u64, u64),
    /// Already removed (or deliberately left to another instance).
    Released,
}

impl SocketFile {
    /// Removes a stale file at `path`, binds a listener there and restricts
    /// the socket to mode 0600.
    pub fn bind(path: &Path) -> Result<(Self, UnixListener), Error> {
        let len = path.as_os_str().len();
        if len >= UNIX_PATH_MAX {
            return Err(Error::SocketPathTooLong {
                path: path.to_owned(),
                len,
                limit: UNIX_PATH_MAX,
            });
        }
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed stale socket"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::RemoveStaleSocket {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::BindSocket {
            path: path.to_owned(),
            source,
        })?;
        // From here on the guard owns the file, so every early return below
        // still unlinks it.
        let mut file = Self {
            path: path.to_owned(),
            state: Ownership::Unidentified,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::ChmodSocket {
                path: path.to_owned(),
                source,
            },
        )?;
        let metadata = std::fs::symlink_metadata(path).map_err(|source| Error::StatSocket {
            path: path.to_owned(),
            source,
        })?;
        file.state = Ownership::Identified(metadata.dev(), metadata.ino());
        Ok((file, listener))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the socket if the path still refers to the file this process
    /// bound. Idempotent; failures are logged.
    pub fn remove(&mut self) {
        let state = std::mem::replace(&mut self.state, Ownership::Released);
        let identity = match state {
            Ownership::Released => return,
            Ownership::Unidentified => {
                remove_logged(&self.path);
                return;
            }
            Ownership::Identified(dev, ino) => (dev, ino),
        };
        match std::fs::symlink_metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == identity => {
                remove_logged(&self.path);
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "socket was replaced by another instance; leaving it in place"
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %self.path.display(), "socket already removed");
            }
            Err(err) => tracing::warn!(
                path = %self.path.display(),
                error = %err,
                "cannot inspect socket; leaving it in place"
            ),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

fn remove_logged(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed socket"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "failed to remove socket");
        }
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    const UID: &str = "0f0e3c7a-6a1d-4c55-9a63-0d3c8f1c2b4e";

    #[test]
    fn dra_socket_names() {
        assert_eq!(dra_socket_name(None), "dra.sock");
        assert_eq!(dra_socket_name(Some(UID)), format!("dra-{UID}.sock"));
    }

    #[test]
    fn registration_socket_names() {
        // "/gpu.nvidia.com-<uid>-reg.sock" is 61 bytes, with the 8-character
        // hash 33, and "/dra-<16>-reg.sock" 30: a 60-byte directory takes the
        // second form, a 76-byte one only fits the third.
        let long_dir = format!("/{}", "d".repeat(59));
        let longer_dir = format!("/{}", "d".repeat(75));
        let cases: Vec<(&str, &str, Option<&str>, String)> = vec![
            (
                "plain",
                "/var/lib/kubelet/plugins_registry",
                None,
                "/var/lib/kubelet/plugins_registry/gpu.nvidia.com-reg.sock".into(),
            ),
            (
                "rolling update, fits",
                "/var/lib/kubelet/plugins_registry",
                Some(UID),
                format!("/var/lib/kubelet/plugins_registry/gpu.nvidia.com-{UID}-reg.sock"),
            ),
            (
                "rolling update, uid hashed",
                long_dir.as_str(),
                Some(UID),
                format!(
                    "{long_dir}/gpu.nvidia.com-{}-reg.sock",
                    short_hash(UID.as_bytes(), 8)
                ),
            ),
            (
                "rolling update, driver and uid hashed",
                longer_dir.as_str(),
                Some(UID),
                format!(
                    "{longer_dir}/dra-{}-reg.sock",
                    short_hash(format!("gpu.nvidia.com\0{UID}").as_bytes(), 16)
                ),
            ),
        ];
        for (name, dir, uid, want) in cases {
            let got = registration_socket_path(Path::new(dir), "gpu.nvidia.com", uid);
            assert_eq!(got, PathBuf::from(want), "case {name}");
            let file_name = got.file_name().unwrap().to_str().unwrap();
            assert!(!file_name.starts_with('.'), "case {name}: {file_name}");
            if uid.is_some() {
                assert!(fits(&got), "case {name}: {} bytes", got.as_os_str().len());
            }
        }
    }

    #[test]
    fn short_hash_is_url_safe_and_stable() {
        // Pinned so that a socket name never changes between releases.
        assert_eq!(short_hash(b"abc", 16), "ungWv48Bz-pBQUDe");
        assert_eq!(short_hash(UID.as_bytes(), 8).len(), 8);
    }

    #[tokio::test]
    async fn bind_replaces_stale_file_and_sets_mode() {
        let dir = tempfile::Builder::new()
            .prefix("sk")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("x.sock");
        std::fs::write(&path, b"stale").unwrap();
        let (mut file, _listener) = SocketFile::bind(&path).unwrap();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(
            &metadata.file_type()
        ));
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        file.remove();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn remove_leaves_a_replaced_socket_alone() {
        let dir = tempfile::Builder::new()
            .prefix("sk")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("x.sock");
        let (mut first, _l1) = SocketFile::bind(&path).unwrap();
        let (mut second, _l2) = SocketFile::bind(&path).unwrap();
        first.remove();
        assert!(
            path.exists(),
            "the first instance removed the second's socket"
        );
        second.remove();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn drop_removes_socket() {
        let dir = tempfile::Builder::new()
            .prefix("sk")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("x.sock");
        drop(SocketFile::bind(&path).unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn too_long_path_is_rejected() {
        let path = PathBuf::from(format!("/tmp/{}", "s".repeat(110)));
        let err = SocketFile::bind(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "socket path {} is 115 bytes long; Unix socket paths must be shorter than 108 bytes",
                path.display()
            )
        );
    }
}

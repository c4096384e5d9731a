//! Finding the NVIDIA driver's files under a driver root.
//!
//! The driver may be installed on the host (`/`) or by the GPU operator's
//! driver container (`/run/nvidia/driver`). Like upstream, NVML is loaded by
//! absolute path from the first of
//! `<root>/{,usr/lib64,usr/lib/x86_64-linux-gnu,usr/lib/aarch64-linux-gnu,lib64,lib/x86_64-linux-gnu,lib/aarch64-linux-gnu}/libnvidia-ml.so.1`,
//! `nvidia-smi` is looked up under `<root>/{,opt/bin,usr/bin,usr/sbin,bin,sbin}`,
//! and device nodes live under the driver root when it has a `dev`
//! directory, else under `/`.
//!
//! Invariants: a candidate counts only if it resolves (through symlinks) to a
//! regular file, so a directory or dangling link never shadows a later
//! match; returned paths are the resolved ones. Discovery is a pure function
//! of the file tree (tested on temp dirs).
//! Failure modes: no NVML library is [`Error::DiscoverDriverRoot`]; a missing
//! `nvidia-smi` is not an error here (only time-slicing needs it) and shows
//! as `nvidia_smi: None`.

use std::path::{Path, PathBuf};

use crate::Error;

/// Directories (relative to the root) searched for `libnvidia-ml.so.1`.
pub const LIBRARY_DIRS: [&str; 7] = [
    "",
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
];

/// Directories (relative to the root) searched for `nvidia-smi`.
pub const BINARY_DIRS: [&str; 6] = ["", "opt/bin", "usr/bin", "usr/sbin", "bin", "sbin"];

/// The NVML library's file name.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// The `nvidia-smi` binary's file name.
pub const NVIDIA_SMI: &str = "nvidia-smi";

/// A driver root and the files found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverRoot {
    /// The root searched, e.g. `/` or `/run/nvidia/driver`.
    pub root: PathBuf,
    /// Resolved path of `libnvidia-ml.so.1`.
    pub nvml_library: PathBuf,
    /// Resolved path of `nvidia-smi`, if present.
    pub nvidia_smi: Option<PathBuf>,
    /// Root under which `/dev` holds the device nodes.
    pub dev_root: PathBuf,
}

impl DriverRoot {
    /// Searches `root` for the driver's files.
    pub fn discover(root: impl AsRef<Path>) -> Result<Self, Error> {
        let root = root.as_ref();
        let nvml_library = find_file(root, NVML_LIBRARY, &LIBRARY_DIRS).ok_or_else(|| {
            Error::DiscoverDriverRoot {
                root: root.to_owned(),
                file: NVML_LIBRARY,
                searched: searched(root, &LIBRARY_DIRS),
            }
        })?;
        let nvidia_smi = find_file(root, NVIDIA_SMI, &BINARY_DIRS);
        if nvidia_smi.is_none() {
            tracing::warn!(
                root = %root.display(),
                searched = %searched(root, &BINARY_DIRS),
                "nvidia-smi not found under the driver root"
            );
        }
        let dev_root = if root.join("dev").is_dir() {
            root.to_owned()
        } else {
            PathBuf::from("/")
        };
        Ok(Self {
            root: root.to_owned(),
            nvml_library,
            nvidia_smi,
            dev_root,
        })
    }
}

/// The first `<root>/<dir>/<name>` that resolves to a regular file.
fn find_file(root: &Path, name: &str, dirs: &[&str]) -> Option<PathBuf> {
    dirs.iter().find_map(|dir| {
        let candidate = root.join(dir).join(name);
        let resolved = std::fs::canonicalize(&candidate).ok()?;
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => Some(resolved),
            _ => {
                tracing::debug!(candidate = %candidate.display(), "skipping: not a regular file");
                None
            }
        }
    })
}

fn searched(root: &Path, dirs: &[&str]) -> String {
    dirs.iter()
        .map(|dir| root.join(dir).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    fn canonical(path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap()
    }

    #[test]
    fn finds_library_binary_and_dev_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // The real file sits behind the usual soname symlink.
        touch(&root.join("usr/lib/x86_64-linux-gnu/libnvidia-ml.so.570.172.08"));
        std::os::unix::fs::symlink(
            "libnvidia-ml.so.570.172.08",
            root.join("usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"),
        )
        .unwrap();
        touch(&root.join("usr/bin/nvidia-smi"));
        std::fs::create_dir_all(root.join("dev")).unwrap();

        let found = DriverRoot::discover(root).unwrap();
        assert_eq!(
            found,
            DriverRoot {
                root: root.to_owned(),
                nvml_library: canonical(
                    &root.join("usr/lib/x86_64-linux-gnu/libnvidia-ml.so.570.172.08")
                ),
                nvidia_smi: Some(canonical(&root.join("usr/bin/nvidia-smi"))),
                dev_root: root.to_owned(),
            }
        );
    }

    #[test]
    fn search_order_and_shadowing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // A directory and a dangling link earlier in the order must not win.
        std::fs::create_dir_all(root.join("libnvidia-ml.so.1")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib64")).unwrap();
        std::os::unix::fs::symlink("missing.so", root.join("usr/lib64/libnvidia-ml.so.1")).unwrap();
        touch(&root.join("lib64/libnvidia-ml.so.1"));
        touch(&root.join("lib/aarch64-linux-gnu/libnvidia-ml.so.1"));
        touch(&root.join("sbin/nvidia-smi"));
        touch(&root.join("opt/bin/nvidia-smi"));

        let found = DriverRoot::discover(root).unwrap();
        assert_eq!(
            found.nvml_library,
            canonical(&root.join("lib64/libnvidia-ml.so.1"))
        );
        assert_eq!(
            found.nvidia_smi,
            Some(canonical(&root.join("opt/bin/nvidia-smi")))
        );
        // No `dev` directory: device nodes come from the host.
        assert_eq!(found.dev_root, PathBuf::from("/"));
    }

    #[test]
    fn library_at_root_and_no_nvidia_smi() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("libnvidia-ml.so.1"));
        let found = DriverRoot::discover(tmp.path()).unwrap();
        assert_eq!(
            found.nvml_library,
            canonical(&tmp.path().join("libnvidia-ml.so.1"))
        );
        assert_eq!(found.nvidia_smi, None);
    }

    #[test]
    fn missing_library_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        touch(&root.join("usr/bin/nvidia-smi"));
        let err = DriverRoot::discover(root).unwrap_err();
        let r = root.display();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot find libnvidia-ml.so.1 under driver root {r} (searched {r}/, {r}/usr/lib64, \
                 {r}/usr/lib/x86_64-linux-gnu, {r}/usr/lib/aarch64-linux-gnu, {r}/lib64, \
                 {r}/lib/x86_64-linux-gnu, {r}/lib/aarch64-linux-gnu)"
            )
        );
    }
}

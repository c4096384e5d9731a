//! Finding the NVIDIA driver's files under a driver root.
//!
//! The driver may be installed on the host (`/`) or by the GPU operator's
//! driver container (`/run/nvidia/driver`). Like upstream, NVML is loaded by
//! absolute path from the first of
//! `<root>/{,usr/lib64,usr/lib/x86_64-linux-gnu,usr/lib/aarch64-linux-gnu,lib64,lib/x86_64-linux-gnu,lib/aarch64-linux-gnu}/libnvidia-ml.so.1`,
//! and failing those from the root's dynamic-linker cache
//! (`<root>/etc/ld.so.cache`, the entry for this machine's architecture):
//! a host whose driver lives in `/usr/local/nvidia/lib64` or `/lib` (seen on
//! a real H100 host, docs/hardware-runs.md) is found the way its programs
//! find it. `nvidia-smi` is looked up under
//! `<root>/{,opt/bin,usr/bin,usr/sbin,bin,sbin}`, and device nodes live under
//! the driver root when it has `dev/nvidiactl`, else under `/` (a driver
//! root with an empty `dev` directory, also seen there, must not hide the
//! host's nodes).
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
        let nvml_library = find_file(root, NVML_LIBRARY, &LIBRARY_DIRS)
            .or_else(|| find_in_ld_cache(root, NVML_LIBRARY))
            .ok_or_else(|| Error::DiscoverDriverRoot {
                root: root.to_owned(),
                file: NVML_LIBRARY,
                searched: format!(
                    "{}, {}",
                    searched(root, &LIBRARY_DIRS),
                    root.join(LD_CACHE).display()
                ),
            })?;
        let nvidia_smi = find_file(root, NVIDIA_SMI, &BINARY_DIRS);
        if nvidia_smi.is_none() {
            tracing::warn!(
                root = %root.display(),
                searched = %searched(root, &BINARY_DIRS),
                "nvidia-smi not found under the driver root"
            );
        }
        let dev_root = if root.join("dev/nvidiactl").exists() {
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

impl DriverRoot {
    /// A driver binary (e.g. `nvidia-cuda-mps-control`) where the driver
    /// keeps its binaries; `None` when it has none by that name.
    pub fn find_binary(&self, name: &str) -> Option<PathBuf> {
        find_file(&self.root, name, &BINARY_DIRS)
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

/// The dynamic linker's cache, relative to the root.
pub const LD_CACHE: &str = "etc/ld.so.cache";

const LD_CACHE_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
/// Magic, version, nlibs, len_strings, flags, padding, extension offset, unused.
const LD_CACHE_HEADER: usize = 48;
/// flags, key, value, osversion, hwcap.
const LD_CACHE_ENTRY: usize = 24;
/// `FLAG_ELF_LIBC6` with this machine's `FLAG_*_LIB64` architecture bits.
const LD_CACHE_FLAGS: i32 = if cfg!(target_arch = "aarch64") {
    0x0a03
} else {
    0x0303
};

/// `name` as `<root>/etc/ld.so.cache` (glibc's format, 1.1) maps it for this
/// architecture, resolved under `root`; `None` when the cache is missing,
/// unreadable, in another format, or names no regular file.
fn find_in_ld_cache(root: &Path, name: &str) -> Option<PathBuf> {
    let cache = std::fs::read(root.join(LD_CACHE)).ok()?;
    ld_cache_entries(&cache, LD_CACHE_FLAGS)
        .into_iter()
        .filter(|(key, _)| key == name)
        .find_map(|(_, path)| {
            let candidate = root.join(path.trim_start_matches('/'));
            let resolved = std::fs::canonicalize(candidate).ok()?;
            std::fs::metadata(&resolved)
                .ok()?
                .is_file()
                .then_some(resolved)
        })
}

/// The `(soname, path)` entries of an ld.so.cache whose flags are `flags`.
/// Tolerates a legacy `ld.so-1.7.0` section before the new one; anything
/// malformed ends the list rather than failing (the cache is a hint).
fn ld_cache_entries(cache: &[u8], flags: i32) -> Vec<(String, String)> {
    let Some(base) = cache
        .windows(LD_CACHE_MAGIC.len())
        .position(|w| w == LD_CACHE_MAGIC)
    else {
        return Vec::new();
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(cache.get(at..at + 4)?.try_into().ok()?))
    };
    let string_at = |offset: u32| -> Option<String> {
        let start = base.checked_add(usize::try_from(offset).ok()?)?;
        let rest = cache.get(start..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        String::from_utf8(rest[..end].to_vec()).ok()
    };
    let Some(count) = u32_at(base + LD_CACHE_MAGIC.len()) else {
        return Vec::new();
    };
    (0..count as usize)
        .map_while(|i| {
            let at = base + LD_CACHE_HEADER + i * LD_CACHE_ENTRY;
            let entry_flags = i32::from_le_bytes(u32_at(at)?.to_le_bytes());
            Some((entry_flags, u32_at(at + 4)?, u32_at(at + 8)?))
        })
        .filter(|(entry_flags, _, _)| *entry_flags == flags)
        .filter_map(|(_, key, value)| Some((string_at(key)?, string_at(value)?)))
        .collect()
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
        touch(&root.join("dev/nvidiactl"));

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
        // Nor does an empty one hide them.
        std::fs::create_dir_all(root.join("dev")).unwrap();
        assert_eq!(
            DriverRoot::discover(root).unwrap().dev_root,
            PathBuf::from("/")
        );
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
                 {r}/lib/x86_64-linux-gnu, {r}/lib/aarch64-linux-gnu, {r}/etc/ld.so.cache)"
            )
        );
    }

    /// A glibc 1.1 cache with `(flags, key, value)` entries, optionally
    /// after a legacy section.
    fn ld_cache(entries: &[(i32, &str, &str)], legacy: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if legacy {
            out.extend_from_slice(b"ld.so-1.7.0");
            out.extend_from_slice(&0u32.to_le_bytes());
            out.push(0);
        }
        let base = out.len();
        let strings_at = LD_CACHE_HEADER + entries.len() * LD_CACHE_ENTRY;
        let mut strings = Vec::new();
        let mut table = Vec::new();
        for (flags, key, value) in entries {
            let mut offset = |s: &str| {
                let at = u32::try_from(strings_at + strings.len()).unwrap();
                strings.extend_from_slice(s.as_bytes());
                strings.push(0);
                at
            };
            let (k, v) = (offset(key), offset(value));
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&k.to_le_bytes());
            table.extend_from_slice(&v.to_le_bytes());
            table.extend_from_slice(&[0; 12]);
        }
        out.extend_from_slice(LD_CACHE_MAGIC);
        out.extend_from_slice(&u32::try_from(entries.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&u32::try_from(strings.len()).unwrap().to_le_bytes());
        out.resize(base + LD_CACHE_HEADER, 0);
        out.extend_from_slice(&table);
        out.extend_from_slice(&strings);
        out
    }

    /// The layout seen on a real H100 host: NVML only under
    /// /usr/local/nvidia/lib64 and /lib, found through the linker cache.
    #[test]
    fn library_found_through_ld_cache() {
        for legacy in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            touch(&root.join("usr/local/nvidia/lib64/libnvidia-ml.so.580.159.04"));
            std::os::unix::fs::symlink(
                "libnvidia-ml.so.580.159.04",
                root.join("usr/local/nvidia/lib64/libnvidia-ml.so.1"),
            )
            .unwrap();
            let other_arch = if LD_CACHE_FLAGS == 0x0303 {
                0x0a03
            } else {
                0x0303
            };
            let cache = ld_cache(
                &[
                    (LD_CACHE_FLAGS, "libz.so.1", "/lib/libz.so.1"),
                    (
                        other_arch,
                        NVML_LIBRARY,
                        "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
                    ),
                    // Listed but missing: skipped for the next entry.
                    (LD_CACHE_FLAGS, NVML_LIBRARY, "/lib/libnvidia-ml.so.1"),
                    (
                        LD_CACHE_FLAGS,
                        NVML_LIBRARY,
                        "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
                    ),
                ],
                legacy,
            );
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join(LD_CACHE), &cache).unwrap();

            let found = DriverRoot::discover(root).unwrap();
            assert_eq!(
                found.nvml_library,
                canonical(&root.join("usr/local/nvidia/lib64/libnvidia-ml.so.580.159.04")),
                "legacy section: {legacy}"
            );
            assert_eq!(
                ld_cache_entries(&cache, LD_CACHE_FLAGS).len(),
                3,
                "legacy section: {legacy}"
            );
        }
    }

    #[test]
    fn the_search_list_wins_over_the_cache_and_bad_caches_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        touch(&root.join("lib64/libnvidia-ml.so.1"));
        touch(&root.join("opt/nvml/libnvidia-ml.so.1"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let cache = ld_cache(
            &[(LD_CACHE_FLAGS, NVML_LIBRARY, "/opt/nvml/libnvidia-ml.so.1")],
            false,
        );
        std::fs::write(root.join(LD_CACHE), &cache).unwrap();
        assert_eq!(
            DriverRoot::discover(root).unwrap().nvml_library,
            canonical(&root.join("lib64/libnvidia-ml.so.1"))
        );
        // Truncated, garbage or empty caches yield nothing, never a panic.
        for bad in [&cache[..cache.len() / 2], b"garbage".as_slice(), &[]] {
            let entries = ld_cache_entries(bad, LD_CACHE_FLAGS);
            assert!(entries.len() <= 1, "{entries:?}");
        }
        assert!(ld_cache_entries(&cache[..60], LD_CACHE_FLAGS).is_empty());
    }

    /// The machine's own cache parses, when it has one in glibc's format.
    #[test]
    fn reads_this_machines_ld_cache() {
        let Ok(cache) = std::fs::read("/etc/ld.so.cache") else {
            return;
        };
        if !cache
            .windows(LD_CACHE_MAGIC.len())
            .any(|w| w == LD_CACHE_MAGIC)
        {
            return;
        }
        let entries = ld_cache_entries(&cache, LD_CACHE_FLAGS);
        assert!(
            entries
                .iter()
                .any(|(key, path)| key == "libc.so.6" && path.ends_with("/libc.so.6")),
            "{entries:?}"
        );
    }
}

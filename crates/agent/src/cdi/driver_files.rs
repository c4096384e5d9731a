//! Discovery of the NVIDIA driver's user-space files that a CUDA container
//! needs: the compute and utility libraries, the driver's tools, and the GSP
//! firmware.
//!
//! The agent sees the driver root at one path (its *agent view*, e.g.
//! `/driver-root`) while the container runtime, which applies the spec on
//! the host, sees it at another (e.g. `/` or `/run/nvidia/driver`). A
//! [`RootMapping`] holds both; discovery reads the agent view and every
//! returned host path is translated to the host view. Container paths are
//! the files' paths relative to the driver root, as upstream mounts them.
//!
//! What is looked up (the `compute,utility` set upstream's container
//! toolkit mounts):
//! - each of [`LIBRARIES`] as `<name>.<driverVersion>` in the first of the
//!   driver-root library directories ([`nvdra_gpu::driver_root::LIBRARY_DIRS`])
//!   holding it; `libcuda.so` and `libnvidia-ml.so` are required, the rest
//!   optional; plus the legacy `libnvidia-nvvm70.so.*` next to libcuda;
//! - the soname links the driver installed next to each library
//!   (`libcuda.so.1 -> libcuda.so.570.172.08`), so the container gets the
//!   same names, plus the `libcuda.so -> libcuda.so.1` link many programs
//!   `dlopen`;
//! - each of [`BINARIES`] in the first binary directory holding it
//!   ([`nvdra_gpu::driver_root::BINARY_DIRS`]);
//! - `gsp*.bin` in `{,usr/}lib/firmware/nvidia/<driverVersion>/`.
//!
//! Invariants: symlinks under the root are resolved *inside* the root, as if
//! it were `/` (an absolute link in a driver container's tree points into
//! that tree, not into the agent's filesystem), so no returned path escapes
//! the root; only regular files are returned; the driver version must be
//! dotted digits, so it can never smuggle a path into a file name. Results
//! are in a fixed order (list order, firmware by name), so a spec rendered
//! from them is deterministic.
//!
//! Failure modes: a missing required library is
//! [`Error::DiscoverDriverFiles`] naming the file, the root and the
//! directories searched; a malformed version is
//! [`Error::InvalidDriverVersion`]; an I/O error other than "not found"
//! (e.g. permission denied) is [`Error::ScanDriverRoot`]. Missing optional
//! files are skipped with a debug log.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use nvdra_gpu::driver_root::{BINARY_DIRS, LIBRARY_DIRS};

use super::Error;

/// Libraries mounted into every GPU container (without the version suffix).
pub const LIBRARIES: [&str; 14] = [
    // utility
    "libnvidia-ml.so",
    "libnvidia-cfg.so",
    "libnvidia-nscq.so",
    // compute
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-opencl.so",
    "libnvidia-gpucomp.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-fatbinaryloader.so",
    "libnvidia-allocator.so",
    "libnvidia-compiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-pkcs11.so",
    "libnvidia-pkcs11-openssl3.so",
];

/// Libraries without which no CUDA container works.
pub const REQUIRED_LIBRARIES: [&str; 2] = ["libcuda.so", "libnvidia-ml.so"];

/// Prefix of the legacy NVVM library kept for older CUDA toolkits.
pub const LEGACY_NVVM_PREFIX: &str = "libnvidia-nvvm70.so.";

/// The driver's tools mounted into every GPU container.
pub const BINARIES: [&str; 5] = [
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
];

/// Directories (relative to the root) holding `<driverVersion>/gsp*.bin`.
pub const FIRMWARE_DIRS: [&str; 2] = ["lib/firmware/nvidia", "usr/lib/firmware/nvidia"];

/// Symlink hops followed before giving up (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

/// The driver root as the agent sees it and as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootMapping {
    /// The driver root in the agent's filesystem, e.g. `/driver-root`.
    pub agent: PathBuf,
    /// The same directory on the host, e.g. `/run/nvidia/driver`.
    pub host: PathBuf,
}

impl RootMapping {
    /// A mapping from the agent's view `agent` to the host's view `host`.
    pub fn new(agent: impl Into<PathBuf>, host: impl Into<PathBuf>) -> Self {
        Self {
            agent: agent.into(),
            host: host.into(),
        }
    }

    /// The host path of a path in the agent's view: paths under the agent
    /// root move to the host root, anything else is already a host path
    /// (e.g. `/dev/nvidia0` when device nodes come from the host's `/dev`).
    pub fn to_host(&self, agent_path: &Path) -> PathBuf {
        match agent_path.strip_prefix(&self.agent) {
            Ok(rest) if rest.as_os_str().is_empty() => self.host.clone(),
            Ok(rest) => self.host.join(rest),
            Err(_) => agent_path.to_owned(),
        }
    }

    fn file(&self, relative: &Path) -> DriverFile {
        DriverFile {
            host_path: self.host.join(relative),
            container_path: Path::new("/").join(relative),
        }
    }
}

/// One file to bind-mount read-only into containers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DriverFile {
    /// Where the runtime finds it on the host.
    pub host_path: PathBuf,
    /// Where it appears in the container.
    pub container_path: PathBuf,
}

/// A symlink to create in the container, next to a mounted library.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LibraryLink {
    /// The link's target, a file name in the link's directory
    /// (`libcuda.so.570.172.08`, or `libcuda.so.1` for `libcuda.so`).
    pub target: String,
    /// The link's path in the container.
    pub link: PathBuf,
    /// Host path of the library the link finally resolves to, for runtimes
    /// that get the name as a bind mount instead of a link.
    pub host_path: PathBuf,
}

/// Everything discovered under one driver root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFiles {
    /// The roots the paths were translated between.
    pub mapping: RootMapping,
    /// The driver version the libraries carry, e.g. `570.172.08`.
    pub driver_version: String,
    /// Libraries, in [`LIBRARIES`] order, then legacy NVVM.
    pub libraries: Vec<DriverFile>,
    /// Symlinks that give the libraries their usual names.
    pub links: Vec<LibraryLink>,
    /// Tools, in [`BINARIES`] order.
    pub binaries: Vec<DriverFile>,
    /// GSP firmware files, by path.
    pub firmware: Vec<DriverFile>,
}

impl DriverFiles {
    /// Searches the driver root (in the agent's view) for the files of
    /// driver `driver_version`.
    pub fn discover(mapping: RootMapping, driver_version: &str) -> Result<Self, Error> {
        if !is_driver_version(driver_version) {
            return Err(Error::InvalidDriverVersion {
                version: driver_version.to_owned(),
            });
        }
        let root = mapping.agent.clone();
        let mut seen = HashSet::new();

        let mut libraries = Vec::new();
        let mut library_rels = Vec::new();
        for name in LIBRARIES {
            let file = format!("{name}.{driver_version}");
            match find_in_dirs(&root, &file, &LIBRARY_DIRS)? {
                Some(rel) => {
                    if seen.insert(rel.clone()) {
                        libraries.push(mapping.file(&rel));
                        library_rels.push((name, rel));
                    }
                }
                None if REQUIRED_LIBRARIES.contains(&name) => {
                    return Err(Error::DiscoverDriverFiles {
                        root,
                        file,
                        searched: searched(&mapping.agent, &LIBRARY_DIRS),
                    });
                }
                None => {
                    tracing::debug!(%file, root = %root.display(), "optional driver library not found")
                }
            }
        }

        // Legacy NVVM sits next to libcuda; its name carries no driver version.
        let cuda_dir = library_rels
            .iter()
            .find(|(name, _)| *name == "libcuda.so")
            .and_then(|(_, rel)| rel.parent().map(Path::to_owned))
            .unwrap_or_default();
        for rel in regular_files_in(&root, &cuda_dir, |n| n.starts_with(LEGACY_NVVM_PREFIX))? {
            if seen.insert(rel.clone()) {
                libraries.push(mapping.file(&rel));
            }
        }

        let mut links = Vec::new();
        for (name, rel) in &library_rels {
            links.extend(library_links(&root, &mapping, name, rel)?);
        }

        let mut binaries = Vec::new();
        for name in BINARIES {
            match find_in_dirs(&root, name, &BINARY_DIRS)? {
                Some(rel) if seen.insert(rel.clone()) => binaries.push(mapping.file(&rel)),
                Some(_) => {}
                None => {
                    tracing::debug!(file = name, root = %root.display(), "optional driver binary not found")
                }
            }
        }

        let mut firmware_rels = Vec::new();
        for dir in FIRMWARE_DIRS {
            let dir = Path::new(dir).join(driver_version);
            let Some(dir) = resolve_in_root(&root, &dir)? else {
                continue;
            };
            for rel in
                regular_files_in(&root, &dir, |n| n.starts_with("gsp") && n.ends_with(".bin"))?
            {
                if seen.insert(rel.clone()) {
                    firmware_rels.push(rel);
                }
            }
        }
        firmware_rels.sort();
        if firmware_rels.is_empty() {
            tracing::debug!(root = %root.display(), "no GSP firmware found");
        }
        let firmware = firmware_rels.iter().map(|rel| mapping.file(rel)).collect();

        Ok(Self {
            mapping,
            driver_version: driver_version.to_owned(),
            libraries,
            links,
            binaries,
            firmware,
        })
    }

    /// The container directories holding libraries, in first-seen order:
    /// what the dynamic linker cache must cover.
    pub fn library_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for lib in &self.libraries {
            if let Some(dir) = lib.container_path.parent()
                && !dirs.iter().any(|d| d == dir)
            {
                dirs.push(dir.to_owned());
            }
        }
        dirs
    }
}

/// Whether `version` is dotted decimal numbers, e.g. `570.172.08`.
fn is_driver_version(version: &str) -> bool {
    !version.is_empty()
        && version
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// The first `<dir>/<name>` under `root` that resolves (inside the root) to
/// a regular file, as a symlink-free path relative to the root.
fn find_in_dirs(root: &Path, name: &str, dirs: &[&str]) -> Result<Option<PathBuf>, Error> {
    for dir in dirs {
        let candidate = Path::new(dir).join(name);
        if let Some(rel) = resolve_in_root(root, &candidate)? {
            if is_regular_file(root, &rel)? {
                return Ok(Some(rel));
            }
            tracing::debug!(candidate = %root.join(&candidate).display(), "skipping: not a regular file");
        }
    }
    Ok(None)
}

/// Regular files directly in `dir` (relative, symlink-free) whose names pass
/// `wanted`, resolved inside the root and sorted by name.
fn regular_files_in(
    root: &Path,
    dir: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>, Error> {
    let mut names: Vec<String> = read_dir_names(&root.join(dir))?
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .filter(|n| wanted(n))
        .collect();
    names.sort();
    let mut files = Vec::new();
    for name in names {
        if let Some(rel) = resolve_in_root(root, &dir.join(&name))?
            && is_regular_file(root, &rel)?
            && !files.contains(&rel)
        {
            files.push(rel);
        }
    }
    Ok(files)
}

/// The soname links next to library `rel` (named `name` without version):
/// every `<name>.<digits>` symlink in its directory that resolves to it,
/// plus `libcuda.so -> libcuda.so.1`.
fn library_links(
    root: &Path,
    mapping: &RootMapping,
    name: &str,
    rel: &Path,
) -> Result<Vec<LibraryLink>, Error> {
    let dir = rel.parent().unwrap_or(Path::new(""));
    let Some(file_name) = rel.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let host_path = mapping.host.join(rel);
    let prefix = format!("{name}.");
    let mut sonames: Vec<String> = read_dir_names(&root.join(dir))?
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|abi| !abi.is_empty() && abi.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    sonames.sort();
    let mut links = Vec::new();
    for soname in sonames {
        let candidate = dir.join(&soname);
        let is_link = std::fs::symlink_metadata(root.join(&candidate))
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if is_link && resolve_in_root(root, &candidate)?.as_deref() == Some(rel) {
            links.push(LibraryLink {
                target: file_name.to_owned(),
                link: Path::new("/").join(&candidate),
                host_path: host_path.clone(),
            });
        }
    }
    if name == "libcuda.so" {
        // Programs dlopen("libcuda.so") although only the soname is an ABI
        // promise; upstream adds this link for them, and so do we.
        links.push(LibraryLink {
            target: "libcuda.so.1".to_owned(),
            link: Path::new("/").join(dir).join("libcuda.so"),
            host_path,
        });
    }
    Ok(links)
}

/// Names in a directory; a missing directory has none.
fn read_dir_names(dir: &Path) -> Result<Vec<OsString>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if is_absent(&e) => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::ScanDriverRoot {
                path: dir.to_owned(),
                source,
            });
        }
    };
    entries
        .map(|entry| {
            entry
                .map(|e| e.file_name())
                .map_err(|source| Error::ScanDriverRoot {
                    path: dir.to_owned(),
                    source,
                })
        })
        .collect()
}

fn is_regular_file(root: &Path, rel: &Path) -> Result<bool, Error> {
    let path = root.join(rel);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) => Ok(meta.file_type().is_file()),
        Err(e) if is_absent(&e) => Ok(false),
        Err(source) => Err(Error::ScanDriverRoot { path, source }),
    }
}

fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Resolves `rel` under `root` with `root` acting as `/`: every symlink on
/// the way is followed by hand, absolute targets restart at `root`, and `..`
/// never climbs above it. Returns the symlink-free path relative to `root`,
/// or `None` when a component does not exist.
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<Option<PathBuf>, Error> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<OsString> = components_reversed(rel);
    let mut hops = 0;
    while let Some(component) = pending.pop() {
        match component.to_str() {
            Some("" | ".") => continue,
            Some("..") => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&component);
        let path = root.join(&candidate);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(source) => return Err(Error::ScanDriverRoot { path, source }),
        };
        if !meta.file_type().is_symlink() {
            resolved = candidate;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINKS {
            return Err(Error::ScanDriverRoot {
                path,
                source: io::Error::other("too many levels of symbolic links"),
            });
        }
        let target = std::fs::read_link(&path).map_err(|source| Error::ScanDriverRoot {
            path: path.clone(),
            source,
        })?;
        if target.is_absolute() {
            resolved = PathBuf::new();
        }
        pending.extend(components_reversed(&target));
    }
    Ok(Some(resolved))
}

/// The components of `path` as strings, last first (a stack to pop);
/// root and prefix components are dropped (the walk is already rooted).
fn components_reversed(path: &Path) -> Vec<OsString> {
    let mut parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    parts.reverse();
    parts
}

fn searched(root: &Path, dirs: &[&str]) -> String {
    dirs.iter()
        .map(|dir| root.join(dir).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use pretty_assertions::assert_eq;

    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn driver_versions() {
        for ok in ["570.172.08", "535.54", "1"] {
            assert!(is_driver_version(ok), "{ok}");
        }
        for bad in [
            "",
            "570.",
            ".570",
            "570..1",
            "570.172.08/..",
            "*.*",
            "570.1a",
            "../x",
        ] {
            assert!(!is_driver_version(bad), "{bad}");
        }
    }

    #[test]
    fn mapping_translates_only_paths_under_the_agent_root() {
        let m = RootMapping::new("/driver-root", "/run/nvidia/driver");
        let cases = [
            (
                "/driver-root/usr/bin/nvidia-smi",
                "/run/nvidia/driver/usr/bin/nvidia-smi",
            ),
            ("/driver-root", "/run/nvidia/driver"),
            ("/driver-rootx/a", "/driver-rootx/a"),
            ("/dev/nvidia0", "/dev/nvidia0"),
        ];
        for (agent, host) in cases {
            assert_eq!(m.to_host(Path::new(agent)), PathBuf::from(host), "{agent}");
        }
        let host_root = RootMapping::new("/driver-root", "/");
        assert_eq!(
            host_root.to_host(Path::new("/driver-root/dev/nvidia0")),
            PathBuf::from("/dev/nvidia0")
        );
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        touch(&root.join("usr/lib/x86_64-linux-gnu/libcuda.so.570.172.08"));
        // A usrmerge-style relative directory link.
        symlink("usr/lib", root.join("lib")).unwrap();
        // An absolute link: inside a driver container's tree it means the
        // tree's own /usr, never the agent's.
        symlink(
            "/usr/lib/x86_64-linux-gnu/libcuda.so.570.172.08",
            root.join("usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        )
        .unwrap();
        // `..` above the root stays at the root.
        symlink("../../../../etc/passwd", root.join("usr/escape")).unwrap();
        touch(&root.join("etc/passwd"));
        symlink("loop-b", root.join("loop-a")).unwrap();
        symlink("loop-a", root.join("loop-b")).unwrap();
        symlink("missing", root.join("dangling")).unwrap();

        let cases = [
            (
                "lib/x86_64-linux-gnu/libcuda.so.1",
                Some("usr/lib/x86_64-linux-gnu/libcuda.so.570.172.08"),
            ),
            ("usr/escape", Some("etc/passwd")),
            ("dangling", None),
            ("nothing/here", None),
            ("etc/passwd/x", None),
        ];
        for (rel, want) in cases {
            assert_eq!(
                resolve_in_root(root, Path::new(rel)).unwrap(),
                want.map(PathBuf::from),
                "{rel}"
            );
        }
        let err = resolve_in_root(root, Path::new("loop-a")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read driver root path {}",
                root.join("loop-a").display()
            )
        );
    }

    #[test]
    fn absolute_links_and_usrmerge_in_a_driver_container_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let v = "580.82.07";
        touch(&root.join(format!("usr/lib64/libcuda.so.{v}")));
        touch(&root.join(format!("usr/lib64/libnvidia-ml.so.{v}")));
        // lib64 -> usr/lib64 makes the same files visible twice; they must
        // be mounted once.
        symlink("usr/lib64", root.join("lib64")).unwrap();
        symlink(
            format!("/usr/lib64/libnvidia-ml.so.{v}"),
            root.join("usr/lib64/libnvidia-ml.so.1"),
        )
        .unwrap();
        touch(&root.join("usr/lib64/libnvidia-nvvm70.so.4"));
        std::fs::create_dir_all(root.join("usr/lib/firmware/nvidia").join(v)).unwrap();
        touch(&root.join(format!("usr/lib/firmware/nvidia/{v}/gsp_ga10x.bin")));
        symlink("usr/lib", root.join("lib")).unwrap();
        // A binary that is an absolute link to another binary of the tree.
        touch(&root.join("usr/lib/nvidia/bin/nvidia-smi"));
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        symlink(
            "/usr/lib/nvidia/bin/nvidia-smi",
            root.join("usr/bin/nvidia-smi"),
        )
        .unwrap();

        let found = DriverFiles::discover(RootMapping::new(root, "/run/nvidia/driver"), v).unwrap();
        let file = |rel: &str| DriverFile {
            host_path: PathBuf::from("/run/nvidia/driver").join(rel),
            container_path: PathBuf::from("/").join(rel),
        };
        assert_eq!(
            found.libraries,
            [
                file(&format!("usr/lib64/libnvidia-ml.so.{v}")),
                file(&format!("usr/lib64/libcuda.so.{v}")),
                file("usr/lib64/libnvidia-nvvm70.so.4"),
            ]
        );
        assert_eq!(
            found.links,
            [
                LibraryLink {
                    target: format!("libnvidia-ml.so.{v}"),
                    link: "/usr/lib64/libnvidia-ml.so.1".into(),
                    host_path: format!("/run/nvidia/driver/usr/lib64/libnvidia-ml.so.{v}").into(),
                },
                LibraryLink {
                    target: "libcuda.so.1".into(),
                    link: "/usr/lib64/libcuda.so".into(),
                    host_path: format!("/run/nvidia/driver/usr/lib64/libcuda.so.{v}").into(),
                },
            ]
        );
        assert_eq!(found.binaries, [file("usr/lib/nvidia/bin/nvidia-smi")]);
        assert_eq!(
            found.firmware,
            [file(&format!("usr/lib/firmware/nvidia/{v}/gsp_ga10x.bin"))]
        );
        assert_eq!(found.library_dirs(), [PathBuf::from("/usr/lib64")]);
    }

    #[test]
    fn a_directory_or_stale_version_does_not_count() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // A directory where the library should be, and an older driver's
        // file: neither satisfies the search.
        std::fs::create_dir_all(root.join("usr/lib64/libcuda.so.570.172.08")).unwrap();
        touch(&root.join("lib64/libcuda.so.550.54.15"));
        touch(&root.join("lib64/libnvidia-ml.so.570.172.08"));
        let err = DriverFiles::discover(RootMapping::new(root, "/"), "570.172.08").unwrap_err();
        let r = root.display();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot find libcuda.so.570.172.08 under driver root {r} (searched {r}/, \
                 {r}/usr/lib64, {r}/usr/lib/x86_64-linux-gnu, {r}/usr/lib/aarch64-linux-gnu, \
                 {r}/lib64, {r}/lib/x86_64-linux-gnu, {r}/lib/aarch64-linux-gnu)"
            )
        );
    }

    #[test]
    fn invalid_version_is_refused_before_touching_the_disk() {
        let err =
            DriverFiles::discover(RootMapping::new("/nonexistent", "/"), "../../etc").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid driver version \"../../etc\": expected dotted decimal numbers"
        );
    }
}

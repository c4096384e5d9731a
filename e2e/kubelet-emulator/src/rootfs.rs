//! The private root directory of a locally run container.
//!
//! A real runtime would bind-mount the CDI `mounts` into the container and create its
//! `deviceNodes`; a local process sees the host's filesystem instead. So each local container
//! gets `<pod dir>/<container>/rootfs`, passed to it as `NVDRA_CONTAINER_ROOT`, and nvdra's
//! binaries resolve every container path under it. [`build`] fills it with what the container
//! would see:
//!
//! - a symlink `<rootfs>/<containerPath>` → `hostPath` per mount (a later mount of the same
//!   path replaces an earlier one, as a later bind mount would shadow it);
//! - an empty file `<rootfs>/<path>` per device node, so tests can see which devices the
//!   container got (nothing can be opened through it);
//! - `<rootfs>/etc/hosts` holding `127.0.0.1 localhost`.
//!
//! The root is rebuilt from scratch whenever the pod's containers are started, so it never
//! shows devices of an earlier preparation. Nothing is ever created through a symlink: an
//! entry whose parent path crosses an earlier mount's symlink (say a mount at `/imexd/x` under
//! a mount at `/imexd`) is skipped, since creating it would write into the host directory.

use std::path::{Component, Path, PathBuf};

use crate::cdi::ContainerEdits;

/// The environment variable that carries the root to the container.
pub const ENV: &str = "NVDRA_CONTAINER_ROOT";
/// What `/etc/hosts` holds at start.
pub const HOSTS: &str = "127.0.0.1 localhost\n";

/// The root of container `container` of the pod whose directory is `pod_dir`.
pub fn path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(container).join("rootfs")
}

/// `container_path` under `root`; `.`/`..` and the leading `/` are dropped, so the result
/// never leaves `root`. `None` for a path that names nothing (`/`).
pub fn under(root: &Path, container_path: &str) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    let mut named = false;
    for part in Path::new(container_path).components() {
        if let Component::Normal(name) = part {
            out.push(name);
            named = true;
        }
    }
    named.then_some(out)
}

/// Whether any directory between `root` (exclusive) and `target` (exclusive) is a symlink.
fn crosses_symlink(root: &Path, target: &Path) -> bool {
    target
        .ancestors()
        .skip(1)
        .take_while(|a| *a != root && a.starts_with(root))
        .any(|a| {
            a.symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
        })
}

/// Removes whatever is at `path` (a symlink itself, not its target).
fn clear(path: &Path) -> std::io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// (Re)creates `root` for `edits`. Returns the entries skipped (with why), for the log.
pub fn build(root: &Path, edits: &ContainerEdits) -> Result<Vec<String>, String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    clear(root).map_err(|e| io("clear container root", root, e))?;
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(|e| io("create", &etc, e))?;
    let hosts = etc.join("hosts");
    std::fs::write(&hosts, HOSTS).map_err(|e| io("write", &hosts, e))?;
    let mut skipped = Vec::new();
    let mut place = |container_path: &str| -> Result<Option<PathBuf>, String> {
        let Some(at) = under(root, container_path) else {
            skipped.push(format!("{container_path:?}: names the root"));
            return Ok(None);
        };
        if crosses_symlink(root, &at) {
            skipped.push(format!("{container_path:?}: inside another mount"));
            return Ok(None);
        }
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        clear(&at).map_err(|e| io("replace", &at, e))?;
        Ok(Some(at))
    };
    for m in &edits.mounts {
        if let Some(at) = place(&m.container_path)? {
            std::os::unix::fs::symlink(&m.host_path, &at).map_err(|e| io("symlink", &at, e))?;
        }
    }
    for d in &edits.device_nodes {
        if let Some(at) = place(&d.path)? {
            std::fs::write(&at, "").map_err(|e| io("create", &at, e))?;
        }
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdi::{DeviceNode, Mount};
    use pretty_assertions::assert_eq;

    #[test]
    fn under_stays_below_the_root() {
        let r = Path::new("/r");
        let cases = [
            ("/imexd", Some("/r/imexd")),
            ("/usr/bin/nvidia-imex", Some("/r/usr/bin/nvidia-imex")),
            ("/dev/../../etc/./hosts", Some("/r/dev/etc/hosts")),
            ("relative/x", Some("/r/relative/x")),
            ("/", None),
        ];
        for (given, want) in cases {
            assert_eq!(under(r, given), want.map(PathBuf::from), "{given}");
        }
        assert_eq!(
            path(Path::new("/n/pods/u1"), "c"),
            PathBuf::from("/n/pods/u1/c/rootfs")
        );
    }

    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let p = entry.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let meta = p.symlink_metadata().unwrap();
                if meta.file_type().is_symlink() {
                    out.push(format!(
                        "{rel} -> {}",
                        std::fs::read_link(&p).unwrap().display()
                    ));
                } else if meta.is_dir() {
                    stack.push(p);
                } else {
                    out.push(format!("{rel} ({} bytes)", meta.len()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn build_links_mounts_creates_device_nodes_and_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host-domain");
        std::fs::create_dir_all(&host).unwrap();
        let root = path(&dir.path().join("pods/u1"), "c");
        let mount = |h: &Path, c: &str| Mount {
            host_path: h.display().to_string(),
            container_path: c.into(),
        };
        let node = |p: &str| DeviceNode {
            path: p.into(),
            host_path: None,
        };
        let edits = ContainerEdits {
            env: vec!["A=1".into()],
            mounts: vec![
                mount(Path::new("/old"), "/usr/bin/nvidia-imex"),
                mount(&host, "/imexd"),
                mount(
                    Path::new("/drv/usr/bin/nvidia-imex"),
                    "/usr/bin/nvidia-imex",
                ),
                mount(Path::new("/x"), "/imexd/nested"),
                mount(Path::new("/y"), "/"),
            ],
            device_nodes: vec![node("/dev/nvidia-caps-imex-channels/channel0")],
        };
        // A stale file from an earlier start disappears.
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("dev/stale"), "").unwrap();
        let skipped = build(&root, &edits).unwrap();
        assert_eq!(
            skipped,
            vec![
                r#""/imexd/nested": inside another mount"#.to_owned(),
                r#""/": names the root"#.to_owned(),
            ]
        );
        assert_eq!(
            listing(&root),
            vec![
                "dev/nvidia-caps-imex-channels/channel0 (0 bytes)".to_owned(),
                "etc/hosts (20 bytes)".to_owned(),
                format!("imexd -> {}", host.display()),
                "usr/bin/nvidia-imex -> /drv/usr/bin/nvidia-imex".to_owned(),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            HOSTS
        );
        // Nothing was created in the host directory, and a rebuild keeps it intact.
        std::fs::write(host.join("imexd.cfg"), "x").unwrap();
        build(&root, &edits).unwrap();
        assert_eq!(listing(&host), vec!["imexd.cfg (1 bytes)".to_owned()]);
        assert_eq!(
            std::fs::read_to_string(root.join("imexd/imexd.cfg")).unwrap(),
            "x"
        );
    }
}

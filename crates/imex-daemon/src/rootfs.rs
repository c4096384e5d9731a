//! Container paths resolved under the container root.
//!
//! In a real container the root is `/` and every path is used as is. The e2e's kubelet
//! emulator runs the daemon as a plain process with `NVDRA_CONTAINER_ROOT` set to a private
//! directory that holds what the container would see (`imexd/`, `etc/hosts`, `usr/bin/…`),
//! so every file the daemon touches goes through [`resolve`].
//!
//! Paths handed to *other programs* as arguments (`nvidia-imex -c /imexd/imexd.cfg`) stay
//! container paths: those programs resolve them in their own (identical) root.

use std::path::{Component, Path, PathBuf};

/// `container_path` as seen from the host: `root` joined with the path's normal components.
/// `..` and `.` are dropped rather than followed, so a path can never leave the root.
pub fn resolve(root: &Path, container_path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for part in container_path.components() {
        if let Component::Normal(name) = part {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn resolves_under_the_root() {
        let cases = [
            ("/", "/imexd/imexd.cfg", "/imexd/imexd.cfg"),
            (
                "/r/pods/u/c/rootfs",
                "/etc/hosts",
                "/r/pods/u/c/rootfs/etc/hosts",
            ),
            ("/r", "usr/bin/nvidia-imex", "/r/usr/bin/nvidia-imex"),
            ("/r/", "/imexd/../etc/./hosts", "/r/imexd/etc/hosts"),
            ("/r", "/", "/r"),
        ];
        for (root, path, want) in cases {
            assert_eq!(
                resolve(Path::new(root), Path::new(path)),
                PathBuf::from(want),
                "{root} {path}"
            );
        }
    }
}

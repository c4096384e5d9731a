//! Device nodes a container needs for a GPU or MIG device, and the reader for
//! MIG capability minors under procfs.
//!
//! A full GPU needs `/dev/nvidia<minor>`; every container also needs the
//! control nodes `/dev/nvidiactl`, `/dev/nvidia-uvm` and
//! `/dev/nvidia-uvm-tools`. A MIG device additionally needs two capability
//! nodes `/dev/nvidia-caps/nvidia-cap<m>`, one for its GPU instance and one
//! for its compute instance, whose minors the driver publishes in
//! `<proc>/driver/nvidia/capabilities/gpu<minor>/mig/gi<g>/access` and
//! `.../gi<g>/ci<c>/access` as a `DeviceFileMinor: <m>` line.
//!
//! Invariant: a [`DeviceNode`]'s `path` is where the node appears inside the
//! container (always under `/dev`); `host_path` is the same node under the
//! dev root (equal to `path` when the dev root is `/`).
//! Failure modes: a missing or unreadable capability file is
//! [`Error::ReadCapability`]; one without a minor is
//! [`Error::ParseCapability`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// A character device to expose to a container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Path inside the container, e.g. `/dev/nvidia0`.
    pub path: PathBuf,
    /// Path on the host, e.g. `/run/nvidia/driver/dev/nvidia0`.
    pub host_path: PathBuf,
}

impl DeviceNode {
    /// The node `/dev/<name>` under `dev_root`.
    fn under(dev_root: &Path, name: &str) -> Self {
        let path = Path::new("/dev").join(name);
        Self {
            host_path: dev_root.join("dev").join(name),
            path,
        }
    }
}

/// The node of a full GPU, `/dev/nvidia<minor>`.
pub fn gpu_node(dev_root: &Path, minor: u32) -> DeviceNode {
    DeviceNode::under(dev_root, &format!("nvidia{minor}"))
}

/// The control nodes every GPU container needs.
pub fn control_nodes(dev_root: &Path) -> Vec<DeviceNode> {
    ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
        .into_iter()
        .map(|name| DeviceNode::under(dev_root, name))
        .collect()
}

/// Capability minors of one MIG device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigCapabilities {
    /// Minor of the GPU-instance access capability.
    pub gi_minor: u32,
    /// Minor of the compute-instance access capability.
    pub ci_minor: u32,
}

impl MigCapabilities {
    /// The minors the driver assigns in its fixed layout (the
    /// `/proc/driver/nvidia-caps/mig-minors` table): minors 1 and 2 are
    /// `config` and `monitor`, then every GPU gets 15 GPU instances of one
    /// access minor plus 8 compute-instance minors each.
    ///
    /// Used by the fake backend; real hardware is read from procfs.
    pub fn from_driver_layout(parent_minor: u32, gi_id: u32, ci_id: u32) -> Self {
        const FIRST: u32 = 3;
        const PER_GI: u32 = 1 + 8;
        const PER_GPU: u32 = 15 * PER_GI;
        let gi_minor = FIRST + parent_minor * PER_GPU + gi_id * PER_GI;
        Self {
            gi_minor,
            ci_minor: gi_minor + 1 + ci_id,
        }
    }

    /// The two capability nodes, GPU instance first.
    pub fn nodes(&self, dev_root: &Path) -> [DeviceNode; 2] {
        [self.gi_minor, self.ci_minor]
            .map(|m| DeviceNode::under(dev_root, &format!("nvidia-caps/nvidia-cap{m}")))
    }
}

/// Reads MIG capability minors from a procfs root (normally `/proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityReader {
    proc_root: PathBuf,
}

impl CapabilityReader {
    /// A reader for the procfs mounted at `proc_root`.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }

    /// The capability minors of the MIG device with GPU instance `gi_id` and
    /// compute instance `ci_id` on the GPU with minor `parent_minor`.
    pub fn mig(&self, parent_minor: u32, gi_id: u32, ci_id: u32) -> Result<MigCapabilities, Error> {
        let gi_dir = self
            .proc_root
            .join("driver/nvidia/capabilities")
            .join(format!("gpu{parent_minor}"))
            .join("mig")
            .join(format!("gi{gi_id}"));
        Ok(MigCapabilities {
            gi_minor: read_minor(&gi_dir.join("access"))?,
            ci_minor: read_minor(&gi_dir.join(format!("ci{ci_id}")).join("access"))?,
        })
    }
}

fn read_minor(path: &Path) -> Result<u32, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadCapability {
        path: path.to_owned(),
        source,
    })?;
    parse_device_file_minor(&text).ok_or_else(|| Error::ParseCapability {
        path: path.to_owned(),
    })
}

/// Extracts `N` from the `DeviceFileMinor: N` line of a capability file.
pub fn parse_device_file_minor(text: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("DeviceFileMinor:")?.trim();
        value.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capability_text() {
        let cases = [
            (
                "DeviceFileMinor: 12\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
                Some(12),
            ),
            (
                "DeviceFileMode: 292\nDeviceFileMinor:   4331  \n",
                Some(4331),
            ),
            ("DeviceFileMode: 292\n", None),
            ("DeviceFileMinor: twelve\n", None),
            ("DeviceFileMinor: -1\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_device_file_minor(text), want, "{text:?}");
        }
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_gi_and_ci_minors() {
        let proc = tempfile::tempdir().unwrap();
        let base = "driver/nvidia/capabilities/gpu1/mig/gi2";
        write(
            proc.path(),
            &format!("{base}/access"),
            "DeviceFileMinor: 156\n",
        );
        write(
            proc.path(),
            &format!("{base}/ci0/access"),
            "DeviceFileMinor: 157\nDeviceFileMode: 292\n",
        );
        let reader = CapabilityReader::new(proc.path());
        assert_eq!(
            reader.mig(1, 2, 0).unwrap(),
            MigCapabilities {
                gi_minor: 156,
                ci_minor: 157
            }
        );

        let missing = reader.mig(1, 2, 1).unwrap_err();
        assert_eq!(
            missing.to_string(),
            format!(
                "cannot read MIG capability file {}",
                proc.path().join(base).join("ci1/access").display()
            )
        );

        write(
            proc.path(),
            "driver/nvidia/capabilities/gpu0/mig/gi1/access",
            "garbage\n",
        );
        let bad = reader.mig(0, 1, 0).unwrap_err();
        assert_eq!(
            bad.to_string(),
            format!(
                "MIG capability file {} has no valid `DeviceFileMinor: <n>` line",
                proc.path()
                    .join("driver/nvidia/capabilities/gpu0/mig/gi1/access")
                    .display()
            )
        );
    }

    #[test]
    fn driver_layout_minors() {
        let cases = [
            ((0, 0, 0), (3, 4)),
            ((0, 1, 0), (12, 13)),
            ((1, 2, 0), (156, 157)),
            ((31, 14, 7), (4314, 4322)),
        ];
        for ((minor, gi, ci), (gi_minor, ci_minor)) in cases {
            assert_eq!(
                MigCapabilities::from_driver_layout(minor, gi, ci),
                MigCapabilities { gi_minor, ci_minor },
                "gpu{minor}/gi{gi}/ci{ci}"
            );
        }
    }

    #[test]
    fn node_paths() {
        let root = Path::new("/run/nvidia/driver");
        assert_eq!(
            gpu_node(root, 3),
            DeviceNode {
                path: "/dev/nvidia3".into(),
                host_path: "/run/nvidia/driver/dev/nvidia3".into()
            }
        );
        let ctl: Vec<_> = control_nodes(Path::new("/"))
            .into_iter()
            .map(|n| (n.path, n.host_path))
            .collect();
        assert_eq!(
            ctl,
            [
                ("/dev/nvidiactl".into(), "/dev/nvidiactl".into()),
                ("/dev/nvidia-uvm".into(), "/dev/nvidia-uvm".into()),
                (
                    "/dev/nvidia-uvm-tools".into(),
                    "/dev/nvidia-uvm-tools".into()
                ),
            ]
        );
        let caps = MigCapabilities {
            gi_minor: 12,
            ci_minor: 13,
        }
        .nodes(Path::new("/"));
        assert_eq!(caps[0].path, PathBuf::from("/dev/nvidia-caps/nvidia-cap12"));
        assert_eq!(
            caps[1].host_path,
            PathBuf::from("/dev/nvidia-caps/nvidia-cap13")
        );
    }
}

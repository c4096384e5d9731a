//! The CDI specs of `compute-domain.nvidia.com`: one per prepared claim
//! (`k8s.compute-domain.nvidia.com-claim_<uid>.yaml`) and the base spec written at start-up
//! (`k8s.compute-domain.nvidia.com-device_base.yaml`, device `…/device=all`). Pure rendering;
//! [`imex_binary_mounts`] is the one function that looks at the file system.
//!
//! - Channel claim: device `<uid>-channel-0` with the channel's character device node
//!   `/dev/nvidia-caps-imex-channels/channel<N>` (major of `nvidia-caps-imex-channels`, minor N,
//!   mode 0666; all channels for `allocationMode: All`), as upstream, plus the env
//!   `NVDRA_IMEX_CHANNELS` (`<N>`, `all`, or empty on a node outside any NVLink clique, where no
//!   node is injected) so a container can tell which channel it got.
//! - Daemon claim: device `<uid>-daemon-0` with env `CLIQUE_ID`, `COMPUTE_DOMAIN_UUID`,
//!   `COMPUTE_DOMAIN_NAME`, `COMPUTE_DOMAIN_NAMESPACE`, the domain directory bind-mounted at
//!   `/imexd`, and in a clique the fabric-management capability node
//!   `/dev/nvidia-caps/nvidia-cap<minor>`. The daemon's container also gets the base device.
//! - Base: device `all` with `NVIDIA_VISIBLE_DEVICES=void`, the GPU side's node-wide edits
//!   (control nodes, driver libraries and tools, hooks) and `nvidia-imex`/`nvidia-imex-ctl`
//!   from the driver root, which the image does not carry.
//!
//! Invariants: every rendered spec passed [`spec::validate`] and has the lowest `cdiVersion`
//! its fields need. Failure modes: [`SpecError`] for a value that breaks a spec rule.

use std::path::Path;

use nvdra_api::names::cdi as names;

use crate::cdi::spec::{self, ContainerEdits, Device, DeviceNode, Mount, Spec, SpecError};
use crate::cdi::{Vendor, claim_device_name};

use super::devices::{CHANNEL_DEVICE, DAEMON_DEVICE};

/// Where the daemon sees its domain directory.
pub const DAEMON_CONFIG_DIR: &str = "/imexd";

/// Options of the domain directory mount: writable (the daemon renders its config there).
pub const DOMAIN_DIR_MOUNT_OPTIONS: [&str; 5] = ["rw", "nosuid", "nodev", "rbind", "rprivate"];

/// The IMEX binaries the base spec brings from the driver root.
pub const IMEX_BINARIES: [&str; 2] = ["usr/bin/nvidia-imex", "usr/bin/nvidia-imex-ctl"];

/// Env naming the injected channels.
pub const CHANNELS_ENV: &str = "NVDRA_IMEX_CHANNELS";

/// Mode of channel device nodes, as upstream.
pub const CHANNEL_FILE_MODE: u32 = 0o666;

/// What a channel claim's containers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelGrant {
    /// Not in an NVLink clique: no device node.
    NoClique,
    /// Channel `channel`.
    One {
        /// The channel ID (the node's minor).
        channel: u32,
        /// Major of `nvidia-caps-imex-channels`.
        major: u32,
    },
    /// Channels `0..count`.
    All {
        /// The channel count.
        count: u32,
        /// Major of `nvidia-caps-imex-channels`.
        major: u32,
    },
}

/// What identifies a daemon claim's domain to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonEdits {
    /// The node's clique ID; empty outside a clique.
    pub clique_id: String,
    /// The ComputeDomain's UID.
    pub domain_uid: String,
    /// Its name.
    pub domain_name: String,
    /// Its namespace.
    pub domain_namespace: String,
    /// Host path of the domain directory.
    pub domain_dir: String,
    /// Major of `nvidia-caps` and minor of `fabric-imex-mgmt`, injected when in a clique.
    pub fabric_mgmt: Option<(u32, u32)>,
}

fn char_node(path: String, major: u32, minor: u32, mode: Option<u32>) -> DeviceNode {
    DeviceNode {
        path,
        device_type: Some("c".to_owned()),
        major: Some(i64::from(major)),
        minor: Some(i64::from(minor)),
        file_mode: mode,
        ..DeviceNode::default()
    }
}

fn channel_node(channel: u32, major: u32) -> DeviceNode {
    char_node(
        format!("{}/channel{channel}", nvdra_gpu::imex::CHANNELS_DIR),
        major,
        channel,
        Some(CHANNEL_FILE_MODE),
    )
}

fn claim_spec(claim_uid: &str, device: &str, edits: ContainerEdits) -> Result<Spec, SpecError> {
    let mut spec = Spec {
        kind: Vendor::COMPUTE_DOMAIN.claim_kind(),
        devices: vec![Device {
            name: claim_device_name(claim_uid, device),
            container_edits: edits,
            ..Device::default()
        }],
        ..Spec::default()
    };
    spec.cdi_version = spec::minimum_version(&spec).to_owned();
    spec::validate(&spec)?;
    Ok(spec)
}

/// The spec of channel claim `claim_uid`.
pub fn render_channel_spec(claim_uid: &str, grant: ChannelGrant) -> Result<Spec, SpecError> {
    let (value, device_nodes) = match grant {
        ChannelGrant::NoClique => (String::new(), Vec::new()),
        ChannelGrant::One { channel, major } => {
            (channel.to_string(), vec![channel_node(channel, major)])
        }
        ChannelGrant::All { count, major } => (
            "all".to_owned(),
            (0..count).map(|c| channel_node(c, major)).collect(),
        ),
    };
    let edits = ContainerEdits {
        env: vec![format!("{CHANNELS_ENV}={value}")],
        device_nodes,
        ..ContainerEdits::default()
    };
    claim_spec(claim_uid, CHANNEL_DEVICE, edits)
}

/// The spec of daemon claim `claim_uid`.
pub fn render_daemon_spec(claim_uid: &str, daemon: &DaemonEdits) -> Result<Spec, SpecError> {
    let edits = ContainerEdits {
        env: vec![
            format!("CLIQUE_ID={}", daemon.clique_id),
            format!("COMPUTE_DOMAIN_UUID={}", daemon.domain_uid),
            format!("COMPUTE_DOMAIN_NAME={}", daemon.domain_name),
            format!("COMPUTE_DOMAIN_NAMESPACE={}", daemon.domain_namespace),
        ],
        device_nodes: daemon
            .fabric_mgmt
            .map(|(major, minor)| {
                char_node(
                    format!("/dev/nvidia-caps/nvidia-cap{minor}"),
                    major,
                    minor,
                    None,
                )
            })
            .into_iter()
            .collect(),
        mounts: vec![Mount {
            host_path: daemon.domain_dir.clone(),
            container_path: DAEMON_CONFIG_DIR.to_owned(),
            options: DOMAIN_DIR_MOUNT_OPTIONS
                .iter()
                .map(|o| (*o).to_owned())
                .collect(),
            mount_type: None,
        }],
        ..ContainerEdits::default()
    };
    claim_spec(claim_uid, DAEMON_DEVICE, edits)
}

/// The base spec: `common` (the node-wide edits the GPU side renders) plus `imex` mounts and
/// `NVIDIA_VISIBLE_DEVICES=void`, as device `all`.
pub fn render_base_spec(common: &ContainerEdits, imex: &[Mount]) -> Result<Spec, SpecError> {
    let mut edits = ContainerEdits {
        env: vec!["NVIDIA_VISIBLE_DEVICES=void".to_owned()],
        ..ContainerEdits::default()
    };
    edits.append(common);
    edits.mounts.extend(imex.iter().cloned());
    let mut spec = Spec {
        kind: Vendor::COMPUTE_DOMAIN.base_kind(),
        devices: vec![Device {
            name: names::BASE_DEVICE.to_owned(),
            container_edits: edits,
            ..Device::default()
        }],
        ..Spec::default()
    };
    spec.cdi_version = spec::minimum_version(&spec).to_owned();
    spec::validate(&spec)?;
    Ok(spec)
}

/// Read-only mounts of the [`IMEX_BINARIES`] present under the driver root (`agent_root` as
/// the agent sees it): host path `host_root` + path, container path `/` + path. Presence is
/// checked without following a final symlink, so a link pointing outside the root (a test
/// driver root, or an absolute link in a driver container) still counts; the runtime resolves
/// it on the host.
pub fn imex_binary_mounts(agent_root: &Path, host_root: &Path) -> Vec<Mount> {
    IMEX_BINARIES
        .iter()
        .filter(|rel| {
            let present = std::fs::symlink_metadata(agent_root.join(rel)).is_ok();
            if !present {
                tracing::warn!(binary = %agent_root.join(rel).display(), "IMEX binary not found in the driver root; IMEX daemons on this node cannot run it");
            }
            present
        })
        .map(|rel| Mount {
            host_path: host_root.join(rel).to_string_lossy().into_owned(),
            container_path: Path::new("/").join(rel).to_string_lossy().into_owned(),
            options: crate::cdi::render::MOUNT_OPTIONS
                .iter()
                .map(|o| (*o).to_owned())
                .collect(),
            mount_type: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    const UID: &str = "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e";

    fn yaml(spec: &Spec) -> String {
        spec::to_yaml(spec).unwrap()
    }

    #[test]
    fn channel_specs() {
        let one = render_channel_spec(
            UID,
            ChannelGrant::One {
                channel: 3,
                major: 507,
            },
        )
        .unwrap();
        assert_eq!(
            yaml(&one),
            "\
cdiVersion: \"0.5.0\"
kind: k8s.compute-domain.nvidia.com/claim
devices:
- name: 0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-channel-0
  containerEdits:
    env:
    - NVDRA_IMEX_CHANNELS=3
    deviceNodes:
    - path: /dev/nvidia-caps-imex-channels/channel3
      type: c
      major: 507
      minor: 3
      fileMode: 438
"
        );
        let none = render_channel_spec(UID, ChannelGrant::NoClique).unwrap();
        assert_eq!(
            yaml(&none),
            "\
cdiVersion: \"0.5.0\"
kind: k8s.compute-domain.nvidia.com/claim
devices:
- name: 0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-channel-0
  containerEdits:
    env:
    - NVDRA_IMEX_CHANNELS=
"
        );
        let all = render_channel_spec(
            UID,
            ChannelGrant::All {
                count: 4,
                major: 507,
            },
        )
        .unwrap();
        let nodes: Vec<(String, Option<i64>)> = all.devices[0]
            .container_edits
            .device_nodes
            .iter()
            .map(|n| (n.path.clone(), n.minor))
            .collect();
        assert_eq!(
            nodes,
            (0..4)
                .map(|c| (
                    format!("/dev/nvidia-caps-imex-channels/channel{c}"),
                    Some(i64::from(c))
                ))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            all.devices[0].container_edits.env,
            ["NVDRA_IMEX_CHANNELS=all"]
        );
    }

    #[test]
    fn daemon_spec() {
        let edits = DaemonEdits {
            clique_id: "0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1".into(),
            domain_uid: "cd-uid".into(),
            domain_name: "imex".into(),
            domain_namespace: "team-a".into(),
            domain_dir: "/var/lib/kubelet/plugins/compute-domain.nvidia.com/domains/cd-uid".into(),
            fabric_mgmt: Some((508, 4323)),
        };
        assert_eq!(
            yaml(&render_daemon_spec(UID, &edits).unwrap()),
            "\
cdiVersion: \"0.5.0\"
kind: k8s.compute-domain.nvidia.com/claim
devices:
- name: 0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e-daemon-0
  containerEdits:
    env:
    - CLIQUE_ID=0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1
    - COMPUTE_DOMAIN_UUID=cd-uid
    - COMPUTE_DOMAIN_NAME=imex
    - COMPUTE_DOMAIN_NAMESPACE=team-a
    deviceNodes:
    - path: /dev/nvidia-caps/nvidia-cap4323
      type: c
      major: 508
      minor: 4323
    mounts:
    - hostPath: /var/lib/kubelet/plugins/compute-domain.nvidia.com/domains/cd-uid
      containerPath: /imexd
      options:
      - rw
      - nosuid
      - nodev
      - rbind
      - rprivate
"
        );
        let outside = DaemonEdits {
            clique_id: String::new(),
            fabric_mgmt: None,
            ..edits
        };
        let spec = render_daemon_spec(UID, &outside).unwrap();
        assert!(spec.devices[0].container_edits.device_nodes.is_empty());
        assert_eq!(spec.devices[0].container_edits.env[0], "CLIQUE_ID=");
    }

    #[test]
    fn base_spec_and_imex_binaries() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        // A link pointing outside the root counts (the e2e driver root does this).
        std::os::unix::fs::symlink(
            "/nonexistent/nvdra-e2e-imex",
            root.path().join("usr/bin/nvidia-imex"),
        )
        .unwrap();
        let mounts = imex_binary_mounts(root.path(), Path::new("/run/nvidia/driver"));
        assert_eq!(
            mounts
                .iter()
                .map(|m| (m.host_path.as_str(), m.container_path.as_str()))
                .collect::<Vec<_>>(),
            [(
                "/run/nvidia/driver/usr/bin/nvidia-imex",
                "/usr/bin/nvidia-imex"
            )]
        );
        std::fs::write(root.path().join("usr/bin/nvidia-imex-ctl"), "").unwrap();
        let mounts = imex_binary_mounts(root.path(), Path::new("/"));
        let common = ContainerEdits {
            device_nodes: vec![DeviceNode {
                path: "/dev/nvidiactl".into(),
                ..DeviceNode::default()
            }],
            ..ContainerEdits::default()
        };
        assert_eq!(
            yaml(&render_base_spec(&common, &mounts).unwrap()),
            "\
cdiVersion: \"0.3.0\"
kind: k8s.compute-domain.nvidia.com/device
devices:
- name: all
  containerEdits:
    env:
    - NVIDIA_VISIBLE_DEVICES=void
    deviceNodes:
    - path: /dev/nvidiactl
    mounts:
    - hostPath: /usr/bin/nvidia-imex
      containerPath: /usr/bin/nvidia-imex
      options:
      - ro
      - nosuid
      - nodev
      - rbind
      - rprivate
    - hostPath: /usr/bin/nvidia-imex-ctl
      containerPath: /usr/bin/nvidia-imex-ctl
      options:
      - ro
      - nosuid
      - nodev
      - rbind
      - rprivate
"
        );
    }
}

//! What the `compute-domain.nvidia.com` driver needs to know about a node's IMEX support: the
//! NVLink clique the node belongs to, how many IMEX channels the kernel driver offers, and the
//! device numbers a container needs to open a channel or to run the IMEX daemon.
//!
//! Sources (all read through one procfs root, normally the agent's `/proc`):
//! - `driver/nvidia/params`: the kernel module's parameters, one `Name: value` per line; the
//!   channel count is `ImexChannelCount` (the module parameter `NVreg_ImexChannelCount`).
//!   Absent on drivers that predate the parameter: the driver's default, 2048, applies.
//! - `devices`: the kernel's major numbers (`<major> <name>` lines under
//!   `Character devices:`); `nvidia-caps-imex-channels` for channel nodes, `nvidia-caps` for
//!   capability nodes. Both majors are assigned dynamically at module load.
//! - `driver/nvidia/capabilities/fabric-imex-mgmt`: the minor (`DeviceFileMinor: N`) of the
//!   capability node `/dev/nvidia-caps/nvidia-cap<N>` that lets `nvidia-imex` manage the fabric.
//!
//! Why the agent's own `/proc` and not the driver root's: procfs is the kernel's, the same in
//! every mount namespace, while a containerised driver root has no procfs of its own. The
//! NVIDIA container toolkit may bind-mount a trimmed `params` over `/proc/driver/nvidia/params`
//! in containers it starts; the agent's pod is not started through it (it asks for no GPU), and
//! if it were, a missing `ImexChannelCount` line only means the default 2048 (logged at debug).
//!
//! Invariants: [`ImexInfo::channel_count`] is at least 1; a major or minor that cannot be found
//! is `None` (the node cannot hand out channels, which only matters on a fabric node, where
//! the agent reports it at prepare), never a guess.
//!
//! Failure modes: a procfs file that exists but cannot be read is [`Error::ReadProcFile`]; a
//! `ImexChannelCount` line whose value is not a positive number is [`Error::ParseProcFile`].
//! Missing files are not errors (a node without the IMEX-capable driver simply has none).
//! [`node_clique_id`] fails with [`Error::CliqueMismatch`] when GPUs disagree.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::backend::Inventory;
use crate::nodes::parse_device_file_minor;

/// The kernel driver's default number of IMEX channels.
pub const DEFAULT_CHANNEL_COUNT: u32 = 2048;

/// The `params` key holding the channel count.
pub const CHANNEL_COUNT_PARAM: &str = "ImexChannelCount";

/// `/proc/devices` name of the IMEX channel character devices.
pub const CHANNELS_DEVICE: &str = "nvidia-caps-imex-channels";

/// `/proc/devices` name of the NVIDIA capability character devices.
pub const CAPS_DEVICE: &str = "nvidia-caps";

/// Directory of the channel device nodes in a container.
pub const CHANNELS_DIR: &str = "/dev/nvidia-caps-imex-channels";

/// Fixed numbers the fake backend reports: majors as a GB200 host with the 580 driver
/// assigns them dynamically, and the capability minor right after the MIG minor table
/// (which ends at 4322, see [`crate::MigCapabilities::from_driver_layout`]).
pub mod fake_numbers {
    /// Major of `nvidia-caps-imex-channels`.
    pub const CHANNELS_MAJOR: u32 = 507;
    /// Major of `nvidia-caps`.
    pub const CAPS_MAJOR: u32 = 508;
    /// Minor of the `fabric-imex-mgmt` capability.
    pub const FABRIC_MGMT_MINOR: u32 = 4323;
}

/// IMEX facts of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImexInfo {
    /// IMEX channels the driver offers (channel IDs `0..channel_count`).
    pub channel_count: u32,
    /// Major number of the channel device nodes, if the driver registered them.
    pub channels_major: Option<u32>,
    /// Major number of the capability device nodes, if the driver registered them.
    pub caps_major: Option<u32>,
    /// Minor of the fabric-management capability, if the driver exposes it.
    pub fabric_mgmt_minor: Option<u32>,
}

impl ImexInfo {
    /// What the fake backend reports for a profile with `channel_count` channels.
    pub fn fake(channel_count: u32) -> Self {
        Self {
            channel_count,
            channels_major: Some(fake_numbers::CHANNELS_MAJOR),
            caps_major: Some(fake_numbers::CAPS_MAJOR),
            fabric_mgmt_minor: Some(fake_numbers::FABRIC_MGMT_MINOR),
        }
    }
}

/// Reads [`ImexInfo`] from a procfs root (normally `/proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImexReader {
    proc_root: PathBuf,
}

impl ImexReader {
    /// A reader for the procfs mounted at `proc_root`.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }

    /// Reads the channel count, both majors and the fabric-management minor.
    pub fn read(&self) -> Result<ImexInfo, Error> {
        let params_path = self.proc_root.join("driver/nvidia/params");
        let channel_count = match read_optional(&params_path)? {
            Some(text) => match parse_channel_count(&text) {
                Ok(Some(count)) => count,
                Ok(None) => {
                    tracing::debug!(path = %params_path.display(), "no {CHANNEL_COUNT_PARAM} parameter; assuming the driver default {DEFAULT_CHANNEL_COUNT}");
                    DEFAULT_CHANNEL_COUNT
                }
                Err(reason) => {
                    return Err(Error::ParseProcFile {
                        path: params_path,
                        reason,
                    });
                }
            },
            None => {
                tracing::debug!(path = %params_path.display(), "no driver parameters file; assuming {DEFAULT_CHANNEL_COUNT} IMEX channels");
                DEFAULT_CHANNEL_COUNT
            }
        };
        let devices = read_optional(&self.proc_root.join("devices"))?.unwrap_or_default();
        let mgmt_path = self
            .proc_root
            .join("driver/nvidia/capabilities/fabric-imex-mgmt");
        let fabric_mgmt_minor = read_optional(&mgmt_path)?
            .as_deref()
            .and_then(parse_device_file_minor);
        Ok(ImexInfo {
            channel_count,
            channels_major: char_major(&devices, CHANNELS_DEVICE),
            caps_major: char_major(&devices, CAPS_DEVICE),
            fabric_mgmt_minor,
        })
    }
}

/// The file's text, or `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::ReadProcFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The `ImexChannelCount` of a `params` text: `Ok(None)` when absent, `Err` with the reason
/// when present but not a positive number.
pub fn parse_channel_count(params: &str) -> Result<Option<u32>, String> {
    let Some(value) = params.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == CHANNEL_COUNT_PARAM).then(|| value.trim())
    }) else {
        return Ok(None);
    };
    match value.parse::<u32>() {
        Ok(count) if count > 0 => Ok(Some(count)),
        _ => Err(format!(
            "{CHANNEL_COUNT_PARAM} {value:?} is not a positive number"
        )),
    }
}

/// The major of character device `name` in a `/proc/devices` text.
pub fn char_major(devices: &str, name: &str) -> Option<u32> {
    let mut in_char = false;
    for line in devices.lines() {
        let line = line.trim();
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        if !in_char {
            continue;
        }
        if let Some((major, device)) = line.split_once(char::is_whitespace)
            && device.trim() == name
        {
            return major.parse().ok();
        }
    }
    None
}

/// The node's NVLink clique ID (`<clusterUUID>.<cliqueId>`), `None` when no GPU takes part in a
/// fabric. Every GPU reporting a clique must report the same one ([`Error::CliqueMismatch`]
/// otherwise); GPUs without fabric support are ignored, as upstream does.
pub fn node_clique_id(inventory: &Inventory) -> Result<Option<String>, Error> {
    let mut found: Option<(String, &str)> = None;
    for gpu in &inventory.gpus {
        let Some(clique) = gpu.fabric.as_ref().and_then(|f| f.clique_id()) else {
            continue;
        };
        match &found {
            None => found = Some((clique, &gpu.info.uuid)),
            Some((first, first_gpu)) if *first != clique => {
                return Err(Error::CliqueMismatch {
                    first_gpu: (*first_gpu).to_owned(),
                    first: first.clone(),
                    gpu: gpu.info.uuid.clone(),
                    clique,
                });
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(clique, _)| clique))
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    const DEVICES: &str = "Character devices:\n  1 mem\n195 nvidia-frontend\n\
                           507 nvidia-caps-imex-channels\n508 nvidia-caps\n\n\
                           Block devices:\n  7 nvidia-caps\n";

    #[test]
    fn channel_counts() {
        let cases = [
            (
                "ResmanDebugLevel: 4294967295\nImexChannelCount: 4096\n",
                Ok(Some(4096)),
            ),
            ("ImexChannelCount:2048", Ok(Some(2048))),
            ("ResmanDebugLevel: 4294967295\n", Ok(None)),
            ("", Ok(None)),
            (
                "ImexChannelCount: 0\n",
                Err("ImexChannelCount \"0\" is not a positive number".to_owned()),
            ),
            (
                "ImexChannelCount: lots\n",
                Err("ImexChannelCount \"lots\" is not a positive number".to_owned()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_channel_count(text), want, "{text:?}");
        }
    }

    #[test]
    fn majors_come_from_the_character_section_only() {
        assert_eq!(char_major(DEVICES, CHANNELS_DEVICE), Some(507));
        assert_eq!(char_major(DEVICES, CAPS_DEVICE), Some(508));
        assert_eq!(char_major(DEVICES, "nvidia-uvm"), None);
        let block_only = "Character devices:\n  1 mem\nBlock devices:\n  9 nvidia-caps\n";
        assert_eq!(char_major(block_only, CAPS_DEVICE), None);
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_a_procfs_tree() {
        let proc = tempfile::tempdir().unwrap();
        let reader = ImexReader::new(proc.path());
        // Nothing there: defaults, no numbers.
        assert_eq!(
            reader.read().unwrap(),
            ImexInfo {
                channel_count: 2048,
                channels_major: None,
                caps_major: None,
                fabric_mgmt_minor: None,
            }
        );
        write(
            proc.path(),
            "driver/nvidia/params",
            "ImexChannelCount: 16\n",
        );
        write(proc.path(), "devices", DEVICES);
        write(
            proc.path(),
            "driver/nvidia/capabilities/fabric-imex-mgmt",
            "DeviceFileMinor: 4323\nDeviceFileMode: 256\n",
        );
        assert_eq!(
            reader.read().unwrap(),
            ImexInfo {
                channel_count: 16,
                channels_major: Some(507),
                caps_major: Some(508),
                fabric_mgmt_minor: Some(4323),
            }
        );
        write(
            proc.path(),
            "driver/nvidia/params",
            "ImexChannelCount: -1\n",
        );
        assert_eq!(
            reader.read().unwrap_err().to_string(),
            format!(
                "cannot parse {}: ImexChannelCount \"-1\" is not a positive number",
                proc.path().join("driver/nvidia/params").display()
            )
        );
    }

    #[test]
    fn clique_of_a_node() {
        use crate::GpuBackend as _;
        let gb200 = crate::FakeBackend::builtin("gb200-x4").unwrap().unwrap();
        let mut inventory = gb200.inventory().unwrap();
        assert_eq!(
            node_clique_id(&inventory).unwrap().as_deref(),
            Some("0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1")
        );
        // A GPU without fabric support does not vote.
        inventory.gpus[1].fabric = None;
        assert!(node_clique_id(&inventory).unwrap().is_some());
        // Disagreement is an error naming both.
        if let Some(fabric) = inventory.gpus[2].fabric.as_mut() {
            fabric.clique_id = 2;
        }
        assert_eq!(
            node_clique_id(&inventory).unwrap_err().to_string(),
            "GPUs disagree on the NVLink clique: GPU-1e86895c-3179-12d1-2723-ffb9202c2dbf is in \
             0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1, GPU-42ca54c9-b9da-a2eb-de32-185336c8c65f in \
             0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.2"
        );
        let h100 = crate::FakeBackend::builtin("h100-sxm-80gb-x8")
            .unwrap()
            .unwrap();
        assert_eq!(node_clique_id(&h100.inventory().unwrap()).unwrap(), None);
    }

    #[test]
    fn fake_backend_reports_the_profile_channel_count() {
        use crate::GpuBackend as _;
        let default = crate::FakeBackend::builtin("l4-x2").unwrap().unwrap();
        assert_eq!(default.imex().unwrap(), ImexInfo::fake(2048));
        let mut profile = crate::FakeProfile::uniform(crate::GpuModel::L4, 1);
        profile.imex_channel_count = Some(8);
        let eight = crate::FakeBackend::from_profile(&profile, "test").unwrap();
        assert_eq!(eight.imex().unwrap().channel_count, 8);
        profile.imex_channel_count = Some(0);
        assert_eq!(
            crate::FakeBackend::from_profile(&profile, "test")
                .unwrap_err()
                .to_string(),
            "invalid fake profile test: imex_channel_count: must be at least 1"
        );
    }
}

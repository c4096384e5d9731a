//! The procfs files the NVIDIA driver keeps, written under the config's
//! `proc_root` so the agent's procfs readers (MIG capability minors, IMEX
//! parameters and device numbers) see a mock node as they see a real one.
//!
//! At load, [`write_driver_files`] writes what the kernel module publishes
//! once: `devices` (the character majors), `driver/nvidia/params`
//! (`ImexChannelCount`) and the fabric management capability, with the
//! numbers the fake backend reports ([`ImexInfo`]).
//!
//! The driver creates `driver/nvidia/capabilities/gpu<minor>/mig/gi<g>/access`
//! and `.../gi<g>/ci<c>/access` (each holding `DeviceFileMinor: <m>`) when
//! an instance is created and removes them when it is destroyed; [`sync`]
//! rewrites the whole `mig` tree of every GPU from the node's state after
//! each change, with minors from the driver's fixed layout
//! ([`MigCapabilities::from_driver_layout`], what the fake backend reports).

use std::path::Path;

use nvdra_gpu::fake::FakeNode;
use nvdra_gpu::imex::{CAPS_DEVICE, CHANNEL_COUNT_PARAM, CHANNELS_DEVICE};
use nvdra_gpu::{ImexInfo, MigCapabilities};

/// Writes the driver's load-time procfs files for `imex`.
pub fn write_driver_files(proc_root: &Path, imex: &ImexInfo) -> Result<(), String> {
    let mut devices = String::from("Character devices:\n195 nvidia\n");
    for (major, name) in [
        (imex.channels_major, CHANNELS_DEVICE),
        (imex.caps_major, CAPS_DEVICE),
    ] {
        if let Some(major) = major {
            devices.push_str(&format!("{major} {name}\n"));
        }
    }
    devices.push_str("\nBlock devices:\n");
    let mut files = vec![
        ("devices".to_owned(), devices),
        (
            "driver/nvidia/params".to_owned(),
            format!(
                "ModifyDeviceFiles: 1\n{CHANNEL_COUNT_PARAM}: {}\n",
                imex.channel_count
            ),
        ),
    ];
    if let Some(minor) = imex.fabric_mgmt_minor {
        files.push((
            "driver/nvidia/capabilities/fabric-imex-mgmt".to_owned(),
            format!("DeviceFileMinor: {minor}\nDeviceFileMode: 256\nDeviceFileModify: 1\n"),
        ));
    }
    for (name, text) in files {
        let file = proc_root.join(name);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    Ok(())
}

/// Makes `<proc_root>/driver/nvidia/capabilities/gpu*/mig` describe exactly
/// the MIG devices of `node`.
pub fn sync(proc_root: &Path, node: &FakeNode) -> Result<(), String> {
    let caps = proc_root.join("driver/nvidia/capabilities");
    for gpu in &node.inventory.gpus {
        let mig_dir = caps.join(format!("gpu{}", gpu.info.minor)).join("mig");
        match std::fs::remove_dir_all(&mig_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot clear {}: {e}", mig_dir.display())),
        }
        for mig in &gpu.mig_devices {
            let minors = MigCapabilities::from_driver_layout(gpu.info.minor, mig.gi_id, mig.ci_id);
            let gi_dir = mig_dir.join(format!("gi{}", mig.gi_id));
            let ci_dir = gi_dir.join(format!("ci{}", mig.ci_id));
            std::fs::create_dir_all(&ci_dir)
                .map_err(|e| format!("cannot create {}: {e}", ci_dir.display()))?;
            for (dir, minor) in [(&gi_dir, minors.gi_minor), (&ci_dir, minors.ci_minor)] {
                let file = dir.join("access");
                std::fs::write(
                    &file,
                    format!("DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"),
                )
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvdra_gpu::fake::{FakeProfile, GpuModel};
    use nvdra_gpu::{CapabilityReader, ImexReader};

    #[test]
    fn the_agent_reader_finds_the_layout_minors() {
        let mut p = FakeProfile::uniform(GpuModel::H100Sxm5_80gb, 2);
        p.gpus[1].mig_enabled = true;
        let mut node = FakeNode::new(p.resolve("test").unwrap());
        let gi = node.create_gpu_instance(1, 19, 2).unwrap();
        let mig = node.create_compute_instance(1, gi).unwrap();
        let proc_root = tempfile::tempdir().unwrap();
        sync(proc_root.path(), &node).unwrap();
        let reader = CapabilityReader::new(proc_root.path());
        assert_eq!(
            reader.mig(1, mig.gi_id, mig.ci_id).unwrap(),
            MigCapabilities::from_driver_layout(1, mig.gi_id, mig.ci_id)
        );
        node.destroy_compute_instance(1, gi, 0).unwrap();
        sync(proc_root.path(), &node).unwrap();
        assert!(reader.mig(1, mig.gi_id, mig.ci_id).is_err());
    }

    #[test]
    fn the_agent_reader_finds_the_imex_numbers() {
        let proc_root = tempfile::tempdir().unwrap();
        for imex in [ImexInfo::fake(64), ImexInfo::fake(2048)] {
            write_driver_files(proc_root.path(), &imex).unwrap();
            assert_eq!(ImexReader::new(proc_root.path()).read().unwrap(), imex);
        }
    }
}

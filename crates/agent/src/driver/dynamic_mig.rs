//! DynamicMIG's host side: Prepare creates the MIG device of each allocated
//! partition, and Unprepare, a rollback or start-up destroys it.
//!
//! A partition's MIG device is found by where it is (its GPU, GPU-instance
//! profile and placement start), never by a recorded instance ID: a
//! placement holds at most one instance, and the scheduler's counters give
//! each placement to one claim. So a claim whose record was lost (a crash
//! before `PrepareCompleted`, a checkpoint rebuilt from the API server) is
//! still undone exactly.
//!
//! MIG mode: Prepare turns it on before creating (Hopper and later switch
//! without a reset); Unprepare turns it off again once the GPU has no MIG
//! device left, except on Ampere, where upstream keeps it on. Prepare of a
//! full GPU that is partitioned dynamically turns MIG off first, which the
//! driver refuses while instances exist; the counters make that impossible
//! for allocated devices.
//!
//! Failure modes: a create error fails the claim with the driver's refusal
//! (e.g. insufficient resources: an out-of-band instance occupies the
//! placement); devices created earlier in the same Prepare are destroyed
//! first. Destroy errors are logged; start-up retries them.

use std::collections::BTreeMap;

use nvdra_gpu::{Architecture, GpuBackend, GpuInfo, MigDeviceInfo};
use nvdra_kubelet_plugin::error::error_chain;

use crate::checkpoint::{CheckpointState, ClaimEntry};
use crate::devices::AllocatableDevice;
use crate::devices::partitions::Partition;

/// The GPU as it is once MIG is on (the published info may predate that).
fn with_mig(gpu: &GpuInfo) -> GpuInfo {
    let mut gpu = gpu.clone();
    gpu.mig_enabled = true;
    gpu
}

/// Creates `partition`'s MIG device, turning MIG on first.
pub(super) fn create(
    backend: &dyn GpuBackend,
    partition: &Partition,
) -> Result<MigDeviceInfo, nvdra_gpu::Error> {
    let parent = with_mig(&partition.parent);
    backend.set_mig_mode(&parent, true)?;
    backend.create_mig_device(
        &parent,
        partition.profile.gi_profile_id,
        partition.placement.start,
    )
}

/// The MIG device that exists at `partition`'s placement, if any.
pub(super) fn find(
    backend: &dyn GpuBackend,
    partition: &Partition,
) -> Result<Option<MigDeviceInfo>, nvdra_gpu::Error> {
    Ok(backend
        .mig_devices(&with_mig(&partition.parent))?
        .into_iter()
        .find(|m| {
            m.gi_profile_id == partition.profile.gi_profile_id
                && m.placement.start == partition.placement.start
        }))
}

/// Destroys the MIG device at `partition`'s placement (if one exists), then
/// turns MIG off when the GPU has none left (not on Ampere). Errors are
/// logged.
pub(super) fn destroy(backend: &dyn GpuBackend, partition: &Partition, claim: &str) {
    let name = partition.name();
    let destroyed = find(backend, partition).and_then(|found| match found {
        Some(mig) => backend.destroy_mig_device(&mig).map(|()| true),
        None => Ok(false),
    });
    match destroyed {
        Ok(true) => tracing::debug!(claim, device = %name, "MIG device destroyed"),
        Ok(false) => tracing::debug!(claim, device = %name, "no MIG device to destroy"),
        Err(err) => {
            tracing::warn!(claim, device = %name, error = %error_chain(&err), "cannot destroy the MIG device; start-up retries");
            return;
        }
    }
    mig_off_when_unused(backend, &partition.parent, claim);
}

fn mig_off_when_unused(backend: &dyn GpuBackend, gpu: &GpuInfo, claim: &str) {
    if gpu.architecture == Architecture::Ampere {
        return;
    }
    let gpu = with_mig(gpu);
    let off = backend.mig_devices(&gpu).and_then(|left| {
        if left.is_empty() {
            backend.set_mig_mode(&gpu, false).map(|()| true)
        } else {
            Ok(false)
        }
    });
    match off {
        Ok(true) => tracing::debug!(claim, gpu = %gpu.uuid, "MIG mode off"),
        Ok(false) => {}
        Err(err) => {
            tracing::warn!(claim, gpu = %gpu.uuid, error = %error_chain(&err), "cannot turn MIG mode off")
        }
    }
}

/// Whether the GPU with `minor` is partitioned dynamically on this node.
pub(super) fn is_partitioned(devices: &BTreeMap<String, AllocatableDevice>, minor: u32) -> bool {
    devices
        .values()
        .any(|d| matches!(d, AllocatableDevice::Partition(p) if p.parent.minor == minor))
}

/// Turns MIG off on a dynamically partitioned GPU about to be used whole.
pub(super) fn prepare_full_gpu(
    backend: &dyn GpuBackend,
    gpu: &GpuInfo,
) -> Result<(), nvdra_gpu::Error> {
    backend.set_mig_mode(&with_mig(gpu), false)
}

/// The partitions `entry` was allocated, except admin-access ones (those
/// belong to the claim that holds them normally; an admin-access claim
/// neither creates nor destroys them).
pub(super) fn partitions_of<'a>(
    devices: &'a BTreeMap<String, AllocatableDevice>,
    entry: &ClaimEntry,
) -> Vec<&'a Partition> {
    entry
        .allocated_devices
        .iter()
        .filter(|d| !d.admin_access)
        .filter_map(|d| match devices.get(&d.device) {
            Some(AllocatableDevice::Partition(p)) => Some(p),
            _ => None,
        })
        .collect()
}

/// Start-up: destroys every MIG device on a dynamically partitioned GPU
/// that no claim in `state` holds (left by a crash, or created out of band,
/// which DynamicMIG does not support). Returns the UUIDs destroyed.
pub(crate) fn tear_down_unowned(
    backend: &dyn GpuBackend,
    devices: &BTreeMap<String, AllocatableDevice>,
    state: &CheckpointState,
) -> Vec<String> {
    let held: Vec<&Partition> = state
        .claims()
        .flat_map(|(_, entry)| partitions_of(devices, entry))
        .collect();
    let mut gpus: BTreeMap<u32, &GpuInfo> = BTreeMap::new();
    for device in devices.values() {
        if let AllocatableDevice::Partition(p) = device {
            gpus.insert(p.parent.minor, &p.parent);
        }
    }
    let mut destroyed = Vec::new();
    for gpu in gpus.values() {
        let existing = match backend.mig_devices(&with_mig(gpu)) {
            Ok(existing) => existing,
            Err(err) => {
                tracing::warn!(gpu = %gpu.uuid, error = %error_chain(&err), "cannot list MIG devices at start-up");
                continue;
            }
        };
        for mig in existing {
            let owned = held.iter().any(|p| {
                p.parent.uuid == mig.parent_uuid
                    && p.profile.gi_profile_id == mig.gi_profile_id
                    && p.placement.start == mig.placement.start
            });
            if owned {
                continue;
            }
            match backend.destroy_mig_device(&mig) {
                Ok(()) => {
                    tracing::info!(gpu = %gpu.uuid, mig = %mig.uuid, device = %mig.device_name(), "destroyed a MIG device no claim holds");
                    destroyed.push(mig.uuid);
                }
                Err(err) => {
                    tracing::warn!(mig = %mig.uuid, error = %error_chain(&err), "cannot destroy a MIG device no claim holds")
                }
            }
        }
        mig_off_when_unused(backend, gpu, "start-up");
    }
    destroyed
}

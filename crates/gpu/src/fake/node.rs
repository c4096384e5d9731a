//! [`FakeNode`]: the mutable state of a simulated node, and the MIG rules
//! the driver enforces when that state changes.
//!
//! The fake backend and the mock NVML library (`crates/nvml-mock`) both keep
//! a `FakeNode`, so a MIG change is accepted or refused identically by both;
//! the equivalence suite then only has to prove that the NVML backend
//! translates faithfully.
//!
//! Model: a GPU instance (GI) is created first and occupies its placement
//! at once; a compute instance (CI) spanning the whole GI makes it a MIG
//! device (the only CI shape nvdra creates, as upstream). Until then the GI
//! is *bare*: it holds memory slices and an ID but is not a device.
//!
//! Rules, each refusal one NVML return code ([`MigRefusal`]):
//! - MIG mode can be switched only on MIG-capable GPUs, and off only while
//!   no GI exists;
//! - a GI needs MIG on, a profile of the GPU's table, one of that profile's
//!   placements, a placement free of every other GI, and a free instance of
//!   the profile;
//! - GI IDs: the full-GPU profile gets 0, others the lowest free ID from 1
//!   (real drivers derive IDs from the placement; nothing in nvdra may rely
//!   on either rule); the CI of a GI gets ID 0;
//! - a GI with a CI cannot be destroyed; a CI can, leaving its GI bare.
//!
//! MIG device UUIDs of created devices are derived from the parent's UUID
//! and a per-node creation counter, so runs are reproducible.
//!
//! Health events: the node keeps every event injected into it in an
//! append-only log ([`FakeNode::inject_health_event`]); each watch (a
//! `FakeBackend` health watch, or an event set of the mock library) reads it
//! from its own cursor, so every watch sees every event that came after it
//! started, as every NVML event set does. The log lives only in memory (it
//! is not part of the state file) and grows by one entry per event, which a
//! simulation can afford. GPUs whose profile says `health_events: false`
//! support no event type, so a watch leaves them unmonitored.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::backend::{GpuInventory, Inventory};
use crate::health::HealthEvent;
use crate::mig::{MigDeviceInfo, MigPlacement, MigProfile, MigRefusal};
use crate::sharing::{ComputeMode, TimeSlice};

/// Highest GPU-instance ID the driver hands out.
const MAX_GI_ID: u32 = 14;

/// A GPU instance that has no compute instance yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BareGpuInstance {
    /// Index of its GPU.
    pub gpu: u32,
    /// GPU-instance ID.
    pub gi_id: u32,
    /// GPU-instance profile ID.
    pub gi_profile_id: u32,
    /// Its placement.
    pub placement: MigPlacement,
}

/// A GPU instance as NVML describes it (`nvmlGpuInstanceInfo_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuInstanceView {
    /// GPU-instance ID.
    pub gi_id: u32,
    /// GPU-instance profile ID.
    pub gi_profile_id: u32,
    /// Its placement.
    pub placement: MigPlacement,
    /// The ID of its compute instance, if it has one.
    pub ci_id: Option<u32>,
}

/// A simulated node's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeNode {
    /// GPUs and their MIG devices.
    pub inventory: Inventory,
    /// GPU instances without a compute instance.
    #[serde(default)]
    pub bare_gpu_instances: Vec<BareGpuInstance>,
    /// MIG devices created so far; seeds the next device's UUID.
    #[serde(default)]
    pub created: u64,
    /// Compute modes other than the default, by GPU UUID.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compute_modes: BTreeMap<String, ComputeMode>,
    /// Time slices other than the default, by GPU UUID.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub time_slices: BTreeMap<String, TimeSlice>,
    /// UUIDs of GPUs that support no health event type.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub without_health_events: BTreeSet<String>,
    /// Every health event injected so far, oldest first; process-local.
    #[serde(skip)]
    pub health_events: Vec<HealthEvent>,
}

impl FakeNode {
    /// A node in the state `inventory` describes.
    pub fn new(inventory: Inventory) -> Self {
        Self {
            inventory,
            bare_gpu_instances: Vec::new(),
            created: 0,
            compute_modes: BTreeMap::new(),
            time_slices: BTreeMap::new(),
            without_health_events: BTreeSet::new(),
            health_events: Vec::new(),
        }
    }

    /// Whether the GPU with `uuid` reports health events.
    pub fn health_events_supported(&self, uuid: &str) -> bool {
        !self.without_health_events.contains(uuid)
    }

    /// Records whether the GPU with `uuid` reports health events.
    pub fn set_health_events_supported(&mut self, uuid: &str, supported: bool) {
        if supported {
            self.without_health_events.remove(uuid);
        } else {
            self.without_health_events.insert(uuid.to_owned());
        }
    }

    /// Appends `event` to the health-event log, as NVML would deliver it
    /// ([`HealthEvent::normalized`]).
    pub fn inject_health_event(&mut self, event: HealthEvent) {
        self.health_events.push(event.normalized());
    }

    /// The compute mode of the GPU with `uuid`.
    pub fn compute_mode(&self, uuid: &str) -> ComputeMode {
        self.compute_modes.get(uuid).copied().unwrap_or_default()
    }

    /// Records the compute mode of the GPU with `uuid`.
    pub fn set_compute_mode(&mut self, uuid: &str, mode: ComputeMode) {
        if mode == ComputeMode::Default {
            self.compute_modes.remove(uuid);
        } else {
            self.compute_modes.insert(uuid.to_owned(), mode);
        }
    }

    /// The time slice of the GPU with `uuid`.
    pub fn time_slice(&self, uuid: &str) -> TimeSlice {
        self.time_slices.get(uuid).copied().unwrap_or_default()
    }

    /// Records the time slice of the GPU with `uuid`.
    pub fn set_time_slice(&mut self, uuid: &str, slice: TimeSlice) {
        if slice == TimeSlice::Default {
            self.time_slices.remove(uuid);
        } else {
            self.time_slices.insert(uuid.to_owned(), slice);
        }
    }

    /// The index of the GPU with `uuid`.
    pub fn gpu_index(&self, uuid: &str) -> Option<usize> {
        self.inventory.gpus.iter().position(|g| g.info.uuid == uuid)
    }

    fn gpu_mut(&mut self, gpu: usize) -> Result<&mut GpuInventory, MigRefusal> {
        self.inventory.gpus.get_mut(gpu).ok_or(MigRefusal::NotFound)
    }

    fn bare(&self, gpu: usize) -> impl Iterator<Item = &BareGpuInstance> {
        self.bare_gpu_instances
            .iter()
            .filter(move |b| b.gpu as usize == gpu)
    }

    /// Every GPU instance of GPU `gpu`, by GI ID.
    pub fn gpu_instances(&self, gpu: usize) -> Vec<GpuInstanceView> {
        let Some(g) = self.inventory.gpus.get(gpu) else {
            return Vec::new();
        };
        let mut all: Vec<GpuInstanceView> = g
            .mig_devices
            .iter()
            .map(|m| GpuInstanceView {
                gi_id: m.gi_id,
                gi_profile_id: m.gi_profile_id,
                placement: m.placement,
                ci_id: Some(m.ci_id),
            })
            .chain(self.bare(gpu).map(|b| GpuInstanceView {
                gi_id: b.gi_id,
                gi_profile_id: b.gi_profile_id,
                placement: b.placement,
                ci_id: None,
            }))
            .collect();
        all.sort_by_key(|v| v.gi_id);
        all
    }

    /// GPU instance `gi_id` of GPU `gpu`.
    pub fn gpu_instance(&self, gpu: usize, gi_id: u32) -> Option<GpuInstanceView> {
        self.gpu_instances(gpu)
            .into_iter()
            .find(|v| v.gi_id == gi_id)
    }

    /// Turns MIG mode on or off on GPU `gpu`.
    pub fn set_mig_mode(&mut self, gpu: usize, enabled: bool) -> Result<(), MigRefusal> {
        let in_use = !self.gpu_instances(gpu).is_empty();
        let g = self.gpu_mut(gpu)?;
        if !g.info.mig_capable {
            return Err(MigRefusal::NotSupported);
        }
        if !enabled && in_use {
            return Err(MigRefusal::InUse);
        }
        g.info.mig_enabled = enabled;
        Ok(())
    }

    /// Creates a GPU instance of `gi_profile_id` at `placement_start` on
    /// GPU `gpu`; returns its GI ID.
    pub fn create_gpu_instance(
        &mut self,
        gpu: usize,
        gi_profile_id: u32,
        placement_start: u32,
    ) -> Result<u32, MigRefusal> {
        let existing = self.gpu_instances(gpu);
        let g = self.inventory.gpus.get(gpu).ok_or(MigRefusal::NotFound)?;
        if !g.info.mig_enabled {
            return Err(MigRefusal::NotSupported);
        }
        let profile = profile(g, gi_profile_id)?;
        let placement = profile
            .placements
            .iter()
            .find(|p| p.start == placement_start)
            .copied()
            .ok_or(MigRefusal::InvalidArgument)?;
        let same = existing
            .iter()
            .filter(|v| v.gi_profile_id == gi_profile_id)
            .count();
        if same >= profile.instance_count as usize
            || existing.iter().any(|v| v.placement.overlaps(&placement))
        {
            return Err(MigRefusal::InsufficientResources);
        }
        let full_gpu =
            g.mig_profiles.iter().map(|p| p.slice_count).max() == Some(profile.slice_count);
        let free = |id: &u32| existing.iter().all(|v| v.gi_id != *id);
        let gi_id = if full_gpu && free(&0) {
            0
        } else {
            (1..=MAX_GI_ID)
                .find(free)
                .ok_or(MigRefusal::InsufficientResources)?
        };
        self.bare_gpu_instances.push(BareGpuInstance {
            gpu: g.info.index,
            gi_id,
            gi_profile_id,
            placement,
        });
        Ok(gi_id)
    }

    /// Creates the compute instance spanning GPU instance `gi_id`, which
    /// makes it a MIG device.
    pub fn create_compute_instance(
        &mut self,
        gpu: usize,
        gi_id: u32,
    ) -> Result<MigDeviceInfo, MigRefusal> {
        let view = self.gpu_instance(gpu, gi_id).ok_or(MigRefusal::NotFound)?;
        if view.ci_id.is_some() {
            // One full-size CI per GI is all this model (and nvdra) creates.
            return Err(MigRefusal::InsufficientResources);
        }
        let serial = self.created;
        let g = self.gpu_mut(gpu)?;
        let profile = profile(g, view.gi_profile_id)?.clone();
        let device = MigDeviceInfo {
            uuid: mig_uuid(&g.info.uuid, serial),
            parent_uuid: g.info.uuid.clone(),
            parent_minor: g.info.minor,
            profile: profile.name,
            gi_profile_id: view.gi_profile_id,
            gi_id,
            ci_id: 0,
            placement: view.placement,
            capacities: profile.capacities,
        };
        g.mig_devices.push(device.clone());
        g.mig_devices.sort_by_key(|m| (m.gi_id, m.ci_id));
        self.created += 1;
        self.bare_gpu_instances
            .retain(|b| !(b.gpu as usize == gpu && b.gi_id == gi_id));
        Ok(device)
    }

    /// Destroys compute instance `ci_id` of GPU instance `gi_id`, leaving
    /// the GPU instance bare.
    pub fn destroy_compute_instance(
        &mut self,
        gpu: usize,
        gi_id: u32,
        ci_id: u32,
    ) -> Result<(), MigRefusal> {
        let g = self.gpu_mut(gpu)?;
        let at = g
            .mig_devices
            .iter()
            .position(|m| m.gi_id == gi_id && m.ci_id == ci_id)
            .ok_or(MigRefusal::NotFound)?;
        let device = g.mig_devices.remove(at);
        let index = g.info.index;
        self.bare_gpu_instances.push(BareGpuInstance {
            gpu: index,
            gi_id,
            gi_profile_id: device.gi_profile_id,
            placement: device.placement,
        });
        Ok(())
    }

    /// Destroys bare GPU instance `gi_id`.
    pub fn destroy_gpu_instance(&mut self, gpu: usize, gi_id: u32) -> Result<(), MigRefusal> {
        match self.gpu_instance(gpu, gi_id) {
            None => Err(MigRefusal::NotFound),
            Some(v) if v.ci_id.is_some() => Err(MigRefusal::InUse),
            Some(_) => {
                self.bare_gpu_instances
                    .retain(|b| !(b.gpu as usize == gpu && b.gi_id == gi_id));
                Ok(())
            }
        }
    }
}

fn profile(g: &GpuInventory, gi_profile_id: u32) -> Result<&MigProfile, MigRefusal> {
    g.mig_profiles
        .iter()
        .find(|p| p.gi_profile_id == gi_profile_id)
        .ok_or(MigRefusal::InvalidArgument)
}

/// A UUID-shaped `MIG-...` string derived from the parent GPU's UUID and a
/// creation counter.
pub fn mig_uuid(parent_uuid: &str, serial: u64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent_uuid.bytes().chain(serial.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let lo = h.rotate_left(29) ^ serial.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!(
        "MIG-{:08x}-{:04x}-5{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (lo >> 52) & 0xfff,
        lo & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeProfile, GpuModel};
    use pretty_assertions::assert_eq;

    fn h100(mig_enabled: bool) -> FakeNode {
        let mut p = FakeProfile::uniform(GpuModel::H100Sxm5_80gb, 2);
        p.gpus[0].mig_enabled = mig_enabled;
        FakeNode::new(p.resolve("test").unwrap())
    }

    fn create(node: &mut FakeNode, id: u32, start: u32) -> Result<MigDeviceInfo, MigRefusal> {
        let gi = node.create_gpu_instance(0, id, start)?;
        node.create_compute_instance(0, gi)
    }

    #[test]
    fn create_and_destroy_round_trip() {
        let mut node = h100(true);
        let before = node.clone();
        let a = create(&mut node, 19, 3).unwrap();
        assert_eq!(
            (a.profile.as_str(), a.gi_id, a.ci_id, a.placement.start),
            ("1g.10gb", 1, 0, 3)
        );
        assert_eq!(a.device_name(), "gpu-0-mig-1g10gb-19-3");
        let b = create(&mut node, 9, 4).unwrap();
        assert_eq!((b.gi_id, b.profile.as_str()), (2, "3g.40gb"));
        assert_ne!(a.uuid, b.uuid);
        assert_eq!(node.inventory.gpus[0].mig_devices, [a.clone(), b.clone()]);

        node.destroy_compute_instance(0, 1, 0).unwrap();
        assert_eq!(node.gpu_instance(0, 1).unwrap().ci_id, None);
        assert_eq!(node.destroy_gpu_instance(0, 2), Err(MigRefusal::InUse));
        node.destroy_gpu_instance(0, 1).unwrap();
        node.destroy_compute_instance(0, 2, 0).unwrap();
        node.destroy_gpu_instance(0, 2).unwrap();
        assert_eq!(node.inventory, before.inventory);
        assert!(node.bare_gpu_instances.is_empty());
    }

    #[test]
    fn refusals_follow_the_driver() {
        let mut node = h100(true);
        // Overlap and used-up instances.
        create(&mut node, 9, 0).unwrap();
        assert_eq!(
            node.create_gpu_instance(0, 19, 2),
            Err(MigRefusal::InsufficientResources)
        );
        assert_eq!(
            node.create_gpu_instance(0, 5, 0),
            Err(MigRefusal::InsufficientResources)
        );
        create(&mut node, 20, 4).unwrap();
        assert_eq!(
            node.create_gpu_instance(0, 20, 5),
            Err(MigRefusal::InsufficientResources)
        );
        // Unknown profile, placement not of the profile.
        assert_eq!(
            node.create_gpu_instance(0, 1, 0),
            Err(MigRefusal::InvalidArgument)
        );
        assert_eq!(
            node.create_gpu_instance(0, 14, 1),
            Err(MigRefusal::InvalidArgument)
        );
        // MIG off, MIG in use.
        assert_eq!(
            node.create_gpu_instance(1, 19, 0),
            Err(MigRefusal::NotSupported)
        );
        assert_eq!(node.set_mig_mode(0, false), Err(MigRefusal::InUse));
        // A bare GI also blocks turning MIG off.
        let mut bare = h100(true);
        bare.create_gpu_instance(0, 19, 0).unwrap();
        assert_eq!(bare.set_mig_mode(0, false), Err(MigRefusal::InUse));
        assert_eq!(
            bare.create_compute_instance(0, 5),
            Err(MigRefusal::NotFound)
        );
        assert_eq!(
            bare.destroy_compute_instance(0, 1, 0),
            Err(MigRefusal::NotFound)
        );
    }

    #[test]
    fn mode_switch_and_full_gpu_id() {
        let mut node = h100(false);
        node.set_mig_mode(1, true).unwrap();
        assert!(node.inventory.gpus[1].info.mig_enabled);
        let gi = node.create_gpu_instance(1, 0, 0).unwrap();
        assert_eq!(gi, 0, "the full-GPU profile gets GI 0");
        node.destroy_gpu_instance(1, 0).unwrap();
        node.set_mig_mode(1, false).unwrap();

        let mut l4 = FakeNode::new(
            FakeProfile::uniform(GpuModel::L4, 1)
                .resolve("test")
                .unwrap(),
        );
        assert_eq!(l4.set_mig_mode(0, true), Err(MigRefusal::NotSupported));
        assert_eq!(l4.set_mig_mode(3, true), Err(MigRefusal::NotFound));
    }

    #[test]
    fn seven_one_slice_instances_fill_the_gpu() {
        let mut node = h100(true);
        for start in 0..7 {
            create(&mut node, 19, start).unwrap();
        }
        let ids: Vec<u32> = node.inventory.gpus[0]
            .mig_devices
            .iter()
            .map(|m| m.gi_id)
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            node.create_gpu_instance(0, 19, 0),
            Err(MigRefusal::InsufficientResources)
        );
    }

    #[test]
    fn mig_uuids_are_stable_and_well_formed() {
        let a = mig_uuid("GPU-00000000-0000-4000-8000-000000000000", 0);
        assert_eq!(a, mig_uuid("GPU-00000000-0000-4000-8000-000000000000", 0));
        assert_ne!(a, mig_uuid("GPU-00000000-0000-4000-8000-000000000000", 1));
        assert!(
            a.strip_prefix("MIG-")
                .is_some_and(|u| u.parse::<crate::fabric::ClusterUuid>().is_ok()),
            "{a}"
        );
    }
}

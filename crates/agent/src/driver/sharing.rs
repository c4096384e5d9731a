//! The host side of time-slicing: what Prepare applies to a claim's full GPUs
//! and what Unprepare (or a rollback) undoes.
//!
//! Prepare sets compute mode `Default` and then the group's time slice on
//! every full GPU of a `TimeSlicing` group, and records the slice in the
//! group's config state ([`TIME_SLICE_KEY`]). Unprepare resets every GPU of
//! such a group to the default slice and compute mode, as upstream does.
//! Time-slicing of a MIG device is accepted and does nothing (the driver has
//! no per-MIG-device slice), as upstream.
//!
//! Invariants: a failed apply resets the GPUs it already changed before
//! returning, so a failed Prepare leaves no GPU changed. A Prepare
//! interrupted by a crash has no config state yet; its rollback resets the
//! claim's full GPUs when the `TimeSlicingSettings` gate is on. That is
//! always safe: an allocated GPU belongs to that one claim.
//!
//! Failure modes: an apply error fails the claim with the device and the
//! driver's message; a reset error is logged and does not fail Unprepare
//! (the next claim of the GPU sets its own slice whenever the gate is on).

use nvdra_api::config::{GpuConfig, SharingStrategy, TimeSliceInterval};
use nvdra_gpu::{ComputeMode, GpuBackend, GpuInfo, TimeSlice};
use nvdra_kubelet_plugin::error::error_chain;
use serde_json::{Map, Value};

use std::collections::BTreeMap;

use nvdra_api::{FeatureGate, FeatureGates};

use crate::checkpoint::{ClaimEntry, ClaimState, DeviceInfo};
use crate::config::ResolvedConfig;
use crate::devices::AllocatableDevice;

/// The config-state key recording the slice a group was given.
pub(crate) const TIME_SLICE_KEY: &str = "timeSlice";

/// The time slice a group's config asks for; `None` when it asks for none
/// (no sharing, MPS, MIG devices).
pub(super) fn time_slice_of(config: &ResolvedConfig) -> Option<TimeSlice> {
    let ResolvedConfig::Gpu(GpuConfig {
        sharing: Some(sharing),
    }) = config
    else {
        return None;
    };
    if sharing.strategy != SharingStrategy::TimeSlicing {
        return None;
    }
    let interval = sharing
        .time_slicing_config
        .as_ref()
        .map_or(TimeSliceInterval::Default, |c| c.effective_interval());
    Some(match interval {
        TimeSliceInterval::Short => TimeSlice::Short,
        TimeSliceInterval::Medium => TimeSlice::Medium,
        TimeSliceInterval::Long => TimeSlice::Long,
        // Validation rejects unknown intervals before a claim gets here.
        TimeSliceInterval::Default | TimeSliceInterval::Unknown(_) => TimeSlice::Default,
    })
}

/// Why a time slice could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("cannot set time slice {slice:?} on GPU {gpu}")]
pub struct ApplyError {
    /// The GPU's UUID.
    pub gpu: String,
    /// The slice asked for.
    pub slice: TimeSlice,
    /// The device layer's error.
    #[source]
    pub source: nvdra_gpu::Error,
}

/// Applies `slice` to `gpus`; returns the config state to record. On error
/// the GPUs already changed are reset first.
pub(super) fn apply(
    backend: &dyn GpuBackend,
    gpus: &[&GpuInfo],
    slice: TimeSlice,
    claim: &str,
) -> Result<Map<String, Value>, Box<ApplyError>> {
    for (done, gpu) in gpus.iter().enumerate() {
        let applied = backend
            .set_compute_mode(gpu, ComputeMode::Default)
            .and_then(|()| backend.set_time_slice(gpu, slice));
        if let Err(source) = applied {
            reset(backend, gpus[..done].iter().copied(), claim);
            return Err(Box::new(ApplyError {
                gpu: gpu.uuid.clone(),
                slice,
                source,
            }));
        }
        tracing::debug!(claim, gpu = %gpu.uuid, ?slice, "time slice set");
    }
    let mut state = Map::new();
    state.insert(
        TIME_SLICE_KEY.to_owned(),
        Value::String(format!("{slice:?}")),
    );
    Ok(state)
}

/// Whether a group's recorded config state says it was time-sliced.
pub(super) fn was_time_sliced(config_state: &Map<String, Value>) -> bool {
    config_state.contains_key(TIME_SLICE_KEY)
}

/// The GPUs whose time slice must be reset when `entry` goes: those of its
/// time-sliced groups once prepared; for a prepare that never completed
/// (no groups recorded) and with the `TimeSlicingSettings` gate on, every
/// full GPU it was allocated, except admin-access ones (other claims may
/// hold those).
pub(crate) fn gpus_to_reset<'a>(
    devices: &'a BTreeMap<String, AllocatableDevice>,
    gates: &FeatureGates,
    entry: &ClaimEntry,
) -> Vec<&'a GpuInfo> {
    let gpu = |device: &'a AllocatableDevice| match device {
        AllocatableDevice::Gpu { info } => Some(info),
        AllocatableDevice::Mig { .. } | AllocatableDevice::Partition(_) => None,
    };
    match entry.state {
        ClaimState::PrepareStarted if gates.enabled(FeatureGate::TimeSlicingSettings) => entry
            .allocated_devices
            .iter()
            .filter(|d| !d.admin_access)
            .filter_map(|d| devices.get(&d.device).and_then(gpu))
            .collect(),
        _ => entry
            .prepared_devices
            .iter()
            .filter(|group| was_time_sliced(&group.config_state))
            .flat_map(|group| &group.devices)
            .filter_map(|d| match &d.info {
                DeviceInfo::Gpu(prepared) => devices
                    .values()
                    .filter_map(gpu)
                    .find(|info| info.uuid == prepared.uuid),
                _ => None,
            })
            .collect(),
    }
}

/// Resets `gpus` to the default time slice and compute mode; failures are
/// logged.
pub(crate) fn reset<'a>(
    backend: &dyn GpuBackend,
    gpus: impl IntoIterator<Item = &'a GpuInfo>,
    claim: &str,
) {
    for gpu in gpus {
        let reset = backend
            .set_time_slice(gpu, TimeSlice::Default)
            .and_then(|()| backend.set_compute_mode(gpu, ComputeMode::Default));
        match reset {
            Ok(()) => tracing::debug!(claim, gpu = %gpu.uuid, "time slice reset"),
            Err(err) => tracing::warn!(
                claim,
                gpu = %gpu.uuid,
                error = %error_chain(&err),
                "cannot reset the GPU's time slice; the next time-sliced claim sets its own"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvdra_api::config::{GpuSharing, TimeSlicingConfig};
    use nvdra_gpu::FakeBackend;

    fn ts(interval: Option<TimeSliceInterval>) -> ResolvedConfig {
        ResolvedConfig::Gpu(GpuConfig {
            sharing: Some(GpuSharing {
                strategy: SharingStrategy::TimeSlicing,
                time_slicing_config: interval.map(|i| TimeSlicingConfig { interval: Some(i) }),
                mps_config: None,
            }),
        })
    }

    #[test]
    fn slices_from_configs() {
        assert_eq!(time_slice_of(&ts(None)), Some(TimeSlice::Default));
        assert_eq!(
            time_slice_of(&ts(Some(TimeSliceInterval::Long))),
            Some(TimeSlice::Long)
        );
        assert_eq!(
            time_slice_of(&ResolvedConfig::Gpu(GpuConfig { sharing: None })),
            None
        );
    }

    #[test]
    fn apply_records_and_reset_undoes() {
        let fake = FakeBackend::builtin("l4-x2").unwrap().unwrap();
        let gpus = fake.gpus().unwrap();
        let refs: Vec<&GpuInfo> = gpus.iter().collect();
        fake.set_compute_mode(&gpus[1], ComputeMode::ExclusiveProcess)
            .unwrap();
        let state = apply(&fake, &refs, TimeSlice::Medium, "c").unwrap();
        assert!(was_time_sliced(&state));
        assert_eq!(state[TIME_SLICE_KEY], "Medium");
        assert_eq!(fake.time_slice(&gpus[1].uuid), TimeSlice::Medium);
        assert_eq!(fake.compute_mode(&gpus[1]).unwrap(), ComputeMode::Default);
        reset(&fake, refs.iter().copied(), "c");
        assert_eq!(fake.time_slice(&gpus[0].uuid), TimeSlice::Default);
    }

    #[test]
    fn a_failed_apply_leaves_nothing_changed() {
        let fake = FakeBackend::builtin("l4-x2").unwrap().unwrap();
        let gpus = fake.gpus().unwrap();
        let mut stranger = gpus[0].clone();
        stranger.uuid = "GPU-00000000-0000-4000-8000-0000000000ff".into();
        let err = apply(&fake, &[&gpus[0], &stranger], TimeSlice::Long, "c").unwrap_err();
        assert_eq!(err.gpu, stranger.uuid);
        assert_eq!(fake.time_slice(&gpus[0].uuid), TimeSlice::Default);
    }
}

//! The host side of sharing: what Prepare applies to a claim's devices for
//! time-slicing and MPS, and what Unprepare (or a rollback) undoes.
//!
//! Time-slicing: Prepare sets compute mode `Default` and then the group's
//! time slice on every full GPU of a `TimeSlicing` group, and records the
//! slice in the group's config state ([`TIME_SLICE_KEY`]). Unprepare resets
//! every GPU of such a group to the default slice and compute mode, as
//! upstream does. Time-slicing of a MIG device is accepted and does nothing
//! (the driver has no per-MIG-device slice), as upstream.
//!
//! MPS: Prepare sets compute mode `ExclusiveProcess` on the group's full
//! GPUs (MIG devices have no compute mode of their own), then starts the
//! group's control daemon ([`crate::mps`]) with the claim's limits, and
//! records the daemon's ID ([`crate::mps::DAEMON_ID_KEY`]). Unprepare stops
//! the claim's daemons and restores compute mode `Default`, whether or not
//! the time-slicing gate is on (upstream forgets this without it).
//!
//! Invariants: a failed apply resets the GPUs it already changed before
//! returning, so a failed Prepare leaves no GPU changed and no daemon
//! running. A Prepare interrupted by a crash has no config state yet; its
//! rollback resets the claim's full GPUs when the `TimeSlicingSettings` or
//! `MPSSupport` gate is on, and stops the claim's daemons (found by their
//! directories). That is always safe: an allocated GPU belongs to that one
//! claim.
//!
//! Failure modes: an apply error fails the claim with the device and the
//! driver's (or daemon's) message; a reset error is logged and does not fail
//! Unprepare (the next claim of the GPU sets what it needs).

use nvdra_api::config::{
    ConfigError, GpuConfig, MigDeviceConfig, MpsConfig, SharingStrategy, TimeSliceInterval,
};
use nvdra_gpu::{ComputeMode, GpuBackend, GpuInfo, TimeSlice};
use nvdra_kubelet_plugin::error::error_chain;
use serde_json::{Map, Value};

use std::collections::BTreeMap;

use nvdra_api::{FeatureGate, FeatureGates};

use crate::checkpoint::{ClaimEntry, ClaimState, DeviceInfo};
use crate::config::ResolvedConfig;
use crate::devices::AllocatableDevice;
use crate::mps::{DAEMON_ID_KEY, DaemonSpec, MpsDaemons};

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

/// The MPS settings a group's config asks for; `None` when it does not use
/// MPS.
pub(super) fn mps_of(config: &ResolvedConfig) -> Option<MpsConfig> {
    let (strategy, mps) = match config {
        ResolvedConfig::Gpu(GpuConfig {
            sharing: Some(sharing),
        }) => (&sharing.strategy, &sharing.mps_config),
        ResolvedConfig::Mig(MigDeviceConfig {
            sharing: Some(sharing),
        }) => (&sharing.strategy, &sharing.mps_config),
        _ => return None,
    };
    (*strategy == SharingStrategy::Mps).then(|| mps.clone().unwrap_or_default())
}

/// Why MPS could not be set up for a group.
#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    /// The group's limits do not fit its devices.
    #[error("invalid MpsConfig for the claim's devices")]
    Limits(#[source] ConfigError),
    /// A GPU's compute mode could not be set.
    #[error("cannot set compute mode EXCLUSIVE_PROCESS on GPU {gpu} for MPS")]
    ComputeMode {
        /// The GPU's UUID.
        gpu: String,
        /// The device layer's error.
        #[source]
        source: nvdra_gpu::Error,
    },
    /// The control daemon could not be started.
    #[error(transparent)]
    Daemon(crate::mps::Error),
}

/// Sets up MPS for one group: exclusive-process compute mode on
/// `full_gpus`, then the daemon serving `uuids` (the group's GPUs and MIG
/// devices); returns the config state to record. On error the GPUs are reset
/// and no daemon runs.
pub(super) fn start_mps(
    backend: &dyn GpuBackend,
    daemons: &MpsDaemons,
    claim_uid: &str,
    full_gpus: &[&GpuInfo],
    uuids: &[&str],
    config: &MpsConfig,
) -> Result<Map<String, Value>, MpsError> {
    let limits = config
        .pinned_memory_limits(uuids)
        .map_err(MpsError::Limits)?;
    let spec = DaemonSpec::new(
        claim_uid,
        uuids,
        config.default_active_thread_percentage,
        limits,
    );
    for (done, gpu) in full_gpus.iter().enumerate() {
        if let Err(source) = backend.set_compute_mode(gpu, ComputeMode::ExclusiveProcess) {
            reset_compute_mode(backend, full_gpus[..done].iter().copied(), claim_uid);
            return Err(MpsError::ComputeMode {
                gpu: gpu.uuid.clone(),
                source,
            });
        }
    }
    if let Err(err) = daemons.start(&spec) {
        reset_compute_mode(backend, full_gpus.iter().copied(), claim_uid);
        return Err(MpsError::Daemon(err));
    }
    let mut state = Map::new();
    state.insert(DAEMON_ID_KEY.to_owned(), Value::String(spec.id));
    Ok(state)
}

/// The daemon a group's recorded config state names.
pub(crate) fn mps_daemon(config_state: &Map<String, Value>) -> Option<&str> {
    config_state.get(DAEMON_ID_KEY).and_then(Value::as_str)
}

/// The GPUs whose compute mode MPS changed for `entry`: those of its MPS
/// groups once prepared; for a prepare that never completed and with the
/// `MPSSupport` gate on, every full GPU it was allocated except admin-access
/// ones.
pub(crate) fn gpus_to_reset_after_mps<'a>(
    devices: &'a BTreeMap<String, AllocatableDevice>,
    gates: &FeatureGates,
    entry: &ClaimEntry,
) -> Vec<&'a GpuInfo> {
    gpus_of(
        devices,
        entry,
        gates.enabled(FeatureGate::MPSSupport),
        |state| mps_daemon(state).is_some(),
    )
}

/// The full GPUs of `entry`: every non-admin one when the prepare never
/// completed and `all_when_started`, else those of the groups `pick` selects.
fn gpus_of<'a>(
    devices: &'a BTreeMap<String, AllocatableDevice>,
    entry: &ClaimEntry,
    all_when_started: bool,
    pick: impl Fn(&Map<String, Value>) -> bool,
) -> Vec<&'a GpuInfo> {
    let gpu = |device: &'a AllocatableDevice| match device {
        AllocatableDevice::Gpu { info } => Some(info),
        AllocatableDevice::Mig { .. }
        | AllocatableDevice::Partition(_)
        | AllocatableDevice::Vfio(_) => None,
    };
    match entry.state {
        ClaimState::PrepareStarted if all_when_started => entry
            .allocated_devices
            .iter()
            .filter(|d| !d.admin_access)
            .filter_map(|d| devices.get(&d.device).and_then(gpu))
            .collect(),
        _ => entry
            .prepared_devices
            .iter()
            .filter(|group| pick(&group.config_state))
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

/// Stops `claim_uid`'s MPS daemons and restores compute mode `Default` on
/// the GPUs MPS changed.
pub(crate) fn stop_mps<'a>(
    backend: &dyn GpuBackend,
    daemons: &MpsDaemons,
    claim_uid: &str,
    gpus: impl IntoIterator<Item = &'a GpuInfo>,
) {
    daemons.stop_claim(claim_uid);
    reset_compute_mode(backend, gpus, claim_uid);
}

/// Restores compute mode `Default`; failures are logged.
fn reset_compute_mode<'a>(
    backend: &dyn GpuBackend,
    gpus: impl IntoIterator<Item = &'a GpuInfo>,
    claim: &str,
) {
    for gpu in gpus {
        if let Err(err) = backend.set_compute_mode(gpu, ComputeMode::Default) {
            tracing::warn!(
                claim,
                gpu = %gpu.uuid,
                error = %error_chain(&err),
                "cannot restore compute mode Default after MPS"
            );
        }
    }
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
    gpus_of(
        devices,
        entry,
        gates.enabled(FeatureGate::TimeSlicingSettings),
        was_time_sliced,
    )
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

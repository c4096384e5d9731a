//! The NVML backend's health watch: an NVML event set registered for the
//! watched GPUs, waited on without ever occupying the backend's worker.
//!
//! Design: each watch has its own worker thread (module `worker`) holding
//! its own `Nvml` handle (a second `nvmlInit` of the library the backend
//! loaded; NVML counts inits, so the backend's handle is unaffected) and its
//! own event set. [`HealthWatch::wait`] runs NVML waits of at most
//! [`SLICE`] (upstream's 5 s) on that thread, one after another, until an
//! event arrives or the caller's timeout is spent. Rejected alternatives:
//! waiting on the backend's worker would hold it for the whole wait, so
//! `gpus()`, `set_compute_mode()` and every other call would queue behind
//! it (and a wait hung in the driver would make the whole backend
//! unresponsive); a thread pumping events into a channel forever would keep
//! waiting after the consumer stopped, and would need its own stop signal
//! and hang detection, which the worker already has.
//!
//! Invariants: the `Nvml` handle and the event set are created, used and
//! freed on the watch's thread only; the set is freed before that handle
//! shuts NVML down. Events stay queued in NVML between waits.
//!
//! Failure modes: setting up (init, `nvmlEventSetCreate`, registrations)
//! is bounded by the backend's init timeout; a GPU whose supported types
//! exclude every health type, or whose registration fails, is unmonitored
//! (logged), except a GPU NVML does not know ([`Error::UnknownGpu`]) and a
//! registration answering `UNKNOWN` (NVML then calls the set undefined),
//! which fail the watch. Each wait slice is bounded by the slice plus the
//! backend's call timeout ([`Error::Timeout`], then [`Error::Unresponsive`]
//! while NVML stays stuck, as for every NVML call). `GPU_IS_LOST`, and an
//! event whose device's UUID cannot be read, become one
//! [`HealthEvent::gpu_lost`] each; NVML may answer every later wait so too,
//! and each answer is reported, as upstream does. Dropping the watch ends
//! its thread after the slice in progress.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::InitFlags;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings as sys;

use super::raw;
use super::worker::Worker;
use crate::Error;
use crate::device::GpuInfo;
use crate::health::{HEALTH_EVENT_TYPES, HealthEvent, HealthSource, HealthWatch, deadline};

/// The longest single NVML wait: upstream's, and how late a dropped watch's
/// thread ends at most.
const SLICE: Duration = Duration::from_secs(5);

/// How a wait is named in errors.
const WAIT_OP: &str = "nvmlEventSetWait_v2";

/// State living on a watch's thread.
struct HealthState {
    nvml: Nvml,
    set: sys::nvmlEventSet_t,
    /// UUIDs of the GPUs asked for but not registered.
    unmonitored: Vec<String>,
}

impl Drop for HealthState {
    fn drop(&mut self) {
        // Runs before the fields drop, so the set is freed while `nvml` is
        // still initialised.
        if let Err(e) = raw::free_event_set(&self.nvml, self.set) {
            tracing::warn!(error = %e, "cannot free the NVML health event set");
        }
    }
}

/// A watch's [`HealthSource`]: its worker.
struct NvmlHealth {
    worker: Worker<HealthState>,
}

/// Starts a watch over `gpus` with its own NVML handle on `library`.
pub(super) fn watch(
    library: &Path,
    gpus: &[GpuInfo],
    init_timeout: Duration,
    call_timeout: Duration,
) -> Result<HealthWatch, Error> {
    let uuids: Vec<String> = gpus.iter().map(|g| g.uuid.clone()).collect();
    let library = library.to_owned();
    let worker = Worker::spawn(
        "nvml-health",
        "register GPUs for health events",
        init_timeout,
        SLICE + call_timeout,
        move || open(library, &uuids),
    )?;
    let unmonitored = worker.call("health watch set-up", |s| Ok(s.unmonitored.clone()))?;
    Ok(HealthWatch::new(
        unmonitored,
        Box::new(NvmlHealth { worker }),
    ))
}

/// Initialises NVML, creates the event set and registers every GPU it can.
fn open(library: PathBuf, uuids: &[String]) -> Result<HealthState, Error> {
    let nvml = Nvml::builder()
        .lib_path(library.as_os_str())
        .flags(InitFlags::NO_GPUS)
        .init()
        .map_err(|source| Error::NvmlInit {
            library: library.clone(),
            source,
        })?;
    let set = raw::create_event_set(&nvml).map_err(Error::nvml("nvmlEventSetCreate"))?;
    // From here on, dropping `state` frees the set.
    let mut state = HealthState {
        nvml,
        set,
        unmonitored: Vec::new(),
    };
    for uuid in uuids {
        if let Err(e) = register(&state, uuid) {
            let fatal = matches!(
                e,
                Error::UnknownGpu { .. }
                    | Error::NvmlCall {
                        source: NvmlError::Unknown,
                        ..
                    }
            );
            if fatal {
                return Err(e);
            }
            tracing::warn!(gpu = %uuid, error = %e, "GPU health is not monitored");
            state.unmonitored.push(uuid.clone());
        }
    }
    Ok(state)
}

/// Registers the GPU with `uuid` for the health event types it supports.
fn register(state: &HealthState, uuid: &str) -> Result<(), Error> {
    let device = super::device_by_uuid(&state.nvml, uuid)?;
    let op = |name: &str| format!("{name}({uuid})");
    let supported = raw::supported_event_types(&device)
        .map_err(Error::nvml(op("nvmlDeviceGetSupportedEventTypes")))?;
    let types = supported & HEALTH_EVENT_TYPES;
    if types == 0 {
        return Err(Error::NvmlData {
            op: op("nvmlDeviceGetSupportedEventTypes"),
            reason: format!(
                "the GPU supports none of the health event types (mask {supported:#x})"
            ),
        });
    }
    raw::register_events(&device, types, state.set)
        .map_err(Error::nvml(op("nvmlDeviceRegisterEvents")))
}

impl HealthSource for NvmlHealth {
    fn wait(&self, timeout: Duration) -> Result<Option<HealthEvent>, Error> {
        let until = deadline(timeout);
        loop {
            let left = until.map_or(SLICE, |u| u.saturating_duration_since(Instant::now()));
            // Whole milliseconds, rounded up, so a short wait does not
            // become a busy poll.
            let ms = u32::try_from(left.min(SLICE).as_micros().div_ceil(1000)).unwrap_or(u32::MAX);
            if let Some(event) = self.worker.call(WAIT_OP, move |s| next_event(s, ms))? {
                return Ok(Some(event));
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(None);
            }
        }
    }
}

/// One NVML wait of at most `timeout_ms`; `None` when it brought no health
/// event.
fn next_event(s: &HealthState, timeout_ms: u32) -> Result<Option<HealthEvent>, Error> {
    match raw::wait_event(&s.nvml, s.set, timeout_ms) {
        Ok(event) => {
            let uuid = match event.uuid {
                Ok(uuid) => uuid,
                Err(e) => {
                    // Upstream's reading: a device that cannot be named is
                    // a device that is gone.
                    tracing::warn!(error = %e, "cannot read the UUID of a health event's GPU; reporting a lost GPU");
                    return Ok(Some(HealthEvent::gpu_lost()));
                }
            };
            let decoded = HealthEvent::from_nvml(
                uuid,
                event.event_type,
                event.event_data,
                event.gpu_instance_id,
                event.compute_instance_id,
            );
            if decoded.is_none() {
                tracing::debug!(
                    event_type = event.event_type,
                    "ignoring an NVML event of a type not registered for"
                );
            }
            Ok(decoded)
        }
        Err(NvmlError::Timeout) => Ok(None),
        Err(NvmlError::GpuLost) => {
            tracing::warn!("NVML reports a GPU lost while waiting for health events");
            Ok(Some(HealthEvent::gpu_lost()))
        }
        Err(e) => Err(Error::nvml(WAIT_OP)(e)),
    }
}

//! The NVML calls nvml-wrapper 0.13 lacks or gets wrong, made through the
//! raw symbols of the library it already loaded. This is the crate's only
//! `unsafe` code.
//!
//! Calls: `nvmlDeviceGetGpuFabricInfo` (falling back to
//! `nvmlDeviceGetGpuFabricInfoV`), `nvmlDeviceGetAddressingMode`,
//! `nvmlDeviceGetGpuInstanceId`, `nvmlDeviceGetComputeInstanceId`,
//! `nvmlDeviceGetGpuInstanceById` + `nvmlGpuInstanceGetInfo`, and
//! `nvmlDeviceGetGpuInstancePossiblePlacements_v2` (nvml-wrapper's own
//! version never sets the length of the vector it returns, so it always
//! answers "no placements"), and the MIG changes: GPU-instance creation
//! with a placement, compute-instance creation, and both destructions.
//! Health events use the raw event-set calls too: nvml-wrapper's
//! `register_events` frees the whole set when one GPU's registration fails
//! (upstream goes on with the other GPUs), and its `EventData` drops the
//! GPU- and compute-instance IDs that name a MIG device.
//!
//! Invariants every unsafe block relies on:
//! - symbols come from `Nvml::lib()`, resolved by libloading against the
//!   bindgen signatures of nvml-wrapper-sys, which match `nvml.h`;
//! - device handles come from live `Device` values, which borrow the `Nvml`
//!   that keeps the library loaded and initialised;
//! - every out-parameter is a valid, initialised, exclusively borrowed local
//!   that outlives the call, and versioned structs carry the
//!   `NVML_STRUCT_VERSION` NVML expects for their layout;
//! - an event-set handle is used only between its `nvmlEventSetCreate` and
//!   its one `nvmlEventSetFree`, with the `Nvml` that created it.
//!
//! Failure modes: a symbol missing from an older driver is `Ok(None)` for the
//! optional queries (fabric, addressing mode) and
//! `NvmlError::FailedToLoadSymbol` otherwise; NVML errors come back as
//! [`NvmlError`] via `nvml_try`.

// This module exists to hold the raw FFI calls; see the invariants above.
#![allow(unsafe_code)]

use std::os::raw::c_uint;

use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings as sys;

/// `NVML_STRUCT_VERSION(type, version)`: the struct size tagged with the
/// version in the top byte.
fn struct_version<T>(version: u32) -> c_uint {
    // NVML structs are a few hundred bytes at most; the size fits in 24 bits.
    (std::mem::size_of::<T>() as c_uint) | (version << 24)
}

fn handle(device: &Device<'_>) -> sys::nvmlDevice_t {
    // SAFETY: `Device::handle` only returns the handle the wrapper holds; it
    // is unsafe to discourage casual FFI use, not because reading it can go
    // wrong. The handle stays valid while `device` borrows its `Nvml`.
    unsafe { device.handle() }
}

/// Fabric facts as NVML reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawFabric {
    pub cluster_uuid: [u8; 16],
    pub clique_id: u32,
    pub state: u8,
    pub status: u32,
}

/// `nvmlDeviceGetGpuFabricInfo`, or `...InfoV` where only that exists.
/// `Ok(None)`: neither symbol exists or the GPU does not support the query.
pub(super) fn fabric_info(device: &Device<'_>) -> Result<Option<RawFabric>, NvmlError> {
    let lib = device.nvml().lib();
    let result = if let Ok(sym) = lib.nvmlDeviceGetGpuFabricInfo.as_ref() {
        let mut info = sys::nvmlGpuFabricInfo_t {
            clusterUuid: [0; 16],
            status: 0,
            cliqueId: 0,
            state: 0,
        };
        // SAFETY: `sym` is NVML's nvmlDeviceGetGpuFabricInfo with the bindgen
        // signature; `handle` is live; `info` is a valid out-parameter of the
        // v1 layout this symbol writes.
        let ret = unsafe { sym(handle(device), &mut info) };
        nvml_try(ret).map(|()| RawFabric {
            cluster_uuid: info.clusterUuid,
            clique_id: info.cliqueId,
            state: info.state,
            status: info.status,
        })
    } else if let Ok(sym) = lib.nvmlDeviceGetGpuFabricInfoV.as_ref() {
        let mut info = sys::nvmlGpuFabricInfoV_t {
            version: struct_version::<sys::nvmlGpuFabricInfo_v3_t>(3),
            clusterUuid: [0; 16],
            status: 0,
            cliqueId: 0,
            state: 0,
            healthMask: 0,
            healthSummary: 0,
        };
        // SAFETY: as above, for the versioned symbol; `info.version` tells
        // NVML the buffer has the v3 layout it is.
        let ret = unsafe { sym(handle(device), &mut info) };
        nvml_try(ret).map(|()| RawFabric {
            cluster_uuid: info.clusterUuid,
            clique_id: info.cliqueId,
            state: info.state,
            status: info.status,
        })
    } else {
        return Ok(None);
    };
    match result {
        Ok(info) => Ok(Some(info)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `nvmlDeviceGetAddressingMode`: 0 none, 1 HMM, 2 ATS. `Ok(None)`: the
/// symbol is missing (drivers before R575) or the platform does not support
/// the query.
pub(super) fn addressing_mode(device: &Device<'_>) -> Result<Option<u32>, NvmlError> {
    let Ok(sym) = device.nvml().lib().nvmlDeviceGetAddressingMode.as_ref() else {
        return Ok(None);
    };
    let mut mode = sys::nvmlDeviceAddressingMode_t {
        version: struct_version::<sys::nvmlDeviceAddressingMode_v1_t>(1),
        value: 0,
    };
    // SAFETY: `sym` has the bindgen signature of nvmlDeviceGetAddressingMode;
    // `handle` is live; `mode` is a v1-tagged out-parameter of the v1 layout.
    let ret = unsafe { sym(handle(device), &mut mode) };
    match nvml_try(ret) {
        Ok(()) => Ok(Some(mode.value)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `nvmlDeviceGetGpuInstanceId` of a MIG device handle.
pub(super) fn gpu_instance_id(mig: &Device<'_>) -> Result<u32, NvmlError> {
    let sym = nvml_sym(mig.nvml().lib().nvmlDeviceGetGpuInstanceId.as_ref())?;
    let mut id: c_uint = 0;
    // SAFETY: bindgen signature; live MIG handle; `id` is a valid out-pointer.
    let ret = unsafe { sym(handle(mig), &mut id) };
    nvml_try(ret).map(|()| id)
}

/// `nvmlDeviceGetComputeInstanceId` of a MIG device handle.
pub(super) fn compute_instance_id(mig: &Device<'_>) -> Result<u32, NvmlError> {
    let sym = nvml_sym(mig.nvml().lib().nvmlDeviceGetComputeInstanceId.as_ref())?;
    let mut id: c_uint = 0;
    // SAFETY: bindgen signature; live MIG handle; `id` is a valid out-pointer.
    let ret = unsafe { sym(handle(mig), &mut id) };
    nvml_try(ret).map(|()| id)
}

/// A GPU instance's profile ID and placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawGpuInstance {
    pub profile_id: u32,
    pub placement_start: u32,
    pub placement_size: u32,
}

/// `nvmlDeviceGetGpuInstanceById` then `nvmlGpuInstanceGetInfo` on the
/// parent GPU.
pub(super) fn gpu_instance(parent: &Device<'_>, gi_id: u32) -> Result<RawGpuInstance, NvmlError> {
    let info = gpu_instance_info(parent, gpu_instance_handle(parent, gi_id)?)?;
    Ok(RawGpuInstance {
        profile_id: info.profileId,
        placement_start: info.placement.start,
        placement_size: info.placement.size,
    })
}

/// `nvmlGpuInstanceGetInfo` of a GPU-instance handle of `parent`.
fn gpu_instance_info(
    parent: &Device<'_>,
    gi: sys::nvmlGpuInstance_t,
) -> Result<sys::nvmlGpuInstanceInfo_t, NvmlError> {
    let get_info = nvml_sym(parent.nvml().lib().nvmlGpuInstanceGetInfo.as_ref())?;
    let mut info = sys::nvmlGpuInstanceInfo_t {
        device: std::ptr::null_mut(),
        id: 0,
        profileId: 0,
        placement: sys::nvmlGpuInstancePlacement_t { start: 0, size: 0 },
    };
    // SAFETY: bindgen signature; `gi` was just returned by NVML for
    // `parent`; `info` is a valid out-parameter of the unversioned layout
    // this symbol writes.
    let ret = unsafe { get_info(gi, &mut info) };
    nvml_try(ret).map(|()| info)
}

/// `nvmlDeviceGetGpuInstancePossiblePlacements_v2` for the GPU-instance
/// profile *ID* `profile_id`: (start, size) pairs.
pub(super) fn possible_placements(
    device: &Device<'_>,
    profile_id: u32,
) -> Result<Vec<(u32, u32)>, NvmlError> {
    let sym = nvml_sym(
        device
            .nvml()
            .lib()
            .nvmlDeviceGetGpuInstancePossiblePlacements_v2
            .as_ref(),
    )?;
    let mut count: c_uint = 0;
    // SAFETY: bindgen signature; live handle; a null `placements` asks NVML
    // for the count only, written to the valid `count` out-pointer.
    let ret = unsafe { sym(handle(device), profile_id, std::ptr::null_mut(), &mut count) };
    nvml_try(ret)?;
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut placements =
        vec![sys::nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
    // SAFETY: `placements` holds `count` initialised elements and `count`
    // tells NVML that capacity; NVML writes at most that many and stores the
    // number written back into `count`.
    let ret = unsafe {
        sym(
            handle(device),
            profile_id,
            placements.as_mut_ptr(),
            &mut count,
        )
    };
    nvml_try(ret)?;
    placements.truncate(count as usize);
    Ok(placements.into_iter().map(|p| (p.start, p.size)).collect())
}

/// The GPU-instance handle of GI `gi_id` on `parent`.
fn gpu_instance_handle(
    parent: &Device<'_>,
    gi_id: u32,
) -> Result<sys::nvmlGpuInstance_t, NvmlError> {
    let by_id = nvml_sym(parent.nvml().lib().nvmlDeviceGetGpuInstanceById.as_ref())?;
    let mut gi: sys::nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: bindgen signature; live parent handle; `gi` is a valid
    // out-pointer. NVML owns the returned handle; it stays valid while the
    // GPU instance exists, and callers use it only within this module's
    // calls on the same worker thread.
    let ret = unsafe { by_id(handle(parent), gi_id, &mut gi) };
    nvml_try(ret).map(|()| gi)
}

/// `nvmlDeviceCreateGpuInstanceWithPlacement`; returns the new GI's ID
/// (from `nvmlGpuInstanceGetInfo`).
pub(super) fn create_gpu_instance(
    device: &Device<'_>,
    profile_id: u32,
    start: u32,
    size: u32,
) -> Result<u32, NvmlError> {
    let create = nvml_sym(
        device
            .nvml()
            .lib()
            .nvmlDeviceCreateGpuInstanceWithPlacement
            .as_ref(),
    )?;
    let placement = sys::nvmlGpuInstancePlacement_t { start, size };
    let mut gi: sys::nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: bindgen signature; live handle; `placement` is a valid input
    // that outlives the call; `gi` is a valid out-pointer.
    let ret = unsafe { create(handle(device), profile_id, &placement, &mut gi) };
    nvml_try(ret)?;
    gpu_instance_info(device, gi).map(|info| info.id)
}

/// Creates the compute instance spanning all `slices` compute slices of GPU
/// instance `gi_id` (shared engines); returns its CI ID.
pub(super) fn create_compute_instance(
    device: &Device<'_>,
    gi_id: u32,
    ci_profile_index: u32,
) -> Result<u32, NvmlError> {
    let lib = device.nvml().lib();
    let profile_info = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref())?;
    let create = nvml_sym(lib.nvmlGpuInstanceCreateComputeInstance.as_ref())?;
    let get_info = nvml_sym(lib.nvmlComputeInstanceGetInfo_v2.as_ref())?;
    let gi = gpu_instance_handle(device, gi_id)?;
    let mut profile = sys::nvmlComputeInstanceProfileInfo_t {
        id: 0,
        sliceCount: 0,
        instanceCount: 0,
        multiprocessorCount: 0,
        sharedCopyEngineCount: 0,
        sharedDecoderCount: 0,
        sharedEncoderCount: 0,
        sharedJpegCount: 0,
        sharedOfaCount: 0,
    };
    // SAFETY: bindgen signature; `gi` is live; `profile` is a valid
    // out-parameter of the unversioned layout this symbol writes. Engine
    // profile 0 is NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED.
    let ret = unsafe { profile_info(gi, ci_profile_index, 0, &mut profile) };
    nvml_try(ret)?;
    let mut ci: sys::nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: bindgen signature; `gi` is live; `ci` is a valid out-pointer.
    let ret = unsafe { create(gi, profile.id, &mut ci) };
    nvml_try(ret)?;
    let mut info = sys::nvmlComputeInstanceInfo_t {
        device: std::ptr::null_mut(),
        gpuInstance: std::ptr::null_mut(),
        id: 0,
        profileId: 0,
        placement: sys::nvmlComputeInstancePlacement_t { start: 0, size: 0 },
    };
    // SAFETY: `ci` was just returned by NVML; `info` is a valid out-parameter.
    let ret = unsafe { get_info(ci, &mut info) };
    nvml_try(ret).map(|()| info.id)
}

/// Destroys compute instance `ci_id` of GPU instance `gi_id`.
pub(super) fn destroy_compute_instance(
    device: &Device<'_>,
    gi_id: u32,
    ci_id: u32,
) -> Result<(), NvmlError> {
    let lib = device.nvml().lib();
    let by_id = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceById.as_ref())?;
    let destroy = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref())?;
    let gi = gpu_instance_handle(device, gi_id)?;
    let mut ci: sys::nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: bindgen signature; `gi` is live; `ci` is a valid out-pointer.
    let ret = unsafe { by_id(gi, ci_id, &mut ci) };
    nvml_try(ret)?;
    // SAFETY: `ci` was just returned by NVML; it is not used afterwards.
    nvml_try(unsafe { destroy(ci) })
}

/// Destroys GPU instance `gi_id` (which must have no compute instance).
pub(super) fn destroy_gpu_instance(device: &Device<'_>, gi_id: u32) -> Result<(), NvmlError> {
    let destroy = nvml_sym(device.nvml().lib().nvmlGpuInstanceDestroy.as_ref())?;
    let gi = gpu_instance_handle(device, gi_id)?;
    // SAFETY: `gi` was just returned by NVML; it is not used afterwards.
    nvml_try(unsafe { destroy(gi) })
}

/// `nvmlEventSetCreate`. The caller owns the set and must free it with
/// [`free_event_set`] while `nvml` is alive.
pub(super) fn create_event_set(nvml: &Nvml) -> Result<sys::nvmlEventSet_t, NvmlError> {
    let create = nvml_sym(nvml.lib().nvmlEventSetCreate.as_ref())?;
    let mut set: sys::nvmlEventSet_t = std::ptr::null_mut();
    // SAFETY: bindgen signature; `set` is a valid out-pointer.
    let ret = unsafe { create(&mut set) };
    nvml_try(ret).map(|()| set)
}

/// `nvmlEventSetFree`.
pub(super) fn free_event_set(nvml: &Nvml, set: sys::nvmlEventSet_t) -> Result<(), NvmlError> {
    let free = nvml_sym(nvml.lib().nvmlEventSetFree.as_ref())?;
    // SAFETY: `set` came from `create_event_set` on this `nvml` and, by that
    // function's contract, is freed only here, once.
    nvml_try(unsafe { free(set) })
}

/// `nvmlDeviceGetSupportedEventTypes`, all bits (nvml-wrapper's typed
/// version drops the ones it has no name for).
pub(super) fn supported_event_types(device: &Device<'_>) -> Result<u64, NvmlError> {
    let sym = nvml_sym(
        device
            .nvml()
            .lib()
            .nvmlDeviceGetSupportedEventTypes
            .as_ref(),
    )?;
    let mut types: std::os::raw::c_ulonglong = 0;
    // SAFETY: bindgen signature; live handle; `types` is a valid out-pointer.
    let ret = unsafe { sym(handle(device), &mut types) };
    nvml_try(ret).map(|()| types)
}

/// `nvmlDeviceRegisterEvents`: adds `device`'s `types` to `set`. A failure
/// leaves the set usable for the other GPUs (NVML's `UNKNOWN` answer aside,
/// after which NVML calls the set undefined; the caller then fails the
/// whole watch).
pub(super) fn register_events(
    device: &Device<'_>,
    types: u64,
    set: sys::nvmlEventSet_t,
) -> Result<(), NvmlError> {
    let sym = nvml_sym(device.nvml().lib().nvmlDeviceRegisterEvents.as_ref())?;
    // SAFETY: bindgen signature; live handle; `set` is a live event set of
    // the same `Nvml` (see `create_event_set`).
    nvml_try(unsafe { sym(handle(device), types, set) })
}

/// One event as `nvmlEventSetWait_v2` delivers it.
#[derive(Debug)]
pub(super) struct RawEvent {
    /// The UUID of the event's device (the full GPU), or why it could not
    /// be read.
    pub uuid: Result<String, NvmlError>,
    pub event_type: u64,
    pub event_data: u64,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// `nvmlEventSetWait_v2` on `set` for at most `timeout_ms`, then
/// `nvmlDeviceGetUUID` of the event's device.
pub(super) fn wait_event(
    nvml: &Nvml,
    set: sys::nvmlEventSet_t,
    timeout_ms: u32,
) -> Result<RawEvent, NvmlError> {
    let wait = nvml_sym(nvml.lib().nvmlEventSetWait_v2.as_ref())?;
    let mut data = sys::nvmlEventData_t {
        device: std::ptr::null_mut(),
        eventType: 0,
        eventData: 0,
        gpuInstanceId: 0,
        computeInstanceId: 0,
    };
    // SAFETY: bindgen signature; `set` is a live event set of `nvml`;
    // `data` is a valid out-parameter of the layout this symbol writes.
    let ret = unsafe { wait(set, &mut data, timeout_ms) };
    nvml_try(ret)?;
    let uuid = if data.device.is_null() {
        Err(NvmlError::InvalidArg)
    } else {
        // SAFETY: NVML filled `data.device` with the handle of a device of
        // this initialised `nvml`; the `Device` lives only for this call.
        unsafe { Device::new(data.device, nvml) }.uuid()
    };
    Ok(RawEvent {
        uuid,
        event_type: data.eventType,
        event_data: data.eventData,
        gpu_instance_id: data.gpuInstanceId,
        compute_instance_id: data.computeInstanceId,
    })
}

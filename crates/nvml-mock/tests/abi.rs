//! The mock's C contract, called through the raw symbols (nvml-wrapper-sys'
//! `NvmlLib`) the way any NVML client calls them: lifecycle, return codes,
//! buffer sizes, stale handles, the calls it answers `NOT_SUPPORTED`, and
//! health events from the events file.

// Calling a C library through its symbols is the point of this test.
#![allow(unsafe_code)]
// Test set-up helpers panic on failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::{CStr, c_char, c_uint};
use std::path::PathBuf;

use nvdra_gpu::{HealthEvent, HealthEventKind};
use nvdra_nvml_mock::config::{CONFIG_FILE, EVENTS_FILE, append_event};
use nvdra_nvml_mock::layout::built_library;
use nvml_wrapper_sys::bindings::{self as sys, NvmlLib};

const SUCCESS: u32 = sys::nvmlReturn_enum_NVML_SUCCESS;
const UNINITIALIZED: u32 = sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
const NOT_SUPPORTED: u32 = sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const NOT_FOUND: u32 = sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
const INSUFFICIENT_SIZE: u32 = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
const DRIVER_NOT_LOADED: u32 = sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
const TIMEOUT: u32 = sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
const IN_USE: u32 = sys::nvmlReturn_enum_NVML_ERROR_IN_USE;
const INSUFFICIENT_RESOURCES: u32 = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES;
const INVALID_ARGUMENT: u32 = sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const GPU_IS_LOST: u32 = sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;

fn mock_library() -> PathBuf {
    built_library(&std::env::current_exe().unwrap())
        .expect("the mock library next to the test binary")
}

/// A private copy of the library (its own instance), with a config for
/// `profile` unless `None`.
fn load(dir: &tempfile::TempDir, profile: Option<&str>) -> NvmlLib {
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(mock_library(), &lib).unwrap();
    if let Some(profile) = profile {
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            format!("profile: {profile}\n"),
        )
        .unwrap();
    }
    // SAFETY: loading our own mock library runs no initialisers with
    // preconditions.
    unsafe { NvmlLib::new(&lib) }.unwrap()
}

#[test]
fn lifecycle_is_counted_like_nvml() {
    let dir = tempfile::tempdir().unwrap();
    let nvml = load(&dir, Some("l4-x2"));
    let mut count: c_uint = 0;
    // SAFETY (all blocks below): symbols of the mock with nvml.h
    // signatures; every pointer is a live local.
    unsafe {
        assert_eq!(nvml.nvmlDeviceGetCount_v2(&mut count), UNINITIALIZED);
        assert_eq!(nvml.nvmlInit_v2(), SUCCESS);
        assert_eq!(nvml.nvmlInitWithFlags(1), SUCCESS);
        assert_eq!(nvml.nvmlDeviceGetCount_v2(&mut count), SUCCESS);
        assert_eq!(count, 2);
        assert_eq!(nvml.nvmlShutdown(), SUCCESS);
        assert_eq!(nvml.nvmlDeviceGetCount_v2(&mut count), SUCCESS);
        assert_eq!(nvml.nvmlShutdown(), SUCCESS);
        assert_eq!(nvml.nvmlShutdown(), UNINITIALIZED);
        assert_eq!(nvml.nvmlDeviceGetCount_v2(&mut count), UNINITIALIZED);
        let text = CStr::from_ptr(nvml.nvmlErrorString(INSUFFICIENT_RESOURCES));
        assert_eq!(text.to_str().unwrap(), "Insufficient resources");
    }
}

#[test]
fn a_missing_config_is_a_driver_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let nvml = load(&dir, None);
    // SAFETY: as above.
    assert_eq!(unsafe { nvml.nvmlInit_v2() }, DRIVER_NOT_LOADED);
}

#[test]
fn buffers_and_unsupported_calls() {
    let dir = tempfile::tempdir().unwrap();
    let nvml = load(&dir, Some("gb200-x4"));
    // SAFETY (all blocks below): as above; `device` and `set` are handles
    // the mock returned.
    unsafe {
        assert_eq!(nvml.nvmlInit_v2(), SUCCESS);
        let mut device: sys::nvmlDevice_t = std::ptr::null_mut();
        assert_eq!(nvml.nvmlDeviceGetHandleByIndex_v2(1, &mut device), SUCCESS);
        let mut small = [0 as c_char; 8];
        assert_eq!(
            nvml.nvmlDeviceGetUUID(device, small.as_mut_ptr(), 8),
            INSUFFICIENT_SIZE
        );
        let mut uuid = [0 as c_char; 96];
        assert_eq!(
            nvml.nvmlDeviceGetUUID(device, uuid.as_mut_ptr(), 96),
            SUCCESS
        );
        let uuid = CStr::from_ptr(uuid.as_ptr()).to_str().unwrap().to_owned();
        let mut again: sys::nvmlDevice_t = std::ptr::null_mut();
        let c_uuid = std::ffi::CString::new(uuid).unwrap();
        assert_eq!(
            nvml.nvmlDeviceGetHandleByUUID(c_uuid.as_ptr(), &mut again),
            SUCCESS
        );
        assert_eq!(again, device);

        let mut attributes = std::mem::zeroed::<sys::nvmlDeviceAttributes_t>();
        assert_eq!(
            nvml.nvmlDeviceGetAttributes_v2(device, &mut attributes),
            NOT_SUPPORTED
        );

        // A handle the mock never gave out.
        let mut minor: c_uint = 0;
        let stranger = std::ptr::without_provenance_mut(0x1000);
        assert_eq!(
            nvml.nvmlDeviceGetMinorNumber(stranger, &mut minor),
            sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(nvml.nvmlShutdown(), SUCCESS);
    }
}

#[test]
fn instances_follow_the_driver_rules() {
    let dir = tempfile::tempdir().unwrap();
    let nvml = load(&dir, Some("h100-sxm-80gb-x8"));
    // SAFETY (all blocks below): as above; GI and CI handles come from the
    // mock.
    unsafe {
        assert_eq!(nvml.nvmlInit_v2(), SUCCESS);
        let mut device: sys::nvmlDevice_t = std::ptr::null_mut();
        assert_eq!(nvml.nvmlDeviceGetHandleByIndex_v2(0, &mut device), SUCCESS);
        let mut gi: sys::nvmlGpuInstance_t = std::ptr::null_mut();
        let at = |start, size| sys::nvmlGpuInstancePlacement_t { start, size };
        // MIG is off: creation is not supported.
        assert_eq!(
            nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 9, &at(0, 4), &mut gi),
            NOT_SUPPORTED
        );
        let mut status = 1;
        assert_eq!(nvml.nvmlDeviceSetMigMode(device, 1, &mut status), SUCCESS);
        assert_eq!(status, SUCCESS);
        assert_eq!(
            nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 9, &at(0, 4), &mut gi),
            SUCCESS
        );
        let mut other: sys::nvmlGpuInstance_t = std::ptr::null_mut();
        assert_eq!(
            nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 19, &at(2, 1), &mut other),
            INSUFFICIENT_RESOURCES
        );
        let mut remaining: c_uint = 0;
        assert_eq!(
            nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(device, 19, &mut remaining),
            SUCCESS
        );
        assert_eq!(remaining, 3, "1-slice placements 4, 5, 6 are free");
        // A GI with a CI cannot be destroyed; MIG cannot be turned off.
        let mut info = std::mem::zeroed::<sys::nvmlComputeInstanceProfileInfo_t>();
        assert_eq!(
            nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 2, 0, &mut info),
            SUCCESS
        );
        assert_eq!(
            nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 0, 0, &mut info),
            NOT_SUPPORTED,
            "a compute instance smaller than its GPU instance is not modelled"
        );
        assert_eq!(
            nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 2, 0, &mut info),
            SUCCESS
        );
        let mut ci: sys::nvmlComputeInstance_t = std::ptr::null_mut();
        assert_eq!(
            nvml.nvmlGpuInstanceCreateComputeInstance(gi, info.id, &mut ci),
            SUCCESS
        );
        assert_eq!(nvml.nvmlGpuInstanceDestroy(gi), IN_USE);
        assert_eq!(nvml.nvmlDeviceSetMigMode(device, 0, &mut status), IN_USE);
        let mut mig: sys::nvmlDevice_t = std::ptr::null_mut();
        assert_eq!(
            nvml.nvmlDeviceGetMigDeviceHandleByIndex(device, 0, &mut mig),
            SUCCESS
        );
        let mut name = [0 as c_char; 96];
        assert_eq!(nvml.nvmlDeviceGetName(mig, name.as_mut_ptr(), 96), SUCCESS);
        assert_eq!(
            CStr::from_ptr(name.as_ptr()).to_str().unwrap(),
            "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
        );
        assert_eq!(nvml.nvmlComputeInstanceDestroy(ci), SUCCESS);
        assert_eq!(nvml.nvmlGpuInstanceDestroy(gi), SUCCESS);
        // Handles of destroyed instances are stale, not dangling.
        let mut gi_info = std::mem::zeroed::<sys::nvmlGpuInstanceInfo_t>();
        assert_eq!(nvml.nvmlGpuInstanceGetInfo(gi, &mut gi_info), NOT_FOUND);
        let mut is_mig: c_uint = 0;
        assert_eq!(
            nvml.nvmlDeviceIsMigDeviceHandle(mig, &mut is_mig),
            NOT_FOUND
        );
        assert_eq!(nvml.nvmlDeviceSetMigMode(device, 0, &mut status), SUCCESS);
        assert_eq!(nvml.nvmlShutdown(), SUCCESS);
    }
}

/// Appends `text` to `file` as is.
fn append(file: &std::path::Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
}

/// The handle and UUID of GPU `index`.
///
/// # Safety
///
/// `nvml` is the initialised mock.
unsafe fn gpu(nvml: &NvmlLib, index: c_uint) -> (sys::nvmlDevice_t, String) {
    let mut device: sys::nvmlDevice_t = std::ptr::null_mut();
    let mut uuid = [0 as c_char; 96];
    // SAFETY: as above; every pointer is a live local.
    unsafe {
        assert_eq!(
            nvml.nvmlDeviceGetHandleByIndex_v2(index, &mut device),
            SUCCESS
        );
        assert_eq!(
            nvml.nvmlDeviceGetUUID(device, uuid.as_mut_ptr(), 96),
            SUCCESS
        );
        let uuid = CStr::from_ptr(uuid.as_ptr()).to_str().unwrap().to_owned();
        (device, uuid)
    }
}

const XID: u64 = sys::nvmlEventTypeXidCriticalError as u64;
const DBE: u64 = sys::nvmlEventTypeDoubleBitEccError as u64;
const SBE: u64 = sys::nvmlEventTypeSingleBitEccError as u64;
const PSTATE: u64 = sys::nvmlEventTypePState as u64;
const NO_INSTANCE: u32 = 0xFFFF_FFFF;

#[test]
fn events_follow_registrations_and_masks() {
    let dir = tempfile::tempdir().unwrap();
    let nvml = load(&dir, Some("a100-40gb-x8-mig"));
    let events = dir.path().join(EVENTS_FILE);
    let inject = |line: &str| {
        append_event(&events, &line.parse::<HealthEvent>().unwrap()).unwrap();
    };
    // SAFETY (all blocks below): as above; devices and sets are handles the
    // mock returned.
    unsafe {
        assert_eq!(nvml.nvmlInit_v2(), SUCCESS);
        let (gpu0, uuid0) = gpu(&nvml, 0);
        let (gpu1, uuid1) = gpu(&nvml, 1);
        let mut types = 0;
        assert_eq!(
            nvml.nvmlDeviceGetSupportedEventTypes(gpu0, &mut types),
            SUCCESS
        );
        assert_eq!(types, XID | DBE | SBE);

        // An event written before the set exists never reaches it.
        inject(&format!("{uuid0} xid 13"));
        let mut set: sys::nvmlEventSet_t = std::ptr::null_mut();
        assert_eq!(nvml.nvmlEventSetCreate(&mut set), SUCCESS);
        assert_eq!(
            nvml.nvmlDeviceRegisterEvents(gpu0, XID | PSTATE, set),
            NOT_SUPPORTED,
            "a type the GPU does not support"
        );
        assert_eq!(nvml.nvmlDeviceRegisterEvents(gpu0, DBE, set), SUCCESS);
        assert_eq!(nvml.nvmlDeviceRegisterEvents(gpu1, XID, set), SUCCESS);
        let mut data = std::mem::zeroed::<sys::nvmlEventData_t>();
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 10), TIMEOUT);

        // Masked out (GPU 0 registered DBE only), not registered (GPU 2),
        // then one that matches.
        inject(&format!("{uuid0} xid 79"));
        let (_, uuid2) = gpu(&nvml, 2);
        inject(&format!("{uuid2} dbe"));
        inject(&format!("{uuid0} dbe"));
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 1000), SUCCESS);
        assert_eq!(
            (
                data.device,
                data.eventType,
                data.eventData,
                data.gpuInstanceId,
                data.computeInstanceId
            ),
            (gpu0, DBE, 0, NO_INSTANCE, NO_INSTANCE)
        );

        // A MIG device's event names its parent and its instances.
        inject(&format!("{uuid1} gi 2 ci 0 xid 94"));
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 1000), SUCCESS);
        assert_eq!(
            (
                data.device,
                data.eventType,
                data.eventData,
                data.gpuInstanceId,
                data.computeInstanceId
            ),
            (gpu1, XID, 94, 2, 0)
        );

        // Lines arriving while the wait polls, the first in two writes;
        // then a lost GPU.
        let late = std::thread::spawn({
            let events = events.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                append(&events, &format!("{uuid1} xi"));
                std::thread::sleep(std::time::Duration::from_millis(50));
                append(&events, "d 48\nlost\n");
            }
        });
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 5000), SUCCESS);
        assert_eq!((data.eventType, data.eventData), (XID, 48));
        late.join().unwrap();
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 1000), GPU_IS_LOST);
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 10), TIMEOUT);
        let lost = CStr::from_ptr(nvml.nvmlErrorString(GPU_IS_LOST));
        assert_eq!(lost.to_str().unwrap(), "GPU is lost");

        // A second set sees only what comes after it; a bad line is
        // skipped; a freed set is gone.
        let mut other: sys::nvmlEventSet_t = std::ptr::null_mut();
        assert_eq!(nvml.nvmlEventSetCreate(&mut other), SUCCESS);
        assert_ne!(other, set);
        assert_eq!(nvml.nvmlDeviceRegisterEvents(gpu0, SBE, other), SUCCESS);
        append(&events, &format!("not an event\n{uuid0} sbe\n"));
        assert_eq!(nvml.nvmlEventSetWait_v2(other, &mut data, 1000), SUCCESS);
        assert_eq!((data.device, data.eventType), (gpu0, SBE));
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 10), TIMEOUT);
        assert_eq!(nvml.nvmlEventSetFree(other), SUCCESS);
        assert_eq!(nvml.nvmlEventSetFree(other), INVALID_ARGUMENT);
        assert_eq!(
            nvml.nvmlEventSetWait_v2(other, &mut data, 10),
            INVALID_ARGUMENT
        );
        assert_eq!(nvml.nvmlEventSetFree(set), SUCCESS);
        assert_eq!(nvml.nvmlShutdown(), SUCCESS);
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 10), UNINITIALIZED);
    }
}

#[test]
fn a_gpu_without_health_events_refuses_registration() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = nvdra_gpu::FakeProfile::uniform(nvdra_gpu::GpuModel::L4, 2);
    profile.gpus[1].health_events = false;
    std::fs::write(
        dir.path().join("profile.yaml"),
        serde_saphyr::to_string(&profile).unwrap(),
    )
    .unwrap();
    let nvml = load(&dir, Some("profile.yaml"));
    // SAFETY (all blocks below): as above.
    unsafe {
        assert_eq!(nvml.nvmlInit_v2(), SUCCESS);
        let (gpu0, _) = gpu(&nvml, 0);
        let (gpu1, uuid1) = gpu(&nvml, 1);
        let mut types = 0;
        assert_eq!(
            nvml.nvmlDeviceGetSupportedEventTypes(gpu1, &mut types),
            SUCCESS
        );
        assert_eq!(types, 0);
        let mut set: sys::nvmlEventSet_t = std::ptr::null_mut();
        assert_eq!(nvml.nvmlEventSetCreate(&mut set), SUCCESS);
        assert_eq!(nvml.nvmlDeviceRegisterEvents(gpu1, XID, set), NOT_SUPPORTED);
        assert_eq!(nvml.nvmlDeviceRegisterEvents(gpu0, XID, set), SUCCESS);
        append_event(
            &dir.path().join(EVENTS_FILE),
            &HealthEvent::gpu(uuid1, HealthEventKind::Xid(79)),
        )
        .unwrap();
        let mut data = std::mem::zeroed::<sys::nvmlEventData_t>();
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 30), TIMEOUT);
        assert_eq!(nvml.nvmlEventSetFree(set), SUCCESS);
        assert_eq!(nvml.nvmlShutdown(), SUCCESS);
    }
}

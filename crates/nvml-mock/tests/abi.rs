//! The mock's C contract, called through the raw symbols (nvml-wrapper-sys'
//! `NvmlLib`) the way any NVML client calls them: lifecycle, return codes,
//! buffer sizes, stale handles, and the calls it answers `NOT_SUPPORTED`.

// Calling a C library through its symbols is the point of this test.
#![allow(unsafe_code)]
// Test set-up helpers panic on failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::{CStr, c_char, c_uint};
use std::path::PathBuf;

use nvdra_nvml_mock::config::CONFIG_FILE;
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
fn buffers_unsupported_calls_and_events() {
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
        let mut set: sys::nvmlEventSet_t = std::ptr::null_mut();
        assert_eq!(nvml.nvmlEventSetCreate(&mut set), SUCCESS);
        assert_eq!(nvml.nvmlDeviceRegisterEvents(device, 8, set), NOT_SUPPORTED);
        let mut data = std::mem::zeroed::<sys::nvmlEventData_t>();
        assert_eq!(nvml.nvmlEventSetWait_v2(set, &mut data, 10), TIMEOUT);
        assert_eq!(nvml.nvmlEventSetFree(set), SUCCESS);

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

//! The exported NVML functions and the mock driver state behind them.
//!
//! The module is private: the functions are reachable only through the C
//! symbol table, where NVML's pointer contract applies, never as safe Rust
//! functions of the rlib.

// The module implements a C ABI: every exported function takes raw pointers
// from its caller. Every `unsafe` block checks its pointer for null first
// and relies on NVML's contract for the rest (a non-null pointer is valid
// for the declared type and length for the duration of the call).
#![allow(unsafe_code)]
// A C library has no logger to hand its errors to; a real NVML prints to
// stderr too.
#![allow(clippy::print_stderr)]

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nvdra_gpu::fake::FakeNode;
use nvdra_gpu::fake::node::GpuInstanceView;
use nvdra_gpu::health::{HEALTH_EVENT_TYPES, HealthEvent};
use nvdra_gpu::mig::{MigRefusal, ci_profile_index_of_slices, profile_index_of_id};
use nvdra_gpu::{AddressingMode, Architecture, GpuInventory, MigDeviceInfo, MigProfile};
use nvml_wrapper_sys::bindings as sys;

use crate::config;

type Ret = sys::nvmlReturn_t;

const SUCCESS: Ret = sys::nvmlReturn_enum_NVML_SUCCESS;
const UNINITIALIZED: Ret = sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
const INVALID_ARGUMENT: Ret = sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const NOT_SUPPORTED: Ret = sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const NOT_FOUND: Ret = sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
const INSUFFICIENT_SIZE: Ret = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
const DRIVER_NOT_LOADED: Ret = sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
const TIMEOUT: Ret = sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
const GPU_IS_LOST: Ret = sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
const UNKNOWN: Ret = sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN;

/// Upper bound on MIG devices per GPU (seven 1-slice instances).
const MAX_MIG_DEVICES: u32 = 7;

/// How often a waiting `nvmlEventSetWait_v2` looks at the events file.
const EVENT_POLL: Duration = Duration::from_millis(10);

/// The process's mock driver.
struct Mock {
    node: FakeNode,
    state_file: Option<PathBuf>,
    proc_root: Option<PathBuf>,
    /// Outstanding `nvmlInit*` calls.
    inits: u32,
    /// Where health events come from (see [`config`]).
    events_file: PathBuf,
    /// Bytes of the events file already read into the node's event log.
    events_read: u64,
    /// Live event sets by ID.
    event_sets: BTreeMap<u64, EventSet>,
    /// The ID the next event set gets.
    next_event_set: u64,
}

/// One event set: which GPUs registered which event types, and how far it
/// has read the node's event log.
#[derive(Debug)]
struct EventSet {
    /// Event type mask by GPU index.
    registered: BTreeMap<usize, u64>,
    /// Index of the next log entry to look at.
    cursor: usize,
}

/// What an event set's wait finds.
enum NextEvent {
    Event(sys::nvmlEventData_t),
    Lost,
    Nothing,
}

/// `None` until the first successful init; kept after the last shutdown,
/// as GPU state outlives an NVML session.
static MOCK: Mutex<Option<Mock>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Mock>> {
    // Every change leaves the node consistent, so a poisoned lock is safe.
    MOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` on the initialised mock, or answers `UNINITIALIZED`.
fn with(f: impl FnOnce(&mut Mock) -> Ret) -> Ret {
    match lock().as_mut() {
        Some(mock) if mock.inits > 0 => f(mock),
        _ => UNINITIALIZED,
    }
}

/// Runs a MIG change; after a successful one, saves the state file and
/// rewrites the MIG procfs files.
fn change(f: impl FnOnce(&mut Mock) -> Result<Ret, MigRefusal>) -> Ret {
    with(|mock| match f(mock) {
        Ok(ret) => {
            let saved = mock
                .state_file
                .as_deref()
                .map_or(Ok(()), |file| config::save_state(file, &mock.node));
            let synced = mock
                .proc_root
                .as_deref()
                .map_or(Ok(()), |root| crate::procfs::sync(root, &mock.node));
            if let Err(e) = saved.and(synced) {
                eprintln!("nvdra-nvml-mock: {e}");
                return UNKNOWN;
            }
            ret
        }
        Err(refusal) => refusal.nvml_code(),
    })
}

fn init() -> Ret {
    let mut guard = lock();
    if let Some(mock) = guard.as_mut() {
        mock.inits += 1;
        return SUCCESS;
    }
    let library = config::object_containing((nvmlInit_v2 as *const ()).addr());
    let loaded = config::locate(library.as_deref()).and_then(|path| config::load(&path));
    match loaded {
        Ok(loaded) => {
            *guard = Some(Mock {
                node: loaded.node,
                state_file: loaded.state_file,
                proc_root: loaded.proc_root,
                inits: 1,
                events_file: loaded.events_file,
                events_read: 0,
                event_sets: BTreeMap::new(),
                next_event_set: 1,
            });
            SUCCESS
        }
        Err(e) => {
            eprintln!("nvdra-nvml-mock: {e}");
            DRIVER_NOT_LOADED
        }
    }
}

// ---------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------

/// What a handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handle {
    Gpu(usize),
    Mig { gpu: usize, gi: u32, ci: u32 },
    GpuInstance { gpu: usize, gi: u32 },
    ComputeInstance { gpu: usize, gi: u32, ci: u32 },
    EventSet(u64),
}

/// Handles are `MAGIC | kind << 40 | gpu << 24 | gi << 12 | ci` (an event
/// set: `MAGIC | kind << 40 | id`): never null, never a valid address,
/// decodable without a table.
const MAGIC: usize = 0x6e76_0000_0000_0000;
const MAGIC_MASK: usize = 0xffff_0000_0000_0000;
/// The bits of an event set's ID in its handle.
const EVENT_SET_ID_MASK: usize = 0xff_ffff_ffff;

impl Handle {
    fn encode(self) -> usize {
        let (kind, gpu, gi, ci) = match self {
            Self::Gpu(gpu) => (1, gpu, 0, 0),
            Self::Mig { gpu, gi, ci } => (2, gpu, gi, ci),
            Self::GpuInstance { gpu, gi } => (3, gpu, gi, 0),
            Self::ComputeInstance { gpu, gi, ci } => (4, gpu, gi, ci),
            Self::EventSet(id) => return MAGIC | 5 << 40 | id as usize & EVENT_SET_ID_MASK,
        };
        MAGIC
            | kind << 40
            | (gpu & 0xffff) << 24
            | (gi as usize & 0xfff) << 12
            | ci as usize & 0xfff
    }

    fn decode(raw: usize) -> Option<Self> {
        if raw & MAGIC_MASK != MAGIC {
            return None;
        }
        let gpu = (raw >> 24) & 0xffff;
        let gi = ((raw >> 12) & 0xfff) as u32;
        let ci = (raw & 0xfff) as u32;
        Some(match (raw >> 40) & 0xff {
            1 => Self::Gpu(gpu),
            2 => Self::Mig { gpu, gi, ci },
            3 => Self::GpuInstance { gpu, gi },
            4 => Self::ComputeInstance { gpu, gi, ci },
            5 => Self::EventSet((raw & EVENT_SET_ID_MASK) as u64),
            _ => return None,
        })
    }

    fn ptr<T>(self) -> *mut T {
        std::ptr::without_provenance_mut(self.encode())
    }

    fn of<T>(ptr: *mut T) -> Option<Self> {
        Self::decode(ptr.addr())
    }
}

/// What a device handle (GPU or MIG) resolves to in the current state.
enum Target<'a> {
    Gpu(&'a GpuInventory),
    Mig(&'a GpuInventory, &'a MigDeviceInfo),
}

impl Mock {
    fn gpu(&self, gpu: usize) -> Option<&GpuInventory> {
        self.node.inventory.gpus.get(gpu)
    }

    fn target(&self, device: sys::nvmlDevice_t) -> Result<Target<'_>, Ret> {
        match Handle::of(device) {
            Some(Handle::Gpu(i)) => self.gpu(i).map(Target::Gpu).ok_or(INVALID_ARGUMENT),
            Some(Handle::Mig { gpu, gi, ci }) => {
                let g = self.gpu(gpu).ok_or(INVALID_ARGUMENT)?;
                g.mig_devices
                    .iter()
                    .find(|m| m.gi_id == gi && m.ci_id == ci)
                    .map(|m| Target::Mig(g, m))
                    .ok_or(NOT_FOUND)
            }
            _ => Err(INVALID_ARGUMENT),
        }
    }

    /// A full GPU's handle only.
    fn full_gpu(&self, device: sys::nvmlDevice_t) -> Result<(usize, &GpuInventory), Ret> {
        match Handle::of(device) {
            Some(Handle::Gpu(i)) => self.gpu(i).map(|g| (i, g)).ok_or(INVALID_ARGUMENT),
            Some(Handle::Mig { .. }) => Err(NOT_SUPPORTED),
            _ => Err(INVALID_ARGUMENT),
        }
    }

    /// A full GPU's handle whose MIG mode is on; `NOT_SUPPORTED` when it is
    /// off, as NVML answers MIG queries then.
    fn mig_gpu(&self, device: sys::nvmlDevice_t) -> Result<(usize, &GpuInventory), Ret> {
        let (i, g) = self.full_gpu(device)?;
        if g.info.mig_enabled {
            Ok((i, g))
        } else {
            Err(NOT_SUPPORTED)
        }
    }

    fn gpu_instance(&self, gi: sys::nvmlGpuInstance_t) -> Result<(usize, GpuInstanceView), Ret> {
        match Handle::of(gi) {
            Some(Handle::GpuInstance { gpu, gi }) => self
                .node
                .gpu_instance(gpu, gi)
                .map(|v| (gpu, v))
                .ok_or(NOT_FOUND),
            _ => Err(INVALID_ARGUMENT),
        }
    }

    /// The health event types GPU `g` supports.
    fn supported_event_types(&self, g: &GpuInventory) -> u64 {
        if self.node.health_events_supported(&g.info.uuid) {
            HEALTH_EVENT_TYPES
        } else {
            0
        }
    }

    /// Appends the events file's newly completed lines to the node's event
    /// log. Unreadable files and lines are reported, never fatal: the node
    /// simply sees no event.
    fn read_events(&mut self) {
        let mut file = match std::fs::File::open(&self.events_file) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                eprintln!(
                    "nvdra-nvml-mock: cannot open {}: {e}",
                    self.events_file.display()
                );
                return;
            }
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if len < self.events_read {
            // Truncated or replaced: a new file, read from its start.
            self.events_read = 0;
        }
        if len == self.events_read {
            return;
        }
        let mut new = Vec::new();
        if let Err(e) = file
            .seek(SeekFrom::Start(self.events_read))
            .and_then(|_| file.read_to_end(&mut new))
        {
            eprintln!(
                "nvdra-nvml-mock: cannot read {}: {e}",
                self.events_file.display()
            );
            return;
        }
        // A line without its newline is still being written.
        let complete = new.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in String::from_utf8_lossy(&new[..complete]).lines() {
            if line
                .split('#')
                .next()
                .is_none_or(|text| text.trim().is_empty())
            {
                continue;
            }
            match line.parse::<HealthEvent>() {
                Ok(event) => self.node.inject_health_event(event),
                Err(e) => eprintln!("nvdra-nvml-mock: {}: {e}", self.events_file.display()),
            }
        }
        self.events_read += complete as u64;
    }

    /// The next event of the log that event set `id` should deliver, moving
    /// its cursor past everything looked at.
    fn next_event(&mut self, id: u64) -> Result<NextEvent, Ret> {
        self.read_events();
        let set = self.event_sets.get(&id).ok_or(INVALID_ARGUMENT)?;
        let log = &self.node.health_events;
        let mut cursor = set.cursor;
        let mut next = NextEvent::Nothing;
        while let Some(event) = log.get(cursor) {
            cursor += 1;
            let Some((event_type, data, gi, ci)) = event.to_nvml() else {
                next = NextEvent::Lost;
                break;
            };
            let Some(gpu) = self.node.gpu_index(&event.gpu_uuid) else {
                continue;
            };
            if set
                .registered
                .get(&gpu)
                .is_some_and(|m| m & event_type != 0)
            {
                next = NextEvent::Event(sys::nvmlEventData_t {
                    device: Handle::Gpu(gpu).ptr(),
                    eventType: event_type,
                    eventData: data,
                    gpuInstanceId: gi,
                    computeInstanceId: ci,
                });
                break;
            }
        }
        if let Some(set) = self.event_sets.get_mut(&id) {
            set.cursor = cursor;
        }
        Ok(next)
    }
}

fn profile(g: &GpuInventory, gi_profile_id: u32) -> Option<&MigProfile> {
    g.mig_profiles
        .iter()
        .find(|p| p.gi_profile_id == gi_profile_id)
}

// ---------------------------------------------------------------------------
// Pointer helpers: the only places raw pointers are dereferenced.
// ---------------------------------------------------------------------------

/// Writes `value` through `ptr`; `INVALID_ARGUMENT` for null.
fn out<T>(ptr: *mut T, value: T) -> Ret {
    if ptr.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: NVML's contract: a non-null out-pointer points to writable
    // memory of the declared type, owned by the caller for the call.
    unsafe { ptr.write(value) };
    SUCCESS
}

/// Copies `s` NUL-terminated into the caller's buffer of `length` bytes.
fn write_str(buf: *mut c_char, length: c_uint, s: &str) -> Ret {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    if s.len() + 1 > length as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` is non-null and, by NVML's contract, holds `length`
    // writable bytes; we write `s.len() + 1 <= length` of them.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        buf.add(s.len()).write(0);
    }
    SUCCESS
}

/// Fills a fixed C array with `s`, NUL-terminated and truncated to fit.
fn fill<const N: usize>(s: &str) -> [c_char; N] {
    let mut a = [0 as c_char; N];
    for (d, b) in a.iter_mut().zip(s.bytes().take(N.saturating_sub(1))) {
        *d = b as c_char;
    }
    a
}

/// Reads a caller's C string; `None` for null or non-UTF-8.
fn cstr<'a>(ptr: *const c_char) -> Option<&'a str> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: NVML's contract: a non-null string argument is NUL-terminated
    // and lives for the call.
    unsafe { CStr::from_ptr(ptr) }.to_str().ok()
}

fn chain(rets: impl IntoIterator<Item = Ret>) -> Ret {
    rets.into_iter().find(|r| *r != SUCCESS).unwrap_or(SUCCESS)
}

// ---------------------------------------------------------------------------
// Encodings NVML uses for facts the profile states as names.
// ---------------------------------------------------------------------------

fn brand_code(brand: &str) -> sys::nvmlBrandType_t {
    match brand {
        "Quadro" => sys::nvmlBrandType_enum_NVML_BRAND_QUADRO,
        "Tesla" => sys::nvmlBrandType_enum_NVML_BRAND_TESLA,
        "NVS" => sys::nvmlBrandType_enum_NVML_BRAND_NVS,
        "Grid" => sys::nvmlBrandType_enum_NVML_BRAND_GRID,
        "GeForce" => sys::nvmlBrandType_enum_NVML_BRAND_GEFORCE,
        "Titan" => sys::nvmlBrandType_enum_NVML_BRAND_TITAN,
        "NvidiaVApps" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA_VAPPS,
        "NvidiaVPC" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA_VPC,
        "NvidiaVCS" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA_VCS,
        "NvidiaVWS" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA_VWS,
        "NvidiaCloudGaming" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA_CLOUD_GAMING,
        "QuadroRTX" => sys::nvmlBrandType_enum_NVML_BRAND_QUADRO_RTX,
        "NvidiaRTX" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA_RTX,
        "Nvidia" => sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA,
        "GeForceRTX" => sys::nvmlBrandType_enum_NVML_BRAND_GEFORCE_RTX,
        "TitanRTX" => sys::nvmlBrandType_enum_NVML_BRAND_TITAN_RTX,
        _ => sys::nvmlBrandType_enum_NVML_BRAND_UNKNOWN,
    }
}

fn architecture_code(arch: Architecture) -> sys::nvmlDeviceArchitecture_t {
    match arch {
        Architecture::Kepler => sys::NVML_DEVICE_ARCH_KEPLER,
        Architecture::Maxwell => sys::NVML_DEVICE_ARCH_MAXWELL,
        Architecture::Pascal => sys::NVML_DEVICE_ARCH_PASCAL,
        Architecture::Volta => sys::NVML_DEVICE_ARCH_VOLTA,
        Architecture::Turing => sys::NVML_DEVICE_ARCH_TURING,
        Architecture::Ampere => sys::NVML_DEVICE_ARCH_AMPERE,
        Architecture::AdaLovelace => sys::NVML_DEVICE_ARCH_ADA,
        Architecture::Hopper => sys::NVML_DEVICE_ARCH_HOPPER,
        Architecture::Blackwell => sys::NVML_DEVICE_ARCH_BLACKWELL,
        _ => sys::NVML_DEVICE_ARCH_UNKNOWN,
    }
}

fn addressing_code(mode: AddressingMode) -> c_uint {
    match mode {
        AddressingMode::None => 0,
        AddressingMode::Hmm => 1,
        AddressingMode::Ats => 2,
    }
}

/// `0000:3b:00.0` → NVML's `00000000:3B:00.0`, with its parts.
fn pci_info(bus_id: &str) -> Option<sys::nvmlPciInfo_t> {
    let (domain, rest) = bus_id.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let [domain, bus, device, function] =
        [domain, bus, device, function].map(|s| u32::from_str_radix(s, 16).ok());
    let (domain, bus, device, function) = (domain?, bus?, device?, function?);
    Some(sys::nvmlPciInfo_t {
        busIdLegacy: fill(&format!("{domain:04X}:{bus:02X}:{device:02X}.{function:X}")),
        domain,
        bus,
        device,
        // An NVIDIA vendor ID with a device ID nvdra does not read.
        pciDeviceId: 0x2330_10de,
        pciSubSystemId: 0x16c1_10de,
        busId: fill(&format!("{domain:08X}:{bus:02X}:{device:02X}.{function:X}")),
    })
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

// ---------------------------------------------------------------------------
// Exported NVML functions
// ---------------------------------------------------------------------------

/// `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Ret {
    init()
}

/// `nvmlInitWithFlags`: flags (`NO_GPUS`, `NO_ATTACH`) change nothing here.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    init()
}

/// `nvmlShutdown`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Ret {
    match lock().as_mut() {
        Some(mock) if mock.inits > 0 => {
            mock.inits -= 1;
            SUCCESS
        }
        _ => UNINITIALIZED,
    }
}

/// `nvmlErrorString`: NVML's wording for the codes the mock returns.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        NOT_SUPPORTED => c"Not Supported",
        NOT_FOUND => c"Not Found",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => c"Driver Not Loaded",
        TIMEOUT => c"Timeout",
        GPU_IS_LOST => c"GPU is lost",
        sys::nvmlReturn_enum_NVML_ERROR_IN_USE => c"In use by another client",
        sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES => c"Insufficient resources",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    with(|m| write_str(version, length, &m.node.inventory.driver.driver_version))
}

/// `nvmlSystemGetNVMLVersion`: `<CUDA major>.<driver version>`, as NVML
/// spells it.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> Ret {
    with(|m| {
        let d = &m.node.inventory.driver;
        let v = format!("{}.{}", d.cuda_driver_version.major, d.driver_version);
        write_str(version, length, &v)
    })
}

fn cuda_version(out_version: *mut c_int) -> Ret {
    with(|m| {
        let v = m.node.inventory.driver.cuda_driver_version;
        out(out_version, (v.major * 1000 + v.minor * 10) as c_int)
    })
}

/// `nvmlSystemGetCudaDriverVersion`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> Ret {
    cuda_version(version)
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> Ret {
    cuda_version(version)
}

/// `nvmlDeviceGetCount_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    with(|m| out(count, m.node.inventory.gpus.len() as c_uint))
}

/// `nvmlDeviceGetHandleByIndex_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut sys::nvmlDevice_t,
) -> Ret {
    with(|m| match m.gpu(index as usize) {
        Some(_) => out(device, Handle::Gpu(index as usize).ptr()),
        None => INVALID_ARGUMENT,
    })
}

/// `nvmlDeviceGetHandleByUUID`: full GPUs and MIG devices.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut sys::nvmlDevice_t,
) -> Ret {
    let Some(uuid) = cstr(uuid) else {
        return INVALID_ARGUMENT;
    };
    with(|m| {
        for (i, g) in m.node.inventory.gpus.iter().enumerate() {
            if g.info.uuid == uuid {
                return out(device, Handle::Gpu(i).ptr());
            }
            if let Some(mig) = g.mig_devices.iter().find(|d| d.uuid == uuid) {
                let h = Handle::Mig {
                    gpu: i,
                    gi: mig.gi_id,
                    ci: mig.ci_id,
                };
                return out(device, h.ptr());
            }
        }
        NOT_FOUND
    })
}

/// `nvmlDeviceGetHandleByPciBusId_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut sys::nvmlDevice_t,
) -> Ret {
    let Some(bus_id) = cstr(bus_id) else {
        return INVALID_ARGUMENT;
    };
    let wanted = nvdra_gpu::device::canonical_pci_bus_id(bus_id);
    with(|m| {
        m.node
            .inventory
            .gpus
            .iter()
            .position(|g| Some(&g.info.pci_bus_id) == wanted.as_ref())
            .map_or(NOT_FOUND, |i| out(device, Handle::Gpu(i).ptr()))
    })
}

/// `nvmlDeviceGetUUID`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetUUID(
    device: sys::nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(g)) => write_str(uuid, length, &g.info.uuid),
        Ok(Target::Mig(_, mig)) => write_str(uuid, length, &mig.uuid),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetMinorNumber` (full GPUs only).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMinorNumber(device: sys::nvmlDevice_t, minor: *mut c_uint) -> Ret {
    with(|m| match m.full_gpu(device) {
        Ok((_, g)) => out(minor, g.info.minor),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetPciInfo_v3`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: sys::nvmlDevice_t,
    pci: *mut sys::nvmlPciInfo_t,
) -> Ret {
    with(|m| {
        let g = match m.target(device) {
            Ok(Target::Gpu(g) | Target::Mig(g, _)) => g,
            Err(r) => return r,
        };
        match pci_info(&g.info.pci_bus_id) {
            Some(info) => out(pci, info),
            None => UNKNOWN,
        }
    })
}

/// `nvmlDeviceGetName`: a MIG device is `<GPU name> MIG <profile>`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetName(
    device: sys::nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(g)) => write_str(name, length, &g.info.product_name),
        Ok(Target::Mig(g, mig)) => write_str(
            name,
            length,
            &format!("{} MIG {}", g.info.product_name, mig.profile),
        ),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetBrand`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetBrand(
    device: sys::nvmlDevice_t,
    brand: *mut sys::nvmlBrandType_t,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(g) | Target::Mig(g, _)) => out(brand, brand_code(&g.info.brand)),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetArchitecture`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetArchitecture(
    device: sys::nvmlDevice_t,
    arch: *mut sys::nvmlDeviceArchitecture_t,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(g) | Target::Mig(g, _)) => out(arch, architecture_code(g.info.architecture)),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetCudaComputeCapability`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: sys::nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(g) | Target::Mig(g, _)) => {
            let cc = g.info.cuda_compute_capability;
            chain([out(major, cc.major as c_int), out(minor, cc.minor as c_int)])
        }
        Err(r) => r,
    })
}

fn memory_total(m: &Mock, device: sys::nvmlDevice_t) -> Result<u64, Ret> {
    match m.target(device)? {
        Target::Gpu(g) => g.info.memory_bytes.ok_or(NOT_SUPPORTED),
        Target::Mig(_, mig) => Ok(mig.capacities.memory_bytes),
    }
}

/// `nvmlDeviceGetMemoryInfo`: nothing is in use on a mock GPU.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMemoryInfo(
    device: sys::nvmlDevice_t,
    memory: *mut sys::nvmlMemory_t,
) -> Ret {
    with(|m| match memory_total(m, device) {
        Ok(total) => out(
            memory,
            sys::nvmlMemory_t {
                total,
                free: total,
                used: 0,
            },
        ),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: sys::nvmlDevice_t,
    memory: *mut sys::nvmlMemory_v2_t,
) -> Ret {
    with(|m| match memory_total(m, device) {
        Ok(total) => out(
            memory,
            sys::nvmlMemory_v2_t {
                version: (std::mem::size_of::<sys::nvmlMemory_v2_t>() as c_uint) | (2 << 24),
                total,
                reserved: 0,
                free: total,
                used: 0,
            },
        ),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetMigMode`: `NOT_SUPPORTED` on GPUs without MIG.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMigMode(
    device: sys::nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Ret {
    with(|m| match m.full_gpu(device) {
        Ok((_, g)) if g.info.mig_capable => {
            let mode = c_uint::from(g.info.mig_enabled);
            chain([out(current, mode), out(pending, mode)])
        }
        Ok(_) => NOT_SUPPORTED,
        Err(r) => r,
    })
}

/// `nvmlDeviceSetMigMode`: takes effect at once (activation status
/// `SUCCESS`), as on Hopper and later without running processes.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetMigMode(
    device: sys::nvmlDevice_t,
    mode: c_uint,
    activation_status: *mut Ret,
) -> Ret {
    if mode > 1 {
        return INVALID_ARGUMENT;
    }
    change(|m| {
        let gpu = match m.full_gpu(device) {
            Ok((i, _)) => i,
            Err(r) => return Ok(r),
        };
        m.node.set_mig_mode(gpu, mode == 1)?;
        Ok(out(activation_status, SUCCESS))
    })
}

/// `nvmlDeviceGetComputeMode`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetComputeMode(
    device: sys::nvmlDevice_t,
    mode: *mut sys::nvmlComputeMode_t,
) -> Ret {
    with(|m| match m.full_gpu(device) {
        Ok((_, g)) => out(mode, m.node.compute_mode(&g.info.uuid).to_nvml()),
        Err(r) => r,
    })
}

/// `nvmlDeviceSetComputeMode`: the removed exclusive-thread mode is an
/// invalid argument, as on current drivers.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetComputeMode(
    device: sys::nvmlDevice_t,
    mode: sys::nvmlComputeMode_t,
) -> Ret {
    let Some(mode) = nvdra_gpu::ComputeMode::from_nvml(mode) else {
        return INVALID_ARGUMENT;
    };
    change(|m| {
        let uuid = match m.full_gpu(device) {
            Ok((_, g)) => g.info.uuid.clone(),
            Err(r) => return Ok(r),
        };
        m.node.set_compute_mode(&uuid, mode);
        Ok(SUCCESS)
    })
}

/// `nvmlDeviceGetGpuInstanceProfileInfo`, by NVML profile *index*.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuInstanceProfileInfo(
    device: sys::nvmlDevice_t,
    index: c_uint,
    info: *mut sys::nvmlGpuInstanceProfileInfo_t,
) -> Ret {
    if index >= sys::NVML_GPU_INSTANCE_PROFILE_COUNT {
        return INVALID_ARGUMENT;
    }
    with(|m| {
        let g = match m.full_gpu(device) {
            Ok((_, g)) if g.info.mig_capable => g,
            Ok(_) => return NOT_SUPPORTED,
            Err(r) => return r,
        };
        let Some(p) = g
            .mig_profiles
            .iter()
            .find(|p| profile_index_of_id(p.gi_profile_id) == Some(index))
        else {
            return NOT_SUPPORTED;
        };
        let c = p.capacities;
        out(
            info,
            sys::nvmlGpuInstanceProfileInfo_t {
                id: p.gi_profile_id,
                isP2pSupported: 0,
                sliceCount: p.slice_count,
                instanceCount: p.instance_count,
                multiprocessorCount: c.multiprocessors,
                copyEngineCount: c.copy_engines,
                decoderCount: c.decoders,
                encoderCount: c.encoders,
                jpegCount: c.jpeg_engines,
                ofaCount: c.ofa_engines,
                memorySizeMB: mib(c.memory_bytes),
            },
        )
    })
}

/// `nvmlDeviceGetGpuInstancePossiblePlacements_v2`: every placement of the
/// profile, taken or not; a null array asks for the count.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuInstancePossiblePlacements_v2(
    device: sys::nvmlDevice_t,
    profile_id: c_uint,
    placements: *mut sys::nvmlGpuInstancePlacement_t,
    count: *mut c_uint,
) -> Ret {
    with(|m| {
        let g = match m.full_gpu(device) {
            Ok((_, g)) if g.info.mig_capable => g,
            Ok(_) => return NOT_SUPPORTED,
            Err(r) => return r,
        };
        let Some(p) = profile(g, profile_id) else {
            return INVALID_ARGUMENT;
        };
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        let n = p.placements.len() as c_uint;
        if placements.is_null() {
            return out(count, n);
        }
        // SAFETY: `count` is non-null (checked above) and points to the
        // caller's capacity.
        let capacity = unsafe { count.read() };
        if capacity < n {
            return chain([out(count, n), INSUFFICIENT_SIZE]);
        }
        for (k, pl) in p.placements.iter().enumerate() {
            let slot = placements.wrapping_add(k);
            let r = out(
                slot,
                sys::nvmlGpuInstancePlacement_t {
                    start: pl.start,
                    size: pl.size,
                },
            );
            if r != SUCCESS {
                return r;
            }
        }
        out(count, n)
    })
}

/// `nvmlDeviceGetGpuInstanceRemainingCapacity`: how many more instances of
/// the profile could be created now.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuInstanceRemainingCapacity(
    device: sys::nvmlDevice_t,
    profile_id: c_uint,
    count: *mut c_uint,
) -> Ret {
    with(|m| {
        let (i, g) = match m.mig_gpu(device) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Some(p) = profile(g, profile_id) else {
            return INVALID_ARGUMENT;
        };
        // Try placements in order on a scratch copy of the node.
        let mut scratch = m.node.clone();
        let n = p
            .placements
            .iter()
            .filter(|pl| scratch.create_gpu_instance(i, profile_id, pl.start).is_ok())
            .count();
        out(count, n as c_uint)
    })
}

fn create_gi(
    m: &mut Mock,
    device: sys::nvmlDevice_t,
    profile_id: u32,
    start: Option<u32>,
) -> Result<(usize, u32), MigRefusal> {
    let (i, g) = m
        .full_gpu(device)
        .map_err(|_| MigRefusal::InvalidArgument)?;
    let start = match start {
        Some(s) => s,
        // Without a placement NVML picks the first one that fits.
        None => {
            let p = profile(g, profile_id).ok_or(MigRefusal::InvalidArgument)?;
            let mut scratch = m.node.clone();
            p.placements
                .iter()
                .map(|pl| pl.start)
                .find(|s| scratch.create_gpu_instance(i, profile_id, *s).is_ok())
                .ok_or(MigRefusal::InsufficientResources)?
        }
    };
    m.node
        .create_gpu_instance(i, profile_id, start)
        .map(|gi| (i, gi))
}

/// `nvmlDeviceCreateGpuInstance`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceCreateGpuInstance(
    device: sys::nvmlDevice_t,
    profile_id: c_uint,
    gpu_instance: *mut sys::nvmlGpuInstance_t,
) -> Ret {
    if gpu_instance.is_null() {
        return INVALID_ARGUMENT;
    }
    change(|m| {
        let (gpu, gi) = create_gi(m, device, profile_id, None)?;
        Ok(out(gpu_instance, Handle::GpuInstance { gpu, gi }.ptr()))
    })
}

/// `nvmlDeviceCreateGpuInstanceWithPlacement`: the placement's size must be
/// the profile's.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceCreateGpuInstanceWithPlacement(
    device: sys::nvmlDevice_t,
    profile_id: c_uint,
    placement: *const sys::nvmlGpuInstancePlacement_t,
    gpu_instance: *mut sys::nvmlGpuInstance_t,
) -> Ret {
    if placement.is_null() || gpu_instance.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null (checked above); by NVML's contract it points to a
    // placement the caller owns for the call.
    let placement = unsafe { placement.read() };
    change(|m| {
        // With MIG on, a placement whose size is not the profile's is an
        // invalid argument; otherwise the node's own rules decide.
        let wrong_size = m.full_gpu(device).is_ok_and(|(_, g)| {
            g.info.mig_enabled
                && !profile(g, profile_id).is_some_and(|p| {
                    p.placements
                        .iter()
                        .any(|pl| pl.start == placement.start && pl.size == placement.size)
                })
        });
        if wrong_size {
            return Err(MigRefusal::InvalidArgument);
        }
        let (gpu, gi) = create_gi(m, device, profile_id, Some(placement.start))?;
        Ok(out(gpu_instance, Handle::GpuInstance { gpu, gi }.ptr()))
    })
}

/// `nvmlGpuInstanceDestroy`: `IN_USE` while it has a compute instance.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlGpuInstanceDestroy(gpu_instance: sys::nvmlGpuInstance_t) -> Ret {
    change(|m| {
        let (gpu, view) = match m.gpu_instance(gpu_instance) {
            Ok(x) => x,
            Err(r) => return Ok(r),
        };
        m.node.destroy_gpu_instance(gpu, view.gi_id)?;
        Ok(SUCCESS)
    })
}

/// `nvmlDeviceGetGpuInstances`: the GPU instances of one profile.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuInstances(
    device: sys::nvmlDevice_t,
    profile_id: c_uint,
    gpu_instances: *mut sys::nvmlGpuInstance_t,
    count: *mut c_uint,
) -> Ret {
    with(|m| {
        let (i, g) = match m.mig_gpu(device) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if profile(g, profile_id).is_none() || gpu_instances.is_null() {
            return INVALID_ARGUMENT;
        }
        let mut n = 0;
        for v in m.node.gpu_instances(i) {
            if v.gi_profile_id != profile_id {
                continue;
            }
            let r = out(
                gpu_instances.wrapping_add(n),
                Handle::GpuInstance {
                    gpu: i,
                    gi: v.gi_id,
                }
                .ptr(),
            );
            if r != SUCCESS {
                return r;
            }
            n += 1;
        }
        out(count, n as c_uint)
    })
}

/// `nvmlDeviceGetGpuInstanceById`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuInstanceById(
    device: sys::nvmlDevice_t,
    id: c_uint,
    gpu_instance: *mut sys::nvmlGpuInstance_t,
) -> Ret {
    with(|m| {
        let i = match m.mig_gpu(device) {
            Ok((i, _)) => i,
            Err(r) => return r,
        };
        match m.node.gpu_instance(i, id) {
            Some(_) => out(gpu_instance, Handle::GpuInstance { gpu: i, gi: id }.ptr()),
            None => NOT_FOUND,
        }
    })
}

/// `nvmlGpuInstanceGetInfo`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlGpuInstanceGetInfo(
    gpu_instance: sys::nvmlGpuInstance_t,
    info: *mut sys::nvmlGpuInstanceInfo_t,
) -> Ret {
    with(|m| match m.gpu_instance(gpu_instance) {
        Ok((gpu, v)) => out(
            info,
            sys::nvmlGpuInstanceInfo_t {
                device: Handle::Gpu(gpu).ptr(),
                id: v.gi_id,
                profileId: v.gi_profile_id,
                placement: sys::nvmlGpuInstancePlacement_t {
                    start: v.placement.start,
                    size: v.placement.size,
                },
            },
        ),
        Err(r) => r,
    })
}

/// `nvmlGpuInstanceGetComputeInstanceProfileInfo`: only the profile that
/// spans the whole GPU instance with shared engines is modelled.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlGpuInstanceGetComputeInstanceProfileInfo(
    gpu_instance: sys::nvmlGpuInstance_t,
    profile: c_uint,
    eng_profile: c_uint,
    info: *mut sys::nvmlComputeInstanceProfileInfo_t,
) -> Ret {
    if profile >= sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        return INVALID_ARGUMENT;
    }
    with(|m| {
        let (gpu, v) = match m.gpu_instance(gpu_instance) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let Some(p) = m.gpu(gpu).and_then(|g| self::profile(g, v.gi_profile_id)) else {
            return UNKNOWN;
        };
        if eng_profile != 0 || ci_profile_index_of_slices(p.slice_count) != Some(profile) {
            return NOT_SUPPORTED;
        }
        let c = p.capacities;
        out(
            info,
            sys::nvmlComputeInstanceProfileInfo_t {
                id: profile,
                sliceCount: p.slice_count,
                instanceCount: 1,
                multiprocessorCount: c.multiprocessors,
                sharedCopyEngineCount: c.copy_engines,
                sharedDecoderCount: c.decoders,
                sharedEncoderCount: c.encoders,
                sharedJpegCount: c.jpeg_engines,
                sharedOfaCount: c.ofa_engines,
            },
        )
    })
}

/// `nvmlGpuInstanceCreateComputeInstance` (the full-size profile only).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlGpuInstanceCreateComputeInstance(
    gpu_instance: sys::nvmlGpuInstance_t,
    profile_id: c_uint,
    compute_instance: *mut sys::nvmlComputeInstance_t,
) -> Ret {
    if compute_instance.is_null() {
        return INVALID_ARGUMENT;
    }
    change(|m| {
        let (gpu, v) = match m.gpu_instance(gpu_instance) {
            Ok(x) => x,
            Err(r) => return Ok(r),
        };
        let slices = m
            .gpu(gpu)
            .and_then(|g| profile(g, v.gi_profile_id))
            .map(|p| p.slice_count);
        if slices.and_then(ci_profile_index_of_slices) != Some(profile_id) {
            return Ok(NOT_SUPPORTED);
        }
        let mig = m.node.create_compute_instance(gpu, v.gi_id)?;
        let h = Handle::ComputeInstance {
            gpu,
            gi: mig.gi_id,
            ci: mig.ci_id,
        };
        Ok(out(compute_instance, h.ptr()))
    })
}

fn compute_instance_by_handle(
    m: &Mock,
    ci: sys::nvmlComputeInstance_t,
) -> Result<(usize, &MigDeviceInfo), Ret> {
    match Handle::of(ci) {
        Some(Handle::ComputeInstance { gpu, gi, ci }) => m
            .gpu(gpu)
            .and_then(|g| {
                g.mig_devices
                    .iter()
                    .find(|d| d.gi_id == gi && d.ci_id == ci)
            })
            .map(|d| (gpu, d))
            .ok_or(NOT_FOUND),
        _ => Err(INVALID_ARGUMENT),
    }
}

/// `nvmlComputeInstanceDestroy`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlComputeInstanceDestroy(compute_instance: sys::nvmlComputeInstance_t) -> Ret {
    change(|m| {
        let (gpu, gi, ci) = match compute_instance_of(m, compute_instance) {
            Ok(x) => x,
            Err(r) => return Ok(r),
        };
        m.node.destroy_compute_instance(gpu, gi, ci)?;
        Ok(SUCCESS)
    })
}

fn compute_instance_of(m: &Mock, ci: sys::nvmlComputeInstance_t) -> Result<(usize, u32, u32), Ret> {
    compute_instance_by_handle(m, ci).map(|(gpu, d)| (gpu, d.gi_id, d.ci_id))
}

/// `nvmlGpuInstanceGetComputeInstanceById`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlGpuInstanceGetComputeInstanceById(
    gpu_instance: sys::nvmlGpuInstance_t,
    id: c_uint,
    compute_instance: *mut sys::nvmlComputeInstance_t,
) -> Ret {
    with(|m| match m.gpu_instance(gpu_instance) {
        Ok((gpu, v)) if v.ci_id == Some(id) => out(
            compute_instance,
            Handle::ComputeInstance {
                gpu,
                gi: v.gi_id,
                ci: id,
            }
            .ptr(),
        ),
        Ok(_) => NOT_FOUND,
        Err(r) => r,
    })
}

/// `nvmlComputeInstanceGetInfo_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlComputeInstanceGetInfo_v2(
    compute_instance: sys::nvmlComputeInstance_t,
    info: *mut sys::nvmlComputeInstanceInfo_t,
) -> Ret {
    with(|m| match compute_instance_by_handle(m, compute_instance) {
        Ok((gpu, d)) => {
            let slices = m
                .gpu(gpu)
                .and_then(|g| profile(g, d.gi_profile_id))
                .map_or(0, |p| p.slice_count);
            out(
                info,
                sys::nvmlComputeInstanceInfo_t {
                    device: Handle::Gpu(gpu).ptr(),
                    gpuInstance: Handle::GpuInstance { gpu, gi: d.gi_id }.ptr(),
                    id: d.ci_id,
                    profileId: ci_profile_index_of_slices(slices).unwrap_or(0),
                    placement: sys::nvmlComputeInstancePlacement_t {
                        start: 0,
                        size: slices,
                    },
                },
            )
        }
        Err(r) => r,
    })
}

/// `nvmlDeviceIsMigDeviceHandle`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: sys::nvmlDevice_t,
    is_mig: *mut c_uint,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(_)) => out(is_mig, 0),
        Ok(Target::Mig(..)) => out(is_mig, 1),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetGpuInstanceId` of a MIG device.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuInstanceId(device: sys::nvmlDevice_t, id: *mut c_uint) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Mig(_, mig)) => out(id, mig.gi_id),
        Ok(Target::Gpu(_)) => NOT_SUPPORTED,
        Err(r) => r,
    })
}

/// `nvmlDeviceGetComputeInstanceId` of a MIG device.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: sys::nvmlDevice_t,
    id: *mut c_uint,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Mig(_, mig)) => out(id, mig.ci_id),
        Ok(Target::Gpu(_)) => NOT_SUPPORTED,
        Err(r) => r,
    })
}

/// `nvmlDeviceGetMaxMigDeviceCount`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: sys::nvmlDevice_t,
    count: *mut c_uint,
) -> Ret {
    with(|m| match m.full_gpu(device) {
        Ok((_, g)) if g.info.mig_capable => out(count, MAX_MIG_DEVICES),
        Ok(_) => NOT_SUPPORTED,
        Err(r) => r,
    })
}

/// `nvmlDeviceGetMigDeviceHandleByIndex`: existing MIG devices in
/// (GI, CI) order; `NOT_FOUND` past the last.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: sys::nvmlDevice_t,
    index: c_uint,
    mig: *mut sys::nvmlDevice_t,
) -> Ret {
    with(|m| {
        let (i, g) = match m.mig_gpu(device) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if index >= MAX_MIG_DEVICES {
            return INVALID_ARGUMENT;
        }
        match g.mig_devices.get(index as usize) {
            Some(d) => out(
                mig,
                Handle::Mig {
                    gpu: i,
                    gi: d.gi_id,
                    ci: d.ci_id,
                }
                .ptr(),
            ),
            None => NOT_FOUND,
        }
    })
}

/// `nvmlDeviceGetDeviceHandleFromMigDeviceHandle`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig: sys::nvmlDevice_t,
    device: *mut sys::nvmlDevice_t,
) -> Ret {
    with(|m| match (m.target(mig), Handle::of(mig)) {
        (Ok(Target::Mig(..)), Some(Handle::Mig { gpu, .. })) => out(device, Handle::Gpu(gpu).ptr()),
        (Ok(_), _) => INVALID_ARGUMENT,
        (Err(r), _) => r,
    })
}

/// `nvmlDeviceGetAttributes_v2` of a MIG device (full GPUs: not modelled).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetAttributes_v2(
    device: sys::nvmlDevice_t,
    attributes: *mut sys::nvmlDeviceAttributes_t,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Mig(g, mig)) => {
            let slices = profile(g, mig.gi_profile_id).map_or(0, |p| p.slice_count);
            let c = mig.capacities;
            out(
                attributes,
                sys::nvmlDeviceAttributes_t {
                    multiprocessorCount: c.multiprocessors,
                    sharedCopyEngineCount: c.copy_engines,
                    sharedDecoderCount: c.decoders,
                    sharedEncoderCount: c.encoders,
                    sharedJpegCount: c.jpeg_engines,
                    sharedOfaCount: c.ofa_engines,
                    gpuInstanceSliceCount: slices,
                    computeInstanceSliceCount: slices,
                    memorySizeMB: mib(c.memory_bytes),
                },
            )
        }
        Ok(Target::Gpu(_)) => NOT_SUPPORTED,
        Err(r) => r,
    })
}

fn fabric(m: &Mock, device: sys::nvmlDevice_t) -> Result<nvdra_gpu::FabricInfo, Ret> {
    let (_, g) = m.full_gpu(device)?;
    g.fabric.ok_or(NOT_SUPPORTED)
}

/// `nvmlDeviceGetGpuFabricInfo`: `NOT_SUPPORTED` when the profile gives the
/// GPU no fabric.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuFabricInfo(
    device: sys::nvmlDevice_t,
    info: *mut sys::nvmlGpuFabricInfo_t,
) -> Ret {
    with(|m| match fabric(m, device) {
        Ok(f) => out(
            info,
            sys::nvmlGpuFabricInfo_t {
                clusterUuid: f.cluster_uuid.0,
                status: f.status.0,
                cliqueId: f.clique_id,
                state: f.state.to_nvml(),
            },
        ),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetGpuFabricInfoV` (v3 layout; health fields report healthy).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetGpuFabricInfoV(
    device: sys::nvmlDevice_t,
    info: *mut sys::nvmlGpuFabricInfoV_t,
) -> Ret {
    with(|m| match fabric(m, device) {
        Ok(f) => out(
            info,
            sys::nvmlGpuFabricInfoV_t {
                version: (std::mem::size_of::<sys::nvmlGpuFabricInfoV_t>() as c_uint) | (3 << 24),
                clusterUuid: f.cluster_uuid.0,
                status: f.status.0,
                cliqueId: f.clique_id,
                state: f.state.to_nvml(),
                healthMask: 0,
                healthSummary: 0,
            },
        ),
        Err(r) => r,
    })
}

/// `nvmlDeviceGetAddressingMode`: `NOT_SUPPORTED` when the profile states
/// none.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetAddressingMode(
    device: sys::nvmlDevice_t,
    mode: *mut sys::nvmlDeviceAddressingMode_t,
) -> Ret {
    with(|m| match m.full_gpu(device) {
        Ok((_, g)) => match g.info.addressing_mode {
            Some(a) => out(
                mode,
                sys::nvmlDeviceAddressingMode_t {
                    version: (std::mem::size_of::<sys::nvmlDeviceAddressingMode_t>() as c_uint)
                        | (1 << 24),
                    value: addressing_code(a),
                },
            ),
            None => NOT_SUPPORTED,
        },
        Err(r) => r,
    })
}

/// `nvmlEventSetCreate`: a set that sees the events read from now on (the
/// events file is read first, so lines written before do not reach it).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetCreate(set: *mut sys::nvmlEventSet_t) -> Ret {
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    with(|m| {
        m.read_events();
        let id = m.next_event_set;
        m.next_event_set += 1;
        let cursor = m.node.health_events.len();
        m.event_sets.insert(
            id,
            EventSet {
                registered: BTreeMap::new(),
                cursor,
            },
        );
        out(set, Handle::EventSet(id).ptr())
    })
}

/// `nvmlDeviceGetSupportedEventTypes`: the critical-Xid and both ECC types
/// on a full GPU, none on a GPU whose profile says `health_events: false`
/// or on a MIG device (its events come through its parent GPU).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: sys::nvmlDevice_t,
    types: *mut c_ulonglong,
) -> Ret {
    with(|m| match m.target(device) {
        Ok(Target::Gpu(g)) => out(types, m.supported_event_types(g)),
        Ok(Target::Mig(..)) => out(types, 0),
        Err(r) => r,
    })
}

/// `nvmlDeviceRegisterEvents`: `NOT_SUPPORTED` when `types` asks for a type
/// the GPU does not support (as NVML answers); registering again adds types.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: sys::nvmlDevice_t,
    types: c_ulonglong,
    set: sys::nvmlEventSet_t,
) -> Ret {
    let Some(Handle::EventSet(id)) = Handle::of(set) else {
        return INVALID_ARGUMENT;
    };
    with(|m| {
        let (gpu, supported) = match m.target(device) {
            Ok(Target::Gpu(g)) => (g.info.index as usize, m.supported_event_types(g)),
            Ok(Target::Mig(..)) => return NOT_SUPPORTED,
            Err(r) => return r,
        };
        if supported == 0 || types & !supported != 0 {
            return NOT_SUPPORTED;
        }
        match m.event_sets.get_mut(&id) {
            Some(s) => {
                *s.registered.entry(gpu).or_default() |= types;
                SUCCESS
            }
            None => INVALID_ARGUMENT,
        }
    })
}

/// `nvmlEventSetWait_v2`: the next event of a registered GPU and type, or
/// `GPU_IS_LOST` for a `lost` line; otherwise it polls the events file
/// until the timeout and answers `TIMEOUT`. The lock is never held while
/// sleeping, so other NVML calls go on meanwhile.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetWait_v2(
    set: sys::nvmlEventSet_t,
    data: *mut sys::nvmlEventData_t,
    timeout_ms: c_uint,
) -> Ret {
    let Some(Handle::EventSet(id)) = Handle::of(set) else {
        return INVALID_ARGUMENT;
    };
    if data.is_null() {
        return INVALID_ARGUMENT;
    }
    let until = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        let next = match lock().as_mut() {
            Some(m) if m.inits > 0 => m.next_event(id),
            _ => return UNINITIALIZED,
        };
        match next {
            Ok(NextEvent::Event(event)) => return out(data, event),
            Ok(NextEvent::Lost) => return GPU_IS_LOST,
            Ok(NextEvent::Nothing) => {}
            Err(r) => return r,
        }
        let now = Instant::now();
        if now >= until {
            return TIMEOUT;
        }
        std::thread::sleep(EVENT_POLL.min(until - now));
    }
}

/// `nvmlEventSetFree`; a set already freed is an invalid argument.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: sys::nvmlEventSet_t) -> Ret {
    let Some(Handle::EventSet(id)) = Handle::of(set) else {
        return INVALID_ARGUMENT;
    };
    with(|m| match m.event_sets.remove(&id) {
        Some(_) => SUCCESS,
        None => INVALID_ARGUMENT,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_reject_strangers() {
        for h in [
            Handle::Gpu(0),
            Handle::Gpu(7),
            Handle::Mig {
                gpu: 3,
                gi: 14,
                ci: 7,
            },
            Handle::GpuInstance { gpu: 1, gi: 0 },
            Handle::ComputeInstance {
                gpu: 2,
                gi: 5,
                ci: 0,
            },
            Handle::EventSet(1),
            Handle::EventSet(EVENT_SET_ID_MASK as u64),
        ] {
            assert_eq!(Handle::of(h.ptr::<u8>()), Some(h));
        }
        assert_eq!(Handle::of(std::ptr::null_mut::<u8>()), None);
        let mut x = 0u8;
        assert_eq!(Handle::of(&mut x as *mut u8), None);
    }

    #[test]
    fn pci_ids_in_nvml_spelling() {
        let info = pci_info("0000:3b:00.1").unwrap();
        let bus_id: String = info
            .busId
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8 as char)
            .collect();
        assert_eq!(bus_id, "00000000:3B:00.1");
        assert_eq!((info.domain, info.bus, info.device), (0, 0x3b, 0));
        assert!(pci_info("garbage").is_none());
    }

    #[test]
    fn strings_respect_the_buffer() {
        let mut buf = [1 as c_char; 4];
        assert_eq!(write_str(buf.as_mut_ptr(), 4, "abcd"), INSUFFICIENT_SIZE);
        assert_eq!(write_str(buf.as_mut_ptr(), 4, "abc"), SUCCESS);
        assert_eq!(buf, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
        assert_eq!(write_str(std::ptr::null_mut(), 4, "a"), INVALID_ARGUMENT);
    }
}

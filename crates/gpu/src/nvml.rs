//! [`NvmlBackend`]: the [`GpuBackend`] over the real NVML library.
//!
//! Construction discovers the driver root ([`DriverRoot::discover`]), loads
//! `libnvidia-ml.so.1` from it by absolute path and initialises NVML once
//! (with `NO_GPUS`, so a node whose GPUs are all passed through still
//! starts), on a dedicated worker thread (module `worker`). Every later NVML
//! call runs on that thread; the caller waits at most the call timeout and
//! gets [`Error::Timeout`] otherwise, so a hung driver can never block the
//! agent. NVML is shut down when the backend is dropped.
//!
//! The backend only reads, except in the three MIG changes of the trait
//! (mode, create, destroy), which the agent makes only for dynamic MIG and
//! the read-only hardware check never makes.
//! Upstream conventions it follows: PCI bus IDs are canonicalised, the PCIe
//! root comes from sysfs (missing → `None`, logged), MIG profile names are
//! derived as go-nvlib derives them, unsupported features (MIG, fabric,
//! addressing mode, memory info) read as "absent" rather than errors.
//! Deviations: an architecture or brand value this build does not know reads
//! as `Unknown` (upstream fails the GPU); a MIG device whose compute instance
//! is smaller than its GPU instance is named `<C>c.<G>g.<GB>gb` (upstream
//! fails enumeration).
//!
//! Per GPU, the MIG profile table (≈ 50 ms of NVML calls) is cached on the
//! worker thread, keyed by UUID and MIG mode.
//!
//! Health watches (module `health`) run on threads of their own, with their
//! own NVML handle, so waiting for events never delays the calls above.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nvml_wrapper::bitmasks::InitFlags;
use nvml_wrapper::enum_wrappers::device::Brand;
use nvml_wrapper::enums::device::DeviceArchitecture;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use crate::Error;
use crate::backend::{GpuBackend, GpuInventory, Inventory};
use crate::device::{
    AddressingMode, Architecture, ComputeCapability, CudaVersion, DriverInfo, GpuInfo,
    canonical_pci_bus_id,
};
use crate::driver_root::DriverRoot;
use crate::fabric::{ClusterUuid, FabricInfo, FabricState, FabricStatus};
use crate::fake::{create_op, destroy_op};
use crate::health::HealthWatch;
use crate::imex::{ImexInfo, ImexReader};
use crate::mig::{
    MigCapacities, MigDeviceInfo, MigPlacement, MigProfile, MigRefusal, ci_profile_index_of_slices,
    gi_slices_of_index, mig_memory_gb, profile_index, profile_name, suffix_of_index,
};
use crate::nodes::{CapabilityReader, MigCapabilities};
use crate::pcie::pcie_root;
use crate::sharing::{ComputeMode, TimeSlice, run_set_time_slice};

mod health;
mod raw;
pub(crate) mod worker;

use worker::Worker;

/// How to open NVML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlOptions {
    /// Driver root to search for NVML (`/` or e.g. `/run/nvidia/driver`).
    pub driver_root: PathBuf,
    /// Where sysfs is mounted (for PCIe roots).
    pub sysfs_root: PathBuf,
    /// Where procfs is mounted (for MIG capability minors and IMEX facts).
    pub proc_root: PathBuf,
    /// Longest wait for one NVML call.
    pub call_timeout: Duration,
    /// Longest wait for loading and initialising NVML.
    pub init_timeout: Duration,
}

impl NvmlOptions {
    /// Defaults: sysfs at `/sys`, procfs at `/proc`, 10 s per call (well
    /// inside the kubelet's 45 s per request), 30 s for initialisation
    /// (first init without persistence mode can take seconds).
    pub fn new(driver_root: impl Into<PathBuf>) -> Self {
        Self {
            driver_root: driver_root.into(),
            sysfs_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            call_timeout: Duration::from_secs(10),
            init_timeout: Duration::from_secs(30),
        }
    }
}

/// State living on the NVML worker thread.
struct NvmlState {
    nvml: Nvml,
    sysfs_root: PathBuf,
    /// MIG profile tables by (GPU UUID, MIG enabled).
    profiles: RefCell<HashMap<(String, bool), Vec<MigProfile>>>,
}

/// The NVML-backed [`GpuBackend`].
pub struct NvmlBackend {
    worker: Worker<NvmlState>,
    driver_root: DriverRoot,
    /// Longest wait for one NVML call or `nvidia-smi` run.
    call_timeout: Duration,
    /// Longest wait for initialising NVML (also a health watch's own).
    init_timeout: Duration,
    capabilities: CapabilityReader,
    imex: ImexReader,
}

impl fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("driver_root", &self.driver_root)
            .finish_non_exhaustive()
    }
}

impl NvmlBackend {
    /// Discovers the driver, loads NVML and initialises it.
    pub fn new(options: NvmlOptions) -> Result<Self, Error> {
        let driver_root = DriverRoot::discover(&options.driver_root)?;
        let library = driver_root.nvml_library.clone();
        let sysfs_root = options.sysfs_root.clone();
        let worker = Worker::spawn(
            "nvml",
            "nvmlInitWithFlags",
            options.init_timeout,
            options.call_timeout,
            move || {
                let nvml = Nvml::builder()
                    .lib_path(library.as_os_str())
                    .flags(InitFlags::NO_GPUS)
                    .init()
                    .map_err(|source| Error::NvmlInit {
                        library: library.clone(),
                        source,
                    })?;
                Ok(NvmlState {
                    nvml,
                    sysfs_root,
                    profiles: RefCell::default(),
                })
            },
        )?;
        tracing::info!(
            library = %driver_root.nvml_library.display(),
            dev_root = %driver_root.dev_root.display(),
            "NVML initialised"
        );
        Ok(Self {
            worker,
            driver_root,
            call_timeout: options.call_timeout,
            init_timeout: options.init_timeout,
            imex: ImexReader::new(&options.proc_root),
            capabilities: CapabilityReader::new(options.proc_root),
        })
    }

    /// The driver root NVML was loaded from.
    pub fn driver_root(&self) -> &DriverRoot {
        &self.driver_root
    }
}

impl GpuBackend for NvmlBackend {
    fn driver(&self) -> Result<DriverInfo, Error> {
        self.worker.call("driver info", |s| driver(&s.nvml))
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, Error> {
        self.worker
            .call("enumerate GPUs", |s| each_gpu(s, |_, info| Ok(info)))
    }

    fn mig_devices(&self, gpu: &GpuInfo) -> Result<Vec<MigDeviceInfo>, Error> {
        let gpu = gpu.clone();
        self.worker
            .call(format!("MIG devices of {}", gpu.uuid), move |s| {
                let device = device_by_uuid(&s.nvml, &gpu.uuid)?;
                let profiles = mig_profiles(s, &device, &gpu)?;
                mig_devices(&device, &gpu, &profiles)
            })
    }

    fn mig_profiles(&self, gpu: &GpuInfo) -> Result<Vec<MigProfile>, Error> {
        let gpu = gpu.clone();
        self.worker
            .call(format!("MIG profiles of {}", gpu.uuid), move |s| {
                let device = device_by_uuid(&s.nvml, &gpu.uuid)?;
                mig_profiles(s, &device, &gpu)
            })
    }

    fn fabric(&self, gpu: &GpuInfo) -> Result<Option<FabricInfo>, Error> {
        let uuid = gpu.uuid.clone();
        self.worker
            .call(format!("fabric info of {uuid}"), move |s| {
                fabric(&device_by_uuid(&s.nvml, &uuid)?)
            })
    }

    fn set_mig_mode(&self, gpu: &GpuInfo, enabled: bool) -> Result<(), Error> {
        let uuid = gpu.uuid.clone();
        let op = format!("set MIG mode {}", if enabled { "on" } else { "off" });
        self.worker.call(format!("{op} of {uuid}"), move |s| {
            let device = device_by_uuid(&s.nvml, &uuid)?;
            let refused = mig_refusal(op, &uuid, "nvmlDeviceSetMigMode");
            match device.set_mig_mode(enabled) {
                // The activation status: non-zero means the change waits
                // for a GPU reset, which counts as not done.
                Ok(status) => nvml_wrapper::error::nvml_try(status).map_err(refused),
                Err(e) => Err(refused(e)),
            }
        })
    }

    fn create_mig_device(
        &self,
        gpu: &GpuInfo,
        gi_profile_id: u32,
        placement_start: u32,
    ) -> Result<MigDeviceInfo, Error> {
        let gpu = gpu.clone();
        let op = create_op(gi_profile_id, placement_start);
        self.worker.call(format!("{op} on {}", gpu.uuid), move |s| {
            let device = device_by_uuid(&s.nvml, &gpu.uuid)?;
            let profiles = mig_profiles(s, &device, &gpu)?;
            // The placement's size comes from the profile table. For a
            // profile or start the table lacks, NVML still gets the call
            // (size 0) so that the driver's own verdict (MIG off, no MIG,
            // invalid argument) is what the caller sees.
            let profile = profiles.iter().find(|p| p.gi_profile_id == gi_profile_id);
            let size = profile
                .and_then(|p| p.placements.iter().find(|p| p.start == placement_start))
                .map_or(0, |p| p.size);
            let gi_id = raw::create_gpu_instance(&device, gi_profile_id, placement_start, size)
                .map_err(mig_refusal(
                    op.clone(),
                    &gpu.uuid,
                    "nvmlDeviceCreateGpuInstanceWithPlacement",
                ))?;
            let ci_profile = profile.and_then(|p| ci_profile_index_of_slices(p.slice_count));
            let Some(ci_profile) = ci_profile else {
                let _ = raw::destroy_gpu_instance(&device, gi_id);
                return Err(Error::NvmlData {
                    op,
                    reason: format!(
                        "NVML created a GPU instance of profile {gi_profile_id}, \
                         which is not in the GPU's profile table; destroyed it again"
                    ),
                });
            };
            let ci_id = match raw::create_compute_instance(&device, gi_id, ci_profile) {
                Ok(ci_id) => ci_id,
                Err(e) => {
                    // Leave no bare GPU instance behind; it was just created.
                    if let Err(undo) = raw::destroy_gpu_instance(&device, gi_id) {
                        tracing::warn!(gpu = %gpu.uuid, gi_id, error = %undo,
                            "cannot destroy the GPU instance of a failed MIG device creation");
                    }
                    return Err(mig_refusal(
                        op,
                        &gpu.uuid,
                        "nvmlGpuInstanceCreateComputeInstance",
                    )(e));
                }
            };
            let mut current = gpu.clone();
            current.mig_enabled = true;
            mig_devices(&device, &current, &profiles)?
                .into_iter()
                .find(|m| m.gi_id == gi_id && m.ci_id == ci_id)
                .ok_or_else(|| Error::NvmlData {
                    op,
                    reason: format!("GI {gi_id} CI {ci_id} was created but is not listed"),
                })
        })
    }

    fn compute_mode(&self, gpu: &GpuInfo) -> Result<ComputeMode, Error> {
        let uuid = gpu.uuid.clone();
        self.worker
            .call(format!("compute mode of {uuid}"), move |s| {
                let op = || format!("nvmlDeviceGetComputeMode({uuid})");
                let mode = device_by_uuid(&s.nvml, &uuid)?
                    .compute_mode()
                    .map_err(Error::nvml(op()))?;
                compute_mode_of(mode).ok_or_else(|| Error::NvmlData {
                    op: op(),
                    reason: format!("compute mode {mode:?} is not one nvdra sets"),
                })
            })
    }

    fn set_compute_mode(&self, gpu: &GpuInfo, mode: ComputeMode) -> Result<(), Error> {
        let uuid = gpu.uuid.clone();
        self.worker
            .call(format!("set compute mode of {uuid}"), move |s| {
                device_by_uuid(&s.nvml, &uuid)?
                    .set_compute_mode(nvml_compute_mode(mode))
                    .map_err(Error::nvml(format!("nvmlDeviceSetComputeMode({uuid})")))
            })
    }

    /// Through `nvidia-smi` (NVML has no call for it), from the driver root.
    fn set_time_slice(&self, gpu: &GpuInfo, slice: TimeSlice) -> Result<(), Error> {
        let nvidia_smi =
            self.driver_root
                .nvidia_smi
                .as_deref()
                .ok_or_else(|| Error::NoNvidiaSmi {
                    root: self.driver_root.root.clone(),
                })?;
        let nvml_dir = self
            .driver_root
            .nvml_library
            .parent()
            .unwrap_or(Path::new("/"));
        run_set_time_slice(nvidia_smi, nvml_dir, &gpu.uuid, slice, self.call_timeout)
    }

    fn destroy_mig_device(&self, mig: &MigDeviceInfo) -> Result<(), Error> {
        let mig = mig.clone();
        let op = destroy_op(&mig);
        self.worker.call(op.clone(), move |s| {
            let device = device_by_uuid(&s.nvml, &mig.parent_uuid)?;
            raw::destroy_compute_instance(&device, mig.gi_id, mig.ci_id).map_err(mig_refusal(
                op.clone(),
                &mig.parent_uuid,
                "nvmlComputeInstanceDestroy",
            ))?;
            raw::destroy_gpu_instance(&device, mig.gi_id).map_err(mig_refusal(
                op,
                &mig.parent_uuid,
                "nvmlGpuInstanceDestroy",
            ))
        })
    }

    fn mig_capabilities(&self, mig: &MigDeviceInfo) -> Result<MigCapabilities, Error> {
        self.capabilities
            .mig(mig.parent_minor, mig.gi_id, mig.ci_id)
    }

    /// From procfs, not NVML (see [`crate::imex`] for which procfs and why).
    fn imex(&self) -> Result<ImexInfo, Error> {
        self.imex.read()
    }

    fn dev_root(&self) -> &Path {
        &self.driver_root.dev_root
    }

    /// On a thread and NVML handle of the watch's own (see module `health`).
    fn watch_health(&self, gpus: &[GpuInfo]) -> Result<HealthWatch, Error> {
        health::watch(
            &self.driver_root.nvml_library,
            gpus,
            self.init_timeout,
            self.call_timeout,
        )
    }

    /// One trip to the worker for the whole snapshot.
    fn inventory(&self) -> Result<Inventory, Error> {
        self.worker.call("inventory", |s| {
            let driver = driver(&s.nvml)?;
            let gpus = each_gpu(s, |device, info| {
                let mig_profiles = mig_profiles(s, device, &info)?;
                Ok(GpuInventory {
                    mig_devices: mig_devices(device, &info, &mig_profiles)?,
                    fabric: fabric(device)?,
                    mig_profiles,
                    info,
                })
            })?;
            Ok(Inventory { driver, gpus })
        })
    }
}

fn driver(nvml: &Nvml) -> Result<DriverInfo, Error> {
    let driver_version = nvml
        .sys_driver_version()
        .map_err(Error::nvml("nvmlSystemGetDriverVersion"))?;
    let cuda = nvml
        .sys_cuda_driver_version()
        .map_err(Error::nvml("nvmlSystemGetCudaDriverVersion"))?;
    let cuda = u32::try_from(cuda).map_err(|_| Error::NvmlData {
        op: "nvmlSystemGetCudaDriverVersion".into(),
        reason: format!("negative version {cuda}"),
    })?;
    Ok(DriverInfo {
        driver_version,
        cuda_driver_version: CudaVersion::from_nvml(cuda),
    })
}

/// Calls `f` with the handle and info of every GPU, in index order.
fn each_gpu<T>(
    s: &NvmlState,
    mut f: impl FnMut(&Device<'_>, GpuInfo) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    let count = s
        .nvml
        .device_count()
        .map_err(Error::nvml("nvmlDeviceGetCount"))?;
    (0..count)
        .map(|index| {
            let device = s
                .nvml
                .device_by_index(index)
                .map_err(Error::nvml(format!("nvmlDeviceGetHandleByIndex({index})")))?;
            let info = gpu_info(s, index, &device)?;
            f(&device, info)
        })
        .collect()
}

fn device_by_uuid<'n>(nvml: &'n Nvml, uuid: &str) -> Result<Device<'n>, Error> {
    match nvml.device_by_uuid(uuid) {
        Ok(device) => Ok(device),
        Err(NvmlError::NotFound) => Err(Error::UnknownGpu {
            uuid: uuid.to_owned(),
        }),
        Err(e) => Err(Error::nvml(format!("nvmlDeviceGetHandleByUUID({uuid})"))(e)),
    }
}

/// Maps an NVML error of a MIG change: a refusal becomes
/// [`Error::MigRefused`] (as the fake backend reports it), anything else
/// an [`Error::NvmlCall`] naming `call`.
fn mig_refusal(op: String, gpu: &str, call: &'static str) -> impl FnOnce(NvmlError) -> Error {
    let gpu = gpu.to_owned();
    move |source| match MigRefusal::from_nvml(&source) {
        Some(refusal) => Error::MigRefused { op, gpu, refusal },
        None => Error::NvmlCall {
            op: format!("{call}({gpu})"),
            source,
        },
    }
}

/// `Ok(None)` for errors that mean "this GPU or driver cannot say".
fn optional<T>(result: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn gpu_info(s: &NvmlState, index: u32, device: &Device<'_>) -> Result<GpuInfo, Error> {
    let op = |name: &str| format!("{name}(GPU {index})");
    let uuid = device
        .uuid()
        .map_err(Error::nvml(op("nvmlDeviceGetUUID")))?;
    let minor = device
        .minor_number()
        .map_err(Error::nvml(op("nvmlDeviceGetMinorNumber")))?;
    let raw_bus_id = device
        .pci_info()
        .map_err(Error::nvml(op("nvmlDeviceGetPciInfo")))?
        .bus_id;
    let pci_bus_id = canonical_pci_bus_id(&raw_bus_id).ok_or_else(|| Error::NvmlData {
        op: op("nvmlDeviceGetPciInfo"),
        reason: format!("malformed PCI bus ID {raw_bus_id:?}"),
    })?;
    let pcie_root = match pcie_root(&s.sysfs_root, &pci_bus_id) {
        Ok(root) => Some(root),
        Err(e) => {
            tracing::warn!(gpu = %uuid, error = %e, "publishing GPU without PCIe root");
            None
        }
    };
    let product_name = device
        .name()
        .map_err(Error::nvml(op("nvmlDeviceGetName")))?;
    let brand = match device.brand() {
        Ok(brand) => brand_name(brand),
        Err(NvmlError::UnexpectedVariant(v)) => {
            tracing::warn!(gpu = %uuid, brand = v, "unknown NVML brand");
            "Unknown"
        }
        Err(e) => return Err(Error::nvml(op("nvmlDeviceGetBrand"))(e)),
    };
    let architecture = match device.architecture() {
        Ok(arch) => architecture_of(&arch),
        Err(NvmlError::UnexpectedVariant(v)) => {
            tracing::warn!(gpu = %uuid, architecture = v, "unknown NVML architecture");
            Architecture::Unknown
        }
        Err(e) => return Err(Error::nvml(op("nvmlDeviceGetArchitecture"))(e)),
    };
    let cc = device
        .cuda_compute_capability()
        .map_err(Error::nvml(op("nvmlDeviceGetCudaComputeCapability")))?;
    let cuda_compute_capability = match (u32::try_from(cc.major), u32::try_from(cc.minor)) {
        (Ok(major), Ok(minor)) => ComputeCapability { major, minor },
        _ => {
            return Err(Error::NvmlData {
                op: op("nvmlDeviceGetCudaComputeCapability"),
                reason: format!("negative capability {}.{}", cc.major, cc.minor),
            });
        }
    };
    let memory_bytes = optional(device.memory_info())
        .map_err(Error::nvml(op("nvmlDeviceGetMemoryInfo_v2")))?
        .map(|m| m.total);
    let mig_mode = optional(device.mig_mode()).map_err(Error::nvml(op("nvmlDeviceGetMigMode")))?;
    let addressing_mode = raw::addressing_mode(device)
        .map_err(Error::nvml(op("nvmlDeviceGetAddressingMode")))?
        .and_then(|mode| {
            let decoded = addressing_mode_of(mode);
            if decoded.is_none() {
                tracing::warn!(gpu = %uuid, mode, "unknown NVML addressing mode");
            }
            decoded
        });
    Ok(GpuInfo {
        uuid,
        index,
        minor,
        pci_bus_id,
        pcie_root,
        product_name,
        brand: brand.to_owned(),
        architecture,
        cuda_compute_capability,
        memory_bytes,
        mig_capable: mig_mode.is_some(),
        mig_enabled: mig_mode.is_some_and(|m| m.current == 1),
        addressing_mode,
    })
}

/// The GPU's MIG profile table, from the cache or NVML.
fn mig_profiles(
    s: &NvmlState,
    device: &Device<'_>,
    gpu: &GpuInfo,
) -> Result<Vec<MigProfile>, Error> {
    if !gpu.mig_capable {
        return Ok(Vec::new());
    }
    let key = (gpu.uuid.clone(), gpu.mig_enabled);
    if let Some(cached) = s.profiles.borrow().get(&key) {
        return Ok(cached.clone());
    }
    let profiles = read_mig_profiles(device, gpu)?;
    s.profiles.borrow_mut().insert(key, profiles.clone());
    Ok(profiles)
}

fn read_mig_profiles(device: &Device<'_>, gpu: &GpuInfo) -> Result<Vec<MigProfile>, Error> {
    let mut profiles: Vec<MigProfile> = Vec::new();
    for index in 0..profile_index::COUNT {
        let op = |name: &str| format!("{name}({}, profile {index})", gpu.uuid);
        let info = match device.profile_info(index) {
            Ok(info) => info,
            // Profiles this GPU does not offer.
            Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::NotFound) => continue,
            Err(e) => return Err(Error::nvml(op("nvmlDeviceGetGpuInstanceProfileInfo"))(e)),
        };
        if profiles.iter().any(|p| p.gi_profile_id == info.id) {
            continue;
        }
        let placements = match raw::possible_placements(device, info.id) {
            Ok(placements) => placements,
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
            Err(e) => {
                return Err(Error::nvml(op(
                    "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
                ))(e));
            }
        };
        let Some(slices) = gi_slices_of_index(index) else {
            continue;
        };
        let gb = match gpu.memory_bytes {
            Some(total) => mig_memory_gb(total, info.memory_size_mb),
            None => info.memory_size_mb.div_ceil(1024),
        };
        profiles.push(MigProfile {
            name: profile_name(slices, slices, gb, suffix_of_index(index)),
            gi_profile_id: info.id,
            slice_count: slices,
            instance_count: info.instance_count,
            capacities: MigCapacities {
                multiprocessors: info.multiprocessor_count,
                copy_engines: info.copy_engine_count,
                decoders: info.decoder_count,
                encoders: info.encoder_count,
                jpeg_engines: info.jpeg_count,
                ofa_engines: info.ofa_count,
                memory_bytes: info.memory_size_mb * 1024 * 1024,
            },
            placements: placements
                .into_iter()
                .map(|(start, size)| MigPlacement { start, size })
                .collect(),
        });
    }
    Ok(profiles)
}

fn mig_devices(
    device: &Device<'_>,
    gpu: &GpuInfo,
    profiles: &[MigProfile],
) -> Result<Vec<MigDeviceInfo>, Error> {
    let op = |name: &str, detail: String| format!("{name}({}{detail})", gpu.uuid);
    // The GPU's MIG mode now, not as `gpu` (perhaps read before a change)
    // says: the device list must follow the hardware, as the fake's does.
    let mode = optional(device.mig_mode())
        .map_err(Error::nvml(op("nvmlDeviceGetMigMode", String::new())))?;
    if mode.is_none_or(|m| m.current != 1) {
        return Ok(Vec::new());
    }
    let max = device.mig_device_count().map_err(Error::nvml(op(
        "nvmlDeviceGetMaxMigDeviceCount",
        String::new(),
    )))?;
    let mut devices = Vec::new();
    for i in 0..max {
        let mig = match device.mig_device_by_index(i) {
            Ok(mig) => mig,
            // Empty slot.
            Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
            Err(e) => {
                return Err(Error::nvml(op(
                    "nvmlDeviceGetMigDeviceHandleByIndex",
                    format!(", {i}"),
                ))(e));
            }
        };
        let at = format!(", MIG {i}");
        let uuid = mig
            .uuid()
            .map_err(Error::nvml(op("nvmlDeviceGetUUID", at.clone())))?;
        let gi_id = raw::gpu_instance_id(&mig)
            .map_err(Error::nvml(op("nvmlDeviceGetGpuInstanceId", at.clone())))?;
        let ci_id = raw::compute_instance_id(&mig).map_err(Error::nvml(op(
            "nvmlDeviceGetComputeInstanceId",
            at.clone(),
        )))?;
        let gi = raw::gpu_instance(device, gi_id).map_err(Error::nvml(op(
            "nvmlGpuInstanceGetInfo",
            format!(", GI {gi_id}"),
        )))?;
        let profile = profiles
            .iter()
            .find(|p| p.gi_profile_id == gi.profile_id)
            .ok_or_else(|| Error::NvmlData {
                op: op("nvmlGpuInstanceGetInfo", format!(", GI {gi_id}")),
                reason: format!(
                    "GPU-instance profile {} is not in the GPU's profile table",
                    gi.profile_id
                ),
            })?;
        // A compute instance smaller than its GPU instance gets the `<C>c.`
        // prefix go-nvlib would give it.
        let name = match optional(mig.attributes())
            .map_err(Error::nvml(op("nvmlDeviceGetAttributes_v2", at)))?
        {
            Some(a)
                if a.compute_instance_slice_count != 0
                    && a.compute_instance_slice_count < a.gpu_instance_slice_count =>
            {
                format!("{}c.{}", a.compute_instance_slice_count, profile.name)
            }
            _ => profile.name.clone(),
        };
        devices.push(MigDeviceInfo {
            uuid,
            parent_uuid: gpu.uuid.clone(),
            parent_minor: gpu.minor,
            profile: name,
            gi_profile_id: gi.profile_id,
            gi_id,
            ci_id,
            placement: MigPlacement {
                start: gi.placement_start,
                size: gi.placement_size,
            },
            capacities: profile.capacities,
        });
    }
    devices.sort_by_key(|m| (m.gi_id, m.ci_id));
    Ok(devices)
}

fn fabric(device: &Device<'_>) -> Result<Option<FabricInfo>, Error> {
    let Some(raw) = raw::fabric_info(device).map_err(Error::nvml("nvmlDeviceGetGpuFabricInfo"))?
    else {
        return Ok(None);
    };
    let state = FabricState::from_nvml(raw.state).ok_or_else(|| Error::NvmlData {
        op: "nvmlDeviceGetGpuFabricInfo".into(),
        reason: format!("unknown fabric state {}", raw.state),
    })?;
    Ok(Some(FabricInfo {
        cluster_uuid: ClusterUuid(raw.cluster_uuid),
        clique_id: raw.clique_id,
        state,
        status: FabricStatus(raw.status),
    }))
}

fn nvml_compute_mode(mode: ComputeMode) -> nvml_wrapper::enum_wrappers::device::ComputeMode {
    use nvml_wrapper::enum_wrappers::device::ComputeMode as M;
    match mode {
        ComputeMode::Default => M::Default,
        ComputeMode::ExclusiveProcess => M::ExclusiveProcess,
        ComputeMode::Prohibited => M::Prohibited,
    }
}

fn compute_mode_of(mode: nvml_wrapper::enum_wrappers::device::ComputeMode) -> Option<ComputeMode> {
    use nvml_wrapper::enum_wrappers::device::ComputeMode as M;
    match mode {
        M::Default => Some(ComputeMode::Default),
        M::ExclusiveProcess => Some(ComputeMode::ExclusiveProcess),
        M::Prohibited => Some(ComputeMode::Prohibited),
        M::ExclusiveThread => None,
    }
}

/// Brand names as go-nvlib spells them.
fn brand_name(brand: Brand) -> &'static str {
    match brand {
        Brand::Unknown => "Unknown",
        Brand::Quadro => "Quadro",
        Brand::Tesla => "Tesla",
        Brand::NVS => "NVS",
        Brand::GRID => "Grid",
        Brand::GeForce => "GeForce",
        Brand::Titan => "Titan",
        Brand::VApps => "NvidiaVApps",
        Brand::VPC => "NvidiaVPC",
        Brand::VCS => "NvidiaVCS",
        Brand::VWS => "NvidiaVWS",
        // NVML defines VGAMING as an alias of CLOUD_GAMING.
        Brand::CloudGaming | Brand::VGaming => "NvidiaCloudGaming",
        Brand::QuadroRTX => "QuadroRTX",
        Brand::NvidiaRTX => "NvidiaRTX",
        Brand::Nvidia => "Nvidia",
        Brand::GeForceRTX => "GeForceRTX",
        Brand::TitanRTX => "TitanRTX",
    }
}

fn architecture_of(arch: &DeviceArchitecture) -> Architecture {
    match arch {
        DeviceArchitecture::Kepler => Architecture::Kepler,
        DeviceArchitecture::Maxwell => Architecture::Maxwell,
        DeviceArchitecture::Pascal => Architecture::Pascal,
        DeviceArchitecture::Volta => Architecture::Volta,
        DeviceArchitecture::Turing => Architecture::Turing,
        DeviceArchitecture::Ampere => Architecture::Ampere,
        DeviceArchitecture::Ada => Architecture::AdaLovelace,
        DeviceArchitecture::Hopper => Architecture::Hopper,
        DeviceArchitecture::Blackwell => Architecture::Blackwell,
        DeviceArchitecture::Unknown => Architecture::Unknown,
    }
}

/// `NVML_DEVICE_ADDRESSING_MODE_*`.
fn addressing_mode_of(mode: u32) -> Option<AddressingMode> {
    match mode {
        0 => Some(AddressingMode::None),
        1 => Some(AddressingMode::Hmm),
        2 => Some(AddressingMode::Ats),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names() {
        assert_eq!(brand_name(Brand::Nvidia), "Nvidia");
        assert_eq!(brand_name(Brand::GRID), "Grid");
        assert_eq!(brand_name(Brand::VWS), "NvidiaVWS");
        assert_eq!(brand_name(Brand::VGaming), "NvidiaCloudGaming");
        assert_eq!(
            architecture_of(&DeviceArchitecture::Ada),
            Architecture::AdaLovelace
        );
        assert_eq!(
            architecture_of(&DeviceArchitecture::Blackwell).to_string(),
            "Blackwell"
        );
        assert_eq!(addressing_mode_of(1), Some(AddressingMode::Hmm));
        assert_eq!(addressing_mode_of(2), Some(AddressingMode::Ats));
        assert_eq!(addressing_mode_of(0), Some(AddressingMode::None));
        assert_eq!(addressing_mode_of(3), None);
    }

    #[test]
    fn missing_library_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let err = NvmlBackend::new(NvmlOptions::new(root.path())).unwrap_err();
        assert!(
            matches!(
                err,
                Error::DiscoverDriverRoot {
                    file: "libnvidia-ml.so.1",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "cannot find libnvidia-ml.so.1 under driver root {} (searched ",
                root.path().display()
            )),
            "{err}"
        );
    }

    #[test]
    fn unloadable_library_is_an_init_error() {
        // A file that is not a shared object: found by discovery, refused by
        // the loader.
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("usr/lib64/libnvidia-ml.so.1");
        std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
        std::fs::write(&lib, b"not an ELF file").unwrap();
        let err = NvmlBackend::new(NvmlOptions::new(root.path())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot initialise NVML from {}",
                std::fs::canonicalize(&lib).unwrap().display()
            )
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}

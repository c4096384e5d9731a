//! The host side of VFIO passthrough (PassthroughSupport): Prepare binds a
//! `gpu-vfio-<n>` device's GPU to `vfio-pci`, Unprepare (or a rollback)
//! binds it back to `nvidia`, and a GPU is never handed out as a GPU and as
//! a VFIO device at once.
//!
//! Exclusivity: a GPU offered both ways has two sibling devices
//! ([`siblings`]). While a claim holds one, the other is not published
//! ([`hidden`]), and Prepare refuses a device whose sibling another claim
//! holds ([`sibling_holder`]), which covers the moment before the scheduler
//! sees the republished slice.
//!
//! Budget: binding waits for host processes to let go of the GPU and for
//! the kernel to rebind, together at most [`BIND_BUDGET`], well inside the
//! kubelet's Prepare call (upstream waits 60 s for the GPU alone and overruns
//! it, its PR #1218); a GPU still busy then fails the claim with the holders'
//! PIDs, and the kubelet retries.
//!
//! Invariants: binding is idempotent both ways, so a rollback may release a
//! device that was never bound; a failed Prepare binds back what it bound.
//! Only non-admin allocations change a driver binding.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nvdra_gpu::vfio::{self, IommuPolicy, PciDriver};
use nvdra_kubelet_plugin::error::error_chain;

use crate::checkpoint::{CheckpointState, ClaimEntry};
use crate::devices::{AllocatableDevice, VfioDevice};

/// The most Prepare waits for one GPU to be free and rebound.
pub const BIND_BUDGET: Duration = Duration::from_secs(20);
/// How often a busy GPU is looked at again.
const BUSY_POLL: Duration = Duration::from_millis(200);

/// Where the host's kernel interfaces are, in the agent's view.
#[derive(Debug, Clone)]
pub struct VfioHost {
    /// The host's sysfs (`/sys`).
    pub sysfs_root: PathBuf,
    /// The host's procfs (`/proc`), whose processes are checked for holders
    /// of the GPU: it must show the host's PID namespace.
    pub proc_root: PathBuf,
    /// The directory holding the host's `dev` (`/`), for the VFIO nodes.
    pub dev_root: PathBuf,
    /// The most Prepare waits for one GPU ([`BIND_BUDGET`]).
    pub budget: Duration,
}

/// Why a GPU could not be passed through or given back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Host processes still hold the GPU.
    #[error(
        "GPU {bdf} is still in use by host processes {pids:?} after {waited:?}; it is bound to \
         vfio-pci once they exit (the kubelet retries)"
    )]
    Busy {
        /// The GPU's PCI address.
        bdf: String,
        /// The holders.
        pids: Vec<u32>,
        /// How long Prepare waited.
        waited: Duration,
    },
    /// The device layer failed (host not ready, rebind refused or failed).
    #[error(transparent)]
    Device(#[from] nvdra_gpu::Error),
}

/// Binds `device`'s GPU to `vfio-pci`: waits until no host process holds
/// `/dev/nvidia<minor>` (when NVML knew the GPU), then rebinds.
pub fn bind(host: &VfioHost, device: &VfioDevice) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started + host.budget;
    let bdf = &device.pci.bdf;
    if vfio::current_driver(&host.sysfs_root, bdf)? == PciDriver::VfioPci {
        return Ok(());
    }
    vfio::host_ready(&host.sysfs_root)?;
    if let Some(gpu) = &device.gpu {
        let node = PathBuf::from(format!("/dev/nvidia{}", gpu.minor));
        loop {
            let pids = vfio::device_users(&host.proc_root, &node)?;
            if pids.is_empty() {
                break;
            }
            // Leave the rebind half of the budget.
            if started.elapsed() >= host.budget / 2 {
                return Err(Error::Busy {
                    bdf: bdf.clone(),
                    pids,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(BUSY_POLL);
        }
    }
    vfio::bind_to_vfio(&host.sysfs_root, &host.proc_root, bdf, deadline)?;
    tracing::info!(device = %device.name(), %bdf, "GPU bound to vfio-pci");
    Ok(())
}

/// Binds `device`'s GPU back to `nvidia`; failures are logged (the GPU
/// stays on vfio-pci, not offered as a GPU until it is back).
pub fn release(host: &VfioHost, device: &VfioDevice, claim: &str) {
    let deadline = Instant::now() + host.budget;
    match vfio::bind_to_nvidia(&host.sysfs_root, &host.proc_root, &device.pci.bdf, deadline) {
        Ok(()) => {
            tracing::info!(claim, device = %device.name(), bdf = %device.pci.bdf, "GPU bound back to nvidia")
        }
        Err(err) => tracing::warn!(
            claim,
            device = %device.name(),
            bdf = %device.pci.bdf,
            error = %error_chain(&err),
            "cannot bind the GPU back to nvidia"
        ),
    }
}

/// The container's device nodes for `device` under `policy`.
pub fn device_nodes(
    host: &VfioHost,
    device: &VfioDevice,
    policy: IommuPolicy,
    api_device: bool,
) -> Result<Vec<nvdra_gpu::DeviceNode>, nvdra_gpu::Error> {
    vfio::vfio_device_nodes(
        &host.sysfs_root,
        &host.dev_root,
        &device.pci.bdf,
        policy,
        api_device,
    )
}

/// The VFIO devices `entry` was allocated, except admin-access ones.
pub(crate) fn devices_of<'a>(
    devices: &'a BTreeMap<String, AllocatableDevice>,
    entry: &ClaimEntry,
) -> Vec<&'a VfioDevice> {
    entry
        .allocated_devices
        .iter()
        .filter(|d| !d.admin_access)
        .filter_map(|d| match devices.get(&d.device) {
            Some(AllocatableDevice::Vfio(v)) => Some(v),
            _ => None,
        })
        .collect()
}

/// Pairs of devices that are the same GPU (`gpu-<minor>` and
/// `gpu-vfio-<n>`), both ways.
pub(crate) fn siblings(devices: &BTreeMap<String, AllocatableDevice>) -> BTreeMap<String, String> {
    let mut pairs = BTreeMap::new();
    for (name, device) in devices {
        let AllocatableDevice::Vfio(v) = device else {
            continue;
        };
        let gpu = devices.iter().find(|(_, d)| {
            matches!(d, AllocatableDevice::Gpu { .. }) && d.pci_bus_id() == v.pci.bdf
        });
        if let Some((gpu_name, _)) = gpu {
            pairs.insert(name.clone(), gpu_name.clone());
            pairs.insert(gpu_name.clone(), name.clone());
        }
    }
    pairs
}

/// The devices not to publish now: the siblings of every device a claim
/// holds.
pub(crate) fn hidden(
    siblings: &BTreeMap<String, String>,
    state: &CheckpointState,
) -> BTreeSet<String> {
    state
        .claims()
        .flat_map(|(_, entry)| &entry.allocated_devices)
        .filter_map(|d| siblings.get(&d.device).cloned())
        .collect()
}

/// The first of `names` whose sibling a claim other than `uid` holds:
/// `(device, sibling, holder UID)`.
pub(crate) fn sibling_holder(
    siblings: &BTreeMap<String, String>,
    state: &CheckpointState,
    uid: &str,
    names: &[&str],
) -> Option<(String, String, String)> {
    names.iter().find_map(|name| {
        let sibling = siblings.get(*name)?;
        state
            .claims()
            .filter(|(other, _)| *other != uid)
            .find(|(_, entry)| entry.allocated_devices.iter().any(|d| d.device == *sibling))
            .map(|(other, _)| ((*name).to_owned(), sibling.clone(), other.to_owned()))
    })
}

/// Start-up: binds back to nvidia every GPU on `vfio-pci` that no claim in
/// `state` holds (left by a crash, or bound out of band). Returns the PCI
/// addresses given back.
pub(crate) fn release_unowned(
    host: &VfioHost,
    devices: &BTreeMap<String, AllocatableDevice>,
    state: &CheckpointState,
) -> Vec<String> {
    let held: BTreeSet<&str> = state
        .claims()
        .flat_map(|(_, entry)| devices_of(devices, entry))
        .map(|v| v.pci.bdf.as_str())
        .collect();
    let mut released = Vec::new();
    for device in devices.values() {
        let AllocatableDevice::Vfio(v) = device else {
            continue;
        };
        if v.pci.driver != PciDriver::VfioPci || held.contains(v.pci.bdf.as_str()) {
            continue;
        }
        release(host, v, "(none)");
        if vfio::current_driver(&host.sysfs_root, &v.pci.bdf).ok() == Some(PciDriver::Nvidia) {
            released.push(v.pci.bdf.clone());
        }
    }
    released
}

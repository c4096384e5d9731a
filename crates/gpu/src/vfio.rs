//! The host side of VFIO passthrough of a whole GPU (Kata and confidential
//! containers): moving a GPU between the `nvidia` and `vfio-pci` drivers
//! through sysfs, and the facts a claim needs around that move (the IOMMU
//! group, the container's VFIO device nodes, who still holds the GPU open).
//!
//! Everything goes through a sysfs root and a procfs root (normally `/sys`
//! and `/proc`) so tests can point them at a fake tree.
//!
//! Invariants:
//! - Kernel files are only ever written, never created: a wrong path is an
//!   error, not a new file in the real `/sys`.
//! - [`bind_to_vfio`] and [`bind_to_nvidia`] are idempotent, refuse a device
//!   on any third driver, and refuse `vfio-pci` while SR-IOV virtual functions
//!   exist. A failure part-way undoes exactly the steps already taken, so the
//!   device goes back to the driver it started on where the kernel allows,
//!   and the error says which driver it was left on.
//! - Whether the GPU is free (no process holds its `/dev/nvidia<minor>`) is
//!   the caller's check, with [`device_users`], before [`bind_to_vfio`].
//!
//! Failure modes: an unreadable sysfs file is [`Error::ReadSysfs`], a
//! rejected write [`Error::WriteKernelFile`], a host without the IOMMU or
//! `vfio-pci` [`Error::VfioHostNotReady`], a device that must not move
//! [`Error::RebindRefused`], and a move that failed or did not finish by its
//! deadline [`Error::RebindPciDevice`].

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{DeviceNode, Error};

/// How often the NVIDIA driver is asked for the unbind lock; it refuses while
/// a client still has the GPU open, which may be a process just exiting.
const UNBIND_LOCK_TRIES: u32 = 5;
/// The pause between unbind lock requests.
const UNBIND_LOCK_RETRY: Duration = Duration::from_millis(100);
/// How often the device's driver link is re-read while waiting for a bind.
const BIND_POLL: Duration = Duration::from_millis(20);

/// The driver a PCI device is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PciDriver {
    /// The NVIDIA kernel driver (`nvidia`).
    Nvidia,
    /// `vfio-pci`, i.e. ready for passthrough.
    VfioPci,
    /// No driver.
    None,
    /// Any other driver, e.g. `nouveau`; nvdra never moves such a device.
    Other(String),
}

impl PciDriver {
    fn from_name(name: &str) -> Self {
        match name {
            "nvidia" => Self::Nvidia,
            "vfio-pci" => Self::VfioPci,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The kernel's driver name; `None` for no driver.
    fn name(&self) -> Option<&str> {
        match self {
            Self::Nvidia => Some("nvidia"),
            Self::VfioPci => Some("vfio-pci"),
            Self::None => None,
            Self::Other(name) => Some(name),
        }
    }
}

impl fmt::Display for PciDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().unwrap_or("no driver"))
    }
}

/// Which IOMMU backend a container's VFIO device uses; mirrors the API's
/// `backendPolicy` without depending on the API crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IommuPolicy {
    /// The legacy VFIO container/group backend only.
    #[default]
    LegacyOnly,
    /// iommufd when the host and the device have it, else legacy.
    PreferIommuFD,
}

/// A PCI device under a sysfs root, with a bus ID checked before it becomes
/// part of a path or is written to a kernel file.
struct Device<'a> {
    sysfs_root: &'a Path,
    bdf: &'a str,
    dir: PathBuf,
}

impl<'a> Device<'a> {
    fn new(sysfs_root: &'a Path, bdf: &'a str) -> Result<Self, Error> {
        if !is_bus_id(bdf) {
            return Err(Error::InvalidPciBusId {
                pci_bus_id: bdf.to_owned(),
            });
        }
        Ok(Self {
            sysfs_root,
            bdf,
            dir: sysfs_root.join("bus/pci/devices").join(bdf),
        })
    }

    fn attr(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn driver(&self) -> Result<PciDriver, Error> {
        let link = self.attr("driver");
        match std::fs::read_link(&link) {
            Ok(target) => Ok(PciDriver::from_name(&last_component(&link, &target)?)),
            // A missing link means no driver only if the device itself is there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.dir.try_exists() {
                Ok(true) => Ok(PciDriver::None),
                Ok(false) => Err(Error::ReadSysfs {
                    path: self.dir.clone(),
                    source: io::ErrorKind::NotFound.into(),
                }),
                Err(source) => Err(Error::ReadSysfs {
                    path: self.dir.clone(),
                    source,
                }),
            },
            Err(source) => Err(Error::ReadSysfs { path: link, source }),
        }
    }

    /// The procfs file through which the NVIDIA driver grants an unbind only
    /// while no client has the GPU open.
    fn unbind_lock(&self, proc_root: &Path) -> PathBuf {
        proc_root
            .join("driver/nvidia/gpus")
            .join(self.bdf)
            .join("unbindLock")
    }

    /// The file whose write makes the kernel bind the device: `drivers_probe`
    /// picks the driver from `driver_override` (or the default match); old
    /// kernels without it need the driver's own `bind`.
    fn probe_file(&self, driver: &str) -> Result<PathBuf, Error> {
        let probe = self.sysfs_root.join("bus/pci/drivers_probe");
        if exists(&probe)? {
            Ok(probe)
        } else {
            Ok(self.driver_file(driver, "bind"))
        }
    }

    fn driver_file(&self, driver: &str, file: &str) -> PathBuf {
        self.sysfs_root
            .join("bus/pci/drivers")
            .join(driver)
            .join(file)
    }
}

/// Whether `s` is a PCI address in the sysfs form `dddd:bb:dd.f`
/// (lower-case hex).
fn is_bus_id(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b[..4].iter().all(hex)
        && b[5..7].iter().all(hex)
        && b[8..10].iter().all(hex)
        && (b'0'..=b'7').contains(&b[11])
}

fn last_component(link: &Path, target: &Path) -> Result<String, Error> {
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::ParseSysfs {
            path: link.to_owned(),
            reason: format!("link target {} has no final component", target.display()),
        })
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| Error::ReadSysfs {
        path: path.to_owned(),
        source,
    })
}

/// NVIDIA's PCI vendor ID.
pub const NVIDIA_VENDOR_ID: u16 = 0x10de;

/// An NVIDIA GPU on the PCI bus as sysfs describes it, whichever driver
/// holds it (NVML cannot see a GPU bound to `vfio-pci`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciGpu {
    /// The PCI address, `dddd:bb:dd.f`.
    pub bdf: String,
    /// The PCI vendor ID (NVIDIA's).
    pub vendor_id: u16,
    /// The PCI device ID (the product).
    pub device_id: u16,
    /// The NUMA node, `None` when the platform has none (sysfs says -1).
    pub numa_node: Option<i64>,
    /// The driver bound to it now.
    pub driver: PciDriver,
}

/// Every NVIDIA display or 3D controller (PCI class `0x0300xx` or
/// `0x0302xx`) under `<sysfs>/bus/pci/devices`, in PCI address order, which
/// is the order upstream numbers VFIO devices in. Entries that are not PCI
/// addresses, or whose vendor or class cannot be read, are skipped.
pub fn nvidia_pci_gpus(sysfs_root: &Path) -> Result<Vec<PciGpu>, Error> {
    let dir = sysfs_root.join("bus/pci/devices");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::ReadSysfs { path: dir, source }),
    };
    let hex = |path: PathBuf| -> Option<u32> {
        let text = std::fs::read_to_string(path).ok()?;
        u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
    };
    let mut gpus = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(bdf) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_bus_id(&bdf) {
            continue;
        }
        let attr = |name: &str| dir.join(&bdf).join(name);
        let (Some(vendor), Some(class)) = (hex(attr("vendor")), hex(attr("class"))) else {
            continue;
        };
        let display = matches!(class >> 8, 0x0300 | 0x0302);
        if vendor != u32::from(NVIDIA_VENDOR_ID) || !display {
            continue;
        }
        let device_id = hex(attr("device")).and_then(|d| u16::try_from(d).ok());
        let Some(device_id) = device_id else {
            continue;
        };
        let numa_node = std::fs::read_to_string(attr("numa_node"))
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0);
        let driver = Device::new(sysfs_root, &bdf)?.driver()?;
        gpus.push(PciGpu {
            bdf,
            vendor_id: NVIDIA_VENDOR_ID,
            device_id,
            numa_node,
            driver,
        });
    }
    gpus.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(gpus)
}

/// Whether the host offers iommufd (`/dev/iommu`) and the device `bdf` a
/// `vfio-dev/vfio<N>` cdev, i.e. whether [`IommuPolicy::PreferIommuFD`]
/// would use it.
pub fn iommufd_enabled(sysfs_root: &Path, dev_root: &Path, bdf: &str) -> Result<bool, Error> {
    let dev = Device::new(sysfs_root, bdf)?;
    Ok(exists(&dev_root.join("dev/iommu"))? && iommufd_device(&dev.attr("vfio-dev"))?.is_some())
}

/// The driver the device `bdf` (`0000:41:00.0`) is bound to.
pub fn current_driver(sysfs_root: &Path, bdf: &str) -> Result<PciDriver, Error> {
    Device::new(sysfs_root, bdf)?.driver()
}

/// The IOMMU group of the device `bdf`. A device without one sits on a host
/// whose IOMMU is off.
pub fn iommu_group(sysfs_root: &Path, bdf: &str) -> Result<u32, Error> {
    let link = Device::new(sysfs_root, bdf)?.attr("iommu_group");
    let target = std::fs::read_link(&link).map_err(|source| Error::ReadSysfs {
        path: link.clone(),
        source,
    })?;
    let name = last_component(&link, &target)?;
    name.parse().map_err(|_| Error::ParseSysfs {
        path: link,
        reason: format!("group {name:?} is not a number"),
    })
}

/// The VFIO device nodes a container needs for the device `bdf`, which must
/// already be bound to `vfio-pci` (the kernel creates its nodes on bind).
///
/// Legacy: `/dev/vfio/<group>`, plus `/dev/vfio/vfio` as the API device.
/// iommufd, used under [`IommuPolicy::PreferIommuFD`] when the host has
/// `/dev/iommu` and the device a `vfio-dev/vfio<N>` entry:
/// `/dev/vfio/devices/vfio<N>`, plus `/dev/iommu` as the API device. The API
/// device is included only with `api_device`. `dev_root` is the root holding
/// the host's `dev` directory (`/` on a host), as for [`crate::nodes`].
pub fn vfio_device_nodes(
    sysfs_root: &Path,
    dev_root: &Path,
    bdf: &str,
    policy: IommuPolicy,
    api_device: bool,
) -> Result<Vec<DeviceNode>, Error> {
    let dev = Device::new(sysfs_root, bdf)?;
    let node = |name: &str| DeviceNode {
        path: Path::new("/dev").join(name),
        host_path: dev_root.join("dev").join(name),
    };
    let iommufd = match policy {
        IommuPolicy::PreferIommuFD if exists(&dev_root.join("dev/iommu"))? => {
            iommufd_device(&dev.attr("vfio-dev"))?
        }
        _ => None,
    };
    let mut nodes = match &iommufd {
        Some(name) => vec![node(&format!("vfio/devices/{name}"))],
        None => vec![node(&format!("vfio/{}", iommu_group(sysfs_root, bdf)?))],
    };
    if api_device {
        nodes.push(node(if iommufd.is_some() {
            "iommu"
        } else {
            "vfio/vfio"
        }));
    }
    Ok(nodes)
}

/// The `vfio<N>` cdev name under a device's `vfio-dev` directory; kernels
/// without VFIO cdev support have no such directory.
fn iommufd_device(dir: &Path) -> Result<Option<String>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::ReadSysfs {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::ReadSysfs {
            path: dir.to_owned(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str()
            && name
                .strip_prefix("vfio")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            names.push(name.to_owned());
        }
    }
    // A device has one cdev; sorting only keeps a surprise deterministic.
    names.sort();
    Ok(names.into_iter().next())
}

/// Refuses unless the host can pass devices through: the IOMMU is on (some
/// IOMMU group exists) and the `vfio-pci` driver is loaded. The error names
/// every missing piece with its fix.
pub fn host_ready(sysfs_root: &Path) -> Result<(), Error> {
    let mut problems = Vec::new();
    let groups = sysfs_root.join("kernel/iommu_groups");
    let has_group = match std::fs::read_dir(&groups) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(Error::ReadSysfs {
                path: groups,
                source,
            });
        }
    };
    if !has_group {
        problems.push(format!(
            "no IOMMU groups under {} (enable the IOMMU: intel_iommu=on or amd_iommu=on on \
             the kernel command line, and VT-d/AMD-Vi in the firmware)",
            groups.display()
        ));
    }
    let vfio_pci = sysfs_root.join("bus/pci/drivers/vfio-pci");
    if !exists(&vfio_pci)? {
        problems.push(format!(
            "no {} (load the vfio-pci module: modprobe vfio-pci)",
            vfio_pci.display()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::VfioHostNotReady {
            problems: problems.join("; "),
        })
    }
}

/// Whether the device `bdf` has SR-IOV virtual functions enabled
/// (`sriov_numvfs` > 0); such a GPU must not be passed through whole.
pub fn sriov_enabled(sysfs_root: &Path, bdf: &str) -> Result<bool, Error> {
    let path = Device::new(sysfs_root, bdf)?.attr("sriov_numvfs");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(Error::ReadSysfs { path, source }),
    };
    let vfs: u32 = text.trim().parse().map_err(|_| Error::ParseSysfs {
        path,
        reason: format!("{:?} is not a number", text.trim()),
    })?;
    Ok(vfs > 0)
}

/// The PIDs (sorted) of processes holding `dev_node` (e.g. `/dev/nvidia3`)
/// open, found through the `<proc>/<pid>/fd/*` links.
///
/// A link is matched by its text, which is the path as the holding process
/// sees it; container runtimes mount NVIDIA nodes at their host path, so
/// that is the node's host path. Processes whose fds cannot be read (gone
/// meanwhile, or not ours to inspect without `CAP_SYS_PTRACE`) are skipped,
/// so the answer is only complete for an agent in the host PID namespace
/// with that capability.
pub fn device_users(proc_root: &Path, dev_node: &Path) -> Result<Vec<u32>, Error> {
    let entries = std::fs::read_dir(proc_root).map_err(|source| Error::ReadProcFile {
        path: proc_root.to_owned(),
        source,
    })?;
    let mut pids = Vec::new();
    let mut skipped = 0_usize;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            skipped += 1;
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == dev_node));
        if holds {
            pids.push(pid);
        }
    }
    if skipped > 0 {
        tracing::debug!(
            skipped,
            node = %dev_node.display(),
            "skipped processes whose fds could not be read"
        );
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Writes to kernel files. Production writes sysfs and procfs; tests put a
/// fake kernel here, because a plain directory tree does not rebind a device
/// when its `unbind` or `drivers_probe` file is written.
trait Kernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// The real kernel, through its files.
struct KernelFiles;

impl Kernel for KernelFiles {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // No `create`: sysfs and procfs files exist or the path is wrong.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)?;
        // One write call: the kernel handles each write as one command.
        file.write_all(value.as_bytes())
    }
}

/// Binds the GPU `bdf` to `vfio-pci`, waiting until `deadline` for the kernel
/// to finish. Already on `vfio-pci` is success. From `nvidia` it takes the
/// driver's unbind lock first; the caller must have made sure no process
/// uses the GPU ([`device_users`]). Refused on a host without VFIO
/// ([`host_ready`]), with SR-IOV enabled, or from any third driver.
pub fn bind_to_vfio(
    sysfs_root: &Path,
    proc_root: &Path,
    bdf: &str,
    deadline: Instant,
) -> Result<(), Error> {
    bind_to_vfio_with(&KernelFiles, sysfs_root, proc_root, bdf, deadline)
}

/// Binds the GPU `bdf` back to `nvidia`, waiting until `deadline` (the
/// driver's probe loads GPU firmware, which takes seconds), and releases the
/// unbind lock. Already on `nvidia` is success (the lock is still released).
/// Refused from any third driver.
pub fn bind_to_nvidia(
    sysfs_root: &Path,
    proc_root: &Path,
    bdf: &str,
    deadline: Instant,
) -> Result<(), Error> {
    bind_to_nvidia_with(&KernelFiles, sysfs_root, proc_root, bdf, deadline)
}

fn bind_to_vfio_with(
    kernel: &impl Kernel,
    sysfs_root: &Path,
    proc_root: &Path,
    bdf: &str,
    deadline: Instant,
) -> Result<(), Error> {
    let mut rebind = Rebind::start(kernel, sysfs_root, proc_root, bdf, PciDriver::VfioPci)?;
    match &rebind.start {
        PciDriver::VfioPci => return Ok(()),
        PciDriver::Other(_) => return Err(rebind.refuse_other()),
        PciDriver::Nvidia | PciDriver::None => {}
    }
    if sriov_enabled(sysfs_root, bdf)? {
        return Err(Error::RebindRefused {
            pci_bus_id: bdf.to_owned(),
            target: PciDriver::VfioPci.to_string(),
            reason: format!(
                "SR-IOV virtual functions are enabled; disable them first \
                 (echo 0 > {})",
                rebind.dev.attr("sriov_numvfs").display()
            ),
        });
    }
    host_ready(sysfs_root)?;

    if rebind.start == PciDriver::Nvidia && exists(&rebind.lock)? {
        rebind.take_unbind_lock()?;
    }
    let override_file = rebind.dev.attr("driver_override");
    let r = rebind.write(&override_file, "vfio-pci");
    rebind.step("setting driver_override", r)?;
    rebind.override_changed = true;
    if rebind.start == PciDriver::Nvidia {
        let r = rebind.write(&rebind.dev.driver_file("nvidia", "unbind"), bdf);
        rebind.step("unbinding it from nvidia", r)?;
        rebind.unbound = true;
    }
    let r = rebind.probe("vfio-pci");
    rebind.step("probing it", r)?;
    rebind.wait(deadline)
}

fn bind_to_nvidia_with(
    kernel: &impl Kernel,
    sysfs_root: &Path,
    proc_root: &Path,
    bdf: &str,
    deadline: Instant,
) -> Result<(), Error> {
    let mut rebind = Rebind::start(kernel, sysfs_root, proc_root, bdf, PciDriver::Nvidia)?;
    match &rebind.start {
        PciDriver::Nvidia => return rebind.release_unbind_lock(),
        PciDriver::Other(_) => return Err(rebind.refuse_other()),
        PciDriver::VfioPci | PciDriver::None => {}
    }
    // An empty line clears the override; the default match then finds nvidia.
    let override_file = rebind.dev.attr("driver_override");
    let r = rebind.write(&override_file, "\n");
    rebind.step("clearing driver_override", r)?;
    rebind.override_changed = true;
    if rebind.start == PciDriver::VfioPci {
        let r = rebind.write(&rebind.dev.driver_file("vfio-pci", "unbind"), bdf);
        rebind.step("unbinding it from vfio-pci", r)?;
        rebind.unbound = true;
    }
    let r = rebind.probe("nvidia");
    rebind.step("probing it", r)?;
    rebind.wait(deadline)?;
    rebind.release_unbind_lock()
}

/// One move of a device between drivers, remembering the steps taken so a
/// failure can undo exactly those.
struct Rebind<'a, K> {
    kernel: &'a K,
    dev: Device<'a>,
    lock: PathBuf,
    start: PciDriver,
    target: PciDriver,
    began: Instant,
    lock_taken: bool,
    override_changed: bool,
    unbound: bool,
}

impl<'a, K: Kernel> Rebind<'a, K> {
    fn start(
        kernel: &'a K,
        sysfs_root: &'a Path,
        proc_root: &Path,
        bdf: &'a str,
        target: PciDriver,
    ) -> Result<Self, Error> {
        let began = Instant::now();
        let dev = Device::new(sysfs_root, bdf)?;
        Ok(Self {
            kernel,
            lock: dev.unbind_lock(proc_root),
            start: dev.driver()?,
            dev,
            target,
            began,
            lock_taken: false,
            override_changed: false,
            unbound: false,
        })
    }

    fn refuse_other(&self) -> Error {
        Error::RebindRefused {
            pci_bus_id: self.dev.bdf.to_owned(),
            target: self.target.to_string(),
            reason: format!("it is bound to {}, which nvdra does not unbind", self.start),
        }
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), Error> {
        self.kernel
            .write(path, value)
            .map_err(|source| Error::WriteKernelFile {
                path: path.to_owned(),
                value: value.to_owned(),
                source,
            })
    }

    fn probe(&self, driver: &str) -> Result<(), Error> {
        self.write(&self.dev.probe_file(driver)?, self.dev.bdf)
    }

    /// Passes `r` through, undoing the move so far if it failed.
    fn step(&self, what: &str, r: Result<(), Error>) -> Result<(), Error> {
        r.map_err(|e| self.fail(format!("{what} failed"), Some(e)))
    }

    /// The driver grants the lock by reading back `1`; it refuses while a
    /// client has the GPU open, so a client just exiting gets a few chances.
    fn take_unbind_lock(&mut self) -> Result<(), Error> {
        let mut last_error = None;
        for attempt in 1..=UNBIND_LOCK_TRIES {
            if attempt > 1 {
                std::thread::sleep(UNBIND_LOCK_RETRY);
            }
            match self.write(&self.lock, "1").and_then(|()| self.read_lock()) {
                Ok(granted) if granted == "1" => {
                    self.lock_taken = true;
                    return Ok(());
                }
                Ok(_) => last_error = None,
                Err(e) => last_error = Some(e),
            }
        }
        Err(self.fail(
            format!(
                "the nvidia driver did not grant its unbind lock {} after {UNBIND_LOCK_TRIES} \
                 tries {UNBIND_LOCK_RETRY:?} apart (is the GPU still in use?)",
                self.lock.display()
            ),
            last_error,
        ))
    }

    fn read_lock(&self) -> Result<String, Error> {
        std::fs::read_to_string(&self.lock)
            .map(|s| s.trim().to_owned())
            .map_err(|source| Error::ReadProcFile {
                path: self.lock.clone(),
                source,
            })
    }

    /// Gives the unbind lock back, so the driver accepts clients again. The
    /// file disappears while the GPU is off nvidia, hence the existence check.
    fn release_unbind_lock(&self) -> Result<(), Error> {
        let r = match exists(&self.lock) {
            Ok(true) => match self.read_lock() {
                Ok(held) if held == "0" => Ok(()),
                Ok(_) => self.write(&self.lock, "0"),
                Err(e) => Err(e),
            },
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        r.map_err(|e| {
            self.failed(
                "releasing the nvidia unbind lock failed".to_owned(),
                self.state(Vec::new()),
                Some(e),
            )
        })
    }

    fn wait(&self, deadline: Instant) -> Result<(), Error> {
        loop {
            let now = match self.dev.driver() {
                Ok(now) => now,
                Err(e) => return Err(self.fail("reading its driver failed".to_owned(), Some(e))),
            };
            if now == self.target {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.fail(
                    format!(
                        "it was on {now}, not {}, at the deadline ({:?} after the rebind began)",
                        self.target,
                        deadline.saturating_duration_since(self.began)
                    ),
                    None,
                ));
            }
            std::thread::sleep(left.min(BIND_POLL));
        }
    }

    /// Undoes the steps taken, then builds the error for `failure`.
    fn fail(&self, failure: String, source: Option<Error>) -> Error {
        let state = self.undo();
        self.failed(failure, state, source)
    }

    fn failed(&self, failure: String, state: String, source: Option<Error>) -> Error {
        Error::RebindPciDevice {
            pci_bus_id: self.dev.bdf.to_owned(),
            target: self.target.to_string(),
            failure: failure.into_boxed_str(),
            state: state.into_boxed_str(),
            source: source.map(Box::new),
        }
    }

    /// Puts the device back where it started as far as the steps taken
    /// allow, and says where it is now.
    fn undo(&self) -> String {
        let mut problems = Vec::new();
        if self.override_changed {
            let back = match self.start {
                PciDriver::VfioPci => "vfio-pci",
                _ => "\n",
            };
            let override_file = self.dev.attr("driver_override");
            problems.extend(self.write(&override_file, back).err());
        }
        if self.unbound
            && let Some(name) = self.start.name()
            && matches!(self.dev.driver(), Ok(PciDriver::None))
        {
            problems.extend(self.probe(name).err());
        }
        if self.lock_taken && matches!(exists(&self.lock), Ok(true)) {
            problems.extend(self.write(&self.lock, "0").err());
        }
        self.state(problems)
    }

    fn state(&self, problems: Vec<Error>) -> String {
        let mut state = match self.dev.driver() {
            Ok(now) if now == self.start => format!("the device is on {now}, where it started"),
            Ok(now) => format!("the device is on {now} (it started on {})", self.start),
            Err(e) => format!("the device's driver is unknown ({})", chain(&e)),
        };
        if !problems.is_empty() {
            let problems: Vec<_> = problems.iter().map(chain).collect();
            state.push_str(&format!(
                "; putting it back failed: {}",
                problems.join("; ")
            ));
        }
        state
    }
}

/// An error with its causes on one line, for the secondary errors of an
/// undo that cannot be the primary error's source.
fn chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// The UUID upstream publishes as a VFIO device's `uuid` attribute: the
/// RFC 4122 version 5 (SHA-1, name-based) UUID of the lower-case PCI bus ID
/// (`0000:41:00.0`) under the DNS namespace.
///
/// This is a best-effort reconstruction of upstream's choice; nvdra relies
/// only on its format: a stable, well-formed UUID per PCI address.
pub fn vfio_uuid(pci_bus_id: &str) -> String {
    const DNS_NAMESPACE: [u8; 16] = [
        0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];
    let mut name = DNS_NAMESPACE.to_vec();
    name.extend_from_slice(pci_bus_id.to_ascii_lowercase().as_bytes());
    let hash = sha1(&name);
    let mut b = [0_u8; 16];
    b.copy_from_slice(&hash[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = |bytes: &[u8]| bytes.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(&b[..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..])
    )
}

/// SHA-1 (RFC 3174), only for name-based UUIDs: not a security use, and too
/// small to justify a dependency.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0_u32; 80];
        for (wi, word) in w.iter_mut().zip(block.chunks_exact(4)) {
            *wi = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut out = [0_u8; 20];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::os::unix::fs::symlink;

    use super::*;

    const GPU: &str = "0000:41:00.0";

    /// A fake host: `sys`, `proc` and `dev` under one temporary directory,
    /// with one GPU in IOMMU group 52.
    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new(driver: Option<&str>) -> Self {
            let host = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            let sys = host.sys();
            let pci = sys.join("bus/pci");
            for driver in ["nvidia", "vfio-pci"] {
                for file in ["bind", "unbind"] {
                    host.put(&pci.join("drivers").join(driver).join(file), "");
                }
            }
            host.put(&pci.join("drivers_probe"), "");
            host.put(&host.dev().join("driver_override"), "(null)\n");
            std::fs::create_dir_all(sys.join("kernel/iommu_groups/52")).unwrap();
            symlink(
                "../../../../kernel/iommu_groups/52",
                host.dev().join("iommu_group"),
            )
            .unwrap();
            if let Some(driver) = driver {
                host.link_driver(driver);
            }
            host.put(&host.lock(), "0\n");
            std::fs::create_dir_all(host.dir.path().join("dev")).unwrap();
            host
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }
        fn sys(&self) -> PathBuf {
            self.root().join("sys")
        }
        fn proc(&self) -> PathBuf {
            self.root().join("proc")
        }
        fn dev(&self) -> PathBuf {
            self.sys().join("bus/pci/devices").join(GPU)
        }
        fn lock(&self) -> PathBuf {
            self.proc()
                .join("driver/nvidia/gpus")
                .join(GPU)
                .join("unbindLock")
        }

        fn put(&self, path: &Path, text: &str) {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        fn read(&self, path: &Path) -> String {
            std::fs::read_to_string(path).unwrap()
        }
        fn link_driver(&self, driver: &str) {
            symlink(format!("../../drivers/{driver}"), self.dev().join("driver")).unwrap();
        }
        fn driver(&self) -> PciDriver {
            current_driver(&self.sys(), GPU).unwrap()
        }
    }

    /// Does to the fake tree what the kernel does when its files are
    /// written, and logs every write as `<dir>/<file>=<value>`.
    struct FakeKernel<'a> {
        host: &'a Host,
        log: RefCell<Vec<String>>,
        /// How many more `1`s the unbind lock answers with `0`.
        lock_refusals: Cell<u32>,
        /// A driver whose probe never binds the device.
        never_binds: Option<&'static str>,
        /// A file whose next write fails.
        fail_once: Cell<Option<&'static str>>,
    }

    impl<'a> FakeKernel<'a> {
        fn new(host: &'a Host) -> Self {
            Self {
                host,
                log: RefCell::default(),
                lock_refusals: Cell::new(0),
                never_binds: None,
                fail_once: Cell::new(None),
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.borrow().clone()
        }

        fn bind(&self, driver: &str) {
            let bound = self.host.dev().join("driver").symlink_metadata().is_ok();
            if !bound && self.never_binds != Some(driver) {
                self.host.link_driver(driver);
            }
        }
    }

    impl Kernel for FakeKernel<'_> {
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            let name = path.file_name().unwrap().to_str().unwrap();
            let dir = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            if self.fail_once.get() == Some(name) {
                self.fail_once.set(None);
                self.log
                    .borrow_mut()
                    .push(format!("{dir}/{name}={value:?} (failed)"));
                return Err(io::Error::other("injected failure"));
            }
            self.log
                .borrow_mut()
                .push(format!("{dir}/{name}={value:?}"));
            KernelFiles.write(path, value)?;
            match name {
                "unbindLock" if value == "1" && self.lock_refusals.get() > 0 => {
                    self.lock_refusals.set(self.lock_refusals.get() - 1);
                    std::fs::write(path, "0\n")?;
                }
                "unbind" => std::fs::remove_file(self.host.dev().join("driver"))?,
                "drivers_probe" => {
                    let over = self.host.read(&self.host.dev().join("driver_override"));
                    match over.trim() {
                        "" | "(null)" => self.bind("nvidia"),
                        other => self.bind(other),
                    }
                }
                "bind" => self.bind(dir),
                _ => {}
            }
            Ok(())
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn to_vfio(kernel: &FakeKernel<'_>, deadline: Instant) -> Result<(), Error> {
        let host = kernel.host;
        bind_to_vfio_with(kernel, &host.sys(), &host.proc(), GPU, deadline)
    }

    fn to_nvidia(kernel: &FakeKernel<'_>) -> Result<(), Error> {
        let host = kernel.host;
        bind_to_nvidia_with(kernel, &host.sys(), &host.proc(), GPU, soon())
    }

    #[test]
    fn current_driver_reads_the_driver_link() {
        let host = Host::new(Some("nvidia"));
        assert_eq!(host.driver(), PciDriver::Nvidia);
        std::fs::remove_file(host.dev().join("driver")).unwrap();
        assert_eq!(host.driver(), PciDriver::None);
        host.link_driver("nouveau");
        assert_eq!(host.driver(), PciDriver::Other("nouveau".to_owned()));
        assert_eq!(host.driver().to_string(), "nouveau");
        assert_eq!(PciDriver::None.to_string(), "no driver");

        let missing = current_driver(&host.sys(), "0000:42:00.0").unwrap_err();
        assert_eq!(
            missing.to_string(),
            format!(
                "cannot read {}",
                host.sys().join("bus/pci/devices/0000:42:00.0").display()
            )
        );
        let bad = current_driver(&host.sys(), "../../../etc").unwrap_err();
        assert!(matches!(bad, Error::InvalidPciBusId { .. }), "{bad}");
        assert!(current_driver(&host.sys(), "0000:41:00.0\n").is_err());
        assert!(current_driver(&host.sys(), "0000:41:00.8").is_err());
        assert!(current_driver(&host.sys(), "0000:4F:00.0").is_err());
    }

    #[test]
    fn device_nodes_use_iommufd_only_when_asked_and_available() {
        let host = Host::new(Some("vfio-pci"));
        let nodes = |policy, api| {
            vfio_device_nodes(&host.sys(), host.root(), GPU, policy, api)
                .unwrap()
                .into_iter()
                .map(|n| {
                    assert_eq!(
                        n.host_path,
                        host.root().join(n.path.strip_prefix("/").unwrap())
                    );
                    n.path.display().to_string()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(iommu_group(&host.sys(), GPU).unwrap(), 52);
        assert_eq!(nodes(IommuPolicy::LegacyOnly, false), ["/dev/vfio/52"]);
        assert_eq!(
            nodes(IommuPolicy::LegacyOnly, true),
            ["/dev/vfio/52", "/dev/vfio/vfio"]
        );
        // No /dev/iommu: legacy even when iommufd is preferred.
        std::fs::create_dir_all(host.dev().join("vfio-dev/vfio7")).unwrap();
        assert_eq!(
            nodes(IommuPolicy::PreferIommuFD, true),
            ["/dev/vfio/52", "/dev/vfio/vfio"]
        );
        host.put(&host.root().join("dev/iommu"), "");
        assert_eq!(
            nodes(IommuPolicy::PreferIommuFD, true),
            ["/dev/vfio/devices/vfio7", "/dev/iommu"]
        );
        assert_eq!(
            nodes(IommuPolicy::PreferIommuFD, false),
            ["/dev/vfio/devices/vfio7"]
        );
        assert_eq!(
            nodes(IommuPolicy::LegacyOnly, true),
            ["/dev/vfio/52", "/dev/vfio/vfio"]
        );
        // A kernel without VFIO cdevs: legacy.
        std::fs::remove_dir_all(host.dev().join("vfio-dev")).unwrap();
        assert_eq!(nodes(IommuPolicy::PreferIommuFD, false), ["/dev/vfio/52"]);

        std::fs::remove_file(host.dev().join("iommu_group")).unwrap();
        let err = iommu_group(&host.sys(), GPU).unwrap_err();
        assert!(matches!(err, Error::ReadSysfs { .. }), "{err}");
    }

    #[test]
    fn host_ready_names_what_is_missing_and_the_fix() {
        let host = Host::new(Some("nvidia"));
        assert!(host_ready(&host.sys()).is_ok());

        std::fs::remove_dir_all(host.sys().join("bus/pci/drivers/vfio-pci")).unwrap();
        let err = host_ready(&host.sys()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "host is not ready for VFIO passthrough: no {} (load the vfio-pci module: \
                 modprobe vfio-pci)",
                host.sys().join("bus/pci/drivers/vfio-pci").display()
            )
        );

        std::fs::remove_dir_all(host.sys().join("kernel/iommu_groups/52")).unwrap();
        let err = host_ready(&host.sys()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "host is not ready for VFIO passthrough: no IOMMU groups under {} (enable the \
                 IOMMU: intel_iommu=on or amd_iommu=on on the kernel command line",
                host.sys().join("kernel/iommu_groups").display()
            )),
            "{err}"
        );
        assert!(
            err.ends_with("(load the vfio-pci module: modprobe vfio-pci)"),
            "{err}"
        );
    }

    #[test]
    fn sriov_enabled_reads_numvfs() {
        let host = Host::new(Some("nvidia"));
        let numvfs = host.dev().join("sriov_numvfs");
        assert!(!sriov_enabled(&host.sys(), GPU).unwrap());
        host.put(&numvfs, "0\n");
        assert!(!sriov_enabled(&host.sys(), GPU).unwrap());
        host.put(&numvfs, "4\n");
        assert!(sriov_enabled(&host.sys(), GPU).unwrap());
        host.put(&numvfs, "many\n");
        let err = sriov_enabled(&host.sys(), GPU).unwrap_err();
        assert!(
            err.to_string().ends_with("\"many\" is not a number"),
            "{err}"
        );
    }

    #[test]
    fn binds_an_nvidia_gpu_to_vfio_in_order_once() {
        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        to_vfio(&kernel, soon()).unwrap();
        assert_eq!(
            kernel.log(),
            [
                "0000:41:00.0/unbindLock=\"1\"",
                "0000:41:00.0/driver_override=\"vfio-pci\"",
                "nvidia/unbind=\"0000:41:00.0\"",
                "pci/drivers_probe=\"0000:41:00.0\"",
            ]
        );
        assert_eq!(host.driver(), PciDriver::VfioPci);

        to_vfio(&kernel, soon()).unwrap();
        assert_eq!(kernel.log().len(), 4, "a second bind writes nothing");
        bind_to_vfio(&host.sys(), &host.proc(), GPU, soon()).unwrap();
    }

    #[test]
    fn binds_an_unbound_gpu_without_touching_nvidia() {
        let host = Host::new(None);
        let kernel = FakeKernel::new(&host);
        to_vfio(&kernel, soon()).unwrap();
        assert_eq!(
            kernel.log(),
            [
                "0000:41:00.0/driver_override=\"vfio-pci\"",
                "pci/drivers_probe=\"0000:41:00.0\"",
            ]
        );
        assert_eq!(host.driver(), PciDriver::VfioPci);
    }

    #[test]
    fn refuses_sriov_third_drivers_and_unready_hosts_without_writing() {
        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        host.put(&host.dev().join("sriov_numvfs"), "8\n");
        let err = to_vfio(&kernel, soon()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "refusing to bind 0000:41:00.0 to vfio-pci: SR-IOV virtual functions are \
                 enabled; disable them first (echo 0 > {})",
                host.dev().join("sriov_numvfs").display()
            )
        );
        host.put(&host.dev().join("sriov_numvfs"), "0\n");

        std::fs::remove_dir_all(host.sys().join("kernel/iommu_groups/52")).unwrap();
        let err = to_vfio(&kernel, soon()).unwrap_err();
        assert!(matches!(err, Error::VfioHostNotReady { .. }), "{err}");

        std::fs::remove_file(host.dev().join("driver")).unwrap();
        host.link_driver("nouveau");
        for err in [to_vfio(&kernel, soon()), to_nvidia(&kernel)] {
            let err = err.unwrap_err().to_string();
            assert!(
                err.ends_with(": it is bound to nouveau, which nvdra does not unbind"),
                "{err}"
            );
        }
        assert_eq!(kernel.log(), Vec::<String>::new());
        assert_eq!(host.driver(), PciDriver::Other("nouveau".to_owned()));
    }

    #[test]
    fn retries_the_unbind_lock_then_gives_up_untouched() {
        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        kernel.lock_refusals.set(2);
        to_vfio(&kernel, soon()).unwrap();
        let lock_writes = |k: &FakeKernel<'_>| {
            k.log()
                .iter()
                .filter(|w| w.starts_with("0000:41:00.0/unbindLock"))
                .count()
        };
        assert_eq!(lock_writes(&kernel), 3);
        assert_eq!(host.driver(), PciDriver::VfioPci);

        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        kernel.lock_refusals.set(UNBIND_LOCK_TRIES);
        let started = Instant::now();
        let err = to_vfio(&kernel, soon()).unwrap_err();
        assert!(started.elapsed() >= UNBIND_LOCK_RETRY * (UNBIND_LOCK_TRIES - 1));
        assert_eq!(
            err.to_string(),
            format!(
                "cannot bind 0000:41:00.0 to vfio-pci: the nvidia driver did not grant its \
                 unbind lock {} after 5 tries 100ms apart (is the GPU still in use?); the \
                 device is on nvidia, where it started",
                host.lock().display()
            )
        );
        assert_eq!(lock_writes(&kernel), 5);
        assert_eq!(kernel.log().len(), 5, "nothing but the lock was written");
        assert_eq!(host.driver(), PciDriver::Nvidia);
    }

    #[test]
    fn timeout_names_device_driver_and_deadline_and_puts_the_gpu_back() {
        let host = Host::new(Some("nvidia"));
        let mut kernel = FakeKernel::new(&host);
        kernel.never_binds = Some("vfio-pci");
        let err = to_vfio(&kernel, Instant::now() + Duration::from_millis(50)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "cannot bind 0000:41:00.0 to vfio-pci: it was on no driver, not vfio-pci, at \
                 the deadline ("
            ),
            "{text}"
        );
        assert!(
            text.ends_with(" after the rebind began); the device is on nvidia, where it started"),
            "{text}"
        );
        assert_eq!(
            kernel.log()[4..],
            [
                "0000:41:00.0/driver_override=\"\\n\"",
                "pci/drivers_probe=\"0000:41:00.0\"",
                "0000:41:00.0/unbindLock=\"0\"",
            ]
        );
        assert_eq!(host.read(&host.dev().join("driver_override")), "\n");
        assert_eq!(host.read(&host.lock()), "0");
    }

    #[test]
    fn failed_unbind_clears_driver_override_and_the_lock() {
        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        kernel.fail_once.set(Some("unbind"));
        let err = to_vfio(&kernel, soon()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot bind 0000:41:00.0 to vfio-pci: unbinding it from nvidia failed; the device \
             is on nvidia, where it started"
        );
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            source.starts_with("cannot write \"0000:41:00.0\" to "),
            "{source}"
        );
        assert_eq!(
            kernel.log(),
            [
                "0000:41:00.0/unbindLock=\"1\"",
                "0000:41:00.0/driver_override=\"vfio-pci\"",
                "nvidia/unbind=\"0000:41:00.0\" (failed)",
                "0000:41:00.0/driver_override=\"\\n\"",
                "0000:41:00.0/unbindLock=\"0\"",
            ]
        );
        assert_eq!(host.read(&host.dev().join("driver_override")), "\n");
    }

    #[test]
    fn failed_probe_reprobes_the_gpu_onto_nvidia() {
        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        kernel.fail_once.set(Some("drivers_probe"));
        let err = to_vfio(&kernel, soon()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("probing it failed; the device is on nvidia, where it started"),
            "{err}"
        );
        assert_eq!(
            kernel.log()[3..],
            [
                "pci/drivers_probe=\"0000:41:00.0\" (failed)",
                "0000:41:00.0/driver_override=\"\\n\"",
                "pci/drivers_probe=\"0000:41:00.0\"",
                "0000:41:00.0/unbindLock=\"0\"",
            ]
        );
        assert_eq!(host.driver(), PciDriver::Nvidia);
    }

    #[test]
    fn binds_back_to_nvidia_in_order_once() {
        let host = Host::new(Some("nvidia"));
        let kernel = FakeKernel::new(&host);
        to_vfio(&kernel, soon()).unwrap();
        kernel.log.borrow_mut().clear();

        to_nvidia(&kernel).unwrap();
        assert_eq!(
            kernel.log(),
            [
                "0000:41:00.0/driver_override=\"\\n\"",
                "vfio-pci/unbind=\"0000:41:00.0\"",
                "pci/drivers_probe=\"0000:41:00.0\"",
                "0000:41:00.0/unbindLock=\"0\"",
            ]
        );
        assert_eq!(host.driver(), PciDriver::Nvidia);
        to_nvidia(&kernel).unwrap();
        assert_eq!(kernel.log().len(), 4, "a second bind writes nothing");
        bind_to_nvidia(&host.sys(), &host.proc(), GPU, soon()).unwrap();
    }

    #[test]
    fn failed_nvidia_probe_leaves_the_gpu_on_vfio() {
        let host = Host::new(Some("vfio-pci"));
        let mut kernel = FakeKernel::new(&host);
        kernel.never_binds = Some("nvidia");
        let err = bind_to_nvidia_with(&kernel, &host.sys(), &host.proc(), GPU, Instant::now())
            .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "at the deadline (0ns after the rebind began); the device is on vfio-pci, where \
                 it started"
            ),
            "{err}"
        );
        assert_eq!(host.read(&host.dev().join("driver_override")), "vfio-pci");
    }

    #[test]
    fn uses_the_drivers_bind_file_without_drivers_probe() {
        let host = Host::new(Some("nvidia"));
        std::fs::remove_file(host.sys().join("bus/pci/drivers_probe")).unwrap();
        let kernel = FakeKernel::new(&host);
        to_vfio(&kernel, soon()).unwrap();
        assert_eq!(kernel.log()[3], "vfio-pci/bind=\"0000:41:00.0\"");
        to_nvidia(&kernel).unwrap();
        assert_eq!(kernel.log()[6], "nvidia/bind=\"0000:41:00.0\"");
        assert_eq!(host.driver(), PciDriver::Nvidia);
    }

    #[test]
    fn kernel_files_are_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unbind");
        assert!(KernelFiles.write(&path, "x").is_err());
        assert!(!path.exists());
        std::fs::write(&path, "longer old text").unwrap();
        KernelFiles.write(&path, "1").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1");
    }

    #[test]
    fn device_users_finds_holders_and_skips_unreadable_processes() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path();
        let fd = |pid: &str, n: &str, target: &str| {
            let fds = proc.join(pid).join("fd");
            std::fs::create_dir_all(&fds).unwrap();
            symlink(target, fds.join(n)).unwrap();
        };
        fd("100", "3", "/dev/nvidia3");
        fd("100", "4", "/dev/nvidia3");
        fd("101", "0", "/dev/nvidia0");
        fd("101", "1", "/dev/nvidia30");
        fd("1234", "0", "/dev/null");
        fd("1234", "9", "/dev/nvidia3");
        // Gone between listing and reading: no fd directory.
        std::fs::create_dir_all(proc.join("102")).unwrap();
        // Unreadable fd table; a file stands in for EACCES, which root ignores.
        std::fs::write(proc.join("103"), "").unwrap();
        std::fs::create_dir_all(proc.join("104")).unwrap();
        std::fs::write(proc.join("104/fd"), "").unwrap();
        // An fd entry that is no link.
        std::fs::create_dir_all(proc.join("105/fd")).unwrap();
        std::fs::write(proc.join("105/fd/0"), "").unwrap();
        // Not a process.
        symlink("100", proc.join("self")).unwrap();
        fd("driver", "3", "/dev/nvidia3");

        let users = device_users(proc, Path::new("/dev/nvidia3")).unwrap();
        assert_eq!(users, [100, 1234]);
        assert_eq!(
            device_users(proc, Path::new("/dev/nvidia7")).unwrap(),
            Vec::<u32>::new()
        );
        let err = device_users(&proc.join("missing"), Path::new("/dev/nvidia3")).unwrap_err();
        assert!(matches!(err, Error::ReadProcFile { .. }), "{err}");
    }

    #[test]
    fn sha1_matches_rfc3174_vectors() {
        let hex = |d: [u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(
            hex(sha1(&[b'a'; 1_000_000])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
        assert_eq!(
            hex(sha1("01234567".repeat(80).as_bytes())),
            "dea356a2cddd90c7a7ecedc5ebb563934f460452"
        );
    }

    #[test]
    fn vfio_uuid_is_a_v5_uuid_under_the_dns_namespace() {
        // Python's documented example: uuid5(NAMESPACE_DNS, "python.org").
        assert_eq!(
            vfio_uuid("python.org"),
            "886313e1-3b8a-5372-9b90-0c9aee199e5d"
        );
        assert_eq!(vfio_uuid(GPU), "c6d656ef-bc10-58ab-8b52-b6bd2b19e909");
        assert_eq!(
            vfio_uuid("0000:41:00.0"),
            vfio_uuid("0000:41:00.0".to_uppercase().as_str())
        );
        assert_ne!(vfio_uuid(GPU), vfio_uuid("0000:3b:00.0"));
    }

    #[test]
    fn nvidia_pci_gpus_lists_display_controllers_in_address_order() {
        let root = tempfile::tempdir().unwrap();
        let devices = root.path().join("bus/pci/devices");
        let add = |bdf: &str, vendor: &str, class: &str, numa: &str| {
            let dir = devices.join(bdf);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(dir.join("class"), format!("{class}\n")).unwrap();
            std::fs::write(dir.join("device"), "0x2330\n").unwrap();
            std::fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
        };
        add("0000:c1:00.0", "0x10de", "0x030200", "1");
        add("0000:41:00.0", "0x10de", "0x030000", "-1");
        add("0000:41:00.1", "0x10de", "0x040300", "0"); // its audio function
        add("0000:05:00.0", "0x8086", "0x030000", "0"); // not NVIDIA
        std::fs::create_dir_all(devices.join("not-a-device")).unwrap();
        let gpus = nvidia_pci_gpus(root.path()).unwrap();
        let found: Vec<(&str, Option<i64>, &PciDriver)> = gpus
            .iter()
            .map(|g| (g.bdf.as_str(), g.numa_node, &g.driver))
            .collect();
        assert_eq!(
            found,
            [
                ("0000:41:00.0", None, &PciDriver::None),
                ("0000:c1:00.0", Some(1), &PciDriver::None)
            ]
        );
        assert_eq!(gpus[0].device_id, 0x2330);
        assert!(
            nvidia_pci_gpus(&root.path().join("missing"))
                .unwrap()
                .is_empty()
        );
    }
}

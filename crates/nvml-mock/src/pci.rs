//! A mock node's PCI side: the sysfs entries of its GPUs as the kernel lays
//! them out ([`install`]), and a [`FakeKernel`] that does what the kernel
//! does when a driver's `bind`/`unbind` or `drivers_probe` file is written,
//! so the agent's VFIO passthrough runs unchanged against a temporary tree.
//!
//! Layout under the sysfs root, per GPU: `devices/<root>/<bdf>/` with
//! `vendor`, `device`, `class`, `numa_node`, `driver_override`, a `driver`
//! link to `bus/pci/drivers/nvidia` and an `iommu_group` link into
//! `kernel/iommu_groups`; the `bus/pci/devices/<bdf>` link to it; and the
//! `bind`/`unbind` files of the `nvidia` and `vfio-pci` drivers plus
//! `bus/pci/drivers_probe`.
//!
//! The fake kernel polls those files every few milliseconds on its own
//! thread and empties each after acting, as the real files read back empty:
//! `unbind` removes the device's `driver` link when it names that driver;
//! `bind` links an unbound device to that driver; `drivers_probe` links an
//! unbound device to its `driver_override`, else to `nvidia`. It stops when
//! dropped. Nothing here touches the real `/sys`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The drivers the fake kernel knows.
const DRIVERS: [&str; 2] = ["nvidia", "vfio-pci"];
/// How often the fake kernel looks at the files.
const POLL: Duration = Duration::from_millis(5);

/// One GPU's PCI facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciGpuSpec {
    /// `dddd:bb:dd.f`.
    pub bdf: String,
    /// The PCI device ID.
    pub device_id: u16,
    /// The NUMA node.
    pub numa_node: i64,
    /// The PCIe root, e.g. `pci0000:3a`.
    pub pcie_root: String,
    /// The IOMMU group.
    pub iommu_group: u32,
}

/// The specs of a fake profile's GPUs: one IOMMU group each, numbered in
/// PCI address order.
pub fn specs_of(inventory: &nvdra_gpu::Inventory) -> Vec<PciGpuSpec> {
    let mut gpus: Vec<&nvdra_gpu::GpuInfo> = inventory.gpus.iter().map(|g| &g.info).collect();
    gpus.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
    gpus.iter()
        .zip(0u32..)
        .map(|(gpu, group)| PciGpuSpec {
            bdf: gpu.pci_bus_id.clone(),
            device_id: 0x2330,
            numa_node: 0,
            pcie_root: gpu
                .pcie_root
                .clone()
                .unwrap_or_else(|| format!("pci{}", &gpu.pci_bus_id[..7])),
            iommu_group: 100 + group,
        })
        .collect()
}

fn io(what: &str, path: &Path, err: std::io::Error) -> String {
    format!("cannot {what} {}: {err}", path.display())
}

/// Lays out `gpus` under `sysfs_root`, all bound to `nvidia`. Existing
/// `bus/pci/devices` links (from [`crate::layout::install`]) are kept.
pub fn install(sysfs_root: &Path, gpus: &[PciGpuSpec]) -> Result<(), String> {
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| io("create", p, e));
    let write = |p: &Path, text: &str| std::fs::write(p, text).map_err(|e| io("write", p, e));
    let link = |target: &str, at: &Path| match std::os::unix::fs::symlink(target, at) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("link", at, e)),
    };
    let bus = sysfs_root.join("bus/pci");
    mkdir(&bus.join("devices"))?;
    for driver in DRIVERS {
        let dir = bus.join("drivers").join(driver);
        mkdir(&dir)?;
        for file in ["bind", "unbind"] {
            write(&dir.join(file), "")?;
        }
    }
    write(&bus.join("drivers_probe"), "")?;
    for gpu in gpus {
        let dir = sysfs_root
            .join("devices")
            .join(&gpu.pcie_root)
            .join(&gpu.bdf);
        mkdir(&dir)?;
        write(&dir.join("vendor"), "0x10de\n")?;
        write(&dir.join("device"), &format!("0x{:04x}\n", gpu.device_id))?;
        write(&dir.join("class"), "0x030200\n")?;
        write(&dir.join("numa_node"), &format!("{}\n", gpu.numa_node))?;
        write(&dir.join("driver_override"), "\n")?;
        link("../../../bus/pci/drivers/nvidia", &dir.join("driver"))?;
        let group = sysfs_root
            .join("kernel/iommu_groups")
            .join(gpu.iommu_group.to_string());
        mkdir(&group)?;
        link(
            &format!("../../../kernel/iommu_groups/{}", gpu.iommu_group),
            &dir.join("iommu_group"),
        )?;
        link(
            &format!("../../../devices/{}/{}", gpu.pcie_root, gpu.bdf),
            &bus.join("devices").join(&gpu.bdf),
        )?;
    }
    Ok(())
}

/// The fake kernel of one sysfs tree; stops when dropped.
#[derive(Debug)]
pub struct FakeKernel {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKernel {
    /// Starts acting on `sysfs_root`'s driver files.
    pub fn spawn(sysfs_root: impl Into<PathBuf>) -> Result<Self, String> {
        let root = sysfs_root.into();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nvdra-fake-kernel".to_owned())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    act(&root);
                    std::thread::sleep(POLL);
                }
            })
            .map_err(|e| format!("cannot start the fake kernel: {e}"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes the request written to `file`, leaving it empty.
fn take(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let request = text.trim().to_owned();
    if request.is_empty() {
        return None;
    }
    let _ = std::fs::write(file, "");
    Some(request)
}

/// The driver `bdf` is bound to, if any.
fn bound(root: &Path, bdf: &str) -> Option<String> {
    let target = std::fs::read_link(root.join("bus/pci/devices").join(bdf).join("driver")).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

fn bind(root: &Path, bdf: &str, driver: &str) {
    let link = root.join("bus/pci/devices").join(bdf).join("driver");
    let _ = std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{driver}"), link);
}

fn act(root: &Path) {
    let bus = root.join("bus/pci");
    for driver in DRIVERS {
        let dir = bus.join("drivers").join(driver);
        if let Some(bdf) = take(&dir.join("unbind"))
            && bound(root, &bdf).as_deref() == Some(driver)
        {
            let _ = std::fs::remove_file(bus.join("devices").join(&bdf).join("driver"));
        }
        if let Some(bdf) = take(&dir.join("bind"))
            && bound(root, &bdf).is_none()
        {
            bind(root, &bdf, driver);
        }
    }
    if let Some(bdf) = take(&bus.join("drivers_probe"))
        && bound(root, &bdf).is_none()
    {
        let wanted =
            std::fs::read_to_string(bus.join("devices").join(&bdf).join("driver_override"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
        let driver = if wanted.is_empty() { "nvidia" } else { &wanted };
        if DRIVERS.contains(&driver) {
            bind(root, &bdf, driver);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use nvdra_gpu::vfio::{self, PciDriver};
    use std::time::Instant;

    #[test]
    fn the_agents_rebinding_runs_against_the_fake_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("sys");
        let proc = dir.path().join("proc");
        std::fs::create_dir_all(&proc).unwrap();
        let spec = PciGpuSpec {
            bdf: "0000:41:00.0".into(),
            device_id: 0x2330,
            numa_node: 1,
            pcie_root: "pci0000:40".into(),
            iommu_group: 7,
        };
        install(&sysfs, std::slice::from_ref(&spec)).unwrap();
        let gpus = vfio::nvidia_pci_gpus(&sysfs).unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].driver, PciDriver::Nvidia);
        assert_eq!(gpus[0].numa_node, Some(1));
        assert_eq!(vfio::iommu_group(&sysfs, &spec.bdf).unwrap(), 7);
        assert_eq!(
            nvdra_gpu::pcie::pcie_root(&sysfs, &spec.bdf).unwrap(),
            "pci0000:40"
        );

        let _kernel = FakeKernel::spawn(&sysfs).unwrap();
        let deadline = || Instant::now() + Duration::from_secs(5);
        vfio::bind_to_vfio(&sysfs, &proc, &spec.bdf, deadline()).unwrap();
        assert_eq!(
            vfio::current_driver(&sysfs, &spec.bdf).unwrap(),
            PciDriver::VfioPci
        );
        vfio::bind_to_nvidia(&sysfs, &proc, &spec.bdf, deadline()).unwrap();
        assert_eq!(
            vfio::current_driver(&sysfs, &spec.bdf).unwrap(),
            PciDriver::Nvidia
        );
    }
}

//! VFIO passthrough (PassthroughSupport) through the GPU driver, against a
//! mock node's PCI sysfs and its fake kernel (`nvdra_nvml_mock::pci`):
//! what is published, Prepare binding to vfio-pci and Unprepare binding
//! back, a GPU never used both ways, a busy GPU, and start-up repairs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "driver/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceClaim;
use nvdra_agent::devices::AllocatableDevice;
use nvdra_agent::driver::GpuDriver;
use nvdra_agent::driver::vfio::VfioHost;
use nvdra_api::{FeatureGate, FeatureGates};
use nvdra_gpu::vfio::{self, PciDriver};
use nvdra_gpu::{FakeBackend, GpuBackend};
use nvdra_kubelet_plugin::{ClaimError, DraDriver};
use nvdra_nvml_mock::pci::{self, FakeKernel};

use crate::fixtures::*;

/// A node: the fake GPUs, their PCI sysfs, a procfs and a fake kernel.
struct Node {
    fake: Arc<FakeBackend>,
    dir: tempfile::TempDir,
    _kernel: FakeKernel,
}

impl Node {
    fn new() -> Self {
        let fake = backend(H100);
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("sys");
        pci::install(&sysfs, &pci::specs_of(&fake.inventory().unwrap())).unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        let kernel = FakeKernel::spawn(&sysfs).unwrap();
        Self {
            fake,
            dir,
            _kernel: kernel,
        }
    }

    fn sysfs(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    fn host(&self) -> VfioHost {
        VfioHost {
            sysfs_root: self.sysfs(),
            proc_root: self.dir.path().join("proc"),
            dev_root: PathBuf::from("/"),
            budget: Duration::from_secs(2),
        }
    }

    fn start(&self, dirs: &Dirs) -> GpuDriver {
        let gates = FeatureGates::default().with(FeatureGate::PassthroughSupport, true);
        let (mut config, _registry) = config(dirs, H100, gates);
        config.backend = self.fake.clone();
        config.vfio = Some(self.host());
        GpuDriver::start(config).unwrap().0
    }

    fn driver_of(&self, bdf: &str) -> PciDriver {
        vfio::current_driver(&self.sysfs(), bdf).unwrap()
    }

    /// Makes process `pid` hold `/dev/nvidia<minor>` open, as the kernel
    /// shows it in procfs.
    fn hold(&self, pid: u32, minor: u32) {
        let fd = self.dir.path().join(format!("proc/{pid}/fd"));
        std::fs::create_dir_all(&fd).unwrap();
        std::os::unix::fs::symlink(format!("/dev/nvidia{minor}"), fd.join("3")).unwrap();
    }
}

/// The VFIO device of GPU `minor` and its PCI address.
fn vfio_device_of(driver: &GpuDriver, minor: u32) -> (String, String) {
    let bdf = driver.allocatable_devices()[&format!("gpu-{minor}")]
        .pci_bus_id()
        .to_owned();
    let name = driver
        .allocatable_devices()
        .iter()
        .find(|(_, d)| matches!(d, AllocatableDevice::Vfio(v) if v.pci.bdf == bdf))
        .map(|(n, _)| n.clone())
        .expect("a VFIO sibling");
    (name, bdf)
}

fn published(driver: &GpuDriver) -> Vec<String> {
    driver
        .node_resources()
        .devices
        .into_iter()
        .map(|d| d.name)
        .collect()
}

fn claim(n: u32, request: &str, device: &str) -> ResourceClaim {
    allocated_claim(&format!("c{n}"), &uid(n), &[(request, device, false)])
}

async fn prepare(driver: &GpuDriver, claim: ResourceClaim) -> Result<(), String> {
    let claim_uid = claim.metadata.uid.clone().unwrap();
    let mut got = driver
        .prepare_resource_claims(vec![to_prepare(claim)])
        .await;
    got.remove(&claim_uid)
        .unwrap()
        .map(|_| ())
        .map_err(|e: ClaimError| e.to_string())
}

#[test]
fn every_gpu_is_offered_for_passthrough_too() {
    let dirs = Dirs::new();
    let node = Node::new();
    let driver = node.start(&dirs);
    let names = published(&driver);
    assert_eq!(
        names.iter().filter(|n| n.starts_with("gpu-vfio-")).count(),
        8
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("gpu-") && !n.contains("vfio"))
            .count(),
        8
    );
    let (name, bdf) = vfio_device_of(&driver, 0);
    let device = driver
        .node_resources()
        .devices
        .into_iter()
        .find(|d| d.name == name)
        .unwrap();
    let attrs = device.attributes.unwrap();
    let string = |k: &str| attrs[k].string.clone().unwrap();
    assert_eq!(string("type"), "vfio");
    assert_eq!(string("vendorID"), "0x10de");
    assert_eq!(string("deviceID"), "0x2330");
    assert_eq!(string("resource.kubernetes.io/pciBusID"), bdf);
    assert_eq!(string("uuid"), vfio::vfio_uuid(&bdf));
    assert_eq!(attrs["iommuFDEnabled"].bool, Some(false));
    assert_eq!(attrs["numa"].int, Some(0));
    assert!(device.capacity.unwrap().contains_key("addressableMemory"));
}

#[tokio::test]
async fn passthrough_binds_to_vfio_hides_the_gpu_and_gives_it_back() {
    let dirs = Dirs::new();
    let node = Node::new();
    let driver = node.start(&dirs);
    let (name, bdf) = vfio_device_of(&driver, 0);

    let vm = claim(1, "vm", &name);
    let vm_ref = claim_ref(&vm);
    prepare(&driver, vm).await.unwrap();
    assert_eq!(node.driver_of(&bdf), PciDriver::VfioPci);
    // The container gets the IOMMU group's node and no driver files.
    let spec = dirs.read_spec(&uid(1));
    let group = vfio::iommu_group(&node.sysfs(), &bdf).unwrap();
    let edits = &spec.devices[0].container_edits;
    let nodes: Vec<&str> = edits.device_nodes.iter().map(|n| n.path.as_str()).collect();
    assert_eq!(nodes, [format!("/dev/vfio/{group}").as_str()]);
    assert_eq!(edits.env, ["NVIDIA_VISIBLE_DEVICES=void"]);
    assert!(
        spec.container_edits.is_empty(),
        "{:?}",
        spec.container_edits
    );
    // The GPU is not offered as a GPU while passed through ...
    assert!(!published(&driver).contains(&"gpu-0".to_owned()));
    // ... and a claim the scheduler gave it to before it saw that fails.
    let err = prepare(&driver, claim(2, "gpu", "gpu-0"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        format!(
            "device \"gpu-0\" is the same GPU as \"{name}\", which claim {} holds; a GPU is \
             used as a GPU or passed through, never both",
            uid(1)
        )
    );

    let got = driver.unprepare_resource_claims(vec![vm_ref]).await;
    assert!(got[&uid(1)].is_ok(), "{got:?}");
    assert_eq!(node.driver_of(&bdf), PciDriver::Nvidia);
    assert!(published(&driver).contains(&"gpu-0".to_owned()));
    prepare(&driver, claim(3, "gpu", "gpu-0")).await.unwrap();
    // Now the GPU is held as a GPU, so its VFIO sibling is hidden.
    assert!(!published(&driver).contains(&name));
}

#[tokio::test]
async fn a_gpu_a_host_process_holds_is_not_taken() {
    let dirs = Dirs::new();
    let node = Node::new();
    let driver = node.start(&dirs);
    let (name, bdf) = vfio_device_of(&driver, 2);
    node.hold(4242, 2);
    let err = prepare(&driver, claim(4, "vm", &name)).await.unwrap_err();
    assert!(
        err.contains(&format!(
            "GPU {bdf} is still in use by host processes [4242]"
        )),
        "{err}"
    );
    assert_eq!(node.driver_of(&bdf), PciDriver::Nvidia);
    assert!(published(&driver).contains(&"gpu-2".to_owned()));
}

#[tokio::test]
async fn start_up_gives_back_gpus_no_claim_holds() {
    let dirs = Dirs::new();
    let node = Node::new();
    let bdf = {
        let driver = node.start(&dirs);
        let (name, bdf) = vfio_device_of(&driver, 1);
        driver.set_fault_hook(Arc::new(|point| {
            if point == nvdra_agent::driver::FaultPoint::AfterSpecsWritten {
                panic!("injected crash");
            }
        }));
        assert!(prepare(&driver, claim(5, "vm", &name)).await.is_err());
        bdf
    };
    // The crash left the GPU on vfio-pci with the prepare unfinished.
    assert_eq!(node.driver_of(&bdf), PciDriver::VfioPci);
    let driver = node.start(&dirs);
    assert_eq!(node.driver_of(&bdf), PciDriver::Nvidia);
    assert!(published(&driver).contains(&"gpu-1".to_owned()));

    // A GPU bound out of band, with no claim at all, is given back too.
    let host = node.host();
    let (_, other) = vfio_device_of(&driver, 3);
    vfio::bind_to_vfio(
        &host.sysfs_root,
        &host.proc_root,
        &other,
        std::time::Instant::now() + Duration::from_secs(2),
    )
    .unwrap();
    drop(driver);
    let driver = node.start(&dirs);
    assert_eq!(node.driver_of(&other), PciDriver::Nvidia);
    assert!(published(&driver).contains(&"gpu-3".to_owned()));
}

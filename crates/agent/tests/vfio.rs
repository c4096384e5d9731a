//! VFIO passthrough (PassthroughSupport) through the GPU driver, against a
//! mock node's PCI sysfs and its fake kernel (`nvdra_nvml_mock::pci`):
//! what is published, Prepare binding to vfio-pci and Unprepare binding
//! back, a GPU never used both ways, a busy GPU, start-up repairs, and the
//! KEP-5304 device metadata that tells a VM launcher its GPU's PCI address.

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
        self.start_with(
            dirs,
            FeatureGates::default().with(FeatureGate::PassthroughSupport, true),
        )
    }

    fn start_with(&self, dirs: &Dirs, gates: FeatureGates) -> GpuDriver {
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

fn with_metadata() -> FeatureGates {
    FeatureGates::default()
        .with(FeatureGate::PassthroughSupport, true)
        .with(FeatureGate::DeviceMetadata, true)
}

/// The claim's metadata directory on the host.
fn metadata_dir(dirs: &Dirs, claim_uid: &str) -> PathBuf {
    dirs.data.join("metadata").join(claim_uid)
}

/// The first object of a metadata file (the newest API version).
fn first_object(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[tokio::test]
async fn device_metadata_tells_the_vm_its_pci_address_and_goes_with_the_claim() {
    let dirs = Dirs::new();
    let node = Node::new();
    let driver = node.start_with(&dirs, with_metadata());
    let (name, bdf) = vfio_device_of(&driver, 0);

    let vm = claim(1, "vm", &name);
    let vm_ref = claim_ref(&vm);
    prepare(&driver, vm).await.unwrap();
    let spec = dirs.read_spec(&uid(1));
    let mounts = &spec.devices[0].container_edits.mounts;
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(
        mounts[0].container_path,
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/c1/vm/gpu.nvidia.com-metadata.json"
    );
    assert_eq!(mounts[0].options, ["ro", "nosuid", "nodev", "bind"]);
    let object = first_object(&mounts[0].host_path);
    assert_eq!(object["apiVersion"], "metadata.resource.k8s.io/v1beta1");
    assert_eq!(object["metadata"]["uid"], uid(1));
    let device = &object["requests"][0]["devices"][0];
    assert_eq!(device["name"], name.as_str());
    assert_eq!(device["pool"], NODE);
    assert_eq!(device["attributes"]["type"]["string"], "vfio");
    assert_eq!(
        device["attributes"]["resource.kubernetes.io/pciBusID"]["string"],
        bdf.as_str()
    );

    // Two GPUs of a claim generated from a template: one file for the request, under the
    // pod's name for the claim, mounted with the request's first device only.
    let mut gpus = allocated_claim(
        "pod-gpus-x2",
        &uid(2),
        &[("gpus", "gpu-2", false), ("gpus", "gpu-3", false)],
    );
    gpus.metadata.annotations = Some(
        [(
            "resource.kubernetes.io/pod-claim-name".to_owned(),
            "training".to_owned(),
        )]
        .into(),
    );
    let gpus_ref = claim_ref(&gpus);
    prepare(&driver, gpus).await.unwrap();
    let spec = dirs.read_spec(&uid(2));
    let mounted: Vec<(&str, Vec<&str>)> = spec
        .devices
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.container_edits
                    .mounts
                    .iter()
                    .filter(|m| m.container_path.contains("dra-device-attributes"))
                    .map(|m| m.container_path.as_str())
                    .collect(),
            )
        })
        .collect();
    let path = "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/training/gpus/gpu.nvidia.com-metadata.json";
    assert_eq!(
        mounted,
        [
            (format!("{}-gpu-2", uid(2)).as_str(), vec![path]),
            (format!("{}-gpu-3", uid(2)).as_str(), vec![]),
        ]
    );
    let host = metadata_dir(&dirs, &uid(2)).join("gpus/gpu.nvidia.com-metadata.json");
    let object = first_object(host.to_str().unwrap());
    assert_eq!(object["podClaimName"], "training");
    let uuids: Vec<&str> = object["requests"][0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["attributes"]["uuid"]["string"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = ["gpu-2", "gpu-3"]
        .iter()
        .map(|n| driver.allocatable_devices()[*n].uuid())
        .collect();
    assert_eq!(uuids, expected);

    let got = driver
        .unprepare_resource_claims(vec![vm_ref, gpus_ref])
        .await;
    assert!(got.values().all(Result::is_ok), "{got:?}");
    assert!(!metadata_dir(&dirs, &uid(1)).exists());
    assert!(!metadata_dir(&dirs, &uid(2)).exists());
}

#[tokio::test]
async fn without_the_device_metadata_gate_no_metadata_is_written() {
    let dirs = Dirs::new();
    let node = Node::new();
    let driver = node.start(&dirs);
    let (name, _) = vfio_device_of(&driver, 0);
    prepare(&driver, claim(1, "vm", &name)).await.unwrap();
    let spec = dirs.read_spec(&uid(1));
    assert!(spec.devices[0].container_edits.mounts.is_empty());
    assert!(!dirs.data.join("metadata").exists());
}

#[tokio::test]
async fn start_up_removes_device_metadata_no_claim_holds() {
    let dirs = Dirs::new();
    let node = Node::new();
    {
        let driver = node.start_with(&dirs, with_metadata());
        prepare(&driver, claim(1, "gpu", "gpu-0")).await.unwrap();
        let (name, _) = vfio_device_of(&driver, 1);
        // A crash after the claim's metadata and spec are written, before it is recorded
        // completed.
        driver.set_fault_hook(Arc::new(|point| {
            if point == nvdra_agent::driver::FaultPoint::AfterSpecsWritten {
                panic!("injected crash");
            }
        }));
        assert!(prepare(&driver, claim(2, "vm", &name)).await.is_err());
        assert!(metadata_dir(&dirs, &uid(2)).exists());
    }
    // Left by a crashed agent, or by a claim whose entry is gone.
    let stray = metadata_dir(&dirs, &uid(9)).join("x");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("gpu.nvidia.com-metadata.json"), "{}").unwrap();

    let _driver = node.start_with(&dirs, with_metadata());
    assert!(
        metadata_dir(&dirs, &uid(1)).exists(),
        "a prepared claim keeps its file"
    );
    assert!(!metadata_dir(&dirs, &uid(2)).exists());
    assert!(!metadata_dir(&dirs, &uid(9)).exists());
}

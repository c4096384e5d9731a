//! The shipped fake profiles, exercised through the public API the agent
//! uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvdra_gpu::fake::BUILTIN_PROFILES;
use nvdra_gpu::{
    AddressingMode, Architecture, ComputeCapability, DeviceNode, Error, FabricInfo, FakeBackend,
    GpuBackend, GpuInfo, Inventory, MigCapabilities, MigCapacities, MigDeviceInfo, MigProfile,
};
use pretty_assertions::assert_eq;

fn profile_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("profiles")
        .join(format!("{name}.yaml"))
}

fn load(name: &str) -> Result<FakeBackend, Error> {
    FakeBackend::from_file(profile_path(name))
}

fn names(inv: &Inventory) -> Vec<String> {
    inv.gpus
        .iter()
        .map(|g| nvdra_gpu::gpu_device_name(g.info.minor))
        .collect()
}

fn mig_names(inv: &Inventory, index: usize) -> Vec<String> {
    inv.gpus[index]
        .mig_devices
        .iter()
        .map(MigDeviceInfo::device_name)
        .collect()
}

#[test]
fn every_profile_file_is_built_in_and_loads() {
    let mut files: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
    files.sort();
    let mut builtin: Vec<String> = BUILTIN_PROFILES
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    builtin.sort();
    assert_eq!(files, builtin);

    for name in builtin {
        let from_file = load(&name).unwrap().inventory().unwrap();
        let built_in = FakeBackend::builtin(&name)
            .unwrap()
            .unwrap()
            .inventory()
            .unwrap();
        assert_eq!(from_file, built_in, "{name}");
        assert!(!from_file.gpus.is_empty(), "{name}");
    }
    assert!(FakeBackend::builtin("nope").is_none());
}

#[test]
fn h100_sxm_80gb_x8() {
    let inv = load("h100-sxm-80gb-x8").unwrap().inventory().unwrap();
    assert_eq!(inv.driver.driver_version, "570.172.08");
    assert_eq!(inv.driver.cuda_driver_version.to_string(), "12.8");
    assert_eq!(
        names(&inv),
        (0..8).map(|i| format!("gpu-{i}")).collect::<Vec<_>>()
    );
    for g in &inv.gpus {
        let i = &g.info;
        assert_eq!(i.product_name, "NVIDIA H100 80GB HBM3");
        assert_eq!(i.brand, "Nvidia");
        assert_eq!(i.architecture, Architecture::Hopper);
        assert_eq!(
            i.cuda_compute_capability,
            ComputeCapability { major: 9, minor: 0 }
        );
        assert_eq!(i.memory_bytes, Some(81559 << 20));
        assert!(i.mig_capable && !i.mig_enabled);
        assert_eq!(i.addressing_mode, None);
        assert!(g.mig_devices.is_empty());
        assert_eq!(g.fabric, None);
        assert_eq!(
            g.mig_profiles
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            // NVML's order, as a real H100 lists them (docs/hardware-runs.md).
            [
                "1g.10gb",
                "2g.20gb",
                "3g.40gb",
                "4g.40gb",
                "7g.80gb",
                "1g.10gb+me",
                "1g.20gb"
            ]
        );
    }
    assert_eq!(inv.gpus[3].info.pci_bus_id, "0000:5d:00.0");
    assert_eq!(inv.gpus[3].info.pcie_root.as_deref(), Some("pci0000:59"));
}

#[test]
fn h200_x8_minors_differ_from_indices_and_fabric_has_no_clique() {
    let inv = load("h200-x8").unwrap().inventory().unwrap();
    assert_eq!(
        names(&inv),
        [
            "gpu-2", "gpu-3", "gpu-0", "gpu-1", "gpu-6", "gpu-7", "gpu-4", "gpu-5"
        ]
    );
    for g in &inv.gpus {
        assert_eq!(g.info.product_name, "NVIDIA H200");
        assert_eq!(g.info.memory_bytes, Some(143771 << 20));
        let fabric = g.fabric.unwrap();
        assert!(fabric.is_ready());
        assert_eq!(
            fabric.clique_id(),
            None,
            "zero cluster UUID means no clique"
        );
    }
    let table: &MigProfile = &inv.gpus[0].mig_profiles[2];
    assert_eq!((table.name.as_str(), table.gi_profile_id), ("3g.71gb", 9));
}

#[test]
fn gb200_x4_is_in_one_clique() {
    let backend = load("gb200-x4").unwrap();
    let inv = backend.inventory().unwrap();
    assert_eq!(inv.driver.driver_version, "580.82.07");
    assert_eq!(names(&inv), ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]);
    let mut cliques: Vec<Option<String>> = inv
        .gpus
        .iter()
        .map(|g| g.fabric.as_ref().and_then(FabricInfo::clique_id))
        .collect();
    cliques.dedup();
    assert_eq!(
        cliques,
        [Some("0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1".to_owned())]
    );
    for g in &inv.gpus {
        assert!(g.fabric.unwrap().is_ready());
        assert_eq!(g.info.product_name, "NVIDIA GB200");
        assert_eq!(g.info.architecture, Architecture::Blackwell);
        assert_eq!(g.info.cuda_compute_capability.to_string(), "10.0");
        assert_eq!(g.info.addressing_mode, Some(AddressingMode::Ats));
        assert!(!g.info.mig_enabled);
    }
    assert_eq!(
        inv.gpus
            .iter()
            .map(|g| (g.info.pci_bus_id.as_str(), g.info.pcie_root.as_deref()))
            .collect::<Vec<_>>(),
        [
            ("0008:01:00.0", Some("pci0008:00")),
            ("0009:01:00.0", Some("pci0009:00")),
            ("0018:01:00.0", Some("pci0018:00")),
            ("0019:01:00.0", Some("pci0019:00")),
        ]
    );
}

#[test]
fn a100_40gb_x8_mig() {
    let backend = load("a100-40gb-x8-mig").unwrap();
    let inv = backend.inventory().unwrap();
    let enabled: Vec<bool> = inv.gpus.iter().map(|g| g.info.mig_enabled).collect();
    assert_eq!(
        enabled,
        [false, false, false, false, true, true, true, true]
    );
    for i in 0..4 {
        assert!(inv.gpus[i].mig_devices.is_empty());
    }
    assert_eq!(
        mig_names(&inv, 4),
        [
            "gpu-4-mig-3g20gb-9-0",
            "gpu-4-mig-2g10gb-14-4",
            "gpu-4-mig-1g5gb-19-6"
        ]
    );
    assert_eq!(
        mig_names(&inv, 5),
        (0..7)
            .map(|s| format!("gpu-5-mig-1g5gb-19-{s}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        mig_names(&inv, 6),
        ["gpu-6-mig-3g20gb-9-0", "gpu-6-mig-3g20gb-9-4"]
    );
    assert_eq!(mig_names(&inv, 7), Vec::<String>::new());

    let two_g = &inv.gpus[4].mig_devices[1];
    assert_eq!(
        (
            two_g.profile.as_str(),
            two_g.gi_id,
            two_g.ci_id,
            two_g.memory_slices()
        ),
        ("2g.10gb", 5, 0, 4..6)
    );
    assert_eq!(
        two_g.capacities,
        MigCapacities {
            multiprocessors: 28,
            copy_engines: 2,
            decoders: 1,
            encoders: 0,
            jpeg_engines: 0,
            ofa_engines: 0,
            memory_bytes: 9856 << 20,
        }
    );
    assert_eq!(two_g.parent_uuid, inv.gpus[4].info.uuid);

    // Device nodes a container needs for that MIG device.
    assert_eq!(
        backend.mig_capabilities(two_g).unwrap(),
        MigCapabilities {
            gi_minor: 588,
            ci_minor: 589
        }
    );
    let nodes: Vec<PathBuf> = backend
        .mig_device_nodes(two_g)
        .unwrap()
        .into_iter()
        .map(|n| n.path)
        .collect();
    assert_eq!(
        nodes,
        [
            PathBuf::from("/dev/nvidia4"),
            "/dev/nvidia-caps/nvidia-cap588".into(),
            "/dev/nvidia-caps/nvidia-cap589".into(),
        ]
    );
}

#[test]
fn l4_x2_has_no_mig() {
    let inv = load("l4-x2").unwrap().inventory().unwrap();
    assert_eq!(names(&inv), ["gpu-0", "gpu-1"]);
    for g in &inv.gpus {
        assert_eq!(g.info.product_name, "NVIDIA L4");
        assert_eq!(g.info.architecture.to_string(), "Ada Lovelace");
        assert_eq!(g.info.cuda_compute_capability.to_string(), "8.9");
        assert!(!g.info.mig_capable && !g.info.mig_enabled);
        assert!(g.mig_profiles.is_empty() && g.mig_devices.is_empty());
        assert_eq!(g.fabric, None);
    }
}

/// A backend that answers per method and relies on the trait's default
/// `inventory`, to check that default against the fake's snapshot.
struct PerMethod(FakeBackend);

impl GpuBackend for PerMethod {
    fn driver(&self) -> Result<nvdra_gpu::DriverInfo, Error> {
        self.0.driver()
    }
    fn gpus(&self) -> Result<Vec<GpuInfo>, Error> {
        self.0.gpus()
    }
    fn mig_devices(&self, gpu: &GpuInfo) -> Result<Vec<MigDeviceInfo>, Error> {
        self.0.mig_devices(gpu)
    }
    fn mig_profiles(&self, gpu: &GpuInfo) -> Result<Vec<MigProfile>, Error> {
        self.0.mig_profiles(gpu)
    }
    fn fabric(&self, gpu: &GpuInfo) -> Result<Option<FabricInfo>, Error> {
        self.0.fabric(gpu)
    }
    fn mig_capabilities(&self, mig: &MigDeviceInfo) -> Result<MigCapabilities, Error> {
        self.0.mig_capabilities(mig)
    }
    fn imex(&self) -> Result<nvdra_gpu::ImexInfo, Error> {
        self.0.imex()
    }
    fn set_mig_mode(&self, gpu: &GpuInfo, enabled: bool) -> Result<(), Error> {
        self.0.set_mig_mode(gpu, enabled)
    }
    fn create_mig_device(
        &self,
        gpu: &GpuInfo,
        gi_profile_id: u32,
        placement_start: u32,
    ) -> Result<MigDeviceInfo, Error> {
        self.0
            .create_mig_device(gpu, gi_profile_id, placement_start)
    }
    fn destroy_mig_device(&self, mig: &MigDeviceInfo) -> Result<(), Error> {
        self.0.destroy_mig_device(mig)
    }
    fn compute_mode(&self, gpu: &GpuInfo) -> Result<nvdra_gpu::ComputeMode, Error> {
        self.0.compute_mode(gpu)
    }
    fn set_compute_mode(&self, gpu: &GpuInfo, mode: nvdra_gpu::ComputeMode) -> Result<(), Error> {
        self.0.set_compute_mode(gpu, mode)
    }
    fn set_time_slice(&self, gpu: &GpuInfo, slice: nvdra_gpu::TimeSlice) -> Result<(), Error> {
        self.0.set_time_slice(gpu, slice)
    }
    fn dev_root(&self) -> &Path {
        self.0.dev_root()
    }
}

#[test]
fn default_inventory_matches_snapshot() {
    for (name, _) in BUILTIN_PROFILES {
        let fake = load(name).unwrap();
        let snapshot = fake.inventory().unwrap();
        let backend: Arc<dyn GpuBackend> = Arc::new(PerMethod(fake));
        assert_eq!(backend.inventory().unwrap(), snapshot, "{name}");
    }
}

#[test]
fn unknown_gpu_and_dev_root() {
    let backend = load("l4-x2").unwrap().with_dev_root("/run/nvidia/driver");
    let mut stranger = backend.gpus().unwrap().remove(0);
    stranger.uuid = "GPU-00000000-0000-0000-0000-000000000000".into();
    let err = backend.mig_devices(&stranger).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no GPU with UUID GPU-00000000-0000-0000-0000-000000000000"
    );

    let gpu = &backend.gpus().unwrap()[1];
    assert_eq!(
        backend.gpu_device_nodes(gpu),
        [DeviceNode {
            path: "/dev/nvidia1".into(),
            host_path: "/run/nvidia/driver/dev/nvidia1".into(),
        }]
    );
    assert_eq!(
        backend.control_device_nodes()[0].host_path,
        PathBuf::from("/run/nvidia/driver/dev/nvidiactl")
    );
}

#[test]
fn load_errors_name_the_file() {
    let missing = profile_path("does-not-exist");
    let err = FakeBackend::from_file(&missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot read fake profile {}", missing.display())
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "driver: { version: \"570.172.08\", cuda_version: \"12.8\" }\nmodel: l4\ngpus:\n  - { index: 0, minor: 0, uuid: GPU-x, pci_bus_id: \"0000:00:03.0\" }\n",
    )
    .unwrap();
    let err = FakeBackend::from_file(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "invalid fake profile {}: gpus[0].uuid: \"GPU-x\" is not a GPU-<uuid>",
            bad.display()
        )
    );
}

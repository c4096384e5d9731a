//! The emulator against the real nvdra GPU driver on the fake h100 profile:
//! discover the registration socket, register, prepare an allocated claim,
//! resolve its CDI IDs in the CDI dir, unprepare, and see the spec removed.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationResult, DeviceClaim, DeviceRequest,
    DeviceRequestAllocationResult, ExactDeviceRequest, ResourceClaim, ResourceClaimSpec,
    ResourceClaimStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nvdra_agent::cdi::{CdiStore, CommonEdits, CommonOptions, DriverFiles, Hooks, RootMapping};
use nvdra_agent::driver::{GpuDriver, GpuDriverConfig};
use nvdra_agent::metrics::Metrics;
use nvdra_api::FeatureGates;
use nvdra_gpu::{FakeBackend, GpuBackend};
use nvdra_kubelet_emulator::ClaimRef;
use nvdra_kubelet_emulator::dra::DraClient;
use nvdra_kubelet_emulator::registry::{self, DraVersion, RegisteredPlugin};
use nvdra_kubelet_plugin::{InMemoryClaimReader, KubeletPlugin};
use pretty_assertions::assert_eq;

const DRIVER: &str = "gpu.nvidia.com";
const NODE: &str = "node-a";
const UID: &str = "0b5c1a2e-6f3d-4b9a-9d1e-000000000001";

fn driver(data: &Path, cdi: &Path) -> GpuDriver {
    let backend = Arc::new(FakeBackend::builtin("h100-sxm-80gb-x8").unwrap().unwrap());
    let driver_root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/gpu/profiles/driver-root")
        .canonicalize()
        .unwrap();
    let files = DriverFiles::discover(
        RootMapping::new(driver_root, "/run/nvidia/driver"),
        "570.172.08",
    )
    .unwrap();
    let common_edits = CommonEdits::new(
        &backend.control_device_nodes(),
        &files,
        &CommonOptions {
            hooks: Hooks::CdiHook {
                path: "/var/lib/kubelet/plugins/gpu.nvidia.com/nvidia-cdi-hook".into(),
            },
            env: vec![],
        },
    )
    .unwrap();
    let config = GpuDriverConfig {
        node_name: NODE.into(),
        common_edits,
        backend,
        plugin_data_dir: data.to_owned(),
        cdi: CdiStore::new(cdi),
        gates: FeatureGates::default(),
        boot_id: "3c7a1b5e-0f1d-4f44-9a51-6d1f2b0e9c11".into(),
        metrics: Metrics::new(&prometheus::Registry::new(), DRIVER, NODE).unwrap(),
        mps: None,
        vfio: None,
        health: None,
    };
    GpuDriver::start(config).unwrap().0
}

fn allocated_claim() -> ResourceClaim {
    ResourceClaim {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some("single".into()),
            uid: Some(UID.into()),
            resource_version: Some("4711".into()),
            ..Default::default()
        },
        spec: ResourceClaimSpec {
            devices: Some(DeviceClaim {
                requests: Some(vec![DeviceRequest {
                    name: "gpu".into(),
                    exactly: Some(ExactDeviceRequest {
                        device_class_name: "gpu.nvidia.com".into(),
                        allocation_mode: Some("ExactCount".into()),
                        count: Some(1),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        },
        status: Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(vec![DeviceRequestAllocationResult {
                        request: "gpu".into(),
                        driver: DRIVER.into(),
                        pool: NODE.into(),
                        device: "gpu-0".into(),
                        ..Default::default()
                    }]),
                    config: Some(vec![]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn wait_for_sockets(dir: &Path) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sockets = registry::scan(dir).unwrap();
        if !sockets.is_empty() {
            return sockets;
        }
        assert!(
            Instant::now() < deadline,
            "no registration socket within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_registers_prepares_resolves_and_unprepares_the_gpu_driver() {
    let root = tempfile::Builder::new()
        .prefix("ke")
        .tempdir_in("/tmp")
        .unwrap();
    let (registrar, data, cdi) = (
        root.path().join("reg"),
        root.path().join("data"),
        root.path().join("cdi"),
    );
    std::fs::create_dir(&registrar).unwrap();
    let reader = Arc::new(InMemoryClaimReader::new());
    reader.insert(allocated_claim());
    let plugin = KubeletPlugin::builder(DRIVER, Arc::new(driver(&data, &cdi)))
        .registrar_dir(&registrar)
        .plugin_data_dir(&data)
        .claim_reader(reader)
        .shutdown_grace(Duration::from_secs(5))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(plugin.run(async move {
        let _ = stopped.await;
    }));

    let sockets = wait_for_sockets(&registrar).await;
    assert_eq!(sockets, vec![registrar.join("gpu.nvidia.com-reg.sock")]);
    let plugin = registry::register(&sockets[0]).await.unwrap();
    assert_eq!(
        plugin,
        RegisteredPlugin {
            driver: DRIVER.into(),
            endpoint: data.join("dra.sock"),
            version: DraVersion::V1,
            health: false,
        }
    );

    let claims = [ClaimRef::new("ns", "single", UID)];
    let mut dra = DraClient::connect(&plugin).await.unwrap();
    let prepared = dra.prepare(&claims).await.unwrap();
    let want_id = format!("k8s.gpu.nvidia.com/claim={UID}-gpu-0");
    assert_eq!(
        prepared,
        [(UID.to_owned(), Ok(vec![want_id.clone()]))].into()
    );
    let spec = cdi.join(format!("k8s.gpu.nvidia.com-claim_{UID}.yaml"));
    assert_eq!(
        nvdra_kubelet_emulator::cdi::resolve(&cdi, std::slice::from_ref(&want_id)).unwrap(),
        [(want_id.clone(), spec.clone())].into()
    );

    assert_eq!(
        dra.unprepare(&claims).await.unwrap(),
        [(UID.to_owned(), Ok(()))].into()
    );
    assert!(!spec.exists(), "{} survived unprepare", spec.display());
    assert_eq!(
        nvdra_kubelet_emulator::cdi::resolve(&cdi, std::slice::from_ref(&want_id))
            .unwrap_err()
            .to_string(),
        format!(
            "CDI device IDs resolve to no device in {}: {want_id}",
            cdi.display()
        )
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

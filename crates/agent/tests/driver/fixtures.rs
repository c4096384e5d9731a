//! Shared fixtures of the driver, contract and crash tests: temp dirs on the normal
//! filesystem, a driver over a fake profile and the fake driver root, realistic
//! `resource.k8s.io/v1` ResourceClaims, and a metrics scraper.

// Each test binary uses a different subset; in test support a panic is the failure report.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationConfiguration, DeviceAllocationResult, DeviceClaim,
    DeviceRequest, DeviceRequestAllocationResult, ExactDeviceRequest, OpaqueDeviceConfiguration,
    ResourceClaim, ResourceClaimSpec, ResourceClaimStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use nvdra_agent::cdi::{
    CdiStore, CommonEdits, CommonOptions, DriverFiles, Hooks, RootMapping, Spec,
};
use nvdra_agent::driver::{GpuDriver, GpuDriverConfig, Startup};
use nvdra_agent::metrics::Metrics;
use nvdra_api::FeatureGates;
use nvdra_gpu::{FakeBackend, GpuBackend};
use nvdra_kubelet_plugin::{ClaimRef, PrepareClaim};
use prometheus::{Encoder as _, Registry, TextEncoder};

pub const DRIVER: &str = "gpu.nvidia.com";
pub const NODE: &str = "node-a";
pub const BOOT_ID: &str = "3c7a1b5e-0f1d-4f44-9a51-6d1f2b0e9c11";
pub const HOST_DRIVER_ROOT: &str = "/run/nvidia/driver";
pub const HOOK: &str = "/var/lib/kubelet/plugins/gpu.nvidia.com/nvidia-cdi-hook";
pub const H100: &str = "h100-sxm-80gb-x8";
pub const A100_MIG: &str = "a100-40gb-x8-mig";

/// A claim UID in the shape Kubernetes generates.
pub fn uid(n: u32) -> String {
    format!("0b5c1a2e-6f3d-4b9a-9d1e-{n:012x}")
}

/// Temp dirs under `/tmp` (ext4 here, not tmpfs; short enough for socket paths).
pub struct Dirs {
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub cdi: PathBuf,
    pub registrar: PathBuf,
}

impl Dirs {
    pub fn new() -> Self {
        Self::in_dir(Path::new("/tmp"))
    }

    pub fn in_dir(parent: &Path) -> Self {
        let root = tempfile::Builder::new()
            .prefix("nvd")
            .tempdir_in(parent)
            .unwrap();
        let data = root.path().join("data");
        let cdi = root.path().join("cdi");
        let registrar = root.path().join("reg");
        std::fs::create_dir(&registrar).unwrap();
        Self {
            root,
            data,
            cdi,
            registrar,
        }
    }

    pub fn spec_path(&self, claim_uid: &str) -> PathBuf {
        self.cdi
            .join(format!("k8s.gpu.nvidia.com-claim_{claim_uid}.yaml"))
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.data.join("checkpoint.json")
    }

    pub fn read_spec(&self, claim_uid: &str) -> Spec {
        serde_saphyr::from_str(&std::fs::read_to_string(self.spec_path(claim_uid)).unwrap())
            .unwrap()
    }

    /// Names of the files in the CDI root, sorted.
    pub fn cdi_files(&self) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(&self.cdi) {
            Ok(dir) => dir
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

pub fn fake_driver_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gpu/profiles/driver-root")
        .canonicalize()
        .unwrap()
}

pub fn backend(profile: &str) -> Arc<FakeBackend> {
    Arc::new(FakeBackend::builtin(profile).unwrap().unwrap())
}

pub fn common_edits(backend: &dyn GpuBackend) -> CommonEdits {
    let files = DriverFiles::discover(
        RootMapping::new(fake_driver_root(), HOST_DRIVER_ROOT),
        "570.172.08",
    )
    .unwrap();
    CommonEdits::new(
        &backend.control_device_nodes(),
        &files,
        &CommonOptions {
            hooks: Hooks::CdiHook { path: HOOK.into() },
            env: vec![],
        },
    )
    .unwrap()
}

/// A driver configuration over `dirs` with a fresh registry.
pub fn config(dirs: &Dirs, profile: &str, gates: FeatureGates) -> (GpuDriverConfig, Registry) {
    config_at(&dirs.data, &dirs.cdi, profile, gates)
}

/// A driver configuration for a plugin data dir and CDI root, with a fresh registry.
pub fn config_at(
    data: &Path,
    cdi: &Path,
    profile: &str,
    gates: FeatureGates,
) -> (GpuDriverConfig, Registry) {
    let registry = Registry::new();
    let backend = backend(profile);
    let config = GpuDriverConfig {
        node_name: NODE.into(),
        common_edits: common_edits(backend.as_ref()),
        backend,
        plugin_data_dir: data.to_owned(),
        cdi: CdiStore::new(cdi),
        gates,
        boot_id: BOOT_ID.into(),
        metrics: Metrics::new(&registry, DRIVER, NODE).unwrap(),
        mps: None,
        vfio: None,
        health: None,
    };
    (config, registry)
}

/// A started driver with default gates.
pub struct Started {
    pub driver: GpuDriver,
    pub startup: Startup,
    pub registry: Registry,
}

pub fn start(dirs: &Dirs, profile: &str) -> Started {
    start_with(dirs, profile, FeatureGates::default())
}

pub fn start_with(dirs: &Dirs, profile: &str, gates: FeatureGates) -> Started {
    let (config, registry) = config(dirs, profile, gates);
    let (driver, startup) = GpuDriver::start(config).unwrap();
    Started {
        driver,
        startup,
        registry,
    }
}

/// A started driver over `fake`, which the test shares: it sees every
/// change the driver makes to the node, and can change it first.
pub fn start_on(
    dirs: &Dirs,
    profile: &str,
    fake: &Arc<FakeBackend>,
    gates: FeatureGates,
) -> Started {
    let (mut config, registry) = config(dirs, profile, gates);
    config.backend = fake.clone();
    let (driver, startup) = GpuDriver::start(config).unwrap();
    Started {
        driver,
        startup,
        registry,
    }
}

/// One allocated device: (request, device, admin access).
pub type Alloc<'a> = (&'a str, &'a str, bool);

/// A ResourceClaim as the API server returns it after allocation: spec with one
/// `ExactCount` request per distinct request name, results for this node's pool.
pub fn allocated_claim(name: &str, claim_uid: &str, devices: &[Alloc<'_>]) -> ResourceClaim {
    allocated_claim_in_pool(name, claim_uid, NODE, devices, vec![])
}

pub fn allocated_claim_in_pool(
    name: &str,
    claim_uid: &str,
    pool: &str,
    devices: &[Alloc<'_>],
    config: Vec<DeviceAllocationConfiguration>,
) -> ResourceClaim {
    let mut requests: Vec<DeviceRequest> = Vec::new();
    for (request, _, admin) in devices {
        let base = request.split('/').next().unwrap();
        if let Some(existing) = requests.iter_mut().find(|r| r.name == base) {
            let exactly = existing.exactly.as_mut().unwrap();
            exactly.count = Some(exactly.count.unwrap_or(1) + 1);
            continue;
        }
        requests.push(DeviceRequest {
            name: base.to_owned(),
            exactly: Some(ExactDeviceRequest {
                device_class_name: if request.contains("mig") {
                    "mig.nvidia.com".into()
                } else {
                    "gpu.nvidia.com".into()
                },
                allocation_mode: Some("ExactCount".into()),
                count: Some(1),
                admin_access: admin.then_some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    ResourceClaim {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(claim_uid.into()),
            resource_version: Some("4711".into()),
            ..Default::default()
        },
        spec: ResourceClaimSpec {
            devices: Some(DeviceClaim {
                requests: Some(requests),
                ..Default::default()
            }),
        },
        status: Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(
                        devices
                            .iter()
                            .map(|(request, device, admin)| DeviceRequestAllocationResult {
                                request: (*request).into(),
                                driver: DRIVER.into(),
                                pool: pool.into(),
                                device: (*device).into(),
                                admin_access: admin.then_some(true),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    config: Some(config),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// An opaque config of this driver from the claim (`FromClaim`).
pub fn claim_config(
    requests: &[&str],
    parameters: serde_json::Value,
) -> DeviceAllocationConfiguration {
    DeviceAllocationConfiguration {
        source: "FromClaim".into(),
        requests: (!requests.is_empty())
            .then(|| requests.iter().map(|r| (*r).to_owned()).collect()),
        opaque: Some(OpaqueDeviceConfiguration {
            driver: DRIVER.into(),
            parameters: RawExtension(parameters),
        }),
    }
}

pub fn claim_ref(claim: &ResourceClaim) -> ClaimRef {
    ClaimRef::new(
        claim.metadata.namespace.clone().unwrap(),
        claim.metadata.name.clone().unwrap(),
        claim.metadata.uid.clone().unwrap(),
    )
}

/// What the kubelet-plugin library hands the driver for `claim`.
pub fn to_prepare(claim: ResourceClaim) -> PrepareClaim {
    let claim_ref = claim_ref(&claim);
    nvdra_kubelet_plugin::claims::select_for_driver(&claim_ref, claim, DRIVER).unwrap()
}

/// The exposition text of `registry`.
pub fn scrape(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// The sample lines of `text` whose metric name is exactly `name` (no `_bucket` etc.).
pub fn samples(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .map(str::to_owned)
        .collect()
}

/// The `_count` of a histogram series.
pub fn histogram_count(text: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}_count{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .parse()
        .unwrap()
}

/// A kubelet plugin serving a driver on Unix sockets in its own task.
pub struct RunningPlugin {
    pub dra_socket: PathBuf,
    pub registration_socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), nvdra_kubelet_plugin::Error>>,
}

impl RunningPlugin {
    /// Serves `driver` for `dirs` with claims read from `reader`; returns once both sockets
    /// accept connections.
    pub async fn start(
        dirs: &Dirs,
        driver: Arc<GpuDriver>,
        reader: Arc<nvdra_kubelet_plugin::InMemoryClaimReader>,
    ) -> Self {
        let plugin = nvdra_kubelet_plugin::KubeletPlugin::builder(DRIVER, driver)
            .registrar_dir(&dirs.registrar)
            .plugin_data_dir(&dirs.data)
            .claim_reader(reader)
            .shutdown_grace(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let dra_socket = plugin.dra_socket_path().to_owned();
        let registration_socket = plugin.registration_socket_path().to_owned();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(plugin.run(async move {
            let _ = stopped.await;
        }));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_socket(&registration_socket) {
            assert!(std::time::Instant::now() < deadline, "plugin did not start");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Self {
            dra_socket,
            registration_socket,
            stop: Some(stop),
            handle,
        }
    }

    pub async fn dra_v1(
        &self,
    ) -> nvdra_kubelet_plugin::proto::dra_v1::dra_plugin_client::DraPluginClient<
        tonic::transport::Channel,
    > {
        nvdra_kubelet_plugin::proto::dra_v1::dra_plugin_client::DraPluginClient::new(
            channel(&self.dra_socket).await,
        )
    }

    pub async fn dra_v1beta1(
        &self,
    ) -> nvdra_kubelet_plugin::proto::dra_v1beta1::dra_plugin_client::DraPluginClient<
        tonic::transport::Channel,
    > {
        nvdra_kubelet_plugin::proto::dra_v1beta1::dra_plugin_client::DraPluginClient::new(
            channel(&self.dra_socket).await,
        )
    }

    /// Requests shutdown and waits for the plugin to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), self.handle)
            .await
            .expect("plugin did not stop within 10 s")
            .expect("plugin task panicked")
            .expect("plugin failed");
    }
}

/// Connects to a Unix socket the way the kubelet does (h2c, no TLS).
pub async fn channel(path: &Path) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("unix:{}", path.display()))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(1))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect to {}: {err}", path.display()))
}

pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

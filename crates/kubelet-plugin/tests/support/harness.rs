//! Test harness: a kubelet played by tonic clients over temp-dir Unix
//! sockets, a recording test driver, ResourceClaim builders, and a raw HTTP
//! probe for the health endpoints.

// Each test binary uses a different subset of the harness; and in test
// support code a panic is the failure report, as in the tests themselves.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationConfiguration, DeviceAllocationResult,
    DeviceRequestAllocationResult, OpaqueDeviceConfiguration, ResourceClaim, ResourceClaimStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use nvdra_kubelet_plugin::proto::registration::registration_client::RegistrationClient;
use nvdra_kubelet_plugin::proto::{dra_v1, dra_v1beta1};
use nvdra_kubelet_plugin::{
    ClaimError, ClaimRef, DraDriver, Error, KubeletPlugin, KubeletPluginBuilder, PrepareClaim,
    PrepareResults, PreparedDevice, UnprepareResults,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub const DRIVER: &str = "gpu.example.com";
pub const OTHER_DRIVER: &str = "nic.example.com";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Short temp dirs under /tmp: socket paths must stay below 108 bytes.
pub struct Dirs {
    _root: tempfile::TempDir,
    pub registrar: PathBuf,
    pub data: PathBuf,
}

impl Dirs {
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("kp")
            .tempdir_in("/tmp")
            .unwrap();
        let registrar = root.path().join("reg");
        let data = root.path().join("data");
        std::fs::create_dir(&registrar).unwrap();
        Self {
            _root: root,
            registrar,
            data,
        }
    }
}

/// What the test driver saw in one prepare call, per claim:
/// (uid, [(request, device)], [(source, requests, parameters)]).
pub type SeenClaim = (
    String,
    Vec<(String, String)>,
    Vec<(String, Vec<String>, serde_json::Value)>,
);

/// A driver that records its calls and detects overlapping calls.
#[derive(Default)]
pub struct TestDriver {
    /// Shared between drivers of different plugin instances when needed.
    pub inside: Arc<AtomicBool>,
    pub overlaps: Arc<AtomicUsize>,
    pub calls: AtomicUsize,
    /// How long each call stays "inside".
    pub hold: Duration,
    /// UIDs the driver "forgets" to answer (a buggy driver).
    pub forget: Vec<String>,
    /// UIDs the driver fails.
    pub fail: Vec<String>,
    pub prepared: Mutex<Vec<Vec<SeenClaim>>>,
    pub unprepared: Mutex<Vec<Vec<ClaimRef>>>,
}

impl TestDriver {
    pub fn holding(hold: Duration) -> Self {
        Self {
            hold,
            ..Self::default()
        }
    }

    pub fn sharing_inside(other: &TestDriver, hold: Duration) -> Self {
        Self {
            inside: Arc::clone(&other.inside),
            overlaps: Arc::clone(&other.overlaps),
            hold,
            ..Self::default()
        }
    }

    async fn enter_and_hold(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(self.hold).await;
        self.inside.store(false, Ordering::SeqCst);
    }
}

impl DraDriver for TestDriver {
    async fn prepare_resource_claims(&self, claims: Vec<PrepareClaim>) -> PrepareResults {
        self.enter_and_hold().await;
        let seen = claims
            .iter()
            .map(|claim| {
                (
                    claim.claim_ref.uid.clone(),
                    claim
                        .results
                        .iter()
                        .map(|r| (r.request.clone(), r.device.clone()))
                        .collect(),
                    claim
                        .configs
                        .iter()
                        .map(|c| {
                            (
                                c.source.as_str().to_owned(),
                                c.requests.clone(),
                                c.parameters.clone(),
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        self.prepared.lock().unwrap().push(seen);
        claims
            .into_iter()
            .filter(|claim| !self.forget.contains(&claim.claim_ref.uid))
            .map(|claim| {
                let uid = claim.claim_ref.uid.clone();
                if self.fail.contains(&uid) {
                    return (uid, Err(ClaimError::driver("device is on fire")));
                }
                let devices = claim
                    .results
                    .iter()
                    .map(|r| PreparedDevice {
                        requests: vec![r.request.clone()],
                        pool_name: r.pool.clone(),
                        device_name: r.device.clone(),
                        cdi_device_ids: vec![format!("example.com/device={uid}-{}", r.device)],
                        share_id: r.share_id.clone(),
                    })
                    .collect();
                (uid, Ok(devices))
            })
            .collect()
    }

    async fn unprepare_resource_claims(&self, claims: Vec<ClaimRef>) -> UnprepareResults {
        self.enter_and_hold().await;
        self.unprepared.lock().unwrap().push(claims.clone());
        claims
            .into_iter()
            .filter(|claim| !self.forget.contains(&claim.uid))
            .map(|claim| {
                let outcome = if self.fail.contains(&claim.uid) {
                    Err(ClaimError::driver("device is busy"))
                } else {
                    Ok(())
                };
                (claim.uid, outcome)
            })
            .collect()
    }
}

pub fn builder(dirs: &Dirs, driver: Arc<TestDriver>) -> KubeletPluginBuilder<TestDriver> {
    KubeletPlugin::builder(DRIVER, driver)
        .registrar_dir(&dirs.registrar)
        .plugin_data_dir(&dirs.data)
        .shutdown_grace(Duration::from_secs(5))
}

/// A plugin running on its own task.
pub struct Running {
    pub dra_socket: PathBuf,
    pub registration_socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Starts `plugin` and waits until its registration socket exists.
    pub async fn start(plugin: KubeletPlugin<TestDriver>) -> Self {
        let running = Self::spawn(plugin);
        wait_for_socket(&running.registration_socket).await;
        running
    }

    /// Starts `plugin` without waiting.
    pub fn spawn(plugin: KubeletPlugin<TestDriver>) -> Self {
        let dra_socket = plugin.dra_socket_path().to_owned();
        let registration_socket = plugin.registration_socket_path().to_owned();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(plugin.run(async move {
            let _ = rx.await;
        }));
        Self {
            dra_socket,
            registration_socket,
            stop: Some(tx),
            handle,
        }
    }

    /// Requests shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("plugin did not stop within 10 s")
            .expect("plugin task panicked")
    }

    /// Waits for `run` to return on its own.
    pub async fn finished(self) -> Result<(), Error> {
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("plugin did not stop within 10 s")
            .expect("plugin task panicked")
    }

    pub async fn registration(&self) -> RegistrationClient<Channel> {
        RegistrationClient::new(channel(&self.registration_socket).await)
    }

    pub async fn dra_v1(&self) -> dra_v1::dra_plugin_client::DraPluginClient<Channel> {
        dra_v1::dra_plugin_client::DraPluginClient::new(channel(&self.dra_socket).await)
    }

    pub async fn dra_v1beta1(&self) -> dra_v1beta1::dra_plugin_client::DraPluginClient<Channel> {
        dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel(&self.dra_socket).await)
    }
}

/// Connects to a Unix socket the way the kubelet does (h2c, no TLS).
pub async fn channel(path: &Path) -> Channel {
    Endpoint::from_shared(format!("unix:{}", path.display()))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect to {}: {err}", path.display()))
}

/// Waits until `path` is a socket (a stale regular file does not count).
pub async fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_socket(path) {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within 10 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn result(
    request: &str,
    driver: &str,
    device: &str,
    share_id: Option<&str>,
) -> DeviceRequestAllocationResult {
    DeviceRequestAllocationResult {
        request: request.into(),
        driver: driver.into(),
        pool: "node-a".into(),
        device: device.into(),
        share_id: share_id.map(str::to_owned),
        ..Default::default()
    }
}

pub fn config(
    source: &str,
    driver: &str,
    requests: &[&str],
    tag: &str,
) -> DeviceAllocationConfiguration {
    DeviceAllocationConfiguration {
        source: source.into(),
        requests: (!requests.is_empty())
            .then(|| requests.iter().map(|r| (*r).to_owned()).collect()),
        opaque: Some(OpaqueDeviceConfiguration {
            driver: driver.into(),
            parameters: RawExtension(serde_json::json!({ "tag": tag })),
        }),
    }
}

/// A ResourceClaim; `results: None` means "not allocated".
pub fn claim(
    namespace: &str,
    name: &str,
    uid: &str,
    results: Option<Vec<DeviceRequestAllocationResult>>,
    config: Vec<DeviceAllocationConfiguration>,
) -> ResourceClaim {
    ResourceClaim {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        status: results.map(|results| ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(results),
                    config: Some(config),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A simply allocated claim with one device of this driver.
pub fn simple_claim(name: &str, uid: &str) -> ResourceClaim {
    claim(
        "ns",
        name,
        uid,
        Some(vec![result("gpu", DRIVER, &format!("dev-{name}"), None)]),
        vec![],
    )
}

pub fn v1_claim(namespace: &str, name: &str, uid: &str) -> dra_v1::Claim {
    dra_v1::Claim {
        namespace: namespace.into(),
        uid: uid.into(),
        name: name.into(),
    }
}

pub fn v1beta1_claim(namespace: &str, name: &str, uid: &str) -> dra_v1beta1::Claim {
    dra_v1beta1::Claim {
        namespace: namespace.into(),
        uid: uid.into(),
        name: name.into(),
    }
}

/// A bound health listener on a free local port.
pub fn health_listener() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// `GET path` over plain HTTP/1.1: (status, body), or None if refused.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Prepare-response entries as (uid, error) pairs for compact assertions.
pub fn errors_v1(response: &dra_v1::NodePrepareResourcesResponse) -> BTreeMap<String, String> {
    response
        .claims
        .iter()
        .map(|(uid, r)| (uid.clone(), r.error.clone()))
        .collect()
}

//! Contract tests: a tonic client plays the kubelet against real plugin
//! servers on temp-dir Unix sockets.

// Helpers outside #[test] functions panic on purpose: that is how they
// report a failed expectation.
#![allow(clippy::unwrap_used)]

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::*;
use nvdra_kubelet_plugin::proto::registration::{InfoRequest, PluginInfo, RegistrationStatus};
use nvdra_kubelet_plugin::proto::{dra_v1, dra_v1beta1};
use nvdra_kubelet_plugin::{BoxError, InMemoryClaimReader, RegistrationState};
use pretty_assertions::assert_eq;
use serde_json::json;

fn info_request() -> tonic::Request<InfoRequest> {
    tonic::Request::new(InfoRequest {})
}

#[tokio::test]
async fn get_info_reports_exact_fields() {
    init_tracing();
    let dirs = Dirs::new();
    let plugin = builder(&dirs, Arc::new(TestDriver::default()))
        .claim_reader(InMemoryClaimReader::new())
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    assert_eq!(running.dra_socket, dirs.data.join("dra.sock"));
    assert_eq!(
        running.registration_socket,
        dirs.registrar.join("gpu.example.com-reg.sock")
    );

    let info = running
        .registration()
        .await
        .get_info(info_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info,
        PluginInfo {
            r#type: "DRAPlugin".into(),
            name: DRIVER.into(),
            endpoint: dirs.data.join("dra.sock").to_str().unwrap().into(),
            supported_versions: vec!["v1.DRAPlugin".into(), "v1beta1.DRAPlugin".into()],
        }
    );
    running.stop().await.unwrap();
}

/// The resource-health stream: advertised at registration only when the
/// driver offers it, served on the DRA socket, the whole list at once and
/// again after each change, ending when the driver drops its feed.
#[tokio::test]
async fn resource_health_stream_serves_the_drivers_feed() {
    use nvdra_kubelet_plugin::proto::health_v1alpha1::{
        HealthStatus, NodeWatchResourcesRequest,
        dra_resource_health_client::DraResourceHealthClient,
    };
    use nvdra_kubelet_plugin::resource_health::{DeviceHealth, Health};
    init_tracing();
    let dirs = Dirs::new();
    let device = |name: &str, health: Health| DeviceHealth {
        pool: "node-a".into(),
        device: name.into(),
        health,
        message: String::new(),
        last_updated: 1,
    };
    let (feed, rx) = tokio::sync::watch::channel(vec![
        device("gpu-0", Health::Healthy),
        device("gpu-1", Health::Healthy),
    ]);
    let plugin = builder(&dirs, Arc::new(TestDriver::default()))
        .claim_reader(InMemoryClaimReader::new())
        .device_health(rx)
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    let info = running
        .registration()
        .await
        .get_info(info_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth"
        ]
    );

    let mut client = DraResourceHealthClient::new(channel(&running.dra_socket).await);
    let mut stream = client
        .node_watch_resources(NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let statuses = |r: nvdra_kubelet_plugin::proto::health_v1alpha1::NodeWatchResourcesResponse| {
        r.devices
            .into_iter()
            .map(|d| (d.device.unwrap().device_name, d.health))
            .collect::<Vec<_>>()
    };
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        statuses(first),
        [
            ("gpu-0".to_owned(), HealthStatus::Healthy as i32),
            ("gpu-1".to_owned(), HealthStatus::Healthy as i32)
        ]
    );
    feed.send_replace(vec![
        device("gpu-0", Health::Healthy),
        device("gpu-1", Health::Unhealthy),
    ]);
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(statuses(second)[1].1, HealthStatus::Unhealthy as i32);
    drop(feed);
    assert!(
        stream.message().await.unwrap().is_none(),
        "the stream ends with the feed"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn registration_status_drives_readiness() {
    init_tracing();
    let dirs = Dirs::new();
    let (listener, addr) = health_listener();
    let plugin = builder(&dirs, Arc::new(TestDriver::default()))
        .claim_reader(InMemoryClaimReader::new())
        .health_listener(listener)
        .build()
        .unwrap();
    let status = plugin.registration_status();
    let running = Running::start(plugin).await;
    let mut registration = running.registration().await;

    assert_eq!(http_get(addr, "/livez").await, Some((200, "ok\n".into())));
    assert_eq!(
        http_get(addr, "/readyz").await,
        Some((
            503,
            "registration: waiting for the kubelet to confirm registration\n".into()
        ))
    );

    let err = registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "plugin version not supported".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "failed registration process: plugin version not supported"
    );
    assert_eq!(
        *status.borrow(),
        RegistrationState::Failed {
            error: "plugin version not supported".into()
        }
    );
    assert_eq!(
        http_get(addr, "/readyz").await,
        Some((
            503,
            "registration: kubelet rejected registration: plugin version not supported\n".into()
        ))
    );

    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(*status.borrow(), RegistrationState::Registered);
    assert_eq!(http_get(addr, "/readyz").await, Some((200, "ok\n".into())));

    running.stop().await.unwrap();
    assert_eq!(
        http_get(addr, "/livez").await,
        None,
        "health server still up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_socket_serves_before_registration_socket_exists() {
    init_tracing();
    for _ in 0..5 {
        let dirs = Dirs::new();
        let plugin = builder(&dirs, Arc::new(TestDriver::default()))
            .claim_reader(InMemoryClaimReader::new())
            .build()
            .unwrap();
        let dra = plugin.dra_socket_path().to_owned();
        let reg = plugin.registration_socket_path().to_owned();
        // A dedicated thread spins on the registration path from before
        // start-up, so it sees the socket within microseconds of its bind;
        // at that moment the DRA socket must already exist.
        let watcher = {
            let (dra, reg) = (dra.clone(), reg.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !is_socket(&reg) {
                    assert!(
                        Instant::now() < deadline,
                        "registration socket never appeared"
                    );
                    std::hint::spin_loop();
                }
                is_socket(&dra)
            })
        };
        let running = Running::spawn(plugin);
        let dra_first = tokio::task::spawn_blocking(move || watcher.join().unwrap())
            .await
            .unwrap();
        assert!(
            dra_first,
            "registration socket existed before the DRA socket"
        );
        // And the endpoint the kubelet learns answers right away.
        let response = dra_v1::dra_plugin_client::DraPluginClient::new(channel(&dra).await)
            .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims: vec![] })
            .await
            .unwrap()
            .into_inner();
        assert!(response.claims.is_empty());
        running.stop().await.unwrap();
    }
}

#[tokio::test]
async fn sockets_are_private_replace_stale_files_and_vanish_on_shutdown() {
    init_tracing();
    let dirs = Dirs::new();
    std::fs::create_dir_all(&dirs.data).unwrap();
    let plugin = builder(&dirs, Arc::new(TestDriver::default()))
        .claim_reader(InMemoryClaimReader::new())
        .build()
        .unwrap();
    let dra = plugin.dra_socket_path().to_owned();
    let reg = plugin.registration_socket_path().to_owned();
    std::fs::write(&dra, b"stale").unwrap();
    std::fs::write(&reg, b"stale").unwrap();

    let running = Running::start(plugin).await;
    for path in [&dra, &reg] {
        assert!(is_socket(path), "{} is not a socket", path.display());
        assert_eq!(mode(path), 0o600, "{}", path.display());
    }
    running
        .registration()
        .await
        .get_info(info_request())
        .await
        .unwrap();

    running.stop().await.unwrap();
    assert!(!dra.exists(), "DRA socket left behind");
    assert!(!reg.exists(), "registration socket left behind");
}

/// The claims of the mixed Prepare call and the reader that knows them.
fn mixed_claims() -> InMemoryClaimReader {
    let reader = InMemoryClaimReader::new();
    reader.insert(claim(
        "ns",
        "good",
        "uid-good",
        Some(vec![
            result("gpus/large", DRIVER, "gpu-0", Some("share-a")),
            result("nic", OTHER_DRIVER, "nic-0", None),
            result("gpus/large", DRIVER, "gpu-1", None),
            result("single", DRIVER, "gpu-2", None),
        ]),
        vec![
            config("FromClaim", DRIVER, &["gpus"], "claim-1"),
            config("FromClass", OTHER_DRIVER, &[], "other-class"),
            config("FromClass", DRIVER, &[], "class-1"),
            config("FromClaim", DRIVER, &[], "claim-2"),
            config("FromClass", DRIVER, &["single"], "class-2"),
        ],
    ));
    reader.insert(simple_claim("replaced", "uid-new"));
    reader.insert(claim("ns", "pending", "uid-pending", None, vec![]));
    reader.insert(simple_claim("forgotten", "uid-forgotten"));
    reader.insert(simple_claim("failing", "uid-failing"));
    reader
}

fn mixed_driver() -> Arc<TestDriver> {
    Arc::new(TestDriver {
        forget: vec!["uid-forgotten".into()],
        fail: vec!["uid-failing".into()],
        ..TestDriver::default()
    })
}

/// (namespace, name, uid) of the mixed call, in request order.
const MIXED: [(&str, &str, &str); 6] = [
    ("ns", "good", "uid-good"),
    ("ns", "replaced", "uid-old"),
    ("ns", "missing", "uid-missing"),
    ("ns", "pending", "uid-pending"),
    ("ns", "forgotten", "uid-forgotten"),
    ("ns", "failing", "uid-failing"),
];

fn expected_errors() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("uid-good".into(), String::new()),
        (
            "uid-old".into(),
            "claim ns/replaced was replaced: UID uid-new, expected uid-old".into(),
        ),
        (
            "uid-missing".into(),
            "claim ns/missing (uid uid-missing) not found".into(),
        ),
        (
            "uid-pending".into(),
            "claim ns/pending (uid uid-pending) is not allocated".into(),
        ),
        (
            "uid-forgotten".into(),
            "driver returned no result for claim ns/forgotten (uid uid-forgotten)".into(),
        ),
        ("uid-failing".into(), "device is on fire".into()),
    ])
}

/// What the driver must have been given: only checked claims, only its own
/// results, configs class before claim.
fn assert_driver_saw_checked_claims(driver: &TestDriver) {
    let prepared = driver.prepared.lock().unwrap();
    assert_eq!(prepared.len(), 1, "driver called {} times", prepared.len());
    let seen = &prepared[0];
    let uids: Vec<_> = seen.iter().map(|(uid, _, _)| uid.as_str()).collect();
    assert_eq!(uids, ["uid-good", "uid-forgotten", "uid-failing"]);
    let (_, results, configs) = &seen[0];
    assert_eq!(
        results,
        &vec![
            ("gpus/large".to_owned(), "gpu-0".to_owned()),
            ("gpus/large".to_owned(), "gpu-1".to_owned()),
            ("single".to_owned(), "gpu-2".to_owned()),
        ]
    );
    assert_eq!(
        configs,
        &vec![
            ("FromClass".to_owned(), vec![], json!({"tag": "class-1"})),
            (
                "FromClass".to_owned(),
                vec!["single".to_owned()],
                json!({"tag": "class-2"})
            ),
            (
                "FromClaim".to_owned(),
                vec!["gpus".to_owned()],
                json!({"tag": "claim-1"})
            ),
            ("FromClaim".to_owned(), vec![], json!({"tag": "claim-2"})),
        ]
    );
}

#[tokio::test]
async fn prepare_v1_reports_every_claim() {
    init_tracing();
    let dirs = Dirs::new();
    let driver = mixed_driver();
    let plugin = builder(&dirs, Arc::clone(&driver))
        .claim_reader(mixed_claims())
        .build()
        .unwrap();
    let running = Running::start(plugin).await;

    let response = running
        .dra_v1()
        .await
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: MIXED.iter().map(|(ns, n, u)| v1_claim(ns, n, u)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(errors_v1(&response), expected_errors());
    let device = |name: &str, requests: &str, share_id: Option<&str>| dra_v1::Device {
        request_names: vec![requests.to_owned()],
        pool_name: "node-a".into(),
        device_name: name.into(),
        cdi_device_ids: vec![format!("example.com/device=uid-good-{name}")],
        share_id: share_id.map(str::to_owned),
    };
    assert_eq!(
        response.claims["uid-good"].devices,
        vec![
            device("gpu-0", "gpus", Some("share-a")),
            device("gpu-1", "gpus", None),
            device("gpu-2", "single", None),
        ]
    );
    for (uid, entry) in &response.claims {
        if uid != "uid-good" {
            assert!(
                entry.devices.is_empty(),
                "{uid} has devices despite an error"
            );
        }
    }
    assert_driver_saw_checked_claims(&driver);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn prepare_v1beta1_reports_every_claim() {
    init_tracing();
    let dirs = Dirs::new();
    let driver = mixed_driver();
    let plugin = builder(&dirs, Arc::clone(&driver))
        .claim_reader(mixed_claims())
        .build()
        .unwrap();
    let running = Running::start(plugin).await;

    let response = running
        .dra_v1beta1()
        .await
        .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
            claims: MIXED
                .iter()
                .map(|(ns, n, u)| v1beta1_claim(ns, n, u))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let errors: BTreeMap<_, _> = response
        .claims
        .iter()
        .map(|(uid, r)| (uid.clone(), r.error.clone()))
        .collect();
    assert_eq!(errors, expected_errors());
    let device = |name: &str, requests: &str| dra_v1beta1::Device {
        request_names: vec![requests.to_owned()],
        pool_name: "node-a".into(),
        device_name: name.into(),
        cdi_device_ids: vec![format!("example.com/device=uid-good-{name}")],
    };
    assert_eq!(
        response.claims["uid-good"].devices,
        vec![
            device("gpu-0", "gpus"),
            device("gpu-1", "gpus"),
            device("gpu-2", "single")
        ]
    );
    assert_driver_saw_checked_claims(&driver);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn unprepare_in_both_versions_reports_every_claim() {
    init_tracing();
    let dirs = Dirs::new();
    let driver = mixed_driver();
    let plugin = builder(&dirs, Arc::clone(&driver))
        // Unprepare must not read claims: they may be gone already.
        .claim_reader(InMemoryClaimReader::new())
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    let claims = [
        ("ns", "gone", "uid-gone"),
        ("ns", "forgotten", "uid-forgotten"),
        ("ns", "failing", "uid-failing"),
        ("", "broken", "uid-broken"),
    ];
    let want = BTreeMap::from([
        ("uid-gone".to_owned(), String::new()),
        (
            "uid-forgotten".to_owned(),
            "driver returned no result for claim ns/forgotten (uid uid-forgotten)".to_owned(),
        ),
        ("uid-failing".to_owned(), "device is busy".to_owned()),
        (
            "uid-broken".to_owned(),
            "invalid claim reference /broken (uid uid-broken): namespace, name and uid are required"
                .to_owned(),
        ),
    ]);

    let v1 = running
        .dra_v1()
        .await
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: claims.iter().map(|(ns, n, u)| v1_claim(ns, n, u)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let got: BTreeMap<_, _> = v1.claims.into_iter().map(|(k, v)| (k, v.error)).collect();
    assert_eq!(got, want);

    let v1beta1 = running
        .dra_v1beta1()
        .await
        .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
            claims: claims
                .iter()
                .map(|(ns, n, u)| v1beta1_claim(ns, n, u))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let got: BTreeMap<_, _> = v1beta1
        .claims
        .into_iter()
        .map(|(k, v)| (k, v.error))
        .collect();
    assert_eq!(got, want);

    let uids: Vec<Vec<String>> = driver
        .unprepared
        .lock()
        .unwrap()
        .iter()
        .map(|call| call.iter().map(|c| c.uid.clone()).collect())
        .collect();
    assert_eq!(
        uids,
        vec![
            vec!["uid-gone", "uid-forgotten", "uid-failing"],
            vec!["uid-gone", "uid-forgotten", "uid-failing"]
        ]
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn get_info_answers_while_prepare_holds_the_lock() {
    init_tracing();
    let dirs = Dirs::new();
    let reader = InMemoryClaimReader::new();
    reader.insert(simple_claim("slow", "uid-slow"));
    let driver = Arc::new(TestDriver::holding(Duration::from_secs(2)));
    let plugin = builder(&dirs, Arc::clone(&driver))
        .claim_reader(reader)
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    let mut dra = running.dra_v1().await;
    let prepare = tokio::spawn(async move {
        dra.node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![v1_claim("ns", "slow", "uid-slow")],
        })
        .await
    });
    while driver.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let mut registration = running.registration().await;
    registration.get_info(info_request()).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "GetInfo took {:?} while Prepare ran",
        started.elapsed()
    );
    assert!(!prepare.is_finished(), "prepare was not actually in flight");
    prepare.await.unwrap().unwrap();
    running.stop().await.unwrap();
}

/// Fires `per_instance` concurrent single-claim prepares at each socket.
async fn concurrent_prepares(instances: &[&Running], per_instance: usize) {
    let mut calls = Vec::new();
    for (i, running) in instances.iter().enumerate() {
        for j in 0..per_instance {
            let mut client = running.dra_v1().await;
            let name = format!("c{i}{j}");
            calls.push(tokio::spawn(async move {
                let response = client
                    .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
                        claims: vec![v1_claim("ns", &name, &format!("uid-{name}"))],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(response.claims[&format!("uid-{name}")].error, "");
            }));
        }
    }
    for call in calls {
        call.await.unwrap();
    }
}

fn reader_for(instances: usize, per_instance: usize) -> Arc<InMemoryClaimReader> {
    let reader = Arc::new(InMemoryClaimReader::new());
    for i in 0..instances {
        for j in 0..per_instance {
            let name = format!("c{i}{j}");
            reader.insert(simple_claim(&name, &format!("uid-{name}")));
        }
    }
    reader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_serializes_driver_calls() {
    init_tracing();
    let dirs = Dirs::new();
    let driver = Arc::new(TestDriver::holding(Duration::from_millis(50)));
    let plugin = builder(&dirs, Arc::clone(&driver))
        .claim_reader(reader_for(1, 4))
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    concurrent_prepares(&[&running], 4).await;
    assert_eq!(driver.calls.load(Ordering::SeqCst), 4);
    assert_eq!(driver.overlaps.load(Ordering::SeqCst), 0);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_detector_works_without_serialization() {
    // Control for the serialization tests: with serialization off the same
    // load does overlap, so a zero there means something.
    init_tracing();
    let dirs = Dirs::new();
    let driver = Arc::new(TestDriver::holding(Duration::from_millis(200)));
    let plugin = builder(&dirs, Arc::clone(&driver))
        .claim_reader(reader_for(1, 4))
        .serialize(false)
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    concurrent_prepares(&[&running], 4).await;
    assert!(driver.overlaps.load(Ordering::SeqCst) > 0);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_update_instances_coexist_and_serialize_across_instances() {
    init_tracing();
    let dirs = Dirs::new();
    let reader = reader_for(2, 3);
    let driver_a = Arc::new(TestDriver::holding(Duration::from_millis(50)));
    let driver_b = Arc::new(TestDriver::sharing_inside(
        &driver_a,
        Duration::from_millis(50),
    ));
    let plugin_a = builder(&dirs, Arc::clone(&driver_a))
        .rolling_update("pod-a")
        .claim_reader(Arc::clone(&reader))
        .build()
        .unwrap();
    let plugin_b = builder(&dirs, Arc::clone(&driver_b))
        .rolling_update("pod-b")
        .claim_reader(reader)
        .build()
        .unwrap();
    let a = Running::start(plugin_a).await;
    let b = Running::start(plugin_b).await;

    assert_eq!(a.dra_socket, dirs.data.join("dra-pod-a.sock"));
    assert_eq!(b.dra_socket, dirs.data.join("dra-pod-b.sock"));
    assert_eq!(
        a.registration_socket,
        dirs.registrar.join("gpu.example.com-pod-a-reg.sock")
    );
    assert_eq!(
        b.registration_socket,
        dirs.registrar.join("gpu.example.com-pod-b-reg.sock")
    );
    for running in [&a, &b] {
        let info = running
            .registration()
            .await
            .get_info(info_request())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.endpoint, running.dra_socket.to_str().unwrap());
    }

    concurrent_prepares(&[&a, &b], 3).await;
    assert_eq!(driver_a.calls.load(Ordering::SeqCst), 3);
    assert_eq!(driver_b.calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        driver_a.overlaps.load(Ordering::SeqCst),
        0,
        "driver calls of two instances overlapped"
    );
    assert!(dirs.data.join("serialize.lock").exists());

    let (a_dra, a_reg) = (a.dra_socket.clone(), a.registration_socket.clone());
    a.stop().await.unwrap();
    assert!(
        !a_dra.exists() && !a_reg.exists(),
        "stopped instance left sockets"
    );
    assert!(is_socket(&b.dra_socket) && is_socket(&b.registration_socket));
    b.registration()
        .await
        .get_info(info_request())
        .await
        .unwrap();
    concurrent_prepares(&[&b], 1).await;
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_critical_task_ends_run_and_cleans_up() {
    init_tracing();
    let dirs = Dirs::new();
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
    let plugin = builder(&dirs, Arc::new(TestDriver::default()))
        .claim_reader(InMemoryClaimReader::new())
        .critical_task("resourceslices", async move {
            let _ = fail_rx.await;
            Err(BoxError::from("api server went away"))
        })
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    let (dra, reg) = (
        running.dra_socket.clone(),
        running.registration_socket.clone(),
    );
    fail_tx.send(()).unwrap();
    let err = running.finished().await.unwrap_err();
    assert_eq!(
        nvdra_kubelet_plugin::error::error_chain(&err),
        "task resourceslices failed: api server went away"
    );
    assert!(!dra.exists() && !reg.exists(), "sockets left behind");
}

#[tokio::test]
async fn claim_lookups_run_concurrently() {
    use futures::future::BoxFuture;
    use k8s_openapi::api::resource::v1::ResourceClaim;
    use nvdra_kubelet_plugin::ClaimReader;

    struct SlowReader(InMemoryClaimReader);
    impl ClaimReader for SlowReader {
        fn read_claim<'a>(
            &'a self,
            namespace: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.0.read_claim(namespace, name).await
            })
        }
    }

    init_tracing();
    let dirs = Dirs::new();
    let inner = InMemoryClaimReader::new();
    for i in 0..4 {
        inner.insert(simple_claim(&format!("c{i}"), &format!("uid-c{i}")));
    }
    let plugin = builder(&dirs, Arc::new(TestDriver::default()))
        .claim_reader(SlowReader(inner))
        .build()
        .unwrap();
    let running = Running::start(plugin).await;
    let started = Instant::now();
    let response = running
        .dra_v1()
        .await
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: (0..4)
                .map(|i| v1_claim("ns", &format!("c{i}"), &format!("uid-c{i}")))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let elapsed = started.elapsed();
    assert_eq!(response.claims.len(), 4);
    assert!(response.claims.values().all(|c| c.error.is_empty()));
    // One after another they would take 2 s.
    assert!(
        elapsed < Duration::from_millis(1500),
        "lookups took {elapsed:?}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn critical_task_endings_are_errors() {
    init_tracing();
    type Task = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;
    let cases: Vec<(Task, &str)> = vec![
        (
            Box::pin(async { Ok(()) }),
            "task publisher stopped unexpectedly",
        ),
        (
            Box::pin(async { panic!("publisher bug") }),
            "task publisher panicked",
        ),
    ];
    for (task, want) in cases {
        let dirs = Dirs::new();
        let plugin = builder(&dirs, Arc::new(TestDriver::default()))
            .claim_reader(InMemoryClaimReader::new())
            .critical_task("publisher", task)
            .build()
            .unwrap();
        let err = Running::spawn(plugin).finished().await.unwrap_err();
        assert_eq!(err.to_string(), want);
    }
}

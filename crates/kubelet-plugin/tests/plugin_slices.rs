//! Contract tests of `KubeletPluginBuilder::resource_slices`: a real plugin on temp-dir Unix
//! sockets, a tonic client playing the kubelet and a mocked API server. The plugin must run the
//! publisher, re-sync it on every registration the kubelet confirms (a kubelet start wipes the
//! node's slices) and mirror its status into the `resourceslices` check of `/readyz`.

#[cfg(test)]
#[path = "support/harness.rs"]
mod harness;
#[cfg(test)]
#[path = "support/mock_api.rs"]
mod mock_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use harness::{Dirs, Running, TestDriver, builder, health_listener, http_get, init_tracing};
use http::Method;
use mock_api::{
    FIELD_MANAGER, NODE, PATIENCE, SLICE_PATH, Server, expect_apply, expect_get_node, expect_list,
    resources, wait_for,
};
use nvdra_kubelet_plugin::proto::registration::RegistrationStatus;
use nvdra_kubelet_plugin::proto::registration::registration_client::RegistrationClient;
use nvdra_kubelet_plugin::resourceslice::{Config, CounterLayout, Publisher, Status};
use nvdra_kubelet_plugin::{InMemoryClaimReader, KubeletPlugin};
use pretty_assertions::assert_eq;
use serde_json::json;
use tonic::transport::Channel;

const DRIVER: &str = "gpu.example.com";
const REGISTRATION_PENDING: &str =
    "registration: waiting for the kubelet to confirm registration\n";
const SLICES_PENDING: &str = "resourceslices: the driver's ResourceSlices are not published yet\n";

/// A plugin publishing slices through `client` with the default timings, health on a free
/// port.
#[cfg(test)]
fn plugin(dirs: &Dirs, client: kube::Client) -> (KubeletPlugin<TestDriver>, SocketAddr) {
    let (listener, addr) = health_listener();
    let plugin = builder(dirs, Arc::new(TestDriver::default()))
        .claim_reader(InMemoryClaimReader::new())
        .health_listener(listener)
        .resource_slices(
            client,
            Config::new(DRIVER, NODE, FIELD_MANAGER, CounterLayout::Separate),
        )
        .build()
        .unwrap();
    (plugin, addr)
}

/// The kubelet's NotifyRegistrationStatus(registered).
#[cfg(test)]
async fn registered(kubelet: &mut RegistrationClient<Channel>) {
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
}

/// Polls `/readyz` until it answers `want` (readiness follows the publisher asynchronously).
#[cfg(test)]
async fn readyz_becomes(addr: SocketAddr, want: (u16, &str)) {
    readyz_until(addr, &format!("{want:?}"), |status, body| {
        (status, body) == want
    })
    .await;
}

/// Polls `/readyz` until `check` accepts its answer; returns that answer.
#[cfg(test)]
async fn readyz_until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = http_get(addr, "/readyz").await;
        if let Some((status, body)) = &answer
            && check(*status, body)
        {
            return (*status, body.clone());
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {what}; last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a pass that started after `before` has succeeded.
#[cfg(test)]
async fn pass_succeeded_after(publisher: &Publisher, before: Option<SystemTime>) -> Status {
    wait_for(publisher, "a new successful pass", |s| {
        s.last_success > before && s.is_healthy()
    })
    .await
}

#[tokio::test]
async fn slices_gate_readiness_and_every_registration_resyncs() {
    init_tracing();
    let dirs = Dirs::new();
    let (client, mut server) = Server::start();
    let (plugin, addr) = plugin(&dirs, client);
    let publisher = plugin.slice_publisher().unwrap().clone();
    let running = Running::start(plugin).await;
    let mut kubelet = running.registration().await;

    // Before the driver publishes: not ready, naming the check and why; nothing is written.
    server.watching().await;
    assert_eq!(
        http_get(addr, "/readyz").await,
        Some((503, format!("{REGISTRATION_PENDING}{SLICES_PENDING}")))
    );
    server.assert_quiet(Duration::from_millis(300)).await;

    // The driver publishes: Node read, pool listed, slice applied → the slice check is ready
    // and only the registration is missing.
    publisher.publish(resources(&["gpu-0", "gpu-1"])).unwrap();
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![]).await;
    let stored = expect_apply(&mut server, "10").await;
    assert_eq!(
        (&stored["spec"]["nodeName"], &stored["spec"]["devices"]),
        (&json!(NODE), &json!([{"name": "gpu-0"}, {"name": "gpu-1"}]))
    );
    readyz_becomes(addr, (503, REGISTRATION_PENDING)).await;

    // The kubelet confirms the registration: ready. The confirmation also re-syncs: the Node is
    // read again and the pool listed; it is as written, so nothing is written.
    let before = publisher.status().last_success;
    registered(&mut kubelet).await;
    assert_eq!(http_get(addr, "/readyz").await, Some((200, "ok\n".into())));
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![stored.clone()]).await;
    pass_succeeded_after(&publisher, before).await;

    // A later confirmation (the kubelet restarted) re-syncs again; still nothing to write.
    let before = publisher.status().last_success;
    registered(&mut kubelet).await;
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![stored.clone()]).await;
    let status = pass_succeeded_after(&publisher, before).await;
    assert_eq!((status.generation, status.slices), (Some(1), 1));
    server.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(http_get(addr, "/readyz").await, Some((200, "ok\n".into())));

    // The restarted kubelet wiped the node's slices: the re-sync writes them again.
    let before = publisher.status().last_success;
    registered(&mut kubelet).await;
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![]).await;
    let rewritten = expect_apply(&mut server, "20").await;
    assert_eq!(rewritten["spec"]["devices"], stored["spec"]["devices"]);
    pass_succeeded_after(&publisher, before).await;
    server.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(http_get(addr, "/readyz").await, Some((200, "ok\n".into())));

    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_publish_is_not_ready_until_a_retry_succeeds() {
    init_tracing();
    let dirs = Dirs::new();
    let (client, mut server) = Server::start();
    let (plugin, addr) = plugin(&dirs, client);
    let publisher = plugin.slice_publisher().unwrap().clone();
    let running = Running::start(plugin).await;
    server.watching().await;

    publisher.publish(resources(&["gpu-0"])).unwrap();
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![]).await;
    let call = server.next().await;
    assert_eq!(
        (&call.method, call.path.as_str()),
        (&Method::PATCH, SLICE_PATH)
    );
    call.respond(
        500,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd is sad"}),
    );

    // The retry (after the default 250 ms backoff) lists again; it stays unanswered meanwhile,
    // so the failure count stays at one.
    let (status, body) = readyz_until(addr, "a publishing failure", |_, body| {
        body.contains("publishing failed")
    })
    .await;
    // The reason carries the whole cause chain, kube's rendering of the API status included.
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            concat!(
                "registration: waiting for the kubelet to confirm registration\n",
                "resourceslices: publishing failed 1 time(s) in a row: ",
                "apply resource slice \"node-a-gpu-example-com-00000\": ",
                "ApiError: etcd is sad: InternalError (Status { status: Some(Failure), code: 500, ",
                "message: \"etcd is sad\", metadata: None, reason: \"InternalError\", ",
                "details: None }): etcd is sad: InternalError\n",
            )
        )
    );

    // The retry succeeds: the slice check is ready again.
    expect_list(&mut server, vec![]).await;
    expect_apply(&mut server, "10").await;
    readyz_becomes(addr, (503, REGISTRATION_PENDING)).await;

    running.stop().await.unwrap();
}

//! The ResourceSlice publisher task end to end against a mocked API server: publish → writes,
//! a deletion behind its back → republish, its own echoes → nothing, resync → Node re-read,
//! API errors → status and retry, shutdown → the task ends. The mocked server serves the
//! task's watcher (list + a streaming watch) by itself and hands every other request to the
//! test in order.

#[cfg(test)]
#[path = "support/mock_api.rs"]
mod mock_api;

use std::time::Duration;

use mock_api::{
    SLICES_PATH, Server, config, expect_apply, expect_get_node, expect_list, resources, wait_for,
};
use nvdra_kubelet_plugin::resourceslice::{Status, spawn};
use pretty_assertions::assert_eq;
use serde_json::json;

#[tokio::test]
async fn resourceslice_publisher_lifecycle() {
    let (client, mut server) = Server::start();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (publisher, task) = spawn(client, config(), async {
        let _ = stopped.await;
    });

    // Nothing is written before the driver publishes.
    server.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(publisher.status(), Status::default());

    publisher.publish(resources(&["gpu-0", "gpu-1"])).unwrap();
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![]).await;
    let stored = expect_apply(&mut server, "10").await;
    assert_eq!(
        stored["spec"]["pool"],
        json!({"name": "node-a", "generation": 1, "resourceSliceCount": 1})
    );
    assert_eq!(
        stored["spec"]["devices"],
        json!([{"name": "gpu-0"}, {"name": "gpu-1"}])
    );
    let status = wait_for(&publisher, "a success", |s| s.last_success.is_some()).await;
    assert_eq!(
        (status.generation, status.slices, status.is_healthy()),
        (Some(1), 1, true)
    );

    // The echo of our own write triggers nothing.
    server.watch_event("ADDED", &stored).await;
    server.assert_quiet(Duration::from_millis(300)).await;

    // The kubelet deletes the slice behind our back: republished after the debounce.
    server.watch_event("DELETED", &stored).await;
    expect_list(&mut server, vec![]).await;
    let stored = expect_apply(&mut server, "20").await;
    server.assert_quiet(Duration::from_millis(200)).await;

    // Invalid input is rejected synchronously and changes nothing.
    let err = publisher
        .publish(resources(&["gpu-0", "gpu-0"]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid node resources: device name "gpu-0" is used more than once"#
    );
    server.assert_quiet(Duration::from_millis(200)).await;

    // Resync (kubelet re-registration) re-reads the Node; nothing changed, nothing written.
    publisher.resync();
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![stored.clone()]).await;
    server.assert_quiet(Duration::from_millis(200)).await;

    // An API error shows in the status and is retried after a backoff; success clears it.
    let before = publisher.status().last_success;
    publisher.resync();
    expect_get_node(&mut server).await;
    server.next().await.respond(
        500,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd is sad"}),
    );
    let status = wait_for(&publisher, "a failure", |s| s.consecutive_failures == 1).await;
    let error = status.last_error.clone().unwrap();
    assert!(
        error.starts_with(r#"list resource slices with field selector "spec.driver=gpu.example.com,spec.nodeName=node-a": "#)
            && error.contains("etcd is sad"),
        "{error}"
    );
    assert!(!status.is_healthy());
    expect_list(&mut server, vec![stored.clone()]).await;
    let status = wait_for(&publisher, "recovery", |s| s.consecutive_failures == 0).await;
    assert!(status.last_success > before);
    assert!(
        status.last_error.is_some(),
        "the last error stays visible for diagnosis"
    );

    // A new publish that needs a second slice.
    let many: Vec<String> = (0..129).map(|i| format!("gpu-{i}")).collect();
    publisher
        .publish(resources(
            &many.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
        .unwrap();
    expect_list(&mut server, vec![stored]).await;
    for (index, resource_version) in [(0, "30"), (1, "31")] {
        let call = server.next().await;
        assert_eq!(
            call.path,
            format!("{SLICES_PATH}/node-a-gpu-example-com-0000{index}")
        );
        let body = call.body.clone().unwrap();
        assert_eq!(
            body["spec"]["pool"],
            json!({"name": "node-a", "generation": 2, "resourceSliceCount": 2})
        );
        let mut stored = body;
        stored["metadata"]["resourceVersion"] = json!(resource_version);
        call.respond(200, &stored);
    }
    wait_for(&publisher, "generation 2", |s| s.generation == Some(2)).await;

    // Shutdown ends the task promptly and leaves the slices alone.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the task stops within 2 s")
        .unwrap();
}

#[tokio::test]
async fn resourceslice_publisher_stops_when_every_handle_is_dropped() {
    let (client, _server) = Server::start();
    let (publisher, task) = spawn(client, config(), std::future::pending());
    let clone = publisher.clone();
    drop(publisher);
    drop(clone);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the task stops within 2 s")
        .unwrap();
}

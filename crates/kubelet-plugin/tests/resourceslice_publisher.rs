//! The ResourceSlice publisher task end to end against a mocked API server: publish → writes,
//! a deletion behind its back → republish, its own echoes → nothing, resync → Node re-read,
//! API errors → status and retry, shutdown → the task ends. The mocked server serves the
//! task's watcher (list + a streaming watch) by itself and hands every other request to the
//! test in order.

#[cfg(test)]
mod support {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::time::Duration;

    use futures::StreamExt;
    use http::{Method, Request, Response};
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame};
    use k8s_openapi::api::resource::v1::Device;
    use kube::client::Body;
    use nvdra_kubelet_plugin::resourceslice::{
        Config, CounterLayout, NodeResources, Publisher, Status,
    };
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

    /// One request the task's sync made (not its watcher).
    pub struct Call {
        pub method: Method,
        pub path: String,
        pub query: BTreeMap<String, String>,
        pub body: Option<Value>,
        reply: tower_test::mock::SendResponse<Response<ResponseBody>>,
    }

    impl Call {
        pub fn respond(self, status: u16, body: &Value) {
            let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(bytes).boxed_unsync())
                .unwrap();
            self.reply.send_response(response);
        }
    }

    /// The test's side of the mocked API server.
    pub struct Server {
        calls: mpsc::UnboundedReceiver<Call>,
        watches: mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
        watch: Option<mpsc::UnboundedSender<Bytes>>,
    }

    impl Server {
        pub fn start() -> (kube::Client, Self) {
            let (service, mut handle) =
                tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
            let (calls_tx, calls) = mpsc::unbounded_channel();
            let (watches_tx, watches) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some((request, reply)) = handle.next_request().await {
                    let (parts, body) = request.into_parts();
                    let query = parse_query(parts.uri.query().unwrap_or_default());
                    if query.get("watch").map(String::as_str) == Some("true") {
                        let (events_tx, events_rx) = mpsc::unbounded_channel::<Bytes>();
                        let stream = futures::stream::unfold(events_rx, |mut rx| async move {
                            let bytes = rx.recv().await?;
                            Some((Ok::<_, Infallible>(Frame::data(bytes)), rx))
                        });
                        let response = Response::builder()
                            .status(200)
                            .body(StreamBody::new(stream.boxed()).boxed_unsync())
                            .unwrap();
                        reply.send_response(response);
                        let _ = watches_tx.send(events_tx);
                        continue;
                    }
                    let bytes = body.collect_bytes().await.unwrap();
                    let call = Call {
                        method: parts.method,
                        path: parts.uri.path().to_owned(),
                        query,
                        body: (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap()),
                        reply,
                    };
                    if call.query.contains_key("limit") {
                        // The watcher's initial list.
                        call.respond(200, &list(vec![]));
                    } else {
                        let _ = calls_tx.send(call);
                    }
                }
            });
            let client = kube::Client::new(service, "default");
            (
                client,
                Self {
                    calls,
                    watches,
                    watch: None,
                },
            )
        }

        pub async fn next(&mut self) -> Call {
            tokio::time::timeout(Duration::from_secs(5), self.calls.recv())
                .await
                .expect("a request within 5 s")
                .expect("the mock server is running")
        }

        /// Waits `quiet` and asserts the task made no request meanwhile.
        pub async fn assert_quiet(&mut self, quiet: Duration) {
            tokio::time::sleep(quiet).await;
            if let Ok(call) = self.calls.try_recv() {
                panic!("unexpected request {} {}", call.method, call.path);
            }
        }

        /// Sends a watch event on the task's open watch.
        pub async fn watch_event(&mut self, kind: &str, object: &Value) {
            if self.watch.is_none() {
                let watch = tokio::time::timeout(Duration::from_secs(5), self.watches.recv())
                    .await
                    .expect("the task watches within 5 s")
                    .expect("the mock server is running");
                self.watch = Some(watch);
            }
            let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
            line.push(b'\n');
            self.watch
                .as_ref()
                .unwrap()
                .send(Bytes::from(line))
                .unwrap();
        }
    }

    pub const SLICE_PATH: &str =
        "/apis/resource.k8s.io/v1/resourceslices/node-a-gpu-example-com-00000";
    pub const SLICES_PATH: &str = "/apis/resource.k8s.io/v1/resourceslices";

    pub fn config() -> Config {
        Config {
            debounce: Duration::from_millis(50),
            backoff_initial: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(100),
            ..Config::new(
                "gpu.example.com",
                "node-a",
                "example-kubelet-plugin",
                CounterLayout::Separate,
            )
        }
    }

    pub fn resources(names: &[&str]) -> NodeResources {
        NodeResources {
            devices: names
                .iter()
                .map(|name| Device {
                    name: (*name).into(),
                    ..Device::default()
                })
                .collect(),
            shared_counters: vec![],
        }
    }

    pub async fn expect_get_node(server: &mut Server) {
        let call = server.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&Method::GET, "/api/v1/nodes/node-a")
        );
        call.respond(200, &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid"}}));
    }

    pub async fn expect_list(server: &mut Server, items: Vec<Value>) {
        let call = server.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&Method::GET, SLICES_PATH)
        );
        assert_eq!(
            call.query.get("fieldSelector").map(String::as_str),
            Some("spec.driver=gpu.example.com,spec.nodeName=node-a")
        );
        call.respond(200, &list(items));
    }

    /// Expects an apply of our slice and answers like the server; returns the stored object.
    pub async fn expect_apply(server: &mut Server, resource_version: &str) -> Value {
        let call = server.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&Method::PATCH, SLICE_PATH)
        );
        assert_eq!(
            call.query.get("fieldManager").map(String::as_str),
            Some("example-kubelet-plugin")
        );
        assert_eq!(call.query.get("force").map(String::as_str), Some("true"));
        let mut stored = call.body.clone().expect("an apply body");
        stored["metadata"]["uid"] = json!(format!("uid-{resource_version}"));
        stored["metadata"]["resourceVersion"] = json!(resource_version);
        call.respond(200, &stored);
        stored
    }

    pub async fn wait_for(
        publisher: &Publisher,
        what: &str,
        check: impl Fn(&Status) -> bool,
    ) -> Status {
        let mut status = publisher.watch_status();
        tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| check(s)))
            .await
            .unwrap_or_else(|_| panic!("status never showed {what}: {:?}", publisher.status()))
            .unwrap()
            .clone()
    }

    pub fn list(items: Vec<Value>) -> Value {
        json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSliceList",
            "metadata": {"resourceVersion": "1"},
            "items": items,
        })
    }

    pub fn parse_query(query: &str) -> BTreeMap<String, String> {
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(key), decode(value))
            })
            .collect()
    }

    fn decode(text: &str) -> String {
        let mut out = Vec::new();
        let mut bytes = text.bytes();
        while let Some(byte) = bytes.next() {
            match byte {
                b'%' => {
                    let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                    out.push(u8::from_str_radix(&hex, 16).unwrap());
                }
                b'+' => out.push(b' '),
                other => out.push(other),
            }
        }
        String::from_utf8(out).unwrap()
    }
}

use std::time::Duration;

use nvdra_kubelet_plugin::resourceslice::{Status, spawn};
use pretty_assertions::assert_eq;
use serde_json::json;
use support::{
    SLICES_PATH, Server, config, expect_apply, expect_get_node, expect_list, resources, wait_for,
};

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

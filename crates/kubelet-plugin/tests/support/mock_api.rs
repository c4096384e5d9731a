//! A mocked Kubernetes API server for the ResourceSlice publisher: a tower-test mock behind a
//! `kube::Client` that serves the publisher's watcher (the initial paged list and a streaming
//! watch the test can push events into) by itself and hands every other request to the test,
//! in order, as a [`Call`] to inspect and answer. Pool identity matches [`config`]: driver
//! `gpu.example.com`, node `node-a`, field manager `example-kubelet-plugin`.
//!
//! Included by each test binary with `#[cfg(test)] #[path = "support/mock_api.rs"] mod
//! mock_api;`, so clippy's test allowances (unwrap, expect) cover it.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

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

/// How long a test waits for something that should happen: generous, because a loaded
/// 2-core CI machine can stall a task for seconds; only failing runs wait this long.
pub const PATIENCE: Duration = Duration::from_secs(10);

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
        tokio::time::timeout(PATIENCE, self.calls.recv())
            .await
            .expect("a request within 10 s")
            .expect("the mock server is running")
    }

    /// Waits `quiet` and asserts the task made no request meanwhile.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        tokio::time::sleep(quiet).await;
        if let Ok(call) = self.calls.try_recv() {
            panic!("unexpected request {} {}", call.method, call.path);
        }
    }

    /// Waits until the task's watcher has finished its initial list and opened its watch.
    /// The watcher's "initial list done" event schedules a debounced pass; once the watch is
    /// open that event has been handled, so a later publish supersedes that pass.
    pub async fn watching(&mut self) -> &mpsc::UnboundedSender<Bytes> {
        if self.watch.is_none() {
            let watch = tokio::time::timeout(PATIENCE, self.watches.recv())
                .await
                .expect("the task watches within 10 s")
                .expect("the mock server is running");
            self.watch = Some(watch);
        }
        self.watch.as_ref().unwrap()
    }

    /// Sends a watch event on the task's open watch.
    pub async fn watch_event(&mut self, kind: &str, object: &Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        self.watching().await.send(Bytes::from(line)).unwrap();
    }
}

pub const SLICE_PATH: &str = "/apis/resource.k8s.io/v1/resourceslices/node-a-gpu-example-com-00000";
pub const SLICES_PATH: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// The node the mocked server knows.
pub const NODE: &str = "node-a";
/// The field manager [`expect_apply`] expects.
pub const FIELD_MANAGER: &str = "example-kubelet-plugin";

/// Publisher settings for this pool, with short timings.
pub fn config() -> Config {
    Config {
        debounce: Duration::from_millis(50),
        backoff_initial: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        ..Config::new(
            "gpu.example.com",
            NODE,
            FIELD_MANAGER,
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
    tokio::time::timeout(PATIENCE, status.wait_for(|s| check(s)))
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

//! Contract tests of one sync pass against a mocked API server: the exact requests, their
//! parsed query parameters and bodies.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use http::{Method, Request, Response};
use k8s_openapi::api::resource::v1::{Device, DeviceTaint};
use kube::client::Body;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use super::*;

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

fn target() -> Target {
    Target {
        driver: "gpu.example.com".into(),
        node_name: "node-a".into(),
        field_manager: "example-kubelet-plugin".into(),
        layout: CounterLayout::Separate,
    }
}

fn device(name: &str) -> Device {
    Device {
        name: name.into(),
        ..Device::default()
    }
}

fn now() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap()
}

/// The mocked API server: hands out requests in order, parsed.
struct Server(Handle<Request<Body>, Response<Body>>);

struct Call {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    body: Option<Value>,
    reply: SendResponse<Response<Body>>,
}

impl Server {
    fn new() -> (Client, Self) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), Self(handle))
    }

    async fn next(&mut self) -> Call {
        let (request, reply) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("a request within 5 s")
            .expect("the client is alive");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        Call {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parse_query(parts.uri.query().unwrap_or_default()),
            body: (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap()),
            reply,
        }
    }

    /// Nothing more was requested (the client may be gone or still alive).
    fn assert_idle(&mut self) {
        if let Some(Some((request, _))) = self.0.next_request().now_or_never() {
            panic!(
                "unexpected extra request {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}

impl Call {
    fn respond(self, status: u16, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.reply.send_response(response);
    }
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
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
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn query(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn expect_get_node(server: &mut Server) {
    let call = server.next().await;
    assert_eq!(
        (call.method.clone(), call.path.as_str()),
        (Method::GET, "/api/v1/nodes/node-a")
    );
    call.respond(
        200,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid"}}),
    );
}

async fn expect_list(server: &mut Server, items: Vec<Value>) {
    let call = server.next().await;
    assert_eq!(
        (call.method.clone(), call.path.as_str()),
        (Method::GET, SLICES)
    );
    assert_eq!(
        call.query,
        query(&[(
            "fieldSelector",
            "spec.driver=gpu.example.com,spec.nodeName=node-a"
        )])
    );
    call.respond(
        200,
        &json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSliceList",
            "metadata": {"resourceVersion": "100"},
            "items": items,
        }),
    );
}

/// Expects a server-side apply of `name`, returns its body and answers with it (plus server
/// metadata), optionally letting `server_edit` change what the "server" stores.
async fn expect_apply(
    server: &mut Server,
    name: &str,
    resource_version: &str,
    server_edit: impl FnOnce(&mut Value),
) -> Value {
    let call = server.next().await;
    assert_eq!(
        (call.method.clone(), call.path.clone()),
        (Method::PATCH, format!("{SLICES}/{name}"))
    );
    assert_eq!(
        call.query,
        query(&[
            ("fieldManager", "example-kubelet-plugin"),
            ("force", "true")
        ])
    );
    let sent = call.body.clone().expect("an apply body");
    let mut stored = sent.clone();
    stored["metadata"]["uid"] = json!(format!("uid-{name}"));
    stored["metadata"]["resourceVersion"] = json!(resource_version);
    server_edit(&mut stored);
    call.respond(200, &stored);
    sent
}

fn stale_slice() -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": "node-a-gpu.example.com-x7k2p", "uid": "stale-uid", "resourceVersion": "41"},
        "spec": {
            "driver": "gpu.example.com",
            "nodeName": "node-a",
            "pool": {"name": "node-a", "generation": 2, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0"}],
        },
    })
}

#[tokio::test]
async fn first_pass_applies_desired_and_deletes_stale_then_second_pass_writes_nothing() {
    let (client, mut server) = Server::new();
    let mut syncer = Syncer::new(client, target());
    let resources = NodeResources {
        devices: vec![device("gpu-0"), device("gpu-1")],
        shared_counters: vec![],
    };

    let pass = {
        let resources = resources.clone();
        tokio::spawn(async move {
            let report = syncer.sync(&resources, now()).await;
            (syncer, report)
        })
    };
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![stale_slice()]).await;
    let sent = expect_apply(&mut server, "node-a-gpu-example-com-00000", "101", |_| {}).await;
    assert_eq!(
        sent,
        json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": "node-a-gpu-example-com-00000",
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": "node-a",
                    "uid": "node-uid",
                    "controller": true,
                }],
            },
            "spec": {
                "driver": "gpu.example.com",
                "nodeName": "node-a",
                // The stale slice had generation 2 and is deleted: bump.
                "pool": {"name": "node-a", "generation": 3, "resourceSliceCount": 1},
                "devices": [{"name": "gpu-0"}, {"name": "gpu-1"}],
            },
        })
    );
    let delete = server.next().await;
    assert_eq!(
        (delete.method.clone(), delete.path.as_str()),
        (
            Method::DELETE,
            "/apis/resource.k8s.io/v1/resourceslices/node-a-gpu.example.com-x7k2p"
        )
    );
    let options = delete.body.clone().expect("delete options");
    assert_eq!(
        options["preconditions"],
        json!({"uid": "stale-uid", "resourceVersion": "41"})
    );
    delete.respond(200, &stale_slice());

    let (mut syncer, report) = pass.await.unwrap();
    assert_eq!(
        report.unwrap(),
        SyncReport {
            generation: 3,
            slices: 1,
            applied: 1,
            deleted: 1,
            dropped: vec![],
        }
    );
    server.assert_idle();

    // Second pass: the list shows what we wrote; the Node UID is cached. No writes.
    let pass = tokio::spawn(async move {
        let report = syncer.sync(&resources, now()).await;
        (syncer, report)
    });
    let mut stored = sent;
    stored["metadata"]["uid"] = json!("uid-node-a-gpu-example-com-00000");
    stored["metadata"]["resourceVersion"] = json!("101");
    expect_list(&mut server, vec![stored]).await;
    let (_syncer, report) = pass.await.unwrap();
    let report = report.unwrap();
    assert_eq!(
        (report.applied, report.deleted, report.generation),
        (0, 0, 3)
    );
    server.assert_idle();
}

#[tokio::test]
async fn unchanged_pool_written_by_someone_else_gets_no_writes() {
    let (client, mut server) = Server::new();
    let mut syncer = Syncer::new(client, target());
    let resources = NodeResources {
        devices: vec![Device {
            capacity: Some(BTreeMap::from([(
                "memory".to_owned(),
                k8s_openapi::api::resource::v1::DeviceCapacity {
                    value: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1024Mi".into()),
                    request_policy: None,
                },
            )])),
            ..device("gpu-0")
        }],
        shared_counters: vec![],
    };
    let pass = tokio::spawn(async move { syncer.sync(&resources, now()).await });
    expect_get_node(&mut server).await;
    expect_list(
        &mut server,
        vec![json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": "node-a-gpu-example-com-00000",
                "uid": "u1",
                "resourceVersion": "7",
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "node-uid", "controller": true}],
            },
            "spec": {
                "driver": "gpu.example.com",
                "nodeName": "node-a",
                "pool": {"name": "node-a", "generation": 5, "resourceSliceCount": 1},
                // The server's canonical form of what we would send.
                "devices": [{"name": "gpu-0", "capacity": {"memory": {"value": "1Gi"}}}],
            },
        })],
    )
    .await;
    let report = pass.await.unwrap().unwrap();
    assert_eq!(
        (report.applied, report.deleted, report.generation),
        (0, 0, 5)
    );
    server.assert_idle();
}

#[tokio::test]
async fn dropped_fields_are_reported_once_and_not_rewritten() {
    let (client, mut server) = Server::new();
    let mut syncer = Syncer::new(client, target());
    let resources = NodeResources {
        devices: vec![Device {
            taints: Some(vec![DeviceTaint {
                key: "example.com/unhealthy".into(),
                effect: "NoSchedule".into(),
                ..DeviceTaint::default()
            }]),
            ..device("gpu-0")
        }],
        shared_counters: vec![],
    };
    let name = "node-a-gpu-example-com-00000";

    let pass = {
        let resources = resources.clone();
        tokio::spawn(async move {
            let report = syncer.sync(&resources, now()).await;
            (syncer, report)
        })
    };
    expect_get_node(&mut server).await;
    expect_list(&mut server, vec![]).await;
    // The "server" has device taints disabled and drops them.
    let sent = expect_apply(&mut server, name, "200", |stored| {
        stored["spec"]["devices"][0]
            .as_object_mut()
            .unwrap()
            .remove("taints");
    })
    .await;
    assert_eq!(
        sent["spec"]["devices"][0]["taints"],
        json!([{"key": "example.com/unhealthy", "effect": "NoSchedule", "timeAdded": "2023-11-14T22:13:20Z"}]),
        "taints without a time are stamped before sending"
    );
    let (mut syncer, report) = pass.await.unwrap();
    let report = report.unwrap();
    assert_eq!(
        report.dropped,
        vec![DroppedFields {
            slice: name.into(),
            fields: vec!["spec.devices[*].taints".into()],
        }]
    );

    // The list shows the server's version at the resourceVersion we got back: no rewrite.
    let mut stored = sent.clone();
    stored["metadata"]["uid"] = json!(format!("uid-{name}"));
    stored["metadata"]["resourceVersion"] = json!("200");
    stored["spec"]["devices"][0]
        .as_object_mut()
        .unwrap()
        .remove("taints");
    let pass = {
        let resources = resources.clone();
        tokio::spawn(async move {
            let report = syncer.sync(&resources, now()).await;
            (syncer, report)
        })
    };
    expect_list(&mut server, vec![stored.clone()]).await;
    let (mut syncer, report) = pass.await.unwrap();
    assert_eq!(report.unwrap().applied, 0);
    server.assert_idle();

    // Someone else changed it (new resourceVersion): compared for real and rewritten.
    stored["metadata"]["resourceVersion"] = json!("250");
    let pass = tokio::spawn(async move { syncer.sync(&resources, now()).await });
    expect_list(&mut server, vec![stored]).await;
    expect_apply(&mut server, name, "251", |_| {}).await;
    assert_eq!(pass.await.unwrap().unwrap().applied, 1);
}

#[tokio::test]
async fn failures_name_the_operation() {
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "gone"});
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "Precondition failed: UID in precondition: stale-uid, UID in object meta: other"});
    let resources = NodeResources {
        devices: vec![device("gpu-0")],
        shared_counters: vec![],
    };

    // Node lookup fails.
    let (client, mut server) = Server::new();
    let mut syncer = Syncer::new(client, target());
    let pass = {
        let resources = resources.clone();
        tokio::spawn(async move { syncer.sync(&resources, now()).await })
    };
    server.next().await.respond(404, &not_found);
    let err = pass.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), r#"get node "node-a""#);
    assert!(matches!(err, Error::GetNode { .. }));

    // A stale slice that is already gone is fine; one that changed under us is an error.
    for (response, ok) in [(&not_found, true), (&conflict, false)] {
        let (client, mut server) = Server::new();
        let mut syncer = Syncer::new(client, target());
        let pass = {
            let resources = resources.clone();
            tokio::spawn(async move { syncer.sync(&resources, now()).await })
        };
        expect_get_node(&mut server).await;
        expect_list(&mut server, vec![stale_slice()]).await;
        expect_apply(&mut server, "node-a-gpu-example-com-00000", "5", |_| {}).await;
        server
            .next()
            .await
            .respond(response["code"].as_u64().unwrap() as u16, response);
        let result = pass.await.unwrap();
        if ok {
            assert_eq!(result.unwrap().deleted, 1);
        } else {
            let err = result.unwrap_err();
            assert_eq!(
                err.to_string(),
                r#"delete resource slice "node-a-gpu.example.com-x7k2p""#
            );
            assert!(matches!(err, Error::DeleteSlice { .. }));
        }
    }

    // Invalid input: no request at all.
    let (client, mut server) = Server::new();
    let mut syncer = Syncer::new(client, target());
    let invalid = NodeResources {
        devices: vec![device("gpu-0"), device("gpu-0")],
        shared_counters: vec![],
    };
    let err = syncer.sync(&invalid, now()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid node resources: device name "gpu-0" is used more than once"#
    );
    server.assert_idle();
}

#[tokio::test]
async fn echo_events_are_recognised() {
    let (client, _server) = Server::new();
    let mut syncer = Syncer::new(client, target());
    let name = "node-a-gpu-example-com-00000";
    syncer.written.insert(
        name.into(),
        Written {
            resource_version: "7".into(),
            sent: ResourceSliceSpec::default(),
        },
    );
    syncer.deleted_uids.insert("gone".into());
    let slice = |rv: &str, uid: &str| {
        let mut slice = ResourceSlice::default();
        slice.metadata.name = Some(name.into());
        slice.metadata.resource_version = Some(rv.into());
        slice.metadata.uid = Some(uid.into());
        slice
    };
    let cases = [
        ("our write", watcher::Event::Apply(slice("7", "u")), true),
        (
            "someone else's write",
            watcher::Event::Apply(slice("8", "u")),
            false,
        ),
        (
            "our delete",
            watcher::Event::Delete(slice("9", "gone")),
            true,
        ),
        (
            "the same delete again",
            watcher::Event::Delete(slice("9", "gone")),
            false,
        ),
        (
            "someone else's delete",
            watcher::Event::Delete(slice("7", "u")),
            false,
        ),
        ("relist start", watcher::Event::Init, true),
        (
            "relisted object",
            watcher::Event::InitApply(slice("8", "u")),
            true,
        ),
        ("relist done", watcher::Event::InitDone, false),
    ];
    for (case, event, want) in cases {
        assert_eq!(syncer.is_own_echo(&event), want, "{case}");
    }
}

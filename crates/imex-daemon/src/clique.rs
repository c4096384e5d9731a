//! This daemon's row in its `ComputeDomainClique`, written with server-side apply.
//!
//! Expected flow: every daemon of a clique applies a body holding only what it owns, under
//! its own field manager `nvdra-imex-daemon.<nodeName>` and without `force`:
//!
//! - `metadata.labels`: the two clique labels (every daemon applies the same values, so the
//!   fields are co-owned and never conflict);
//! - `metadata.ownerReferences`: its own pod (a list-map keyed by `uid`, so each daemon owns
//!   one element and the object is garbage-collected once every daemon pod is gone);
//! - `daemons`: its own row (a list-map keyed by `nodeName`).
//!
//! The first apply creates the object. Leaving is the same apply without the row: server-side
//! apply removes the fields a manager stops applying, so the row goes away while the peers'
//! rows are untouched. The owner reference stays, so a clique whose daemons have all left is
//! garbage-collected with the last pod rather than orphaned.
//!
//! Guarantees: no GET-modify-UPDATE, so peers never race on a resourceVersion. A 409 can still
//! come back when another manager (say, an operator with `kubectl edit`) took over a field this
//! daemon applies; it is retried without `force`, counted, and the count is logged as
//! `clique apply conflicts=<n>` because the e2e asserts there are none.

use kube::Api;
use kube::api::{Patch, PatchParams};
use nvdra_api::names::{api_group, field_managers, kinds, objects};
use nvdra_api::{ComputeDomainClique, ComputeDomainDaemonInfo, clique};
use serde_json::json;

/// Who this daemon is, as far as its clique object is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The ComputeDomain's UID.
    pub compute_domain_uid: String,
    /// The clique ID (non-empty).
    pub clique_id: String,
    /// Namespace of the daemon pod, which is where the clique object lives.
    pub namespace: String,
    /// The node, the key of this daemon's row.
    pub node_name: String,
    /// The daemon pod's name.
    pub pod_name: String,
    /// The daemon pod's UID.
    pub pod_uid: String,
}

impl Membership {
    /// The clique object's name, `<cdUID>.<cliqueID>`.
    pub fn object_name(&self) -> String {
        objects::clique_name(&self.compute_domain_uid, &self.clique_id)
    }

    /// This daemon's field manager: one per node, so each owns exactly its row.
    pub fn field_manager(&self) -> String {
        format!("{}.{}", field_managers::IMEX_DAEMON, self.node_name)
    }

    /// The server-side-apply body: labels, own pod as owner, and `row` (none: leave).
    pub fn apply_body(&self, row: Option<&ComputeDomainDaemonInfo>) -> serde_json::Value {
        let mut body = json!({
            "apiVersion": api_group::API_VERSION,
            "kind": kinds::COMPUTE_DOMAIN_CLIQUE,
            "metadata": {
                "name": self.object_name(),
                "namespace": self.namespace,
                "labels": clique::clique_labels(&self.compute_domain_uid, &self.clique_id),
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.pod_name,
                    "uid": self.pod_uid,
                }],
            },
        });
        if let Some(row) = row {
            body["daemons"] = json!([row]);
        }
        body
    }

    /// Applies `row` (or its absence) and returns the object as the server now has it.
    pub async fn apply(
        &self,
        api: &Api<ComputeDomainClique>,
        row: Option<&ComputeDomainDaemonInfo>,
    ) -> Result<ComputeDomainClique, kube::Error> {
        let params = PatchParams::apply(&self.field_manager());
        api.patch(
            &self.object_name(),
            &params,
            &Patch::Apply(self.apply_body(row)),
        )
        .await
    }
}

/// Whether `err` is the API server's 409 Conflict.
pub fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use nvdra_api::Readiness;
    use pretty_assertions::assert_eq;

    fn member() -> Membership {
        Membership {
            compute_domain_uid: "cd-uid".into(),
            clique_id: "2df84740-0000-0000-0000-000000000000.2".into(),
            namespace: "nvdra".into(),
            node_name: "node-a".into(),
            pod_name: "computedomain-daemon-cd-uid-x7k2p".into(),
            pod_uid: "pod-uid-1".into(),
        }
    }

    fn row() -> ComputeDomainDaemonInfo {
        ComputeDomainDaemonInfo {
            node_name: "node-a".into(),
            ip_address: "127.1.3.2".into(),
            clique_id: "2df84740-0000-0000-0000-000000000000.2".into(),
            index: 1,
            status: Readiness::Ready,
        }
    }

    fn want_body(with_row: bool) -> serde_json::Value {
        let mut want = json!({
            "apiVersion": "resource.nvidia.com/v1beta1",
            "kind": "ComputeDomainClique",
            "metadata": {
                "name": "cd-uid.2df84740-0000-0000-0000-000000000000.2",
                "namespace": "nvdra",
                "labels": {
                    "resource.nvidia.com/computeDomain": "cd-uid",
                    "resource.nvidia.com/computeDomain.cliqueID": "2df84740-0000-0000-0000-000000000000.2",
                },
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": "computedomain-daemon-cd-uid-x7k2p",
                    "uid": "pod-uid-1",
                }],
            },
        });
        if with_row {
            want["daemons"] = json!([{
                "nodeName": "node-a",
                "ipAddress": "127.1.3.2",
                "cliqueID": "2df84740-0000-0000-0000-000000000000.2",
                "index": 1,
                "status": "Ready",
            }]);
        }
        want
    }

    #[test]
    fn apply_body_holds_only_what_the_daemon_owns() {
        let m = member();
        assert_eq!(m.field_manager(), "nvdra-imex-daemon.node-a");
        assert_eq!(m.apply_body(Some(&row())), want_body(true));
        // Leaving: the same body without the row.
        assert_eq!(m.apply_body(None), want_body(false));
    }

    /// Answers one request with `status` and `body`, returning the request for inspection.
    async fn serve_one(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        status: u16,
        body: serde_json::Value,
    ) -> (http::Method, String, Option<String>, serde_json::Value) {
        let (request, send) = handle.next_request().await.unwrap();
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let sent: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        (method, uri, content_type, sent)
    }

    #[tokio::test]
    async fn apply_sends_a_server_side_apply_patch_without_force() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let api: Api<ComputeDomainClique> = Api::namespaced(client, "nvdra");
        let m = member();
        let mut answer = want_body(true);
        answer["metadata"]["uid"] = "clique-uid".into();
        let server = tokio::spawn(serve_one(handle, 200, answer));
        let got = m.apply(&api, Some(&row())).await.unwrap();
        let (method, uri, content_type, sent) = server.await.unwrap();
        assert_eq!(method, http::Method::PATCH);
        assert_eq!(
            uri,
            "/apis/resource.nvidia.com/v1beta1/namespaces/nvdra/computedomaincliques/cd-uid.2df84740-0000-0000-0000-000000000000.2?&fieldManager=nvdra-imex-daemon.node-a"
        );
        assert_eq!(
            content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(sent, want_body(true));
        assert_eq!(got.spec.daemons, vec![row()]);
    }

    #[tokio::test]
    async fn a_409_is_recognised_as_a_conflict() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let api: Api<ComputeDomainClique> = Api::namespaced(client, "nvdra");
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "Apply failed with 1 conflict", "reason": "Conflict", "code": 409,
        });
        let server = tokio::spawn(serve_one(handle, 409, status));
        let err = member().apply(&api, None).await.unwrap_err();
        let (_, _, _, sent) = server.await.unwrap();
        assert_eq!(sent, want_body(false));
        assert!(is_conflict(&err), "{err:?}");
        let other = kube::Error::Api(Box::new(
            kube::core::Status::failure("gone", "NotFound").with_code(404),
        ));
        assert!(!is_conflict(&other));
    }
}

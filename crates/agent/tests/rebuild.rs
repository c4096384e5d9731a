//! `rebuild_after_corruption` against a mocked API server: a corrupt checkpoint, a failed
//! cluster-wide LIST of ResourceClaims that is retried, then adoption of the live claims and
//! removal of the orphan spec.

#[path = "driver/fixtures.rs"]
mod fixtures;

#[cfg(test)]
mod rebuild_mock_api {
    use std::time::{Duration, Instant};

    use axum::body::Bytes;
    use http::{Method, Request, Response};
    use http_body_util::Full;
    use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceClaimConsumerReference};
    use kube::client::Body;
    use nvdra_agent::checkpoint::{CheckpointState, CheckpointStore, ClaimState, LoadOutcome};
    use nvdra_agent::driver::Adopted;
    use nvdra_agent::rebuild::{INITIAL_BACKOFF, rebuild_after_corruption};
    use nvdra_kubelet_plugin::DraDriver;
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    use crate::fixtures::*;

    /// Bounds every wait on the client, so a regression fails instead of hanging.
    const PATIENCE: Duration = Duration::from_secs(10);

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Full<Bytes>>>;

    fn reserved(mut claim: ResourceClaim) -> ResourceClaim {
        claim.status.as_mut().unwrap().reserved_for = Some(vec![ResourceClaimConsumerReference {
            resource: "pods".into(),
            name: "pod".into(),
            uid: "pod-uid".into(),
            ..Default::default()
        }]);
        claim
    }

    fn on_disk(dirs: &Dirs) -> CheckpointState {
        CheckpointStore::new(&dirs.data)
            .load(BOOT_ID)
            .unwrap()
            .state
    }

    /// Waits for the next request, checks it is the cluster-wide LIST, and answers it.
    async fn answer_list(handle: &mut Handle, status: u16, body: &Value) {
        let (request, reply) = tokio::time::timeout(PATIENCE, handle.next_request())
            .await
            .expect("a request within 10 s")
            .expect("the client is still running");
        assert_eq!(request.method(), Method::GET);
        assert_eq!(
            request.uri().path(),
            "/apis/resource.k8s.io/v1/resourceclaims"
        );
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap();
        reply.send_response(response);
    }

    #[tokio::test]
    async fn failed_list_is_retried_then_live_claims_are_adopted_and_orphans_removed() {
        let dirs = Dirs::new();
        let (a, b, orphan) = (uid(1), uid(2), uid(3));
        let claims = vec![
            reserved(allocated_claim("a", &a, &[("gpu", "gpu-0", false)])),
            reserved(allocated_claim("b", &b, &[("gpu", "gpu-1", false)])),
        ];
        let before = {
            let started = start(&dirs, H100);
            let got = started
                .driver
                .prepare_resource_claims(claims.iter().cloned().map(to_prepare).collect())
                .await;
            assert!(got.values().all(Result::is_ok), "{got:?}");
            on_disk(&dirs)
        };
        std::fs::write(dirs.spec_path(&orphan), b"kind: k8s.gpu.nvidia.com/claim").unwrap();
        std::fs::write(dirs.checkpoint_path(), b"{\"kind\": garbage").unwrap();

        let restarted = start(&dirs, H100);
        assert!(
            matches!(restarted.startup.checkpoint, LoadOutcome::Corrupt { .. }),
            "{:?}",
            restarted.startup.checkpoint
        );
        assert_eq!(
            restarted.startup.unaccounted_specs,
            [a.clone(), b.clone(), orphan.clone()]
        );
        assert!(restarted.driver.checkpoint_state().is_empty());

        let (service, mut handle) =
            tower_test::mock::pair::<Request<Body>, Response<Full<Bytes>>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            answer_list(
                &mut handle,
                500,
                &json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": "etcdserver: request timed out",
                    "reason": "InternalError",
                    "code": 500
                }),
            )
            .await;
            let failed_at = Instant::now();
            answer_list(
                &mut handle,
                200,
                &json!({
                    "kind": "ResourceClaimList",
                    "apiVersion": "resource.k8s.io/v1",
                    "metadata": {"resourceVersion": "4712"},
                    "items": claims,
                }),
            )
            .await;
            (handle, failed_at.elapsed())
        });

        let report = tokio::time::timeout(
            PATIENCE,
            rebuild_after_corruption(
                &restarted.driver,
                &client,
                &restarted.startup.unaccounted_specs,
            ),
        )
        .await
        .expect("the rebuild finishes within 10 s");
        let (mut handle, retried_after) = server.await.unwrap();
        // The retry waited out the first backoff (real time: tokio's test-util is not enabled).
        assert!(retried_after >= INITIAL_BACKOFF, "{retried_after:?}");
        assert_eq!(
            report,
            Some(Adopted {
                adopted: vec![a.clone(), b.clone()],
                refused: vec![],
                stale_specs_removed: 1,
                problems: vec![],
            })
        );
        drop(client);
        let more = tokio::time::timeout(PATIENCE, handle.next_request())
            .await
            .expect("the client's service is dropped");
        assert!(more.is_none(), "no request after the successful LIST");

        let after = on_disk(&dirs);
        assert_eq!(after.completed_claims(), before.completed_claims());
        for claim in [&a, &b] {
            assert_eq!(
                after.claim(claim).map(|entry| entry.state.clone()),
                Some(ClaimState::PrepareCompleted),
                "claim {claim}"
            );
            assert!(dirs.spec_path(claim).exists(), "spec of {claim} removed");
        }
        assert_eq!(
            restarted.driver.checkpoint_state().completed_claims(),
            before.completed_claims()
        );
        assert!(!dirs.spec_path(&orphan).exists(), "orphan spec kept");
    }
}

//! The DRA node service (`DRAPlugin`), served as v1 and v1beta1 from one
//! [`DraDriver`].
//!
//! A call flows: claim references from the request (deduplicated by UID) →
//! claim lookup, all claims concurrently and before any lock
//! ([`crate::claims`]) → [`Serializer`] → driver → per-claim results →
//! conversion to the version the kubelet spoke.
//!
//! Invariants:
//! - Every claim UID of the request has an entry in the response; claims
//!   that failed lookup, and claims the driver forgot, carry an error.
//! - Per-claim failures go into `error`; a gRPC error status is returned only
//!   when the whole call failed (lock, worker panic), as the kubelet then
//!   ignores the response and retries everything.
//! - Request names are stripped to the base request (`req/sub` → `req`);
//!   `share_id` is sent on v1 only (v1beta1 has no such field).
//! - The driver is not called when no claim is left to prepare (this keeps
//!   an empty Prepare, which health probes send, cheap and lock-free).
//! - The work of a call runs in its own task: if the kubelet cancels the RPC
//!   the driver call still completes, so driver state is never torn.
//!
//! Failure modes: see [`Error`] and [`crate::error::ClaimError`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::Instrument as _;

use crate::claims::{ClaimReader, lookup_claims};
use crate::driver::{ClaimRef, DraDriver, PrepareResults, PreparedDevice, UnprepareResults};
use crate::error::{ClaimError, Error};
use crate::proto::{dra_v1 as v1, dra_v1beta1 as v1beta1};
use crate::serialize::Serializer;

/// Shared state behind both protocol versions.
pub(crate) struct DraCore<D> {
    driver_name: String,
    driver: Arc<D>,
    reader: Arc<dyn ClaimReader>,
    serializer: Option<Serializer>,
    lookup_timeout: Duration,
    next_request_id: AtomicU64,
}

impl<D: DraDriver> DraCore<D> {
    pub(crate) fn new(
        driver_name: String,
        driver: Arc<D>,
        reader: Arc<dyn ClaimReader>,
        serializer: Option<Serializer>,
        lookup_timeout: Duration,
    ) -> Self {
        Self {
            driver_name,
            driver,
            reader,
            serializer,
            lookup_timeout,
            next_request_id: AtomicU64::new(1),
        }
    }

    /// Runs `work` in its own task inside a span carrying a fresh request ID.
    async fn spawn_call<T: Send + 'static>(
        &self,
        method: &'static str,
        work: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("dra", request_id, method);
        match tokio::spawn(work.instrument(span)).await {
            Ok(result) => result.map_err(tonic::Status::from),
            Err(join_error) => {
                tracing::error!(request_id, method, error = %join_error, "request worker died");
                Err(Error::TaskPanicked {
                    task: format!("{method} worker"),
                }
                .into())
            }
        }
    }

    async fn lock(&self) -> Result<Option<crate::serialize::SerialGuard>, Error> {
        match &self.serializer {
            None => Ok(None),
            Some(serializer) => serializer.lock().await.map(Some),
        }
    }

    /// Prepares the referenced claims; one entry per distinct UID.
    pub(crate) async fn prepare(
        self: Arc<Self>,
        claims: Vec<ClaimRef>,
    ) -> Result<PrepareResults, Error> {
        tracing::debug!(claims = ?claims, "prepare request");
        let mut results = PrepareResults::new();
        let valid = split_valid(claims, |uid, err| {
            results.insert(uid, Err(err));
        });
        let lookups = lookup_claims(
            self.reader.as_ref(),
            &valid,
            &self.driver_name,
            self.lookup_timeout,
        )
        .await;
        let mut ready = Vec::new();
        for (claim_ref, lookup) in valid.into_iter().zip(lookups) {
            match lookup {
                Ok(claim) => ready.push(claim),
                Err(err) => {
                    tracing::warn!(claim = %claim_ref, error = %err, "claim lookup failed");
                    results.insert(claim_ref.uid, Err(err));
                }
            }
        }
        if !ready.is_empty() {
            let asked: Vec<ClaimRef> = ready.iter().map(|c| c.claim_ref.clone()).collect();
            let mut answered = {
                let _guard = self.lock().await?;
                self.driver.prepare_resource_claims(ready).await
            };
            for claim_ref in asked {
                let outcome = answered.remove(&claim_ref.uid).unwrap_or_else(|| {
                    Err(ClaimError::MissingResult {
                        claim: claim_ref.clone(),
                    })
                });
                results.insert(claim_ref.uid, outcome);
            }
            warn_unasked(answered.keys(), "prepare");
        }
        log_outcome(
            "prepare",
            results.iter().map(|(uid, r)| (uid, r.as_ref().err())),
        );
        Ok(results)
    }

    /// Unprepares the referenced claims; one entry per distinct UID.
    pub(crate) async fn unprepare(
        self: Arc<Self>,
        claims: Vec<ClaimRef>,
    ) -> Result<UnprepareResults, Error> {
        tracing::debug!(claims = ?claims, "unprepare request");
        let mut results = UnprepareResults::new();
        let valid = split_valid(claims, |uid, err| {
            results.insert(uid, Err(err));
        });
        if !valid.is_empty() {
            let mut answered = {
                let _guard = self.lock().await?;
                self.driver.unprepare_resource_claims(valid.clone()).await
            };
            for claim_ref in valid {
                let outcome = answered.remove(&claim_ref.uid).unwrap_or_else(|| {
                    Err(ClaimError::MissingResult {
                        claim: claim_ref.clone(),
                    })
                });
                results.insert(claim_ref.uid, outcome);
            }
            warn_unasked(answered.keys(), "unprepare");
        }
        log_outcome(
            "unprepare",
            results.iter().map(|(uid, r)| (uid, r.as_ref().err())),
        );
        Ok(results)
    }
}

/// Drops duplicate UIDs (first wins) and reports references with empty
/// fields through `invalid`; returns the rest in request order.
fn split_valid(
    claims: Vec<ClaimRef>,
    mut invalid: impl FnMut(String, ClaimError),
) -> Vec<ClaimRef> {
    let mut seen = BTreeSet::new();
    let mut valid = Vec::with_capacity(claims.len());
    for claim in claims {
        if !seen.insert(claim.uid.clone()) {
            tracing::warn!(claim = %claim, "duplicate claim UID in request; ignoring repeat");
            continue;
        }
        if claim.namespace.is_empty() || claim.name.is_empty() || claim.uid.is_empty() {
            invalid(claim.uid.clone(), ClaimError::InvalidReference { claim });
        } else {
            valid.push(claim);
        }
    }
    valid
}

fn warn_unasked<'a>(uids: impl Iterator<Item = &'a String>, method: &str) {
    for uid in uids {
        tracing::warn!(uid = %uid, method, "driver returned a result for a claim it was not asked about");
    }
}

fn log_outcome<'a>(
    method: &str,
    results: impl Iterator<Item = (&'a String, Option<&'a ClaimError>)>,
) {
    for (uid, error) in results {
        match error {
            None => tracing::debug!(uid = %uid, method, "claim done"),
            Some(err) => tracing::warn!(uid = %uid, method, error = %err, "claim failed"),
        }
    }
}

/// `req/sub` → `req`; duplicates removed, first occurrence kept.
pub fn base_request_names(requests: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    requests
        .iter()
        .map(|name| name.split_once('/').map_or(name.as_str(), |(base, _)| base))
        .filter(|base| seen.insert(*base))
        .map(str::to_owned)
        .collect()
}

fn claim_refs_v1(claims: Vec<v1::Claim>) -> Vec<ClaimRef> {
    claims
        .into_iter()
        .map(|c| ClaimRef {
            namespace: c.namespace,
            name: c.name,
            uid: c.uid,
        })
        .collect()
}

fn claim_refs_v1beta1(claims: Vec<v1beta1::Claim>) -> Vec<ClaimRef> {
    claims
        .into_iter()
        .map(|c| ClaimRef {
            namespace: c.namespace,
            name: c.name,
            uid: c.uid,
        })
        .collect()
}

fn device_v1(device: PreparedDevice) -> v1::Device {
    v1::Device {
        request_names: base_request_names(&device.requests),
        pool_name: device.pool_name,
        device_name: device.device_name,
        cdi_device_ids: device.cdi_device_ids,
        share_id: device.share_id,
    }
}

fn device_v1beta1(device: PreparedDevice) -> v1beta1::Device {
    v1beta1::Device {
        request_names: base_request_names(&device.requests),
        pool_name: device.pool_name,
        device_name: device.device_name,
        cdi_device_ids: device.cdi_device_ids,
    }
}

/// Converts prepare results into the v1 response.
pub fn prepare_response_v1(results: PrepareResults) -> v1::NodePrepareResourcesResponse {
    let claims: BTreeMap<_, _> = results
        .into_iter()
        .map(|(uid, outcome)| {
            let response = match outcome {
                Ok(devices) => v1::NodePrepareResourceResponse {
                    devices: devices.into_iter().map(device_v1).collect(),
                    error: String::new(),
                },
                Err(err) => v1::NodePrepareResourceResponse {
                    devices: Vec::new(),
                    error: err.to_string(),
                },
            };
            (uid, response)
        })
        .collect();
    v1::NodePrepareResourcesResponse { claims }
}

/// Converts prepare results into the v1beta1 response (no `share_id`).
pub fn prepare_response_v1beta1(results: PrepareResults) -> v1beta1::NodePrepareResourcesResponse {
    let claims: BTreeMap<_, _> = results
        .into_iter()
        .map(|(uid, outcome)| {
            let response = match outcome {
                Ok(devices) => v1beta1::NodePrepareResourceResponse {
                    devices: devices.into_iter().map(device_v1beta1).collect(),
                    error: String::new(),
                },
                Err(err) => v1beta1::NodePrepareResourceResponse {
                    devices: Vec::new(),
                    error: err.to_string(),
                },
            };
            (uid, response)
        })
        .collect();
    v1beta1::NodePrepareResourcesResponse { claims }
}

fn unprepare_error(outcome: Result<(), ClaimError>) -> String {
    outcome.err().map(|err| err.to_string()).unwrap_or_default()
}

/// Converts unprepare results into the v1 response.
pub fn unprepare_response_v1(results: UnprepareResults) -> v1::NodeUnprepareResourcesResponse {
    v1::NodeUnprepareResourcesResponse {
        claims: results
            .into_iter()
            .map(|(uid, outcome)| {
                let error = unprepare_error(outcome);
                (uid, v1::NodeUnprepareResourceResponse { error })
            })
            .collect(),
    }
}

/// Converts unprepare results into the v1beta1 response.
pub fn unprepare_response_v1beta1(
    results: UnprepareResults,
) -> v1beta1::NodeUnprepareResourcesResponse {
    v1beta1::NodeUnprepareResourcesResponse {
        claims: results
            .into_iter()
            .map(|(uid, outcome)| {
                let error = unprepare_error(outcome);
                (uid, v1beta1::NodeUnprepareResourceResponse { error })
            })
            .collect(),
    }
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin` over a [`DraCore`].
pub(crate) struct DraV1<D>(pub(crate) Arc<DraCore<D>>);

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin` over a [`DraCore`].
pub(crate) struct DraV1beta1<D>(pub(crate) Arc<DraCore<D>>);

#[tonic::async_trait]
impl<D: DraDriver> v1::dra_plugin_server::DraPlugin for DraV1<D> {
    async fn node_prepare_resources(
        &self,
        request: tonic::Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<tonic::Response<v1::NodePrepareResourcesResponse>, tonic::Status> {
        let claims = claim_refs_v1(request.into_inner().claims);
        let core = Arc::clone(&self.0);
        let results = self
            .0
            .spawn_call("v1.NodePrepareResources", core.prepare(claims))
            .await?;
        Ok(tonic::Response::new(prepare_response_v1(results)))
    }

    async fn node_unprepare_resources(
        &self,
        request: tonic::Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<tonic::Response<v1::NodeUnprepareResourcesResponse>, tonic::Status> {
        let claims = claim_refs_v1(request.into_inner().claims);
        let core = Arc::clone(&self.0);
        let results = self
            .0
            .spawn_call("v1.NodeUnprepareResources", core.unprepare(claims))
            .await?;
        Ok(tonic::Response::new(unprepare_response_v1(results)))
    }
}

#[tonic::async_trait]
impl<D: DraDriver> v1beta1::dra_plugin_server::DraPlugin for DraV1beta1<D> {
    async fn node_prepare_resources(
        &self,
        request: tonic::Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<tonic::Response<v1beta1::NodePrepareResourcesResponse>, tonic::Status> {
        let claims = claim_refs_v1beta1(request.into_inner().claims);
        let core = Arc::clone(&self.0);
        let results = self
            .0
            .spawn_call("v1beta1.NodePrepareResources", core.prepare(claims))
            .await?;
        Ok(tonic::Response::new(prepare_response_v1beta1(results)))
    }

    async fn node_unprepare_resources(
        &self,
        request: tonic::Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<tonic::Response<v1beta1::NodeUnprepareResourcesResponse>, tonic::Status> {
        let claims = claim_refs_v1beta1(request.into_inner().claims);
        let core = Arc::clone(&self.0);
        let results = self
            .0
            .spawn_call("v1beta1.NodeUnprepareResources", core.unprepare(claims))
            .await?;
        Ok(tonic::Response::new(unprepare_response_v1beta1(results)))
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn names(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn base_request_names_table() {
        let cases: [(&[&str], &[&str]); 5] = [
            (&[], &[]),
            (&["gpu"], &["gpu"]),
            (&["gpu/large"], &["gpu"]),
            (&["gpu/large", "gpu/small", "nic"], &["gpu", "nic"]),
            (&["a/b/c", "a"], &["a"]),
        ];
        for (input, want) in cases {
            assert_eq!(
                base_request_names(&names(input)),
                names(want),
                "input {input:?}"
            );
        }
    }

    fn sample_results() -> PrepareResults {
        let device = PreparedDevice {
            requests: names(&["gpu/large"]),
            pool_name: "node-a".into(),
            device_name: "gpu-0".into(),
            cdi_device_ids: names(&["example.com/gpu=uid-1-gpu-0"]),
            share_id: Some("share-1".into()),
        };
        PrepareResults::from([
            ("uid-1".to_owned(), Ok(vec![device])),
            ("uid-2".to_owned(), Err(ClaimError::driver("no luck"))),
        ])
    }

    #[test]
    fn prepare_response_conversion() {
        let want_v1 = v1::NodePrepareResourcesResponse {
            claims: BTreeMap::from([
                (
                    "uid-1".to_owned(),
                    v1::NodePrepareResourceResponse {
                        devices: vec![v1::Device {
                            request_names: names(&["gpu"]),
                            pool_name: "node-a".into(),
                            device_name: "gpu-0".into(),
                            cdi_device_ids: names(&["example.com/gpu=uid-1-gpu-0"]),
                            share_id: Some("share-1".into()),
                        }],
                        error: String::new(),
                    },
                ),
                (
                    "uid-2".to_owned(),
                    v1::NodePrepareResourceResponse {
                        devices: vec![],
                        error: "no luck".into(),
                    },
                ),
            ]),
        };
        assert_eq!(prepare_response_v1(sample_results()), want_v1);

        let want_v1beta1 = v1beta1::NodePrepareResourcesResponse {
            claims: BTreeMap::from([
                (
                    "uid-1".to_owned(),
                    v1beta1::NodePrepareResourceResponse {
                        devices: vec![v1beta1::Device {
                            request_names: names(&["gpu"]),
                            pool_name: "node-a".into(),
                            device_name: "gpu-0".into(),
                            cdi_device_ids: names(&["example.com/gpu=uid-1-gpu-0"]),
                        }],
                        error: String::new(),
                    },
                ),
                (
                    "uid-2".to_owned(),
                    v1beta1::NodePrepareResourceResponse {
                        devices: vec![],
                        error: "no luck".into(),
                    },
                ),
            ]),
        };
        assert_eq!(prepare_response_v1beta1(sample_results()), want_v1beta1);
    }

    #[test]
    fn unprepare_response_conversion() {
        let results = UnprepareResults::from([
            ("uid-1".to_owned(), Ok(())),
            ("uid-2".to_owned(), Err(ClaimError::driver("busy"))),
        ]);
        let got = unprepare_response_v1(results.clone());
        assert_eq!(
            got.claims,
            BTreeMap::from([
                (
                    "uid-1".to_owned(),
                    v1::NodeUnprepareResourceResponse {
                        error: String::new()
                    }
                ),
                (
                    "uid-2".to_owned(),
                    v1::NodeUnprepareResourceResponse {
                        error: "busy".into()
                    }
                ),
            ])
        );
        let got = unprepare_response_v1beta1(results);
        assert_eq!(got.claims["uid-2"].error, "busy");
        assert_eq!(got.claims["uid-1"].error, "");
    }

    #[test]
    fn split_valid_dedupes_and_rejects_empty_fields() {
        let mut invalid = Vec::new();
        let valid = split_valid(
            vec![
                ClaimRef::new("ns", "a", "uid-1"),
                ClaimRef::new("ns", "a-again", "uid-1"),
                ClaimRef::new("", "b", "uid-2"),
                ClaimRef::new("ns", "c", "uid-3"),
            ],
            |uid, err| invalid.push((uid, err.to_string())),
        );
        assert_eq!(
            valid,
            vec![
                ClaimRef::new("ns", "a", "uid-1"),
                ClaimRef::new("ns", "c", "uid-3")
            ]
        );
        assert_eq!(
            invalid,
            vec![(
                "uid-2".to_owned(),
                "invalid claim reference /b (uid uid-2): namespace, name and uid are required"
                    .to_owned()
            )]
        );
    }
}

//! Reading and checking the ResourceClaims named in a Prepare call.
//!
//! The kubelet sends only namespace, name and UID. Before the serialization
//! lock is taken, every claim is read from `resource.k8s.io/v1` through a
//! [`ClaimReader`] (all claims of a call concurrently, each bounded by a
//! timeout) and passed through [`select_for_driver`], a pure function that
//! checks the claim and extracts this driver's share of the allocation.
//!
//! Invariants:
//! - A claim that fails lookup or checking fails alone, with a
//!   [`ClaimError`] naming namespace, name and UID; the other claims of the
//!   call proceed.
//! - A claim whose UID differs from the kubelet's was deleted and recreated;
//!   it is never prepared under the old UID.
//! - Only `status.allocation.devices.config` is read for configs: the API
//!   server already merged class and claim configs there. Other drivers'
//!   configs are skipped; configs that are not opaque cannot be attributed
//!   to a driver and fail the claim, as upstream drivers do.
//!
//! Failure modes: API errors and timeouts become per-claim errors and the
//! kubelet retries the claim; a 404 becomes [`ClaimError::NotFound`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::resource::v1::ResourceClaim;

use crate::driver::{ClaimRef, ConfigSource, OpaqueConfig, PrepareClaim};
use crate::error::{BoxError, ClaimError, error_chain};

/// Reads ResourceClaims by namespace and name.
///
/// Dyn-compatible (it returns a boxed future) so the plugin can hold any
/// reader without another type parameter; one boxed future per claim read
/// is noise next to an API round trip.
pub trait ClaimReader: Send + Sync + 'static {
    /// Returns the claim, `Ok(None)` if it does not exist, or the read error.
    fn read_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>>;
}

impl ClaimReader for kube::Client {
    fn read_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>> {
        Box::pin(async move {
            let api = kube::Api::<ResourceClaim>::namespaced(self.clone(), namespace);
            api.get_opt(name).await.map_err(BoxError::from)
        })
    }
}

impl<R: ClaimReader + ?Sized> ClaimReader for Arc<R> {
    fn read_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>> {
        (**self).read_claim(namespace, name)
    }
}

/// An in-memory [`ClaimReader`] for tests of drivers and agents.
///
/// Entries are keyed by namespace and name; an entry can also hold a read
/// error to simulate API failures.
#[derive(Debug, Default)]
pub struct InMemoryClaimReader {
    entries: Mutex<BTreeMap<(String, String), Result<ResourceClaim, String>>>,
}

impl InMemoryClaimReader {
    /// An empty reader: every claim is "not found".
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores (or replaces) a claim under its metadata namespace and name.
    pub fn insert(&self, claim: ResourceClaim) {
        let key = (
            claim.metadata.namespace.clone().unwrap_or_default(),
            claim.metadata.name.clone().unwrap_or_default(),
        );
        self.entries().insert(key, Ok(claim));
    }

    /// Makes reads of `namespace/name` fail with `message`.
    pub fn insert_error(&self, namespace: &str, name: &str, message: &str) {
        self.entries().insert(
            (namespace.to_owned(), name.to_owned()),
            Err(message.to_owned()),
        );
    }

    /// Forgets `namespace/name`, so reads return "not found".
    pub fn remove(&self, namespace: &str, name: &str) {
        self.entries()
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    fn entries(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Result<ResourceClaim, String>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every operation is a single insert, remove or clone).
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ClaimReader for InMemoryClaimReader {
    fn read_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>> {
        let entry = self
            .entries()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned();
        Box::pin(async move {
            match entry {
                None => Ok(None),
                Some(Ok(claim)) => Ok(Some(claim)),
                Some(Err(message)) => Err(BoxError::from(message)),
            }
        })
    }
}

/// Checks a claim read from the API server and extracts this driver's part.
///
/// Pure and deterministic. Checks in order: the UID matches, the claim is
/// allocated, at least one allocation result belongs to `driver_name`, and
/// every config is opaque with a known source. Results keep allocation
/// order; configs are ordered class before claim, each group in allocation
/// order.
pub fn select_for_driver(
    claim_ref: &ClaimRef,
    claim: ResourceClaim,
    driver_name: &str,
) -> Result<PrepareClaim, ClaimError> {
    let actual_uid = claim.metadata.uid.as_deref().unwrap_or_default();
    if actual_uid != claim_ref.uid {
        return Err(ClaimError::Replaced {
            namespace: claim_ref.namespace.clone(),
            name: claim_ref.name.clone(),
            actual: actual_uid.to_owned(),
            expected: claim_ref.uid.clone(),
        });
    }
    let Some(allocation) = claim.status.as_ref().and_then(|s| s.allocation.as_ref()) else {
        return Err(ClaimError::NotAllocated {
            claim: claim_ref.clone(),
        });
    };
    let devices = allocation.devices.as_ref();

    let results: Vec<_> = devices
        .and_then(|d| d.results.as_ref())
        .into_iter()
        .flatten()
        .filter(|result| result.driver == driver_name)
        .cloned()
        .collect();
    if results.is_empty() {
        return Err(ClaimError::NothingForDriver {
            claim: claim_ref.clone(),
            driver: driver_name.to_owned(),
        });
    }

    let mut from_class = Vec::new();
    let mut from_claim = Vec::new();
    for (index, config) in devices
        .and_then(|d| d.config.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(opaque) = config.opaque.as_ref() else {
            return Err(ClaimError::NonOpaqueConfig {
                claim: claim_ref.clone(),
                index,
            });
        };
        if opaque.driver != driver_name {
            continue;
        }
        let source = match config.source.as_str() {
            "FromClass" => ConfigSource::FromClass,
            "FromClaim" => ConfigSource::FromClaim,
            other => {
                return Err(ClaimError::UnknownConfigSource {
                    claim: claim_ref.clone(),
                    index,
                    found: other.to_owned(),
                });
            }
        };
        let entry = OpaqueConfig {
            source,
            requests: config.requests.clone().unwrap_or_default(),
            parameters: opaque.parameters.0.clone(),
        };
        match source {
            ConfigSource::FromClass => from_class.push(entry),
            ConfigSource::FromClaim => from_claim.push(entry),
        }
    }
    from_class.append(&mut from_claim);

    Ok(PrepareClaim {
        claim_ref: claim_ref.clone(),
        claim,
        results,
        configs: from_class,
    })
}

/// Reads and checks one claim, bounded by `timeout`.
pub async fn lookup_claim(
    reader: &dyn ClaimReader,
    claim_ref: &ClaimRef,
    driver_name: &str,
    timeout: Duration,
) -> Result<PrepareClaim, ClaimError> {
    let read = reader.read_claim(&claim_ref.namespace, &claim_ref.name);
    let claim = match tokio::time::timeout(timeout, read).await {
        Err(_elapsed) => {
            return Err(ClaimError::ReadTimeout {
                claim: claim_ref.clone(),
                seconds: timeout.as_secs(),
            });
        }
        Ok(Err(err)) => {
            return Err(ClaimError::Read {
                claim: claim_ref.clone(),
                message: error_chain(err.as_ref()),
            });
        }
        Ok(Ok(None)) => {
            return Err(ClaimError::NotFound {
                claim: claim_ref.clone(),
            });
        }
        Ok(Ok(Some(claim))) => claim,
    };
    select_for_driver(claim_ref, claim, driver_name)
}

/// Reads and checks all claims concurrently; results are in input order.
pub async fn lookup_claims(
    reader: &dyn ClaimReader,
    claims: &[ClaimRef],
    driver_name: &str,
    timeout: Duration,
) -> Vec<Result<PrepareClaim, ClaimError>> {
    futures::future::join_all(
        claims
            .iter()
            .map(|claim_ref| lookup_claim(reader, claim_ref, driver_name, timeout)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::resource::v1::{
        AllocationResult, DeviceAllocationConfiguration, DeviceAllocationResult,
        DeviceRequestAllocationResult, OpaqueDeviceConfiguration, ResourceClaimStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
    use pretty_assertions::assert_eq;
    use serde_json::json;

    use super::*;

    const DRIVER: &str = "gpu.example.com";

    fn claim_ref() -> ClaimRef {
        ClaimRef::new("ns", "claim", "uid-1")
    }

    fn result(request: &str, driver: &str, device: &str) -> DeviceRequestAllocationResult {
        DeviceRequestAllocationResult {
            request: request.into(),
            driver: driver.into(),
            pool: "pool".into(),
            device: device.into(),
            ..Default::default()
        }
    }

    fn config(
        source: &str,
        driver: Option<&str>,
        requests: &[&str],
    ) -> DeviceAllocationConfiguration {
        DeviceAllocationConfiguration {
            source: source.into(),
            requests: (!requests.is_empty())
                .then(|| requests.iter().map(|r| (*r).to_owned()).collect()),
            opaque: driver.map(|driver| OpaqueDeviceConfiguration {
                driver: driver.into(),
                parameters: RawExtension(json!({"source": source, "requests": requests})),
            }),
        }
    }

    fn claim(
        uid: &str,
        results: Option<Vec<DeviceRequestAllocationResult>>,
        config: Vec<DeviceAllocationConfiguration>,
    ) -> ResourceClaim {
        ResourceClaim {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("claim".into()),
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

    /// (request, device) pairs and (source, requests) pairs of a selection.
    type Summary = (Vec<(String, String)>, Vec<(ConfigSource, Vec<String>)>);

    fn summarize(selected: Result<PrepareClaim, ClaimError>) -> Result<Summary, String> {
        let selected = selected.map_err(|err| err.to_string())?;
        Ok((
            selected
                .results
                .iter()
                .map(|r| (r.request.clone(), r.device.clone()))
                .collect(),
            selected
                .configs
                .iter()
                .map(|c| (c.source, c.requests.clone()))
                .collect(),
        ))
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn select_for_driver_table() {
        use ConfigSource::{FromClaim, FromClass};
        let cases: Vec<(&str, ResourceClaim, Result<Summary, String>)> = vec![
            (
                "uid mismatch",
                claim("uid-2", Some(vec![result("a", DRIVER, "gpu-0")]), vec![]),
                Err("claim ns/claim was replaced: UID uid-2, expected uid-1".into()),
            ),
            (
                "missing uid counts as mismatch",
                ResourceClaim {
                    metadata: ObjectMeta::default(),
                    ..Default::default()
                },
                Err("claim ns/claim was replaced: UID , expected uid-1".into()),
            ),
            (
                "not allocated",
                claim("uid-1", None, vec![]),
                Err("claim ns/claim (uid uid-1) is not allocated".into()),
            ),
            (
                "allocated to other drivers only",
                claim("uid-1", Some(vec![result("a", "other.example.com", "nic-0")]), vec![]),
                Err("claim ns/claim (uid uid-1) has no devices allocated by driver gpu.example.com".into()),
            ),
            (
                "only this driver's results, in order",
                claim(
                    "uid-1",
                    Some(vec![
                        result("b", DRIVER, "gpu-1"),
                        result("a", "other.example.com", "nic-0"),
                        result("a/sub", DRIVER, "gpu-0"),
                    ]),
                    vec![],
                ),
                Ok((owned(&[("b", "gpu-1"), ("a/sub", "gpu-0")]), vec![])),
            ),
            (
                "class configs before claim configs, other drivers skipped",
                claim(
                    "uid-1",
                    Some(vec![result("a", DRIVER, "gpu-0")]),
                    vec![
                        config("FromClaim", Some(DRIVER), &["a"]),
                        config("FromClass", Some(DRIVER), &[]),
                        config("FromClass", Some("other.example.com"), &[]),
                        config("FromClaim", Some(DRIVER), &["b", "a/sub"]),
                        config("FromClass", Some(DRIVER), &["a"]),
                    ],
                ),
                Ok((
                    owned(&[("a", "gpu-0")]),
                    vec![
                        (FromClass, vec![]),
                        (FromClass, vec!["a".into()]),
                        (FromClaim, vec!["a".into()]),
                        (FromClaim, vec!["b".into(), "a/sub".into()]),
                    ],
                )),
            ),
            (
                "non-opaque config fails the claim",
                claim(
                    "uid-1",
                    Some(vec![result("a", DRIVER, "gpu-0")]),
                    vec![config("FromClass", Some(DRIVER), &[]), config("FromClaim", None, &[])],
                ),
                Err("claim ns/claim (uid uid-1): allocation config #1 is not an opaque configuration; only opaque configurations are supported".into()),
            ),
            (
                "unknown source of our config fails the claim",
                claim(
                    "uid-1",
                    Some(vec![result("a", DRIVER, "gpu-0")]),
                    vec![config("FromNowhere", Some(DRIVER), &[])],
                ),
                Err("claim ns/claim (uid uid-1): allocation config #0 has unknown source \"FromNowhere\"".into()),
            ),
            (
                "unknown source of another driver's config is not our business",
                claim(
                    "uid-1",
                    Some(vec![result("a", DRIVER, "gpu-0")]),
                    vec![config("FromNowhere", Some("other.example.com"), &[])],
                ),
                Ok((owned(&[("a", "gpu-0")]), vec![])),
            ),
        ];
        for (name, input, want) in cases {
            let got = summarize(select_for_driver(&claim_ref(), input, DRIVER));
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn select_keeps_parameters_and_claim() {
        let input = claim(
            "uid-1",
            Some(vec![result("a", DRIVER, "gpu-0")]),
            vec![config("FromClaim", Some(DRIVER), &["a"])],
        );
        let selected = select_for_driver(&claim_ref(), input.clone(), DRIVER).unwrap();
        assert_eq!(selected.claim_ref, claim_ref());
        assert_eq!(selected.claim, input);
        assert_eq!(
            selected.configs[0].parameters,
            json!({"source": "FromClaim", "requests": ["a"]})
        );
    }

    #[tokio::test]
    async fn lookup_errors_name_the_claim() {
        let reader = InMemoryClaimReader::new();
        reader.insert(claim(
            "uid-1",
            Some(vec![result("a", DRIVER, "gpu-0")]),
            vec![],
        ));
        reader.insert_error("ns", "broken", "connection refused");
        let refs = vec![
            claim_ref(),
            ClaimRef::new("ns", "missing", "uid-2"),
            ClaimRef::new("ns", "broken", "uid-3"),
        ];
        let got: Vec<_> = lookup_claims(&reader, &refs, DRIVER, Duration::from_secs(5))
            .await
            .into_iter()
            .map(|r| r.map(|c| c.claim_ref.uid).map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                Ok("uid-1".to_owned()),
                Err("claim ns/missing (uid uid-2) not found".to_owned()),
                Err("reading claim ns/broken (uid uid-3) failed: connection refused".to_owned()),
            ]
        );
    }

    struct SlowReader;

    impl ClaimReader for SlowReader {
        fn read_claim<'a>(
            &'a self,
            _namespace: &'a str,
            _name: &'a str,
        ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(None)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lookup_times_out() {
        let got = lookup_claim(&SlowReader, &claim_ref(), DRIVER, Duration::from_secs(10))
            .await
            .map(|c| c.claim_ref)
            .map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err("reading claim ns/claim (uid uid-1) timed out after 10 s".to_owned())
        );
    }
}

//! Which ResourceClaims a pod needs, which drivers prepare them, and when a
//! claim may be unprepared.
//!
//! Like the kubelet, the emulator prepares a pod's claims only once each is
//! allocated and reserved for the pod, sends each driver all of the pod's
//! claims with results from that driver in one call, and unprepares a claim
//! only when no live pod on the node uses it any more ([`ClaimCache`]). A
//! per-claim lock orders a prepare for a new user after an unprepare that
//! an earlier last user started.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use nvdra_kubelet_plugin::ClaimRef;

use crate::dra::PreparedDevice;

/// The names of the ResourceClaims `pod` uses, in `spec.resourceClaims`
/// order, then the extended-resource claim; `Err` says what is still
/// missing (a template's generated claim not yet in the pod status).
pub fn claim_names(pod: &Pod) -> Result<Vec<String>, String> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_deref())
        .unwrap_or_default();
    let mut names = Vec::new();
    for entry in pod
        .spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_deref())
        .unwrap_or_default()
    {
        if let Some(name) = &entry.resource_claim_name {
            names.push(name.clone());
        } else if entry.resource_claim_template_name.is_some() {
            match statuses.iter().find(|s| s.name == entry.name) {
                // No name means no claim was needed (the API's contract).
                Some(status) => names.extend(status.resource_claim_name.clone()),
                None => {
                    return Err(format!(
                        "waiting for the ResourceClaim generated for pod claim {:?}",
                        entry.name
                    ));
                }
            }
        }
    }
    if let Some(ext) = pod
        .status
        .as_ref()
        .and_then(|s| s.extended_resource_claim_status.as_ref())
    {
        names.push(ext.resource_claim_name.clone());
    }
    Ok(names)
}

/// Why `claim` cannot be prepared for the pod with `pod_uid` yet, if so.
pub fn not_ready(claim: &ResourceClaim, pod_uid: &str) -> Option<String> {
    let name = claim_key(claim);
    let status = claim.status.as_ref();
    if status.and_then(|s| s.allocation.as_ref()).is_none() {
        return Some(format!("ResourceClaim {name} is not allocated"));
    }
    let reserved = status
        .and_then(|s| s.reserved_for.as_ref())
        .is_some_and(|r| r.iter().any(|c| c.uid == pod_uid));
    (!reserved).then(|| format!("ResourceClaim {name} is not reserved for pod {pod_uid}"))
}

fn claim_key(claim: &ResourceClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The claim's identity for the DRA API.
pub fn claim_ref(claim: &ResourceClaim) -> ClaimRef {
    let m = &claim.metadata;
    ClaimRef::new(
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
        m.uid.clone().unwrap_or_default(),
    )
}

/// The drivers with allocation results in `claim`, sorted.
pub fn drivers(claim: &ResourceClaim) -> BTreeSet<String> {
    results(claim).iter().map(|r| r.driver.clone()).collect()
}

fn results(
    claim: &ResourceClaim,
) -> &[k8s_openapi::api::resource::v1::DeviceRequestAllocationResult] {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_deref())
        .unwrap_or_default()
}

/// Driver → the claims (in the given order) with results from it.
pub fn by_driver(claims: &[ResourceClaim]) -> BTreeMap<String, Vec<ClaimRef>> {
    let mut out: BTreeMap<String, Vec<ClaimRef>> = BTreeMap::new();
    for claim in claims {
        for driver in drivers(claim) {
            out.entry(driver).or_default().push(claim_ref(claim));
        }
    }
    out
}

/// Request → device (`driver/pool/device`) → CDI IDs, for one claim.
pub type ClaimDevices = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// Places each prepared device of `claim` under the allocation results it
/// serves. A device the allocation does not mention (a plugin bug) is
/// listed under its own request names, or `""`, so that it still shows.
pub fn claim_devices(
    claim: &ResourceClaim,
    driver: &str,
    devices: &[PreparedDevice],
) -> ClaimDevices {
    let mut out = ClaimDevices::new();
    let mut used = vec![false; devices.len()];
    for r in results(claim).iter().filter(|r| r.driver == driver) {
        let base = r.request.split('/').next().unwrap_or_default();
        for (i, d) in devices.iter().enumerate() {
            let serves = d.request_names.is_empty()
                || d.request_names.iter().any(|n| n == base || *n == r.request);
            if d.pool == r.pool && d.device == r.device && serves {
                used[i] = true;
                out.entry(r.request.clone()).or_default().insert(
                    format!("{driver}/{}/{}", d.pool, d.device),
                    d.cdi_device_ids.clone(),
                );
            }
        }
    }
    for (d, _) in devices.iter().zip(used).filter(|(_, used)| !used) {
        let requests = if d.request_names.is_empty() {
            vec![String::new()]
        } else {
            d.request_names.clone()
        };
        for request in requests {
            out.entry(request).or_default().insert(
                format!("{driver}/{}/{}", d.pool, d.device),
                d.cdi_device_ids.clone(),
            );
        }
    }
    out
}

/// Which pods on this node use which claims; decides when to unprepare.
#[derive(Debug, Default)]
pub struct ClaimCache {
    inner: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    claim: ClaimRef,
    drivers: BTreeSet<String>,
    pods: BTreeSet<String>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// A claim to unprepare: its drivers and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The drivers to call.
    pub drivers: BTreeSet<String>,
    /// The claim.
    pub claim: ClaimRef,
}

impl ClaimCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `pod` uses `claims` (before preparing them), and returns
    /// the claims' locks, ordered by claim UID, to hold while preparing.
    pub fn add(
        &self,
        pod: &str,
        claims: &[(ClaimRef, BTreeSet<String>)],
    ) -> Vec<Arc<tokio::sync::Mutex<()>>> {
        let mut entries = self.entries();
        let mut locks = BTreeMap::new();
        for (claim, drivers) in claims {
            let entry = entries.entry(claim.uid.clone()).or_insert_with(|| Entry {
                claim: claim.clone(),
                drivers: BTreeSet::new(),
                pods: BTreeSet::new(),
                lock: Arc::default(),
            });
            entry.drivers.extend(drivers.iter().cloned());
            entry.pods.insert(pod.to_owned());
            locks.insert(claim.uid.clone(), entry.lock.clone());
        }
        locks.into_values().collect()
    }

    /// Forgets `pod`; returns the claims nobody uses any more, each with its
    /// lock, to hold while unpreparing. Their entries are dropped.
    pub fn release(&self, pod: &str) -> Vec<(Release, Arc<tokio::sync::Mutex<()>>)> {
        let mut entries = self.entries();
        let mut out = Vec::new();
        entries.retain(|_, e| {
            if !e.pods.remove(pod) || !e.pods.is_empty() {
                return true;
            }
            out.push((
                Release {
                    drivers: e.drivers.clone(),
                    claim: e.claim.clone(),
                },
                e.lock.clone(),
            ));
            false
        });
        out.sort_by(|a, b| a.0.claim.uid.cmp(&b.0.claim.uid));
        out
    }

    /// The pods using each claim (for tests and logs).
    pub fn users(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.entries()
            .iter()
            .map(|(uid, e)| (uid.clone(), e.pods.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PodResourceClaim, PodResourceClaimStatus, PodSpec, PodStatus,
    };
    use k8s_openapi::api::resource::v1::{
        AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult,
        ResourceClaimConsumerReference, ResourceClaimSpec, ResourceClaimStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    fn pod(
        claims: &[(&str, Option<&str>, Option<&str>)],
        statuses: Option<&[(&str, Option<&str>)]>,
    ) -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                resource_claims: Some(
                    claims
                        .iter()
                        .map(|(name, claim, template)| PodResourceClaim {
                            name: (*name).into(),
                            resource_claim_name: claim.map(Into::into),
                            resource_claim_template_name: template.map(Into::into),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: Some(PodStatus {
                resource_claim_statuses: statuses.map(|s| {
                    s.iter()
                        .map(|(name, claim)| PodResourceClaimStatus {
                            name: (*name).into(),
                            resource_claim_name: claim.map(Into::into),
                        })
                        .collect()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn claim_names_come_from_spec_or_template_status() {
        let cases: &[(Pod, Result<Vec<&str>, &str>)] = &[
            (pod(&[], None), Ok(vec![])),
            (
                pod(&[("a", Some("shared"), None)], None),
                Ok(vec!["shared"]),
            ),
            (
                pod(
                    &[("a", Some("shared"), None), ("gpu", None, Some("t"))],
                    Some(&[("gpu", Some("p-gpu-x7"))]),
                ),
                Ok(vec!["shared", "p-gpu-x7"]),
            ),
            (
                pod(&[("gpu", None, Some("t"))], None),
                Err(r#"waiting for the ResourceClaim generated for pod claim "gpu""#),
            ),
            (
                pod(&[("gpu", None, Some("t"))], Some(&[("other", Some("x"))])),
                Err(r#"waiting for the ResourceClaim generated for pod claim "gpu""#),
            ),
            // A status entry without a name: no claim was needed.
            (
                pod(&[("gpu", None, Some("t"))], Some(&[("gpu", None)])),
                Ok(vec![]),
            ),
        ];
        for (p, want) in cases {
            let want = want
                .clone()
                .map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .map_err(str::to_owned);
            assert_eq!(claim_names(p), want, "{:?}", p.spec);
        }
    }

    fn claim(name: &str, results: &[(&str, &str, &str, &str)], reserved: &[&str]) -> ResourceClaim {
        ResourceClaim {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: ResourceClaimSpec::default(),
            status: Some(ResourceClaimStatus {
                allocation: (!results.is_empty()).then(|| AllocationResult {
                    devices: Some(DeviceAllocationResult {
                        results: Some(
                            results
                                .iter()
                                .map(|(request, driver, pool, device)| {
                                    DeviceRequestAllocationResult {
                                        request: (*request).into(),
                                        driver: (*driver).into(),
                                        pool: (*pool).into(),
                                        device: (*device).into(),
                                        ..Default::default()
                                    }
                                })
                                .collect(),
                        ),
                        config: None,
                    }),
                    ..Default::default()
                }),
                reserved_for: Some(
                    reserved
                        .iter()
                        .map(|uid| ResourceClaimConsumerReference {
                            resource: "pods".into(),
                            name: "p".into(),
                            uid: (*uid).into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn claims_must_be_allocated_and_reserved_for_the_pod() {
        let gpu = [("gpu", "gpu.nvidia.com", "node-a", "gpu-0")];
        assert_eq!(not_ready(&claim("c", &gpu, &["pod-1"]), "pod-1"), None);
        assert_eq!(
            not_ready(&claim("c", &gpu, &["pod-2"]), "pod-1"),
            Some("ResourceClaim ns/c is not reserved for pod pod-1".into())
        );
        assert_eq!(
            not_ready(&claim("c", &[], &["pod-1"]), "pod-1"),
            Some("ResourceClaim ns/c is not allocated".into())
        );
    }

    #[test]
    fn by_driver_sends_each_driver_all_claims_it_serves() {
        let claims = [
            claim(
                "a",
                &[
                    ("gpu", "gpu.nvidia.com", "n", "gpu-0"),
                    ("gpu", "gpu.nvidia.com", "n", "gpu-1"),
                ],
                &[],
            ),
            claim(
                "b",
                &[
                    ("ch", "compute-domain.nvidia.com", "n", "channel-0"),
                    ("gpu", "gpu.nvidia.com", "n", "gpu-2"),
                ],
                &[],
            ),
            claim(
                "c",
                &[("ch", "compute-domain.nvidia.com", "n", "daemon-0")],
                &[],
            ),
        ];
        let got: Vec<(String, Vec<String>)> = by_driver(&claims)
            .into_iter()
            .map(|(d, refs)| {
                (
                    d,
                    refs.into_iter()
                        .map(|r| format!("{}/{} {}", r.namespace, r.name, r.uid))
                        .collect(),
                )
            })
            .collect();
        let want: Vec<(String, Vec<String>)> = vec![
            (
                "compute-domain.nvidia.com".into(),
                vec!["ns/b uid-b".into(), "ns/c uid-c".into()],
            ),
            (
                "gpu.nvidia.com".into(),
                vec!["ns/a uid-a".into(), "ns/b uid-b".into()],
            ),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn claim_devices_places_devices_under_their_requests() {
        let c = claim(
            "a",
            &[
                ("gpus/big", "gpu.nvidia.com", "n", "gpu-0"),
                ("mig", "gpu.nvidia.com", "n", "gpu-1-mig-1g"),
                ("ch", "compute-domain.nvidia.com", "n", "channel-0"),
            ],
            &[],
        );
        let dev = |requests: &[&str], device: &str, id: &str| PreparedDevice {
            request_names: requests.iter().map(|r| (*r).to_owned()).collect(),
            pool: "n".into(),
            device: device.into(),
            cdi_device_ids: vec![id.into()],
        };
        let got = claim_devices(
            &c,
            "gpu.nvidia.com",
            &[
                dev(&["gpus"], "gpu-0", "k/c=0"),
                dev(&[], "gpu-1-mig-1g", "k/c=1"),
                dev(&["x"], "stray", "k/c=2"),
            ],
        );
        let entry = |request: &str, device: &str, id: &str| {
            (
                request.to_owned(),
                BTreeMap::from([(format!("gpu.nvidia.com/n/{device}"), vec![id.to_owned()])]),
            )
        };
        let want: ClaimDevices = [
            entry("gpus/big", "gpu-0", "k/c=0"),
            entry("mig", "gpu-1-mig-1g", "k/c=1"),
            entry("x", "stray", "k/c=2"),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn cache_unprepares_a_claim_only_after_its_last_user() {
        let cache = ClaimCache::default();
        let shared = ClaimRef::new("ns", "shared", "u-shared");
        let own = ClaimRef::new("ns", "own", "u-own");
        let gpu: BTreeSet<String> = ["gpu.nvidia.com".to_owned()].into();
        assert_eq!(
            cache
                .add(
                    "pod-1",
                    &[(shared.clone(), gpu.clone()), (own.clone(), gpu.clone())]
                )
                .len(),
            2
        );
        assert_eq!(
            cache.add("pod-2", &[(shared.clone(), gpu.clone())]).len(),
            1
        );
        // Re-adding (emulator restart, retried prepare) is idempotent.
        cache.add("pod-2", &[(shared.clone(), gpu.clone())]);
        let released = |pod: &str| {
            cache
                .release(pod)
                .into_iter()
                .map(|(r, _)| r)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            released("pod-1"),
            vec![Release {
                drivers: gpu.clone(),
                claim: own
            }]
        );
        assert_eq!(
            cache.users(),
            BTreeMap::from([("u-shared".to_owned(), BTreeSet::from(["pod-2".to_owned()]))])
        );
        assert_eq!(released("pod-1"), vec![]);
        assert_eq!(
            released("pod-2"),
            vec![Release {
                drivers: gpu,
                claim: shared
            }]
        );
        assert_eq!(cache.users(), BTreeMap::new());
    }
}

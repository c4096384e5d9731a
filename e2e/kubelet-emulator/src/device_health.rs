//! The kubelet's side of the DRA resource-health stream: for every plugin
//! that advertises `v1alpha1.DRAResourceHealth`, watch `NodeWatchResources`
//! (re-opened every [`RETRY`] after a failure, as the kubelet does) and
//! keep the latest health of each device; pod workers show it in their
//! containers' `allocatedResourcesStatus`.
//!
//! Entries are keyed `driver/pool/device`, the resource ID the kubelet
//! reports. Each response replaces everything the driver said before (the
//! protocol sends the complete list). A status entry is named as the API
//! server requires: `claim:<pod claim name>/<request>` when the container
//! names a request, else `claim:<pod claim name>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ResourceHealth, ResourceStatus};
use nvdra_kubelet_plugin::proto::health_v1alpha1::dra_resource_health_client::DraResourceHealthClient;
use nvdra_kubelet_plugin::proto::health_v1alpha1::{HealthStatus, NodeWatchResourcesRequest};
use tokio::sync::watch;

use crate::claims::ClaimDevices;

/// How long after a failed or ended stream it is opened again.
pub const RETRY: Duration = Duration::from_secs(5);

/// The latest health of every device a plugin reported.
pub struct DeviceHealth {
    state: Mutex<HashMap<String, String>>,
    followed: Mutex<BTreeSet<(String, PathBuf)>>,
    changed: watch::Sender<u64>,
}

impl Default for DeviceHealth {
    fn default() -> Self {
        Self {
            state: Mutex::new(HashMap::new()),
            followed: Mutex::new(BTreeSet::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl DeviceHealth {
    /// Bumped after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// `Healthy`, `Unhealthy` or `Unknown` for `driver/pool/device`, if the
    /// driver said.
    pub fn get(&self, id: &str) -> Option<String> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces what `driver` said with `devices`.
    fn replace(&self, driver: &str, devices: HashMap<String, String>) {
        let prefix = format!("{driver}/");
        let changed = {
            let mut state = self.lock();
            let before: HashMap<String, String> = state
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if before == devices {
                false
            } else {
                state.retain(|k, _| !k.starts_with(&prefix));
                state.extend(devices);
                true
            }
        };
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Starts following `driver`'s stream at `endpoint`, once per pair.
    pub fn follow(self: &Arc<Self>, driver: &str, endpoint: PathBuf) {
        let key = (driver.to_owned(), endpoint.clone());
        let new = self
            .followed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key);
        if !new {
            return;
        }
        let this = Arc::clone(self);
        let driver = driver.to_owned();
        tokio::spawn(async move {
            loop {
                if let Err(err) = this.watch_once(&driver, &endpoint).await {
                    tracing::debug!(%driver, error = %err, "resource health stream ended; re-opening");
                }
                tokio::time::sleep(RETRY).await;
            }
        });
    }

    async fn watch_once(&self, driver: &str, endpoint: &std::path::Path) -> Result<(), String> {
        let channel = crate::registry::connect(endpoint, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = DraResourceHealthClient::new(channel)
            .node_watch_resources(NodeWatchResourcesRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        tracing::info!(%driver, "watching device health");
        while let Some(response) = stream.message().await.map_err(|e| e.to_string())? {
            let devices = response
                .devices
                .into_iter()
                .filter_map(|d| {
                    let id = d.device?;
                    let health = match HealthStatus::try_from(d.health) {
                        Ok(HealthStatus::Healthy) => "Healthy",
                        Ok(HealthStatus::Unhealthy) => "Unhealthy",
                        _ => "Unknown",
                    };
                    Some((
                        format!("{driver}/{}/{}", id.pool_name, id.device_name),
                        health.to_owned(),
                    ))
                })
                .collect();
            self.replace(driver, devices);
        }
        Ok(())
    }
}

/// The `allocatedResourcesStatus` of each of `pod`'s containers, by name,
/// from the devices prepared for its claims (`devices`: ResourceClaim name
/// → request → `driver/pool/device`) and what the plugins said of them.
pub fn container_status(
    pod: &Pod,
    devices: &BTreeMap<String, ClaimDevices>,
    health: &DeviceHealth,
) -> BTreeMap<String, Vec<ResourceStatus>> {
    let spec = pod.spec.as_ref();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_deref())
        .unwrap_or_default();
    // Pod claim name → ResourceClaim name.
    let claim_of = |pod_claim: &str| -> Option<String> {
        let entry = spec?
            .resource_claims
            .as_deref()?
            .iter()
            .find(|c| c.name == pod_claim)?;
        entry.resource_claim_name.clone().or_else(|| {
            statuses
                .iter()
                .find(|s| s.name == pod_claim)
                .and_then(|s| s.resource_claim_name.clone())
        })
    };
    let mut out = BTreeMap::new();
    for container in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        let mut entries = Vec::new();
        let claims = container
            .resources
            .as_ref()
            .and_then(|r| r.claims.as_deref())
            .unwrap_or_default();
        for claim in claims {
            let Some(requests) = claim_of(&claim.name).and_then(|n| devices.get(&n)) else {
                continue;
            };
            // The API server's rule: `claim:<name>/<request>` when the
            // container names a request, else `claim:<name>` for all.
            let resources: Vec<ResourceHealth> = requests
                .iter()
                .filter(|(request, _)| claim.request.as_ref().is_none_or(|r| r == *request))
                .flat_map(|(_, ids)| ids.keys())
                // Only devices a plugin reported on: drivers without the
                // stream leave pod statuses as they were.
                .filter_map(|id| {
                    Some(ResourceHealth {
                        resource_id: id.clone(),
                        health: Some(health.get(id)?),
                    })
                })
                .collect();
            if resources.is_empty() {
                continue;
            }
            let name = match &claim.request {
                Some(request) => format!("claim:{}/{request}", claim.name),
                None => format!("claim:{}", claim.name),
            };
            entries.push(ResourceStatus {
                name,
                resources: Some(resources),
            });
        }
        if !entries.is_empty() {
            out.insert(container.name.clone(), entries);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod(request: Option<&str>) -> Pod {
        let claim = match request {
            Some(r) => serde_json::json!({"name": "gpu", "request": r}),
            None => serde_json::json!({"name": "gpu"}),
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "containers": [
                    {"name": "ctr", "resources": {"claims": [claim]}},
                    {"name": "other"}
                ],
                "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "t"}]
            },
            "status": {"resourceClaimStatuses": [{"name": "gpu", "resourceClaimName": "p-gpu-x"}]}
        }))
        .unwrap()
    }

    #[test]
    fn statuses_name_the_claim_as_the_api_server_requires() {
        let health = DeviceHealth::default();
        health.replace(
            "gpu.nvidia.com",
            HashMap::from([(
                "gpu.nvidia.com/node-a/gpu-0".to_owned(),
                "Unhealthy".to_owned(),
            )]),
        );
        let devices = BTreeMap::from([(
            "p-gpu-x".to_owned(),
            BTreeMap::from([
                (
                    "gpu".to_owned(),
                    BTreeMap::from([("gpu.nvidia.com/node-a/gpu-0".to_owned(), vec![])]),
                ),
                (
                    "spare".to_owned(),
                    BTreeMap::from([("gpu.nvidia.com/node-a/gpu-9".to_owned(), vec![])]),
                ),
            ]),
        )]);
        let all = container_status(&pod(None), &devices, &health);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["ctr"]);
        let entry = &all["ctr"][0];
        assert_eq!(entry.name, "claim:gpu");
        // gpu-9 was never reported on, so it is left out.
        let resources = entry.resources.as_ref().unwrap();
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0].health.as_deref(), Some("Unhealthy"));
        let one = container_status(&pod(Some("gpu")), &devices, &health);
        assert_eq!(one["ctr"][0].name, "claim:gpu/gpu");
        assert!(container_status(&pod(Some("spare")), &devices, &health).is_empty());
    }
}

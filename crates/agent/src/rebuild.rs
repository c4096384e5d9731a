//! Rebuilding the checkpoint after it was found corrupt, from the ResourceClaims the API
//! server still has.
//!
//! A corrupt checkpoint is moved aside and the driver starts empty, but claims prepared before
//! may still be in use: their pods run, and a container restart in them needs the claim's CDI
//! spec, while the kubelet will not call Prepare again for a running pod. So start-up keeps
//! every spec no entry accounts for ([`crate::driver::Startup::unaccounted_specs`]) and this
//! module decides, before the plugin serves, which of them still belong to live claims:
//!
//! - a ResourceClaim with that UID, allocated with results of our driver all in this node's
//!   pool, and still reserved for a consumer (`status.reservedFor` non-empty) is adopted as
//!   `PrepareCompleted`, with its devices as Prepare would have recorded them (all in one
//!   group; the configs applied are not recoverable, and nvdra applies none that leave state
//!   behind), so its devices are never handed to another claim;
//! - any other spec (claim gone, not reserved any more, not ours) is removed, as start-up does
//!   with orphans after a valid checkpoint;
//! - allocated claims without a spec here are ignored: nothing of them is left to protect.
//!
//! [`plan_rebuild`] is the pure decision; [`rebuild_after_corruption`] lists the claims once
//! and applies it with [`GpuDriver::adopt_after_corruption`].
//!
//! Failure modes: none are fatal. A failed LIST or apply is retried a few times with a capped
//! backoff, then given up (logged as an error): the claims stay unrecorded, as the corruption
//! left them, and their specs stay until the next start-up removes them as orphans.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::resource::v1::{DeviceRequestAllocationResult, ResourceClaim};
use kube::Api;
use kube::api::ListParams;
use nvdra_api::names::drivers;
use serde_json::{Map, Value};

use crate::cdi::qualified_device_id;
use crate::checkpoint::{ClaimEntry, ClaimState, DeviceInfo, PreparedDevice, PreparedGroup};
use crate::devices::AllocatableDevice;
use crate::driver::prepare::{allocated_device, device_info};
use crate::driver::{Adopted, GpuDriver};

#[cfg(test)]
mod tests;

/// How often [`rebuild_after_corruption`] tries before giving up.
pub const ATTEMPTS: u32 = 5;

/// The first retry delay; doubled per retry up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);

/// The longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// What [`plan_rebuild`] decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RebuildPlan {
    /// Claims to record as completed: (claim UID, entry), in UID order.
    pub adopt: Vec<(String, ClaimEntry)>,
    /// UIDs whose spec belongs to no live claim of ours, in UID order.
    pub stale_specs: Vec<String>,
}

/// Decides, for every claim UID in `spec_uids`, whether `claims` (all ResourceClaims the API
/// server has) show it live on this node; see the module docs. `devices` is this node's
/// device index, for the devices' type information (a device missing from it is recorded as
/// of unknown type, which still holds it).
pub fn plan_rebuild(
    node_name: &str,
    driver_name: &str,
    devices: &BTreeMap<String, AllocatableDevice>,
    claims: &[ResourceClaim],
    spec_uids: &BTreeSet<String>,
) -> RebuildPlan {
    let by_uid: BTreeMap<&str, &ResourceClaim> = claims
        .iter()
        .filter_map(|claim| Some((claim.metadata.uid.as_deref()?, claim)))
        .collect();
    let mut plan = RebuildPlan::default();
    for uid in spec_uids {
        match by_uid
            .get(uid.as_str())
            .and_then(|claim| live_entry(node_name, driver_name, devices, uid, claim))
        {
            Some(entry) => plan.adopt.push((uid.clone(), entry)),
            None => plan.stale_specs.push(uid.clone()),
        }
    }
    plan
}

/// The entry of `claim` if it is reserved and allocated only from this node's pool for our
/// driver (with at least one device).
fn live_entry(
    node_name: &str,
    driver_name: &str,
    devices: &BTreeMap<String, AllocatableDevice>,
    uid: &str,
    claim: &ResourceClaim,
) -> Option<ClaimEntry> {
    let status = claim.status.as_ref()?;
    if status.reserved_for.as_ref().is_none_or(Vec::is_empty) {
        return None;
    }
    let ours: Vec<&DeviceRequestAllocationResult> = status
        .allocation
        .as_ref()?
        .devices
        .as_ref()?
        .results
        .as_ref()?
        .iter()
        .filter(|result| result.driver == driver_name)
        .collect();
    // Prepare refuses a claim with any result in another pool, so no spec of ours exists for it.
    if ours.is_empty() || ours.iter().any(|result| result.pool != node_name) {
        return None;
    }
    let allocated = ours.iter().copied().map(allocated_device).collect();
    let prepared = ours
        .iter()
        .map(|result| PreparedDevice {
            requests: vec![result.request.clone()],
            pool: result.pool.clone(),
            device: result.device.clone(),
            cdi_device_ids: vec![qualified_device_id(uid, &result.device)],
            share_id: result.share_id.clone(),
            admin_access: result.admin_access.unwrap_or(false),
            info: devices
                .get(&result.device)
                .map_or(DeviceInfo::Unknown(Value::Null), device_info),
            extra: Map::new(),
        })
        .collect();
    Some(ClaimEntry {
        namespace: claim.metadata.namespace.clone().unwrap_or_default(),
        name: claim.metadata.name.clone().unwrap_or_default(),
        state: ClaimState::PrepareCompleted,
        allocated_devices: allocated,
        prepared_devices: vec![PreparedGroup {
            devices: prepared,
            config_state: Map::new(),
            extra: Map::new(),
        }],
        updated_at: None,
        extra: Map::new(),
    })
}

/// Lists every ResourceClaim once and adopts or removes `unaccounted_specs` (see the module
/// docs), retrying failures [`ATTEMPTS`] times. Run it before the plugin serves, so no Prepare
/// races it. A cluster-wide LIST is heavy for a node agent, but this runs only after a corrupt
/// checkpoint, once per start. Returns `None` when it gave up.
pub async fn rebuild_after_corruption(
    driver: &GpuDriver,
    client: &kube::Client,
    unaccounted_specs: &[String],
) -> Option<Adopted> {
    let spec_uids: BTreeSet<String> = unaccounted_specs.iter().cloned().collect();
    let api = Api::<ResourceClaim>::all(client.clone());
    let mut delay = INITIAL_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let result = match api.list(&ListParams::default()).await {
            Ok(list) => {
                let plan = plan_rebuild(
                    driver.node_name(),
                    drivers::GPU,
                    driver.allocatable_devices(),
                    &list.items,
                    &spec_uids,
                );
                driver
                    .adopt_after_corruption(plan.adopt, plan.stale_specs)
                    .await
            }
            Err(err) => Err(format!("cannot list ResourceClaims: {err}")),
        };
        match result {
            Ok(report) => {
                tracing::info!(
                    adopted = report.adopted.len(),
                    refused = report.refused.len(),
                    stale_specs_removed = report.stale_specs_removed,
                    problems = report.problems.len(),
                    "rebuilt the checkpoint from the API server's ResourceClaims"
                );
                return Some(report);
            }
            Err(error) if attempt < ATTEMPTS => {
                tracing::warn!(%error, attempt, retry_in = ?delay, "checkpoint rebuild failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    attempts = ATTEMPTS,
                    specs = spec_uids.len(),
                    "checkpoint rebuild failed; claims whose record was lost stay unrecorded"
                );
            }
        }
    }
    None
}

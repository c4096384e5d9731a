//! One Prepare batch of the compute-domain driver.
//!
//! Order (every claim gets a result):
//! 1. **Plan** without locks or side effects: usable claim UID, exactly one device of this
//!    driver from this node's pool, its config resolved strictly ([`super::config`]).
//! 2. **Begin** under the locks: a completed claim is answered from the checkpoint; an
//!    interrupted one is rolled back (spec removed) and begun afresh; the others are recorded
//!    `PrepareStarted` with their domain UID, in one checkpoint write.
//! 3. **Talk to the API** without locks, claims concurrently: find the ComputeDomain; for a
//!    channel claim check the namespace, label the Node and, in a clique, wait for the local
//!    daemon to be Ready (on the agent's clique watch, no polling).
//! 4. **Finish** under the locks: assign the channel / create the domain directory, write the
//!    spec, record `PrepareCompleted` (one write), then answer. A claim that failed in step 3
//!    after its Node label was attempted stays `PrepareStarted` (so an Unprepare still removes
//!    the label); any other failed claim is rolled back.

use std::sync::Arc;

use futures::future::join_all;
use k8s_openapi::api::resource::v1::DeviceRequestAllocationResult;
use nvdra_kubelet_plugin::error::error_chain;
use nvdra_kubelet_plugin::{ClaimError, PrepareClaim, PrepareResults};
use serde_json::{Map, Value};

use super::channels::{DOMAIN_KEY, assign_channel};
use super::config::{self, CdConfig};
use super::devices::CdDeviceType;
use super::specs::{self, ChannelGrant, DaemonEdits};
use super::{Cluster, ClusterError, DomainRef, Shared, blocking, ensure_domain_dir};
use crate::cdi::{self, SpecError, Vendor};
use crate::checkpoint::{
    self, BeginOutcome, DeviceInfo, PreparedChannel, PreparedDaemon, PreparedDevice, PreparedGroup,
};
use crate::driver::prepare::{allocated_device, kubelet_devices};

/// Why one claim could not be prepared; the text is what the pod's events show.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The claim UID cannot name a CDI device or spec file.
    #[error(transparent)]
    ClaimUid(SpecError),
    /// An allocation result names a pool other than this node's.
    #[error(
        "device {device:?} of request {request:?} is allocated from pool {pool:?}, \
         but this node's pool is {node:?}"
    )]
    ForeignPool {
        /// The request.
        request: String,
        /// The device.
        device: String,
        /// The allocation's pool.
        pool: String,
        /// This node's pool.
        node: String,
    },
    /// An allocation result names a device this node does not offer.
    #[error("device {device:?} of request {request:?} is not offered by node {node:?}")]
    UnknownDevice {
        /// The request.
        request: String,
        /// The device.
        device: String,
        /// This node.
        node: String,
    },
    /// The claim holds more than one device of this driver.
    #[error("a claim may hold one compute-domain.nvidia.com device, this one holds {count}")]
    DeviceCount {
        /// How many.
        count: usize,
    },
    /// The claim's opaque configuration is invalid.
    #[error("invalid device configuration")]
    ResolveConfig(#[source] config::ConfigError),
    /// The domain UID cannot name a directory.
    #[error("invalid ComputeDomain UID in the claim's configuration")]
    DomainUid(#[source] SpecError),
    /// The ComputeDomain could not be found.
    #[error(transparent)]
    FindDomain(ClusterError),
    /// A channel claim outside its ComputeDomain's namespace.
    #[error(
        "claim namespace {claim_namespace:?} does not match the namespace of ComputeDomain \
         {domain}: a channel claim must be in its ComputeDomain's namespace"
    )]
    NamespaceMismatch {
        /// The claim's namespace.
        claim_namespace: String,
        /// The domain.
        domain: DomainRef,
    },
    /// The Node label could not be set.
    #[error(transparent)]
    LabelNode(ClusterError),
    /// The local daemon is not Ready yet (retriable: the kubelet retries).
    #[error("waiting for the IMEX daemon of ComputeDomain {domain} on node {node} to be Ready")]
    NotReady {
        /// The domain.
        domain: DomainRef,
        /// This node.
        node: String,
    },
    /// The driver registers no device the claim needs.
    #[error(
        "node {node} is in NVLink clique {clique} but the NVIDIA driver registers no \
         {device:?} character device (see /proc/devices)"
    )]
    MissingDriverDevice {
        /// This node.
        node: String,
        /// Its clique.
        clique: String,
        /// The `/proc/devices` name.
        device: &'static str,
    },
    /// The node cannot open the fabric-management capability.
    #[error(
        "node {node} is in NVLink clique {clique} but the NVIDIA driver exposes no \
         fabric-imex-mgmt capability (/proc/driver/nvidia/capabilities/fabric-imex-mgmt)"
    )]
    MissingFabricCapability {
        /// This node.
        node: String,
        /// Its clique.
        clique: String,
    },
    /// Every channel is held by another domain.
    #[error("all {count} IMEX channels of node {node} are held by other ComputeDomains")]
    NoFreeChannel {
        /// The channel count.
        count: u32,
        /// This node.
        node: String,
    },
    /// A device is held by another claim.
    #[error(transparent)]
    DeviceInUse(Box<checkpoint::Error>),
    /// An interrupted earlier prepare could not be rolled back.
    #[error("cannot roll back an interrupted earlier prepare of the claim")]
    RollBack(#[source] Box<cdi::Error>),
    /// The domain directory could not be created.
    #[error("cannot create the ComputeDomain directory {}", path.display())]
    DomainDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The claim's spec breaks a spec rule.
    #[error("cannot render the CDI spec of the claim")]
    RenderSpec(#[source] SpecError),
    /// Writing the spec failed.
    #[error(transparent)]
    Cdi(Box<cdi::Error>),
    /// The checkpoint could not be written (the write error's chain).
    #[error("cannot record the claim in the checkpoint: {0}")]
    Checkpoint(String),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A claim that passed every check needing no lock.
#[derive(Debug, Clone)]
struct Plan {
    claim: checkpoint::ClaimRef,
    result: DeviceRequestAllocationResult,
    device_type: CdDeviceType,
    config: CdConfig,
}

/// What the API step found for a claim.
struct Found {
    plan: Plan,
    outcome: Result<DomainRef, PrepareError>,
    /// The Node label was attempted: keep the entry on failure so Unprepare can undo it.
    labelled: bool,
}

fn fail(results: &mut PrepareResults, uid: &str, err: &PrepareError) {
    tracing::warn!(claim_uid = uid, error = %error_chain(err), "prepare failed");
    results.insert(uid.to_owned(), Err(ClaimError::from_error(err)));
}

/// Prepares a batch; see the module docs. Returns the results and how many claims failed
/// because the node's state could not be locked or brought up to date.
pub(super) async fn prepare_batch(
    shared: &Arc<Shared>,
    claims: Vec<PrepareClaim>,
) -> (PrepareResults, usize) {
    let mut results = PrepareResults::new();
    let mut plans = Vec::with_capacity(claims.len());
    for claim in &claims {
        match plan(shared, claim) {
            Ok(plan) => plans.push(plan),
            Err(err) => fail(&mut results, &claim.claim_ref.uid, &err),
        }
    }
    if plans.is_empty() {
        return (results, 0);
    }

    // 2. Begin.
    let uids: Vec<String> = plans.iter().map(|p| p.claim.uid.clone()).collect();
    let begun = blocking(shared, "prepare", move |shared| begin_all(shared, plans)).await;
    let (done, begun) = match begun {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(message)) | Err(message) => {
            let failed = uids.len();
            for uid in uids {
                results.insert(uid, Err(ClaimError::driver(message.clone())));
            }
            return (results, failed);
        }
    };
    results.extend(done);
    if begun.is_empty() {
        return (results, 0);
    }

    // 3. API.
    let found = join_all(begun.into_iter().map(|plan| talk_to_api(shared, plan))).await;

    // 4. Finish.
    let uids: Vec<String> = found.iter().map(|f| f.plan.claim.uid.clone()).collect();
    match blocking(shared, "prepare", move |shared| finish_all(shared, found)).await {
        Ok(Ok(done)) => results.extend(done),
        Ok(Err(message)) | Err(message) => {
            let failed = uids.len();
            for uid in uids {
                results.insert(uid, Err(ClaimError::driver(message.clone())));
            }
            return (results, failed);
        }
    }
    (results, 0)
}

/// Checks the claim and resolves its config; no lock, no side effects.
fn plan(shared: &Shared, claim: &PrepareClaim) -> Result<Plan, PrepareError> {
    let claim_ref = &claim.claim_ref;
    cdi::validate_claim_uid(&claim_ref.uid).map_err(PrepareError::ClaimUid)?;
    let [result] = claim.results.as_slice() else {
        return Err(PrepareError::DeviceCount {
            count: claim.results.len(),
        });
    };
    if result.pool != shared.node_name {
        return Err(PrepareError::ForeignPool {
            request: result.request.clone(),
            device: result.device.clone(),
            pool: result.pool.clone(),
            node: shared.node_name.clone(),
        });
    }
    let device_type =
        CdDeviceType::of_device(&result.device).ok_or_else(|| PrepareError::UnknownDevice {
            request: result.request.clone(),
            device: result.device.clone(),
            node: shared.node_name.clone(),
        })?;
    let mut configs = config::resolve(
        &claim.configs,
        &[(result.request.clone(), result.device.clone(), device_type)],
        &shared.gates,
    )
    .map_err(PrepareError::ResolveConfig)?;
    let config = configs
        .pop()
        .ok_or_else(|| PrepareError::Internal("no config resolved".to_owned()))?;
    cdi::validate_claim_uid(config.domain_id()).map_err(PrepareError::DomainUid)?;
    Ok(Plan {
        claim: checkpoint::ClaimRef {
            uid: claim_ref.uid.clone(),
            namespace: claim_ref.namespace.clone(),
            name: claim_ref.name.clone(),
        },
        result: result.clone(),
        device_type,
        config,
    })
}

type Answered = Vec<(
    String,
    Result<Vec<nvdra_kubelet_plugin::PreparedDevice>, ClaimError>,
)>;

/// Step 2; `Err` when the locks or the checkpoint sync failed (every claim fails).
fn begin_all(shared: &Shared, plans: Vec<Plan>) -> Result<(Answered, Vec<Plan>), String> {
    let (_node_lock, mut ledger) = shared.lock_all()?;
    let mut answered = Answered::new();
    let mut begun = Vec::new();
    let mut changed = false;
    for plan in plans {
        let uid = plan.claim.uid.clone();
        let mut rolled_back = false;
        let outcome = loop {
            let outcome = ledger
                .state_mut()
                .begin_prepare(&plan.claim, vec![allocated_device(&plan.result)]);
            match outcome {
                Ok(BeginOutcome::NeedsRollback(_)) if !rolled_back => {
                    if let Err(err) = shared.cdi.remove_claim_spec(&uid) {
                        break Err(PrepareError::RollBack(Box::new(err)));
                    }
                    ledger.state_mut().remove(&uid);
                    rolled_back = true;
                    changed = true;
                }
                Ok(BeginOutcome::NeedsRollback(_)) => {
                    break Err(PrepareError::Internal(
                        "the claim's entry survived its rollback".to_owned(),
                    ));
                }
                Ok(other) => break Ok(other),
                Err(err) => break Err(PrepareError::DeviceInUse(Box::new(err))),
            }
        };
        match outcome {
            Ok(BeginOutcome::AlreadyCompleted(groups)) => {
                tracing::debug!(claim = %plan.claim, "claim already prepared");
                answered.push((uid, Ok(kubelet_devices(&groups))));
            }
            Ok(_) => {
                if let Some(entry) = ledger.state_mut().claim_mut(&uid) {
                    entry.extra.insert(
                        DOMAIN_KEY.to_owned(),
                        Value::String(plan.config.domain_id().to_owned()),
                    );
                }
                changed = true;
                begun.push(plan);
            }
            Err(err) => {
                tracing::warn!(claim_uid = %uid, error = %error_chain(&err), "prepare failed");
                answered.push((uid, Err(ClaimError::from_error(&err))));
            }
        }
    }
    if changed && let Err(err) = ledger.persist() {
        let message = error_chain(&err);
        for plan in begun.drain(..) {
            ledger.state_mut().remove(&plan.claim.uid);
            let err = PrepareError::Checkpoint(message.clone());
            answered.push((plan.claim.uid, Err(ClaimError::from_error(&err))));
        }
    }
    Ok((answered, begun))
}

/// Step 3 for one claim.
async fn talk_to_api(shared: &Shared, plan: Plan) -> Found {
    let cluster: &Cluster = &shared.cluster;
    let domain = match cluster.domain(plan.config.domain_id()).await {
        Ok(domain) => domain,
        Err(err) => {
            return Found {
                plan,
                outcome: Err(PrepareError::FindDomain(err)),
                labelled: false,
            };
        }
    };
    if plan.device_type == CdDeviceType::Daemon {
        return Found {
            plan,
            outcome: Ok(domain),
            labelled: false,
        };
    }
    if plan.claim.namespace != domain.namespace {
        return Found {
            outcome: Err(PrepareError::NamespaceMismatch {
                claim_namespace: plan.claim.namespace.clone(),
                domain,
            }),
            plan,
            labelled: false,
        };
    }
    if let Err(err) = cluster.label_node(&domain.uid).await {
        return Found {
            plan,
            outcome: Err(PrepareError::LabelNode(err)),
            labelled: true,
        };
    }
    // Outside a clique the daemon has nothing to coordinate (it idles), so nothing to wait for.
    let outcome = match &shared.clique_id {
        Some(clique_id) => wait_ready(shared, &domain, clique_id)
            .await
            .map(|()| domain),
        None => Ok(domain),
    };
    Found {
        plan,
        outcome,
        labelled: true,
    }
}

/// Waits (on the agent's clique watch) until this node's daemon is Ready or the timeout passes.
async fn wait_ready(
    shared: &Shared,
    domain: &DomainRef,
    clique_id: &str,
) -> Result<(), PrepareError> {
    let deadline = tokio::time::Instant::now() + shared.readiness_timeout;
    match shared
        .cluster
        .wait_daemon_ready(&domain.uid, clique_id, deadline)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(PrepareError::NotReady {
            domain: domain.clone(),
            node: shared.node_name.clone(),
        }),
        Err(err) => {
            tracing::debug!(%domain, error = %err, "cannot check daemon readiness");
            Err(PrepareError::NotReady {
                domain: domain.clone(),
                node: shared.node_name.clone(),
            })
        }
    }
}

/// Step 4; `Err` when the locks or the checkpoint sync failed.
fn finish_all(shared: &Shared, found: Vec<Found>) -> Result<Answered, String> {
    let (_node_lock, mut ledger) = shared.lock_all()?;
    let mut answered = Answered::new();
    let mut completed = Vec::new();
    for Found {
        plan,
        outcome,
        labelled,
    } in found
    {
        let uid = plan.claim.uid.clone();
        let work = outcome.and_then(|domain| {
            let groups = work(shared, ledger.state(), &plan, &domain)?;
            ledger
                .state_mut()
                .complete_prepare(&uid, groups.clone())
                .map_err(|err| PrepareError::Internal(err.to_string()))?;
            Ok(groups)
        });
        match work {
            Ok(groups) => completed.push((uid, groups)),
            Err(err) => {
                if !labelled {
                    if let Err(remove) = shared.cdi.remove_claim_spec(&uid) {
                        tracing::warn!(claim_uid = %uid, error = %error_chain(&remove), "cannot remove the CDI spec of a failed prepare");
                    }
                    ledger.state_mut().remove(&uid);
                }
                tracing::warn!(claim_uid = %uid, error = %error_chain(&err), "prepare failed");
                answered.push((uid, Err(ClaimError::from_error(&err))));
            }
        }
    }
    match ledger.persist() {
        Ok(()) => {
            for (uid, groups) in completed {
                answered.push((uid, Ok(kubelet_devices(&groups))));
            }
        }
        Err(err) => {
            let message = error_chain(&err);
            for (uid, _) in completed {
                let err = PrepareError::Checkpoint(message.clone());
                answered.push((uid, Err(ClaimError::from_error(&err))));
            }
        }
    }
    Ok(answered)
}

/// The side effects of one claim: channel assignment or domain directory, then the spec.
fn work(
    shared: &Shared,
    state: &checkpoint::CheckpointState,
    plan: &Plan,
    domain: &DomainRef,
) -> Result<Vec<PreparedGroup>, PrepareError> {
    let uid = &plan.claim.uid;
    let vendor = Vendor::COMPUTE_DOMAIN;
    let clique = shared.clique_id.clone();
    let (spec, info, cdi_ids) = match &plan.config {
        CdConfig::Channel(config) => {
            let count = shared.imex.channel_count;
            let channel =
                assign_channel(state, &domain.uid, count).ok_or(PrepareError::NoFreeChannel {
                    count,
                    node: shared.node_name.clone(),
                })?;
            let all = config.allocation_mode == nvdra_api::names::allocation_modes::ALL;
            let grant = match &clique {
                None => ChannelGrant::NoClique,
                Some(clique) => {
                    let major = shared.imex.channels_major.ok_or_else(|| {
                        PrepareError::MissingDriverDevice {
                            node: shared.node_name.clone(),
                            clique: clique.clone(),
                            device: nvdra_gpu::imex::CHANNELS_DEVICE,
                        }
                    })?;
                    if all {
                        ChannelGrant::All { count, major }
                    } else {
                        ChannelGrant::One { channel, major }
                    }
                }
            };
            let spec = specs::render_channel_spec(uid, grant).map_err(PrepareError::RenderSpec)?;
            let info = DeviceInfo::Channel(PreparedChannel {
                id: channel,
                domain_id: Some(domain.uid.clone()),
                allocation_mode: (!config.allocation_mode.is_empty())
                    .then(|| config.allocation_mode.clone()),
            });
            (
                spec,
                info,
                vec![vendor.qualified_device_id(uid, &plan.result.device)],
            )
        }
        CdConfig::Daemon(_) => {
            let fabric_mgmt = match &clique {
                None => None,
                Some(clique) => {
                    let missing = || PrepareError::MissingFabricCapability {
                        node: shared.node_name.clone(),
                        clique: clique.clone(),
                    };
                    let major = shared.imex.caps_major.ok_or_else(|| {
                        PrepareError::MissingDriverDevice {
                            node: shared.node_name.clone(),
                            clique: clique.clone(),
                            device: nvdra_gpu::imex::CAPS_DEVICE,
                        }
                    })?;
                    Some((major, shared.imex.fabric_mgmt_minor.ok_or_else(missing)?))
                }
            };
            let dir = shared.domain_dir(&domain.uid);
            ensure_domain_dir(&dir).map_err(|source| PrepareError::DomainDir {
                path: dir.clone(),
                source,
            })?;
            let edits = DaemonEdits {
                clique_id: clique.clone().unwrap_or_default(),
                domain_uid: domain.uid.clone(),
                domain_name: domain.name.clone(),
                domain_namespace: domain.namespace.clone(),
                domain_dir: dir.to_string_lossy().into_owned(),
                fabric_mgmt,
            };
            let spec = specs::render_daemon_spec(uid, &edits).map_err(PrepareError::RenderSpec)?;
            let info = DeviceInfo::Daemon(PreparedDaemon {
                id: 0,
                domain_id: Some(domain.uid.clone()),
            });
            (
                spec,
                info,
                vec![
                    vendor.qualified_device_id(uid, &plan.result.device),
                    vendor.base_device_id(),
                ],
            )
        }
    };
    shared
        .cdi
        .write_claim_spec(uid, &spec)
        .map_err(|err| PrepareError::Cdi(Box::new(err)))?;
    Ok(vec![PreparedGroup {
        devices: vec![PreparedDevice {
            requests: vec![plan.result.request.clone()],
            pool: plan.result.pool.clone(),
            device: plan.result.device.clone(),
            cdi_device_ids: cdi_ids,
            share_id: plan.result.share_id.clone(),
            admin_access: plan.result.admin_access.unwrap_or(false),
            info,
            extra: Map::new(),
        }],
        config_state: Map::new(),
        extra: Map::new(),
    }])
}

//! One Prepare batch: from the claims the kubelet-plugin library hands over to per-claim
//! results, with the checkpoint protocol around the work.
//!
//! Order for a batch (every claim gets a result):
//! 1. **Plan** each claim without the lock and without side effects: the claim UID must be
//!    usable in a CDI name, every allocated device must be in this node's pool and offered by
//!    this node, configs are resolved strictly ([`crate::config::resolve`]), and configs that
//!    would need a host side effect nvdra does not implement yet (time-slice intervals other
//!    than `Default`, MPS, VFIO) are refused. A failing claim stops here.
//! 2. Under the ledger lock, **begin** each planned claim in the checkpoint: a completed claim
//!    returns its recorded devices (no hardware, no CDI write, no checkpoint write); an
//!    interrupted one is rolled back (CDI spec removed, entry dropped) and begun afresh; a
//!    device held by another claim refuses the claim (admin access honoured).
//! 3. **Record** `PrepareStarted` for all begun claims with one checkpoint write.
//! 4. **Work**: render and atomically write each claim's CDI spec (with the `DeviceMetadata`
//!    gate, first its [`crate::metadata`] files, which the spec bind-mounts). A claim that fails
//!    here is rolled back (spec and metadata removed, entry dropped) before its error is
//!    returned.
//! 5. **Record** `PrepareCompleted` for all claims that got their spec, again with one write,
//!    and only then report them prepared.
//!
//! A crash anywhere leaves a state start-up repairs: `PrepareStarted` entries are rolled back,
//! specs and metadata without an entry are removed as orphans.
//!
//! Failure modes are the variants of [`PrepareError`]; each becomes the claim's error text
//! (the whole `#[source]` chain). A failed checkpoint write fails every claim that depended
//! on it and leaves the ledger dirty (see the `ledger` module), so the kubelet's retry first
//! makes the file current.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{DeviceAttribute, DeviceRequestAllocationResult};
use nvdra_api::FeatureGate;
use nvdra_api::config::{
    GpuConfig, IommuBackendPolicy, MigDeviceConfig, MpsConfig, SharingStrategy, VfioDeviceConfig,
};
use nvdra_api::names::drivers;
use nvdra_gpu::vfio::IommuPolicy;
use nvdra_kubelet_plugin::error::error_chain;
use nvdra_kubelet_plugin::{ClaimError, PrepareClaim, PrepareResults};
use serde_json::Map;

use super::ledger::Ledger;
use super::{FaultPoint, Shared, dynamic_mig, sharing};
use crate::cdi::spec::{ContainerEdits, Mount};
use crate::cdi::{self, ClaimDevice, qualified_device_id, render_claim_spec};
use crate::checkpoint::{
    self, AllocatedDevice, BeginOutcome, DeviceInfo, PreparedDevice as RecordedDevice, PreparedGpu,
    PreparedGroup, PreparedMig, PreparedVfio,
};
use crate::config::{self, ConfigGroup, ConfigOrigin, DeviceAllocation, ResolvedConfig};
use crate::devices::AllocatableDevice;
use crate::metadata::{self, MetadataDevice};
use crate::mps::{CONTAINER_PIPE_DIR, MpsDaemons};

/// Why one claim could not be prepared. The `Display` text (with its sources) is what the
/// kubelet reports in the pod's events.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The claim UID cannot name a CDI device or spec file.
    #[error(transparent)]
    ClaimUid(cdi::SpecError),
    /// An allocation result names a pool other than this node's.
    #[error(
        "device {device:?} of request {request:?} is allocated from pool {pool:?}, \
         but this node's pool is {node:?}"
    )]
    ForeignPool {
        /// The allocation's request.
        request: String,
        /// The allocated device.
        device: String,
        /// The allocation's pool.
        pool: String,
        /// This node's pool (the node name).
        node: String,
    },
    /// An allocation result names a device this node does not offer.
    #[error("device {device:?} of request {request:?} is not offered by node {node:?}")]
    UnknownDevice {
        /// The allocation's request.
        request: String,
        /// The allocated device.
        device: String,
        /// This node.
        node: String,
    },
    /// The claim's opaque configuration is invalid.
    #[error("invalid device configuration")]
    ResolveConfig(#[source] Box<config::Error>),
    /// A configuration needs a host side effect nvdra does not implement yet.
    #[error("{origin}: {what} is not supported yet by nvdra")]
    UnsupportedConfig {
        /// Which config.
        origin: ConfigOrigin,
        /// What it asks for.
        what: String,
    },
    /// A config asks for MPS on a node where the agent found no MPS control
    /// daemon.
    #[error(
        "{origin}: sharing strategy MPS is unavailable on this node: nvidia-cuda-mps-control \
         was not found under the driver root when the agent started (install the driver's \
         MPS tools there and restart the agent)"
    )]
    MpsUnavailable {
        /// Which config.
        origin: ConfigOrigin,
    },
    /// A device is held by another claim.
    #[error(transparent)]
    DeviceInUse(Box<checkpoint::Error>),
    /// An interrupted earlier prepare of the claim could not be rolled back.
    #[error("cannot roll back an interrupted earlier prepare of the claim")]
    RollBack(#[source] Box<cdi::Error>),
    /// The checkpoint could not be written (text: the write error's chain, shared by every
    /// claim of the batch).
    #[error("cannot record the claim in the checkpoint: {0}")]
    Checkpoint(String),
    /// A MIG device could not be created for an allocated partition, or MIG
    /// mode could not be switched for a whole GPU.
    #[error("cannot set up device {device:?}")]
    DynamicMig {
        /// The allocated device.
        device: String,
        /// The device layer's error (a refusal names the driver's reason).
        #[source]
        source: Box<nvdra_gpu::Error>,
    },
    /// A GPU's time slice could not be set.
    #[error(transparent)]
    TimeSlice(Box<super::sharing::ApplyError>),
    /// A GPU could not be bound to vfio-pci for passthrough.
    #[error("cannot pass through device {device:?}")]
    Vfio {
        /// The allocated device.
        device: String,
        /// Why.
        #[source]
        source: Box<super::vfio::Error>,
    },
    /// The device's sibling (the same GPU offered the other way) is held by
    /// another claim.
    #[error(
        "device {device:?} is the same GPU as {sibling:?}, which claim {holder} holds; a GPU is \
         used as a GPU or passed through, never both"
    )]
    SiblingInUse {
        /// The allocated device.
        device: String,
        /// Its sibling.
        sibling: String,
        /// The UID of the claim holding the sibling.
        holder: String,
    },
    /// MPS could not be set up for a group.
    #[error("cannot set up MPS for the devices of {origin}")]
    Mps {
        /// Where the group's config came from.
        origin: ConfigOrigin,
        /// Why.
        #[source]
        source: Box<super::sharing::MpsError>,
    },
    /// Rendering or writing the claim's CDI spec failed.
    #[error(transparent)]
    Cdi(Box<cdi::Error>),
    /// Writing the claim's device metadata (`DeviceMetadata`) failed.
    #[error(transparent)]
    Metadata(Box<metadata::Error>),
    /// A bug: the driver broke one of its own invariants.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One device of a planned claim.
#[derive(Debug, Clone)]
struct DevicePlan {
    request: String,
    pool: String,
    share_id: Option<String>,
    admin_access: bool,
    device: AllocatableDevice,
}

/// One config group of a planned claim.
#[derive(Debug)]
struct GroupPlan {
    /// Devices in allocation order.
    devices: Vec<DevicePlan>,
    /// The time slice its full GPUs get, if the config time-slices them.
    time_slice: Option<nvdra_gpu::TimeSlice>,
    /// Its MPS settings, if the config shares its devices through MPS.
    mps: Option<MpsConfig>,
    /// Where its config came from.
    origin: ConfigOrigin,
    /// For passthrough devices: the IOMMU backend and whether the container
    /// gets the API device.
    vfio: (IommuPolicy, bool),
}

/// A claim that passed every check that needs no lock.
#[derive(Debug)]
struct ClaimPlan {
    claim: checkpoint::ClaimRef,
    /// The pod's name for the claim when it was generated from a template.
    pod_claim_name: Option<String>,
    allocated: Vec<AllocatedDevice>,
    /// One entry per config group.
    groups: Vec<GroupPlan>,
}

fn fail(results: &mut PrepareResults, uid: &str, err: PrepareError) {
    tracing::warn!(claim_uid = uid, error = %error_chain(&err), "prepare failed");
    results.insert(uid.to_owned(), Err(ClaimError::from_error(&err)));
}

/// Prepares a batch; see the module docs. Returns one result per claim, and how many claims
/// failed because the node's state could not be made consistent (the `lock_acquire` stage).
pub(super) fn prepare_batch(shared: &Shared, claims: Vec<PrepareClaim>) -> (PrepareResults, usize) {
    let mut results = PrepareResults::new();
    let mut planned = Vec::with_capacity(claims.len());
    for claim in &claims {
        match plan(shared, claim) {
            Ok(plan) => planned.push(plan),
            Err(err) => fail(&mut results, &claim.claim_ref.uid, err),
        }
    }
    if planned.is_empty() {
        return (results, 0);
    }

    let mut ledger = match shared.lock_ledger() {
        Ok(ledger) => ledger,
        Err(err) => {
            let failed = planned.len();
            let message = format!(
                "cannot bring the node's checkpoint up to date: {}",
                error_chain(&err)
            );
            for plan in planned {
                tracing::warn!(claim = %plan.claim, error = %message, "prepare failed");
                results.insert(plan.claim.uid, Err(ClaimError::driver(message.clone())));
            }
            return (results, failed);
        }
    };

    // Begin every claim; completed ones are answered right away.
    let mut begun = Vec::new();
    let mut changed = false;
    for plan in planned {
        match begin(shared, &mut ledger, &plan) {
            Ok(Begun::Completed(groups)) => {
                tracing::debug!(claim = %plan.claim, "claim already prepared");
                results.insert(plan.claim.uid, Ok(kubelet_devices(&groups)));
            }
            Ok(Begun::Started { rolled_back }) => {
                if rolled_back {
                    tracing::info!(claim = %plan.claim, "rolled back an interrupted prepare");
                }
                changed = true;
                begun.push(plan);
            }
            Err((err, rolled_back)) => {
                changed |= rolled_back;
                fail(&mut results, &plan.claim.uid, err);
            }
        }
    }
    if !changed {
        return (results, 0);
    }

    // One durable record of every claim we are about to work on.
    if let Err(err) = ledger.persist() {
        let message = error_chain(&err);
        for plan in begun {
            ledger.state_mut().remove(&plan.claim.uid);
            fail(
                &mut results,
                &plan.claim.uid,
                PrepareError::Checkpoint(message.clone()),
            );
        }
        return (results, 0);
    }
    if begun.is_empty() {
        return (results, 0);
    }
    shared.fault(FaultPoint::AfterPrepareStarted);

    let mut completed = Vec::with_capacity(begun.len());
    let written = write_specs(shared, &begun);
    for (plan, written) in begun.into_iter().zip(written) {
        let uid = plan.claim.uid;
        let outcome = written.and_then(|groups| {
            ledger
                .state_mut()
                .complete_prepare(&uid, groups.clone())
                .map(|()| groups)
                .map_err(|err| PrepareError::Internal(err.to_string()))
        });
        match outcome {
            Ok(groups) => completed.push((uid, groups)),
            Err(err) => {
                roll_back_after_failure(shared, &mut ledger, &uid);
                fail(&mut results, &uid, err);
            }
        }
    }

    shared.fault(FaultPoint::AfterSpecsWritten);

    // Completion (and any rollback above) becomes durable before kubelet hears of it. On
    // failure memory keeps the completed claims and stays dirty: the retry writes the file
    // and then finds the claims completed, with their specs in place.
    match ledger.persist() {
        Ok(()) => {
            for (uid, groups) in completed {
                results.insert(uid, Ok(kubelet_devices(&groups)));
            }
        }
        Err(err) => {
            let message = error_chain(&err);
            for (uid, _) in completed {
                fail(
                    &mut results,
                    &uid,
                    PrepareError::Checkpoint(message.clone()),
                );
            }
        }
    }
    (results, 0)
}

/// Checks a claim and works out its devices and configs; no lock, no side effects.
fn plan(shared: &Shared, claim: &PrepareClaim) -> Result<ClaimPlan, PrepareError> {
    let claim_ref = &claim.claim_ref;
    cdi::validate_claim_uid(&claim_ref.uid).map_err(PrepareError::ClaimUid)?;

    let mut allocations = Vec::with_capacity(claim.results.len());
    let mut found = Vec::with_capacity(claim.results.len());
    for result in &claim.results {
        let device = shared.find_device(result)?;
        allocations.push(DeviceAllocation::new(
            &result.request,
            &result.device,
            device.device_type(),
        ));
        found.push((result, device));
    }

    let groups = config::resolve(&claim.configs, &allocations, &shared.gates)
        .map_err(|err| PrepareError::ResolveConfig(Box::new(err)))?;
    for group in &groups {
        check_supported(shared, group)?;
    }

    let groups = groups
        .iter()
        .map(|group| GroupPlan {
            time_slice: sharing::time_slice_of(&group.config),
            mps: sharing::mps_of(&group.config),
            origin: group.origin,
            vfio: iommu_of(&group.config),
            devices: group
                .devices
                .iter()
                .filter_map(|allocation| {
                    found
                        .iter()
                        .find(|(result, _)| {
                            result.request == allocation.request
                                && result.device == allocation.device
                        })
                        .map(|(result, device)| DevicePlan {
                            request: result.request.clone(),
                            pool: result.pool.clone(),
                            share_id: result.share_id.clone(),
                            admin_access: result.admin_access.unwrap_or(false),
                            device: (*device).clone(),
                        })
                })
                .collect(),
        })
        .collect();

    Ok(ClaimPlan {
        claim: checkpoint::ClaimRef {
            uid: claim_ref.uid.clone(),
            namespace: claim_ref.namespace.clone(),
            name: claim_ref.name.clone(),
        },
        pod_claim_name: claim
            .claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(metadata::POD_CLAIM_NAME_ANNOTATION))
            .cloned(),
        allocated: claim.results.iter().map(allocated_device).collect(),
        groups,
    })
}

/// The IOMMU settings of a group's config (`LegacyOnly` without the API
/// device unless a `VfioDeviceConfig` says otherwise).
fn iommu_of(config: &ResolvedConfig) -> (IommuPolicy, bool) {
    match config {
        ResolvedConfig::Vfio(VfioDeviceConfig { iommu: Some(iommu) }) => (
            match iommu.backend_policy {
                IommuBackendPolicy::PreferIommuFD => IommuPolicy::PreferIommuFD,
                // Validation rejects unknown policies before a claim gets here.
                IommuBackendPolicy::LegacyOnly | IommuBackendPolicy::Unknown(_) => {
                    IommuPolicy::LegacyOnly
                }
            },
            iommu.enable_api_device.unwrap_or(false),
        ),
        _ => (IommuPolicy::LegacyOnly, false),
    }
}

/// The checkpoint record of one allocation result (also used by the corruption rebuild).
pub(crate) fn allocated_device(result: &DeviceRequestAllocationResult) -> AllocatedDevice {
    AllocatedDevice {
        requests: vec![result.request.clone()],
        pool: result.pool.clone(),
        device: result.device.clone(),
        share_id: result.share_id.clone(),
        admin_access: result.admin_access.unwrap_or(false),
        extra: Map::new(),
    }
}

/// Refuses configs whose host side effect nvdra does not implement yet, instead of silently
/// handing out a device configured differently from what the user asked for.
fn check_supported(shared: &Shared, group: &ConfigGroup) -> Result<(), PrepareError> {
    let unsupported = |what: &str| {
        Err(PrepareError::UnsupportedConfig {
            origin: group.origin,
            what: what.to_owned(),
        })
    };
    match &group.config {
        ResolvedConfig::Gpu(GpuConfig { sharing: None }) => Ok(()),
        ResolvedConfig::Gpu(GpuConfig {
            sharing: Some(sharing),
        }) => match &sharing.strategy {
            SharingStrategy::TimeSlicing => Ok(()),
            SharingStrategy::Mps if shared.mps.is_some() => Ok(()),
            SharingStrategy::Mps => Err(PrepareError::MpsUnavailable {
                origin: group.origin,
            }),
            SharingStrategy::Unknown(other) => {
                unsupported(&format!("GpuConfig.sharing.strategy {other:?}"))
            }
        },
        // Time-slicing cannot be set per MIG device; upstream accepts it as a no-op too.
        ResolvedConfig::Mig(MigDeviceConfig { sharing }) => {
            match sharing.as_ref().map(|s| &s.strategy) {
                None | Some(SharingStrategy::TimeSlicing) => Ok(()),
                Some(SharingStrategy::Mps) if shared.mps.is_some() => Ok(()),
                Some(SharingStrategy::Mps) => Err(PrepareError::MpsUnavailable {
                    origin: group.origin,
                }),
                Some(SharingStrategy::Unknown(other)) => {
                    unsupported(&format!("MigDeviceConfig.sharing.strategy {other:?}"))
                }
            }
        }
        ResolvedConfig::Vfio(_) if shared.vfio.is_some() => Ok(()),
        ResolvedConfig::Vfio(_) => unsupported("VfioDeviceConfig (PassthroughSupport is off)"),
    }
}

enum Begun {
    /// Prepared before: these devices, nothing to do.
    Completed(Vec<PreparedGroup>),
    /// Now `PrepareStarted` (after rolling back an interrupted attempt if `rolled_back`).
    Started { rolled_back: bool },
}

/// Begins `plan` in the checkpoint. On error, also says whether a rollback changed the state.
fn begin(
    shared: &Shared,
    ledger: &mut Ledger,
    plan: &ClaimPlan,
) -> Result<Begun, (PrepareError, bool)> {
    let names: Vec<&str> = plan.allocated.iter().map(|d| d.device.as_str()).collect();
    if let Some((device, sibling, holder)) =
        super::vfio::sibling_holder(&shared.siblings, ledger.state(), &plan.claim.uid, &names)
    {
        return Err((
            PrepareError::SiblingInUse {
                device,
                sibling,
                holder,
            },
            false,
        ));
    }
    let mut rolled_back = false;
    loop {
        let outcome = ledger
            .state_mut()
            .begin_prepare(&plan.claim, plan.allocated.clone())
            .map_err(|err| (PrepareError::DeviceInUse(Box::new(err)), rolled_back))?;
        match outcome {
            BeginOutcome::Started => return Ok(Begun::Started { rolled_back }),
            BeginOutcome::AlreadyCompleted(groups) => return Ok(Begun::Completed(groups)),
            BeginOutcome::NeedsRollback(entry) if !rolled_back => {
                tracing::info!(
                    claim = %plan.claim,
                    state = %entry.state,
                    "claim has an interrupted prepare; rolling it back"
                );
                shared
                    .cdi
                    .remove_claim_spec(&plan.claim.uid)
                    .map_err(|err| (PrepareError::RollBack(Box::new(err)), false))?;
                shared.remove_metadata(&plan.claim.uid);
                undo_entry(shared, &entry, &plan.claim);
                ledger.state_mut().remove(&plan.claim.uid);
                rolled_back = true;
            }
            // `remove` makes the second `begin_prepare` see no entry; never loop twice.
            BeginOutcome::NeedsRollback(_) => {
                return Err((
                    PrepareError::Internal("the claim's entry survived its rollback".to_owned()),
                    rolled_back,
                ));
            }
        }
    }
}

/// Most spec writes of one batch in flight at once.
const MAX_PARALLEL_SPEC_WRITES: usize = 8;

/// Writes the specs of a batch, concurrently when there are several: each write waits for two
/// fsyncs, and concurrent fsyncs on one filesystem share journal commits, so eight claims cost
/// little more than one instead of eight times as much. Results are in input order.
fn write_specs(
    shared: &Shared,
    plans: &[ClaimPlan],
) -> Vec<Result<Vec<PreparedGroup>, PrepareError>> {
    if plans.len() < 2 {
        return plans.iter().map(|plan| write_spec(shared, plan)).collect();
    }
    let mut results = Vec::with_capacity(plans.len());
    for chunk in plans.chunks(MAX_PARALLEL_SPEC_WRITES) {
        std::thread::scope(|scope| {
            // A thread that cannot be created (a pids limit) just means writing inline.
            let writers: Vec<_> = chunk
                .iter()
                .map(|plan| {
                    std::thread::Builder::new()
                        .name("nvdra-cdi-write".to_owned())
                        .spawn_scoped(scope, move || write_spec(shared, plan))
                        .map_err(|_| plan)
                })
                .collect();
            for writer in writers {
                results.push(match writer {
                    Ok(thread) => thread.join().unwrap_or_else(|_panic| {
                        Err(PrepareError::Internal(
                            "the CDI spec writer panicked".to_owned(),
                        ))
                    }),
                    Err(plan) => write_spec(shared, plan),
                });
            }
        });
    }
    results
}

/// Renders and writes the claim's CDI spec; returns the groups to record.
fn write_spec(shared: &Shared, plan: &ClaimPlan) -> Result<Vec<PreparedGroup>, PrepareError> {
    let uid = &plan.claim.uid;
    let concrete = materialize(shared, plan)?;
    let config_states = match apply_sharing(shared, plan, &concrete) {
        Ok(states) => states,
        Err(err) => {
            undo_materialize(shared, plan);
            return Err(err);
        }
    };
    let written = render_and_write(shared, plan, &concrete, &config_states);
    if written.is_err() {
        undo_sharing(shared, plan, &config_states);
        undo_materialize(shared, plan);
    }
    written?;
    Ok(plan
        .groups
        .iter()
        .zip(config_states)
        .map(|(group, config_state)| PreparedGroup {
            devices: group
                .devices
                .iter()
                .map(|d| recorded_device(uid, d, concrete_of(&concrete, &d.device)))
                .collect(),
            config_state,
            extra: Map::new(),
        })
        .collect())
}

/// The device as it exists once prepared: a created MIG device for a
/// partition, the device itself otherwise.
fn concrete_of<'a>(
    concrete: &'a BTreeMap<String, AllocatableDevice>,
    device: &'a AllocatableDevice,
) -> &'a AllocatableDevice {
    concrete.get(&device.name()).unwrap_or(device)
}

/// Creates the MIG device of every partition of the claim (and turns MIG
/// off for whole GPUs that are partitioned dynamically); the created
/// devices by published name. On error nothing stays created.
fn materialize(
    shared: &Shared,
    plan: &ClaimPlan,
) -> Result<BTreeMap<String, AllocatableDevice>, PrepareError> {
    let backend = shared.backend.as_ref();
    let mut concrete = BTreeMap::new();
    for device in plan.groups.iter().flat_map(|g| &g.devices) {
        let name = device.device.name();
        if let (AllocatableDevice::Vfio(v), false) = (&device.device, device.admin_access) {
            let bound = match &shared.vfio {
                Some(host) => super::vfio::bind(host, v).map_err(|source| PrepareError::Vfio {
                    device: name.clone(),
                    source: Box::new(source),
                }),
                None => Err(PrepareError::Internal(format!(
                    "VFIO device {name} allocated without PassthroughSupport"
                ))),
            };
            if let Err(err) = bound {
                undo_materialize(shared, plan);
                return Err(err);
            }
            continue;
        }
        let result = match &device.device {
            // Admin access neither creates nor changes anything: it sees the
            // MIG device the claim holding the partition created.
            AllocatableDevice::Partition(p) if device.admin_access => {
                match dynamic_mig::find(backend, p) {
                    Ok(Some(mig)) => {
                        let mut parent = p.parent.clone();
                        parent.mig_enabled = true;
                        concrete.insert(name.clone(), AllocatableDevice::Mig { parent, mig });
                        Ok(())
                    }
                    Ok(None) => Err(nvdra_gpu::Error::MigRefused {
                        op: "open the MIG device of the partition with admin access".into(),
                        gpu: p.parent.uuid.clone(),
                        refusal: nvdra_gpu::mig::MigRefusal::NotFound,
                    }),
                    Err(err) => Err(err),
                }
            }
            _ if device.admin_access => Ok(()),
            AllocatableDevice::Partition(p) if !concrete.contains_key(&name) => {
                dynamic_mig::create(backend, p).map(|mig| {
                    let mut parent = p.parent.clone();
                    parent.mig_enabled = true;
                    concrete.insert(name.clone(), AllocatableDevice::Mig { parent, mig });
                })
            }
            AllocatableDevice::Gpu { info }
                if dynamic_mig::is_partitioned(&shared.devices, info.minor) =>
            {
                dynamic_mig::prepare_full_gpu(backend, info)
            }
            _ => Ok(()),
        };
        if let Err(source) = result {
            undo_materialize(shared, plan);
            return Err(PrepareError::DynamicMig {
                device: name,
                source: Box::new(source),
            });
        }
    }
    Ok(concrete)
}

/// Destroys the MIG devices of the claim's partitions (found by placement,
/// so ones never created are skipped).
fn undo_materialize(shared: &Shared, plan: &ClaimPlan) {
    let claim = plan.claim.to_string();
    for device in plan.groups.iter().flat_map(|g| &g.devices) {
        match (&device.device, device.admin_access, &shared.vfio) {
            (AllocatableDevice::Partition(p), false, _) => {
                dynamic_mig::destroy(shared.backend.as_ref(), p, &claim);
            }
            (AllocatableDevice::Vfio(v), false, Some(host)) => {
                super::vfio::release(host, v, &claim);
            }
            _ => {}
        }
    }
}

/// The full GPUs of a group.
fn full_gpus(group: &GroupPlan) -> Vec<&nvdra_gpu::GpuInfo> {
    group
        .devices
        .iter()
        .filter_map(|d| match &d.device {
            AllocatableDevice::Gpu { info } => Some(info),
            AllocatableDevice::Mig { .. }
            | AllocatableDevice::Partition(_)
            | AllocatableDevice::Vfio(_) => None,
        })
        .collect()
}

/// Applies every group's sharing settings; one config state per group. On
/// error nothing stays applied.
fn apply_sharing(
    shared: &Shared,
    plan: &ClaimPlan,
    concrete: &BTreeMap<String, AllocatableDevice>,
) -> Result<Vec<Map<String, serde_json::Value>>, PrepareError> {
    let claim = plan.claim.to_string();
    let backend = shared.backend.as_ref();
    let mut states = Vec::with_capacity(plan.groups.len());
    for group in &plan.groups {
        let state = match (group.time_slice, &group.mps, &shared.mps) {
            (Some(slice), _, _) => sharing::apply(backend, &full_gpus(group), slice, &claim)
                .map_err(PrepareError::TimeSlice),
            (None, Some(config), Some(daemons)) => {
                let uuids = group_uuids(group, concrete);
                let uuids: Vec<&str> = uuids.iter().map(String::as_str).collect();
                sharing::start_mps(
                    backend,
                    daemons,
                    &plan.claim.uid,
                    &full_gpus(group),
                    &uuids,
                    config,
                )
                .map_err(|source| PrepareError::Mps {
                    origin: group.origin,
                    source: Box::new(source),
                })
            }
            _ => Ok(Map::new()),
        };
        match state {
            Ok(state) => states.push(state),
            Err(err) => {
                undo_sharing(shared, plan, &states);
                return Err(err);
            }
        }
    }
    Ok(states)
}

/// The UUIDs of a group's devices as prepared (GPUs and MIG devices).
fn group_uuids(group: &GroupPlan, concrete: &BTreeMap<String, AllocatableDevice>) -> Vec<String> {
    group
        .devices
        .iter()
        .filter_map(|d| match concrete_of(concrete, &d.device) {
            AllocatableDevice::Gpu { info } => Some(info.uuid.clone()),
            AllocatableDevice::Mig { mig, .. } => Some(mig.uuid.clone()),
            AllocatableDevice::Partition(_) | AllocatableDevice::Vfio(_) => None,
        })
        .collect()
}

/// Undoes what [`apply_sharing`] recorded for the first `states.len()` groups.
fn undo_sharing(shared: &Shared, plan: &ClaimPlan, states: &[Map<String, serde_json::Value>]) {
    let claim = plan.claim.to_string();
    for (group, state) in plan.groups.iter().zip(states) {
        if sharing::was_time_sliced(state) {
            sharing::reset(shared.backend.as_ref(), full_gpus(group), &claim);
        }
        if let (Some(_), Some(daemons)) = (sharing::mps_daemon(state), &shared.mps) {
            sharing::stop_mps(
                shared.backend.as_ref(),
                daemons,
                &plan.claim.uid,
                full_gpus(group),
            );
        }
    }
}

/// Renders and writes the claim's CDI spec.
fn render_and_write(
    shared: &Shared,
    plan: &ClaimPlan,
    concrete: &BTreeMap<String, AllocatableDevice>,
    config_states: &[Map<String, serde_json::Value>],
) -> Result<(), PrepareError> {
    let uid = &plan.claim.uid;
    let mut cdi_devices: Vec<ClaimDevice> = Vec::new();
    for (group, state) in plan.groups.iter().zip(config_states) {
        let mps_edits = match (sharing::mps_daemon(state), &shared.mps) {
            (Some(id), Some(daemons)) => Some(mps_client_edits(daemons, id)),
            _ => None,
        };
        for device in &group.devices {
            let name = device.device.name();
            if cdi_devices.iter().any(|d| d.name == name) {
                continue;
            }
            let mut cdi_device = claim_device(shared, concrete, device, group.vfio)?;
            if let Some(edits) = &mps_edits {
                cdi_device.extra_edits.append(edits);
            }
            cdi_devices.push(cdi_device);
        }
    }
    // A claim of passthrough devices only gets no driver files: its
    // container runs a VM, not CUDA.
    let passthrough_only = plan
        .groups
        .iter()
        .flat_map(|g| &g.devices)
        .all(|d| matches!(d.device, AllocatableDevice::Vfio(_)));
    let common = if passthrough_only {
        shared.common_edits.without_edits()
    } else {
        shared.common_edits.clone()
    };
    if shared.gates.enabled(FeatureGate::DeviceMetadata) {
        write_metadata(shared, plan, &mut cdi_devices)?;
    }
    let spec = render_claim_spec(uid, &cdi_devices, &common)
        .map_err(|err| PrepareError::Cdi(Box::new(err)))?;
    shared
        .cdi
        .write_claim_spec(uid, &spec)
        .map(|_path| ())
        .map_err(|err| PrepareError::Cdi(Box::new(err)))
}

/// Writes the claim's device metadata and bind-mounts each request's file on the CDI device of
/// the request's first allocated device, so the containers that get the request see it.
fn write_metadata(
    shared: &Shared,
    plan: &ClaimPlan,
    cdi_devices: &mut [ClaimDevice],
) -> Result<(), PrepareError> {
    let devices: Vec<MetadataDevice> = plan
        .allocated
        .iter()
        .flat_map(|allocated| {
            allocated.requests.iter().map(|request| MetadataDevice {
                request: request.clone(),
                driver: drivers::GPU.to_owned(),
                pool: allocated.pool.clone(),
                name: allocated.device.clone(),
                attributes: metadata_attributes(shared, &allocated.device),
            })
        })
        .collect();
    let claim = metadata::ClaimIdentity {
        name: &plan.claim.name,
        namespace: &plan.claim.namespace,
        uid: &plan.claim.uid,
        pod_claim_name: plan.pod_claim_name.as_deref(),
    };
    let mounts = shared
        .metadata
        .write_claim(&claim, &devices)
        .map_err(|err| PrepareError::Metadata(Box::new(err)))?;
    for (request, mount) in mounts {
        let first = devices
            .iter()
            .find(|d| metadata::base_request(&d.request) == request)
            .and_then(|d| cdi_devices.iter_mut().find(|c| c.name == d.name));
        match first {
            Some(device) => device.extra_edits.mounts.push(mount),
            None => {
                return Err(PrepareError::Internal(format!(
                    "request {request:?} has device metadata but no device in the CDI spec"
                )));
            }
        }
    }
    Ok(())
}

/// A device's attributes for its metadata: those its ResourceSlice publishes. (A MIG device
/// created at Prepare would add its UUID, but DynamicMIG excludes PassthroughSupport, which
/// DeviceMetadata needs.)
fn metadata_attributes(shared: &Shared, name: &str) -> BTreeMap<String, DeviceAttribute> {
    shared
        .published
        .iter()
        .find(|d| d.name == name)
        .and_then(|d| d.attributes.clone())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// What a container using an MPS daemon's devices gets: the pipe directory
/// (and its variable) and the daemon's `/dev/shm`.
fn mps_client_edits(daemons: &MpsDaemons, id: &str) -> ContainerEdits {
    let (shm, pipe) = daemons.client_dirs(id);
    let bind = |host: &std::path::Path, container: &str| Mount {
        host_path: host.to_string_lossy().into_owned(),
        container_path: container.to_owned(),
        options: vec![
            "rw".to_owned(),
            "nosuid".to_owned(),
            "nodev".to_owned(),
            "bind".to_owned(),
        ],
        mount_type: None,
    };
    ContainerEdits {
        env: vec![format!("CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE_DIR}")],
        mounts: vec![bind(&shm, "/dev/shm"), bind(&pipe, CONTAINER_PIPE_DIR)],
        ..ContainerEdits::default()
    }
}

/// One device of the claim's spec, as prepared.
fn claim_device(
    shared: &Shared,
    concrete: &BTreeMap<String, AllocatableDevice>,
    device: &DevicePlan,
    (policy, api_device): (IommuPolicy, bool),
) -> Result<ClaimDevice, PrepareError> {
    let name = device.device.name();
    Ok(match concrete_of(concrete, &device.device) {
        AllocatableDevice::Gpu { info } => ClaimDevice::gpu(shared.backend.as_ref(), info),
        AllocatableDevice::Mig { mig, .. } => ClaimDevice::mig(shared.backend.as_ref(), mig)
            .map_err(|err| PrepareError::Cdi(Box::new(err)))?,
        AllocatableDevice::Partition(_) => {
            return Err(PrepareError::Internal(format!(
                "partition {name} reached the CDI spec without its MIG device"
            )));
        }
        AllocatableDevice::Vfio(v) => {
            let host = shared.vfio.as_ref().ok_or_else(|| {
                PrepareError::Internal(format!(
                    "VFIO device {name} allocated without PassthroughSupport"
                ))
            })?;
            let nodes =
                super::vfio::device_nodes(host, v, policy, api_device).map_err(|source| {
                    PrepareError::Vfio {
                        device: name.clone(),
                        source: Box::new(super::vfio::Error::Device(source)),
                    }
                })?;
            let mut device = ClaimDevice::new(&name, &nodes);
            // As upstream: the container sees no GPU through the NVIDIA
            // runtime; the VM gets the whole device.
            device.extra_edits.env = vec!["NVIDIA_VISIBLE_DEVICES=void".to_owned()];
            device
        }
    })
}

fn recorded_device(
    claim_uid: &str,
    plan: &DevicePlan,
    concrete: &AllocatableDevice,
) -> RecordedDevice {
    let name = plan.device.name();
    RecordedDevice {
        requests: vec![plan.request.clone()],
        pool: plan.pool.clone(),
        cdi_device_ids: vec![qualified_device_id(claim_uid, &name)],
        device: name,
        share_id: plan.share_id.clone(),
        admin_access: plan.admin_access,
        info: device_info(concrete),
        extra: Map::new(),
    }
}

/// The checkpoint's record of what `device` is, enough to find it again.
pub(crate) fn device_info(device: &AllocatableDevice) -> DeviceInfo {
    match device {
        AllocatableDevice::Gpu { info } => DeviceInfo::Gpu(PreparedGpu {
            uuid: info.uuid.clone(),
            minor: Some(info.minor),
        }),
        AllocatableDevice::Mig { mig, .. } => DeviceInfo::Mig(PreparedMig {
            uuid: mig.uuid.clone(),
            parent_uuid: mig.parent_uuid.clone(),
            parent_minor: Some(mig.parent_minor),
            gi_id: mig.gi_id,
            ci_id: mig.ci_id,
            profile: Some(mig.profile.clone()),
            placement_start: Some(mig.placement.start),
            placement_size: Some(mig.placement.size),
        }),
        AllocatableDevice::Vfio(v) => DeviceInfo::Vfio(PreparedVfio {
            uuid: v
                .gpu
                .as_ref()
                .map_or_else(|| v.uuid.clone(), |g| g.uuid.clone()),
            pci_bus_id: Some(v.pci.bdf.clone()),
        }),
        // Not created yet (a record rebuilt from the API server): no UUID or
        // instance IDs. Unprepare finds the device by its placement.
        AllocatableDevice::Partition(p) => DeviceInfo::Mig(PreparedMig {
            uuid: String::new(),
            parent_uuid: p.parent.uuid.clone(),
            parent_minor: Some(p.parent.minor),
            gi_id: 0,
            ci_id: 0,
            profile: Some(p.profile.name.clone()),
            placement_start: Some(p.placement.start),
            placement_size: Some(p.placement.size),
        }),
    }
}

/// Undoes a begun claim whose work failed: its spec (if any) and its entry.
fn roll_back_after_failure(shared: &Shared, ledger: &mut Ledger, uid: &str) {
    if let Some(entry) = ledger.state().claim(uid) {
        undo_entry(shared, entry, &entry.claim_ref(uid));
    }
    if let Err(err) = shared.cdi.remove_claim_spec(uid) {
        // The entry goes anyway: a spec without an entry is an orphan, removed at start-up.
        tracing::warn!(claim_uid = uid, error = %error_chain(&err), "cannot remove the CDI spec of a failed prepare");
    }
    shared.remove_metadata(uid);
    ledger.state_mut().remove(uid);
}

/// Undoes every host change a claim's entry may stand for: time slices and
/// created MIG devices.
pub(super) fn undo_entry(
    shared: &Shared,
    entry: &checkpoint::ClaimEntry,
    claim: &checkpoint::ClaimRef,
) {
    super::undo_entry(
        shared.backend.as_ref(),
        shared.mps.as_deref(),
        shared.vfio.as_ref(),
        &shared.devices,
        &shared.gates,
        entry,
        claim,
    );
}

/// The devices as the kubelet-plugin library wants them.
pub(crate) fn kubelet_devices(
    groups: &[PreparedGroup],
) -> Vec<nvdra_kubelet_plugin::PreparedDevice> {
    groups
        .iter()
        .flat_map(|group| &group.devices)
        .map(|device| nvdra_kubelet_plugin::PreparedDevice {
            requests: device.requests.clone(),
            pool_name: device.pool.clone(),
            device_name: device.device.clone(),
            cdi_device_ids: device.cdi_device_ids.clone(),
            share_id: device.share_id.clone(),
        })
        .collect()
}

//! Clean-up of checkpointed claims nobody will unprepare: the agent's own Unprepare for claims
//! whose ResourceClaim is gone, and for prepares that were interrupted. Both drivers run it
//! ([`CleanupTarget`]): a channel claim left behind would keep its node labelled for its
//! ComputeDomain, and with the label the domain's daemon, for as long as the agent runs.
//!
//! The kubelet normally unprepares every claim it prepared, but not always: a pod deleted while
//! the plugin was down, a kubelet whose own state was wiped, a Prepare the kubelet gave up on.
//! Such entries would hold their devices forever (the driver refuses to hand a held device to
//! another claim), so the agent looks for them at start and periodically (upstream: every
//! 10 minutes).
//!
//! Rules, per checkpointed claim:
//! - `PrepareStarted`, for a driver that [rolls them back](CleanupTarget::rolls_back_interrupted)
//!   (the GPU driver): an interrupted prepare (a running prepare holds the driver lock, so the
//!   clean-up never sees one in progress). Nothing uses a half-prepared claim and the kubelet's
//!   retry prepares it afresh, so it is rolled back without asking the API server. The
//!   compute-domain driver's prepares leave the driver lock while they wait for a daemon, so
//!   there a `PrepareStarted` entry may be a prepare in progress: it is judged like the others.
//! - any other state: the ResourceClaim is read (each read bounded by a timeout, 20 s as
//!   upstream, all reads concurrently). Not found, or found with another UID (deleted and
//!   recreated under the same name) → unprepared. Found with the same UID → kept. A read that
//!   fails or times out → kept and reported: an API outage must never unprepare live claims.
//!
//! Invariants: lookups run without any lock; the unprepare then takes the node lock and the
//! driver lock and re-checks each claim (a `PrepareStarted` entry that a kubelet retry
//! completed meanwhile is left alone; a vanished ResourceClaim never comes back under the same
//! UID, so that verdict cannot go stale). Entries without namespace or name (possible in
//! checkpoints imported from very old upstream versions) cannot be looked up and are kept.
//!
//! Failure modes: none are fatal; everything is in the returned [`CleanupReport`] and the log.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use nvdra_kubelet_plugin::ClaimReader;
use nvdra_kubelet_plugin::error::error_chain;

use crate::checkpoint::{ClaimRef, ClaimState};
use crate::computedomain::ComputeDomainDriver;
use crate::driver::{Expect, GpuDriver};

/// A driver whose checkpointed claims the clean-up examines and unprepares.
pub trait CleanupTarget: Send + Sync {
    /// Whether a `PrepareStarted` entry is an interrupted prepare (rolled back without asking
    /// the API server) rather than possibly one in progress.
    fn rolls_back_interrupted(&self) -> bool;

    /// Every checkpointed claim with its state.
    fn claims_for_cleanup(
        &self,
    ) -> impl Future<Output = Result<Vec<(ClaimRef, ClaimState)>, String>> + Send;

    /// Unprepares the stale claims: per UID, `Ok(true)` when it was unprepared, `Ok(false)`
    /// when it was already gone or no longer in the state found, or why it failed. `Err` when
    /// nothing could be attempted.
    fn unprepare_stale(
        &self,
        stale: &[StaleClaim],
    ) -> impl Future<Output = Result<BTreeMap<String, Result<bool, String>>, String>> + Send;
}

impl CleanupTarget for GpuDriver {
    fn rolls_back_interrupted(&self) -> bool {
        true
    }

    async fn claims_for_cleanup(&self) -> Result<Vec<(ClaimRef, ClaimState)>, String> {
        self.checkpointed_claims().await
    }

    async fn unprepare_stale(
        &self,
        stale: &[StaleClaim],
    ) -> Result<BTreeMap<String, Result<bool, String>>, String> {
        let batch = stale
            .iter()
            .map(|s| {
                let expect = match s.reason {
                    StaleReason::Interrupted => Expect::Started,
                    StaleReason::NotFound | StaleReason::Replaced { .. } => Expect::Any,
                };
                (s.claim.uid.clone(), expect)
            })
            .collect();
        let outcomes = self.unprepare_for_cleanup(batch).await?;
        Ok(outcomes
            .into_iter()
            .map(|(uid, outcome)| (uid, outcome.map_err(|err| error_chain(&err))))
            .collect())
    }
}

impl CleanupTarget for ComputeDomainDriver {
    fn rolls_back_interrupted(&self) -> bool {
        false
    }

    async fn claims_for_cleanup(&self) -> Result<Vec<(ClaimRef, ClaimState)>, String> {
        self.checkpointed_claims().await
    }

    async fn unprepare_stale(
        &self,
        stale: &[StaleClaim],
    ) -> Result<BTreeMap<String, Result<bool, String>>, String> {
        let claims = stale
            .iter()
            .map(|s| {
                nvdra_kubelet_plugin::ClaimRef::new(
                    s.claim.namespace.clone(),
                    s.claim.name.clone(),
                    s.claim.uid.clone(),
                )
            })
            .collect();
        // The kubelet's own path: node label, directories, CDI specs and checkpoint.
        Ok(self
            .unprepare_claims(claims)
            .await
            .into_iter()
            .map(|(uid, result)| (uid, result.map(|()| true).map_err(|err| err.to_string())))
            .collect())
    }
}

/// Upstream's bound on one ResourceClaim read during clean-up.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Upstream's interval between clean-up passes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

/// Why a claim was found stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleReason {
    /// Its ResourceClaim does not exist.
    NotFound,
    /// A ResourceClaim with its namespace and name exists under another UID.
    Replaced {
        /// The UID the API server returned.
        current_uid: String,
    },
    /// Its Prepare was interrupted (`PrepareStarted`).
    Interrupted,
}

/// A claim the clean-up unprepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleClaim {
    /// The claim.
    pub claim: ClaimRef,
    /// Why.
    pub reason: StaleReason,
}

/// What one clean-up pass did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CleanupReport {
    /// Checkpointed claims examined.
    pub checked: usize,
    /// Claims unprepared.
    pub unprepared: Vec<StaleClaim>,
    /// Claims kept because their ResourceClaim could not be read, with the reason.
    pub unknown: Vec<(ClaimRef, String)>,
    /// Stale claims whose unprepare failed (retried next pass), or a pass-wide failure (with
    /// no claim) when the checkpoint could not be read at all.
    pub failed: Vec<(Option<ClaimRef>, String)>,
}

/// One clean-up pass with the default lookup timeout; see the module docs.
pub async fn cleanup_stale_claims<T: CleanupTarget>(
    driver: &T,
    reader: &dyn ClaimReader,
) -> CleanupReport {
    cleanup_stale_claims_with_timeout(driver, reader, DEFAULT_LOOKUP_TIMEOUT).await
}

/// One clean-up pass, each ResourceClaim read bounded by `lookup_timeout`.
pub async fn cleanup_stale_claims_with_timeout<T: CleanupTarget>(
    driver: &T,
    reader: &dyn ClaimReader,
    lookup_timeout: Duration,
) -> CleanupReport {
    let mut report = CleanupReport::default();
    let claims = match driver.claims_for_cleanup().await {
        Ok(claims) => claims,
        Err(message) => {
            tracing::warn!(error = %message, "stale-claim clean-up skipped");
            report.failed.push((None, message));
            return report;
        }
    };
    report.checked = claims.len();

    let interrupted_is_stale = driver.rolls_back_interrupted();
    let verdicts =
        futures::future::join_all(claims.iter().map(|(claim, state)| {
            verdict(reader, claim, state, interrupted_is_stale, lookup_timeout)
        }))
        .await;
    let mut stale = Vec::new();
    for ((claim, _), verdict) in claims.into_iter().zip(verdicts) {
        match verdict {
            Verdict::Live => {}
            Verdict::Stale(reason) => stale.push(StaleClaim { claim, reason }),
            Verdict::Unknown(why) => {
                tracing::warn!(%claim, reason = %why, "cannot tell whether the claim is stale; kept");
                report.unknown.push((claim, why));
            }
        }
    }
    if stale.is_empty() {
        return report;
    }

    let mut outcomes = match driver.unprepare_stale(&stale).await {
        Ok(outcomes) => outcomes,
        Err(message) => {
            tracing::warn!(error = %message, "stale-claim clean-up could not unprepare");
            report
                .failed
                .extend(stale.into_iter().map(|s| (Some(s.claim), message.clone())));
            return report;
        }
    };
    for stale_claim in stale {
        match outcomes.remove(&stale_claim.claim.uid) {
            Some(Ok(true)) => {
                tracing::info!(claim = %stale_claim.claim, reason = ?stale_claim.reason, "unprepared a stale claim");
                report.unprepared.push(stale_claim);
            }
            // Gone already (the kubelet was faster) or no longer in the expected state.
            Some(Ok(false)) | None => {}
            Some(Err(message)) => {
                tracing::warn!(claim = %stale_claim.claim, error = %message, "cannot unprepare a stale claim");
                report.failed.push((Some(stale_claim.claim), message));
            }
        }
    }
    report
}

enum Verdict {
    Live,
    Stale(StaleReason),
    Unknown(String),
}

async fn verdict(
    reader: &dyn ClaimReader,
    claim: &ClaimRef,
    state: &ClaimState,
    interrupted_is_stale: bool,
    timeout: Duration,
) -> Verdict {
    if interrupted_is_stale && *state == ClaimState::PrepareStarted {
        return Verdict::Stale(StaleReason::Interrupted);
    }
    if claim.namespace.is_empty() || claim.name.is_empty() {
        return Verdict::Unknown("the checkpoint records no namespace or name".to_owned());
    }
    let read = reader.read_claim(&claim.namespace, &claim.name);
    match tokio::time::timeout(timeout, read).await {
        Err(_elapsed) => Verdict::Unknown(format!(
            "reading the ResourceClaim timed out after {} ms",
            timeout.as_millis()
        )),
        Ok(Err(err)) => Verdict::Unknown(format!(
            "reading the ResourceClaim failed: {}",
            error_chain(err.as_ref())
        )),
        Ok(Ok(None)) => Verdict::Stale(StaleReason::NotFound),
        Ok(Ok(Some(found))) => match found.metadata.uid {
            Some(uid) if uid == claim.uid => Verdict::Live,
            other => Verdict::Stale(StaleReason::Replaced {
                current_uid: other.unwrap_or_default(),
            }),
        },
    }
}

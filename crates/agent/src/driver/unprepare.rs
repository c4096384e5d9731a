//! One Unprepare batch, for the kubelet and for the stale-claim clean-up.
//!
//! Per claim: host changes are undone (time slices, created MIG devices), the CDI spec is removed, the
//! checkpoint entry dropped; then one checkpoint write
//! covers the whole batch. An unknown claim succeeds (Unprepare is idempotent and may follow
//! a Prepare served by another process), after a best-effort removal of a spec with its UID.
//!
//! Invariants: a claim is reported unprepared only once the checkpoint without it is durable;
//! if that write fails the claims fail, the ledger stays dirty and the kubelet's retry writes
//! the file first (the claims are then unknown and succeed). The clean-up passes a condition
//! per claim ([`Expect`]) that is re-checked under the lock, so a claim that a concurrent
//! Prepare completed since the clean-up looked is left alone.
//!
//! Failure modes: a spec that cannot be removed is logged, not fatal (as upstream): the entry
//! goes, and start-up removes the orphaned spec. Checkpoint write failures fail the claims
//! whose entries were dropped.

use std::collections::BTreeMap;

use nvdra_kubelet_plugin::error::error_chain;

use super::Shared;
use super::ledger::Ledger;
use crate::cdi;
use crate::checkpoint::ClaimState;

/// Which entries an unprepare may drop, checked under the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Whatever state the entry is in (kubelet Unprepare; claims whose ResourceClaim is gone).
    Any,
    /// Only a `PrepareStarted` entry (an interrupted prepare found by the clean-up).
    Started,
}

/// Why one claim could not be unprepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UnprepareError {
    /// The node's state could not be brought up to date before the batch.
    #[error("cannot bring the node's checkpoint up to date: {0}")]
    Sync(String),
    /// The checkpoint without the claim could not be written.
    #[error("cannot remove the claim from the checkpoint: {0}")]
    Checkpoint(String),
}

/// What happened to one claim: `true` if an entry was dropped.
pub(crate) type Outcome = Result<bool, UnprepareError>;

/// Unprepares `claims` (UID and condition); one outcome per UID.
pub(crate) fn unprepare_batch(
    shared: &Shared,
    claims: &[(String, Expect)],
) -> BTreeMap<String, Outcome> {
    let mut ledger = match shared.lock_ledger() {
        Ok(ledger) => ledger,
        Err(err) => {
            let message = error_chain(&err);
            return claims
                .iter()
                .map(|(uid, _)| (uid.clone(), Err(UnprepareError::Sync(message.clone()))))
                .collect();
        }
    };
    let mut outcomes = BTreeMap::new();
    let mut removed = Vec::new();
    for (uid, expect) in claims {
        let dropped = drop_entry(shared, &mut ledger, uid, *expect);
        if dropped {
            removed.push(uid.clone());
        }
        outcomes.insert(uid.clone(), Ok(dropped));
    }
    if !removed.is_empty()
        && let Err(err) = ledger.persist()
    {
        let message = error_chain(&err);
        for uid in removed {
            tracing::warn!(claim_uid = %uid, error = %message, "unprepare failed");
            outcomes.insert(uid, Err(UnprepareError::Checkpoint(message.clone())));
        }
    }
    outcomes
}

/// Removes the claim's spec and entry if `expect` allows; returns whether the entry went.
fn drop_entry(shared: &Shared, ledger: &mut Ledger, uid: &str, expect: Expect) -> bool {
    let Some(entry) = ledger.state().claim(uid) else {
        // Unknown claim: success. A spec may still exist if the entry was lost (a checkpoint
        // set aside as corrupt); removing it is harmless, and the UID must be valid to name it.
        if cdi::validate_claim_uid(uid).is_ok() {
            if let Err(err) = shared.cdi.remove_claim_spec(uid) {
                tracing::debug!(claim_uid = uid, error = %error_chain(&err), "cannot remove the CDI spec of an unknown claim");
            }
            shared.remove_metadata(uid);
        }
        return false;
    };
    if expect == Expect::Started && entry.state != ClaimState::PrepareStarted {
        tracing::debug!(claim_uid = uid, state = %entry.state, "claim changed state since the clean-up looked; kept");
        return false;
    }
    let claim = entry.claim_ref(uid);
    super::prepare::undo_entry(shared, entry, &claim);
    if cdi::validate_claim_uid(uid).is_ok() {
        if let Err(err) = shared.cdi.remove_claim_spec(uid) {
            tracing::warn!(%claim, error = %error_chain(&err), "cannot remove the CDI spec; start-up will remove it as an orphan");
        }
        shared.remove_metadata(uid);
    }
    ledger.state_mut().remove(uid);
    tracing::debug!(%claim, "claim unprepared");
    true
}

//! One Unprepare batch of the compute-domain driver.
//!
//! 1. Under the locks, find the domains whose last channel claim on this node the batch
//!    removes (read only).
//! 2. Without locks, remove those domains' Node labels. A domain whose label cannot be removed
//!    fails its claims, which keep their entries, so the kubelet's retry tries again.
//! 3. Under the locks, drop the other claims: spec removed, entry dropped, and the domain
//!    directory removed with a domain's last daemon claim; one checkpoint write. A domain that
//!    got a new channel claim between 1 and 3 is labelled again, so a concurrent Prepare never
//!    loses its label.
//!
//! Unknown claims succeed (after a best-effort removal of a spec with their UID).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::future::join_all;
use nvdra_kubelet_plugin::error::error_chain;
use nvdra_kubelet_plugin::{ClaimError, ClaimRef, UnprepareResults};

use super::channels::{claim_domain, remaining_claims};
use super::{Shared, blocking};
use crate::cdi;
use crate::checkpoint::CheckpointState;

/// Domains with no channel claim left once `uids` are gone.
fn domains_to_unlabel(state: &CheckpointState, uids: &[String]) -> BTreeSet<String> {
    let mut after = state.clone();
    let mut domains = BTreeSet::new();
    for uid in uids {
        if let Some(entry) = after.remove(uid)
            && let Some((domain, true)) = claim_domain(&entry)
        {
            domains.insert(domain);
        }
    }
    domains.retain(|domain| remaining_claims(&after, domain, true, "") == 0);
    domains
}

pub(super) async fn unprepare_batch(
    shared: &Arc<Shared>,
    claims: Vec<ClaimRef>,
) -> UnprepareResults {
    let uids: Vec<String> = claims.into_iter().map(|c| c.uid).collect();
    let fail_all = |message: String, uids: &[String]| -> UnprepareResults {
        uids.iter()
            .map(|uid| (uid.clone(), Err(ClaimError::driver(message.clone()))))
            .collect()
    };

    // 1.
    let batch = uids.clone();
    let peeked = blocking(shared, "unprepare", move |shared| {
        let (_node_lock, ledger) = shared.lock_all()?;
        let state = ledger.state();
        let owners: BTreeMap<String, String> = batch
            .iter()
            .filter_map(|uid| {
                let (domain, channel) = claim_domain(state.claim(uid)?)?;
                channel.then(|| (uid.clone(), domain))
            })
            .collect();
        Ok::<_, String>((domains_to_unlabel(state, &batch), owners))
    })
    .await;
    let (unlabel, owners) = match peeked {
        Ok(Ok(found)) => found,
        Ok(Err(message)) | Err(message) => return fail_all(message, &uids),
    };

    // 2.
    let unlabelled =
        join_all(unlabel.iter().map(|domain| async move {
            (domain.clone(), shared.cluster.unlabel_node(domain).await)
        }))
        .await;
    let mut label_errors = BTreeMap::new();
    for (domain, result) in unlabelled {
        match result {
            Ok(()) => {
                tracing::info!(domain_uid = %domain, "removed the node label of a ComputeDomain")
            }
            Err(err) => {
                tracing::warn!(domain_uid = %domain, error = %err, "cannot remove the node label");
                label_errors.insert(domain, err.to_string());
            }
        }
    }

    // 3.
    let mut results = UnprepareResults::new();
    let mut drop = Vec::new();
    for uid in &uids {
        match owners.get(uid).and_then(|domain| label_errors.get(domain)) {
            Some(message) => {
                results.insert(uid.clone(), Err(ClaimError::driver(message.clone())));
            }
            None => drop.push(uid.clone()),
        }
    }
    let dropping = drop.clone();
    let unlabel_done: Vec<String> = unlabel
        .into_iter()
        .filter(|d| !label_errors.contains_key(d))
        .collect();
    let dropped = blocking(shared, "unprepare", move |shared| {
        drop_claims(shared, &dropping, &unlabel_done)
    })
    .await;
    match dropped {
        Ok(Ok(relabel)) => {
            for domain in relabel {
                // A channel claim of the domain was prepared meanwhile: it needs the label.
                if let Err(err) = shared.cluster.label_node(&domain).await {
                    tracing::warn!(domain_uid = %domain, error = %err, "cannot restore the node label");
                }
            }
            for uid in drop {
                results.insert(uid, Ok(()));
            }
        }
        Ok(Err(message)) | Err(message) => results.extend(fail_all(message, &drop)),
    }
    results
}

/// Step 3; returns the domains of `unlabelled` that have channel claims again.
fn drop_claims(
    shared: &Shared,
    uids: &[String],
    unlabelled: &[String],
) -> Result<Vec<String>, String> {
    let (_node_lock, mut ledger) = shared.lock_all()?;
    let mut changed = false;
    for uid in uids {
        let valid = cdi::validate_claim_uid(uid).is_ok();
        if valid && let Err(err) = shared.cdi.remove_claim_spec(uid) {
            tracing::warn!(claim_uid = %uid, error = %error_chain(&err), "cannot remove the CDI spec; start-up will remove it as an orphan");
        }
        let Some(entry) = ledger.state_mut().remove(uid) else {
            continue;
        };
        changed = true;
        if let Some((domain, false)) = claim_domain(&entry)
            && remaining_claims(ledger.state(), &domain, false, uid) == 0
            && cdi::validate_claim_uid(&domain).is_ok()
        {
            let dir = shared.domain_dir(&domain);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(compute_domain = %domain, claim_uid = %uid, dir = %dir.display(), "removed the directory of a ComputeDomain")
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(compute_domain = %domain, claim_uid = %uid, dir = %dir.display(), error = %err, "cannot remove the directory of a ComputeDomain");
                }
            }
        }
        tracing::debug!(claim_uid = %uid, "claim unprepared");
    }
    if changed {
        ledger.persist().map_err(|err| {
            format!(
                "cannot remove the claim from the checkpoint: {}",
                error_chain(&err)
            )
        })?;
    }
    Ok(unlabelled
        .iter()
        .filter(|domain| remaining_claims(ledger.state(), domain, true, "") > 0)
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{
        ClaimRef as EntryRef, DeviceInfo, PreparedChannel, PreparedDevice, PreparedGroup,
    };

    fn channel_claim(state: &mut CheckpointState, uid: &str, domain: &str) {
        let claim = EntryRef {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
        };
        state.begin_prepare(&claim, Vec::new()).unwrap();
        state
            .complete_prepare(
                uid,
                vec![PreparedGroup {
                    devices: vec![PreparedDevice {
                        device: "channel-0".into(),
                        info: DeviceInfo::Channel(PreparedChannel {
                            id: 0,
                            domain_id: Some(domain.into()),
                            allocation_mode: None,
                        }),
                        ..PreparedDevice::default()
                    }],
                    ..PreparedGroup::default()
                }],
            )
            .unwrap();
    }

    #[test]
    fn last_channel_claim_of_a_domain_unlabels() {
        let mut state = CheckpointState::new("boot");
        channel_claim(&mut state, "a", "d1");
        channel_claim(&mut state, "b", "d1");
        channel_claim(&mut state, "c", "d2");
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let cases: [(&[&str], &[&str]); 5] = [
            (&["a"], &[]),
            (&["a", "b"], &["d1"]),
            (&["c"], &["d2"]),
            (&["a", "b", "c", "unknown"], &["d1", "d2"]),
            (&["unknown"], &[]),
        ];
        for (batch, want) in cases {
            let got: Vec<String> = domains_to_unlabel(&state, &strings(batch))
                .into_iter()
                .collect();
            assert_eq!(got, strings(want), "{batch:?}");
        }
    }
}

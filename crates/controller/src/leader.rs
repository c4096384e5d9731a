//! Leader election on a `coordination.k8s.io/v1` Lease, so two controller replicas are safe.
//!
//! Protocol (client-go's, so a Go replica and an nvdra replica exclude each other during a
//! migration): the Lease names its holder (`holderIdentity`) and how long a claim lasts
//! (`leaseDurationSeconds`). Every `retry_period` each replica reads the Lease and
//! [`decide`]s: create it when absent, take it when released or expired, renew it when held,
//! otherwise wait. Writes are `replace` calls carrying the read `resourceVersion`, so two
//! replicas racing for an expired Lease cannot both win (the loser gets a 409).
//!
//! Expiry is judged on *this* replica's monotonic clock: a Lease counts as expired when its
//! record (holder, renew time, transitions) has not changed for `leaseDurationSeconds` since
//! we first observed it, so clock skew between nodes cannot cause two leaders.
//!
//! Failure modes and guarantees:
//! - A leader that cannot renew for `renew_deadline` (API errors, conflicts) or finds another
//!   holder in the Lease stops leading: [`Elector::run`] returns [`Error::LeaseLost`] and the
//!   caller drops the controller at once and exits non-zero, so the Deployment restarts it
//!   as a standby. `renew_deadline < lease_duration` gives the old leader time to stop
//!   before a standby may take over.
//! - On shutdown the leader releases the Lease (empty holder) so a standby takes over without
//!   waiting for expiry; a failed release only delays that.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;

/// Timing of the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a claim lasts without renewal.
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// Interval between attempts.
    pub retry_period: Duration,
}

/// What to do with the Lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it with us as holder.
    Create,
    /// The Lease is free (released or expired): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live claim.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// The part of a Lease that changes when its holder renews or changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// `holderIdentity`; empty when released.
    pub holder: String,
    /// `renewTime`, as written.
    pub renew_time: Option<Timestamp>,
    /// `leaseTransitions`.
    pub transitions: i32,
    /// `leaseDurationSeconds`, when set.
    pub duration: Option<Duration>,
}

impl Record {
    fn from_spec(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
            duration: spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
        }
    }
}

/// Decides what to do with the Lease, purely.
///
/// `current` is the record read now (`None`: no Lease); `observed` is the record we saw before
/// and the instant we first saw it; `now` is the same monotonic clock.
pub fn decide(
    me: &str,
    current: Option<&Record>,
    observed: Option<&(Record, Instant)>,
    now: Instant,
    default_duration: Duration,
) -> Decision {
    let Some(current) = current else {
        return Decision::Create;
    };
    if current.holder == me {
        return Decision::Renew;
    }
    if current.holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = current.duration.unwrap_or(default_duration);
    let expired = match observed {
        Some((record, since)) if record == current => now.duration_since(*since) >= duration,
        // First sight of this record: its clock starts now.
        _ => false,
    };
    if expired {
        Decision::Acquire
    } else {
        Decision::Wait {
            holder: current.holder.clone(),
        }
    }
}

/// A replica taking part in the election.
pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    timing: Timing,
    observed: Option<(Record, Instant)>,
}

impl Elector {
    /// An elector for Lease `namespace/name` under `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: String,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity,
            timing,
            observed: None,
        }
    }

    /// This replica's identity in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Takes part until leadership is lost. `leading` turns true when this replica becomes
    /// leader; `healthy` is set after every successful Lease read or write (standby health).
    /// Never returns `Ok`: once leading, it returns [`Error::LeaseLost`] when leadership ends.
    pub async fn run(
        &mut self,
        leading: &watch::Sender<bool>,
        healthy: &watch::Sender<bool>,
    ) -> Result<(), Error> {
        let mut last_renewal: Option<Instant> = None;
        let mut ticker = tokio::time::interval(self.timing.retry_period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // One round may not outlast the renew deadline (client-go bounds it the
            // same way): a hung request must not keep a lost leader reconciling.
            let attempt =
                match tokio::time::timeout(self.timing.renew_deadline, self.attempt()).await {
                    Ok(result) => result,
                    Err(_) => Err(Error::LeaseTimeout {
                        after: self.timing.renew_deadline,
                    }),
                };
            match attempt {
                Ok(true) => {
                    let _ = healthy.send(true);
                    if last_renewal.is_none() {
                        tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                        let _ = leading.send(true);
                    }
                    last_renewal = Some(Instant::now());
                }
                Ok(false) => {
                    let _ = healthy.send(true);
                    if last_renewal.is_some() {
                        // Another replica holds the Lease: we must stop now.
                        return Err(self.lost());
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "leader election attempt failed");
                    if last_renewal.is_none() {
                        let _ = healthy.send(false);
                    }
                }
            }
            if let Some(at) = last_renewal
                && at.elapsed() >= self.timing.renew_deadline
            {
                return Err(self.lost());
            }
        }
    }

    fn lost(&self) -> Error {
        Error::LeaseLost {
            lease: format!("{}/{}", self.namespace, self.name),
        }
    }

    /// One read-decide-write round; `Ok(true)` when we hold the Lease afterwards.
    async fn attempt(&mut self) -> Result<bool, Error> {
        let lease = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(Error::ReadLease)?;
        let now = Instant::now();
        let current = lease
            .as_ref()
            .map(|l| Record::from_spec(&l.spec.clone().unwrap_or_default()));
        if let Some(record) = &current
            && self.observed.as_ref().map(|(r, _)| r) != Some(record)
        {
            self.observed = Some((record.clone(), now));
        }
        let decision = decide(
            &self.identity,
            current.as_ref(),
            self.observed.as_ref(),
            now,
            self.timing.lease_duration,
        );
        let wall = Timestamp::now();
        let duration_seconds =
            i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
        match (decision, lease) {
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration_seconds),
                        acquire_time: Some(MicroTime(wall)),
                        renew_time: Some(MicroTime(wall)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map_err(Error::WriteLease)?;
                Ok(true)
            }
            (Decision::Acquire, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = Some(self.identity.clone());
                spec.lease_duration_seconds = Some(duration_seconds);
                spec.acquire_time = Some(MicroTime(wall));
                spec.renew_time = Some(MicroTime(wall));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                self.write(&lease).await?;
                Ok(true)
            }
            (Decision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(MicroTime(wall));
                spec.lease_duration_seconds = Some(duration_seconds);
                self.write(&lease).await?;
                Ok(true)
            }
            (Decision::Wait { holder }, _) => {
                tracing::debug!(%holder, "lease held by another replica");
                Ok(false)
            }
            // Acquire/Renew always come with a Lease; nothing to write otherwise.
            (Decision::Acquire | Decision::Renew, None) => Ok(false),
        }
    }

    async fn write(&self, lease: &Lease) -> Result<(), Error> {
        // `replace` carries the resourceVersion we read: a concurrent writer makes this 409.
        self.api
            .replace(&self.name, &PostParams::default(), lease)
            .await
            .map_err(Error::WriteLease)?;
        Ok(())
    }

    /// Gives the Lease up if we hold it, so a standby need not wait for expiry.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.write(&lease).await {
            Ok(()) => tracing::info!("released the leader-election Lease"),
            Err(err) => tracing::warn!(error = %err.chain(), "could not release the Lease"),
        }
    }
}

/// `pod_name` plus a random suffix, so a restarted pod with the same name is a new holder.
pub fn identity(pod_name: &str) -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    // RandomState is seeded from the OS per process: random enough for a unique suffix.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Timestamp::now().as_nanosecond().unsigned_abs());
    format!("{pod_name}_{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const D: Duration = Duration::from_secs(15);

    fn record(holder: &str, renew: i64) -> Record {
        Record {
            holder: holder.into(),
            renew_time: Some(Timestamp::from_second(renew).unwrap()),
            transitions: 1,
            duration: Some(D),
        }
    }

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let other = record("other", 100);
        let wait = Decision::Wait {
            holder: "other".into(),
        };
        type Case = (
            &'static str,
            Option<Record>,
            Option<(Record, Instant)>,
            Instant,
            Decision,
        );
        let cases: Vec<Case> = vec![
            ("no lease", None, None, secs(0), Decision::Create),
            (
                "we hold it",
                Some(record("me", 100)),
                None,
                secs(0),
                Decision::Renew,
            ),
            (
                "we hold it even if stale",
                Some(record("me", 1)),
                Some((record("me", 1), t0)),
                secs(100),
                Decision::Renew,
            ),
            (
                "released",
                Some(record("", 100)),
                None,
                secs(0),
                Decision::Acquire,
            ),
            (
                "held, first sight",
                Some(other.clone()),
                None,
                secs(100),
                wait.clone(),
            ),
            (
                "held, observed recently",
                Some(other.clone()),
                Some((other.clone(), t0)),
                secs(14),
                wait.clone(),
            ),
            (
                "held, unchanged for the lease duration",
                Some(other.clone()),
                Some((other.clone(), t0)),
                secs(15),
                Decision::Acquire,
            ),
            (
                "renewed since we last looked",
                Some(record("other", 102)),
                Some((other.clone(), t0)),
                secs(60),
                wait.clone(),
            ),
            (
                "lease's own duration wins over the default",
                Some(Record {
                    duration: Some(Duration::from_secs(60)),
                    ..other.clone()
                }),
                Some((
                    Record {
                        duration: Some(Duration::from_secs(60)),
                        ..other.clone()
                    },
                    t0,
                )),
                secs(30),
                wait.clone(),
            ),
            (
                "no duration in lease: default",
                Some(Record {
                    duration: None,
                    ..other.clone()
                }),
                Some((
                    Record {
                        duration: None,
                        ..other.clone()
                    },
                    t0,
                )),
                secs(15),
                Decision::Acquire,
            ),
        ];
        for (name, current, observed, now, want) in cases {
            assert_eq!(
                decide("me", current.as_ref(), observed.as_ref(), now, D),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn identities_are_unique_per_call() {
        let a = identity("pod");
        let b = identity("pod");
        assert!(a.starts_with("pod_"), "{a}");
        assert_eq!(a.len(), "pod_".len() + 16);
        assert_ne!(a, b);
    }
}

//! Prometheus metrics of the controller, on a [`Registry`] the caller injects.
//!
//! | Metric | Type | Labels |
//! |---|---|---|
//! | `nvidia_dra_compute_domain_info` | gauge, value = number of domains | `status` (`Ready`/`NotReady`) |
//! | `nvdra_controller_reconciles_total` | counter | `result` (`success`/`error`/`invalid_object`) |
//! | `nvdra_controller_reconcile_errors_total` | counter | `error` (an [`Error`] variant name) |
//! | `nvdra_controller_reconcile_duration_seconds` | histogram (5 ms … 10 s) | — |
//! | `nvdra_controller_leader` | gauge, 1 while this replica leads | — |
//!
//! `nvidia_dra_compute_domain_info` keeps upstream's name and labels; it counts the domains
//! this replica has reconciled, by their last computed `status.status`, and a domain leaves
//! the count when its clean-up finishes (upstream drops the series at the same point).
//!
//! Invariants: label values come from closed sets, never object names; every series is
//! created at zero up front so `rate()` works from the first event.
//!
//! Failure modes: [`Metrics::new`] fails only when the registry already holds a metric of the
//! same name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use nvdra_api::Readiness;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::error::Error;

/// `result` label values of `nvdra_controller_reconciles_total`.
pub mod results {
    /// The reconcile succeeded.
    pub const SUCCESS: &str = "success";
    /// The reconcile failed (see the errors counter).
    pub const ERROR: &str = "error";
    /// The ComputeDomain could not be decoded and was skipped.
    pub const INVALID_OBJECT: &str = "invalid_object";
}

/// The controller's metrics; cheap to clone (clones share the series).
#[derive(Debug, Clone)]
pub struct Metrics {
    domain_info: IntGaugeVec,
    reconciles: IntCounterVec,
    reconcile_errors: IntCounterVec,
    reconcile_duration: Histogram,
    leader: IntGauge,
    domains: Arc<Mutex<HashMap<String, Readiness>>>,
}

impl Metrics {
    /// Registers every metric on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let domain_info = IntGaugeVec::new(
            Opts::new(
                "nvidia_dra_compute_domain_info",
                "Number of ComputeDomains by status",
            ),
            &["status"],
        )?;
        let reconciles = IntCounterVec::new(
            Opts::new(
                "nvdra_controller_reconciles_total",
                "ComputeDomain reconciles by result",
            ),
            &["result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "nvdra_controller_reconcile_errors_total",
                "Failed ComputeDomain reconciles by failed operation",
            ),
            &["error"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "nvdra_controller_reconcile_duration_seconds",
                "Duration of ComputeDomain reconciles",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let leader = IntGauge::new(
            "nvdra_controller_leader",
            "1 while this replica holds the leader-election Lease (or runs without election)",
        )?;
        registry.register(Box::new(domain_info.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        for status in [Readiness::Ready, Readiness::NotReady] {
            domain_info.with_label_values(&[status.as_str()]).set(0);
        }
        for result in [results::SUCCESS, results::ERROR, results::INVALID_OBJECT] {
            reconciles.with_label_values(&[result]).reset();
        }
        for label in Error::RECONCILE_LABELS {
            reconcile_errors.with_label_values(&[*label]).reset();
        }
        Ok(Self {
            domain_info,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            domains: Arc::default(),
        })
    }

    /// Starts timing one reconcile.
    pub fn start_reconcile(&self) -> Instant {
        Instant::now()
    }

    /// Records the end of a reconcile started at `started`.
    pub fn finish_reconcile(&self, started: Instant, outcome: Result<(), &Error>) {
        self.reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => self.reconciles.with_label_values(&[results::SUCCESS]).inc(),
            Err(err) => {
                self.reconciles.with_label_values(&[results::ERROR]).inc();
                self.reconcile_errors
                    .with_label_values(&[err.metric_label()])
                    .inc();
            }
        }
    }

    /// Counts a ComputeDomain that could not be decoded.
    pub fn invalid_object(&self) {
        self.reconciles
            .with_label_values(&[results::INVALID_OBJECT])
            .inc();
    }

    /// Records the status of domain `uid`.
    pub fn set_domain(&self, uid: &str, status: Readiness) {
        let mut domains = self.domains.lock().unwrap_or_else(PoisonError::into_inner);
        domains.insert(uid.to_owned(), status);
        self.publish_domains(&domains);
    }

    /// Drops domain `uid` from the count (its clean-up finished).
    pub fn forget_domain(&self, uid: &str) {
        let mut domains = self.domains.lock().unwrap_or_else(PoisonError::into_inner);
        domains.remove(uid);
        self.publish_domains(&domains);
    }

    fn publish_domains(&self, domains: &HashMap<String, Readiness>) {
        for status in [Readiness::Ready, Readiness::NotReady] {
            let count = domains.values().filter(|s| **s == status).count();
            self.domain_info
                .with_label_values(&[status.as_str()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use prometheus::Encoder as _;

    fn scrape(registry: &Registry, prefix: &str) -> Vec<String> {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn domain_info_counts_by_status() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let info = |r: &Registry| scrape(r, "nvidia_dra_compute_domain_info");
        assert_eq!(
            info(&registry),
            [
                "nvidia_dra_compute_domain_info{status=\"NotReady\"} 0",
                "nvidia_dra_compute_domain_info{status=\"Ready\"} 0",
            ]
        );
        metrics.set_domain("a", Readiness::NotReady);
        metrics.set_domain("b", Readiness::NotReady);
        metrics.set_domain("a", Readiness::Ready);
        assert_eq!(
            info(&registry),
            [
                "nvidia_dra_compute_domain_info{status=\"NotReady\"} 1",
                "nvidia_dra_compute_domain_info{status=\"Ready\"} 1",
            ]
        );
        metrics.forget_domain("b");
        metrics.forget_domain("never-seen");
        assert_eq!(
            info(&registry),
            [
                "nvidia_dra_compute_domain_info{status=\"NotReady\"} 0",
                "nvidia_dra_compute_domain_info{status=\"Ready\"} 1",
            ]
        );
    }

    #[test]
    fn reconcile_counters_are_precreated_and_bounded() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let started = metrics.start_reconcile();
        metrics.finish_reconcile(started, Ok(()));
        let err = Error::ApplyDaemonSet(kube::Error::LinesCodecMaxLineLengthExceeded);
        metrics.finish_reconcile(started, Err(&err));
        metrics.invalid_object();
        assert_eq!(
            scrape(&registry, "nvdra_controller_reconciles_total"),
            [
                "nvdra_controller_reconciles_total{result=\"error\"} 1",
                "nvdra_controller_reconciles_total{result=\"invalid_object\"} 1",
                "nvdra_controller_reconciles_total{result=\"success\"} 1",
            ]
        );
        let errors = scrape(&registry, "nvdra_controller_reconcile_errors_total{");
        assert_eq!(errors.len(), Error::RECONCILE_LABELS.len());
        assert!(errors.contains(
            &"nvdra_controller_reconcile_errors_total{error=\"ApplyDaemonSet\"} 1".to_owned()
        ));
        assert_eq!(
            scrape(
                &registry,
                "nvdra_controller_reconcile_duration_seconds_count"
            ),
            ["nvdra_controller_reconcile_duration_seconds_count 2"]
        );
        metrics.set_leader(true);
        assert_eq!(
            scrape(&registry, "nvdra_controller_leader"),
            ["nvdra_controller_leader 1"]
        );
    }
}

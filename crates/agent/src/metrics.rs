//! Prometheus metrics of the `gpu.nvidia.com` node agent.
//!
//! Job: register the upstream driver's kubelet-plugin metrics under their exact names, types,
//! labels and buckets (so existing dashboards and alerts keep working), plus nvdra's own
//! checkpoint and ResourceSlice-publish metrics, on a [`Registry`] the caller injects (never
//! the process-global default).
//!
//! | Metric | Type | Labels |
//! |---|---|---|
//! | `nvidia_dra_requests_total` | counter | `driver`, `operation` |
//! | `nvidia_dra_request_duration_seconds` | histogram (0.05 s … 12.8 s, ×2) | `driver`, `operation` |
//! | `nvidia_dra_requests_inflight` | gauge | `driver`, `operation` |
//! | `nvidia_dra_prepared_devices` | gauge | `node`, `driver`, `device_type` |
//! | `nvidia_dra_node_prepare_errors_total` | counter | `driver`, `error_type` |
//! | `nvidia_dra_node_unprepare_errors_total` | counter | `driver`, `error_type` |
//! | `nvdra_agent_checkpoint_writes_total` | counter | `result` (`success`/`error`) |
//! | `nvdra_agent_checkpoint_write_duration_seconds` | histogram (100 µs … 1 s) | — |
//! | `nvdra_agent_slice_publishes_total` | counter | `result` (`success`/`error`) |
//! | `nvdra_agent_slice_publish_consecutive_failures` | gauge | — |
//! | `nvdra_agent_slice_pool_generation` | gauge | — |
//! | `nvdra_agent_slices` | gauge | — |
//!
//! Semantics follow upstream, where one "request" is one claim: `requests_total` counts claims
//! prepared (or unprepared) successfully, `request_duration_seconds` observes, per such claim,
//! the duration of the kubelet call it was part of (claims of one call share its fsyncs, so
//! they share its latency), `requests_inflight` counts claims inside driver calls, and the
//! error counters count failed claims by the stage that failed. `prepared_devices` is
//! recomputed from the checkpoint (completed claims only) after every write.
//!
//! The slice metrics mirror the publisher's [`Status`] ([`follow_slice_status`]); the
//! kubelet-plugin library stays metrics-free. A status channel keeps only the latest value, so
//! passes that finish between two wake-ups of the follower count once: the publish counters
//! are a lower bound (passes are spaced by debounce and backoff, so this is rare).
//!
//! Invariants: every label value comes from a closed set (driver and node names are fixed at
//! construction), so cardinality is bounded. Every series a scrape could ask about is created
//! at zero up front, so `rate()` and `increase()` work from the first event and a dashboard
//! never mistakes "absent" for "zero".
//!
//! Failure modes: [`Metrics::new`] fails only if the registry already holds a metric of the
//! same name (registering twice on one registry is a programming error).

use std::collections::BTreeMap;
use std::time::Duration;

use nvdra_kubelet_plugin::resourceslice::Status;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::sync::watch;

use crate::checkpoint::{CD_DEVICE_TYPE_LABELS, DEVICE_TYPE_LABELS};

/// Buckets of `nvidia_dra_request_duration_seconds`: upstream's 0.05 s doubled nine times.
pub const REQUEST_DURATION_BUCKETS: [f64; 9] = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8];

/// Buckets of `nvdra_agent_checkpoint_write_duration_seconds`: fine enough to tell an fsync on
/// a fast SSD (~100 µs) from one on a busy virtual disk (~10 ms).
pub const CHECKPOINT_WRITE_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A kubelet-facing operation, the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `NodePrepareResources`.
    Prepare,
    /// `NodeUnprepareResources`.
    Unprepare,
}

impl Operation {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Unprepare => "unprepare",
        }
    }

    const ALL: [Self; 2] = [Self::Prepare, Self::Unprepare];
}

/// The stage a claim failed in, the `error_type` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// The node-wide prepare/unprepare lock could not be taken (or its state recovered).
    LockAcquire,
    /// Preparing the claim's devices failed (counted on the prepare counter).
    PrepareDevices,
    /// Unpreparing the claim's devices failed (counted on the unprepare counter).
    UnprepareDevices,
    /// Republishing ResourceSlices after the operation failed.
    PublishResources,
}

impl ErrorType {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LockAcquire => "lock_acquire",
            Self::PrepareDevices => "prepare_devices",
            Self::UnprepareDevices => "unprepare_devices",
            Self::PublishResources => "publish_resources",
        }
    }

    /// The error types upstream reports for `operation`.
    fn for_operation(operation: Operation) -> [Self; 3] {
        match operation {
            Operation::Prepare => [
                Self::LockAcquire,
                Self::PrepareDevices,
                Self::PublishResources,
            ],
            Operation::Unprepare => [
                Self::LockAcquire,
                Self::UnprepareDevices,
                Self::PublishResources,
            ],
        }
    }
}

/// The agent's metrics; cheap to clone (clones share the series).
#[derive(Debug, Clone)]
pub struct Metrics {
    driver: String,
    node: String,
    device_types: &'static [&'static str],
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    requests_inflight: IntGaugeVec,
    prepared_devices: IntGaugeVec,
    prepare_errors: IntCounterVec,
    unprepare_errors: IntCounterVec,
    checkpoint_writes: IntCounterVec,
    checkpoint_write_duration: prometheus::Histogram,
    slice_publishes: IntCounterVec,
    slice_publish_failures: IntGauge,
    slice_pool_generation: IntGauge,
    slices: IntGauge,
}

impl Metrics {
    /// Registers every metric on `registry` for driver `driver` on node `node`, with all
    /// series pre-created at zero.
    pub fn new(registry: &Registry, driver: &str, node: &str) -> Result<Self, prometheus::Error> {
        let requests_total = IntCounterVec::new(
            Opts::new(
                "nvidia_dra_requests_total",
                "Total number of DRA prepare and unprepare requests.",
            ),
            &["driver", "operation"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "nvidia_dra_request_duration_seconds",
                "Duration of DRA prepare and unprepare requests.",
            )
            .buckets(REQUEST_DURATION_BUCKETS.to_vec()),
            &["driver", "operation"],
        )?;
        let requests_inflight = IntGaugeVec::new(
            Opts::new(
                "nvidia_dra_requests_inflight",
                "Number of in-flight DRA prepare and unprepare requests.",
            ),
            &["driver", "operation"],
        )?;
        let prepared_devices = IntGaugeVec::new(
            Opts::new(
                "nvidia_dra_prepared_devices",
                "Current number of prepared devices by device type.",
            ),
            &["node", "driver", "device_type"],
        )?;
        let prepare_errors = IntCounterVec::new(
            Opts::new(
                "nvidia_dra_node_prepare_errors_total",
                "Total number of failures during DRA node prepare for kubelet plugins.",
            ),
            &["driver", "error_type"],
        )?;
        let unprepare_errors = IntCounterVec::new(
            Opts::new(
                "nvidia_dra_node_unprepare_errors_total",
                "Total number of failures during DRA node unprepare for kubelet plugins.",
            ),
            &["driver", "error_type"],
        )?;
        let checkpoint_writes = IntCounterVec::new(
            Opts::new(
                "nvdra_agent_checkpoint_writes_total",
                "Checkpoint writes by result.",
            ),
            &["result"],
        )?;
        let checkpoint_write_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "nvdra_agent_checkpoint_write_duration_seconds",
                "Duration of one atomic checkpoint write (encode, write, fsync, rename, fsync \
                 directory).",
            )
            .buckets(CHECKPOINT_WRITE_BUCKETS.to_vec()),
        )?;
        let slice_publishes = IntCounterVec::new(
            Opts::new(
                "nvdra_agent_slice_publishes_total",
                "ResourceSlice publisher passes by result.",
            ),
            &["result"],
        )?;
        let slice_publish_failures = IntGauge::new(
            "nvdra_agent_slice_publish_consecutive_failures",
            "ResourceSlice publisher passes that failed since the last success.",
        )?;
        let slice_pool_generation = IntGauge::new(
            "nvdra_agent_slice_pool_generation",
            "Generation of the node's ResourceSlice pool after the last successful pass.",
        )?;
        let slices = IntGauge::new(
            "nvdra_agent_slices",
            "ResourceSlices in the node's pool after the last successful pass.",
        )?;

        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(requests_inflight.clone()))?;
        registry.register(Box::new(prepared_devices.clone()))?;
        registry.register(Box::new(prepare_errors.clone()))?;
        registry.register(Box::new(unprepare_errors.clone()))?;
        registry.register(Box::new(checkpoint_writes.clone()))?;
        registry.register(Box::new(checkpoint_write_duration.clone()))?;
        registry.register(Box::new(slice_publishes.clone()))?;
        registry.register(Box::new(slice_publish_failures.clone()))?;
        registry.register(Box::new(slice_pool_generation.clone()))?;
        registry.register(Box::new(slices.clone()))?;

        let metrics = Self {
            driver: driver.to_owned(),
            node: node.to_owned(),
            device_types: device_types_of(driver),
            requests_total,
            request_duration,
            requests_inflight,
            prepared_devices,
            prepare_errors,
            unprepare_errors,
            checkpoint_writes,
            checkpoint_write_duration,
            slice_publishes,
            slice_publish_failures,
            slice_pool_generation,
            slices,
        };
        for result in ["success", "error"] {
            metrics.checkpoint_writes.with_label_values(&[result]);
            metrics.slice_publishes.with_label_values(&[result]);
        }
        metrics.create_driver_series();
        Ok(metrics)
    }

    /// A handle reporting for another driver of the same agent, on the same metrics (the
    /// `nvidia_dra_*` series carry the driver label; the `nvdra_agent_*` ones are agent-wide).
    /// Its series are created at zero now.
    pub fn for_driver(&self, driver: &str) -> Self {
        let metrics = Self {
            driver: driver.to_owned(),
            device_types: device_types_of(driver),
            ..self.clone()
        };
        metrics.create_driver_series();
        metrics
    }

    /// The `device_type` labels of this handle's driver.
    pub fn device_types(&self) -> &'static [&'static str] {
        self.device_types
    }

    fn create_driver_series(&self) {
        let driver = self.driver.as_str();
        for operation in Operation::ALL {
            let labels = [driver, operation.as_str()];
            self.requests_total.with_label_values(&labels);
            self.request_duration.with_label_values(&labels);
            self.requests_inflight.with_label_values(&labels);
            for error_type in ErrorType::for_operation(operation) {
                self.errors(operation)
                    .with_label_values(&[driver, error_type.as_str()]);
            }
        }
        for device_type in self.device_types {
            self.prepared_devices
                .with_label_values(&[self.node.as_str(), driver, device_type]);
        }
    }

    fn errors(&self, operation: Operation) -> &IntCounterVec {
        match operation {
            Operation::Prepare => &self.prepare_errors,
            Operation::Unprepare => &self.unprepare_errors,
        }
    }

    /// Marks `claims` claims as entering a driver call; they leave when the guard drops.
    pub fn inflight(&self, operation: Operation, claims: usize) -> Inflight {
        let gauge = self
            .requests_inflight
            .with_label_values(&[self.driver.as_str(), operation.as_str()]);
        let claims = i64::try_from(claims).unwrap_or(i64::MAX);
        gauge.add(claims);
        Inflight { gauge, claims }
    }

    /// Records `claims` claims that succeeded in a call that took `duration`.
    pub fn observe_success(&self, operation: Operation, claims: usize, duration: Duration) {
        if claims == 0 {
            return;
        }
        let labels = [self.driver.as_str(), operation.as_str()];
        self.requests_total
            .with_label_values(&labels)
            .inc_by(claims as u64);
        let histogram = self.request_duration.with_label_values(&labels);
        for _ in 0..claims {
            histogram.observe(duration.as_secs_f64());
        }
    }

    /// Counts `claims` claims that failed `operation` at stage `error_type`.
    pub fn inc_errors(&self, operation: Operation, error_type: ErrorType, claims: usize) {
        if claims == 0 {
            return;
        }
        self.errors(operation)
            .with_label_values(&[self.driver.as_str(), error_type.as_str()])
            .inc_by(claims as u64);
    }

    /// Sets `nvidia_dra_prepared_devices` from a full count by device type (as returned by
    /// [`crate::checkpoint::CheckpointState::prepared_device_counts_by_type`]).
    pub fn set_prepared_devices(&self, counts: &BTreeMap<&'static str, usize>) {
        for (device_type, count) in counts {
            self.prepared_devices
                .with_label_values(&[self.node.as_str(), self.driver.as_str(), device_type])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Records one checkpoint write.
    pub fn observe_checkpoint_write(&self, succeeded: bool, duration: Duration) {
        let result = if succeeded { "success" } else { "error" };
        self.checkpoint_writes.with_label_values(&[result]).inc();
        self.checkpoint_write_duration
            .observe(duration.as_secs_f64());
    }
}

/// Upstream's `device_type` labels for `driver`.
fn device_types_of(driver: &str) -> &'static [&'static str] {
    if driver == nvdra_api::names::drivers::COMPUTE_DOMAIN {
        &CD_DEVICE_TYPE_LABELS
    } else {
        &DEVICE_TYPE_LABELS
    }
}

/// Mirrors the ResourceSlice publisher's status into `metrics` until the publisher stops
/// (its status channel closes). Passes already finished when this starts are counted too.
pub async fn follow_slice_status(mut status: watch::Receiver<Status>, metrics: Metrics) {
    let mut previous = Status::default();
    loop {
        let current = status.borrow_and_update().clone();
        observe_slice_status(&previous, &current, &metrics);
        previous = current;
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Applies one publisher status change: a new `last_success` is one successful pass, a new
/// `last_error_at` one failed pass; the gauges copy the status.
fn observe_slice_status(previous: &Status, current: &Status, metrics: &Metrics) {
    if current.last_success != previous.last_success {
        metrics
            .slice_publishes
            .with_label_values(&["success"])
            .inc();
    }
    if current.last_error_at != previous.last_error_at {
        metrics.slice_publishes.with_label_values(&["error"]).inc();
    }
    metrics
        .slice_publish_failures
        .set(i64::from(current.consecutive_failures));
    metrics
        .slice_pool_generation
        .set(current.generation.unwrap_or(0));
    metrics
        .slices
        .set(i64::try_from(current.slices).unwrap_or(i64::MAX));
}

/// Claims counted in `nvidia_dra_requests_inflight` until this drops.
#[derive(Debug)]
pub struct Inflight {
    gauge: prometheus::IntGauge,
    claims: i64,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.gauge.sub(self.claims);
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    fn scrape(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The sample lines (no `#` comments) whose name starts with `prefix`.
    fn samples(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn series_exist_at_zero_before_any_event() {
        let registry = Registry::new();
        Metrics::new(&registry, "gpu.nvidia.com", "node-a").unwrap();
        let text = scrape(&registry);
        assert_eq!(
            samples(&text, "nvidia_dra_requests_total"),
            [
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="prepare"} 0"#,
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="unprepare"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_node_unprepare_errors_total"),
            [
                r#"nvidia_dra_node_unprepare_errors_total{driver="gpu.nvidia.com",error_type="lock_acquire"} 0"#,
                r#"nvidia_dra_node_unprepare_errors_total{driver="gpu.nvidia.com",error_type="publish_resources"} 0"#,
                r#"nvidia_dra_node_unprepare_errors_total{driver="gpu.nvidia.com",error_type="unprepare_devices"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices"),
            [
                r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="mig",driver="gpu.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="unknown",driver="gpu.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="vfio",driver="gpu.nvidia.com",node="node-a"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvdra_agent_slice"),
            [
                "nvdra_agent_slice_pool_generation 0",
                "nvdra_agent_slice_publish_consecutive_failures 0",
                r#"nvdra_agent_slice_publishes_total{result="error"} 0"#,
                r#"nvdra_agent_slice_publishes_total{result="success"} 0"#,
                "nvdra_agent_slices 0",
            ]
        );
        let buckets: Vec<String> = samples(
            &text,
            r#"nvidia_dra_request_duration_seconds_bucket{driver="gpu.nvidia.com",operation="prepare""#,
        );
        assert_eq!(
            buckets
                .iter()
                .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
                .collect::<Vec<_>>(),
            [
                "0.05", "0.1", "0.2", "0.4", "0.8", "1.6", "3.2", "6.4", "12.8", "+Inf"
            ]
        );
    }

    #[test]
    fn events_move_the_right_series() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry, "gpu.nvidia.com", "node-a").unwrap();
        {
            let _inflight = metrics.inflight(Operation::Prepare, 3);
            let text = scrape(&registry);
            assert_eq!(
                samples(&text, "nvidia_dra_requests_inflight")[0],
                r#"nvidia_dra_requests_inflight{driver="gpu.nvidia.com",operation="prepare"} 3"#
            );
        }
        metrics.observe_success(Operation::Prepare, 2, Duration::from_millis(70));
        metrics.inc_errors(Operation::Prepare, ErrorType::PrepareDevices, 1);
        metrics.observe_checkpoint_write(true, Duration::from_micros(300));
        metrics.observe_checkpoint_write(false, Duration::from_micros(50));
        metrics.set_prepared_devices(&BTreeMap::from([("gpu", 2), ("mig", 0)]));
        let text = scrape(&registry);
        for want in [
            r#"nvidia_dra_requests_inflight{driver="gpu.nvidia.com",operation="prepare"} 0"#,
            r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="prepare"} 2"#,
            r#"nvidia_dra_request_duration_seconds_bucket{driver="gpu.nvidia.com",operation="prepare",le="0.05"} 0"#,
            r#"nvidia_dra_request_duration_seconds_bucket{driver="gpu.nvidia.com",operation="prepare",le="0.1"} 2"#,
            r#"nvidia_dra_request_duration_seconds_count{driver="gpu.nvidia.com",operation="prepare"} 2"#,
            r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="prepare_devices"} 1"#,
            r#"nvdra_agent_checkpoint_writes_total{result="error"} 1"#,
            r#"nvdra_agent_checkpoint_writes_total{result="success"} 1"#,
            r#"nvdra_agent_checkpoint_write_duration_seconds_bucket{le="0.0001"} 1"#,
            r#"nvdra_agent_checkpoint_write_duration_seconds_bucket{le="0.0005"} 2"#,
            r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
        }
    }

    /// A publisher status whose timestamps are seconds after the epoch.
    fn status(
        success_at: Option<u64>,
        error_at: Option<u64>,
        consecutive_failures: u32,
        generation: Option<i64>,
        slices: usize,
    ) -> Status {
        let at = |secs| std::time::UNIX_EPOCH + Duration::from_secs(secs);
        Status {
            last_success: success_at.map(at),
            generation,
            slices,
            last_error: error_at.map(|_| "apply slice: boom".to_owned()),
            last_error_at: error_at.map(at),
            consecutive_failures,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn slice_status_changes_move_the_slice_series() {
        let cases = [
            (
                "no change",
                Status::default(),
                Status::default(),
                [0, 0, 0, 0, 0],
            ),
            (
                "first success",
                Status::default(),
                status(Some(10), None, 0, Some(1), 2),
                [0, 1, 0, 1, 2],
            ),
            (
                "failure after success keeps the last good pool",
                status(Some(10), None, 0, Some(1), 2),
                status(Some(10), Some(20), 1, Some(1), 2),
                [1, 0, 1, 1, 2],
            ),
            (
                "another failure in a row",
                status(Some(10), Some(20), 1, Some(1), 2),
                status(Some(10), Some(30), 2, Some(1), 2),
                [1, 0, 2, 1, 2],
            ),
            (
                "recovery keeps the old error but resets the gauge",
                status(Some(10), Some(30), 2, Some(1), 2),
                status(Some(40), Some(30), 0, Some(2), 3),
                [0, 1, 0, 2, 3],
            ),
            (
                "failure and success coalesced into one change count both",
                status(Some(10), None, 0, Some(1), 2),
                status(Some(50), Some(45), 0, Some(2), 1),
                [1, 1, 0, 2, 1],
            ),
            (
                "warnings alone count no pass",
                status(Some(10), None, 0, Some(1), 2),
                Status {
                    warnings: vec!["dropped field".to_owned()],
                    ..status(Some(10), None, 0, Some(1), 2)
                },
                [0, 0, 0, 1, 2],
            ),
        ];
        for (name, previous, current, [errors, successes, failures, generation, slices]) in cases {
            let registry = Registry::new();
            let metrics = Metrics::new(&registry, "gpu.nvidia.com", "node-a").unwrap();
            observe_slice_status(&previous, &current, &metrics);
            assert_eq!(
                samples(&scrape(&registry), "nvdra_agent_slice"),
                [
                    format!("nvdra_agent_slice_pool_generation {generation}"),
                    format!("nvdra_agent_slice_publish_consecutive_failures {failures}"),
                    format!(r#"nvdra_agent_slice_publishes_total{{result="error"}} {errors}"#),
                    format!(r#"nvdra_agent_slice_publishes_total{{result="success"}} {successes}"#),
                    format!("nvdra_agent_slices {slices}"),
                ],
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn slice_follower_counts_every_seen_change_and_ends_when_the_channel_closes() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry, "gpu.nvidia.com", "node-a").unwrap();
        let counter = |result| metrics.slice_publishes.with_label_values(&[result]).get();
        // A pass finished before the follower started: it is counted too.
        let (sender, receiver) = watch::channel(status(Some(10), None, 0, Some(1), 2));
        let follower = tokio::spawn(follow_slice_status(receiver, metrics.clone()));
        for (next, seen) in [
            (None, [("success", 1), ("error", 0)]),
            (
                Some(status(Some(10), Some(20), 1, Some(1), 2)),
                [("success", 1), ("error", 1)],
            ),
            (
                Some(status(Some(30), Some(20), 0, Some(2), 4)),
                [("success", 2), ("error", 1)],
            ),
        ] {
            if let Some(next) = next {
                sender.send(next).unwrap();
            }
            // Wait until the follower saw this value; the channel would coalesce the next one.
            tokio::time::timeout(Duration::from_secs(5), async {
                while seen.iter().any(|(result, want)| counter(*result) != *want) {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap();
        }
        drop(sender);
        tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            samples(&scrape(&registry), "nvdra_agent_slice"),
            [
                "nvdra_agent_slice_pool_generation 2",
                "nvdra_agent_slice_publish_consecutive_failures 0",
                r#"nvdra_agent_slice_publishes_total{result="error"} 1"#,
                r#"nvdra_agent_slice_publishes_total{result="success"} 2"#,
                "nvdra_agent_slices 4",
            ]
        );
    }

    #[test]
    fn a_second_driver_shares_the_registry() {
        let registry = Registry::new();
        let gpu = Metrics::new(&registry, "gpu.nvidia.com", "node-a").unwrap();
        let cd = gpu.for_driver("compute-domain.nvidia.com");
        cd.observe_success(Operation::Unprepare, 1, Duration::from_millis(1));
        cd.set_prepared_devices(&BTreeMap::from([("channel", 2)]));
        let text = scrape(&registry);
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices"),
            [
                r#"nvidia_dra_prepared_devices{device_type="channel",driver="compute-domain.nvidia.com",node="node-a"} 2"#,
                r#"nvidia_dra_prepared_devices{device_type="daemon",driver="compute-domain.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="mig",driver="gpu.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="unknown",driver="compute-domain.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="unknown",driver="gpu.nvidia.com",node="node-a"} 0"#,
                r#"nvidia_dra_prepared_devices{device_type="vfio",driver="gpu.nvidia.com",node="node-a"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_requests_total"),
            [
                r#"nvidia_dra_requests_total{driver="compute-domain.nvidia.com",operation="prepare"} 0"#,
                r#"nvidia_dra_requests_total{driver="compute-domain.nvidia.com",operation="unprepare"} 1"#,
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="prepare"} 0"#,
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="unprepare"} 0"#,
            ]
        );
    }

    #[test]
    fn registering_twice_fails() {
        let registry = Registry::new();
        Metrics::new(&registry, "gpu.nvidia.com", "node-a").unwrap();
        assert!(Metrics::new(&registry, "gpu.nvidia.com", "node-a").is_err());
    }
}

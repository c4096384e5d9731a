//! The background task that keeps the pool published, and the handle the plugin talks to.
//!
//! Wiring: `let (publisher, task) = spawn(client, Config::new(..), shutdown)`; the driver calls
//! [`Publisher::publish`] whenever its devices change (latest wins, like a `tokio::sync::watch`
//! channel), the plugin calls [`Publisher::resync`] when the kubelet (re-)registers it (the
//! kubelet wipes the node's slices when it starts), and the health endpoint reads
//! [`Publisher::status`].
//!
//! Triggers for a sync pass:
//! - a new publish or a resync request: immediately;
//! - a watch event on the pool's slices (field selector `spec.driver`, `spec.nodeName`) that is
//!   not the echo of our own write: after `debounce` (1 s; Go waits 30 s), so a burst of
//!   deletions costs one pass;
//! - a failed pass: after a capped exponential backoff with jitter (250 ms → 30 s), reset by
//!   the next success.
//!
//! Invariants: nothing is written before the first publish (the driver has not said what it
//! has); every pass lists fresh from the API server, so a stale cache can never cause a
//! generation bump; invalid resources are not retried (retrying cannot fix them) but also do
//! not disturb the slices already published.
//!
//! Shutdown: the task ends when the `shutdown` future completes or every [`Publisher`] handle
//! is dropped, abandoning any pass in flight (passes are idempotent). Slices are left in place:
//! the kubelet removes them if the plugin does not come back, and a restarted plugin (or the
//! new instance of a rolling update) adopts them without a generation bump.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use super::backoff::{Backoff, jitter_seed};
use super::sync::{SyncReport, Syncer, Target};
use super::{CounterLayout, Error, NodeResources, validate};

/// Settings of the publisher task.
#[derive(Clone, Debug)]
pub struct Config {
    /// DRA driver name (`spec.driver`).
    pub driver_name: String,
    /// This node's name (`spec.nodeName` and pool name).
    pub node_name: String,
    /// Field manager for server-side apply.
    pub field_manager: String,
    /// Counter layout for the API server's version ([`CounterLayout::for_server_version`]).
    pub layout: CounterLayout,
    /// First retry delay after a failed pass (default 250 ms).
    pub backoff_initial: Duration,
    /// Longest retry delay (default 30 s).
    pub backoff_cap: Duration,
    /// Delay between a foreign watch event and the pass it triggers (default 1 s).
    pub debounce: Duration,
}

impl Config {
    /// Settings with the default timings.
    pub fn new(
        driver_name: impl Into<String>,
        node_name: impl Into<String>,
        field_manager: impl Into<String>,
        layout: CounterLayout,
    ) -> Self {
        Self {
            driver_name: driver_name.into(),
            node_name: node_name.into(),
            field_manager: field_manager.into(),
            layout,
            backoff_initial: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(30),
            debounce: Duration::from_secs(1),
        }
    }
}

/// What the publisher task last did, for health reporting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// When a pass last completed (the pool then matched the published resources).
    pub last_success: Option<SystemTime>,
    /// Pool generation after that pass.
    pub generation: Option<i64>,
    /// Number of slices in the pool after that pass.
    pub slices: usize,
    /// The most recent failure (with its cause chain); kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// When that failure happened.
    pub last_error_at: Option<SystemTime>,
    /// Failed passes since the last success; 0 means healthy.
    pub consecutive_failures: u32,
    /// [`DroppedFields`](super::DroppedFields) warnings of the most recent pass that wrote.
    pub warnings: Vec<String>,
}

impl Status {
    /// True unless the latest pass failed.
    pub fn is_healthy(&self) -> bool {
        self.consecutive_failures == 0
    }
}

/// Handle to a running publisher. Cheap to clone; the task stops when the last clone is
/// dropped.
#[derive(Clone, Debug)]
pub struct Publisher {
    resources: watch::Sender<Option<Arc<NodeResources>>>,
    resync: Arc<Notify>,
    status: watch::Receiver<Status>,
    layout: CounterLayout,
}

/// The task half of a publisher; run it with [`PublisherTask::run`] (or use [`spawn`]).
#[derive(Debug)]
pub struct PublisherTask {
    config: Config,
    resources: watch::Receiver<Option<Arc<NodeResources>>>,
    resync: Arc<Notify>,
    status: watch::Sender<Status>,
}

/// Starts the publisher on the current tokio runtime. The task ends when `shutdown` completes
/// or every [`Publisher`] is dropped; supervise the returned handle.
pub fn spawn(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Publisher, JoinHandle<()>) {
    let (publisher, task) = Publisher::new(config);
    (publisher, tokio::spawn(task.run(client, shutdown)))
}

impl Publisher {
    /// A handle and the task it controls, for callers that run the task themselves.
    pub fn new(config: Config) -> (Self, PublisherTask) {
        let (resources_tx, resources_rx) = watch::channel(None);
        let (status_tx, status_rx) = watch::channel(Status::default());
        let resync = Arc::new(Notify::new());
        let publisher = Self {
            resources: resources_tx,
            resync: resync.clone(),
            status: status_rx,
            layout: config.layout,
        };
        let task = PublisherTask {
            config,
            resources: resources_rx,
            resync,
            status: status_tx,
        };
        (publisher, task)
    }

    /// Replaces what the node publishes. Invalid resources are rejected here, synchronously,
    /// and the previous resources stay published.
    pub fn publish(&self, resources: NodeResources) -> Result<(), Error> {
        validate(&resources, self.layout)?;
        self.resources.send_replace(Some(Arc::new(resources)));
        Ok(())
    }

    /// Asks for a pass now, re-reading the Node; call it when the kubelet registers the plugin.
    pub fn resync(&self) {
        self.resync.notify_one();
    }

    /// A snapshot of the task's status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }
}

impl PublisherTask {
    /// Runs until `shutdown` completes or every [`Publisher`] is dropped.
    pub async fn run(self, client: Client, shutdown: impl Future<Output = ()>) {
        let Self {
            config,
            mut resources,
            resync,
            status,
        } = self;
        let target = Target {
            driver: config.driver_name.clone(),
            node_name: config.node_name.clone(),
            field_manager: config.field_manager.clone(),
            layout: config.layout,
        };
        let events = watcher(
            Api::<ResourceSlice>::all(client.clone()),
            watcher::Config::default().fields(&target.field_selector()),
        )
        .default_backoff();
        let mut events = pin!(events);
        let mut shutdown = pin!(shutdown);
        let mut syncer = Syncer::new(client, target);
        let mut backoff = Backoff::new(config.backoff_initial, config.backoff_cap);
        let mut current = resources.borrow_and_update().clone();
        let mut due = current.as_ref().map(|_| Instant::now());
        let mut watching = true;
        loop {
            let wake = due;
            let alarm = async move {
                match wake {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = resources.changed() => {
                    if changed.is_err() {
                        debug!("every publisher handle dropped; stopping");
                        break;
                    }
                    current = resources.borrow_and_update().clone();
                    due = Some(Instant::now());
                }
                () = resync.notified() => {
                    syncer.forget_node();
                    due = Some(Instant::now());
                }
                event = events.next(), if watching => match event {
                    Some(Ok(event)) => {
                        if !syncer.is_own_echo(&event) {
                            let at = Instant::now() + config.debounce;
                            due = Some(due.map_or(at, |due| due.min(at)));
                        }
                    }
                    Some(Err(error)) => {
                        warn!(error = %chain(&error), "watching resource slices failed; retrying");
                    }
                    // The watcher restarts itself forever; an end would be a kube-rs bug. Keep
                    // publishing without it rather than spin on a finished stream.
                    None => {
                        warn!("resource slice watch ended; changes behind our back go unnoticed");
                        watching = false;
                    }
                },
                () = alarm => {
                    due = None;
                    let Some(resources) = current.clone() else { continue };
                    let outcome = tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        outcome = syncer.sync(&resources, Timestamp::now()) => outcome,
                    };
                    match outcome {
                        Ok(report) => {
                            backoff.reset();
                            succeeded(&status, &report);
                        }
                        Err(error) => {
                            let retry = !matches!(error, Error::InvalidResources(_));
                            let delay = retry.then(|| backoff.next_delay(jitter_seed()));
                            warn!(error = %chain(&error), retry_in = ?delay, "publishing resource slices failed");
                            failed(&status, &error);
                            due = delay.map(|delay| Instant::now() + delay);
                        }
                    }
                }
            }
        }
    }
}

fn succeeded(status: &watch::Sender<Status>, report: &SyncReport) {
    if report.applied + report.deleted > 0 {
        info!(
            generation = report.generation,
            slices = report.slices,
            applied = report.applied,
            deleted = report.deleted,
            "published resource slices"
        );
    } else {
        debug!(generation = report.generation, "resource slices up to date");
    }
    for dropped in &report.dropped {
        warn!("{dropped}");
    }
    status.send_modify(|status| {
        status.last_success = Some(SystemTime::now());
        status.generation = Some(report.generation);
        status.slices = report.slices;
        status.consecutive_failures = 0;
        if report.applied > 0 {
            status.warnings = report.dropped.iter().map(ToString::to_string).collect();
        }
    });
}

fn failed(status: &watch::Sender<Status>, error: &Error) {
    status.send_modify(|status| {
        status.last_error = Some(chain(error));
        status.last_error_at = Some(SystemTime::now());
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
    });
}

/// An error and its causes, joined with ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! The `run` subcommand: join the clique, keep `/etc/hosts` and `nvidia-imex` in step with it,
//! leave on SIGTERM.
//!
//! Expected flow:
//! 1. Fail fast when `COMPUTE_DOMAIN_UUID` is empty (the claim's CDI edits were not applied).
//! 2. Merge-patch the own pod's `resource.nvidia.com/computeDomain.cliqueID` label (with a
//!    clique, concurrently with step 5; a failed patch ends the daemon after step 7).
//! 3. Without a clique ID the node is not fabric-attached: idle until SIGTERM (`check` passes).
//! 4. Render `/imexd/imexd.cfg` (from `/imexd/imexd.cfg.tmpl` when present) and write the
//!    static `/imexd/nodes.cfg`.
//! 5. Watch the clique object and the own pod. On every change: pick the index
//!    ([`crate::index`]), rewrite the hosts block when the peer mapping (the server's rows
//!    with the own row as about to be published) changed ([`crate::hosts`]), start
//!    `nvidia-imex` once the own row is in the mapping and send it SIGUSR1 on later mapping
//!    changes (held until the process has a handler for it, see [`crate::imex`]; a process
//!    that starts meanwhile reads the new mapping anyway), then apply the own row when it
//!    differs from what the server has
//!    ([`crate::clique`]). The row's `status` is the answer of the daemon's own last
//!    `nvidia-imex-ctl` check ([`crate::readiness`]); the first apply waits for the first
//!    answer after `nvidia-imex` started, so a daemon joins Ready in one write.
//! 6. When `nvidia-imex` exits the row turns NotReady; it is restarted
//!    [`imex::WATCHDOG_DELAY`] later.
//! 7. On SIGTERM (or SIGINT): stop `nvidia-imex` and remove the own row, both within
//!    [`SHUTDOWN_BUDGET`], log the conflict count, exit 0.
//!
//! Failed applies are retried with capped backoff; nothing here gives up on API errors,
//! because the pod's probes, not this loop, decide when the daemon is broken.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use nvdra_api::names::labels;
use nvdra_api::{ComputeDomainClique, ComputeDomainDaemonInfo, Readiness};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::Error;
use crate::args::DaemonArgs;
use crate::clique::{self, Membership};
use crate::error::chain;
use crate::events::PodEvents;
use crate::hosts::{self, Mapping};
use crate::imex::{self, Imex};
use crate::metrics::{self, Metrics};
use crate::readiness::Checker;
use crate::{config, index, rootfs};

/// Everything that happens after SIGTERM must fit in this (upstream: entry removed within
/// 10 s; the pod's grace period is longer).
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(10);
/// How long `nvidia-imex` gets to exit after SIGTERM before SIGKILL.
pub const IMEX_STOP_GRACE: Duration = Duration::from_secs(5);
/// Bounds of the retry delay after a failed apply.
pub const APPLY_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(10));
/// Bounds of the delay between looks at whether a just-started `nvidia-imex` handles SIGUSR1
/// yet, while a re-read is held back.
pub const RELOAD_POLL: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(1));

/// Runs the daemon until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<(), Error> {
    if args.compute_domain_uuid.is_empty() {
        return Err(Error::CdiEditsMissing);
    }
    require(&args.pod_name, "--pod-name", "POD_NAME")?;
    require(&args.pod_namespace, "--pod-namespace", "POD_NAMESPACE")?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let client = client(args.kubeconfig.as_deref()).await?;
    tracing::info!(
        compute_domain = %args.compute_domain_uuid,
        name = %args.compute_domain_name,
        namespace = %args.compute_domain_namespace,
        clique = %args.clique_id,
        node = %args.node_name,
        pod_ip = %args.pod_ip,
        max_nodes = args.max_nodes,
        root = %args.container_root.display(),
        "nvdra-imex-daemon starting"
    );
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .map_err(Error::RegisterMetrics)?;
    let metrics = Metrics::new(&registry).map_err(Error::RegisterMetrics)?;
    if let Some(endpoint) = args.http_endpoint.0 {
        let addr = metrics::listen_address(endpoint, &args.pod_ip);
        let path = args.metrics_path.clone();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(addr, &path, registry).await {
                tracing::warn!(error = %chain(&err), "no metrics endpoint");
            }
        });
    }
    if args.clique_id.is_empty() {
        label_pod(&client, &args).await?;
        tracing::info!("no clique ID: not fabric-attached, nothing to run until SIGTERM");
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        tracing::info!("exiting");
        return Ok(());
    }
    require(&args.node_name, "--node-name", "NODE_NAME")?;
    require(&args.pod_ip, "--pod-ip", "POD_IP")?;
    require(&args.pod_uid, "--pod-uid", "POD_UID")?;
    let config_path = write_config(&args)?;

    let member = Membership {
        compute_domain_uid: args.compute_domain_uuid.clone(),
        clique_id: args.clique_id.clone(),
        namespace: args.pod_namespace.clone(),
        node_name: args.node_name.clone(),
        pod_name: args.pod_name.clone(),
        pod_uid: args.pod_uid.clone(),
    };
    let mut state = State {
        events: PodEvents::new(
            client.clone(),
            &args.pod_namespace,
            &args.pod_name,
            &args.pod_uid,
            &args.node_name,
        ),
        imex_restarts: 0,
        metrics,
        api: Api::namespaced(client.clone(), &args.pod_namespace),
        member,
        pod_ip: args.pod_ip.clone(),
        max_nodes: args.max_nodes,
        hosts_path: rootfs::resolve(&args.container_root, Path::new("/etc/hosts")),
        daemons: Vec::new(),
        seen: None,
        index: None,
        last_applied: None,
        ready: Readiness::NotReady,
        conflicts: 0,
        retry_at: None,
        backoff: APPLY_BACKOFF.0,
        written: None,
        imex: Imex::new(
            rootfs::resolve(&args.container_root, &args.imex_bin),
            &config_path,
        ),
        checker: Checker::new(
            rootfs::resolve(&args.container_root, &args.imex_ctl_bin),
            PathBuf::from(&config_path),
        ),
        restart_at: None,
        reload_at: None,
        reload_poll: RELOAD_POLL.0,
    };
    let mut cliques = clique_events(&state.api, &state.member.object_name()).boxed();
    // Nothing here waits for the pod label (it lets tooling select a clique's pods), so it
    // goes out alongside the join rather than before it: in a burst a pod patch takes about
    // a second, and every daemon of the domain would start that much later.
    let label = label_pod(&client, &args);
    tokio::pin!(label);
    let mut labelled = false;
    let mut failed = None;

    loop {
        let retry = state.retry_at;
        let restart = state.restart_at;
        let reload = state.reload_at;
        let check = state.checker.next();
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: leaving the clique"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: leaving the clique"); break }
            result = &mut label, if !labelled => {
                labelled = true;
                if let Err(err) = result {
                    tracing::error!(error = %chain(&err), "leaving the clique");
                    failed = Some(err);
                    break;
                }
            }
            Some(view) = cliques.next() => {
                if view.older_than(state.seen) {
                    tracing::debug!(version = ?view.version, seen = ?state.seen, "stale clique view");
                } else {
                    state.seen = view.version.or(state.seen);
                    state.daemons = view.daemons;
                    state.reconcile().await;
                }
            }
            () = sleep_until(check) => state.checker.spawn(),
            ready = state.checker.answer() => state.readiness(ready).await,
            status = state.imex.exited() => {
                let how = match status {
                    Ok(status) => format!("exited ({status})"),
                    Err(err) => format!("could not be waited for ({err})"),
                };
                tracing::warn!(%how, "nvidia-imex ended; restarting in 1s");
                state.restart_at = Some(Instant::now() + imex::WATCHDOG_DELAY);
                // The next process reads the mapping as it is when it starts.
                state.reload_at = None;
                state.imex_restarts += 1;
                state.metrics.set_imex_running(false);
                state.metrics.imex_restarted();
                state.checker.stopped();
                state.readiness(Readiness::NotReady).await;
                state.events.imex_exited(&how, state.imex_restarts).await;
            }
            () = sleep_until(retry) => {
                state.retry_at = None;
                state.reconcile().await;
            }
            () = sleep_until(restart) => {
                state.restart_at = None;
                state.start_imex();
            }
            () = sleep_until(reload) => state.reload().await,
        }
    }
    state.shutdown().await;
    failed.map_or(Ok(()), Err)
}

fn require(value: &str, flag: &'static str, env: &'static str) -> Result<(), Error> {
    if value.is_empty() {
        Err(Error::MissingSetting { flag, env })
    } else {
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(Error::LoadKubeconfig)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(Error::LoadKubeconfig)?
        }
        None => kube::Config::infer().await.map_err(Error::InferConfig)?,
    };
    Client::try_from(config).map_err(Error::BuildClient)
}

/// The own pod carries its clique ID (empty included) so cliques' pods can be selected.
async fn label_pod(client: &Client, args: &DaemonArgs) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.pod_namespace);
    let body = serde_json::json!({
        "metadata": {"labels": {labels::COMPUTE_DOMAIN_CLIQUE_ID: args.clique_id}}
    });
    pods.patch(
        &args.pod_name,
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await
    .map_err(|source| Error::LabelPod {
        namespace: args.pod_namespace.clone(),
        name: args.pod_name.clone(),
        source,
    })?;
    tracing::info!(pod = %args.pod_name, clique = %args.clique_id, "labelled own pod");
    Ok(())
}

/// Writes `imexd.cfg` and `nodes.cfg`; returns the container path of `imexd.cfg`.
fn write_config(args: &DaemonArgs) -> Result<String, Error> {
    let root = &args.container_root;
    let dir = &args.config_dir;
    let nodes_path = dir.join("nodes.cfg");
    let template_path = rootfs::resolve(root, &dir.join("imexd.cfg.tmpl"));
    let (template, source) = match std::fs::read_to_string(&template_path) {
        Ok(text) => (text, template_path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => (
            config::BUILTIN_TEMPLATE.to_owned(),
            PathBuf::from("<built-in>"),
        ),
        Err(source) => {
            return Err(Error::ReadFile {
                path: template_path,
                source,
            });
        }
    };
    let rendered =
        config::render(&template, &args.pod_ip, &nodes_path.to_string_lossy()).map_err(|err| {
            Error::RenderTemplate {
                path: source.clone(),
                source: err,
            }
        })?;
    let config_path = dir.join("imexd.cfg");
    write(&rootfs::resolve(root, &config_path), &rendered)?;
    write(
        &rootfs::resolve(root, &nodes_path),
        &config::nodes_cfg(args.max_nodes),
    )?;
    tracing::info!(template = %source.display(), "wrote IMEX config and nodes.cfg");
    Ok(config_path.to_string_lossy().into_owned())
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::WriteFile {
        path: path.to_owned(),
        source,
    })
}

/// A view of the clique: its rows and the resourceVersion they are from (`None` when the
/// object is gone or the version is not a number).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// `metadata.resourceVersion` as a number.
    pub version: Option<u64>,
    /// `daemons`.
    pub daemons: Vec<ComputeDomainDaemonInfo>,
}

impl View {
    fn of(clique: ComputeDomainClique) -> Self {
        Self {
            version: clique
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok()),
            daemons: clique.spec.daemons,
        }
    }

    /// Whether this view is older than `seen` (a version already acted on). Watch events
    /// reach a daemon after its own apply's response when peers wrote in between; acting on
    /// such a view, which lacks our latest row, re-applied rows and moved indices for
    /// nothing (about ten applies per daemon in a 64-node burst, on an object every daemon
    /// of the clique writes). Versions are compared as the increasing etcd revisions an
    /// etcd-backed API server hands out; one that is not a number is never called stale.
    pub fn older_than(&self, seen: Option<u64>) -> bool {
        matches!((self.version, seen), (Some(v), Some(s)) if v < s)
    }
}

/// The rows of the clique object, on every change (empty while it does not exist).
///
/// A (re)list is reported once complete, so the first rows seen are the server's full view
/// and not the empty list a relist starts from (acting on that would pick an index already
/// held by a peer).
fn clique_events(api: &Api<ComputeDomainClique>, name: &str) -> impl Stream<Item = View> + use<> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api.clone(), config)
        .default_backoff()
        .scan(None, |listing: &mut Option<View>, event| {
            let out = match event {
                Ok(watcher::Event::Init) => {
                    *listing = Some(View::default());
                    None
                }
                Ok(watcher::Event::InitApply(c)) => {
                    *listing = Some(View::of(c));
                    None
                }
                Ok(watcher::Event::InitDone) => Some(listing.take().unwrap_or_default()),
                Ok(watcher::Event::Apply(c)) => Some(View::of(c)),
                Ok(watcher::Event::Delete(_)) => Some(View::default()),
                Err(err) => {
                    tracing::warn!(error = %chain(&err), "clique watch");
                    None
                }
            };
            // `Some(_)` keeps the stream going; the inner option says whether to report.
            std::future::ready(Some(out))
        })
        .filter_map(std::future::ready)
}

/// The row this daemon should have, given the rows it last saw.
pub fn desired_row(
    daemons: &[ComputeDomainDaemonInfo],
    member: &Membership,
    pod_ip: &str,
    remembered: Option<u32>,
    ready: Readiness,
    max_nodes: u32,
) -> Option<ComputeDomainDaemonInfo> {
    // What we applied last wins over our row in `daemons`: watch events can
    // arrive after our own apply's response and show an older row, and
    // deciding from that would flip the index back and forth. The server's
    // row counts only before our first apply (a restarted daemon keeps its
    // index).
    let current = remembered.or_else(|| index::own(daemons, &member.node_name));
    let index = index::choose(daemons, &member.node_name, current, max_nodes)?;
    Some(ComputeDomainDaemonInfo {
        node_name: member.node_name.clone(),
        ip_address: pod_ip.to_owned(),
        clique_id: member.clique_id.clone(),
        index: i64::from(index),
        status: ready,
    })
}

/// `daemons` with the own row replaced by `own` (added if missing; unchanged if `None`).
pub fn with_own_row(
    daemons: &[ComputeDomainDaemonInfo],
    own: Option<&ComputeDomainDaemonInfo>,
) -> Vec<ComputeDomainDaemonInfo> {
    let Some(own) = own else {
        return daemons.to_vec();
    };
    daemons
        .iter()
        .filter(|d| d.node_name != own.node_name)
        .chain(std::iter::once(own))
        .cloned()
        .collect()
}

struct State {
    events: PodEvents,
    /// `nvidia-imex` restarts since start.
    imex_restarts: u32,
    metrics: Metrics,
    api: Api<ComputeDomainClique>,
    member: Membership,
    pod_ip: String,
    max_nodes: u32,
    hosts_path: PathBuf,
    /// Rows as last seen (watch event or apply response).
    daemons: Vec<ComputeDomainDaemonInfo>,
    /// The newest clique version acted on.
    seen: Option<u64>,
    /// The index last applied, kept for when the row is missing from a stale view.
    index: Option<u32>,
    /// The row last applied successfully.
    last_applied: Option<ComputeDomainDaemonInfo>,
    ready: Readiness,
    conflicts: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The hosts block as last written.
    written: Option<Vec<Mapping>>,
    imex: Imex,
    checker: Checker,
    restart_at: Option<Instant>,
    /// When to look again whether a held-back SIGUSR1 can go out.
    reload_at: Option<Instant>,
    /// The wait before the next look, growing within [`RELOAD_POLL`].
    reload_poll: Duration,
}

impl State {
    async fn reconcile(&mut self) {
        // Peers and `nvidia-imex` follow the row we are about to publish, not the one the
        // server has yet: in a burst the apply takes seconds, and the pod cannot turn Ready
        // (which the row's status then follows) before `nvidia-imex` runs. Starting it first
        // takes the probe's wait off the time to a Ready row.
        let desired = self.desired();
        self.follow_peers(desired.as_ref()).await;
        let Some(row) = desired else {
            tracing::warn!(
                max_nodes = self.max_nodes,
                "no free index in the clique; waiting for one"
            );
            return;
        };
        if self.last_applied.is_none() && self.checker.owed() {
            // `nvidia-imex` just started from this row: its first answer, due within
            // milliseconds, lets the join say Ready at once (see `crate::readiness`).
            return;
        }
        self.publish(row).await;
        // The apply answered with the newest rows.
        let desired = self.desired();
        self.follow_peers(desired.as_ref()).await;
    }

    fn desired(&self) -> Option<ComputeDomainDaemonInfo> {
        desired_row(
            &self.daemons,
            &self.member,
            &self.pod_ip,
            self.index,
            self.ready,
            self.max_nodes,
        )
    }

    /// Applies `row` if the server's copy differs from it.
    async fn publish(&mut self, row: ComputeDomainDaemonInfo) {
        let have = self.daemons.iter().find(|d| d.node_name == row.node_name);
        // Up to date, or a stale view of a row we already applied as
        // desired (a later event will show it): nothing to write. A view
        // without our row at all is applied again.
        if have == Some(&row) || (have.is_some() && self.last_applied.as_ref() == Some(&row)) {
            return;
        }
        let started = Instant::now();
        let result = self.member.apply(&self.api, Some(&row)).await;
        let outcome = match &result {
            Ok(_) => metrics::results::SUCCESS,
            Err(err) if clique::is_conflict(err) => metrics::results::CONFLICT,
            Err(_) => metrics::results::ERROR,
        };
        self.metrics.applied(outcome, started.elapsed());
        match result {
            Ok(clique) => {
                self.metrics.set_ready(row.status == Readiness::Ready);
                tracing::info!(
                    index = row.index,
                    status = row.status.as_str(),
                    "applied own clique row"
                );
                self.index = u32::try_from(row.index).ok();
                self.last_applied = Some(row);
                let view = View::of(clique);
                self.seen = view.version.max(self.seen);
                self.daemons = view.daemons;
                self.backoff = APPLY_BACKOFF.0;
            }
            Err(err) => {
                if clique::is_conflict(&err) {
                    self.conflicts += 1;
                    tracing::warn!(error = %chain(&err), "clique apply conflicts={}", self.conflicts);
                } else {
                    tracing::warn!(error = %chain(&err), "apply own clique row");
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(APPLY_BACKOFF.1);
            }
        }
    }

    /// Rewrites the hosts block and starts or signals `nvidia-imex` when the mapping changed.
    async fn follow_peers(&mut self, own: Option<&ComputeDomainDaemonInfo>) {
        let rows = with_own_row(&self.daemons, own);
        let mappings = hosts::mappings(&rows, &self.member.clique_id, self.max_nodes);
        if self.written.as_ref() == Some(&mappings) {
            return;
        }
        let existing = match std::fs::read_to_string(&self.hosts_path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                let err = Error::ReadFile {
                    path: self.hosts_path.clone(),
                    source,
                };
                tracing::warn!(error = %chain(&err), "update hosts");
                self.retry_at.get_or_insert(Instant::now() + self.backoff);
                return;
            }
        };
        // Written in place, not renamed over: in a container /etc/hosts is a bind mount.
        if let Err(err) = write(&self.hosts_path, &hosts::rewrite(&existing, &mappings)) {
            tracing::warn!(error = %chain(&err), "update hosts");
            self.retry_at.get_or_insert(Instant::now() + self.backoff);
            return;
        }
        let peers: Vec<String> = mappings
            .iter()
            .map(|m| format!("{}={}", m.name, m.ip))
            .collect();
        tracing::info!(peers = %peers.join(", "), "updated IMEX peer names in /etc/hosts");
        let first = self.written.is_none();
        let count = mappings.len();
        self.written = Some(mappings);
        let joined = self.written.iter().flatten().any(|m| m.ip == self.pod_ip);
        self.metrics.peers_written(count);
        if self.imex.running() && !first {
            self.reload().await;
        } else if !self.imex.running() && joined && self.restart_at.is_none() {
            self.start_imex();
        }
    }

    /// Tells a running `nvidia-imex` to re-read the mapping, or, while it has no handler for
    /// the signal yet (it would die of it), looks again a little later. Nothing is owed to a
    /// process that is not running: the next one reads the mapping when it starts.
    async fn reload(&mut self) {
        self.reload_at = None;
        if !self.imex.running() {
            return;
        }
        if self.imex.handles_reload() {
            self.reload_poll = RELOAD_POLL.0;
            self.imex.signal("USR1").await;
            self.metrics.peers_signalled();
            return;
        }
        if self.reload_poll == RELOAD_POLL.0 {
            tracing::info!("nvidia-imex has no SIGUSR1 handler yet; holding the peer re-read back");
        }
        self.reload_at = Some(Instant::now() + self.reload_poll);
        self.reload_poll = (self.reload_poll * 2).min(RELOAD_POLL.1);
    }

    fn start_imex(&mut self) {
        self.reload_at = None;
        self.reload_poll = RELOAD_POLL.0;
        match self.imex.start() {
            Ok(()) => self.checker.started(),
            Err(err) => {
                tracing::warn!(error = %chain(&err), "nvidia-imex did not start; retrying in 1s");
                self.restart_at = Some(Instant::now() + imex::WATCHDOG_DELAY);
            }
        }
        self.metrics.set_imex_running(self.imex.running());
    }

    /// Takes a check's answer (or an exit of `nvidia-imex`) as the row's status.
    async fn readiness(&mut self, ready: Readiness) {
        // An answer that raced an exit of the process is not believed.
        let ready = if self.imex.running() {
            ready
        } else {
            Readiness::NotReady
        };
        if ready != self.ready {
            tracing::info!(status = ready.as_str(), "nvidia-imex readiness changed");
            self.ready = ready;
        }
        // Also after no change: the first answer releases the held join.
        self.reconcile().await;
    }

    /// Stops `nvidia-imex` and removes the own row, concurrently, within the budget.
    async fn shutdown(mut self) {
        let deadline = Instant::now() + SHUTDOWN_BUDGET;
        let leave = async {
            let mut backoff = APPLY_BACKOFF.0;
            loop {
                match self.member.apply(&self.api, None).await {
                    Ok(_) => {
                        tracing::info!("removed own clique row");
                        return;
                    }
                    Err(err) => {
                        if clique::is_conflict(&err) {
                            self.conflicts += 1;
                        }
                        tracing::warn!(error = %chain(&err), "remove own clique row");
                    }
                }
                if Instant::now() + backoff >= deadline {
                    tracing::warn!("gave up removing own clique row");
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        };
        let stop = self.imex.stop(IMEX_STOP_GRACE);
        let _ = tokio::time::timeout_at(deadline, async { tokio::join!(leave, stop) }).await;
        tracing::info!("clique apply conflicts={}", self.conflicts);
        tracing::info!("exiting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn member(node: &str) -> Membership {
        Membership {
            compute_domain_uid: "cd".into(),
            clique_id: "c".into(),
            namespace: "ns".into(),
            node_name: node.into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
        }
    }

    fn row(node: &str, index: i64, status: Readiness) -> ComputeDomainDaemonInfo {
        ComputeDomainDaemonInfo {
            node_name: node.into(),
            ip_address: format!("10.0.0.{}", index + 1),
            clique_id: "c".into(),
            index,
            status,
        }
    }

    #[test]
    fn desired_row_keeps_the_servers_index_and_follows_readiness() {
        let seen = vec![
            row("n1", 0, Readiness::Ready),
            row("n2", 2, Readiness::NotReady),
        ];
        let got = desired_row(&seen, &member("n2"), "10.0.0.3", None, Readiness::Ready, 18);
        assert_eq!(got, Some(row("n2", 2, Readiness::Ready)));
        // The row is missing from a stale view: the remembered index is kept.
        let got = desired_row(
            &seen[..1],
            &member("n2"),
            "10.0.0.3",
            Some(2),
            Readiness::NotReady,
            18,
        );
        assert_eq!(got, Some(row("n2", 2, Readiness::NotReady)));
        // A stale view still shows an older index of ours: what we applied last wins,
        // so the index does not flip back.
        let stale = vec![
            row("n1", 0, Readiness::Ready),
            row("n2", 5, Readiness::Ready),
        ];
        let got = desired_row(
            &stale,
            &member("n2"),
            "10.0.0.3",
            Some(2),
            Readiness::Ready,
            18,
        );
        assert_eq!(got, Some(row("n2", 2, Readiness::Ready)));
        // A newcomer takes a free index, from its home on.
        let got = desired_row(
            &seen,
            &member("n3"),
            "10.0.0.15",
            None,
            Readiness::NotReady,
            18,
        );
        assert_eq!(index::home("n3", 18), 14);
        assert_eq!(got, Some(row("n3", 14, Readiness::NotReady)));
        // With room for two, n2's index 2 is out of range: n2 and n3 compete for the one
        // free index and the smaller name wins it.
        assert_eq!(
            desired_row(
                &seen,
                &member("n3"),
                "10.0.0.9",
                None,
                Readiness::NotReady,
                2
            )
            .map(|r| r.index),
            None
        );
        assert_eq!(
            desired_row(
                &seen,
                &member("n3"),
                "10.0.0.9",
                None,
                Readiness::NotReady,
                1
            ),
            None
        );
    }

    #[test]
    fn peers_follow_the_row_about_to_be_published() {
        let seen = vec![
            row("n1", 0, Readiness::Ready),
            row("n2", 5, Readiness::NotReady),
        ];
        assert_eq!(with_own_row(&seen, None), seen);
        // Not in the server's rows yet: added.
        let mine = row("n3", 14, Readiness::NotReady);
        assert_eq!(
            with_own_row(&seen, Some(&mine)),
            vec![seen[0].clone(), seen[1].clone(), mine.clone()]
        );
        // Moved to another index: the server's old row of ours is replaced, so the
        // name it held is free again in the hosts block.
        let moved = row("n2", 7, Readiness::NotReady);
        let rows = with_own_row(&seen, Some(&moved));
        assert_eq!(rows, vec![seen[0].clone(), moved]);
        let names: Vec<String> = hosts::mappings(&rows, "c", 18)
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            names,
            ["compute-domain-daemon-0000", "compute-domain-daemon-0007"]
        );
    }

    #[test]
    fn views_older_than_the_last_acted_on_are_stale() {
        let view = |version: Option<u64>| View {
            version,
            daemons: Vec::new(),
        };
        assert!(view(Some(7)).older_than(Some(8)));
        assert!(!view(Some(8)).older_than(Some(8)));
        assert!(!view(Some(9)).older_than(Some(8)));
        assert!(!view(Some(1)).older_than(None));
        // A deleted object or an opaque version: never stale.
        assert!(!view(None).older_than(Some(8)));
        let mut clique = ComputeDomainClique::new("cd.clique", Default::default());
        clique.metadata.resource_version = Some("42".into());
        assert_eq!(View::of(clique.clone()).version, Some(42));
        clique.metadata.resource_version = Some("opaque".into());
        assert_eq!(View::of(clique).version, None);
    }

    #[test]
    fn write_config_renders_the_template_or_the_builtin() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("imexd")).unwrap();
        let args = crate::args::Args::try_parse_from([
            "d".as_ref(),
            "run".as_ref(),
            "--pod-ip=127.1.3.2".as_ref(),
            "--max-nodes-per-imex-domain=2".as_ref(),
            std::ffi::OsStr::new("--container-root"),
            dir.path().as_os_str(),
        ])
        .unwrap()
        .daemon;
        assert_eq!(write_config(&args).unwrap(), "/imexd/imexd.cfg");
        let cfg = std::fs::read_to_string(dir.path().join("imexd/imexd.cfg")).unwrap();
        assert!(
            cfg.contains("IMEX_CMD_BIND_INTERFACE_IP=127.1.3.2\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("IMEX_NODE_CONFIG_FILE=/imexd/nodes.cfg\n"),
            "{cfg}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("imexd/nodes.cfg")).unwrap(),
            "compute-domain-daemon-0000\ncompute-domain-daemon-0001\n"
        );
        std::fs::write(
            dir.path().join("imexd/imexd.cfg.tmpl"),
            "A={{ .IMEXCmdBindInterfaceIP }}\nB={{.IMEXDaemonNodesConfigPath}}\n",
        )
        .unwrap();
        write_config(&args).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("imexd/imexd.cfg")).unwrap(),
            "A=127.1.3.2\nB=/imexd/nodes.cfg\n"
        );
        std::fs::write(dir.path().join("imexd/imexd.cfg.tmpl"), "A={{.X}}\n").unwrap();
        assert_eq!(
            chain(&write_config(&args).unwrap_err()),
            format!(
                "render {}/imexd/imexd.cfg.tmpl: unknown placeholder {{{{.X}}}}",
                dir.path().display()
            )
        );
    }
}

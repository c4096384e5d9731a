//! The pod side of the kubelet: one watch on this node's pods, one task per
//! pod.
//!
//! A pod's task ([`PodWorker`]) walks the kubelet's path: resolve its
//! claims, wait until each is allocated and reserved for it, prepare them
//! per driver, check the CDI IDs, start local containers, and write a
//! Running status. It then follows container updates until the pod ends
//! (claims are unprepared at once) or is deleted: stop the processes,
//! unprepare the claims nobody else uses, and delete the pod with grace 0
//! and a UID precondition. Failures are retried with capped backoff and
//! surfaced as pod events; one pod never waits for another, except on a
//! claim they share.
//!
//! On SIGTERM every task stops its processes and returns without touching
//! claims or the API, as a restarting kubelet leaves pods running. A later
//! emulator re-prepares running pods (prepare is idempotent) and writes
//! their status only if it differs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use kube::{Api, Client};
use nvdra_kubelet_plugin::ClaimRef;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::args::LocalImage;
use crate::cdi::ContainerEdits;
use crate::claims::{self, ClaimCache, ClaimDevices};
use crate::container::{self, LocalContainer, Probes, Restart, Update};
use crate::events::{self, Recorder};
use crate::ipam::{Addresses, IpPool};
use crate::plugins::{Plugins, error_chain};
use crate::podstatus::{self, ContainerView, PodFailure, RunState, Terminated};

/// Backoff for failed prepare/unprepare/delete calls.
pub const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// Backoff while waiting for a claim to be generated, allocated or reserved.
pub const WAIT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// Upper bound of a pod's termination grace period.
pub const MAX_GRACE: Duration = Duration::from_secs(30);
/// Name of the per-pod record of prepared CDI devices.
pub const CDI_RECORD: &str = "cdi-devices.json";
/// Name of the per-pod record of the container edits (env, mounts, device nodes) the pod's
/// CDI devices give its containers; written for every pod, local or not.
pub const EDITS_RECORD: &str = "container-edits.json";

/// What every pod task shares.
pub struct Node {
    /// API client as the node.
    pub client: Client,
    /// Node name.
    pub name: String,
    /// `DIR/pods`.
    pub pods_dir: PathBuf,
    /// `DIR/cdi`.
    pub cdi_dir: PathBuf,
    /// `--local-image` entries.
    pub local_images: Vec<LocalImage>,
    /// Registered plugins.
    pub plugins: Arc<Plugins>,
    /// Claim users.
    pub claims: ClaimCache,
    /// Pod addresses.
    pub ips: IpPool,
    /// The API server as a kubeconfig `cluster` entry, for the credentials
    /// of pods run as local processes.
    pub api_cluster: serde_json::Value,
    /// Event recorder.
    pub events: Recorder,
    /// Turns true on SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
}

/// Doubling delays between `bounds.0` and `bounds.1`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `bounds.0`.
    pub fn new(bounds: (Duration, Duration)) -> Self {
        Self {
            next: bounds.0,
            max: bounds.1,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// The grace period for stopping `pod`'s processes: the deletion's, else
/// the spec's, else 30 s; at most [`MAX_GRACE`].
pub fn grace(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0)).min(MAX_GRACE)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Watches this node's pods and runs one worker per pod until shutdown.
pub async fn run(node: Arc<Node>) {
    let api: Api<Pod> = Api::all(node.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut shutdown = node.shutdown.clone();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = shutdown.wait_for(|s| *s) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match event {
            None => break,
            Some(Err(err)) => tracing::warn!(error = %error_chain(&err), "pod watch"),
            Some(Ok(watcher::Event::Init)) => listed = Some(HashSet::new()),
            Some(Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod))) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                if !workers.contains_key(&uid) {
                    // Before any worker assigns: a running pod keeps its address.
                    node.ips.reserve(&pod);
                }
                if let Some(listed) = &mut listed {
                    listed.insert(uid.clone());
                }
                match workers.get(&uid) {
                    Some(tx) => {
                        tx.send_replace(Some(pod));
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(pod));
                        workers.insert(uid, tx);
                        tasks.spawn(PodWorker::run(node.clone(), rx));
                    }
                }
            }
            Some(Ok(watcher::Event::Delete(pod))) => {
                if let Some(tx) = pod
                    .metadata
                    .uid
                    .as_ref()
                    .and_then(|uid| workers.remove(uid))
                {
                    tx.send_replace(None);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                node.ips.mark_synced();
                // Pods missing from a relist were deleted while the watch was down.
                if let Some(listed) = listed.take() {
                    workers.retain(|uid, tx| {
                        let keep = listed.contains(uid);
                        if !keep {
                            tx.send_replace(None);
                        }
                        keep
                    });
                }
            }
        }
    }
    drop(workers);
    // Workers saw the shutdown too; give them time to stop their processes.
    let _ = tokio::time::timeout(MAX_GRACE + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// How a wait ended.
enum Wake {
    Timer,
    Changed,
    Shutdown,
}

/// Where a pod's lifecycle stopped.
enum End {
    /// Deleted from the API (vanished from the watch).
    Gone,
    /// `deletionTimestamp` set.
    Terminating,
    /// The emulator is shutting down.
    Shutdown,
}

/// What ended one wait in [`PodWorker::follow`].
enum Step {
    Update(Option<Update>),
    Woke(Wake),
    /// A plugin reported new device health.
    Health,
}

/// What a successful prepare produced.
struct Prepared {
    /// What the pod's CDI devices (claims in pod order) add to its containers.
    edits: ContainerEdits,
    /// ResourceClaim name → request → `driver/pool/device` → CDI IDs.
    devices: BTreeMap<String, ClaimDevices>,
}

enum PrepareError {
    /// Not ready yet: retry soon, no event.
    Wait(String),
    /// A failure to report in an event and retry with backoff.
    Fail(String),
}

/// One pod's task.
pub struct PodWorker {
    node: Arc<Node>,
    rx: watch::Receiver<Option<Pod>>,
    pod: Pod,
    gone: bool,
    uid: String,
    dir: PathBuf,
    shutdown: watch::Receiver<bool>,
    /// Subscribed at start, so a registration while this pod was busy still
    /// wakes its next wait.
    plugins_rx: watch::Receiver<u64>,
    /// Device health changes.
    health_rx: watch::Receiver<u64>,
}

impl PodWorker {
    /// Runs the pod's lifecycle to its end.
    pub async fn run(node: Arc<Node>, rx: watch::Receiver<Option<Pod>>) {
        let Some(pod) = rx.borrow().clone() else {
            return;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = node.pods_dir.join(&uid);
        let shutdown = node.shutdown.clone();
        let plugins_rx = node.plugins.subscribe();
        let health_rx = node.plugins.health().subscribe();
        let mut worker = Self {
            node,
            rx,
            pod,
            gone: false,
            uid,
            dir,
            shutdown,
            plugins_rx,
            health_rx,
        };
        worker.lifecycle().await;
    }

    async fn wait(&mut self, delay: Option<Duration>, plugins: bool) -> Wake {
        let sleep = async {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            () = sleep => Wake::Timer,
            r = self.rx.changed() => {
                if r.is_err() {
                    // The manager dropped us: shutdown.
                    Wake::Shutdown
                } else {
                    Wake::Changed
                }
            }
            _ = self.shutdown.wait_for(|s| *s) => Wake::Shutdown,
            _ = self.plugins_rx.changed(), if plugins => Wake::Timer,
        };
        if matches!(wake, Wake::Changed) {
            match self.rx.borrow_and_update().clone() {
                Some(pod) => self.pod = pod,
                None => self.gone = true,
            }
        }
        wake
    }

    fn end(&self) -> Option<End> {
        if *self.shutdown.borrow() {
            Some(End::Shutdown)
        } else if self.gone {
            Some(End::Gone)
        } else if self.pod.metadata.deletion_timestamp.is_some() {
            Some(End::Terminating)
        } else {
            None
        }
    }

    async fn lifecycle(&mut self) {
        let key = key(&self.pod);
        if let Err(err) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!(pod = %key, error = %err, "create pod dir");
        }
        // A pod already ended: nothing to run; wait for its deletion.
        if is_terminal(&self.pod) && self.end().is_none() {
            let end = self.until_end().await;
            return self.finish(end, &mut Running::default()).await;
        }
        let prepared = match self.prepare_loop().await {
            Ok(prepared) => prepared,
            Err(end) => return self.finish(end, &mut Running::default()).await,
        };
        let mut running = self.start(&prepared).await;
        let end = self.follow(&mut running).await;
        self.finish(end, &mut running).await;
    }

    async fn until_end(&mut self) -> End {
        loop {
            if let Some(end) = self.end() {
                return end;
            }
            self.wait(None, false).await;
        }
    }

    async fn prepare_loop(&mut self) -> Result<Prepared, End> {
        let mut retry = Backoff::new(RETRY_BACKOFF);
        let mut waiting = Backoff::new(WAIT_BACKOFF);
        loop {
            if let Some(end) = self.end() {
                return Err(end);
            }
            match self.prepare().await {
                Ok(prepared) => return Ok(prepared),
                Err(PrepareError::Wait(message)) => {
                    tracing::debug!(pod = %key(&self.pod), %message, "waiting to prepare");
                    let delay = waiting.next_delay();
                    self.wait(Some(delay), false).await;
                }
                Err(PrepareError::Fail(message)) => {
                    self.node
                        .events
                        .warn(&self.pod, events::FAILED_PREPARE, &message)
                        .await;
                    let delay = retry.next_delay();
                    self.wait(Some(delay), true).await;
                }
            }
        }
    }

    async fn prepare(&mut self) -> Result<Prepared, PrepareError> {
        let names = claims::claim_names(&self.pod).map_err(PrepareError::Wait)?;
        if names.is_empty() {
            let edits = ContainerEdits::default();
            self.record_edits(&edits);
            return Ok(Prepared {
                edits,
                devices: BTreeMap::new(),
            });
        }
        let ns = self.pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<ResourceClaim> = Api::namespaced(self.node.client.clone(), &ns);
        let mut fetched = Vec::new();
        for name in &names {
            let claim = api.get(name).await.map_err(|source| {
                let err = crate::Error::GetClaim {
                    namespace: ns.clone(),
                    name: name.clone(),
                    source,
                };
                PrepareError::Wait(error_chain(&err))
            })?;
            if let Some(why) = claims::not_ready(&claim, &self.uid) {
                return Err(PrepareError::Wait(why));
            }
            fetched.push(claim);
        }
        let refs: Vec<(ClaimRef, _)> = fetched
            .iter()
            .map(|c| (claims::claim_ref(c), claims::drivers(c)))
            .collect();
        let locks = self.node.claims.add(&self.uid, &refs);
        let mut guards = Vec::new();
        for lock in locks {
            guards.push(lock.lock_owned().await);
        }
        let groups = claims::by_driver(&fetched);
        let calls = groups.iter().map(|(driver, refs)| {
            let plugins = self.node.plugins.clone();
            async move {
                let mut client = plugins.client(driver).await?;
                client.prepare_devices(refs).await.map_err(|err| {
                    plugins.invalidate(driver);
                    format!(
                        "NodePrepareResources with driver {driver} failed: {}",
                        error_chain(&err)
                    )
                })
            }
        });
        let answers = futures::future::join_all(calls).await;
        drop(guards);
        let mut errors = Vec::new();
        let mut record: BTreeMap<String, ClaimDevices> = BTreeMap::new();
        let mut by_claim: HashMap<String, Vec<String>> = HashMap::new();
        for ((driver, refs), answer) in groups.iter().zip(answers) {
            let outcomes = match answer {
                Ok(outcomes) => outcomes,
                Err(message) => {
                    errors.push(message);
                    continue;
                }
            };
            for claim_ref in refs {
                let Some(claim) = fetched
                    .iter()
                    .find(|c| c.metadata.uid.as_deref() == Some(&claim_ref.uid))
                else {
                    continue;
                };
                match outcomes.get(&claim_ref.uid) {
                    Some(Ok(devices)) => {
                        let placed = claims::claim_devices(claim, driver, devices);
                        let entry = record.entry(claim_ref.name.clone()).or_default();
                        for (request, devs) in placed {
                            entry.entry(request).or_default().extend(devs);
                        }
                        by_claim.entry(claim_ref.uid.clone()).or_default().extend(
                            devices
                                .iter()
                                .flat_map(|d| d.cdi_device_ids.iter().cloned()),
                        );
                    }
                    Some(Err(text)) => errors.push(format!(
                        "NodePrepareResources failed for ResourceClaim {}/{}: {text}",
                        claim_ref.namespace, claim_ref.name
                    )),
                    None => {}
                }
            }
        }
        if !errors.is_empty() {
            return Err(PrepareError::Fail(errors.join("; ")));
        }
        let cdi_ids: Vec<String> = refs
            .iter()
            .flat_map(|(r, _)| by_claim.remove(&r.uid).unwrap_or_default())
            .collect();
        if let Err(err) = crate::cdi::resolve(&self.node.cdi_dir, &cdi_ids) {
            return Err(PrepareError::Fail(error_chain(&err)));
        }
        let edits = crate::cdi::edits(&self.node.cdi_dir, &cdi_ids)
            .map_err(|err| PrepareError::Fail(error_chain(&err)))?;
        self.record_edits(&edits);
        let path = self.dir.join(CDI_RECORD);
        let body = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let record = record.clone();
        if let Err(source) = std::fs::write(&path, body) {
            let err = crate::Error::WriteFile { path, source };
            tracing::warn!(error = %error_chain(&err), "record CDI devices");
        }
        tracing::info!(pod = %key(&self.pod), claims = names.len(), devices = cdi_ids.len(), "prepared dynamic resources");
        Ok(Prepared {
            edits,
            devices: record,
        })
    }

    /// Writes [`EDITS_RECORD`]; a failure is only logged (the record is for tests).
    fn record_edits(&self, edits: &ContainerEdits) {
        let path = self.dir.join(EDITS_RECORD);
        let body = serde_json::to_vec_pretty(edits).unwrap_or_default();
        if let Err(source) = std::fs::write(&path, body) {
            let err = crate::Error::WriteFile { path, source };
            tracing::warn!(error = %error_chain(&err), "record container edits");
        }
    }

    /// Starts local containers and writes the first Running status.
    async fn start(&mut self, prepared: &Prepared) -> Running {
        let mut running = Running {
            devices: prepared.devices.clone(),
            ..Running::default()
        };
        let spec = self.pod.spec.clone().unwrap_or_default();
        let existing = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        let now = Timestamp::now();
        self.node.ips.wait_synced().await;
        let ips = match self.node.ips.assign(&self.pod) {
            Ok(ips) => ips,
            Err(message) => {
                running.failure = Some(PodFailure {
                    reason: "FailedCreatePodSandBox".into(),
                    message,
                });
                Addresses::loopback()
            }
        };
        running.ips = ips.clone();
        // Pods run as processes get their ServiceAccount's identity, as the
        // kubelet's projected token would give it.
        let any_local = spec.containers.iter().any(|c| {
            container::local_bin_dir(&self.node.local_images, c.image.as_deref().unwrap_or(""))
                .is_some()
        });
        let mut kubeconfig = None;
        if any_local && running.failure.is_none() {
            match self.write_kubeconfig().await {
                Ok(path) => kubeconfig = path,
                Err(message) => {
                    running.failure = Some(PodFailure {
                        reason: "FailedMount".into(),
                        message,
                    })
                }
            }
        }
        let mut locals = Vec::new();
        for c in &spec.containers {
            let image = c.image.clone().unwrap_or_default();
            let before = existing.iter().find(|s| s.name == c.name);
            let mut view = ContainerView {
                name: c.name.clone(),
                image: image.clone(),
                ready: true,
                started: true,
                restart_count: before.map_or(0, |s| s.restart_count),
                state: RunState::Running(
                    before
                        .and_then(|s| s.state.as_ref())
                        .and_then(|s| s.running.as_ref())
                        .and_then(|r| r.started_at.clone())
                        .map_or(now, |t| t.0),
                ),
                last_terminated: None,
            };
            if let Some(bin_dir) = container::local_bin_dir(&self.node.local_images, &image) {
                view.ready = false;
                view.started = false;
                view.state = RunState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                };
                let built = match &running.failure {
                    Some(failure) => Err(failure.message.clone()),
                    None => self.local(c, bin_dir, &prepared.edits, &ips, kubeconfig.as_deref()),
                };
                match built {
                    Ok(local) => locals.push(local),
                    Err(message) => {
                        running.failure = Some(PodFailure {
                            reason: "CreateContainerConfigError".into(),
                            message: message.clone(),
                        });
                        view.state = RunState::Waiting {
                            reason: "CreateContainerConfigError".into(),
                            message: Some(message),
                        };
                    }
                }
            }
            running.views.push(view);
        }
        if let Some(failure) = running.failure.clone() {
            self.node
                .events
                .warn(&self.pod, "Failed", &failure.message)
                .await;
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            running.updates = Some(rx);
            for local in locals {
                running.tasks.spawn(container::supervise(
                    local,
                    tx.clone(),
                    running.stop.subscribe(),
                ));
            }
            // Let every process start (or fail to) before the first status.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while running.views.iter().any(|v| matches!(&v.state, RunState::Waiting { reason, .. } if reason == "ContainerCreating")) {
                let Some(updates) = running.updates.as_mut() else { break };
                match tokio::time::timeout_at(deadline, updates.recv()).await {
                    Ok(Some(update)) => running.apply(update),
                    _ => break,
                }
            }
        }
        self.write_status(&mut running).await;
        running
    }

    /// Writes `<pod dir>/kubeconfig` with a token of the pod's
    /// ServiceAccount; `None` when the pod wants no token.
    async fn write_kubeconfig(&self) -> Result<Option<PathBuf>, String> {
        let Some(config) =
            crate::identity::pod_kubeconfig(&self.node.client, &self.node.api_cluster, &self.pod)
                .await?
        else {
            return Ok(None);
        };
        let path = self.dir.join("kubeconfig");
        let text = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)?;
                file.write_all(&text)
            })
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(Some(path))
    }

    fn local(
        &self,
        c: &k8s_openapi::api::core::v1::Container,
        bin_dir: &std::path::Path,
        edits: &ContainerEdits,
        ips: &Addresses,
        kubeconfig: Option<&std::path::Path>,
    ) -> Result<LocalContainer, String> {
        let mut env = container::container_env(&self.pod, c, &edits.env, ips)?;
        if let Some(path) = kubeconfig
            && !env.iter().any(|(k, _)| k == "KUBECONFIG")
        {
            env.push(("KUBECONFIG".to_owned(), path.display().to_string()));
        }
        // The container's private root: what its CDI mounts and device nodes would show.
        let root = crate::rootfs::path(&self.dir, &c.name);
        let skipped =
            crate::rootfs::build(&root, edits).map_err(|e| format!("container {}: {e}", c.name))?;
        for why in skipped {
            tracing::warn!(pod = %key(&self.pod), container = %c.name, %why, "container root entry skipped");
        }
        env.retain(|(k, _)| k != crate::rootfs::ENV);
        env.push((crate::rootfs::ENV.to_owned(), root.display().to_string()));
        let command = c.command.clone().unwrap_or_default();
        let args = c.args.clone().unwrap_or_default();
        let (program, args) = container::program(bin_dir, &command, &args)
            .map_err(|e| format!("container {}: {e}", c.name))?;
        let probes = Probes::of(bin_dir, c).map_err(|e| format!("container {}: {e}", c.name))?;
        Ok(LocalContainer {
            name: c.name.clone(),
            program,
            args,
            env,
            cwd: self.dir.clone(),
            log: self.dir.join(format!("{}.log", c.name)),
            probes,
            restart: Restart::of(&self.pod),
            grace: grace(&self.pod),
        })
    }

    /// Writes the status the views imply, if it differs from the pod's.
    async fn write_status(&mut self, running: &mut Running) {
        let mut desired = podstatus::build(
            &self.pod,
            &running.views,
            running.failure.as_ref(),
            &running.ips,
            Timestamp::now(),
        );
        let mut health = crate::device_health::container_status(
            &self.pod,
            &running.devices,
            self.node.plugins.health(),
        );
        for status in desired.container_statuses.iter_mut().flatten() {
            status.allocated_resources_status = health.remove(&status.name);
        }
        let Some(body) = podstatus::patch(&self.pod, &desired) else {
            running.dirty = false;
            return;
        };
        let was_running =
            self.pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let ns = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.node.client.clone(), &ns);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(pod) => {
                running.dirty = false;
                let phase = desired.phase.clone().unwrap_or_default();
                if phase == "Running" && !was_running {
                    let created = self.pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
                    let elapsed_ms =
                        created.map(|c| Timestamp::now().duration_since(c).as_millis());
                    tracing::info!(pod = %key(&self.pod), ?elapsed_ms, "pod Running");
                } else {
                    tracing::info!(pod = %key(&self.pod), %phase, "pod status written");
                }
                self.pod = pod;
            }
            Err(source) => {
                running.dirty = true;
                let err = crate::Error::PatchPodStatus {
                    namespace: ns,
                    name,
                    source,
                };
                tracing::warn!(error = %error_chain(&err), "write pod status");
            }
        }
    }

    /// Follows container updates and pod changes until the pod's end.
    async fn follow(&mut self, running: &mut Running) -> End {
        let mut released = false;
        loop {
            if let Some(end) = self.end() {
                return end;
            }
            if !released
                && (running.failure.is_some() || podstatus::phase(&running.views) != "Running")
            {
                // An ended pod gives its devices back right away, as the kubelet does.
                released = true;
                if self.release_claims().await.is_err() {
                    continue;
                }
            }
            let retry = running.dirty.then_some(Duration::from_secs(1));
            // A clone, as `wait` borrows the worker; the change is marked
            // seen on the original when it is handled.
            let mut health = self.health_rx.clone();
            let step = match running.updates.as_mut() {
                Some(updates) => tokio::select! {
                    u = updates.recv() => Step::Update(u),
                    _ = health.changed() => Step::Health,
                    wake = self.wait(retry, false) => Step::Woke(wake),
                },
                None => tokio::select! {
                    _ = health.changed() => Step::Health,
                    wake = self.wait(retry, false) => Step::Woke(wake),
                },
            };
            match step {
                Step::Woke(Wake::Timer) if running.dirty => self.write_status(running).await,
                Step::Health => {
                    self.health_rx.borrow_and_update();
                    self.write_status(running).await;
                }
                Step::Woke(_) => {}
                Step::Update(None) => running.updates = None,
                Step::Update(Some(update)) => {
                    running.apply(update);
                    while let Some(more) = running.updates.as_mut().and_then(|u| u.try_recv().ok())
                    {
                        running.apply(more);
                    }
                    self.write_status(running).await;
                }
            }
        }
    }

    /// Stops processes; on deletion also unprepares and deletes the pod.
    async fn finish(&mut self, end: End, running: &mut Running) {
        let key = key(&self.pod);
        let grace = grace(&self.pod);
        running.stop.send_replace(Some(grace));
        while running.tasks.join_next().await.is_some() {}
        if matches!(end, End::Shutdown) {
            tracing::info!(pod = %key, "stopped local processes for shutdown");
            return;
        }
        tracing::info!(pod = %key, gone = matches!(end, End::Gone), "pod terminating");
        if self.release_claims().await.is_err() {
            return;
        }
        if matches!(end, End::Terminating) {
            self.final_delete().await;
        }
        self.node.ips.release(&self.uid);
        for name in [CDI_RECORD, EDITS_RECORD] {
            let record = self.dir.join(name);
            if let Err(err) = std::fs::remove_file(&record)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %record.display(), error = %err, "remove pod record");
            }
        }
        tracing::info!(pod = %key, "pod finished");
    }

    /// Unprepares the claims this pod was the last user of; `Err` on shutdown.
    async fn release_claims(&mut self) -> Result<(), ()> {
        let released = self.node.claims.release(&self.uid);
        if released.is_empty() {
            return Ok(());
        }
        let mut guards = Vec::new();
        for (_, lock) in &released {
            guards.push(lock.clone().lock_owned().await);
        }
        let mut pending: BTreeMap<String, Vec<ClaimRef>> = BTreeMap::new();
        for (release, _) in &released {
            for driver in &release.drivers {
                pending
                    .entry(driver.clone())
                    .or_default()
                    .push(release.claim.clone());
            }
        }
        let mut backoff = Backoff::new(RETRY_BACKOFF);
        loop {
            let mut errors = Vec::new();
            let mut still: BTreeMap<String, Vec<ClaimRef>> = BTreeMap::new();
            for (driver, refs) in &pending {
                let outcome = match self.node.plugins.client(driver).await {
                    Err(message) => Err(message),
                    Ok(mut client) => client.unprepare(refs).await.map_err(|err| {
                        self.node.plugins.invalidate(driver);
                        format!(
                            "NodeUnprepareResources with driver {driver} failed: {}",
                            error_chain(&err)
                        )
                    }),
                };
                match outcome {
                    Err(message) => {
                        errors.push(message);
                        still.insert(driver.clone(), refs.clone());
                    }
                    Ok(results) => {
                        for r in refs {
                            if let Some(Err(text)) = results.get(&r.uid) {
                                errors.push(format!(
                                    "NodeUnprepareResources failed for ResourceClaim {}/{}: {text}",
                                    r.namespace, r.name
                                ));
                                still.entry(driver.clone()).or_default().push(r.clone());
                            }
                        }
                    }
                }
            }
            if errors.is_empty() {
                tracing::info!(pod = %key(&self.pod), claims = released.len(), "unprepared dynamic resources");
                return Ok(());
            }
            pending = still;
            self.node
                .events
                .warn(&self.pod, events::FAILED_UNPREPARE, &errors.join("; "))
                .await;
            let delay = backoff.next_delay();
            if matches!(self.wait(Some(delay), true).await, Wake::Shutdown) {
                return Err(());
            }
        }
    }

    /// The kubelet's final delete: grace 0, only this incarnation (UID).
    async fn final_delete(&mut self) {
        let ns = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.node.client.clone(), &ns);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let mut backoff = Backoff::new(RETRY_BACKOFF);
        loop {
            if self.gone {
                return;
            }
            match api.delete(&name, &params).await {
                Ok(_) => return,
                // Gone already, or a new pod of the same name: not ours to delete.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                Err(source) => {
                    let err = crate::Error::DeletePod {
                        namespace: ns.clone(),
                        name: name.clone(),
                        source,
                    };
                    tracing::warn!(error = %error_chain(&err), "final delete");
                }
            }
            let delay = backoff.next_delay();
            if matches!(self.wait(Some(delay), false).await, Wake::Shutdown) {
                return;
            }
        }
    }
}

/// A started pod's containers.
struct Running {
    views: Vec<ContainerView>,
    failure: Option<PodFailure>,
    updates: Option<mpsc::UnboundedReceiver<Update>>,
    tasks: JoinSet<()>,
    stop: watch::Sender<Option<Duration>>,
    dirty: bool,
    /// The pod's addresses.
    ips: Addresses,
    /// Its prepared devices, for `allocatedResourcesStatus`.
    devices: BTreeMap<String, ClaimDevices>,
}

impl Default for Running {
    fn default() -> Self {
        Self {
            views: Vec::new(),
            failure: None,
            updates: None,
            tasks: JoinSet::new(),
            stop: watch::channel(None).0,
            dirty: false,
            ips: Addresses::loopback(),
            devices: BTreeMap::new(),
        }
    }
}

impl Running {
    /// Folds one container update into the views.
    fn apply(&mut self, update: Update) {
        let name = match &update {
            Update::Started { name, .. }
            | Update::Ready { name, .. }
            | Update::Exited { name, .. } => name.clone(),
        };
        let Some(view) = self.views.iter_mut().find(|v| v.name == name) else {
            return;
        };
        apply(view, update);
    }
}

/// Folds `update` into `view`: the container-status rules the pod status
/// shows.
pub fn apply(view: &mut ContainerView, update: Update) {
    match update {
        Update::Started { at, .. } => {
            view.state = RunState::Running(at);
            view.ready = false;
            view.started = false;
        }
        // Readiness is only reported once the startup probe passed.
        Update::Ready { ready, .. } => {
            if matches!(view.state, RunState::Running(_)) {
                view.ready = ready;
                view.started = true;
            }
        }
        Update::Exited {
            exit_code,
            reason,
            message,
            started_at,
            finished_at,
            restarting,
            ..
        } => {
            let ended = Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            };
            view.ready = false;
            view.started = false;
            if restarting {
                view.restart_count += 1;
                view.last_terminated = Some(ended);
                view.state = RunState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off restarting failed container {}",
                        view.name
                    )),
                };
            } else {
                view.state = RunState::Terminated(ended);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut b = Backoff::new(RETRY_BACKOFF);
        let got: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn grace_prefers_the_deletion_and_is_capped() {
        let pod = |deletion: Option<i64>, spec: Option<i64>| Pod {
            metadata: ObjectMeta {
                deletion_grace_period_seconds: deletion,
                ..Default::default()
            },
            spec: Some(PodSpec {
                termination_grace_period_seconds: spec,
                ..Default::default()
            }),
            status: None,
        };
        let cases = [
            (None, None, 30),
            (None, Some(5), 5),
            (Some(0), Some(5), 0),
            (Some(2), None, 2),
            (None, Some(600), 30),
        ];
        for (deletion, spec, want) in cases {
            assert_eq!(
                grace(&pod(deletion, spec)),
                Duration::from_secs(want),
                "{deletion:?} {spec:?}"
            );
        }
    }

    #[test]
    fn updates_fold_into_container_views() {
        let t = |s: &str| -> Timestamp { s.parse().unwrap() };
        let mut view = ContainerView {
            name: "c".into(),
            image: "i".into(),
            ready: false,
            started: false,
            restart_count: 0,
            state: RunState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_terminated: None,
        };
        apply(
            &mut view,
            Update::Ready {
                name: "c".into(),
                ready: true,
            },
        );
        assert!(!view.ready, "ready before start");
        apply(
            &mut view,
            Update::Started {
                name: "c".into(),
                at: t("2025-01-01T00:00:00Z"),
            },
        );
        assert!(!view.started, "started before the startup probe passed");
        apply(
            &mut view,
            Update::Ready {
                name: "c".into(),
                ready: true,
            },
        );
        assert_eq!(
            (view.ready, view.started, &view.state),
            (true, true, &RunState::Running(t("2025-01-01T00:00:00Z")))
        );
        let exit = |restarting| Update::Exited {
            name: "c".into(),
            exit_code: 1,
            reason: "Error".into(),
            message: None,
            started_at: t("2025-01-01T00:00:00Z"),
            finished_at: t("2025-01-01T00:00:09Z"),
            restarting,
        };
        apply(&mut view, exit(true));
        assert_eq!(
            (view.ready, view.restart_count, &view.state),
            (
                false,
                1,
                &RunState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some("back-off restarting failed container c".into())
                }
            )
        );
        assert_eq!(view.last_terminated.as_ref().map(|t| t.exit_code), Some(1));
        apply(&mut view, exit(false));
        assert_eq!(view.restart_count, 1);
        assert!(matches!(
            view.state,
            RunState::Terminated(Terminated { exit_code: 1, .. })
        ));
    }
}

//! Containers of "local" images, run as processes on this machine.
//!
//! A container whose image repository was given with `--local-image
//! REPO=BIN_DIR` runs `BIN_DIR/<basename of command[0]>` with the rest of
//! `command` plus `args`. Its environment is the emulator's own (so test
//! binaries find their tools), minus the emulator's `NVDRA_EMU_*` flags,
//! overlaid with the container's `env` and then the CDI `env` edits of the
//! pod's prepared devices (CDI wins, as when a runtime injects devices).
//! `$(VAR)` references in values are not expanded.
//!
//! Each process gets its own process group, so SIGTERM/SIGKILL reach any
//! children it forks; signals are sent with the `kill` utility (no unsafe
//! code). A process is also killed if its supervisor is dropped.
//!
//! [`supervise`] runs one container for its whole life: start, probes,
//! restart with backoff per the pod's restart policy, and stop with a grace
//! period. It reports every state change as an [`Update`].
//!
//! Exec probes follow the kubelet's rules ([`Probes`]): a startup probe runs
//! first and holds the other two back; once it succeeds the readiness probe
//! runs at once (the kubelet triggers it on the started transition) and then
//! every period, and the liveness probe every period; a container without a
//! readiness probe is ready when started. A failed startup or liveness probe
//! kills the container, which then restarts unless the policy is `Never`.
//! Initial delays count from the container's start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, watch};

use crate::args::LocalImage;
use crate::ipam::Addresses;

/// Restart backoff bounds for crashed containers (shorter than the kubelet's
/// 10 s..5 min so e2e runs stay fast).
pub const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// The image reference without `@digest` or `:tag` (a `:port` inside the
/// registry host is kept).
pub fn image_repo(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(repo, _)| repo);
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

/// The BIN_DIR of the first `--local-image` entry matching `image`.
pub fn local_bin_dir<'a>(images: &'a [LocalImage], image: &str) -> Option<&'a Path> {
    let repo = image_repo(image);
    images
        .iter()
        .find(|l| l.repo == repo)
        .map(|l| l.bin_dir.as_path())
}

/// Program and arguments for a command run from `bin_dir`.
pub fn program(
    bin_dir: &Path,
    command: &[String],
    args: &[String],
) -> Result<(PathBuf, Vec<String>), String> {
    let Some(first) = command.first() else {
        return Err(
            "a local image needs command[0] to name its program, and command is empty".into(),
        );
    };
    let base = Path::new(first)
        .file_name()
        .ok_or_else(|| format!("command[0] {first:?} names no program"))?;
    let rest = command[1..].iter().chain(args).cloned().collect();
    Ok((bin_dir.join(base), rest))
}

/// The value of a downward-API `fieldRef` for this emulator's pods; `ips` are the pod's
/// addresses.
pub fn field_ref(pod: &Pod, path: &str, ips: &Addresses) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => Some(ips.pod.clone()),
        "status.hostIP" => Some(ips.host.clone()),
        _ => {
            if let Some(key) = map_key("metadata.labels['") {
                meta.labels.as_ref().and_then(|m| m.get(key).cloned())
            } else if let Some(key) = map_key("metadata.annotations['") {
                meta.annotations.as_ref().and_then(|m| m.get(key).cloned())
            } else {
                return Err(format!("unsupported env source fieldRef {path:?}"));
            }
        }
    };
    Ok(value.unwrap_or_default())
}

/// The environment a local container gets on top of the emulator's own:
/// its `env` in order, then `cdi_env` (`KEY=VALUE`); later entries win.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    cdi_env: &[String],
    ips: &Addresses,
) -> Result<Vec<(String, String)>, String> {
    let name = &container.name;
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(format!("container {name}: unsupported env source envFrom"));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| match out.iter_mut().find(|(key, _)| *key == k) {
        Some(entry) => entry.1 = v,
        None => out.push((k, v)),
    };
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => var.value.clone().unwrap_or_default(),
            Some(from) => {
                let source = if from.config_map_key_ref.is_some() {
                    Some("configMapKeyRef")
                } else if from.secret_key_ref.is_some() {
                    Some("secretKeyRef")
                } else if from.resource_field_ref.is_some() {
                    Some("resourceFieldRef")
                } else if from.file_key_ref.is_some() {
                    Some("fileKeyRef")
                } else {
                    None
                };
                match (source, &from.field_ref) {
                    (None, Some(field)) => field_ref(pod, &field.field_path, ips)
                        .map_err(|e| format!("container {name}: env {}: {e}", var.name))?,
                    (Some(source), _) => {
                        return Err(format!(
                            "container {name}: env {}: unsupported env source {source}",
                            var.name
                        ));
                    }
                    (None, None) => {
                        return Err(format!(
                            "container {name}: env {}: empty valueFrom",
                            var.name
                        ));
                    }
                }
            }
        };
        set(var.name.clone(), value);
    }
    for entry in cdi_env {
        let (k, v) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        set(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// How a container restarts, from `spec.restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Restart after any exit.
    Always,
    /// Restart after a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

impl Restart {
    /// From the pod's `restartPolicy` (absent means `Always`).
    pub fn of(pod: &Pod) -> Self {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }

    /// Whether a process that exited with `code` is started again.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => code != 0,
            Self::Never => false,
        }
    }
}

/// An exec probe, resolved to a program.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
}

impl ProbeSpec {
    /// The exec probe of `probe` (the container's `kind`, e.g. `readinessProbe`)
    /// with its program found in `bin_dir`; `None` when it has no exec action
    /// (other kinds are not emulated and count as no probe).
    pub fn from_probe(bin_dir: &Path, kind: &str, probe: &Probe) -> Result<Option<Self>, String> {
        let Some(command) = probe.exec.as_ref().and_then(|e| e.command.as_ref()) else {
            return Ok(None);
        };
        let (program, args) = program(bin_dir, command, &[]).map_err(|e| format!("{kind}: {e}"))?;
        let secs = |v: Option<i32>, default: i32| {
            Duration::from_secs(u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0))
        };
        let count =
            |v: Option<i32>, default: i32| u32::try_from(v.unwrap_or(default).max(1)).unwrap_or(1);
        Ok(Some(Self {
            program,
            args,
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }))
    }
}

/// The exec probes of a container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probes {
    /// `startupProbe`.
    pub startup: Option<ProbeSpec>,
    /// `livenessProbe`.
    pub liveness: Option<ProbeSpec>,
    /// `readinessProbe`.
    pub readiness: Option<ProbeSpec>,
}

impl Probes {
    /// The probes of `c`, their programs found in `bin_dir`.
    pub fn of(bin_dir: &Path, c: &Container) -> Result<Self, String> {
        let spec = |kind: &str, probe: &Option<Probe>| match probe {
            Some(p) => ProbeSpec::from_probe(bin_dir, kind, p),
            None => Ok(None),
        };
        Ok(Self {
            startup: spec("startupProbe", &c.startup_probe)?,
            liveness: spec("livenessProbe", &c.liveness_probe)?,
            readiness: spec("readinessProbe", &c.readiness_probe)?,
        })
    }
}

/// Everything needed to run one local container.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalContainer {
    /// Container name.
    pub name: String,
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment overlaid on the emulator's.
    pub env: Vec<(String, String)>,
    /// Working directory (the pod's dir).
    pub cwd: PathBuf,
    /// Where stdout and stderr are appended.
    pub log: PathBuf,
    /// Its exec probes.
    pub probes: Probes,
    /// Restart policy.
    pub restart: Restart,
    /// How long a container a probe failed gets between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// A state change of a supervised container.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The process started.
    Started {
        /// Container name.
        name: String,
        /// When.
        at: Timestamp,
    },
    /// Readiness changed (always `true` right after start without a probe).
    Ready {
        /// Container name.
        name: String,
        /// Whether ready.
        ready: bool,
    },
    /// The process exited or could not start.
    Exited {
        /// Container name.
        name: String,
        /// Exit code (128 + signal when killed; 128 for a start failure).
        exit_code: i32,
        /// `Completed`, `Error` or `StartError`.
        reason: String,
        /// The start error, if any.
        message: Option<String>,
        /// When it started (the failure time for a start error).
        started_at: Timestamp,
        /// When it ended.
        finished_at: Timestamp,
        /// Whether it will be started again.
        restarting: bool,
    },
}

/// Runs `c` until it exits for good or `stop` carries a grace period; then
/// SIGTERM, wait up to the grace, SIGKILL.
pub async fn supervise(
    c: LocalContainer,
    updates: mpsc::UnboundedSender<Update>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let mut backoff = RESTART_BACKOFF.0;
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let started_at = Timestamp::now();
        let mut child = match spawn(&c) {
            Ok(child) => child,
            Err(message) => {
                tracing::warn!(container = %c.name, %message, "local container failed to start");
                let restarting = c.restart.restarts(128);
                let _ = updates.send(Update::Exited {
                    name: c.name.clone(),
                    exit_code: 128,
                    reason: "StartError".into(),
                    message: Some(message),
                    started_at,
                    finished_at: Timestamp::now(),
                    restarting,
                });
                if !restarting || !sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(RESTART_BACKOFF.1);
                continue;
            }
        };
        let _ = updates.send(Update::Started {
            name: c.name.clone(),
            at: started_at,
        });
        let (kill_tx, mut kill_rx) = mpsc::channel(1);
        let prober = tokio::spawn(run_probes(
            c.name.clone(),
            c.probes.clone(),
            c.env.clone(),
            c.cwd.clone(),
            updates.clone(),
            kill_tx,
        ));
        let mut killed = false;
        let status = tokio::select! {
            status = child.wait() => status,
            Some(why) = kill_rx.recv() => {
                tracing::info!(container = %c.name, %why, "probe failed; killing the container");
                killed = true;
                terminate(&mut child, c.grace).await
            }
            _ = stopped(&mut stop) => {
                let grace = (*stop.borrow()).unwrap_or_default();
                terminate(&mut child, grace).await
            }
        };
        prober.abort();
        let exit_code = exit_code(status);
        let stopping = stop.borrow().is_some();
        // A container its probe failed is restarted even if it exited 0 on
        // SIGTERM, as the kubelet restarts it: only `Never` keeps it down.
        let restarting = !stopping
            && if killed {
                c.restart != Restart::Never
            } else {
                c.restart.restarts(exit_code)
            };
        tracing::info!(container = %c.name, exit_code, restarting, "local container exited");
        let _ = updates.send(Update::Exited {
            name: c.name.clone(),
            exit_code,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at,
            finished_at: Timestamp::now(),
            restarting,
        });
        if !restarting {
            return;
        }
        // A process that ran a while was healthy: start the backoff over.
        if Timestamp::now().duration_since(started_at).as_secs() > 60 {
            backoff = RESTART_BACKOFF.0;
        }
        if !sleep_or_stop(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF.1);
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|sig| 128 + sig))
            .unwrap_or(128),
        Err(_) => 128,
    }
}

/// Resolves when `stop` carries a grace period (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<Option<Duration>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// Sleeps `d`; false when a stop came first.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<Option<Duration>>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stopped(stop) => false,
    }
}

fn command(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    cwd: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NVDRA_EMU_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn spawn(c: &LocalContainer) -> Result<tokio::process::Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&c.log)
        .map_err(|e| format!("open log {}: {e}", c.log.display()))?;
    let err_log = log
        .try_clone()
        .map_err(|e| format!("open log {}: {e}", c.log.display()))?;
    command(&c.program, &c.args, &c.env, &c.cwd)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        .spawn()
        .map_err(|e| format!("start {}: {e}", c.program.display()))
}

/// Sends `signal` to the process group led by `child`.
async fn signal_group(child: &tokio::process::Child, signal: &str) {
    let Some(pid) = child.id() else { return };
    let result = tokio::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(err) = result {
        tracing::warn!(pid, signal, error = %err, "run kill");
    }
}

async fn terminate(
    child: &mut tokio::process::Child,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(child, "TERM").await;
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        return status;
    }
    signal_group(child, "KILL").await;
    let _ = child.start_kill();
    child.wait().await
}

/// Runs a started container's probes (see the module docs) until aborted;
/// sends on `kill` why the container must die when a startup or liveness
/// probe fails.
async fn run_probes(
    name: String,
    probes: Probes,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    updates: mpsc::UnboundedSender<Update>,
    kill: mpsc::Sender<String>,
) {
    let started = tokio::time::Instant::now();
    if let Some(spec) = &probes.startup {
        tokio::time::sleep_until(started + spec.initial_delay).await;
        let mut failures = 0u32;
        loop {
            if run_probe(spec, &env, &cwd).await {
                break;
            }
            failures += 1;
            if failures >= spec.failure_threshold {
                let _ = kill
                    .send(format!("startup probe failed {failures} times"))
                    .await;
                return;
            }
            tokio::time::sleep(spec.period).await;
        }
    }
    let readiness = async {
        match &probes.readiness {
            None => {
                let _ = updates.send(Update::Ready {
                    name: name.clone(),
                    ready: true,
                });
            }
            Some(spec) => {
                tokio::time::sleep_until(started + spec.initial_delay).await;
                readiness_loop(&name, spec, &env, &cwd, &updates).await;
            }
        }
    };
    let liveness = async {
        let Some(spec) = &probes.liveness else {
            return;
        };
        tokio::time::sleep_until(started + spec.initial_delay).await;
        let mut failures = 0u32;
        loop {
            if run_probe(spec, &env, &cwd).await {
                failures = 0;
            } else {
                failures += 1;
                if failures >= spec.failure_threshold {
                    let _ = kill
                        .send(format!("liveness probe failed {failures} times"))
                        .await;
                    return;
                }
            }
            tokio::time::sleep(spec.period).await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// Probes readiness every period, reporting the first result and every change.
async fn readiness_loop(
    name: &str,
    spec: &ProbeSpec,
    env: &[(String, String)],
    cwd: &Path,
    updates: &mpsc::UnboundedSender<Update>,
) {
    let (mut ready, mut successes, mut failures) = (false, 0u32, 0u32);
    let mut first = true;
    loop {
        let ok = run_probe(spec, env, cwd).await;
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let next = if ok && successes >= spec.success_threshold {
            true
        } else if !ok && failures >= spec.failure_threshold {
            false
        } else {
            ready
        };
        if next != ready || first {
            ready = next;
            first = false;
            let _ = updates.send(Update::Ready {
                name: name.to_owned(),
                ready,
            });
        }
        tokio::time::sleep(spec.period).await;
    }
}

async fn run_probe(spec: &ProbeSpec, env: &[(String, String)], cwd: &Path) -> bool {
    let child = command(&spec.program, &spec.args, env, cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            signal_group(&child, "KILL").await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    #[test]
    fn image_repo_strips_tag_and_digest_but_not_registry_port() {
        let cases = [
            ("nvdra", "nvdra"),
            ("nvdra:v1", "nvdra"),
            ("ghcr.io/x/nvdra:v1.2", "ghcr.io/x/nvdra"),
            ("localhost:5000/nvdra", "localhost:5000/nvdra"),
            ("localhost:5000/nvdra:dev", "localhost:5000/nvdra"),
            ("reg/nvdra@sha256:abc", "reg/nvdra"),
            ("reg/nvdra:v1@sha256:abc", "reg/nvdra"),
        ];
        for (image, want) in cases {
            assert_eq!(image_repo(image), want, "{image}");
        }
        let images = [LocalImage {
            repo: "reg/nvdra".into(),
            bin_dir: "/bin-dir".into(),
        }];
        assert_eq!(
            local_bin_dir(&images, "reg/nvdra:v9"),
            Some(Path::new("/bin-dir"))
        );
        assert_eq!(local_bin_dir(&images, "reg/other:v9"), None);
    }

    #[test]
    fn program_is_the_basename_of_command0_in_bin_dir() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            program(
                Path::new("/b"),
                &s(&["/usr/bin/compute-domain-daemon", "run"]),
                &s(&["--x=1"])
            ),
            Ok((
                PathBuf::from("/b/compute-domain-daemon"),
                s(&["run", "--x=1"])
            ))
        );
        assert_eq!(
            program(Path::new("/b"), &[], &s(&["a"])),
            Err("a local image needs command[0] to name its program, and command is empty".into())
        );
        assert_eq!(
            program(Path::new("/b"), &s(&["/"]), &[]),
            Err(r#"command[0] "/" names no program"#.into())
        );
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_owned(), "x".to_owned())].into()),
                annotations: Some([("a/b".to_owned(), "y".to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                service_account_name: Some("sa".into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn env_resolves_literals_field_refs_then_cdi_edits() {
        let literal = |n: &str, v: &str| EnvVar {
            name: n.into(),
            value: Some(v.into()),
            ..Default::default()
        };
        let container = Container {
            name: "c".into(),
            env: Some(vec![
                literal("A", "1"),
                field("NAME", "metadata.name"),
                field("NS", "metadata.namespace"),
                field("UID", "metadata.uid"),
                field("NODE", "spec.nodeName"),
                field("SA", "spec.serviceAccountName"),
                field("POD_IP", "status.podIP"),
                field("HOST_IP", "status.hostIP"),
                field("APP", "metadata.labels['app']"),
                field("ANN", "metadata.annotations['a/b']"),
                field("MISSING", "metadata.labels['nope']"),
                literal("NVIDIA_VISIBLE_DEVICES", "void"),
                literal("A", "2"),
            ]),
            ..Default::default()
        };
        let got = container_env(
            &pod(),
            &container,
            &["NVIDIA_VISIBLE_DEVICES=0,1".into(), "FLAG".into()],
            &Addresses {
                host: "127.1.3.1".into(),
                pod: "127.1.3.2".into(),
            },
        )
        .unwrap();
        let want: Vec<(String, String)> = [
            ("A", "2"),
            ("NAME", "p"),
            ("NS", "ns"),
            ("UID", "u-1"),
            ("NODE", "node-a"),
            ("SA", "sa"),
            ("POD_IP", "127.1.3.2"),
            ("HOST_IP", "127.1.3.1"),
            ("APP", "x"),
            ("ANN", "y"),
            ("MISSING", ""),
            ("NVIDIA_VISIBLE_DEVICES", "0,1"),
            ("FLAG", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn env_names_the_unsupported_source() {
        let secret = EnvVar {
            name: "TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    key: "k".into(),
                    name: "s".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cases = [
            (
                secret,
                "container c: env TOKEN: unsupported env source secretKeyRef",
            ),
            (
                field("X", "status.phase"),
                r#"container c: env X: unsupported env source fieldRef "status.phase""#,
            ),
        ];
        for (var, want) in cases {
            let container = Container {
                name: "c".into(),
                env: Some(vec![var]),
                ..Default::default()
            };
            assert_eq!(
                container_env(&pod(), &container, &[], &Addresses::loopback()),
                Err(want.to_owned())
            );
        }
    }

    #[test]
    fn restart_policy_decides_restarts() {
        let cases = [
            (Restart::Always, 0, true),
            (Restart::Always, 1, true),
            (Restart::OnFailure, 0, false),
            (Restart::OnFailure, 137, true),
            (Restart::Never, 1, false),
        ];
        for (policy, code, want) in cases {
            assert_eq!(policy.restarts(code), want, "{policy:?} {code}");
        }
    }

    #[test]
    fn probe_defaults_follow_the_api() {
        let probe = Probe {
            exec: Some(k8s_openapi::api::core::v1::ExecAction {
                command: Some(vec!["/x/ready".into(), "-q".into()]),
            }),
            ..Default::default()
        };
        assert_eq!(
            ProbeSpec::from_probe(Path::new("/b"), "readinessProbe", &probe),
            Ok(Some(ProbeSpec {
                program: "/b/ready".into(),
                args: vec!["-q".into()],
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }))
        );
        assert_eq!(
            ProbeSpec::from_probe(Path::new("/b"), "readinessProbe", &Probe::default()),
            Ok(None)
        );
    }

    #[tokio::test]
    async fn supervise_runs_restarts_on_failure_and_stops_with_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let c = LocalContainer {
            name: "c".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo \"$GREETING\"; exit 3".into()],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: dir.path().to_owned(),
            log: dir.path().join("c.log"),
            probes: Probes::default(),
            restart: Restart::Never,
            grace: Duration::from_secs(1),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(None);
        supervise(c.clone(), tx, stop).await;
        let mut kinds = Vec::new();
        while let Ok(u) = rx.try_recv() {
            kinds.push(label(&u));
        }
        assert_eq!(
            kinds,
            ["started", "ready=true", "exited 3 Error restarting=false"]
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("c.log")).unwrap(),
            "hi\n"
        );

        // A long runner under Always: stopping sends SIGTERM, and the exit is final.
        let long = LocalContainer {
            args: vec![
                "-c".into(),
                "trap 'exit 0' TERM; echo trapped; while :; do sleep 0.05; done".into(),
            ],
            restart: Restart::Always,
            ..c
        };
        let log = dir.path().join("c.log");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(None);
        let task = tokio::spawn(supervise(long, tx, stop));
        assert!(matches!(rx.recv().await, Some(Update::Started { .. })));
        // A SIGTERM before the shell has installed its trap would kill it (143):
        // stop only once the script says the trap is set.
        for _ in 0..500 {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("trapped")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(Some(Duration::from_secs(5))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let mut last = None;
        while let Ok(u) = rx.try_recv() {
            last = Some(u);
        }
        assert!(
            matches!(
                &last,
                Some(Update::Exited {
                    exit_code: 0,
                    restarting: false,
                    ..
                })
            ),
            "{last:?}"
        );
    }

    /// An update as the tests compare it.
    fn label(update: &Update) -> String {
        match update {
            Update::Started { .. } => "started".to_owned(),
            Update::Ready { ready, .. } => format!("ready={ready}"),
            Update::Exited {
                exit_code,
                reason,
                restarting,
                ..
            } => format!("exited {exit_code} {reason} restarting={restarting}"),
        }
    }

    fn sh_probe(script: &str, period_secs: u64, failure_threshold: u32) -> ProbeSpec {
        ProbeSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(period_secs),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold,
        }
    }

    fn sh_container(dir: &Path, script: &str, probes: Probes, restart: Restart) -> LocalContainer {
        LocalContainer {
            name: "c".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: Vec::new(),
            cwd: dir.to_owned(),
            log: dir.join("c.log"),
            probes,
            restart,
            grace: Duration::from_secs(1),
        }
    }

    /// A container under [`supervise`], for tests.
    struct Supervised {
        updates: mpsc::UnboundedReceiver<Update>,
        stop: watch::Sender<Option<Duration>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Supervised {
        fn start(c: LocalContainer) -> Self {
            let (tx, updates) = mpsc::unbounded_channel();
            let (stop, stop_rx) = watch::channel(None);
            let task = tokio::spawn(supervise(c, tx, stop_rx));
            Self {
                updates,
                stop,
                task,
            }
        }

        /// The next update, waiting at most 10 s.
        async fn next(&mut self) -> Update {
            tokio::time::timeout(Duration::from_secs(10), self.updates.recv())
                .await
                .expect("an update within 10 s")
                .expect("the supervisor is running")
        }

        /// Stops the container and waits for its supervisor.
        async fn stop(self) {
            self.stop.send(Some(Duration::from_secs(1))).unwrap();
            self.task.await.unwrap();
        }

        /// Waits (at most 10 s) for the supervisor to end by itself; every update's label.
        async fn finished(mut self) -> Vec<String> {
            tokio::time::timeout(Duration::from_secs(10), &mut self.task)
                .await
                .expect("the supervisor ends within 10 s")
                .unwrap();
            let mut labels = Vec::new();
            while let Ok(update) = self.updates.try_recv() {
                labels.push(label(&update));
            }
            labels
        }
    }

    #[tokio::test]
    async fn a_startup_probe_holds_readiness_back_until_it_passes() {
        let dir = tempfile::tempdir().unwrap();
        let probes = Probes {
            startup: Some(sh_probe("test -e started", 1, 30)),
            liveness: None,
            // Would pass at once, and next only after 10 s.
            readiness: Some(sh_probe("true", 10, 1)),
        };
        let c = sh_container(
            dir.path(),
            "sleep 1.2; touch started; while :; do sleep 0.05; done",
            probes,
            Restart::Always,
        );
        let mut running = Supervised::start(c);
        assert!(matches!(running.next().await, Update::Started { .. }));
        let start = tokio::time::Instant::now();
        let update = running.next().await;
        let waited = start.elapsed();
        assert!(
            matches!(update, Update::Ready { ready: true, .. }),
            "{update:?}"
        );
        assert!(
            waited >= Duration::from_millis(1200),
            "ready after {waited:?}, before the startup probe could pass"
        );
        assert!(
            waited < Duration::from_secs(4),
            "ready after {waited:?}: readiness waited for its own period"
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn a_failing_liveness_probe_kills_and_restarts_the_container() {
        let dir = tempfile::tempdir().unwrap();
        let probes = Probes {
            startup: None,
            liveness: Some(sh_probe("false", 1, 2)),
            readiness: None,
        };
        let c = sh_container(
            dir.path(),
            "while :; do sleep 0.05; done",
            probes,
            Restart::Always,
        );
        let mut running = Supervised::start(c);
        let mut kinds = Vec::new();
        while kinds.len() < 4 {
            kinds.push(label(&running.next().await));
        }
        assert_eq!(
            kinds,
            [
                "started",
                "ready=true",
                "exited 143 Error restarting=true",
                "started"
            ]
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn a_failing_startup_probe_kills_the_container_and_never_readies_it() {
        let dir = tempfile::tempdir().unwrap();
        let probes = Probes {
            startup: Some(sh_probe("false", 1, 1)),
            liveness: None,
            readiness: None,
        };
        let c = sh_container(
            dir.path(),
            "while :; do sleep 0.05; done",
            probes,
            Restart::Never,
        );
        assert_eq!(
            Supervised::start(c).finished().await,
            ["started", "exited 143 Error restarting=false"]
        );
    }
}

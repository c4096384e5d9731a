//! MPS control daemons: one `nvidia-cuda-mps-control` per MPS config group
//! of a claim, started, configured, supervised and stopped by the agent.
//!
//! # Why a supervised child process, not upstream's Deployment
//!
//! Upstream creates a Deployment per claim and waits for it. nvdra starts the
//! driver root's daemon itself (see docs/architecture.md): no image to pull,
//! no API round trip or scheduling inside the kubelet's Prepare budget, no
//! RBAC for Deployments, and a daemon that cannot start fails the claim with
//! its own output at once instead of a 10 s readiness timeout.
//!
//! # Layout and lifecycle
//!
//! Each daemon has a directory `<root>/<id>/` (`<root>` is `<plugin data
//! dir>/mps`, `<id>` is `<claim UID>-<5 hex of sha256 of its sorted UUIDs>`)
//! holding `daemon.json` (its [`DaemonSpec`], written before it starts),
//! `pipe/`, `log/`, `shm/` and `daemon.pid`. The directory is the record:
//! start-up ([`MpsDaemons::recover`]) keeps or restarts the daemons of the
//! claims it is told to keep and tears down every other directory, so a crash
//! at any point leaves nothing running that no claim accounts for.
//!
//! - **Start** ([`MpsDaemons::start`]): with `private_shm`, mount a tmpfs on
//!   `shm/` (half the node's memory, as upstream) and run the daemon in its
//!   own mount namespace with `shm/` on `/dev/shm`, which is what the claim's
//!   containers get too, so server and clients share it and nothing else
//!   does. The daemon runs in the foreground (`-f`) in its own process group,
//!   with `CUDA_VISIBLE_DEVICES` set to the group's UUIDs and its output in
//!   `log/daemon.out`. It is ready when `pipe/control` exists; then the
//!   group's limits are sent through the control client.
//! - **Supervise** ([`MpsDaemons::supervise`]): a daemon that exits is
//!   restarted and reconfigured, backing off from 1 s to 60 s.
//! - **Agent restarts**: the daemon is not killed with the agent (its own
//!   process group). The next agent adopts it by `daemon.pid` when the
//!   process is still that daemon, so clients keep their server; otherwise it
//!   starts a new one. (Inside a container without the host's PID namespace
//!   the daemon dies with the agent's container and is restarted.)
//! - **Stop**: `quit` through the client, then SIGKILL after a grace period;
//!   unmount `shm/`, remove the directory.
//!
//! # Failure modes
//!
//! A start that fails leaves nothing behind (process killed, tmpfs
//! unmounted, directory removed) and returns an [`Error`] carrying the
//! daemon's last output. Stop problems are logged: the directory, if it
//! survives, is retried at the next start-up.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The control daemon's file name under the driver root.
pub const CONTROL_BINARY: &str = "nvidia-cuda-mps-control";
/// Where the claim's containers see the pipe directory.
pub const CONTAINER_PIPE_DIR: &str = "/tmp/nvidia-mps";
/// The config-state key naming a group's daemon (upstream's name).
pub const DAEMON_ID_KEY: &str = "mpsControlDaemonID";
/// The tmpfs size when the node's memory cannot be read (upstream's fallback).
const FALLBACK_SHM_SIZE: &str = "65536k";
/// How long a stopping daemon gets after `quit` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long one control-client call may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Restart back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Where the agent sees its own processes, the daemons among them.
const OWN_PROC: &str = "/proc";
/// How much of the daemon's output an error quotes.
const OUTPUT_TAIL: u64 = 2048;

/// Where and how daemons run.
#[derive(Debug, Clone)]
pub struct MpsOptions {
    /// The `nvidia-cuda-mps-control` binary (agent's view).
    pub control: PathBuf,
    /// The directory of the driver's libraries, put on `LD_LIBRARY_PATH`.
    pub library_dir: PathBuf,
    /// `<plugin data dir>/mps`.
    pub root: PathBuf,
    /// The host's procfs root, for the node's memory size. (Daemons are
    /// looked up in the agent's own `/proc`: they run in its PID namespace.)
    pub proc_root: PathBuf,
    /// Give each daemon and its clients their own tmpfs `/dev/shm` (needs
    /// CAP_SYS_ADMIN; off only where the agent cannot mount, e.g. the e2e).
    pub private_shm: bool,
    /// How long a daemon may take to become ready.
    pub start_timeout: Duration,
}

/// What one daemon serves and how it is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonSpec {
    /// `<claim UID>-<hash>`.
    pub id: String,
    /// The GPUs or MIG devices it serves, sorted.
    pub uuids: Vec<String>,
    /// `set_default_active_thread_percentage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_thread_percentage: Option<i64>,
    /// `set_default_device_pinned_mem_limit <uuid> <N>M`, by UUID.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pinned_memory_limits: BTreeMap<String, String>,
}

impl DaemonSpec {
    /// The spec of a claim's group: `uuids` in any order.
    pub fn new(
        claim_uid: &str,
        uuids: &[&str],
        active_thread_percentage: Option<i64>,
        pinned_memory_limits: BTreeMap<String, String>,
    ) -> Self {
        let mut uuids: Vec<String> = uuids.iter().map(|u| (*u).to_owned()).collect();
        uuids.sort_unstable();
        uuids.dedup();
        let digest = Sha256::digest(uuids.join(",").as_bytes());
        let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            id: format!("{claim_uid}-{}", &hash[..5]),
            uuids,
            active_thread_percentage,
            pinned_memory_limits,
        }
    }

    /// The control-client commands that configure the daemon, one per line.
    pub fn commands(&self) -> String {
        let mut out = String::new();
        if let Some(pct) = self.active_thread_percentage {
            out.push_str(&format!("set_default_active_thread_percentage {pct}\n"));
        }
        for (uuid, limit) in &self.pinned_memory_limits {
            out.push_str(&format!(
                "set_default_device_pinned_mem_limit {uuid} {limit}\n"
            ));
        }
        out
    }

    /// The claim UID of a daemon ID.
    fn claim_of(id: &str) -> &str {
        id.rsplit_once('-').map_or(id, |(claim, _)| claim)
    }
}

/// Why a daemon could not be started or configured.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its directory could not be prepared.
    #[error("cannot prepare the MPS directory {}", path.display())]
    PrepareDir {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tmpfs for its `/dev/shm` could not be mounted.
    #[error(
        "cannot mount a tmpfs on {} for the MPS daemon's /dev/shm (the agent needs \
         CAP_SYS_ADMIN; the chart runs it privileged)",
        path.display()
    )]
    MountShm {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon or the control client could not be run.
    #[error("cannot run {}", command.display())]
    Spawn {
        /// The binary.
        command: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon exited before it was ready.
    #[error("MPS control daemon {id} exited ({status}) before it was ready: {output}")]
    Exited {
        /// The daemon.
        id: String,
        /// How it ended.
        status: String,
        /// The end of its output.
        output: String,
    },
    /// The daemon was not ready in time.
    #[error("MPS control daemon {id} was not ready within {waited:?}: {output}")]
    NotReady {
        /// The daemon.
        id: String,
        /// How long it was given.
        waited: Duration,
        /// The end of its output.
        output: String,
    },
    /// The control client refused the daemon's settings.
    #[error("MPS control daemon {id} refused its settings ({status}): {output}")]
    Configure {
        /// The daemon.
        id: String,
        /// How the client ended.
        status: String,
        /// The client's output.
        output: String,
    },
}

/// A daemon's process.
#[derive(Debug)]
enum Process {
    /// Started by this agent.
    Child(Child),
    /// Started by an earlier agent and still running.
    Adopted(u32),
    /// Exited; restart due at `retry_at`.
    Down { retry_at: Instant, failures: u32 },
}

#[derive(Debug)]
struct Daemon {
    spec: DaemonSpec,
    process: Process,
}

/// The node's MPS control daemons.
#[derive(Debug)]
pub struct MpsDaemons {
    options: MpsOptions,
    daemons: Mutex<BTreeMap<String, Daemon>>,
}

impl MpsDaemons {
    /// Daemons run as `options` says; none is running yet (see [`Self::recover`]).
    pub fn new(options: MpsOptions) -> Self {
        Self {
            options,
            daemons: Mutex::new(BTreeMap::new()),
        }
    }

    /// The options.
    pub fn options(&self) -> &MpsOptions {
        &self.options
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Daemon>> {
        self.daemons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.options.root.join(id)
    }

    /// The host directories a client container mounts: `(shm, pipe)`.
    pub fn client_dirs(&self, id: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir(id);
        (dir.join("shm"), dir.join("pipe"))
    }

    /// Starts and configures `spec`'s daemon; a no-op when it already runs
    /// with this spec. On error nothing of it is left.
    pub fn start(&self, spec: &DaemonSpec) -> Result<(), Error> {
        let mut daemons = self.lock();
        if let Some(daemon) = daemons.get(&spec.id)
            && daemon.spec == *spec
            && !matches!(daemon.process, Process::Down { .. })
        {
            return Ok(());
        }
        if let Some(old) = daemons.remove(&spec.id) {
            self.terminate(old);
        }
        let result = self.prepare_dir(spec).and_then(|()| {
            let child = self.launch(spec)?;
            if let Err(err) = self.configure(spec) {
                self.terminate(Daemon {
                    spec: spec.clone(),
                    process: Process::Child(child),
                });
                return Err(err);
            }
            Ok(child)
        });
        match result {
            Ok(child) => {
                tracing::info!(daemon = %spec.id, pid = child.id(), uuids = ?spec.uuids, "MPS control daemon started");
                daemons.insert(
                    spec.id.clone(),
                    Daemon {
                        spec: spec.clone(),
                        process: Process::Child(child),
                    },
                );
                Ok(())
            }
            Err(err) => {
                self.remove_dir(&spec.id);
                Err(err)
            }
        }
    }

    /// Stops every daemon of `claim_uid`, known or only on disk.
    pub fn stop_claim(&self, claim_uid: &str) {
        let mut daemons = self.lock();
        let ids: Vec<String> = daemons
            .keys()
            .filter(|id| DaemonSpec::claim_of(id) == claim_uid)
            .cloned()
            .collect();
        for id in ids {
            if let Some(daemon) = daemons.remove(&id) {
                self.terminate(daemon);
            }
            self.remove_dir(&id);
        }
        for id in self.ids_on_disk() {
            if DaemonSpec::claim_of(&id) == claim_uid {
                self.tear_down_on_disk(&id);
            }
        }
    }

    /// Start-up: adopts or restarts the daemons of claims `keep` accepts
    /// (from their `daemon.json`) and tears down every other directory.
    /// Returns problems to report; none is fatal.
    pub fn recover(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut problems = Vec::new();
        for id in self.ids_on_disk() {
            if !keep(DaemonSpec::claim_of(&id)) {
                tracing::info!(daemon = %id, "tearing down an MPS daemon no claim accounts for");
                self.tear_down_on_disk(&id);
                continue;
            }
            let spec = match read_spec(&self.dir(&id)) {
                Ok(spec) if spec.id == id => spec,
                Ok(_) | Err(_) => {
                    problems.push(format!(
                        "MPS daemon {id}: unreadable daemon.json; torn down"
                    ));
                    self.tear_down_on_disk(&id);
                    continue;
                }
            };
            if let Some(pid) = self.running_pid(&id) {
                tracing::info!(daemon = %id, pid, "adopted a running MPS control daemon");
                self.lock().insert(
                    id,
                    Daemon {
                        spec,
                        process: Process::Adopted(pid),
                    },
                );
                continue;
            }
            if let Err(err) = self.start(&spec) {
                let text = nvdra_kubelet_plugin::error::error_chain(&err);
                problems.push(format!("MPS daemon {id}: {text}"));
                // Keep it known so the supervisor retries.
                self.lock().insert(
                    id,
                    Daemon {
                        spec,
                        process: Process::Down {
                            retry_at: Instant::now() + BACKOFF_MIN,
                            failures: 1,
                        },
                    },
                );
            }
        }
        problems
    }

    /// One supervision round: restarts daemons that exited (when their
    /// back-off allows); returns how many were restarted.
    pub fn supervise(&self) -> usize {
        let mut restarted = 0;
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            let mut daemons = self.lock();
            let Some(daemon) = daemons.get_mut(&id) else {
                continue;
            };
            let failures = match &mut daemon.process {
                Process::Child(child) => match child.try_wait() {
                    Ok(Some(status)) => {
                        tracing::warn!(
                            daemon = %id,
                            status = %describe(status),
                            output = %tail(&self.dir(&id).join("log/daemon.out")),
                            "MPS control daemon exited; restarting it"
                        );
                        0
                    }
                    Ok(None) | Err(_) => continue,
                },
                Process::Adopted(pid) => {
                    if self.is_daemon(*pid, &id) {
                        continue;
                    }
                    tracing::warn!(daemon = %id, pid = *pid, "adopted MPS control daemon is gone; restarting it");
                    0
                }
                Process::Down { retry_at, failures } => {
                    if Instant::now() < *retry_at {
                        continue;
                    }
                    *failures
                }
            };
            let spec = daemon.spec.clone();
            daemons.remove(&id);
            drop(daemons);
            match self.start(&spec) {
                Ok(()) => restarted += 1,
                Err(err) => {
                    let failures = failures.saturating_add(1);
                    let backoff = BACKOFF_MIN
                        .saturating_mul(1 << failures.min(6))
                        .min(BACKOFF_MAX);
                    tracing::warn!(
                        daemon = %id,
                        error = %nvdra_kubelet_plugin::error::error_chain(&err),
                        retry_in = ?backoff,
                        "cannot restart the MPS control daemon"
                    );
                    self.lock().insert(
                        id,
                        Daemon {
                            spec,
                            process: Process::Down {
                                retry_at: Instant::now() + backoff,
                                failures,
                            },
                        },
                    );
                }
            }
        }
        restarted
    }

    /// The PIDs of the running daemons, by ID (for tests and diagnostics).
    pub fn running(&self) -> BTreeMap<String, u32> {
        self.lock()
            .iter()
            .filter_map(|(id, d)| match &d.process {
                Process::Child(child) => Some((id.clone(), child.id())),
                Process::Adopted(pid) => Some((id.clone(), *pid)),
                Process::Down { .. } => None,
            })
            .collect()
    }

    fn ids_on_disk(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.options.root) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }

    fn prepare_dir(&self, spec: &DaemonSpec) -> Result<(), Error> {
        let dir = self.dir(&spec.id);
        let fail = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::PrepareDir { path, source }
        };
        for sub in ["pipe", "log", "shm"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(fail(&path))?;
        }
        let json = serde_json::to_vec_pretty(spec).map_err(|err| Error::PrepareDir {
            path: dir.join("daemon.json"),
            source: std::io::Error::other(err),
        })?;
        write_durably(&dir.join("daemon.json"), &json).map_err(fail(&dir.join("daemon.json")))?;
        if self.options.private_shm {
            let shm = dir.join("shm");
            if !is_mount_point(&shm) {
                let size = shm_size(&self.options.proc_root);
                mount_tmpfs(&shm, &size).map_err(|source| Error::MountShm { path: shm, source })?;
            }
        }
        Ok(())
    }

    fn command(&self, spec: &DaemonSpec) -> Command {
        let dir = self.dir(&spec.id);
        let mut command = Command::new(&self.options.control);
        command
            .env("CUDA_MPS_PIPE_DIRECTORY", dir.join("pipe"))
            .env("CUDA_MPS_LOG_DIRECTORY", dir.join("log"))
            .env("CUDA_VISIBLE_DEVICES", spec.uuids.join(","))
            .env("LD_LIBRARY_PATH", &self.options.library_dir);
        command
    }

    /// Spawns the daemon and waits until it is ready.
    fn launch(&self, spec: &DaemonSpec) -> Result<Child, Error> {
        let dir = self.dir(&spec.id);
        let out_path = dir.join("log/daemon.out");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|source| Error::PrepareDir {
                path: out_path.clone(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| Error::PrepareDir {
            path: out_path.clone(),
            source,
        })?;
        let mut command = self.command(spec);
        command
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        if self.options.private_shm {
            on_private_shm(&mut command, &dir.join("shm")).map_err(|source| Error::Spawn {
                command: self.options.control.clone(),
                source,
            })?;
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            command: self.options.control.clone(),
            source,
        })?;
        let control = dir.join("pipe/control");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Exited {
                    id: spec.id.clone(),
                    status: describe(status),
                    output: self.output_of(&spec.id),
                });
            }
            if control.exists() {
                break;
            }
            if started.elapsed() >= self.options.start_timeout {
                kill_child(&mut child);
                return Err(Error::NotReady {
                    id: spec.id.clone(),
                    waited: self.options.start_timeout,
                    output: self.output_of(&spec.id),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Best effort: adoption after an agent restart needs it, nothing else does.
        if let Err(err) = write_durably(&dir.join("daemon.pid"), child.id().to_string().as_bytes())
        {
            tracing::warn!(daemon = %spec.id, error = %err, "cannot record the MPS daemon's PID");
        }
        Ok(child)
    }

    /// The daemon's own output, or the MPS control log when it wrote none.
    fn output_of(&self, id: &str) -> String {
        let log = self.dir(id).join("log");
        let out = tail(&log.join("daemon.out"));
        if out.is_empty() {
            tail(&log.join("control.log"))
        } else {
            out
        }
    }

    /// Sends `input` through the control client.
    fn client(&self, spec: &DaemonSpec, input: &str) -> Result<(ExitStatus, String), Error> {
        let spawn_error = |source| Error::Spawn {
            command: self.options.control.clone(),
            source,
        };
        let mut child = self
            .command(spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A client that exits early closes the pipe; its status says why.
            let _ = stdin.write_all(input.as_bytes());
        }
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < CLIENT_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) | Err(_) => {
                    kill_child(&mut child);
                    return Err(Error::Configure {
                        id: spec.id.clone(),
                        status: format!("no answer within {CLIENT_TIMEOUT:?}"),
                        output: String::new(),
                    });
                }
            }
        };
        let mut output = String::new();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        ]
        .into_iter()
        .flatten()
        {
            let mut pipe = pipe;
            let _ = pipe.read_to_string(&mut output);
        }
        Ok((status, output.trim().to_owned()))
    }

    fn configure(&self, spec: &DaemonSpec) -> Result<(), Error> {
        let commands = spec.commands();
        if commands.is_empty() {
            return Ok(());
        }
        let (status, output) = self.client(spec, &commands)?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Configure {
                id: spec.id.clone(),
                status: describe(status),
                output,
            })
        }
    }

    /// Stops a daemon's process (quit, then kill).
    fn terminate(&self, daemon: Daemon) {
        let id = daemon.spec.id.clone();
        match daemon.process {
            Process::Down { .. } => {}
            Process::Child(mut child) => {
                self.quit(&daemon.spec);
                let deadline = Instant::now() + STOP_GRACE;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        tracing::info!(daemon = %id, "MPS control daemon stopped");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                tracing::warn!(daemon = %id, "MPS control daemon ignored quit; killing it");
                kill_child(&mut child);
            }
            Process::Adopted(pid) => self.terminate_pid(&daemon.spec, pid),
        }
    }

    fn terminate_pid(&self, spec: &DaemonSpec, pid: u32) {
        self.quit(spec);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !self.is_daemon(pid, &spec.id) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            && let Err(err) = rustix::process::kill_process(pid, rustix::process::Signal::KILL)
        {
            tracing::warn!(daemon = %spec.id, error = %err, "cannot kill the MPS control daemon");
        }
    }

    fn quit(&self, spec: &DaemonSpec) {
        match self.client(spec, "quit\n") {
            Ok((status, _)) if status.success() => {}
            Ok((status, output)) => {
                tracing::debug!(daemon = %spec.id, status = %describe(status), %output, "quit refused");
            }
            Err(err) => tracing::debug!(daemon = %spec.id, error = %err, "quit failed"),
        }
    }

    /// Stops whatever runs from `id`'s directory and removes it.
    fn tear_down_on_disk(&self, id: &str) {
        if let Some(pid) = self.running_pid(id) {
            let spec = read_spec(&self.dir(id)).unwrap_or_else(|_| DaemonSpec {
                id: id.to_owned(),
                uuids: Vec::new(),
                active_thread_percentage: None,
                pinned_memory_limits: BTreeMap::new(),
            });
            self.terminate_pid(&spec, pid);
        }
        self.remove_dir(id);
    }

    fn remove_dir(&self, id: &str) {
        let dir = self.dir(id);
        let shm = dir.join("shm");
        if is_mount_point(&shm)
            && let Err(err) = rustix::mount::unmount(&shm, rustix::mount::UnmountFlags::DETACH)
        {
            tracing::warn!(path = %shm.display(), error = %err, "cannot unmount the MPS shm tmpfs; retried at the next start-up");
            return;
        }
        if let Err(err) = std::fs::remove_dir_all(&dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), error = %err, "cannot remove the MPS directory; retried at the next start-up");
        }
    }

    /// The recorded PID of `id`'s daemon if that process is still it.
    fn running_pid(&self, id: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir(id).join("daemon.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.is_daemon(pid, id).then_some(pid)
    }

    /// Whether `pid` is a live (not zombie) control daemon of `id`: its
    /// command is the control binary and its environment names `id`'s pipe
    /// directory, so a reused PID is never mistaken for it.
    fn is_daemon(&self, pid: u32, id: &str) -> bool {
        let proc = Path::new(OWN_PROC).join(pid.to_string());
        let Ok(stat) = std::fs::read_to_string(proc.join("stat")) else {
            return false;
        };
        // `pid (comm) S ...`: the state follows the last ')'.
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
        if zombie {
            return false;
        }
        let pipe = format!(
            "CUDA_MPS_PIPE_DIRECTORY={}",
            self.dir(id).join("pipe").display()
        );
        std::fs::read(proc.join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == pipe.as_bytes()))
    }
}

fn read_spec(dir: &Path) -> Result<DaemonSpec, std::io::Error> {
    let bytes = std::fs::read(dir.join("daemon.json"))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// Writes `bytes` to `path` through a temporary file, fsynced, then renamed.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The last [`OUTPUT_TAIL`] bytes of a file, trimmed; empty when unreadable.
fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

fn is_mount_point(dir: &Path) -> bool {
    let (Ok(meta), Some(parent)) = (std::fs::metadata(dir), dir.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev())
}

/// Half of `MemTotal`, as a tmpfs `size=` value; upstream's fallback when
/// unreadable.
fn shm_size(proc_root: &Path) -> String {
    std::fs::read_to_string(proc_root.join("meminfo"))
        .ok()
        .and_then(|info| {
            info.lines().find_map(|line| {
                let kib = line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
                kib.trim().parse::<u64>().ok()
            })
        })
        .map_or_else(
            || FALLBACK_SHM_SIZE.to_owned(),
            |kib| format!("{}k", kib / 2),
        )
}

fn mount_tmpfs(dir: &Path, size: &str) -> std::io::Result<()> {
    let data = CString::new(format!("size={size},mode=0777")).map_err(std::io::Error::other)?;
    rustix::mount::mount(
        "tmpfs",
        dir,
        "tmpfs",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        Some(data.as_c_str()),
    )
    .map_err(std::io::Error::from)
}

/// Makes `command` run in its own mount namespace with `shm` on `/dev/shm`.
#[allow(unsafe_code)]
fn on_private_shm(command: &mut Command, shm: &Path) -> std::io::Result<()> {
    use rustix::mount::{MountPropagationFlags, mount_bind, mount_change};
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    let shm = CString::new(shm.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let root = c"/";
    let dev_shm = c"/dev/shm";
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // raw system calls through rustix on C strings built before the fork (no
    // allocation, no locks), and unsharing the mount namespace (not the file
    // table) cannot invalidate any descriptor.
    unsafe {
        command.pre_exec(move || {
            unshare_unsafe(UnshareFlags::NEWNS)?;
            // Keep the bind below out of the agent's namespace.
            mount_change(
                root,
                MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
            )?;
            mount_bind(shm.as_c_str(), dev_shm)?;
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_hash_the_sorted_uuids() {
        let a = DaemonSpec::new("uid-1", &["GPU-b", "GPU-a"], None, BTreeMap::new());
        let b = DaemonSpec::new("uid-1", &["GPU-a", "GPU-b"], None, BTreeMap::new());
        assert_eq!(a.id, b.id);
        assert_eq!(a.uuids, ["GPU-a", "GPU-b"]);
        assert!(a.id.starts_with("uid-1-") && a.id.len() == "uid-1-".len() + 5);
        assert_eq!(DaemonSpec::claim_of(&a.id), "uid-1");
        let c = DaemonSpec::new("uid-1", &["GPU-a"], None, BTreeMap::new());
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn commands_carry_every_setting() {
        let spec = DaemonSpec::new(
            "u",
            &["GPU-a", "GPU-b"],
            Some(40),
            BTreeMap::from([
                ("GPU-a".to_owned(), "1024M".to_owned()),
                ("GPU-b".to_owned(), "2048M".to_owned()),
            ]),
        );
        assert_eq!(
            spec.commands(),
            "set_default_active_thread_percentage 40\n\
             set_default_device_pinned_mem_limit GPU-a 1024M\n\
             set_default_device_pinned_mem_limit GPU-b 2048M\n"
        );
        let none = DaemonSpec::new("u", &["GPU-a"], None, BTreeMap::new());
        assert_eq!(none.commands(), "");
    }

    #[test]
    fn shm_is_half_the_memory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(shm_size(dir.path()), FALLBACK_SHM_SIZE);
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       32768000 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        assert_eq!(shm_size(dir.path()), "16384000k");
    }
}

//! Groups of processes under one `nvdra-controlplane all` supervisor.
//!
//! A simulated node (kubelet emulator + agent) and the controller replicas
//! each run under their own supervisor, started with setsid in a directory
//! holding `logs/<name>.log` and `pids/<name>.pid`. The supervisor restarts
//! a process that exits (as a pod's container would be) and takes its
//! children down when it stops or dies (Pdeathsig). [`Supervisor::stop`]
//! also kills whatever else is left in the supervisor's session, but never
//! a process outside it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::tools::Tools;

/// One supervisor's directory.
#[derive(Debug, Clone)]
pub struct Supervisor {
    dir: PathBuf,
}

impl Supervisor {
    /// The supervisor whose `logs/` and `pids/` live in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// PID files.
    pub fn pids(&self) -> PathBuf {
        self.dir.join("pids")
    }

    /// Process logs (`<name>.log`, `all.log`).
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Starts the supervisor over `groups` (each `exec:NAME PROGRAM ARGS...`);
    /// returns once it has written its PID file. `what` names it in errors.
    pub fn start(&self, tools: &Tools, what: &str, groups: &[Vec<String>]) -> Result<()> {
        for dir in [self.pids(), self.logs()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let all_log = self.logs().join("all.log");
        let log = std::fs::File::create(&all_log)
            .with_context(|| format!("create {}", all_log.display()))?;
        let mut cmd = Command::new("setsid");
        cmd.arg(&tools.controlplane)
            .arg("all")
            .arg(format!("--log-dir={}", self.logs().display()))
            .arg(format!("--pid-dir={}", self.pids().display()))
            .arg("--restarts=50")
            .arg("--stop-timeout=15s");
        for group in groups {
            cmd.arg("--").args(group);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start the supervisor of {what}"))?;
        let pid_file = self.pids().join("all.pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pid_file.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the supervisor of {what} exited ({status}); see {}",
                    all_log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("the supervisor of {what} wrote no PID file");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The PID of process `name` (`all` is the supervisor), if running.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let text = std::fs::read_to_string(self.pids().join(format!("{name}.pid"))).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Sends `sig` to process `name`; the supervisor restarts it. Returns
    /// the PID signalled.
    pub fn kill(&self, name: &str, sig: &str) -> Result<u32> {
        let pid = self
            .pid(name)
            .with_context(|| format!("{name} is not running"))?;
        signal(pid, sig)?;
        Ok(pid)
    }

    /// SIGTERM to the supervisor (which stops its processes in reverse
    /// order), then SIGKILL to anything left in its session after `timeout`.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        let Some(sup) = self.pid("all") else {
            return Ok(());
        };
        let members = || session_members(sup);
        signal(sup, "TERM")?;
        let deadline = Instant::now() + timeout;
        while !members().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in members() {
            // Best effort: the process may exit between listing and signalling.
            let _ = signal(pid, "KILL");
        }
        std::thread::sleep(Duration::from_millis(200));
        let left = members();
        if !left.is_empty() {
            bail!(
                "processes of {} still running: {left:?}",
                self.dir.display()
            );
        }
        Ok(())
    }
}

/// Sends `signal` (e.g. `KILL`, `TERM`) to a running process.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

/// PIDs of live processes in session `sid` (the supervisor leads its
/// session). Zombies are not counted: an orphan's exit status waits for
/// init to reap it, which can take a while in a container.
fn session_members(sid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| matches!(session_of(*pid), Some((s, state)) if s == sid && state != 'Z'))
        .collect()
}

/// The session ID and state letter of `pid`, from `/proc/PID/stat` (fields
/// 6 and 3; the command name in field 2 may contain spaces, so fields are
/// counted after its `)`).
fn session_of(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")": state ppid pgrp session ...
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let session = fields.nth(2)?.parse().ok()?;
    Some((session, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_of_a_setsid_child_is_its_own_pid() {
        // The test process itself may sit in a session whose leader is
        // outside this PID namespace (session 0 in CI containers), so check
        // a child started the way the supervisor is: through setsid.
        let mut child = Command::new("setsid")
            .args(["sleep", "30"])
            .spawn()
            .expect("spawn setsid");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let seen = loop {
            let seen = session_of(pid);
            if matches!(seen, Some((s, _)) if s == pid) || Instant::now() > deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let members = session_members(pid);
        let _ = child.kill();
        let _ = child.wait();
        let (session, state) = seen.expect("stat readable");
        assert_eq!(session, pid);
        assert!("RSD".contains(state), "state {state}");
        assert_eq!(members, vec![pid]);
    }
}

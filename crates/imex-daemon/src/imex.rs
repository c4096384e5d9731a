//! The `nvidia-imex` child process: start, re-read signal, watchdog restart, stop.
//!
//! The process runs in the foreground (`DAEMONIZE=0`) with the daemon's stdio, so its log is
//! the pod's log. Signals go through the `kill` utility: the crate forbids unsafe code and a
//! child's PID is all `kill` needs. SIGUSR1 asks `nvidia-imex` to re-read its config and
//! re-resolve its peers' names after the hosts block changed; SIGTERM stops it.
//!
//! SIGUSR1's default action is to terminate, so a process signalled before it has installed
//! its handler dies. Peers join in bursts, milliseconds after `nvidia-imex` starts, which made
//! that a real restart (and a NotReady row) on a loaded node. [`Imex::handles_reload`] reads
//! the process's caught-signal mask so the caller can hold the signal until then.
//!
//! Failure modes: a start failure (binary missing: the base CDI spec was not applied) and an
//! unexpected exit are both reported to the caller, which retries after [`WATCHDOG_DELAY`].

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::Error;

/// Delay before restarting an `nvidia-imex` that exited or failed to start.
pub const WATCHDOG_DELAY: Duration = Duration::from_secs(1);

/// SIGUSR1's number on Linux (x86-64 and arm64).
const SIGUSR1: u32 = 10;

/// One supervised `nvidia-imex`.
#[derive(Debug)]
pub struct Imex {
    program: PathBuf,
    args: Vec<String>,
    child: Option<tokio::process::Child>,
}

impl Imex {
    /// `program -c <config>`; `config` is a container path, passed as is.
    pub fn new(program: PathBuf, config: &str) -> Self {
        Self {
            program,
            args: vec!["-c".to_owned(), config.to_owned()],
            child: None,
        }
    }

    /// Whether a process is running (as far as we know: an exit not yet reaped by
    /// [`Imex::exited`] still counts).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process; a running one is left alone.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::StartImex {
                program: self.program.clone(),
                source,
            })?;
        tracing::info!(program = %self.program.display(), pid = child.id(), "started nvidia-imex");
        self.child = Some(child);
        Ok(())
    }

    /// Resolves when the running process exits (never when none runs). Cancel-safe.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            return std::future::pending().await;
        };
        let status = child.wait().await;
        self.child = None;
        status
    }

    /// Whether the running process has a SIGUSR1 handler, so that the re-read signal cannot
    /// kill it. True when that cannot be told (no procfs, or a status without `SigCgt`): the
    /// signal then goes out as it would without the check. False when nothing runs.
    pub fn handles_reload(&self) -> bool {
        let Some(pid) = self.child.as_ref().and_then(tokio::process::Child::id) else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| catches(&status, SIGUSR1))
            .unwrap_or(true)
    }

    /// Sends `signal` (a `kill` name like `USR1`) to the running process, if any.
    pub async fn signal(&self, signal: &str) {
        let Some(pid) = self.child.as_ref().and_then(tokio::process::Child::id) else {
            return;
        };
        let result = tokio::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .await;
        match result {
            Ok(status) if status.success() => tracing::info!(pid, signal, "signalled nvidia-imex"),
            Ok(status) => tracing::warn!(pid, signal, %status, "kill failed"),
            Err(err) => tracing::warn!(pid, signal, error = %err, "run kill"),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if self.child.is_none() {
            return;
        }
        self.signal("TERM").await;
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let status = match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(?grace, "nvidia-imex ignored SIGTERM; killing it");
                let _ = child.start_kill();
                child.wait().await
            }
        };
        self.child = None;
        match status {
            Ok(status) => tracing::info!(%status, "nvidia-imex stopped"),
            Err(err) => tracing::warn!(error = %err, "wait for nvidia-imex"),
        }
    }
}

/// Whether a `/proc/<pid>/status` text says signal `signo` (1-based) has a handler: bit
/// `signo - 1` of the hexadecimal `SigCgt` mask. `None` without a readable mask.
pub fn catches(status: &str, signo: u32) -> Option<bool> {
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))?
        .trim();
    let mask = u64::from_str_radix(mask, 16).ok()?;
    let bit = signo.checked_sub(1).filter(|b| *b < 64)?;
    Some((mask >> bit) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readiness::tests::script;

    #[test]
    fn caught_signals_are_read_from_the_sigcgt_mask() {
        let status = "Name:\tnvidia-imex\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000200\n";
        assert_eq!(catches(status, SIGUSR1), Some(true));
        assert_eq!(catches(status, 15), Some(false));
        let none = "Name:\tnvidia-imex\nSigCgt:\t0000000000000000\n";
        assert_eq!(catches(none, SIGUSR1), Some(false));
        assert_eq!(catches("Name:\tx\n", SIGUSR1), None);
        assert_eq!(catches("SigCgt:\tzz\n", SIGUSR1), None);
        assert_eq!(catches(status, 0), None);
    }

    /// Waits up to 5 s for `path` to exist: fixed sleeps raced on a loaded machine.
    async fn appears(path: &std::path::Path) {
        for _ in 0..500 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_process_handles_reload_only_once_it_traps_usr1() {
        let dir = tempfile::tempdir().unwrap();
        let trapped = dir.path().join("trapped");
        // Sleeps before installing its trap, as a process busy starting up would.
        let script = script(
            dir.path(),
            &format!(
                "sleep 0.3\ntrap 'true' USR1\ntrap 'exit 0' TERM\ntouch {}\nwhile :; do sleep 0.05; done\n",
                trapped.display()
            ),
        );
        let mut imex = Imex::new(script, "/imexd/imexd.cfg");
        assert!(!imex.handles_reload());
        imex.start().unwrap();
        assert!(!imex.handles_reload());
        appears(&trapped).await;
        assert!(trapped.exists());
        assert!(imex.handles_reload());
        imex.stop(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn start_signal_and_stop_a_process() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("usr1");
        let trapped = dir.path().join("trapped");
        let script = script(
            dir.path(),
            &format!(
                "trap 'echo usr1 >> {}' USR1\ntrap 'exit 0' TERM\ntouch {}\nwhile :; do sleep 0.05; done\n",
                marker.display(),
                trapped.display()
            ),
        );
        let mut imex = Imex::new(script, "/imexd/imexd.cfg");
        assert!(!imex.running());
        imex.start().unwrap();
        assert!(imex.running());
        // Signal only once the shell has installed its traps (it says so), and
        // wait for the trap to run.
        appears(&trapped).await;
        imex.signal("USR1").await;
        appears(&marker).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "usr1\n");
        imex.stop(Duration::from_secs(5)).await;
        assert!(!imex.running());
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_start_and_exited_reports_an_exit() {
        let mut imex = Imex::new("/nonexistent/nvidia-imex".into(), "/c");
        let err = imex.start().unwrap_err();
        assert_eq!(err.to_string(), "start /nonexistent/nvidia-imex");
        let mut quick = Imex::new("/bin/false".into(), "/c");
        quick.start().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), quick.exited())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(1));
        assert!(!quick.running());
    }
}

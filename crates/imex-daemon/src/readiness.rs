//! The readiness a daemon publishes in its clique row, from its own checks of `nvidia-imex`.
//!
//! The daemon asks `nvidia-imex-ctl -q` itself, the question its pod's readiness probe asks,
//! instead of waiting to see its pod turn Ready: that took the probe's period, the kubelet's
//! status write and a watch event, each seconds long when many daemons start at once (the
//! controller still requires the pod to be Ready as well, so a daemon that died with a Ready
//! row does not keep its domain Ready).
//!
//! Cadence ([`next_delay`]): the first check [`FIRST_CHECK`] after `nvidia-imex` starts, then
//! while it is not ready with delays doubling up to [`NOT_READY_MAX`], and every
//! [`READY_RECHECK`] once it is (the probe keeps the faster watch on the pod). No check runs
//! while `nvidia-imex` is not running: its exit alone makes the row NotReady.
//!
//! [`Checker::owed`] is true from a start of `nvidia-imex` until the first answer after it;
//! the daemon holds its first apply that long, so joining and turning Ready are one write
//! instead of two on an object every daemon of the clique writes.

use std::path::PathBuf;
use std::time::Duration;

use nvdra_api::Readiness;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::check;
use crate::error::chain;

/// Delay from a start of `nvidia-imex` to the first check.
pub const FIRST_CHECK: Duration = Duration::from_millis(50);
/// The longest delay between checks while `nvidia-imex` is not ready.
pub const NOT_READY_MAX: Duration = Duration::from_secs(2);
/// Delay between checks while it is ready.
pub const READY_RECHECK: Duration = Duration::from_secs(5);
/// How long one check may take; it also bounds how long the first apply is held.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The delay before the next check after one that found `ready`, and the not-ready delay to
/// use after that one.
pub fn next_delay(ready: bool, not_ready_delay: Duration) -> (Duration, Duration) {
    if ready {
        (READY_RECHECK, FIRST_CHECK)
    } else {
        (
            not_ready_delay,
            (not_ready_delay * 2).clamp(FIRST_CHECK, NOT_READY_MAX),
        )
    }
}

/// Schedules and runs the checks.
#[derive(Debug)]
pub struct Checker {
    program: PathBuf,
    config: PathBuf,
    next: Option<Instant>,
    not_ready_delay: Duration,
    running: Option<JoinHandle<bool>>,
    owed: bool,
}

impl Checker {
    /// Checks with `program` (host path) and `config` (container path, passed as is).
    pub fn new(program: PathBuf, config: PathBuf) -> Self {
        Self {
            program,
            config,
            next: None,
            not_ready_delay: FIRST_CHECK,
            running: None,
            owed: false,
        }
    }

    /// Whether `nvidia-imex` was started and has not been checked since.
    pub fn owed(&self) -> bool {
        self.owed
    }

    /// `nvidia-imex` (re)started: check soon.
    pub fn started(&mut self) {
        self.cancel();
        self.owed = true;
        self.not_ready_delay = FIRST_CHECK;
        self.next = Some(Instant::now() + FIRST_CHECK);
    }

    /// `nvidia-imex` stopped: no checks until it starts again.
    pub fn stopped(&mut self) {
        self.cancel();
        self.owed = false;
        self.next = None;
    }

    fn cancel(&mut self) {
        if let Some(task) = self.running.take() {
            task.abort();
        }
    }

    /// When the next check is due (`None` while none is scheduled).
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// Starts the due check in the background.
    pub fn spawn(&mut self) {
        self.next = None;
        self.cancel();
        let (program, config) = (self.program.clone(), self.config.clone());
        self.running = Some(tokio::spawn(async move {
            match check::query(&program, &config, CHECK_TIMEOUT).await {
                Ok(_) => true,
                Err(err) => {
                    tracing::debug!(error = %chain(&err), "nvidia-imex not ready");
                    false
                }
            }
        }));
    }

    /// The answer of the running check (never while none runs), with the next one scheduled.
    /// Cancel-safe.
    pub async fn answer(&mut self) -> Readiness {
        let Some(task) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        // A check that panicked or was aborted found nothing ready.
        let ready = task.await.unwrap_or(false);
        self.running = None;
        self.owed = false;
        let (delay, not_ready_delay) = next_delay(ready, self.not_ready_delay);
        self.not_ready_delay = not_ready_delay;
        self.next = Some(Instant::now() + delay);
        if ready {
            Readiness::Ready
        } else {
            Readiness::NotReady
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn checks_back_off_while_not_ready_and_slow_down_once_ready() {
        let mut delay = FIRST_CHECK;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let (next, after) = next_delay(false, delay);
            seen.push(next.as_millis());
            delay = after;
        }
        assert_eq!(seen, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(next_delay(true, delay), (READY_RECHECK, FIRST_CHECK));
    }

    async fn due(checker: &Checker) {
        match checker.next() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// An executable `sh` script `dir/ctl` running `body` (also used by `crate::imex`'s tests).
    pub(crate) fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("ctl");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    #[tokio::test]
    async fn a_start_owes_a_check_whose_answer_schedules_the_next() {
        let dir = tempfile::tempdir().unwrap();
        // READY only for the exact query, and only once the marker exists.
        let marker = dir.path().join("up");
        let ctl = script(
            dir.path(),
            &format!(
                "[ \"$*\" = \"-c /imexd/imexd.cfg -q\" ] && [ -e {} ] && echo READY || echo NOT_READY",
                marker.display()
            ),
        );
        let mut checker = Checker::new(ctl, "/imexd/imexd.cfg".into());
        assert!(!checker.owed());
        // Nothing is due before a start.
        assert_eq!(checker.next(), None);
        checker.started();
        assert!(checker.owed());
        due(&checker).await;
        checker.spawn();
        assert_eq!(checker.answer().await, Readiness::NotReady);
        assert!(!checker.owed());
        std::fs::write(&marker, "").unwrap();
        due(&checker).await;
        checker.spawn();
        assert_eq!(checker.answer().await, Readiness::Ready);
        // Once stopped, nothing is due and nothing answers.
        checker.stopped();
        assert_eq!(checker.next(), None);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), checker.answer())
                .await
                .is_err()
        );
    }
}

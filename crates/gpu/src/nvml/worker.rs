//! A dedicated thread that owns a piece of state (the NVML handle) and runs
//! calls on it one at a time, while callers wait with a timeout.
//!
//! NVML can hang (e.g. `nvmlInit` after hours on some 570 drivers, or any
//! call on a GPU falling off the bus). A hung foreign call cannot be
//! cancelled, so it is confined to this thread: the caller stops waiting
//! after the timeout and gets [`Error::Timeout`]; while that call is still
//! running, new calls are refused at once with [`Error::Unresponsive`]
//! rather than queueing behind it; once it returns, the worker serves calls
//! again.
//!
//! Invariants: the state is created on, used on, and dropped on the worker
//! thread only (so it need not be `Send` or `Sync`); calls run in submission
//! order; a call that times out still runs to completion and its result is
//! discarded (callers of future mutating calls must reconcile). A panicking
//! call is caught; its caller gets [`Error::WorkerLost`] and the worker lives
//! on. Dropping the [`Worker`] ends the thread after the call in progress.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::Error;

type Job<S> = Box<dyn FnOnce(&S) + Send>;

/// Which call the worker is running and which callers gave up.
#[derive(Default)]
struct Progress {
    /// ID of the call running now, if any.
    running: Mutex<Option<u64>>,
    /// Highest call ID whose caller timed out (0: none).
    abandoned: AtomicU64,
}

impl Progress {
    fn set_running(&self, id: Option<u64>) {
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = id;
    }

    /// Whether the call running now is one a caller already gave up on (or
    /// older than one), i.e. the worker is stuck.
    fn stuck(&self) -> bool {
        let running = *self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.is_some_and(|id| id <= self.abandoned.load(Ordering::Acquire))
    }
}

/// A thread owning state of type `S` and serving calls on it.
pub(crate) struct Worker<S: 'static> {
    jobs: mpsc::Sender<(u64, Job<S>)>,
    next_id: AtomicU64,
    progress: Arc<Progress>,
    timeout: Duration,
}

impl<S: 'static> Worker<S> {
    /// Starts the thread `name`, builds the state on it with `init` (named
    /// `init_op` in errors) and waits at most `init_timeout` for that.
    /// Later calls wait at most `timeout`.
    pub(crate) fn spawn<I>(
        name: &str,
        init_op: &str,
        init_timeout: Duration,
        timeout: Duration,
        init: I,
    ) -> Result<Self, Error>
    where
        I: FnOnce() -> Result<S, Error> + Send + 'static,
    {
        let (jobs, job_rx) = mpsc::channel::<(u64, Job<S>)>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), Error>>(1);
        let progress = Arc::new(Progress::default());
        let worker_progress = Arc::clone(&progress);
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let state = match init() {
                    Ok(state) => state,
                    Err(e) => {
                        // The caller may have stopped waiting; nothing to do then.
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    // The caller timed out and dropped the worker: shut down.
                    return;
                }
                for (id, job) in job_rx {
                    worker_progress.set_running(Some(id));
                    job(&state);
                    worker_progress.set_running(None);
                }
            })
            .map_err(|source| Error::SpawnWorker { source })?;

        match ready_rx.recv_timeout(init_timeout) {
            Ok(Ok(())) => Ok(Self {
                jobs,
                next_id: AtomicU64::new(1),
                progress,
                timeout,
            }),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                op: init_op.to_owned(),
                after: init_timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::WorkerLost {
                op: init_op.to_owned(),
            }),
        }
    }

    /// Runs `f` on the worker thread and waits for its answer, at most the
    /// worker's timeout. `op` names the call in errors.
    pub(crate) fn call<R, F>(&self, op: impl Into<String>, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&S) -> Result<R, Error> + Send + 'static,
    {
        let op = op.into();
        if self.progress.stuck() {
            return Err(Error::Unresponsive { op });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = mpsc::sync_channel::<Result<R, Error>>(1);
        let job: Job<S> = Box::new(move |state: &S| {
            // A panic drops `reply_tx` unsent, which the caller sees as
            // `Disconnected`; the worker thread itself carries on.
            if let Ok(result) = catch_unwind(AssertUnwindSafe(|| f(state))) {
                // The caller may have timed out and gone; that is fine.
                let _ = reply_tx.send(result);
            }
        });
        if self.jobs.send((id, job)).is_err() {
            return Err(Error::WorkerLost { op });
        }
        match reply_rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                self.progress.abandoned.fetch_max(id, Ordering::AcqRel);
                Err(Error::Timeout {
                    op,
                    after: self.timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::WorkerLost { op }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const SHORT: Duration = Duration::from_millis(100);

    fn worker(timeout: Duration) -> Worker<u32> {
        Worker::spawn(
            "test-worker",
            "init",
            Duration::from_secs(5),
            timeout,
            || Ok(7),
        )
        .unwrap()
    }

    #[test]
    fn runs_calls_on_the_state() {
        let w = worker(Duration::from_secs(5));
        assert_eq!(w.call("double", |s| Ok(s * 2)).unwrap(), 14);
        let err = w
            .call("fail", |_| -> Result<(), Error> {
                Err(Error::UnknownGpu {
                    uuid: "GPU-x".into(),
                })
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "no GPU with UUID GPU-x");
    }

    #[test]
    fn hung_call_times_out_then_worker_recovers() {
        let w = worker(SHORT);
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();

        let t0 = Instant::now();
        let err = w
            .call("nvmlHang", move |_| {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
                Ok(())
            })
            .unwrap_err();
        let waited = t0.elapsed();
        assert_eq!(
            err.to_string(),
            "NVML call nvmlHang did not return within 100ms"
        );
        assert!(
            waited >= SHORT && waited < Duration::from_secs(5),
            "{waited:?}"
        );

        // While the hung call runs, new calls are refused without waiting.
        started_rx.recv().unwrap();
        let t0 = Instant::now();
        let err = w.call("nvmlNext", |s| Ok(*s)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "NVML is unresponsive (an earlier call is still running); nvmlNext was not attempted"
        );
        assert!(t0.elapsed() < SHORT, "refusal must not wait");

        // Once the hung call returns, the worker serves calls again.
        release_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match w.call("nvmlAfter", |s| Ok(*s)) {
                Ok(v) => {
                    assert_eq!(v, 7);
                    break;
                }
                Err(Error::Unresponsive { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("worker did not recover: {e}"),
            }
        }
    }

    #[test]
    fn calls_queued_behind_a_hung_call_are_refused_too() {
        let w = Arc::new(worker(SHORT));
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let hung = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                w.call("first", move |_| {
                    let _ = started_tx.send(());
                    let _ = release_rx.recv();
                    Ok(())
                })
            })
        };
        started_rx.recv().unwrap();
        // Queued behind the hung call: it times out itself, or is refused
        // if the first caller has already given up.
        let second = w.call("second", |s| Ok(*s)).unwrap_err();
        assert!(
            matches!(second, Error::Timeout { .. } | Error::Unresponsive { .. }),
            "{second}"
        );
        // Both callers have given up now; the running call is stuck.
        assert!(matches!(hung.join().unwrap(), Err(Error::Timeout { .. })));
        assert!(matches!(
            w.call("third", |s| Ok(*s)),
            Err(Error::Unresponsive { .. })
        ));
        release_tx.send(()).unwrap();
    }

    #[test]
    fn panicking_call_is_reported_and_worker_survives() {
        let w = worker(Duration::from_secs(5));
        let err = w
            .call("nvmlBoom", |_| -> Result<(), Error> { panic!("boom") })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the NVML worker dropped nvmlBoom without an answer"
        );
        assert_eq!(w.call("after", |s| Ok(*s + 1)).unwrap(), 8);
    }

    #[test]
    fn init_errors_and_hangs_are_reported() {
        let failed = Worker::<u32>::spawn("w", "nvmlInit", SHORT, SHORT, || {
            Err(Error::UnknownGpu {
                uuid: "none".into(),
            })
        });
        assert_eq!(
            failed.err().map(|e| e.to_string()),
            Some("no GPU with UUID none".into())
        );

        let (release_tx, release_rx) = mpsc::channel::<()>();
        let hung = Worker::<u32>::spawn("w", "nvmlInit", SHORT, SHORT, move || {
            let _ = release_rx.recv();
            Ok(1)
        });
        assert_eq!(
            hung.err().map(|e| e.to_string()),
            Some("NVML call nvmlInit did not return within 100ms".into())
        );
        release_tx.send(()).unwrap();
    }
}

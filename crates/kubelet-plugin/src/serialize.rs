//! Serialization of Prepare and Unprepare calls.
//!
//! By default every driver call runs under one in-process async mutex. In
//! rolling-update mode two agent processes serve the same node, so the
//! [`Serializer`] additionally holds an exclusive lock on
//! `<plugin data dir>/serialize.lock` for the duration of the call.
//!
//! Invariants:
//! - The async mutex is taken first, so at most one task per process waits
//!   for the file lock and at most one blocking thread is parked on it.
//! - The file lock is waited for with a blocking `File::lock` on a blocking
//!   thread (no try-lock polling), so hand-over between processes is as fast
//!   as the kernel wakes the waiter.
//! - The file lock is released exactly once, when its guard drops — including
//!   when the waiting future was cancelled after the kernel granted the lock
//!   (the guard travels through a channel and drops wherever it ends up).
//! - Claim lookups happen before [`Serializer::lock`], so API latency never
//!   extends the critical section.
//!
//! Failure modes: opening the lock file fails plugin start
//! ([`Error::OpenLockFile`]); failing to take the lock fails the whole gRPC
//! call ([`Error::AcquireLock`], reported as `UNAVAILABLE`, the kubelet
//! retries).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use crate::error::Error;

/// File name of the cross-process lock in the plugin data directory.
pub const LOCK_FILE_NAME: &str = "serialize.lock";

/// Serializes driver calls; cheap to clone (all clones share one lock).
#[derive(Debug, Clone)]
pub struct Serializer {
    mutex: Arc<Mutex<()>>,
    file: Option<Arc<LockFile>>,
}

#[derive(Debug)]
struct LockFile {
    path: PathBuf,
    file: File,
}

/// Held while a driver call runs; dropping it releases the locks.
#[derive(Debug)]
pub struct SerialGuard {
    // Field order is drop order: the file lock goes before the mutex, so the
    // next in-process waiter never blocks on a lock we still hold.
    _file: Option<FileGuard>,
    _mutex: OwnedMutexGuard<()>,
}

#[derive(Debug)]
struct FileGuard(Arc<LockFile>);

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Err(err) = self.0.file.unlock() {
            // Closing the descriptor would release it too, but the file stays
            // open for the next call; nothing better to do than shout.
            tracing::error!(path = %self.0.path.display(), error = %err, "failed to release lock");
        }
    }
}

impl Serializer {
    /// An in-process mutex only.
    pub fn in_process() -> Self {
        Self {
            mutex: Arc::new(Mutex::new(())),
            file: None,
        }
    }

    /// An in-process mutex plus an exclusive lock on
    /// `<dir>/serialize.lock`, which is created (mode 0600) if missing.
    pub fn with_lock_file(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(LOCK_FILE_NAME);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| Error::OpenLockFile {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            mutex: Arc::new(Mutex::new(())),
            file: Some(Arc::new(LockFile { path, file })),
        })
    }

    /// The cross-process lock file, if any.
    pub fn lock_file_path(&self) -> Option<&Path> {
        self.file.as_deref().map(|lock| lock.path.as_path())
    }

    /// Waits for exclusive access.
    pub async fn lock(&self) -> Result<SerialGuard, Error> {
        let mutex = Arc::clone(&self.mutex).lock_owned().await;
        let file = match &self.file {
            None => None,
            Some(lock) => Some(lock_file(Arc::clone(lock)).await?),
        };
        Ok(SerialGuard {
            _file: file,
            _mutex: mutex,
        })
    }
}

async fn lock_file(lock: Arc<LockFile>) -> Result<FileGuard, Error> {
    let path = lock.path.clone();
    let (tx, rx) = oneshot::channel();
    // Detached on purpose: if our caller is cancelled, the thread still
    // finishes waiting and the guard it sends is dropped with the channel,
    // which unlocks the file.
    let _detached = tokio::task::spawn_blocking(move || {
        let result = lock.file.lock().map(|()| FileGuard(lock));
        // A send error means nobody waits any more; the returned value (and
        // with it the guard) is dropped right here.
        let _ = tx.send(result);
    });
    match rx.await {
        Ok(Ok(guard)) => Ok(guard),
        Ok(Err(source)) => Err(Error::AcquireLock { path, source }),
        Err(_closed) => Err(Error::AcquireLock {
            path,
            source: std::io::Error::other("lock thread ended without an answer"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    async fn assert_exclusive(a: Serializer, b: Serializer) {
        let inside = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for serializer in [a.clone(), b.clone(), a, b] {
            let inside = Arc::clone(&inside);
            let overlaps = Arc::clone(&overlaps);
            tasks.push(tokio::spawn(async move {
                for _ in 0..3 {
                    let _guard = serializer.lock().await.unwrap();
                    if inside.swap(true, Ordering::SeqCst) {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.store(false, Ordering::SeqCst);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn in_process_mutex_is_exclusive() {
        let serializer = Serializer::in_process();
        assert_exclusive(serializer.clone(), serializer).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_lock_files_on_one_path_are_exclusive() {
        // Two Serializers open the file separately, like two processes do,
        // so only the file lock keeps them apart.
        let dir = tempfile::Builder::new()
            .prefix("sl")
            .tempdir_in("/tmp")
            .unwrap();
        let a = Serializer::with_lock_file(dir.path()).unwrap();
        let b = Serializer::with_lock_file(dir.path()).unwrap();
        assert_eq!(
            a.lock_file_path(),
            Some(dir.path().join("serialize.lock").as_path())
        );
        assert_exclusive(a, b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_waiter_does_not_leak_the_lock() {
        let dir = tempfile::Builder::new()
            .prefix("sl")
            .tempdir_in("/tmp")
            .unwrap();
        let a = Serializer::with_lock_file(dir.path()).unwrap();
        let b = Serializer::with_lock_file(dir.path()).unwrap();
        let held = a.lock().await.unwrap();
        // b waits on the kernel lock; give up on it while it waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.lock()).await;
        assert!(waiting.is_err(), "b got the lock while a held it");
        drop(held);
        // The abandoned blocking waiter now gets the lock and must release
        // it; otherwise this times out.
        let again = tokio::time::timeout(Duration::from_secs(5), a.lock()).await;
        assert!(again.is_ok(), "lock leaked by a cancelled waiter");
    }

    #[test]
    fn open_lock_file_error_names_path() {
        let err = Serializer::with_lock_file(Path::new("/nonexistent/dir")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to open lock file /nonexistent/dir/serialize.lock"
        );
    }
}

//! The driver's in-memory checkpoint and its mirror on disk.
//!
//! Job: hold the [`CheckpointState`] every Prepare and Unprepare works on, persist it with one
//! atomic write per batch, keep `nvidia_dra_prepared_devices` and the checkpoint-write metrics
//! current, and notice when the file changed under us.
//!
//! Invariants:
//! - Memory is the truth; the file catches up. A write that fails leaves the ledger *dirty*, and
//!   [`Ledger::sync`] (run whenever the driver takes the ledger) writes again before anything
//!   else happens, so no call succeeds while the file lags behind what kubelet was told.
//! - The file's identity (device, inode, size, mtime, ctime) is remembered after every read or
//!   write. A different identity means another process wrote it (the other agent pod during a
//!   rolling update, which serializes with us through the plugin's cross-process lock), and
//!   the state is reloaded before use, so we never overwrite a claim we did not see.
//!
//! Failure modes: load and write errors are returned as [`checkpoint::Error`]; a corrupt file
//! found on reload is moved aside by the store and replaced by an empty state (logged loudly;
//! at start-up the agent also reports it as an Event).

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use crate::checkpoint::{self, CheckpointState, CheckpointStore, LoadOutcome, Loaded};
use crate::metrics::Metrics;

/// Identity of the checkpoint file as we last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

/// The checkpoint state plus what is needed to persist and re-read it.
#[derive(Debug)]
pub(crate) struct Ledger {
    state: CheckpointState,
    store: CheckpointStore,
    boot_id: String,
    metrics: Metrics,
    /// `None` when no file exists (or it could not be examined).
    stamp: Option<FileStamp>,
    /// Memory holds changes the file does not.
    dirty: bool,
    /// Memory cannot be trusted (a panic interrupted a batch): re-read the file.
    reload: bool,
}

impl Ledger {
    /// A ledger over the freshly loaded `loaded`; writes it back if the load changed it.
    pub(crate) fn new(
        loaded: Loaded,
        store: CheckpointStore,
        boot_id: String,
        metrics: Metrics,
    ) -> Result<Self, checkpoint::Error> {
        let needs_write = loaded.needs_write();
        let mut ledger = Self {
            state: loaded.state,
            stamp: None,
            store,
            boot_id,
            metrics,
            dirty: needs_write,
            reload: false,
        };
        ledger.stamp = ledger.current_stamp();
        if needs_write {
            ledger.persist()?;
        }
        ledger.publish_gauge();
        Ok(ledger)
    }

    pub(crate) fn state(&self) -> &CheckpointState {
        &self.state
    }

    pub(crate) fn state_mut(&mut self) -> &mut CheckpointState {
        &mut self.state
    }

    /// Marks the in-memory state untrustworthy; the next [`Ledger::sync`] re-reads the file.
    pub(crate) fn invalidate(&mut self) {
        self.reload = true;
    }

    /// Makes memory and file agree before a batch: re-reads the file if memory is untrusted
    /// or another process wrote it, writes it if an earlier write failed.
    pub(crate) fn sync(&mut self) -> Result<(), checkpoint::Error> {
        if self.reload {
            self.reload_from_disk()?;
            self.reload = false;
            return Ok(());
        }
        if self.dirty {
            return self.persist();
        }
        if self.current_stamp() != self.stamp {
            tracing::info!(
                path = %self.store.path().display(),
                "checkpoint changed on disk (another agent instance?); reloading it"
            );
            self.reload_from_disk()?;
        }
        Ok(())
    }

    /// Writes the state atomically, updates the metrics, and remembers the file's identity.
    /// On failure the ledger stays dirty.
    pub(crate) fn persist(&mut self) -> Result<(), checkpoint::Error> {
        self.dirty = true;
        let started = Instant::now();
        let written = self.store.write(&self.state);
        self.metrics
            .observe_checkpoint_write(written.is_ok(), started.elapsed());
        match written {
            Ok(()) => {
                self.dirty = false;
                self.stamp = self.current_stamp();
                self.publish_gauge();
                Ok(())
            }
            Err(err) => {
                // The rename may have happened before the failure; the stamp is stale either
                // way, and the retry rewrites the file from memory.
                self.stamp = None;
                Err(err)
            }
        }
    }

    fn reload_from_disk(&mut self) -> Result<(), checkpoint::Error> {
        let loaded = self.store.load(&self.boot_id)?;
        match &loaded.outcome {
            LoadOutcome::Corrupt { aside_path, reason } => tracing::error!(
                aside = %aside_path.display(),
                %reason,
                "checkpoint found corrupt on reload; moved aside, continuing with an empty state"
            ),
            LoadOutcome::BootIdChanged {
                previous_boot_id, ..
            } => tracing::warn!(
                %previous_boot_id,
                "checkpoint on disk is from another boot; its claims were discarded"
            ),
            LoadOutcome::Missing | LoadOutcome::Valid(_) => {}
        }
        let needs_write = loaded.needs_write();
        self.state = loaded.state;
        self.dirty = false;
        self.stamp = self.current_stamp();
        if needs_write {
            self.persist()?;
        }
        self.publish_gauge();
        Ok(())
    }

    fn publish_gauge(&self) {
        self.metrics.set_prepared_devices(
            &self
                .state
                .prepared_device_counts_for(self.metrics.device_types()),
        );
    }

    fn current_stamp(&self) -> Option<FileStamp> {
        let meta = std::fs::metadata(self.store.path()).ok()?;
        Some(FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        })
    }
}

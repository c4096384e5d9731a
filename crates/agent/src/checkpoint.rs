//! The node-local checkpoint: which ResourceClaims this plugin has prepared, with what.
//!
//! Prepare and Unprepare must be idempotent and must survive plugin restarts, upgrades,
//! downgrades and node reboots. This module owns the durable record that makes that possible:
//! `checkpoint.json` in the plugin data dir. It is pure data plus file I/O; the agent wires
//! locking (`pu.lock`), Kubernetes Events, logging and metrics around it.
//!
//! # Layout
//!
//! ```json
//! {"kind": "NvdraCheckpoint", "version": 1, "writer": "0.1.0",
//!  "checksum": "sha256:<hex>", "data": {"nodeBootID": "...", "claims": {"<uid>": {...}}}}
//! ```
//!
//! The checksum covers the exact bytes of `data` as they appear in the file, never a
//! re-serialisation of what this build understood. A newer nvdra may add fields anywhere and an
//! older one still verifies the file (the upstream Go driver hashes re-marshalled structs, so
//! any field it adds breaks every older reader: issue #1080).
//!
//! # Invariants
//!
//! - A claim is `PrepareStarted` before any hardware is touched and `PrepareCompleted` only
//!   after everything it needs exists ([`CheckpointState::begin_prepare`],
//!   [`CheckpointState::complete_prepare`]). A completed claim is never prepared twice; a
//!   started one is rolled back before it is redone.
//! - A device (pool + name) is held by at most one claim unless a side has admin access or both
//!   sides hold distinct shares of it; claims in states this build does not know keep their
//!   devices.
//! - The file on disk is always a complete checkpoint: writes go to a temp file that is fsynced,
//!   renamed over the old file, and the directory is fsynced ([`CheckpointStore::write`]).
//! - Everything a newer version wrote that this build does not understand is kept, not
//!   dropped: unknown fields (data, claim, group and device level), unknown claim states,
//!   unknown device types.
//!
//! # Failure modes
//!
//! - Corrupt, truncated or foreign file: moved aside to `checkpoint.json.corrupt-<unix-ts>`
//!   (never overwriting an earlier copy) and reported as [`LoadOutcome::Corrupt`] with an empty
//!   state; the agent emits a Node Event and rebuilds. Loading never panics.
//! - Node rebooted (boot ID changed): every claim is discarded, because nothing prepared
//!   survives a reboot ([`LoadOutcome::BootIdChanged`]).
//! - I/O errors other than "file missing" are returned as [`Error`]; an unreadable checkpoint is
//!   never silently treated as empty, because that would hand out devices still in use.
//! - The store assumes a single writer per data dir; the agent's node lock guarantees it.

mod state;
mod store;
mod upstream;

use std::path::PathBuf;

pub use state::{
    AllocatedDevice, BeginOutcome, CD_DEVICE_TYPE_LABELS, CheckpointState, ClaimEntry, ClaimRef,
    ClaimState, DEVICE_TYPE_LABELS, DeviceInfo, PreparedChannel, PreparedDaemon, PreparedDevice,
    PreparedGpu, PreparedGroup, PreparedMig, PreparedVfio,
};
pub use store::{
    CHECKSUM_ALGORITHM, CheckpointStore, ChecksumCheck, FILE_NAME, FileReport, KIND, LoadOutcome,
    Loaded, SCHEMA_VERSION, Source, WRITER, checksum,
};

/// Failures of checkpoint I/O and of the claim bookkeeping on top of it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint exists but could not be read.
    #[error("failed to read checkpoint {}", path.display())]
    ReadCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state could not be serialised (cannot happen for well-formed states).
    #[error("failed to encode checkpoint")]
    EncodeCheckpoint(#[source] serde_json::Error),
    /// Creating, writing or fsyncing the temp file failed.
    #[error("failed to write checkpoint temp file {}", path.display())]
    WriteCheckpoint {
        /// The temp file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Renaming the temp file over the checkpoint failed.
    #[error("failed to replace checkpoint {}", path.display())]
    ReplaceCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Fsyncing the data directory failed, so the rename may not be durable.
    #[error("failed to sync directory {}", path.display())]
    SyncDir {
        /// The data directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A corrupt checkpoint could not be moved aside.
    #[error("failed to move corrupt checkpoint {} aside to {}", path.display(), aside.display())]
    MoveAside {
        /// The corrupt checkpoint.
        path: PathBuf,
        /// Where it was to go.
        aside: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A requested device is already held by another claim.
    #[error(
        "device {device} requested by claim {claim} is already in use by claim {holder} \
         ({holder_state})"
    )]
    DeviceInUse {
        /// `<pool>/<device>`.
        device: String,
        /// The claim being prepared, as `<namespace>/<name> (<uid>)`.
        claim: String,
        /// The claim holding the device, as `<namespace>/<name> (<uid>)`.
        holder: String,
        /// The holder's checkpoint state.
        holder_state: String,
    },
    /// `complete_prepare` for a claim that is not `PrepareStarted`.
    #[error("cannot complete prepare of claim {uid}: its checkpoint state is {state}")]
    CompletePrepare {
        /// The claim UID.
        uid: String,
        /// Its state (`absent` when it is not in the checkpoint).
        state: String,
    },
}

//! Reading and atomically writing `checkpoint.json`.
//!
//! Job: turn whatever is on disk into a usable [`CheckpointState`] plus a report of what was
//! found ([`Loaded`]), and persist a state so that a crash at any point leaves either the old
//! or the new file, complete.
//!
//! Invariants: the checksum is computed over the exact bytes of the `data` member as they sit
//! in the file (read back through [`RawValue`]), so it never depends on how this build would
//! serialise the state. One serialisation per write. Files are created with mode 0600.
//!
//! Failure modes: a file that cannot be trusted (invalid JSON, truncated, wrong checksum, wrong
//! `kind`, unparsable `data`) is renamed to `checkpoint.json.corrupt-<unix-ts>[-<n>]` and an
//! empty state is returned with [`LoadOutcome::Corrupt`]. I/O errors are returned, never
//! mapped to an empty state. A temp file left by an interrupted write is ignored on load and
//! replaced by the next write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::state::{CheckpointState, ClaimRef};
use super::{Error, upstream};

/// File name inside the plugin data dir (same as the Go driver's).
pub const FILE_NAME: &str = "checkpoint.json";
/// The `kind` of an nvdra checkpoint.
pub const KIND: &str = "NvdraCheckpoint";
/// Schema version this build writes. Bump it when the meaning (not just the set) of fields
/// changes; readers accept every version and read what they understand.
pub const SCHEMA_VERSION: u32 = 1;
/// The `writer` stamp: the nvdra version that wrote the file.
pub const WRITER: &str = env!("CARGO_PKG_VERSION");
/// Checksum algorithm this build writes and verifies.
pub const CHECKSUM_ALGORITHM: &str = "sha256";

const TEMP_SUFFIX: &str = ".tmp";
const ASIDE_INFIX: &str = ".corrupt-";
/// Bound on `-<n>` suffixes tried for an aside copy; reaching it means something else is
/// creating files in the data dir.
const MAX_ASIDE_ATTEMPTS: u32 = 1000;

/// The checksum stamp (`sha256:<hex>`) of a serialised `data` member.
pub fn checksum(data: &str) -> String {
    let digest = Sha256::digest(data.as_bytes());
    let mut out = String::with_capacity(CHECKSUM_ALGORITHM.len() + 1 + 2 * digest.len());
    out.push_str(CHECKSUM_ALGORITHM);
    out.push(':');
    for byte in digest.iter() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The checkpoint file of one plugin data dir.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    path: PathBuf,
    temp_path: PathBuf,
}

/// The result of [`CheckpointStore::load`]: always a usable state, plus what was found.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The state to continue with; its boot ID is the current one.
    pub state: CheckpointState,
    /// What was on disk and what was done about it.
    pub outcome: LoadOutcome,
}

impl Loaded {
    /// Whether `state` differs from the file (boot ID stamped, claims discarded, format
    /// migrated, file moved aside), so the agent should write it back.
    pub fn needs_write(&self) -> bool {
        match &self.outcome {
            LoadOutcome::Missing => false,
            LoadOutcome::Valid(file) => {
                file.boot_id_stamped
                    || match &file.source {
                        Source::Nvdra { schema_version, .. } => *schema_version < SCHEMA_VERSION,
                        Source::UpstreamGo { .. } => true,
                    }
            }
            LoadOutcome::BootIdChanged { .. } | LoadOutcome::Corrupt { .. } => true,
        }
    }
}

/// What [`CheckpointStore::load`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome {
    /// No checkpoint: a fresh node or data dir.
    Missing,
    /// The file was read; its claims are in the state.
    Valid(FileReport),
    /// The node rebooted since the file was written: nothing prepared survives a reboot, so
    /// every claim was discarded and will be prepared again.
    BootIdChanged {
        /// What the file was.
        file: FileReport,
        /// The boot ID recorded in the file.
        previous_boot_id: String,
        /// The claims that were dropped.
        discarded: Vec<ClaimRef>,
    },
    /// The file could not be trusted. It was moved to `aside_path` and the state is empty; the
    /// agent reports this as a Node Event and rebuilds.
    Corrupt {
        /// Where the bad file now is.
        aside_path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
}

/// Facts about a checkpoint that was read.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    /// Who wrote it.
    pub source: Source,
    /// Whether its integrity was checked.
    pub checksum: ChecksumCheck,
    /// The file had no boot ID (older writer); the current one was stamped into the state.
    pub boot_id_stamped: bool,
}

/// The writer of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// nvdra's own format.
    Nvdra {
        /// `version` in the file (0 when absent).
        schema_version: u32,
        /// `writer` in the file.
        writer: String,
    },
    /// The Go driver's layout (`v1`/`v2`), read once on upgrade in place.
    UpstreamGo {
        /// Its top-level `version`, when present.
        version: Option<String>,
    },
}

impl Source {
    /// The file was written with a newer schema than this build's: fields this build does
    /// not know were kept where possible; the agent should log it.
    pub fn is_newer(&self) -> bool {
        matches!(self, Self::Nvdra { schema_version, .. } if *schema_version > SCHEMA_VERSION)
    }
}

/// Whether a checkpoint's checksum was verified.
#[derive(Debug, Clone, PartialEq)]
pub enum ChecksumCheck {
    /// It matched the `data` bytes.
    Verified,
    /// It could not be checked; the reason says why (unknown algorithm, Go layout).
    Unverified(String),
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    kind: &'a str,
    version: u32,
    writer: &'a str,
    checksum: &'a str,
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(default)]
    kind: Option<String>,
    // `Value`, not typed: the Go layout has a string `version` and a numeric `checksum`.
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    writer: Option<String>,
    #[serde(default)]
    checksum: Option<Value>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    v1: Option<&'a RawValue>,
    #[serde(default, borrow)]
    v2: Option<&'a RawValue>,
}

/// A file that is not a checkpoint we can trust, and why.
struct Corrupt(String);

impl CheckpointStore {
    /// The checkpoint in plugin data dir `dir` (which must exist before a write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let path = dir.join(FILE_NAME);
        let temp_path = dir.join(format!("{FILE_NAME}{TEMP_SUFFIX}"));
        Self {
            dir,
            path,
            temp_path,
        }
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the checkpoint for the boot `current_boot_id`.
    ///
    /// A missing file gives an empty state; a file without a boot ID gets the current one; a
    /// different boot ID discards every claim; an untrustworthy file is moved aside. An empty
    /// `current_boot_id` (unknown) disables the boot check and keeps the recorded one.
    pub fn load(&self, current_boot_id: &str) -> Result<Loaded, Error> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Ok(Loaded {
                    state: CheckpointState::new(current_boot_id),
                    outcome: LoadOutcome::Missing,
                });
            }
            Err(source) => {
                return Err(Error::ReadCheckpoint {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let (mut state, file) = match parse(&bytes) {
            Ok(parsed) => parsed,
            Err(Corrupt(reason)) => {
                let aside_path = self.move_aside()?;
                return Ok(Loaded {
                    state: CheckpointState::new(current_boot_id),
                    outcome: LoadOutcome::Corrupt { aside_path, reason },
                });
            }
        };
        let recorded = state.node_boot_id().to_owned();
        let outcome = if current_boot_id.is_empty() || recorded == current_boot_id {
            LoadOutcome::Valid(file)
        } else if recorded.is_empty() {
            state.set_node_boot_id(current_boot_id.to_owned());
            LoadOutcome::Valid(FileReport {
                boot_id_stamped: true,
                ..file
            })
        } else {
            let discarded = state.discard_claims();
            state.set_node_boot_id(current_boot_id.to_owned());
            LoadOutcome::BootIdChanged {
                file,
                previous_boot_id: recorded,
                discarded,
            }
        };
        Ok(Loaded { state, outcome })
    }

    /// Persists `state` atomically: temp file (0600) → write → fsync → rename → fsync dir.
    ///
    /// A temp file left by an interrupted earlier write is removed first.
    pub fn write(&self, state: &CheckpointState) -> Result<(), Error> {
        let data = serde_json::value::to_raw_value(state).map_err(Error::EncodeCheckpoint)?;
        let checksum = checksum(data.get());
        let envelope = EnvelopeOut {
            kind: KIND,
            version: SCHEMA_VERSION,
            writer: WRITER,
            checksum: &checksum,
            data: &data,
        };
        let bytes = serde_json::to_vec(&envelope).map_err(Error::EncodeCheckpoint)?;

        let write_error = |source| Error::WriteCheckpoint {
            path: self.temp_path.clone(),
            source,
        };
        match fs::remove_file(&self.temp_path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(write_error(err)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.temp_path)
            .map_err(write_error)?;
        file.write_all(&bytes).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        drop(file);
        fs::rename(&self.temp_path, &self.path).map_err(|source| Error::ReplaceCheckpoint {
            path: self.path.clone(),
            source,
        })?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), Error> {
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| Error::SyncDir {
                path: self.dir.clone(),
                source,
            })
    }

    /// Renames the checkpoint to the first free `checkpoint.json.corrupt-<ts>[-<n>]`.
    fn move_aside(&self) -> Result<PathBuf, Error> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let base = format!("{FILE_NAME}{ASIDE_INFIX}{ts}");
        let mut aside = self.dir.join(&base);
        for n in 1..=MAX_ASIDE_ATTEMPTS {
            // rename(2) replaces silently, so an earlier copy (e.g. from a crash loop within
            // one second) must be skipped explicitly; the node lock rules out a racing writer.
            match fs::symlink_metadata(&aside) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    fs::rename(&self.path, &aside).map_err(|source| Error::MoveAside {
                        path: self.path.clone(),
                        aside: aside.clone(),
                        source,
                    })?;
                    self.sync_dir()?;
                    return Ok(aside);
                }
                _ => aside = self.dir.join(format!("{base}-{n}")),
            }
        }
        Err(Error::MoveAside {
            path: self.path.clone(),
            aside,
            source: io::Error::new(io::ErrorKind::AlreadyExists, "every aside name is taken"),
        })
    }
}

/// Parses a checkpoint file of either layout.
fn parse(bytes: &[u8]) -> Result<(CheckpointState, FileReport), Corrupt> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(Corrupt("file is empty".to_owned())),
        // serde would also accept a JSON array as a struct; a checkpoint is an object.
        Some(b'{') => {}
        Some(_) => return Err(Corrupt("not a JSON object".to_owned())),
    }
    let envelope: EnvelopeIn<'_> = serde_json::from_slice(bytes)
        .map_err(|err| Corrupt(format!("cannot parse checkpoint: {err}")))?;
    match envelope.kind.as_deref() {
        Some(KIND) => parse_nvdra(envelope),
        None if envelope.v1.is_some() || envelope.v2.is_some() => {
            let state = upstream::import(envelope.v1, envelope.v2).map_err(Corrupt)?;
            let version = envelope.version.and_then(|v| v.as_str().map(str::to_owned));
            Ok((
                state,
                FileReport {
                    source: Source::UpstreamGo { version },
                    checksum: ChecksumCheck::Unverified(
                        "the Go driver's checksum is not reproducible outside Go".to_owned(),
                    ),
                    boot_id_stamped: false,
                },
            ))
        }
        None => Err(Corrupt("not a checkpoint: no kind".to_owned())),
        Some(other) => Err(Corrupt(format!("not a checkpoint: kind is {other:?}"))),
    }
}

fn parse_nvdra(envelope: EnvelopeIn<'_>) -> Result<(CheckpointState, FileReport), Corrupt> {
    let data = envelope.data.ok_or_else(|| Corrupt("no data".to_owned()))?;
    let recorded = match envelope.checksum {
        Some(Value::String(recorded)) => recorded,
        Some(other) => return Err(Corrupt(format!("malformed checksum {other}"))),
        None => return Err(Corrupt("no checksum".to_owned())),
    };
    let checksum = match recorded.split_once(':') {
        Some((CHECKSUM_ALGORITHM, _)) => {
            let computed = checksum(data.get());
            if computed != recorded {
                return Err(Corrupt(format!(
                    "checksum mismatch: file says {recorded}, data hashes to {computed}"
                )));
            }
            ChecksumCheck::Verified
        }
        // A newer writer may switch algorithms; the structure is still validated below.
        Some((algorithm, _)) => {
            ChecksumCheck::Unverified(format!("unknown checksum algorithm {algorithm:?}"))
        }
        None => return Err(Corrupt(format!("malformed checksum {recorded:?}"))),
    };
    let state: CheckpointState = serde_json::from_str(data.get())
        .map_err(|err| Corrupt(format!("cannot parse data: {err}")))?;
    Ok((
        state,
        FileReport {
            source: Source::Nvdra {
                schema_version: envelope
                    .version
                    .and_then(|v| v.as_u64())
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0),
                writer: envelope.writer.unwrap_or_default(),
            },
            checksum,
            boot_id_stamped: false,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_sha256_of_the_exact_bytes() {
        assert_eq!(
            checksum("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(checksum("{\"a\":1}"), checksum("{\"a\": 1}"));
    }
}

//! Errors of the kubelet-plugin servers, and per-claim errors.
//!
//! [`Error`] is what [`crate::KubeletPlugin::run`] and the builder return:
//! variants are named for the operation that failed and carry the path or
//! task involved. Each variant shows its cause either in `Display` or via
//! `#[source]`, never both, so an error chain prints every cause once.
//!
//! [`ClaimError`] is the failure of one claim inside a Prepare or Unprepare
//! call. It never becomes a gRPC status: its `Display` text goes into the
//! claim's `error` field of the response and the kubelet retries that claim.
//! Only whole-call failures (the serialization lock, a panicking driver)
//! become a [`tonic::Status`], through the one `From<Error>` conversion here.

use std::path::PathBuf;

use crate::driver::ClaimRef;

/// A boxed error from a caller-supplied component (claim reader, task).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Failure of the plugin's own machinery: configuration, sockets, servers,
/// locks and supervised tasks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder was given an unusable configuration.
    #[error("invalid kubelet plugin configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },

    /// A socket path does not fit into `sockaddr_un`.
    #[error(
        "socket path {} is {len} bytes long; Unix socket paths must be shorter than {limit} bytes",
        path.display()
    )]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The exclusive limit.
        limit: usize,
    },

    /// Creating the plugin data directory failed.
    #[error("failed to create directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Removing a leftover socket file before binding failed.
    #[error("failed to remove stale socket {}", path.display())]
    RemoveStaleSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Binding a Unix socket failed.
    #[error("failed to bind socket {}", path.display())]
    BindSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Restricting a freshly bound socket to mode 0600 failed.
    #[error("failed to set mode 0600 on socket {}", path.display())]
    ChmodSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Reading the identity (device and inode) of a bound socket failed.
    #[error("failed to stat socket {}", path.display())]
    StatSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Opening the cross-process serialization lock file failed.
    #[error("failed to open lock file {}", path.display())]
    OpenLockFile {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Taking the cross-process serialization lock failed.
    #[error("failed to acquire lock {}", path.display())]
    AcquireLock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// A gRPC server stopped with an error.
    #[error("{server} gRPC server failed")]
    Serve {
        /// Which server (`dra` or `registration`).
        server: &'static str,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },

    /// Binding the health HTTP endpoint failed.
    #[error("failed to bind health endpoint {addr}")]
    BindHealth {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// The health HTTP server stopped with an error.
    #[error("health HTTP server failed")]
    ServeHealth {
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Installing a signal handler failed.
    #[error("failed to install {signal} handler")]
    InstallSignalHandler {
        /// The signal.
        signal: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// A supervised task returned although it should run until shutdown.
    #[error("task {task} stopped unexpectedly")]
    TaskExited {
        /// The task's name.
        task: String,
    },

    /// A supervised task failed.
    #[error("task {task} failed")]
    TaskFailed {
        /// The task's name.
        task: String,
        /// Why.
        #[source]
        source: BoxError,
    },

    /// A supervised task or a request worker panicked.
    #[error("task {task} panicked")]
    TaskPanicked {
        /// The task's name.
        task: String,
    },
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = error_chain(&err);
        match err {
            // The lock holder finishes eventually; the kubelet retries.
            Error::AcquireLock { .. } => tonic::Status::unavailable(message),
            _ => tonic::Status::internal(message),
        }
    }
}

/// Renders an error and all of its sources as `outer: inner: innermost`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why one claim of a Prepare or Unprepare call failed.
///
/// The `Display` text is sent to the kubelet verbatim in the claim's `error`
/// field, so every variant names the claim it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// The kubelet sent a claim reference with an empty field.
    #[error("invalid claim reference {claim}: namespace, name and uid are required")]
    InvalidReference {
        /// The reference as received.
        claim: ClaimRef,
    },

    /// The ResourceClaim does not exist (any more).
    #[error("claim {claim} not found")]
    NotFound {
        /// The claim.
        claim: ClaimRef,
    },

    /// Reading the ResourceClaim from the API server failed.
    #[error("reading claim {claim} failed: {message}")]
    Read {
        /// The claim.
        claim: ClaimRef,
        /// The reader's error chain.
        message: String,
    },

    /// Reading the ResourceClaim did not finish in time.
    #[error("reading claim {claim} timed out after {seconds} s")]
    ReadTimeout {
        /// The claim.
        claim: ClaimRef,
        /// The timeout.
        seconds: u64,
    },

    /// A claim with the same namespace and name but another UID exists: the
    /// claim the kubelet means was deleted and recreated.
    #[error("claim {namespace}/{name} was replaced: UID {actual}, expected {expected}")]
    Replaced {
        /// Namespace of the claim.
        namespace: String,
        /// Name of the claim.
        name: String,
        /// UID the API server returned.
        actual: String,
        /// UID the kubelet sent.
        expected: String,
    },

    /// The claim has no `status.allocation`.
    #[error("claim {claim} is not allocated")]
    NotAllocated {
        /// The claim.
        claim: ClaimRef,
    },

    /// The allocation holds no device of this driver.
    #[error("claim {claim} has no devices allocated by driver {driver}")]
    NothingForDriver {
        /// The claim.
        claim: ClaimRef,
        /// This driver's name.
        driver: String,
    },

    /// An allocation config entry is not opaque, so it cannot be attributed
    /// to a driver and this driver cannot honour it.
    #[error(
        "claim {claim}: allocation config #{index} is not an opaque configuration; only opaque configurations are supported"
    )]
    NonOpaqueConfig {
        /// The claim.
        claim: ClaimRef,
        /// Index into `status.allocation.devices.config`.
        index: usize,
    },

    /// An allocation config entry has a source other than `FromClass` or
    /// `FromClaim`, so its precedence is unknown.
    #[error("claim {claim}: allocation config #{index} has unknown source {found:?}")]
    UnknownConfigSource {
        /// The claim.
        claim: ClaimRef,
        /// Index into `status.allocation.devices.config`.
        index: usize,
        /// The source as found.
        found: String,
    },

    /// The driver returned no result for a claim it was asked about.
    #[error("driver returned no result for claim {claim}")]
    MissingResult {
        /// The claim.
        claim: ClaimRef,
    },

    /// The driver failed the claim; the text is the driver's.
    #[error("{message}")]
    Driver {
        /// The driver's message.
        message: String,
    },
}

impl ClaimError {
    /// A driver-side failure with the given message.
    pub fn driver(message: impl Into<String>) -> Self {
        Self::Driver {
            message: message.into(),
        }
    }

    /// A driver-side failure rendered from an error and its whole source chain.
    pub fn from_error(err: &(dyn std::error::Error + 'static)) -> Self {
        Self::driver(error_chain(err))
    }
}

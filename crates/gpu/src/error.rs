//! The crate's one error type.
//!
//! Every variant is named for the operation that failed and carries what an
//! operator needs to act on it (a path, an NVML call name, a field). A variant
//! either prints its cause in `Display` or exposes it through `#[source]`,
//! never both, so error chains printed by the agent do not repeat themselves.

use std::path::PathBuf;
use std::time::Duration;

pub use nvml_wrapper::error::NvmlError;

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A fake profile file could not be read.
    #[error("cannot read fake profile {path}")]
    LoadProfile {
        /// The profile file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },

    /// A fake profile is not well-formed YAML for the profile schema.
    #[error("cannot parse fake profile {origin}")]
    ParseProfile {
        /// Where the profile came from (a path, or a name for in-memory text).
        origin: String,
        /// The YAML error, with line and column.
        #[source]
        source: Box<serde_saphyr::Error>,
    },

    /// A fake profile parsed but describes an impossible node.
    #[error("invalid fake profile {origin}: {field}: {reason}")]
    InvalidProfile {
        /// Where the profile came from.
        origin: String,
        /// The offending field, e.g. `gpus[2].mig_devices[0].placement_start`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A driver file was not found under the driver root.
    #[error("cannot find {file} under driver root {root} (searched {searched})")]
    DiscoverDriverRoot {
        /// The driver root that was searched.
        root: PathBuf,
        /// The file looked for, e.g. `libnvidia-ml.so.1`.
        file: &'static str,
        /// The directories searched, comma separated.
        searched: String,
    },

    /// The NVML worker thread could not be started.
    #[error("cannot start the NVML worker thread")]
    SpawnWorker {
        /// Why the thread could not be spawned.
        #[source]
        source: std::io::Error,
    },

    /// Loading or initialising the NVML library failed.
    #[error("cannot initialise NVML from {library}")]
    NvmlInit {
        /// The library that was loaded.
        library: PathBuf,
        /// NVML's answer.
        #[source]
        source: NvmlError,
    },

    /// An NVML call returned an error.
    #[error("NVML call {op} failed")]
    NvmlCall {
        /// The NVML operation, e.g. `nvmlDeviceGetUUID(gpu 3)`.
        op: String,
        /// NVML's answer.
        #[source]
        source: NvmlError,
    },

    /// NVML answered, but with data this crate cannot represent.
    #[error("NVML call {op} returned unusable data: {reason}")]
    NvmlData {
        /// The NVML operation.
        op: String,
        /// What is wrong with the answer.
        reason: String,
    },

    /// An NVML call did not return in time. The call may still be running on
    /// the worker thread; later calls fail with [`Error::Unresponsive`] until
    /// it returns.
    #[error("NVML call {op} did not return within {after:?}")]
    Timeout {
        /// The operation that timed out.
        op: String,
        /// The time waited.
        after: Duration,
    },

    /// An earlier NVML call is still stuck on the worker thread, so this one
    /// was not attempted.
    #[error("NVML is unresponsive (an earlier call is still running); {op} was not attempted")]
    Unresponsive {
        /// The operation that was refused.
        op: String,
    },

    /// The NVML worker dropped a call without answering (the call panicked or
    /// the worker is gone).
    #[error("the NVML worker dropped {op} without an answer")]
    WorkerLost {
        /// The operation that was lost.
        op: String,
    },

    /// A MIG change was refused by the driver (or the fake model of it).
    #[error("cannot {op} on GPU {gpu}: {refusal}")]
    MigRefused {
        /// What was attempted, e.g. `create MIG device 1g.10gb at placement 3`.
        op: String,
        /// The GPU's UUID.
        gpu: String,
        /// Why it was refused.
        refusal: crate::mig::MigRefusal,
    },
    /// `nvidia-smi` could not be started or waited for.
    #[error("cannot run {command}")]
    RunNvidiaSmi {
        /// The command line.
        command: String,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// `nvidia-smi` ran and failed.
    #[error("{command} exited with {status}: {output}")]
    NvidiaSmiFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (stderr, else stdout).
        output: String,
    },
    /// The driver root has no `nvidia-smi`, which time-slicing needs.
    #[error("no nvidia-smi under driver root {root}; time-slicing needs it")]
    NoNvidiaSmi {
        /// The driver root.
        root: PathBuf,
    },
    /// The backend has no GPU with this UUID.
    #[error("no GPU with UUID {uuid}")]
    UnknownGpu {
        /// The UUID asked for.
        uuid: String,
    },

    /// A MIG capability file under procfs could not be read.
    #[error("cannot read MIG capability file {path}")]
    ReadCapability {
        /// The capability file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },

    /// A MIG capability file has no usable `DeviceFileMinor:` line.
    #[error("MIG capability file {path} has no valid `DeviceFileMinor: <n>` line")]
    ParseCapability {
        /// The capability file.
        path: PathBuf,
    },

    /// The PCIe root complex of a device could not be determined from sysfs.
    #[error("cannot resolve the PCIe root of {pci_bus_id} from {sysfs_path}: {reason}")]
    ResolvePcieRoot {
        /// The device's PCI bus ID.
        pci_bus_id: String,
        /// The sysfs link inspected.
        sysfs_path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A procfs file that exists could not be read.
    #[error("cannot read {path}")]
    ReadProcFile {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },

    /// A procfs file holds a value that cannot be used.
    #[error("cannot parse {path}: {reason}")]
    ParseProcFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Two GPUs of one node report different NVLink cliques.
    #[error("GPUs disagree on the NVLink clique: {first_gpu} is in {first}, {gpu} in {clique}")]
    CliqueMismatch {
        /// The first GPU reporting a clique.
        first_gpu: String,
        /// Its clique.
        first: String,
        /// The GPU that disagrees.
        gpu: String,
        /// Its clique.
        clique: String,
    },

    /// A device name does not follow the naming scheme.
    #[error("invalid device name {name:?}: {reason}")]
    ParseDeviceName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A PCI bus ID is not in the sysfs form, so it is not used in a path or
    /// written to a kernel file.
    #[error("invalid PCI bus ID {pci_bus_id:?}: expected dddd:bb:dd.f in lower-case hex")]
    InvalidPciBusId {
        /// The ID given.
        pci_bus_id: String,
    },

    /// A sysfs file or link could not be read.
    #[error("cannot read {path}")]
    ReadSysfs {
        /// The file or link.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },

    /// A sysfs file or link holds a value that cannot be used.
    #[error("cannot parse {path}: {reason}")]
    ParseSysfs {
        /// The file or link.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The kernel rejected a write to a sysfs or procfs file (or the file is
    /// not there: kernel files are never created).
    #[error("cannot write {value:?} to {path}")]
    WriteKernelFile {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },

    /// The host cannot pass devices through to VMs.
    #[error("host is not ready for VFIO passthrough: {problems}")]
    VfioHostNotReady {
        /// Each missing piece with its fix, `; ` separated.
        problems: String,
    },

    /// A PCI device must not be moved to another driver as it is; nothing
    /// was changed.
    #[error("refusing to bind {pci_bus_id} to {target}: {reason}")]
    RebindRefused {
        /// The device's PCI bus ID.
        pci_bus_id: String,
        /// The driver it was to be bound to.
        target: String,
        /// Why not, and what would allow it.
        reason: String,
    },

    /// Moving a PCI device to another driver failed part-way. The steps
    /// taken were undone as far as possible; `state` says where the device
    /// was left.
    #[error("cannot bind {pci_bus_id} to {target}: {failure}; {state}")]
    RebindPciDevice {
        /// The device's PCI bus ID.
        pci_bus_id: String,
        /// The driver it was to be bound to.
        target: String,
        /// The step that failed, or why the move did not finish (boxed:
        /// keeps every `Result` of this crate small).
        failure: Box<str>,
        /// The driver the device was left on, and any failure to undo.
        state: Box<str>,
        /// The failed operation, where one failed.
        #[source]
        source: Option<Box<Error>>,
    },

    /// A line of health-event text (the mock NVML's events file) is not an
    /// event.
    #[error("invalid health event {line:?}: {reason}")]
    ParseHealthEvent {
        /// The line.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Builds an [`Error::NvmlCall`] for `op`; the closure form keeps call
    /// sites short (`.map_err(Error::nvml("nvmlDeviceGetUUID"))`).
    pub(crate) fn nvml(op: impl Into<String>) -> impl FnOnce(NvmlError) -> Self {
        let op = op.into();
        move |source| Self::NvmlCall { op, source }
    }
}

//! The crate's one error type; each variant names the operation that failed.

use std::path::PathBuf;

/// What went wrong while playing the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing the plugins_registry directory failed.
    #[error("read plugin registry dir {}", dir.display())]
    ReadRegistryDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No gRPC connection to a plugin socket within the connect timeout.
    #[error("connect to {}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A gRPC call failed with a status.
    #[error("{method} on {}", socket.display())]
    Call {
        /// The RPC, e.g. `GetInfo`.
        method: &'static str,
        /// The socket called.
        socket: PathBuf,
        /// The status returned.
        #[source]
        source: tonic::Status,
    },
    /// A gRPC call did not answer in time.
    #[error("{method} on {} timed out after {timeout:?}", socket.display())]
    CallTimedOut {
        /// The RPC.
        method: &'static str,
        /// The socket called.
        socket: PathBuf,
        /// The limit that passed.
        timeout: std::time::Duration,
    },
    /// The plugin is not a DRA plugin.
    #[error("plugin {driver:?} has type {found:?}, want \"DRAPlugin\"")]
    WrongPluginType {
        /// The name the plugin reported.
        driver: String,
        /// The type it reported.
        found: String,
    },
    /// None of the plugin's advertised services is one the kubelet speaks.
    #[error(
        "plugin {driver:?} supports none of v1.DRAPlugin, v1beta1.DRAPlugin (offered: {offered:?})"
    )]
    NoSupportedVersion {
        /// The plugin's driver name.
        driver: String,
        /// What it advertised.
        offered: Vec<String>,
    },
    /// Listing the CDI spec directory failed.
    #[error("read CDI dir {}", dir.display())]
    ReadCdiDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading one CDI spec file failed.
    #[error("read CDI spec {}", path.display())]
    ReadCdiSpec {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A CDI spec file is not valid YAML/JSON of the expected shape.
    #[error("parse CDI spec {}: {message}", path.display())]
    ParseCdiSpec {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// A CDI device ID is not of the form `vendor/class=name`.
    #[error("invalid CDI device ID {id:?}: want vendor/class=name")]
    InvalidCdiId {
        /// The ID.
        id: String,
    },
    /// Some CDI device IDs name no device in any spec file.
    #[error("CDI device IDs resolve to no device in {}: {}", dir.display(), ids.join(", "))]
    UnresolvedCdiIds {
        /// The CDI directory searched.
        dir: PathBuf,
        /// The IDs that resolved to nothing, in the order given.
        ids: Vec<String>,
    },
    /// Reading or interpreting the kubeconfig failed.
    #[error("load kubeconfig {}", path.display())]
    LoadKubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Building the API client from the kubeconfig failed.
    #[error("build API client")]
    BuildClient(#[source] kube::Error),
    /// Creating, reading or patching this node's Node object failed.
    #[error("{action} Node {node}{hint}")]
    Node {
        /// What was attempted, e.g. `patch labels of`.
        action: &'static str,
        /// The node.
        node: String,
        /// Advice for the errors NodeRestriction causes; empty otherwise.
        hint: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Creating or renewing the node's Lease failed.
    #[error("renew Lease kube-node-lease/{node}")]
    RenewLease {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Deleting this node's ResourceSlices at start failed.
    #[error("delete ResourceSlices of node {node}")]
    DeleteSlices {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Reading a ResourceClaim failed.
    #[error("get ResourceClaim {namespace}/{name}")]
    GetClaim {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Writing a pod's status failed.
    #[error("patch status of Pod {namespace}/{name}")]
    PatchPodStatus {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The final delete of a terminated pod failed.
    #[error("delete Pod {namespace}/{name}")]
    DeletePod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Recording an Event failed.
    #[error("create Event for Pod {namespace}/{name}")]
    CreateEvent {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Creating a directory under the node root failed.
    #[error("create dir {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing or removing a file under the node root failed.
    #[error("write {}", path.display())]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Installing a signal handler failed.
    #[error("install signal handler")]
    Signal(#[source] std::io::Error),
}

//! The controller's one error type.
//!
//! Variants are named for the operation that failed; each shows its cause through `#[source]`
//! only. [`Error::metric_label`] gives the bounded `error` label of
//! `nvdra_controller_reconcile_errors_total` (the variant name, never object names).

use std::net::SocketAddr;

/// Why a reconcile, the leader election or start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ComputeDomain has no UID (only possible for objects not read from the API server).
    #[error("ComputeDomain {namespace}/{name} has no UID")]
    MissingUid {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Adding the ComputeDomain finalizer failed.
    #[error("add the finalizer")]
    AddFinalizer(#[source] kube::Error),
    /// Removing the ComputeDomain finalizer failed.
    #[error("remove the finalizer")]
    RemoveFinalizer(#[source] kube::Error),
    /// Server-side apply of the daemon DaemonSet failed.
    #[error("apply the daemon DaemonSet")]
    ApplyDaemonSet(#[source] kube::Error),
    /// Server-side apply of the daemon ResourceClaimTemplate failed.
    #[error("apply the daemon ResourceClaimTemplate")]
    ApplyDaemonClaimTemplate(#[source] kube::Error),
    /// Server-side apply of the workload ResourceClaimTemplate failed.
    #[error("apply the workload ResourceClaimTemplate")]
    ApplyWorkloadClaimTemplate(#[source] kube::Error),
    /// Server-side apply of the ComputeDomain status failed.
    #[error("apply the ComputeDomain status")]
    ApplyStatus(#[source] kube::Error),
    /// Deleting the daemon DaemonSet failed.
    #[error("delete the daemon DaemonSet")]
    DeleteDaemonSet(#[source] kube::Error),
    /// Deleting the daemon ResourceClaimTemplate failed.
    #[error("delete the daemon ResourceClaimTemplate")]
    DeleteDaemonClaimTemplate(#[source] kube::Error),
    /// Reading or deleting the workload ResourceClaimTemplate failed.
    #[error("delete the workload ResourceClaimTemplate")]
    DeleteWorkloadClaimTemplate(#[source] kube::Error),
    /// Listing Nodes failed.
    #[error("list Nodes")]
    ListNodes(#[source] kube::Error),
    /// Removing a per-domain label from a Node failed.
    #[error("remove ComputeDomain labels from Node {node}")]
    UnlabelNode {
        /// The Node.
        node: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Reading the leader-election Lease failed.
    #[error("read the leader-election Lease")]
    ReadLease(#[source] kube::Error),
    /// Creating or updating the leader-election Lease failed.
    #[error("write the leader-election Lease")]
    WriteLease(#[source] kube::Error),
    /// Flags that contradict each other.
    #[error("invalid flags: {0}")]
    InvalidFlags(String),
    /// Listing ComputeDomains from the API server failed.
    #[error("list ComputeDomains")]
    ListDomains(#[source] kube::Error),
    /// One leader-election round did not finish within the renew deadline.
    #[error("leader-election round took longer than {after:?}")]
    LeaseTimeout {
        /// The renew deadline.
        after: std::time::Duration,
    },
    /// Leadership was lost (renewal failed past the renew deadline or another holder took it).
    #[error("lost the leader-election Lease {lease}")]
    LeaseLost {
        /// `namespace/name` of the Lease.
        lease: String,
    },
    /// The controller's watch streams ended.
    #[error("the controller stopped")]
    ControllerStopped,
    /// No usable API client configuration.
    #[error("configure the Kubernetes client")]
    KubeConfig(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Logging could not be set up.
    #[error("set up logging")]
    InitLogging(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The metrics registry rejected a metric.
    #[error("register metrics")]
    RegisterMetrics(#[source] prometheus::Error),
    /// Signal handlers could not be installed.
    #[error("install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The HTTP endpoint could not be bound or failed.
    #[error("serve HTTP on {addr}")]
    ServeHttp {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Every value [`metric_label`](Self::metric_label) can return, for pre-creating series.
    pub const RECONCILE_LABELS: &'static [&'static str] = &[
        "MissingUid",
        "AddFinalizer",
        "RemoveFinalizer",
        "ApplyDaemonSet",
        "ApplyDaemonClaimTemplate",
        "ApplyWorkloadClaimTemplate",
        "ApplyStatus",
        "DeleteDaemonSet",
        "DeleteDaemonClaimTemplate",
        "DeleteWorkloadClaimTemplate",
        "ListNodes",
        "ListDomains",
        "UnlabelNode",
    ];

    /// The variant name: a bounded metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingUid { .. } => "MissingUid",
            Self::AddFinalizer(_) => "AddFinalizer",
            Self::RemoveFinalizer(_) => "RemoveFinalizer",
            Self::ApplyDaemonSet(_) => "ApplyDaemonSet",
            Self::ApplyDaemonClaimTemplate(_) => "ApplyDaemonClaimTemplate",
            Self::ApplyWorkloadClaimTemplate(_) => "ApplyWorkloadClaimTemplate",
            Self::ApplyStatus(_) => "ApplyStatus",
            Self::DeleteDaemonSet(_) => "DeleteDaemonSet",
            Self::DeleteDaemonClaimTemplate(_) => "DeleteDaemonClaimTemplate",
            Self::DeleteWorkloadClaimTemplate(_) => "DeleteWorkloadClaimTemplate",
            Self::ListNodes(_) => "ListNodes",
            Self::ListDomains(_) => "ListDomains",
            Self::UnlabelNode { .. } => "UnlabelNode",
            Self::ReadLease(_) => "ReadLease",
            Self::WriteLease(_) => "WriteLease",
            Self::LeaseTimeout { .. } => "LeaseTimeout",
            Self::InvalidFlags(_) => "InvalidFlags",
            Self::LeaseLost { .. } => "LeaseLost",
            Self::ControllerStopped => "ControllerStopped",
            Self::KubeConfig(_) => "KubeConfig",
            Self::InitLogging(_) => "InitLogging",
            Self::RegisterMetrics(_) => "RegisterMetrics",
            Self::Signals(_) => "Signals",
            Self::ServeHttp { .. } => "ServeHttp",
        }
    }

    /// The message with its cause chain, for logs and Event notes. An API error shows only
    /// the server's message (kube's own `Display` repeats the whole status in `Debug` form).
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            if let Some(kube::Error::Api(status)) = cause.downcast_ref::<kube::Error>() {
                text.push_str(&status.message);
                break;
            }
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn chain_and_labels() {
        let err = Error::UnlabelNode {
            node: "n1".into(),
            source: kube::Error::Api(
                kube::core::Status::failure("nodes \"n1\" is forbidden", "Forbidden")
                    .with_code(403)
                    .boxed(),
            ),
        };
        assert_eq!(err.metric_label(), "UnlabelNode");
        assert_eq!(
            err.chain(),
            "remove ComputeDomain labels from Node n1: nodes \"n1\" is forbidden"
        );
        assert!(Error::RECONCILE_LABELS.contains(&err.metric_label()));
    }
}

//! nvdra's local cluster and the machinery of its end-to-end suite.
//!
//! A local cluster is a real Kubernetes control plane (built from the
//! upstream Go modules by `e2e/controlplane/build.sh`) plus simulated GPU
//! nodes: per node a kubelet emulator (`nvdra-kubelet-emulator`) and an
//! `nvdra-agent` on a fake GPU profile, both real processes talking to the
//! real API server with the identities a real cluster gives them (the node's
//! kubelet certificate; the chart's service account). Nothing here fakes an
//! API: the scheduler allocates, the controllers create claims from
//! templates, RBAC and the Node authorizer judge every request.
//!
//! [`cluster::Cluster`] starts and stops one; `nvdra-local-cluster` (the
//! binary) and `tests/e2e.rs` (the suite) use it. The harness is test
//! infrastructure, so its errors are `anyhow` chains meant for a person.

pub mod chart;
pub mod cluster;
pub mod controlplane;
pub mod local_cluster;
pub mod node;
pub mod supervisor;
pub mod tools;
pub mod wait;

pub use cluster::{Cluster, ClusterSpec};
pub use node::NodeSpec;
pub use tools::Tools;

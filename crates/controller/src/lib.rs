//! `nvdra-controller`: the ComputeDomain controller of the `compute-domain.nvidia.com` DRA
//! driver.
//!
//! Per ComputeDomain it keeps a finalizer, the daemon ResourceClaimTemplate and the IMEX daemon
//! DaemonSet in the driver namespace, and the workload ResourceClaimTemplate (the user's name,
//! the domain's namespace, owned by the domain); it derives `status` from the domain's
//! ComputeDomainCliques and daemon pods; and it cleans up after deleted domains, including the
//! per-domain Node labels.
//!
//! - [`args`]: flags (upstream names and environment variables).
//! - [`daemonset`], [`resourceclaimtemplate`]: desired children, pure.
//! - [`clique`]: status aggregation, pure.
//! - [`computedomain`]: the reconcile.
//! - [`cleanup`], [`node`]: deletion and orphan sweep.
//! - [`leader`]: Lease-based leader election.
//! - [`metrics`], [`context`], [`error`], [`run`]: plumbing.

pub mod args;
pub mod cleanup;
pub mod clique;
pub mod computedomain;
pub mod context;
pub mod daemonset;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod resourceclaimtemplate;
pub mod run;

#[cfg(test)]
mod fixtures;

pub use error::Error;

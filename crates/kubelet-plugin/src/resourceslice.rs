//! ResourceSlice publishing for a driver's node-local pool: the Rust counterpart of Go's
//! `k8s.io/dynamic-resource-allocation/resourceslice` controller, restricted to the one pool a
//! kubelet plugin owns. It knows nothing about any particular driver's devices.
//!
//! # Job
//!
//! The driver hands over its devices and shared counters ([`NodeResources`]); this module owns
//! every ResourceSlice with `spec.driver=<driver>` and `spec.nodeName=<node>` and keeps them equal
//! to that input, whatever else happens to them (the kubelet deletes all of a node's slices when
//! it starts; people edit objects).
//!
//! # Layout of the pool
//!
//! - Pool name = node name; `spec.nodeName` set; ownerReference to the Node (`v1`/`Node`, name,
//!   UID read once from `GET nodes/<name>`, `controller: true`) so the garbage collector removes
//!   the slices together with the Node.
//! - Slice names are deterministic: `<node>-<driver with '.' → '-'>-<index as 5 hex digits>`,
//!   shortened with a hash when longer than a DNS subdomain allows ([`slice_name`]). The
//!   scheduler allocates first-fit in name order, so **input order is priority**: earlier
//!   devices land in lower-indexed slices.
//! - At least one slice, possibly empty (an empty pool still says "driver is up").
//! - ≤ 128 devices per slice, ≤ 64 when any device in it has taints or consumes counters.
//! - Shared counters follow a [`CounterLayout`] chosen from the API server version: 1.35+ keeps
//!   them in counters-only slices placed first; 1.34 requires them in the same slice as the
//!   devices that consume them.
//!
//! # Invariants
//!
//! - Pure computation, thin effects: [`desired_slices`] and [`plan()`] do no I/O; the sync step
//!   only executes a [`Plan`].
//! - Generation rule (as Go): the pool generation is bumped unless nothing is created or deleted
//!   and at most one slice changes; on a bump every desired slice is rewritten with the new
//!   generation, and stale slices are deleted only after the new ones are written.
//! - Nothing is written when nothing changed; writes are server-side apply of complete objects
//!   built from scratch (no read-modify-write, so fields our k8s-openapi structs do not know are
//!   never dropped); deletes carry UID and resourceVersion preconditions.
//! - Invalid input (duplicate names, dangling counter references) is rejected before anything is
//!   written, and the previous slices stay as they are.
//!
//! # Failure modes
//!
//! - API errors: the background task ([`Publisher`]) retries with capped exponential backoff and
//!   jitter and exposes the last error in its [`Status`].
//! - The server drops fields we sent (a feature gate is off, e.g. device taints on 1.34): reported
//!   as [`DroppedFields`] warnings; the server's answer is remembered so we do not rewrite in a
//!   loop. After a plugin restart such a pool is rewritten once.
//! - Name collisions with another driver or node (only possible with contrived names) make the
//!   apply fail on the immutable `spec.driver`/`spec.nodeName` rather than overwrite a stranger.

mod backoff;
mod compare;
mod desired;
mod layout;
mod plan;
mod publisher;
mod quantity;
mod sync;

use k8s_openapi::api::resource::v1::{CounterSet, Device};

pub use compare::DroppedFields;
pub use desired::{
    MAX_COUNTER_SETS_PER_SLICE, MAX_DEVICES_PER_SLICE,
    MAX_DEVICES_PER_SLICE_WITH_TAINTS_OR_COUNTERS, SliceOwner, desired_slices, slice_name,
    validate,
};
pub use layout::CounterLayout;
pub use plan::{Plan, SliceRef, plan};
pub use publisher::{Config, Publisher, PublisherTask, Status, spawn};

/// Everything a driver publishes for its node: the devices (in priority order) and the counter
/// sets they consume from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeResources {
    /// Devices of the node-local pool. Order is priority: the scheduler tries earlier devices
    /// first.
    pub devices: Vec<Device>,
    /// Shared counter sets referenced by `devices[].consumesCounters`.
    pub shared_counters: Vec<CounterSet>,
}

/// One reason why a [`NodeResources`] cannot be published.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Two devices share a name; device names are unique within a pool.
    #[error("device name {0:?} is used more than once")]
    DuplicateDevice(String),
    /// Two counter sets share a name; counter-set names are unique within a pool.
    #[error("counter set name {0:?} is used more than once")]
    DuplicateCounterSet(String),
    /// A device consumes from a counter set that is not published.
    #[error("device {device:?} consumes counters from unknown counter set {counter_set:?}")]
    UnknownCounterSet {
        /// The consuming device.
        device: String,
        /// The missing counter set.
        counter_set: String,
    },
    /// A device consumes a counter its counter set does not define.
    #[error(
        "device {device:?} consumes unknown counter {counter:?} of counter set {counter_set:?}"
    )]
    UnknownCounter {
        /// The consuming device.
        device: String,
        /// The counter set that exists but lacks the counter.
        counter_set: String,
        /// The missing counter.
        counter: String,
    },
    /// [`CounterLayout::Combined`] must put counter sets and all their consumers in one slice,
    /// and these are too many devices for one slice.
    #[error(
        "counter sets {counter_sets:?} are consumed by {devices} devices, but one slice holds at most {max} of them"
    )]
    CounterGroupTooLarge {
        /// The counter sets linked through their consuming devices.
        counter_sets: Vec<String>,
        /// How many devices consume them.
        devices: usize,
        /// The per-slice limit.
        max: usize,
    },
}

/// Errors of ResourceSlice publishing, named for the operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the Node (for its UID) failed.
    #[error("get node {node:?}")]
    GetNode {
        /// Node name.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The Node came back without a UID, so no ownerReference can be built.
    #[error("node {node:?} has no metadata.uid")]
    NodeWithoutUid {
        /// Node name.
        node: String,
    },
    /// Listing the pool's existing slices failed.
    #[error("list resource slices with field selector {selector:?}")]
    ListSlices {
        /// The field selector used.
        selector: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Server-side apply of one slice failed.
    #[error("apply resource slice {name:?}")]
    ApplySlice {
        /// Slice name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a stale slice failed (a failed precondition means it changed under us).
    #[error("delete resource slice {name:?}")]
    DeleteSlice {
        /// Slice name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The driver's input is invalid; nothing was written.
    #[error("invalid node resources: {}", join_problems(.0))]
    InvalidResources(Vec<Problem>),
    /// The server version in `version.Info` could not be parsed.
    #[error("unrecognised API server version {0:?}")]
    ServerVersion(String),
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

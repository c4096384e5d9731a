//! The one trait a DRA driver implements, and the types it exchanges.
//!
//! The plugin serves the kubelet's `v1.DRAPlugin` and `v1beta1.DRAPlugin`
//! services from a single [`DraDriver`]: it reads each claim from the API
//! server, selects what belongs to this driver ([`PrepareClaim`]),
//! serializes calls, invokes the driver, and converts the answer for the
//! protocol version the kubelet used.
//!
//! Invariants the plugin guarantees to the driver:
//! - Prepare only sees claims that exist with the UID the kubelet sent, are
//!   allocated, and have at least one device of this driver; claims failing
//!   those checks are answered without calling the driver.
//! - With serialization on (the default) no two driver calls overlap, within
//!   the process and, in rolling-update mode, across processes.
//! - A driver call, once started, runs to completion in its own task even if
//!   the kubelet cancels the RPC (its deadline is 45 s), so driver state is
//!   never left half-written by a dropped future.
//!
//! Invariants the driver owes the plugin (mirroring the kubelet contract):
//! - Prepare and Unprepare are idempotent; Unprepare of an unknown claim
//!   succeeds, and may run in another process than the matching Prepare.
//! - Results are keyed by claim UID. A missing entry is reported to the
//!   kubelet as a failure of that claim (and retried), never silently dropped.
//! - Calls finish well within the kubelet's 45 s deadline; long waits should
//!   return a per-claim error early and let the kubelet retry.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

use k8s_openapi::api::resource::v1::{DeviceRequestAllocationResult, ResourceClaim};

use crate::error::ClaimError;

/// Identifies a ResourceClaim the way the kubelet does: namespace, name, UID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClaimRef {
    /// Namespace of the claim.
    pub namespace: String,
    /// Name of the claim.
    pub name: String,
    /// UID of the claim; the key of every per-claim result.
    pub uid: String,
}

impl ClaimRef {
    /// A claim reference from its parts.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        uid: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }
}

impl fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// Where an opaque configuration came from; class configs take effect first
/// and claim configs override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfigSource {
    /// From the DeviceClass (`FromClass`).
    FromClass,
    /// From the ResourceClaim itself (`FromClaim`).
    FromClaim,
}

impl ConfigSource {
    /// The API's spelling of this source.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FromClass => "FromClass",
            Self::FromClaim => "FromClaim",
        }
    }
}

/// One opaque configuration addressed to this driver, taken from
/// `status.allocation.devices.config`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpaqueConfig {
    /// Whether it came from the class or from the claim.
    pub source: ConfigSource,
    /// Requests (`req` or `req/sub`) it applies to; empty means all requests.
    pub requests: Vec<String>,
    /// The raw `parameters` JSON; the driver owns its schema and versioning.
    pub parameters: serde_json::Value,
}

/// A claim to prepare, already read from the API server and checked.
#[derive(Debug, Clone)]
pub struct PrepareClaim {
    /// The claim as the kubelet named it.
    pub claim_ref: ClaimRef,
    /// The full ResourceClaim as read from `resource.k8s.io/v1`.
    pub claim: ResourceClaim,
    /// Allocation results whose `driver` is this driver, in allocation order.
    /// Never empty.
    pub results: Vec<DeviceRequestAllocationResult>,
    /// This driver's opaque configs in precedence order: every `FromClass`
    /// entry before every `FromClaim` entry, each group in allocation order.
    /// Apply them in order; later entries win.
    pub configs: Vec<OpaqueConfig>,
}

/// One device the driver prepared for a claim.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedDevice {
    /// Requests the device serves, as found in the allocation result
    /// (`req` or `req/sub`); the plugin strips sub-request suffixes for the
    /// kubelet. Empty means all requests of the claim.
    pub requests: Vec<String>,
    /// Pool of the device. Required.
    pub pool_name: String,
    /// Name of the device in the pool. Required.
    pub device_name: String,
    /// Fully qualified CDI device IDs (`vendor/class=name`); may be empty.
    pub cdi_device_ids: Vec<String>,
    /// Share of a multiply-allocatable device; only sent over DRA v1.
    pub share_id: Option<String>,
}

/// Per-claim outcome of a Prepare call, keyed by claim UID.
pub type PrepareResults = BTreeMap<String, Result<Vec<PreparedDevice>, ClaimError>>;

/// Per-claim outcome of an Unprepare call, keyed by claim UID.
pub type UnprepareResults = BTreeMap<String, Result<(), ClaimError>>;

/// A DRA driver's node-side logic.
///
/// Methods return `impl Future + Send` rather than using a boxing macro:
/// implementers can write plain `async fn`, the plugin is generic over the
/// driver so no trait object is needed, and the `Send` bound is checked at
/// the implementation. The cost is that the trait is not dyn-compatible;
/// wrap a driver in a generic type instead of a `Box<dyn DraDriver>`.
///
/// The futures run on the plugin's async runtime next to the registration
/// server: blocking work (NVML, file I/O with fsync, waiting on locks) belongs
/// in `tokio::task::spawn_blocking`, or it starves the other servers.
pub trait DraDriver: Send + Sync + 'static {
    /// Prepares the devices of the given claims (all checked, see
    /// [`PrepareClaim`]) and returns one entry per claim UID.
    ///
    /// Must be idempotent: the kubelet re-sends Prepare after its own restart.
    /// The driver is the last line of defense against handing one device to
    /// two unrelated claims. CDI device names should contain the claim UID so
    /// that runtime caches cannot return stale hits.
    fn prepare_resource_claims(
        &self,
        claims: Vec<PrepareClaim>,
    ) -> impl Future<Output = PrepareResults> + Send;

    /// Undoes Prepare for the given claims and returns one entry per claim
    /// UID. The ResourceClaims may already be deleted, so the driver must
    /// have persisted what it needs. Unknown claims succeed.
    fn unprepare_resource_claims(
        &self,
        claims: Vec<ClaimRef>,
    ) -> impl Future<Output = UnprepareResults> + Send;
}

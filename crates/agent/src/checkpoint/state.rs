//! The checkpoint's content and the pure operations Prepare and Unprepare run on it.
//!
//! [`CheckpointState`] is the `data` member of `checkpoint.json`. Every operation here is pure
//! (apart from stamping `updatedAt` with the wall clock): callers mutate the state, then persist
//! it with [`super::CheckpointStore::write`] before acting on the result.
//!
//! Invariants: claims are keyed by UID and iterate in UID order, so output and conflict reports
//! are deterministic. Every struct tolerates missing fields (`#[serde(default)]`) and keeps
//! unknown ones (`extra`), so files from older and newer versions read and round-trip.
//!
//! Failure modes: a claim state or device type this build does not know is kept verbatim
//! ([`ClaimState::Unknown`], [`DeviceInfo::Unknown`]) and treated conservatively: its devices
//! count as held, it is never reported as completed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::Error;

/// Identity of a ResourceClaim: everything Unprepare is given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimRef {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// Where a claim is in its prepare lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ClaimState {
    /// Prepare began; hardware may be half set up.
    PrepareStarted,
    /// Prepare finished; the recorded devices are live.
    PrepareCompleted,
    /// A state written by a newer version (or missing): kept verbatim, devices stay held.
    Unknown(String),
}

impl ClaimState {
    /// The name written to the file.
    pub fn as_str(&self) -> &str {
        match self {
            Self::PrepareStarted => "PrepareStarted",
            Self::PrepareCompleted => "PrepareCompleted",
            Self::Unknown(other) => other,
        }
    }
}

impl Default for ClaimState {
    fn default() -> Self {
        // A claim without a state is not known to be complete; keep it and its devices.
        Self::Unknown(String::new())
    }
}

impl From<String> for ClaimState {
    fn from(value: String) -> Self {
        match value.as_str() {
            "PrepareStarted" => Self::PrepareStarted,
            "PrepareCompleted" => Self::PrepareCompleted,
            _ => Self::Unknown(value),
        }
    }
}

impl From<ClaimState> for String {
    fn from(value: ClaimState) -> Self {
        match value {
            ClaimState::Unknown(other) => other,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for ClaimState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(other) if other.is_empty() => f.write_str("<unset>"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// One device of a claim's allocation result, as recorded when Prepare begins.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AllocatedDevice {
    /// Request names the device satisfies.
    pub requests: Vec<String>,
    /// ResourceSlice pool.
    pub pool: String,
    /// Device name within the pool.
    pub device: String,
    /// Share of a multi-allocatable device (consumable capacity).
    #[serde(rename = "shareID", skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// The allocation was made with admin access: it may overlap other claims.
    pub admin_access: bool,
    /// Fields from newer versions, kept for round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A group of prepared devices sharing one applied configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PreparedGroup {
    /// The devices.
    pub devices: Vec<PreparedDevice>,
    /// What was applied to the group (time-slice interval, MPS daemon ID, ...); the agent
    /// defines its keys. Unprepare reads it to undo exactly that.
    pub config_state: Map<String, Value>,
    /// Fields from newer versions, kept for round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A prepared device: what kubelet got back plus what Unprepare needs to tear it down.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PreparedDevice {
    /// Request names the device satisfies.
    pub requests: Vec<String>,
    /// ResourceSlice pool.
    pub pool: String,
    /// Device name within the pool.
    pub device: String,
    /// Fully qualified CDI device IDs handed to kubelet.
    #[serde(rename = "cdiDeviceIDs")]
    pub cdi_device_ids: Vec<String>,
    /// Share of a multi-allocatable device (consumable capacity).
    #[serde(rename = "shareID", skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// Allocated with admin access.
    pub admin_access: bool,
    /// Type-specific identity of the device.
    pub info: DeviceInfo,
    /// Fields from newer versions, kept for round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Type-specific identity of a prepared device, tagged by `type` in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceInfo {
    /// A full GPU.
    Gpu(PreparedGpu),
    /// A MIG device (static or created on demand).
    Mig(PreparedMig),
    /// A GPU bound to vfio-pci for passthrough.
    Vfio(PreparedVfio),
    /// An IMEX channel (`compute-domain.nvidia.com`).
    Channel(PreparedChannel),
    /// An IMEX daemon device (`compute-domain.nvidia.com`).
    Daemon(PreparedDaemon),
    /// A type this build does not know (or an entry it cannot parse): kept verbatim.
    Unknown(Value),
}

impl Default for DeviceInfo {
    fn default() -> Self {
        Self::Unknown(Value::Null)
    }
}

impl DeviceInfo {
    /// The `device_type` label of `nvidia_dra_prepared_devices`.
    pub fn type_label(&self) -> &'static str {
        match self {
            Self::Gpu(_) => "gpu",
            Self::Mig(_) => "mig",
            Self::Vfio(_) => "vfio",
            Self::Channel(_) => "channel",
            Self::Daemon(_) => "daemon",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// Every `device_type` label [`CheckpointState::prepared_device_counts_by_type`] reports (the
/// `gpu.nvidia.com` driver's).
pub const DEVICE_TYPE_LABELS: [&str; 4] = ["gpu", "mig", "vfio", "unknown"];

/// The `device_type` labels of the `compute-domain.nvidia.com` driver.
pub const CD_DEVICE_TYPE_LABELS: [&str; 3] = ["channel", "daemon", "unknown"];

/// Identity of a prepared full GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PreparedGpu {
    /// NVML UUID (`GPU-...`).
    pub uuid: String,
    /// `/dev/nvidia<minor>`; absent in checkpoints imported from the Go driver when the device
    /// name does not carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor: Option<u32>,
}

/// Identity of a live MIG device: enough to find and destroy exactly it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PreparedMig {
    /// The MIG device's UUID (`MIG-...`); changes when the same layout is re-created.
    pub uuid: String,
    /// UUID of the parent GPU.
    #[serde(rename = "parentUUID")]
    pub parent_uuid: String,
    /// Minor number of the parent GPU.
    #[serde(rename = "parentMinor", skip_serializing_if = "Option::is_none")]
    pub parent_minor: Option<u32>,
    /// GPU instance ID.
    #[serde(rename = "giId")]
    pub gi_id: u32,
    /// Compute instance ID.
    #[serde(rename = "ciId")]
    pub ci_id: u32,
    /// Profile name, e.g. `1g.10gb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// First memory slice of the placement.
    #[serde(rename = "placementStart", skip_serializing_if = "Option::is_none")]
    pub placement_start: Option<u32>,
    /// Number of memory slices of the placement.
    #[serde(rename = "placementSize", skip_serializing_if = "Option::is_none")]
    pub placement_size: Option<u32>,
}

/// Identity of a GPU prepared for passthrough.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PreparedVfio {
    /// NVML UUID of the GPU before it was unbound.
    pub uuid: String,
    /// Canonical PCI bus ID, e.g. `0000:3b:00.0`.
    #[serde(rename = "pciBusID", skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
}

/// Identity of a prepared IMEX channel claim device.
///
/// `id` is the physical channel the claim's containers got (`/dev/nvidia-caps-imex-channels/
/// channel<id>`); every channel claim of one ComputeDomain on a node records the same one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PreparedChannel {
    /// The IMEX channel.
    pub id: u32,
    /// UID of the ComputeDomain; absent in checkpoints imported from the Go driver.
    #[serde(rename = "domainID", skip_serializing_if = "Option::is_none")]
    pub domain_id: Option<String>,
    /// `Single` or `All` as the claim's config said; `All` injected every channel.
    #[serde(rename = "allocationMode", skip_serializing_if = "Option::is_none")]
    pub allocation_mode: Option<String>,
}

/// Identity of a prepared IMEX daemon claim device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PreparedDaemon {
    /// The published device's ID (always 0, as upstream).
    pub id: u32,
    /// UID of the ComputeDomain; absent in checkpoints imported from the Go driver.
    #[serde(rename = "domainID", skip_serializing_if = "Option::is_none")]
    pub domain_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum KnownInfo {
    Gpu(PreparedGpu),
    Mig(PreparedMig),
    Vfio(PreparedVfio),
    Channel(PreparedChannel),
    Daemon(PreparedDaemon),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum KnownInfoRef<'a> {
    Gpu(&'a PreparedGpu),
    Mig(&'a PreparedMig),
    Vfio(&'a PreparedVfio),
    Channel(&'a PreparedChannel),
    Daemon(&'a PreparedDaemon),
}

impl Serialize for DeviceInfo {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Gpu(gpu) => KnownInfoRef::Gpu(gpu).serialize(serializer),
            Self::Mig(mig) => KnownInfoRef::Mig(mig).serialize(serializer),
            Self::Vfio(vfio) => KnownInfoRef::Vfio(vfio).serialize(serializer),
            Self::Channel(channel) => KnownInfoRef::Channel(channel).serialize(serializer),
            Self::Daemon(daemon) => KnownInfoRef::Daemon(daemon).serialize(serializer),
            Self::Unknown(raw) => raw.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceInfo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(deserializer)?;
        // Anything that is not a known type in a known shape is kept as written, so one
        // device from a newer version cannot make the whole checkpoint unreadable.
        Ok(match KnownInfo::deserialize(&raw) {
            Ok(KnownInfo::Gpu(gpu)) => Self::Gpu(gpu),
            Ok(KnownInfo::Mig(mig)) => Self::Mig(mig),
            Ok(KnownInfo::Vfio(vfio)) => Self::Vfio(vfio),
            Ok(KnownInfo::Channel(channel)) => Self::Channel(channel),
            Ok(KnownInfo::Daemon(daemon)) => Self::Daemon(daemon),
            Err(_) => Self::Unknown(raw),
        })
    }
}

/// One claim in the checkpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClaimEntry {
    /// Claim namespace.
    pub namespace: String,
    /// Claim name.
    pub name: String,
    /// Lifecycle state.
    pub state: ClaimState,
    /// The allocation recorded when Prepare began: what a rollback must consider touched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allocated_devices: Vec<AllocatedDevice>,
    /// What Prepare produced; set when it completes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prepared_devices: Vec<PreparedGroup>,
    /// Last state change, RFC 3339 UTC; informational only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// Fields from newer versions, kept for round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A device a claim holds, for the double-use check.
struct Held<'a> {
    pool: &'a str,
    device: &'a str,
    share_id: Option<&'a str>,
    admin_access: bool,
}

impl ClaimEntry {
    /// The claim's identity, given the UID it is stored under.
    pub fn claim_ref(&self, uid: &str) -> ClaimRef {
        ClaimRef {
            uid: uid.to_owned(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Every prepared device of every group, in order.
    pub fn devices(&self) -> impl Iterator<Item = &PreparedDevice> {
        self.prepared_devices
            .iter()
            .flat_map(|group| &group.devices)
    }

    fn held(&self) -> impl Iterator<Item = Held<'_>> {
        let allocated = self.allocated_devices.iter().map(|d| Held {
            pool: &d.pool,
            device: &d.device,
            share_id: d.share_id.as_deref(),
            admin_access: d.admin_access,
        });
        let prepared = self.devices().map(|d| Held {
            pool: &d.pool,
            device: &d.device,
            share_id: d.share_id.as_deref(),
            admin_access: d.admin_access,
        });
        allocated.chain(prepared)
    }
}

/// What [`CheckpointState::begin_prepare`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum BeginOutcome {
    /// The claim is now `PrepareStarted`: persist, then prepare the hardware.
    Started,
    /// The claim was prepared before: return these devices without touching hardware.
    AlreadyCompleted(Vec<PreparedGroup>),
    /// A previous Prepare was interrupted (or the entry's state is unknown): tear down what
    /// this entry describes, [`CheckpointState::remove`] it, persist, then begin again.
    NeedsRollback(ClaimEntry),
}

/// The `data` member of `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointState {
    #[serde(rename = "nodeBootID")]
    node_boot_id: String,
    claims: BTreeMap<String, ClaimEntry>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl CheckpointState {
    /// An empty state for the node boot `node_boot_id`.
    pub fn new(node_boot_id: impl Into<String>) -> Self {
        Self {
            node_boot_id: node_boot_id.into(),
            ..Self::default()
        }
    }

    /// The boot the recorded claims were prepared in.
    pub fn node_boot_id(&self) -> &str {
        &self.node_boot_id
    }

    pub(super) fn set_node_boot_id(&mut self, node_boot_id: String) {
        self.node_boot_id = node_boot_id;
    }

    /// Drops every claim and returns their identities.
    pub(super) fn discard_claims(&mut self) -> Vec<ClaimRef> {
        let claims = std::mem::take(&mut self.claims);
        claims
            .iter()
            .map(|(uid, entry)| entry.claim_ref(uid))
            .collect()
    }

    pub(super) fn insert_claim(&mut self, uid: String, entry: ClaimEntry) {
        self.claims.insert(uid, entry);
    }

    /// The entry of claim `uid`, if recorded.
    pub fn claim(&self, uid: &str) -> Option<&ClaimEntry> {
        self.claims.get(uid)
    }

    /// The entry of claim `uid` for changes that keep its state (e.g. recording in `extra`
    /// what a later Unprepare needs before the claim completes).
    pub fn claim_mut(&mut self, uid: &str) -> Option<&mut ClaimEntry> {
        self.claims.get_mut(uid)
    }

    /// Every claim, in UID order.
    pub fn claims(&self) -> impl Iterator<Item = (&str, &ClaimEntry)> {
        self.claims.iter().map(|(uid, entry)| (uid.as_str(), entry))
    }

    /// Whether no claim is recorded.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Starts preparing `claim` with the devices of its allocation.
    ///
    /// Returns [`BeginOutcome::AlreadyCompleted`] for a completed claim and
    /// [`BeginOutcome::NeedsRollback`] for any other recorded one, leaving the state unchanged.
    /// Otherwise records the claim as `PrepareStarted`, unless a device is already held by
    /// another claim (in any state) and neither side has admin access nor a distinct share of
    /// it: then [`Error::DeviceInUse`] names the first such holder in UID order.
    pub fn begin_prepare(
        &mut self,
        claim: &ClaimRef,
        allocated: Vec<AllocatedDevice>,
    ) -> Result<BeginOutcome, Error> {
        if let Some(entry) = self.claims.get(&claim.uid) {
            return Ok(match entry.state {
                ClaimState::PrepareCompleted => {
                    BeginOutcome::AlreadyCompleted(entry.prepared_devices.clone())
                }
                _ => BeginOutcome::NeedsRollback(entry.clone()),
            });
        }
        for wanted in &allocated {
            if let Some((holder_uid, holder)) = self.holder_of(&claim.uid, wanted) {
                return Err(Error::DeviceInUse {
                    device: format!("{}/{}", wanted.pool, wanted.device),
                    claim: claim.to_string(),
                    holder: holder.claim_ref(holder_uid).to_string(),
                    holder_state: holder.state.to_string(),
                });
            }
        }
        self.claims.insert(
            claim.uid.clone(),
            ClaimEntry {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                state: ClaimState::PrepareStarted,
                allocated_devices: allocated,
                prepared_devices: Vec::new(),
                updated_at: Some(now_rfc3339()),
                extra: Map::new(),
            },
        );
        Ok(BeginOutcome::Started)
    }

    fn holder_of(&self, uid: &str, wanted: &AllocatedDevice) -> Option<(&str, &ClaimEntry)> {
        if wanted.admin_access {
            return None;
        }
        self.claims
            .iter()
            .filter(|(other_uid, _)| other_uid.as_str() != uid)
            .find(|(_, entry)| {
                entry.held().any(|held| {
                    held.pool == wanted.pool
                        && held.device == wanted.device
                        && !held.admin_access
                        && !distinct_shares(held.share_id, wanted.share_id.as_deref())
                })
            })
            .map(|(other_uid, entry)| (other_uid.as_str(), entry))
    }

    /// Marks a `PrepareStarted` claim completed with the devices it now holds.
    pub fn complete_prepare(
        &mut self,
        uid: &str,
        devices: Vec<PreparedGroup>,
    ) -> Result<(), Error> {
        let entry = match self.claims.get_mut(uid) {
            Some(entry) if entry.state == ClaimState::PrepareStarted => entry,
            other => {
                return Err(Error::CompletePrepare {
                    uid: uid.to_owned(),
                    state: other.map_or_else(|| "absent".to_owned(), |e| e.state.to_string()),
                });
            }
        };
        entry.state = ClaimState::PrepareCompleted;
        entry.prepared_devices = devices;
        entry.updated_at = Some(now_rfc3339());
        Ok(())
    }

    /// Records `entry` as a `PrepareCompleted` claim `uid` without a Prepare: for rebuilding
    /// the state of claims whose record was lost (a corrupt checkpoint) but whose devices are
    /// still live. Returns `false`, changing nothing, when `uid` is already recorded. Refuses
    /// with [`Error::DeviceInUse`], like [`Self::begin_prepare`], a device another claim holds.
    pub fn adopt_completed(&mut self, uid: &str, mut entry: ClaimEntry) -> Result<bool, Error> {
        if self.claims.contains_key(uid) {
            return Ok(false);
        }
        for wanted in &entry.allocated_devices {
            if let Some((holder_uid, holder)) = self.holder_of(uid, wanted) {
                return Err(Error::DeviceInUse {
                    device: format!("{}/{}", wanted.pool, wanted.device),
                    claim: entry.claim_ref(uid).to_string(),
                    holder: holder.claim_ref(holder_uid).to_string(),
                    holder_state: holder.state.to_string(),
                });
            }
        }
        entry.state = ClaimState::PrepareCompleted;
        entry.updated_at = Some(now_rfc3339());
        self.claims.insert(uid.to_owned(), entry);
        Ok(true)
    }

    /// Forgets claim `uid` and returns its entry (what Unprepare must tear down); `None` for an
    /// unknown claim, which Unprepare treats as success.
    pub fn remove(&mut self, uid: &str) -> Option<ClaimEntry> {
        self.claims.remove(uid)
    }

    /// Claims whose Prepare is in progress or was interrupted, in UID order.
    pub fn started_claims(&self) -> Vec<ClaimRef> {
        self.refs_in_state(|state| *state == ClaimState::PrepareStarted)
    }

    /// Claims whose Prepare completed, in UID order.
    pub fn completed_claims(&self) -> Vec<ClaimRef> {
        self.refs_in_state(|state| *state == ClaimState::PrepareCompleted)
    }

    fn refs_in_state(&self, wanted: impl Fn(&ClaimState) -> bool) -> Vec<ClaimRef> {
        self.claims
            .iter()
            .filter(|(_, entry)| wanted(&entry.state))
            .map(|(uid, entry)| entry.claim_ref(uid))
            .collect()
    }

    /// Prepared devices of completed claims by `device_type` label; every label of
    /// [`DEVICE_TYPE_LABELS`] is present so a gauge drops to zero.
    pub fn prepared_device_counts_by_type(&self) -> BTreeMap<&'static str, usize> {
        self.prepared_device_counts_for(&DEVICE_TYPE_LABELS)
    }

    /// Like [`Self::prepared_device_counts_by_type`] for a driver whose labels are `labels`
    /// (which must contain `unknown`): a device of a type not in `labels` counts as `unknown`.
    pub fn prepared_device_counts_for(
        &self,
        labels: &[&'static str],
    ) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            labels.iter().map(|label| (*label, 0)).collect();
        for entry in self.claims.values() {
            if entry.state != ClaimState::PrepareCompleted {
                continue;
            }
            for device in entry.devices() {
                let label = device.info.type_label();
                let label = if labels.contains(&label) {
                    label
                } else {
                    "unknown"
                };
                *counts.entry(label).or_default() += 1;
            }
        }
        counts
    }
}

/// Two claims may hold the same device only as different shares of a multi-allocatable one.
fn distinct_shares(a: Option<&str>, b: Option<&str>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a != b)
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    rfc3339_utc(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm, shifted
/// so the year starts in March and leap days fall at its end).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
        ] {
            assert_eq!(rfc3339_utc(secs), want, "{secs}");
        }
    }

    #[test]
    fn claim_state_round_trips_unknown_values() {
        for (text, state) in [
            ("PrepareStarted", ClaimState::PrepareStarted),
            ("PrepareCompleted", ClaimState::PrepareCompleted),
            (
                "UnprepareStarted",
                ClaimState::Unknown("UnprepareStarted".into()),
            ),
        ] {
            assert_eq!(ClaimState::from(text.to_owned()), state);
            assert_eq!(String::from(state), text);
        }
        assert_eq!(ClaimState::default().to_string(), "<unset>");
    }
}

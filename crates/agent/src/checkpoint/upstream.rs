//! One-way import of the Go driver's checkpoint, for upgrades in place.
//!
//! Job: map the Go layout (`{checksum, v1: {preparedClaims}, v2: {preparedClaims, nodeBootID}}`,
//! see upstream-compat.md §10) onto [`CheckpointState`], so claims prepared by the Go driver
//! are neither prepared twice nor leaked when nvdra replaces it on a running node.
//!
//! Invariants: `v2` wins over `v1` (the Go driver writes both; `v1` holds completed claims
//! only). Claims the Go driver marked `UnprepareCompleted` are tombstones holding nothing and are
//! dropped; any other state it may invent is kept as [`ClaimState::Unknown`]. Values are walked
//! as untyped JSON because Go writes nil slices as `null`.
//!
//! Failure modes: a `v1`/`v2` member that is not an object, or a claim that is not an object,
//! makes the file corrupt (the caller moves it aside). A device entry this code cannot map is
//! kept as [`DeviceInfo::Unknown`] with its raw JSON. The Go checksum is not verified (it hashes
//! a Go-specific dump of the object), so the caller reports it as unverified.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use nvdra_api::names::drivers;

use super::state::{
    AllocatedDevice, CheckpointState, ClaimEntry, ClaimState, DeviceInfo, PreparedChannel,
    PreparedDaemon, PreparedDevice, PreparedGpu, PreparedGroup, PreparedMig, PreparedVfio,
};

/// Builds a state from the Go driver's `v1`/`v2` members.
pub(super) fn import(
    v1: Option<&RawValue>,
    v2: Option<&RawValue>,
) -> Result<CheckpointState, String> {
    let (member, raw) = match (v2, v1) {
        (Some(v2), _) => ("v2", v2),
        (None, Some(v1)) => ("v1", v1),
        (None, None) => return Err("no v1 or v2".to_owned()),
    };
    let value: Value =
        serde_json::from_str(raw.get()).map_err(|err| format!("cannot parse {member}: {err}"))?;
    let Value::Object(checkpoint) = value else {
        return Err(format!("{member} is not an object"));
    };
    let mut state = CheckpointState::new(str_at(&checkpoint, "nodeBootID"));
    let claims = match checkpoint.get("preparedClaims") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(claims)) => claims.clone(),
        Some(_) => return Err(format!("{member}.preparedClaims is not an object")),
    };
    for (uid, claim) in claims {
        let Value::Object(claim) = claim else {
            return Err(format!("{member}.preparedClaims.{uid} is not an object"));
        };
        // v1 recorded completed claims only and has no state field.
        let state_name = if member == "v1" {
            "PrepareCompleted".to_owned()
        } else {
            str_at(&claim, "checkpointState")
        };
        if state_name == "UnprepareCompleted" {
            continue;
        }
        state.insert_claim(uid, claim_entry(&claim, ClaimState::from(state_name)));
    }
    Ok(state)
}

fn claim_entry(claim: &Map<String, Value>, state: ClaimState) -> ClaimEntry {
    let results = allocation_results(claim);
    let allocated_devices: Vec<AllocatedDevice> = results
        .iter()
        .filter(|result| {
            let driver = str_at(result, "driver");
            driver == drivers::GPU || driver == drivers::COMPUTE_DOMAIN
        })
        .map(|result| AllocatedDevice {
            requests: vec![str_at(result, "request")],
            pool: str_at(result, "pool"),
            device: str_at(result, "device"),
            share_id: opt_str_at(result, "shareID"),
            admin_access: bool_at(result, "adminAccess"),
            extra: Map::new(),
        })
        .collect();
    let prepared_devices = array_at(claim, "preparedDevices")
        .iter()
        .filter_map(Value::as_object)
        .map(|group| PreparedGroup {
            devices: array_at(group, "devices")
                .iter()
                .map(|device| prepared_device(device, &allocated_devices))
                .collect(),
            config_state: object_at(group, "configState"),
            extra: Map::new(),
        })
        .collect();
    ClaimEntry {
        namespace: str_at(claim, "namespace"),
        name: str_at(claim, "name"),
        state,
        allocated_devices,
        prepared_devices,
        updated_at: None,
        extra: Map::new(),
    }
}

/// `status.allocation.devices.results` of the recorded ResourceClaim status.
fn allocation_results(claim: &Map<String, Value>) -> Vec<Map<String, Value>> {
    claim
        .get("status")
        .and_then(|status| status.get("allocation"))
        .and_then(|allocation| allocation.get("devices"))
        .and_then(|devices| devices.get("results"))
        .and_then(Value::as_array)
        .map(|results| {
            results
                .iter()
                .filter_map(Value::as_object)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Maps `{gpu|mig|vfio|<other>: {info|concrete: {...}, device: {...}}}`.
fn prepared_device(raw: &Value, allocated: &[AllocatedDevice]) -> PreparedDevice {
    let unknown = || PreparedDevice {
        info: DeviceInfo::Unknown(raw.clone()),
        ..PreparedDevice::default()
    };
    let Some(kinds) = raw.as_object() else {
        return unknown();
    };
    let mut set = kinds.iter().filter(|(_, value)| !value.is_null());
    let (Some((kind, Value::Object(body))), None) = (set.next(), set.next()) else {
        return unknown();
    };
    let device = object_at(body, "device");
    let name = str_at(&device, "DeviceName");
    let pool = str_at(&device, "PoolName");
    let info = match kind.as_str() {
        "gpu" => DeviceInfo::Gpu(PreparedGpu {
            uuid: str_at(&object_at(body, "info"), "uuid"),
            minor: name.strip_prefix("gpu-").and_then(|m| m.parse().ok()),
        }),
        "mig" => {
            // Newer Go releases record the live tuple as `concrete`, older ones the whole
            // MIG info as `info`.
            let tuple = match body.get("concrete") {
                Some(Value::Object(concrete)) => concrete.clone(),
                _ => object_at(body, "info"),
            };
            DeviceInfo::Mig(PreparedMig {
                uuid: opt_str_at(&tuple, "migUUID").unwrap_or_else(|| str_at(&tuple, "uuid")),
                parent_uuid: str_at(&tuple, "parentUUID"),
                parent_minor: u32_at(&tuple, "parentMinor"),
                gi_id: u32_at(&tuple, "giId").unwrap_or_default(),
                ci_id: u32_at(&tuple, "ciId").unwrap_or_default(),
                profile: opt_str_at(&tuple, "profile"),
                placement_start: u32_at(&tuple, "placementStart"),
                placement_size: u32_at(&tuple, "placementSize"),
            })
        }
        "vfio" => {
            let info = object_at(body, "info");
            DeviceInfo::Vfio(PreparedVfio {
                uuid: str_at(&info, "uuid"),
                pci_bus_id: opt_str_at(&info, "pciBusID"),
            })
        }
        // The compute-domain plugin records `{id}` only; the domain is not known here.
        "channel" => DeviceInfo::Channel(PreparedChannel {
            id: u32_at(&object_at(body, "info"), "id").unwrap_or_default(),
            domain_id: None,
            allocation_mode: None,
        }),
        "daemon" => DeviceInfo::Daemon(PreparedDaemon {
            id: u32_at(&object_at(body, "info"), "id").unwrap_or_default(),
            domain_id: None,
        }),
        _ => DeviceInfo::Unknown(raw.clone()),
    };
    let admin_access = allocated
        .iter()
        .any(|a| a.pool == pool && a.device == name && a.admin_access);
    PreparedDevice {
        requests: strings_at(&device, "Requests"),
        pool,
        device: name,
        cdi_device_ids: strings_at(&device, "CDIDeviceIDs"),
        share_id: opt_str_at(&device, "ShareID"),
        admin_access,
        info,
        extra: Map::new(),
    }
}

fn opt_str_at(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn str_at(map: &Map<String, Value>, key: &str) -> String {
    opt_str_at(map, key).unwrap_or_default()
}

fn bool_at(map: &Map<String, Value>, key: &str) -> bool {
    map.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn u32_at(map: &Map<String, Value>, key: &str) -> Option<u32> {
    map.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

fn array_at<'a>(map: &'a Map<String, Value>, key: &str) -> &'a [Value] {
    map.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn object_at(map: &Map<String, Value>, key: &str) -> Map<String, Value> {
    map.get(key)
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn strings_at(map: &Map<String, Value>, key: &str) -> Vec<String> {
    array_at(map, key)
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

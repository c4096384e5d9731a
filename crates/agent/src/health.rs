//! Device health (`NVMLDeviceHealthCheck`): NVML health events become
//! device taints in the published ResourceSlice, so the scheduler stops
//! placing new claims on a failing device, and an operator (or the GPU
//! itself, for a lost GPU that answers again) clears them.
//!
//! Taints, with upstream's keys:
//! - `gpu.nvidia.com/xid=<n>`: a critical Xid on the device, `NoSchedule`;
//!   ignorable Xids (upstream's 13, 31, 43, 45, 68, 109 and
//!   `--additional-xids-to-ignore`) are recorded with effect `None`. The
//!   latest Xid replaces the previous one.
//! - `gpu.nvidia.com/gpu-lost`: NVML reported a GPU lost without saying
//!   which; every device, `NoSchedule`.
//! - `gpu.nvidia.com/unmonitored`: the GPU's events could not be
//!   registered, effect `None`.
//! - `gpu.nvidia.com/ecc=double-bit`: a double-bit ECC error, `NoSchedule`
//!   (upstream registers for ECC events and then ignores them). Single-bit
//!   errors are corrected by the hardware; they are logged only.
//!
//! Which devices: an event on a full GPU taints every device of that GPU
//! (the GPU, its MIG devices or partitions, its passthrough sibling); an
//! event on a MIG device taints that device.
//!
//! Recovery, which upstream lacks: the Node annotation
//! [`CLEAR_ANNOTATION`] (`<device>,<device>` or `all`, optionally followed
//! by `@<anything>` to repeat a request) clears every taint of the devices
//! it names each time its value changes; `gpu-lost` clears itself once NVML
//! answers for every GPU again.
//!
//! Invariants: the taints and the last clear request acted on are saved to
//! `health.json` in the plugin directory (written atomically) on every
//! change, so an agent restart neither forgets a failing device nor acts
//! twice on one request. Everything here is pure except [`HealthStore`]'s
//! file I/O; the driver runs the watch loop and republishes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::resource::v1::DeviceTaint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nvdra_gpu::health::{HealthEvent, HealthEventKind};
use serde::{Deserialize, Serialize};

use crate::devices::AllocatableDevice;

/// The Node annotation that clears taints: device names or `all`.
pub const CLEAR_ANNOTATION: &str = "gpu.nvidia.com/clear-health-taints";
/// Upstream's taint keys.
pub const XID_KEY: &str = "gpu.nvidia.com/xid";
/// A GPU NVML reported lost.
pub const GPU_LOST_KEY: &str = "gpu.nvidia.com/gpu-lost";
/// A GPU whose events could not be registered.
pub const UNMONITORED_KEY: &str = "gpu.nvidia.com/unmonitored";
/// An uncorrectable ECC error.
pub const ECC_KEY: &str = "gpu.nvidia.com/ecc";
/// Xids upstream never acts on (application errors, not the GPU's).
pub const DEFAULT_IGNORED_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// One taint on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    /// The value (an Xid number, `double-bit`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule` or `None`.
    pub effect: String,
    /// When it was added, seconds since the epoch.
    pub since: i64,
}

/// The node's device taints and the last clear request acted on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthState {
    /// By device name, then taint key.
    #[serde(default)]
    pub taints: BTreeMap<String, BTreeMap<String, Taint>>,
    /// The annotation value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_clear: Option<String>,
}

impl HealthState {
    /// The taints to publish on `device`.
    pub fn device_taints(&self, device: &str) -> Option<Vec<DeviceTaint>> {
        let taints = self.taints.get(device)?;
        Some(
            taints
                .iter()
                .map(|(key, t)| DeviceTaint {
                    key: key.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                    time_added: taint_time(t.since),
                })
                .collect(),
        )
    }

    fn set(
        &mut self,
        devices: &[String],
        key: &str,
        value: Option<String>,
        effect: &str,
        now: i64,
    ) -> bool {
        let mut changed = false;
        for device in devices {
            let taints = self.taints.entry(device.clone()).or_default();
            let same = taints
                .get(key)
                .is_some_and(|t| t.value == value && t.effect == effect);
            if !same {
                taints.insert(
                    key.to_owned(),
                    Taint {
                        value: value.clone(),
                        effect: effect.to_owned(),
                        since: now,
                    },
                );
                changed = true;
            }
        }
        changed
    }

    /// Records `event` on `devices` (those it concerns); returns whether
    /// anything changed.
    pub fn record(
        &mut self,
        event: &HealthEvent,
        devices: &[String],
        ignored_xids: &BTreeSet<u64>,
        now: i64,
    ) -> bool {
        match event.kind {
            HealthEventKind::Xid(xid) => {
                let effect = if ignored_xids.contains(&xid) {
                    "None"
                } else {
                    "NoSchedule"
                };
                self.set(devices, XID_KEY, Some(xid.to_string()), effect, now)
            }
            HealthEventKind::DoubleBitEcc => self.set(
                devices,
                ECC_KEY,
                Some("double-bit".to_owned()),
                "NoSchedule",
                now,
            ),
            HealthEventKind::GpuLost => self.set(devices, GPU_LOST_KEY, None, "NoSchedule", now),
            HealthEventKind::SingleBitEcc => false,
        }
    }

    /// Marks `devices` unmonitored.
    pub fn unmonitored(&mut self, devices: &[String], now: i64) -> bool {
        self.set(devices, UNMONITORED_KEY, None, "None", now)
    }

    /// Removes `key` from every device; returns whether any had it.
    pub fn clear_key(&mut self, key: &str) -> bool {
        let mut changed = false;
        for taints in self.taints.values_mut() {
            changed |= taints.remove(key).is_some();
        }
        self.taints.retain(|_, t| !t.is_empty());
        changed
    }

    /// Acts on a clear request (the annotation's value) unless it was the
    /// last one acted on; returns the devices cleared.
    pub fn clear_request(&mut self, request: &str) -> Vec<String> {
        if self.last_clear.as_deref() == Some(request) {
            return Vec::new();
        }
        self.last_clear = Some(request.to_owned());
        let names = request.split('@').next().unwrap_or_default();
        let wanted: Vec<&str> = names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let cleared: Vec<String> = self
            .taints
            .keys()
            .filter(|d| wanted.contains(&"all") || wanted.contains(&d.as_str()))
            .cloned()
            .collect();
        for device in &cleared {
            self.taints.remove(device);
        }
        cleared
    }
}

fn taint_time(seconds: i64) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .ok()
        .map(Time)
}

/// The devices an event on a full GPU (`gpu_uuid`) concerns: every device
/// whose physical GPU it is (the GPU, its MIG devices or partitions, its
/// passthrough sibling), or every device for a lost GPU (empty UUID).
pub fn devices_of_gpu(
    devices: &BTreeMap<String, AllocatableDevice>,
    gpu_uuid: &str,
) -> Vec<String> {
    devices
        .iter()
        .filter(|(_, d)| {
            gpu_uuid.is_empty() || d.physical_gpu().is_some_and(|g| g.uuid == gpu_uuid)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// The static MIG device an event on (`gpu_uuid`, `gi`, `ci`) concerns.
pub fn static_mig_device(
    devices: &BTreeMap<String, AllocatableDevice>,
    gpu_uuid: &str,
    gi: u32,
    ci: u32,
) -> Option<String> {
    devices.iter().find_map(|(name, d)| match d {
        AllocatableDevice::Mig { mig, .. }
            if mig.parent_uuid == gpu_uuid && mig.gi_id == gi && mig.ci_id == ci =>
        {
            Some(name.clone())
        }
        _ => None,
    })
}

/// The kubelet's view of `devices` (the resource-health stream): a device
/// with a `NoSchedule` or `NoExecute` taint is unhealthy, with its taints
/// as the message; every other device is healthy. `now` stamps the report.
pub fn stream_report<'a>(
    pool: &str,
    devices: impl IntoIterator<Item = &'a String>,
    state: &HealthState,
    now: i64,
) -> Vec<nvdra_kubelet_plugin::resource_health::DeviceHealth> {
    use nvdra_kubelet_plugin::resource_health::{DeviceHealth, Health};
    devices
        .into_iter()
        .map(|device| {
            let taints = state.taints.get(device);
            let failing: Vec<String> = taints
                .into_iter()
                .flatten()
                .filter(|(_, t)| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .map(|(key, t)| match &t.value {
                    Some(value) => format!("{key}={value}"),
                    None => key.clone(),
                })
                .collect();
            DeviceHealth {
                pool: pool.to_owned(),
                device: device.clone(),
                health: if failing.is_empty() {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                },
                message: failing.join(", "),
                last_updated: now,
            }
        })
        .collect()
}

/// Where the health state is saved.
#[derive(Debug, Clone)]
pub struct HealthStore {
    path: PathBuf,
}

impl HealthStore {
    /// `health.json` in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("health.json"),
        }
    }

    /// The saved state; empty when there is none. An unreadable file is
    /// logged and set aside (`health.json.corrupt`), never fatal.
    pub fn load(&self) -> HealthState {
        match std::fs::read(&self.path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => state,
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), error = %err, "unreadable device health state; starting from healthy");
                    let _ = std::fs::rename(&self.path, self.path.with_extension("json.corrupt"));
                    HealthState::default()
                }
            },
            Err(_) => HealthState::default(),
        }
    }

    /// Saves `state` atomically.
    pub fn save(&self, state: &HealthState) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ignored() -> BTreeSet<u64> {
        DEFAULT_IGNORED_XIDS.into_iter().collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn xids_taint_and_ignorable_ones_only_inform() {
        let mut state = HealthState::default();
        let event = HealthEvent::gpu("GPU-a", HealthEventKind::Xid(79));
        assert!(state.record(&event, &names(&["gpu-0", "gpu-vfio-0"]), &ignored(), 100));
        let taints = state.device_taints("gpu-0").unwrap();
        assert_eq!(taints.len(), 1);
        assert_eq!(taints[0].key, XID_KEY);
        assert_eq!(taints[0].value.as_deref(), Some("79"));
        assert_eq!(taints[0].effect, "NoSchedule");
        assert!(taints[0].time_added.is_some());
        // The same event again changes nothing; a later Xid replaces it.
        assert!(!state.record(&event, &names(&["gpu-0"]), &ignored(), 200));
        let app = HealthEvent::gpu("GPU-a", HealthEventKind::Xid(13));
        assert!(state.record(&app, &names(&["gpu-0"]), &ignored(), 300));
        let taints = state.device_taints("gpu-0").unwrap();
        assert_eq!(
            (taints[0].value.as_deref(), taints[0].effect.as_str()),
            (Some("13"), "None")
        );
    }

    #[test]
    fn ecc_and_lost_gpus_taint_single_bit_does_not() {
        let mut state = HealthState::default();
        let sbe = HealthEvent::gpu("GPU-a", HealthEventKind::SingleBitEcc);
        assert!(!state.record(&sbe, &names(&["gpu-0"]), &ignored(), 1));
        assert!(state.taints.is_empty());
        let dbe = HealthEvent::gpu("GPU-a", HealthEventKind::DoubleBitEcc);
        assert!(state.record(&dbe, &names(&["gpu-0"]), &ignored(), 1));
        assert_eq!(state.taints["gpu-0"][ECC_KEY].effect, "NoSchedule");
        assert!(state.record(
            &HealthEvent::gpu_lost(),
            &names(&["gpu-0", "gpu-1"]),
            &ignored(),
            2
        ));
        assert!(state.clear_key(GPU_LOST_KEY));
        assert!(!state.taints.contains_key("gpu-1"));
        assert!(state.taints["gpu-0"].contains_key(ECC_KEY));
    }

    #[test]
    fn clear_requests_act_once_per_value() {
        let mut state = HealthState::default();
        let xid = HealthEvent::gpu("GPU-a", HealthEventKind::Xid(79));
        state.record(&xid, &names(&["gpu-0", "gpu-1", "gpu-2"]), &ignored(), 1);
        assert_eq!(
            state.clear_request("gpu-0, gpu-2"),
            names(&["gpu-0", "gpu-2"])
        );
        assert_eq!(state.taints.keys().collect::<Vec<_>>(), ["gpu-1"]);
        // The same value again does nothing, even after a new taint.
        state.record(&xid, &names(&["gpu-0"]), &ignored(), 2);
        assert!(state.clear_request("gpu-0, gpu-2").is_empty());
        assert!(state.taints.contains_key("gpu-0"));
        // A repeated request with a new suffix acts; `all` clears all.
        assert_eq!(state.clear_request("gpu-0@2"), names(&["gpu-0"]));
        assert_eq!(state.clear_request("all"), names(&["gpu-1"]));
        assert!(state.taints.is_empty());
    }

    #[test]
    fn the_kubelet_sees_blocking_taints_as_unhealthy() {
        use nvdra_kubelet_plugin::resource_health::Health;
        let mut state = HealthState::default();
        let xid = HealthEvent::gpu("GPU-a", HealthEventKind::Xid(79));
        state.record(&xid, &names(&["gpu-0"]), &ignored(), 1);
        state.unmonitored(&names(&["gpu-1"]), 1);
        let all = names(&["gpu-0", "gpu-1", "gpu-2"]);
        let report = stream_report("node-a", &all, &state, 9);
        let got: Vec<(&str, Health, &str, i64)> = report
            .iter()
            .map(|d| {
                (
                    d.device.as_str(),
                    d.health,
                    d.message.as_str(),
                    d.last_updated,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("gpu-0", Health::Unhealthy, "gpu.nvidia.com/xid=79", 9),
                ("gpu-1", Health::Healthy, "", 9),
                ("gpu-2", Health::Healthy, "", 9),
            ]
        );
        assert!(report.iter().all(|d| d.pool == "node-a"));
    }

    #[test]
    fn state_survives_a_restart_and_corruption_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = HealthStore::new(dir.path());
        assert_eq!(store.load(), HealthState::default());
        let mut state = HealthState::default();
        state.unmonitored(&names(&["gpu-3"]), 5);
        state.clear_request("all@1");
        store.save(&state).unwrap();
        assert_eq!(store.load(), state);
        std::fs::write(dir.path().join("health.json"), "{not json").unwrap();
        assert_eq!(store.load(), HealthState::default());
        assert!(dir.path().join("health.json.corrupt").exists());
    }
}

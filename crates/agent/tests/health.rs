//! Device health (NVMLDeviceHealthCheck) through the GPU driver on a fake
//! node: injected NVML events become taints on the devices they concern,
//! the Node annotation clears them, a lost GPU recovers, and taints outlive
//! an agent restart; also with DynamicMIG, where an event on a created MIG
//! device taints its partition.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "driver/fixtures.rs"]
mod fixtures;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvdra_agent::driver::{GpuDriver, HealthOptions};
use nvdra_api::{FeatureGate, FeatureGates};
use nvdra_gpu::health::{HealthEvent, HealthEventKind};
use nvdra_gpu::{FakeBackend, GpuBackend};
use nvdra_kubelet_plugin::DraDriver;

use crate::fixtures::*;

/// Taints by device: `key[=value]:effect`.
fn taints(driver: &GpuDriver) -> BTreeMap<String, Vec<String>> {
    driver
        .node_resources()
        .devices
        .into_iter()
        .filter_map(|d| {
            let taints = d.taints?;
            Some((
                d.name,
                taints
                    .into_iter()
                    .map(|t| match t.value {
                        Some(v) => format!("{}={v}:{}", t.key, t.effect),
                        None => format!("{}:{}", t.key, t.effect),
                    })
                    .collect(),
            ))
        })
        .collect()
}

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(
    dirs: &Dirs,
    profile: &str,
    fake: &Arc<FakeBackend>,
    gates: FeatureGates,
    options: HealthOptions,
) -> GpuDriver {
    let gates = gates.with(FeatureGate::NVMLDeviceHealthCheck, true);
    let (mut config, _registry) = config(dirs, profile, gates);
    config.backend = fake.clone();
    config.health = Some(options);
    let driver = GpuDriver::start(config).unwrap().0;
    driver.watch_health().unwrap();
    driver
}

#[test]
fn events_taint_their_gpus_and_the_annotation_clears_them() {
    let dirs = Dirs::new();
    let fake = backend(H100);
    let gpus = fake.gpus().unwrap();
    // GPU 7 cannot report events.
    fake.set_health_events_supported(&gpus[7].uuid, false)
        .unwrap();
    let driver = start(
        &dirs,
        H100,
        &fake,
        FeatureGates::default(),
        HealthOptions::default(),
    );
    let name = |i: usize| format!("gpu-{}", gpus[i].minor);
    assert_eq!(
        taints(&driver),
        BTreeMap::from([(name(7), vec!["gpu.nvidia.com/unmonitored:None".to_owned()])])
    );

    fake.inject_health_event(HealthEvent::gpu(&gpus[0].uuid, HealthEventKind::Xid(79)));
    fake.inject_health_event(HealthEvent::gpu(&gpus[1].uuid, HealthEventKind::Xid(13)));
    fake.inject_health_event(HealthEvent::gpu(
        &gpus[2].uuid,
        HealthEventKind::DoubleBitEcc,
    ));
    fake.inject_health_event(HealthEvent::gpu(
        &gpus[3].uuid,
        HealthEventKind::SingleBitEcc,
    ));
    until("four devices tainted", || taints(&driver).len() == 4);
    let now = taints(&driver);
    assert_eq!(now[&name(0)], ["gpu.nvidia.com/xid=79:NoSchedule"]);
    // An application Xid informs only.
    assert_eq!(now[&name(1)], ["gpu.nvidia.com/xid=13:None"]);
    assert_eq!(now[&name(2)], ["gpu.nvidia.com/ecc=double-bit:NoSchedule"]);
    assert!(!now.contains_key(&name(3)), "single-bit ECC is corrected");
    // The kubelet's resource-health stream says the same.
    let feed = driver.health_feed().expect("a health feed");
    let report = feed.borrow().clone();
    let unhealthy: Vec<&str> = report
        .iter()
        .filter(|d| d.health == nvdra_kubelet_plugin::resource_health::Health::Unhealthy)
        .map(|d| d.device.as_str())
        .collect();
    assert_eq!(unhealthy, [name(0).as_str(), name(2).as_str()]);
    assert_eq!(report.len(), 8);

    // The operator clears GPU 0; the same request again does nothing.
    assert_eq!(driver.clear_health_taints(&name(0)), [name(0)]);
    assert!(!taints(&driver).contains_key(&name(0)));
    fake.inject_health_event(HealthEvent::gpu(&gpus[0].uuid, HealthEventKind::Xid(48)));
    until("GPU 0 tainted again", || {
        taints(&driver).contains_key(&name(0))
    });
    assert!(driver.clear_health_taints(&name(0)).is_empty());
    assert_eq!(
        driver.clear_health_taints(&format!("{}@again", name(0))),
        [name(0)]
    );

    // Taints outlive the agent.
    drop(driver);
    let fresh = backend(H100);
    let driver = start(
        &dirs,
        H100,
        &fresh,
        FeatureGates::default(),
        HealthOptions::default(),
    );
    let now = taints(&driver);
    assert_eq!(now[&name(2)], ["gpu.nvidia.com/ecc=double-bit:NoSchedule"]);
    // GPU 7 reports events on this "node": no longer unmonitored.
    assert!(!now.contains_key(&name(7)));
    assert_eq!(driver.clear_health_taints("all"), [name(1), name(2)]);
    assert!(taints(&driver).is_empty());
}

#[test]
fn a_lost_gpu_taints_everything_until_nvml_answers_again() {
    let dirs = Dirs::new();
    let fake = backend(H100);
    let options = HealthOptions {
        lost_recovery: Duration::from_secs(1),
        ..HealthOptions::default()
    };
    let driver = start(&dirs, H100, &fake, FeatureGates::default(), options);
    fake.inject_health_event(HealthEvent::gpu_lost());
    until("every device tainted lost", || taints(&driver).len() == 8);
    assert!(
        taints(&driver)
            .values()
            .all(|t| t == &["gpu.nvidia.com/gpu-lost:NoSchedule"])
    );
    // The fake keeps answering, so the taint goes after the recovery time.
    until("the lost taints to clear", || taints(&driver).is_empty());
}

#[test]
fn a_static_mig_device_event_taints_that_device_only() {
    let dirs = Dirs::new();
    let fake = backend(A100_MIG);
    let driver = start(
        &dirs,
        A100_MIG,
        &fake,
        FeatureGates::default(),
        HealthOptions::default(),
    );
    let (name, mig) = driver
        .allocatable_devices()
        .iter()
        .find_map(|(n, d)| match d {
            nvdra_agent::devices::AllocatableDevice::Mig { mig, .. } => {
                Some((n.clone(), mig.clone()))
            }
            _ => None,
        })
        .unwrap();
    fake.inject_health_event(HealthEvent {
        gpu_uuid: mig.parent_uuid.clone(),
        gi_id: Some(mig.gi_id),
        ci_id: Some(mig.ci_id),
        kind: HealthEventKind::Xid(94),
    });
    until("the MIG device tainted", || !taints(&driver).is_empty());
    assert_eq!(
        taints(&driver),
        BTreeMap::from([(name, vec!["gpu.nvidia.com/xid=94:NoSchedule".to_owned()])])
    );
}

#[tokio::test]
async fn with_dynamic_mig_an_event_taints_the_created_devices_partition() {
    let dirs = Dirs::new();
    let fake = backend(H100);
    let gates = FeatureGates::default().with(FeatureGate::DynamicMIG, true);
    let driver = start(&dirs, H100, &fake, gates, HealthOptions::default());
    let partition = "gpu-0-mig-1g10gb-19-0";
    assert!(driver.allocatable_devices().contains_key(partition));
    let claim = allocated_claim("p", &uid(1), &[("mig", partition, false)]);
    let got = driver
        .prepare_resource_claims(vec![to_prepare(claim)])
        .await;
    assert!(got[&uid(1)].is_ok(), "{got:?}");
    let gpu = fake
        .gpus()
        .unwrap()
        .into_iter()
        .find(|g| g.minor == 0)
        .unwrap();
    let created = fake.mig_devices(&gpu).unwrap();
    let mig = created.first().expect("the partition's MIG device");
    fake.inject_health_event(HealthEvent {
        gpu_uuid: gpu.uuid.clone(),
        gi_id: Some(mig.gi_id),
        ci_id: Some(mig.ci_id),
        kind: HealthEventKind::Xid(94),
    });
    until("the partition tainted", || !taints(&driver).is_empty());
    assert_eq!(
        taints(&driver),
        BTreeMap::from([(
            partition.to_owned(),
            vec!["gpu.nvidia.com/xid=94:NoSchedule".to_owned()]
        )])
    );
}

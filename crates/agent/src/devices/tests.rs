use std::sync::{Arc, Mutex};

use k8s_openapi::api::resource::v1::Device;
use nvdra_gpu::{FakeBackend, GpuBackend, Inventory};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;

fn inventory(profile: &str) -> Inventory {
    FakeBackend::builtin(profile)
        .unwrap_or_else(|| panic!("no builtin profile {profile}"))
        .unwrap()
        .inventory()
        .unwrap()
}

fn device<'a>(devices: &'a [Device], name: &str) -> &'a Device {
    devices
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name}"))
}

fn names(devices: &[Device]) -> Vec<&str> {
    devices.iter().map(|d| d.name.as_str()).collect()
}

/// The device's wire form, as it goes into a ResourceSlice.
fn wire(device: &Device) -> Value {
    serde_json::to_value(device).unwrap()
}

#[test]
fn h100_full_gpu_has_exactly_upstreams_attributes_and_capacity() {
    let devices = node_devices(&inventory("h100-sxm-80gb-x8"));
    assert_eq!(
        wire(device(&devices, "gpu-0")),
        json!({
            "name": "gpu-0",
            "attributes": {
                "type": {"string": "gpu"},
                "uuid": {"string": "GPU-bf88b34e-db80-06f7-0aa4-acb3c54f52e1"},
                "productName": {"string": "NVIDIA H100 80GB HBM3"},
                "brand": {"string": "Nvidia"},
                "architecture": {"string": "Hopper"},
                "cudaComputeCapability": {"version": "9.0.0"},
                "driverVersion": {"version": "570.172.8"},
                "cudaDriverVersion": {"version": "12.8.0"},
                "resource.kubernetes.io/pciBusID": {"string": "0000:18:00.0"},
                "resource.kubernetes.io/pcieRoot": {"string": "pci0000:15"},
            },
            "capacity": {
                // 81559 MiB.
                "memory": {"value": "85520809984"},
            },
        })
    );
}

#[test]
fn a100_static_mig_device_has_exactly_upstreams_attributes_and_capacities() {
    let devices = node_devices(&inventory("a100-40gb-x8-mig"));
    assert_eq!(
        wire(device(&devices, "gpu-4-mig-3g20gb-9-0")),
        json!({
            "name": "gpu-4-mig-3g20gb-9-0",
            "attributes": {
                "type": {"string": "mig"},
                "uuid": {"string": "MIG-4ddcf483-a883-650d-cb21-f8d749e04d68"},
                "parentUUID": {"string": "GPU-1020e9cd-ff76-023b-1349-8f70a752d1cd"},
                "profile": {"string": "3g.20gb"},
                "productName": {"string": "NVIDIA A100-SXM4-40GB"},
                "brand": {"string": "Nvidia"},
                "architecture": {"string": "Ampere"},
                "cudaComputeCapability": {"version": "8.0.0"},
                "driverVersion": {"version": "570.172.8"},
                "cudaDriverVersion": {"version": "12.8.0"},
                "resource.kubernetes.io/pciBusID": {"string": "0000:87:00.0"},
                "resource.kubernetes.io/pcieRoot": {"string": "pci0000:80"},
            },
            "capacity": {
                "multiprocessors": {"value": "42"},
                "copyEngines": {"value": "3"},
                "decoders": {"value": "2"},
                "encoders": {"value": "0"},
                "jpegEngines": {"value": "0"},
                "ofaEngines": {"value": "0"},
                // 19968 MiB.
                "memory": {"value": "20937965568"},
                "memorySlice0": {"value": "1"},
                "memorySlice1": {"value": "1"},
                "memorySlice2": {"value": "1"},
                "memorySlice3": {"value": "1"},
            },
        })
    );
}

#[test]
fn l4_full_gpu_has_exactly_upstreams_attributes_and_capacity() {
    let devices = node_devices(&inventory("l4-x2"));
    assert_eq!(names(&devices), ["gpu-0", "gpu-1"]);
    assert_eq!(
        wire(device(&devices, "gpu-1")),
        json!({
            "name": "gpu-1",
            "attributes": {
                "type": {"string": "gpu"},
                "uuid": {"string": "GPU-e2037a77-e697-09ef-78b2-b8cc96cd6b9b"},
                "productName": {"string": "NVIDIA L4"},
                "brand": {"string": "Nvidia"},
                "architecture": {"string": "Ada Lovelace"},
                "cudaComputeCapability": {"version": "8.9.0"},
                "driverVersion": {"version": "570.172.8"},
                "cudaDriverVersion": {"version": "12.8.0"},
                "resource.kubernetes.io/pciBusID": {"string": "0000:00:04.0"},
                "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
            },
            "capacity": {
                // 23034 MiB.
                "memory": {"value": "24152899584"},
            },
        })
    );
}

#[test]
fn addressing_mode_is_published_when_known() {
    let devices = node_devices(&inventory("gb200-x4"));
    let attributes = device(&devices, "gpu-2").attributes.clone().unwrap();
    assert_eq!(
        attributes
            .get("addressingMode")
            .and_then(|a| a.string.as_deref()),
        Some("ATS")
    );
    assert_eq!(
        attributes
            .get("cudaDriverVersion")
            .and_then(|a| a.version.as_deref()),
        Some("13.0.0")
    );
    assert_eq!(
        attributes
            .get("driverVersion")
            .and_then(|a| a.version.as_deref()),
        Some("580.82.7")
    );
}

#[test]
fn mig_enabled_gpus_offer_their_mig_devices_and_never_themselves() {
    let devices = node_devices(&inventory("a100-40gb-x8-mig"));
    assert_eq!(
        names(&devices),
        [
            "gpu-0",
            "gpu-1",
            "gpu-2",
            "gpu-3",
            "gpu-4-mig-1g5gb-19-6",
            "gpu-4-mig-2g10gb-14-4",
            "gpu-4-mig-3g20gb-9-0",
            "gpu-5-mig-1g5gb-19-0",
            "gpu-5-mig-1g5gb-19-1",
            "gpu-5-mig-1g5gb-19-2",
            "gpu-5-mig-1g5gb-19-3",
            "gpu-5-mig-1g5gb-19-4",
            "gpu-5-mig-1g5gb-19-5",
            "gpu-5-mig-1g5gb-19-6",
            "gpu-6-mig-3g20gb-9-0",
            "gpu-6-mig-3g20gb-9-4",
        ]
    );
    // No device of type `gpu` carries the UUID of a MIG-enabled GPU.
    let inv = inventory("a100-40gb-x8-mig");
    for gpu in inv.gpus.iter().filter(|g| g.info.mig_enabled) {
        for d in &devices {
            let attrs = d.attributes.as_ref().unwrap();
            assert_ne!(
                attrs.get("uuid").and_then(|a| a.string.as_deref()),
                Some(gpu.info.uuid.as_str()),
                "{} offers MIG-enabled {}",
                d.name,
                gpu.info.uuid
            );
        }
    }
}

/// Collects the level and message of every event logged while it is the default subscriber.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), message));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn mig_enabled_gpu_without_mig_devices_offers_nothing_and_warns() {
    let inv = inventory("a100-40gb-x8-mig");
    assert!(inv.gpus[7].info.mig_enabled && inv.gpus[7].mig_devices.is_empty());
    let events = Events::default();
    let index = tracing::subscriber::with_default(events.clone(), || allocatable_index(&inv));
    assert!(!index.keys().any(|name| name.starts_with("gpu-7")));
    assert_eq!(
        *events.0.lock().unwrap(),
        [(
            tracing::Level::WARN,
            "mig mode is enabled but no mig devices exist; the gpu offers no devices".to_owned()
        )]
    );
}

#[test]
fn devices_are_sorted_by_name_bytewise_whatever_the_inventory_order() {
    let mut inv = inventory("l4-x2");
    let template = inv.gpus[0].clone();
    inv.gpus = [11, 2, 10, 0, 1]
        .into_iter()
        .map(|minor| {
            let mut gpu = template.clone();
            gpu.info.minor = minor;
            gpu.info.uuid = format!("GPU-{minor}");
            gpu
        })
        .collect();
    let devices = node_devices(&inv);
    assert_eq!(
        names(&devices),
        ["gpu-0", "gpu-1", "gpu-10", "gpu-11", "gpu-2"]
    );
    assert_eq!(
        allocatable_index(&inv).keys().collect::<Vec<_>>(),
        names(&devices)
    );
}

#[test]
fn duplicate_names_keep_the_first_device() {
    let mut inv = inventory("l4-x2");
    inv.gpus[1].info.minor = 0;
    let index = allocatable_index(&inv);
    assert_eq!(index.len(), 1);
    assert_eq!(index["gpu-0"].uuid(), inv.gpus[0].info.uuid);
}

/// Semantic Versioning 2.0.0 as the API server's `version` attribute validation demands:
/// `MAJOR.MINOR.PATCH` without leading zeros, optional `-pre` and `+build`.
fn is_semver(v: &str) -> bool {
    let numeric = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    };
    let idents = |s: &str| {
        s.split('.')
            .all(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    let (rest, build) = v.split_once('+').map_or((v, None), |(r, b)| (r, Some(b)));
    let (core, pre) = rest
        .split_once('-')
        .map_or((rest, None), |(c, p)| (c, Some(p)));
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| numeric(p))
        && pre.is_none_or(|p| {
            idents(p)
                && p.split('.')
                    .all(|id| !id.bytes().all(|b| b.is_ascii_digit()) || numeric(id))
        })
        && build.is_none_or(idents)
}

#[test]
fn semver_checker_rejects_what_the_api_server_rejects() {
    for good in ["9.0.0", "570.172.8", "1.2.3-rc.1+abc", "0.0.0"] {
        assert!(is_semver(good), "{good}");
    }
    for bad in [
        "570.172.08",
        "12.8",
        "9.0",
        "v1.2.3",
        "1.2.3-",
        "01.2.3",
        "1.2.3-01",
    ] {
        assert!(!is_semver(bad), "{bad}");
    }
}

#[test]
fn every_version_attribute_is_valid_semver() {
    for profile in [
        "h100-sxm-80gb-x8",
        "h200-x8",
        "gb200-x4",
        "a100-40gb-x8-mig",
        "l4-x2",
    ] {
        let devices = node_devices(&inventory(profile));
        assert!(!devices.is_empty(), "{profile}");
        for d in &devices {
            let versions: Vec<(&String, &str)> = d
                .attributes
                .iter()
                .flatten()
                .filter_map(|(name, a)| a.version.as_deref().map(|v| (name, v)))
                .collect();
            assert_eq!(versions.len(), 3, "{profile} {}", d.name);
            for (name, v) in versions {
                assert!(is_semver(v), "{profile} {} {name}: {v:?}", d.name);
            }
        }
    }
}

#[test]
fn every_attribute_sets_exactly_one_value() {
    for profile in ["gb200-x4", "a100-40gb-x8-mig"] {
        for d in node_devices(&inventory(profile)) {
            for (name, a) in d.attributes.iter().flatten() {
                let set = [
                    a.string.is_some(),
                    a.version.is_some(),
                    a.int.is_some(),
                    a.bool.is_some(),
                ];
                assert_eq!(set.iter().filter(|s| **s).count(), 1, "{} {name}", d.name);
            }
        }
    }
}

/// What a DeviceClass or claim selector sees: unqualified names resolve to the driver domain,
/// so `device.attributes['gpu.nvidia.com'].productName` is the attribute `productName`.
#[test]
fn cel_style_lookups_match_an_h100() {
    let devices = node_devices(&inventory("h100-sxm-80gb-x8"));
    let attributes = device(&devices, "gpu-3").attributes.clone().unwrap();
    let cel = |name: &str| {
        attributes
            .get(name)
            .unwrap_or_else(|| panic!("no attribute {name}"))
    };
    // The `gpu.nvidia.com` DeviceClass selector.
    assert_eq!(cel("type").string.as_deref(), Some("gpu"));
    assert_eq!(
        cel("productName").string.as_deref(),
        Some("NVIDIA H100 80GB HBM3")
    );
    assert_eq!(
        cel("cudaComputeCapability").version.as_deref(),
        Some("9.0.0")
    );
    assert_eq!(cel("architecture").string.as_deref(), Some("Hopper"));
    // Attributes are unqualified, except the two standard ones.
    for name in attributes.keys() {
        assert!(
            !name.contains('/') || name.starts_with("resource.kubernetes.io/"),
            "{name}"
        );
    }
    assert!(!attributes.contains_key("index") && !attributes.contains_key("minor"));
}

#[test]
fn index_knows_the_hardware_behind_each_name() {
    let inv = inventory("a100-40gb-x8-mig");
    let index = allocatable_index(&inv);
    assert_eq!(index.keys().collect::<Vec<_>>(), names(&node_devices(&inv)));

    let gpu = &index["gpu-2"];
    assert_eq!(gpu.device_type(), DeviceType::Gpu);
    assert_eq!(
        gpu,
        &AllocatableDevice::Gpu {
            info: inv.gpus[2].info.clone()
        }
    );
    assert_eq!(gpu.physical_gpu().unwrap().minor, 2);

    let mig = &index["gpu-4-mig-2g10gb-14-4"];
    assert_eq!(mig.device_type(), DeviceType::Mig);
    assert_eq!(mig.uuid(), "MIG-acc12ef7-6de3-d166-d3b7-bc8e9e26cde2");
    assert_eq!(
        mig,
        &AllocatableDevice::Mig {
            parent: inv.gpus[4].info.clone(),
            mig: inv.gpus[4].mig_devices[1].clone(),
        }
    );
    assert_eq!(mig.physical_gpu().unwrap().uuid, inv.gpus[4].info.uuid);
    assert_eq!(mig.to_device(&inv.driver).name, "gpu-4-mig-2g10gb-14-4");
}

#[test]
fn device_types_use_upstream_names() {
    let cases = [
        (DeviceType::Gpu, "gpu"),
        (DeviceType::Mig, "mig"),
        (DeviceType::Vfio, "vfio"),
    ];
    for (t, want) in cases {
        assert_eq!(t.to_string(), want);
    }
}

#[test]
fn attribute_values_map_onto_the_one_of() {
    let cases = [
        (AttributeValue::String("x".into()), json!({"string": "x"})),
        (
            AttributeValue::Version("1.2.3".into()),
            json!({"version": "1.2.3"}),
        ),
        (AttributeValue::Int(-4), json!({"int": -4})),
        (AttributeValue::Bool(true), json!({"bool": true})),
    ];
    for (value, want) in cases {
        assert_eq!(
            serde_json::to_value(device_attribute(&value)).unwrap(),
            want
        );
    }
    assert_eq!(
        serde_json::to_value(device_capacity(u64::MAX)).unwrap(),
        json!({"value": "18446744073709551615"})
    );
}

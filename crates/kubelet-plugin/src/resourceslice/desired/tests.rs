use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{Counter, DeviceCounterConsumption, DeviceTaint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use pretty_assertions::assert_eq;

use super::*;

fn owner() -> SliceOwner {
    SliceOwner {
        driver: "gpu.example.com".into(),
        node_name: "node-a".into(),
        node_uid: "uid-a".into(),
    }
}

fn device(name: &str) -> Device {
    Device {
        name: name.into(),
        ..Device::default()
    }
}

fn devices(prefix: &str, n: usize) -> Vec<Device> {
    (0..n).map(|i| device(&format!("{prefix}-{i}"))).collect()
}

fn tainted(name: &str) -> Device {
    Device {
        taints: Some(vec![DeviceTaint {
            key: "example.com/unhealthy".into(),
            effect: "NoSchedule".into(),
            ..DeviceTaint::default()
        }]),
        ..device(name)
    }
}

fn counters(pairs: &[(&str, &str)]) -> BTreeMap<String, Counter> {
    pairs
        .iter()
        .map(|(name, value)| {
            (
                (*name).to_owned(),
                Counter {
                    value: Quantity((*value).into()),
                },
            )
        })
        .collect()
}

fn set(name: &str) -> CounterSet {
    CounterSet {
        name: name.into(),
        counters: counters(&[("memory", "80Gi")]),
    }
}

fn consumer(name: &str, sets: &[&str]) -> Device {
    Device {
        consumes_counters: Some(
            sets.iter()
                .map(|set| DeviceCounterConsumption {
                    counter_set: (*set).into(),
                    counters: counters(&[("memory", "10Gi")]),
                })
                .collect(),
        ),
        ..device(name)
    }
}

/// Each slice as (counter-set names, device names).
fn shape(slices: &[ResourceSlice]) -> Vec<(Vec<String>, Vec<String>)> {
    slices
        .iter()
        .map(|s| {
            (
                s.spec
                    .shared_counters
                    .iter()
                    .flatten()
                    .map(|c| c.name.clone())
                    .collect(),
                s.spec
                    .devices
                    .iter()
                    .flatten()
                    .map(|d| d.name.clone())
                    .collect(),
            )
        })
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn range(prefix: &str, from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn builds_complete_slices() {
    let resources = NodeResources {
        devices: vec![device("gpu-0")],
        shared_counters: vec![],
    };
    let slices = desired_slices(&owner(), CounterLayout::Separate, &resources).unwrap();
    let want = ResourceSlice {
        metadata: ObjectMeta {
            name: Some("node-a-gpu-example-com-00000".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: "node-a".into(),
                uid: "uid-a".into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        spec: ResourceSliceSpec {
            driver: "gpu.example.com".into(),
            node_name: Some("node-a".into()),
            pool: ResourcePool {
                name: "node-a".into(),
                generation: 0,
                resource_slice_count: 1,
            },
            devices: Some(vec![device("gpu-0")]),
            ..ResourceSliceSpec::default()
        },
    };
    assert_eq!(slices, vec![want]);
}

#[test]
fn layouts_and_splitting() {
    type Shape = Vec<(Vec<String>, Vec<String>)>;
    let mut heavy_in_middle = devices("d", 100);
    heavy_in_middle.push(tainted("t-0"));
    heavy_in_middle.extend(devices("e", 100));
    let cases: Vec<(&str, CounterLayout, NodeResources, Shape)> = vec![
        (
            "nothing: one empty slice",
            CounterLayout::Separate,
            NodeResources::default(),
            vec![(vec![], vec![])],
        ),
        (
            "nothing, combined: one empty slice",
            CounterLayout::Combined,
            NodeResources::default(),
            vec![(vec![], vec![])],
        ),
        (
            "128 plain devices fit one slice",
            CounterLayout::Separate,
            NodeResources {
                devices: devices("d", 128),
                ..NodeResources::default()
            },
            vec![(vec![], range("d", 0, 128))],
        ),
        (
            "129 plain devices need two",
            CounterLayout::Separate,
            NodeResources {
                devices: devices("d", 129),
                ..NodeResources::default()
            },
            vec![(vec![], range("d", 0, 128)), (vec![], range("d", 128, 129))],
        ),
        (
            "tainted devices: 64 per slice",
            CounterLayout::Separate,
            NodeResources {
                devices: (0..65).map(|i| tainted(&format!("t-{i}"))).collect(),
                ..NodeResources::default()
            },
            vec![(vec![], range("t", 0, 64)), (vec![], range("t", 64, 65))],
        ),
        (
            "a tainted device closes a slice already past 64",
            CounterLayout::Separate,
            NodeResources {
                devices: heavy_in_middle,
                ..NodeResources::default()
            },
            vec![
                (vec![], range("d", 0, 100)),
                (vec![], [names(&["t-0"]), range("e", 0, 63)].concat()),
                (vec![], range("e", 63, 100)),
            ],
        ),
        (
            "1.35+: counters-only slice first, then devices",
            CounterLayout::Separate,
            NodeResources {
                devices: vec![
                    consumer("gpu-0", &["s0"]),
                    device("other"),
                    consumer("gpu-1", &["s1"]),
                ],
                shared_counters: vec![set("s0"), set("s1")],
            },
            vec![
                (names(&["s0", "s1"]), vec![]),
                (vec![], names(&["gpu-0", "other", "gpu-1"])),
            ],
        ),
        (
            "1.35+: counters only",
            CounterLayout::Separate,
            NodeResources {
                shared_counters: vec![set("s0")],
                ..NodeResources::default()
            },
            vec![(names(&["s0"]), vec![])],
        ),
        (
            "1.35+: at most 8 counter sets per slice",
            CounterLayout::Separate,
            NodeResources {
                shared_counters: (0..9).map(|i| set(&format!("s{i}"))).collect(),
                ..NodeResources::default()
            },
            vec![
                ((0..8).map(|i| format!("s{i}")).collect(), vec![]),
                (names(&["s8"]), vec![]),
            ],
        ),
        (
            "1.34: each counter set with its consumers, plain devices last",
            CounterLayout::Combined,
            NodeResources {
                devices: vec![
                    consumer("gpu-1", &["s1"]),
                    device("plain"),
                    consumer("gpu-0", &["s0"]),
                    consumer("mig-0", &["s0"]),
                ],
                shared_counters: vec![set("s0"), set("s1"), set("unused")],
            },
            vec![
                (names(&["s0"]), names(&["gpu-0", "mig-0"])),
                (names(&["s1"]), names(&["gpu-1"])),
                (names(&["unused"]), vec![]),
                (vec![], names(&["plain"])),
            ],
        ),
        (
            "1.34: a device consuming two sets joins them",
            CounterLayout::Combined,
            NodeResources {
                devices: vec![
                    consumer("a", &["s2"]),
                    consumer("both", &["s2", "s0"]),
                    consumer("b", &["s1"]),
                ],
                shared_counters: vec![set("s0"), set("s1"), set("s2")],
            },
            vec![
                (names(&["s0", "s2"]), names(&["a", "both"])),
                (names(&["s1"]), names(&["b"])),
            ],
        ),
    ];
    for (name, layout, resources, want) in cases {
        let slices = desired_slices(&owner(), layout, &resources).unwrap();
        assert_eq!(shape(&slices), want, "{name}");
        let count = i64::try_from(slices.len()).unwrap();
        for (index, slice) in slices.iter().enumerate() {
            assert_eq!(
                slice.metadata.name.as_deref(),
                Some(slice_name("node-a", "gpu.example.com", index).as_str()),
                "{name}"
            );
            assert_eq!(slice.spec.pool.resource_slice_count, count, "{name}");
        }
    }
}

#[test]
fn validation_reports_every_problem() {
    let mut unknown_counter = consumer("gpu-2", &["s0"]);
    if let Some(consumption) = unknown_counter.consumes_counters.as_mut() {
        consumption[0].counters = counters(&[("cores", "1")]);
    }
    let resources = NodeResources {
        devices: vec![
            consumer("gpu-0", &["s0"]),
            device("gpu-0"),
            device("gpu-0"),
            consumer("gpu-1", &["missing"]),
            unknown_counter,
        ],
        shared_counters: vec![set("s0"), set("s0")],
    };
    let err = validate(&resources, CounterLayout::Separate).unwrap_err();
    let Error::InvalidResources(problems) = &err else {
        panic!("unexpected error {err}");
    };
    assert_eq!(
        problems,
        &vec![
            Problem::DuplicateDevice("gpu-0".into()),
            Problem::DuplicateCounterSet("s0".into()),
            Problem::UnknownCounterSet {
                device: "gpu-1".into(),
                counter_set: "missing".into()
            },
            Problem::UnknownCounter {
                device: "gpu-2".into(),
                counter_set: "s0".into(),
                counter: "cores".into()
            },
        ]
    );
    assert_eq!(
        err.to_string(),
        r#"invalid node resources: device name "gpu-0" is used more than once; counter set name "s0" is used more than once; device "gpu-1" consumes counters from unknown counter set "missing"; device "gpu-2" consumes unknown counter "cores" of counter set "s0""#
    );
    assert!(desired_slices(&owner(), CounterLayout::Separate, &resources).is_err());
}

#[test]
fn combined_layout_rejects_oversized_counter_groups() {
    let resources = NodeResources {
        devices: (0..65)
            .map(|i| consumer(&format!("mig-{i}"), &["s0"]))
            .collect(),
        shared_counters: vec![set("s0")],
    };
    assert!(validate(&resources, CounterLayout::Separate).is_ok());
    let err = validate(&resources, CounterLayout::Combined).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid node resources: counter sets ["s0"] are consumed by 65 devices, but one slice holds at most 64 of them"#
    );
}

#[test]
fn taint_times_are_whole_seconds() {
    let mut device = tainted("gpu-0");
    let at = Timestamp::from_nanosecond(1_700_000_000_900_000_000).unwrap();
    if let Some(taints) = device.taints.as_mut() {
        taints[0].time_added = Some(Time(at));
    }
    let resources = NodeResources {
        devices: vec![device],
        ..NodeResources::default()
    };
    let slices = desired_slices(&owner(), CounterLayout::Separate, &resources).unwrap();
    let taint = &slices[0].spec.devices.as_ref().unwrap()[0]
        .taints
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        taint.time_added,
        Some(Time(Timestamp::from_second(1_700_000_000).unwrap()))
    );
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[test]
fn slice_names() {
    assert_eq!(
        slice_name("node-a", "gpu.example.com", 0),
        "node-a-gpu-example-com-00000"
    );
    assert_eq!(
        slice_name("node-a", "gpu.example.com", 26),
        "node-a-gpu-example-com-0001a"
    );
    assert_eq!(
        slice_name("n.example.org", "gpu.example.com", 1),
        "n.example.org-gpu-example-com-00001"
    );
    // Fixed width makes name order index order.
    let mut sorted: Vec<String> = (0..300).map(|i| slice_name("n", "d.io", i)).collect();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..300)
            .map(|i| slice_name("n", "d.io", i))
            .collect::<Vec<_>>()
    );

    let long_node = format!("{}.{}", "a".repeat(200), "b".repeat(52)); // 253 characters
    let long = slice_name(&long_node, "gpu.example.com", 3);
    assert_eq!(long.len(), 253, "{long}");
    assert!(is_dns_subdomain(&long), "{long}");
    assert!(long.ends_with("-00003"), "{long}");
    assert_eq!(
        long,
        slice_name(&long_node, "gpu.example.com", 3),
        "deterministic"
    );
    let twin_node = format!("{}.{}c", "a".repeat(200), "b".repeat(51)); // differs after the cut
    assert_ne!(
        long,
        slice_name(&twin_node, "gpu.example.com", 3),
        "the hash tells long prefixes apart"
    );
    // Every cut position, including those landing on '.' or '-', yields a valid, unique name.
    let mut seen = std::collections::HashSet::new();
    for len in 1..=253 {
        let node: String = "a-b.c".chars().cycle().take(len).collect();
        let node = node.trim_end_matches(['-', '.']);
        let name = slice_name(node, "x-y.example.com", 7);
        assert!(is_dns_subdomain(&name), "{name}");
        assert!(seen.insert(name.clone()) || node.len() < len, "{name}");
    }
}

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    Counter, CounterSet, Device, DeviceAttribute, DeviceCapacity, DeviceCounterConsumption,
    DeviceTaint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use pretty_assertions::assert_eq;

use super::*;
use crate::resourceslice::{CounterLayout, NodeResources, SliceOwner, desired_slices};

const DRIVER: &str = "gpu.example.com";
const NODE: &str = "node-a";

fn owner(uid: &str) -> SliceOwner {
    SliceOwner {
        driver: DRIVER.into(),
        node_name: NODE.into(),
        node_uid: uid.into(),
    }
}

fn device(name: &str) -> Device {
    Device {
        name: name.into(),
        ..Device::default()
    }
}

fn devices(n: usize) -> Vec<Device> {
    (0..n).map(|i| device(&format!("gpu-{i}"))).collect()
}

fn with_index(mut device: Device, index: i64) -> Device {
    device.attributes = Some(BTreeMap::from([(
        "index".to_owned(),
        DeviceAttribute {
            int: Some(index),
            ..DeviceAttribute::default()
        },
    )]));
    device
}

fn with_memory(mut device: Device, memory: &str) -> Device {
    device.capacity = Some(BTreeMap::from([(
        "memory".to_owned(),
        DeviceCapacity {
            value: Quantity(memory.into()),
            request_policy: None,
        },
    )]));
    device
}

fn tainted(mut device: Device, at: Option<i64>) -> Device {
    device.taints = Some(vec![DeviceTaint {
        key: "example.com/unhealthy".into(),
        value: Some("ecc".into()),
        effect: "NoSchedule".into(),
        time_added: at.map(|s| Time(Timestamp::from_second(s).unwrap())),
    }]);
    device
}

fn resources(devices: Vec<Device>) -> NodeResources {
    NodeResources {
        devices,
        shared_counters: vec![],
    }
}

fn desired(resources: &NodeResources) -> Vec<ResourceSlice> {
    desired_in(CounterLayout::Separate, resources)
}

fn desired_in(layout: CounterLayout, resources: &NodeResources) -> Vec<ResourceSlice> {
    desired_slices(&owner("uid-a"), layout, resources).unwrap()
}

/// The slices as the API server would list them after we wrote them with `generation`.
fn served(slices: Vec<ResourceSlice>, generation: i64) -> Vec<ResourceSlice> {
    slices
        .into_iter()
        .map(|s| served_one(s, generation))
        .collect()
}

fn served_one(mut slice: ResourceSlice, generation: i64) -> ResourceSlice {
    let name = slice.metadata.name.clone().unwrap();
    slice.metadata.uid = Some(format!("uid-{name}"));
    slice.metadata.resource_version = Some("10".into());
    slice.spec.pool.generation = generation;
    slice
}

/// The slices as a plan writes them: pool generation set.
fn written(slices: Vec<ResourceSlice>, generation: i64) -> Vec<ResourceSlice> {
    slices
        .into_iter()
        .map(|mut s| {
            s.spec.pool.generation = generation;
            s
        })
        .collect()
}

fn deleted(slice: &ResourceSlice) -> SliceRef {
    SliceRef {
        name: slice.metadata.name.clone().unwrap(),
        uid: slice.metadata.uid.clone(),
        resource_version: slice.metadata.resource_version.clone(),
    }
}

/// A slice another writer left in our pool, e.g. the Go driver's generated name.
fn foreign(name: &str, pool: &str, generation: i64) -> ResourceSlice {
    let mut slice = desired(&resources(vec![device("old")])).remove(0);
    slice.metadata.name = Some(name.into());
    slice.spec.pool.name = pool.into();
    served_one(slice, generation)
}

/// One counter set and one device consuming from it.
fn partitioned() -> NodeResources {
    NodeResources {
        devices: vec![Device {
            consumes_counters: Some(vec![DeviceCounterConsumption {
                counter_set: "gpu-0-set".into(),
                counters: BTreeMap::from([(
                    "memory".to_owned(),
                    Counter {
                        value: Quantity("10Gi".into()),
                    },
                )]),
            }]),
            ..device("gpu-0-mig")
        }],
        shared_counters: vec![CounterSet {
            name: "gpu-0-set".into(),
            counters: BTreeMap::from([(
                "memory".to_owned(),
                Counter {
                    value: Quantity("80Gi".into()),
                },
            )]),
        }],
    }
}

struct Case {
    name: &'static str,
    existing: Vec<ResourceSlice>,
    desired: Vec<ResourceSlice>,
    want: Plan,
}

#[test]
fn plans() {
    let four = resources(
        (0..4)
            .map(|i| with_index(device(&format!("gpu-{i}")), i))
            .collect(),
    );
    let four_changed = resources(
        (0..4)
            .map(|i| with_index(device(&format!("gpu-{i}")), if i == 2 { 20 } else { i }))
            .collect(),
    );
    let two_slices = resources(devices(129));
    let two_slices_changed = resources(
        devices(129)
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                if i == 0 || i == 128 {
                    with_index(d, 1)
                } else {
                    d
                }
            })
            .collect(),
    );
    let counters = partitioned();
    let old_slice = served(desired(&two_slices), 5).remove(1);
    let go_named = foreign("node-a-gpu.example.com-x7k2p", NODE, 9);
    let other_pool = foreign("node-a-gpu-example-com-extra", "another-pool", 42);

    let cases = vec![
        Case {
            name: "nothing changed: empty plan",
            existing: served(desired(&four), 3),
            desired: desired(&four),
            want: Plan {
                generation: 3,
                ..Plan::default()
            },
        },
        Case {
            name: "one device changed: one apply, no bump",
            existing: served(desired(&four), 3),
            desired: desired(&four_changed),
            want: Plan {
                generation: 3,
                apply: written(desired(&four_changed), 3),
                delete: vec![],
            },
        },
        Case {
            name: "changes in two slices: bump, everything rewritten",
            existing: served(desired(&two_slices), 3),
            desired: desired(&two_slices_changed),
            want: Plan {
                generation: 4,
                apply: written(desired(&two_slices_changed), 4),
                delete: vec![],
            },
        },
        Case {
            name: "a device that needs a new slice: bump, everything rewritten",
            existing: served(desired(&resources(devices(128))), 3),
            desired: desired(&two_slices),
            want: Plan {
                generation: 4,
                apply: written(desired(&two_slices), 4),
                delete: vec![],
            },
        },
        Case {
            name: "fewer slices: bump, rewrite, then delete the surplus",
            existing: served(desired(&two_slices), 5),
            desired: desired(&resources(devices(128))),
            want: Plan {
                generation: 6,
                apply: written(desired(&resources(devices(128))), 6),
                delete: vec![deleted(&old_slice)],
            },
        },
        Case {
            name: "all slices deleted behind our back: recreate",
            existing: vec![],
            desired: desired(&four),
            want: Plan {
                generation: 1,
                apply: written(desired(&four), 1),
                delete: vec![],
            },
        },
        Case {
            name: "one of two slices deleted behind our back: bump and rewrite both",
            existing: served(desired(&two_slices), 7)
                .into_iter()
                .take(1)
                .collect(),
            desired: desired(&two_slices),
            want: Plan {
                generation: 8,
                apply: written(desired(&two_slices), 8),
                delete: vec![],
            },
        },
        Case {
            name: "slice edited behind our back: rewritten",
            existing: served(desired(&four_changed), 3),
            desired: desired(&four),
            want: Plan {
                generation: 3,
                apply: written(desired(&four), 3),
                delete: vec![],
            },
        },
        Case {
            name: "stale slice with a foreign name in our pool: bump, delete after rewrite",
            existing: [served(desired(&four), 3), vec![go_named.clone()]].concat(),
            desired: desired(&four),
            want: Plan {
                // The stale slice has the highest generation, so it sets the base.
                generation: 10,
                apply: written(desired(&four), 10),
                delete: vec![deleted(&go_named)],
            },
        },
        Case {
            name: "our driver and node but another pool: deleted without bump",
            existing: [served(desired(&four), 3), vec![other_pool.clone()]].concat(),
            desired: desired(&four),
            want: Plan {
                generation: 3,
                apply: vec![],
                delete: vec![deleted(&other_pool)],
            },
        },
        Case {
            name: "slices of other drivers or nodes are never touched",
            existing: {
                let mut other_driver = foreign("node-a-net-example-com-00000", NODE, 1);
                other_driver.spec.driver = "net.example.com".into();
                let mut other_node = foreign("node-b-gpu-example-com-00000", "node-b", 1);
                other_node.spec.node_name = Some("node-b".into());
                [served(desired(&four), 3), vec![other_driver, other_node]].concat()
            },
            desired: desired(&four),
            want: Plan {
                generation: 3,
                ..Plan::default()
            },
        },
        Case {
            name: "one slice of an older generation: rewritten with the current one, no bump",
            existing: {
                let mut existing = served(desired(&two_slices), 4);
                existing[1].spec.pool.generation = 3;
                existing
            },
            desired: desired(&two_slices),
            want: Plan {
                generation: 4,
                apply: written(desired(&two_slices), 4)
                    .into_iter()
                    .skip(1)
                    .collect(),
                delete: vec![],
            },
        },
        Case {
            name: "node recreated (new UID): ownerReference rewritten",
            existing: served(
                desired_slices(&owner("uid-old"), CounterLayout::Separate, &four).unwrap(),
                2,
            ),
            desired: desired(&four),
            want: Plan {
                generation: 2,
                apply: written(desired(&four), 2),
                delete: vec![],
            },
        },
        Case {
            name: "server's canonical quantities and omitted empties are no change",
            existing: served(
                desired(&resources(vec![with_memory(device("gpu-0"), "1Gi")])),
                2,
            ),
            desired: desired(&resources(vec![Device {
                attributes: Some(BTreeMap::new()),
                taints: Some(vec![]),
                ..with_memory(device("gpu-0"), "1024Mi")
            }])),
            want: Plan {
                generation: 2,
                ..Plan::default()
            },
        },
        Case {
            name: "taint time kept by the server is inherited, not a change",
            existing: served(
                desired(&resources(vec![tainted(
                    device("gpu-0"),
                    Some(1_700_000_000),
                )])),
                2,
            ),
            desired: desired(&resources(vec![tainted(device("gpu-0"), None)])),
            want: Plan {
                generation: 2,
                ..Plan::default()
            },
        },
        Case {
            name: "a rewrite carries the inherited taint time",
            existing: served(
                desired(&resources(vec![tainted(
                    device("gpu-0"),
                    Some(1_700_000_000),
                )])),
                2,
            ),
            desired: desired(&resources(vec![with_index(
                tainted(device("gpu-0"), None),
                1,
            )])),
            want: Plan {
                generation: 2,
                apply: written(
                    desired(&resources(vec![with_index(
                        tainted(device("gpu-0"), Some(1_700_000_000)),
                        1,
                    )])),
                    2,
                ),
                delete: vec![],
            },
        },
        Case {
            name: "1.34 to 1.35 upgrade: combined slice becomes counters + devices slices",
            existing: served(desired_in(CounterLayout::Combined, &counters), 1),
            desired: desired_in(CounterLayout::Separate, &counters),
            want: Plan {
                generation: 2,
                apply: written(desired_in(CounterLayout::Separate, &counters), 2),
                delete: vec![],
            },
        },
        Case {
            name: "1.35 layout unchanged: empty plan",
            existing: served(desired_in(CounterLayout::Separate, &counters), 2),
            desired: desired_in(CounterLayout::Separate, &counters),
            want: Plan {
                generation: 2,
                ..Plan::default()
            },
        },
        Case {
            name: "no desired slices: everything listed is deleted",
            existing: served(desired(&four), 3),
            desired: vec![],
            want: Plan {
                generation: 0,
                apply: vec![],
                delete: served(desired(&four), 3).iter().map(deleted).collect(),
            },
        },
    ];
    for case in cases {
        let got = plan(&case.existing, case.desired);
        assert_eq!(got, case.want, "{}", case.name);
    }
}

#[test]
fn layout_shapes_written_slices() {
    let shape = |layout| -> Vec<(bool, bool)> {
        plan(&[], desired_in(layout, &partitioned()))
            .apply
            .iter()
            .map(|s| (s.spec.shared_counters.is_some(), s.spec.devices.is_some()))
            .collect()
    };
    assert_eq!(
        shape(CounterLayout::Combined),
        vec![(true, true)],
        "1.34: counters beside their consumer"
    );
    assert_eq!(
        shape(CounterLayout::Separate),
        vec![(true, false), (false, true)],
        "1.35: counters alone, first"
    );
}

#[test]
fn plan_applies_are_in_priority_order_with_count() {
    let got = plan(&[], desired(&resources(devices(300))));
    let names: Vec<_> = got
        .apply
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "node-a-gpu-example-com-00000",
            "node-a-gpu-example-com-00001",
            "node-a-gpu-example-com-00002"
        ]
    );
    assert!(
        got.apply
            .iter()
            .all(|s| s.spec.pool.resource_slice_count == 3 && s.spec.pool.generation == 1)
    );
    assert!(!got.is_empty());
    assert!(Plan::default().is_empty());
}

//! Semantic comparison of slice specs, and detection of fields the server dropped.
//!
//! A spec read back from the API server differs from the one we built in ways that mean
//! nothing: empty lists and maps are omitted, quantities are canonicalised ("1024Mi" → "1Gi").
//! [`comparable`] maps a spec to a JSON value in which those differences vanish, so "nothing
//! changed" really produces no write. Anything else that differs is a real difference: an edit
//! behind our back, or a field the server does not keep ([`DroppedFields`]).
//!
//! Failure mode: a spec that cannot be serialised compares unequal to everything, which costs
//! a rewrite, never a missed change.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::resource::v1::{Device, ResourceSliceSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

use super::quantity::nano_value;

/// The server returned a slice without some fields we sent, typically because a feature gate
/// is off (device taints, partitionable devices, binding conditions, consumable capacity).
/// The slice is still published, just without those fields; we do not rewrite it in a loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedFields {
    /// Slice name.
    pub slice: String,
    /// JSON paths of the dropped or altered fields, list indices written as `[*]`, e.g.
    /// `spec.devices[*].taints`.
    pub fields: Vec<String>,
}

impl fmt::Display for DroppedFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the API server dropped {} from resource slice {:?} (is a feature gate disabled?)",
            self.fields.join(", "),
            self.slice
        )
    }
}

/// Whether two specs mean the same to the API server.
pub(crate) fn same_spec(a: &ResourceSliceSpec, b: &ResourceSliceSpec) -> bool {
    match (comparable(a), comparable(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Paths of fields present in `sent` but missing or different in `returned`. Fields only the
/// server set (defaults) are not reported.
pub(crate) fn dropped_paths(sent: &ResourceSliceSpec, returned: &ResourceSliceSpec) -> Vec<String> {
    let mut out = BTreeSet::new();
    match (comparable(sent), comparable(returned)) {
        (Some(sent), Some(returned)) => missing(&sent, &returned, "spec", &mut out),
        _ => {
            out.insert("spec".to_owned());
        }
    }
    out.into_iter().collect()
}

fn missing(sent: &Value, returned: &Value, path: &str, out: &mut BTreeSet<String>) {
    match (sent, returned) {
        (Value::Object(sent), Value::Object(returned)) => {
            for (key, value) in sent {
                let path = format!("{path}.{key}");
                match returned.get(key) {
                    Some(other) => missing(value, other, &path, out),
                    None => {
                        out.insert(path);
                    }
                }
            }
        }
        (Value::Array(sent), Value::Array(returned)) if sent.len() == returned.len() => {
            let path = format!("{path}[*]");
            for (value, other) in sent.iter().zip(returned) {
                missing(value, other, &path, out);
            }
        }
        (sent, returned) if sent == returned => {}
        _ => {
            out.insert(path.to_owned());
        }
    }
}

/// The spec as JSON with quantities replaced by their numeric value and null, empty-list and
/// empty-map fields removed.
fn comparable(spec: &ResourceSliceSpec) -> Option<Value> {
    let mut spec = spec.clone();
    for device in spec.devices.iter_mut().flatten() {
        normalize_device(device);
    }
    for set in spec.shared_counters.iter_mut().flatten() {
        for counter in set.counters.values_mut() {
            normalize(&mut counter.value);
        }
    }
    let mut value = serde_json::to_value(&spec).ok()?;
    prune(&mut value);
    Some(value)
}

fn normalize_device(device: &mut Device) {
    for capacity in device.capacity.iter_mut().flat_map(|c| c.values_mut()) {
        normalize(&mut capacity.value);
        if let Some(policy) = &mut capacity.request_policy {
            policy.default.iter_mut().for_each(normalize);
            policy.valid_values.iter_mut().flatten().for_each(normalize);
            if let Some(range) = &mut policy.valid_range {
                normalize(&mut range.min);
                range.max.iter_mut().for_each(normalize);
                range.step.iter_mut().for_each(normalize);
            }
        }
    }
    for consumption in device.consumes_counters.iter_mut().flatten() {
        for counter in consumption.counters.values_mut() {
            normalize(&mut counter.value);
        }
    }
}

fn normalize(quantity: &mut Quantity) {
    if let Some(nanos) = nano_value(&quantity.0) {
        // Not a valid quantity string on purpose: it only ever meets another normalized one.
        quantity.0 = format!("{nanos} nano");
    }
}

fn prune(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(prune);
            map.retain(|_, v| match v {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            });
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::resource::v1::{
        Counter, CounterSet, DeviceAttribute, DeviceCapacity, DeviceTaint,
    };

    use super::*;

    fn device(name: &str) -> Device {
        Device {
            name: name.into(),
            ..Device::default()
        }
    }

    fn spec(devices: Vec<Device>) -> ResourceSliceSpec {
        ResourceSliceSpec {
            driver: "gpu.example.com".into(),
            node_name: Some("node-a".into()),
            devices: Some(devices),
            ..ResourceSliceSpec::default()
        }
    }

    fn with_capacity(name: &str, value: &str) -> Device {
        Device {
            capacity: Some(BTreeMap::from([(
                "memory".to_owned(),
                DeviceCapacity {
                    value: Quantity(value.into()),
                    request_policy: None,
                },
            )])),
            ..device(name)
        }
    }

    #[test]
    fn server_normalisations_are_not_differences() {
        let cases = [
            (
                "empty lists and maps",
                ResourceSliceSpec {
                    shared_counters: Some(vec![]),
                    ..spec(vec![Device {
                        attributes: Some(BTreeMap::new()),
                        taints: Some(vec![]),
                        ..device("gpu-0")
                    }])
                },
                spec(vec![device("gpu-0")]),
            ),
            (
                "canonical quantities",
                ResourceSliceSpec {
                    shared_counters: Some(vec![CounterSet {
                        name: "set".into(),
                        counters: BTreeMap::from([(
                            "memory".to_owned(),
                            Counter {
                                value: Quantity("1024Mi".into()),
                            },
                        )]),
                    }]),
                    ..spec(vec![with_capacity("gpu-0", "0.5Gi")])
                },
                ResourceSliceSpec {
                    shared_counters: Some(vec![CounterSet {
                        name: "set".into(),
                        counters: BTreeMap::from([(
                            "memory".to_owned(),
                            Counter {
                                value: Quantity("1Gi".into()),
                            },
                        )]),
                    }]),
                    ..spec(vec![with_capacity("gpu-0", "512Mi")])
                },
            ),
        ];
        for (name, a, b) in cases {
            assert!(same_spec(&a, &b), "{name}");
            assert_eq!(dropped_paths(&a, &b), Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn real_differences_are_differences() {
        let attribute = |value: i64| Device {
            attributes: Some(BTreeMap::from([(
                "index".to_owned(),
                DeviceAttribute {
                    int: Some(value),
                    ..DeviceAttribute::default()
                },
            )])),
            ..device("gpu-0")
        };
        let cases = [
            (
                "attribute value",
                spec(vec![attribute(1)]),
                spec(vec![attribute(2)]),
            ),
            (
                "quantity value",
                spec(vec![with_capacity("gpu-0", "1Gi")]),
                spec(vec![with_capacity("gpu-0", "1G")]),
            ),
            (
                "extra device",
                spec(vec![device("gpu-0")]),
                spec(vec![device("gpu-0"), device("gpu-1")]),
            ),
            (
                "device order",
                spec(vec![device("gpu-0"), device("gpu-1")]),
                spec(vec![device("gpu-1"), device("gpu-0")]),
            ),
        ];
        for (name, a, b) in cases {
            assert!(!same_spec(&a, &b), "{name}");
        }
    }

    #[test]
    fn reports_dropped_paths_once_per_field() {
        let tainted = |name: &str| Device {
            taints: Some(vec![DeviceTaint {
                key: "example.com/unhealthy".into(),
                effect: "NoSchedule".into(),
                ..DeviceTaint::default()
            }]),
            ..with_capacity(name, "1Gi")
        };
        let sent = spec(vec![tainted("gpu-0"), tainted("gpu-1")]);
        let returned = spec(vec![
            with_capacity("gpu-0", "1Gi"),
            with_capacity("gpu-1", "1Gi"),
        ]);
        assert_eq!(
            dropped_paths(&sent, &returned),
            vec!["spec.devices[*].taints"]
        );
        let defaulted = spec(vec![Device {
            allow_multiple_allocations: Some(false),
            ..device("gpu-0")
        }]);
        assert_eq!(
            dropped_paths(&spec(vec![device("gpu-0")]), &defaulted),
            Vec::<String>::new(),
            "fields only the server set are not drops"
        );
        assert_eq!(
            dropped_paths(&spec(vec![device("gpu-0")]), &spec(vec![])),
            vec!["spec.devices"]
        );
        let warning = DroppedFields {
            slice: "node-a-gpu-example-com-00000".into(),
            fields: dropped_paths(&sent, &returned),
        };
        assert_eq!(
            warning.to_string(),
            r#"the API server dropped spec.devices[*].taints from resource slice "node-a-gpu-example-com-00000" (is a feature gate disabled?)"#
        );
    }
}

use nvdra_api::names::api_group::API_VERSION;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;
use crate::devices::DeviceType::{Gpu, Mig, Vfio};
use nvdra_kubelet_plugin::ConfigSource::{FromClaim, FromClass};

const GPU0: &str = "gpu-0";
const GPU1: &str = "gpu-1";
const MIG0: &str = "gpu-4-mig-3g20gb-9-0";

fn gates(on: &[FeatureGate]) -> FeatureGates {
    on.iter()
        .fold(FeatureGates::default(), |g, gate| g.with(*gate, true))
}

fn params(kind: &str, mut fields: Value) -> Value {
    let object = fields.as_object_mut().unwrap();
    object.insert("apiVersion".into(), API_VERSION.into());
    object.insert("kind".into(), kind.into());
    fields
}

fn config(source: ConfigSource, requests: &[&str], parameters: Value) -> OpaqueConfig {
    OpaqueConfig {
        source,
        requests: requests.iter().map(|r| (*r).to_owned()).collect(),
        parameters,
    }
}

/// A `GpuConfig` time-slicing with `interval` (needs `TimeSlicingSettings`).
fn ts(interval: &str) -> Value {
    params(
        "GpuConfig",
        json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}}}),
    )
}

fn mig_ts() -> Value {
    params(
        "MigDeviceConfig",
        json!({"sharing": {"strategy": "TimeSlicing"}}),
    )
}

fn gpu(device: &str, request: &str) -> DeviceAllocation {
    DeviceAllocation::new(request, device, Gpu)
}

fn mig(device: &str, request: &str) -> DeviceAllocation {
    DeviceAllocation::new(request, device, Mig)
}

/// (origin, config on the wire, device names) per group.
type Summary = Vec<(String, Value, Vec<String>)>;

fn summarize(groups: Vec<ConfigGroup>) -> Summary {
    groups
        .into_iter()
        .map(|g| {
            (
                g.origin.to_string(),
                serde_json::to_value(DeviceConfig::from(g.config)).unwrap(),
                g.devices.into_iter().map(|d| d.device).collect(),
            )
        })
        .collect()
}

fn group(origin: &str, config: Value, devices: &[&str]) -> (String, Value, Vec<String>) {
    (
        origin.to_owned(),
        config,
        devices.iter().map(|d| (*d).to_owned()).collect(),
    )
}

struct Case {
    name: &'static str,
    gates: FeatureGates,
    configs: Vec<OpaqueConfig>,
    devices: Vec<DeviceAllocation>,
    want: Result<Summary, &'static str>,
}

fn run(cases: Vec<Case>) {
    for case in cases {
        let got = resolve(&case.configs, &case.devices, &case.gates)
            .map(summarize)
            .map_err(|e| e.to_string());
        let want = case.want.map_err(str::to_owned);
        assert_eq!(got, want, "case: {}", case.name);
    }
}

#[test]
fn defaults_apply_when_no_config_does() {
    let ts_on = gates(&[FeatureGate::TimeSlicingSettings]);
    run(vec![
        Case {
            name: "no configs, default gates: exclusive use",
            gates: FeatureGates::default(),
            configs: vec![],
            devices: vec![gpu(GPU0, "gpu"), mig(MIG0, "mig")],
            want: Ok(vec![
                group(
                    "default config for gpu devices",
                    params("GpuConfig", json!({})),
                    &[GPU0],
                ),
                group(
                    "default config for mig devices",
                    params("MigDeviceConfig", json!({})),
                    &[MIG0],
                ),
            ]),
        },
        Case {
            name: "no configs, TimeSlicingSettings: time-slicing with the default interval",
            gates: ts_on.clone(),
            configs: vec![],
            devices: vec![gpu(GPU0, "gpu"), mig(MIG0, "mig")],
            want: Ok(vec![
                group("default config for gpu devices", ts("Default"), &[GPU0]),
                group("default config for mig devices", mig_ts(), &[MIG0]),
            ]),
        },
        Case {
            name: "a config naming another request does not apply",
            gates: ts_on.clone(),
            configs: vec![config(FromClaim, &["other"], ts("Long"))],
            devices: vec![gpu(GPU0, "gpu")],
            want: Ok(vec![group(
                "default config for gpu devices",
                ts("Default"),
                &[GPU0],
            )]),
        },
        Case {
            name: "a request-less config of another kind does not apply",
            gates: ts_on.clone(),
            configs: vec![config(FromClaim, &[], mig_ts())],
            devices: vec![gpu(GPU0, "gpu")],
            want: Ok(vec![group(
                "default config for gpu devices",
                ts("Default"),
                &[GPU0],
            )]),
        },
        Case {
            name: "nothing allocated, nothing to configure",
            gates: ts_on,
            configs: vec![config(FromClaim, &[], ts("Long"))],
            devices: vec![],
            want: Ok(vec![]),
        },
    ]);
}

#[test]
fn precedence() {
    let ts_on = gates(&[FeatureGate::TimeSlicingSettings]);
    let case = |name, configs, want_origin, want_interval| Case {
        name,
        gates: ts_on.clone(),
        configs,
        devices: vec![gpu(GPU0, "gpu")],
        want: Ok(vec![group(want_origin, ts(want_interval), &[GPU0])]),
    };
    run(vec![
        case(
            "claim config overrides class config for the same request",
            vec![
                config(FromClass, &["gpu"], ts("Short")),
                config(FromClaim, &["gpu"], ts("Long")),
            ],
            "claim config 1 (FromClaim)",
            "Long",
        ),
        case(
            "request-less claim config overrides request-less class config",
            vec![
                config(FromClass, &[], ts("Short")),
                config(FromClaim, &[], ts("Long")),
            ],
            "claim config 1 (FromClaim)",
            "Long",
        ),
        case(
            "request-less claim config overrides the class config of the request",
            vec![
                config(FromClass, &["gpu"], ts("Short")),
                config(FromClaim, &[], ts("Long")),
            ],
            "claim config 1 (FromClaim)",
            "Long",
        ),
        case(
            "later claim config wins",
            vec![
                config(FromClaim, &["gpu"], ts("Short")),
                config(FromClaim, &["gpu"], ts("Medium")),
            ],
            "claim config 1 (FromClaim)",
            "Medium",
        ),
        case(
            "later request-specific config beats earlier request-less one",
            vec![
                config(FromClaim, &[], ts("Short")),
                config(FromClaim, &["gpu"], ts("Medium")),
            ],
            "claim config 1 (FromClaim)",
            "Medium",
        ),
        case(
            "later request-less config beats earlier request-specific one (upstream's scan)",
            vec![
                config(FromClaim, &["gpu"], ts("Short")),
                config(FromClaim, &[], ts("Medium")),
            ],
            "claim config 1 (FromClaim)",
            "Medium",
        ),
        case(
            "request-less config of another kind is skipped, the earlier match wins",
            vec![
                config(FromClaim, &["gpu"], ts("Short")),
                config(FromClaim, &[], mig_ts()),
            ],
            "claim config 0 (FromClaim)",
            "Short",
        ),
        case(
            "a config naming other requests is skipped",
            vec![
                config(FromClaim, &["gpu", "x"], ts("Short")),
                config(FromClaim, &["x"], ts("Long")),
            ],
            "claim config 0 (FromClaim)",
            "Short",
        ),
        case(
            "class config naming the request beats defaults",
            vec![config(FromClass, &["gpu"], ts("Long"))],
            "claim config 0 (FromClass)",
            "Long",
        ),
        case(
            "a config listing several requests applies to each",
            vec![config(FromClaim, &["a", "gpu"], ts("Long"))],
            "claim config 0 (FromClaim)",
            "Long",
        ),
    ]);
}

#[test]
fn subrequests_match_their_own_name_and_their_main_request() {
    let ts_on = gates(&[FeatureGate::TimeSlicingSettings]);
    let case = |name, requests: &'static [&'static str], request: &str, want_origin| Case {
        name,
        gates: ts_on.clone(),
        configs: vec![config(FromClaim, requests, ts("Long"))],
        devices: vec![gpu(GPU0, request)],
        want: Ok(vec![group(
            want_origin,
            if want_origin == "default config for gpu devices" {
                ts("Default")
            } else {
                ts("Long")
            },
            &[GPU0],
        )]),
    };
    run(vec![
        case(
            "main request names all its subrequests",
            &["gpu"],
            "gpu/small",
            "claim config 0 (FromClaim)",
        ),
        case(
            "subrequest by its full name",
            &["gpu/small"],
            "gpu/small",
            "claim config 0 (FromClaim)",
        ),
        case(
            "another subrequest of the same request",
            &["gpu/large"],
            "gpu/small",
            "default config for gpu devices",
        ),
        case(
            "a subrequest name does not match the plain request",
            &["gpu/small"],
            "gpu",
            "default config for gpu devices",
        ),
        case(
            "prefix of the request name is not a match",
            &["gp"],
            "gpu/small",
            "default config for gpu devices",
        ),
    ]);
}

#[test]
fn names_request_forms() {
    let cases: [(&[&str], &str, bool); 8] = [
        (&["gpu"], "gpu", true),
        (&["gpu"], "gpu/a", true),
        (&["gpu/a"], "gpu/a", true),
        (&["gpu/b"], "gpu/a", false),
        (&["gpu/a"], "gpu", false),
        (&["gpu-1"], "gpu", false),
        (&[], "gpu", false),
        (&["x", "gpu/a"], "gpu/a", true),
    ];
    for (requests, request, want) in cases {
        let requests: Vec<String> = requests.iter().map(|r| (*r).to_owned()).collect();
        assert_eq!(
            names_request(&requests, request),
            want,
            "{requests:?} {request}"
        );
    }
}

#[test]
fn devices_sharing_a_config_form_one_group() {
    let ts_on = gates(&[FeatureGate::TimeSlicingSettings]);
    run(vec![
        Case {
            name: "groups in order of their first device, devices in allocation order",
            gates: ts_on.clone(),
            configs: vec![config(FromClaim, &[], ts("Long"))],
            devices: vec![mig(MIG0, "mig"), gpu(GPU1, "gpus"), gpu(GPU0, "gpus")],
            want: Ok(vec![
                group("default config for mig devices", mig_ts(), &[MIG0]),
                group("claim config 0 (FromClaim)", ts("Long"), &[GPU1, GPU0]),
            ]),
        },
        Case {
            name: "one class config used by two requests",
            gates: ts_on.clone(),
            configs: vec![config(FromClass, &["a", "b"], ts("Short"))],
            devices: vec![gpu(GPU0, "a"), gpu(GPU1, "b")],
            want: Ok(vec![group(
                "claim config 0 (FromClass)",
                ts("Short"),
                &[GPU0, GPU1],
            )]),
        },
        Case {
            name: "equal configs stay separate groups",
            gates: ts_on,
            configs: vec![
                config(FromClaim, &["a"], ts("Short")),
                config(FromClaim, &["b"], ts("Short")),
            ],
            devices: vec![gpu(GPU0, "a"), gpu(GPU1, "b")],
            want: Ok(vec![
                group("claim config 0 (FromClaim)", ts("Short"), &[GPU0]),
                group("claim config 1 (FromClaim)", ts("Short"), &[GPU1]),
            ]),
        },
    ]);
}

#[test]
fn kind_must_fit_a_device_its_config_names() {
    let ts_on = gates(&[FeatureGate::TimeSlicingSettings]);
    run(vec![
        Case {
            name: "GpuConfig naming a MIG device's request",
            gates: ts_on.clone(),
            configs: vec![config(FromClaim, &["mig"], ts("Long"))],
            devices: vec![mig(MIG0, "mig")],
            want: Err(
                "claim config 0 (FromClaim): GpuConfig cannot configure device \
                 \"gpu-4-mig-3g20gb-9-0\" of type mig (request \"mig\")",
            ),
        },
        Case {
            name: "MigDeviceConfig naming a GPU's request, via its main request",
            gates: ts_on.clone(),
            configs: vec![
                config(FromClaim, &[], ts("Long")),
                config(FromClaim, &["gpu"], mig_ts()),
            ],
            devices: vec![gpu(GPU0, "gpu/big")],
            want: Err(
                "claim config 1 (FromClaim): MigDeviceConfig cannot configure device \
                 \"gpu-0\" of type gpu (request \"gpu/big\")",
            ),
        },
        Case {
            name: "a later fitting request-less config shields the mismatch (upstream's scan)",
            gates: ts_on.clone(),
            configs: vec![
                config(FromClaim, &["mig"], ts("Long")),
                config(FromClaim, &[], mig_ts()),
            ],
            devices: vec![mig(MIG0, "mig")],
            want: Ok(vec![group("claim config 1 (FromClaim)", mig_ts(), &[MIG0])]),
        },
        Case {
            name: "VfioDeviceConfig naming a GPU's request",
            gates: ts_on,
            configs: vec![config(
                FromClass,
                &["gpu"],
                params("VfioDeviceConfig", json!({})),
            )],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err(
                "claim config 0 (FromClass): VfioDeviceConfig cannot configure device \
                 \"gpu-0\" of type gpu (request \"gpu\")",
            ),
        },
    ]);
}

#[test]
fn decoding_is_strict_for_every_config() {
    let ts_on = gates(&[FeatureGate::TimeSlicingSettings]);
    run(vec![
        Case {
            name: "unknown field, even in a config that applies to no device",
            gates: ts_on.clone(),
            configs: vec![
                config(FromClaim, &["gpu"], ts("Long")),
                config(
                    FromClaim,
                    &["other"],
                    params(
                        "GpuConfig",
                        json!({"sharing": {"strategy": "TimeSlicing", "foo": 1}}),
                    ),
                ),
            ],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err("claim config 1 (FromClaim): GpuConfig: unknown field \"sharing.foo\""),
        },
        Case {
            name: "compute-domain kinds are not ours",
            gates: ts_on.clone(),
            configs: vec![config(
                FromClass,
                &[],
                params("ComputeDomainChannelConfig", json!({"domainID": "x"})),
            )],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err(
                "claim config 0 (FromClass): unsupported kind \"ComputeDomainChannelConfig\"; \
                 accepted kinds: GpuConfig, MigDeviceConfig, VfioDeviceConfig",
            ),
        },
        Case {
            name: "wrong type names the field",
            gates: ts_on.clone(),
            configs: vec![config(
                FromClaim,
                &[],
                params("GpuConfig", json!({"sharing": {"strategy": 3}})),
            )],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err(
                "claim config 0 (FromClaim): GpuConfig.sharing.strategy: invalid type: \
                 integer `3`, expected a string",
            ),
        },
        Case {
            name: "missing apiVersion",
            gates: ts_on,
            configs: vec![config(FromClaim, &[], json!({"kind": "GpuConfig"}))],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err(
                "claim config 0 (FromClaim): GpuConfig: missing \"apiVersion\"; expected \
                 resource.nvidia.com/v1beta1",
            ),
        },
    ]);
}

#[test]
fn winning_configs_are_normalized_and_validated_against_the_gates() {
    let mps = || params("GpuConfig", json!({"sharing": {"strategy": "MPS"}}));
    run(vec![
        Case {
            name: "MPS without MPSSupport names the gate",
            gates: FeatureGates::default(),
            configs: vec![config(FromClaim, &["gpu"], mps())],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err(
                "claim config 0 (FromClaim): GpuConfig.sharing.strategy: strategy MPS requires \
                 feature gate MPSSupport; enable it with --feature-gates=MPSSupport=true (Helm \
                 value featureGates.MPSSupport=true)",
            ),
        },
        Case {
            name: "MPS with MPSSupport gets its implied empty mpsConfig",
            gates: gates(&[FeatureGate::MPSSupport]),
            configs: vec![config(FromClaim, &["gpu"], mps())],
            devices: vec![gpu(GPU0, "gpu")],
            want: Ok(vec![group(
                "claim config 0 (FromClaim)",
                params(
                    "GpuConfig",
                    json!({"sharing": {"strategy": "MPS", "mpsConfig": {}}}),
                ),
                &[GPU0],
            )]),
        },
        Case {
            name: "TimeSlicing without TimeSlicingSettings names the gate",
            gates: FeatureGates::default(),
            configs: vec![config(FromClaim, &[], mig_ts())],
            devices: vec![mig(MIG0, "mig")],
            want: Err(
                "claim config 0 (FromClaim): MigDeviceConfig.sharing.strategy: strategy \
                 TimeSlicing requires feature gate TimeSlicingSettings; enable it with \
                 --feature-gates=TimeSlicingSettings=true (Helm value \
                 featureGates.TimeSlicingSettings=true)",
            ),
        },
        Case {
            name: "TimeSlicingSettings fills the implied strategy and interval",
            gates: gates(&[FeatureGate::TimeSlicingSettings]),
            configs: vec![
                config(FromClaim, &["a"], params("GpuConfig", json!({}))),
                config(
                    FromClaim,
                    &["b"],
                    params("GpuConfig", json!({"sharing": {"strategy": "TimeSlicing"}})),
                ),
            ],
            devices: vec![gpu(GPU0, "a"), gpu(GPU1, "b")],
            want: Ok(vec![
                group("claim config 0 (FromClaim)", ts("Default"), &[GPU0]),
                group("claim config 1 (FromClaim)", ts("Default"), &[GPU1]),
            ]),
        },
        Case {
            name: "a config that wins no device is not validated (as upstream)",
            gates: FeatureGates::default(),
            configs: vec![config(FromClaim, &["other"], mps())],
            devices: vec![gpu(GPU0, "gpu")],
            want: Ok(vec![group(
                "default config for gpu devices",
                params("GpuConfig", json!({})),
                &[GPU0],
            )]),
        },
        Case {
            name: "unknown interval",
            gates: gates(&[FeatureGate::TimeSlicingSettings]),
            configs: vec![config(FromClaim, &[], ts("Forever"))],
            devices: vec![gpu(GPU0, "gpu")],
            want: Err(
                "claim config 0 (FromClaim): GpuConfig.sharing.timeSlicingConfig.interval: \
                 unknown time-slice interval \"Forever\"; expected Default, Short, Medium or Long",
            ),
        },
    ]);
}

#[test]
fn vfio_devices_have_a_default_only_with_passthrough_support() {
    let vfio = || DeviceAllocation::new("vm", "gpu-vfio-0", Vfio);
    run(vec![
        Case {
            name: "PassthroughSupport on",
            gates: gates(&[FeatureGate::PassthroughSupport]),
            configs: vec![],
            devices: vec![vfio()],
            want: Ok(vec![group(
                "default config for vfio devices",
                params(
                    "VfioDeviceConfig",
                    json!({"iommu": {"backendPolicy": "LegacyOnly", "enableAPIDevice": false}}),
                ),
                &["gpu-vfio-0"],
            )]),
        },
        Case {
            name: "PassthroughSupport off",
            gates: FeatureGates::default(),
            configs: vec![],
            devices: vec![vfio()],
            want: Err(
                "no configuration for device \"gpu-vfio-0\" of type vfio: it has no default \
                 without feature gate PassthroughSupport",
            ),
        },
        Case {
            name: "request-less VFIO config applies to VFIO devices only",
            gates: gates(&[FeatureGate::PassthroughSupport]),
            configs: vec![config(
                FromClaim,
                &[],
                params(
                    "VfioDeviceConfig",
                    json!({"iommu": {"backendPolicy": "PreferIommuFD"}}),
                ),
            )],
            devices: vec![gpu(GPU0, "gpu"), vfio()],
            want: Ok(vec![
                group(
                    "default config for gpu devices",
                    params("GpuConfig", json!({})),
                    &[GPU0],
                ),
                group(
                    "claim config 0 (FromClaim)",
                    params(
                        "VfioDeviceConfig",
                        json!({"iommu": {"backendPolicy": "PreferIommuFD", "enableAPIDevice": false}}),
                    ),
                    &["gpu-vfio-0"],
                ),
            ]),
        },
    ]);
}

#[test]
fn groups_carry_the_allocation_results() {
    let devices = [gpu(GPU0, "a/x"), mig(MIG0, "b")];
    let groups = resolve(&[], &devices, &FeatureGates::default()).unwrap();
    let results: Vec<&DeviceAllocation> = groups.iter().flat_map(|g| &g.devices).collect();
    assert_eq!(results, devices.iter().collect::<Vec<_>>());
    assert_eq!(
        groups.iter().map(|g| g.config.kind()).collect::<Vec<_>>(),
        [ConfigKind::Gpu, ConfigKind::MigDevice]
    );
    assert_eq!(
        groups.iter().map(|g| g.origin).collect::<Vec<_>>(),
        [ConfigOrigin::Default(Gpu), ConfigOrigin::Default(Mig)]
    );
}

//! Opaque device configuration: decoding (strict and lenient), normalization, validation and
//! serialization, through the public API only.

use nvdra_api::config::{
    ComputeDomainChannelConfig, ConfigKind, DeviceConfig, GpuConfig, MigDeviceConfig,
    SharingStrategy, Strictness, TimeSliceInterval, VfioDeviceConfig,
};
use nvdra_api::{FeatureGate, FeatureGates};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

const V: &str = "resource.nvidia.com/v1beta1";
const ALL_KINDS: &str = "GpuConfig, MigDeviceConfig, VfioDeviceConfig, \
                         ComputeDomainChannelConfig, ComputeDomainDaemonConfig";

fn gates(on: &[FeatureGate]) -> FeatureGates {
    on.iter()
        .fold(FeatureGates::default(), |g, gate| g.with(*gate, true))
}

fn with_kind(kind: &str, mut fields: Value) -> Value {
    let object = fields
        .as_object_mut()
        .unwrap_or_else(|| panic!("fields must be an object"));
    object.insert("apiVersion".into(), V.into());
    object.insert("kind".into(), kind.into());
    fields
}

fn strict(value: &Value) -> Result<DeviceConfig, String> {
    DeviceConfig::decode(value, Strictness::Strict).map_err(|e| e.to_string())
}

fn lenient(value: &Value) -> Result<DeviceConfig, String> {
    DeviceConfig::decode(value, Strictness::Lenient).map_err(|e| e.to_string())
}

#[test]
fn strict_decoding_accepts_every_documented_field() {
    let cases = [
        with_kind(
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}),
        ),
        with_kind(
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS", "mpsConfig": {
                "defaultActiveThreadPercentage": 50,
                "defaultPinnedDeviceMemoryLimit": "10Gi",
                "defaultPerDevicePinnedMemoryLimit": {"0": "2Gi", "GPU-1234": "1Gi"}
            }}}),
        ),
        with_kind("GpuConfig", json!({})),
        with_kind(
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 10}}}),
        ),
        with_kind(
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "PreferIommuFD", "enableAPIDevice": true}}),
        ),
        with_kind(
            "ComputeDomainChannelConfig",
            json!({"domainID": "uid-1", "allocationMode": "All"}),
        ),
        with_kind("ComputeDomainDaemonConfig", json!({"domainID": "uid-1"})),
    ];
    for value in cases {
        let config = strict(&value).unwrap_or_else(|e| panic!("{value}: {e}"));
        // The wire form round-trips exactly.
        assert_eq!(serde_json::to_value(&config).unwrap(), value);
    }
}

#[test]
fn strict_decoding_rejects_unknown_fields_with_their_paths() {
    let cases = [
        (
            with_kind("GpuConfig", json!({"foo": 1})),
            "GpuConfig: unknown field \"foo\"",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"sharing": {"strategy": "MPS", "foo": {"x": 1}}}),
            ),
            "GpuConfig: unknown field \"sharing.foo\"",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"sharing": {"strategy": "MPS", "mpsConfig": {"foo": true}}}),
            ),
            "GpuConfig: unknown field \"sharing.mpsConfig.foo\"",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short", "extra": 1}}}),
            ),
            "GpuConfig: unknown field \"sharing.timeSlicingConfig.extra\"",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"zzz": 1, "sharing": {"strategy": "MPS", "mpsConfig": {"multiUser": true}}}),
            ),
            "GpuConfig: unknown fields \"sharing.mpsConfig.multiUser\", \"zzz\"",
        ),
        (
            // MIG sharing has no time-slice settings.
            with_kind(
                "MigDeviceConfig",
                json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}),
            ),
            "MigDeviceConfig: unknown field \"sharing.timeSlicingConfig\"",
        ),
        (
            with_kind(
                "VfioDeviceConfig",
                json!({"iommu": {"backendPolicy": "LegacyOnly", "enableApiDevice": true}}),
            ),
            "VfioDeviceConfig: unknown field \"iommu.enableApiDevice\"",
        ),
        (
            with_kind(
                "ComputeDomainChannelConfig",
                json!({"domainID": "u", "allocationMode": "Single", "channels": 4}),
            ),
            "ComputeDomainChannelConfig: unknown field \"channels\"",
        ),
        (
            with_kind(
                "ComputeDomainDaemonConfig",
                json!({"domainID": "u", "allocationMode": "All"}),
            ),
            "ComputeDomainDaemonConfig: unknown field \"allocationMode\"",
        ),
    ];
    for (value, want) in cases {
        assert_eq!(strict(&value).unwrap_err(), want, "{value}");
        // Lenient decoding drops the same fields instead.
        lenient(&value).unwrap_or_else(|e| panic!("lenient {value}: {e}"));
    }
}

#[test]
fn lenient_decoding_drops_unknown_fields() {
    let value = with_kind(
        "GpuConfig",
        json!({"future": 1, "sharing": {"strategy": "MPS", "mpsConfig": {
            "defaultActiveThreadPercentage": 20, "multiUser": true
        }}}),
    );
    let config = lenient(&value).unwrap();
    assert_eq!(
        serde_json::to_value(&config).unwrap(),
        with_kind(
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 20}}})
        )
    );
    // `Deserialize` (used when a config is embedded in a checkpoint) is lenient too.
    let embedded: DeviceConfig = serde_json::from_value(value).unwrap();
    assert_eq!(embedded, config);
}

#[test]
fn kind_and_api_version_errors() {
    let cases = [
        (
            json!([]),
            "opaque device configuration must be a JSON object, got an array".to_owned(),
        ),
        (
            json!("GpuConfig"),
            "opaque device configuration must be a JSON object, got a string".to_owned(),
        ),
        (
            json!(null),
            "opaque device configuration must be a JSON object, got null".to_owned(),
        ),
        (
            json!({"apiVersion": V}),
            format!("missing \"kind\"; accepted kinds: {ALL_KINDS}"),
        ),
        (
            json!({"apiVersion": V, "kind": "Foo"}),
            format!("unsupported kind \"Foo\"; accepted kinds: {ALL_KINDS}"),
        ),
        (
            json!({"apiVersion": V, "kind": "gpuconfig"}),
            format!("unsupported kind \"gpuconfig\"; accepted kinds: {ALL_KINDS}"),
        ),
        (
            json!({"apiVersion": V, "kind": 5}),
            format!("unsupported kind 5; accepted kinds: {ALL_KINDS}"),
        ),
        (
            json!({"kind": "GpuConfig"}),
            "GpuConfig: missing \"apiVersion\"; expected resource.nvidia.com/v1beta1".to_owned(),
        ),
        (
            json!({"apiVersion": "resource.nvidia.com/v1", "kind": "GpuConfig"}),
            "GpuConfig: unsupported apiVersion \"resource.nvidia.com/v1\"; expected \
             resource.nvidia.com/v1beta1"
                .to_owned(),
        ),
        (
            json!({"apiVersion": "gpu.resource.nvidia.com/v1alpha1", "kind": "MigDeviceConfig"}),
            "MigDeviceConfig: unsupported apiVersion \"gpu.resource.nvidia.com/v1alpha1\"; \
             expected resource.nvidia.com/v1beta1"
                .to_owned(),
        ),
    ];
    for (value, want) in cases {
        assert_eq!(strict(&value).unwrap_err(), want, "strict {value}");
        assert_eq!(lenient(&value).unwrap_err(), want, "lenient {value}");
    }
}

#[test]
fn kinds_can_be_restricted_per_driver() {
    let channel = with_kind("ComputeDomainChannelConfig", json!({"domainID": "u"}));
    let gpu = with_kind("GpuConfig", json!({}));
    let gpu_kinds = ConfigKind::for_driver("gpu.nvidia.com");
    let cd_kinds = ConfigKind::for_driver("compute-domain.nvidia.com");
    assert_eq!(
        DeviceConfig::decode_among(&channel, Strictness::Strict, gpu_kinds)
            .unwrap_err()
            .to_string(),
        "unsupported kind \"ComputeDomainChannelConfig\"; accepted kinds: GpuConfig, \
         MigDeviceConfig, VfioDeviceConfig"
    );
    assert_eq!(
        DeviceConfig::decode_among(&gpu, Strictness::Strict, cd_kinds)
            .unwrap_err()
            .to_string(),
        "unsupported kind \"GpuConfig\"; accepted kinds: ComputeDomainChannelConfig, \
         ComputeDomainDaemonConfig"
    );
    DeviceConfig::decode_among(&gpu, Strictness::Strict, gpu_kinds).unwrap();
    DeviceConfig::decode_among(&channel, Strictness::Strict, cd_kinds).unwrap();
    assert!(ConfigKind::for_driver("example.com").is_empty());
    for kind in ConfigKind::ALL {
        assert!(
            ConfigKind::for_driver(kind.driver()).contains(kind),
            "{kind}"
        );
    }
}

#[test]
fn type_errors_name_the_field() {
    let cases = [
        (
            with_kind("GpuConfig", json!({"sharing": "MPS"})),
            "GpuConfig.sharing: invalid type: string \"MPS\", expected struct GpuSharing",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": "50"}}}),
            ),
            "GpuConfig.sharing.mpsConfig.defaultActiveThreadPercentage: invalid type: string \
             \"50\", expected i64",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"sharing": {"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "1K"}}}),
            ),
            "GpuConfig.sharing.mpsConfig.defaultPinnedDeviceMemoryLimit: invalid quantity \"1K\": \
             expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, m, k, M, G, T, P, \
             E or an exponent like e3)",
        ),
        (
            with_kind(
                "GpuConfig",
                json!({"sharing": {"strategy": "MPS", "mpsConfig": {"defaultPerDevicePinnedMemoryLimit": {"0": "lots"}}}}),
            ),
            "GpuConfig.sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.0: invalid quantity \
             \"lots\": expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, m, k, M, \
             G, T, P, E or an exponent like e3)",
        ),
        (
            with_kind("GpuConfig", json!({"sharing": {"strategy": 1}})),
            "GpuConfig.sharing.strategy: invalid type: integer `1`, expected a string",
        ),
        (
            with_kind(
                "VfioDeviceConfig",
                json!({"iommu": {"backendPolicy": "LegacyOnly", "enableAPIDevice": "yes"}}),
            ),
            "VfioDeviceConfig.iommu.enableAPIDevice: invalid type: string \"yes\", expected a \
             boolean",
        ),
        (
            with_kind("ComputeDomainDaemonConfig", json!({"domainID": 7})),
            "ComputeDomainDaemonConfig.domainID: invalid type: integer `7`, expected a string",
        ),
    ];
    for (value, want) in cases {
        assert_eq!(strict(&value).unwrap_err(), want, "{value}");
        assert_eq!(lenient(&value).unwrap_err(), want, "lenient {value}");
    }
}

#[test]
fn normalize_fills_implied_defaults() {
    use FeatureGate::{MPSSupport, TimeSlicingSettings};
    let cases: Vec<(&str, Value, &[FeatureGate], Value)> = vec![
        ("GpuConfig", json!({}), &[], json!({})),
        (
            "GpuConfig",
            json!({}),
            &[TimeSlicingSettings],
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}}),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            &[TimeSlicingSettings],
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}}),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {}}}),
            &[TimeSlicingSettings],
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}}),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}),
            &[TimeSlicingSettings],
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}),
        ),
        // Without the gate nothing is implied (validation then reports the gate).
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            &[],
            json!({"sharing": {"strategy": "TimeSlicing"}}),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            &[MPSSupport],
            json!({"sharing": {"strategy": "MPS", "mpsConfig": {}}}),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            &[TimeSlicingSettings],
            json!({"sharing": {"strategy": "MPS"}}),
        ),
        ("MigDeviceConfig", json!({}), &[], json!({})),
        (
            "MigDeviceConfig",
            json!({}),
            &[TimeSlicingSettings],
            json!({"sharing": {"strategy": "TimeSlicing"}}),
        ),
        (
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            &[MPSSupport],
            json!({"sharing": {"strategy": "MPS", "mpsConfig": {}}}),
        ),
        (
            "VfioDeviceConfig",
            json!({}),
            &[],
            json!({"iommu": {"backendPolicy": "LegacyOnly", "enableAPIDevice": false}}),
        ),
        (
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "PreferIommuFD"}}),
            &[],
            json!({"iommu": {"backendPolicy": "PreferIommuFD", "enableAPIDevice": false}}),
        ),
        (
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "PreferIommuFD", "enableAPIDevice": true}}),
            &[],
            json!({"iommu": {"backendPolicy": "PreferIommuFD", "enableAPIDevice": true}}),
        ),
        (
            "ComputeDomainChannelConfig",
            json!({"domainID": "u", "allocationMode": ""}),
            &[TimeSlicingSettings, MPSSupport],
            json!({"domainID": "u", "allocationMode": ""}),
        ),
        (
            "ComputeDomainDaemonConfig",
            json!({"domainID": "u"}),
            &[],
            json!({"domainID": "u"}),
        ),
    ];
    for (kind, input, on, want) in cases {
        let mut config = strict(&with_kind(kind, input.clone())).unwrap();
        config.normalize(&gates(on));
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            with_kind(kind, want),
            "{kind} {input} gates {on:?}"
        );
    }
}

#[test]
fn default_configs_depend_on_gates() {
    use FeatureGate::{PassthroughSupport, TimeSlicingSettings};
    let to_json = |c: DeviceConfig| serde_json::to_value(c).unwrap();

    assert_eq!(
        to_json(GpuConfig::default_for(&gates(&[])).into()),
        with_kind("GpuConfig", json!({}))
    );
    assert_eq!(
        to_json(GpuConfig::default_for(&gates(&[TimeSlicingSettings])).into()),
        with_kind(
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}})
        )
    );
    assert_eq!(
        to_json(MigDeviceConfig::default_for(&gates(&[])).into()),
        with_kind("MigDeviceConfig", json!({}))
    );
    assert_eq!(
        to_json(MigDeviceConfig::default_for(&gates(&[TimeSlicingSettings])).into()),
        with_kind(
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}})
        )
    );
    assert_eq!(VfioDeviceConfig::default_for(&gates(&[])), None);
    let vfio = VfioDeviceConfig::default_for(&gates(&[PassthroughSupport])).unwrap();
    assert!(!vfio.api_device_enabled());
    assert_eq!(
        to_json(vfio.into()),
        with_kind(
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "LegacyOnly", "enableAPIDevice": false}})
        )
    );
    // Defaults are valid under the gates that produced them.
    for on in [&[][..], &[TimeSlicingSettings], &[PassthroughSupport]] {
        let g = gates(on);
        GpuConfig::default_for(&g).validate(&g).unwrap();
        MigDeviceConfig::default_for(&g).validate(&g).unwrap();
        if let Some(v) = VfioDeviceConfig::default_for(&g) {
            v.validate(&g).unwrap();
        }
    }
}

#[test]
fn validation_rules() {
    use FeatureGate::{MPSSupport, TimeSlicingSettings};
    let ts: &[FeatureGate] = &[TimeSlicingSettings];
    let mps: &[FeatureGate] = &[MPSSupport];
    let both: &[FeatureGate] = &[TimeSlicingSettings, MPSSupport];
    let gate_ts = "GpuConfig.sharing.strategy: strategy TimeSlicing requires feature gate \
                   TimeSlicingSettings; enable it with --feature-gates=TimeSlicingSettings=true \
                   (Helm value featureGates.TimeSlicingSettings=true)";
    let gate_mps = "GpuConfig.sharing.strategy: strategy MPS requires feature gate MPSSupport; \
                    enable it with --feature-gates=MPSSupport=true (Helm value \
                    featureGates.MPSSupport=true)";
    let mps_cfg = |cfg: Value| json!({"sharing": {"strategy": "MPS", "mpsConfig": cfg}});

    /// (kind, fields, enabled gates, expected outcome)
    type Case = (
        &'static str,
        Value,
        &'static [FeatureGate],
        Result<(), &'static str>,
    );
    let cases: Vec<Case> = vec![
        // No sharing: always fine.
        ("GpuConfig", json!({}), &[], Ok(())),
        // Strategy and its gate.
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            &[],
            Err(gate_ts),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            mps,
            Err(gate_ts),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            ts,
            Ok(()),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            &[],
            Err(gate_mps),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            ts,
            Err(gate_mps),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            mps,
            Ok(()),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "Fabric"}}),
            both,
            Err(
                "GpuConfig.sharing.strategy: unknown sharing strategy \"Fabric\"; expected \
                 TimeSlicing or MPS",
            ),
        ),
        (
            "GpuConfig",
            json!({"sharing": {}}),
            both,
            Err(
                "GpuConfig.sharing.strategy: unknown sharing strategy \"\"; expected \
                 TimeSlicing or MPS",
            ),
        ),
        // Settings of the other strategy.
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "mpsConfig": {}}}),
            both,
            Err("GpuConfig.sharing.mpsConfig: not allowed with strategy TimeSlicing"),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "MPS", "timeSlicingConfig": {"interval": "Short"}}}),
            both,
            Err("GpuConfig.sharing.timeSlicingConfig: not allowed with strategy MPS"),
        ),
        // Intervals.
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Huge"}}}),
            ts,
            Err(
                "GpuConfig.sharing.timeSlicingConfig.interval: unknown time-slice interval \
                 \"Huge\"; expected Default, Short, Medium or Long",
            ),
        ),
        (
            "GpuConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Medium"}}}),
            ts,
            Ok(()),
        ),
        // MPS thread percentage.
        (
            "GpuConfig",
            mps_cfg(json!({"defaultActiveThreadPercentage": 0})),
            mps,
            Ok(()),
        ),
        (
            "GpuConfig",
            mps_cfg(json!({"defaultActiveThreadPercentage": 100})),
            mps,
            Ok(()),
        ),
        (
            "GpuConfig",
            mps_cfg(json!({"defaultActiveThreadPercentage": 120})),
            mps,
            Err(
                "GpuConfig.sharing.mpsConfig.defaultActiveThreadPercentage: 120 is out of \
                 range 0..=100",
            ),
        ),
        (
            "GpuConfig",
            mps_cfg(json!({"defaultActiveThreadPercentage": -1})),
            mps,
            Err(
                "GpuConfig.sharing.mpsConfig.defaultActiveThreadPercentage: -1 is out of range \
                 0..=100",
            ),
        ),
        // MPS pinned-memory limits.
        (
            "GpuConfig",
            mps_cfg(json!({"defaultPinnedDeviceMemoryLimit": "1Mi",
                           "defaultPerDevicePinnedMemoryLimit": {"0": "1Gi"}})),
            mps,
            Ok(()),
        ),
        (
            "GpuConfig",
            mps_cfg(json!({"defaultPinnedDeviceMemoryLimit": "512Ki"})),
            mps,
            Err(
                "GpuConfig.sharing.mpsConfig.defaultPinnedDeviceMemoryLimit: invalid limit: \
                 512Ki is less than 1Mi",
            ),
        ),
        (
            "GpuConfig",
            mps_cfg(json!({"defaultPerDevicePinnedMemoryLimit": {"GPU-a": "100Ki"}})),
            mps,
            Err(
                "GpuConfig.sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.GPU-a: invalid \
                 limit: 100Ki is less than 1Mi",
            ),
        ),
        // MIG: same gate and cross rules, no time-slice settings.
        (
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            ts,
            Ok(()),
        ),
        (
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "TimeSlicing"}}),
            mps,
            Err(
                "MigDeviceConfig.sharing.strategy: strategy TimeSlicing requires feature gate \
                 TimeSlicingSettings; enable it with --feature-gates=TimeSlicingSettings=true \
                 (Helm value featureGates.TimeSlicingSettings=true)",
            ),
        ),
        (
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "MPS"}}),
            ts,
            Err(
                "MigDeviceConfig.sharing.strategy: strategy MPS requires feature gate \
                 MPSSupport; enable it with --feature-gates=MPSSupport=true (Helm value \
                 featureGates.MPSSupport=true)",
            ),
        ),
        (
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "TimeSlicing", "mpsConfig": {}}}),
            both,
            Err("MigDeviceConfig.sharing.mpsConfig: not allowed with strategy TimeSlicing"),
        ),
        (
            "MigDeviceConfig",
            json!({"sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 101}}}),
            mps,
            Err(
                "MigDeviceConfig.sharing.mpsConfig.defaultActiveThreadPercentage: 101 is out of \
                 range 0..=100",
            ),
        ),
        // VFIO.
        ("VfioDeviceConfig", json!({}), &[], Ok(())),
        (
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "LegacyOnly"}}),
            &[],
            Ok(()),
        ),
        (
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "PreferIommuFD", "enableAPIDevice": true}}),
            &[],
            Ok(()),
        ),
        (
            "VfioDeviceConfig",
            json!({"iommu": {}}),
            &[],
            Err(
                "VfioDeviceConfig.iommu.backendPolicy: must be set; expected LegacyOnly or \
                 PreferIommuFD",
            ),
        ),
        (
            "VfioDeviceConfig",
            json!({"iommu": {"enableAPIDevice": true}}),
            &[],
            Err(
                "VfioDeviceConfig.iommu.backendPolicy: must be set; expected LegacyOnly or \
                 PreferIommuFD",
            ),
        ),
        (
            "VfioDeviceConfig",
            json!({"iommu": {"backendPolicy": "IommuFDOnly"}}),
            &[],
            Err(
                "VfioDeviceConfig.iommu.backendPolicy: unknown IOMMU backend policy \
                 \"IommuFDOnly\"; expected LegacyOnly or PreferIommuFD",
            ),
        ),
        // ComputeDomain configs.
        (
            "ComputeDomainChannelConfig",
            json!({"domainID": "u", "allocationMode": "Single"}),
            &[],
            Ok(()),
        ),
        (
            "ComputeDomainChannelConfig",
            json!({"allocationMode": "All"}),
            &[],
            Err("ComputeDomainChannelConfig.domainID: must be set to the ComputeDomain's UID"),
        ),
        (
            "ComputeDomainDaemonConfig",
            json!({"domainID": "u"}),
            &[],
            Ok(()),
        ),
        (
            "ComputeDomainDaemonConfig",
            json!({"domainID": ""}),
            &[],
            Err("ComputeDomainDaemonConfig.domainID: must be set to the ComputeDomain's UID"),
        ),
    ];
    for (kind, input, on, want) in cases {
        let config = strict(&with_kind(kind, input.clone())).unwrap();
        let got = config.validate(&gates(on)).map_err(|e| e.to_string());
        assert_eq!(
            got,
            want.map_err(str::to_owned),
            "{kind} {input} gates {on:?}"
        );
    }
}

#[test]
fn normalized_user_configs_validate() {
    // The pipeline the agent and webhook run: strict decode, normalize, validate.
    let g = gates(&[FeatureGate::TimeSlicingSettings, FeatureGate::MPSSupport]);
    for fields in [
        json!({}),
        json!({"sharing": {"strategy": "TimeSlicing"}}),
        json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {}}}),
        json!({"sharing": {"strategy": "MPS"}}),
    ] {
        let mut config = strict(&with_kind("GpuConfig", fields.clone())).unwrap();
        config.normalize(&g);
        config
            .validate(&g)
            .unwrap_or_else(|e| panic!("{fields}: {e}"));
    }
}

#[test]
fn typed_access_after_decoding() {
    let value = with_kind(
        "GpuConfig",
        json!({"sharing": {"strategy": "MPS", "mpsConfig": {
            "defaultPinnedDeviceMemoryLimit": "4Gi",
            "defaultPerDevicePinnedMemoryLimit": {"1": "2Gi"}
        }}}),
    );
    let DeviceConfig::Gpu(gpu) = strict(&value).unwrap() else {
        panic!("not a GpuConfig");
    };
    let sharing = gpu.sharing.unwrap();
    assert_eq!(sharing.strategy, SharingStrategy::Mps);
    let limits = sharing
        .mps_config
        .unwrap()
        .pinned_memory_limits(&["GPU-b", "GPU-a"])
        .unwrap();
    assert_eq!(
        limits.into_iter().collect::<Vec<_>>(),
        vec![
            ("GPU-a".to_owned(), "4096M".to_owned()),
            ("GPU-b".to_owned(), "2048M".to_owned()),
        ]
    );

    let value = with_kind(
        "GpuConfig",
        json!({"sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Medium"}}}),
    );
    let DeviceConfig::Gpu(gpu) = strict(&value).unwrap() else {
        panic!("not a GpuConfig");
    };
    let interval = gpu
        .sharing
        .unwrap()
        .time_slicing_config
        .unwrap()
        .effective_interval();
    assert_eq!(interval, TimeSliceInterval::Medium);
    assert_eq!(interval.timeslice(), Some(2));
}

#[test]
fn controller_generated_configs_serialize_with_type_meta() {
    let channel = DeviceConfig::from(ComputeDomainChannelConfig {
        domain_id: "uid-1".into(),
        allocation_mode: "Single".into(),
    });
    assert_eq!(channel.kind(), ConfigKind::ComputeDomainChannel);
    assert_eq!(channel.kind().driver(), "compute-domain.nvidia.com");
    assert_eq!(
        serde_json::to_value(&channel).unwrap(),
        json!({
            "apiVersion": "resource.nvidia.com/v1beta1",
            "kind": "ComputeDomainChannelConfig",
            "domainID": "uid-1",
            "allocationMode": "Single"
        })
    );
}

#[test]
fn go_written_checkpoint_configs_decode_leniently() {
    // Go writes TypeMeta first and may include fields a newer driver added.
    let value = json!({
        "kind": "GpuConfig",
        "apiVersion": "resource.nvidia.com/v1beta1",
        "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}},
        "metadata": {}
    });
    let config = lenient(&value).unwrap();
    assert_eq!(config.kind(), ConfigKind::Gpu);
    assert_eq!(
        strict(&value).unwrap_err(),
        "GpuConfig: unknown field \"metadata\""
    );
}

//! Pure tests of the checkpoint's claim bookkeeping (no files).

// Fixture helpers outside #[test] functions panic on purpose: that is how they report a
// broken fixture.
#![allow(clippy::unwrap_used)]

// Named so that `cargo test checkpoint` selects these tests.
mod checkpoint_state {
    use std::collections::BTreeMap;

    use nvdra_agent::checkpoint::{
        AllocatedDevice, BeginOutcome, CheckpointState, ClaimEntry, ClaimRef, ClaimState,
        DeviceInfo, PreparedDevice, PreparedGpu, PreparedGroup, PreparedMig, PreparedVfio,
    };
    use pretty_assertions::assert_eq;
    use serde_json::json;

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            uid: uid.to_owned(),
            namespace: "default".to_owned(),
            name: format!("claim-{uid}"),
        }
    }

    fn alloc(device: &str) -> AllocatedDevice {
        AllocatedDevice {
            requests: vec!["gpu".to_owned()],
            pool: "node-a".to_owned(),
            device: device.to_owned(),
            ..AllocatedDevice::default()
        }
    }

    fn admin(mut device: AllocatedDevice) -> AllocatedDevice {
        device.admin_access = true;
        device
    }

    fn shared(mut device: AllocatedDevice, share: &str) -> AllocatedDevice {
        device.share_id = Some(share.to_owned());
        device
    }

    fn prepared(device: &str, info: DeviceInfo) -> PreparedDevice {
        PreparedDevice {
            requests: vec!["gpu".to_owned()],
            pool: "node-a".to_owned(),
            device: device.to_owned(),
            cdi_device_ids: vec![format!("k8s.gpu.nvidia.com/device={device}")],
            info,
            ..PreparedDevice::default()
        }
    }

    fn gpu(minor: u32) -> PreparedDevice {
        prepared(
            &format!("gpu-{minor}"),
            DeviceInfo::Gpu(PreparedGpu {
                uuid: format!("GPU-{minor}"),
                minor: Some(minor),
            }),
        )
    }

    fn group(devices: Vec<PreparedDevice>) -> PreparedGroup {
        PreparedGroup {
            devices,
            ..PreparedGroup::default()
        }
    }

    /// A state with claim `uid` completed on `devices` (allocation = the same devices).
    fn completed(state: &mut CheckpointState, uid: &str, allocated: Vec<AllocatedDevice>) {
        let devices = allocated
            .iter()
            .map(|a| PreparedDevice {
                admin_access: a.admin_access,
                share_id: a.share_id.clone(),
                ..prepared(&a.device, DeviceInfo::Gpu(PreparedGpu::default()))
            })
            .collect();
        assert_eq!(
            state.begin_prepare(&claim(uid), allocated).unwrap(),
            BeginOutcome::Started
        );
        state.complete_prepare(uid, vec![group(devices)]).unwrap();
    }

    #[test]
    fn prepare_lifecycle_records_started_then_completed() {
        let mut state = CheckpointState::new("boot-1");
        let outcome = state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
            .unwrap();
        assert_eq!(outcome, BeginOutcome::Started);
        let entry = state.claim("u1").unwrap();
        assert_eq!(entry.state, ClaimState::PrepareStarted);
        assert_eq!(entry.namespace, "default");
        assert_eq!(entry.name, "claim-u1");
        assert_eq!(entry.allocated_devices, vec![alloc("gpu-0")]);
        assert!(entry.prepared_devices.is_empty());
        assert!(entry.updated_at.is_some());
        assert_eq!(state.started_claims(), vec![claim("u1")]);
        assert_eq!(state.completed_claims(), vec![]);

        state
            .complete_prepare("u1", vec![group(vec![gpu(0)])])
            .unwrap();
        let entry = state.claim("u1").unwrap();
        assert_eq!(entry.state, ClaimState::PrepareCompleted);
        assert_eq!(entry.prepared_devices, vec![group(vec![gpu(0)])]);
        assert_eq!(state.started_claims(), vec![]);
        assert_eq!(state.completed_claims(), vec![claim("u1")]);
    }

    #[test]
    fn begin_on_completed_claim_returns_recorded_devices_untouched() {
        let mut state = CheckpointState::new("boot-1");
        state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
            .unwrap();
        state
            .complete_prepare("u1", vec![group(vec![gpu(0)])])
            .unwrap();
        let before = state.clone();

        // A retry may even carry a different device list; the record wins.
        let outcome = state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-7")])
            .unwrap();
        assert_eq!(
            outcome,
            BeginOutcome::AlreadyCompleted(vec![group(vec![gpu(0)])])
        );
        assert_eq!(state, before);
    }

    #[test]
    fn begin_on_started_claim_asks_for_rollback_until_removed() {
        let mut state = CheckpointState::new("boot-1");
        state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
            .unwrap();
        let previous = state.claim("u1").unwrap().clone();
        let before = state.clone();

        let outcome = state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
            .unwrap();
        assert_eq!(outcome, BeginOutcome::NeedsRollback(previous.clone()));
        assert_eq!(state, before);

        assert_eq!(state.remove("u1"), Some(previous));
        assert_eq!(
            state
                .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
                .unwrap(),
            BeginOutcome::Started
        );
    }

    #[test]
    fn device_held_by_another_claim_is_refused_unless_admin_or_distinct_shares() {
        struct Case {
            name: &'static str,
            holder: AllocatedDevice,
            holder_completes: bool,
            wanted: AllocatedDevice,
            err: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "completed holder",
                holder: alloc("gpu-0"),
                holder_completes: true,
                wanted: alloc("gpu-0"),
                err: Some(
                    "device node-a/gpu-0 requested by claim default/claim-u2 (u2) is already in use \
                 by claim default/claim-u1 (u1) (PrepareCompleted)",
                ),
            },
            Case {
                name: "started holder",
                holder: alloc("gpu-0"),
                holder_completes: false,
                wanted: alloc("gpu-0"),
                err: Some(
                    "device node-a/gpu-0 requested by claim default/claim-u2 (u2) is already in use \
                 by claim default/claim-u1 (u1) (PrepareStarted)",
                ),
            },
            Case {
                name: "same share twice",
                holder: shared(alloc("gpu-0"), "s1"),
                holder_completes: true,
                wanted: shared(alloc("gpu-0"), "s1"),
                err: Some(
                    "device node-a/gpu-0 requested by claim default/claim-u2 (u2) is already in use \
                 by claim default/claim-u1 (u1) (PrepareCompleted)",
                ),
            },
            Case {
                name: "share against exclusive",
                holder: alloc("gpu-0"),
                holder_completes: true,
                wanted: shared(alloc("gpu-0"), "s2"),
                err: Some(
                    "device node-a/gpu-0 requested by claim default/claim-u2 (u2) is already in use \
                 by claim default/claim-u1 (u1) (PrepareCompleted)",
                ),
            },
            Case {
                name: "admin request",
                holder: alloc("gpu-0"),
                holder_completes: true,
                wanted: admin(alloc("gpu-0")),
                err: None,
            },
            Case {
                name: "admin holder",
                holder: admin(alloc("gpu-0")),
                holder_completes: true,
                wanted: alloc("gpu-0"),
                err: None,
            },
            Case {
                name: "distinct shares",
                holder: shared(alloc("gpu-0"), "s1"),
                holder_completes: true,
                wanted: shared(alloc("gpu-0"), "s2"),
                err: None,
            },
            Case {
                name: "other device",
                holder: alloc("gpu-0"),
                holder_completes: true,
                wanted: alloc("gpu-1"),
                err: None,
            },
            Case {
                name: "same name in another pool",
                holder: alloc("gpu-0"),
                holder_completes: true,
                wanted: AllocatedDevice {
                    pool: "node-b".to_owned(),
                    ..alloc("gpu-0")
                },
                err: None,
            },
        ];
        for case in cases {
            let mut state = CheckpointState::new("boot-1");
            if case.holder_completes {
                completed(&mut state, "u1", vec![case.holder]);
            } else {
                state
                    .begin_prepare(&claim("u1"), vec![case.holder])
                    .unwrap();
            }
            let before = state.clone();
            let result = state.begin_prepare(&claim("u2"), vec![alloc("gpu-5"), case.wanted]);
            match case.err {
                Some(want) => {
                    assert_eq!(result.unwrap_err().to_string(), want, "{}", case.name);
                    assert_eq!(
                        state, before,
                        "{}: refused prepare changed state",
                        case.name
                    );
                }
                None => assert_eq!(result.unwrap(), BeginOutcome::Started, "{}", case.name),
            }
        }
    }

    #[test]
    fn conflict_names_first_holder_in_uid_order() {
        let mut state = CheckpointState::new("boot-1");
        completed(&mut state, "u3", vec![admin(alloc("gpu-0"))]);
        completed(&mut state, "u2", vec![shared(alloc("gpu-0"), "a")]);
        completed(&mut state, "u1", vec![shared(alloc("gpu-0"), "b")]);
        let err = state
            .begin_prepare(&claim("u9"), vec![alloc("gpu-0")])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "device node-a/gpu-0 requested by claim default/claim-u9 (u9) is already in use by \
         claim default/claim-u1 (u1) (PrepareCompleted)"
        );
    }

    #[test]
    fn claim_in_unknown_state_keeps_its_devices_and_needs_rollback() {
        let mut state: CheckpointState = serde_json::from_value(json!({
            "nodeBootID": "boot-1",
            "claims": {
                "u1": {
                    "namespace": "default", "name": "claim-u1", "state": "UnprepareStarted",
                    "allocatedDevices": [{"requests": ["gpu"], "pool": "node-a", "device": "gpu-0"}]
                }
            }
        }))
        .unwrap();
        assert_eq!(
            state
                .begin_prepare(&claim("u2"), vec![alloc("gpu-0")])
                .unwrap_err()
                .to_string(),
            "device node-a/gpu-0 requested by claim default/claim-u2 (u2) is already in use by \
         claim default/claim-u1 (u1) (UnprepareStarted)"
        );
        assert_eq!(state.started_claims(), vec![]);
        assert_eq!(state.completed_claims(), vec![]);
        let entry = state.claim("u1").unwrap().clone();
        assert_eq!(
            state
                .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
                .unwrap(),
            BeginOutcome::NeedsRollback(entry)
        );
    }

    #[test]
    fn adopt_completed_records_a_lost_claim_once_and_respects_holders() {
        let entry = |uid: &str, device: &str, admin_access: bool| ClaimEntry {
            namespace: "default".into(),
            name: format!("claim-{uid}"),
            state: ClaimState::PrepareStarted,
            allocated_devices: vec![AllocatedDevice {
                admin_access,
                ..alloc(device)
            }],
            prepared_devices: vec![group(vec![gpu(0)])],
            ..ClaimEntry::default()
        };
        let mut state = CheckpointState::new("boot");
        assert!(
            state
                .adopt_completed("u1", entry("u1", "gpu-0", false))
                .unwrap()
        );
        let recorded = state.claim("u1").unwrap();
        // Whatever state the caller filled in, the adopted claim is completed.
        assert_eq!(recorded.state, ClaimState::PrepareCompleted);
        assert_eq!(recorded.prepared_devices, vec![group(vec![gpu(0)])]);
        assert!(recorded.updated_at.is_some());

        // Already recorded: left as it is.
        let before = state.clone();
        assert!(
            !state
                .adopt_completed("u1", entry("u1", "gpu-1", false))
                .unwrap()
        );
        assert_eq!(state, before);

        // A held device is refused like in begin_prepare; admin access may share it.
        assert_eq!(
            state
                .adopt_completed("u2", entry("u2", "gpu-0", false))
                .unwrap_err()
                .to_string(),
            "device node-a/gpu-0 requested by claim default/claim-u2 (u2) is already in use by \
             claim default/claim-u1 (u1) (PrepareCompleted)"
        );
        assert!(state.claim("u2").is_none());
        assert!(
            state
                .adopt_completed("u3", entry("u3", "gpu-0", true))
                .unwrap()
        );
    }

    #[test]
    fn complete_prepare_requires_a_started_claim() {
        let mut state = CheckpointState::new("boot-1");
        completed(&mut state, "done", vec![alloc("gpu-0")]);
        for (uid, want) in [
            (
                "missing",
                "cannot complete prepare of claim missing: its checkpoint state is absent",
            ),
            (
                "done",
                "cannot complete prepare of claim done: its checkpoint state is PrepareCompleted",
            ),
        ] {
            let err = state.complete_prepare(uid, vec![]).unwrap_err();
            assert_eq!(err.to_string(), want);
        }
    }

    #[test]
    fn remove_unknown_claim_is_a_no_op() {
        let mut state = CheckpointState::new("boot-1");
        completed(&mut state, "u1", vec![alloc("gpu-0")]);
        let before = state.clone();
        assert_eq!(state.remove("nope"), None);
        assert_eq!(state, before);
        assert!(state.remove("u1").is_some());
        assert!(state.is_empty());
    }

    #[test]
    fn prepared_device_counts_cover_completed_claims_only() {
        let mut state = CheckpointState::new("boot-1");
        assert_eq!(
            state.prepared_device_counts_by_type(),
            BTreeMap::from([("gpu", 0), ("mig", 0), ("unknown", 0), ("vfio", 0)])
        );
        state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-0"), alloc("gpu-1")])
            .unwrap();
        state
            .complete_prepare(
                "u1",
                vec![
                    group(vec![gpu(0)]),
                    group(vec![
                        prepared(
                            "gpu-1-mig-1g10gb-0-0",
                            DeviceInfo::Mig(PreparedMig::default()),
                        ),
                        prepared(
                            "gpu-1-mig-1g10gb-1-0",
                            DeviceInfo::Mig(PreparedMig::default()),
                        ),
                    ]),
                ],
            )
            .unwrap();
        state
            .begin_prepare(&claim("u2"), vec![alloc("gpu-vfio-2"), alloc("tpu-0")])
            .unwrap();
        state
            .complete_prepare(
                "u2",
                vec![group(vec![
                    prepared("gpu-vfio-2", DeviceInfo::Vfio(PreparedVfio::default())),
                    prepared("tpu-0", DeviceInfo::Unknown(json!({"type": "tpu"}))),
                ])],
            )
            .unwrap();
        // Started claims have not produced devices yet.
        state
            .begin_prepare(&claim("u3"), vec![alloc("gpu-3")])
            .unwrap();
        assert_eq!(
            state.prepared_device_counts_by_type(),
            BTreeMap::from([("gpu", 1), ("mig", 2), ("unknown", 1), ("vfio", 1)])
        );
    }

    #[test]
    fn device_info_keeps_unknown_and_malformed_types_verbatim() {
        for raw in [
            json!({"type": "tpu", "serial": 7}),
            json!({"type": "gpu", "uuid": 42}),
            json!({"uuid": "GPU-1"}),
            json!(null),
        ] {
            let info: DeviceInfo = serde_json::from_value(raw.clone()).unwrap();
            assert_eq!(info, DeviceInfo::Unknown(raw.clone()));
            assert_eq!(serde_json::to_value(&info).unwrap(), raw);
        }
        let info: DeviceInfo = serde_json::from_value(
            json!({"type": "gpu", "uuid": "GPU-1", "minor": 1, "new": true}),
        )
        .unwrap();
        assert_eq!(
            info,
            DeviceInfo::Gpu(PreparedGpu {
                uuid: "GPU-1".to_owned(),
                minor: Some(1)
            })
        );
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!({"type": "gpu", "uuid": "GPU-1", "minor": 1})
        );
    }
}

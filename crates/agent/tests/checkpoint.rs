//! Checkpoint file tests against a temp dir: round-trips, crash safety, old/new/foreign
//! formats, corruption handling and reboots.

// Fixture helpers outside #[test] functions panic on purpose: that is how they report a
// broken fixture.
#![allow(clippy::unwrap_used)]

// Named so that `cargo test checkpoint` selects these tests.
mod checkpoint_file {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use nvdra_agent::checkpoint::{
        AllocatedDevice, BeginOutcome, CheckpointState, CheckpointStore, ChecksumCheck, ClaimRef,
        ClaimState, DeviceInfo, FileReport, LoadOutcome, Loaded, PreparedDevice, PreparedGpu,
        PreparedGroup, PreparedMig, PreparedVfio, SCHEMA_VERSION, Source, WRITER, checksum,
    };
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    const BOOT: &str = "boot-1";

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            uid: uid.to_owned(),
            namespace: "ns".to_owned(),
            name: format!("claim-{uid}"),
        }
    }

    fn alloc(device: &str) -> AllocatedDevice {
        AllocatedDevice {
            requests: vec!["req".to_owned()],
            pool: "node-a".to_owned(),
            device: device.to_owned(),
            ..AllocatedDevice::default()
        }
    }

    /// A state with one completed GPU claim (time-sliced), one completed MIG + VFIO claim and one
    /// started claim.
    fn sample_state() -> CheckpointState {
        let mut state = CheckpointState::new(BOOT);
        state
            .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
            .unwrap();
        let mut config_state = serde_json::Map::new();
        config_state.insert("timeSliceInterval".to_owned(), json!("Short"));
        state
            .complete_prepare(
                "u1",
                vec![PreparedGroup {
                    devices: vec![PreparedDevice {
                        requests: vec!["req".to_owned()],
                        pool: "node-a".to_owned(),
                        device: "gpu-0".to_owned(),
                        cdi_device_ids: vec!["k8s.gpu.nvidia.com/claim=u1-gpu-0".to_owned()],
                        share_id: Some("share-1".to_owned()),
                        info: DeviceInfo::Gpu(PreparedGpu {
                            uuid: "GPU-0".to_owned(),
                            minor: Some(0),
                        }),
                        ..PreparedDevice::default()
                    }],
                    config_state,
                    ..PreparedGroup::default()
                }],
            )
            .unwrap();
        state
            .begin_prepare(
                &claim("u2"),
                vec![alloc("gpu-1-mig-1g10gb-0-0"), alloc("gpu-vfio-2")],
            )
            .unwrap();
        state
            .complete_prepare(
                "u2",
                vec![PreparedGroup {
                    devices: vec![
                        PreparedDevice {
                            device: "gpu-1-mig-1g10gb-0-0".to_owned(),
                            admin_access: true,
                            info: DeviceInfo::Mig(PreparedMig {
                                uuid: "MIG-1".to_owned(),
                                parent_uuid: "GPU-1".to_owned(),
                                parent_minor: Some(1),
                                gi_id: 3,
                                ci_id: 0,
                                profile: Some("1g.10gb".to_owned()),
                                placement_start: Some(0),
                                placement_size: Some(1),
                            }),
                            ..PreparedDevice::default()
                        },
                        PreparedDevice {
                            device: "gpu-vfio-2".to_owned(),
                            info: DeviceInfo::Vfio(PreparedVfio {
                                uuid: "GPU-2".to_owned(),
                                pci_bus_id: Some("0000:3b:00.0".to_owned()),
                            }),
                            ..PreparedDevice::default()
                        },
                    ],
                    ..PreparedGroup::default()
                }],
            )
            .unwrap();
        state
            .begin_prepare(&claim("u3"), vec![alloc("gpu-3")])
            .unwrap();
        state
    }

    fn nvdra_file(version: u32) -> FileReport {
        FileReport {
            source: Source::Nvdra {
                schema_version: version,
                writer: WRITER.to_owned(),
            },
            checksum: ChecksumCheck::Verified,
            boot_id_stamped: false,
        }
    }

    /// A checkpoint file around `data` exactly as given, with a correct checksum.
    fn envelope(version: u32, writer: &str, data: &str) -> String {
        format!(
            "{{\"kind\":\"NvdraCheckpoint\",\"version\":{version},\"writer\":\"{writer}\",\
         \"checksum\":\"{}\",\"data\":{data}}}",
            checksum(data)
        )
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn corrupt_outcome(loaded: &Loaded) -> (PathBuf, String) {
        match &loaded.outcome {
            LoadOutcome::Corrupt { aside_path, reason } => (aside_path.clone(), reason.clone()),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_preserves_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let state = sample_state();
        store.write(&state).unwrap();

        let loaded = store.load(BOOT).unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(nvdra_file(SCHEMA_VERSION))
        );
        assert!(!loaded.needs_write());
        assert_eq!(loaded.state, state);

        // Rewriting an unchanged state gives identical bytes (deterministic output).
        let first = fs::read(store.path()).unwrap();
        store.write(&loaded.state).unwrap();
        assert_eq!(fs::read(store.path()).unwrap(), first);
    }

    #[test]
    fn written_file_is_self_describing() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        store.write(&sample_state()).unwrap();

        let file: Value = serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(file["kind"], "NvdraCheckpoint");
        assert_eq!(file["version"], SCHEMA_VERSION);
        assert_eq!(file["writer"], WRITER);
        assert_eq!(file["data"]["nodeBootID"], BOOT);
        assert_eq!(file["data"]["claims"]["u1"]["state"], "PrepareCompleted");
        assert_eq!(file["data"]["claims"]["u3"]["state"], "PrepareStarted");
        assert_eq!(
            file["data"]["claims"]["u1"]["preparedDevices"][0]["devices"][0],
            json!({
                "requests": ["req"], "pool": "node-a", "device": "gpu-0",
                "cdiDeviceIDs": ["k8s.gpu.nvidia.com/claim=u1-gpu-0"], "shareID": "share-1",
                "adminAccess": false, "info": {"type": "gpu", "uuid": "GPU-0", "minor": 0}
            })
        );
        assert_eq!(
            file["data"]["claims"]["u2"]["preparedDevices"][0]["devices"][0]["info"],
            json!({
                "type": "mig", "uuid": "MIG-1", "parentUUID": "GPU-1", "parentMinor": 1, "giId": 3,
                "ciId": 0, "profile": "1g.10gb", "placementStart": 0, "placementSize": 1
            })
        );
        let text = fs::read_to_string(store.path()).unwrap();
        let data_start = text.find("\"data\":").unwrap() + "\"data\":".len();
        let data = &text[data_start..text.len() - 1];
        assert_eq!(file["checksum"], checksum(data));
    }

    #[test]
    fn write_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        store.write(&sample_state()).unwrap();
        store.write(&CheckpointState::new(BOOT)).unwrap();

        assert_eq!(dir_entries(dir.path()), vec!["checkpoint.json"]);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn temp_file_from_interrupted_write_is_ignored_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let state = sample_state();
        store.write(&state).unwrap();

        // A crash between creating the temp file and the rename leaves a partial temp file, maybe
        // with other permissions.
        let temp = dir.path().join("checkpoint.json.tmp");
        fs::write(&temp, b"{\"kind\":\"NvdraCheck").unwrap();
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o644)).unwrap();

        let loaded = store.load(BOOT).unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(nvdra_file(SCHEMA_VERSION))
        );
        assert_eq!(loaded.state, state);

        store.write(&loaded.state).unwrap();
        assert_eq!(dir_entries(dir.path()), vec!["checkpoint.json"]);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.load(BOOT).unwrap().state, state);
    }

    #[test]
    fn write_into_missing_dir_fails_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let store = CheckpointStore::new(&missing);
        let err = store.write(&CheckpointState::new(BOOT)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "failed to write checkpoint temp file {}",
                missing.join("checkpoint.json.tmp").display()
            )
        );
    }

    #[test]
    fn missing_file_gives_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = CheckpointStore::new(dir.path()).load(BOOT).unwrap();
        assert_eq!(
            loaded,
            Loaded {
                state: CheckpointState::new(BOOT),
                outcome: LoadOutcome::Missing,
            }
        );
        assert!(!loaded.needs_write());
    }

    #[test]
    fn older_file_without_boot_id_and_newer_fields_reads_and_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        // As an early writer might have produced it: no boot ID, no adminAccess, no shareID,
        // no configState, no updatedAt, no allocatedDevices.
        let data = r#"{"claims":{"u1":{"namespace":"ns","name":"claim-u1","state":"PrepareCompleted","preparedDevices":[{"devices":[{"requests":["req"],"pool":"node-a","device":"gpu-0","cdiDeviceIDs":["k8s.gpu.nvidia.com/device=gpu-0"],"info":{"type":"gpu","uuid":"GPU-0"}}]}]}}}"#;
        fs::write(store.path(), envelope(0, "0.0.1", data)).unwrap();

        let loaded = store.load(BOOT).unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(FileReport {
                source: Source::Nvdra {
                    schema_version: 0,
                    writer: "0.0.1".to_owned()
                },
                checksum: ChecksumCheck::Verified,
                boot_id_stamped: true,
            })
        );
        assert!(loaded.needs_write());
        assert_eq!(loaded.state.node_boot_id(), BOOT);
        let entry = loaded.state.claim("u1").unwrap();
        assert_eq!(entry.state, ClaimState::PrepareCompleted);
        assert_eq!(
            entry.prepared_devices,
            vec![PreparedGroup {
                devices: vec![PreparedDevice {
                    requests: vec!["req".to_owned()],
                    pool: "node-a".to_owned(),
                    device: "gpu-0".to_owned(),
                    cdi_device_ids: vec!["k8s.gpu.nvidia.com/device=gpu-0".to_owned()],
                    info: DeviceInfo::Gpu(PreparedGpu {
                        uuid: "GPU-0".to_owned(),
                        minor: None
                    }),
                    ..PreparedDevice::default()
                }],
                ..PreparedGroup::default()
            }]
        );

        // Once written back, the stamp sticks.
        store.write(&loaded.state).unwrap();
        assert_eq!(
            store.load(BOOT).unwrap().outcome,
            LoadOutcome::Valid(nvdra_file(SCHEMA_VERSION))
        );
    }

    /// `data` as a newer nvdra might write it: pretty-printed, unknown fields at every level, a
    /// claim state and a device type this build does not know.
    const NEWER_DATA: &str = r#"{
  "nodeBootID": "boot-1",
  "nodeName": "node-a",
  "claims": {
    "u1": {
      "namespace": "ns", "name": "claim-u1", "state": "PrepareCompleted",
      "priority": 3,
      "preparedDevices": [{
        "devices": [
          {"requests": ["req"], "pool": "node-a", "device": "gpu-0", "cdiDeviceIDs": [],
           "adminAccess": false, "healthAtPrepare": "ok",
           "info": {"type": "gpu", "uuid": "GPU-0", "minor": 0, "fabric": {"clique": "c1"}}},
          {"requests": ["req"], "pool": "node-a", "device": "tpu-0", "cdiDeviceIDs": [],
           "info": {"type": "tpu", "serial": "T-0"}}
        ],
        "configState": {"mpsControlDaemonID": "mps-1"},
        "appliedAt": "2030-01-01T00:00:00Z"
      }]
    },
    "u2": {
      "namespace": "ns", "name": "claim-u2", "state": "UnprepareStarted",
      "allocatedDevices": [{"requests": ["req"], "pool": "node-a", "device": "gpu-1", "weight": 2}]
    }
  }
}"#;

    #[test]
    fn newer_file_reads_what_it_understands_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let text = format!(
            "{{\"kind\":\"NvdraCheckpoint\",\"version\":7,\"writer\":\"9.9.9\",\"compression\":null,\
         \"checksum\":\"{}\",\"data\":{NEWER_DATA}}}",
            checksum(NEWER_DATA)
        );
        fs::write(store.path(), text).unwrap();

        let loaded = store.load(BOOT).unwrap();
        let source = Source::Nvdra {
            schema_version: 7,
            writer: "9.9.9".to_owned(),
        };
        assert!(source.is_newer());
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(FileReport {
                source,
                checksum: ChecksumCheck::Verified,
                boot_id_stamped: false,
            })
        );
        assert!(!loaded.needs_write());

        let state = loaded.state;
        let u1 = state.claim("u1").unwrap();
        let devices: Vec<&PreparedDevice> = u1.devices().collect();
        assert_eq!(
            devices[0].info,
            DeviceInfo::Gpu(PreparedGpu {
                uuid: "GPU-0".to_owned(),
                minor: Some(0)
            })
        );
        assert_eq!(
            devices[1].info,
            DeviceInfo::Unknown(json!({"type": "tpu", "serial": "T-0"}))
        );
        assert_eq!(
            state.claim("u2").unwrap().state,
            ClaimState::Unknown("UnprepareStarted".to_owned())
        );
        assert_eq!(state.completed_claims(), vec![claim("u1")]);
        assert_eq!(state.started_claims(), vec![]);

        // The unknown-state claim still holds its device.
        let mut probe = state.clone();
        assert_eq!(
            probe
                .begin_prepare(&claim("u9"), vec![alloc("gpu-1")])
                .unwrap_err()
                .to_string(),
            "device node-a/gpu-1 requested by claim ns/claim-u9 (u9) is already in use by claim \
         ns/claim-u2 (u2) (UnprepareStarted)"
        );

        // Rewriting keeps unknown fields at the data, claim, group and device levels and the
        // unknown claim and device verbatim (fields inside known device infos are dropped).
        store.write(&state).unwrap();
        let file: Value = serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        let data = &file["data"];
        assert_eq!(data["nodeName"], "node-a");
        assert_eq!(data["claims"]["u1"]["priority"], 3);
        let group = &data["claims"]["u1"]["preparedDevices"][0];
        assert_eq!(group["appliedAt"], "2030-01-01T00:00:00Z");
        assert_eq!(group["configState"], json!({"mpsControlDaemonID": "mps-1"}));
        assert_eq!(group["devices"][0]["healthAtPrepare"], "ok");
        assert_eq!(
            group["devices"][0]["info"],
            json!({"type": "gpu", "uuid": "GPU-0", "minor": 0})
        );
        assert_eq!(
            group["devices"][1]["info"],
            json!({"type": "tpu", "serial": "T-0"})
        );
        assert_eq!(data["claims"]["u2"]["state"], "UnprepareStarted");
        assert_eq!(data["claims"]["u2"]["allocatedDevices"][0]["weight"], 2);
        assert_eq!(store.load(BOOT).unwrap().state, state);
    }

    #[test]
    fn unknown_checksum_algorithm_reads_unverified() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let data = r#"{"nodeBootID":"boot-1","claims":{}}"#;
        fs::write(
            store.path(),
            format!(
                "{{\"kind\":\"NvdraCheckpoint\",\"version\":2,\"writer\":\"2.0.0\",\
             \"checksum\":\"blake3:00ff\",\"data\":{data}}}"
            ),
        )
        .unwrap();
        let loaded = store.load(BOOT).unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(FileReport {
                source: Source::Nvdra {
                    schema_version: 2,
                    writer: "2.0.0".to_owned()
                },
                checksum: ChecksumCheck::Unverified(
                    "unknown checksum algorithm \"blake3\"".to_owned()
                ),
                boot_id_stamped: false,
            })
        );
    }

    #[test]
    fn untrustworthy_files_are_moved_aside_and_reported() {
        let good = envelope(1, "0.1.0", r#"{"nodeBootID":"boot-1","claims":{}}"#);
        let tampered = good.replace("\"claims\":{}", "\"claims\":{ }");
        let recorded = checksum(r#"{"nodeBootID":"boot-1","claims":{}}"#);
        let computed = checksum(r#"{"nodeBootID":"boot-1","claims":{ }}"#);
        let truncated = good[..good.len() - 10].to_owned();
        let cases: Vec<(&str, String, String)> = vec![
            (
                "checksum mismatch",
                tampered,
                format!("checksum mismatch: file says {recorded}, data hashes to {computed}"),
            ),
            (
                "truncated",
                truncated,
                "cannot parse checkpoint: EOF while parsing a string at line 1 column 173"
                    .to_owned(),
            ),
            (
                "garbage",
                "\u{0}\u{1}garbage".to_owned(),
                "not a JSON object".to_owned(),
            ),
            ("empty", String::new(), "file is empty".to_owned()),
            ("blank", " \n".to_owned(), "file is empty".to_owned()),
            (
                "invalid JSON",
                "{kind: 1}".to_owned(),
                "cannot parse checkpoint: key must be a string at line 1 column 2".to_owned(),
            ),
            (
                "not an object",
                "[1, 2]".to_owned(),
                "not a JSON object".to_owned(),
            ),
            (
                "foreign kind",
                r#"{"kind":"Other","data":{}}"#.to_owned(),
                "not a checkpoint: kind is \"Other\"".to_owned(),
            ),
            (
                "no kind",
                r#"{"claims":{}}"#.to_owned(),
                "not a checkpoint: no kind".to_owned(),
            ),
            (
                "no checksum",
                r#"{"kind":"NvdraCheckpoint","data":{}}"#.to_owned(),
                "no checksum".to_owned(),
            ),
            (
                "no data",
                r#"{"kind":"NvdraCheckpoint","checksum":"sha256:00"}"#.to_owned(),
                "no data".to_owned(),
            ),
            (
                "malformed checksum",
                r#"{"kind":"NvdraCheckpoint","checksum":"deadbeef","data":{}}"#.to_owned(),
                "malformed checksum \"deadbeef\"".to_owned(),
            ),
            (
                "unparsable data",
                envelope(1, "0.1.0", r#"{"nodeBootID":"boot-1","claims":7}"#),
                "cannot parse data: invalid type: integer `7`, expected a map at line 1 column 33"
                    .to_owned(),
            ),
            (
                "unparsable go layout",
                r#"{"checksum":1,"v2":[]}"#.to_owned(),
                "v2 is not an object".to_owned(),
            ),
        ];
        for (name, contents, want_reason) in cases {
            let dir = tempfile::tempdir().unwrap();
            let store = CheckpointStore::new(dir.path());
            fs::write(store.path(), &contents).unwrap();

            let loaded = store.load(BOOT).unwrap();
            let (aside, reason) = corrupt_outcome(&loaded);
            assert_eq!(reason, want_reason, "{name}");
            assert_eq!(loaded.state, CheckpointState::new(BOOT), "{name}");
            assert!(loaded.needs_write(), "{name}");

            // The bad file is kept, byte for byte, under a timestamped name.
            let aside_name = aside.file_name().unwrap().to_string_lossy().into_owned();
            let ts = aside_name
                .strip_prefix("checkpoint.json.corrupt-")
                .unwrap_or_else(|| panic!("{name}: aside name {aside_name}"));
            assert!(
                ts.bytes().all(|b| b.is_ascii_digit()),
                "{name}: {aside_name}"
            );
            assert_eq!(aside.parent().unwrap(), dir.path(), "{name}");
            assert_eq!(fs::read_to_string(&aside).unwrap(), contents, "{name}");
            assert!(!store.path().exists(), "{name}");

            // The next start sees no checkpoint rather than the same corruption again.
            assert_eq!(store.load(BOOT).unwrap().outcome, LoadOutcome::Missing);
        }
    }

    #[test]
    fn repeated_corruption_never_overwrites_an_earlier_aside_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let mut asides = Vec::new();
        for attempt in ["first garbage", "second garbage", "third garbage"] {
            fs::write(store.path(), attempt).unwrap();
            let (aside, _) = corrupt_outcome(&store.load(BOOT).unwrap());
            asides.push((aside, attempt));
        }
        for (aside, contents) in &asides {
            assert_eq!(&fs::read_to_string(aside).unwrap(), contents);
        }
        let mut names: Vec<&PathBuf> = asides.iter().map(|(aside, _)| aside).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3);
        assert_eq!(dir_entries(dir.path()).len(), 3);

        // Writing a fresh state afterwards leaves the aside copies alone.
        store.write(&CheckpointState::new(BOOT)).unwrap();
        assert_eq!(dir_entries(dir.path()).len(), 4);
    }

    #[test]
    fn boot_id_change_discards_every_claim() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        store.write(&sample_state()).unwrap();

        let loaded = store.load("boot-2").unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::BootIdChanged {
                file: nvdra_file(SCHEMA_VERSION),
                previous_boot_id: BOOT.to_owned(),
                discarded: vec![claim("u1"), claim("u2"), claim("u3")],
            }
        );
        assert!(loaded.needs_write());
        assert_eq!(loaded.state, CheckpointState::new("boot-2"));
    }

    #[test]
    fn unknown_current_boot_id_keeps_claims() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let state = sample_state();
        store.write(&state).unwrap();

        let loaded = store.load("").unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(nvdra_file(SCHEMA_VERSION))
        );
        assert_eq!(loaded.state, state);
    }

    #[test]
    fn corrupt_then_rebuilt_state_can_prepare_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        fs::write(store.path(), "{").unwrap();
        let mut state = store.load(BOOT).unwrap().state;
        assert_eq!(
            state
                .begin_prepare(&claim("u1"), vec![alloc("gpu-0")])
                .unwrap(),
            BeginOutcome::Started
        );
        store.write(&state).unwrap();
        assert_eq!(store.load(BOOT).unwrap().state, state);
    }

    /// The Go driver's layout as 25.x writes it (v1 mirror of completed claims, v2 with states,
    /// Go's `null` slices, a MIG device recorded as a live tuple, admin access in the status).
    const GO_CHECKPOINT: &str = r#"{
  "version": "v2",
  "checksum": 1234567,
  "v1": {"preparedClaims": {}},
  "v2": {
    "checksum": 7654321,
    "nodeBootID": "boot-1",
    "preparedClaims": {
      "u1": {
        "checkpointState": "PrepareCompleted",
        "name": "claim-u1", "namespace": "ns",
        "status": {"allocation": {"devices": {"results": [
          {"request": "req", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-0"},
          {"request": "mig", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-1-mig-1g10gb-0-0", "adminAccess": true},
          {"request": "nic", "driver": "example.com/nic", "pool": "node-a", "device": "eth0"}
        ]}}},
        "preparedDevices": [
          {"devices": [
             {"gpu": {"info": {"uuid": "GPU-0"}, "device": {"Requests": ["req"], "PoolName": "node-a", "DeviceName": "gpu-0", "CDIDeviceIDs": ["k8s.gpu.nvidia.com/device=gpu-0"]}}, "mig": null}
           ],
           "configState": {"mpsControlDaemonID": "", "timeSliceApplied": true}},
          {"devices": [
             {"gpu": null, "mig": {"concrete": {"parentMinor": 1, "giId": 3, "ciId": 0, "migUUID": "MIG-1", "parentUUID": "GPU-1"}, "device": {"Requests": ["mig"], "PoolName": "node-a", "DeviceName": "gpu-1-mig-1g10gb-0-0", "CDIDeviceIDs": null}}},
             {"vfio": {"info": {"uuid": "GPU-2", "pciBusID": "0000:3b:00.0"}, "device": {"Requests": null, "PoolName": "node-a", "DeviceName": "gpu-vfio-2", "CDIDeviceIDs": [], "ShareID": "s-1"}}},
             {"channel": {"info": {"id": 0}, "device": {"DeviceName": "channel-0"}}}
           ],
           "configState": {"mpsControlDaemonID": ""}}
        ]
      },
      "u2": {"checkpointState": "PrepareStarted", "name": "claim-u2", "namespace": "ns",
             "status": {"allocation": {"devices": {"results": [
               {"request": "req", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-3"}
             ]}}}},
      "u3": {"checkpointState": "UnprepareCompleted", "name": "claim-u3", "namespace": "ns"}
    }
  }
}"#;

    #[test]
    fn go_driver_checkpoint_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        fs::write(store.path(), GO_CHECKPOINT).unwrap();

        let loaded = store.load(BOOT).unwrap();
        assert_eq!(
            loaded.outcome,
            LoadOutcome::Valid(FileReport {
                source: Source::UpstreamGo {
                    version: Some("v2".to_owned())
                },
                checksum: ChecksumCheck::Unverified(
                    "the Go driver's checksum is not reproducible outside Go".to_owned()
                ),
                boot_id_stamped: false,
            })
        );
        assert!(loaded.needs_write());
        let state = &loaded.state;
        assert_eq!(state.completed_claims(), vec![claim("u1")]);
        assert_eq!(state.started_claims(), vec![claim("u2")]);
        assert!(state.claim("u3").is_none(), "tombstones hold nothing");

        let u1 = state.claim("u1").unwrap();
        assert_eq!(
            u1.allocated_devices,
            vec![
                alloc("gpu-0"),
                AllocatedDevice {
                    requests: vec!["mig".to_owned()],
                    device: "gpu-1-mig-1g10gb-0-0".to_owned(),
                    admin_access: true,
                    ..alloc("")
                },
            ]
        );
        let mut time_slice = serde_json::Map::new();
        time_slice.insert("mpsControlDaemonID".to_owned(), json!(""));
        time_slice.insert("timeSliceApplied".to_owned(), json!(true));
        assert_eq!(u1.prepared_devices[0].config_state, time_slice);
        let devices: Vec<&PreparedDevice> = u1.devices().collect();
        assert_eq!(
            devices[0],
            &PreparedDevice {
                requests: vec!["req".to_owned()],
                pool: "node-a".to_owned(),
                device: "gpu-0".to_owned(),
                cdi_device_ids: vec!["k8s.gpu.nvidia.com/device=gpu-0".to_owned()],
                info: DeviceInfo::Gpu(PreparedGpu {
                    uuid: "GPU-0".to_owned(),
                    minor: Some(0)
                }),
                ..PreparedDevice::default()
            }
        );
        assert_eq!(
            devices[1],
            &PreparedDevice {
                requests: vec!["mig".to_owned()],
                pool: "node-a".to_owned(),
                device: "gpu-1-mig-1g10gb-0-0".to_owned(),
                admin_access: true,
                info: DeviceInfo::Mig(PreparedMig {
                    uuid: "MIG-1".to_owned(),
                    parent_uuid: "GPU-1".to_owned(),
                    parent_minor: Some(1),
                    gi_id: 3,
                    ci_id: 0,
                    ..PreparedMig::default()
                }),
                ..PreparedDevice::default()
            }
        );
        assert_eq!(
            devices[2],
            &PreparedDevice {
                pool: "node-a".to_owned(),
                device: "gpu-vfio-2".to_owned(),
                share_id: Some("s-1".to_owned()),
                info: DeviceInfo::Vfio(PreparedVfio {
                    uuid: "GPU-2".to_owned(),
                    pci_bus_id: Some("0000:3b:00.0".to_owned()),
                }),
                ..PreparedDevice::default()
            }
        );
        assert_eq!(devices[3].device, "channel-0");
        // The compute-domain plugin's channel record is imported as a channel.
        assert_eq!(devices[3].info.type_label(), "channel");

        // Idempotency carries over the upgrade.
        let mut state = loaded.state.clone();
        assert!(matches!(
            state.begin_prepare(&claim("u1"), vec![]).unwrap(),
            BeginOutcome::AlreadyCompleted(groups) if groups.len() == 2
        ));
        assert!(matches!(
            state.begin_prepare(&claim("u2"), vec![]).unwrap(),
            BeginOutcome::NeedsRollback(_)
        ));

        // Written back in nvdra's format, it reads the same.
        store.write(&loaded.state).unwrap();
        let again = store.load(BOOT).unwrap();
        assert_eq!(
            again.outcome,
            LoadOutcome::Valid(nvdra_file(SCHEMA_VERSION))
        );
        assert_eq!(again.state, loaded.state);
    }

    #[test]
    fn go_driver_v1_only_checkpoint_is_imported_as_completed_and_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        fs::write(
        store.path(),
        r#"{"checksum": 99, "v1": {"preparedClaims": {"u1": {"status": {}, "preparedDevices": [
            {"devices": [{"gpu": {"info": {"uuid": "GPU-5"}, "device": {"Requests": ["req"], "PoolName": "node-a", "DeviceName": "gpu-5", "CDIDeviceIDs": []}}}],
             "configState": {"mpsControlDaemonID": ""}}]}}}}"#,
    )
    .unwrap();

        let loaded = store.load(BOOT).unwrap();
        assert!(matches!(
            &loaded.outcome,
            LoadOutcome::Valid(FileReport {
                source: Source::UpstreamGo { version: None },
                boot_id_stamped: true,
                ..
            })
        ));
        assert_eq!(loaded.state.node_boot_id(), BOOT);
        assert_eq!(
            loaded.state.completed_claims(),
            vec![ClaimRef {
                uid: "u1".to_owned(),
                namespace: String::new(),
                name: String::new(),
            }]
        );
        assert_eq!(
            loaded.state.prepared_device_counts_by_type()["gpu"],
            1,
            "v1 claims count as prepared"
        );
    }

    #[test]
    fn go_driver_checkpoint_from_before_a_reboot_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        fs::write(store.path(), GO_CHECKPOINT).unwrap();
        let loaded = store.load("boot-2").unwrap();
        match loaded.outcome {
            LoadOutcome::BootIdChanged {
                previous_boot_id,
                discarded,
                ..
            } => {
                assert_eq!(previous_boot_id, BOOT);
                assert_eq!(discarded, vec![claim("u1"), claim("u2")]);
            }
            other => panic!("expected BootIdChanged, got {other:?}"),
        }
        assert!(loaded.state.is_empty());
    }
}

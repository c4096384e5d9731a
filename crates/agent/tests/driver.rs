//! `GpuDriver` on a fake node: prepare and unprepare against temp dirs with the fake profiles
//! and the fake driver root, start-up recovery, the stale-claim clean-up and the metrics.

#[path = "driver/fixtures.rs"]
mod fixtures;

// A `cfg(test)` module named `driver_*`: `cargo test -p nvdra-agent driver` selects these.
#[cfg(test)]
mod driver_prepare {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use std::time::Duration;

    use futures::future::BoxFuture;
    use k8s_openapi::api::resource::v1::ResourceClaim;
    use nvdra_agent::cdi::spec::DeviceNode;
    use nvdra_agent::checkpoint::{
        AllocatedDevice, CheckpointState, CheckpointStore, ClaimRef as CpRef, ClaimState,
        DeviceInfo, LoadOutcome, PreparedGpu, PreparedMig,
    };
    use nvdra_agent::cleanup::{
        CleanupReport, StaleClaim, StaleReason, cleanup_stale_claims,
        cleanup_stale_claims_with_timeout,
    };
    use nvdra_agent::driver::Adopted;
    use nvdra_agent::rebuild::plan_rebuild;
    use nvdra_api::{FeatureGate, FeatureGates};
    use nvdra_kubelet_plugin::{
        BoxError, ClaimError, ClaimReader, ClaimRef, DraDriver, InMemoryClaimReader, PreparedDevice,
    };
    use pretty_assertions::assert_eq;
    use serde_json::json;

    use crate::fixtures::*;

    type Outcomes = BTreeMap<String, Result<Vec<PreparedDevice>, String>>;

    async fn prepare(driver: &impl DraDriver, claims: Vec<ResourceClaim>) -> Outcomes {
        driver
            .prepare_resource_claims(claims.into_iter().map(to_prepare).collect())
            .await
            .into_iter()
            .map(|(uid, r)| (uid, r.map_err(|e: ClaimError| e.to_string())))
            .collect()
    }

    async fn unprepare(
        driver: &impl DraDriver,
        claims: &[ClaimRef],
    ) -> BTreeMap<String, Result<(), String>> {
        driver
            .unprepare_resource_claims(claims.to_vec())
            .await
            .into_iter()
            .map(|(uid, r)| (uid, r.map_err(|e| e.to_string())))
            .collect()
    }

    fn device(request: &str, name: &str, claim_uid: &str) -> PreparedDevice {
        PreparedDevice {
            requests: vec![request.into()],
            pool_name: NODE.into(),
            device_name: name.into(),
            cdi_device_ids: vec![format!("k8s.gpu.nvidia.com/claim={claim_uid}-{name}")],
            share_id: None,
        }
    }

    fn on_disk(dirs: &Dirs) -> CheckpointState {
        CheckpointStore::new(&dirs.data)
            .load(BOOT_ID)
            .unwrap()
            .state
    }

    fn gpu_claim(name: &str, claim_uid: &str, gpu: &str) -> ResourceClaim {
        allocated_claim(name, claim_uid, &[("gpu", gpu, false)])
    }

    fn gates(on: &[FeatureGate]) -> FeatureGates {
        on.iter()
            .fold(FeatureGates::default(), |g, gate| g.with(*gate, true))
    }

    #[test]
    fn node_resources_are_the_inventory() {
        let dirs = Dirs::new();
        let names = |profile| {
            start(&dirs, profile)
                .driver
                .node_resources()
                .devices
                .into_iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(H100),
            (0..8).map(|i| format!("gpu-{i}")).collect::<Vec<_>>()
        );
        let a100 = names(A100_MIG);
        assert_eq!(a100.len(), 4 + 3 + 7 + 2, "{a100:?}");
        assert!(a100.contains(&"gpu-4-mig-3g20gb-9-0".to_owned()));
        assert!(!a100.contains(&"gpu-4".to_owned()));
    }

    #[tokio::test]
    async fn full_gpu_lifecycle() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let driver = &started.driver;
        let a = uid(1);
        let claim = gpu_claim("a", &a, "gpu-0");

        // Prepare: result, spec file, checkpoint.
        let got = prepare(driver, vec![claim.clone()]).await;
        assert_eq!(
            got,
            BTreeMap::from([(a.clone(), Ok(vec![device("gpu", "gpu-0", &a)]))])
        );
        assert_eq!(
            dirs.cdi_files(),
            [format!("k8s.gpu.nvidia.com-claim_{a}.yaml")]
        );
        let spec = dirs.read_spec(&a);
        assert_eq!(spec.kind, "k8s.gpu.nvidia.com/claim");
        assert_eq!(spec.devices.len(), 1);
        assert_eq!(spec.devices[0].name, format!("{a}-gpu-0"));
        assert_eq!(
            spec.devices[0].container_edits.device_nodes,
            [DeviceNode {
                path: "/dev/nvidia0".into(),
                ..DeviceNode::default()
            }]
        );
        assert!(
            !spec.container_edits.mounts.is_empty(),
            "common edits carry the driver libraries"
        );
        let state = on_disk(&dirs);
        let entry = state.claim(&a).unwrap();
        assert_eq!(entry.state, ClaimState::PrepareCompleted);
        assert_eq!((entry.namespace.as_str(), entry.name.as_str()), ("ns", "a"));
        assert_eq!(
            entry.allocated_devices,
            [AllocatedDevice {
                requests: vec!["gpu".into()],
                pool: NODE.into(),
                device: "gpu-0".into(),
                ..AllocatedDevice::default()
            }]
        );
        let recorded: Vec<_> = entry.devices().collect();
        assert_eq!(recorded.len(), 1);
        assert_eq!(
            recorded[0].info,
            DeviceInfo::Gpu(PreparedGpu {
                uuid: "GPU-bf88b34e-db80-06f7-0aa4-acb3c54f52e1".into(),
                minor: Some(0),
            })
        );
        assert_eq!(
            recorded[0].cdi_device_ids,
            [format!("k8s.gpu.nvidia.com/claim={a}-gpu-0")]
        );
        assert_eq!(driver.checkpoint_state(), state);

        // Prepare again: same answer, nothing touched.
        let stamp = |path: &std::path::Path| {
            let m = std::fs::metadata(path).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec(), m.size())
        };
        let before = (stamp(&dirs.spec_path(&a)), stamp(&dirs.checkpoint_path()));
        let again = prepare(driver, vec![claim.clone()]).await;
        assert_eq!(again, got);
        assert_eq!(
            (stamp(&dirs.spec_path(&a)), stamp(&dirs.checkpoint_path())),
            before
        );

        // Unprepare: spec and entry gone; again, and an unknown claim, succeed.
        let unknown = ClaimRef::new("ns", "never", uid(99));
        let done = unprepare(driver, &[claim_ref(&claim), unknown.clone()]).await;
        assert_eq!(
            done,
            BTreeMap::from([(a.clone(), Ok(())), (unknown.uid.clone(), Ok(()))])
        );
        assert_eq!(dirs.cdi_files(), Vec::<String>::new());
        assert!(on_disk(&dirs).is_empty());
        assert_eq!(
            unprepare(driver, &[claim_ref(&claim)]).await,
            BTreeMap::from([(a.clone(), Ok(()))])
        );

        // Metrics: two successful prepares (one was a no-op), three unprepares; writes:
        // started + completed, then one for the unprepare; gauge back to zero.
        let text = scrape(&started.registry);
        assert_eq!(
            samples(&text, "nvidia_dra_requests_total"),
            [
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="prepare"} 2"#,
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="unprepare"} 3"#,
            ]
        );
        assert_eq!(
            histogram_count(
                &text,
                "nvidia_dra_request_duration_seconds",
                r#"driver="gpu.nvidia.com",operation="prepare""#
            ),
            2
        );
        assert_eq!(
            samples(&text, "nvdra_agent_checkpoint_writes_total"),
            [
                r#"nvdra_agent_checkpoint_writes_total{result="error"} 0"#,
                r#"nvdra_agent_checkpoint_writes_total{result="success"} 3"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_requests_inflight"),
            [
                r#"nvidia_dra_requests_inflight{driver="gpu.nvidia.com",operation="prepare"} 0"#,
                r#"nvidia_dra_requests_inflight{driver="gpu.nvidia.com",operation="unprepare"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices")[0],
            r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 0"#
        );
    }

    #[tokio::test]
    async fn a_held_device_is_refused_unless_admin_access() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let driver = &started.driver;
        let (a, b, c) = (uid(1), uid(2), uid(3));
        prepare(driver, vec![gpu_claim("a", &a, "gpu-0")]).await[&a]
            .as_ref()
            .unwrap();

        let got = prepare(driver, vec![gpu_claim("b", &b, "gpu-0")]).await;
        assert_eq!(
            got[&b],
            Err(format!(
                "device node-a/gpu-0 requested by claim ns/b ({b}) is already in use by claim \
                 ns/a ({a}) (PrepareCompleted)"
            ))
        );
        assert!(!dirs.spec_path(&b).exists());
        assert!(on_disk(&dirs).claim(&b).is_none());

        // Admin access (monitoring) may share the device.
        let admin = allocated_claim("c", &c, &[("gpu", "gpu-0", true)]);
        let got = prepare(driver, vec![admin]).await;
        assert_eq!(got[&c], Ok(vec![device("gpu", "gpu-0", &c)]));
        assert!(on_disk(&dirs).claim(&c).unwrap().allocated_devices[0].admin_access);

        // Two claims of one batch cannot both take one device either.
        let (d, e) = (uid(4), uid(5));
        let got = prepare(
            driver,
            vec![gpu_claim("d", &d, "gpu-1"), gpu_claim("e", &e, "gpu-1")],
        )
        .await;
        assert_eq!(got[&d], Ok(vec![device("gpu", "gpu-1", &d)]));
        assert_eq!(
            got[&e],
            Err(format!(
                "device node-a/gpu-1 requested by claim ns/e ({e}) is already in use by claim \
                 ns/d ({d}) (PrepareStarted)"
            ))
        );

        let text = scrape(&started.registry);
        assert_eq!(
            samples(&text, "nvidia_dra_node_prepare_errors_total"),
            [
                r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="lock_acquire"} 0"#,
                r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="prepare_devices"} 2"#,
                r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="publish_resources"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices")[0],
            r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 3"#
        );
    }

    #[tokio::test]
    async fn mig_device_gets_its_capability_nodes() {
        let dirs = Dirs::new();
        let started = start(&dirs, A100_MIG);
        let a = uid(1);
        let name = "gpu-4-mig-3g20gb-9-0";
        let got = prepare(
            &started.driver,
            vec![allocated_claim("a", &a, &[("mig", name, false)])],
        )
        .await;
        assert_eq!(got[&a], Ok(vec![device("mig", name, &a)]));
        let spec = dirs.read_spec(&a);
        assert_eq!(spec.devices[0].name, format!("{a}-{name}"));
        // Parent 4, GPU instance 1, compute instance 0 in the driver's minor layout.
        let paths: Vec<&str> = spec.devices[0]
            .container_edits
            .device_nodes
            .iter()
            .map(|n| n.path.as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "/dev/nvidia4",
                "/dev/nvidia-caps/nvidia-cap552",
                "/dev/nvidia-caps/nvidia-cap553"
            ]
        );
        let state = on_disk(&dirs);
        assert_eq!(
            state.claim(&a).unwrap().devices().next().unwrap().info,
            DeviceInfo::Mig(PreparedMig {
                uuid: "MIG-4ddcf483-a883-650d-cb21-f8d749e04d68".into(),
                parent_uuid: "GPU-1020e9cd-ff76-023b-1349-8f70a752d1cd".into(),
                parent_minor: Some(4),
                gi_id: 1,
                ci_id: 0,
                profile: Some("3g.20gb".into()),
                placement_start: Some(0),
                placement_size: Some(4),
            })
        );
        let text = scrape(&started.registry);
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices")[1],
            r#"nvidia_dra_prepared_devices{device_type="mig",driver="gpu.nvidia.com",node="node-a"} 1"#
        );
    }

    #[tokio::test]
    async fn claims_failing_checks_touch_nothing() {
        let dirs = Dirs::new();
        let started = start_with(
            &dirs,
            H100,
            gates(&[FeatureGate::TimeSlicingSettings, FeatureGate::MPSSupport]),
        );
        let gpu_config = |sharing: serde_json::Value| json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": sharing});
        let with_config = |n: u32, sharing: serde_json::Value| {
            allocated_claim_in_pool(
                &format!("c{n}"),
                &uid(n),
                NODE,
                &[("gpu", "gpu-0", false)],
                vec![claim_config(&["gpu"], gpu_config(sharing))],
            )
        };
        let cases: Vec<(&str, ResourceClaim, &str)> = vec![
            (
                "unknown device",
                gpu_claim("c1", &uid(1), "gpu-9"),
                r#"device "gpu-9" of request "gpu" is not offered by node "node-a""#,
            ),
            (
                "another node's pool",
                allocated_claim_in_pool(
                    "c2",
                    &uid(2),
                    "node-b",
                    &[("gpu", "gpu-0", false)],
                    vec![],
                ),
                r#"device "gpu-0" of request "gpu" is allocated from pool "node-b", but this node's pool is "node-a""#,
            ),
            (
                "unknown config field",
                with_config(3, json!({"strategy": "TimeSlicing", "foo": 1})),
                r#"invalid device configuration: claim config 0 (FromClaim): GpuConfig: unknown field "sharing.foo""#,
            ),
            (
                "MPS",
                with_config(4, json!({"strategy": "MPS"})),
                "claim config 0 (FromClaim): sharing strategy MPS is unavailable on this node: \
                 nvidia-cuda-mps-control was not found under the driver root when the agent \
                 started (install the driver's MPS tools there and restart the agent)",
            ),
            (
                "MIG config on a GPU",
                allocated_claim_in_pool(
                    "c6",
                    &uid(6),
                    NODE,
                    &[("gpu", "gpu-0", false)],
                    vec![claim_config(
                        &["gpu"],
                        json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "MigDeviceConfig"}),
                    )],
                ),
                r#"invalid device configuration: claim config 0 (FromClaim): MigDeviceConfig cannot configure device "gpu-0" of type gpu (request "gpu")"#,
            ),
        ];
        for (name, claim, want) in cases {
            let claim_uid = claim.metadata.uid.clone().unwrap();
            let got = prepare(&started.driver, vec![claim]).await;
            assert_eq!(got[&claim_uid], Err(want.to_owned()), "case {name}");
        }
        assert_eq!(dirs.cdi_files(), Vec::<String>::new());
        assert!(
            !dirs.checkpoint_path().exists(),
            "nothing was ever recorded"
        );

        // Time-slicing with the default interval is a no-op that succeeds.
        let ok = with_config(
            7,
            json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}),
        );
        let got = prepare(&started.driver, vec![ok]).await;
        assert_eq!(got[&uid(7)], Ok(vec![device("gpu", "gpu-0", &uid(7))]));
    }

    #[tokio::test]
    async fn time_slicing_sets_the_gpus_and_unprepare_resets_them() {
        use nvdra_gpu::{ComputeMode, GpuBackend, TimeSlice};
        let dirs = Dirs::new();
        let fake = backend(H100);
        let driver = start_on(
            &dirs,
            H100,
            &fake,
            gates(&[FeatureGate::TimeSlicingSettings]),
        )
        .driver;
        let gpus = fake.gpus().unwrap();
        // A GPU left in exclusive-process mode by someone else is put back.
        fake.set_compute_mode(&gpus[1], ComputeMode::ExclusiveProcess)
            .unwrap();

        let long = allocated_claim_in_pool(
            "long",
            &uid(1),
            NODE,
            &[("gpu", "gpu-0", false), ("gpu", "gpu-1", false)],
            vec![claim_config(
                &["gpu"],
                json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
                       "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}),
            )],
        );
        let long_ref = claim_ref(&long);
        let got = prepare(&driver, vec![long]).await;
        assert!(got[&uid(1)].is_ok(), "{got:?}");
        for gpu in &gpus[..2] {
            assert_eq!(fake.time_slice(&gpu.uuid), TimeSlice::Long);
            assert_eq!(fake.compute_mode(gpu).unwrap(), ComputeMode::Default);
        }
        assert_eq!(fake.time_slice(&gpus[2].uuid), TimeSlice::Default);
        let state = on_disk(&dirs);
        let groups = &state.claim(&uid(1)).unwrap().prepared_devices;
        assert_eq!(groups[0].config_state["timeSlice"], "Long");

        // The gate makes time-slicing the default: a claim without config
        // gets the default slice, recorded.
        let plain = allocated_claim("plain", &uid(2), &[("gpu", "gpu-2", false)]);
        let got = prepare(&driver, vec![plain]).await;
        assert!(got[&uid(2)].is_ok(), "{got:?}");
        assert_eq!(
            on_disk(&dirs).claim(&uid(2)).unwrap().prepared_devices[0].config_state["timeSlice"],
            "Default"
        );

        let got = unprepare(&driver, &[long_ref]).await;
        assert_eq!(got[&uid(1)], Ok(()));
        for gpu in &gpus[..2] {
            assert_eq!(fake.time_slice(&gpu.uuid), TimeSlice::Default);
        }
    }

    /// A prepare that crashed after setting a time slice has no config
    /// state; start-up rolls it back and resets its GPUs (gate on).
    #[test]
    fn startup_rollback_resets_time_slices() {
        use nvdra_gpu::{GpuBackend, TimeSlice};
        let dirs = Dirs::new();
        std::fs::create_dir_all(&dirs.data).unwrap();
        let store = CheckpointStore::new(&dirs.data);
        let mut state = store.load(BOOT_ID).unwrap().state;
        let claim = CpRef {
            uid: uid(1),
            namespace: "ns".into(),
            name: "a".into(),
        };
        let allocated = |device: &str, admin_access| AllocatedDevice {
            requests: vec!["gpu".into()],
            pool: NODE.into(),
            device: device.into(),
            admin_access,
            ..AllocatedDevice::default()
        };
        state
            .begin_prepare(
                &claim,
                vec![allocated("gpu-3", false), allocated("gpu-4", true)],
            )
            .unwrap();
        store.write(&state).unwrap();

        let fake = backend(H100);
        let gpus = fake.gpus().unwrap();
        for gpu in &gpus[3..5] {
            fake.set_time_slice(gpu, TimeSlice::Long).unwrap();
        }
        let startup = start_on(
            &dirs,
            H100,
            &fake,
            gates(&[FeatureGate::TimeSlicingSettings]),
        )
        .startup;
        assert_eq!(startup.rolled_back, vec![uid(1)]);
        assert_eq!(fake.time_slice(&gpus[3].uuid), TimeSlice::Default);
        assert_eq!(
            fake.time_slice(&gpus[4].uuid),
            TimeSlice::Long,
            "an admin-access device may be another claim's; left alone"
        );
    }

    #[tokio::test]
    async fn time_slicing_a_mig_device_changes_nothing() {
        use nvdra_gpu::{GpuBackend, TimeSlice};
        let dirs = Dirs::new();
        let fake = backend(A100_MIG);
        let driver = start_on(
            &dirs,
            A100_MIG,
            &fake,
            gates(&[FeatureGate::TimeSlicingSettings]),
        )
        .driver;
        let claim = allocated_claim_in_pool(
            "mig",
            &uid(3),
            NODE,
            &[("mig", "gpu-4-mig-3g20gb-9-0", false)],
            vec![claim_config(
                &["mig"],
                json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "MigDeviceConfig",
                       "sharing": {"strategy": "TimeSlicing"}}),
            )],
        );
        let got = prepare(&driver, vec![claim]).await;
        assert!(got[&uid(3)].is_ok(), "{got:?}");
        for gpu in fake.gpus().unwrap() {
            assert_eq!(fake.time_slice(&gpu.uuid), TimeSlice::Default);
        }
        assert!(
            on_disk(&dirs).claim(&uid(3)).unwrap().prepared_devices[0]
                .config_state
                .is_empty()
        );
    }

    #[tokio::test]
    async fn one_bad_claim_in_a_batch_of_eight() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let claims: Vec<ResourceClaim> = (0..8)
            .map(|i| {
                let gpu = if i == 5 {
                    "gpu-42".to_owned()
                } else {
                    format!("gpu-{i}")
                };
                gpu_claim(&format!("c{i}"), &uid(i), &gpu)
            })
            .collect();
        let got = prepare(&started.driver, claims).await;
        assert_eq!(got.len(), 8);
        for i in 0..8 {
            let result = &got[&uid(i)];
            if i == 5 {
                assert_eq!(
                    result,
                    &Err(
                        r#"device "gpu-42" of request "gpu" is not offered by node "node-a""#
                            .to_owned()
                    )
                );
            } else {
                assert_eq!(
                    result,
                    &Ok(vec![device("gpu", &format!("gpu-{i}"), &uid(i))])
                );
            }
        }
        assert_eq!(dirs.cdi_files().len(), 7);
        assert_eq!(on_disk(&dirs).completed_claims().len(), 7);

        let text = scrape(&started.registry);
        // One write records all seven as started, one records them completed.
        assert_eq!(
            samples(&text, "nvdra_agent_checkpoint_writes_total")[1],
            r#"nvdra_agent_checkpoint_writes_total{result="success"} 2"#
        );
        assert_eq!(
            samples(&text, "nvidia_dra_requests_total")[0],
            r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="prepare"} 7"#
        );
        assert_eq!(
            samples(&text, "nvidia_dra_node_prepare_errors_total")[1],
            r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="prepare_devices"} 1"#
        );
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices")[0],
            r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 7"#
        );
        assert_eq!(
            histogram_count(
                &text,
                "nvidia_dra_request_duration_seconds",
                r#"driver="gpu.nvidia.com",operation="prepare""#
            ),
            7
        );
    }

    #[tokio::test]
    async fn a_failed_spec_write_rolls_the_claim_back() {
        let dirs = Dirs::new();
        // A regular file where the CDI root should be: every spec write fails.
        std::fs::write(&dirs.cdi, b"not a directory").unwrap();
        let started = start(&dirs, H100);
        let a = uid(1);
        let got = prepare(&started.driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(
            got[&a],
            Err(format!(
                "cannot write CDI spec {}: File exists (os error 17)",
                dirs.cdi.display()
            ))
        );
        assert!(on_disk(&dirs).is_empty(), "the started entry was dropped");
        assert!(started.driver.checkpoint_state().is_empty());

        // Once the root is usable the claim, and its device, are fine.
        std::fs::remove_file(&dirs.cdi).unwrap();
        let got = prepare(&started.driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(got[&a], Ok(vec![device("gpu", "gpu-0", &a)]));
    }

    /// A directory where the checkpoint's temp file goes makes every checkpoint write fail.
    fn break_checkpoint_writes(dirs: &Dirs) {
        let _ = std::fs::create_dir(dirs.data.join("checkpoint.json.tmp"));
    }

    fn repair_checkpoint_writes(dirs: &Dirs) {
        std::fs::remove_dir(dirs.data.join("checkpoint.json.tmp")).unwrap();
    }

    fn write_error(dirs: &Dirs) -> String {
        format!(
            "failed to write checkpoint temp file {}: Is a directory (os error 21)",
            dirs.data.join("checkpoint.json.tmp").display()
        )
    }

    #[tokio::test]
    async fn failed_checkpoint_writes_fail_the_claims_until_the_file_catches_up() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let driver = &started.driver;
        let (a, b) = (uid(1), uid(2));

        // Recording PrepareStarted fails: nothing is prepared, the device stays free.
        break_checkpoint_writes(&dirs);
        let got = prepare(driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(
            got[&a],
            Err(format!(
                "cannot record the claim in the checkpoint: {}",
                write_error(&dirs)
            ))
        );
        assert_eq!(dirs.cdi_files(), Vec::<String>::new());
        assert!(driver.checkpoint_state().is_empty());
        repair_checkpoint_writes(&dirs);
        let got = prepare(driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(got[&a], Ok(vec![device("gpu", "gpu-0", &a)]));

        // Recording PrepareCompleted fails (after the spec exists): the kubelet hears of a
        // failure; its retry first makes the file current, then finds the claim completed.
        let hook_dirs = dirs.data.clone();
        driver.set_fault_hook(Arc::new(move |point| {
            if point == nvdra_agent::driver::FaultPoint::AfterSpecsWritten {
                let _ = std::fs::create_dir(hook_dirs.join("checkpoint.json.tmp"));
            }
        }));
        let got = prepare(driver, vec![gpu_claim("b", &b, "gpu-1")]).await;
        assert_eq!(
            got[&b],
            Err(format!(
                "cannot record the claim in the checkpoint: {}",
                write_error(&dirs)
            ))
        );
        assert_eq!(
            on_disk(&dirs).claim(&b).map(|e| e.state.clone()),
            Some(ClaimState::PrepareStarted)
        );
        // While the file lags behind, nothing succeeds, not even a no-op.
        let got = prepare(driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(
            got[&a],
            Err(format!(
                "cannot bring the node's checkpoint up to date: {}",
                write_error(&dirs)
            ))
        );
        repair_checkpoint_writes(&dirs);
        let got = prepare(driver, vec![gpu_claim("b", &b, "gpu-1")]).await;
        assert_eq!(got[&b], Ok(vec![device("gpu", "gpu-1", &b)]));
        assert_eq!(
            on_disk(&dirs).claim(&b).map(|e| e.state.clone()),
            Some(ClaimState::PrepareCompleted)
        );

        // Unprepare whose checkpoint write fails: reported, retried, then done.
        break_checkpoint_writes(&dirs);
        let done = unprepare(driver, &[claim_ref(&gpu_claim("a", &a, "gpu-0"))]).await;
        assert_eq!(
            done[&a],
            Err(format!(
                "cannot remove the claim from the checkpoint: {}",
                write_error(&dirs)
            ))
        );
        assert!(on_disk(&dirs).claim(&a).is_some());
        repair_checkpoint_writes(&dirs);
        let done = unprepare(driver, &[claim_ref(&gpu_claim("a", &a, "gpu-0"))]).await;
        assert_eq!(done[&a], Ok(()));
        assert!(on_disk(&dirs).claim(&a).is_none());

        let text = scrape(&started.registry);
        assert_eq!(
            samples(&text, "nvdra_agent_checkpoint_writes_total"),
            [
                r#"nvdra_agent_checkpoint_writes_total{result="error"} 4"#,
                r#"nvdra_agent_checkpoint_writes_total{result="success"} 6"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_node_prepare_errors_total"),
            [
                r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="lock_acquire"} 1"#,
                r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="prepare_devices"} 2"#,
                r#"nvidia_dra_node_prepare_errors_total{driver="gpu.nvidia.com",error_type="publish_resources"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "nvidia_dra_node_unprepare_errors_total")[2],
            r#"nvidia_dra_node_unprepare_errors_total{driver="gpu.nvidia.com",error_type="unprepare_devices"} 1"#
        );
    }

    /// A panic inside a batch (a bug) fails that call only: the next batch re-reads the
    /// checkpoint instead of trusting half-updated memory, and redoes the claim.
    #[tokio::test]
    async fn a_panicking_batch_is_recovered_from_the_file() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let driver = &started.driver;
        let a = uid(1);
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let trigger = Arc::clone(&armed);
        driver.set_fault_hook(Arc::new(move |point| {
            if point == nvdra_agent::driver::FaultPoint::AfterPrepareStarted
                && trigger.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("injected bug");
            }
        }));
        let got = prepare(driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(
            got[&a],
            Err("internal error: the prepare worker died".to_owned())
        );
        assert!(!armed.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            on_disk(&dirs).claim(&a).map(|e| e.state.clone()),
            Some(ClaimState::PrepareStarted)
        );

        let got = prepare(driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(got[&a], Ok(vec![device("gpu", "gpu-0", &a)]));
        assert_eq!(
            on_disk(&dirs).claim(&a).map(|e| e.state.clone()),
            Some(ClaimState::PrepareCompleted)
        );
    }

    /// Another agent instance (rolling update) left an interrupted prepare in the file: the
    /// driver notices the file changed, reloads it, rolls the claim back and prepares afresh.
    #[tokio::test]
    async fn an_interrupted_prepare_found_on_disk_is_redone() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let a = uid(1);
        let store = CheckpointStore::new(&dirs.data);
        let mut other = store.load(BOOT_ID).unwrap().state;
        let claim = CpRef {
            uid: a.clone(),
            namespace: "ns".into(),
            name: "a".into(),
        };
        other
            .begin_prepare(
                &claim,
                vec![AllocatedDevice {
                    requests: vec!["gpu".into()],
                    pool: NODE.into(),
                    device: "gpu-3".into(),
                    ..AllocatedDevice::default()
                }],
            )
            .unwrap();
        store.write(&other).unwrap();
        std::fs::create_dir_all(&dirs.cdi).unwrap();
        std::fs::write(dirs.spec_path(&a), b"half-written by the other instance").unwrap();

        let got = prepare(&started.driver, vec![gpu_claim("a", &a, "gpu-0")]).await;
        assert_eq!(got[&a], Ok(vec![device("gpu", "gpu-0", &a)]));
        assert_eq!(dirs.read_spec(&a).devices[0].name, format!("{a}-gpu-0"));
        let entry = on_disk(&dirs).claim(&a).cloned().unwrap();
        assert_eq!(entry.state, ClaimState::PrepareCompleted);
        assert_eq!(entry.allocated_devices[0].device, "gpu-0");
    }

    #[test]
    fn startup_removes_orphaned_specs_and_temp_files() {
        let dirs = Dirs::new();
        std::fs::create_dir_all(&dirs.cdi).unwrap();
        let orphan = uid(7);
        std::fs::write(dirs.spec_path(&orphan), b"kind: k8s.gpu.nvidia.com/claim").unwrap();
        let temp = dirs.cdi.join(format!(
            ".k8s.gpu.nvidia.com-claim_{orphan}.yaml.123.0.456.tmp"
        ));
        std::fs::write(&temp, b"").unwrap();
        // Specs of other vendors are not ours to touch.
        let foreign = dirs.cdi.join("k8s.compute-domain.nvidia.com-claim_x.yaml");
        std::fs::write(&foreign, b"").unwrap();

        let started = start(&dirs, H100);
        assert_eq!(started.startup.orphan_specs_removed, 1);
        assert_eq!(started.startup.temp_files_removed, 1);
        assert_eq!(started.startup.rolled_back, Vec::<String>::new());
        assert_eq!(started.startup.problems, Vec::<String>::new());
        assert_eq!(
            dirs.cdi_files(),
            ["k8s.compute-domain.nvidia.com-claim_x.yaml"]
        );
    }

    #[tokio::test]
    async fn startup_keeps_specs_of_recorded_claims() {
        let dirs = Dirs::new();
        let a = uid(1);
        {
            let started = start(&dirs, H100);
            prepare(&started.driver, vec![gpu_claim("a", &a, "gpu-0")]).await[&a]
                .as_ref()
                .unwrap();
        }
        let restarted = start(&dirs, H100);
        assert_eq!(restarted.startup.orphan_specs_removed, 0);
        assert!(dirs.spec_path(&a).exists());
        let text = scrape(&restarted.registry);
        assert_eq!(
            samples(&text, "nvidia_dra_prepared_devices")[0],
            r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 1"#
        );
        // The restarted driver still refuses the device to another claim.
        let got = prepare(&restarted.driver, vec![gpu_claim("b", &uid(2), "gpu-0")]).await;
        assert!(got[&uid(2)].is_err());
    }

    #[tokio::test]
    async fn corrupt_checkpoint_keeps_specs_until_live_claims_are_adopted() {
        let dirs = Dirs::new();
        let (a, b, orphan, c) = (uid(1), uid(2), uid(3), uid(4));
        let mut claims = vec![gpu_claim("a", &a, "gpu-0"), gpu_claim("b", &b, "gpu-1")];
        let before = {
            let started = start(&dirs, H100);
            let got = prepare(&started.driver, claims.clone()).await;
            assert!(got.values().all(Result::is_ok), "{got:?}");
            on_disk(&dirs)
        };
        std::fs::write(dirs.spec_path(&orphan), b"kind: k8s.gpu.nvidia.com/claim").unwrap();
        std::fs::write(dirs.checkpoint_path(), b"{\"kind\": garbage").unwrap();

        let restarted = start(&dirs, H100);
        assert!(
            matches!(restarted.startup.checkpoint, LoadOutcome::Corrupt { .. }),
            "{:?}",
            restarted.startup.checkpoint
        );
        assert_eq!(
            restarted.startup.unaccounted_specs,
            [a.clone(), b.clone(), orphan.clone()]
        );
        assert_eq!(restarted.startup.orphan_specs_removed, 0);
        for kept in [&a, &b, &orphan] {
            assert!(dirs.spec_path(kept).exists(), "spec of {kept} removed");
        }
        assert!(restarted.driver.checkpoint_state().is_empty());

        // Both claims are still reserved by their pods; the orphan's claim is gone.
        for claim in &mut claims {
            claim.status.as_mut().unwrap().reserved_for = Some(vec![
                k8s_openapi::api::resource::v1::ResourceClaimConsumerReference {
                    resource: "pods".into(),
                    name: "pod".into(),
                    uid: "pod-uid".into(),
                    ..Default::default()
                },
            ]);
        }
        let plan = plan_rebuild(
            NODE,
            DRIVER,
            restarted.driver.allocatable_devices(),
            &claims,
            &restarted
                .startup
                .unaccounted_specs
                .iter()
                .cloned()
                .collect(),
        );
        assert_eq!(plan.stale_specs, vec![orphan.clone()]);
        let report = restarted
            .driver
            .adopt_after_corruption(plan.adopt, plan.stale_specs)
            .await
            .unwrap();
        assert_eq!(
            report,
            Adopted {
                adopted: vec![a.clone(), b.clone()],
                refused: vec![],
                stale_specs_removed: 1,
                problems: vec![],
            }
        );

        let after = on_disk(&dirs);
        assert_eq!(after.completed_claims(), before.completed_claims());
        for claim in [&a, &b] {
            let devices = |state: &CheckpointState| -> Vec<_> {
                state.claim(claim).unwrap().devices().cloned().collect()
            };
            assert_eq!(devices(&after), devices(&before), "claim {claim}");
        }
        assert!(dirs.spec_path(&a).exists());
        assert!(dirs.spec_path(&b).exists());
        assert!(!dirs.spec_path(&orphan).exists());
        assert_eq!(
            samples(&scrape(&restarted.registry), "nvidia_dra_prepared_devices")[0],
            r#"nvidia_dra_prepared_devices{device_type="gpu",driver="gpu.nvidia.com",node="node-a"} 2"#
        );

        // No double use: an adopted device is refused to another claim.
        let got = prepare(&restarted.driver, vec![gpu_claim("c", &c, "gpu-0")]).await;
        assert_eq!(
            got[&c],
            Err(format!(
                "device node-a/gpu-0 requested by claim ns/c ({c}) is already in use by claim \
                 ns/a ({a}) (PrepareCompleted)"
            ))
        );
        // A second adoption (a retry) changes nothing.
        let again = restarted
            .driver
            .adopt_after_corruption(
                plan_rebuild(
                    NODE,
                    DRIVER,
                    restarted.driver.allocatable_devices(),
                    &claims,
                    &[a.clone()].into(),
                )
                .adopt,
                vec![a.clone()],
            )
            .await
            .unwrap();
        assert_eq!(again, Adopted::default());
        assert!(dirs.spec_path(&a).exists());
    }

    /// A reader that never answers in time.
    struct Stuck;

    impl ClaimReader for Stuck {
        fn read_claim<'a>(
            &'a self,
            _namespace: &'a str,
            _name: &'a str,
        ) -> BoxFuture<'a, Result<Option<ResourceClaim>, BoxError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(None)
            })
        }
    }

    #[tokio::test]
    async fn cleanup_unprepares_claims_whose_resourceclaim_is_gone() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let driver = &started.driver;
        let claims: Vec<ResourceClaim> = ["live", "gone", "replaced", "unreadable"]
            .iter()
            .enumerate()
            .map(|(i, name)| gpu_claim(name, &uid(i as u32), &format!("gpu-{i}")))
            .collect();
        let got = prepare(driver, claims.clone()).await;
        assert!(got.values().all(Result::is_ok), "{got:?}");

        let reader = InMemoryClaimReader::new();
        reader.insert(claims[0].clone());
        let mut replaced = claims[2].clone();
        replaced.metadata.uid = Some("c0ffee00-0000-4000-8000-000000000000".into());
        reader.insert(replaced);
        reader.insert_error("ns", "unreadable", "connection refused");

        let report = cleanup_stale_claims(driver, &reader).await;
        let cp = |i: u32, name: &str| CpRef {
            uid: uid(i),
            namespace: "ns".into(),
            name: name.into(),
        };
        assert_eq!(
            report,
            CleanupReport {
                checked: 4,
                unprepared: vec![
                    StaleClaim {
                        claim: cp(1, "gone"),
                        reason: StaleReason::NotFound,
                    },
                    StaleClaim {
                        claim: cp(2, "replaced"),
                        reason: StaleReason::Replaced {
                            current_uid: "c0ffee00-0000-4000-8000-000000000000".into(),
                        },
                    },
                ],
                unknown: vec![(
                    cp(3, "unreadable"),
                    "reading the ResourceClaim failed: connection refused".into()
                )],
                failed: vec![],
            }
        );
        let left: Vec<String> = on_disk(&dirs).claims().map(|(u, _)| u.to_owned()).collect();
        assert_eq!(left, [uid(0), uid(3)]);
        assert_eq!(
            dirs.cdi_files(),
            [
                format!("k8s.gpu.nvidia.com-claim_{}.yaml", uid(0)),
                format!("k8s.gpu.nvidia.com-claim_{}.yaml", uid(3)),
            ]
        );

        // A lookup that hangs is bounded and keeps the claim.
        let report =
            cleanup_stale_claims_with_timeout(driver, &Stuck, Duration::from_millis(50)).await;
        assert_eq!(report.unprepared, vec![]);
        assert_eq!(
            report.unknown,
            vec![
                (
                    cp(0, "live"),
                    "reading the ResourceClaim timed out after 50 ms".into()
                ),
                (
                    cp(3, "unreadable"),
                    "reading the ResourceClaim timed out after 50 ms".into()
                ),
            ]
        );

        // The kubelet's own unprepare of a claim the clean-up removed still succeeds.
        let done = unprepare(driver, &[claim_ref(&claims[1])]).await;
        assert_eq!(done[&uid(1)], Ok(()));
    }

    #[tokio::test]
    async fn cleanup_rolls_back_interrupted_prepares_without_asking() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        // Pretend another instance left a started claim; the driver reloads it on the pass.
        let store = CheckpointStore::new(&dirs.data);
        let mut state = store.load(BOOT_ID).unwrap().state;
        let claim = CpRef {
            uid: uid(1),
            namespace: "ns".into(),
            name: "a".into(),
        };
        state.begin_prepare(&claim, vec![]).unwrap();
        store.write(&state).unwrap();

        let reader = Arc::new(InMemoryClaimReader::new());
        let report = cleanup_stale_claims(&started.driver, reader.as_ref()).await;
        assert_eq!(
            report.unprepared,
            vec![StaleClaim {
                claim,
                reason: StaleReason::Interrupted,
            }]
        );
        assert!(on_disk(&dirs).is_empty());
    }
}

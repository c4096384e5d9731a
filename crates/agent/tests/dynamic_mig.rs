//! DynamicMIG on a fake node: what the agent publishes (counters, full GPUs,
//! partitions), Prepare creating the MIG device and Unprepare destroying
//! it, and the start-up clean-up of MIG devices no claim holds.

#[path = "driver/fixtures.rs"]
mod fixtures;

#[cfg(test)]
mod dynamic_mig {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use k8s_openapi::api::resource::v1::ResourceClaim;
    use nvdra_agent::checkpoint::{
        AllocatedDevice, CheckpointStore, ClaimRef as CpRef, DeviceInfo,
    };
    use nvdra_agent::driver::GpuDriver;
    use nvdra_api::{FeatureGate, FeatureGates};
    use nvdra_gpu::{FakeBackend, GpuBackend};
    use nvdra_kubelet_plugin::{ClaimError, DraDriver, PreparedDevice};
    use pretty_assertions::assert_eq;

    use crate::fixtures::*;

    type Outcomes = BTreeMap<String, Result<Vec<PreparedDevice>, String>>;

    fn dynamic() -> FeatureGates {
        FeatureGates::default().with(FeatureGate::DynamicMIG, true)
    }

    fn start_dynamic(dirs: &Dirs, profile: &str) -> (GpuDriver, Arc<FakeBackend>) {
        let fake = backend(profile);
        (start_on(dirs, profile, &fake, dynamic()).driver, fake)
    }

    async fn prepare(driver: &GpuDriver, claims: Vec<ResourceClaim>) -> Outcomes {
        driver
            .prepare_resource_claims(claims.into_iter().map(to_prepare).collect())
            .await
            .into_iter()
            .map(|(uid, r)| (uid, r.map_err(|e: ClaimError| e.to_string())))
            .collect()
    }

    #[test]
    fn publishes_counters_full_gpus_and_partitions() {
        let dirs = Dirs::new();
        let (driver, _fake) = start_dynamic(&dirs, H100);
        let resources = driver.node_resources();
        assert_eq!(resources.shared_counters.len(), 8);
        assert_eq!(resources.shared_counters[0].name, "gpu-0-counter-set");
        // Per H100: the full GPU and 25 partitions.
        assert_eq!(resources.devices.len(), 8 * 26);
        let by_name: BTreeMap<&str, _> = resources
            .devices
            .iter()
            .map(|d| (d.name.as_str(), d))
            .collect();
        let full = by_name["gpu-0"];
        let capacity = full.capacity.as_ref().unwrap();
        assert_eq!(capacity["multiprocessors"].value.0, "132");
        assert_eq!(capacity["copyEngines"].value.0, "8");
        // The full GPU's memory stays the GPU's (80 GB), not the 7g profile's.
        assert_eq!(
            capacity["memory"].value.0,
            (81559_u64 * 1024 * 1024).to_string()
        );
        let consumed = &full.consumes_counters.as_ref().unwrap()[0];
        assert_eq!(consumed.counter_set, "gpu-0-counter-set");
        assert_eq!(
            consumed.counters.len(),
            7 + 8,
            "every engine, memory and slice"
        );
        let part = by_name["gpu-0-mig-3g40gb-9-4"];
        let attrs = part.attributes.as_ref().unwrap();
        assert_eq!(attrs["type"].string.as_deref(), Some("mig"));
        assert_eq!(attrs["profile"].string.as_deref(), Some("3g.40gb"));
        assert!(!attrs.contains_key("uuid"), "a partition has no UUID yet");
        let slices: Vec<&String> = part.consumes_counters.as_ref().unwrap()[0]
            .counters
            .keys()
            .filter(|k| k.starts_with("memory-slice-"))
            .collect();
        assert_eq!(
            slices,
            [
                "memory-slice-4",
                "memory-slice-5",
                "memory-slice-6",
                "memory-slice-7"
            ]
        );
    }

    #[test]
    fn nodes_without_mig_keep_their_gpus() {
        // Upstream's issue #1092: the gate must not empty a node of L4s.
        let dirs = Dirs::new();
        let (driver, _fake) = start_dynamic(&dirs, "l4-x2");
        let resources = driver.node_resources();
        assert!(resources.shared_counters.is_empty());
        let names: Vec<&str> = resources.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["gpu-0", "gpu-1"]);
    }

    #[tokio::test]
    async fn prepare_creates_and_unprepare_destroys() {
        let dirs = Dirs::new();
        let (driver, fake) = start_dynamic(&dirs, H100);
        let gpu = fake.gpus().unwrap().remove(1);
        let a = allocated_claim(
            "a",
            &uid(1),
            &[
                ("mig", "gpu-1-mig-3g40gb-9-4", false),
                ("small", "gpu-1-mig-1g10gb-19-2", false),
            ],
        );
        let a_ref = claim_ref(&a);
        let got = prepare(&driver, vec![a]).await;
        assert!(got[&uid(1)].is_ok(), "{got:?}");
        let mut now = gpu.clone();
        now.mig_enabled = true;
        let migs = fake.mig_devices(&now).unwrap();
        assert_eq!(
            migs.iter().map(|m| m.device_name()).collect::<Vec<_>>(),
            ["gpu-1-mig-3g40gb-9-4", "gpu-1-mig-1g10gb-19-2"]
        );
        assert!(fake.gpus().unwrap()[1].mig_enabled, "MIG was turned on");

        // The record names the created device; the spec carries its nodes.
        let state = CheckpointStore::new(&dirs.data)
            .load(BOOT_ID)
            .unwrap()
            .state;
        let recorded: Vec<String> = state
            .claim(&uid(1))
            .unwrap()
            .devices()
            .map(|d| match &d.info {
                DeviceInfo::Mig(m) => m.uuid.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        let mut created: Vec<String> = migs.iter().map(|m| m.uuid.clone()).collect();
        created.sort();
        let mut recorded_sorted = recorded.clone();
        recorded_sorted.sort();
        assert_eq!(recorded_sorted, created);
        let spec = std::fs::read_to_string(dirs.spec_path(&uid(1))).unwrap();
        let caps = fake.mig_capabilities(&migs[0]).unwrap();
        assert!(
            spec.contains(&format!("nvidia-cap{}", caps.gi_minor)),
            "{spec}"
        );

        let got = driver.unprepare_resource_claims(vec![a_ref]).await;
        assert!(got[&uid(1)].is_ok());
        assert!(fake.mig_devices(&now).unwrap().is_empty());
        assert!(!fake.gpus().unwrap()[1].mig_enabled, "MIG turned off again");
    }

    #[tokio::test]
    async fn admin_access_sees_the_holders_device_and_creates_nothing() {
        let dirs = Dirs::new();
        let (driver, fake) = start_dynamic(&dirs, H100);
        let mut gpu = fake.gpus().unwrap().remove(4);
        gpu.mig_enabled = true;
        let part = "gpu-4-mig-2g20gb-14-2";
        // Nothing holds the partition yet: admin access has nothing to see.
        let early = allocated_claim("admin-early", &uid(8), &[("mig", part, true)]);
        let got = prepare(&driver, vec![early]).await;
        let err = got[&uid(8)].clone().unwrap_err();
        assert!(err.contains("no such MIG instance"), "{err}");
        assert!(fake.mig_devices(&gpu).unwrap().is_empty());

        let owner = allocated_claim("owner", &uid(9), &[("mig", part, false)]);
        let admin = allocated_claim("admin", &uid(10), &[("mig", part, true)]);
        let admin_ref = claim_ref(&admin);
        assert!(prepare(&driver, vec![owner]).await[&uid(9)].is_ok());
        assert!(prepare(&driver, vec![admin]).await[&uid(10)].is_ok());
        let migs = fake.mig_devices(&gpu).unwrap();
        assert_eq!(migs.len(), 1, "admin access created nothing");
        let spec = std::fs::read_to_string(dirs.spec_path(&uid(10))).unwrap();
        let caps = fake.mig_capabilities(&migs[0]).unwrap();
        assert!(
            spec.contains(&format!("nvidia-cap{}", caps.ci_minor)),
            "{spec}"
        );
        // Its unprepare leaves the owner's device alone.
        let got = driver.unprepare_resource_claims(vec![admin_ref]).await;
        assert!(got[&uid(10)].is_ok());
        assert_eq!(fake.mig_devices(&gpu).unwrap(), migs);
    }

    #[tokio::test]
    async fn an_occupied_placement_fails_the_claim_and_leaves_nothing() {
        let dirs = Dirs::new();
        let (driver, fake) = start_dynamic(&dirs, H100);
        let mut gpu = fake.gpus().unwrap().remove(2);
        // Someone creates a MIG device behind the agent's back.
        fake.set_mig_mode(&gpu, true).unwrap();
        gpu.mig_enabled = true;
        fake.create_mig_device(&gpu, 19, 5).unwrap();
        let claim = allocated_claim(
            "b",
            &uid(2),
            &[
                ("a", "gpu-2-mig-1g10gb-19-0", false),
                ("b", "gpu-2-mig-2g20gb-14-4", false),
            ],
        );
        let got = prepare(&driver, vec![claim]).await;
        let err = got[&uid(2)].clone().unwrap_err();
        assert!(
            err.contains("gpu-2-mig-2g20gb-14-4")
                && err.contains("overlaps an existing MIG instance"),
            "{err}"
        );
        // The 1g created first was destroyed again; the stranger stays.
        let left: Vec<String> = fake
            .mig_devices(&gpu)
            .unwrap()
            .iter()
            .map(|m| m.device_name())
            .collect();
        assert_eq!(left, ["gpu-2-mig-1g10gb-19-5"]);
        assert!(!dirs.spec_path(&uid(2)).exists());
    }

    #[test]
    fn start_up_destroys_what_no_claim_holds() {
        let dirs = Dirs::new();
        std::fs::create_dir_all(&dirs.data).unwrap();
        // An interrupted prepare of a partition, whose device exists.
        let store = CheckpointStore::new(&dirs.data);
        let mut state = store.load(BOOT_ID).unwrap().state;
        let claim = CpRef {
            uid: uid(3),
            namespace: "ns".into(),
            name: "c".into(),
        };
        state
            .begin_prepare(
                &claim,
                vec![AllocatedDevice {
                    requests: vec!["mig".into()],
                    pool: NODE.into(),
                    device: "gpu-3-mig-4g40gb-5-0".into(),
                    ..AllocatedDevice::default()
                }],
            )
            .unwrap();
        store.write(&state).unwrap();

        let fake = backend(H100);
        let mut gpu = fake.gpus().unwrap().remove(3);
        fake.set_mig_mode(&gpu, true).unwrap();
        gpu.mig_enabled = true;
        fake.create_mig_device(&gpu, 5, 0).unwrap();
        // And a device no claim ever held.
        fake.create_mig_device(&gpu, 19, 6).unwrap();

        let startup = start_on(&dirs, H100, &fake, dynamic()).startup;
        assert_eq!(startup.rolled_back, vec![uid(3)]);
        assert!(fake.mig_devices(&gpu).unwrap().is_empty());
        assert!(!fake.gpus().unwrap()[3].mig_enabled);
    }
}

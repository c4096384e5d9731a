use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationResult, ResourceClaimConsumerReference, ResourceClaimStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nvdra_gpu::{FakeBackend, GpuBackend};
use pretty_assertions::assert_eq;

use super::*;
use crate::checkpoint::{AllocatedDevice, PreparedGpu, PreparedMig};
use crate::devices::allocatable_index;

const NODE: &str = "node-a";
const DRIVER: &str = "gpu.nvidia.com";

fn index(profile: &str) -> BTreeMap<String, AllocatableDevice> {
    let backend = FakeBackend::builtin(profile)
        .unwrap_or_else(|| panic!("no builtin profile {profile}"))
        .unwrap();
    allocatable_index(&backend.inventory().unwrap())
}

/// A result: (driver, pool, request, device, admin access).
type Res<'a> = (&'a str, &'a str, &'a str, &'a str, bool);

fn claim(uid: &str, reserved: bool, results: Option<&[Res<'_>]>) -> ResourceClaim {
    ResourceClaim {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(format!("claim-{uid}")),
            uid: Some(uid.into()),
            ..Default::default()
        },
        status: Some(ResourceClaimStatus {
            allocation: results.map(|results| AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(
                        results
                            .iter()
                            .map(|(driver, pool, request, device, admin)| {
                                DeviceRequestAllocationResult {
                                    driver: (*driver).into(),
                                    pool: (*pool).into(),
                                    request: (*request).into(),
                                    device: (*device).into(),
                                    admin_access: admin.then_some(true),
                                    ..Default::default()
                                }
                            })
                            .collect(),
                    ),
                    config: None,
                }),
                ..Default::default()
            }),
            reserved_for: reserved.then(|| {
                vec![ResourceClaimConsumerReference {
                    resource: "pods".into(),
                    name: "pod".into(),
                    uid: "pod-uid".into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn gpu_device(uid: &str, request: &str, device: &str, minor: u32, uuid: &str) -> PreparedDevice {
    PreparedDevice {
        requests: vec![request.into()],
        pool: NODE.into(),
        device: device.into(),
        cdi_device_ids: vec![format!("k8s.gpu.nvidia.com/claim={uid}-{device}")],
        share_id: None,
        admin_access: false,
        info: DeviceInfo::Gpu(PreparedGpu {
            uuid: uuid.into(),
            minor: Some(minor),
        }),
        extra: Map::new(),
    }
}

fn allocated(request: &str, device: &str, admin_access: bool) -> AllocatedDevice {
    AllocatedDevice {
        requests: vec![request.into()],
        pool: NODE.into(),
        device: device.into(),
        share_id: None,
        admin_access,
        extra: Map::new(),
    }
}

fn entry(uid: &str, allocated: Vec<AllocatedDevice>, devices: Vec<PreparedDevice>) -> ClaimEntry {
    ClaimEntry {
        namespace: "ns".into(),
        name: format!("claim-{uid}"),
        state: ClaimState::PrepareCompleted,
        allocated_devices: allocated,
        prepared_devices: vec![PreparedGroup {
            devices,
            config_state: Map::new(),
            extra: Map::new(),
        }],
        updated_at: None,
        extra: Map::new(),
    }
}

fn uuid_of(devices: &BTreeMap<String, AllocatableDevice>, name: &str) -> String {
    devices[name].uuid().to_owned()
}

#[test]
fn only_reserved_claims_of_this_node_with_a_spec_are_adopted() {
    let devices = index("h100-sxm-80gb-x8");
    let ours = |request, device| (DRIVER, NODE, request, device, false);
    let cases: Vec<(&str, ResourceClaim, bool)> = vec![
        // (case, claim, adopted)
        (
            "two GPUs, with another driver's result beside them",
            claim(
                "u1",
                true,
                Some(&[
                    ours("gpus", "gpu-0"),
                    ("net.example.com", NODE, "nic", "nic-0", false),
                    ours("gpus", "gpu-1"),
                ]),
            ),
            true,
        ),
        (
            "foreign pool",
            claim(
                "u2",
                true,
                Some(&[(DRIVER, "node-b", "gpu", "gpu-0", false)]),
            ),
            false,
        ),
        (
            "one result in a foreign pool",
            claim(
                "u3",
                true,
                Some(&[
                    ours("gpu", "gpu-2"),
                    (DRIVER, "node-b", "gpu", "gpu-0", false),
                ]),
            ),
            false,
        ),
        (
            "another driver only",
            claim(
                "u4",
                true,
                Some(&[("net.example.com", NODE, "nic", "nic-0", false)]),
            ),
            false,
        ),
        (
            "not reserved",
            claim("u5", false, Some(&[ours("gpu", "gpu-3")])),
            false,
        ),
        ("not allocated", claim("u6", true, None), false),
    ];
    for (case, claim, adopted) in cases {
        let uid = claim.metadata.uid.clone().unwrap();
        let plan = plan_rebuild(
            NODE,
            DRIVER,
            &devices,
            &[claim],
            &BTreeSet::from([uid.clone()]),
        );
        let (adopt, stale): (Vec<String>, Vec<String>) = if adopted {
            (vec![uid.clone()], vec![])
        } else {
            (vec![], vec![uid.clone()])
        };
        let got: Vec<String> = plan.adopt.iter().map(|(uid, _)| uid.clone()).collect();
        assert_eq!((got, plan.stale_specs), (adopt, stale), "{case}");
    }
}

#[test]
fn adopted_claim_records_devices_as_prepare_does() {
    let devices = index("h100-sxm-80gb-x8");
    let claims = [claim(
        "u1",
        true,
        Some(&[
            (DRIVER, NODE, "gpus", "gpu-0", false),
            ("net.example.com", NODE, "nic", "nic-0", false),
            (DRIVER, NODE, "admin", "gpu-1", true),
        ]),
    )];
    let plan = plan_rebuild(
        NODE,
        DRIVER,
        &devices,
        &claims,
        &BTreeSet::from(["u1".to_owned()]),
    );
    let mut admin = gpu_device("u1", "admin", "gpu-1", 1, &uuid_of(&devices, "gpu-1"));
    admin.admin_access = true;
    assert_eq!(
        plan,
        RebuildPlan {
            adopt: vec![(
                "u1".to_owned(),
                entry(
                    "u1",
                    vec![
                        allocated("gpus", "gpu-0", false),
                        allocated("admin", "gpu-1", true)
                    ],
                    vec![
                        gpu_device("u1", "gpus", "gpu-0", 0, &uuid_of(&devices, "gpu-0")),
                        admin,
                    ],
                ),
            )],
            stale_specs: vec![],
        }
    );
}

#[test]
fn specs_without_claims_are_stale_and_claims_without_specs_ignored() {
    let devices = index("h100-sxm-80gb-x8");
    let claims = [
        claim("u1", true, Some(&[(DRIVER, NODE, "gpu", "gpu-0", false)])),
        claim("u2", true, Some(&[(DRIVER, NODE, "gpu", "gpu-1", false)])),
    ];
    let plan = plan_rebuild(
        NODE,
        DRIVER,
        &devices,
        &claims,
        &BTreeSet::from(["u1".to_owned(), "u9".to_owned()]),
    );
    let got: Vec<&str> = plan.adopt.iter().map(|(uid, _)| uid.as_str()).collect();
    assert_eq!(got, ["u1"]);
    assert_eq!(plan.stale_specs, ["u9"]);
}

#[test]
fn device_type_comes_from_the_device_index() {
    let devices = index("a100-40gb-x8-mig");
    let mig_name = "gpu-4-mig-3g20gb-9-0";
    let AllocatableDevice::Mig { parent, mig } = &devices[mig_name] else {
        panic!("{mig_name} is not a MIG device");
    };
    let claims = [claim(
        "u1",
        true,
        Some(&[
            (DRIVER, NODE, "mig", mig_name, false),
            (DRIVER, NODE, "gone", "gpu-99", false),
        ]),
    )];
    let plan = plan_rebuild(
        NODE,
        DRIVER,
        &devices,
        &claims,
        &BTreeSet::from(["u1".to_owned()]),
    );
    let infos: Vec<DeviceInfo> = plan.adopt[0].1.devices().map(|d| d.info.clone()).collect();
    assert_eq!(
        infos,
        [
            DeviceInfo::Mig(PreparedMig {
                uuid: mig.uuid.clone(),
                parent_uuid: parent.uuid.clone(),
                parent_minor: Some(4),
                gi_id: mig.gi_id,
                ci_id: mig.ci_id,
                profile: Some("3g.20gb".into()),
                placement_start: Some(mig.placement.start),
                placement_size: Some(mig.placement.size),
            }),
            // A device the node no longer offers is still held.
            DeviceInfo::Unknown(Value::Null),
        ]
    );
}

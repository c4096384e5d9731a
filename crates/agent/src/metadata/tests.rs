#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use super::*;

const UID: &str = "0b4e7c58-3f0e-4f5e-9a7c-1d2e3f4a5b6c";

fn claim(pod_claim_name: Option<&str>) -> ClaimIdentity<'_> {
    ClaimIdentity {
        name: "pod0-gpu-x7k2p",
        namespace: "team-a",
        uid: UID,
        pod_claim_name,
    }
}

fn device(request: &str, name: &str) -> MetadataDevice {
    let mut attributes = BTreeMap::new();
    attributes.insert(
        "resource.kubernetes.io/pciBusID".to_owned(),
        DeviceAttribute {
            string: Some("0000:1b:00.0".to_owned()),
            ..DeviceAttribute::default()
        },
    );
    attributes.insert(
        "index".to_owned(),
        DeviceAttribute {
            int: Some(0),
            ..DeviceAttribute::default()
        },
    );
    MetadataDevice {
        request: request.to_owned(),
        driver: "gpu.nvidia.com".to_owned(),
        pool: "node-a".to_owned(),
        name: name.to_owned(),
        attributes,
    }
}

/// The objects of a file, one per line.
fn objects(contents: &[u8]) -> Vec<Value> {
    std::str::from_utf8(contents)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn a_claim_by_name_gets_one_object_per_version_newest_first() {
    let files = render(
        &claim(None),
        "gpu.nvidia.com",
        &[device("vm", "gpu-vfio-0")],
    )
    .unwrap();
    assert_eq!(files.len(), 1);
    let file = &files[0];
    assert_eq!(file.request, "vm");
    assert_eq!(
        file.container_path,
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/pod0-gpu-x7k2p/vm/gpu.nvidia.com-metadata.json"
    );
    let objects = objects(&file.contents);
    let versions: Vec<&str> = objects
        .iter()
        .map(|o| o["apiVersion"].as_str().unwrap())
        .collect();
    assert_eq!(versions, API_VERSIONS);
    let expected = json!({
        "metadata": {"name": "pod0-gpu-x7k2p", "namespace": "team-a", "uid": UID, "generation": 1},
        "requests": [{
            "name": "vm",
            "devices": [{
                "driver": "gpu.nvidia.com",
                "pool": "node-a",
                "name": "gpu-vfio-0",
                "attributes": {
                    "index": {"int": 0},
                    "resource.kubernetes.io/pciBusID": {"string": "0000:1b:00.0"},
                },
            }],
        }],
    });
    for object in &objects {
        assert_eq!(object["kind"], "DeviceMetadata");
        let mut rest = object.clone();
        let fields = rest.as_object_mut().unwrap();
        fields.remove("kind");
        fields.remove("apiVersion");
        assert_eq!(rest, expected, "every version carries the same content");
    }
}

#[test]
fn a_template_claim_is_found_under_the_pods_claim_name() {
    let files = render(
        &claim(Some("gpu")),
        "gpu.nvidia.com",
        &[device("gpus", "gpu-0")],
    )
    .unwrap();
    assert_eq!(
        files[0].container_path,
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/gpu/gpus/gpu.nvidia.com-metadata.json"
    );
    for object in objects(&files[0].contents) {
        assert_eq!(object["podClaimName"], "gpu");
    }
}

#[test]
fn sub_requests_share_their_top_level_requests_file_and_keep_their_full_name() {
    let files = render(
        &claim(None),
        "gpu.nvidia.com",
        &[
            device("gpu/large", "gpu-0"),
            device("nic", "gpu-vfio-3"),
            device("gpu/large", "gpu-1"),
        ],
    )
    .unwrap();
    let requests: Vec<&str> = files.iter().map(|f| f.request.as_str()).collect();
    assert_eq!(
        requests,
        ["gpu", "nic"],
        "one file per top-level request, in order"
    );
    assert!(
        files[0]
            .container_path
            .ends_with("/pod0-gpu-x7k2p/gpu/gpu.nvidia.com-metadata.json")
    );
    let object = &objects(&files[0].contents)[0];
    assert_eq!(object["requests"][0]["name"], "gpu/large");
    let names: Vec<&str> = object["requests"][0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gpu-0", "gpu-1"]);
}

#[test]
fn a_device_without_attributes_lists_none() {
    let mut bare = device("gpu", "gpu-0");
    bare.attributes.clear();
    let files = render(&claim(None), "gpu.nvidia.com", &[bare]).unwrap();
    let object = &objects(&files[0].contents)[0];
    assert!(
        object["requests"][0]["devices"][0]
            .get("attributes")
            .is_none()
    );
}

#[test]
fn a_request_name_that_could_leave_the_claims_directory_is_refused() {
    for bad in ["..", ".hidden", "", "a\0b"] {
        let err = render(&claim(None), "gpu.nvidia.com", &[device(bad, "gpu-0")]).unwrap_err();
        assert!(
            matches!(&err, Error::RequestName { request } if request == bad),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn the_store_writes_read_only_mounts_and_removes_a_claims_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = MetadataStore::new(dir.path().join("metadata"), "gpu.nvidia.com");
    assert_eq!(store.list_claims().unwrap(), Vec::<String>::new());

    let devices = [device("a", "gpu-0"), device("b", "gpu-1")];
    let mounts = store.write_claim(&claim(None), &devices).unwrap();
    let requests: Vec<&str> = mounts.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(requests, ["a", "b"]);
    let (_, mount) = &mounts[0];
    let host = dir
        .path()
        .join(format!("metadata/{UID}/a/gpu.nvidia.com-metadata.json"));
    assert_eq!(mount.host_path, host.to_string_lossy());
    assert_eq!(mount.options, ["ro", "nosuid", "nodev", "bind"]);
    assert!(
        mount
            .container_path
            .ends_with("/resourceclaims/pod0-gpu-x7k2p/a/gpu.nvidia.com-metadata.json")
    );
    let written = std::fs::read(&host).unwrap();
    assert_eq!(
        objects(&written)[0]["requests"][0]["devices"][0]["name"],
        "gpu-0"
    );
    assert_eq!(
        std::fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(store.list_claims().unwrap(), [UID]);

    // A second write replaces the claim's files: a request it no longer has goes.
    store.write_claim(&claim(None), &devices[..1]).unwrap();
    assert!(!dir.path().join(format!("metadata/{UID}/b")).exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join(format!("metadata/{UID}/a")))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["gpu.nvidia.com-metadata.json"],
        "no temporary file stays"
    );

    assert!(store.remove_claim(UID).unwrap());
    assert!(
        !store.remove_claim(UID).unwrap(),
        "removing twice is success"
    );
    assert_eq!(store.list_claims().unwrap(), Vec::<String>::new());
}

#[test]
fn the_store_refuses_a_uid_that_cannot_name_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = MetadataStore::new(dir.path(), "gpu.nvidia.com");
    assert!(matches!(
        store.remove_claim("../x"),
        Err(Error::ClaimUid(_))
    ));
    let mut bad = claim(None);
    bad.uid = "../x";
    assert!(matches!(
        store.write_claim(&bad, &[device("a", "gpu-0")]),
        Err(Error::ClaimUid(_))
    ));
}

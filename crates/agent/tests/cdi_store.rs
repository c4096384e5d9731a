//! The claim spec files on disk: naming, atomic replacement, idempotent
//! removal and listing for startup cleanup.

// A `cfg(test)` module named `cdi_*`: `cargo test -p nvdra-agent cdi` selects
// these tests, and helpers may unwrap like tests do.
#[cfg(test)]
mod cdi_store {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use nvdra_agent::cdi::spec::{ContainerEdits, Device, DeviceNode, Spec};
    use nvdra_agent::cdi::{CdiStore, claim_spec_file_name};
    use pretty_assertions::assert_eq;

    const UID_A: &str = "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e";
    const UID_B: &str = "c2f1d3a4-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    fn spec(uid: &str, minors: &[u32]) -> Spec {
        Spec {
            cdi_version: "0.5.0".into(),
            kind: "k8s.gpu.nvidia.com/claim".into(),
            devices: minors
                .iter()
                .map(|m| Device {
                    name: format!("{uid}-gpu-{m}"),
                    container_edits: ContainerEdits {
                        device_nodes: vec![DeviceNode {
                            path: format!("/dev/nvidia{m}"),
                            ..DeviceNode::default()
                        }],
                        ..ContainerEdits::default()
                    },
                    ..Device::default()
                })
                .collect(),
            ..Spec::default()
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn read(path: &Path) -> Spec {
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }
    #[test]
    fn write_creates_the_root_and_names_the_file_like_upstream() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("var/run/cdi");
        let store = CdiStore::new(&root);
        let path = store.write_claim_spec(UID_A, &spec(UID_A, &[0])).unwrap();
        assert_eq!(
            path,
            root.join("k8s.gpu.nvidia.com-claim_0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e.yaml")
        );
        assert_eq!(path, store.claim_spec_path(UID_A).unwrap());
        assert_eq!(names(&root), [claim_spec_file_name(UID_A)]);
        assert_eq!(read(&path), spec(UID_A, &[0]));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(&root), 0o755);
    }

    #[test]
    fn rewrite_replaces_atomically_and_leaves_no_temporary_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CdiStore::new(tmp.path());
        store.write_claim_spec(UID_A, &spec(UID_A, &[0])).unwrap();
        let path = store
            .write_claim_spec(UID_A, &spec(UID_A, &[1, 2]))
            .unwrap();
        assert_eq!(read(&path), spec(UID_A, &[1, 2]));
        assert_eq!(names(tmp.path()), [claim_spec_file_name(UID_A)]);
    }

    #[test]
    fn remove_is_idempotent_and_touches_only_its_claim() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CdiStore::new(tmp.path());
        store.write_claim_spec(UID_A, &spec(UID_A, &[0])).unwrap();
        store.write_claim_spec(UID_B, &spec(UID_B, &[1])).unwrap();
        assert_eq!(store.remove_claim_spec(UID_A).unwrap(), true);
        assert_eq!(store.remove_claim_spec(UID_A).unwrap(), false);
        assert_eq!(names(tmp.path()), [claim_spec_file_name(UID_B)]);

        // A CDI root that does not exist yet holds nothing to remove.
        let absent = CdiStore::new(tmp.path().join("absent"));
        assert_eq!(absent.remove_claim_spec(UID_A).unwrap(), false);

        let err = store.remove_claim_spec("../../etc/passwd").unwrap_err();
        assert_eq!(err.to_string(), "cannot name the CDI spec file of a claim");
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "invalid claim UID \"../../etc/passwd\": must start with a letter or digit"
        );
    }

    #[test]
    fn list_finds_our_claims_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CdiStore::new(tmp.path());
        assert_eq!(
            CdiStore::new(tmp.path().join("absent"))
                .list_claim_specs()
                .unwrap(),
            Vec::<String>::new()
        );
        store.write_claim_spec(UID_B, &spec(UID_B, &[1])).unwrap();
        store.write_claim_spec(UID_A, &spec(UID_A, &[0])).unwrap();
        // Other drivers' specs, static specs, a JSON spec, a directory with our
        // name pattern and a stray temporary file are not ours to list.
        for name in [
            "k8s.compute-domain.nvidia.com-claim_1234.yaml",
            "nvidia.yaml",
            "k8s.gpu.nvidia.com-claim_abc.json",
            ".k8s.gpu.nvidia.com-claim_abc.yaml.1.0.tmp",
        ] {
            std::fs::write(tmp.path().join(name), "").unwrap();
        }
        std::fs::create_dir(tmp.path().join("k8s.gpu.nvidia.com-claim_dir.yaml")).unwrap();
        assert_eq!(store.list_claim_specs().unwrap(), [UID_A, UID_B]);
        assert_eq!(store.remove_temp_files().unwrap(), 1);
    }
}

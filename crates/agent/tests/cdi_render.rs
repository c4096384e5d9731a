//! Claim specs rendered from the shipped fake profiles and the fake driver
//! root (`crates/gpu/profiles/driver-root`), checked field by field.

// A `cfg(test)` module named `cdi_*`: `cargo test -p nvdra-agent cdi` selects
// these tests, and helpers may unwrap like tests do.
#[cfg(test)]
mod cdi_render {
    use std::path::{Path, PathBuf};

    use nvdra_agent::cdi::spec::{self, ContainerEdits, Device, DeviceNode, Hook, Mount, Spec};
    use nvdra_agent::cdi::{
        ClaimDevice, CommonEdits, CommonOptions, DriverFile, DriverFiles, Hooks, LibraryLink,
        RootMapping, qualified_device_id, render_claim_spec,
    };
    use nvdra_gpu::{FakeBackend, GpuBackend};
    use pretty_assertions::assert_eq;

    const VERSION: &str = "570.172.08";
    const HOST_ROOT: &str = "/run/nvidia/driver";
    const LIB: &str = "/usr/lib/x86_64-linux-gnu";
    const HOOK: &str = "/var/lib/kubelet/plugins/gpu.nvidia.com/nvidia-cdi-hook";
    /// Starts with a digit, as most UUIDs do (10 of 16 hex digits).
    const UID_DIGIT: &str = "0b5c1a2e-6f3d-4b9a-9d1e-3f2a1b0c9d8e";
    /// Starts with a letter.
    const UID_LETTER: &str = "c2f1d3a4-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    fn fake_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../gpu/profiles/driver-root")
            .canonicalize()
            .unwrap()
    }

    fn mapping() -> RootMapping {
        RootMapping::new(fake_root(), HOST_ROOT)
    }

    fn host(rel: &str) -> String {
        format!("{HOST_ROOT}{rel}")
    }

    fn file(rel: &str) -> DriverFile {
        DriverFile {
            host_path: host(rel).into(),
            container_path: rel.into(),
        }
    }

    fn backend(profile: &str) -> FakeBackend {
        FakeBackend::builtin(profile).unwrap().unwrap()
    }

    fn options() -> CommonOptions {
        CommonOptions {
            hooks: Hooks::CdiHook { path: HOOK.into() },
            env: vec![],
        }
    }

    fn common(backend: &FakeBackend, hooks: Hooks) -> CommonEdits {
        let files = DriverFiles::discover(mapping(), VERSION).unwrap();
        CommonEdits::new(
            &backend.control_device_nodes(),
            &files,
            &CommonOptions { hooks, env: vec![] },
        )
        .unwrap()
    }

    fn node(path: &str, host_path: Option<&str>) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            host_path: host_path.map(str::to_owned),
            ..DeviceNode::default()
        }
    }

    fn ro(rel: &str) -> Mount {
        ro_at(&host(rel), rel)
    }

    fn ro_at(host_path: &str, container_path: &str) -> Mount {
        Mount {
            host_path: host_path.into(),
            container_path: container_path.into(),
            options: ["ro", "nosuid", "nodev", "rbind", "rprivate"]
                .map(str::to_owned)
                .to_vec(),
            mount_type: None,
        }
    }

    fn hook(args: &[&str]) -> Hook {
        Hook {
            hook_name: "createContainer".into(),
            path: HOOK.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Hook::default()
        }
    }

    fn lib(name: &str) -> String {
        format!("{LIB}/{name}")
    }

    fn versioned(name: &str) -> String {
        lib(&format!("{name}.{VERSION}"))
    }

    /// The common edits expected from the fake driver root with hooks on and
    /// device nodes from the host's `/dev`.
    fn expected_common_edits() -> ContainerEdits {
        let link = |target: &str, name: &str| format!("{target}::{}", lib(name));
        ContainerEdits {
            env: vec![],
            device_nodes: vec![
                node("/dev/nvidiactl", None),
                node("/dev/nvidia-uvm", None),
                node("/dev/nvidia-uvm-tools", None),
            ],
            mounts: vec![
                ro(&versioned("libnvidia-ml.so")),
                ro(&versioned("libcuda.so")),
                ro(&versioned("libcudadebugger.so")),
                ro(&versioned("libnvidia-gpucomp.so")),
                ro(&versioned("libnvidia-ptxjitcompiler.so")),
                ro(&versioned("libnvidia-nvvm.so")),
                ro("/usr/bin/nvidia-smi"),
                ro("/usr/bin/nvidia-cuda-mps-control"),
                ro("/usr/bin/nvidia-cuda-mps-server"),
                ro(&format!("/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin")),
                ro(&format!("/lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin")),
            ],
            hooks: vec![
                hook(&[
                    "nvidia-cdi-hook",
                    "create-symlinks",
                    "--link",
                    &link(&format!("libnvidia-ml.so.{VERSION}"), "libnvidia-ml.so.1"),
                    "--link",
                    &link(&format!("libcuda.so.{VERSION}"), "libcuda.so.1"),
                    "--link",
                    &link("libcuda.so.1", "libcuda.so"),
                    "--link",
                    &link(
                        &format!("libcudadebugger.so.{VERSION}"),
                        "libcudadebugger.so.1",
                    ),
                    "--link",
                    &link(
                        &format!("libnvidia-ptxjitcompiler.so.{VERSION}"),
                        "libnvidia-ptxjitcompiler.so.1",
                    ),
                    "--link",
                    &link(
                        &format!("libnvidia-nvvm.so.{VERSION}"),
                        "libnvidia-nvvm.so.4",
                    ),
                ]),
                hook(&["nvidia-cdi-hook", "update-ldcache", "--folder", LIB]),
            ],
            additional_gids: vec![],
        }
    }
    #[test]
    fn discovers_the_fake_driver_root_with_host_paths() {
        let found = DriverFiles::discover(mapping(), VERSION).unwrap();
        assert_eq!(found.driver_version, VERSION);
        // Neither the graphics library nor the stale libcuda.so.550.54.15 of the
        // tree is picked up.
        assert_eq!(
            found.libraries,
            [
                "libnvidia-ml.so",
                "libcuda.so",
                "libcudadebugger.so",
                "libnvidia-gpucomp.so",
                "libnvidia-ptxjitcompiler.so",
                "libnvidia-nvvm.so",
            ]
            .map(|name| file(&versioned(name)))
        );
        let link = |target: String, name: &str, lib_name: &str| LibraryLink {
            target,
            link: lib(name).into(),
            host_path: host(&versioned(lib_name)).into(),
        };
        assert_eq!(
            found.links,
            [
                link(
                    format!("libnvidia-ml.so.{VERSION}"),
                    "libnvidia-ml.so.1",
                    "libnvidia-ml.so"
                ),
                link(
                    format!("libcuda.so.{VERSION}"),
                    "libcuda.so.1",
                    "libcuda.so"
                ),
                link("libcuda.so.1".into(), "libcuda.so", "libcuda.so"),
                link(
                    format!("libcudadebugger.so.{VERSION}"),
                    "libcudadebugger.so.1",
                    "libcudadebugger.so"
                ),
                link(
                    format!("libnvidia-ptxjitcompiler.so.{VERSION}"),
                    "libnvidia-ptxjitcompiler.so.1",
                    "libnvidia-ptxjitcompiler.so"
                ),
                link(
                    format!("libnvidia-nvvm.so.{VERSION}"),
                    "libnvidia-nvvm.so.4",
                    "libnvidia-nvvm.so"
                ),
            ]
        );
        assert_eq!(
            found.binaries,
            [
                file("/usr/bin/nvidia-smi"),
                file("/usr/bin/nvidia-cuda-mps-control"),
                file("/usr/bin/nvidia-cuda-mps-server"),
            ]
        );
        assert_eq!(
            found.firmware,
            [
                file(&format!("/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin")),
                file(&format!("/lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin")),
            ]
        );
        assert_eq!(found.library_dirs(), [PathBuf::from(LIB)]);
    }

    #[test]
    fn host_driver_root_slash_keeps_paths() {
        let found = DriverFiles::discover(RootMapping::new(fake_root(), "/"), VERSION).unwrap();
        assert_eq!(
            found.libraries[1],
            DriverFile {
                host_path: versioned("libcuda.so").into(),
                container_path: versioned("libcuda.so").into(),
            }
        );
    }

    #[test]
    fn missing_libcuda_names_the_root_and_the_searched_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("usr/lib64")).unwrap();
        std::fs::write(
            root.join(format!("usr/lib64/libnvidia-ml.so.{VERSION}")),
            "",
        )
        .unwrap();
        let err = DriverFiles::discover(RootMapping::new(root, HOST_ROOT), VERSION).unwrap_err();
        let r = root.display();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot find libcuda.so.570.172.08 under driver root {r} (searched {r}/, \
                 {r}/usr/lib64, {r}/usr/lib/x86_64-linux-gnu, {r}/usr/lib/aarch64-linux-gnu, \
                 {r}/lib64, {r}/lib/x86_64-linux-gnu, {r}/lib/aarch64-linux-gnu)"
            )
        );
        // A version the fake tree has no files of (only its libcuda is missing
        // from the custom tree above; here nothing is there).
        let err = DriverFiles::discover(mapping(), "575.57.08").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot find libnvidia-ml.so.575.57.08 under driver root "),
            "{err}"
        );
    }

    #[test]
    fn full_gpu_spec() {
        let backend = backend("h100-sxm-80gb-x8");
        let gpus = backend.gpus().unwrap();
        let devices = [
            ClaimDevice::gpu(&backend, &gpus[0]),
            ClaimDevice::gpu(&backend, &gpus[3]),
        ];
        let spec =
            render_claim_spec(UID_DIGIT, &devices, &common(&backend, options().hooks)).unwrap();
        let device = |minor: u32| Device {
            name: format!("{UID_DIGIT}-gpu-{minor}"),
            container_edits: ContainerEdits {
                device_nodes: vec![node(&format!("/dev/nvidia{minor}"), None)],
                ..ContainerEdits::default()
            },
            ..Device::default()
        };
        assert_eq!(
            spec,
            Spec {
                // The device names start with a digit.
                cdi_version: "0.5.0".into(),
                kind: "k8s.gpu.nvidia.com/claim".into(),
                annotations: Default::default(),
                devices: vec![device(gpus[0].minor), device(gpus[3].minor)],
                container_edits: expected_common_edits(),
            }
        );
        assert_eq!(
            devices
                .iter()
                .map(|d| qualified_device_id(UID_DIGIT, &d.name))
                .collect::<Vec<_>>(),
            [
                format!("k8s.gpu.nvidia.com/claim={UID_DIGIT}-gpu-{}", gpus[0].minor),
                format!("k8s.gpu.nvidia.com/claim={UID_DIGIT}-gpu-{}", gpus[3].minor),
            ]
        );
        // Nothing in it asks the runtime to hide GPUs.
        assert!(
            !serde_json::to_string(&spec)
                .unwrap()
                .contains("NVIDIA_VISIBLE_DEVICES")
        );
    }

    #[test]
    fn mig_device_spec_has_parent_and_capability_nodes() {
        let backend = backend("a100-40gb-x8-mig");
        let gpu = &backend.gpus().unwrap()[4];
        let mig = &backend.mig_devices(gpu).unwrap()[0];
        let device = ClaimDevice::mig(&backend, mig).unwrap();
        assert_eq!(device.name, "gpu-4-mig-3g20gb-9-0");
        let spec =
            render_claim_spec(UID_DIGIT, &[device], &common(&backend, options().hooks)).unwrap();
        // GPU 4, GPU instance 1, compute instance 0 in the driver's minor layout:
        // 3 + 4 * 135 + 1 * 9 = 552, and 553 for its first compute instance.
        assert_eq!(
            spec.devices,
            [Device {
                name: format!("{UID_DIGIT}-gpu-4-mig-3g20gb-9-0"),
                container_edits: ContainerEdits {
                    device_nodes: vec![
                        node("/dev/nvidia4", None),
                        node("/dev/nvidia-caps/nvidia-cap552", None),
                        node("/dev/nvidia-caps/nvidia-cap553", None),
                    ],
                    ..ContainerEdits::default()
                },
                ..Device::default()
            }]
        );
        assert_eq!(spec.container_edits, expected_common_edits());
    }

    #[test]
    fn dev_root_inside_the_driver_root_gets_host_paths() {
        // The GPU operator's driver container: device nodes live under the
        // driver root, which the agent sees elsewhere than the host does.
        let backend = backend("l4-x2").with_dev_root(fake_root());
        let gpu = &backend.gpus().unwrap()[1];
        let spec = render_claim_spec(
            UID_LETTER,
            &[ClaimDevice::gpu(&backend, gpu)],
            &common(&backend, options().hooks),
        )
        .unwrap();
        assert_eq!(spec.cdi_version, "0.5.0");
        assert_eq!(
            spec.devices[0].container_edits.device_nodes,
            [node("/dev/nvidia1", Some("/run/nvidia/driver/dev/nvidia1"))]
        );
        assert_eq!(
            spec.container_edits.device_nodes,
            [
                node("/dev/nvidiactl", Some("/run/nvidia/driver/dev/nvidiactl")),
                node("/dev/nvidia-uvm", Some("/run/nvidia/driver/dev/nvidia-uvm")),
                node(
                    "/dev/nvidia-uvm-tools",
                    Some("/run/nvidia/driver/dev/nvidia-uvm-tools")
                ),
            ]
        );
    }

    #[test]
    fn lowest_version_when_nothing_needs_more() {
        let backend = backend("l4-x2");
        let gpu = &backend.gpus().unwrap()[0];
        let spec = render_claim_spec(
            UID_LETTER,
            &[ClaimDevice::gpu(&backend, gpu)],
            &common(&backend, options().hooks),
        )
        .unwrap();
        assert_eq!(spec.cdi_version, "0.3.0");
        assert_eq!(spec::validate(&spec), Ok(()));
    }

    #[test]
    fn extra_edits_follow_the_device_nodes() {
        let backend = backend("l4-x2");
        let gpu = &backend.gpus().unwrap()[0];
        let mps = ContainerEdits {
            env: vec!["CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps".into()],
            mounts: vec![Mount {
                host_path: "/var/lib/kubelet/plugins/gpu.nvidia.com/mps/abc/shm".into(),
                container_path: "/dev/shm".into(),
                options: vec!["rw".into(), "nosuid".into(), "nodev".into(), "bind".into()],
                mount_type: None,
            }],
            ..ContainerEdits::default()
        };
        let device = ClaimDevice::gpu(&backend, gpu).with_extra_edits(mps.clone());
        let spec =
            render_claim_spec(UID_LETTER, &[device], &common(&backend, options().hooks)).unwrap();
        assert_eq!(
            spec.devices[0].container_edits,
            ContainerEdits {
                device_nodes: vec![node("/dev/nvidia0", None)],
                ..mps
            }
        );
    }

    #[test]
    fn hooks_disabled_mounts_library_names_instead() {
        let backend = backend("l4-x2");
        let edits = common(&backend, Hooks::Disabled);
        assert_eq!(edits.edits().hooks, []);
        let by_name: Vec<&str> = edits
            .edits()
            .mounts
            .iter()
            .filter(|m| !m.container_path.contains(VERSION))
            .map(|m| m.container_path.as_str())
            .collect();
        assert_eq!(
            by_name,
            [
                lib("libnvidia-ml.so.1").as_str(),
                &lib("libcuda.so.1"),
                &lib("libcuda.so"),
                &lib("libcudadebugger.so.1"),
                &lib("libnvidia-ptxjitcompiler.so.1"),
                &lib("libnvidia-nvvm.so.4"),
                "/usr/bin/nvidia-smi",
                "/usr/bin/nvidia-cuda-mps-control",
                "/usr/bin/nvidia-cuda-mps-server",
            ]
        );
        let cuda_so = edits
            .edits()
            .mounts
            .iter()
            .find(|m| m.container_path == lib("libcuda.so"))
            .unwrap();
        assert_eq!(
            cuda_so,
            &ro_at(&host(&versioned("libcuda.so")), &lib("libcuda.so"))
        );
    }

    #[test]
    fn discover_uses_the_backend_driver_version_and_present_nodes_only() {
        // Fake device nodes under a copy-free dev root: only nvidiactl exists.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("dev")).unwrap();
        std::fs::write(tmp.path().join("dev/nvidiactl"), "").unwrap();
        let h100 = backend("h100-sxm-80gb-x8").with_dev_root(tmp.path());
        let common = CommonEdits::discover(&h100, mapping(), &options()).unwrap();
        let ctl = tmp.path().join("dev/nvidiactl");
        assert_eq!(
            common.edits().device_nodes,
            [node("/dev/nvidiactl", Some(ctl.to_str().unwrap()))]
        );
        assert_eq!(common.edits().mounts, expected_common_edits().mounts);

        // Another profile, another driver version: its files, not the h100's.
        let gb200 = CommonEdits::discover(&backend("gb200-x4"), mapping(), &options()).unwrap();
        assert_eq!(
            gb200.edits().mounts[0],
            ro("/usr/lib/aarch64-linux-gnu/libnvidia-ml.so.580.82.07")
        );
    }

    /// Every built-in fake profile's driver version is discoverable in the fake tree, and
    /// discovery for one version picks up no file of another (the tree holds two versions
    /// side by side, plus a stale libcuda).
    #[test]
    fn every_builtin_profile_finds_its_own_driver_version_only() {
        const X86: &str = "/usr/lib/x86_64-linux-gnu";
        const ARM: &str = "/usr/lib/aarch64-linux-gnu";
        // (profile, driver version it reports, directory its libraries are found in)
        let cases = [
            ("h100-sxm-80gb-x8", "570.172.08", X86),
            ("h200-x8", "570.172.08", X86),
            ("a100-40gb-x8-mig", "570.172.08", X86),
            ("l4-x2", "570.172.08", X86),
            ("gb200-x4", "580.82.07", ARM),
        ];
        let mut builtin: Vec<&str> = nvdra_gpu::fake::BUILTIN_PROFILES
            .iter()
            .map(|(name, _)| *name)
            .collect();
        builtin.sort_unstable();
        let mut covered: Vec<&str> = cases.iter().map(|(name, _, _)| *name).collect();
        covered.sort_unstable();
        assert_eq!(
            covered, builtin,
            "a built-in profile is missing from the table"
        );
        let all_versions = ["570.172.08", "580.82.07", "550.54.15"];

        for (profile, version, dir) in cases {
            let backend = backend(profile);
            assert_eq!(
                backend.driver().unwrap().driver_version,
                version,
                "{profile}"
            );
            let found = DriverFiles::discover(mapping(), version)
                .unwrap_or_else(|err| panic!("{profile}: {err}"));
            let lib_at = |name: &str| file(&format!("{dir}/{name}.{version}"));
            assert_eq!(
                found.libraries,
                [
                    "libnvidia-ml.so",
                    "libcuda.so",
                    "libcudadebugger.so",
                    "libnvidia-gpucomp.so",
                    "libnvidia-ptxjitcompiler.so",
                    "libnvidia-nvvm.so",
                ]
                .map(lib_at),
                "{profile}"
            );
            let links: Vec<(String, String)> = found
                .links
                .iter()
                .map(|l| (l.target.clone(), l.link.display().to_string()))
                .collect();
            let link = |target: String, name: &str| (target, format!("{dir}/{name}"));
            assert_eq!(
                links,
                [
                    link(format!("libnvidia-ml.so.{version}"), "libnvidia-ml.so.1"),
                    link(format!("libcuda.so.{version}"), "libcuda.so.1"),
                    link("libcuda.so.1".into(), "libcuda.so"),
                    link(
                        format!("libcudadebugger.so.{version}"),
                        "libcudadebugger.so.1"
                    ),
                    link(
                        format!("libnvidia-ptxjitcompiler.so.{version}"),
                        "libnvidia-ptxjitcompiler.so.1"
                    ),
                    link(
                        format!("libnvidia-nvvm.so.{version}"),
                        "libnvidia-nvvm.so.4"
                    ),
                ],
                "{profile}"
            );
            assert_eq!(
                found.firmware,
                [
                    file(&format!("/lib/firmware/nvidia/{version}/gsp_ga10x.bin")),
                    file(&format!("/lib/firmware/nvidia/{version}/gsp_tu10x.bin")),
                ],
                "{profile}"
            );
            assert_eq!(found.library_dirs(), [PathBuf::from(dir)], "{profile}");

            // Every path of the rendered common edits, through the backend as the agent
            // does it: none names another driver version.
            let common = CommonEdits::discover(&backend, mapping(), &options())
                .unwrap_or_else(|err| panic!("{profile}: {err}"));
            let yaml = serde_saphyr::to_string(common.edits()).unwrap();
            assert!(yaml.contains(version), "{profile}:\n{yaml}");
            for other in all_versions.iter().filter(|v| **v != version) {
                assert!(!yaml.contains(other), "{profile} mentions {other}:\n{yaml}");
            }
        }
    }

    #[test]
    fn render_errors_name_the_claim_and_the_rule() {
        let backend = backend("l4-x2");
        let gpu = &backend.gpus().unwrap()[0];
        let common = common(&backend, options().hooks);
        let cases: [(&str, Vec<ClaimDevice>, &str); 4] = [
            (
                "a/b",
                vec![ClaimDevice::gpu(&backend, gpu)],
                "invalid claim UID \"a/b\": may contain only ASCII letters, digits, '-', '_' and '.'",
            ),
            (UID_LETTER, vec![], "spec defines no devices"),
            (
                UID_LETTER,
                vec![
                    ClaimDevice::gpu(&backend, gpu),
                    ClaimDevice::gpu(&backend, gpu),
                ],
                "device \"c2f1d3a4-1b2c-4d5e-8f90-a1b2c3d4e5f6-gpu-0\" is defined twice",
            ),
            (
                UID_LETTER,
                vec![
                    ClaimDevice::gpu(&backend, gpu).with_extra_edits(ContainerEdits {
                        mounts: vec![ro_at("/var/lib/../../etc", "/etc")],
                        ..ContainerEdits::default()
                    }),
                ],
                "device c2f1d3a4-1b2c-4d5e-8f90-a1b2c3d4e5f6-gpu-0: mount hostPath \
                 \"/var/lib/../../etc\" has a `.` or `..` component",
            ),
        ];
        for (uid, devices, want) in cases {
            let err = render_claim_spec(uid, &devices, &common).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("cannot render the CDI spec of claim {uid}")
            );
            assert_eq!(std::error::Error::source(&err).unwrap().to_string(), want);
        }
    }

    #[test]
    fn yaml_round_trips_with_types_intact() {
        let backend = backend("a100-40gb-x8-mig");
        let gpus = backend.gpus().unwrap();
        let mig = &backend.mig_devices(&gpus[5]).unwrap()[2];
        let devices = [
            ClaimDevice::gpu(&backend, &gpus[0]),
            ClaimDevice::mig(&backend, mig).unwrap(),
        ];
        let spec =
            render_claim_spec(UID_DIGIT, &devices, &common(&backend, options().hooks)).unwrap();
        let yaml = spec::to_yaml(&spec).unwrap();
        // One line per scalar: no folded block scalars for long paths.
        assert!(!yaml.contains(">-"), "{yaml}");
        let back: Spec = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, spec);
        // Read as untyped YAML, every scalar keeps its JSON type: no version or
        // name turns into a number, no `::` argument into a map.
        let untyped: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(untyped, serde_json::to_value(&spec).unwrap());
    }
}

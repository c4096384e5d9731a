//! Rendering a claim's CDI spec: pure functions from discovered facts to a
//! [`Spec`].
//!
//! A claim spec holds one CDI device per prepared device, named
//! `<claimUID>-<deviceName>`, carrying that device's nodes
//! (`/dev/nvidia<minor>`, plus the GPU- and compute-instance capability
//! nodes of a MIG device) and any per-device extras (MPS env and mounts).
//! The node-wide [`CommonEdits`], computed once at startup, become the
//! spec-level `containerEdits`, which runtimes apply whenever any device of
//! the spec is used: the control nodes (`/dev/nvidiactl`, `/dev/nvidia-uvm`,
//! `/dev/nvidia-uvm-tools`, `/dev/nvidia-modeset` where present), the
//! driver's libraries, tools and firmware bind-mounted read-only
//! ([`MOUNT_OPTIONS`]), and the hooks that make the libraries loadable.
//! `NVIDIA_VISIBLE_DEVICES=void` is never set for GPUs: the spec alone
//! is the whole injection.
//!
//! Hooks ([`Hooks`]): with `nvidia-cdi-hook`, two `createContainer` hooks
//! run on the host: `create-symlinks` (the driver's soname links and
//! `libcuda.so`) and `update-ldcache` (over the library directories).
//! Because a hook runs with host privileges while the container's image is
//! attacker-controlled (CVE-2025-23266, CVE-2025-23267), hooks can be turned
//! off: the library names the links would provide are then extra read-only
//! bind mounts of the same files, and no linker cache is built (images whose
//! loader searches the library directory, e.g. Debian and Ubuntu multiarch
//! paths, still work; others need `LD_LIBRARY_PATH`). Link targets are
//! always plain file names in the link's own directory, so a link can never
//! point elsewhere in the container (CVE-2024-0134).
//!
//! Invariants: every path in a rendered spec is an absolute, normalised host
//! or container path, host paths translated from the agent's view of the
//! driver root ([`RootMapping`]); `cdiVersion` is the lowest the fields
//! need; the result passed [`spec::validate`].
//! Failure modes: [`Error::RenderSpec`] / [`Error::RenderCommonEdits`] name
//! the violated rule; [`Error::MigDeviceNodes`] when a MIG device's
//! capability minors cannot be read; [`Error::QueryDriver`] when the driver
//! version is unknown.

use std::path::{Path, PathBuf};

use nvdra_gpu::{GpuBackend, GpuInfo, MigDeviceInfo};

use super::driver_files::{DriverFiles, RootMapping};
use super::spec::{self, ContainerEdits, Device, DeviceNode, Hook, Mount, Spec, SpecError};
use super::{Error, KIND, claim_device_name, validate_claim_uid};

/// Options of every driver-file bind mount, as upstream mounts them.
pub const MOUNT_OPTIONS: [&str; 5] = ["ro", "nosuid", "nodev", "rbind", "rprivate"];

/// The lifecycle stage of our hooks: in the container's mount namespace,
/// before `pivot_root`.
pub const HOOK_STAGE: &str = "createContainer";

/// Whether and how specs carry hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hooks {
    /// `createContainer` hooks run by this `nvidia-cdi-hook` (or
    /// `nvidia-ctk`) binary, a host path.
    CdiHook {
        /// Host path of the hook binary.
        path: PathBuf,
    },
    /// No hooks: library names become bind mounts, no linker cache update.
    Disabled,
}

/// Node-wide settings for the common edits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonOptions {
    /// Hook policy.
    pub hooks: Hooks,
    /// Extra `NAME=value` entries for every GPU container (normally none).
    pub env: Vec<String>,
}

/// The edits shared by every claim spec of this node, rendered once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonEdits {
    edits: ContainerEdits,
    mapping: RootMapping,
}

impl CommonEdits {
    /// The same root mapping without node-wide edits: what a claim whose
    /// devices are all passed through to a VM gets (no driver files).
    pub fn without_edits(&self) -> Self {
        Self {
            edits: ContainerEdits::default(),
            mapping: self.mapping.clone(),
        }
    }

    /// Renders the common edits from the control nodes (in the agent's
    /// view) and the discovered driver files.
    pub fn new(
        control_nodes: &[nvdra_gpu::DeviceNode],
        files: &DriverFiles,
        options: &CommonOptions,
    ) -> Result<Self, Error> {
        render_common(control_nodes, files, options)
            .map(|edits| Self {
                edits,
                mapping: files.mapping.clone(),
            })
            .map_err(|source| Error::RenderCommonEdits { source })
    }

    /// Asks `backend` for the driver version and the control nodes, keeps
    /// the nodes that exist (plus `/dev/nvidia-modeset` if it does), and
    /// discovers the driver files under `mapping`.
    pub fn discover(
        backend: &dyn GpuBackend,
        mapping: RootMapping,
        options: &CommonOptions,
    ) -> Result<Self, Error> {
        let driver = backend
            .driver()
            .map_err(|source| Error::QueryDriver { source })?;
        let files = DriverFiles::discover(mapping, &driver.driver_version)?;
        let mut nodes = backend.control_device_nodes();
        nodes.push(nvdra_gpu::DeviceNode {
            path: PathBuf::from("/dev/nvidia-modeset"),
            host_path: backend.dev_root().join("dev/nvidia-modeset"),
        });
        // Like upstream, only nodes that exist: the runtime fails the
        // container when a listed node is missing on the host.
        let nodes: Vec<_> = nodes
            .into_iter()
            .filter(|node| {
                let present = std::fs::metadata(&node.host_path).is_ok();
                if !present {
                    tracing::debug!(node = %node.host_path.display(), "control device node absent, not listed");
                }
                present
            })
            .collect();
        let edits = Self::new(&nodes, &files, options)?;
        tracing::info!(
            driver_version = %files.driver_version,
            control_nodes = nodes.len(),
            mounts = edits.edits.mounts.len(),
            hooks = edits.edits.hooks.len(),
            "rendered common CDI edits"
        );
        Ok(edits)
    }

    /// The spec-level edits.
    pub fn edits(&self) -> &ContainerEdits {
        &self.edits
    }

    /// The driver-root mapping used to translate device-node host paths.
    pub fn mapping(&self) -> &RootMapping {
        &self.mapping
    }
}

/// One prepared device of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimDevice {
    /// The DRA device name, e.g. `gpu-0` or `gpu-4-mig-3g20gb-9-0`.
    pub name: String,
    /// Its device nodes; `hostPath` in the agent's view (translated when
    /// rendered), absent when equal to `path`.
    pub device_nodes: Vec<DeviceNode>,
    /// Extra edits for this device (e.g. MPS env and mounts), host paths.
    pub extra_edits: ContainerEdits,
}

impl ClaimDevice {
    /// A device named `name` with the device layer's `nodes`.
    pub fn new(name: impl Into<String>, nodes: &[nvdra_gpu::DeviceNode]) -> Self {
        Self {
            name: name.into(),
            device_nodes: nodes
                .iter()
                .map(|n| DeviceNode {
                    path: n.path.to_string_lossy().into_owned(),
                    host_path: Some(n.host_path.to_string_lossy().into_owned()),
                    ..DeviceNode::default()
                })
                .collect(),
            extra_edits: ContainerEdits::default(),
        }
    }

    /// A full GPU: `/dev/nvidia<minor>`.
    pub fn gpu(backend: &dyn GpuBackend, gpu: &GpuInfo) -> Self {
        Self::new(
            nvdra_gpu::gpu_device_name(gpu.minor),
            &backend.gpu_device_nodes(gpu),
        )
    }

    /// A MIG device: its parent's node and its two capability nodes.
    pub fn mig(backend: &dyn GpuBackend, mig: &MigDeviceInfo) -> Result<Self, Error> {
        let name = mig.device_name();
        let nodes = backend
            .mig_device_nodes(mig)
            .map_err(|source| Error::MigDeviceNodes {
                device: name.clone(),
                source,
            })?;
        Ok(Self::new(name, &nodes))
    }

    /// Adds `edits` after the device's own.
    pub fn with_extra_edits(mut self, edits: ContainerEdits) -> Self {
        self.extra_edits.append(&edits);
        self
    }
}

/// Renders the spec of claim `claim_uid` holding `devices`.
pub fn render_claim_spec(
    claim_uid: &str,
    devices: &[ClaimDevice],
    common: &CommonEdits,
) -> Result<Spec, Error> {
    let fail = |source| Error::RenderSpec {
        claim_uid: claim_uid.to_owned(),
        source,
    };
    validate_claim_uid(claim_uid).map_err(fail)?;
    let devices = devices
        .iter()
        .map(|device| {
            let mut edits = ContainerEdits {
                device_nodes: device
                    .device_nodes
                    .iter()
                    .map(|node| translate_node(node, &common.mapping))
                    .collect(),
                ..ContainerEdits::default()
            };
            edits.append(&device.extra_edits);
            Device {
                name: claim_device_name(claim_uid, &device.name),
                container_edits: edits,
                ..Device::default()
            }
        })
        .collect();
    let mut spec = Spec {
        kind: KIND.to_owned(),
        devices,
        container_edits: common.edits.clone(),
        ..Spec::default()
    };
    spec.cdi_version = spec::minimum_version(&spec).to_owned();
    spec::validate(&spec).map_err(fail)?;
    Ok(spec)
}

/// Moves a node's host path to the host's view; drops it when it equals the
/// container path (keeps the spec at the lowest version).
fn translate_node(node: &DeviceNode, mapping: &RootMapping) -> DeviceNode {
    let agent_path = node.host_path.as_deref().unwrap_or(&node.path);
    let host_path = mapping
        .to_host(Path::new(agent_path))
        .to_string_lossy()
        .into_owned();
    DeviceNode {
        host_path: (host_path != node.path).then_some(host_path),
        ..node.clone()
    }
}

fn render_common(
    control_nodes: &[nvdra_gpu::DeviceNode],
    files: &DriverFiles,
    options: &CommonOptions,
) -> Result<ContainerEdits, SpecError> {
    let mapping = &files.mapping;
    let device_nodes = control_nodes
        .iter()
        .map(|n| {
            let host_path = utf8(&mapping.to_host(&n.host_path))?;
            let path = utf8(&n.path)?;
            Ok(DeviceNode {
                host_path: (host_path != path).then_some(host_path),
                path,
                ..DeviceNode::default()
            })
        })
        .collect::<Result<Vec<_>, SpecError>>()?;

    let bind = |host: &Path, container: &Path| -> Result<Mount, SpecError> {
        Ok(Mount {
            host_path: utf8(host)?,
            container_path: utf8(container)?,
            options: MOUNT_OPTIONS.iter().map(|o| (*o).to_owned()).collect(),
            mount_type: None,
        })
    };
    let mut mounts = Vec::new();
    for file in &files.libraries {
        mounts.push(bind(&file.host_path, &file.container_path)?);
    }
    for link in &files.links {
        check_link_target(&link.target)?;
    }
    if options.hooks == Hooks::Disabled {
        for link in &files.links {
            mounts.push(bind(&link.host_path, &link.link)?);
        }
    }
    for file in files.binaries.iter().chain(&files.firmware) {
        mounts.push(bind(&file.host_path, &file.container_path)?);
    }

    let mut hooks = Vec::new();
    if let Hooks::CdiHook { path } = &options.hooks {
        if !files.links.is_empty() {
            let mut args = Vec::new();
            for link in &files.links {
                args.push("--link".to_owned());
                args.push(format!("{}::{}", link.target, utf8(&link.link)?));
            }
            hooks.push(cdi_hook(path, "create-symlinks", args)?);
        }
        let dirs = files.library_dirs();
        if !dirs.is_empty() {
            let mut args = Vec::new();
            for dir in dirs {
                args.push("--folder".to_owned());
                args.push(utf8(&dir)?);
            }
            hooks.push(cdi_hook(path, "update-ldcache", args)?);
        }
    }

    let edits = ContainerEdits {
        env: options.env.clone(),
        device_nodes,
        mounts,
        hooks,
        additional_gids: Vec::new(),
    };
    spec::validate_edits(&edits, "spec")?;
    // The link paths hide inside hook arguments, out of the generic checks.
    for link in &files.links {
        let link_path = utf8(&link.link)?;
        spec::check_path(&link_path).map_err(|reason| SpecError::Path {
            at: "spec".to_owned(),
            field: "symlink path",
            path: link_path.clone(),
            reason,
        })?;
    }
    Ok(edits)
}

/// A `createContainer` hook running `subcommand` of the hook binary at
/// `path`; `nvidia-ctk` takes its hooks under `hook`.
fn cdi_hook(path: &Path, subcommand: &str, args: Vec<String>) -> Result<Hook, SpecError> {
    let binary = utf8(path)?;
    let argv0 = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| binary.clone());
    let mut argv = vec![argv0.clone()];
    if argv0 == "nvidia-ctk" {
        argv.push("hook".to_owned());
    }
    argv.push(subcommand.to_owned());
    argv.extend(args);
    Ok(Hook {
        hook_name: HOOK_STAGE.to_owned(),
        path: binary,
        args: argv,
        ..Hook::default()
    })
}

/// A link target must stay in the link's directory.
fn check_link_target(target: &str) -> Result<(), SpecError> {
    if target.is_empty() || target == "." || target == ".." || target.contains(['/', '\0', ':']) {
        return Err(SpecError::LinkTarget {
            target: target.to_owned(),
        });
    }
    Ok(())
}

fn utf8(path: &Path) -> Result<String, SpecError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| SpecError::NonUtf8Path {
            path: path.to_string_lossy().into_owned(),
        })
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::super::driver_files::{DriverFile, LibraryLink};
    use super::*;

    fn files() -> DriverFiles {
        let lib = "/usr/lib/x86_64-linux-gnu";
        let host = |p: &str| PathBuf::from(format!("/run/nvidia/driver{p}"));
        DriverFiles {
            mapping: RootMapping::new("/driver-root", "/run/nvidia/driver"),
            driver_version: "570.172.08".into(),
            libraries: vec![DriverFile {
                host_path: host(&format!("{lib}/libcuda.so.570.172.08")),
                container_path: format!("{lib}/libcuda.so.570.172.08").into(),
            }],
            links: vec![LibraryLink {
                target: "libcuda.so.570.172.08".into(),
                link: format!("{lib}/libcuda.so.1").into(),
                host_path: host(&format!("{lib}/libcuda.so.570.172.08")),
            }],
            binaries: vec![],
            firmware: vec![],
        }
    }

    fn options(hooks: Hooks) -> CommonOptions {
        CommonOptions { hooks, env: vec![] }
    }

    #[test]
    fn nvidia_ctk_takes_hooks_under_its_hook_subcommand() {
        let cases = [
            (
                "/usr/bin/nvidia-ctk",
                vec!["nvidia-ctk", "hook", "update-ldcache"],
            ),
            (
                "/var/lib/kubelet/plugins/gpu.nvidia.com/nvidia-cdi-hook",
                vec!["nvidia-cdi-hook", "update-ldcache"],
            ),
        ];
        for (path, want) in cases {
            let hook = cdi_hook(Path::new(path), "update-ldcache", vec![]).unwrap();
            assert_eq!(hook.args, want, "{path}");
            assert_eq!(hook.path, path);
            assert_eq!(hook.hook_name, "createContainer");
        }
    }

    #[test]
    fn without_hooks_links_become_bind_mounts() {
        let common = CommonEdits::new(&[], &files(), &options(Hooks::Disabled)).unwrap();
        assert!(common.edits().hooks.is_empty());
        let mounts: Vec<(&str, &str)> = common
            .edits()
            .mounts
            .iter()
            .map(|m| (m.host_path.as_str(), m.container_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                (
                    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu/libcuda.so.570.172.08",
                    "/usr/lib/x86_64-linux-gnu/libcuda.so.570.172.08"
                ),
                (
                    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu/libcuda.so.570.172.08",
                    "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
                ),
            ]
        );
    }

    #[test]
    fn unsafe_inputs_are_refused() {
        let hook = Hooks::CdiHook {
            path: "/usr/bin/nvidia-cdi-hook".into(),
        };
        type Edit = fn(&mut DriverFiles, &mut CommonOptions);
        let cases: [(Edit, &str); 5] = [
            (
                |f, _| f.links[0].target = "../../../etc/shadow".into(),
                "symlink target \"../../../etc/shadow\" is not a plain file name",
            ),
            (
                |f, _| f.links[0].target = "a::/b".into(),
                "symlink target \"a::/b\" is not a plain file name",
            ),
            (
                |f, _| f.links[0].link = "/usr/lib/../../etc/ld.so.preload".into(),
                "spec: symlink path \"/usr/lib/../../etc/ld.so.preload\" has a `.` or `..` component",
            ),
            (
                |f, _| f.libraries[0].host_path = "/run/nvidia/driver/../../etc".into(),
                "spec: mount hostPath \"/run/nvidia/driver/../../etc\" has a `.` or `..` component",
            ),
            (
                |_, o| {
                    o.hooks = Hooks::CdiHook {
                        path: "nvidia-cdi-hook".into(),
                    }
                },
                "spec: hook path \"nvidia-cdi-hook\" is not absolute",
            ),
        ];
        for (edit, want) in cases {
            let (mut f, mut o) = (files(), options(hook.clone()));
            edit(&mut f, &mut o);
            let err = CommonEdits::new(&[], &f, &o).unwrap_err();
            assert_eq!(err.to_string(), "cannot render the common CDI edits");
            assert_eq!(std::error::Error::source(&err).unwrap().to_string(), want);
        }
    }

    #[test]
    fn device_node_host_paths_are_translated_or_dropped() {
        let mapping = RootMapping::new("/driver-root", "/run/nvidia/driver");
        let node = |path: &str, host: Option<&str>| DeviceNode {
            path: path.into(),
            host_path: host.map(str::to_owned),
            ..DeviceNode::default()
        };
        let cases = [
            (
                node("/dev/nvidia0", Some("/driver-root/dev/nvidia0")),
                node("/dev/nvidia0", Some("/run/nvidia/driver/dev/nvidia0")),
            ),
            (
                node("/dev/nvidia0", Some("/dev/nvidia0")),
                node("/dev/nvidia0", None),
            ),
            (node("/dev/nvidia0", None), node("/dev/nvidia0", None)),
        ];
        for (input, want) in cases {
            assert_eq!(translate_node(&input, &mapping), want);
        }
    }
}

//! Simulated GPU nodes: a kubelet emulator and an `nvdra-agent`, per node,
//! under one supervisor. The agent serves its node's profile either from the
//! fake backend or (`NAME=nvml:PROFILE`) from the NVML backend over the mock
//! `libnvidia-ml.so.1` (`crates/nvml-mock`) in a driver root of the node's
//! own, which is how the e2e exercises the code real nodes run.
//!
//! Each node gets its own directory: `root/` is what would be the node's
//! filesystem (`plugins_registry/`, `plugins/`, `cdi/`, `pods/`),
//! `logs/` and `pids/` belong to the supervisor (`nvdra-controlplane all`,
//! started with setsid), `boot_id` stands for the kernel's boot ID. The
//! supervisor restarts a process that dies (an agent killed by a test comes
//! back like a DaemonSet pod) and takes both down with it, even when it is
//! killed itself, so nothing outlives a cluster.
//!
//! Node labels are derived from the node's GPU profile the way GPU feature
//! discovery and NFD would label a real node, so DaemonSet affinities and
//! users' node selectors behave as on real hardware.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nvdra_gpu::{FakeBackend, GpuBackend, Inventory};
use serde::{Deserialize, Serialize};

use crate::supervisor::Supervisor;
use crate::tools::Tools;

/// One simulated node: a name and the GPU profile its agent serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Node name (also the agent's ResourceSlice pool).
    pub name: String,
    /// A built-in fake profile name or the path of a profile file.
    pub profile: String,
    /// Serve the profile through the NVML backend and the mock NVML library
    /// instead of the fake backend.
    #[serde(default)]
    pub mock_nvml: bool,
}

/// The prefix of a profile served through the mock NVML library.
const MOCK_NVML_PREFIX: &str = "nvml:";

/// The mock library as cargo builds it.
pub const MOCK_NVML_LIBRARY: &str = nvdra_nvml_mock::layout::BUILT_LIBRARY;

impl NodeSpec {
    /// A node on the fake backend.
    pub fn fake(name: &str, profile: &str) -> Self {
        Self {
            name: name.to_owned(),
            profile: profile.to_owned(),
            mock_nvml: false,
        }
    }

    /// Parses `NAME=PROFILE` or `NAME=nvml:PROFILE`.
    pub fn parse(raw: &str) -> Result<Self> {
        let (name, profile) = raw
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .with_context(|| {
                format!(
                    "{raw:?} is not NAME=PROFILE or NAME=nvml:PROFILE (e.g. h100-0=h100-sxm-80gb-x8)"
                )
            })?;
        let (profile, mock_nvml) = match profile.strip_prefix(MOCK_NVML_PREFIX) {
            Some(rest) if !rest.is_empty() => (rest, true),
            Some(_) => bail!("{raw:?} names no profile after {MOCK_NVML_PREFIX}"),
            None => (profile, false),
        };
        Ok(Self {
            name: name.to_owned(),
            profile: profile.to_owned(),
            mock_nvml,
        })
    }

    /// The inventory the node's agent will see.
    pub fn inventory(&self) -> Result<Inventory> {
        let backend = match FakeBackend::builtin(&self.profile) {
            Some(loaded) => loaded,
            None => FakeBackend::from_file(&self.profile),
        }
        .with_context(|| format!("load GPU profile {:?} of node {}", self.profile, self.name))?;
        backend
            .inventory()
            .with_context(|| format!("inventory of profile {:?}", self.profile))
    }
}

/// GFD/NFD-style labels for a node with `inventory`.
pub fn labels(inventory: &Inventory) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        labels.insert(k.to_owned(), v);
    };
    put("feature.node.kubernetes.io/pci-10de.present", "true".into());
    put("nvidia.com/gpu.present", "true".into());
    put("nvidia.com/gpu.count", inventory.gpus.len().to_string());
    put(
        "nvidia.com/cuda.driver-version.full",
        inventory.driver.driver_version.clone(),
    );
    if let Some(first) = inventory.gpus.first() {
        put(
            "nvidia.com/gpu.product",
            first.info.product_name.replace(' ', "-"),
        );
        if let Some(bytes) = first.info.memory_bytes {
            put("nvidia.com/gpu.memory", (bytes >> 20).to_string());
        }
        put("nvidia.com/mig.capable", first.info.mig_capable.to_string());
        if let Some(clique) = first.fabric.as_ref().and_then(|f| f.clique_id()) {
            put("nvidia.com/gpu.clique", clique);
        }
    }
    labels
}

/// Paths of one node's directory.
#[derive(Debug, Clone)]
pub struct NodeDirs {
    /// The node's directory.
    pub dir: PathBuf,
}

impl NodeDirs {
    /// The directory of `node` under a cluster's run directory.
    pub fn new(run_dir: &Path, node: &str) -> Self {
        Self {
            dir: run_dir.join("nodes").join(node),
        }
    }
    /// The node's simulated root filesystem.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// Where the agent writes CDI specs (its `CDI_ROOT`).
    pub fn cdi(&self) -> PathBuf {
        self.root().join("cdi")
    }
    /// Kubelet plugin directories' parent.
    pub fn plugins(&self) -> PathBuf {
        self.root().join("plugins")
    }
    /// Plugin registration sockets.
    pub fn registry(&self) -> PathBuf {
        self.root().join("plugins_registry")
    }
    /// Per-pod records of the kubelet emulator.
    pub fn pod(&self, uid: &str) -> PathBuf {
        self.root().join("pods").join(uid)
    }
    /// Supervisor PID files.
    pub fn pids(&self) -> PathBuf {
        self.dir.join("pids")
    }
    /// Process logs (`kubelet.log`, `agent.log`, `all.log`).
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

/// Everything a node's processes are started with.
#[derive(Debug, Clone)]
pub struct NodeLaunch<'a> {
    /// The node.
    pub spec: &'a NodeSpec,
    /// Its directories.
    pub dirs: &'a NodeDirs,
    /// The node's kubelet identity.
    pub node_kubeconfig: &'a Path,
    /// The agent's identity (the chart's service account).
    pub agent_kubeconfig: &'a Path,
    /// The agent's `/metrics` `/livez` `/readyz` port.
    pub agent_http_port: u16,
    /// Extra agent flags (e.g. `--feature-gates=...`).
    pub agent_extra: &'a [String],
    /// Our image (`repository[:tag]`); its pods run binaries from the
    /// directory of the agent binary as local processes.
    pub image: &'a str,
    /// The NVIDIA driver root the agent sees (host and container path).
    pub driver_root: &'a Path,
    /// The node's pod addresses (a /24 of 127.0.0.0/8).
    pub pod_cidr: &'a str,
    /// The chart's namespace (the agent's `--namespace`).
    pub namespace: &'a str,
    /// A short path (a link) to the parent of the node directories.
    pub short_nodes_dir: &'a Path,
}

/// Starts a node's supervisor; returns once it has written its PID file.
pub fn start(tools: &Tools, launch: &NodeLaunch<'_>) -> Result<()> {
    let dirs = launch.dirs;
    for dir in [
        dirs.registry(),
        dirs.plugins(),
        dirs.cdi(),
        dirs.root().join("pods"),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let boot_id = dirs.dir.join("boot_id");
    if !boot_id.exists() {
        std::fs::write(&boot_id, format!("{}\n", pseudo_uuid(&launch.spec.name)))
            .with_context(|| format!("write {}", boot_id.display()))?;
    }
    let inventory = launch.spec.inventory()?;
    // The processes see the node through a short link: socket paths must
    // stay under 108 bytes wherever the repository is checked out.
    let short = NodeDirs {
        dir: launch.short_nodes_dir.join(&launch.spec.name),
    };
    let driver_root = launch.driver_root;

    let mut emulator: Vec<String> = vec![
        "exec:kubelet".into(),
        path(&tools.bin("nvdra-kubelet-emulator")?),
        format!("--kubeconfig={}", launch.node_kubeconfig.display()),
        format!("--node-name={}", launch.spec.name),
        format!("--root-dir={}", short.root().display()),
        format!("--pod-cidr={}", launch.pod_cidr),
    ];
    for (k, v) in labels(&inventory) {
        emulator.push(format!("--label={k}={v}"));
    }
    let repo = nvdra_kubelet_emulator::container::image_repo(launch.image);
    emulator.push(format!("--local-image={repo}={}", tools.bin_dir.display()));
    let mut agent: Vec<String> = vec![
        "exec:agent".into(),
        path(&tools.bin("nvdra-agent")?),
        format!("--node-name={}", launch.spec.name),
    ];
    let driver_root = if launch.spec.mock_nvml {
        let root = mock_nvml_root(tools, launch)?;
        agent.extend([
            "--device-backend=nvml".into(),
            format!("--sysfs-root={}", root.sysfs.display()),
            format!("--proc-root={}", root.proc.display()),
        ]);
        root.driver_root
    } else {
        agent.extend([
            "--device-backend=fake".into(),
            format!("--fake-profile={}", launch.spec.profile),
        ]);
        driver_root.to_owned()
    };
    agent.extend([
        format!("--kubeconfig={}", launch.agent_kubeconfig.display()),
        format!("--nvidia-driver-root={}", driver_root.display()),
        format!("--container-driver-root={}", driver_root.display()),
        format!(
            "--kubelet-registrar-directory-path={}",
            short.registry().display()
        ),
        format!(
            "--kubelet-plugins-directory-path={}",
            short.plugins().display()
        ),
        format!("--cdi-root={}", short.cdi().display()),
        format!("--http-endpoint=127.0.0.1:{}", launch.agent_http_port),
        format!("--boot-id-path={}", boot_id.display()),
        format!("--namespace={}", launch.namespace),
    ]);
    agent.extend(launch.agent_extra.iter().cloned());

    Supervisor::new(&dirs.dir).start(
        tools,
        &format!("node {}", launch.spec.name),
        &[emulator, agent],
    )
}

/// Where a mock-NVML node's agent finds its driver.
struct MockNvmlRoot {
    /// The node's driver root: the cluster's, plus the mock library.
    driver_root: PathBuf,
    /// sysfs links naming each GPU's PCIe root.
    sysfs: PathBuf,
    /// The procfs root the mock keeps MIG capability files in.
    proc: PathBuf,
}

/// The stand-in `nvidia-cuda-mps-control` the agent's tests use.
const MPS_CONTROL_STAND_IN: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crates/agent/tests/fixtures/nvidia-cuda-mps-control"
));

/// Lays out a mock-NVML node's own driver root: a copy of the cluster's,
/// with the mock library as `usr/lib64/libnvidia-ml.so.1` (found first by
/// the agent's discovery) and its config naming the node's profile, the
/// `nvidia-smi` stand-in (it records to `usr/bin/nvidia-smi.calls`), the
/// `nvidia-cuda-mps-control` stand-in (recording beside itself too), a state
/// file beside the node's directories (so MIG devices outlive agent
/// restarts, as on a GPU), and sysfs (with its GPUs' PCI entries, for a
/// built-in profile) and procfs roots.
fn mock_nvml_root(tools: &Tools, launch: &NodeLaunch<'_>) -> Result<MockNvmlRoot> {
    let dir = &launch.dirs.dir;
    let library = tools.bin_dir.join(MOCK_NVML_LIBRARY);
    if !library.is_file() {
        bail!(
            "{} is not built; run `cargo build -p nvdra-nvml-mock --lib` in the profile of \
             the other binaries (scripts/test does)",
            library.display()
        );
    }
    let root = MockNvmlRoot {
        driver_root: dir.join("driver-root"),
        sysfs: dir.join("sys"),
        proc: dir.join("proc"),
    };
    for d in [&root.driver_root, &root.sysfs] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("remove {}", d.display()))?;
        }
    }
    crate::cluster::copy_tree(launch.driver_root, &root.driver_root)?;
    // The stand-in nvidia-smi, copied (not linked) so it records this node's
    // calls beside itself.
    let smi = root.driver_root.join("usr/bin/nvidia-smi");
    std::fs::copy(tools.bin("nvdra-e2e-nvidia-smi")?, &smi)
        .with_context(|| format!("copy the nvidia-smi stand-in to {}", smi.display()))?;
    // The MPS control stand-in (the agent's test fixture), which records to
    // `usr/bin/nvidia-cuda-mps-control.calls`.
    let mps = root.driver_root.join("usr/bin/nvidia-cuda-mps-control");
    std::fs::write(&mps, MPS_CONTROL_STAND_IN)
        .and_then(|()| std::fs::set_permissions(&mps, std::fs::Permissions::from_mode(0o755)))
        .with_context(|| format!("write the MPS control stand-in {}", mps.display()))?;
    let profile = match nvdra_gpu::FakeBackend::builtin(&launch.spec.profile) {
        Some(_) => launch.spec.profile.clone(),
        None => path(
            &std::fs::canonicalize(&launch.spec.profile)
                .with_context(|| format!("resolve profile path {}", launch.spec.profile))?,
        ),
    };
    let config = nvdra_nvml_mock::config::MockConfig {
        profile,
        state_file: Some(dir.join("mock-nvml-state.json")),
        proc_root: Some(root.proc.clone()),
    };
    nvdra_nvml_mock::layout::install(&library, &root.driver_root, &root.sysfs, &config)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("lay out the mock NVML node {}", launch.spec.name))?;
    // Its GPUs' PCI entries, so passthrough finds them; a fake kernel
    // (`nvdra_nvml_mock::pci::FakeKernel`, run by the test that needs one)
    // rebinds them.
    let inventory = nvdra_gpu::FakeBackend::builtin(&launch.spec.profile)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .map(|fake| fake.inventory())
        .transpose()?;
    if let Some(inventory) = inventory {
        nvdra_nvml_mock::pci::install(&root.sysfs, &nvdra_nvml_mock::pci::specs_of(&inventory))
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("lay out the PCI sysfs of {}", launch.spec.name))?;
    }
    Ok(root)
}

/// The PID of the node's process `name` (`kubelet`, `agent`, `all`), if running.
pub fn pid(dirs: &NodeDirs, name: &str) -> Option<u32> {
    Supervisor::new(&dirs.dir).pid(name)
}

/// Kills the node's agent with `sig`; the supervisor starts a new one.
/// Returns the old PID.
pub fn kill_agent(dirs: &NodeDirs, sig: &str) -> Result<u32> {
    Supervisor::new(&dirs.dir).kill("agent", sig)
}

/// Stops a node's processes (see [`Supervisor::stop`]).
pub fn stop(dirs: &NodeDirs, timeout: Duration) -> Result<()> {
    Supervisor::new(&dirs.dir).stop(timeout)
}

/// A stable UUID-shaped string derived from `seed` (boot IDs of simulated
/// nodes: stable, distinct per node).
fn pseudo_uuid(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let lo = h.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        lo >> 52,
        lo & 0xffff_ffff_ffff
    )
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The pod CIDR of the `index`th node: `127.<1 + index / 250>.<index % 250>.0/24`.
pub fn pod_cidr(index: usize) -> String {
    format!("127.{}.{}.0/24", 1 + index / 250, index % 250)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn node_spec_parse() {
        assert_eq!(
            NodeSpec::parse("h100-0=h100-sxm-80gb-x8").unwrap(),
            NodeSpec::fake("h100-0", "h100-sxm-80gb-x8")
        );
        assert_eq!(
            NodeSpec::parse("a-0=nvml:a100-40gb-x8-mig").unwrap(),
            NodeSpec {
                name: "a-0".into(),
                profile: "a100-40gb-x8-mig".into(),
                mock_nvml: true,
            }
        );
        for bad in ["h100-0", "=p", "n="] {
            assert_eq!(
                NodeSpec::parse(bad).unwrap_err().to_string(),
                format!(
                    "{bad:?} is not NAME=PROFILE or NAME=nvml:PROFILE (e.g. h100-0=h100-sxm-80gb-x8)"
                )
            );
        }
        assert_eq!(
            NodeSpec::parse("n=nvml:").unwrap_err().to_string(),
            "\"n=nvml:\" names no profile after nvml:"
        );
    }

    #[test]
    fn labels_follow_gpu_feature_discovery() {
        let spec = NodeSpec::parse("n=gb200-x4").unwrap();
        let labels = labels(&spec.inventory().unwrap());
        assert_eq!(labels["nvidia.com/gpu.present"], "true");
        assert_eq!(labels["nvidia.com/gpu.count"], "4");
        assert_eq!(labels["nvidia.com/cuda.driver-version.full"], "580.82.07");
        assert_eq!(
            labels["nvidia.com/gpu.clique"],
            "0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1"
        );
        let l4 = labels_of("l4-x2");
        assert_eq!(l4["nvidia.com/gpu.product"], "NVIDIA-L4");
        assert!(!l4.contains_key("nvidia.com/gpu.clique"));
    }

    fn labels_of(profile: &str) -> BTreeMap<String, String> {
        labels(
            &NodeSpec::parse(&format!("n={profile}"))
                .unwrap()
                .inventory()
                .unwrap(),
        )
    }

    #[test]
    fn pseudo_uuids_are_stable_and_distinct() {
        assert_eq!(pseudo_uuid("a"), pseudo_uuid("a"));
        assert_ne!(pseudo_uuid("a"), pseudo_uuid("b"));
        assert_eq!(pseudo_uuid("a").len(), 36);
    }
}

//! A whole local cluster: control plane, chart, simulated nodes.
//!
//! [`Cluster::up`] brings everything up in one run directory and records
//! what it started in `local-cluster.json`, so [`Cluster::down`] (possibly
//! from another process) stops exactly that. Up is all-or-nothing: when any
//! step fails, whatever was started is stopped before the error returns.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::Api;
use kube::api::ListParams;
use serde::{Deserialize, Serialize};

use crate::chart;
use crate::controlplane::ControlPlane;
use crate::node::{self, NodeDirs, NodeLaunch, NodeSpec};
use crate::supervisor::Supervisor;
use crate::tools::{Tools, repo_root};
use crate::wait;

/// The namespace the chart is installed into.
pub const NAMESPACE: &str = "nvdra";
/// The Helm release name.
pub const RELEASE: &str = "nvdra";
/// The GPU driver name.
pub const GPU_DRIVER: &str = nvdra_api::names::drivers::GPU;

/// What to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// The simulated nodes.
    pub nodes: Vec<NodeSpec>,
    /// Extra `--set` values for the chart.
    #[serde(default)]
    pub chart_sets: Vec<String>,
    /// Extra flags for every agent.
    #[serde(default)]
    pub agent_extra: Vec<String>,
    /// ComputeDomain controller replicas (leader-elected); 0 runs none.
    #[serde(default)]
    pub controllers: u8,
    /// Client QPS of kube-scheduler and of each kube-controller-manager
    /// controller; `None` keeps upstream's 50 and 20. At 20 the ResourceClaim
    /// controller writes at most 20 objects a second (a claim and a pod status
    /// patch per pod), at 50 the scheduler binds at most 25 pods with claims.
    #[serde(default)]
    pub client_qps: Option<u32>,
}

impl ClusterSpec {
    /// The default local cluster: four nodes of different GPU generations.
    pub fn demo() -> Self {
        let nodes = [
            ("h100-0", "h100-sxm-80gb-x8"),
            ("a100-0", "a100-40gb-x8-mig"),
            ("gb200-0", "gb200-x4"),
            ("l4-0", "l4-x2"),
        ]
        .into_iter()
        .map(|(name, profile)| NodeSpec::fake(name, profile))
        .collect();
        Self {
            nodes,
            chart_sets: Vec::new(),
            agent_extra: Vec::new(),
            controllers: 1,
            client_qps: None,
        }
    }
}

/// What `local-cluster.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    spec: ClusterSpec,
    image: String,
    controlplane: PathBuf,
    agent_ports: Vec<u16>,
    #[serde(default)]
    controller_ports: Vec<u16>,
}

/// A running cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The run directory.
    pub dir: PathBuf,
    /// The control plane.
    pub cp: ControlPlane,
    /// What was started.
    pub spec: ClusterSpec,
    /// Each node's agent HTTP port, in `spec.nodes` order.
    pub agent_ports: Vec<u16>,
    /// Each controller replica's HTTP port (`/metrics`, `/livez`, `/readyz`).
    pub controller_ports: Vec<u16>,
    /// Programs.
    pub tools: Tools,
    /// The chart's image; pods using it run our binaries locally.
    pub image: String,
}

impl Cluster {
    /// Starts a cluster in `dir` (absent or empty) and waits until every
    /// node is Ready and has published its GPUs.
    pub async fn up(tools: Tools, dir: &Path, spec: ClusterSpec) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolve {}", dir.display()))?;
        let names: Vec<String> = spec.nodes.iter().map(|n| n.name.clone()).collect();
        // Every controller on: the emulators heartbeat, so the node
        // lifecycle controller sees Ready nodes as a real cluster's would.
        let cp = ControlPlane::up(&tools.controlplane, &dir, &names, "*", spec.client_qps)?;
        let cluster = Self {
            image: String::new(),
            agent_ports: Vec::new(),
            controller_ports: Vec::new(),
            dir: dir.clone(),
            cp,
            spec,
            tools,
        };
        match cluster.start_rest().await {
            Ok(cluster) => Ok(cluster),
            Err(err) => {
                if let Err(stop) = Self::down(&dir) {
                    tracing::error!(error = %format!("{stop:#}"), "stopping the failed cluster");
                }
                Err(err)
            }
        }
    }

    async fn start_rest(mut self) -> Result<Self> {
        let client = self.cp.admin_client().await?;
        let sets: Vec<&str> = self.spec.chart_sets.iter().map(String::as_str).collect();
        let rendered = chart::install(&self.cp, &self.tools.helm, RELEASE, NAMESPACE, &sets)?;
        self.image = rendered.image.clone();
        let identities = self.dir.join("identities");
        std::fs::create_dir_all(&identities)?;
        // One agent identity per node, bound to its Node as a DaemonSet
        // pod's token is: the chart's admission policies confine the agent
        // to the node its token names.
        let mut agent_kubeconfigs = Vec::new();
        for spec in &self.spec.nodes {
            agent_kubeconfigs.push(
                chart::node_bound_kubeconfig(
                    &self.cp,
                    &client,
                    &rendered.agent_service_account,
                    &spec.name,
                    48,
                    &identities.join(format!("agent-{}.kubeconfig", spec.name)),
                )
                .await?,
            );
        }
        self.agent_ports = self.cp.free_ports(self.spec.nodes.len())?;
        if self.spec.controllers > 0 {
            // The agents bind theirs only after the controllers start, so
            // a second draw could hand a controller an agent's port: that
            // agent would then fail to bind on every restart.
            self.controller_ports = self
                .cp
                .free_ports_except(usize::from(self.spec.controllers), &self.agent_ports)?;
            self.save()?;
            self.start_controllers(&rendered, &identities)?;
        } else {
            self.save()?;
        }
        let driver_root = driver_root(&self.tools, &self.dir)?;
        let short_nodes_dir = short_link(&self.dir)?;
        for (index, ((spec, port), agent_kubeconfig)) in self
            .spec
            .nodes
            .iter()
            .zip(&self.agent_ports)
            .zip(&agent_kubeconfigs)
            .enumerate()
        {
            let dirs = NodeDirs::new(&self.dir, &spec.name);
            node::start(
                &self.tools,
                &NodeLaunch {
                    spec,
                    dirs: &dirs,
                    node_kubeconfig: &self.cp.node_kubeconfig(&spec.name),
                    agent_kubeconfig,
                    agent_http_port: *port,
                    agent_extra: &self.spec.agent_extra,
                    image: &rendered.image,
                    driver_root: &driver_root,
                    pod_cidr: &node::pod_cidr(index),
                    namespace: NAMESPACE,
                    short_nodes_dir: &short_nodes_dir,
                },
            )?;
        }
        self.wait_nodes_published(&client, Duration::from_secs(120))
            .await?;
        Ok(self)
    }

    /// Starts `spec.controllers` leader-elected `nvdra-controller` replicas
    /// under one supervisor in `<dir>/controller`, as the chart's controller
    /// ServiceAccount, configured as the chart's Deployment configures them.
    fn start_controllers(&self, rendered: &chart::Rendered, identities: &Path) -> Result<()> {
        let sa = rendered
            .controller_service_account
            .as_ref()
            .context("the chart rendered no controller Deployment")?;
        let kubeconfig = chart::service_account_kubeconfig(
            &self.cp,
            sa,
            48,
            &identities.join("controller.kubeconfig"),
        )?;
        let bin = self.tools.bin("nvdra-controller")?;
        let groups: Vec<Vec<String>> = self
            .controller_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                vec![
                    format!("exec:controller-{i}"),
                    bin.display().to_string(),
                    format!("--pod-name={RELEASE}-controller-{i}"),
                    format!("--namespace={NAMESPACE}"),
                    format!("--image-name={}", rendered.image),
                    format!("--kubeconfig={}", kubeconfig.display()),
                    format!("--http-endpoint=127.0.0.1:{port}"),
                    "--leader-election-enabled=true".to_owned(),
                    format!("--lease-lock-namespace={NAMESPACE}"),
                    format!("--lease-lock-name={RELEASE}-controller"),
                    // Shorter than the chart's 15 s/10 s/2 s so a standby
                    // takes over a killed leader within ~12 s.
                    "--lease-duration=10s".to_owned(),
                    "--renew-deadline=7s".to_owned(),
                    "--retry-period=2s".to_owned(),
                    "--log-verbosity-cd-daemon=4".to_owned(),
                ]
            })
            .collect();
        Supervisor::new(&self.controller_dir()).start(&self.tools, "the controllers", &groups)
    }

    /// The controllers' supervisor directory.
    pub fn controller_dir(&self) -> PathBuf {
        self.dir.join("controller")
    }

    /// Reattaches to the cluster recorded in `dir`.
    pub fn open(tools: Tools, dir: &Path) -> Result<Self> {
        let state = load(dir)?;
        Ok(Self {
            cp: ControlPlane::existing(&state.controlplane, dir),
            dir: dir.to_owned(),
            spec: state.spec,
            agent_ports: state.agent_ports,
            controller_ports: state.controller_ports,
            image: state.image,
            tools,
        })
    }

    /// Stops the nodes, then the control plane, of the cluster in `dir`.
    /// Succeeds when nothing is running there.
    pub fn down(dir: &Path) -> Result<()> {
        let mut first_err = None;
        if let Err(err) = Supervisor::new(&dir.join("controller")).stop(Duration::from_secs(30)) {
            first_err.get_or_insert(err);
        }
        if let Ok(state) = load(dir) {
            for n in &state.spec.nodes {
                if let Err(err) = node::stop(&NodeDirs::new(dir, &n.name), Duration::from_secs(40))
                {
                    first_err.get_or_insert(err);
                }
            }
        }
        if let Err(err) = ControlPlane::down(dir) {
            first_err.get_or_insert(err);
        }
        // The link is only a path shortener; the directory behind it stays.
        let _ = std::fs::remove_file(short_link_path(dir));
        match first_err {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The directories of `node`.
    pub fn node_dirs(&self, node: &str) -> NodeDirs {
        NodeDirs::new(&self.dir, node)
    }

    /// A cluster-admin client.
    pub async fn client(&self) -> Result<kube::Client> {
        self.cp.admin_client().await
    }

    /// The node spec named `name`.
    pub fn node(&self, name: &str) -> Result<&NodeSpec> {
        self.spec
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in this cluster"))
    }

    /// Waits until every node is Ready and its agent's GPU slices cover the
    /// whole pool.
    pub async fn wait_nodes_published(
        &self,
        client: &kube::Client,
        timeout: Duration,
    ) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let slices: Api<ResourceSlice> = Api::all(client.clone());
        for spec in &self.spec.nodes {
            let name = spec.name.clone();
            let published = async {
                wait::until(timeout, &format!("node {name} Ready"), || async {
                    let node = nodes.get_opt(&name).await?;
                    Ok(node.is_some_and(|n| is_ready(&n)))
                })
                .await?;
                wait::until(
                    timeout,
                    &format!("ResourceSlices of node {name}"),
                    || async {
                        let list = slices
                            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
                            .await?;
                        Ok(pool_complete(&list.items, GPU_DRIVER))
                    },
                )
                .await
            };
            // The run directory is gone with a CI machine: the error must
            // carry what the node's processes last said.
            published
                .await
                .with_context(|| node_log_tails(&name, &self.node_dirs(&name), LOG_TAIL_LINES))?;
        }
        Ok(())
    }

    fn save(&self) -> Result<()> {
        let state = State {
            spec: self.spec.clone(),
            image: self.image.clone(),
            controlplane: self.cp.bin.clone(),
            agent_ports: self.agent_ports.clone(),
            controller_ports: self.controller_ports.clone(),
        };
        let path = self.dir.join("local-cluster.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("write {}", path.display()))
    }
}

/// How many last lines of each node log a failed start-up reports.
const LOG_TAIL_LINES: usize = 15;

/// The last `lines` lines of a node's supervisor, emulator and agent logs,
/// as one text for an error's context.
fn node_log_tails(node: &str, dirs: &NodeDirs, lines: usize) -> String {
    let mut text = format!("node {node}: last log lines");
    for file in ["all.log", "kubelet.log", "agent.log"] {
        let path = dirs.logs().join(file);
        text.push_str(&format!("\n--- {}", path.display()));
        match std::fs::read(&path) {
            Ok(bytes) => {
                let all = String::from_utf8_lossy(&bytes);
                let tail: Vec<&str> = all.lines().rev().take(lines).collect();
                for line in tail.iter().rev() {
                    text.push('\n');
                    text.push_str(line);
                }
            }
            Err(err) => text.push_str(&format!(" (unreadable: {err})")),
        }
    }
    text
}

/// `/tmp/nvdra-<hash of dir>`: where [`short_link`] puts its link.
fn short_link_path(dir: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    std::env::temp_dir().join(format!("nvdra-{:08x}", h as u32))
}

/// A short link to `<dir>/nodes`, through which the node processes see
/// their directories: kubelet plugin socket paths (e.g.
/// `.../plugins_registry/compute-domain.nvidia.com-reg.sock`) must stay
/// under the 108-byte Unix socket limit however deep the checkout is.
fn short_link(dir: &Path) -> Result<PathBuf> {
    let nodes = dir.join("nodes");
    std::fs::create_dir_all(&nodes).with_context(|| format!("create {}", nodes.display()))?;
    let link = short_link_path(dir);
    // A stale link from an earlier cluster in the same directory.
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&nodes, &link)
        .with_context(|| format!("link {} -> {}", link.display(), nodes.display()))?;
    Ok(link)
}

/// The cluster's NVIDIA driver root: a copy of the fake driver root of
/// `crates/gpu/profiles/driver-root` (empty files and relative soname links;
/// a copy because the agent refuses library paths that leave the root) plus
/// stand-ins for the host driver's `nvidia-imex` and `nvidia-imex-ctl`,
/// which reach IMEX daemons through the agent's base CDI spec as the real
/// binaries would.
fn driver_root(tools: &Tools, dir: &Path) -> Result<PathBuf> {
    let fake = repo_root().join("crates/gpu/profiles/driver-root");
    let root = dir.join("driver-root");
    copy_tree(&fake, &root)?;
    let bin = root.join("usr/bin");
    for (standin, name) in [
        ("nvdra-e2e-imex", "nvidia-imex"),
        ("nvdra-e2e-imex-ctl", "nvidia-imex-ctl"),
    ] {
        let target = tools.bin(standin)?;
        std::os::unix::fs::symlink(&target, bin.join(name))
            .with_context(|| format!("link {name} -> {}", target.display()))?;
    }
    Ok(root)
}

/// Copies the tree `from` into `to` (created), keeping links and modes.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .status()
        .context("run cp")?;
    if !status.success() {
        bail!(
            "copying {} to {} failed ({status})",
            from.display(),
            to.display()
        );
    }
    Ok(())
}

fn load(dir: &Path) -> Result<State> {
    let path = dir.join("local-cluster.json");
    let text = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))
}

/// Whether the Node's Ready condition is True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `slices` hold a complete pool of `driver`: at least one slice,
/// all of its newest generation, as many as that generation announces.
pub fn pool_complete(slices: &[ResourceSlice], driver: &str) -> bool {
    let ours: Vec<_> = slices.iter().filter(|s| s.spec.driver == driver).collect();
    let Some(generation) = ours.iter().map(|s| s.spec.pool.generation).max() else {
        return false;
    };
    let current: Vec<_> = ours
        .iter()
        .filter(|s| s.spec.pool.generation == generation)
        .collect();
    current.first().is_some_and(|s| {
        usize::try_from(s.spec.pool.resource_slice_count).ok() == Some(current.len())
    })
}

/// Fails unless `dir` holds no running cluster processes; for callers that
/// must not start a second cluster on top of a first.
pub fn ensure_stopped(dir: &Path) -> Result<()> {
    if dir.join("pids/all.pid").exists() {
        bail!(
            "a cluster is running in {} (pids/all.pid exists); stop it first",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn log_tails_name_each_log_and_keep_its_last_lines() {
        let run = std::env::temp_dir().join(format!("nvdra-log-tails-{}", std::process::id()));
        let dirs = NodeDirs::new(&run, "h200-0");
        std::fs::create_dir_all(dirs.logs()).unwrap();
        std::fs::write(
            dirs.logs().join("all.log"),
            "all: started agent\nall: agent exited: exit status 1; restart 1 of 5\n",
        )
        .unwrap();
        std::fs::write(dirs.logs().join("agent.log"), "one\ntwo\nthree\n").unwrap();

        let text = node_log_tails("h200-0", &dirs, 2);
        let logs = dirs.logs();
        assert_eq!(
            text,
            format!(
                "node h200-0: last log lines\n\
                 --- {all}\nall: started agent\nall: agent exited: exit status 1; restart 1 of 5\n\
                 --- {kubelet} (unreadable: No such file or directory (os error 2))\n\
                 --- {agent}\ntwo\nthree",
                all = logs.join("all.log").display(),
                kubelet = logs.join("kubelet.log").display(),
                agent = logs.join("agent.log").display(),
            )
        );
        std::fs::remove_dir_all(&run).unwrap();
    }
}

//! The `nvdra-local-cluster` command: `up` starts a cluster with four
//! simulated GPU nodes and a demo workload and says how to use it; `down`
//! stops it; `status` shows nodes and slices.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use crate::cluster::{self, Cluster, ClusterSpec};
use crate::node::NodeSpec;
use crate::tools::{ToolPaths, Tools};
use crate::wait;

/// Flags.
#[derive(Debug, Parser)]
#[command(
    name = "nvdra-local-cluster",
    about = "A local Kubernetes cluster with simulated NVIDIA GPU nodes running nvdra"
)]
pub struct Args {
    /// Run directory (kubeconfigs, logs, node roots).
    #[arg(
        long,
        env = "NVDRA_LOCAL_CLUSTER_DIR",
        global = true,
        default_value = "e2e/.cache/local-cluster"
    )]
    pub dir: PathBuf,
    /// Program paths.
    #[command(flatten)]
    pub tools: ToolPaths,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Start the cluster, run a demo claim, print how to use it.
    Up {
        /// Nodes as NAME=PROFILE, or NAME=nvml:PROFILE for a node whose
        /// agent runs the NVML backend over the mock NVML library
        /// (repeatable; default: one H100, one A100 with MIG, one GB200
        /// tray, one L4 node).
        #[arg(
            long = "node",
            env = "NVDRA_LOCAL_CLUSTER_NODES",
            value_delimiter = ','
        )]
        nodes: Vec<String>,
        /// Skip the demo workload.
        #[arg(long, env = "NVDRA_LOCAL_CLUSTER_NO_DEMO")]
        no_demo: bool,
    },
    /// Stop every process of the cluster (the run directory is kept).
    Down,
    /// Show nodes, ResourceSlices and pods.
    Status,
}

/// Runs the command.
pub async fn run(args: Args) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NVDRA_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match args.command {
        Cmd::Up { nodes, no_demo } => up(&args.tools, &args.dir, &nodes, no_demo).await,
        Cmd::Down => {
            Cluster::down(&args.dir)?;
            tracing::info!(dir = %args.dir.display(), "local cluster stopped");
            Ok(())
        }
        Cmd::Status => {
            let cluster = Cluster::open(Tools::locate(&args.tools)?, &args.dir)?;
            let out = cluster.cp.kubectl(
                &[
                    "get",
                    "nodes,resourceslices,resourceclaims,pods",
                    "-A",
                    "-o",
                    "wide",
                ],
                None,
            )?;
            tracing::info!("\n{out}");
            Ok(())
        }
    }
}

async fn up(
    paths: &ToolPaths,
    dir: &std::path::Path,
    nodes: &[String],
    no_demo: bool,
) -> Result<()> {
    cluster::ensure_stopped(dir)?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        // A stopped cluster's directory: start afresh (up.sh needs it empty).
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    let mut spec = ClusterSpec::demo();
    if !nodes.is_empty() {
        spec.nodes = nodes
            .iter()
            .map(|n| NodeSpec::parse(n))
            .collect::<Result<_>>()?;
    }
    let tools = Tools::locate(paths)?;
    let started = std::time::Instant::now();
    let cluster = Cluster::up(tools, dir, spec).await?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f32(),
        nodes = cluster.spec.nodes.len(),
        "local cluster up"
    );
    if !no_demo {
        demo(&cluster).await?;
    }
    let kubeconfig = cluster.cp.admin_kubeconfig();
    let kubectl = format!("{} kubectl", cluster.cp.bin.display());
    let text = format!(
        "\nThe local cluster is running.\n\n  export KUBECONFIG={kc}\n  alias kubectl='{kubectl}'\n  kubectl get nodes,resourceslices\n  kubectl get deviceclasses\n  kubectl -n nvdra-demo get pods,resourceclaims -o wide\n\nLogs: {dir}/logs (control plane), {dir}/nodes/<node>/logs (kubelet emulator, agent)\nStop:  ./scripts/local-cluster down\n",
        kc = kubeconfig.display(),
        dir = cluster.dir.display(),
    );
    // The one place this tool talks to a person rather than a log.
    #[allow(clippy::print_stdout)]
    {
        println!("{text}");
    }
    Ok(())
}

/// A pod with a one-GPU claim template, on whichever node the scheduler picks.
async fn demo(cluster: &Cluster) -> Result<()> {
    let manifest = r#"
apiVersion: v1
kind: Namespace
metadata: { name: nvdra-demo }
---
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: { namespace: nvdra-demo, name: single-gpu }
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: { deviceClassName: gpu.nvidia.com }
"#;
    cluster
        .cp
        .kubectl(&["apply", "--server-side", "-f", "-"], Some(manifest))?;
    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client, "nvdra-demo");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "demo" },
        "spec": {
            "containers": [{
                "name": "ctr", "image": "ubuntu:24.04", "command": ["nvidia-smi", "-L"],
                "resources": { "claims": [{ "name": "gpu" }] },
            }],
            "resourceClaims": [{ "name": "gpu", "resourceClaimTemplateName": "single-gpu" }],
        },
    }))?;
    let _ = pods.delete("demo", &DeleteParams::default()).await;
    wait::until(
        Duration::from_secs(30),
        "the old demo pod to go",
        || async { Ok(pods.get_opt("demo").await?.is_none()) },
    )
    .await?;
    pods.create(&PostParams::default(), &pod).await?;
    let running = wait::value(Duration::from_secs(60), "the demo pod to run", || async {
        let pod = pods.get("demo").await?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        Ok((phase.as_deref() == Some("Running")).then_some(pod))
    })
    .await?;
    let node = running
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let claims = cluster.cp.kubectl(
        &["-n", "nvdra-demo", "get", "resourceclaims", "-o",
          "custom-columns=CLAIM:.metadata.name,DEVICE:.status.allocation.devices.results[*].device,POOL:.status.allocation.devices.results[*].pool"],
        None,
    )?;
    tracing::info!(%node, "demo pod nvdra-demo/demo is Running\n{claims}");
    Ok(())
}

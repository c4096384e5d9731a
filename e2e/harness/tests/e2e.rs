//! The end-to-end suite: nvdra on a real control plane with simulated GPU
//! nodes (see `nvdra_e2e`). One cluster serves the functional scenarios, a
//! second, larger one the latency run. Each scenario works in its own
//! namespace and asserts on API objects and on the files the agents wrote.
//!
//! Run with `scripts/test` (builds everything first) or
//! `cargo test -p nvdra-e2e --features e2e --test e2e [-- FILTER...]`.
//! The run directory (logs of every component) is kept under
//! `e2e/.cache/e2e-run/`, or `$NVDRA_E2E_DIR`.

// A harness=false test binary reports to the person running it on stderr,
// as libtest would; tracing would bury the verdict in component logs.
#![allow(clippy::print_stderr)]

mod e2e {
    pub mod computedomain;
    pub mod env;
    pub mod examples;
    pub mod mocknvml;
    pub mod observability;
    pub mod perf;
    pub mod privilege;
    pub mod scenarios;
}

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::env::Env;
use futures::future::BoxFuture;
use nvdra_e2e::tools::{ToolPaths, repo_root};
use nvdra_e2e::{Cluster, ClusterSpec, NodeSpec, Tools};

/// Flags (cargo passes what follows `--`).
#[derive(Debug, Parser)]
struct Args {
    /// Run directory (default: e2e/.cache/e2e-run).
    #[arg(long, env = "NVDRA_E2E_DIR")]
    dir: Option<std::path::PathBuf>,
    /// Program paths.
    #[command(flatten)]
    tools: ToolPaths,
    /// Client QPS of kube-scheduler and kube-controller-manager's
    /// controllers in the scale run (burst twice that); 0 keeps upstream's
    /// defaults (50 and 20).
    #[arg(long, env = "NVDRA_E2E_SCALE_CLIENT_QPS", default_value_t = 200)]
    scale_client_qps: u32,
    /// Run only scenarios whose name contains one of these.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    filters: Vec<String>,
}

type Scenario = fn(Arc<Env>) -> BoxFuture<'static, anyhow::Result<()>>;

/// The functional scenarios, in order; each gets this long.
const SCENARIOS: &[(&str, Scenario, u64)] = &[
    (
        "slices_published",
        |e| Box::pin(e2e::scenarios::slices_published(e)),
        60,
    ),
    (
        "single_gpu_lifecycle",
        |e| Box::pin(e2e::scenarios::single_gpu_lifecycle(e)),
        120,
    ),
    (
        "cel_selectors",
        |e| Box::pin(e2e::scenarios::cel_selectors(e)),
        120,
    ),
    (
        "shared_and_distinct_claims",
        |e| Box::pin(e2e::scenarios::shared_and_distinct_claims(e)),
        120,
    ),
    (
        "agent_restart_during_burst",
        |e| Box::pin(e2e::scenarios::agent_restart_during_burst(e)),
        240,
    ),
    (
        "invalid_opaque_config",
        |e| Box::pin(e2e::scenarios::invalid_opaque_config(e)),
        90,
    ),
    (
        "local_process_pod",
        |e| Box::pin(e2e::scenarios::local_process_pod(e)),
        90,
    ),
    (
        "corrupt_checkpoint_recovered",
        |e| Box::pin(e2e::scenarios::corrupt_checkpoint_recovered(e)),
        120,
    ),
    (
        "cd_four_node_domain",
        |e| Box::pin(e2e::computedomain::four_node_domain(e)),
        300,
    ),
    (
        "cd_two_domains_share_nodes",
        |e| Box::pin(e2e::computedomain::two_domains_share_nodes(e)),
        300,
    ),
    (
        "cd_faults",
        |e| Box::pin(e2e::computedomain::faults(e)),
        300,
    ),
    (
        "cd_bad_channel_claims",
        |e| Box::pin(e2e::computedomain::bad_channel_claims(e)),
        180,
    ),
    (
        "documentation_examples",
        |e| Box::pin(e2e::examples::documentation_examples(e)),
        300,
    ),
    (
        "agent_confined_to_its_node",
        |e| Box::pin(e2e::privilege::agent_confined_to_its_node(e)),
        60,
    ),
    (
        "daemon_confined_to_its_row",
        |e| Box::pin(e2e::privilege::daemon_confined_to_its_row(e)),
        60,
    ),
    (
        "metrics_pass_promtool",
        |e| Box::pin(e2e::observability::metrics_pass_promtool(e)),
        60,
    ),
    (
        "prometheus_scrapes_every_component",
        |e| Box::pin(e2e::observability::prometheus_scrapes_every_component(e)),
        90,
    ),
];

/// The scenarios of the mock-NVML cluster (`mock_nvml_spec`).
const MOCK_NVML_SCENARIOS: &[(&str, Scenario, u64)] = &[
    (
        "mock_nvml_node",
        |e| Box::pin(e2e::mocknvml::mock_nvml_node(e)),
        180,
    ),
    (
        "time_slicing_shares_a_gpu",
        |e| Box::pin(e2e::mocknvml::time_slicing_shares_a_gpu(e)),
        180,
    ),
    (
        "mps_shares_a_gpu",
        |e| Box::pin(e2e::mocknvml::mps_shares_a_gpu(e)),
        180,
    ),
    (
        "xid_taints_a_device",
        |e| Box::pin(e2e::mocknvml::xid_taints_a_device(e)),
        120,
    ),
];

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NVDRA_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .init();
    let args = Args::parse();
    let filters: Vec<String> = args
        .filters
        .iter()
        .filter(|a| !a.starts_with('-'))
        .cloned()
        .collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("e2e: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = Vec::new();
    let mut passed = 0usize;
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| repo_root().join("e2e/.cache/e2e-run"));
    let tools = args.tools.clone();

    let functional: Vec<_> = SCENARIOS.iter().filter(|(n, ..)| wanted(n)).collect();
    if !functional.is_empty() {
        let outcome = runtime.block_on(with_cluster(
            &tools,
            &base.join("functional"),
            functional_spec(),
            |env| async move {
                let mut results = Vec::new();
                for (name, scenario, secs) in &functional {
                    results.push((*name, run_one(name, *scenario, env.clone(), *secs).await));
                }
                Ok(results)
            },
        ));
        tally(outcome, &mut passed, &mut failed);
    }
    if wanted("latency_100_pods") {
        let outcome = runtime.block_on(with_cluster(
            &tools,
            &base.join("latency"),
            latency_spec(),
            |env| async move {
                let result = run_one(
                    "latency_100_pods",
                    |e| Box::pin(e2e::perf::latency_100_pods(e)),
                    env,
                    300,
                )
                .await;
                Ok(vec![("latency_100_pods", result)])
            },
        ));
        tally(outcome, &mut passed, &mut failed);
    }

    if MOCK_NVML_SCENARIOS.iter().any(|(n, ..)| wanted(n)) {
        let outcome = runtime.block_on(with_cluster(
            &tools,
            &base.join("mock-nvml"),
            mock_nvml_spec(),
            |env| async move {
                let mut results = Vec::new();
                for (name, scenario, secs) in MOCK_NVML_SCENARIOS.iter().filter(|(n, ..)| wanted(n))
                {
                    results.push((*name, run_one(name, *scenario, env.clone(), *secs).await));
                }
                Ok(results)
            },
        ));
        tally(outcome, &mut passed, &mut failed);
    }

    if wanted("dynamic_mig_mixed_profiles") {
        let outcome = runtime.block_on(with_cluster(
            &tools,
            &base.join("dynamic-mig"),
            dynamic_mig_spec(),
            |env| async move {
                let result = run_one(
                    "dynamic_mig_mixed_profiles",
                    |e| Box::pin(e2e::mocknvml::dynamic_mig_mixed_profiles(e)),
                    env,
                    180,
                )
                .await;
                Ok(vec![("dynamic_mig_mixed_profiles", result)])
            },
        ));
        tally(outcome, &mut passed, &mut failed);
    }

    if wanted("vfio_passthrough_claim") {
        let outcome = runtime.block_on(with_cluster(
            &tools,
            &base.join("passthrough"),
            passthrough_spec(),
            |env| async move {
                let result = run_one(
                    "vfio_passthrough_claim",
                    |e| Box::pin(e2e::mocknvml::vfio_passthrough_claim(e)),
                    env,
                    120,
                )
                .await;
                Ok(vec![("vfio_passthrough_claim", result)])
            },
        ));
        tally(outcome, &mut passed, &mut failed);
    }

    if wanted("cd_scale") {
        let outcome = match scale_spec(&base, args.scale_client_qps) {
            Ok(spec) => runtime.block_on(with_cluster(
                &tools,
                &base.join("scale"),
                spec,
                |env| async move {
                    let result = run_one(
                        "cd_scale",
                        |e| Box::pin(e2e::perf::compute_domain_scale(e)),
                        env,
                        600,
                    )
                    .await;
                    Ok(vec![("cd_scale", result)])
                },
            )),
            Err(err) => Err(err),
        };
        tally(outcome, &mut passed, &mut failed);
    }

    eprintln!("\ne2e: {passed} passed, {} failed", failed.len());
    for (name, err) in &failed {
        eprintln!("  FAILED {name}: {err}");
    }
    if failed.is_empty() && passed > 0 {
        ExitCode::SUCCESS
    } else {
        if passed == 0 && failed.is_empty() {
            eprintln!("e2e: no scenario matched {filters:?}");
        }
        ExitCode::FAILURE
    }
}

fn tally(
    outcome: anyhow::Result<Vec<(&'static str, anyhow::Result<()>)>>,
    passed: &mut usize,
    failed: &mut Vec<(String, String)>,
) {
    match outcome {
        Ok(results) => {
            for (name, result) in results {
                match result {
                    Ok(()) => *passed += 1,
                    Err(err) => failed.push((name.to_owned(), format!("{err:#}"))),
                }
            }
        }
        Err(err) => failed.push(("cluster".to_owned(), format!("{err:#}"))),
    }
}

/// Eight nodes of four GPU generations; the four GB200 trays share one
/// NVLink clique.
fn functional_spec() -> ClusterSpec {
    let nodes = [
        ("h100-0", "h100-sxm-80gb-x8"),
        ("h200-0", "h200-x8"),
        ("a100-0", "a100-40gb-x8-mig"),
        ("gb200-0", "gb200-x4"),
        ("gb200-1", "gb200-x4"),
        ("gb200-2", "gb200-x4"),
        ("gb200-3", "gb200-x4"),
        ("l4-0", "l4-x2"),
    ];
    ClusterSpec {
        nodes: nodes
            .into_iter()
            .map(|(name, profile)| NodeSpec::fake(name, profile))
            .collect(),
        chart_sets: Vec::new(),
        agent_extra: Vec::new(),
        // Two, so a scenario can kill the leader and watch the standby take over.
        controllers: 2,
        client_qps: None,
    }
}

/// One A100 node on the fake backend and one, with the same profile, on the
/// NVML backend over the mock NVML library; time-slicing enabled.
fn mock_nvml_spec() -> ClusterSpec {
    let profile = "a100-40gb-x8-mig";
    let mut nvml = NodeSpec::fake(e2e::mocknvml::NVML_NODE, profile);
    nvml.mock_nvml = true;
    ClusterSpec {
        nodes: vec![NodeSpec::fake(e2e::mocknvml::FAKE_NODE, profile), nvml],
        chart_sets: Vec::new(),
        // MPS daemons share the agent's /dev/shm here: the e2e does not
        // assume it may mount (crates/agent/tests/mps.rs covers the tmpfs).
        agent_extra: vec![
            "--feature-gates=TimeSlicingSettings=true,MPSSupport=true,NVMLDeviceHealthCheck=true"
                .into(),
            "--mps-private-shm=false".into(),
        ],
        controllers: 0,
        client_qps: None,
    }
}

/// One H100 node on the NVML backend over the mock library, with DynamicMIG.
fn dynamic_mig_spec() -> ClusterSpec {
    let mut node = NodeSpec::fake(e2e::mocknvml::DYNAMIC_NODE, "h100-sxm-80gb-x8");
    node.mock_nvml = true;
    ClusterSpec {
        nodes: vec![node],
        chart_sets: Vec::new(),
        agent_extra: vec!["--feature-gates=DynamicMIG=true".into()],
        controllers: 0,
        client_qps: None,
    }
}

/// One H100 node on the mock NVML library with PassthroughSupport and
/// DeviceMetadata; its sysfs is a fake PCI tree the scenario runs a fake
/// kernel for.
fn passthrough_spec() -> ClusterSpec {
    let mut node = NodeSpec::fake(e2e::mocknvml::PASSTHROUGH_NODE, "h100-sxm-80gb-x8");
    node.mock_nvml = true;
    ClusterSpec {
        nodes: vec![node],
        chart_sets: Vec::new(),
        agent_extra: vec!["--feature-gates=PassthroughSupport=true,DeviceMetadata=true".into()],
        controllers: 0,
        client_qps: None,
    }
}

/// Eight 16-GPU nodes: room for 100 single-GPU pods at once.
fn latency_spec() -> ClusterSpec {
    let profile = repo_root().join("e2e/profiles/l4-x16.yaml");
    ClusterSpec {
        nodes: (0..8)
            .map(|i| NodeSpec::fake(&format!("l4x16-{i}"), &profile.display().to_string()))
            .collect(),
        chart_sets: Vec::new(),
        agent_extra: Vec::new(),
        controllers: 0,
        client_qps: None,
    }
}

/// 64 GB200 trays in four racks of 16, each rack its own NVLink clique (an
/// IMEX domain spans at most 18 nodes), one controller: the ComputeDomain
/// scale run. The rack profiles are the built-in `gb200-x4` with the
/// clique ID changed, written next to the run directory.
fn scale_spec(base: &std::path::Path, client_qps: u32) -> anyhow::Result<ClusterSpec> {
    let tray = std::fs::read_to_string(repo_root().join("crates/gpu/profiles/gb200-x4.yaml"))?;
    anyhow::ensure!(
        tray.contains("clique_id: 1\n"),
        "gb200-x4.yaml no longer has clique_id: 1"
    );
    std::fs::create_dir_all(base)?;
    let mut racks = Vec::new();
    for rack in 0..4 {
        let path = base.join(format!("gb200-rack{rack}.yaml"));
        std::fs::write(
            &path,
            tray.replace("clique_id: 1\n", &format!("clique_id: {}\n", rack + 1)),
        )?;
        racks.push(path.display().to_string());
    }
    Ok(ClusterSpec {
        nodes: (0..64)
            .map(|i| NodeSpec::fake(&format!("tray-{i:02}"), &racks[i / 16]))
            .collect(),
        chart_sets: Vec::new(),
        agent_extra: Vec::new(),
        controllers: 1,
        client_qps: (client_qps > 0).then_some(client_qps),
    })
}

/// Starts a cluster in `dir`, runs `body`, always stops the cluster.
async fn with_cluster<F, Fut>(
    paths: &ToolPaths,
    dir: &std::path::Path,
    spec: ClusterSpec,
    body: F,
) -> anyhow::Result<Vec<(&'static str, anyhow::Result<()>)>>
where
    F: FnOnce(Arc<Env>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<(&'static str, anyhow::Result<()>)>>>,
{
    // A previous run that was killed may have left processes behind.
    if dir.exists() {
        let _ = Cluster::down(dir);
        std::fs::remove_dir_all(dir)?;
    }
    let tools = Tools::locate(paths)?;
    let started = Instant::now();
    let cluster = Cluster::up(tools, dir, spec).await?;
    eprintln!(
        "e2e: cluster of {} nodes up in {:.1}s at {}",
        cluster.spec.nodes.len(),
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    let results = match Env::new(cluster).await {
        Ok(env) => body(Arc::new(env)).await,
        Err(err) => Err(err),
    };
    // A failed stop is its own failure; it does not hide the scenarios'.
    let down = Cluster::down(dir).map_err(|err| ("cluster down", err));
    let mut results = results?;
    if let Err((name, err)) = down {
        results.push((name, Err(err)));
    }
    Ok(results)
}

async fn run_one(name: &str, scenario: Scenario, env: Arc<Env>, secs: u64) -> anyhow::Result<()> {
    eprintln!("e2e: --- {name}");
    let started = Instant::now();
    let task = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(secs),
        scenario(env),
    ));
    let result = match task.await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(anyhow::anyhow!("did not finish within {secs}s")),
        Err(join) => Err(anyhow::anyhow!("panicked: {join}")),
    };
    match &result {
        Ok(()) => eprintln!("e2e: ok {name} ({:.1}s)", started.elapsed().as_secs_f64()),
        Err(err) => eprintln!(
            "e2e: FAILED {name} ({:.1}s): {err:#}",
            started.elapsed().as_secs_f64()
        ),
    }
    result
}

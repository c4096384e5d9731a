//! Start-up and supervision of `nvdra-agent`.
//!
//! Order, each step failing start-up with an error naming it:
//! 1. logging, signal handlers (installed first so a SIGTERM during start-up
//!    is not lost);
//! 2. the device backend (NVML under the driver root, or a fake profile) and
//!    the node-wide CDI edits discovered under the driver root;
//! 3. the API client (rate-limited to `--kube-api-qps`/`--kube-api-burst`);
//! 4. the GPU driver (unless `--gpus=false`): checkpoint loaded (a corrupt one is set aside and
//!    reported as a Node Event, never a crash loop), half-prepared claims
//!    rolled back, orphaned CDI specs removed; after a corrupt checkpoint,
//!    claims still in use are rebuilt from the ResourceClaims instead
//!    ([`crate::rebuild`]), before the plugin serves;
//! 5. the compute-domain driver (unless `--compute-domains=false`): IMEX facts
//!    and NVLink clique from the device layer, its own checkpoint and CDI
//!    clean-up, the base CDI spec;
//! 6. one kubelet plugin per driver: DRA socket, then registration socket,
//!    then the ResourceSlice publisher with this node's devices;
//! 7. the HTTP endpoint (`/metrics`, `/livez`, `/readyz` over both plugins) and
//!    the periodic clean-up of GPU claims whose ResourceClaim is gone.
//!
//! The process ends when SIGTERM/SIGINT arrives (sockets removed, clean
//! exit) or when a supervised task fails (non-zero exit, so the kubelet
//! restarts the pod).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use nvdra_api::names::{drivers, field_managers};
use nvdra_api::{FeatureGate, FeatureGates};
use nvdra_gpu::{DriverRoot, FakeBackend, GpuBackend, NvmlBackend, NvmlOptions};
use nvdra_kubelet_plugin::health::HealthState;
use nvdra_kubelet_plugin::resourceslice::{self, CounterLayout};
use nvdra_kubelet_plugin::{BoxError, KubeletPlugin, shutdown_signal};
use prometheus::{Encoder as _, Registry, TextEncoder};

use crate::args::{Args, DeviceBackend};
use crate::cdi::{CdiStore, CommonEdits, CommonOptions, Hooks, RootMapping, Vendor};
use crate::checkpoint::LoadOutcome;
use crate::computedomain::{Cluster, ComputeDomainDriver, ComputeDomainDriverConfig, specs};
use crate::driver::{GpuDriver, GpuDriverConfig};
use crate::events::NodeEvents;
use crate::metrics::Metrics;
use crate::mps::{self, MpsDaemons, MpsOptions};
use nvdra_api::flags::LogFormat;

/// Why the agent could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thread that restarts MPS control daemons could not be started.
    #[error("start the MPS supervisor thread")]
    SpawnMpsSupervisor(#[source] std::io::Error),
    /// Logging could not be set up.
    #[error("set up logging: {0}")]
    InitLogging(String),
    /// The device backend could not be opened.
    #[error("open the {backend} device backend")]
    OpenBackend {
        /// `nvml` or `fake`.
        backend: &'static str,
        /// The cause.
        #[source]
        source: nvdra_gpu::Error,
    },
    /// `--fake-profile` names neither a built-in profile nor a file.
    #[error(
        "fake profile {name:?} is neither a built-in profile ({}) nor a file",
        builtin_profiles()
    )]
    UnknownFakeProfile {
        /// The value of `--fake-profile`.
        name: String,
    },
    /// The node-wide CDI edits could not be built from the driver root.
    #[error("discover the driver's files for CDI")]
    DiscoverCdi(#[source] crate::cdi::Error),
    /// No usable API client configuration.
    #[error("configure the Kubernetes client")]
    KubeConfig(#[source] BoxError),
    /// The metrics registry rejected a metric.
    #[error("register metrics")]
    RegisterMetrics(#[source] prometheus::Error),
    /// The GPU driver could not start.
    #[error("start the gpu.nvidia.com driver")]
    StartDriver(#[source] crate::driver::Error),
    /// The compute-domain driver could not start.
    #[error("start the compute-domain.nvidia.com driver")]
    StartComputeDomainDriver(#[source] crate::driver::Error),
    /// Both drivers are turned off.
    #[error("nothing to serve: both --gpus and --compute-domains are false")]
    NoDriver,
    /// The IMEX facts or the NVLink clique of the node could not be read.
    #[error("read the node's IMEX channels and NVLink clique")]
    ReadImex(#[source] nvdra_gpu::Error),
    /// NVLink fabric registration failed and `CrashOnNVLinkFabricErrors` is on.
    #[error(
        "NVLink fabric registration did not succeed on {0} (feature gate CrashOnNVLinkFabricErrors)"
    )]
    FabricNotReady(String),
    /// The compute-domain base CDI spec breaks a spec rule.
    #[error("render the compute-domain base CDI spec")]
    RenderBaseSpec(#[source] crate::cdi::SpecError),
    /// The API server's version could not be read.
    #[error("read the API server version")]
    ServerVersion(#[source] BoxError),
    /// The kubelet plugin failed to start or failed while running.
    #[error("kubelet plugin")]
    Plugin(#[source] nvdra_kubelet_plugin::Error),
    /// The node's devices were rejected by the ResourceSlice publisher.
    #[error("publish the node's devices")]
    PublishDevices(#[source] resourceslice::Error),
    /// The HTTP endpoint could not be bound or failed.
    #[error("serve HTTP on {addr}")]
    ServeHttp {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGTERM/SIGINT or a failure.
pub async fn run(args: Args) -> Result<(), Error> {
    init_logging(&args)?;
    let shutdown = shutdown_signal().map_err(Error::Plugin)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %args.node_name,
        feature_gates = %args.feature_gates,
        device_backend = ?args.device_backend,
        args = ?args,
        "starting nvdra-agent"
    );
    if !args.gpus && !args.compute_domains {
        return Err(Error::NoDriver);
    }

    let backend = open_backend(&args)?;
    let hooks = match &args.nvidia_cdi_hook_path {
        Some(path) => Hooks::CdiHook { path: path.clone() },
        None => Hooks::Disabled,
    };
    let common_edits = CommonEdits::discover(
        backend.as_ref(),
        RootMapping::new(&args.container_driver_root, &args.nvidia_driver_root),
        &CommonOptions {
            hooks,
            env: Vec::new(),
        },
    )
    .map_err(Error::DiscoverCdi)?;

    let client = kube_client(&args).await?;
    let registry = Registry::new();
    register_process_metrics(&registry)?;
    let first_driver = if args.gpus {
        drivers::GPU
    } else {
        drivers::COMPUTE_DOMAIN
    };
    let metrics =
        Metrics::new(&registry, first_driver, &args.node_name).map_err(Error::RegisterMetrics)?;

    let version = client
        .apiserver_version()
        .await
        .map_err(|err| Error::ServerVersion(err.into()))?;
    let layout = CounterLayout::for_server_version(&version)
        .map_err(|err| Error::ServerVersion(err.into()))?;

    let gpu = if args.gpus {
        Some(
            start_gpu_plugin(
                &args,
                Arc::clone(&backend),
                common_edits.clone(),
                &client,
                metrics.clone(),
                layout,
            )
            .await?,
        )
    } else {
        None
    };
    let compute_domain = if args.compute_domains {
        // The slice metrics follow one publisher (they carry no driver label): the GPU
        // driver's when it runs.
        let follow_slices = !args.gpus;
        Some(start_compute_domain_plugin(
            &args,
            backend.as_ref(),
            &common_edits,
            &client,
            metrics.for_driver(drivers::COMPUTE_DOMAIN),
            layout,
            follow_slices,
        )?)
    } else {
        None
    };

    let mut health = Vec::new();
    if let Some(plugin) = &gpu {
        health.push(HealthState {
            liveness: plugin.liveness(),
            readiness: plugin.readiness(),
        });
    }
    if let Some(plugin) = &compute_domain {
        health.push(HealthState {
            liveness: plugin.liveness(),
            readiness: plugin.readiness(),
        });
    }
    let http = args.http_endpoint.0.map(|addr| {
        let router = combined_health_router(health)
            .route(&args.metrics_path, get(move || scrape(registry.clone())));
        serve_http(addr, router)
    });
    let http = async move {
        match http {
            Some(server) => server.await,
            None => std::future::pending().await,
        }
    };

    // One shutdown signal for both plugins: each removes its own sockets.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let gpu_run = {
        let stop = stopped();
        async move {
            match gpu {
                Some(plugin) => plugin.run(stop).await.map_err(Error::Plugin),
                None => Ok(()),
            }
        }
    };
    let compute_domain_run = {
        let stop = stopped();
        async move {
            match compute_domain {
                Some(plugin) => plugin.run(stop).await.map_err(Error::Plugin),
                None => Ok(()),
            }
        }
    };
    tokio::select! {
        result = async { tokio::try_join!(gpu_run, compute_domain_run).map(|_| ()) } => result,
        result = http => result,
    }
}

/// Starts the `gpu.nvidia.com` driver and builds its plugin (not yet serving).
async fn start_gpu_plugin(
    args: &Args,
    backend: Arc<dyn GpuBackend>,
    common_edits: CommonEdits,
    client: &kube::Client,
    metrics: Metrics,
    layout: CounterLayout,
) -> Result<KubeletPlugin<GpuDriver>, Error> {
    let plugin_data_dir = args.kubelet_plugins_directory_path.join(drivers::GPU);
    let mps = mps_daemons(args, &plugin_data_dir);
    let (driver, startup) = GpuDriver::start(GpuDriverConfig {
        node_name: args.node_name.clone(),
        backend,
        plugin_data_dir: plugin_data_dir.clone(),
        cdi: CdiStore::new(&args.cdi_root),
        common_edits,
        gates: args.feature_gates.clone(),
        boot_id: read_boot_id(&args.boot_id_path),
        metrics: metrics.clone(),
        mps: mps.clone(),
        vfio: args
            .feature_gates
            .enabled(FeatureGate::PassthroughSupport)
            .then(|| crate::driver::vfio::VfioHost {
                sysfs_root: args.sysfs_root.clone(),
                proc_root: args.proc_root.clone(),
                dev_root: std::path::PathBuf::from("/"),
                budget: crate::driver::vfio::BIND_BUDGET,
            }),
        health: args
            .feature_gates
            .enabled(FeatureGate::NVMLDeviceHealthCheck)
            .then(|| {
                let mut options = crate::driver::HealthOptions::default();
                options
                    .ignored_xids
                    .extend(args.additional_xids_to_ignore.iter().copied());
                options
            }),
    })
    .map_err(Error::StartDriver)?;
    let driver = Arc::new(driver);
    if let Some(daemons) = mps {
        supervise_mps(daemons)?;
    }
    tracing::info!(
        rolled_back = startup.rolled_back.len(),
        orphan_specs_removed = startup.orphan_specs_removed,
        "driver state recovered"
    );
    let events = NodeEvents::new(
        client.clone(),
        field_managers::AGENT,
        args.pod_uid.clone(),
        &args.node_name,
        None,
    );
    // Best effort and off the start-up path: the recovery already happened.
    let checkpoint = startup.checkpoint.clone();
    tokio::spawn(async move { events.checkpoint_loaded(&checkpoint).await });
    if matches!(startup.checkpoint, LoadOutcome::Corrupt { .. })
        && !startup.unaccounted_specs.is_empty()
    {
        crate::rebuild::rebuild_after_corruption(&driver, client, &startup.unaccounted_specs).await;
    }

    let mut builder = KubeletPlugin::builder(drivers::GPU, Arc::clone(&driver))
        .registrar_dir(&args.kubelet_registrar_directory_path)
        .plugin_data_dir(&plugin_data_dir)
        .rolling_update(args.pod_uid.clone().unwrap_or_default())
        .kube_client(client.clone())
        .resource_slices(
            client.clone(),
            resourceslice::Config::new(
                drivers::GPU,
                &args.node_name,
                field_managers::AGENT,
                layout,
            ),
        )
        .critical_task(
            "claim-cleanup",
            cleanup_loop(Arc::clone(&driver), client.clone(), args.cleanup_interval),
        );
    if let Some(feed) = driver.health_feed() {
        builder = builder.device_health(feed);
    }
    if args
        .feature_gates
        .enabled(FeatureGate::NVMLDeviceHealthCheck)
    {
        builder = builder.critical_task(
            "health-clear-requests",
            clear_health_on_request(Arc::clone(&driver), client.clone(), args.node_name.clone()),
        );
    }
    let plugin = builder.build().map_err(Error::Plugin)?;
    if let Some(publisher) = plugin.slice_publisher() {
        // Not critical: without it only the slice metrics go stale.
        let status = publisher.watch_status();
        tokio::spawn(async move {
            crate::metrics::follow_slice_status(status, metrics).await;
            tracing::info!("ResourceSlice publisher stopped; slice metrics no longer update");
        });
        driver
            .set_publisher(publisher.clone())
            .map_err(Error::PublishDevices)?;
        driver.watch_health().map_err(Error::StartDriver)?;
    }
    Ok(plugin)
}

/// Clears device health taints when the Node's
/// [`crate::health::CLEAR_ANNOTATION`] changes (with
/// `NVMLDeviceHealthCheck`). It reads its own Node every
/// [`HEALTH_CLEAR_POLL`]: the agent may get its Node, not watch Nodes.
async fn clear_health_on_request(
    driver: Arc<GpuDriver>,
    client: kube::Client,
    node: String,
) -> Result<(), BoxError> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let mut ticker = tokio::time::interval(HEALTH_CLEAR_POLL);
    loop {
        ticker.tick().await;
        let request = match nodes.get_opt(&node).await {
            Ok(found) => found.and_then(|n| {
                n.metadata
                    .annotations
                    .and_then(|mut a| a.remove(crate::health::CLEAR_ANNOTATION))
            }),
            Err(err) => {
                tracing::warn!(error = %nvdra_kubelet_plugin::error::error_chain(&err), "cannot read the Node for health clear requests; retrying");
                continue;
            }
        };
        if let Some(request) = request {
            let driver = Arc::clone(&driver);
            let _ = tokio::task::spawn_blocking(move || driver.clear_health_taints(&request)).await;
        }
    }
}

/// How often the agent looks for a health clear request on its Node.
const HEALTH_CLEAR_POLL: Duration = Duration::from_secs(5);

/// Starts the `compute-domain.nvidia.com` driver and builds its plugin (not yet serving).
fn start_compute_domain_plugin(
    args: &Args,
    backend: &dyn GpuBackend,
    common_edits: &CommonEdits,
    client: &kube::Client,
    metrics: Metrics,
    layout: CounterLayout,
    follow_slices: bool,
) -> Result<KubeletPlugin<ComputeDomainDriver>, Error> {
    let imex = backend.imex().map_err(Error::ReadImex)?;
    let clique_id = node_clique(backend, &args.feature_gates)?;
    let base_spec = specs::render_base_spec(
        common_edits.edits(),
        &specs::imex_binary_mounts(&args.container_driver_root, &args.nvidia_driver_root),
    )
    .map_err(Error::RenderBaseSpec)?;
    let plugin_data_dir = args
        .kubelet_plugins_directory_path
        .join(drivers::COMPUTE_DOMAIN);
    let (driver, startup) = ComputeDomainDriver::start(ComputeDomainDriverConfig {
        node_name: args.node_name.clone(),
        plugin_data_dir: plugin_data_dir.clone(),
        cdi: CdiStore::for_vendor(&args.cdi_root, Vendor::COMPUTE_DOMAIN),
        base_spec,
        imex,
        clique_id,
        gates: args.feature_gates.clone(),
        boot_id: read_boot_id(&args.boot_id_path),
        metrics: metrics.clone(),
        cluster: Cluster::new(client.clone(), &args.namespace, &args.node_name),
        readiness_timeout: args.daemon_ready_timeout,
    })
    .map_err(Error::StartComputeDomainDriver)?;
    tracing::info!(
        rolled_back = startup.rolled_back.len(),
        orphan_specs_removed = startup.orphan_specs_removed,
        "compute-domain driver state recovered"
    );
    let driver = Arc::new(driver);
    // Serialization off: a channel claim waiting for its daemon must not hold up the daemon's
    // own claim; the driver takes the node lock around each checkpoint phase itself.
    let plugin = KubeletPlugin::builder(drivers::COMPUTE_DOMAIN, Arc::clone(&driver))
        .registrar_dir(&args.kubelet_registrar_directory_path)
        .plugin_data_dir(&plugin_data_dir)
        .rolling_update(args.pod_uid.clone().unwrap_or_default())
        .serialize(false)
        .kube_client(client.clone())
        .critical_task(
            "claim-cleanup",
            cleanup_loop(Arc::clone(&driver), client.clone(), args.cleanup_interval),
        )
        .resource_slices(
            client.clone(),
            resourceslice::Config::new(
                drivers::COMPUTE_DOMAIN,
                &args.node_name,
                field_managers::AGENT,
                layout,
            ),
        )
        .build()
        .map_err(Error::Plugin)?;
    if let Some(publisher) = plugin.slice_publisher() {
        if follow_slices {
            let status = publisher.watch_status();
            tokio::spawn(async move {
                crate::metrics::follow_slice_status(status, metrics).await;
            });
        }
        publisher
            .publish(driver.node_resources())
            .map_err(Error::PublishDevices)?;
    }
    Ok(plugin)
}

/// The node's NVLink clique. A fabric whose registration did not succeed is a start-up error
/// with `CrashOnNVLinkFabricErrors` (as upstream), else the node is treated as outside any
/// clique, with a warning.
fn node_clique(backend: &dyn GpuBackend, gates: &FeatureGates) -> Result<Option<String>, Error> {
    let inventory = backend.inventory().map_err(Error::ReadImex)?;
    let clique = nvdra_gpu::node_clique_id(&inventory).map_err(Error::ReadImex)?;
    let unready: Vec<String> = inventory
        .gpus
        .iter()
        .filter_map(|gpu| {
            let fabric = gpu.fabric.as_ref()?;
            (fabric.clique_id().is_some() && !fabric.is_ready()).then(|| {
                format!(
                    "{} (state {}, status {})",
                    gpu.info.uuid, fabric.state, fabric.status
                )
            })
        })
        .collect();
    if unready.is_empty() {
        return Ok(clique);
    }
    let detail = unready.join(", ");
    if gates.enabled(FeatureGate::CrashOnNVLinkFabricErrors) {
        return Err(Error::FabricNotReady(detail));
    }
    tracing::warn!(gpus = %detail, "NVLink fabric registration incomplete; the node takes part in no IMEX domain");
    Ok(None)
}

/// `/livez` and `/readyz` over every running plugin: live when all are, ready when all are;
/// failing readiness checks are listed per plugin.
fn combined_health_router(states: Vec<HealthState>) -> Router {
    let states = Arc::new(states);
    let live = Arc::clone(&states);
    Router::new()
        .route(
            "/livez",
            get(move || {
                let states = Arc::clone(&live);
                async move {
                    if states.iter().all(|s| s.liveness.is_alive()) {
                        (axum::http::StatusCode::OK, "ok\n".to_owned())
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not running\n".to_owned(),
                        )
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let states = Arc::clone(&states);
                async move {
                    if !states.iter().all(|s| s.liveness.is_alive()) {
                        return (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not running\n".to_owned(),
                        );
                    }
                    let failing: String = states
                        .iter()
                        .filter_map(|s| s.readiness.status().err())
                        .flatten()
                        .map(|(name, reason)| format!("{name}: {reason}\n"))
                        .collect();
                    if failing.is_empty() {
                        (axum::http::StatusCode::OK, "ok\n".to_owned())
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, failing)
                    }
                }
            }),
        )
}

fn init_logging(args: &Args) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|err| Error::InitLogging(format!("--log-level {:?}: {err}", args.log_level)))?;
    // Colour only for a person at a terminal; pods and CI get plain lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|err| Error::InitLogging(err.to_string()))
}

/// The MPS control daemons when `MPSSupport` is on; `None` (MPS claims then
/// fail naming why) when the driver root has no `nvidia-cuda-mps-control`.
fn mps_daemons(args: &Args, plugin_data_dir: &Path) -> Option<Arc<MpsDaemons>> {
    if !args.feature_gates.enabled(FeatureGate::MPSSupport) {
        return None;
    }
    let root = match DriverRoot::discover(&args.container_driver_root) {
        Ok(root) => root,
        Err(err) => {
            tracing::warn!(error = %nvdra_kubelet_plugin::error::error_chain(&err), "MPSSupport is on but the driver root has no driver; MPS claims will fail");
            return None;
        }
    };
    let Some(control) = root.find_binary(mps::CONTROL_BINARY) else {
        tracing::warn!(
            root = %root.root.display(),
            "MPSSupport is on but the driver root has no {}; MPS claims will fail",
            mps::CONTROL_BINARY
        );
        return None;
    };
    let library_dir = root
        .nvml_library
        .parent()
        .map_or_else(|| root.root.clone(), Path::to_owned);
    Some(Arc::new(MpsDaemons::new(MpsOptions {
        control,
        library_dir,
        root: plugin_data_dir.join("mps"),
        proc_root: args.proc_root.clone(),
        private_shm: args.mps_private_shm,
        start_timeout: MPS_START_TIMEOUT,
    })))
}

/// How long an MPS control daemon may take to start (upstream waits 10 s
/// for its Deployment; well inside the kubelet's Prepare budget).
const MPS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often dead MPS control daemons are looked for.
const MPS_SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Restarts MPS control daemons that die, on a thread of its own (a
/// restart blocks while the daemon starts).
fn supervise_mps(daemons: Arc<MpsDaemons>) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("nvdra-mps-supervisor".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(MPS_SUPERVISE_EVERY);
                daemons.supervise();
            }
        })
        .map(|_| ())
        .map_err(Error::SpawnMpsSupervisor)
}

fn builtin_profiles() -> String {
    let names: Vec<&str> = nvdra_gpu::fake::BUILTIN_PROFILES
        .iter()
        .map(|(name, _)| *name)
        .collect();
    names.join(", ")
}

fn open_backend(args: &Args) -> Result<Arc<dyn GpuBackend>, Error> {
    match args.device_backend {
        DeviceBackend::Nvml => {
            let mut options = NvmlOptions::new(&args.container_driver_root);
            options.sysfs_root.clone_from(&args.sysfs_root);
            options.proc_root.clone_from(&args.proc_root);
            let backend = NvmlBackend::new(options).map_err(|source| Error::OpenBackend {
                backend: "nvml",
                source,
            })?;
            Ok(Arc::new(backend))
        }
        DeviceBackend::Fake => {
            let name = args.fake_profile.clone().unwrap_or_default();
            let loaded = match FakeBackend::builtin(&name) {
                Some(loaded) => loaded,
                None if Path::new(&name).is_file() => FakeBackend::from_file(&name),
                None => return Err(Error::UnknownFakeProfile { name }),
            };
            let mut backend = loaded.map_err(|source| Error::OpenBackend {
                backend: "fake",
                source,
            })?;
            if let Some(dev_root) = &args.fake_dev_root {
                backend = backend.with_dev_root(dev_root);
            }
            Ok(Arc::new(backend))
        }
    }
}

/// A client whose requests are limited to `qps` on average with bursts of
/// `burst`: a fixed window of `burst` requests per `burst / qps` seconds,
/// which has client-go's average rate and burst size.
async fn kube_client(args: &Args) -> Result<kube::Client, Error> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|err| Error::KubeConfig(err.into()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|err| Error::KubeConfig(err.into()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|err| Error::KubeConfig(err.into()))?,
    };
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|err| Error::KubeConfig(err.into()))?;
    // QPS 0 (or less) turns the limit off; a zero-length window would panic.
    if args.kube_api_qps <= 0.0 {
        return Ok(builder.build());
    }
    let burst = u64::from(args.kube_api_burst.max(1));
    let window = Duration::from_secs_f64(burst as f64 / args.kube_api_qps);
    Ok(builder
        .with_layer(&tower::limit::RateLimitLayer::new(burst, window))
        .build())
}

fn register_process_metrics(registry: &Registry) -> Result<(), Error> {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    registry
        .register(Box::new(collector))
        .map_err(Error::RegisterMetrics)
}

async fn scrape(registry: Registry) -> (axum::http::StatusCode, String) {
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        Ok(()) => (
            axum::http::StatusCode::OK,
            String::from_utf8_lossy(&buffer).into_owned(),
        ),
        Err(err) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {err}\n"),
        ),
    }
}

async fn serve_http(addr: std::net::SocketAddr, router: Router) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::ServeHttp { addr, source })?;
    tracing::info!(%addr, "serving /metrics, /livez and /readyz");
    axum::serve(listener, router)
        .await
        .map_err(|source| Error::ServeHttp { addr, source })
}

/// The boot ID, or empty (checkpoint boot checks off) when unreadable.
fn read_boot_id(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(id) => id.trim().to_owned(),
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "cannot read the boot ID; prepared claims will not be checked against reboots");
            String::new()
        }
    }
}

/// Cleans up claims whose ResourceClaim is gone, now and every `interval`.
async fn cleanup_loop<T: crate::cleanup::CleanupTarget>(
    driver: Arc<T>,
    client: kube::Client,
    interval: Duration,
) -> Result<(), BoxError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let report = crate::cleanup::cleanup_stale_claims(driver.as_ref(), &client).await;
        tracing::debug!(?report, "stale-claim clean-up pass done");
    }
}

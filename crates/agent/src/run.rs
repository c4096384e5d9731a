//! Start-up and supervision of `nvdra-agent`.
//!
//! Order, each step failing start-up with an error naming it:
//! 1. logging, signal handlers (installed first so a SIGTERM during start-up
//!    is not lost);
//! 2. the device backend (NVML under the driver root, or a fake profile) and
//!    the node-wide CDI edits discovered under the driver root;
//! 3. the API client (rate-limited to `--kube-api-qps`/`--kube-api-burst`);
//! 4. the GPU driver: checkpoint loaded (a corrupt one is set aside and
//!    reported as a Node Event, never a crash loop), half-prepared claims
//!    rolled back, orphaned CDI specs removed; after a corrupt checkpoint,
//!    claims still in use are rebuilt from the ResourceClaims instead
//!    ([`crate::rebuild`]), before the plugin serves;
//! 5. the kubelet plugin: DRA socket, then registration socket, then the
//!    ResourceSlice publisher with this node's devices;
//! 6. the HTTP endpoint (`/metrics`, `/livez`, `/readyz`) and the periodic
//!    clean-up of claims whose ResourceClaim is gone.
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
use nvdra_gpu::{FakeBackend, GpuBackend, NvmlBackend, NvmlOptions};
use nvdra_kubelet_plugin::health::{self, HealthState};
use nvdra_kubelet_plugin::resourceslice::{self, CounterLayout};
use nvdra_kubelet_plugin::{BoxError, KubeletPlugin, shutdown_signal};
use prometheus::{Encoder as _, Registry, TextEncoder};

use crate::args::{Args, DeviceBackend, LogFormat};
use crate::cdi::{CdiStore, CommonEdits, CommonOptions, Hooks, RootMapping};
use crate::checkpoint::LoadOutcome;
use crate::driver::{GpuDriver, GpuDriverConfig};
use crate::events::NodeEvents;
use crate::metrics::Metrics;

/// Why the agent could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    let metrics =
        Metrics::new(&registry, drivers::GPU, &args.node_name).map_err(Error::RegisterMetrics)?;

    let plugin_data_dir = args.kubelet_plugins_directory_path.join(drivers::GPU);
    let (driver, startup) = GpuDriver::start(GpuDriverConfig {
        node_name: args.node_name.clone(),
        backend,
        plugin_data_dir: plugin_data_dir.clone(),
        cdi: CdiStore::new(&args.cdi_root),
        common_edits,
        gates: args.feature_gates.clone(),
        boot_id: read_boot_id(&args.boot_id_path),
        metrics: metrics.clone(),
    })
    .map_err(Error::StartDriver)?;
    let driver = Arc::new(driver);
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
        crate::rebuild::rebuild_after_corruption(&driver, &client, &startup.unaccounted_specs)
            .await;
    }

    let version = client
        .apiserver_version()
        .await
        .map_err(|err| Error::ServerVersion(err.into()))?;
    let layout = CounterLayout::for_server_version(&version)
        .map_err(|err| Error::ServerVersion(err.into()))?;

    let plugin = KubeletPlugin::builder(drivers::GPU, Arc::clone(&driver))
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
            cleanup_loop(Arc::clone(&driver), client, args.cleanup_interval),
        )
        .build()
        .map_err(Error::Plugin)?;
    if let Some(publisher) = plugin.slice_publisher() {
        // Not critical: without it only the slice metrics go stale.
        let status = publisher.watch_status();
        tokio::spawn(async move {
            crate::metrics::follow_slice_status(status, metrics).await;
            tracing::info!("ResourceSlice publisher stopped; slice metrics no longer update");
        });
        publisher
            .publish(driver.node_resources())
            .map_err(Error::PublishDevices)?;
    }

    let http = args.http_endpoint.0.map(|addr| {
        let router = health::router(HealthState {
            liveness: plugin.liveness(),
            readiness: plugin.readiness(),
        })
        .route(&args.metrics_path, get(move || scrape(registry.clone())));
        serve_http(addr, router)
    });
    let http = async move {
        match http {
            Some(server) => server.await,
            None => std::future::pending().await,
        }
    };

    tokio::select! {
        result = plugin.run(shutdown) => result.map_err(Error::Plugin),
        result = http => result,
    }
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
            let backend = NvmlBackend::new(NvmlOptions::new(&args.container_driver_root)).map_err(
                |source| Error::OpenBackend {
                    backend: "nvml",
                    source,
                },
            )?;
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
    let burst = u64::from(args.kube_api_burst.max(1));
    let qps = if args.kube_api_qps > 0.0 {
        args.kube_api_qps
    } else {
        f64::MAX
    };
    let window = Duration::from_secs_f64(burst as f64 / qps);
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|err| Error::KubeConfig(err.into()))?;
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
async fn cleanup_loop(
    driver: Arc<GpuDriver>,
    client: kube::Client,
    interval: Duration,
) -> Result<(), BoxError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let report = crate::cleanup::cleanup_stale_claims(&driver, &client).await;
        tracing::debug!(?report, "stale-claim clean-up pass done");
    }
}

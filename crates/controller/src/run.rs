//! Start-up, watches, leader election and supervision of `nvdra-controller`.
//!
//! Order: logging; API client (rate-limited to `--kube-api-qps`/`--kube-api-burst`); metrics
//! and the HTTP endpoint (served by leader and standby alike); then, with
//! `--leader-election-enabled`, the Lease elector, and the controller once this replica leads.
//!
//! The controller is kube-runtime's `applier` fed by six watches, each with a reflector store
//! the reconciles read instead of listing: ComputeDomains (cluster-wide, decoded through
//! `DeserializeGuard` so a malformed object cannot stall the watch), and, labelled with
//! `resource.nvidia.com/computeDomain`, cliques, daemon pods, daemon DaemonSets and daemon claim
//! templates in the driver namespace, plus workload claim templates cluster-wide. A child's
//! event is mapped to its domain through the domain UID label; a child whose domain is not
//! cached wakes the orphan sweep instead.
//!
//! Failure modes:
//! - Lost leadership ends [`run`] with [`Error::LeaseLost`] at once: the controller future is
//!   dropped mid-flight (every reconcile step is idempotent) and the process exits non-zero,
//!   so the Deployment restarts it as a standby.
//! - SIGTERM/SIGINT: the elector releases the Lease and [`run`] returns `Ok`.
//! - Watch errors are retried with kube's default backoff and logged; they never end the
//!   process. The HTTP server failing to bind does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::{StreamExt as _, TryStreamExt as _, future, stream::BoxStream};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Config};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, applier, watcher};
use kube::{Api, Resource};
use nvdra_api::names::{compute_domain_target, field_managers, labels};
use nvdra_api::{ComputeDomain, ComputeDomainClique};
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::sync::{Notify, watch};

use crate::args::{Args, daemon_log_filter};
use crate::cleanup;
use crate::computedomain::{error_policy, reconcile};
use crate::context::{Context, Stores, domain_uid_label};
use crate::daemonset::DaemonSettings;
use crate::error::Error;
use crate::leader::{self, Elector, Timing};
use crate::metrics::Metrics;
use nvdra_api::flags::LogFormat;

type Domain = DeserializeGuard<ComputeDomain>;
type Queue = BoxStream<'static, Result<ObjectRef<Domain>, watcher::Error>>;

/// Runs the controller until a signal (`Ok`) or a failure.
pub async fn run(args: Args) -> Result<(), Error> {
    args.validate().map_err(Error::InvalidFlags)?;
    init_logging(&args)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        feature_gates = %args.feature_gates,
        args = ?args,
        "starting nvdra-controller"
    );
    let (client, lease_client) = kube_client(&args).await?;
    let registry = Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .map_err(Error::RegisterMetrics)?;
    let metrics = Metrics::new(&registry).map_err(Error::RegisterMetrics)?;

    let (leading_tx, leading_rx) = watch::channel(!args.leader_election_enabled);
    let (healthy_tx, healthy_rx) = watch::channel(false);
    let (synced_tx, synced_rx) = watch::channel(false);
    let readiness = Readiness {
        election: args.leader_election_enabled,
        leading: leading_rx.clone(),
        healthy: healthy_rx,
        synced: synced_rx,
    };
    let http = serve(&args, registry, readiness);

    let settings = DaemonSettings {
        namespace: args.namespace.clone(),
        image: args.image_name.clone(),
        image_pull_secrets: args.cd_daemon_image_pull_secret_names.clone(),
        max_nodes_per_imex_domain: args.max_nodes_per_imex_domain,
        feature_gates: args.feature_gates.to_string(),
        log_filter: daemon_log_filter(&args.log_verbosity_cd_daemon),
        log_format: args.log_format,
        metrics_port: (args.cd_daemon_metrics_port != 0).then_some(args.cd_daemon_metrics_port),
        priority_class_name: Some(args.cd_daemon_priority_class_name.clone())
            .filter(|name| !name.is_empty()),
    };
    let identity = leader::identity(&args.pod_name);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: field_managers::CONTROLLER.to_owned(),
            instance: Some(identity.clone()),
        },
    );
    let controller = {
        let metrics = metrics.clone();
        let mut leading = leading_rx;
        let client = client.clone();
        let options = ControllerOptions {
            concurrency: args.reconcile_concurrency,
            sweep_interval: args.orphan_sweep_interval,
        };
        async move {
            // Nothing is watched or written before this replica leads.
            leading
                .wait_for(|l| *l)
                .await
                .map_err(|_| Error::ControllerStopped)?;
            metrics.set_leader(true);
            controller(client, settings, metrics, recorder, synced_tx, options).await
        }
    };
    let shutdown = shutdown_signal()?;

    if !args.leader_election_enabled {
        return tokio::select! {
            result = controller => result,
            result = http => result,
            () = shutdown => Ok(()),
        };
    }
    let mut elector = Elector::new(
        lease_client,
        &args.lease_lock_namespace,
        &args.lease_lock_name,
        identity,
        Timing {
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        },
    );
    tracing::info!(identity = elector.identity(), "waiting for leadership");
    let result = tokio::select! {
        result = elector.run(&leading_tx, &healthy_tx) => result,
        result = controller => result,
        result = http => result,
        () = shutdown => Ok(()),
    };
    metrics.set_leader(false);
    match &result {
        Ok(()) => elector.release().await,
        Err(err) => tracing::error!(error = %err.chain(), "stopping"),
    }
    result
}

struct ControllerOptions {
    concurrency: u16,
    sweep_interval: Duration,
}

async fn controller(
    client: kube::Client,
    settings: DaemonSettings,
    metrics: Metrics,
    recorder: Recorder,
    synced: watch::Sender<bool>,
    options: ControllerOptions,
) -> Result<(), Error> {
    let namespace = settings.namespace.clone();
    let sweep_wake = Arc::new(Notify::new());
    let labelled = watcher::Config::default().labels(labels::COMPUTE_DOMAIN);

    let (domains, writer) = reflector::store::<Domain>();
    let domain_events: Queue = watcher(
        Api::<Domain>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .touched_objects()
    .map_ok(|cd| ObjectRef::from_obj(&cd))
    .boxed();

    let (cliques, clique_events) = child_watch(
        Api::<DeserializeGuard<ComputeDomainClique>>::namespaced(client.clone(), &namespace),
        labelled.clone(),
        &domains,
        &sweep_wake,
    );
    let (pods, pod_events) = child_watch(
        Api::<Pod>::namespaced(client.clone(), &namespace),
        labelled.clone(),
        &domains,
        &sweep_wake,
    );
    let (daemonsets, daemonset_events) = child_watch(
        Api::<DaemonSet>::namespaced(client.clone(), &namespace),
        labelled,
        &domains,
        &sweep_wake,
    );
    let (daemon_templates, daemon_template_events) = child_watch(
        Api::<ResourceClaimTemplate>::namespaced(client.clone(), &namespace),
        watcher::Config::default().labels(&format!(
            "{}={}",
            labels::COMPUTE_DOMAIN_TARGET,
            compute_domain_target::DAEMON
        )),
        &domains,
        &sweep_wake,
    );
    let (workload_templates, workload_template_events) = child_watch(
        Api::<ResourceClaimTemplate>::all(client.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            labels::COMPUTE_DOMAIN_TARGET,
            compute_domain_target::WORKLOAD
        )),
        &domains,
        &sweep_wake,
    );
    let stores = Stores {
        domains: domains.clone(),
        cliques,
        pods,
        daemonsets,
        daemon_templates,
        workload_templates,
    };
    let queue = futures::stream::select_all([
        domain_events,
        clique_events,
        pod_events,
        daemonset_events,
        daemon_template_events,
        workload_template_events,
    ]);
    let ctx = Arc::new(Context::new(client, settings, metrics, recorder, stores));

    let reconciles = applier(
        |cd, ctx: Arc<Context>| {
            Box::pin(async move {
                // Status computed from half-filled caches would flap; wait for every list.
                ctx.stores
                    .wait_until_ready()
                    .await
                    .map_err(|_| Error::ControllerStopped)?;
                reconcile(cd, ctx).await
            })
        },
        error_policy,
        Arc::clone(&ctx),
        domains,
        queue,
        Config::default()
            .concurrency(options.concurrency)
            .debounce(Duration::from_millis(200)),
    )
    .for_each(|result| {
        match result {
            Ok((object, _)) => tracing::trace!(%object, "reconciled"),
            // Already logged, counted and reported by `reconcile`.
            Err(controller::Error::ReconcilerFailed(..)) => {}
            Err(controller::Error::ObjectNotFound(object)) => {
                tracing::debug!(%object, "object gone before its reconcile")
            }
            Err(err) => tracing::warn!(error = %err, "watch failed; retrying"),
        }
        future::ready(())
    });

    let ready = {
        let ctx = Arc::clone(&ctx);
        async move {
            if ctx.stores.wait_until_ready().await.is_ok() {
                tracing::info!("caches synced");
                let _ = synced.send(true);
            }
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        () = reconciles => Err(Error::ControllerStopped),
        () = sweep_loop(ctx, options.sweep_interval, sweep_wake) => Err(Error::ControllerStopped),
        () = ready => Err(Error::ControllerStopped),
    }
}

/// A reflected watch of a child kind whose events map to the owning domain by UID label.
fn child_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    domains: &Store<Domain>,
    sweep_wake: &Arc<Notify>,
) -> (Store<K>, Queue)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let domains = domains.clone();
    let sweep_wake = Arc::clone(sweep_wake);
    let events = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .try_filter_map(move |child| {
            let target = domain_uid_label(&child).and_then(|uid| {
                let found = domains.find(|d| d.meta().uid.as_deref() == Some(uid));
                if found.is_none() {
                    sweep_wake.notify_one();
                }
                found.map(|d| ObjectRef::from_obj(d.as_ref()))
            });
            future::ready(Ok(target))
        })
        .boxed();
    (store, events)
}

/// Runs the orphan sweep once the caches are ready, then every `interval` and on wake-ups.
async fn sweep_loop(ctx: Arc<Context>, interval: Duration, wake: Arc<Notify>) {
    if ctx.stores.wait_until_ready().await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = wake.notified() => {
                // Children of one deleted domain arrive as a burst of events: sweep once.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        match cleanup::sweep(&ctx).await {
            Ok(report) if report == cleanup::SweepReport::default() => {
                tracing::debug!("orphan sweep found nothing")
            }
            Ok(report) => tracing::info!(?report, "orphan sweep done"),
            Err(err) => {
                tracing::warn!(error = %err.chain(), "orphan sweep failed; retrying at the next one")
            }
        }
    }
}

/// What `/readyz` looks at.
#[derive(Clone)]
struct Readiness {
    election: bool,
    leading: watch::Receiver<bool>,
    healthy: watch::Receiver<bool>,
    synced: watch::Receiver<bool>,
}

impl Readiness {
    /// A leader (or a replica without election) is ready once its caches are synced; a
    /// standby once it reads the Lease successfully.
    fn ready(&self) -> bool {
        if *self.leading.borrow() {
            *self.synced.borrow()
        } else {
            self.election && *self.healthy.borrow()
        }
    }
}

async fn serve(args: &Args, registry: Registry, readiness: Readiness) -> Result<(), Error> {
    let Some(addr) = args.http_endpoint.0 else {
        return std::future::pending().await;
    };
    let router = Router::new()
        .route("/livez", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(|State(readiness): State<Readiness>| async move {
                if readiness.ready() {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(readiness)
        .route(
            &args.metrics_path,
            get(move || {
                let registry = registry.clone();
                async move { scrape(&registry) }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::ServeHttp { addr, source })?;
    tracing::info!(%addr, "serving metrics, /livez and /readyz");
    axum::serve(listener, router)
        .await
        .map_err(|source| Error::ServeHttp { addr, source })
}

fn scrape(registry: &Registry) -> (StatusCode, String) {
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        Ok(()) => (
            StatusCode::OK,
            String::from_utf8_lossy(&buffer).into_owned(),
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {err}\n"),
        ),
    }
}

fn init_logging(args: &Args) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|err| Error::InitLogging(err.into()))?;
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
    installed.map_err(Error::InitLogging)
}

/// A client limited to `qps` on average with bursts of `burst` (a fixed window of `burst`
/// requests per `burst / qps` seconds: client-go's average rate and burst size).
async fn kube_client(args: &Args) -> Result<(kube::Client, kube::Client), Error> {
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
    // The Lease gets its own, unlimited client: a renewal must never queue
    // behind reconciles for the rate limit past the renew deadline.
    let lease =
        kube::Client::try_from(config.clone()).map_err(|err| Error::KubeConfig(err.into()))?;
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|err| Error::KubeConfig(err.into()))?;
    // QPS 0 (or less) turns the limit off; a zero-length window would panic.
    if args.kube_api_qps <= 0.0 {
        return Ok((builder.build(), lease));
    }
    let burst = u64::from(args.kube_api_burst.max(1));
    let window = Duration::from_secs_f64(burst as f64 / args.kube_api_qps);
    Ok((
        builder
            .with_layer(&tower::limit::RateLimitLayer::new(burst, window))
            .build(),
        lease,
    ))
}

/// Resolves on the first SIGTERM or SIGINT; installed before anything else can block.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

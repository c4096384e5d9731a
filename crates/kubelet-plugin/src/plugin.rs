//! [`KubeletPlugin`]: configuration, start-up order, supervision, shutdown.
//!
//! Start-up order in [`KubeletPlugin::run`]:
//! 1. the plugin data directory is created and, in rolling-update mode, the
//!    cross-process lock file opened;
//! 2. the health endpoint (if configured) is bound, answering "not running";
//! 3. the DRA socket is bound (stale file removed, mode 0600) and its server
//!    spawned, serving `v1.DRAPlugin` and `v1beta1.DRAPlugin`;
//! 4. only then the registration socket is bound and served, so the kubelet
//!    never learns an endpoint that does not accept connections;
//! 5. caller-supplied critical tasks and, if configured, the ResourceSlice
//!    publisher are spawned, and liveness is set.
//!
//! ResourceSlices ([`KubeletPluginBuilder::resource_slices`]): the publisher
//! runs as a supervised task; every time the kubelet confirms a registration
//! it is asked to re-sync, because a kubelet (re)start deletes all of the
//! node's slices; `/readyz` carries a `resourceslices` check that is ready
//! once the driver's devices are published and the latest pass succeeded.
//!
//! Shutdown (the caller's future resolves, or a supervised task ends): the
//! registration socket is removed first (the kubelet deregisters), then both
//! servers drain gracefully within the grace period, then the DRA socket is
//! removed. Sockets are removed only if they are still the files this
//! instance bound ([`crate::socket`]).
//!
//! Supervision: every server and critical task runs in a `JoinSet`; any of
//! them ending before shutdown (error, early return or panic) makes `run`
//! tear down and return that failure. Nothing in a spawned task unwraps.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio_stream::wrappers::UnixListenerStream;

use crate::claims::ClaimReader;
use crate::dra::{DraCore, DraV1, DraV1beta1};
use crate::driver::DraDriver;
use crate::error::{BoxError, Error, error_chain};
use crate::health::{self, HealthState, Liveness, Readiness, ReadinessCheck};
use crate::proto::health_v1alpha1::dra_resource_health_server::DraResourceHealthServer;
use crate::proto::registration::registration_server::RegistrationServer;
use crate::proto::{dra_v1, dra_v1beta1};
use crate::registration::{self, RegistrationService, RegistrationState};
use crate::resource_health;
use crate::resourceslice::{self, Publisher, PublisherTask};
use crate::serialize::Serializer;
use crate::socket::{self, SocketFile};

/// Default directory the kubelet watches for registration sockets.
pub const KUBELET_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";

/// Default parent of per-driver plugin data directories.
pub const KUBELET_PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";

/// Default time servers get to finish in-flight calls at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default bound on reading one ResourceClaim during Prepare; well inside the
/// kubelet's 45 s call deadline.
pub const DEFAULT_CLAIM_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

type CriticalTask = (String, BoxFuture<'static, Result<(), BoxError>>);

enum HealthEndpoint {
    Addr(SocketAddr),
    Listener(std::net::TcpListener),
}

/// Configures a [`KubeletPlugin`]; see [`KubeletPlugin::builder`].
pub struct KubeletPluginBuilder<D> {
    driver_name: String,
    driver: Arc<D>,
    registrar_dir: PathBuf,
    plugin_data_dir: Option<PathBuf>,
    rolling_update_uid: Option<String>,
    serialize: bool,
    claim_reader: Option<Arc<dyn ClaimReader>>,
    health: Option<HealthEndpoint>,
    readiness: Readiness,
    shutdown_grace: Duration,
    claim_lookup_timeout: Duration,
    critical_tasks: Vec<CriticalTask>,
    slices: Option<(kube::Client, resourceslice::Config)>,
    device_health: Option<resource_health::HealthFeed>,
}

impl<D: DraDriver> KubeletPluginBuilder<D> {
    /// The directory the kubelet watches for registration sockets
    /// (default [`KUBELET_REGISTRY_DIR`]). Must exist, be absolute and be
    /// the same path inside and outside the container.
    pub fn registrar_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.registrar_dir = dir.into();
        self
    }

    /// The directory for the DRA socket and the lock file (default
    /// `/var/lib/kubelet/plugins/<driver>`). Created if missing. Must be
    /// absolute, the same path on the host (the kubelet dials it), and not
    /// shared with other drivers.
    pub fn plugin_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.plugin_data_dir = Some(dir.into());
        self
    }

    /// Enables rolling updates with this pod UID (from the downward API):
    /// sockets get per-pod names and, with serialization, calls are also
    /// serialized across processes by a file lock. An empty UID disables it.
    /// Needs kubelet 1.33 or newer.
    pub fn rolling_update(mut self, pod_uid: impl Into<String>) -> Self {
        let uid = pod_uid.into();
        self.rolling_update_uid = (!uid.is_empty()).then_some(uid);
        self
    }

    /// Whether Prepare/Unprepare calls are serialized (default `true`).
    /// Turn off only if the driver does its own locking.
    pub fn serialize(mut self, serialize: bool) -> Self {
        self.serialize = serialize;
        self
    }

    /// Where ResourceClaims are read from during Prepare. Required.
    pub fn claim_reader(mut self, reader: impl ClaimReader) -> Self {
        self.claim_reader = Some(Arc::new(reader));
        self
    }

    /// Reads ResourceClaims with this client (`resource.k8s.io/v1`).
    pub fn kube_client(self, client: kube::Client) -> Self {
        self.claim_reader(client)
    }

    /// Serves `/livez` and `/readyz` on this address.
    pub fn health_addr(mut self, addr: SocketAddr) -> Self {
        self.health = Some(HealthEndpoint::Addr(addr));
        self
    }

    /// Serves `/livez` and `/readyz` on an already bound listener (for tests
    /// that bind port 0 and need to know the port).
    pub fn health_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.health = Some(HealthEndpoint::Listener(listener));
        self
    }

    /// Shares a readiness registry with other components (the ResourceSlice
    /// publisher, device health); by default the plugin creates its own,
    /// reachable through [`KubeletPlugin::readiness`].
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Time in-flight calls get at shutdown (default
    /// [`DEFAULT_SHUTDOWN_GRACE`]).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Bound on reading one claim (default [`DEFAULT_CLAIM_LOOKUP_TIMEOUT`]).
    pub fn claim_lookup_timeout(mut self, timeout: Duration) -> Self {
        self.claim_lookup_timeout = timeout;
        self
    }

    /// Runs `task` alongside the servers, supervised: if it returns (with or
    /// without error) or panics before shutdown, `run` shuts down and
    /// returns an error. It is aborted at shutdown. Meant for the
    /// ResourceSlice publisher and similar companions.
    pub fn critical_task(
        mut self,
        name: impl Into<String>,
        task: impl Future<Output = Result<(), BoxError>> + Send + 'static,
    ) -> Self {
        self.critical_tasks.push((name.into(), Box::pin(task)));
        self
    }

    /// Serves the kubelet's resource-health stream
    /// ([`resource_health`]) from `feed` and advertises it at registration.
    pub fn device_health(mut self, feed: resource_health::HealthFeed) -> Self {
        self.device_health = Some(feed);
        self
    }

    /// Publishes this node's ResourceSlices with `client`: the driver hands
    /// its devices to [`KubeletPlugin::slice_publisher`]; the plugin runs the
    /// publisher task, re-syncs it whenever the kubelet registers the plugin
    /// and reports it on `/readyz` as the `resourceslices` check.
    pub fn resource_slices(mut self, client: kube::Client, config: resourceslice::Config) -> Self {
        self.slices = Some((client, config));
        self
    }

    /// Checks the configuration and computes socket paths. Binds nothing.
    pub fn build(self) -> Result<KubeletPlugin<D>, Error> {
        validate_driver_name(&self.driver_name)?;
        if let Some(uid) = &self.rolling_update_uid {
            validate_pod_uid(uid)?;
        }
        let claim_reader = self.claim_reader.ok_or_else(|| Error::InvalidConfig {
            reason: "a claim reader (or kube client) is required".to_owned(),
        })?;
        let plugin_data_dir = self
            .plugin_data_dir
            .unwrap_or_else(|| Path::new(KUBELET_PLUGINS_DIR).join(&self.driver_name));
        for (what, dir) in [
            ("registrar directory", &self.registrar_dir),
            ("plugin data directory", &plugin_data_dir),
        ] {
            if !dir.is_absolute() {
                return Err(Error::InvalidConfig {
                    reason: format!("{what} {} is not an absolute path", dir.display()),
                });
            }
        }
        let uid = self.rolling_update_uid.as_deref();
        let dra_socket = plugin_data_dir.join(socket::dra_socket_name(uid));
        let dra_endpoint = dra_socket
            .to_str()
            .ok_or_else(|| Error::InvalidConfig {
                reason: format!("DRA socket path {} is not UTF-8", dra_socket.display()),
            })?
            .to_owned();
        let registration_socket =
            socket::registration_socket_path(&self.registrar_dir, &self.driver_name, uid);

        let registration_check = self
            .readiness
            .register(registration::READINESS_CHECK, registration::PENDING_REASON);
        let (registration_tx, registration_rx) = watch::channel(RegistrationState::Pending);
        let slices = self.slices.map(|(client, config)| {
            let check = self
                .readiness
                .register(SLICES_READINESS_CHECK, SLICES_PENDING_REASON);
            let (publisher, task) = Publisher::new(config);
            SlicePublishing {
                publisher,
                task,
                client,
                check,
            }
        });
        Ok(KubeletPlugin {
            driver_name: self.driver_name,
            driver: self.driver,
            plugin_data_dir,
            dra_socket,
            dra_endpoint,
            registration_socket,
            rolling_update: self.rolling_update_uid.is_some(),
            serialize: self.serialize,
            claim_reader,
            health: self.health,
            health_state: HealthState {
                liveness: Liveness::default(),
                readiness: self.readiness,
            },
            registration_check,
            registration_tx,
            registration_rx,
            shutdown_grace: self.shutdown_grace,
            claim_lookup_timeout: self.claim_lookup_timeout,
            critical_tasks: self.critical_tasks,
            slices,
            device_health: self.device_health,
        })
    }
}

fn validate_driver_name(name: &str) -> Result<(), Error> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bytes = name.as_bytes();
    if name.len() > 253
        || !valid_chars
        || !alnum(bytes.first().copied())
        || !alnum(bytes.last().copied())
    {
        return Err(Error::InvalidConfig {
            reason: format!("driver name {name:?} is not a lower-case DNS subdomain"),
        });
    }
    Ok(())
}

fn validate_pod_uid(uid: &str) -> Result<(), Error> {
    if uid.contains(['/', '\0']) {
        return Err(Error::InvalidConfig {
            reason: format!("pod UID {uid:?} must not contain '/' or NUL"),
        });
    }
    Ok(())
}

/// A kubelet plugin for one DRA driver: the registration and DRA gRPC
/// servers on Unix sockets, plus optional health endpoints.
pub struct KubeletPlugin<D> {
    driver_name: String,
    driver: Arc<D>,
    plugin_data_dir: PathBuf,
    dra_socket: PathBuf,
    dra_endpoint: String,
    registration_socket: PathBuf,
    rolling_update: bool,
    serialize: bool,
    claim_reader: Arc<dyn ClaimReader>,
    health: Option<HealthEndpoint>,
    health_state: HealthState,
    registration_check: ReadinessCheck,
    registration_tx: watch::Sender<RegistrationState>,
    registration_rx: watch::Receiver<RegistrationState>,
    shutdown_grace: Duration,
    claim_lookup_timeout: Duration,
    critical_tasks: Vec<CriticalTask>,
    slices: Option<SlicePublishing>,
    device_health: Option<resource_health::HealthFeed>,
}

/// Name of the `/readyz` check of the ResourceSlice publisher.
pub const SLICES_READINESS_CHECK: &str = "resourceslices";

/// Readiness reason before the first successful publish.
pub const SLICES_PENDING_REASON: &str = "the driver's ResourceSlices are not published yet";

struct SlicePublishing {
    publisher: Publisher,
    task: PublisherTask,
    client: kube::Client,
    check: ReadinessCheck,
}

impl<D: DraDriver> KubeletPlugin<D> {
    /// Starts configuring a plugin for `driver_name` (a DNS subdomain such as
    /// `gpu.nvidia.com`) backed by `driver`.
    pub fn builder(driver_name: impl Into<String>, driver: Arc<D>) -> KubeletPluginBuilder<D> {
        KubeletPluginBuilder {
            driver_name: driver_name.into(),
            driver,
            registrar_dir: PathBuf::from(KUBELET_REGISTRY_DIR),
            plugin_data_dir: None,
            rolling_update_uid: None,
            serialize: true,
            claim_reader: None,
            health: None,
            readiness: Readiness::new(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            claim_lookup_timeout: DEFAULT_CLAIM_LOOKUP_TIMEOUT,
            critical_tasks: Vec::new(),
            slices: None,
            device_health: None,
        }
    }

    /// The driver name.
    pub fn driver_name(&self) -> &str {
        &self.driver_name
    }

    /// The driver.
    pub fn driver(&self) -> &Arc<D> {
        &self.driver
    }

    /// The plugin data directory.
    pub fn plugin_data_dir(&self) -> &Path {
        &self.plugin_data_dir
    }

    /// Path of the DRA socket (also the endpoint sent to the kubelet).
    pub fn dra_socket_path(&self) -> &Path {
        &self.dra_socket
    }

    /// Path of the registration socket.
    pub fn registration_socket_path(&self) -> &Path {
        &self.registration_socket
    }

    /// The readiness registry; add checks to it before or while running.
    pub fn readiness(&self) -> Readiness {
        self.health_state.readiness.clone()
    }

    /// Whether the servers run.
    pub fn liveness(&self) -> Liveness {
        self.health_state.liveness.clone()
    }

    /// The handle the driver publishes its devices through, if
    /// [`KubeletPluginBuilder::resource_slices`] was configured.
    pub fn slice_publisher(&self) -> Option<&Publisher> {
        self.slices.as_ref().map(|slices| &slices.publisher)
    }

    /// What the kubelet last said about the registration.
    pub fn registration_status(&self) -> watch::Receiver<RegistrationState> {
        self.registration_rx.clone()
    }

    /// Serves until `shutdown` resolves or a supervised task ends; see the
    /// module docs for the order of start-up and shutdown. Returns `Ok` only
    /// after a requested shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        std::fs::create_dir_all(&self.plugin_data_dir).map_err(|source| Error::CreateDir {
            path: self.plugin_data_dir.clone(),
            source,
        })?;
        let serializer = match (self.serialize, self.rolling_update) {
            (false, _) => None,
            (true, false) => Some(Serializer::in_process()),
            (true, true) => Some(Serializer::with_lock_file(&self.plugin_data_dir)?),
        };

        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                // An error means the sender is gone, which also means stop.
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let mut servers: NamedTasks<Result<(), Error>> = NamedTasks::default();

        if let Some(endpoint) = self.health {
            let listener = bind_health(endpoint).await?;
            let state = self.health_state.clone();
            let stop = stopped();
            servers.spawn("health", health::serve(listener, state, stop));
        }

        let (mut dra_socket, dra_listener) = SocketFile::bind(&self.dra_socket)?;
        let core = Arc::new(DraCore::new(
            self.driver_name.clone(),
            Arc::clone(&self.driver),
            self.claim_reader,
            serializer,
            self.claim_lookup_timeout,
        ));
        let health_service = self
            .device_health
            .map(|feed| DraResourceHealthServer::new(resource_health::HealthService::new(feed)));
        let advertise_health = health_service.is_some();
        let dra_server = tonic::transport::Server::builder()
            .add_service(dra_v1::dra_plugin_server::DraPluginServer::new(DraV1(
                Arc::clone(&core),
            )))
            .add_service(dra_v1beta1::dra_plugin_server::DraPluginServer::new(
                DraV1beta1(core),
            ))
            .add_optional_service(health_service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(dra_listener), stopped());
        servers.spawn("dra", async move {
            dra_server.await.map_err(|source| Error::Serve {
                server: "dra",
                source,
            })
        });
        tracing::info!(path = %dra_socket.path().display(), "DRA server listening");

        let (mut registration_socket, registration_listener) =
            SocketFile::bind(&self.registration_socket)?;
        let registration_server = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(
                RegistrationService::new(
                    &self.driver_name,
                    &self.dra_endpoint,
                    self.registration_tx,
                    self.registration_check,
                )
                .with_services(advertise_health.then_some(resource_health::SERVICE)),
            ))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(registration_listener),
                stopped(),
            );
        servers.spawn("registration", async move {
            registration_server.await.map_err(|source| Error::Serve {
                server: "registration",
                source,
            })
        });
        tracing::info!(
            path = %registration_socket.path().display(),
            driver = %self.driver_name,
            "registration server listening"
        );

        let mut companions: NamedTasks<Result<(), BoxError>> = NamedTasks::default();
        for (name, task) in self.critical_tasks {
            companions.spawn(&name, task);
        }
        if let Some(slices) = self.slices {
            let SlicePublishing {
                publisher,
                task,
                client,
                check,
            } = slices;
            // Companions are aborted at shutdown, so the task needs no
            // shutdown signal of its own; an apply in flight is atomic.
            companions.spawn("resourceslice-publisher", async move {
                task.run(client, std::future::pending()).await;
                Ok(())
            });
            companions.spawn(
                "resourceslice-follower",
                follow_slices(publisher, check, self.registration_rx.clone()),
            );
        }
        self.health_state.liveness.set(true);

        let outcome = {
            let shutdown = std::pin::pin!(shutdown);
            tokio::select! {
                () = shutdown => {
                    tracing::info!("shutdown requested");
                    Ok(())
                }
                Some((task, joined)) = servers.join_next() => Err(server_failure(task, joined)),
                Some((task, joined)) = companions.join_next() => {
                    Err(companion_failure(task, joined))
                }
            }
        };
        if let Err(err) = &outcome {
            tracing::error!(error = %error_chain(err), "supervised task ended; shutting down");
        }

        self.health_state.liveness.set(false);
        // Deregister first so the kubelet stops routing calls here.
        registration_socket.remove();
        companions.set.shutdown().await;
        let _ = stop_tx.send(true);
        let drain = async {
            while let Some((task, joined)) = servers.join_next().await {
                match joined {
                    Ok(Ok(())) => tracing::debug!(%task, "server stopped"),
                    Ok(Err(err)) => {
                        tracing::warn!(%task, error = %error_chain(&err), "server failed while stopping");
                    }
                    Err(err) => {
                        tracing::warn!(%task, error = %err, "server task died while stopping")
                    }
                }
            }
        };
        if tokio::time::timeout(self.shutdown_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.shutdown_grace,
                "servers did not stop within the grace period; aborting them"
            );
            servers.set.shutdown().await;
        }
        dra_socket.remove();
        tracing::info!("kubelet plugin stopped");
        outcome
    }
}

async fn bind_health(endpoint: HealthEndpoint) -> Result<tokio::net::TcpListener, Error> {
    match endpoint {
        HealthEndpoint::Addr(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::BindHealth { addr, source }),
        HealthEndpoint::Listener(listener) => {
            let addr = listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener))
                .map_err(|source| Error::BindHealth { addr, source })
        }
    }
}

/// Re-syncs the publisher on every confirmed registration (a kubelet start
/// wipes the node's slices) and mirrors its status into readiness. Returns
/// only if a channel closes, which the supervisor treats as a failure.
async fn follow_slices(
    publisher: Publisher,
    check: ReadinessCheck,
    mut registration: watch::Receiver<RegistrationState>,
) -> Result<(), BoxError> {
    let mut status = publisher.watch_status();
    loop {
        let current = status.borrow_and_update().clone();
        match (&current.last_success, &current.last_error) {
            (Some(_), _) if current.is_healthy() => check.set_ready(),
            (_, Some(err)) if !current.is_healthy() => check.set_not_ready(format!(
                "publishing failed {} time(s) in a row: {err}",
                current.consecutive_failures
            )),
            _ => check.set_not_ready(SLICES_PENDING_REASON),
        }
        tokio::select! {
            changed = status.changed() => changed?,
            changed = registration.changed() => {
                changed?;
                if *registration.borrow_and_update() == RegistrationState::Registered {
                    tracing::debug!("kubelet registered the plugin; re-syncing ResourceSlices");
                    publisher.resync();
                }
            }
        }
    }
}

/// A `JoinSet` that remembers task names, so that even a panic (which
/// loses the task's output) can be attributed.
struct NamedTasks<T> {
    set: JoinSet<T>,
    names: HashMap<tokio::task::Id, String>,
}

impl<T> Default for NamedTasks<T> {
    fn default() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }
}

impl<T: Send + 'static> NamedTasks<T> {
    fn spawn(&mut self, name: &str, task: impl Future<Output = T> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name.to_owned());
    }

    /// Cancel-safe: the only await is `JoinSet::join_next_with_id`.
    async fn join_next(&mut self) -> Option<(String, Result<T, JoinError>)> {
        let joined = self.set.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(err) => err.id(),
        };
        let name = self.names.remove(&id).unwrap_or_default();
        Some((name, joined.map(|(_, output)| output)))
    }
}

fn server_failure(task: String, joined: Result<Result<(), Error>, JoinError>) -> Error {
    match joined {
        Ok(Err(err)) => err,
        Ok(Ok(())) => Error::TaskExited { task },
        Err(_) => Error::TaskPanicked { task },
    }
}

fn companion_failure(task: String, joined: Result<Result<(), BoxError>, JoinError>) -> Error {
    match joined {
        Ok(Err(source)) => Error::TaskFailed { task, source },
        Ok(Ok(())) => Error::TaskExited { task },
        Err(_) => Error::TaskPanicked { task },
    }
}

/// Installs SIGTERM and SIGINT handlers now and returns a future that
/// resolves when either arrives. Install it early, before start-up work, so
/// a signal during start-up is not lost.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| Error::InstallSignalHandler {
            signal: name,
            source,
        })
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received shutdown signal");
    })
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::claims::InMemoryClaimReader;
    use crate::driver::{ClaimRef, PrepareClaim, PrepareResults, UnprepareResults};

    struct NoopDriver;

    impl DraDriver for NoopDriver {
        async fn prepare_resource_claims(&self, _claims: Vec<PrepareClaim>) -> PrepareResults {
            PrepareResults::new()
        }

        async fn unprepare_resource_claims(&self, _claims: Vec<ClaimRef>) -> UnprepareResults {
            UnprepareResults::new()
        }
    }

    fn builder(name: &str) -> KubeletPluginBuilder<NoopDriver> {
        KubeletPlugin::builder(name, Arc::new(NoopDriver)).claim_reader(InMemoryClaimReader::new())
    }

    #[test]
    fn defaults_follow_kubelet_conventions() {
        let plugin = builder("gpu.example.com").build().unwrap();
        assert_eq!(
            plugin.dra_socket_path(),
            Path::new("/var/lib/kubelet/plugins/gpu.example.com/dra.sock")
        );
        assert_eq!(
            plugin.registration_socket_path(),
            Path::new("/var/lib/kubelet/plugins_registry/gpu.example.com-reg.sock")
        );
        assert_eq!(
            *plugin.registration_status().borrow(),
            RegistrationState::Pending
        );
        assert_eq!(
            plugin.readiness().status(),
            Err(vec![(
                "registration".to_owned(),
                "waiting for the kubelet to confirm registration".to_owned()
            )])
        );
    }

    #[test]
    fn rolling_update_names() {
        let plugin = builder("gpu.example.com")
            .registrar_dir("/reg")
            .plugin_data_dir("/data")
            .rolling_update("pod-1")
            .build()
            .unwrap();
        assert_eq!(plugin.dra_socket_path(), Path::new("/data/dra-pod-1.sock"));
        assert_eq!(
            plugin.registration_socket_path(),
            Path::new("/reg/gpu.example.com-pod-1-reg.sock")
        );
        let plugin = builder("gpu.example.com")
            .rolling_update("")
            .build()
            .unwrap();
        assert_eq!(plugin.dra_socket_path().file_name().unwrap(), "dra.sock");
    }

    #[test]
    fn invalid_configurations() {
        let cases: Vec<(KubeletPluginBuilder<NoopDriver>, &str)> = vec![
            (
                builder(""),
                "invalid kubelet plugin configuration: driver name \"\" is not a lower-case DNS subdomain",
            ),
            (
                builder(".gpu.example.com"),
                "invalid kubelet plugin configuration: driver name \".gpu.example.com\" is not a lower-case DNS subdomain",
            ),
            (
                builder("GPU.example.com"),
                "invalid kubelet plugin configuration: driver name \"GPU.example.com\" is not a lower-case DNS subdomain",
            ),
            (
                builder("gpu.example.com").rolling_update("a/b"),
                "invalid kubelet plugin configuration: pod UID \"a/b\" must not contain '/' or NUL",
            ),
            (
                builder("gpu.example.com").registrar_dir("reg"),
                "invalid kubelet plugin configuration: registrar directory reg is not an absolute path",
            ),
            (
                builder("gpu.example.com").plugin_data_dir("data"),
                "invalid kubelet plugin configuration: plugin data directory data is not an absolute path",
            ),
            (
                KubeletPlugin::builder("gpu.example.com", Arc::new(NoopDriver)),
                "invalid kubelet plugin configuration: a claim reader (or kube client) is required",
            ),
        ];
        for (input, want) in cases {
            match input.build() {
                Ok(_) => panic!("expected error {want}"),
                Err(err) => assert_eq!(err.to_string(), want),
            }
        }
    }
}

//! The emulator's main loop: node registration, heartbeat, plugin registry,
//! pods, and a clean stop on SIGTERM/SIGINT.
//!
//! Start-up mirrors the kubelet: create the node root's directories, make
//! sure the Node exists and is Ready, delete every ResourceSlice of the
//! node (plugins republish when they register), then run the heartbeat, the
//! plugin registry scan and the pod workers side by side. Start-up API
//! errors are retried for [`STARTUP_RETRY`] so a control plane that is still
//! settling does not kill the emulator; NodeRestriction rejections (403)
//! fail at once, since retrying cannot fix them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::Error;
use crate::args::Args;
use crate::claims::ClaimCache;
use crate::events::Recorder;
use crate::node;
use crate::plugins::{Plugins, error_chain};
use crate::pods::{self, Backoff};

/// How long start-up API calls are retried.
pub const STARTUP_RETRY: Duration = Duration::from_secs(30);

/// The node root's subdirectories: plugins_registry, plugins, cdi, pods.
pub const SUBDIRS: [&str; 4] = ["plugins_registry", "plugins", "cdi", "pods"];

/// The node's client, and the API server's address and CA as a kubeconfig
/// `cluster` entry (handed on to pods run as local processes).
async fn client(path: &Path) -> Result<(Client, serde_json::Value), Error> {
    let load = |source| Error::LoadKubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(load)?;
    let cluster = kubeconfig
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| serde_json::to_value(c).ok())
        .unwrap_or_default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(load)?;
    Ok((
        Client::try_from(config).map_err(Error::BuildClient)?,
        cluster,
    ))
}

fn retryable(err: &Error) -> bool {
    let source = match err {
        Error::Node { source, .. } | Error::DeleteSlices { source, .. } => source,
        _ => return false,
    };
    !matches!(source, kube::Error::Api(s) if s.code == 403 || s.code == 422 || s.code == 400)
}

async fn with_retry<T, F: Future<Output = Result<T, Error>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> Result<T, Error> {
    let deadline = tokio::time::Instant::now() + STARTUP_RETRY;
    let mut backoff = Backoff::new((Duration::from_millis(200), Duration::from_secs(5)));
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(err) if retryable(&err) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %error_chain(&err), "{what}; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Runs the emulator until SIGTERM or SIGINT.
pub async fn run(args: Args) -> Result<(), Error> {
    for sub in SUBDIRS {
        let path = args.root_dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|source| Error::CreateDir { path, source })?;
    }
    let (client, api_cluster) = client(&args.kubeconfig).await?;
    let node = args.node_name.clone();
    let ips = crate::ipam::IpPool::new(args.pod_cidr);
    let node_ip = ips.node_ip();
    let node_uid = with_retry("register Node", || {
        node::register(&client, &node, &node_ip, &args.labels, &args.capacity)
    })
    .await?;
    with_retry("delete ResourceSlices", || delete_slices(&client, &node)).await?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(Error::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown_tx.send_replace(true);
    });

    let plugins = Arc::new(Plugins::new(&args.root_dir.join("plugins_registry")));
    // Plugins already running register before the first pod is looked at,
    // so a restart does not report them missing.
    plugins.poll().await;
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        node.clone(),
        node_uid,
        node_ip.clone(),
        args.capacity.clone(),
        args.heartbeat_interval,
        shutdown.clone(),
    ));
    let registry = tokio::spawn({
        let plugins = plugins.clone();
        let shutdown = shutdown.clone();
        async move { plugins.run(shutdown).await }
    });
    let state = Arc::new(pods::Node {
        events: Recorder::new(client.clone(), &node),
        client,
        name: node.clone(),
        pods_dir: args.root_dir.join("pods"),
        cdi_dir: args.root_dir.join("cdi"),
        local_images: args.local_images.clone(),
        plugins,
        claims: ClaimCache::default(),
        ips,
        api_cluster,
        shutdown,
    });
    tracing::info!(node = %node, root = %args.root_dir.display(), %node_ip, "kubelet emulator running");
    pods::run(state).await;
    let _ = heartbeat.await;
    let _ = registry.await;
    tracing::info!("stopped");
    Ok(())
}

async fn delete_slices(client: &Client, node: &str) -> Result<(), Error> {
    let api: Api<ResourceSlice> = Api::all(client.clone());
    let selector = ListParams::default().fields(&format!("spec.nodeName={node}"));
    api.delete_collection(&DeleteParams::default(), &selector)
        .await
        .map_err(|source| Error::DeleteSlices {
            node: node.to_owned(),
            source,
        })?;
    tracing::info!(node, "deleted the node's ResourceSlices");
    Ok(())
}

//! A toy DRA driver on `nvdra-kubelet-plugin`: it "prepares" any allocated
//! device by handing out the CDI ID `example.com/device=<claim uid>-<device>`
//! and remembers prepared claims in memory. It writes no CDI specs, so pods
//! using it will not start on a real runtime; it shows the library's shape.
//!
//! Run on a node (as root, with the kubelet directories mounted at the same
//! paths):
//!
//! ```text
//! cargo run --example example_plugin -- --driver-name example.com
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use nvdra_kubelet_plugin::{
    ClaimRef, DraDriver, KubeletPlugin, PrepareClaim, PrepareResults, PreparedDevice,
    UnprepareResults, shutdown_signal,
};

/// Command line; every flag can also come from the environment.
#[derive(Debug, Parser)]
struct Args {
    /// Driver name (a DNS subdomain).
    #[arg(long, env = "DRIVER_NAME", default_value = "example.com")]
    driver_name: String,
    /// Directory the kubelet watches for registration sockets.
    #[arg(
        long,
        env = "KUBELET_REGISTRAR_DIRECTORY_PATH",
        default_value = "/var/lib/kubelet/plugins_registry"
    )]
    kubelet_registrar_directory_path: PathBuf,
    /// Parent of per-driver plugin data directories.
    #[arg(
        long,
        env = "KUBELET_PLUGINS_DIRECTORY_PATH",
        default_value = "/var/lib/kubelet/plugins"
    )]
    kubelet_plugins_directory_path: PathBuf,
    /// Pod UID (downward API); enables rolling updates when set.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Address for `/livez` and `/readyz`.
    #[arg(long, env = "HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
}

/// Prepared claims: claim UID → devices handed out.
#[derive(Default)]
struct ToyDriver {
    prepared: Mutex<BTreeMap<String, Vec<PreparedDevice>>>,
}

impl DraDriver for ToyDriver {
    async fn prepare_resource_claims(&self, claims: Vec<PrepareClaim>) -> PrepareResults {
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        claims
            .into_iter()
            .map(|claim| {
                let uid = claim.claim_ref.uid;
                let devices = prepared
                    .entry(uid.clone())
                    .or_insert_with(|| {
                        claim
                            .results
                            .iter()
                            .map(|result| PreparedDevice {
                                requests: vec![result.request.clone()],
                                pool_name: result.pool.clone(),
                                device_name: result.device.clone(),
                                cdi_device_ids: vec![format!(
                                    "example.com/device={uid}-{}",
                                    result.device
                                )],
                                share_id: result.share_id.clone(),
                            })
                            .collect()
                    })
                    .clone();
                tracing::info!(claim = %uid, devices = devices.len(), "prepared");
                (uid, Ok(devices))
            })
            .collect()
    }

    async fn unprepare_resource_claims(&self, claims: Vec<ClaimRef>) -> UnprepareResults {
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        claims
            .into_iter()
            .map(|claim| {
                // Unknown claims succeed: Unprepare is idempotent.
                let known = prepared.remove(&claim.uid).is_some();
                tracing::info!(claim = %claim, known, "unprepared");
                (claim.uid, Ok(()))
            })
            .collect()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let shutdown = shutdown_signal()?;
    let client = kube::Client::try_default().await?;

    let mut builder = KubeletPlugin::builder(&args.driver_name, Arc::new(ToyDriver::default()))
        .registrar_dir(args.kubelet_registrar_directory_path)
        .plugin_data_dir(args.kubelet_plugins_directory_path.join(&args.driver_name))
        .kube_client(client);
    if let Some(uid) = args.pod_uid {
        builder = builder.rolling_update(uid);
    }
    if let Some(addr) = args.health_addr {
        builder = builder.health_addr(addr);
    }
    builder.build()?.run(shutdown).await?;
    Ok(())
}

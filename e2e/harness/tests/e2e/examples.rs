//! The documentation's examples (`docs/examples/*.yaml`, shown in
//! docs/quickstart.md) applied verbatim, so they cannot rot: every pod in
//! each example must run, and what the example promises must hold.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::computedomain::device_nodes;
use super::env::{Env, node_of};

/// The pods (namespace, name) an example file creates.
fn pods_of(env: &Env, file: &str) -> Result<Vec<(String, String)>> {
    let listed = env
        .cluster
        .cp
        .kubectl(&["get", "-f", file, "-o", "json"], None)?;
    let list: serde_json::Value = serde_json::from_str(&listed)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["kind"] == "Pod")
        .filter_map(|o| {
            Some((
                o["metadata"]["namespace"].as_str()?.to_owned(),
                o["metadata"]["name"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// Every example runs; the shared one shares, the ComputeDomain one spreads
/// over two nodes and gives both pods an IMEX channel.
pub async fn documentation_examples(env: Arc<Env>) -> Result<()> {
    let dir = nvdra_e2e::tools::repo_root().join("docs/examples");
    let mut files: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    ensure!(
        files.len() >= 5,
        "docs/examples holds {} examples",
        files.len()
    );
    for file in &files {
        env.cluster
            .cp
            .kubectl(&["apply", "-f", file], None)
            .with_context(|| format!("apply {file}"))?;
        let pods = pods_of(&env, file)?;
        ensure!(!pods.is_empty(), "{file} creates no pod");
        let mut running = Vec::new();
        for (ns, name) in &pods {
            running.push(
                env.running(ns, name, Duration::from_secs(120))
                    .await
                    .with_context(|| format!("example {file}"))?,
            );
        }
        if file.ends_with("02-shared-gpu.yaml") {
            let devices = running
                .iter()
                .map(|p| device_nodes(&env, p))
                .collect::<Result<Vec<_>>>()?;
            ensure!(
                devices.iter().all(|d| !d.is_empty() && *d == devices[0]),
                "the shared claim's pods see different devices: {devices:?}"
            );
        }
        if file.ends_with("03-gpu-by-memory.yaml") {
            let node = node_of(&running[0]);
            ensure!(
                node.starts_with("h200") || node.starts_with("gb200"),
                "the 80 GiB pod landed on {node}"
            );
        }
        if file.ends_with("05-compute-domain.yaml") {
            ensure!(
                node_of(&running[0]) != node_of(&running[1]),
                "the job's workers share a node"
            );
            for pod in &running {
                let devices = device_nodes(&env, pod)?;
                ensure!(
                    devices
                        .iter()
                        .any(|d| d.starts_with("/dev/nvidia-caps-imex-channels/channel")),
                    "{} has no IMEX channel: {devices:?}",
                    pod.metadata.name.as_deref().unwrap_or_default()
                );
            }
        }
    }
    for file in files.iter().rev() {
        env.cluster
            .cp
            .kubectl(&["delete", "-f", file, "--wait=false"], None)?;
    }
    // Every example namespace and its pods go away (claims unprepared).
    let pods: Api<Pod> = Api::all(env.client.clone());
    nvdra_e2e::wait::until(
        Duration::from_secs(120),
        "the examples' pods gone",
        || async {
            let list = pods.list(&Default::default()).await?;
            Ok(!list.items.iter().any(|p| {
                p.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|ns| ns.starts_with("quickstart-"))
            }))
        },
    )
    .await
}

//! What scenarios share: the cluster, an admin client, and helpers that read
//! API objects and the files agents and emulators write.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use nvdra_e2e::Cluster;
use nvdra_e2e::wait;
use serde_json::Value;

/// How long pods get to reach Running in functional scenarios.
pub const RUNNING: Duration = Duration::from_secs(60);

pub struct Env {
    pub cluster: Cluster,
    pub client: kube::Client,
}

impl Env {
    pub async fn new(cluster: Cluster) -> Result<Self> {
        let client = cluster.client().await?;
        Ok(Self { cluster, client })
    }

    /// A fresh namespace for one scenario.
    pub async fn namespace(&self, name: &str) -> Result<String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))?;
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        // The service account admission controller needs the namespace's
        // default ServiceAccount before it admits pods.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), name);
        wait::until(
            Duration::from_secs(30),
            "the default ServiceAccount",
            || async { Ok(sas.get_opt("default").await?.is_some()) },
        )
        .await?;
        Ok(name.to_owned())
    }

    /// `kubectl apply --server-side -f -` of `yaml` as admin.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.cluster
            .cp
            .kubectl(&["apply", "--server-side", "-f", "-"], Some(yaml))?;
        Ok(())
    }

    pub fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    pub fn claims(&self, ns: &str) -> Api<ResourceClaim> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Creates a pod with one container using each named claim; `claims`
    /// maps the pod's claim entry name to `("template" | "claim", name)`.
    pub async fn create_pod(
        &self,
        ns: &str,
        name: &str,
        claims: &[(&str, &str, &str)],
        node_name_selector: Option<&str>,
    ) -> Result<Pod> {
        let resource_claims: Vec<Value> = claims
            .iter()
            .map(|(entry, kind, target)| match *kind {
                "template" => {
                    serde_json::json!({ "name": entry, "resourceClaimTemplateName": target })
                }
                _ => serde_json::json!({ "name": entry, "resourceClaimName": target }),
            })
            .collect();
        let uses: Vec<Value> = claims
            .iter()
            .map(|(entry, ..)| serde_json::json!({ "name": entry }))
            .collect();
        let mut spec = serde_json::json!({
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "ctr", "image": "registry.example/cuda-sample:12.8",
                "resources": { "claims": uses },
            }],
            "resourceClaims": resource_claims,
        });
        if let Some(node) = node_name_selector {
            spec["nodeSelector"] = serde_json::json!({ "kubernetes.io/hostname": node });
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": ns },
            "spec": spec,
        }))?;
        self.pods(ns)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create pod {ns}/{name}"))
    }

    /// Waits until the pod is Running and returns it.
    pub async fn running(&self, ns: &str, name: &str, timeout: Duration) -> Result<Pod> {
        let pods = self.pods(ns);
        wait::value(timeout, &format!("pod {ns}/{name} Running"), || async {
            let pod = pods.get(name).await?;
            Ok((phase(&pod) == "Running").then_some(pod))
        })
        .await
    }

    /// Deletes a pod and waits until it is gone (the emulator unprepares
    /// first, then removes it).
    pub async fn delete_pod(&self, ns: &str, name: &str, timeout: Duration) -> Result<()> {
        let pods = self.pods(ns);
        pods.delete(name, &DeleteParams::default()).await?;
        wait::until(timeout, &format!("pod {ns}/{name} gone"), || async {
            Ok(pods.get_opt(name).await?.is_none())
        })
        .await
    }

    /// The ResourceClaim behind the pod's claim entry `entry`.
    pub async fn pod_claim(&self, pod: &Pod, entry: &str) -> Result<ResourceClaim> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let decl = spec
            .resource_claims
            .iter()
            .flatten()
            .find(|c| c.name == entry)
            .with_context(|| format!("pod has no claim entry {entry}"))?;
        let name = match &decl.resource_claim_name {
            Some(n) => n.clone(),
            None => pod
                .status
                .as_ref()
                .and_then(|s| s.resource_claim_statuses.as_ref())
                .and_then(|ss| ss.iter().find(|s| s.name == entry))
                .and_then(|s| s.resource_claim_name.clone())
                .with_context(|| format!("pod has no generated claim for {entry} yet"))?,
        };
        Ok(self.claims(&ns).get(&name).await?)
    }

    /// Warning events on a pod, as `reason: message` lines.
    pub async fn pod_events(&self, ns: &str, pod: &str) -> Result<Vec<String>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let list = api
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
            .await?;
        Ok(list
            .items
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default()
                )
            })
            .collect())
    }

    /// The agent's checkpoint on `node`: claim UID → entry (none before the
    /// agent's first prepare).
    pub fn checkpoint(&self, node: &str) -> Result<BTreeMap<String, Value>> {
        let path = self
            .cluster
            .node_dirs(node)
            .plugins()
            .join("gpu.nvidia.com/checkpoint.json");
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(err) => return Err(err).with_context(|| format!("read {}", path.display())),
        };
        let file: Value = serde_json::from_slice(&text)?;
        let claims = file["data"]["claims"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        Ok(claims.into_iter().collect())
    }

    /// The CDI spec the agent writes for a claim.
    pub fn cdi_spec(&self, node: &str, claim_uid: &str) -> PathBuf {
        self.cluster
            .node_dirs(node)
            .cdi()
            .join(format!("k8s.gpu.nvidia.com-claim_{claim_uid}.yaml"))
    }
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// The container edits (env, mounts, device nodes) the kubelet emulator recorded for a pod's
/// containers, from its `container-edits.json`.
pub fn container_edits(env: &Env, pod: &Pod) -> Result<Value> {
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let path = env
        .cluster
        .node_dirs(&node_of(pod))
        .pod(&pod_uid)
        .join("container-edits.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )?)
}

pub fn uid(claim: &ResourceClaim) -> String {
    claim.metadata.uid.clone().unwrap_or_default()
}

/// (pool, device) of every allocated device of a claim, for `driver`.
pub fn allocated(claim: &ResourceClaim) -> Vec<(String, String)> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .map(|d| {
            d.results
                .iter()
                .flatten()
                .map(|r| (r.pool.clone(), r.device.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Devices held by each completed claim in a checkpoint.
pub fn checkpoint_devices(entry: &Value) -> Vec<String> {
    entry["preparedDevices"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["device"].as_str().map(str::to_owned))
        .collect()
}

/// Fails if any device is held by two claims in `checkpoint`.
pub fn ensure_no_double_use(node: &str, checkpoint: &BTreeMap<String, Value>) -> Result<()> {
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    for (uid, entry) in checkpoint {
        for device in checkpoint_devices(entry) {
            if let Some(other) = holder.insert(device.clone(), uid.clone()) {
                bail!("{node}: device {device} is prepared for claims {other} and {uid}");
            }
        }
    }
    Ok(())
}

/// Asserts the state of a checkpoint entry.
pub fn ensure_completed(entry: &Value) -> Result<()> {
    ensure!(
        entry["state"] == "PrepareCompleted",
        "checkpoint entry not completed: {entry}"
    );
    Ok(())
}

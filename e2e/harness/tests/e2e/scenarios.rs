//! The functional scenarios of issue 4, on the six-node cluster of
//! `functional_spec` (h100-0, h200-0, a100-0, gb200-0, gb200-1, l4-0).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::Api;
use kube::api::ListParams;
use nvdra_e2e::cluster::GPU_DRIVER;
use nvdra_e2e::wait;

use super::env::{
    Env, RUNNING, allocated, checkpoint_devices, ensure_completed, ensure_no_double_use, node_of,
    phase, uid,
};

/// A dotted NVIDIA driver version as semver (leading zeros dropped).
fn semver(version: &str) -> String {
    version
        .split('.')
        .map(|part| part.trim_start_matches('0'))
        .map(|part| if part.is_empty() { "0" } else { part })
        .collect::<Vec<_>>()
        .join(".")
}

fn template(ns: &str, name: &str, selector: Option<&str>) -> String {
    let selectors = selector
        .map(|cel| {
            format!("\n          selectors:\n          - cel:\n              expression: \"{cel}\"")
        })
        .unwrap_or_default();
    format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {{ namespace: {ns}, name: {name} }}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly:
          deviceClassName: gpu.nvidia.com{selectors}
"
    )
}

/// Scenario 1: Every node is Ready, untainted, heartbeating through its Lease,
/// and publishes one complete pool with the devices its profile has and the
/// attributes upstream publishes.
pub async fn slices_published(env: Arc<Env>) -> Result<()> {
    let slices: Api<ResourceSlice> = Api::all(env.client.clone());
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), "kube-node-lease");
    for spec in &env.cluster.spec.nodes {
        let node = nodes.get(&spec.name).await?;
        ensure!(
            nvdra_e2e::cluster::is_ready(&node),
            "{} not Ready",
            spec.name
        );
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        ensure!(taints.is_empty(), "{} is tainted: {taints:?}", spec.name);
        let labels = node.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("nvidia.com/gpu.present").map(String::as_str),
            Some("true")
        );
        let lease = leases.get(&spec.name).await?;
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        assert_eq!(holder.as_deref(), Some(spec.name.as_str()), "lease holder");
        ensure!(
            lease
                .spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .is_some(),
            "{}: lease never renewed",
            spec.name
        );

        let inventory = spec.inventory()?;
        let list = slices
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", spec.name)))
            .await?;
        let ours: Vec<_> = list
            .items
            .iter()
            .filter(|s| s.spec.driver == GPU_DRIVER)
            .collect();
        ensure!(!ours.is_empty(), "{}: no ResourceSlice", spec.name);
        for slice in &ours {
            assert_eq!(
                slice.spec.pool.name, spec.name,
                "pool name is the node name"
            );
        }
        let devices: BTreeMap<String, _> = ours
            .iter()
            .flat_map(|s| s.spec.devices.iter().flatten())
            .map(|d| (d.name.clone(), d))
            .collect();

        // Expected names straight from the profile: a GPU with MIG off is
        // `gpu-<minor>`; one with MIG on publishes its MIG devices instead.
        let mut want_gpus = BTreeSet::new();
        let mut want_migs = 0usize;
        for gpu in &inventory.gpus {
            if gpu.info.mig_enabled {
                want_migs += gpu.mig_devices.len();
            } else {
                want_gpus.insert(format!("gpu-{}", gpu.info.minor));
            }
        }
        let got_gpus: BTreeSet<_> = devices
            .keys()
            .filter(|n| n.starts_with("gpu-") && !n.contains("-mig-"))
            .cloned()
            .collect();
        let got_migs = devices.keys().filter(|n| n.contains("-mig-")).count();
        assert_eq!(got_gpus, want_gpus, "{}: full GPUs", spec.name);
        assert_eq!(got_migs, want_migs, "{}: MIG devices", spec.name);

        for gpu in inventory.gpus.iter().filter(|g| !g.info.mig_enabled) {
            let name = format!("gpu-{}", gpu.info.minor);
            let device = devices[&name];
            let attrs = device.attributes.as_ref().context("no attributes")?;
            let s = |k: &str| attrs.get(k).and_then(|a| a.string.clone());
            assert_eq!(
                s("type").as_deref(),
                Some("gpu"),
                "{}/{name} type",
                spec.name
            );
            assert_eq!(
                s("uuid"),
                Some(gpu.info.uuid.clone()),
                "{}/{name} uuid",
                spec.name
            );
            assert_eq!(s("productName"), Some(gpu.info.product_name.clone()));
            assert_eq!(
                s("architecture").as_deref(),
                Some(gpu.info.architecture.as_str())
            );
            // Published as semver: "570.172.08" becomes "570.172.8".
            let driver = attrs.get("driverVersion").and_then(|a| a.version.clone());
            assert_eq!(driver, Some(semver(&inventory.driver.driver_version)));
            let memory = device
                .capacity
                .as_ref()
                .and_then(|c| c.get("memory"))
                .map(|q| q.value.0.clone());
            let bytes = gpu.info.memory_bytes.context("profile without memory")?;
            ensure!(
                memory.is_some(),
                "{}/{name}: no memory capacity (want {bytes} bytes)",
                spec.name
            );
        }
    }
    Ok(())
}

/// Scenario 2: One pod, one GPU from a template: scheduled, allocated, prepared,
/// CDI resolvable; deleting it unprepares and removes the spec.
pub async fn single_gpu_lifecycle(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-single").await?;
    env.apply(&template(&ns, "one-gpu", None))?;
    env.create_pod(&ns, "single", &[("gpu", "template", "one-gpu")], None)
        .await?;
    let pod = env.running(&ns, "single", RUNNING).await?;
    let node = node_of(&pod);
    let claim = env.pod_claim(&pod, "gpu").await?;
    let claim_uid = uid(&claim);
    let devices = allocated(&claim);
    ensure!(devices.len() == 1, "one device allocated: {devices:?}");
    assert_eq!(devices[0].0, node, "allocated from the pod's node's pool");

    // The agent's records: checkpoint entry, CDI spec naming the device.
    let checkpoint = env.checkpoint(&node)?;
    let entry = checkpoint
        .get(&claim_uid)
        .with_context(|| format!("claim {claim_uid} not in {node}'s checkpoint"))?;
    ensure_completed(entry)?;
    assert_eq!(checkpoint_devices(entry), vec![devices[0].1.clone()]);
    let spec_path = env.cdi_spec(&node, &claim_uid);
    let spec = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("read {}", spec_path.display()))?;
    ensure!(spec.contains(&claim_uid), "the CDI spec names the claim");
    // The emulator resolved every CDI ID before marking the pod Running and
    // recorded them.
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let record = env
        .cluster
        .node_dirs(&node)
        .pod(&pod_uid)
        .join("cdi-devices.json");
    let ids =
        std::fs::read_to_string(&record).with_context(|| format!("read {}", record.display()))?;
    ensure!(
        ids.contains("k8s.gpu.nvidia.com/claim="),
        "recorded CDI IDs: {ids}"
    );

    env.delete_pod(&ns, "single", Duration::from_secs(60))
        .await?;
    ensure!(
        !spec_path.exists(),
        "CDI spec {} left behind",
        spec_path.display()
    );
    ensure!(
        !env.checkpoint(&node)?.contains_key(&claim_uid),
        "claim still in the checkpoint after unprepare"
    );
    // The resourceclaim controller deletes the generated claim.
    let claims = env.claims(&ns);
    let name = claim.metadata.name.clone().unwrap_or_default();
    wait::until(
        Duration::from_secs(30),
        "the generated claim to go",
        || async { Ok(claims.get_opt(&name).await?.is_none()) },
    )
    .await
}

/// Scenario 3: CEL selectors over our attributes and capacities pick the right
/// nodes; one nothing matches leaves the pod Pending.
pub async fn cel_selectors(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-cel").await?;
    let d = "device.attributes['gpu.nvidia.com']";
    let c = "device.capacity['gpu.nvidia.com']";
    let cases: [(&str, String, &[&str]); 3] = [
        (
            "h100",
            format!("{d}.productName == 'NVIDIA H100 80GB HBM3'"),
            &["h100-0"],
        ),
        (
            "big-memory",
            format!("{c}.memory.compareTo(quantity('100Gi')) >= 0"),
            &["h200-0", "gb200-0", "gb200-1"],
        ),
        (
            "ampere",
            format!("{d}.architecture == 'Ampere'"),
            &["a100-0"],
        ),
    ];
    for (name, cel, _) in &cases {
        env.apply(&template(&ns, name, Some(cel)))?;
        env.create_pod(&ns, name, &[("gpu", "template", name)], None)
            .await?;
    }
    env.apply(&template(
        &ns,
        "nothing",
        Some(&format!("{d}.productName == 'NVIDIA B300'")),
    ))?;
    env.create_pod(&ns, "nothing", &[("gpu", "template", "nothing")], None)
        .await?;
    for (name, _, nodes) in &cases {
        let pod = env.running(&ns, name, RUNNING).await?;
        let node = node_of(&pod);
        ensure!(
            nodes.contains(&node.as_str()),
            "{name}: ran on {node}, want one of {nodes:?}"
        );
    }
    // The scheduler reports the unsatisfiable claim; the pod never binds.
    let pods = env.pods(&ns);
    wait::until(
        Duration::from_secs(30),
        "pod 'nothing' Unschedulable",
        || async {
            let pod = pods.get("nothing").await?;
            let unschedulable = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                });
            Ok(unschedulable)
        },
    )
    .await?;
    let pod = pods.get("nothing").await?;
    assert_eq!(phase(&pod), "Pending");
    assert_eq!(node_of(&pod), "");
    Ok(())
}

/// Scenario 4: Two pods sharing one claim get the same GPU (prepared once); two
/// claims on one node get distinct GPUs.
pub async fn shared_and_distinct_claims(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-share").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: shared }}
spec:
  devices:
    requests:
    - name: gpu
      exactly: {{ deviceClassName: gpu.nvidia.com }}
"
    ))?;
    env.apply(&template(&ns, "own", None))?;
    for pod in ["share-a", "share-b"] {
        env.create_pod(&ns, pod, &[("gpu", "claim", "shared")], None)
            .await?;
    }
    for pod in ["own-a", "own-b"] {
        env.create_pod(&ns, pod, &[("gpu", "template", "own")], Some("h100-0"))
            .await?;
    }
    let a = env.running(&ns, "share-a", RUNNING).await?;
    let b = env.running(&ns, "share-b", RUNNING).await?;
    assert_eq!(
        node_of(&a),
        node_of(&b),
        "a shared claim pins both pods to one node"
    );
    let claim = env.claims(&ns).get("shared").await?;
    let reserved: BTreeSet<_> = claim
        .status
        .as_ref()
        .and_then(|s| s.reserved_for.as_ref())
        .into_iter()
        .flatten()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(
        reserved,
        BTreeSet::from(["share-a".to_owned(), "share-b".to_owned()])
    );
    let checkpoint = env.checkpoint(&node_of(&a))?;
    let entry = checkpoint
        .get(&uid(&claim))
        .context("shared claim not prepared")?;
    assert_eq!(
        checkpoint_devices(entry),
        vec![allocated(&claim)[0].1.clone()]
    );

    let own_a = env.running(&ns, "own-a", RUNNING).await?;
    let own_b = env.running(&ns, "own-b", RUNNING).await?;
    let dev_a = allocated(&env.pod_claim(&own_a, "gpu").await?);
    let dev_b = allocated(&env.pod_claim(&own_b, "gpu").await?);
    assert_eq!(node_of(&own_a), "h100-0");
    assert_eq!(node_of(&own_b), "h100-0");
    ensure!(dev_a != dev_b, "two claims got the same device {dev_a:?}");
    ensure_no_double_use("h100-0", &env.checkpoint("h100-0")?)?;

    // Deleting one sharer keeps the claim prepared for the other.
    env.delete_pod(&ns, "share-a", Duration::from_secs(60))
        .await?;
    let checkpoint = env.checkpoint(&node_of(&b))?;
    ensure!(
        checkpoint.contains_key(&uid(&claim)),
        "the shared claim was unprepared while share-b still runs"
    );
    Ok(())
}

/// Scenario 5: The agent of a busy node dies during a burst of claims: every pod
/// still ends Running, every claim is prepared exactly once, no device is
/// prepared twice.
pub async fn agent_restart_during_burst(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-restart").await?;
    env.apply(&template(&ns, "one", None))?;
    let nodes = ["h100-0", "h200-0"];
    // Each has 8 GPUs; earlier scenarios may still hold some.
    let mut targets = Vec::new();
    for node in nodes {
        let free = 8usize.saturating_sub(env.checkpoint(node)?.len());
        targets.extend(std::iter::repeat_n(node, free.min(7)));
    }
    ensure!(
        targets.len() >= 8,
        "too few free GPUs for a burst: {targets:?}"
    );
    // Interleave the nodes so the kill lands while both are busy.
    targets.sort_by_key(|n| *n);
    let (first, second) = targets.split_at(targets.len() / 2);
    let order: Vec<&str> = first
        .iter()
        .zip(second.iter().chain(std::iter::repeat(&"")))
        .flat_map(|(a, b)| [*a, *b])
        .chain(second.iter().skip(first.len()).copied())
        .filter(|n| !n.is_empty())
        .collect();
    let dirs = env.cluster.node_dirs("h100-0");
    let old_pid = nvdra_e2e::node::pid(&dirs, "agent").context("h100-0's agent is not running")?;
    let mut names = Vec::new();
    for (i, node) in order.iter().enumerate() {
        let name = format!("burst-{i}");
        env.create_pod(&ns, &name, &[("gpu", "template", "one")], Some(node))
            .await?;
        names.push(name);
        if i == order.len() / 3 {
            nvdra_e2e::node::kill_agent(&dirs, "KILL")?;
        }
    }
    for name in &names {
        env.running(&ns, name, Duration::from_secs(120)).await?;
    }
    let new_pid =
        nvdra_e2e::node::pid(&dirs, "agent").context("h100-0's agent did not come back")?;
    ensure!(
        new_pid != old_pid,
        "the agent was not restarted (pid {old_pid})"
    );

    for node in nodes {
        let checkpoint = env.checkpoint(node)?;
        ensure_no_double_use(node, &checkpoint)?;
        for entry in checkpoint.values() {
            ensure_completed(entry)?;
        }
    }
    let pods = env.pods(&ns);
    for name in &names {
        let pod = pods.get(name).await?;
        let node = node_of(&pod);
        let claim = env.pod_claim(&pod, "gpu").await?;
        let checkpoint = env.checkpoint(&node)?;
        let entry = checkpoint
            .get(&uid(&claim))
            .with_context(|| format!("{name}'s claim is not prepared on {node}"))?;
        assert_eq!(
            checkpoint_devices(entry),
            allocated(&claim)
                .into_iter()
                .map(|(_, d)| d)
                .collect::<Vec<_>>(),
            "{name}: prepared devices are the allocated ones"
        );
        ensure!(
            env.cdi_spec(&node, &uid(&claim)).exists(),
            "{name}: no CDI spec"
        );
    }
    Ok(())
}

/// Scenario 6: An opaque config with an unknown field fails the claim; the pod's
/// events name the field.
pub async fn invalid_opaque_config(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-invalid").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: bad-config }}
spec:
  devices:
    requests:
    - name: gpu
      exactly: {{ deviceClassName: gpu.nvidia.com }}
    config:
    - requests: [gpu]
      opaque:
        driver: gpu.nvidia.com
        parameters:
          apiVersion: resource.nvidia.com/v1beta1
          kind: GpuConfig
          sharing: {{ strategy: TimeSlicing }}
          timeSlicingConfg: {{ interval: Long }}
"
    ))?;
    env.create_pod(&ns, "bad", &[("gpu", "claim", "bad-config")], None)
        .await?;
    let events = wait::value(
        Duration::from_secs(60),
        "a FailedPrepareDynamicResources event",
        || {
            let env = env.clone();
            let ns = ns.clone();
            async move {
                let events = env.pod_events(&ns, "bad").await?;
                Ok(events
                    .into_iter()
                    .find(|e| e.starts_with("FailedPrepareDynamicResources")))
            }
        },
    )
    .await?;
    ensure!(
        events.contains("timeSlicingConfg"),
        "the event does not name the unknown field: {events}"
    );
    let pod = env.pods(&ns).get("bad").await?;
    assert_eq!(
        phase(&pod),
        "Pending",
        "a pod whose claim cannot be prepared must not run"
    );
    // Nothing half-prepared stays behind on the node.
    let node = node_of(&pod);
    let claim = env.claims(&ns).get("bad-config").await?;
    ensure!(
        !env.cdi_spec(&node, &uid(&claim)).exists(),
        "a CDI spec was written for a rejected claim"
    );
    Ok(())
}

/// Scenario 7: a pod of our image runs as a local process on its simulated
/// node with the pod's environment (downward API included), holding a
/// prepared GPU, and is stopped gracefully when deleted.
pub async fn local_process_pod(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-local").await?;
    env.apply(&template(&ns, "one", None))?;
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "local", "namespace": ns },
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "work",
                "image": env.cluster.image,
                "command": ["nvdra-e2e-workload"],
                "env": [
                    { "name": "LITERAL", "value": "plain" },
                    { "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
                    { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                    { "name": "POD_UID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.uid" } } },
                ],
                "resources": { "claims": [{ "name": "gpu" }] },
            }],
            "resourceClaims": [{ "name": "gpu", "resourceClaimTemplateName": "one" }],
        },
    }))?;
    env.pods(&ns)
        .create(&Default::default(), &pod)
        .await
        .context("create pod local")?;
    let pod = env.running(&ns, "local", RUNNING).await?;
    let node = node_of(&pod);
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let log = env.cluster.node_dirs(&node).pod(&pod_uid).join("work.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait::until(
        Duration::from_secs(30),
        "the workload to print its env",
        || async { Ok(read().lines().any(|l| l == "ready")) },
    )
    .await?;
    let text = read();
    for want in [
        "LITERAL=plain".to_owned(),
        format!("NODE_NAME={node}"),
        "POD_NAME=local".to_owned(),
        format!("POD_UID={pod_uid}"),
    ] {
        ensure!(
            text.lines().any(|l| l == want),
            "{want} missing from the workload's env:\n{text}"
        );
    }
    env.delete_pod(&ns, "local", Duration::from_secs(60))
        .await?;
    ensure!(
        read().lines().any(|l| l == "terminated"),
        "the workload was not stopped with SIGTERM:\n{}",
        read()
    );
    Ok(())
}

/// Scenario 8: a corrupt checkpoint is set aside, reported as a Node event
/// (with the chart's RBAC) and rebuilt from the API: the running pod's claim
/// is adopted, so deleting the pod still unprepares it.
pub async fn corrupt_checkpoint_recovered(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-corrupt").await?;
    let node = "l4-0";
    env.apply(&template(&ns, "one", None))?;
    env.create_pod(&ns, "survivor", &[("gpu", "template", "one")], Some(node))
        .await?;
    let pod = env.running(&ns, "survivor", RUNNING).await?;
    let claim = env.pod_claim(&pod, "gpu").await?;
    let claim_uid = uid(&claim);
    ensure!(
        env.checkpoint(node)?.contains_key(&claim_uid),
        "claim not prepared"
    );

    let dirs = env.cluster.node_dirs(node);
    let path = dirs.plugins().join("gpu.nvidia.com/checkpoint.json");
    std::fs::write(
        &path,
        b"{\"kind\": \"NvdraCheckpoint\", \"version\": 1, \"data\": {trunc",
    )?;
    let old = nvdra_e2e::node::kill_agent(&dirs, "KILL")?;
    wait::until(
        Duration::from_secs(30),
        "the agent to come back",
        || async { Ok(nvdra_e2e::node::pid(&dirs, "agent").is_some_and(|p| p != old)) },
    )
    .await?;

    wait::until(
        Duration::from_secs(30),
        "the claim to be adopted again",
        || async {
            Ok(env
                .checkpoint(node)
                .is_ok_and(|c| c.contains_key(&claim_uid)))
        },
    )
    .await?;
    let aside = std::fs::read_dir(path.parent().context("no parent")?)?
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("checkpoint.json.corrupt-")
        });
    ensure!(
        aside,
        "the corrupt checkpoint was not kept aside for inspection"
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(env.client.clone());
    wait::until(
        Duration::from_secs(30),
        "a CheckpointCorrupted event on the node",
        || async {
            let list = events
                .list(&ListParams::default().fields(&format!(
                    "involvedObject.kind=Node,involvedObject.name={node}"
                )))
                .await?;
            Ok(list.items.iter().any(|e| {
                e.reason.as_deref() == Some(nvdra_api::names::reasons::CHECKPOINT_CORRUPTED)
            }))
        },
    )
    .await?;

    env.delete_pod(&ns, "survivor", Duration::from_secs(60))
        .await?;
    ensure!(
        !env.cdi_spec(node, &claim_uid).exists(),
        "CDI spec left after unprepare"
    );
    ensure!(
        !env.checkpoint(node)?.contains_key(&claim_uid),
        "claim left in checkpoint"
    );
    Ok(())
}

//! ComputeDomain scenarios (issue 5) on the fabric-attached nodes of the
//! functional cluster: gb200-0..3, one NVLink clique.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use nvdra_api::{ComputeDomain, ComputeDomainClique};
use nvdra_e2e::cluster::NAMESPACE;
use nvdra_e2e::wait;

use super::env::{Env, container_edits, node_of};

pub const FABRIC_NODES: [&str; 4] = ["gb200-0", "gb200-1", "gb200-2", "gb200-3"];

fn compute_domain(ns: &str, name: &str, num_nodes: u32, template: &str) -> String {
    format!(
        "apiVersion: resource.nvidia.com/v1beta1
kind: ComputeDomain
metadata: {{ namespace: {ns}, name: {name} }}
spec:
  numNodes: {num_nodes}
  channel:
    resourceClaimTemplate: {{ name: {template} }}
"
    )
}

/// Creates a ComputeDomain and returns its UID once the controller has
/// created its workload claim template.
pub(super) async fn create_domain(env: &Env, ns: &str, name: &str, nodes: u32) -> Result<String> {
    let template = format!("{name}-channel");
    env.apply(&compute_domain(ns, name, nodes, &template))?;
    let rcts: Api<ResourceClaimTemplate> = Api::namespaced(env.client.clone(), ns);
    wait::until(
        Duration::from_secs(30),
        "the workload claim template",
        || async { Ok(rcts.get_opt(&template).await?.is_some()) },
    )
    .await?;
    let cds: Api<ComputeDomain> = Api::namespaced(env.client.clone(), ns);
    Ok(cds.get(name).await?.metadata.uid.unwrap_or_default())
}

/// Waits until the domain's status is Ready with `nodes` Ready nodes.
pub(super) async fn wait_domain_ready(
    env: &Env,
    ns: &str,
    name: &str,
    nodes: usize,
) -> Result<ComputeDomain> {
    let cds: Api<ComputeDomain> = Api::namespaced(env.client.clone(), ns);
    wait::value(
        Duration::from_secs(90),
        &format!("ComputeDomain {ns}/{name} Ready"),
        || async {
            let cd = cds.get(name).await?;
            let status = serde_json::to_value(&cd.status)?;
            // No nodes at all may be written as no list.
            let rows = status["nodes"].as_array().cloned().unwrap_or_default();
            let ready = status["status"] == "Ready"
                && rows.len() == nodes
                && rows.iter().all(|n| n["status"] == "Ready");
            Ok(ready.then_some(cd))
        },
    )
    .await
}

/// The device nodes the emulator recorded for a pod's containers.
pub fn device_nodes(env: &Env, pod: &Pod) -> Result<Vec<String>> {
    let edits = container_edits(env, pod)?;
    Ok(edits["deviceNodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["path"].as_str().map(str::to_owned))
        .collect())
}

/// The IMEX channel device of a pod (exactly one expected).
fn channel_of(env: &Env, pod: &Pod) -> Result<String> {
    let channels: Vec<String> = device_nodes(env, pod)?
        .into_iter()
        .filter(|p| p.starts_with("/dev/nvidia-caps-imex-channels/channel"))
        .collect();
    ensure!(
        channels.len() == 1,
        "pod {} sees channel devices {channels:?}, want one",
        pod.metadata.name.clone().unwrap_or_default()
    );
    Ok(channels[0].clone())
}

/// Deletes the domain and checks nothing of it is left anywhere.
pub(super) async fn delete_domain_and_check_clean(
    env: &Env,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<()> {
    let cds: Api<ComputeDomain> = Api::namespaced(env.client.clone(), ns);
    cds.delete(name, &DeleteParams::default()).await?;
    wait::until(
        Duration::from_secs(60),
        "the ComputeDomain to go",
        || async { Ok(cds.get_opt(name).await?.is_none()) },
    )
    .await?;
    let daemon = nvdra_api::names::objects::daemon_name(uid);
    let dss: Api<DaemonSet> = Api::namespaced(env.client.clone(), NAMESPACE);
    let rcts: Api<ResourceClaimTemplate> = Api::namespaced(env.client.clone(), NAMESPACE);
    let user_rcts: Api<ResourceClaimTemplate> = Api::namespaced(env.client.clone(), ns);
    let cliques: Api<ComputeDomainClique> = Api::namespaced(env.client.clone(), NAMESPACE);
    let nodes: Api<Node> = Api::all(env.client.clone());
    let label = nvdra_api::names::labels::compute_domain_node_label(uid);
    let selector = format!("{}={uid}", nvdra_api::names::labels::COMPUTE_DOMAIN);
    wait::until(
        Duration::from_secs(60),
        "every trace of the domain to go",
        || async {
            let ds = dss.get_opt(&daemon).await?.is_some();
            let rct = rcts.get_opt(&daemon).await?.is_some();
            let user = user_rcts
                .get_opt(&format!("{name}-channel"))
                .await?
                .is_some();
            let clique = !cliques
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .is_empty();
            let labelled = !nodes
                .list(&ListParams::default().labels(&label))
                .await?
                .items
                .is_empty();
            Ok(!(ds || rct || user || clique || labelled))
        },
    )
    .await?;
    for node in FABRIC_NODES {
        let dir = env
            .cluster
            .node_dirs(node)
            .plugins()
            .join("compute-domain.nvidia.com/domains")
            .join(uid);
        ensure!(!dir.exists(), "{} left behind", dir.display());
    }
    Ok(())
}

/// CD scenario 1: a 4-node ComputeDomain. The job's pods are prepared, the
/// daemons run on exactly those nodes and find each other, the domain turns
/// Ready, the pods see a channel device; deleting job and domain leaves
/// nothing behind.
pub async fn four_node_domain(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-cd").await?;
    let uid = create_domain(&env, &ns, "job", 4).await?;
    for (i, node) in FABRIC_NODES.iter().enumerate() {
        env.create_pod(
            &ns,
            &format!("worker-{i}"),
            &[("imex", "template", "job-channel")],
            Some(node),
        )
        .await?;
    }
    let mut workers = Vec::new();
    for i in 0..FABRIC_NODES.len() {
        workers.push(
            env.running(&ns, &format!("worker-{i}"), Duration::from_secs(120))
                .await?,
        );
    }
    let cd = wait_domain_ready(&env, &ns, "job", 4).await?;
    let status = serde_json::to_value(&cd.status)?;
    let status_nodes: BTreeSet<String> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    let want: BTreeSet<String> = FABRIC_NODES.iter().map(|n| (*n).to_owned()).collect();
    ensure!(
        status_nodes == want,
        "status.nodes {status_nodes:?}, want {want:?}"
    );

    // Daemons on exactly the job's nodes, one clique with indices 0..3.
    let daemon = nvdra_api::names::objects::daemon_name(&uid);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NAMESPACE);
    let daemon_pods: Vec<Pod> = pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "DaemonSet" && o.name == daemon)
        })
        .collect();
    let daemon_nodes: BTreeSet<String> = daemon_pods.iter().map(node_of).collect();
    ensure!(
        daemon_nodes == want,
        "daemons on {daemon_nodes:?}, want {want:?}"
    );
    let cliques: Api<ComputeDomainClique> = Api::namespaced(env.client.clone(), NAMESPACE);
    let selector = format!("{}={uid}", nvdra_api::names::labels::COMPUTE_DOMAIN);
    let list = cliques
        .list(&ListParams::default().labels(&selector))
        .await?;
    ensure!(
        list.items.len() == 1,
        "{} cliques, want 1",
        list.items.len()
    );
    let clique = serde_json::to_value(&list.items[0])?;
    let indices: BTreeSet<i64> = clique["daemons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["index"].as_i64())
        .collect();
    // Four distinct indices below the default maximum of 18 (each daemon starts from a
    // home index spread by its node's name, so not necessarily 0..=3).
    ensure!(
        indices.len() == 4 && indices.iter().all(|i| (0..18).contains(i)),
        "clique indices {indices:?}"
    );

    // The daemons found each other: each nvidia-imex stand-in was told
    // about all four peers (it logs into its daemon's container log).
    for pod in &daemon_pods {
        let log = env
            .cluster
            .node_dirs(&node_of(pod))
            .pod(&pod.metadata.uid.clone().unwrap_or_default())
            .join(format!(
                "{}.log",
                nvdra_api::names::objects::DAEMON_CONTAINER
            ));
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
        let full = text.lines().filter(|l| l.contains("peers:")).any(|l| {
            indices
                .iter()
                .all(|i| l.contains(&format!("compute-domain-daemon-{i:04}=")))
        });
        ensure!(
            full,
            "{}: nvidia-imex never saw all four peers:\n{text}",
            log.display()
        );
    }

    // Each daemon's metrics (on its pod IP, the controller's default port)
    // say what just happened, in an exposition promtool accepts.
    for pod in &daemon_pods {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .context("daemon pod without an IP")?;
        let name = format!("daemon on {}", node_of(pod));
        let (code, body) = super::observability::http_get_at(&ip, 8082, "/metrics")?;
        ensure!(code == 200, "{name}: /metrics answered {code}");
        for line in [
            "nvdra_imex_daemon_ready 1",
            "nvdra_imex_daemon_imex_running 1",
            "nvdra_imex_daemon_peers 4",
            "nvdra_imex_daemon_imex_restarts_total 0",
        ] {
            ensure!(
                body.lines().any(|l| l == line),
                "{name}: no {line:?} in\n{body}"
            );
        }
        ensure!(
            !body.contains("nvdra_imex_daemon_clique_applies_total{result=\"success\"} 0"),
            "{name}: counted no successful clique apply:\n{body}"
        );
        super::observability::promtool_check_metrics(&name, &body)?;
    }

    // Every worker sees one channel, the same one for this domain on each node.
    for worker in &workers {
        channel_of(&env, worker)?;
    }

    for i in 0..FABRIC_NODES.len() {
        env.delete_pod(&ns, &format!("worker-{i}"), Duration::from_secs(60))
            .await?;
    }
    delete_domain_and_check_clean(&env, &ns, "job", &uid).await
}

/// CD scenario 4: two ComputeDomains on the same nodes get different
/// channels (beyond upstream, which allows one domain per node).
pub async fn two_domains_share_nodes(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-cd-two").await?;
    let nodes = &FABRIC_NODES[..2];
    let a = create_domain(&env, &ns, "alpha", 2).await?;
    let b = create_domain(&env, &ns, "beta", 2).await?;
    for (domain, _) in [("alpha", &a), ("beta", &b)] {
        for node in nodes {
            env.create_pod(
                &ns,
                &format!("{domain}-{node}"),
                &[("imex", "template", &format!("{domain}-channel"))],
                Some(node),
            )
            .await?;
        }
    }
    for node in nodes {
        let pa = env
            .running(&ns, &format!("alpha-{node}"), Duration::from_secs(120))
            .await?;
        let pb = env
            .running(&ns, &format!("beta-{node}"), Duration::from_secs(120))
            .await?;
        let (ca, cb) = (channel_of(&env, &pa)?, channel_of(&env, &pb)?);
        ensure!(ca != cb, "{node}: both domains got {ca}");
    }
    wait_domain_ready(&env, &ns, "alpha", 2).await?;
    wait_domain_ready(&env, &ns, "beta", 2).await?;
    for domain in ["alpha", "beta"] {
        for node in nodes {
            env.delete_pod(&ns, &format!("{domain}-{node}"), Duration::from_secs(60))
                .await?;
        }
    }
    delete_domain_and_check_clean(&env, &ns, "alpha", &a).await?;
    delete_domain_and_check_clean(&env, &ns, "beta", &b).await
}

/// CD scenario 5: a channel claim from another namespace, or an unknown
/// field in the channel config, fails with a clear message in the pod's
/// events.
pub async fn bad_channel_claims(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-cd-bad").await?;
    let other = env.namespace("e2e-cd-other").await?;
    let uid = create_domain(&env, &ns, "home", 1).await?;
    // A claim in another namespace pointing at the domain by UID.
    let claim = |name: &str, ns: &str, extra: &str| {
        format!(
            "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: {name} }}
spec:
  devices:
    requests:
    - name: channel
      exactly: {{ deviceClassName: compute-domain-default-channel.nvidia.com }}
    config:
    - requests: [channel]
      opaque:
        driver: compute-domain.nvidia.com
        parameters:
          apiVersion: resource.nvidia.com/v1beta1
          kind: ComputeDomainChannelConfig
          domainID: {uid}
          allocationMode: Single{extra}
"
        )
    };
    env.apply(&claim("stolen", &other, ""))?;
    env.create_pod(
        &other,
        "intruder",
        &[("imex", "claim", "stolen")],
        Some(FABRIC_NODES[0]),
    )
    .await?;
    env.apply(&claim("typo", &ns, "\n          alocationMode: All"))?;
    env.create_pod(
        &ns,
        "typo",
        &[("imex", "claim", "typo")],
        Some(FABRIC_NODES[1]),
    )
    .await?;
    for (pod_ns, pod, needle) in [
        (&other, "intruder", ns.as_str()),
        (&ns, "typo", "alocationMode"),
    ] {
        let event = wait::value(
            Duration::from_secs(60),
            &format!("a prepare failure on {pod}"),
            || {
                let env = env.clone();
                let pod_ns = pod_ns.clone();
                async move {
                    Ok(env
                        .pod_events(&pod_ns, pod)
                        .await?
                        .into_iter()
                        .find(|e| e.starts_with("FailedPrepareDynamicResources")))
                }
            },
        )
        .await?;
        ensure!(
            event.contains(needle),
            "{pod}: the event does not name {needle:?}: {event}"
        );
    }
    for (pod_ns, pod) in [(&other, "intruder"), (&ns, "typo")] {
        env.delete_pod(pod_ns, pod, Duration::from_secs(60)).await?;
    }
    delete_domain_and_check_clean(&env, &ns, "home", &uid).await
}

/// The holder of the leader-election Lease: `<release>-controller-<i>_<suffix>`
/// (a restarted replica has a new suffix).
async fn leader(env: &Env) -> Result<Option<String>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), NAMESPACE);
    let lease = leases
        .get_opt(&format!("{}-controller", nvdra_e2e::cluster::RELEASE))
        .await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// The supervisor's process name of a holder identity: `controller-<i>`.
fn replica(holder: &str) -> Option<&str> {
    holder
        .split('_')
        .next()?
        .strip_prefix(nvdra_e2e::cluster::RELEASE)?
        .strip_prefix('-')
}

/// CD scenario 3: faults. A daemon pod is deleted, the controller leader is
/// killed (the standby takes over), an agent is killed while it prepares a
/// new worker's channel; the domain returns to Ready each time and nothing
/// leaks once it is deleted.
pub async fn faults(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-cd-faults").await?;
    let uid = create_domain(&env, &ns, "sturdy", 4).await?;
    for (i, node) in FABRIC_NODES.iter().enumerate() {
        env.create_pod(
            &ns,
            &format!("w-{i}"),
            &[("imex", "template", "sturdy-channel")],
            Some(node),
        )
        .await?;
    }
    for i in 0..FABRIC_NODES.len() {
        env.running(&ns, &format!("w-{i}"), Duration::from_secs(120))
            .await?;
    }
    wait_domain_ready(&env, &ns, "sturdy", 4).await?;

    // A daemon pod goes away: the DaemonSet replaces it and it rejoins.
    let daemon = nvdra_api::names::objects::daemon_name(&uid);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NAMESPACE);
    let victim = daemon_pod_on(&pods, &daemon, FABRIC_NODES[1]).await?;
    let victim_name = victim.metadata.name.clone().unwrap_or_default();
    pods.delete(&victim_name, &DeleteParams::default()).await?;
    // A new daemon pod on that node, Ready: the old status must not count.
    wait::until(
        Duration::from_secs(60),
        "a new Ready daemon pod on gb200-1",
        || async {
            let list = pods.list(&ListParams::default()).await?;
            Ok(list.items.iter().any(|p| {
                node_of(p) == FABRIC_NODES[1]
                    && p.metadata.name.as_deref() != Some(victim_name.as_str())
                    && p.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.name == daemon)
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
            }))
        },
    )
    .await?;
    wait_domain_ready(&env, &ns, "sturdy", 4).await?;

    // nvidia-imex dies under a running daemon: the daemon restarts it and
    // says so in a Warning Event on its pod.
    let target = daemon_pod_on(&pods, &daemon, FABRIC_NODES[2]).await?;
    let target_name = target.metadata.name.clone().unwrap_or_default();
    let target_uid = target.metadata.uid.clone().unwrap_or_default();
    let imex_pid = imex_process(&target_uid).context("no nvidia-imex process of that daemon")?;
    nvdra_e2e::supervisor::signal(imex_pid, "KILL")?;
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(env.client.clone(), NAMESPACE);
    let selector = format!("involvedObject.name={target_name},reason=IMEXRestarted");
    wait::until(
        Duration::from_secs(30),
        "an IMEXRestarted event on the daemon pod",
        || async {
            let list = events
                .list(&ListParams::default().fields(&selector))
                .await?;
            Ok(list.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("nvidia-imex exited"))
            }))
        },
    )
    .await?;
    wait::until(
        Duration::from_secs(15),
        "a new nvidia-imex under the daemon",
        || async { Ok(imex_process(&target_uid).is_some_and(|pid| pid != imex_pid)) },
    )
    .await?;
    wait_domain_ready(&env, &ns, "sturdy", 4).await?;

    // The leader dies; the standby takes over and reconciles a new domain.
    let old = leader(&env)
        .await?
        .context("no controller holds the Lease")?;
    let supervisor = nvdra_e2e::supervisor::Supervisor::new(&env.cluster.controller_dir());
    // Frozen, not killed: the supervisor would restart a killed leader, and the
    // restarted replica could win the Lease; a frozen one leaves it to the standby.
    let old_replica = replica(&old)
        .context("unexpected holder identity")?
        .to_owned();
    let frozen_at = std::time::Instant::now();
    let frozen = supervisor.kill(&old_replica, "STOP")?;
    let new = wait::value(Duration::from_secs(30), "a new leader", || {
        let env = env.clone();
        let old = old.clone();
        async move { Ok(leader(&env).await?.filter(|l| *l != old)) }
    })
    .await;
    let took = frozen_at.elapsed();
    // Thawed, the old leader finds its Lease gone and exits; the supervisor restarts it.
    nvdra_e2e::supervisor::signal(frozen, "CONT")?;
    let new = new?;
    eprintln!(
        "e2e: controller leader {old} frozen; {new} took over after {:.1}s",
        took.as_secs_f64()
    );
    ensure!(
        replica(&new) != Some(old_replica.as_str()),
        "{new} took over, not the standby"
    );
    ensure!(took <= Duration::from_secs(15), "takeover took {took:?}");
    let after = create_domain(&env, &ns, "after-failover", 0).await?;
    wait_domain_ready(&env, &ns, "after-failover", 0).await?;

    // An agent dies while it prepares a second worker's channel on its node:
    // the kubelet retries against the restarted agent, the worker runs with
    // its domain's channel.
    env.create_pod(
        &ns,
        "late",
        &[("imex", "template", "sturdy-channel")],
        Some(FABRIC_NODES[0]),
    )
    .await?;
    // Killed once the pod is bound: the kubelet is about to call (or calling) prepare.
    let late_pods = env.pods(&ns);
    wait::until(Duration::from_secs(30), "pod late bound", || async {
        Ok(late_pods
            .get("late")
            .await?
            .spec
            .and_then(|s| s.node_name)
            .is_some())
    })
    .await?;
    nvdra_e2e::node::kill_agent(&env.cluster.node_dirs(FABRIC_NODES[0]), "KILL")?;
    let late = env.running(&ns, "late", Duration::from_secs(120)).await?;
    let first = env.pods(&ns).get("w-0").await?;
    ensure!(
        channel_of(&env, &late)? == channel_of(&env, &first)?,
        "two workers of one domain on one node got different channels"
    );
    wait_domain_ready(&env, &ns, "sturdy", 4).await?;

    for name in ["late", "w-0", "w-1", "w-2", "w-3"] {
        env.delete_pod(&ns, name, Duration::from_secs(60)).await?;
    }
    delete_domain_and_check_clean(&env, &ns, "after-failover", &after).await?;
    delete_domain_and_check_clean(&env, &ns, "sturdy", &uid).await
}

/// The PID of the `nvidia-imex` stand-in the daemon of pod `pod_uid` runs
/// (its program lives in that pod's private root).
fn imex_process(pod_uid: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let program = cmdline.split(|b| *b == 0).next()?;
            let program = String::from_utf8_lossy(program);
            (program.contains(pod_uid) && program.ends_with("/usr/bin/nvidia-imex")).then_some(pid)
        })
}

/// The pod of DaemonSet `daemon` on `node`.
pub(super) async fn daemon_pod_on(pods: &Api<Pod>, daemon: &str, node: &str) -> Result<Pod> {
    pods.list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|p| {
            node_of(p) == node
                && p.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.name == daemon)
        })
        .with_context(|| format!("no pod of {daemon} on {node}"))
}

//! The latency run: 100 single-GPU pods created at once over eight 16-GPU
//! nodes; time from each pod's creation request to the first watch event
//! that shows it Running. The numbers go to `latency.json` in the run
//! directory and to stderr; docs/performance.md quotes them. Only a
//! generous completion deadline is asserted: timing on a shared 2-core
//! machine is a measurement, not a test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};

use super::env::{Env, phase};

const PODS: usize = 100;

/// First sightings of a pod's milestones.
#[derive(Debug, Clone, Default)]
struct Marks {
    claim: Option<Instant>,
    bound: Option<Instant>,
    running: Option<Instant>,
}

pub async fn latency_100_pods(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-latency").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {{ namespace: {ns}, name: one }}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: {{ deviceClassName: gpu.nvidia.com }}
"
    ))?;

    // Per pod, when the watch first showed: its generated claim (the
    // resourceclaim controller), its node (the scheduler), Running (the
    // kubelet emulator after NodePrepareResources).
    let marks: Arc<Mutex<BTreeMap<String, Marks>>> = Arc::default();
    let seen = marks.clone();
    let pods = env.pods(&ns);
    let watch = tokio::spawn(async move {
        let stream = watcher(pods, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Ok(Some(event)) = stream.try_next().await {
            let pods: Vec<Pod> = match event {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => vec![p],
                _ => continue,
            };
            let now = Instant::now();
            for pod in pods {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let has_claim = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.resource_claim_statuses.as_ref())
                    .is_some_and(|c| !c.is_empty());
                let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                let running = phase(&pod) == "Running";
                if let Ok(mut seen) = seen.lock() {
                    let m = seen.entry(name).or_default();
                    if has_claim {
                        m.claim.get_or_insert(now);
                    }
                    if bound {
                        m.bound.get_or_insert(now);
                    }
                    if running {
                        m.running.get_or_insert(now);
                    }
                }
            }
        }
    });

    let started = Instant::now();
    let created: Vec<(String, Instant)> = futures::stream::iter(0..PODS)
        .map(|i| {
            let env = env.clone();
            let ns = ns.clone();
            async move {
                let name = format!("lat-{i:03}");
                let at = Instant::now();
                env.create_pod(&ns, &name, &[("gpu", "template", "one")], None)
                    .await?;
                Ok::<_, anyhow::Error>((name, at))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let done = marks
            .lock()
            .map(|m| m.values().filter(|m| m.running.is_some()).count())
            .unwrap_or(0);
        if done >= PODS {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {done} of {PODS} pods Running after 240 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = started.elapsed();
    watch.abort();

    let seen = marks.lock().map(|m| m.clone()).unwrap_or_default();
    // Stage durations per pod, in ms: create→Running (the headline), and
    // its parts create→claim, claim→bound, bound→Running.
    let mut stages: [Vec<f64>; 4] = Default::default();
    for (name, at) in &created {
        let m = seen.get(name).context("pod never seen")?;
        let ran = m.running.context("pod not seen Running")?;
        // A stage the watch skipped over (two changes in one event) counts
        // as taking no time.
        let claim = m.claim.unwrap_or(ran).max(*at);
        let bound = m.bound.unwrap_or(ran).max(claim);
        let ms =
            |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
        stages[0].push(ms(*at, ran));
        stages[1].push(ms(*at, claim));
        stages[2].push(ms(claim, bound));
        stages[3].push(ms(bound, ran));
    }
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        serde_json::json!({ "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": pct(1.0) })
    };
    let [to_running, to_claim, to_bound, to_prepared] = &mut stages;
    let report = serde_json::json!({
        "pods": PODS,
        "nodes": env.cluster.spec.nodes.len(),
        "all_running_after_ms": total.as_secs_f64() * 1000.0,
        "create_to_running": summary(to_running),
        "create_to_claim_created": summary(to_claim),
        "claim_to_scheduled": summary(to_bound),
        "scheduled_to_running": summary(to_prepared),
    });
    std::fs::write(
        env.cluster.dir.join("latency.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    eprintln!("e2e: latency of {PODS} pods over 8 nodes: {report}");

    // Every pod deleted: every claim unprepared, every CDI spec removed.
    env.cluster.cp.kubectl(
        &["delete", "pods", "--all", "-n", &ns, "--wait=false"],
        None,
    )?;
    let pods = env.pods(&ns);
    nvdra_e2e::wait::until(
        Duration::from_secs(180),
        "all latency pods gone",
        || async { Ok(pods.list(&Default::default()).await?.items.is_empty()) },
    )
    .await?;
    for spec in &env.cluster.spec.nodes {
        let left = env.checkpoint(&spec.name)?;
        ensure!(
            left.is_empty(),
            "{}: claims still prepared: {:?}",
            spec.name,
            left.keys()
        );
        let specs = std::fs::read_dir(env.cluster.node_dirs(&spec.name).cdi())?
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("k8s.gpu.nvidia.com-claim_")
            })
            .count();
        ensure!(specs == 0, "{}: {specs} CDI specs left", spec.name);
    }
    Ok(())
}

/// Sum of the API server's `apiserver_request_total` for
/// `computedomaincliques` answered 409 (Conflict).
/// The 409 answers on cliques in an [`api_requests`] reading.
fn clique_conflicts(requests: &std::collections::BTreeMap<String, u64>) -> u64 {
    requests
        .iter()
        .filter(|(key, _)| key.starts_with("computedomaincliques ") && key.ends_with(" 409"))
        .map(|(_, n)| n)
        .sum()
}

/// The API server's `apiserver_request_total`, summed per
/// `"<resource>[/<subresource>] <verb> <code>"`.
fn api_requests(env: &Env) -> Result<std::collections::BTreeMap<String, u64>> {
    let metrics = env
        .cluster
        .cp
        .kubectl(&["get", "--raw", "/metrics"], None)?;
    let mut out = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels) = line
            .strip_prefix("apiserver_request_total{")
            .and_then(|rest| rest.split_once('}'))
        else {
            continue;
        };
        let label = |name: &str| {
            labels
                .0
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let Ok(count) = labels.1.trim().parse::<f64>() else {
            continue;
        };
        let sub = label("subresource");
        let resource = if sub.is_empty() {
            label("resource")
        } else {
            format!("{}/{sub}", label("resource"))
        };
        *out.entry(format!("{resource} {} {}", label("verb"), label("code")))
            .or_default() += count as u64;
    }
    Ok(out)
}

/// The busiest request kinds between two [`api_requests`] readings.
fn busiest(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    n: usize,
) -> serde_json::Value {
    let mut delta: Vec<(&String, u64)> = after
        .iter()
        .map(|(k, v)| (k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect();
    delta.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let total: u64 = delta.iter().map(|(_, v)| v).sum();
    serde_json::json!({
        "total": total,
        "top": delta.iter().take(n).map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>(),
    })
}

/// The latest container start and Ready transition among the domain's daemon pods, in
/// seconds after `since` (the API reports both in whole seconds).
async fn daemon_milestones(
    env: &Env,
    cd: &nvdra_api::ComputeDomain,
    since: std::time::SystemTime,
) -> Result<serde_json::Value> {
    let uid = cd.metadata.uid.clone().unwrap_or_default();
    let pods: kube::Api<Pod> =
        kube::Api::namespaced(env.client.clone(), nvdra_e2e::cluster::NAMESPACE);
    let selector = format!("{}={uid}", nvdra_api::names::labels::COMPUTE_DOMAIN);
    let list = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs_f64();
    let after =
        |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| t.0.as_second() as f64 - since;
    let latest = |values: Vec<f64>| values.into_iter().reduce(f64::max);
    let started = latest(
        list.items
            .iter()
            .filter_map(|p| {
                let status = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
                status.state.as_ref()?.running.as_ref()?.started_at.as_ref()
            })
            .map(after)
            .collect(),
    );
    let ready = latest(
        list.items
            .iter()
            .filter_map(|p| {
                p.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "Ready" && c.status == "True")?
                    .last_transition_time
                    .as_ref()
            })
            .map(after)
            .collect(),
    );
    Ok(serde_json::json!({
        "pods": list.items.len(),
        "last_started_after_s": started,
        "last_ready_after_s": ready,
    }))
}

/// CD scenario 2: one ComputeDomain over every node of the scale cluster
/// with four pods per node; time from the domain's creation to Ready and
/// the 409 conflicts the API server answered on cliques meanwhile.
pub async fn compute_domain_scale(env: Arc<Env>) -> Result<()> {
    use nvdra_api::ComputeDomain;
    let nodes: Vec<String> = env
        .cluster
        .spec
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let ns = env.namespace("e2e-scale").await?;
    let requests_before = api_requests(&env)?;
    let conflicts_before = clique_conflicts(&requests_before);
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    env.apply(&format!(
        "apiVersion: resource.nvidia.com/v1beta1
kind: ComputeDomain
metadata: {{ namespace: {ns}, name: big }}
spec:
  numNodes: {}
  channel:
    resourceClaimTemplate: {{ name: big-channel }}
",
        nodes.len()
    ))?;
    let pods: Vec<(String, String)> = nodes
        .iter()
        .flat_map(|n| (0..4).map(move |i| (format!("{n}-{i}"), n.clone())))
        .collect();
    futures::stream::iter(pods.iter().cloned())
        .map(|(name, node)| {
            let env = env.clone();
            let ns = ns.clone();
            async move {
                env.create_pod(
                    &ns,
                    &name,
                    &[("imex", "template", "big-channel")],
                    Some(&node),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();
    let cds: kube::Api<ComputeDomain> = kube::Api::namespaced(env.client.clone(), &ns);
    let want = nodes.len();
    nvdra_e2e::wait::until(Duration::from_secs(300), "the big domain Ready", || async {
        let status = serde_json::to_value(&cds.get("big").await?.status)?;
        let rows = status["nodes"].as_array().cloned().unwrap_or_default();
        Ok(status["status"] == "Ready"
            && rows.len() == want
            && rows.iter().all(|n| n["status"] == "Ready"))
    })
    .await?;
    let ready = started.elapsed();
    let requests_until_ready = busiest(&requests_before, &api_requests(&env)?, 15);
    let daemons = daemon_milestones(&env, &cds.get("big").await?, started_wall).await?;
    let api = env.pods(&ns);
    nvdra_e2e::wait::until(Duration::from_secs(300), "every worker Running", || async {
        let list = api.list(&Default::default()).await?;
        Ok(list.items.len() == pods.len() && list.items.iter().all(|p| phase(p) == "Running"))
    })
    .await?;
    let running = started.elapsed();
    // Saturating: counters restart at 0 if the API server restarted meanwhile.
    let conflicts = clique_conflicts(&api_requests(&env)?).saturating_sub(conflicts_before);
    let report = serde_json::json!({
        "nodes": want,
        "pods": pods.len(),
        "pods_created_after_ms": created.as_secs_f64() * 1000.0,
        "domain_ready_after_ms": ready.as_secs_f64() * 1000.0,
        "all_pods_running_after_ms": running.as_secs_f64() * 1000.0,
        "clique_conflicts_409": conflicts,
        // When the last daemon container started and the last daemon pod turned Ready
        // (from the pods' status, whole seconds): everything before the first is
        // Kubernetes scheduling the workers and the DaemonSet's pods.
        "daemons": daemons,
        // null: upstream's defaults (scheduler 50, controller-manager 20).
        "control_plane_client_qps": env.cluster.spec.client_qps,
        // What the API server served from creation to Ready (metrics reads included).
        "api_requests_until_ready": requests_until_ready,
    });
    std::fs::write(
        env.cluster.dir.join("scale.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    eprintln!("e2e: ComputeDomain over {want} nodes x 4 pods: {report}");
    ensure!(
        conflicts == 0,
        "{conflicts} clique writes were answered 409"
    );

    env.cluster.cp.kubectl(
        &["delete", "pods", "--all", "-n", &ns, "--wait=false"],
        None,
    )?;
    cds.delete("big", &Default::default()).await?;
    nvdra_e2e::wait::until(Duration::from_secs(300), "the big domain gone", || async {
        Ok(cds.get_opt("big").await?.is_none())
    })
    .await
}

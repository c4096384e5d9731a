//! Metrics as an operator consumes them: every component's `/metrics` passes
//! `promtool check metrics` (Prometheus' own lint of names, units and help),
//! and a real Prometheus server (Debian's package) scrapes every agent and
//! controller of the cluster and finds the key series.
//!
//! The IMEX daemons exist only while a ComputeDomain does: the Prometheus
//! scenario creates a one-node domain, and the ComputeDomain scenario checks
//! every daemon's `/metrics` with promtool.
//!
//! Both need Debian's `prometheus` package (`promtool`, `prometheus`), which
//! `scripts/test` installs; run by hand without it, the scenario fails and
//! says so.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::computedomain;
use super::env::Env;

/// `GET http://127.0.0.1:<port><path>` (HTTP/1.0, so no chunked body);
/// the status code and body.
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// `GET http://<host>:<port><path>`, as [`http_get`].
pub fn http_get_at(host: &str, port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream =
        TcpStream::connect((host, port)).with_context(|| format!("connect to {host}:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {host}:{port}{path}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

fn tool(name: &str) -> Result<()> {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        found,
        "{name} is not installed: install Debian's prometheus package \
         (apt-get install --no-install-recommends prometheus; scripts/test does)"
    );
    Ok(())
}

/// The HTTP ports of every agent and controller, named for messages.
fn targets(env: &Env) -> Vec<(String, u16)> {
    let agents = env
        .cluster
        .spec
        .nodes
        .iter()
        .zip(&env.cluster.agent_ports)
        .map(|(n, p)| (format!("agent {}", n.name), *p));
    let controllers = env
        .cluster
        .controller_ports
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("controller-{i}"), *p));
    agents.chain(controllers).collect()
}

/// Every component's exposition passes `promtool check metrics`.
pub async fn metrics_pass_promtool(env: Arc<Env>) -> Result<()> {
    tool("promtool")?;
    let targets = targets(&env);
    ensure!(
        !env.cluster.controller_ports.is_empty(),
        "the cluster runs no controller"
    );
    for (name, port) in &targets {
        let (status, body) = http_get(*port, "/metrics")?;
        ensure!(status == 200, "{name}: /metrics answered {status}");
        promtool_check_metrics(name, &body)?;
    }
    Ok(())
}

/// `promtool check metrics` on one exposition: no error and no lint finding.
pub fn promtool_check_metrics(name: &str, body: &str) -> Result<()> {
    tool("promtool")?;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "{name}: promtool check metrics: {said}"
    );
    Ok(())
}

/// A Prometheus server, stopped on drop.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The chart's alerting rules (its PrometheusRule's spec), as a rule file.
fn chart_rules(env: &Env) -> Result<String> {
    let out = Command::new(&env.cluster.tools.helm)
        .args([
            "template",
            "nvdra",
            &nvdra_e2e::tools::repo_root()
                .join("charts/nvdra")
                .display()
                .to_string(),
            "--namespace",
            nvdra_e2e::cluster::NAMESPACE,
            "--set",
            "gpuResourcesEnabledOverride=true",
            "--set",
            "monitoring.prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ])
        .output()
        .context("run helm template")?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout)?;
    // The rule file is the object's spec, one level up.
    let spec: Vec<&str> = rendered
        .lines()
        .skip_while(|l| *l != "spec:")
        .skip(1)
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    ensure!(
        !spec.is_empty(),
        "the chart rendered no PrometheusRule spec"
    );
    Ok(spec.join("\n") + "\n")
}

fn start_prometheus(
    dir: &Path,
    port: u16,
    targets: &[(String, u16)],
    daemons: &[String],
    rules: &str,
) -> Result<Prometheus> {
    std::fs::create_dir_all(dir)?;
    let list = |prefix: &str| {
        targets
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, p)| format!("'127.0.0.1:{p}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(dir.join("rules.yml"), rules)?;
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}
rule_files: [rules.yml]
scrape_configs:
  - job_name: nvdra-agent
    static_configs: [{{ targets: [{}] }}]
  - job_name: nvdra-controller
    static_configs: [{{ targets: [{}] }}]
  - job_name: nvdra-imex-daemon
    static_configs: [{{ targets: [{}] }}]
",
        list("agent"),
        list("controller"),
        daemons
            .iter()
            .map(|d| format!("'{d}'"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start prometheus")?;
    Ok(Prometheus(child))
}

/// The chart's Grafana dashboard: (panel title, expression) for every
/// target, with the `$job` variable at its default (`.*`).
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = nvdra_e2e::tools::repo_root().join("charts/nvdra/dashboards/nvdra.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parse {}", path.display()))?;
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?} has a target without expr"))?;
            out.push((title.clone(), expr.replace("$job", ".*")));
        }
    }
    ensure!(!out.is_empty(), "the dashboard has no queries");
    Ok(out)
}

/// `promtool check rules` on every dashboard expression, each wrapped in a
/// recording rule (promtool's way to parse PromQL).
fn check_dashboard_syntax(dir: &Path, queries: &[(String, String)]) -> Result<()> {
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({ "record": format!("nvdra_dashboard:query_{i}"), "expr": expr }))
        .collect();
    let file = dir.join("dashboard-rules.json");
    std::fs::write(
        &file,
        serde_json::to_vec(
            &serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] }),
        )?,
    )?;
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .context("run promtool")?;
    ensure!(
        out.status.success(),
        "promtool check rules on the dashboard's queries: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One instant query; the result vector.
fn query(port: u16, promql: &str) -> Result<Vec<serde_json::Value>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(port, &format!("/api/v1/query?query={encoded}"))?;
    ensure!(status == 200, "query {promql}: HTTP {status}: {body}");
    let value: serde_json::Value = serde_json::from_str(&body)?;
    Ok(value["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A real Prometheus scrapes every agent, controller and IMEX daemon and finds the series
/// an operator's dashboards and alerts use; the chart's alerting rules load,
/// evaluate without error, and none fires on the healthy cluster.
pub async fn prometheus_scrapes_every_component(env: Arc<Env>) -> Result<()> {
    tool("prometheus")?;
    // IMEX daemons exist only for a ComputeDomain: one with one node, so
    // every kind of component is scraped.
    let ns = env.namespace("e2e-prometheus").await?;
    let uid = computedomain::create_domain(&env, &ns, "scraped", 1).await?;
    let node = computedomain::FABRIC_NODES[0];
    env.create_pod(
        &ns,
        "worker",
        &[("imex", "template", "scraped-channel")],
        Some(node),
    )
    .await?;
    let scraped = scrape_everything(&env, &ns, &uid, node).await;
    env.delete_pod(&ns, "worker", Duration::from_secs(60))
        .await?;
    computedomain::delete_domain_and_check_clean(&env, &ns, "scraped", &uid).await?;
    scraped
}

async fn scrape_everything(env: &Env, ns: &str, uid: &str, node: &str) -> Result<()> {
    env.running(ns, "worker", Duration::from_secs(120)).await?;
    computedomain::wait_domain_ready(env, ns, "scraped", 1).await?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(env.client.clone(), nvdra_e2e::cluster::NAMESPACE);
    let daemon =
        computedomain::daemon_pod_on(&pods, &nvdra_api::names::objects::daemon_name(uid), node)
            .await?;
    let daemon_ip = daemon
        .status
        .and_then(|s| s.pod_ip)
        .context("the daemon pod has no IP")?;
    let daemons = [format!("{daemon_ip}:8082")];

    let targets = targets(env);
    let port = env.cluster.cp.free_ports(1)?[0];
    let rules = chart_rules(env)?;
    let alerts = rules.matches("- alert:").count();
    ensure!(alerts > 0, "the chart's PrometheusRule has no alerts");
    let _server = start_prometheus(
        &env.cluster.dir.join("prometheus"),
        port,
        &targets,
        &daemons,
        &rules,
    )?;

    let want = targets.len() + daemons.len();
    let mut up = 0;
    for _ in 0..60 {
        up = query(port, "up == 1").map(|r| r.len()).unwrap_or(0);
        if up == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(up == want, "{up} of {want} targets up after 30 s");

    let nodes = env.cluster.spec.nodes.len();
    let series = [
        // Per agent: its devices by type, its slice pool, its request counters.
        ("count(nvdra_agent_slices > 0)", nodes),
        (
            "count(count by (instance) (nvidia_dra_prepared_devices))",
            nodes,
        ),
        (
            "count(nvdra_agent_slice_publish_consecutive_failures == 0)",
            nodes,
        ),
        (
            "count(process_resident_memory_bytes{job=\"nvdra-agent\"})",
            nodes,
        ),
        // Exactly one controller replica leads.
        ("sum(nvdra_controller_leader)", 1),
        // The domain's one daemon joined, runs nvidia-imex and knows itself.
        ("sum(nvdra_imex_daemon_ready)", 1),
        ("sum(nvdra_imex_daemon_imex_running)", 1),
        ("sum(nvdra_imex_daemon_peers)", 1),
        (
            "count(process_resident_memory_bytes{job=\"nvdra-controller\"})",
            env.cluster.controller_ports.len(),
        ),
    ];
    for (promql, expected) in series {
        let result = query(port, promql)?;
        let value = result
            .first()
            .and_then(|r| r["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if value != Some(expected as f64) {
            bail!("{promql}: want {expected}, Prometheus says {result:?}");
        }
    }

    // What the chart's resource requests are sized from (docs/performance.md).
    for job in ["nvdra-agent", "nvdra-controller", "nvdra-imex-daemon"] {
        let rss = query(
            port,
            &format!("max(process_resident_memory_bytes{{job=\"{job}\"}})"),
        )?;
        let cpu = query(
            port,
            &format!("max(process_cpu_seconds_total{{job=\"{job}\"}})"),
        )?;
        let value = |r: &[serde_json::Value]| {
            r.first()
                .and_then(|v| v["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        eprintln!(
            "e2e: {job}: largest resident memory {:.1} MiB, most CPU used so far {:.0} s \
             (whole seconds, as the process collector counts)",
            value(&rss) / 1048576.0,
            value(&cpu)
        );
    }

    // Every dashboard query parses and runs; the panels that always have
    // data on a running cluster have it.
    let queries = dashboard_queries()?;
    check_dashboard_syntax(&env.cluster.dir.join("prometheus"), &queries)?;
    let always = [
        "Prepared devices by type",
        "ResourceSlice publish failures in a row",
        "ComputeDomains by status",
        "Resident memory",
    ];
    for (title, expr) in &queries {
        let result = query(port, expr).with_context(|| format!("panel {title:?}"))?;
        ensure!(
            !result.is_empty() || !always.contains(&title.as_str()),
            "panel {title:?}: {expr} returned no series"
        );
    }

    // Every alerting rule has been evaluated, cleanly, and none is firing.
    let mut last = String::new();
    for _ in 0..20 {
        let (status, body) = http_get(port, "/api/v1/rules")?;
        ensure!(status == 200, "/api/v1/rules: HTTP {status}");
        let value: serde_json::Value = serde_json::from_str(&body)?;
        let rules: Vec<&serde_json::Value> = value["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        ensure!(
            rules.len() == alerts,
            "Prometheus loaded {} rules, the chart has {alerts}",
            rules.len()
        );
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok" || r["state"] == "firing")
            .map(|r| {
                format!(
                    "{} health={} state={} {}",
                    r["name"], r["health"], r["state"], r["lastError"]
                )
            })
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        last = bad.join("; ");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("alerting rules not all evaluated cleanly and quiet: {last}")
}

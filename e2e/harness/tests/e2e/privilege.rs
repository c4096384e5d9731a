//! Least privilege beyond RBAC: the chart's ValidatingAdmissionPolicies keep
//! an agent to its own node and an IMEX daemon to its own pod and clique row,
//! by the node and pod its ServiceAccount token is bound to.
//!
//! The agent's writes go through a real agent identity (its node-bound
//! token); the daemon's through the admin impersonating the daemon's
//! ServiceAccount with the user extras a pod-bound token carries. First it
//! checks that identity is the one the `helm install`ed release gives the
//! agent's DaemonSet.

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use nvdra_e2e::cluster::{NAMESPACE, RELEASE};
use serde_json::Value;

use super::env::Env;

const NODE_PREFIX: &str = "authentication.kubernetes.io/node-name";
const POD_PREFIX: &str = "authentication.kubernetes.io/pod-name";

/// Runs kubectl as the agent of `node`.
fn as_agent(env: &Env, node: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let kubeconfig = env
        .cluster
        .dir
        .join("identities")
        .join(format!("agent-{node}.kubeconfig"));
    nvdra_e2e::controlplane::kubectl(&env.cluster.cp.bin, &kubeconfig, args, stdin)
}

/// Runs kubectl as the IMEX daemon of pod `pod` on `node`.
fn as_daemon(
    env: &Env,
    node: &str,
    pod: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let user = format!("system:serviceaccount:{NAMESPACE}:compute-domain-daemon-service-account");
    let mut all = vec![
        format!("--as={user}"),
        format!("--as-user-extra={NODE_PREFIX}={node}"),
        format!("--as-user-extra={POD_PREFIX}={pod}"),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    env.cluster.cp.kubectl(&all, stdin)
}

/// A client acting as the IMEX daemon of pod `pod` on `node`: the admin
/// impersonating the daemon's ServiceAccount with a pod-bound token's extras.
async fn daemon_client(env: &Env, node: &str, pod: &str) -> Result<kube::Client> {
    let path = env.cluster.cp.admin_kubeconfig();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let user = format!("system:serviceaccount:{NAMESPACE}:compute-domain-daemon-service-account");
    // Extra keys travel percent-encoded in the header name.
    let extra = |key: &str| format!("Impersonate-Extra-{}", key.replace('/', "%2F"));
    for (name, value) in [
        ("Impersonate-User".to_owned(), user.as_str()),
        (extra(NODE_PREFIX), node),
        (extra(POD_PREFIX), pod),
    ] {
        config.headers.push((
            http::HeaderName::try_from(name)?,
            http::HeaderValue::try_from(value)?,
        ));
    }
    Ok(kube::Client::try_from(config)?)
}

/// `result` failed with a denial whose text contains `expected`.
fn denied(what: &str, result: Result<String>, expected: &str) -> Result<()> {
    match result {
        Ok(out) => bail!("{what}: allowed, expected a denial ({out})"),
        Err(err) => {
            let text = format!("{err:#}");
            ensure!(
                text.contains(expected),
                "{what}: failed, but not with {expected:?}: {text}"
            );
            Ok(())
        }
    }
}

fn slice(name: &str, node: &str) -> String {
    format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceSlice
metadata: {{ name: {name} }}
spec:
  driver: check.nvdra.example.com
  nodeName: {node}
  pool: {{ name: {node}, generation: 1, resourceSliceCount: 1 }}
  devices: [{{ name: dev-0 }}]
"
    )
}

/// The chart is installed as a Helm release, and the agent runs as the
/// ServiceAccount the release's DaemonSet names.
fn agent_runs_as_the_release_says(env: &Env, node: &str) -> Result<()> {
    let admin = env.cluster.cp.admin_kubeconfig();
    let out = std::process::Command::new(&env.cluster.tools.helm)
        .args(["status", RELEASE, "--namespace", NAMESPACE, "-o", "json"])
        .arg("--kubeconfig")
        .arg(&admin)
        .output()
        .context("run helm status")?;
    ensure!(
        out.status.success(),
        "helm status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        status["info"]["status"] == "deployed",
        "release {RELEASE} is {}, want deployed",
        status["info"]["status"]
    );
    // The chart names the DaemonSet `<chart name>-kubelet-plugin`.
    let ds: Value = serde_json::from_str(&env.cluster.cp.kubectl(
        &[
            "get",
            "daemonset",
            "nvdra-kubelet-plugin",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ],
        None,
    )?)?;
    ensure!(
        ds["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE,
        "the kubelet-plugin DaemonSet is not the release's: {}",
        ds["metadata"]
    );
    let sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("the release's DaemonSet names no ServiceAccount")?;
    let whoami: Value = serde_json::from_str(&as_agent(
        env,
        node,
        &["auth", "whoami", "-o", "json"],
        None,
    )?)?;
    let want = format!("system:serviceaccount:{NAMESPACE}:{sa}");
    ensure!(
        whoami["status"]["userInfo"]["username"] == want.as_str(),
        "the agent of {node} runs as {}, the release's DaemonSet as {want}",
        whoami["status"]["userInfo"]["username"]
    );
    Ok(())
}

/// The agent of one node may write its own node's ResourceSlices and its own
/// Node's ComputeDomain labels, and nothing of another node.
pub async fn agent_confined_to_its_node(env: Arc<Env>) -> Result<()> {
    let own = "h100-0";
    let other = "h200-0";
    agent_runs_as_the_release_says(&env, own)?;
    let apply = [
        "apply",
        "--server-side",
        "--field-manager=nvdra-agent",
        "-f",
        "-",
    ];

    denied(
        "agent writes another node's ResourceSlice",
        as_agent(
            &env,
            own,
            &apply,
            Some(&slice("privilege-check-other", other)),
        ),
        "may only write ResourceSlices whose spec.nodeName is that node",
    )?;
    as_agent(&env, own, &apply, Some(&slice("privilege-check-own", own)))
        .context("the agent writes a ResourceSlice of its own node")?;
    as_agent(
        &env,
        own,
        &["delete", "resourceslice", "privilege-check-own"],
        None,
    )
    .context("the agent deletes a ResourceSlice of its own node")?;

    let cd_label = "resource.nvidia.com/computeDomain.privilege-check";
    denied(
        "agent labels another Node",
        as_agent(
            &env,
            own,
            &["label", "node", other, &format!("{cd_label}=true")],
            None,
        ),
        "may only change its own Node",
    )?;
    denied(
        "agent sets a label outside the ComputeDomain prefix on its Node",
        as_agent(
            &env,
            own,
            &["label", "node", own, "example.com/owned=true"],
            None,
        ),
        "may only set or remove resource.nvidia.com/computeDomain.<uid>",
    )?;
    denied(
        "agent taints its Node",
        as_agent(
            &env,
            own,
            &["taint", "node", own, "example.com/t=x:NoSchedule"],
            None,
        ),
        "may only set or remove",
    )?;
    as_agent(
        &env,
        own,
        &["label", "node", own, &format!("{cd_label}=true")],
        None,
    )
    .context("the agent sets a ComputeDomain label on its Node")?;
    as_agent(
        &env,
        own,
        &["label", "node", own, &format!("{cd_label}-")],
        None,
    )
    .context("the agent removes a ComputeDomain label from its Node")?;

    // A token that names no node (a plain ServiceAccount token) is refused.
    let sa = format!(
        "system:serviceaccount:{NAMESPACE}:{}-service-account-kubeletplugin",
        nvdra_e2e::cluster::RELEASE
    );
    denied(
        "agent identity without a node",
        env.cluster.cp.kubectl(
            &[&format!("--as={sa}"), "apply", "--server-side", "-f", "-"],
            Some(&slice("privilege-check-nameless", own)),
        ),
        "names no node",
    )?;
    Ok(())
}

/// An IMEX daemon may label only its own pod and change only its own node's
/// row of a clique.
pub async fn daemon_confined_to_its_row(env: Arc<Env>) -> Result<()> {
    let pod = |name: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{ namespace: {NAMESPACE}, name: {name} }}
spec:
  nodeSelector: {{ example.com/nowhere: \"true\" }}
  containers: [{{ name: c, image: example.com/none }}]
"
        )
    };
    env.apply(&pod("privilege-check-a"))?;
    env.apply(&pod("privilege-check-b"))?;
    // The daemon's own request: a bare merge patch. It may not read pods, so
    // kubectl (which reads the object first) cannot stand in for it here.
    let daemon: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(
        daemon_client(&env, "gb200-0", "privilege-check-a").await?,
        NAMESPACE,
    );
    let label = serde_json::json!({
        "metadata": {"labels": {"resource.nvidia.com/computeDomain.cliqueID": "x"}}
    });
    let run = |target: &'static str| {
        let (daemon, label) = (daemon.clone(), label.clone());
        async move {
            daemon
                .patch(
                    target,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&label),
                )
                .await
                .map(|_| String::new())
                .map_err(anyhow::Error::from)
        }
    };
    denied(
        "daemon labels another pod",
        run("privilege-check-b").await,
        "may only change its own pod",
    )?;
    run("privilege-check-a")
        .await
        .context("the daemon labels its own pod")?;
    denied(
        "daemon reads pods",
        as_daemon(
            &env,
            "gb200-0",
            "privilege-check-a",
            &["get", "pods", "-n", NAMESPACE],
            None,
        ),
        "cannot list resource \"pods\"",
    )?;

    let clique = |rows: &[(&str, i64)]| {
        let rows: Vec<String> = rows
            .iter()
            .map(|(node, index)| {
                format!(
                    "  - {{ nodeName: {node}, ipAddress: 127.0.0.9, cliqueID: privilege.1, \
                     index: {index}, status: NotReady }}"
                )
            })
            .collect();
        format!(
            "apiVersion: resource.nvidia.com/v1beta1
kind: ComputeDomainClique
metadata: {{ namespace: {NAMESPACE}, name: privilege-check.privilege.1 }}
daemons:
{}
",
            rows.join("\n")
        )
    };
    let apply_as = |node: &str, manager: &str, body: String| {
        as_daemon(
            &env,
            node,
            "privilege-check-a",
            &[
                "apply",
                "--server-side",
                // Past server-side apply's own conflict check, so admission judges.
                "--force-conflicts",
                &format!("--field-manager={manager}"),
                "-f",
                "-",
            ],
            Some(&body),
        )
    };
    denied(
        "daemon writes another node's clique row",
        apply_as("gb200-0", "check.gb200-0", clique(&[("gb200-1", 0)])),
        "may only add, change or remove its own node's row",
    )?;
    apply_as("gb200-0", "check.gb200-0", clique(&[("gb200-0", 0)]))
        .context("the daemon adds its own row")?;
    apply_as("gb200-1", "check.gb200-1", clique(&[("gb200-1", 1)]))
        .context("a second daemon adds its own row beside the first")?;
    denied(
        "daemon rewrites a peer's row",
        apply_as(
            "gb200-0",
            "check.gb200-0",
            clique(&[("gb200-0", 0), ("gb200-1", 5)]),
        ),
        "may only add, change or remove its own node's row",
    )?;

    env.cluster.cp.kubectl(
        &[
            "delete",
            "-n",
            NAMESPACE,
            "pod/privilege-check-a",
            "pod/privilege-check-b",
            "computedomainclique/privilege-check.privilege.1",
            "--wait=false",
        ],
        None,
    )?;
    Ok(())
}

//! The real control plane of a local cluster, through `e2e/controlplane/up.sh`
//! and `down.sh`, and `kubectl` (the one built with it) for what is easiest
//! said as a manifest.
//!
//! The run directory belongs to one cluster: up.sh refuses a non-empty one
//! and down.sh leaves it for inspection (logs, etcd data, certificates).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::tools::repo_root;

/// A started control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// `nvdra-controlplane`.
    pub bin: PathBuf,
    /// The run directory given to up.sh.
    pub dir: PathBuf,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-scheduler and
    /// kube-controller-manager in `dir` with kubelet identities for `nodes`;
    /// `client_qps` sets the scheduler's and controller-manager's client QPS
    /// (else upstream's defaults).
    pub fn up(
        bin: &Path,
        dir: &Path,
        nodes: &[String],
        controllers: &str,
        client_qps: Option<u32>,
    ) -> Result<Self> {
        let mut cmd = Command::new(repo_root().join("e2e/controlplane/up.sh"));
        cmd.arg(dir)
            .env("NVDRA_CP_BIN", bin)
            .env("NVDRA_CP_NODES", nodes.join(" "))
            .env("NVDRA_CP_CONTROLLERS", controllers)
            .env_remove("NVDRA_CP_CLIENT_QPS")
            .stdin(Stdio::null());
        if let Some(qps) = client_qps {
            cmd.env("NVDRA_CP_CLIENT_QPS", qps.to_string());
        }
        let status = cmd.status().context("run e2e/controlplane/up.sh")?;
        if !status.success() {
            bail!("e2e/controlplane/up.sh {} failed ({status})", dir.display());
        }
        Ok(Self::existing(bin, dir))
    }

    /// A handle on a control plane an earlier command started.
    pub fn existing(bin: &Path, dir: &Path) -> Self {
        Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
        }
    }

    /// Stops every control-plane process (down.sh verifies none is left).
    pub fn down(dir: &Path) -> Result<()> {
        let status = Command::new(repo_root().join("e2e/controlplane/down.sh"))
            .arg(dir)
            .stdin(Stdio::null())
            .status()
            .context("run e2e/controlplane/down.sh")?;
        if !status.success() {
            bail!(
                "e2e/controlplane/down.sh {} failed ({status})",
                dir.display()
            );
        }
        Ok(())
    }

    /// The cluster-admin kubeconfig (O=system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The kubeconfig of `system:node:<node>`.
    pub fn node_kubeconfig(&self, node: &str) -> PathBuf {
        self.dir.join(format!("node-{node}.kubeconfig"))
    }

    /// A client acting as cluster admin.
    pub async fn admin_client(&self) -> Result<kube::Client> {
        client_from(&self.admin_kubeconfig()).await
    }

    /// Runs `kubectl ARGS` as cluster admin with `stdin` piped in; returns
    /// stdout, or an error carrying stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        kubectl(&self.bin, &self.admin_kubeconfig(), args, stdin)
    }

    /// `n` free loopback ports, none of them in `reserved` (ports handed
    /// out earlier whose owners have not bound them yet).
    pub fn free_ports_except(&self, n: usize, reserved: &[u16]) -> Result<Vec<u16>> {
        // Draws are random over ~12 800 ports, so a retry almost never
        // repeats a clash; a handful of attempts only guards the loop.
        for _ in 0..8 {
            let ports = self.free_ports(n)?;
            if !ports.iter().any(|p| reserved.contains(p)) {
                return Ok(ports);
            }
        }
        bail!("nvdra-controlplane free-ports kept returning reserved ports {reserved:?}")
    }

    /// `n` free loopback ports.
    pub fn free_ports(&self, n: usize) -> Result<Vec<u16>> {
        let out = Command::new(&self.bin)
            .args(["free-ports", &n.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("run nvdra-controlplane free-ports")?;
        if !out.status.success() {
            bail!(
                "nvdra-controlplane free-ports failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|p| {
                p.parse()
                    .with_context(|| format!("free-ports printed {p:?}"))
            })
            .collect()
    }
}

/// Runs `kubectl --kubeconfig KUBECONFIG ARGS`.
pub fn kubectl(
    bin: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let mut child = Command::new(bin)
        .arg("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start kubectl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .context("write kubectl's stdin")?;
    }
    let out = child.wait_with_output().context("wait for kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("kubectl printed non-UTF-8 output")
}

/// A client from a kubeconfig file (its current context).
pub async fn client_from(path: &Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("read {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .with_context(|| format!("load {}", path.display()))?;
    kube::Client::try_from(config).context("build a Kubernetes client")
}

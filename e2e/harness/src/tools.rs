//! The programs a local cluster is made of, and where they come from.
//!
//! Go tools (the control plane, helm) are built by their `build.sh` scripts,
//! which cache them and print their paths; this module runs those scripts
//! (an up-to-date build returns at once) unless an environment variable
//! names the binary. Rust binaries (`nvdra-agent`, `nvdra-kubelet-emulator`)
//! are taken from the cargo target directory this harness was built into;
//! a missing one is an error that says how to build it, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Explicit program paths (flags or environment), each overriding the
/// default way of finding that program.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ToolPaths {
    /// nvdra-controlplane binary (default: built by e2e/controlplane/build.sh).
    #[arg(long, env = "NVDRA_CP_BIN")]
    pub controlplane_bin: Option<PathBuf>,
    /// helm binary (default: built by e2e/helm/build.sh).
    #[arg(long, env = "NVDRA_HELM_BIN")]
    pub helm_bin: Option<PathBuf>,
    /// nvdra-agent binary (default: next to this program in the target dir).
    #[arg(long, env = "NVDRA_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// nvdra-kubelet-emulator binary (default: next to this program).
    #[arg(long, env = "NVDRA_EMULATOR_BIN")]
    pub emulator_bin: Option<PathBuf>,
}

/// Absolute paths of every program a cluster runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `nvdra-controlplane`: etcd, kube-apiserver, scheduler,
    /// controller-manager, kubectl and the process supervisor.
    pub controlplane: PathBuf,
    /// helm v3, to render `charts/nvdra` as a user's install would.
    pub helm: PathBuf,
    /// The node agent under test.
    pub agent: PathBuf,
    /// The kubelet emulator that plays each simulated node's kubelet.
    pub emulator: PathBuf,
}

impl Tools {
    /// Finds (and for the Go tools, builds when stale) every program.
    pub fn locate(paths: &ToolPaths) -> Result<Self> {
        let root = repo_root();
        Ok(Self {
            controlplane: go_tool(
                paths.controlplane_bin.as_deref(),
                &root.join("e2e/controlplane/build.sh"),
            )?,
            helm: go_tool(paths.helm_bin.as_deref(), &root.join("e2e/helm/build.sh"))?,
            agent: rust_bin(paths.agent_bin.as_deref(), "nvdra-agent", "nvdra-agent")?,
            emulator: rust_bin(
                paths.emulator_bin.as_deref(),
                "nvdra-kubelet-emulator",
                "nvdra-kubelet-emulator",
            )?,
        })
    }
}

/// The repository root (this crate lives in `e2e/harness`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

fn go_tool(given: Option<&Path>, script: &Path) -> Result<PathBuf> {
    if let Some(path) = given {
        return existing(path.to_owned(), "its flag");
    }
    let out = Command::new(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let path = String::from_utf8(out.stdout)
        .with_context(|| format!("{} printed a non-UTF-8 path", script.display()))?;
    existing(PathBuf::from(path.trim()), &script.display().to_string())
}

/// A binary of this workspace: the given path, else next to the running
/// executable (`target/<profile>/`, or its parent for test binaries in
/// `target/<profile>/deps/`).
fn rust_bin(given: Option<&Path>, name: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = given {
        return existing(path.to_owned(), "its flag");
    }
    let exe = std::env::current_exe().context("locate the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {}; run `cargo build -p {package} --bin {name}` \
         (scripts/test and scripts/local-cluster do) or pass its path",
        exe.display()
    )
}

fn existing(path: PathBuf, from: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{} (from {from}) is not a file", path.display())
    }
}

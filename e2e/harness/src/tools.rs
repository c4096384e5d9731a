//! The programs a local cluster is made of, and where they come from.
//!
//! The control plane is built by `e2e/controlplane/build.sh` and helm
//! fetched by `e2e/helm/fetch.sh`; both cache the binary and print its path,
//! and this module runs them (an up-to-date cache returns at once) unless a
//! flag names the binary.
//! This workspace's binaries (`nvdra-agent`, `nvdra-kubelet-emulator`,
//! `nvdra-controller`, ...) are taken from the cargo target directory this
//! harness runs from; a missing one is an error that says how to build it,
//! never a silent skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Explicit program locations (flags or environment), each overriding the
/// default way of finding them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ToolPaths {
    /// nvdra-controlplane binary (default: built by e2e/controlplane/build.sh).
    #[arg(long, env = "NVDRA_CP_BIN")]
    pub controlplane_bin: Option<PathBuf>,
    /// helm binary (default: fetched by e2e/helm/fetch.sh).
    #[arg(long, env = "NVDRA_HELM_BIN")]
    pub helm_bin: Option<PathBuf>,
    /// Directory holding this workspace's binaries (nvdra-agent,
    /// nvdra-kubelet-emulator, ...; default: the cargo target directory this
    /// program runs from).
    #[arg(long, env = "NVDRA_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
}

/// Absolute paths of every program a cluster runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `nvdra-controlplane`: etcd, kube-apiserver, scheduler,
    /// controller-manager, kubectl and the process supervisor.
    pub controlplane: PathBuf,
    /// helm v4, to install `charts/nvdra` as a user does.
    pub helm: PathBuf,
    /// The directory of this workspace's binaries; pods of our image run
    /// programs from here.
    pub bin_dir: PathBuf,
}

impl Tools {
    /// Finds (and for the cached tools, builds or fetches when stale) every
    /// program.
    pub fn locate(paths: &ToolPaths) -> Result<Self> {
        let root = repo_root();
        let bin_dir = match &paths.bin_dir {
            Some(dir) => dir.clone(),
            None => target_dir()?,
        };
        let tools = Self {
            controlplane: cached_tool(
                paths.controlplane_bin.as_deref(),
                &root.join("e2e/controlplane/build.sh"),
            )?,
            helm: cached_tool(paths.helm_bin.as_deref(), &root.join("e2e/helm/fetch.sh"))?,
            bin_dir,
        };
        // The two every cluster needs, checked up front.
        tools.bin("nvdra-agent")?;
        tools.bin("nvdra-kubelet-emulator")?;
        Ok(tools)
    }

    /// The workspace binary `name`, or an error saying how to build it.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            bail!(
                "{} is not built; run `cargo build --bins` for its package \
                 (scripts/test and scripts/local-cluster do) or pass --bin-dir",
                path.display()
            )
        }
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

fn cached_tool(given: Option<&Path>, script: &Path) -> Result<PathBuf> {
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

/// `target/<profile>/`: the running executable's directory, or its parent
/// for test binaries in `target/<profile>/deps/`.
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the running executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    Ok(match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    })
}

fn existing(path: PathBuf, from: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{} (from {from}) is not a file", path.display())
    }
}

//! Command-line flags of `nvdra-imex-daemon`.
//!
//! Every flag is also an environment variable. The upstream names (`CLIQUE_ID`,
//! `COMPUTE_DOMAIN_UUID`, `NODE_NAME`, …) are a contract: the DaemonSet the controller renders
//! sets some and the agent's CDI edits inject the others, so they never change. Flags new in
//! nvdra use `NVDRA_*` variables.
//!
//! The flags sit on the top-level command (`nvdra-imex-daemon --node-name x run`) and, being
//! `global`, may also follow the subcommand, so the probe command `nvdra-imex-daemon check`
//! sees exactly the environment `run` sees.

use std::path::PathBuf;

/// Upstream's default maximum number of daemons in one IMEX domain.
pub const DEFAULT_MAX_NODES: u32 = 18;

/// The per-node ComputeDomain daemon: supervises `nvidia-imex` and publishes clique membership.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "nvdra-imex-daemon", version)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Everything both subcommands read.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Join the clique and run `nvidia-imex` until SIGTERM.
    Run,
    /// Probe: succeed when the node has no clique or the local IMEX daemon is ready.
    Check,
}

/// The daemon's settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DaemonArgs {
    /// NVLink clique ID of this node (empty: not fabric-attached). Injected by CDI.
    #[arg(
        long = "cliqueid",
        env = "CLIQUE_ID",
        default_value = "",
        global = true
    )]
    pub clique_id: String,

    /// UID of the ComputeDomain. Injected by CDI; empty means the CDI edits were not applied.
    #[arg(long, env = "COMPUTE_DOMAIN_UUID", default_value = "", global = true)]
    pub compute_domain_uuid: String,

    /// Name of the ComputeDomain. Injected by CDI.
    #[arg(long, env = "COMPUTE_DOMAIN_NAME", default_value = "", global = true)]
    pub compute_domain_name: String,

    /// Namespace of the ComputeDomain. Injected by CDI.
    #[arg(
        long,
        env = "COMPUTE_DOMAIN_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub compute_domain_namespace: String,

    /// Name of this node (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", default_value = "", global = true)]
    pub node_name: String,

    /// IP address of this pod (downward API `status.podIP`).
    #[arg(long, env = "POD_IP", default_value = "", global = true)]
    pub pod_ip: String,

    /// UID of this pod (downward API `metadata.uid`).
    #[arg(long, env = "POD_UID", default_value = "", global = true)]
    pub pod_uid: String,

    /// Name of this pod (downward API `metadata.name`).
    #[arg(long, env = "POD_NAME", default_value = "", global = true)]
    pub pod_name: String,

    /// Namespace of this pod; the clique object lives here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "", global = true)]
    pub pod_namespace: String,

    /// Maximum number of daemons in one IMEX domain: the size of `nodes.cfg`.
    #[arg(long = "max-nodes-per-imex-domain", env = "MAX_NODES_PER_IMEX_DOMAIN",
          default_value_t = DEFAULT_MAX_NODES, value_parser = clap::value_parser!(u32).range(1..=9999),
          global = true)]
    pub max_nodes: u32,

    /// Kubeconfig; unset means in-cluster configuration (or the usual kubeconfig lookup).
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// The container's root directory: every container path (`/imexd/…`, `/etc/hosts`, the
    /// IMEX binaries) is resolved under it. `/` in a real container; the e2e's kubelet
    /// emulator points it at a private directory per container.
    #[arg(long, env = "NVDRA_CONTAINER_ROOT", default_value = "/", global = true)]
    pub container_root: PathBuf,

    /// Container path of the IMEX daemon binary (from the host driver via CDI).
    #[arg(
        long,
        env = "NVDRA_IMEX_BIN",
        default_value = "/usr/bin/nvidia-imex",
        global = true
    )]
    pub imex_bin: PathBuf,

    /// Container path of the IMEX control binary (used by `check`).
    #[arg(
        long,
        env = "NVDRA_IMEX_CTL_BIN",
        default_value = "/usr/bin/nvidia-imex-ctl",
        global = true
    )]
    pub imex_ctl_bin: PathBuf,

    /// Container path of the domain's directory (the agent mounts it via CDI).
    #[arg(
        long,
        env = "NVDRA_IMEX_CONFIG_DIR",
        default_value = "/imexd",
        global = true
    )]
    pub config_dir: PathBuf,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `nvdra_imex_daemon=debug`.
    #[arg(long = "log", env = "NVDRA_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Address of `run`'s metrics endpoint (`/metrics`, `/livez`); `:8082` binds the pod IP
    /// on port 8082. Empty (the default) serves nothing.
    #[arg(
        long,
        env = "HTTP_ENDPOINT",
        value_parser = nvdra_api::flags::parse_endpoint,
        default_value = "",
        global = true
    )]
    pub http_endpoint: nvdra_api::flags::Endpoint,

    /// Path of the metrics page on the HTTP endpoint.
    #[arg(long, env = "METRICS_PATH", default_value = "/metrics", global = true)]
    pub metrics_path: String,

    /// Log output format of `run`: `text` or `json` (one object per line).
    #[arg(
        long,
        env = "NVDRA_LOG_FORMAT",
        value_parser = nvdra_api::flags::parse_log_format,
        default_value = "text",
        global = true
    )]
    pub log_format: nvdra_api::flags::LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use pretty_assertions::assert_eq;

    #[test]
    fn defaults_match_upstream_and_the_contract() {
        let args = Args::try_parse_from(["d", "run"]).unwrap();
        assert_eq!(args.command, Command::Run);
        let d = args.daemon;
        assert_eq!(d.max_nodes, 18);
        assert_eq!(d.container_root, PathBuf::from("/"));
        assert_eq!(d.imex_bin, PathBuf::from("/usr/bin/nvidia-imex"));
        assert_eq!(d.imex_ctl_bin, PathBuf::from("/usr/bin/nvidia-imex-ctl"));
        assert_eq!(d.config_dir, PathBuf::from("/imexd"));
        assert_eq!(d.compute_domain_namespace, "default");
        assert_eq!(d.log, "info");
        assert_eq!(d.http_endpoint, nvdra_api::flags::Endpoint(None));
        assert_eq!(d.metrics_path, "/metrics");
    }

    #[test]
    fn flags_work_before_and_after_the_subcommand() {
        let args = Args::try_parse_from([
            "d",
            "--cliqueid=c.1",
            "check",
            "--node-name=n1",
            "--max-nodes-per-imex-domain=4",
        ])
        .unwrap();
        assert_eq!(args.command, Command::Check);
        assert_eq!(
            (
                args.daemon.clique_id.as_str(),
                args.daemon.node_name.as_str(),
                args.daemon.max_nodes
            ),
            ("c.1", "n1", 4)
        );
        let err = Args::try_parse_from(["d", "run", "--max-nodes-per-imex-domain=0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}

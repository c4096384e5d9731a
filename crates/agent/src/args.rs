//! Command-line flags of `nvdra-agent`; every flag is also an environment
//! variable.
//!
//! Names follow the upstream GPU kubelet plugin where it has the flag
//! (`--node-name`/`NODE_NAME`, `--nvidia-driver-root`/`NVIDIA_DRIVER_ROOT`,
//! `--cdi-root`/`CDI_ROOT`, `--feature-gates`/`FEATURE_GATES`, ...), so the
//! same DaemonSet environment configures either driver. Flags of our own use
//! `NVDRA_*` variables.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use nvdra_api::FeatureGates;
pub use nvdra_api::flags::Endpoint;
use nvdra_api::flags::{LogFormat, parse_duration, parse_endpoint, parse_log_format};

/// The node agent for the `gpu.nvidia.com` and `compute-domain.nvidia.com` DRA drivers.
#[derive(Debug, Clone, Parser)]
#[command(name = "nvdra-agent", version, about)]
pub struct Args {
    /// Name of this node (from the downward API); also the ResourceSlice pool name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Host path of the NVIDIA driver installation (`/`, or e.g. `/run/nvidia/driver`
    /// for a containerised driver). CDI specs refer to host paths under it.
    #[arg(long, env = "NVIDIA_DRIVER_ROOT", default_value = "/")]
    pub nvidia_driver_root: PathBuf,

    /// Where the host driver root is mounted inside the agent's container.
    #[arg(long, env = "CONTAINER_DRIVER_ROOT", default_value = "/driver-root")]
    pub container_driver_root: PathBuf,

    /// Host path of `nvidia-cdi-hook`; when unset, CDI specs carry no hooks and
    /// bind-mount library names instead (nothing from the driver root runs in
    /// the container's namespaces).
    #[arg(long, env = "NVIDIA_CDI_HOOK_PATH")]
    pub nvidia_cdi_hook_path: Option<PathBuf>,

    /// Directory for per-claim CDI specs; the container runtime must watch it.
    #[arg(long, env = "CDI_ROOT", default_value = "/var/run/cdi")]
    pub cdi_root: PathBuf,

    /// Directory the kubelet watches for plugin registration sockets.
    #[arg(
        long,
        env = "KUBELET_REGISTRAR_DIRECTORY_PATH",
        default_value = nvdra_kubelet_plugin::plugin::KUBELET_REGISTRY_DIR
    )]
    pub kubelet_registrar_directory_path: PathBuf,

    /// Parent of the per-driver plugin directories (DRA socket, checkpoint,
    /// lock). Must be the same path on the host.
    #[arg(
        long,
        env = "KUBELET_PLUGINS_DIRECTORY_PATH",
        default_value = nvdra_kubelet_plugin::plugin::KUBELET_PLUGINS_DIR
    )]
    pub kubelet_plugins_directory_path: PathBuf,

    /// Where devices come from: `nvml` (the GPUs of this node) or `fake` (a
    /// node profile, for tests and the local cluster).
    #[arg(long, env = "NVDRA_DEVICE_BACKEND", value_enum, default_value_t = DeviceBackend::Nvml)]
    pub device_backend: DeviceBackend,

    /// With `--device-backend=fake`: a built-in profile name (e.g. `h100-sxm-80gb-x8`)
    /// or the path of a profile YAML file.
    #[arg(
        long,
        env = "NVDRA_FAKE_PROFILE",
        required_if_eq("device_backend", "fake")
    )]
    pub fake_profile: Option<String>,

    /// With `--device-backend=fake`: directory serving as `/` for device nodes.
    #[arg(long, env = "NVDRA_FAKE_DEV_ROOT")]
    pub fake_dev_root: Option<PathBuf>,

    /// With `--device-backend=nvml`: where the host's sysfs is mounted (PCIe
    /// roots of the GPUs are read from `<sysfs>/bus/pci/devices`).
    #[arg(long, env = "NVDRA_SYSFS_ROOT", default_value = "/sys")]
    pub sysfs_root: PathBuf,

    /// With `--device-backend=nvml`: where the host's procfs is mounted (MIG
    /// capability minors, IMEX channel parameters).
    #[arg(long, env = "NVDRA_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// With `MPSSupport`: give each MPS control daemon and its clients their
    /// own tmpfs `/dev/shm` (the agent needs CAP_SYS_ADMIN). Turn off only
    /// where the agent cannot mount (a test bed): the daemon then shares the
    /// agent's `/dev/shm`, which containers do not see.
    #[arg(long, env = "NVDRA_MPS_PRIVATE_SHM", default_value_t = true, action = clap::ArgAction::Set)]
    pub mps_private_shm: bool,

    /// With `NVMLDeviceHealthCheck`: Xids, besides upstream's 13, 31, 43,
    /// 45, 68 and 109, that taint a device with effect `None` only
    /// (comma-separated).
    #[arg(long, env = "ADDITIONAL_XIDS_TO_IGNORE", value_delimiter = ',')]
    pub additional_xids_to_ignore: Vec<u64>,

    /// Feature gates, `Name=true,Other=false`.
    #[arg(long, env = "FEATURE_GATES", default_value = "")]
    pub feature_gates: FeatureGates,

    /// Pod UID (downward API). When set, sockets get per-pod names so an old
    /// and a new agent pod can overlap during a rolling update.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,

    /// Path of a kubeconfig; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Sustained queries per second to the API server.
    #[arg(long, env = "KUBE_API_QPS", default_value_t = 5.0)]
    pub kube_api_qps: f64,

    /// Requests allowed in a burst above the sustained rate.
    #[arg(long, env = "KUBE_API_BURST", default_value_t = 10)]
    pub kube_api_burst: u32,

    /// Address serving `/metrics`, `/livez` and `/readyz` (`:8080` means all
    /// interfaces); empty to disable.
    #[arg(long, env = "HTTP_ENDPOINT", default_value = ":8080", value_parser = parse_endpoint)]
    pub http_endpoint: Endpoint,

    /// Path of the metrics page on the HTTP endpoint.
    #[arg(long, env = "METRICS_PATH", default_value = "/metrics")]
    pub metrics_path: String,

    /// How often claims whose ResourceClaim is gone are cleaned up.
    #[arg(long, env = "NVDRA_CLEANUP_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub cleanup_interval: Duration,

    /// File holding this boot's ID; prepared state does not survive a reboot.
    #[arg(
        long,
        env = "NVDRA_BOOT_ID_PATH",
        default_value = "/proc/sys/kernel/random/boot_id"
    )]
    pub boot_id_path: PathBuf,

    /// Serve the `gpu.nvidia.com` driver (full GPUs and MIG devices).
    #[arg(long, env = "NVDRA_GPUS", default_value_t = true, action = clap::ArgAction::Set)]
    pub gpus: bool,

    /// Serve the `compute-domain.nvidia.com` driver (IMEX channels and daemons); it has its own
    /// sockets and data directory `<plugins>/compute-domain.nvidia.com/`.
    #[arg(long, env = "NVDRA_COMPUTE_DOMAINS", default_value_t = true, action = clap::ArgAction::Set)]
    pub compute_domains: bool,

    /// The driver's namespace (where the ComputeDomainCliques live), as the controller's.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Longest wait of a channel prepare for the node's IMEX daemon to be Ready before the
    /// claim fails with a retriable error (the kubelet retries); keep it well under 45 s.
    #[arg(long, env = "NVDRA_DAEMON_READY_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub daemon_ready_timeout: Duration,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,nvdra_agent=debug`).
    #[arg(long, env = "NVDRA_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "NVDRA_LOG_FORMAT", value_parser = parse_log_format, default_value = "text")]
    pub log_format: LogFormat,
}

/// Device source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceBackend {
    /// The node's GPUs through NVML.
    Nvml,
    /// A deterministic node profile.
    Fake,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["nvdra-agent", "--node-name", "node-a"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn defaults_match_upstream_paths() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.nvidia_driver_root, PathBuf::from("/"));
        assert_eq!(args.container_driver_root, PathBuf::from("/driver-root"));
        assert_eq!(args.cdi_root, PathBuf::from("/var/run/cdi"));
        assert_eq!(
            args.kubelet_registrar_directory_path,
            PathBuf::from("/var/lib/kubelet/plugins_registry")
        );
        assert_eq!(
            args.kubelet_plugins_directory_path,
            PathBuf::from("/var/lib/kubelet/plugins")
        );
        assert_eq!(args.device_backend, DeviceBackend::Nvml);
        assert_eq!(args.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(args.proc_root, PathBuf::from("/proc"));
        assert!(args.mps_private_shm);
        assert_eq!(args.kube_api_qps, 5.0);
        assert_eq!(args.kube_api_burst, 10);
        assert_eq!(
            args.http_endpoint,
            Endpoint(Some("0.0.0.0:8080".parse().unwrap()))
        );
        assert_eq!(args.cleanup_interval, Duration::from_secs(600));
        assert_eq!(args.feature_gates, FeatureGates::default());
        assert!(args.gpus && args.compute_domains);
        assert_eq!(args.namespace, "default");
        assert_eq!(args.daemon_ready_timeout, Duration::from_secs(25));
    }

    #[test]
    fn drivers_can_be_turned_off() {
        let args = parse(&["--gpus", "false", "--compute-domains=false"]).unwrap();
        assert!(!args.gpus && !args.compute_domains);
        let err = parse(&["--gpus", "maybe"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn fake_backend_requires_a_profile() {
        let err = parse(&["--device-backend", "fake"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let args = parse(&["--device-backend", "fake", "--fake-profile", "l4-x2"]).unwrap();
        assert_eq!(args.fake_profile.as_deref(), Some("l4-x2"));
    }

    #[test]
    fn bad_feature_gates_fail_at_parse_time() {
        let err = parse(&["--feature-gates", "NoSuchGate=true"]).unwrap_err();
        assert!(err.to_string().contains("NoSuchGate"), "{err}");
    }
}

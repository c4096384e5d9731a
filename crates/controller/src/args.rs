//! Command-line flags of `nvdra-controller`; every flag is also an environment variable.
//!
//! Names follow the upstream `compute-domain-controller` where it has the flag (`--pod-name`/
//! `POD_NAME`, `--namespace`/`NAMESPACE`, `--image-name`/`IMAGE_NAME`, the leader-election
//! flags, ...), so the upstream chart's environment configures nvdra unchanged. Upstream's Go
//! flags also accept a single dash (`-lease-duration`); clap accepts only `--lease-duration`,
//! and the chart passes everything through the environment anyway. Flags of our own use
//! `NVDRA_*` variables.
//!
//! Failure modes: a malformed value (duration, address, feature gate) fails parsing with a
//! message naming the flag; nothing here touches the network or the filesystem.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use nvdra_api::FeatureGates;
pub use nvdra_api::flags::Endpoint;
use nvdra_api::flags::{LogFormat, parse_duration, parse_endpoint, parse_log_format};
use nvdra_api::names::leases;

/// The ComputeDomain controller of the `compute-domain.nvidia.com` DRA driver.
#[derive(Debug, Clone, Parser)]
#[command(name = "nvdra-controller", version, about)]
pub struct Args {
    /// Name of this pod (downward API); the leader-election identity and Event reporter.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,

    /// The driver namespace: where daemon DaemonSets, daemon claim templates and cliques live.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Image of the IMEX daemon pods (normally the controller's own image).
    #[arg(long, env = "IMAGE_NAME")]
    pub image_name: String,

    /// Image pull secrets of the IMEX daemon pods, comma-separated (empty names are ignored).
    #[arg(long, env = "CD_DAEMON_IMAGE_PULL_SECRET_NAMES", value_delimiter = ',')]
    pub cd_daemon_image_pull_secret_names: Vec<String>,

    /// Log verbosity of the IMEX daemons, passed to them as `NVDRA_LOG`: a klog level (as the
    /// chart's `logVerbosity`: 0–2 info, 3–5 debug for nvdra's crates, 6+ trace for them and
    /// debug for the API client) or a tracing filter such as `info,nvdra_imex_daemon=debug`.
    #[arg(long, env = "LOG_VERBOSITY_CD_DAEMON", default_value = "1")]
    pub log_verbosity_cd_daemon: String,

    /// Port of the IMEX daemons' metrics endpoint (`/metrics`, `/livez` on the pod IP, container
    /// port `metrics`); 0 turns it off. Changing it rolls every domain's daemon pods.
    #[arg(long, env = "CD_DAEMON_METRICS_PORT", default_value_t = 8082)]
    pub cd_daemon_metrics_port: u16,

    /// PriorityClass of the IMEX daemon pods; empty for none. The daemons are node
    /// infrastructure that every workload pod of a domain waits for: with a high priority the
    /// scheduler places them ahead of pending workloads and never preempts them for one.
    #[arg(
        long,
        env = "CD_DAEMON_PRIORITY_CLASS_NAME",
        default_value = "system-node-critical"
    )]
    pub cd_daemon_priority_class_name: String,

    /// Largest IMEX domain (nodes per clique), passed to the daemons.
    #[arg(long, env = "MAX_NODES_PER_IMEX_DOMAIN", default_value_t = 18)]
    pub max_nodes_per_imex_domain: u32,

    /// Feature gates, `Name=true,Other=false`; passed on to the daemons.
    #[arg(long, env = "FEATURE_GATES", default_value = "")]
    pub feature_gates: FeatureGates,

    /// Address serving `/metrics`, `/livez` and `/readyz` (`:8080` means all interfaces);
    /// empty to disable.
    #[arg(long, env = "HTTP_ENDPOINT", default_value = ":8080", value_parser = parse_endpoint)]
    pub http_endpoint: Endpoint,

    /// Path of the metrics page on the HTTP endpoint.
    #[arg(long, env = "METRICS_PATH", default_value = "/metrics")]
    pub metrics_path: String,

    /// Path of a kubeconfig; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Sustained queries per second to the API server.
    #[arg(long, env = "KUBE_API_QPS", default_value_t = 5.0)]
    pub kube_api_qps: f64,

    /// Requests allowed in a burst above the sustained rate.
    #[arg(long, env = "KUBE_API_BURST", default_value_t = 10)]
    pub kube_api_burst: u32,

    /// Run only while holding the leader-election Lease, so several replicas are safe.
    #[arg(
        long,
        env = "LEADER_ELECTION_ENABLED",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true"
    )]
    pub leader_election_enabled: bool,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "LEASE_LOCK_NAMESPACE", default_value = "default")]
    pub lease_lock_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_LOCK_NAME", default_value = leases::CONTROLLER)]
    pub lease_lock_name: String,

    /// How long a Lease stays valid after its last renewal; standbys wait this long
    /// before taking over from a silent leader.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader keeps trying to renew before it gives up leadership (and exits).
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,

    /// Interval between acquire or renew attempts.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,

    /// ComputeDomains reconciled in parallel.
    #[arg(long, env = "NVDRA_RECONCILE_CONCURRENCY", default_value_t = 8)]
    pub reconcile_concurrency: u16,

    /// Interval of the sweep that deletes children and node labels of ComputeDomains that no
    /// longer exist (also run at start and when a child of an unknown domain shows up).
    #[arg(long, env = "NVDRA_ORPHAN_SWEEP_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub orphan_sweep_interval: Duration,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,nvdra_controller=debug`).
    #[arg(long, env = "NVDRA_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "NVDRA_LOG_FORMAT", value_parser = parse_log_format, default_value = "text")]
    pub log_format: LogFormat,
}

impl Args {
    /// Checks what single flags cannot: the renew deadline must end before the lease does,
    /// or a standby could take over while the old leader still thinks it leads.
    pub fn validate(&self) -> Result<(), String> {
        if self.leader_election_enabled && self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        Ok(())
    }
}

/// The daemons' `NVDRA_LOG` filter for a `--log-verbosity-cd-daemon` value: klog levels map
/// as the chart maps the agent's `logVerbosity` (libraries stay at info until 6, because a
/// debug-level HTTP stack logs several lines per API request, which at a few hundred daemons
/// is real CPU); anything else is taken as a filter already.
pub fn daemon_log_filter(verbosity: &str) -> String {
    const OURS: [&str; 2] = ["nvdra_imex_daemon", "nvdra_api"];
    match verbosity.trim().parse::<u32>() {
        Ok(0..=2) => "info".to_owned(),
        Ok(3..=5) => std::iter::once("info".to_owned())
            .chain(OURS.iter().map(|c| format!("{c}=debug")))
            .collect::<Vec<_>>()
            .join(","),
        Ok(_) => ["info".to_owned(), "kube_client=debug".to_owned()]
            .into_iter()
            .chain(OURS.iter().map(|c| format!("{c}=trace")))
            .collect::<Vec<_>>()
            .join(","),
        Err(_) => verbosity.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["nvdra-controller", "--pod-name", "p", "--image-name", "img"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn zero_durations_and_late_deadlines_are_refused() {
        let err = parse(&["--retry-period", "0s"]).unwrap_err().to_string();
        assert!(err.contains("\"0s\" must be longer than zero"), "{err}");
        let args = parse(&[
            "--leader-election-enabled",
            "true",
            "--lease-duration",
            "10s",
            "--renew-deadline",
            "10s",
        ])
        .unwrap();
        assert_eq!(
            args.validate().unwrap_err(),
            "--renew-deadline (10s) must be shorter than --lease-duration (10s)"
        );
        assert_eq!(parse(&[]).unwrap().validate(), Ok(()));
    }

    #[test]
    fn defaults_match_upstream() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.namespace, "default");
        assert_eq!(args.max_nodes_per_imex_domain, 18);
        assert!(!args.leader_election_enabled);
        assert_eq!(args.lease_lock_namespace, "default");
        assert_eq!(args.lease_lock_name, "nvidia-compute-domain-controller");
        assert_eq!(args.lease_duration, Duration::from_secs(15));
        assert_eq!(args.renew_deadline, Duration::from_secs(10));
        assert_eq!(args.retry_period, Duration::from_secs(2));
        assert_eq!(args.metrics_path, "/metrics");
        assert_eq!(args.cd_daemon_metrics_port, 8082);
        assert_eq!(args.cd_daemon_priority_class_name, "system-node-critical");
        assert_eq!(
            args.http_endpoint,
            Endpoint(Some("0.0.0.0:8080".parse().unwrap()))
        );
        assert_eq!(args.cd_daemon_image_pull_secret_names, Vec::<String>::new());
        assert_eq!(args.orphan_sweep_interval, Duration::from_secs(600));
    }

    #[test]
    fn flags_parse() {
        let args = parse(&[
            "--leader-election-enabled",
            "--cd-daemon-image-pull-secret-names",
            "a,b",
            "--http-endpoint",
            "",
            "--lease-duration",
            "500ms",
        ])
        .unwrap();
        assert!(args.leader_election_enabled);
        assert_eq!(args.cd_daemon_image_pull_secret_names, vec!["a", "b"]);
        assert_eq!(args.http_endpoint, Endpoint(None));
        assert_eq!(args.lease_duration, Duration::from_millis(500));
        let args = parse(&["--leader-election-enabled", "false"]).unwrap();
        assert!(!args.leader_election_enabled);
    }

    #[test]
    fn required_flags() {
        let err = Args::try_parse_from(["nvdra-controller", "--pod-name", "p"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn bad_values() {
        let cases: &[(&str, &str)] = &[
            ("15", "\"15\" has no unit; use ms, s, m or h (e.g. '15s')"),
            ("x", "\"x\" is not a duration like '15s', '10m' or '500ms'"),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_duration(raw).unwrap_err(), *want);
        }
        assert_eq!(
            parse_endpoint("nope").unwrap_err(),
            "\"nope\" is not an address like ':8080' or '127.0.0.1:8080'"
        );
    }

    #[test]
    fn daemon_log_filters() {
        let cases = [
            ("0", "info"),
            ("2", "info"),
            ("3", "info,nvdra_imex_daemon=debug,nvdra_api=debug"),
            ("5", "info,nvdra_imex_daemon=debug,nvdra_api=debug"),
            (
                "6",
                "info,kube_client=debug,nvdra_imex_daemon=trace,nvdra_api=trace",
            ),
            ("warn,nvdra=debug", "warn,nvdra=debug"),
        ];
        for (raw, want) in cases {
            assert_eq!(daemon_log_filter(raw), want, "{raw}");
        }
    }
}

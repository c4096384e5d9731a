//! Prometheus metrics of the IMEX daemon, and the HTTP endpoint that serves them.
//!
//! | Metric | Type | Labels |
//! |---|---|---|
//! | `nvdra_imex_daemon_ready` | gauge, 1 while the daemon's clique row says Ready | — |
//! | `nvdra_imex_daemon_imex_running` | gauge, 1 while `nvidia-imex` runs | — |
//! | `nvdra_imex_daemon_imex_restarts_total` | counter | — |
//! | `nvdra_imex_daemon_peers` | gauge, IMEX peers in the hosts block (the daemon included) | — |
//! | `nvdra_imex_daemon_peer_updates_total` | counter, peer-list re-reads signalled to `nvidia-imex` | — |
//! | `nvdra_imex_daemon_clique_applies_total` | counter | `result` (`success`/`conflict`/`error`) |
//! | `nvdra_imex_daemon_clique_apply_duration_seconds` | histogram (10 ms … 20 s) | — |
//!
//! plus the process collector. One daemon runs per node and domain, so no series carries a
//! domain, node or clique label: Prometheus' target labels (the pod) say whose it is, and
//! label values stay in closed sets. Every series exists at zero from the start.
//!
//! The endpoint (`--http-endpoint`, off by default) serves the metrics page and `/livez`.
//! An unspecified address (`:8082`) binds the pod's own IP when `POD_IP` is known: daemons
//! need no host ports, and daemons that share a network namespace (the e2e's simulated nodes
//! share one machine) cannot collide.
//!
//! Failure modes: [`Metrics::new`] fails only if the registry already holds a metric of the
//! same name; [`serve`] fails when the address cannot be bound, and the daemon then keeps
//! running without metrics (they are not worth a restart loop).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::Error;

/// `result` label values of `nvdra_imex_daemon_clique_applies_total`.
pub mod results {
    /// The row was applied.
    pub const SUCCESS: &str = "success";
    /// The API server answered 409.
    pub const CONFLICT: &str = "conflict";
    /// Any other failure.
    pub const ERROR: &str = "error";
}

/// Buckets of the apply histogram: a clique apply took 1.9 s at the median and up to 11 s with
/// 16 daemons writing one object on a loaded two-core API server (docs/performance.md), tens
/// of milliseconds on an idle one.
const APPLY_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 20.0];

/// The daemon's metrics; cheap to clone (clones share the series).
#[derive(Debug, Clone)]
pub struct Metrics {
    ready: IntGauge,
    imex_running: IntGauge,
    imex_restarts: IntCounter,
    peers: IntGauge,
    peer_updates: IntCounter,
    applies: IntCounterVec,
    apply_duration: Histogram,
}

impl Metrics {
    /// Registers every metric on `registry`, each series at zero.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let applies = IntCounterVec::new(
            Opts::new(
                "nvdra_imex_daemon_clique_applies_total",
                "Server-side applies of the daemon's own ComputeDomainClique row, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(applies.clone()))?;
        for result in [results::SUCCESS, results::CONFLICT, results::ERROR] {
            applies.with_label_values(&[result]);
        }
        let apply_duration = Histogram::with_opts(
            HistogramOpts::new(
                "nvdra_imex_daemon_clique_apply_duration_seconds",
                "Duration of applies of the daemon's own ComputeDomainClique row",
            )
            .buckets(APPLY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(apply_duration.clone()))?;
        Ok(Self {
            ready: gauge(
                "nvdra_imex_daemon_ready",
                "1 while the daemon's clique row says Ready",
            )?,
            imex_running: gauge(
                "nvdra_imex_daemon_imex_running",
                "1 while the supervised nvidia-imex process runs",
            )?,
            imex_restarts: counter(
                "nvdra_imex_daemon_imex_restarts_total",
                "Times nvidia-imex ended and was restarted",
            )?,
            peers: gauge(
                "nvdra_imex_daemon_peers",
                "IMEX peers in the hosts block, this daemon included",
            )?,
            peer_updates: counter(
                "nvdra_imex_daemon_peer_updates_total",
                "Peer-list changes signalled to a running nvidia-imex",
            )?,
            applies,
            apply_duration,
        })
    }

    /// Records whether the applied row says Ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Records whether `nvidia-imex` runs.
    pub fn set_imex_running(&self, running: bool) {
        self.imex_running.set(i64::from(running));
    }

    /// Counts a restart of `nvidia-imex`.
    pub fn imex_restarted(&self) {
        self.imex_restarts.inc();
    }

    /// Records the peer list written to the hosts block.
    pub fn peers_written(&self, peers: usize) {
        self.peers.set(i64::try_from(peers).unwrap_or(i64::MAX));
    }

    /// Records that a running `nvidia-imex` was told to re-read the peer list.
    pub fn peers_signalled(&self) {
        self.peer_updates.inc();
    }

    /// Records one apply of the own row.
    pub fn applied(&self, result: &str, took: Duration) {
        self.applies.with_label_values(&[result]).inc();
        self.apply_duration.observe(took.as_secs_f64());
    }
}

/// The address to listen on: `endpoint`, with an unspecified IP replaced by `pod_ip` when
/// that parses.
pub fn listen_address(endpoint: SocketAddr, pod_ip: &str) -> SocketAddr {
    match pod_ip.parse::<IpAddr>() {
        Ok(ip) if endpoint.ip().is_unspecified() => SocketAddr::new(ip, endpoint.port()),
        _ => endpoint,
    }
}

/// Serves `metrics_path` (the registry's text exposition) and `/livez` on `addr` until the
/// process ends.
pub async fn serve(addr: SocketAddr, metrics_path: &str, registry: Registry) -> Result<(), Error> {
    let router = Router::new()
        .route("/livez", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            metrics_path,
            get(move || {
                let registry = registry.clone();
                async move { scrape(&registry) }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::ServeHttp { addr, source })?;
    tracing::info!(%addr, "serving metrics and /livez");
    axum::serve(listener, router)
        .await
        .map_err(|source| Error::ServeHttp { addr, source })
}

fn scrape(registry: &Registry) -> (StatusCode, String) {
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        Ok(()) => (
            StatusCode::OK,
            String::from_utf8_lossy(&buffer).into_owned(),
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {err}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(registry: &Registry) -> String {
        scrape(registry).1
    }

    #[test]
    fn every_series_starts_at_zero_and_moves() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        let text = exposition(&registry);
        for line in [
            "nvdra_imex_daemon_ready 0",
            "nvdra_imex_daemon_imex_running 0",
            "nvdra_imex_daemon_imex_restarts_total 0",
            "nvdra_imex_daemon_peers 0",
            "nvdra_imex_daemon_peer_updates_total 0",
            "nvdra_imex_daemon_clique_applies_total{result=\"conflict\"} 0",
            "nvdra_imex_daemon_clique_apply_duration_seconds_count 0",
        ] {
            assert!(text.contains(line), "missing {line:?}:\n{text}");
        }
        m.set_ready(true);
        m.set_imex_running(true);
        m.imex_restarted();
        m.peers_written(4);
        m.peers_written(5);
        m.peers_signalled();
        m.applied(results::SUCCESS, Duration::from_millis(30));
        m.applied(results::CONFLICT, Duration::from_secs(3));
        let text = exposition(&registry);
        for line in [
            "nvdra_imex_daemon_ready 1",
            "nvdra_imex_daemon_imex_running 1",
            "nvdra_imex_daemon_imex_restarts_total 1",
            "nvdra_imex_daemon_peers 5",
            "nvdra_imex_daemon_peer_updates_total 1",
            "nvdra_imex_daemon_clique_applies_total{result=\"success\"} 1",
            "nvdra_imex_daemon_clique_applies_total{result=\"conflict\"} 1",
            "nvdra_imex_daemon_clique_apply_duration_seconds_bucket{le=\"0.05\"} 1",
            "nvdra_imex_daemon_clique_apply_duration_seconds_count 2",
        ] {
            assert!(text.contains(line), "missing {line:?}:\n{text}");
        }
    }

    #[test]
    fn unspecified_addresses_bind_the_pod_ip() {
        let any: SocketAddr = "0.0.0.0:8082".parse().unwrap();
        assert_eq!(
            listen_address(any, "10.0.0.7"),
            "10.0.0.7:8082".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(listen_address(any, ""), any);
        let explicit: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(listen_address(explicit, "10.0.0.7"), explicit);
    }

    #[tokio::test]
    async fn serves_metrics_and_livez() {
        let registry = Registry::new();
        Metrics::new(&registry).unwrap();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        tokio::spawn(serve(addr, "/metrics", registry));
        let get = |path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    stream
                        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                        .await
                        .unwrap();
                    let mut out = String::new();
                    stream.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{addr} never answered");
        };
        assert!(get("/livez").await.starts_with("HTTP/1.0 200"));
        let metrics = get("/metrics").await;
        assert!(metrics.contains("nvdra_imex_daemon_ready 0"), "{metrics}");
        assert!(get("/nope").await.starts_with("HTTP/1.0 404"));
    }
}

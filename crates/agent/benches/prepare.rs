//! NodePrepareResources / NodeUnprepareResources latency of the GPU driver over the real
//! Unix-socket gRPC path, with the fake 8×H100 profile, the fake driver root and a real
//! checkpoint and CDI root on disk; plus resident memory before and after many cycles.
//!
//! `cargo bench -p nvdra-agent --bench prepare` runs the full measurement (docs/performance.md
//! has the numbers and how to read them). Without `--bench` (as under
//! `cargo test --all-targets`) it runs a few cycles of each scenario as a smoke test.
//!
//! Scenarios, each a loop of Prepare then Unprepare of the same claims, timed per call as the
//! kubelet sees it (request sent → response decoded):
//! - one claim with one full GPU (the common case; target p99 ≤ 5 ms);
//! - eight claims with one GPU each in one call;
//! - the same single-claim loop with the CDI root on tmpfs, as `/var/run/cdi` is on a node;
//! - the same single-claim loop with the `DeviceMetadata` gate (a metadata file per request);
//! - the same single-claim loop with the batch run inline on the async runtime instead of
//!   `spawn_blocking`, to price the hand-off.
//!
//! A floor is measured too: one bare atomic file replacement (write, fsync, rename, fsync
//! directory) in the same directory, which every checkpoint and spec write is.
//!
//! Measured first: start-up from nothing (fresh temp dirs, a fresh child process each time)
//! to registered-and-published, doing what `run.rs` does after argument parsing, phase by
//! phase (target: under 300 ms). "Published" stops at the ResourceSlices computed
//! and validated (`desired_slices`): writing them needs an API server, so that round trip is
//! left to the e2e tests.

// A benchmark's output is its report; and like a test it may stop on the first surprise.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/driver/fixtures.rs"]
mod fixtures;

use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvdra_agent::cdi::{CdiStore, CommonEdits, CommonOptions, Hooks, RootMapping};
use nvdra_agent::driver::{GpuDriver, GpuDriverConfig};
use nvdra_agent::metrics::Metrics;
use nvdra_api::{FeatureGate, FeatureGates};
use nvdra_gpu::{FakeBackend, GpuBackend};
use nvdra_kubelet_plugin::proto::dra_v1;
use nvdra_kubelet_plugin::proto::registration::registration_client::RegistrationClient;
use nvdra_kubelet_plugin::proto::registration::{InfoRequest, RegistrationStatus};
use nvdra_kubelet_plugin::resourceslice::{CounterLayout, SliceOwner, desired_slices};
use nvdra_kubelet_plugin::{DraDriver as _, InMemoryClaimReader, KubeletPlugin, RegistrationState};

use fixtures::*;

struct Settings {
    startup_runs: usize,
    warmup: usize,
    single_cycles: usize,
    batch_cycles: usize,
    variant_cycles: usize,
    floor_samples: usize,
}

const FULL: Settings = Settings {
    startup_runs: 20,
    warmup: 100,
    single_cycles: 2000,
    batch_cycles: 500,
    variant_cycles: 1000,
    floor_samples: 1000,
};

const SMOKE: Settings = Settings {
    startup_runs: 2,
    warmup: 1,
    single_cycles: 3,
    batch_cycles: 2,
    variant_cycles: 2,
    floor_samples: 5,
};

/// Argument that makes this binary do one start-up and print its timings (see
/// [`measure_startups`]).
const STARTUP_CHILD: &str = "--startup-child";

fn main() {
    if std::env::args().any(|arg| arg == STARTUP_CHILD) {
        startup_child();
        return;
    }
    let full = std::env::args().any(|arg| arg == "--bench");
    let settings = if full { &FULL } else { &SMOKE };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(settings, full));
}

async fn run(settings: &Settings, full: bool) {
    let disk = Dirs::new();
    println!(
        "machine: {} CPUs; plugin data dir and CDI root on {} ({})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        fs_type(disk.root.path()),
        disk.root.path().display()
    );
    println!(
        "mode: {}",
        if full {
            "full (--bench)"
        } else {
            "smoke (no --bench)"
        }
    );

    measure_startups(settings.startup_runs);

    let floor = measure_floor(disk.root.path(), settings.floor_samples, true);
    report("floor: one atomic file replace (2 fsyncs)", &floor);
    let unsynced = measure_floor(disk.root.path(), settings.floor_samples, false);
    report("floor: one file replace without fsync", &unsynced);
    let handoff = measure_handoff(settings.floor_samples * 10).await;
    report("spawn_blocking hand-off (empty closure)", &handoff);

    let rss_before_start = rss_kib();
    let bench = Bench::start(&disk, None).await;
    let rss_idle = rss_kib();
    println!(
        "VmRSS: {rss_before_start} KiB before the driver, {rss_idle} KiB idle with the plugin serving"
    );

    for _ in 0..settings.warmup {
        bench.cycle(&[0]).await;
    }
    let (prepare, unprepare) = bench.cycles(&[0], settings.single_cycles).await;
    report("1 claim x 1 GPU: NodePrepareResources", &prepare);
    report("1 claim x 1 GPU: NodeUnprepareResources", &unprepare);
    conditions(disk.root.path(), settings.floor_samples / 5);
    let rss_single = rss_kib();
    let (prepare_batch, unprepare_batch) = bench
        .cycles(&[0, 1, 2, 3, 4, 5, 6, 7], settings.batch_cycles)
        .await;
    report(
        "8 claims x 1 GPU, one call: NodePrepareResources",
        &prepare_batch,
    );
    report(
        "8 claims x 1 GPU, one call: NodeUnprepareResources",
        &unprepare_batch,
    );
    conditions(disk.root.path(), settings.floor_samples / 5);
    let rss_batch = rss_kib();
    // More single-claim rounds: memory must not grow with the number of cycles.
    bench.cycles(&[0], settings.single_cycles).await;
    let rss_more = rss_kib();
    bench.cycles(&[0], settings.single_cycles).await;
    let rss_even_more = rss_kib();
    println!(
        "VmRSS: {rss_single} KiB after {} single cycles, {rss_batch} KiB after {} batch cycles, \
         {rss_more} KiB and {rss_even_more} KiB after two more rounds of {} single cycles",
        settings.single_cycles + settings.warmup,
        settings.batch_cycles,
        settings.single_cycles,
    );
    bench.report_checkpoint_writes();

    // The driver alone, without gRPC and claim lookup: what the plugin library adds.
    let (prepare_direct, unprepare_direct) = bench.direct_cycles(settings.variant_cycles).await;
    report(
        "1 claim x 1 GPU, driver called directly: prepare_resource_claims",
        &prepare_direct,
    );
    report(
        "1 claim x 1 GPU, driver called directly: unprepare_resource_claims",
        &unprepare_direct,
    );
    conditions(disk.root.path(), settings.floor_samples / 5);
    bench.stop().await;

    // Variant: inline I/O (no spawn_blocking), same disk layout.
    let inline_dirs = Dirs::new();
    let inline = Bench::start(&inline_dirs, None).await;
    inline.driver.set_inline_io(true);
    for _ in 0..settings.warmup {
        inline.cycle(&[0]).await;
    }
    let (prepare_inline, _) = inline.cycles(&[0], settings.variant_cycles).await;
    report(
        "1 claim x 1 GPU, batch inline on the runtime: NodePrepareResources",
        &prepare_inline,
    );
    conditions(disk.root.path(), settings.floor_samples / 5);
    inline.stop().await;

    // Variant: device metadata (needs PassthroughSupport, which GPU claims do not use).
    let metadata_dirs = Dirs::new();
    let gates = FeatureGates::default()
        .with(FeatureGate::PassthroughSupport, true)
        .with(FeatureGate::DeviceMetadata, true);
    let metadata = Bench::start_with(&metadata_dirs, None, gates).await;
    for _ in 0..settings.warmup {
        metadata.cycle(&[0]).await;
    }
    let (prepare_metadata, unprepare_metadata) =
        metadata.cycles(&[0], settings.variant_cycles).await;
    report(
        "1 claim x 1 GPU, DeviceMetadata: NodePrepareResources",
        &prepare_metadata,
    );
    report(
        "1 claim x 1 GPU, DeviceMetadata: NodeUnprepareResources",
        &unprepare_metadata,
    );
    conditions(disk.root.path(), settings.floor_samples / 5);
    metadata.stop().await;

    // Variant: CDI root on tmpfs, as /var/run/cdi on a node.
    let shm = Path::new("/dev/shm");
    if fs_type(shm) == "tmpfs" {
        let tmpfs_cdi = tempfile::Builder::new()
            .prefix("nvd-cdi")
            .tempdir_in(shm)
            .unwrap();
        let dirs = Dirs::new();
        let bench = Bench::start(&dirs, Some(tmpfs_cdi.path())).await;
        for _ in 0..settings.warmup {
            bench.cycle(&[0]).await;
        }
        let (prepare_tmpfs, unprepare_tmpfs) = bench.cycles(&[0], settings.variant_cycles).await;
        report(
            "1 claim x 1 GPU, CDI root on tmpfs: NodePrepareResources",
            &prepare_tmpfs,
        );
        report(
            "1 claim x 1 GPU, CDI root on tmpfs: NodeUnprepareResources",
            &unprepare_tmpfs,
        );
        conditions(disk.root.path(), settings.floor_samples / 5);
        bench.stop().await;
    } else {
        println!("/dev/shm is not tmpfs; skipping the tmpfs CDI root variant");
    }
}

/// Phases of one start-up, in order; each is the time since the previous one ended.
const PHASES: [&str; 8] = [
    "open the fake backend (h100-sxm-80gb-x8)",
    "discover the driver's files for CDI",
    "start the driver (checkpoint load, recovery)",
    "build the kubelet plugin",
    "compute and validate the ResourceSlices",
    "sockets up (DRA, then registration)",
    "kubelet connects, GetInfo answered",
    "NotifyRegistrationStatus(registered) answered",
];

/// `runs` start-ups, each in a fresh child process (this binary with [`STARTUP_CHILD`]) and
/// fresh temp dirs, so every one is cold as the agent's only start-up is, and none leaves
/// allocations behind in this process's memory figures; prints the distribution of the total
/// and of each phase.
fn measure_startups(runs: usize) {
    let exe = std::env::current_exe().unwrap();
    let mut totals = Vec::with_capacity(runs);
    let mut phases: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); PHASES.len()];
    for _ in 0..runs {
        let output = std::process::Command::new(&exe)
            .arg(STARTUP_CHILD)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "start-up child failed: {}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let nanos: Vec<u64> = stdout
            .lines()
            .find_map(|line| line.strip_prefix("startup-nanos:"))
            .unwrap_or_else(|| panic!("no timings from the start-up child:\n{stdout}"))
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(nanos.len(), PHASES.len() + 1, "{stdout}");
        totals.push(Duration::from_nanos(nanos[0]));
        for (all, one) in phases.iter_mut().zip(&nanos[1..]) {
            all.push(Duration::from_nanos(*one));
        }
    }
    report(
        "start-up to registered and published (fake 8xH100)",
        &totals,
    );
    for (name, samples) in PHASES.iter().zip(&phases) {
        report(&format!("  start-up phase: {name}"), samples);
    }
}

/// The child side of [`measure_startups`]: one start-up on a runtime like the agent's, its
/// total and phases printed in nanoseconds on one line.
fn startup_child() {
    let (total, phases) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(measure_startup());
    let phases: Vec<String> = phases.iter().map(|d| d.as_nanos().to_string()).collect();
    println!("startup-nanos: {} {}", total.as_nanos(), phases.join(" "));
}

/// One start-up from nothing, as `run.rs` does it after argument parsing, with a fake
/// kubelet registering the plugin: the total, and each phase's share.
async fn measure_startup() -> (Duration, Vec<Duration>) {
    let dirs = Dirs::new();
    let mut clock = Phases::new();

    let backend: Arc<dyn GpuBackend> = Arc::new(FakeBackend::builtin(H100).unwrap().unwrap());
    clock.lap();
    let common_edits = CommonEdits::discover(
        backend.as_ref(),
        RootMapping::new(fake_driver_root(), HOST_DRIVER_ROOT),
        &CommonOptions {
            hooks: Hooks::CdiHook { path: HOOK.into() },
            env: Vec::new(),
        },
    )
    .unwrap();
    clock.lap();
    let registry = prometheus::Registry::new();
    let (driver, _startup) = GpuDriver::start(GpuDriverConfig {
        node_name: NODE.into(),
        backend,
        plugin_data_dir: dirs.data.clone(),
        cdi: CdiStore::new(&dirs.cdi),
        common_edits,
        gates: FeatureGates::default(),
        boot_id: BOOT_ID.into(),
        metrics: Metrics::new(&registry, DRIVER, NODE).unwrap(),
        mps: None,
        vfio: None,
        health: None,
    })
    .unwrap();
    let driver = Arc::new(driver);
    clock.lap();
    let plugin = KubeletPlugin::builder(DRIVER, Arc::clone(&driver))
        .registrar_dir(&dirs.registrar)
        .plugin_data_dir(&dirs.data)
        .claim_reader(Arc::new(InMemoryClaimReader::new()))
        .build()
        .unwrap();
    clock.lap();
    // What `Publisher::publish` checks before the API writes, plus building the objects.
    let resources = driver.node_resources();
    let owner = SliceOwner {
        driver: DRIVER.into(),
        node_name: NODE.into(),
        node_uid: "5d4e8f2a-1b3c-4d5e-9f60-718293a4b5c6".into(),
    };
    let slices = desired_slices(&owner, CounterLayout::Separate, &resources).unwrap();
    clock.lap();
    let published: usize = slices
        .iter()
        .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!(published, resources.devices.len());
    assert!(published >= 8, "{published} devices published");

    let registration_socket = plugin.registration_socket_path().to_owned();
    let mut registration = plugin.registration_status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(plugin.run(async move {
        let _ = stopped.await;
    }));
    // Polled without a timer: tokio's timers tick in whole milliseconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_socket(&registration_socket) {
        assert!(Instant::now() < deadline, "plugin did not start");
        tokio::task::yield_now().await;
    }
    clock.lap();
    let mut kubelet = RegistrationClient::new(channel(&registration_socket).await);
    let info = kubelet.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, DRIVER);
    clock.lap();
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    registration
        .wait_for(|state| *state == RegistrationState::Registered)
        .await
        .unwrap();
    clock.lap();
    let total = clock.total();

    drop(kubelet);
    let _ = stop.send(());
    with_timeout(handle).await.unwrap().unwrap();
    (total, clock.laps)
}

/// A stopwatch with laps.
struct Phases {
    started: Instant,
    last: Instant,
    laps: Vec<Duration>,
}

impl Phases {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            laps: Vec::with_capacity(PHASES.len()),
        }
    }

    fn lap(&mut self) {
        let now = Instant::now();
        self.laps.push(now - self.last);
        self.last = now;
    }

    fn total(&self) -> Duration {
        self.last - self.started
    }
}

async fn with_timeout<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out after 10 s")
}

/// A driver behind a running plugin and a connected v1 client.
struct Bench {
    driver: Arc<GpuDriver>,
    registry: prometheus::Registry,
    plugin: RunningPlugin,
    client: dra_v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>,
}

impl Bench {
    async fn start(dirs: &Dirs, cdi_root: Option<&Path>) -> Self {
        Self::start_with(dirs, cdi_root, FeatureGates::default()).await
    }

    async fn start_with(dirs: &Dirs, cdi_root: Option<&Path>, gates: FeatureGates) -> Self {
        let cdi = cdi_root.unwrap_or(&dirs.cdi).to_owned();
        let (config, registry) = config_at(&dirs.data, &cdi, H100, gates);
        let (driver, _startup) = GpuDriver::start(config).unwrap();
        let driver = Arc::new(driver);
        let reader = Arc::new(InMemoryClaimReader::new());
        for i in 0..8 {
            reader.insert(allocated_claim(
                &format!("claim-{i}"),
                &uid(i),
                &[("gpu", &format!("gpu-{i}"), false)],
            ));
        }
        let plugin = RunningPlugin::start(dirs, Arc::clone(&driver), reader).await;
        let client = plugin.dra_v1().await;
        Self {
            driver,
            registry,
            plugin,
            client,
        }
    }

    fn claims(indices: &[u32]) -> Vec<dra_v1::Claim> {
        indices
            .iter()
            .map(|i| dra_v1::Claim {
                namespace: "ns".into(),
                uid: uid(*i),
                name: format!("claim-{i}"),
            })
            .collect()
    }

    /// One Prepare and one Unprepare of `indices`; their durations.
    async fn cycle(&self, indices: &[u32]) -> (Duration, Duration) {
        let mut client = self.client.clone();
        let started = Instant::now();
        let prepared = client
            .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
                claims: Self::claims(indices),
            })
            .await
            .unwrap()
            .into_inner();
        let prepare = started.elapsed();
        assert_eq!(prepared.claims.len(), indices.len());
        for (uid, result) in &prepared.claims {
            assert_eq!(result.error, "", "prepare of {uid}");
            assert_eq!(result.devices.len(), 1);
        }
        let started = Instant::now();
        let unprepared = client
            .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
                claims: Self::claims(indices),
            })
            .await
            .unwrap()
            .into_inner();
        let unprepare = started.elapsed();
        assert!(unprepared.claims.values().all(|r| r.error.is_empty()));
        (prepare, unprepare)
    }

    async fn cycles(&self, indices: &[u32], n: usize) -> (Vec<Duration>, Vec<Duration>) {
        let mut prepare = Vec::with_capacity(n);
        let mut unprepare = Vec::with_capacity(n);
        for _ in 0..n {
            let (p, u) = self.cycle(indices).await;
            prepare.push(p);
            unprepare.push(u);
        }
        (prepare, unprepare)
    }

    /// Prepare and Unprepare of claim 0 straight on the driver.
    async fn direct_cycles(&self, n: usize) -> (Vec<Duration>, Vec<Duration>) {
        let claim = allocated_claim("claim-0", &uid(0), &[("gpu", "gpu-0", false)]);
        let claim_ref = claim_ref(&claim);
        let mut prepare = Vec::with_capacity(n);
        let mut unprepare = Vec::with_capacity(n);
        for _ in 0..n {
            let input = vec![to_prepare(claim.clone())];
            let started = Instant::now();
            let results = self.driver.prepare_resource_claims(input).await;
            prepare.push(started.elapsed());
            assert!(results.values().all(Result::is_ok));
            let started = Instant::now();
            let results = self
                .driver
                .unprepare_resource_claims(vec![claim_ref.clone()])
                .await;
            unprepare.push(started.elapsed());
            assert!(results.values().all(Result::is_ok));
        }
        (prepare, unprepare)
    }

    /// Mean checkpoint write time from the driver's own histogram.
    fn report_checkpoint_writes(&self) {
        let text = scrape(&self.registry);
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        let count = value("nvdra_agent_checkpoint_write_duration_seconds_count");
        let sum = value("nvdra_agent_checkpoint_write_duration_seconds_sum");
        if count > 0.0 {
            println!(
                "checkpoint writes: {count} writes, mean {:.3} ms each (from \
                 nvdra_agent_checkpoint_write_duration_seconds)",
                sum / count * 1e3
            );
        }
    }

    async fn stop(self) {
        drop(self.client);
        self.plugin.stop().await;
    }
}

/// Round trip of an empty closure through `spawn_blocking`, what every batch pays.
async fn measure_handoff(samples: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        out.push(started.elapsed());
    }
    out
}

/// Bare replace of a 2 KiB file: create, write, (fsync,) rename, (fsync the directory).
fn measure_floor(dir: &Path, samples: usize, sync: bool) -> Vec<Duration> {
    let temp = dir.join("floor.tmp");
    let target = dir.join("floor");
    let data = vec![b'x'; 2048];
    (0..samples)
        .map(|_| {
            let started = Instant::now();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)
                .unwrap();
            file.write_all(&data).unwrap();
            if sync {
                file.sync_all().unwrap();
            }
            drop(file);
            std::fs::rename(&temp, &target).unwrap();
            if sync {
                std::fs::File::open(dir).unwrap().sync_all().unwrap();
            }
            started.elapsed()
        })
        .collect()
}

/// What the disk and CPUs were like right after a scenario: other processes on a shared
/// machine move the numbers, so each scenario is printed with its own floor.
fn conditions(dir: &Path, samples: usize) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_owned();
    report(
        &format!("  conditions: load {load}; floor now"),
        &measure_floor(dir, samples, true),
    );
}

fn report(what: &str, samples: &[Duration]) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64() * 1e3
    };
    println!(
        "{what}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        sorted.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}

/// `VmRSS` of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The type of the filesystem holding `path` (longest matching mount point).
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".to_owned(), |(_, kind)| kind)
}

//! The MPS control daemons the agent supervises, driven against the
//! stand-in `nvidia-cuda-mps-control` in `tests/fixtures` (a shell script
//! that speaks the real tool's protocol and records what it was told).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvdra_agent::mps::{DaemonSpec, MpsDaemons, MpsOptions};

/// A private copy of the stand-in and a data directory.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvidia-cuda-mps-control"),
            dir.path().join("bin/nvidia-cuda-mps-control"),
        )
        .unwrap();
        Self { dir }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.dir.path().join("bin").join(name)
    }

    fn options(&self, private_shm: bool) -> MpsOptions {
        MpsOptions {
            control: self.bin("nvidia-cuda-mps-control"),
            library_dir: self.dir.path().join("lib"),
            root: self.dir.path().join("plugin/mps"),
            proc_root: PathBuf::from("/proc"),
            private_shm,
            start_timeout: Duration::from_secs(10),
        }
    }

    fn daemons(&self) -> MpsDaemons {
        MpsDaemons::new(self.options(false))
    }

    /// The stand-in's record, without the pipe-directory prefix.
    fn calls(&self) -> Vec<String> {
        let text =
            std::fs::read_to_string(self.bin("nvidia-cuda-mps-control.calls")).unwrap_or_default();
        text.lines()
            .map(|line| {
                line.split_once(' ')
                    .map_or(line, |(_, rest)| rest)
                    .to_owned()
            })
            .collect()
    }
}

fn spec(claim: &str) -> DaemonSpec {
    DaemonSpec::new(
        claim,
        &["GPU-bbbb", "GPU-aaaa"],
        Some(25),
        BTreeMap::from([("GPU-aaaa".to_owned(), "10240M".to_owned())]),
    )
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn start_configures_and_stop_quits() {
    let node = Node::new();
    let daemons = node.daemons();
    let spec = spec("claim-1");
    daemons.start(&spec).unwrap();
    assert_eq!(
        node.calls(),
        [
            "start CUDA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb",
            "set_default_active_thread_percentage 25",
            "set_default_device_pinned_mem_limit GPU-aaaa 10240M",
        ]
    );
    let dir = node.options(false).root.join(&spec.id);
    assert!(dir.join("pipe/control").exists());
    assert!(dir.join("daemon.json").exists());
    assert_eq!(daemons.running().len(), 1);
    let (shm, pipe) = daemons.client_dirs(&spec.id);
    assert_eq!((shm, pipe), (dir.join("shm"), dir.join("pipe")));

    // Starting it again with the same spec changes nothing.
    daemons.start(&spec).unwrap();
    assert_eq!(node.calls().len(), 3);

    daemons.stop_claim("claim-1");
    assert_eq!(node.calls()[3..], ["quit", "stop"]);
    assert!(!dir.exists());
    assert!(daemons.running().is_empty());
}

#[test]
fn a_daemon_that_cannot_start_fails_with_its_own_message() {
    let node = Node::new();
    std::fs::write(
        node.bin("mps-fail-start"),
        "An MPS control daemon is already running for this GPU\n",
    )
    .unwrap();
    let daemons = node.daemons();
    let spec = spec("claim-2");
    let err = daemons.start(&spec).unwrap_err().to_string();
    assert!(
        err.contains("exited (exit code 3) before it was ready")
            && err.contains("An MPS control daemon is already running for this GPU"),
        "{err}"
    );
    // Nothing is left behind.
    assert!(!node.options(false).root.join(&spec.id).exists());
    assert!(daemons.running().is_empty());
}

#[test]
fn refused_settings_fail_the_start_and_stop_the_daemon() {
    let node = Node::new();
    let daemons = node.daemons();
    let mut spec = spec("claim-3");
    spec.pinned_memory_limits
        .insert("GPU-bbbb".to_owned(), "lots".to_owned());
    let err = daemons.start(&spec).unwrap_err().to_string();
    assert!(
        err.contains("refused its settings (exit code 1)")
            && err.contains(
                "Unrecognized command: set_default_device_pinned_mem_limit GPU-bbbb lots"
            ),
        "{err}"
    );
    let calls = node.calls();
    assert_eq!(calls.last().map(String::as_str), Some("stop"), "{calls:?}");
    assert!(!node.options(false).root.join(&spec.id).exists());
}

#[test]
fn a_dead_daemon_is_restarted_and_reconfigured() {
    let node = Node::new();
    let daemons = node.daemons();
    let spec = spec("claim-4");
    daemons.start(&spec).unwrap();
    let pid = daemons.running()[&spec.id];
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("the daemon to be restarted", || daemons.supervise() == 1);
    let new_pid = daemons.running()[&spec.id];
    assert_ne!(new_pid, pid);
    let starts = node
        .calls()
        .iter()
        .filter(|c| c.starts_with("start ") || c.starts_with("set_default_active"))
        .count();
    assert_eq!(starts, 4, "{:?}", node.calls());
    // A healthy daemon is left alone.
    assert_eq!(daemons.supervise(), 0);
    daemons.stop_claim("claim-4");
}

#[test]
fn a_new_agent_adopts_live_daemons_and_tears_down_unclaimed_ones() {
    let node = Node::new();
    let kept = spec("claim-kept");
    let gone = spec("claim-gone");
    let pid = {
        let first = node.daemons();
        first.start(&kept).unwrap();
        first.start(&gone).unwrap();
        first.running()[&kept.id]
        // The first agent goes away without stopping anything.
    };
    let second = node.daemons();
    let problems = second.recover(|claim| claim == "claim-kept");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(second.running(), BTreeMap::from([(kept.id.clone(), pid)]));
    assert!(!node.options(false).root.join(&gone.id).exists());
    // The adopted daemon was not restarted, so it got its settings once.
    let starts = node
        .calls()
        .iter()
        .filter(|c| c.starts_with("start "))
        .count();
    assert_eq!(starts, 2);

    // An adopted daemon that dies is restarted from its recorded spec.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("the adopted daemon to be restarted", || {
        second.supervise() == 1
    });
    assert_ne!(second.running()[&kept.id], pid);
    second.stop_claim("claim-kept");
    assert!(!node.options(false).root.join(&kept.id).exists());
}

#[test]
fn a_stopped_agent_restarts_daemons_that_died_with_it() {
    let node = Node::new();
    let spec = spec("claim-5");
    let pid = {
        let first = node.daemons();
        first.start(&spec).unwrap();
        first.running()[&spec.id]
    };
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    // Reap it: the test process is its parent.
    wait_until("the daemon to exit", || {
        !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    });
    let second = node.daemons();
    assert!(second.recover(|_| true).is_empty());
    assert_ne!(second.running()[&spec.id], pid);
    second.stop_claim("claim-5");
}

/// With a private `/dev/shm`, the daemon's `/dev/shm` is the claim's tmpfs
/// (what the claim's containers mount), and the agent's is untouched. It
/// needs CAP_SYS_ADMIN; without it the start fails naming that.
#[test]
fn private_shm_gives_the_daemon_the_claims_tmpfs() {
    let node = Node::new();
    std::fs::write(node.bin("mps-shm-probe"), "").unwrap();
    let daemons = MpsDaemons::new(node.options(true));
    let spec = spec("claim-6");
    match daemons.start(&spec) {
        Ok(()) => {
            let (shm, _) = daemons.client_dirs(&spec.id);
            assert!(shm.join("nvdra-mps-probe").exists());
            assert!(!Path::new("/dev/shm/nvdra-mps-probe").exists());
            daemons.stop_claim("claim-6");
            assert!(!node.options(true).root.join(&spec.id).exists());
        }
        Err(err) => {
            let text = err.to_string();
            assert!(text.contains("CAP_SYS_ADMIN"), "{text}");
        }
    }
}

#[path = "driver/fixtures.rs"]
mod fixtures;

/// MPS through the GPU driver: Prepare sets the compute mode and starts the
/// group's daemon, the spec gives containers the pipe and shm, Unprepare
/// (or a failure) undoes all of it.
mod through_the_driver {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use k8s_openapi::api::resource::v1::ResourceClaim;
    use nvdra_agent::checkpoint::CheckpointStore;
    use nvdra_agent::driver::GpuDriver;
    use nvdra_agent::mps::MpsDaemons;
    use nvdra_api::{FeatureGate, FeatureGates};
    use nvdra_gpu::{ComputeMode, FakeBackend, GpuBackend};
    use nvdra_kubelet_plugin::{ClaimError, DraDriver};
    use serde_json::json;

    use super::Node;
    use crate::fixtures::*;

    fn gates() -> FeatureGates {
        FeatureGates::default().with(FeatureGate::MPSSupport, true)
    }

    fn start(dirs: &Dirs, node: &Node, fake: &Arc<FakeBackend>) -> (GpuDriver, Arc<MpsDaemons>) {
        let (mut config, _registry) = config(dirs, H100, gates());
        config.backend = fake.clone();
        let mut options = node.options(false);
        options.root = dirs.data.join("mps");
        let daemons = Arc::new(MpsDaemons::new(options));
        config.mps = Some(daemons.clone());
        (GpuDriver::start(config).unwrap().0, daemons)
    }

    fn mps_claim(n: u32, gpus: &[&str], mps: serde_json::Value) -> ResourceClaim {
        let devices: Vec<Alloc<'_>> = gpus.iter().map(|g| ("gpu", *g, false)).collect();
        allocated_claim_in_pool(
            &format!("c{n}"),
            &uid(n),
            NODE,
            &devices,
            vec![claim_config(
                &["gpu"],
                json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
                       "sharing": {"strategy": "MPS", "mpsConfig": mps}}),
            )],
        )
    }

    async fn prepare(driver: &GpuDriver, claim: ResourceClaim) -> Result<(), String> {
        let claim_uid = claim.metadata.uid.clone().unwrap();
        let mut got = driver
            .prepare_resource_claims(vec![to_prepare(claim)])
            .await;
        got.remove(&claim_uid)
            .unwrap()
            .map(|_| ())
            .map_err(|e: ClaimError| e.to_string())
    }

    #[tokio::test]
    async fn prepare_starts_the_daemon_and_unprepare_undoes_everything() {
        let dirs = Dirs::new();
        let node = Node::new();
        let fake = backend(H100);
        let (driver, daemons) = start(&dirs, &node, &fake);
        let gpus = fake.gpus().unwrap();
        let mut sorted = [gpus[0].uuid.clone(), gpus[1].uuid.clone()];
        sorted.sort();

        let claim = mps_claim(
            1,
            &["gpu-0", "gpu-1"],
            json!({"defaultActiveThreadPercentage": 50,
                   "defaultPinnedDeviceMemoryLimit": "10Gi",
                   "defaultPerDevicePinnedMemoryLimit": {"1": "4Gi"}}),
        );
        let claim_ref = claim_ref(&claim);
        prepare(&driver, claim).await.unwrap();

        // Exclusive-process on the claim's GPUs only, while MPS runs.
        assert_eq!(
            fake.compute_mode(&gpus[0]).unwrap(),
            ComputeMode::ExclusiveProcess
        );
        assert_eq!(
            fake.compute_mode(&gpus[1]).unwrap(),
            ComputeMode::ExclusiveProcess
        );
        assert_eq!(fake.compute_mode(&gpus[2]).unwrap(), ComputeMode::Default);
        // The daemon serves both GPUs with the claim's limits; index 1 is the
        // second UUID in sorted order.
        assert_eq!(
            node.calls(),
            [
                format!("start CUDA_VISIBLE_DEVICES={},{}", sorted[0], sorted[1]),
                "set_default_active_thread_percentage 50".to_owned(),
                format!("set_default_device_pinned_mem_limit {} 10240M", sorted[0]),
                format!("set_default_device_pinned_mem_limit {} 4096M", sorted[1]),
            ]
        );
        // The checkpoint names the daemon, as upstream's does.
        let state = CheckpointStore::new(&dirs.data)
            .load(BOOT_ID)
            .unwrap()
            .state;
        let group = &state.claim(&uid(1)).unwrap().prepared_devices[0];
        let id = group.config_state["mpsControlDaemonID"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(id.starts_with(&format!("{}-", uid(1))), "{id}");
        assert_eq!(daemons.running().keys().collect::<Vec<_>>(), [&id]);
        // Every device of the group gets the pipe directory and the shm.
        let spec = dirs.read_spec(&uid(1));
        let mps_dir = dirs.data.join("mps").join(&id);
        for device in &spec.devices {
            let edits = &device.container_edits;
            assert!(
                edits
                    .env
                    .contains(&"CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps".to_owned()),
                "{edits:?}"
            );
            let mounts: BTreeMap<&str, &str> = edits
                .mounts
                .iter()
                .map(|m| (m.container_path.as_str(), m.host_path.as_str()))
                .collect();
            assert_eq!(mounts["/dev/shm"], mps_dir.join("shm").to_str().unwrap());
            assert_eq!(
                mounts["/tmp/nvidia-mps"],
                mps_dir.join("pipe").to_str().unwrap()
            );
        }

        let got = driver.unprepare_resource_claims(vec![claim_ref]).await;
        assert!(got[&uid(1)].is_ok(), "{got:?}");
        assert_eq!(node.calls()[4..], ["quit", "stop"]);
        assert!(daemons.running().is_empty());
        assert!(!mps_dir.exists());
        // Restored without the time-slicing gate (upstream forgets this).
        assert_eq!(fake.compute_mode(&gpus[0]).unwrap(), ComputeMode::Default);
        assert_eq!(fake.compute_mode(&gpus[1]).unwrap(), ComputeMode::Default);
    }

    #[tokio::test]
    async fn a_daemon_that_cannot_start_fails_the_claim_and_changes_nothing() {
        let dirs = Dirs::new();
        let node = Node::new();
        std::fs::write(
            node.bin("mps-fail-start"),
            "CUDA driver version is insufficient\n",
        )
        .unwrap();
        let fake = backend(H100);
        let (driver, daemons) = start(&dirs, &node, &fake);
        let err = prepare(&driver, mps_claim(2, &["gpu-3"], json!({})))
            .await
            .unwrap_err();
        assert!(
            err.contains("cannot set up MPS for the devices of claim config 0 (FromClaim)")
                && err.contains("CUDA driver version is insufficient"),
            "{err}"
        );
        let gpus = fake.gpus().unwrap();
        assert_eq!(fake.compute_mode(&gpus[3]).unwrap(), ComputeMode::Default);
        assert!(daemons.running().is_empty());
        assert_eq!(dirs.cdi_files(), Vec::<String>::new());
        let state = CheckpointStore::new(&dirs.data)
            .load(BOOT_ID)
            .unwrap()
            .state;
        assert!(state.claim(&uid(2)).is_none());
        assert_eq!(std::fs::read_dir(dirs.data.join("mps")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_limit_for_a_device_the_claim_lacks_names_the_field() {
        let dirs = Dirs::new();
        let node = Node::new();
        let fake = backend(H100);
        let (driver, _daemons) = start(&dirs, &node, &fake);
        let err = prepare(
            &driver,
            mps_claim(
                3,
                &["gpu-0"],
                json!({"defaultPerDevicePinnedMemoryLimit": {"3": "1Gi"}}),
            ),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("defaultPerDevicePinnedMemoryLimit.3") && err.contains("invalid device"),
            "{err}"
        );
        assert!(node.calls().is_empty(), "no daemon was started");
        assert_eq!(
            fake.compute_mode(&fake.gpus().unwrap()[0]).unwrap(),
            ComputeMode::Default
        );
    }

    #[tokio::test]
    async fn a_restarted_agent_keeps_the_daemon_and_unprepares_it() {
        let dirs = Dirs::new();
        let node = Node::new();
        let fake = backend(H100);
        let claim = mps_claim(4, &["gpu-5"], json!({"defaultActiveThreadPercentage": 20}));
        let claim_ref = claim_ref(&claim);
        let pid = {
            let (driver, daemons) = start(&dirs, &node, &fake);
            prepare(&driver, claim).await.unwrap();
            daemons.running().into_values().next().unwrap()
        };
        // A new agent over the same node adopts the running daemon.
        let (driver, daemons) = start(&dirs, &node, &fake);
        assert_eq!(daemons.running().into_values().collect::<Vec<_>>(), [pid]);
        let starts = node
            .calls()
            .iter()
            .filter(|c| c.starts_with("start "))
            .count();
        assert_eq!(starts, 1);
        let got = driver.unprepare_resource_claims(vec![claim_ref]).await;
        assert!(got[&uid(4)].is_ok(), "{got:?}");
        assert!(daemons.running().is_empty());
        assert_eq!(
            fake.compute_mode(&fake.gpus().unwrap()[5]).unwrap(),
            ComputeMode::Default
        );
    }

    #[tokio::test]
    async fn a_prepare_interrupted_after_the_daemon_started_is_rolled_back() {
        let dirs = Dirs::new();
        let node = Node::new();
        let fake = backend(H100);
        {
            let (driver, daemons) = start(&dirs, &node, &fake);
            driver.set_fault_hook(Arc::new(|point| {
                if point == nvdra_agent::driver::FaultPoint::AfterSpecsWritten {
                    panic!("injected crash");
                }
            }));
            let err = prepare(&driver, mps_claim(5, &["gpu-6"], json!({})))
                .await
                .unwrap_err();
            assert!(err.contains("internal error"), "{err}");
            assert_eq!(
                daemons.running().len(),
                1,
                "the crash left the daemon running"
            );
        }
        let gpu = &fake.gpus().unwrap()[6];
        assert_eq!(
            fake.compute_mode(gpu).unwrap(),
            ComputeMode::ExclusiveProcess
        );
        // The next start rolls the claim back: daemon stopped, GPU restored.
        let (_driver, daemons) = start(&dirs, &node, &fake);
        assert!(daemons.running().is_empty());
        assert_eq!(node.calls()[1..], ["quit", "stop"]);
        assert_eq!(std::fs::read_dir(dirs.data.join("mps")).unwrap().count(), 0);
        assert_eq!(fake.compute_mode(gpu).unwrap(), ComputeMode::Default);
    }
}

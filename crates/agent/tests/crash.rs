//! Crash consistency: an agent process is SIGKILLed in the middle of a Prepare, and a new
//! driver started on the same directories (as the restarted pod would) must roll the claim
//! back, leave no CDI spec behind, and prepare the claim again when the kubelet retries.
//!
//! The crash is real: the test re-runs its own binary as a child process (`crash_child`,
//! ignored unless a parent starts it), which prepares a claim with a fault hook that signals
//! the parent at the chosen point and then blocks; the parent kills it with SIGKILL. No
//! destructor, no unwinding, no flush runs in the child, exactly as in an OOM kill.

#[path = "driver/fixtures.rs"]
mod fixtures;

#[cfg(test)]
mod crash {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use nvdra_agent::checkpoint::{CheckpointStore, ClaimState};
    use nvdra_agent::driver::{FaultPoint, GpuDriver};
    use nvdra_api::FeatureGates;
    use nvdra_kubelet_plugin::DraDriver;
    use pretty_assertions::assert_eq;

    use crate::fixtures::*;

    /// Tells the child where its directories are and where to stop.
    const CHILD_DIR: &str = "NVDRA_CRASH_TEST_DIR";
    const CHILD_POINT: &str = "NVDRA_CRASH_TEST_POINT";
    /// Written by the child when it reached the fault point.
    const MARKER: &str = "reached";

    fn claim_uid() -> String {
        uid(0xdead)
    }

    /// The child: prepares one claim and blocks forever at the fault point. A no-op when run
    /// directly (`--ignored` without the parent's environment).
    #[test]
    #[ignore = "runs only as the child process of the crash tests"]
    fn crash_child() {
        // Tests have no clap front end; the parent passes the temp dir through the environment.
        #[allow(clippy::disallowed_methods)]
        let (Ok(root), Ok(point)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_POINT)) else {
            return;
        };
        let root = Path::new(&root).to_owned();
        let stop_at = match point.as_str() {
            "started" => FaultPoint::AfterPrepareStarted,
            "specs" => FaultPoint::AfterSpecsWritten,
            other => panic!("unknown fault point {other}"),
        };
        let (config, _registry) = config_at(
            &root.join("data"),
            &root.join("cdi"),
            H100,
            FeatureGates::default(),
        );
        let (driver, _startup) = GpuDriver::start(config).unwrap();
        let marker = root.join(MARKER);
        driver.set_fault_hook(Arc::new(move |reached| {
            if reached == stop_at {
                std::fs::write(&marker, b"").unwrap();
                loop {
                    std::thread::park();
                }
            }
        }));
        let claim = allocated_claim("victim", &claim_uid(), &[("gpu", "gpu-0", false)]);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(driver.prepare_resource_claims(vec![to_prepare(claim)]));
        panic!("prepare returned although the fault hook blocks");
    }

    /// Runs the child until it reaches `point`, then SIGKILLs it.
    fn crash_at(dirs: &Dirs, point: &str) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash::crash_child",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dirs.root.path())
            .env(CHILD_POINT, point)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let marker = dirs.root.path().join(MARKER);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !marker.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("child exited with {status} before reaching {point}");
            }
            assert!(Instant::now() < deadline, "child did not reach {point}");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
    }

    async fn crash_restart_retry(point: &str, spec_left_by_crash: bool) {
        let dirs = Dirs::new();
        crash_at(&dirs, point);

        // What the dead process left: a started claim, and its spec if it got that far.
        let state = CheckpointStore::new(&dirs.data)
            .load(BOOT_ID)
            .unwrap()
            .state;
        assert_eq!(
            state.claim(&claim_uid()).map(|e| e.state.clone()),
            Some(ClaimState::PrepareStarted)
        );
        assert_eq!(dirs.spec_path(&claim_uid()).exists(), spec_left_by_crash);

        // The new process repairs it.
        let restarted = start(&dirs, H100);
        assert_eq!(restarted.startup.rolled_back, [claim_uid()]);
        assert_eq!(restarted.startup.problems, Vec::<String>::new());
        assert_eq!(dirs.cdi_files(), Vec::<String>::new());
        assert!(
            CheckpointStore::new(&dirs.data)
                .load(BOOT_ID)
                .unwrap()
                .state
                .is_empty()
        );

        // The kubelet's retry prepares the claim afresh.
        let claim = allocated_claim("victim", &claim_uid(), &[("gpu", "gpu-0", false)]);
        let results = restarted
            .driver
            .prepare_resource_claims(vec![to_prepare(claim)])
            .await;
        let devices = results[&claim_uid()].as_ref().unwrap();
        assert_eq!(
            devices[0].cdi_device_ids,
            [format!("k8s.gpu.nvidia.com/claim={}-gpu-0", claim_uid())]
        );
        assert!(dirs.spec_path(&claim_uid()).exists());
    }

    #[tokio::test]
    async fn sigkill_after_prepare_started() {
        crash_restart_retry("started", false).await;
    }

    #[tokio::test]
    async fn sigkill_after_spec_written_before_completed() {
        crash_restart_retry("specs", true).await;
    }
}

//! The equivalence suite: the same questions and MIG changes put to the
//! `FakeBackend` and to the `NvmlBackend` over the mock library, for every
//! built-in profile, must get identical answers. The fake backend is what
//! every test above the device layer trusts; this suite is what ties it to
//! the code that runs on real nodes.
//!
//! Each test copies the mock library into its own temporary driver root
//! (a copy is a separate library instance, so tests never share a node) as
//! `usr/lib64/libnvidia-ml.so.1`, with its config, a sysfs tree giving the
//! profile's PCIe roots, and a procfs root the mock keeps MIG capability
//! files in. The NVML backend finds it by its normal driver-root discovery.
//! Health events go to the fake backend by injection and to the mock
//! through its events file.

// Test set-up helpers panic on failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvdra_gpu::fake::BUILTIN_PROFILES;
use nvdra_gpu::{
    FakeBackend, GpuBackend, GpuInfo, HealthEvent, HealthEventKind, HealthWatch, Inventory,
    MigDeviceInfo, NvmlBackend, NvmlOptions, conformance,
};
use nvdra_nvml_mock::config::{MockConfig, append_event};
use nvdra_nvml_mock::layout::{built_library, events_file, install};
use pretty_assertions::assert_eq;

/// The cdylib cargo built next to this test binary.
fn mock_library() -> PathBuf {
    built_library(&std::env::current_exe().unwrap())
        .expect("the mock library next to the test binary")
}

/// A driver root holding the mock library, configured for one profile.
struct MockRoot {
    dir: tempfile::TempDir,
}

impl MockRoot {
    fn new(profile: &str) -> Self {
        Self::with_state(profile, None)
    }

    fn with_state(profile: &str, state_file: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = MockConfig {
            profile: profile.to_owned(),
            state_file: state_file.map(Path::to_owned),
            proc_root: Some(dir.path().join("proc")),
        };
        install(
            &mock_library(),
            dir.path(),
            &dir.path().join("sys"),
            &config,
        )
        .unwrap();
        Self { dir }
    }

    /// Appends `event` to the mock's events file.
    fn inject(&self, event: &HealthEvent) {
        append_event(&events_file(self.dir.path()), event).unwrap();
    }

    fn library(&self) -> PathBuf {
        self.dir.path().join("usr/lib64/libnvidia-ml.so.1")
    }

    fn open(&self) -> NvmlBackend {
        let mut options = NvmlOptions::new(self.dir.path());
        options.sysfs_root = self.dir.path().join("sys");
        options.proc_root = self.dir.path().join("proc");
        NvmlBackend::new(options).unwrap()
    }
}

fn fake(profile: &str) -> FakeBackend {
    FakeBackend::builtin(profile).unwrap().unwrap()
}

/// Both backends' answer to one question, as comparable text: the value, or
/// the error's message.
fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    fake: Result<T, nvdra_gpu::Error>,
    nvml: Result<T, nvdra_gpu::Error>,
) -> Result<T, String> {
    let fake = fake.map_err(|e| e.to_string());
    let nvml = nvml.map_err(|e| e.to_string());
    assert_eq!(nvml, fake, "{what}");
    fake
}

fn assert_same_inventory(what: &str, fake: &FakeBackend, nvml: &NvmlBackend) -> Inventory {
    let inventory = same(what, fake.inventory(), nvml.inventory()).unwrap();
    assert_eq!(
        conformance::check_inventory(&inventory),
        Vec::<String>::new()
    );
    inventory
}

#[test]
fn every_profile_reads_the_same() {
    for (name, _) in BUILTIN_PROFILES {
        let fake = fake(name);
        let root = MockRoot::new(name);
        let nvml = root.open();
        let inventory = assert_same_inventory(name, &fake, &nvml);
        same(name, fake.driver(), nvml.driver()).unwrap();
        // IMEX facts come from procfs, which the mock keeps as the driver does.
        same(name, fake.imex(), nvml.imex()).unwrap();
        let gpus = same(name, fake.gpus(), nvml.gpus()).unwrap();
        assert_eq!(gpus.len(), inventory.gpus.len());
        for gpu in &gpus {
            let at = format!("{name} GPU {}", gpu.index);
            same(&at, fake.mig_profiles(gpu), nvml.mig_profiles(gpu)).unwrap();
            same(&at, fake.fabric(gpu), nvml.fabric(gpu)).unwrap();
            let migs = same(&at, fake.mig_devices(gpu), nvml.mig_devices(gpu)).unwrap();
            for mig in &migs {
                same(
                    &mig.uuid,
                    fake.mig_capabilities(mig),
                    nvml.mig_capabilities(mig),
                )
                .unwrap();
                same(
                    &mig.uuid,
                    fake.mig_device_nodes(mig),
                    nvml.mig_device_nodes(mig),
                )
                .unwrap();
            }
            assert_eq!(nvml.gpu_device_nodes(gpu), fake.gpu_device_nodes(gpu));
        }
        // The library was found by discovery, as on a node.
        assert_eq!(
            nvml.driver_root().nvml_library,
            std::fs::canonicalize(root.library()).unwrap()
        );
    }
}

/// One step of a MIG script, applied to a backend.
#[derive(Debug, Clone)]
enum Step {
    Mode(usize, bool),
    Create(usize, u32, u32),
    Destroy(MigDeviceInfo),
}

fn apply(backend: &dyn GpuBackend, gpus: &[GpuInfo], step: &Step) -> Result<String, String> {
    let r = match step {
        Step::Mode(g, on) => backend.set_mig_mode(&gpus[*g], *on).map(|()| String::new()),
        Step::Create(g, id, start) => backend
            .create_mig_device(&gpus[*g], *id, *start)
            .map(|m| format!("{m:?}")),
        Step::Destroy(mig) => backend.destroy_mig_device(mig).map(|()| String::new()),
    };
    r.map_err(|e| e.to_string())
}

/// Runs `steps` on both backends, comparing every answer and the whole
/// inventory after every step; returns the devices created.
fn run_script(name: &str, fake: &FakeBackend, nvml: &NvmlBackend, steps: &[Step]) -> Vec<String> {
    let gpus = fake.gpus().unwrap();
    let mut answers = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        let want = apply(fake, &gpus, step);
        let got = apply(nvml, &gpus, step);
        assert_eq!(got, want, "{name} step {k}: {step:?}");
        assert_same_inventory(&format!("{name} after step {k}: {step:?}"), fake, nvml);
        answers.push(match want {
            Ok(v) => v,
            Err(e) => format!("refused: {e}"),
        });
    }
    answers
}

#[test]
fn mig_changes_round_trip_identically() {
    for (name, _) in BUILTIN_PROFILES {
        let fake = fake(name);
        let root = MockRoot::new(name);
        let nvml = root.open();
        let before = fake.inventory().unwrap();
        let mut sweep = Vec::new();
        for (g, gpu) in before.gpus.iter().enumerate() {
            if !gpu.info.mig_capable {
                // Every change is refused the same way on a GPU without MIG.
                let steps = [Step::Mode(g, true), Step::Create(g, 19, 0)];
                let answers = run_script(name, &fake, &nvml, &steps);
                assert!(answers.iter().all(|a| a.contains("does not support MIG")));
                continue;
            }
            // Sweep every profile × placement: a mix of created devices and
            // refusals (overlaps, used-up profiles), identical on both.
            let mut steps = vec![Step::Mode(g, true)];
            for p in &gpu.mig_profiles {
                for pl in &p.placements {
                    steps.push(Step::Create(g, p.gi_profile_id, pl.start));
                }
            }
            steps.push(Step::Create(g, 1, 0)); // no such profile
            steps.push(Step::Create(g, 19, 99)); // no such placement
            sweep.extend(run_script(name, &fake, &nvml, &steps));
            let created: Vec<MigDeviceInfo> = fake.mig_devices(&gpu.info).unwrap();
            if !created.is_empty() {
                run_script(name, &fake, &nvml, &[Step::Mode(g, false)]);
            }
            // Destroy what did not exist before, newest first; then again.
            let mut undo: Vec<Step> = created
                .iter()
                .filter(|m| !gpu.mig_devices.contains(m))
                .rev()
                .map(|m| Step::Destroy(m.clone()))
                .collect();
            if let Some(Step::Destroy(first)) = undo.first().cloned() {
                undo.push(Step::Destroy(first)); // already gone
            }
            if !gpu.info.mig_enabled {
                undo.push(Step::Mode(g, false));
            }
            run_script(name, &fake, &nvml, &undo);
        }
        if before.gpus.iter().any(|g| g.info.mig_capable) {
            // The sweep exercised both outcomes.
            assert!(
                sweep.iter().any(|a| a.starts_with("MigDeviceInfo")),
                "{name}"
            );
            assert!(
                sweep
                    .iter()
                    .any(|a| a.contains("overlaps an existing MIG instance")),
                "{name}"
            );
        }
        // Every change was undone: both are back where they started.
        assert_eq!(nvml.inventory().unwrap(), before, "{name}");
    }
}

/// A caller's `GpuInfo` may predate a MIG mode change; the device list
/// follows the hardware on both backends, not the caller's copy.
#[test]
fn mig_devices_follow_the_gpu_not_a_stale_copy() {
    for (name, _) in BUILTIN_PROFILES {
        let fake = fake(name);
        let root = MockRoot::new(name);
        let nvml = root.open();
        for gpu in fake.gpus().unwrap() {
            let mut stale = gpu.clone();
            stale.mig_enabled = !gpu.mig_enabled;
            same(
                &format!("{name} GPU {}", gpu.index),
                fake.mig_devices(&stale),
                nvml.mig_devices(&stale),
            )
            .unwrap();
        }
    }
}

#[test]
fn compute_modes_round_trip_identically() {
    use nvdra_gpu::ComputeMode;
    let name = "h200-x8";
    let fake = fake(name);
    let root = MockRoot::new(name);
    let nvml = root.open();
    let gpu = &fake.gpus().unwrap()[5];
    for mode in [
        ComputeMode::ExclusiveProcess,
        ComputeMode::Prohibited,
        ComputeMode::Default,
    ] {
        same(
            "set",
            fake.set_compute_mode(gpu, mode),
            nvml.set_compute_mode(gpu, mode),
        )
        .unwrap();
        let got = same("get", fake.compute_mode(gpu), nvml.compute_mode(gpu)).unwrap();
        assert_eq!(got, mode);
    }
}

#[test]
fn time_slices_go_through_the_driver_roots_nvidia_smi() {
    use nvdra_gpu::TimeSlice;
    use std::os::unix::fs::PermissionsExt;
    let name = "h100-sxm-80gb-x8";
    let root = MockRoot::new(name);
    let bin = root.dir.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = root.dir.path().join("calls");
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nvml = root.open();
    let fake = fake(name);
    let gpu = &fake.gpus().unwrap()[2];
    for slice in [TimeSlice::Long, TimeSlice::Default] {
        same(
            "set",
            fake.set_time_slice(gpu, slice),
            nvml.set_time_slice(gpu, slice),
        )
        .unwrap();
        assert_eq!(fake.time_slice(&gpu.uuid), slice);
    }
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        format!(
            "compute-policy -i {0} --set-timeslice=3\ncompute-policy -i {0} --set-timeslice=0\n",
            gpu.uuid
        )
    );
}

#[test]
fn created_devices_survive_a_new_process_through_the_state_file() {
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("state.json");
    let first = MockRoot::with_state("h100-sxm-80gb-x8", Some(&state_file));
    let nvml = first.open();
    let gpu = nvml.gpus().unwrap().remove(3);
    nvml.set_mig_mode(&gpu, true).unwrap();
    let mut gpu_now = gpu.clone();
    gpu_now.mig_enabled = true;
    let made = nvml.create_mig_device(&gpu_now, 9, 4).unwrap();
    assert_eq!(made.device_name(), "gpu-3-mig-3g40gb-9-4");

    // A second copy of the library is a fresh library instance, as after
    // an agent restart: it knows the device only from the state file.
    let second = MockRoot::with_state("h100-sxm-80gb-x8", Some(&state_file));
    let restarted = second.open();
    assert_eq!(
        restarted.mig_devices(&gpu_now).unwrap(),
        std::slice::from_ref(&made)
    );
    assert_eq!(
        restarted.mig_capabilities(&made).unwrap(),
        nvml.mig_capabilities(&made).unwrap()
    );
    restarted.destroy_mig_device(&made).unwrap();
    restarted.set_mig_mode(&gpu_now, false).unwrap();
    let third = MockRoot::with_state("h100-sxm-80gb-x8", Some(&state_file));
    assert_eq!(
        third.open().inventory().unwrap(),
        fake("h100-sxm-80gb-x8").inventory().unwrap()
    );
}

/// Long enough for any event that is on its way; only reached on failure.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// Injects `events` into both backends and checks that both watches deliver
/// exactly `expected`, in order, and then nothing.
fn assert_same_health(
    what: &str,
    (fake, fake_watch): (&FakeBackend, &HealthWatch),
    (root, nvml_watch): (&MockRoot, &HealthWatch),
    events: &[HealthEvent],
    expected: &[HealthEvent],
) {
    for event in events {
        fake.inject_health_event(event.clone());
        root.inject(event);
    }
    for (k, want) in expected.iter().enumerate() {
        let got = same(
            &format!("{what}: event {k}"),
            fake_watch.wait(EVENT_WAIT),
            nvml_watch.wait(EVENT_WAIT),
        );
        assert_eq!(got, Ok(Some(want.clone())), "{what}: event {k}");
    }
    let quiet = Duration::from_millis(50);
    let rest = same(
        &format!("{what}: after the events"),
        fake_watch.wait(quiet),
        nvml_watch.wait(quiet),
    );
    assert_eq!(rest, Ok(None), "{what}");
}

#[test]
fn health_events_arrive_identically() {
    let mut saw_mig = false;
    for (name, _) in BUILTIN_PROFILES {
        let fake = fake(name);
        let root = MockRoot::new(name);
        let nvml = root.open();
        let gpus = fake.gpus().unwrap();
        // The last GPU is not watched: its events reach neither watch.
        let (watched, [last]) = gpus.split_at(gpus.len() - 1) else {
            unreachable!("split_at leaves one GPU")
        };
        assert!(!watched.is_empty(), "{name} needs two GPUs");
        let fake_watch = fake.watch_health(watched).unwrap();
        let nvml_watch = nvml.watch_health(watched).unwrap();
        assert_eq!(nvml_watch.unmonitored(), fake_watch.unmonitored(), "{name}");
        assert!(fake_watch.unmonitored().is_empty(), "{name}");

        let on = |gpu: &GpuInfo, kind| HealthEvent::gpu(gpu.uuid.clone(), kind);
        let first = &watched[0];
        let second = &watched[watched.len() - 1];
        let mut events = vec![
            on(last, HealthEventKind::Xid(31)),
            on(first, HealthEventKind::Xid(79)),
            on(second, HealthEventKind::DoubleBitEcc),
            on(first, HealthEventKind::SingleBitEcc),
        ];
        // A MIG device's event: an existing device where the profile has
        // one, else GI 1 / CI 0 of a MIG-capable GPU.
        let mig = watched.iter().find(|g| g.mig_capable).map(|gpu| {
            let (gi, ci) = fake
                .mig_devices(gpu)
                .unwrap()
                .first()
                .map_or((1, 0), |m| (m.gi_id, m.ci_id));
            HealthEvent {
                gpu_uuid: gpu.uuid.clone(),
                gi_id: Some(gi),
                ci_id: Some(ci),
                kind: HealthEventKind::Xid(94),
            }
        });
        saw_mig |= mig.is_some();
        events.extend(mig);
        events.push(HealthEvent::gpu_lost());
        let expected = &events[1..];
        assert_same_health(
            name,
            (&fake, &fake_watch),
            (&root, &nvml_watch),
            &events,
            expected,
        );
    }
    assert!(saw_mig, "some built-in profile is MIG capable");
}

#[test]
fn unmonitored_gpus_are_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = nvdra_gpu::FakeProfile::uniform(nvdra_gpu::GpuModel::H100Sxm5_80gb, 3);
    profile.gpus[1].health_events = false;
    let path = dir.path().join("profile.yaml");
    std::fs::write(&path, serde_saphyr::to_string(&profile).unwrap()).unwrap();
    let profile_path = path.to_str().unwrap();
    let fake = FakeBackend::from_file(&path).unwrap();
    let root = MockRoot::new(profile_path);
    let nvml = root.open();
    let gpus = fake.gpus().unwrap();
    let fake_watch = fake.watch_health(&gpus).unwrap();
    let nvml_watch = nvml.watch_health(&gpus).unwrap();
    assert_eq!(fake_watch.unmonitored(), [gpus[1].uuid.clone()]);
    assert_eq!(nvml_watch.unmonitored(), fake_watch.unmonitored());

    let xid = |gpu: &GpuInfo| HealthEvent::gpu(gpu.uuid.clone(), HealthEventKind::Xid(48));
    assert_same_health(
        "unmonitored GPU 1",
        (&fake, &fake_watch),
        (&root, &nvml_watch),
        &[xid(&gpus[1]), xid(&gpus[2]), HealthEvent::gpu_lost()],
        &[xid(&gpus[2]), HealthEvent::gpu_lost()],
    );

    // A GPU neither backend has is refused alike.
    let mut stranger = gpus[0].clone();
    stranger.uuid = "GPU-00000000-0000-4000-8000-0000000000ff".into();
    same(
        "unknown GPU",
        fake.watch_health(std::slice::from_ref(&stranger))
            .map(|w| w.unmonitored().to_vec()),
        nvml.watch_health(std::slice::from_ref(&stranger))
            .map(|w| w.unmonitored().to_vec()),
    )
    .unwrap_err();
}

/// Every watch gets every event that comes after it starts, and only those.
#[test]
fn each_watch_sees_the_events_after_it_started() {
    let name = "l4-x2";
    let fake = fake(name);
    let root = MockRoot::new(name);
    let nvml = root.open();
    let gpus = fake.gpus().unwrap();
    let early = (
        fake.watch_health(&gpus).unwrap(),
        nvml.watch_health(&gpus).unwrap(),
    );
    let sbe = HealthEvent::gpu(gpus[0].uuid.clone(), HealthEventKind::SingleBitEcc);
    let dbe = HealthEvent::gpu(gpus[1].uuid.clone(), HealthEventKind::DoubleBitEcc);
    fake.inject_health_event(sbe.clone());
    root.inject(&sbe);
    // Both watches have taken it in before the second watch starts.
    let first = same(
        "early, 1",
        early.0.wait(EVENT_WAIT),
        early.1.wait(EVENT_WAIT),
    );
    assert_eq!(first, Ok(Some(sbe)));
    let late = (
        fake.watch_health(&gpus).unwrap(),
        nvml.watch_health(&gpus).unwrap(),
    );
    fake.inject_health_event(dbe.clone());
    root.inject(&dbe);
    for (what, (f, n)) in [("early, 2", &early), ("late", &late)] {
        let got = same(what, f.wait(EVENT_WAIT), n.wait(EVENT_WAIT));
        assert_eq!(got, Ok(Some(dbe.clone())), "{what}");
    }
}

/// Waiting for events keeps neither the NVML backend's other calls waiting
/// nor the waiter past its timeout.
#[test]
fn waiting_for_health_does_not_stall_the_backend() {
    let root = MockRoot::new("h100-sxm-80gb-x8");
    let nvml = std::sync::Arc::new(root.open());
    let gpus = nvml.gpus().unwrap();
    let watch = nvml.watch_health(&gpus).unwrap();
    let waiter = std::thread::spawn(move || {
        let t0 = Instant::now();
        let got = watch.wait(Duration::from_millis(1500)).unwrap();
        (got, t0.elapsed())
    });
    // Let the waiter get into its NVML wait.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    assert_eq!(nvml.gpus().unwrap(), gpus);
    nvml.set_compute_mode(&gpus[0], nvdra_gpu::ComputeMode::Default)
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(700),
        "calls waited {:?} for the health wait",
        t0.elapsed()
    );
    let (got, waited) = waiter.join().unwrap();
    assert_eq!(got, None);
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

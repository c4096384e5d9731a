//! Where the mock's node comes from: a small YAML file next to the library
//! (or named by `NVDRA_MOCK_NVML_CONFIG`), naming a fake profile and an
//! optional state file.
//!
//! ```yaml
//! # <driver-root>/usr/lib64/nvdra-mock-nvml.yaml
//! profile: h100-sxm-80gb-x8   # a built-in profile, or a path (relative to this file)
//! state_file: mig-state.json  # optional; relative to this file
//! proc_root: proc             # optional; where to keep the driver's MIG procfs files
//! ```
//!
//! Keeping the config beside the library makes a driver root
//! self-describing, like a real node: each copy of the library under a
//! different driver root is a different node, even inside one process.
//!
//! The state file holds the node's MIG state ([`FakeNode`]) after every
//! change, written atomically, so a restarted agent finds the MIG devices
//! it left, as it would on a real GPU. A state file that does not match the
//! profile's GPUs is an error, never silently dropped.
//!
//! Health events come from the events file [`EVENTS_FILE`] beside the
//! config (a fixed name rather than a config key, so existing configs and
//! the code writing them stay as they are). Anyone may append to it, one
//! event per line in [`HealthEvent`]'s text form, e.g.
//! `GPU-<uuid> xid 79`, `GPU-<uuid> gi 1 ci 0 xid 94`, `GPU-<uuid> dbe`,
//! `GPU-<uuid> sbe` or `lost` (`#` starts a comment). The mock reads lines
//! as they are completed (a line counts once its newline is written),
//! remembering how far it has read; a file that shrinks is read again from
//! the start. Each line happens once, when it is read (at every event-set
//! creation and every poll of a waiting `nvmlEventSetWait_v2`): it reaches
//! each event set that existed then and, when it waits, has its GPU
//! registered for its type, much as a real event reaches the sets that
//! exist when it happens. A line that is not an event is reported on
//! stderr and skipped. The file may be missing (no events).

use std::path::{Path, PathBuf};

use nvdra_gpu::FakeBackend;
use nvdra_gpu::GpuBackend;
use nvdra_gpu::HealthEvent;
use nvdra_gpu::fake::FakeNode;
use serde::{Deserialize, Serialize};

/// The config file's name, looked for in the library's directory.
pub const CONFIG_FILE: &str = "nvdra-mock-nvml.yaml";
/// The environment variable that overrides the config's location.
pub const CONFIG_ENV: &str = "NVDRA_MOCK_NVML_CONFIG";
/// The events file's name, beside the config.
pub const EVENTS_FILE: &str = "nvdra-mock-nvml.events";

/// The config file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// A built-in fake profile name or a profile file path.
    pub profile: String,
    /// Where to keep MIG state across processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// Where to keep the procfs files the driver writes for MIG devices
    /// (see [`crate::procfs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_root: Option<PathBuf>,
}

/// A node loaded from a config, with where to save its state.
#[derive(Debug)]
pub struct Loaded {
    /// The node.
    pub node: FakeNode,
    /// The state file, resolved.
    pub state_file: Option<PathBuf>,
    /// The procfs root, resolved.
    pub proc_root: Option<PathBuf>,
    /// The events file (which need not exist).
    pub events_file: PathBuf,
    /// The config file it came from.
    pub config_path: PathBuf,
}

/// Reads the config at `path` and builds its node, applying the state file
/// when one exists.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config: MockConfig = serde_saphyr::from_str(&text)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let backend = profile_backend(&config.profile, dir).map_err(|e| {
        format!(
            "profile {:?} of {}: {}",
            config.profile,
            path.display(),
            chain(&e)
        )
    })?;
    let imex = backend
        .imex()
        .map_err(|e| format!("profile {:?}: {}", config.profile, chain(&e)))?;
    // The fake backend's own node: the profile's inventory and what it says
    // beyond it (GPUs without health events).
    let mut node = backend.fake_node();
    let state_file = config.state_file.map(|f| dir.join(f));
    if let Some(file) = state_file.as_deref().filter(|f| f.exists()) {
        let saved = read_state(file)?;
        let uuids = |n: &FakeNode| -> Vec<String> {
            n.inventory
                .gpus
                .iter()
                .map(|g| g.info.uuid.clone())
                .collect()
        };
        if uuids(&saved) != uuids(&node) {
            return Err(format!(
                "state file {} describes other GPUs than profile {:?}; delete it to start afresh",
                file.display(),
                config.profile
            ));
        }
        for (gpu, old) in node.inventory.gpus.iter_mut().zip(saved.inventory.gpus) {
            gpu.info.mig_enabled = old.info.mig_enabled;
            gpu.mig_devices = old.mig_devices;
        }
        node.bare_gpu_instances = saved.bare_gpu_instances;
        node.created = saved.created;
    }
    let proc_root = config.proc_root.map(|p| dir.join(p));
    if let Some(root) = &proc_root {
        crate::procfs::write_driver_files(root, &imex)?;
        crate::procfs::sync(root, &node)?;
    }
    Ok(Loaded {
        node,
        state_file,
        proc_root,
        events_file: events_file(path),
        config_path: path.to_owned(),
    })
}

/// The events file of the config at `config_path`.
pub fn events_file(config_path: &Path) -> PathBuf {
    config_path.with_file_name(EVENTS_FILE)
}

/// Appends `event` to the events `file` (created if missing) as one line,
/// in one append-mode write, so that concurrent writers never interleave
/// within a line.
pub fn append_event(file: &Path, event: &HealthEvent) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(format!("{event}\n").as_bytes()))
        .map_err(|e| format!("cannot append to {}: {e}", file.display()))
}

/// The fake backend of `profile`: a built-in name, or a file path relative
/// to `dir`.
pub fn profile_backend(profile: &str, dir: &Path) -> Result<FakeBackend, nvdra_gpu::Error> {
    FakeBackend::builtin(profile).unwrap_or_else(|| FakeBackend::from_file(dir.join(profile)))
}

fn read_state(file: &Path) -> Result<FakeNode, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", file.display()))
}

/// Writes `node` to `file` atomically (temporary file, then rename).
pub fn save_state(file: &Path, node: &FakeNode) -> Result<(), String> {
    let text = serde_json::to_string_pretty(node).map_err(|e| e.to_string())?;
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

/// The config's location: `NVDRA_MOCK_NVML_CONFIG`, else [`CONFIG_FILE`]
/// beside `library`.
pub fn locate(library: Option<&Path>) -> Result<PathBuf, String> {
    // A C library has no main to hand it flags: the environment is its only
    // input besides the files beside it.
    #[allow(clippy::disallowed_methods)]
    if let Some(path) = std::env::var_os(CONFIG_ENV) {
        return Ok(PathBuf::from(path));
    }
    let library = library.ok_or_else(|| {
        format!("cannot tell where the mock library was loaded from; set {CONFIG_ENV}")
    })?;
    Ok(library.parent().unwrap_or(Path::new("/")).join(CONFIG_FILE))
}

/// The path of the loaded object that contains `address`, from
/// `/proc/self/maps` (no libc needed).
pub fn object_containing(address: usize) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        let path = fields.nth(4)?;
        (start <= address && address < end && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_object() {
        let here = object_containing((finds_its_own_object as *const ()).addr()).unwrap();
        assert!(here.exists(), "{}", here.display());
    }

    #[test]
    fn config_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        assert!(load(&path).unwrap_err().starts_with("cannot read "));
        std::fs::write(&path, "profile: nope\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.starts_with("profile \"nope\" of "), "{err}");
        std::fs::write(&path, "profil: l4-x2\n").unwrap();
        assert!(load(&path).unwrap_err().starts_with("cannot parse "));
    }

    #[test]
    fn events_file_and_health_flags_come_with_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut profile = nvdra_gpu::FakeProfile::uniform(nvdra_gpu::GpuModel::L4, 2);
        profile.gpus[0].health_events = false;
        let text = serde_saphyr::to_string(&profile).unwrap();
        std::fs::write(dir.path().join("node.yaml"), text).unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "profile: node.yaml\n").unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.events_file, dir.path().join(EVENTS_FILE));
        assert!(!loaded.node.health_events_supported(&profile.gpus[0].uuid));
        assert!(loaded.node.health_events_supported(&profile.gpus[1].uuid));
    }

    #[test]
    fn state_survives_and_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "profile: a100-40gb-x8-mig\nstate_file: state.json\n").unwrap();
        let mut loaded = load(&path).unwrap();
        let gi = loaded.node.create_gpu_instance(7, 19, 6).unwrap();
        let made = loaded.node.create_compute_instance(7, gi).unwrap();
        save_state(loaded.state_file.as_deref().unwrap(), &loaded.node).unwrap();
        let again = load(&path).unwrap();
        assert!(again.node.inventory.gpus[7].mig_devices.contains(&made));
        assert_eq!(again.node.created, loaded.node.created);

        std::fs::write(&path, "profile: l4-x2\nstate_file: state.json\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("describes other GPUs"), "{err}");
    }
}

//! Lays out a mock node: the library and its config in a driver root, where
//! the agent's discovery looks first (`usr/lib64/libnvidia-ml.so.1`), and
//! the sysfs links that give its GPUs their PCIe roots, as the kernel's
//! `bus/pci/devices/<bdf>` links do. Tests and the e2e harness build mock
//! nodes with it, so there is one description of what a mock node is.

use std::path::{Path, PathBuf};

use nvdra_gpu::GpuBackend;

use crate::config::{CONFIG_FILE, EVENTS_FILE, MockConfig, profile_backend};

/// The file name cargo gives the built mock library.
pub const BUILT_LIBRARY: &str = "libnvdra_nvml_mock.so";

/// Where in a driver root the library and its config go.
pub const LIBRARY_DIR: &str = "usr/lib64";

/// The built library in the cargo target directory of `exe` (a test binary
/// in `target/<profile>/deps/`, or a binary in `target/<profile>/`).
pub fn built_library(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(BUILT_LIBRARY))
        .find(|p| p.is_file())
}

/// The events file of the mock node laid out in `driver_root` (see
/// [`crate::config`] for its format).
pub fn events_file(driver_root: &Path) -> PathBuf {
    driver_root.join(LIBRARY_DIR).join(EVENTS_FILE)
}

/// Copies `library` into `driver_root` as `libnvidia-ml.so.1`, writes
/// `config` beside it, and links each GPU of the config's profile under
/// `sysfs_root/bus/pci/devices`. A copy, not a link: each copy is its own
/// library instance, so two mock nodes never share state in one process.
pub fn install(
    library: &Path,
    driver_root: &Path,
    sysfs_root: &Path,
    config: &MockConfig,
) -> Result<(), String> {
    let lib_dir = driver_root.join(LIBRARY_DIR);
    let io = |what: &str, path: &Path, e: std::io::Error| {
        format!("cannot {what} {}: {e}", path.display())
    };
    std::fs::create_dir_all(&lib_dir).map_err(|e| io("create", &lib_dir, e))?;
    let target = lib_dir.join(nvdra_gpu::driver_root::NVML_LIBRARY);
    std::fs::copy(library, &target).map_err(|e| io("copy the mock library to", &target, e))?;
    let text = serde_saphyr::to_string(config).map_err(|e| e.to_string())?;
    let config_path = lib_dir.join(CONFIG_FILE);
    std::fs::write(&config_path, text).map_err(|e| io("write", &config_path, e))?;

    let inventory = profile_backend(&config.profile, &lib_dir)
        .and_then(|b| b.inventory())
        .map_err(|e| format!("profile {:?}: {e}", config.profile))?;
    let devices = sysfs_root.join("bus/pci/devices");
    std::fs::create_dir_all(&devices).map_err(|e| io("create", &devices, e))?;
    for gpu in &inventory.gpus {
        if let Some(root) = &gpu.info.pcie_root {
            let bdf = &gpu.info.pci_bus_id;
            let link = devices.join(bdf);
            std::os::unix::fs::symlink(format!("../../../devices/{root}/{bdf}"), &link)
                .map_err(|e| io("link", &link, e))?;
        }
    }
    Ok(())
}

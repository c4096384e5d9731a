//! PCIe root complex lookup through sysfs.
//!
//! `<sysfs>/bus/pci/devices/<bdf>` is a symlink into the device tree, e.g.
//! `../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0`; the first
//! component of the form `pci<domain>:<bus>` names the root complex that
//! upstream publishes as `resource.kubernetes.io/pcieRoot`.
//!
//! Failure modes: a missing link or a target without a root component is
//! [`Error::ResolvePcieRoot`]; the NVML backend logs it and publishes the GPU
//! without a PCIe root, as upstream does.

use std::path::Path;

use crate::Error;
use crate::device::is_pcie_root;

/// The PCIe root (`pci0000:3a`) of the device `pci_bus_id` (`0000:3b:00.0`),
/// looked up under the sysfs mounted at `sysfs_root` (normally `/sys`).
pub fn pcie_root(sysfs_root: &Path, pci_bus_id: &str) -> Result<String, Error> {
    let link = sysfs_root.join("bus/pci/devices").join(pci_bus_id);
    let err = |reason: String| Error::ResolvePcieRoot {
        pci_bus_id: pci_bus_id.to_owned(),
        sysfs_path: link.clone(),
        reason,
    };
    let target = std::fs::read_link(&link).map_err(|e| err(format!("cannot read link: {e}")))?;
    target
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| is_pcie_root(c))
        .map(str::to_owned)
        .ok_or_else(|| {
            err(format!(
                "link target {} names no pci<domain>:<bus> component",
                target.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_root_from_link() {
        let sys = tempfile::tempdir().unwrap();
        let devices = sys.path().join("bus/pci/devices");
        std::fs::create_dir_all(&devices).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0",
            devices.join("0000:3b:00.0"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/platform/foo",
            devices.join("0000:c1:00.0"),
        )
        .unwrap();

        assert_eq!(pcie_root(sys.path(), "0000:3b:00.0").unwrap(), "pci0000:3a");

        let no_root = pcie_root(sys.path(), "0000:c1:00.0").unwrap_err();
        assert_eq!(
            no_root.to_string(),
            format!(
                "cannot resolve the PCIe root of 0000:c1:00.0 from {}: link target \
                 ../../../devices/platform/foo names no pci<domain>:<bus> component",
                devices.join("0000:c1:00.0").display()
            )
        );

        let missing = pcie_root(sys.path(), "0000:18:00.0").unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("cannot resolve the PCIe root of 0000:18:00.0 from "),
            "{missing}"
        );
    }
}

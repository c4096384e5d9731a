//! `cargo xtask generate`: writes artefacts derived from the Rust types into the tree.
//!
//! The API reference goes to `docs/api.md` (see [`crate::apidoc`]). CRDs go to
//! `charts/nvdra/crds/`, one file per CRD, named as upstream's chart names them.
//! YAML files in that folder that no type generates any more are removed, so renaming a CRD
//! cannot leave a stale copy behind; `crates/api/tests/crd_drift.rs` checks the same set.
//! Files are only rewritten when their content changes, keeping timestamps stable.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Folder of the generated CRDs, relative to the workspace root.
const CRDS_DIR: &str = "charts/nvdra/crds";

/// The workspace root, two levels above this crate's manifest.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes every CRD of `nvdra-api` under `root`/`charts/nvdra/crds/` and removes stale ones.
pub fn crds(root: &Path) -> anyhow::Result<()> {
    let dir = root.join(CRDS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = nvdra_api::crd_files()?;
    for (name, yaml) in &files {
        let path = dir.join(name);
        if fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
            fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            report(&format!("wrote {CRDS_DIR}/{name}"));
        }
    }
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name
            && name.ends_with(".yaml")
            && !files.iter().any(|(n, _)| *n == name)
        {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            report(&format!("removed stale {CRDS_DIR}/{name}"));
        }
    }
    Ok(())
}

/// Writes the API reference (`docs/api.md`) when its content changes.
pub fn api_doc(root: &Path) -> anyhow::Result<()> {
    let path = root.join(crate::apidoc::API_DOC);
    let text = crate::apidoc::render()?;
    if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        report(&format!("wrote {}", crate::apidoc::API_DOC));
    }
    Ok(())
}

#[expect(
    clippy::print_stderr,
    reason = "xtask is a developer tool whose interface is the terminal"
)]
fn report(line: &str) {
    eprintln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_crds_and_removes_stale_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(CRDS_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("resource.nvidia.com_old.yaml"), "stale").unwrap();
        fs::write(dir.join("README.md"), "kept").unwrap();

        crds(root.path()).unwrap();

        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "README.md",
                "resource.nvidia.com_computedomaincliques.yaml",
                "resource.nvidia.com_computedomains.yaml",
            ]
        );
        for (name, yaml) in nvdra_api::crd_files().unwrap() {
            assert_eq!(fs::read_to_string(dir.join(&name)).unwrap(), yaml, "{name}");
        }
    }
}

//! Resolution of fully-qualified CDI device IDs against a CDI spec directory.
//!
//! A container runtime turns `vendor/class=name` into the device named `name`
//! in a spec whose `kind` is `vendor/class`. [`resolve`] does the same lookup
//! over the `.yaml`, `.yml` and `.json` files directly in the directory (a
//! missing directory holds no specs) and fails naming every ID that resolves
//! to nothing, so a plugin that returns IDs without writing specs is caught
//! before a pod would be marked Running. Unreadable or malformed spec files
//! are errors rather than skipped: in a test cluster they are plugin bugs.
//! [`edits`] collects what a runtime would apply (env, mounts, device nodes)
//! for the pod's record and its local containers' private roots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The part of a CDI spec that resolution and container edits need; other
/// fields are ignored.
#[derive(Debug, Deserialize)]
struct SpecHead {
    kind: String,
    #[serde(default)]
    devices: Vec<DeviceHead>,
    #[serde(default, rename = "containerEdits")]
    container_edits: EditsHead,
}

#[derive(Debug, Deserialize)]
struct DeviceHead {
    name: String,
    #[serde(default, rename = "containerEdits")]
    container_edits: EditsHead,
}

#[derive(Debug, Default, Deserialize)]
struct EditsHead {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default, rename = "deviceNodes")]
    device_nodes: Vec<DeviceNode>,
}

/// A CDI `mounts` entry (options and type are not needed here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    /// Path on the host.
    pub host_path: String,
    /// Path in the container.
    pub container_path: String,
}

/// A CDI `deviceNodes` entry (type, numbers and permissions are not needed here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host, when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
}

/// What a container runtime would add to a container for a list of CDI devices. Serialized
/// as the per-pod record `container-edits.json` that tests read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    /// `KEY=VALUE` entries; later ones win.
    pub env: Vec<String>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Device nodes.
    pub device_nodes: Vec<DeviceNode>,
}

impl ContainerEdits {
    fn extend(&mut self, edits: &EditsHead) {
        self.env.extend(edits.env.iter().cloned());
        self.mounts.extend(edits.mounts.iter().cloned());
        self.device_nodes.extend(edits.device_nodes.iter().cloned());
    }
}

/// Splits `vendor/class=name` into (`vendor/class`, `name`).
pub fn parse_id(id: &str) -> Result<(&str, &str), Error> {
    let invalid = || Error::InvalidCdiId { id: id.to_owned() };
    let (kind, name) = id.split_once('=').ok_or_else(invalid)?;
    let (vendor, class) = kind.split_once('/').ok_or_else(invalid)?;
    if vendor.is_empty() || class.is_empty() || name.is_empty() || class.contains('/') {
        return Err(invalid());
    }
    Ok((kind, name))
}

/// Maps each of `ids` to the spec file that defines it.
pub fn resolve(dir: &Path, ids: &[String]) -> Result<BTreeMap<String, PathBuf>, Error> {
    let specs = load(dir)?;
    let mut found = BTreeMap::new();
    let mut unresolved = Vec::new();
    for id in ids {
        let (kind, name) = parse_id(id)?;
        let hit = specs
            .iter()
            .find(|(_, spec)| spec.kind == kind && spec.devices.iter().any(|d| d.name == name));
        match hit {
            Some((path, _)) => {
                found.insert(id.clone(), path.clone());
            }
            None => unresolved.push(id.clone()),
        }
    }
    if unresolved.is_empty() {
        Ok(found)
    } else {
        Err(Error::UnresolvedCdiIds {
            dir: dir.to_owned(),
            ids: unresolved,
        })
    }
}

/// The container edits a container runtime would apply for `ids`: for each device in order,
/// its spec's spec-level `containerEdits` (once per spec, the first time one of its devices
/// appears), then the device's own. Later env entries win when applied in order.
pub fn edits(dir: &Path, ids: &[String]) -> Result<ContainerEdits, Error> {
    let specs = load(dir)?;
    let mut out = ContainerEdits::default();
    let mut seen_specs = Vec::new();
    let mut unresolved = Vec::new();
    for id in ids {
        let (kind, name) = parse_id(id)?;
        let hit = specs.iter().enumerate().find_map(|(i, (_, spec))| {
            (spec.kind == kind)
                .then(|| spec.devices.iter().find(|d| d.name == name))
                .flatten()
                .map(|device| (i, spec, device))
        });
        let Some((i, spec, device)) = hit else {
            unresolved.push(id.clone());
            continue;
        };
        if !seen_specs.contains(&i) {
            seen_specs.push(i);
            out.extend(&spec.container_edits);
        }
        out.extend(&device.container_edits);
    }
    if unresolved.is_empty() {
        Ok(out)
    } else {
        Err(Error::UnresolvedCdiIds {
            dir: dir.to_owned(),
            ids: unresolved,
        })
    }
}

/// The `KEY=VALUE` env edits of [`edits`].
pub fn env(dir: &Path, ids: &[String]) -> Result<Vec<String>, Error> {
    edits(dir, ids).map(|e| e.env)
}

fn load(dir: &Path) -> Result<Vec<(PathBuf, SpecHead)>, Error> {
    let dir_err = |source| Error::ReadCdiDir {
        dir: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(dir_err(err)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(dir_err)?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("yaml" | "yml" | "json")) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| Error::ReadCdiSpec {
                path: path.clone(),
                source,
            })?;
            let parsed = if path.extension().is_some_and(|e| e == "json") {
                serde_json::from_str::<SpecHead>(&text).map_err(|e| e.to_string())
            } else {
                serde_saphyr::from_str::<SpecHead>(&text).map_err(|e| e.to_string())
            };
            match parsed {
                Ok(spec) => Ok((path, spec)),
                Err(message) => Err(Error::ParseCdiSpec { path, message }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const YAML: &str = "cdiVersion: 0.6.0\nkind: k8s.gpu.nvidia.com/claim\ndevices:\n- name: u1-gpu-0\n  containerEdits: {}\n- name: u1-gpu-1\n";
    const JSON: &str = r#"{"cdiVersion":"0.6.0","kind":"nvidia.com/gpu","devices":[{"name":"all","containerEdits":{}}]}"#;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn resolves_ids_across_yaml_and_json_specs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("claim.yaml"), YAML).unwrap();
        std::fs::write(dir.path().join("common.json"), JSON).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "kind: x").unwrap();
        let d = dir.path();
        // (ids, Ok([(id, spec file)]) or the exact error)
        type Case<'a> = (&'a [&'a str], Result<Vec<(&'a str, &'a str)>, String>);
        let cases: &[Case<'_>] = &[
            (&[], Ok(vec![])),
            (
                &["k8s.gpu.nvidia.com/claim=u1-gpu-1", "nvidia.com/gpu=all"],
                Ok(vec![
                    ("k8s.gpu.nvidia.com/claim=u1-gpu-1", "claim.yaml"),
                    ("nvidia.com/gpu=all", "common.json"),
                ]),
            ),
            (
                // Right name, wrong kind; and a name no spec has.
                &[
                    "nvidia.com/gpu=u1-gpu-0",
                    "k8s.gpu.nvidia.com/claim=u1-gpu-0",
                    "k8s.gpu.nvidia.com/claim=u2-gpu-0",
                ],
                Err(format!(
                    "CDI device IDs resolve to no device in {}: nvidia.com/gpu=u1-gpu-0, k8s.gpu.nvidia.com/claim=u2-gpu-0",
                    d.display()
                )),
            ),
            (
                &["nvidia.com=gpu0"],
                Err(r#"invalid CDI device ID "nvidia.com=gpu0": want vendor/class=name"#.into()),
            ),
            (
                &["nvidia.com/gpu"],
                Err(r#"invalid CDI device ID "nvidia.com/gpu": want vendor/class=name"#.into()),
            ),
            (
                &["nvidia.com/gpu="],
                Err(r#"invalid CDI device ID "nvidia.com/gpu=": want vendor/class=name"#.into()),
            ),
        ];
        for (given, want) in cases {
            let got = resolve(d, &ids(given)).map_err(|e| e.to_string());
            let want = want.clone().map(|pairs| {
                pairs
                    .into_iter()
                    .map(|(id, file)| (id.to_owned(), d.join(file)))
                    .collect::<BTreeMap<_, _>>()
            });
            assert_eq!(got, want, "ids {given:?}");
        }
    }

    #[test]
    fn env_takes_spec_edits_once_then_device_edits_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("claim.yaml"),
            "cdiVersion: 0.6.0\nkind: k8s.gpu.nvidia.com/claim\ncontainerEdits:\n  env:\n  - SPEC=1\ndevices:\n- name: a\n  containerEdits:\n    env: [NVIDIA_VISIBLE_DEVICES=0, A=x]\n- name: b\n  containerEdits:\n    env: [NVIDIA_VISIBLE_DEVICES=1]\n- name: c\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("common.json"), JSON).unwrap();
        // (ids, the env or the exact error)
        type Case<'a> = (&'a [&'a str], Result<&'a [&'a str], String>);
        let cases: &[Case<'_>] = &[
            (&[], Ok(&[])),
            (
                &[
                    "k8s.gpu.nvidia.com/claim=b",
                    "nvidia.com/gpu=all",
                    "k8s.gpu.nvidia.com/claim=a",
                ],
                Ok(&[
                    "SPEC=1",
                    "NVIDIA_VISIBLE_DEVICES=1",
                    "NVIDIA_VISIBLE_DEVICES=0",
                    "A=x",
                ]),
            ),
            (&["k8s.gpu.nvidia.com/claim=c"], Ok(&["SPEC=1"])),
            (
                &["k8s.gpu.nvidia.com/claim=zz"],
                Err(format!(
                    "CDI device IDs resolve to no device in {}: k8s.gpu.nvidia.com/claim=zz",
                    dir.path().display()
                )),
            ),
        ];
        for (given, want) in cases {
            let got = env(dir.path(), &ids(given)).map_err(|e| e.to_string());
            let want = want.clone().map(ids);
            assert_eq!(got, want, "ids {given:?}");
        }
    }

    #[test]
    fn edits_collect_mounts_and_device_nodes_from_spec_and_device() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.yaml"),
            "cdiVersion: 0.6.0\nkind: k8s.compute-domain.nvidia.com/device\ncontainerEdits:\n  env: [NVIDIA_VISIBLE_DEVICES=void]\n  mounts:\n  - hostPath: /drv/usr/bin/nvidia-imex\n    containerPath: /usr/bin/nvidia-imex\n    options: [ro, nosuid, nodev, bind]\ndevices:\n- name: all\n  containerEdits: {}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("claim.yaml"),
            "cdiVersion: 0.6.0\nkind: k8s.compute-domain.nvidia.com/claim\ndevices:\n- name: u1-channel-0\n  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia-caps-imex-channels/channel3\n      type: c\n      major: 234\n      minor: 3\n- name: u2-daemon-0\n  containerEdits:\n    env: [CLIQUE_ID=c.1]\n    mounts:\n    - {hostPath: /plugins/domains/cd, containerPath: /imexd}\n    deviceNodes:\n    - {path: /dev/nvidia-caps/nvidia-cap7, hostPath: /dev/nvidia-caps/nvidia-cap7}\n",
        )
        .unwrap();
        let got = edits(
            dir.path(),
            &ids(&[
                "k8s.compute-domain.nvidia.com/claim=u2-daemon-0",
                "k8s.compute-domain.nvidia.com/device=all",
                "k8s.compute-domain.nvidia.com/claim=u1-channel-0",
            ]),
        )
        .unwrap();
        let mount = |h: &str, c: &str| Mount {
            host_path: h.into(),
            container_path: c.into(),
        };
        assert_eq!(
            got,
            ContainerEdits {
                env: ids(&["CLIQUE_ID=c.1", "NVIDIA_VISIBLE_DEVICES=void"]),
                mounts: vec![
                    mount("/plugins/domains/cd", "/imexd"),
                    mount("/drv/usr/bin/nvidia-imex", "/usr/bin/nvidia-imex"),
                ],
                device_nodes: vec![
                    DeviceNode {
                        path: "/dev/nvidia-caps/nvidia-cap7".into(),
                        host_path: Some("/dev/nvidia-caps/nvidia-cap7".into()),
                    },
                    DeviceNode {
                        path: "/dev/nvidia-caps-imex-channels/channel3".into(),
                        host_path: None,
                    },
                ],
            }
        );
        assert_eq!(
            serde_json::to_value(&got).unwrap()["deviceNodes"],
            serde_json::json!([
                {"path": "/dev/nvidia-caps/nvidia-cap7", "hostPath": "/dev/nvidia-caps/nvidia-cap7"},
                {"path": "/dev/nvidia-caps-imex-channels/channel3"},
            ])
        );
    }

    #[test]
    fn missing_dir_resolves_nothing_and_bad_spec_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("cdi");
        assert_eq!(
            resolve(&missing, &ids(&["nvidia.com/gpu=all"]))
                .unwrap_err()
                .to_string(),
            format!(
                "CDI device IDs resolve to no device in {}: nvidia.com/gpu=all",
                missing.display()
            )
        );
        std::fs::write(dir.path().join("bad.json"), r#"{"devices":[]}"#).unwrap();
        assert_eq!(
            resolve(dir.path(), &[]).unwrap_err().to_string(),
            format!(
                "parse CDI spec {}: missing field `kind` at line 1 column 14",
                dir.path().join("bad.json").display()
            )
        );
    }
}

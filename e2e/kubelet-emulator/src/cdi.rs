//! Resolution of fully-qualified CDI device IDs against a CDI spec directory.
//!
//! A container runtime turns `vendor/class=name` into the device named `name`
//! in a spec whose `kind` is `vendor/class`. [`resolve`] does the same lookup
//! over the `.yaml`, `.yml` and `.json` files directly in the directory (a
//! missing directory holds no specs) and fails naming every ID that resolves
//! to nothing, so a plugin that returns IDs without writing specs is caught
//! before a pod would be marked Running. Unreadable or malformed spec files
//! are errors rather than skipped: in a test cluster they are plugin bugs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// The part of a CDI spec that resolution and env injection need; other
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

/// The `KEY=VALUE` env edits a container runtime would inject for `ids`:
/// for each device in order, its spec's spec-level `containerEdits.env`
/// (once per spec, the first time one of its devices appears), then the
/// device's own. Later entries win when the caller applies them in order.
pub fn env(dir: &Path, ids: &[String]) -> Result<Vec<String>, Error> {
    let specs = load(dir)?;
    let mut out = Vec::new();
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
            out.extend(spec.container_edits.env.iter().cloned());
        }
        out.extend(device.container_edits.env.iter().cloned());
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

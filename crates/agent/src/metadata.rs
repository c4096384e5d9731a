//! KEP-5304 device metadata of the `gpu.nvidia.com` driver (feature gate `DeviceMetadata`):
//! a JSON file per claim request that tells the workload which devices it got, with the
//! attributes we publish for them, so a VM launcher can find the PCI address of a passed-through
//! GPU without asking the API server.
//!
//! The protocol is Kubernetes' (the kubelet takes no part; the DRA kubelet-plugin library in Go
//! implements the same rules):
//! - inside the container the file is
//!   `/var/run/kubernetes.io/dra-device-attributes/resourceclaims/<claim>/<request>/gpu.nvidia.com-metadata.json`,
//!   or `…/resourceclaimtemplates/<podClaimName>/<request>/…` for a claim generated from a
//!   template (the claim's `resource.kubernetes.io/pod-claim-name` annotation); `<request>` is
//!   the top-level request, while the file's `requests[].name` keeps `<request>/<subrequest>`;
//! - the file is a stream of `DeviceMetadata` objects, the same content once per API version,
//!   newest first (`metadata.resource.k8s.io/v1beta1`, then `v1alpha1` for older readers), each
//!   on its own line;
//! - `metadata.generation` is 1: a claim's devices and their attributes are known at Prepare
//!   and never change while it is prepared;
//! - the file is bind-mounted read-only through the claim's CDI spec, on the first device of
//!   each request, so exactly the containers that get the request's devices see it.
//!
//! Files live on the host under `<plugin data dir>/metadata/<claimUID>/<request>/` (a path the
//! agent sees at the same place as the host, like the MPS directories). [`render`] is pure;
//! [`MetadataStore`] writes a claim's files into a fresh claim directory before the claim's CDI
//! spec is written, and removes the directory wherever the spec is removed. A crash in between
//! leaves a directory without a checkpoint entry, which start-up removes
//! ([`MetadataStore::list_claims`]).
//!
//! The files are not fsynced, unlike the spec and the checkpoint: no container reads one before
//! Prepare returns (so a half-written file after an agent crash belongs to a `PrepareStarted`
//! claim, which start-up rolls back), an agent crash keeps the page cache, and after a power
//! loss the new boot empties the checkpoint, so start-up removes every claim directory and the
//! kubelet prepares the claims again. That keeps the gate's cost to one small write per request
//! (docs/performance.md).
//!
//! Failure modes are the variants of [`Error`], each named for the failed operation.

use std::collections::BTreeMap;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use k8s_openapi::api::resource::v1::DeviceAttribute;
use serde_json::{Value, json};

use crate::cdi::{self, spec::Mount};

/// Where the files appear inside containers.
pub const CONTAINER_ROOT: &str = "/var/run/kubernetes.io/dra-device-attributes";

/// The annotation the controller-manager puts on a claim it generated from a template: the
/// name of the claim in the pod's `spec.resourceClaims`.
pub const POD_CLAIM_NAME_ANNOTATION: &str = "resource.kubernetes.io/pod-claim-name";

/// The API versions written, newest first: readers take the first they can decode.
pub const API_VERSIONS: [&str; 2] = [
    "metadata.resource.k8s.io/v1beta1",
    "metadata.resource.k8s.io/v1alpha1",
];

/// The object kind.
pub const KIND: &str = "DeviceMetadata";

/// Name of the directory under the plugin data directory.
pub const DIR_NAME: &str = "metadata";

/// Mode of directories (files get the CDI store's 0644): the files are read by container
/// runtimes (root), and by workloads that need not run as root.
const DIR_MODE: u32 = 0o755;

/// Options of the bind mount: the protocol wants the file read-only in the container.
const MOUNT_OPTIONS: [&str; 4] = ["ro", "nosuid", "nodev", "bind"];

/// Why metadata could not be written or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request name cannot name a directory.
    #[error("request name {request:?} cannot name a device metadata directory")]
    RequestName {
        /// The request.
        request: String,
    },
    /// The claim UID cannot name a directory.
    #[error(transparent)]
    ClaimUid(cdi::SpecError),
    /// Serialising a metadata object failed (a bug).
    #[error("cannot encode the device metadata of request {request:?}")]
    Encode {
        /// The request.
        request: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Writing a file or directory failed.
    #[error("cannot write device metadata {}", path.display())]
    Write {
        /// What could not be written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing a claim's directory failed.
    #[error("cannot remove device metadata {}", path.display())]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Listing the claims' directories failed.
    #[error("cannot list device metadata in {}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The claim a file describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimIdentity<'a> {
    /// The claim's name.
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its UID.
    pub uid: &'a str,
    /// The pod's name for the claim when it was generated from a template.
    pub pod_claim_name: Option<&'a str>,
}

/// One allocated device, as the file lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataDevice {
    /// The request it was allocated for, `<request>` or `<request>/<subrequest>`.
    pub request: String,
    /// The driver.
    pub driver: String,
    /// Its pool.
    pub pool: String,
    /// Its name in the pool.
    pub name: String,
    /// Its attributes as published, plus any known only once prepared.
    pub attributes: BTreeMap<String, DeviceAttribute>,
}

/// The file of one top-level request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFile {
    /// The top-level request (the sub-request dropped).
    pub request: String,
    /// Where the file appears in the container.
    pub container_path: String,
    /// Its contents: one JSON object per API version, each on its own line.
    pub contents: Vec<u8>,
}

/// A full request name (`<request>/<subrequest>` or `<request>`) and its devices.
type FullRequest<'a> = (&'a str, Vec<&'a MetadataDevice>);

/// The top-level request of `request` (`gpu/high-memory` → `gpu`).
pub fn base_request(request: &str) -> &str {
    request.split_once('/').map_or(request, |(base, _)| base)
}

/// Where the file of `request` of `claim` appears in the container.
pub fn container_path(claim: &ClaimIdentity<'_>, request: &str, driver: &str) -> String {
    let owner = match claim.pod_claim_name {
        Some(pod_claim) => format!("resourceclaimtemplates/{pod_claim}"),
        None => format!("resourceclaims/{}", claim.name),
    };
    format!(
        "{CONTAINER_ROOT}/{owner}/{}/{driver}-metadata.json",
        base_request(request)
    )
}

/// The files of a claim's `devices` (in allocation order): one per top-level request, in order
/// of first appearance. Pure.
pub fn render(
    claim: &ClaimIdentity<'_>,
    driver: &str,
    devices: &[MetadataDevice],
) -> Result<Vec<RequestFile>, Error> {
    // Top-level request → (full request → devices), both in first-seen order.
    let mut requests: Vec<(&str, Vec<FullRequest<'_>>)> = Vec::new();
    for device in devices {
        let base = base_request(&device.request);
        check_request(base)?;
        let at = match requests.iter().position(|(b, _)| *b == base) {
            Some(at) => at,
            None => {
                requests.push((base, Vec::new()));
                requests.len() - 1
            }
        };
        let full = &mut requests[at].1;
        match full.iter_mut().find(|(r, _)| *r == device.request) {
            Some((_, list)) => list.push(device),
            None => full.push((&device.request, vec![device])),
        }
    }
    requests
        .into_iter()
        .map(|(base, full)| {
            let body = json!({
                "metadata": {
                    "name": claim.name,
                    "namespace": claim.namespace,
                    "uid": claim.uid,
                    "generation": 1,
                },
                "requests": full.iter().map(|(request, devices)| json!({
                    "name": request,
                    "devices": devices.iter().map(|d| device_json(d)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            });
            let mut contents = Vec::new();
            for version in API_VERSIONS {
                let mut object = serde_json::Map::new();
                object.insert("kind".to_owned(), KIND.into());
                object.insert("apiVersion".to_owned(), version.into());
                if let Value::Object(fields) = &body {
                    object.extend(fields.clone());
                }
                if let Some(pod_claim) = claim.pod_claim_name {
                    object.insert("podClaimName".to_owned(), pod_claim.into());
                }
                serde_json::to_writer(&mut contents, &object).map_err(|source| Error::Encode {
                    request: base.to_owned(),
                    source,
                })?;
                contents.push(b'\n');
            }
            Ok(RequestFile {
                request: base.to_owned(),
                container_path: container_path(claim, base, driver),
                contents,
            })
        })
        .collect()
}

fn device_json(device: &MetadataDevice) -> Value {
    let mut value = json!({
        "driver": device.driver,
        "pool": device.pool,
        "name": device.name,
    });
    if !device.attributes.is_empty() {
        value["attributes"] = json!(device.attributes);
    }
    value
}

/// Request names are DNS labels once the API server validated them; anything that could
/// leave the claim's directory is refused anyway.
fn check_request(request: &str) -> Result<(), Error> {
    let bad = request.is_empty()
        || request == "."
        || request == ".."
        || request.contains(['/', '\0'])
        || request.starts_with('.');
    if bad {
        return Err(Error::RequestName {
            request: request.to_owned(),
        });
    }
    Ok(())
}

/// The metadata files of one driver under one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataStore {
    root: PathBuf,
    driver: &'static str,
}

impl MetadataStore {
    /// The files of `driver` under `root`.
    pub fn new(root: impl Into<PathBuf>, driver: &'static str) -> Self {
        Self {
            root: root.into(),
            driver,
        }
    }

    /// The directory of one claim.
    fn claim_dir(&self, claim_uid: &str) -> Result<PathBuf, Error> {
        cdi::validate_claim_uid(claim_uid).map_err(Error::ClaimUid)?;
        Ok(self.root.join(claim_uid))
    }

    /// Renders and writes the files of `claim`'s `devices`, replacing whatever the claim had;
    /// returns the bind mount of each file, by top-level request.
    pub fn write_claim(
        &self,
        claim: &ClaimIdentity<'_>,
        devices: &[MetadataDevice],
    ) -> Result<Vec<(String, Mount)>, Error> {
        let files = render(claim, self.driver, devices)?;
        let dir = self.claim_dir(claim.uid)?;
        self.remove_claim(claim.uid)?;
        let mut mounts = Vec::with_capacity(files.len());
        for file in files {
            let request_dir = dir.join(&file.request);
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&request_dir)
                .map_err(|source| Error::Write {
                    path: request_dir.clone(),
                    source,
                })?;
            let path = request_dir.join(format!("{}-metadata.json", self.driver));
            // Not synced: see the module docs.
            cdi::store::create_new_file(&path, &file.contents).map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
            mounts.push((
                file.request,
                Mount {
                    host_path: path.to_string_lossy().into_owned(),
                    container_path: file.container_path,
                    options: MOUNT_OPTIONS.iter().map(|o| (*o).to_owned()).collect(),
                    mount_type: None,
                },
            ));
        }
        Ok(mounts)
    }

    /// Removes the claim's files; whether there were any. A missing directory is success.
    pub fn remove_claim(&self, claim_uid: &str) -> Result<bool, Error> {
        let dir = self.claim_dir(claim_uid)?;
        // `remove_dir_all` unlinks symlinks instead of following them.
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Remove { path: dir, source }),
        }
    }

    /// The UIDs of claims with a directory, sorted; a missing root has none.
    pub fn list_claims(&self) -> Result<Vec<String>, Error> {
        let list_error = |source| Error::List {
            path: self.root.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list_error(e)),
        };
        let mut uids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(list_error)?;
            if let Ok(name) = entry.file_name().into_string()
                && cdi::validate_claim_uid(&name).is_ok()
            {
                uids.push(name);
            }
        }
        uids.sort();
        Ok(uids)
    }
}

#[cfg(test)]
mod tests;

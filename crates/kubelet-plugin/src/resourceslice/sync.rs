//! One sync pass against the API server: read the Node UID (once), list the pool's slices,
//! [`plan()`] and execute the plan. This is the thin effect step; all decisions are made by the
//! pure functions.
//!
//! Invariants:
//! - Applies are server-side apply (`force`, our field manager) of complete objects, in plan
//!   order; deletes follow, conditional on UID and resourceVersion.
//! - Every apply records what we sent and the resourceVersion the server answered with. When a
//!   later list shows that same resourceVersion, the slice is compared as what we sent: the
//!   server's rewrites (dropped fields, defaults) then do not look like changes, which is how
//!   a disabled feature gate avoids a rewrite loop. Any other writer changes the
//!   resourceVersion and is compared for real.
//! - Taints that still have no `timeAdded` after [`plan()`] are stamped with the current time
//!   before sending, so the server never invents one we could not reproduce.
//!
//! Failure modes: the first failing call ends the pass with its [`Error`]; what was written
//! stays written, and the next pass re-plans from a fresh list, so a partial pass is harmless.
//! A delete that finds the slice gone counts as success.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceSlice, ResourceSliceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};

use super::compare::dropped_paths;
use super::desired::desired_slices;
use super::{CounterLayout, DroppedFields, Error, NodeResources, SliceOwner, plan, validate};

/// Remembered deleted UIDs are dropped beyond this many; it only suppresses echo events.
const MAX_REMEMBERED_DELETES: usize = 256;

/// Identity and settings of the pool being synced.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) driver: String,
    pub(crate) node_name: String,
    pub(crate) field_manager: String,
    pub(crate) layout: CounterLayout,
}

impl Target {
    /// `spec.driver=<driver>,spec.nodeName=<node>`: exactly the slices this pool owns.
    pub(crate) fn field_selector(&self) -> String {
        format!(
            "spec.driver={},spec.nodeName={}",
            self.driver, self.node_name
        )
    }
}

/// What a successful pass did.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SyncReport {
    pub(crate) generation: i64,
    pub(crate) slices: usize,
    pub(crate) applied: usize,
    pub(crate) deleted: usize,
    pub(crate) dropped: Vec<DroppedFields>,
}

#[derive(Clone, Debug)]
struct Written {
    resource_version: String,
    sent: ResourceSliceSpec,
}

/// Sync state kept between passes.
pub(crate) struct Syncer {
    target: Target,
    slices: Api<ResourceSlice>,
    nodes: Api<Node>,
    node_uid: Option<String>,
    written: HashMap<String, Written>,
    deleted_uids: HashSet<String>,
}

impl Syncer {
    pub(crate) fn new(client: Client, target: Target) -> Self {
        Self {
            target,
            slices: Api::all(client.clone()),
            nodes: Api::all(client),
            node_uid: None,
            written: HashMap::new(),
            deleted_uids: HashSet::new(),
        }
    }

    /// Forget the cached Node UID so the next pass reads it again (the Node may have been
    /// recreated, e.g. when the kubelet re-registers after a node replacement).
    pub(crate) fn forget_node(&mut self) {
        self.node_uid = None;
    }

    /// Makes the pool match `resources`.
    pub(crate) async fn sync(
        &mut self,
        resources: &NodeResources,
        now: Timestamp,
    ) -> Result<SyncReport, Error> {
        // Invalid input must not cost API calls, nor hide behind an unreachable server.
        validate(resources, self.target.layout)?;
        let owner = SliceOwner {
            driver: self.target.driver.clone(),
            node_name: self.target.node_name.clone(),
            node_uid: self.node_uid().await?,
        };
        let desired = desired_slices(&owner, self.target.layout, resources)?;
        let slices = desired.len();
        let selector = self.target.field_selector();
        let listed = self
            .slices
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|source| Error::ListSlices { selector, source })?
            .items;
        let existing = self.as_sent(listed);
        let plan = plan(&existing, desired);
        let mut report = SyncReport {
            generation: plan.generation,
            slices,
            applied: 0,
            deleted: 0,
            dropped: Vec::new(),
        };
        let params = PatchParams::apply(&self.target.field_manager).force();
        for mut slice in plan.apply {
            stamp_taints(&mut slice, now);
            let name = slice.metadata.name.clone().unwrap_or_default();
            let returned = self
                .slices
                .patch(&name, &params, &Patch::Apply(&slice))
                .await
                .map_err(|source| Error::ApplySlice {
                    name: name.clone(),
                    source,
                })?;
            let fields = dropped_paths(&slice.spec, &returned.spec);
            if !fields.is_empty() {
                report.dropped.push(DroppedFields {
                    slice: name.clone(),
                    fields,
                });
            }
            match returned.metadata.resource_version {
                Some(resource_version) => {
                    self.written.insert(
                        name,
                        Written {
                            resource_version,
                            sent: slice.spec,
                        },
                    );
                }
                None => {
                    self.written.remove(&name);
                }
            }
            report.applied += 1;
        }
        for slice in plan.delete {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: slice.uid.clone(),
                    resource_version: slice.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            match self.slices.delete(&slice.name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(source) => {
                    return Err(Error::DeleteSlice {
                        name: slice.name,
                        source,
                    });
                }
            }
            self.written.remove(&slice.name);
            if let Some(uid) = slice.uid {
                if self.deleted_uids.len() >= MAX_REMEMBERED_DELETES {
                    self.deleted_uids.clear();
                }
                self.deleted_uids.insert(uid);
            }
            report.deleted += 1;
        }
        Ok(report)
    }

    /// True for watch events that need no resync: echoes of our own writes and deletes, and
    /// the objects of a relist (its completion, `InitDone`, does trigger one).
    pub(crate) fn is_own_echo(&mut self, event: &watcher::Event<ResourceSlice>) -> bool {
        match event {
            watcher::Event::Apply(slice) => {
                let name = slice.metadata.name.as_deref().unwrap_or_default();
                self.written.get(name).is_some_and(|w| {
                    slice.metadata.resource_version.as_ref() == Some(&w.resource_version)
                })
            }
            watcher::Event::Delete(slice) => slice
                .metadata
                .uid
                .as_ref()
                .is_some_and(|uid| self.deleted_uids.remove(uid)),
            watcher::Event::Init | watcher::Event::InitApply(_) => true,
            watcher::Event::InitDone => false,
        }
    }

    async fn node_uid(&mut self) -> Result<String, Error> {
        if let Some(uid) = &self.node_uid {
            return Ok(uid.clone());
        }
        let node_name = &self.target.node_name;
        let node = self
            .nodes
            .get(node_name)
            .await
            .map_err(|source| Error::GetNode {
                node: node_name.clone(),
                source,
            })?;
        let uid = node.metadata.uid.ok_or_else(|| Error::NodeWithoutUid {
            node: node_name.clone(),
        })?;
        self.node_uid = Some(uid.clone());
        Ok(uid)
    }

    /// Listed slices, with the spec of those untouched since our last write replaced by what
    /// we sent. Forgets writes whose slice is gone.
    fn as_sent(&mut self, mut listed: Vec<ResourceSlice>) -> Vec<ResourceSlice> {
        let names: HashSet<&str> = listed
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        self.written.retain(|name, _| names.contains(name.as_str()));
        for slice in &mut listed {
            let name = slice.metadata.name.as_deref().unwrap_or_default();
            if let Some(written) = self.written.get(name)
                && slice.metadata.resource_version.as_ref() == Some(&written.resource_version)
            {
                slice.spec = written.sent.clone();
            }
        }
        listed
    }
}

fn stamp_taints(slice: &mut ResourceSlice, now: Timestamp) {
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    for taint in slice
        .spec
        .devices
        .iter_mut()
        .flatten()
        .flat_map(|d| d.taints.iter_mut().flatten())
    {
        taint.time_added.get_or_insert(Time(now));
    }
}

#[cfg(test)]
mod tests;

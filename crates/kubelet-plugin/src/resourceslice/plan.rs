//! What to write and delete so that the existing slices become the desired ones: a pure
//! function of both lists.
//!
//! Matching is by name (names are deterministic, see [`slice_name`](super::slice_name)). The
//! generation rule follows Go's controller: the current generation is the highest
//! `spec.pool.generation` among existing slices of our pool; it is kept when no slice is
//! created, none of our pool is deleted and at most one slice changes (then only that one is
//! written), otherwise it is bumped by one and every desired slice is written with it, so that
//! consumers never combine slices of different states. A slice with an old generation counts
//! as changed.
//!
//! Invariants: an existing slice equal to its desired counterpart is never written; deletes are
//! executed after applies (the caller's job; [`Plan`] keeps them apart); a slice that is both
//! desired and existing is never deleted. Only slices of the desired slices' driver and node are
//! touched, so a wrongly filtered input cannot make us delete someone else's slices.
//!
//! Taint times: a desired taint without `timeAdded` inherits it from the same taint (key, value,
//! effect) on the same device in the existing pool, so the server's timestamp survives rewrites
//! and does not count as a change.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::resource::v1::{DeviceTaint, ResourceSlice};

use super::compare::same_spec;

/// The writes that turn the existing pool into the desired one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The pool generation after the writes.
    pub generation: i64,
    /// Complete slices to server-side apply, in order.
    pub apply: Vec<ResourceSlice>,
    /// Slices to delete after the applies succeeded.
    pub delete: Vec<SliceRef>,
}

impl Plan {
    /// True when the pool already matches: nothing to write.
    pub fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.delete.is_empty()
    }
}

/// A slice to delete, with the identity the delete must be conditional on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceRef {
    /// Slice name.
    pub name: String,
    /// Precondition: the UID we saw.
    pub uid: Option<String>,
    /// Precondition: the resourceVersion we saw.
    pub resource_version: Option<String>,
}

/// Computes the [`Plan`] from the slices that exist (as listed for this driver and node) and
/// the slices that should (from [`desired_slices`](super::desired_slices)).
pub fn plan(existing: &[ResourceSlice], mut desired: Vec<ResourceSlice>) -> Plan {
    let ours = desired.first().map(|s| {
        (
            s.spec.driver.clone(),
            s.spec.node_name.clone(),
            s.spec.pool.name.clone(),
        )
    });
    let existing: Vec<&ResourceSlice> = existing
        .iter()
        .filter(|s| match &ours {
            Some((driver, node, _)) => &s.spec.driver == driver && &s.spec.node_name == node,
            None => true,
        })
        .collect();
    let in_pool = |s: &ResourceSlice| {
        ours.as_ref()
            .is_some_and(|(_, _, pool)| &s.spec.pool.name == pool)
    };
    let current = existing
        .iter()
        .filter(|s| in_pool(s))
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);
    let count = i64::try_from(desired.len()).unwrap_or(i64::MAX);
    inherit_taint_times(
        &mut desired,
        existing.iter().copied().filter(|s| in_pool(s)),
    );

    let by_name: HashMap<&str, &ResourceSlice> = existing
        .iter()
        .filter_map(|s| Some((s.metadata.name.as_deref()?, *s)))
        .collect();
    let desired_names: HashSet<String> = desired
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let mut created = 0;
    let mut changed = Vec::new();
    for (index, slice) in desired.iter_mut().enumerate() {
        slice.spec.pool.generation = current;
        slice.spec.pool.resource_slice_count = count;
        match slice
            .metadata
            .name
            .as_deref()
            .and_then(|name| by_name.get(name))
        {
            None => created += 1,
            Some(old) if up_to_date(old, slice) => {}
            Some(_) => changed.push(index),
        }
    }
    let mut stale: Vec<&ResourceSlice> = existing
        .iter()
        .copied()
        .filter(|s| {
            s.metadata
                .name
                .as_ref()
                .is_none_or(|name| !desired_names.contains(name))
        })
        .collect();
    stale.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let bump = created > 0 || changed.len() > 1 || stale.iter().any(|s| in_pool(s));
    let (generation, apply) = if bump {
        let generation = current + 1;
        for slice in &mut desired {
            slice.spec.pool.generation = generation;
        }
        (generation, desired)
    } else {
        let apply = desired
            .into_iter()
            .enumerate()
            .filter(|(index, _)| changed.contains(index))
            .map(|(_, slice)| slice)
            .collect();
        (current, apply)
    };
    let delete = stale
        .into_iter()
        .map(|s| SliceRef {
            name: s.metadata.name.clone().unwrap_or_default(),
            uid: s.metadata.uid.clone(),
            resource_version: s.metadata.resource_version.clone(),
        })
        .collect();
    Plan {
        generation,
        apply,
        delete,
    }
}

/// Same spec (semantically) and carries every ownerReference we want.
fn up_to_date(existing: &ResourceSlice, desired: &ResourceSlice) -> bool {
    let owners = existing
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    let owned = desired
        .metadata
        .owner_references
        .iter()
        .flatten()
        .all(|wanted| owners.contains(wanted));
    owned && same_spec(&existing.spec, &desired.spec)
}

fn inherit_taint_times<'a>(
    desired: &mut [ResourceSlice],
    existing: impl Iterator<Item = &'a ResourceSlice>,
) {
    let mut known: HashMap<&str, Vec<&DeviceTaint>> = HashMap::new();
    for device in existing.flat_map(|s| s.spec.devices.iter().flatten()) {
        known.entry(device.name.as_str()).or_default().extend(
            device
                .taints
                .iter()
                .flatten()
                .filter(|t| t.time_added.is_some()),
        );
    }
    for device in desired
        .iter_mut()
        .flat_map(|s| s.spec.devices.iter_mut().flatten())
    {
        let Some(old) = known.get(device.name.as_str()) else {
            continue;
        };
        for taint in device
            .taints
            .iter_mut()
            .flatten()
            .filter(|t| t.time_added.is_none())
        {
            if let Some(same) = old
                .iter()
                .find(|o| o.key == taint.key && o.value == taint.value && o.effect == taint.effect)
            {
                taint.time_added.clone_from(&same.time_added);
            }
        }
    }
}

#[cfg(test)]
mod tests;

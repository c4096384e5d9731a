//! The slices a pool should consist of, computed from [`NodeResources`] without any I/O.
//!
//! Invariants: the output is a deterministic function of the input (same input, same names,
//! same order, same content), it is never empty, and it respects the per-slice limits below.
//! Devices keep their input order across slices because slice order is allocation priority.
//! `spec.pool.generation` is left at 0 for [`plan`](super::plan()) to fill in.
//!
//! Failure mode: invalid input is returned as [`Error::InvalidResources`] listing every
//! [`Problem`] found, so the driver can fix all of them at once.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::resource::v1::{
    CounterSet, Device, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;

use super::{CounterLayout, Error, NodeResources, Problem};

/// Devices per slice allowed by the API.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// Devices per slice when any of them has taints or consumes counters.
pub const MAX_DEVICES_PER_SLICE_WITH_TAINTS_OR_COUNTERS: usize = 64;
/// Counter sets per slice (1.35+ validation).
pub const MAX_COUNTER_SETS_PER_SLICE: usize = 8;

/// Longest valid object name (DNS subdomain).
const MAX_NAME_LEN: usize = 253;

/// Who owns the pool: the driver, and the Node the slices belong to (and are garbage-collected
/// with).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceOwner {
    /// DRA driver name, e.g. `gpu.example.com`.
    pub driver: String,
    /// Node name; also the pool name.
    pub node_name: String,
    /// The Node's `metadata.uid`, for the ownerReference.
    pub node_uid: String,
}

/// Name of slice number `index` of `driver`'s pool on `node_name`:
/// `<node>-<driver with '.' → '-'>-<index as ≥ 5 lower-case hex digits>`.
///
/// Fixed-width indices make name order equal index order (the scheduler's first-fit order).
/// When the result would exceed 253 characters, the `<node>-<driver>` prefix is cut and
/// followed by `-<16 hex digits of its FNV-1a hash>`, which keeps names unique, stable across
/// releases and valid.
pub fn slice_name(node_name: &str, driver: &str, index: usize) -> String {
    let prefix = format!("{node_name}-{}", driver.replace('.', "-"));
    let suffix = format!("-{index:05x}");
    if prefix.len() + suffix.len() <= MAX_NAME_LEN {
        return prefix + &suffix;
    }
    let hash = format!("-{:016x}", fnv1a(prefix.as_bytes()));
    let mut keep = MAX_NAME_LEN.saturating_sub(suffix.len() + hash.len());
    while !prefix.is_char_boundary(keep) {
        keep -= 1;
    }
    // A DNS label must end alphanumeric, and the hash starts with '-'.
    let head = prefix[..keep].trim_end_matches(['-', '.']);
    format!("{head}{hash}{suffix}")
}

/// FNV-1a, 64 bit: tiny and, unlike `std`'s hasher, stable across Rust releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Checks `resources` without building anything: unique device and counter-set names, every
/// consumed counter set and counter exists, and (for [`CounterLayout::Combined`]) every group
/// of linked counter sets fits into one slice with its consumers.
pub fn validate(resources: &NodeResources, layout: CounterLayout) -> Result<(), Error> {
    contents(resources, layout).map(drop)
}

/// The complete slices (metadata and spec) for `resources`, in priority order.
pub fn desired_slices(
    owner: &SliceOwner,
    layout: CounterLayout,
    resources: &NodeResources,
) -> Result<Vec<ResourceSlice>, Error> {
    let contents = contents(resources, layout)?;
    let count = i64::try_from(contents.len()).unwrap_or(i64::MAX);
    let owner_reference = OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: owner.node_name.clone(),
        uid: owner.node_uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let slices = contents
        .into_iter()
        .enumerate()
        .map(|(index, content)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(&owner.node_name, &owner.driver, index)),
                owner_references: Some(vec![owner_reference.clone()]),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: owner.driver.clone(),
                node_name: Some(owner.node_name.clone()),
                pool: ResourcePool {
                    name: owner.node_name.clone(),
                    generation: 0,
                    resource_slice_count: count,
                },
                // The server omits empty lists; so do we, so that comparisons agree.
                devices: (!content.devices.is_empty()).then_some(content.devices),
                shared_counters: (!content.counters.is_empty()).then_some(content.counters),
                ..ResourceSliceSpec::default()
            },
        })
        .collect();
    Ok(slices)
}

/// What goes into one slice.
#[derive(Debug, Default)]
struct Content {
    counters: Vec<CounterSet>,
    devices: Vec<Device>,
}

fn contents(resources: &NodeResources, layout: CounterLayout) -> Result<Vec<Content>, Error> {
    let mut problems = reference_problems(resources);
    let devices: Vec<Device> = resources.devices.iter().map(with_whole_seconds).collect();
    let mut slices = match layout {
        CounterLayout::Separate => {
            let mut slices: Vec<Content> = resources
                .shared_counters
                .chunks(MAX_COUNTER_SETS_PER_SLICE)
                .map(|sets| Content {
                    counters: sets.to_vec(),
                    devices: Vec::new(),
                })
                .collect();
            slices.extend(device_chunks(devices));
            slices
        }
        CounterLayout::Combined => combined(&resources.shared_counters, devices, &mut problems),
    };
    if !problems.is_empty() {
        return Err(Error::InvalidResources(problems));
    }
    if slices.is_empty() {
        slices.push(Content::default());
    }
    Ok(slices)
}

/// Duplicate names and dangling counter references, in input order, each reported once.
fn reference_problems(resources: &NodeResources) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    for device in &resources.devices {
        if !seen.insert(device.name.as_str()) && reported.insert(device.name.as_str()) {
            problems.push(Problem::DuplicateDevice(device.name.clone()));
        }
    }
    let mut sets: HashMap<&str, &CounterSet> = HashMap::new();
    let mut reported = HashSet::new();
    for set in &resources.shared_counters {
        if sets.insert(set.name.as_str(), set).is_some() && reported.insert(set.name.as_str()) {
            problems.push(Problem::DuplicateCounterSet(set.name.clone()));
        }
    }
    for device in &resources.devices {
        for consumption in device.consumes_counters.iter().flatten() {
            let Some(set) = sets.get(consumption.counter_set.as_str()) else {
                problems.push(Problem::UnknownCounterSet {
                    device: device.name.clone(),
                    counter_set: consumption.counter_set.clone(),
                });
                continue;
            };
            for counter in consumption.counters.keys() {
                if !set.counters.contains_key(counter) {
                    problems.push(Problem::UnknownCounter {
                        device: device.name.clone(),
                        counter_set: consumption.counter_set.clone(),
                        counter: counter.clone(),
                    });
                }
            }
        }
    }
    problems
}

/// The API server keeps taint times to the second; rounding here keeps our copy comparable.
fn with_whole_seconds(device: &Device) -> Device {
    let mut device = device.clone();
    for taint in device.taints.iter_mut().flatten() {
        if let Some(Time(at)) = &mut taint.time_added
            && let Ok(whole) = Timestamp::from_second(at.as_second())
        {
            *at = whole;
        }
    }
    device
}

fn is_heavy(device: &Device) -> bool {
    device.taints.as_ref().is_some_and(|t| !t.is_empty())
        || device
            .consumes_counters
            .as_ref()
            .is_some_and(|c| !c.is_empty())
}

/// Packs devices greedily in input order: a slice takes devices until the next one would break
/// its limit (128, or 64 once it holds a tainted or counter-consuming device).
fn device_chunks(devices: Vec<Device>) -> Vec<Content> {
    let mut chunks = Vec::new();
    let mut current = Content::default();
    let mut heavy = false;
    for device in devices {
        let limit = if heavy || is_heavy(&device) {
            MAX_DEVICES_PER_SLICE_WITH_TAINTS_OR_COUNTERS
        } else {
            MAX_DEVICES_PER_SLICE
        };
        if current.devices.len() >= limit {
            chunks.push(std::mem::take(&mut current));
            heavy = false;
        }
        heavy |= is_heavy(&device);
        current.devices.push(device);
    }
    if !current.devices.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// 1.34 layout. Counter sets linked through a device consuming from several of them form a
/// group; each group becomes one slice holding its sets and all their consumers (groups ordered
/// by their first set's position in `shared_counters`). Devices consuming nothing follow,
/// packed by [`device_chunks`].
fn combined(
    sets: &[CounterSet],
    devices: Vec<Device>,
    problems: &mut Vec<Problem>,
) -> Vec<Content> {
    let index: HashMap<&str, usize> = sets
        .iter()
        .enumerate()
        .rev() // the first of duplicate names wins (duplicates are reported anyway)
        .map(|(i, set)| (set.name.as_str(), i))
        .collect();
    let mut parent: Vec<usize> = (0..sets.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let consumed = |device: &Device| -> Vec<usize> {
        device
            .consumes_counters
            .iter()
            .flatten()
            .filter_map(|c| index.get(c.counter_set.as_str()).copied())
            .collect()
    };
    for device in &devices {
        let used = consumed(device);
        for pair in used.windows(2) {
            let (a, b) = (root(&mut parent, pair[0]), root(&mut parent, pair[1]));
            // Union towards the smaller index so a group's root is its first set.
            parent[a.max(b)] = a.min(b);
        }
    }
    let mut groups: BTreeMap<usize, Content> = BTreeMap::new();
    for (i, set) in sets.iter().enumerate() {
        let group = root(&mut parent, i);
        groups.entry(group).or_default().counters.push(set.clone());
    }
    let mut plain = Vec::new();
    for device in devices {
        match consumed(&device).first() {
            Some(&set) => {
                let group = root(&mut parent, set);
                groups.entry(group).or_default().devices.push(device);
            }
            None => plain.push(device),
        }
    }
    for group in groups.values() {
        if group.devices.len() > MAX_DEVICES_PER_SLICE_WITH_TAINTS_OR_COUNTERS {
            problems.push(Problem::CounterGroupTooLarge {
                counter_sets: group.counters.iter().map(|s| s.name.clone()).collect(),
                devices: group.devices.len(),
                max: MAX_DEVICES_PER_SLICE_WITH_TAINTS_OR_COUNTERS,
            });
        }
    }
    let mut slices: Vec<Content> = groups.into_values().collect();
    slices.extend(device_chunks(plain));
    slices
}

#[cfg(test)]
mod tests;

//! Which physical IMEX channel a channel claim gets, and which claims of a domain remain on
//! the node. Pure functions over the checkpoint state; deterministic.
//!
//! Rule (beyond upstream, which hands every claim channel 0 and allows one domain per node):
//! every channel claim of ComputeDomain D on this node gets the same channel N(D): the one an
//! already prepared channel claim of D holds, else the lowest channel ID not held by a prepared
//! channel claim of another domain. So workloads of different domains sharing a node never share
//! a channel, and all pods of one domain on the node do. A claim with `allocationMode: All`
//! records its N(D) like any other but is given every channel: it is not isolated from other
//! domains, and it does not keep other domains from getting their own channel.
//!
//! Only `PrepareCompleted` claims count: a started claim holds no channel yet, and assignment
//! happens under the driver lock, so two claims never race for one channel.

use std::collections::BTreeSet;

use crate::checkpoint::{CheckpointState, ClaimEntry, ClaimState, DeviceInfo};

/// The key under which a claim's ComputeDomain UID is kept in its checkpoint entry (`extra`)
/// between `PrepareStarted` and completion, so an Unprepare of an unfinished claim still knows
/// which domain's Node label it may have to remove.
pub const DOMAIN_KEY: &str = "computeDomainID";

/// The ComputeDomain a claim entry belongs to, and whether it is a channel (`true`) or daemon
/// claim; from its devices once completed, from [`DOMAIN_KEY`] before.
pub fn claim_domain(entry: &ClaimEntry) -> Option<(String, bool)> {
    for device in entry.devices() {
        match &device.info {
            DeviceInfo::Channel(c) => return c.domain_id.clone().map(|d| (d, true)),
            DeviceInfo::Daemon(d) => return d.domain_id.clone().map(|id| (id, false)),
            _ => {}
        }
    }
    let domain = entry.extra.get(DOMAIN_KEY)?.as_str()?.to_owned();
    let channel = entry
        .allocated_devices
        .iter()
        .any(|d| d.device == super::devices::CHANNEL_DEVICE);
    Some((domain, channel))
}

/// The channel for a new channel claim of `domain`, or `None` when all `count` channels are
/// held by other domains.
pub fn assign_channel(state: &CheckpointState, domain: &str, count: u32) -> Option<u32> {
    let mut used = BTreeSet::new();
    for (_, entry) in state.claims() {
        if entry.state != ClaimState::PrepareCompleted {
            continue;
        }
        for device in entry.devices() {
            if let DeviceInfo::Channel(channel) = &device.info {
                if channel.domain_id.as_deref() == Some(domain) {
                    return Some(channel.id);
                }
                used.insert(channel.id);
            }
        }
    }
    (0..count).find(|id| !used.contains(id))
}

/// How many claims other than `except` belong to `domain` as channel (`channel == true`) or
/// daemon claims, in any state.
pub fn remaining_claims(
    state: &CheckpointState,
    domain: &str,
    channel: bool,
    except: &str,
) -> usize {
    state
        .claims()
        .filter(|(uid, _)| *uid != except)
        .filter(|(_, entry)| claim_domain(entry).is_some_and(|(d, c)| d == domain && c == channel))
        .count()
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;
    use serde_json::Map;

    use super::*;
    use crate::checkpoint::{
        AllocatedDevice, ClaimRef, PreparedChannel, PreparedDaemon, PreparedDevice, PreparedGroup,
    };

    fn completed(state: &mut CheckpointState, uid: &str, info: DeviceInfo) {
        let claim = ClaimRef {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
        };
        let device = match info {
            DeviceInfo::Daemon(_) => "daemon-0",
            _ => "channel-0",
        };
        let allocated = vec![AllocatedDevice {
            requests: vec!["r".into()],
            pool: "node-a".into(),
            device: device.into(),
            share_id: Some(format!("share-{uid}")),
            ..AllocatedDevice::default()
        }];
        state.begin_prepare(&claim, allocated).unwrap();
        state
            .complete_prepare(
                uid,
                vec![PreparedGroup {
                    devices: vec![PreparedDevice {
                        pool: "node-a".into(),
                        device: device.into(),
                        share_id: Some(format!("share-{uid}")),
                        info,
                        ..PreparedDevice::default()
                    }],
                    config_state: Map::new(),
                    extra: Map::new(),
                }],
            )
            .unwrap();
    }

    fn channel(id: u32, domain: &str) -> DeviceInfo {
        DeviceInfo::Channel(PreparedChannel {
            id,
            domain_id: Some(domain.into()),
            allocation_mode: None,
        })
    }

    #[test]
    fn assignment() {
        let mut state = CheckpointState::new("boot");
        assert_eq!(assign_channel(&state, "d1", 2048), Some(0));
        completed(&mut state, "a", channel(0, "d1"));
        // Same domain: same channel; another domain: the next free one.
        assert_eq!(assign_channel(&state, "d1", 2048), Some(0));
        assert_eq!(assign_channel(&state, "d2", 2048), Some(1));
        completed(&mut state, "b", channel(1, "d2"));
        completed(&mut state, "c", channel(3, "d3"));
        // Gaps are filled, lowest first.
        assert_eq!(assign_channel(&state, "d4", 2048), Some(2));
        // Exhausted.
        assert_eq!(assign_channel(&state, "d4", 2), None);
        // A started claim holds nothing.
        let started = ClaimRef {
            uid: "s".into(),
            namespace: "ns".into(),
            name: "s".into(),
        };
        state.begin_prepare(&started, Vec::new()).unwrap();
        assert_eq!(assign_channel(&state, "d4", 2048), Some(2));
        // Daemons hold no channel.
        completed(
            &mut state,
            "e",
            DeviceInfo::Daemon(PreparedDaemon {
                id: 0,
                domain_id: Some("d4".into()),
            }),
        );
        assert_eq!(assign_channel(&state, "d4", 2048), Some(2));
    }

    #[test]
    fn remaining_claims_of_a_domain() {
        let mut state = CheckpointState::new("boot");
        completed(&mut state, "a", channel(0, "d1"));
        completed(&mut state, "b", channel(0, "d1"));
        completed(
            &mut state,
            "c",
            DeviceInfo::Daemon(PreparedDaemon {
                id: 0,
                domain_id: Some("d1".into()),
            }),
        );
        let started = ClaimRef {
            uid: "s".into(),
            namespace: "ns".into(),
            name: "s".into(),
        };
        state
            .begin_prepare(
                &started,
                vec![AllocatedDevice {
                    pool: "node-a".into(),
                    device: "channel-0".into(),
                    share_id: Some("x".into()),
                    ..AllocatedDevice::default()
                }],
            )
            .unwrap();
        state
            .claim_mut("s")
            .unwrap()
            .extra
            .insert(DOMAIN_KEY.into(), "d1".into());
        let cases = [
            ("a", true, 2),
            ("s", true, 2),
            ("x", true, 3),
            ("c", false, 0),
            ("x", false, 1),
        ];
        for (except, channel, want) in cases {
            assert_eq!(
                remaining_claims(&state, "d1", channel, except),
                want,
                "{except} {channel}"
            );
        }
        assert_eq!(remaining_claims(&state, "d2", true, "x"), 0);
    }
}

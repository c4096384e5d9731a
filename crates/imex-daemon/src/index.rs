//! Which index (and so which IMEX DNS name) this daemon holds in its clique.
//!
//! The rule is conflict-free without any lock or read-modify-write, because every daemon
//! applies it to the same list and only ever writes its own row:
//!
//! 1. An index is *held* by the row claiming it with the smallest node name; a row holding
//!    its index keeps it.
//! 2. Every other row (no index yet, or a lost duplicate) is *unplaced*. The unplaced rows,
//!    in node-name order, each take the first index not yet taken at or after their
//!    *home* index ([`home`], a fixed hash of the node name modulo the clique's size),
//!    wrapping around.
//!
//! Existing members therefore keep their names (so `nvidia-imex` peers need not reconnect),
//! and because every daemon computes the same assignment from the same list, a burst of
//! joiners settles in one round. The home index is what keeps that round short: daemons that
//! join at the same moment see the same list, and with "lowest free index" (upstream's rule,
//! and our first) all of them picked the same index and all but one had to write again: in a
//! 64-node domain a third of all clique writes were such moves, each one a contended write
//! to the object every daemon of the clique writes, and a loser's `nvidia-imex` waits for
//! it. Spread by name, simultaneous joiners mostly land on different indices. The index has
//! no meaning beyond the DNS name it selects (`nodes.cfg` lists every name up to the
//! maximum), so nothing needs it to be the lowest. Rows a daemon has not seen yet can still
//! collide with it; rule 1 settles that on the next round. The result is `None` when no
//! free index is left for this node.

use std::collections::{BTreeMap, BTreeSet};

use nvdra_api::ComputeDomainDaemonInfo;

/// The index `node` should hold among `daemons` (rows of its clique, its own row included or
/// not), given the index it holds now, if any.
pub fn choose(
    daemons: &[ComputeDomainDaemonInfo],
    node: &str,
    current: Option<u32>,
    max_nodes: u32,
) -> Option<u32> {
    let valid = |i: u32| (i < max_nodes).then_some(i);
    let mut rows: Vec<(&str, Option<u32>)> = daemons
        .iter()
        .filter(|d| d.node_name != node)
        .map(|d| {
            let index = u32::try_from(d.index).ok().and_then(valid);
            (d.node_name.as_str(), index)
        })
        .collect();
    rows.push((node, current.and_then(valid)));

    // Rule 1: each index belongs to the smallest name claiming it.
    let mut holder: BTreeMap<u32, &str> = BTreeMap::new();
    for (name, index) in &rows {
        if let Some(i) = index {
            holder
                .entry(*i)
                .and_modify(|h| {
                    if *name < *h {
                        *h = name;
                    }
                })
                .or_insert(name);
        }
    }
    if let Some(mine) = current.and_then(valid)
        && holder.get(&mine) == Some(&node)
    {
        return Some(mine);
    }
    // Rule 2: unplaced names, in order, take the first untaken index from their home on.
    let unplaced: BTreeSet<&str> = rows
        .iter()
        .filter(|(name, index)| index.is_none_or(|i| holder.get(&i) != Some(name)))
        .map(|(name, _)| *name)
        .collect();
    let mut taken: BTreeSet<u32> = holder.into_keys().collect();
    for name in unplaced {
        let start = home(name, max_nodes);
        let index = (0..max_nodes)
            .map(|step| (start + step) % max_nodes)
            .find(|i| !taken.contains(i))?;
        if name == node {
            return Some(index);
        }
        taken.insert(index);
    }
    None
}

/// Where `node` starts looking for a free index: FNV-1a of its name modulo `max_nodes` (a
/// fixed function, so daemons of different builds agree on it).
pub fn home(node: &str, max_nodes: u32) -> u32 {
    if max_nodes == 0 {
        return 0;
    }
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    u32::try_from(hash % u64::from(max_nodes)).unwrap_or(0)
}

/// The index `node`'s own row carries among `daemons`, if it has a row with a usable one.
pub fn own(daemons: &[ComputeDomainDaemonInfo], node: &str) -> Option<u32> {
    daemons
        .iter()
        .find(|d| d.node_name == node)
        .and_then(|d| u32::try_from(d.index).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvdra_api::Readiness;
    use pretty_assertions::assert_eq;

    fn rows(list: &[(&str, i64)]) -> Vec<ComputeDomainDaemonInfo> {
        list.iter()
            .map(|(node, index)| ComputeDomainDaemonInfo {
                node_name: (*node).into(),
                ip_address: "10.0.0.1".into(),
                clique_id: "c".into(),
                index: *index,
                status: Readiness::NotReady,
            })
            .collect()
    }

    #[test]
    fn choose_follows_the_contract_rule() {
        // (case, rows, me, current, max, want)
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, i64)],
            &'a str,
            Option<u32>,
            u32,
            Option<u32>,
        );
        // Home indices used below (max 4): n1 0, n2 1, n3 2, n9 0, a 0, e 0, z 1, d 3;
        // (max 8): a 4, b 5, d 3, e 0.
        let cases: &[Case<'_>] = &[
            ("first member takes its home", &[], "n3", None, 4, Some(2)),
            (
                "new member takes its home when free",
                &[("n1", 0), ("n2", 1)],
                "n3",
                None,
                4,
                Some(2),
            ),
            (
                "home taken: the next free one, wrapping around",
                &[("a", 3)],
                "d",
                None,
                4,
                Some(0),
            ),
            (
                "new member fills a gap from its home on",
                &[("n1", 0), ("n3", 2)],
                "n9",
                None,
                4,
                Some(1),
            ),
            (
                "keeps its index",
                &[("n1", 0), ("n2", 3)],
                "n2",
                Some(3),
                4,
                Some(3),
            ),
            (
                "keeps its index despite a gap below",
                &[("n2", 3)],
                "n2",
                Some(3),
                4,
                Some(3),
            ),
            (
                "own row alone does not block",
                &[("n2", 0)],
                "n2",
                Some(0),
                4,
                Some(0),
            ),
            (
                "duplicate: smaller name keeps",
                &[("n1", 0), ("n2", 0)],
                "n1",
                Some(0),
                4,
                Some(0),
            ),
            (
                "duplicate: larger name re-picks from its home",
                &[("n1", 0), ("n2", 0)],
                "n2",
                Some(0),
                4,
                Some(1),
            ),
            (
                "duplicate: re-pick skips every used index",
                &[("a", 0), ("b", 1), ("z", 1), ("c", 3)],
                "z",
                Some(1),
                4,
                Some(2),
            ),
            (
                "duplicate of three: only the smallest keeps",
                &[("n1", 2), ("n2", 2), ("n3", 2)],
                "n3",
                Some(2),
                4,
                Some(3),
            ),
            (
                "out-of-range current re-picks",
                &[("n1", 0)],
                "n2",
                Some(7),
                4,
                Some(1),
            ),
            (
                "an unplaced smaller name takes a shared home first",
                &[("a", -1)],
                "e",
                None,
                4,
                Some(1),
            ),
            (
                "a burst of joiners gets distinct indices in one round",
                &[("a", 0), ("d", -1), ("b", -1), ("e", -1)],
                "e",
                None,
                8,
                Some(1),
            ),
            (
                "losers of several duplicates spread over the free indices",
                &[("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 0)],
                "e",
                Some(0),
                8,
                Some(2),
            ),
            ("full", &[("a", 0), ("b", 1)], "c", None, 2, None),
            (
                "full but keeps its own",
                &[("a", 0), ("c", 1)],
                "c",
                Some(1),
                2,
                Some(1),
            ),
            (
                "full and loses a duplicate",
                &[("a", 0), ("b", 1), ("c", 1)],
                "c",
                Some(1),
                2,
                None,
            ),
        ];
        for (name, list, me, current, max, want) in cases {
            assert_eq!(choose(&rows(list), me, *current, *max), *want, "{name}");
        }
    }

    #[test]
    fn racing_new_members_settle_in_one_round() {
        // n1 and n2 both saw an empty clique and took 0; each then applies the rule to the
        // list that holds both rows.
        let seen = rows(&[("n2", 0), ("n1", 0)]);
        let n1 = choose(&seen, "n1", own(&seen, "n1"), 18);
        let n2 = choose(&seen, "n2", own(&seen, "n2"), 18);
        assert_eq!((n1, n2), (Some(0), Some(home("n2", 18))));
        let settled = rows(&[("n1", 0), ("n2", 15)]);
        assert_eq!(choose(&settled, "n1", Some(0), 18), Some(0));
        assert_eq!(choose(&settled, "n2", Some(15), 18), Some(15));
    }

    #[test]
    fn every_joiner_of_a_burst_reads_the_same_assignment() {
        // A full rack joins at once: each daemon sees all rows, none placed yet.
        let names: Vec<String> = (0..18).map(|i| format!("tray-{i:02}")).collect();
        let burst: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), -1)).collect();
        let seen = rows(&burst);
        let mut got: Vec<u32> = names
            .iter()
            .map(|n| choose(&seen, n, None, 18).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..18).collect::<Vec<_>>());
        // One more than fits: the largest name goes without.
        let seen = rows(&[burst.as_slice(), &[("tray-99", -1)]].concat());
        assert_eq!(choose(&seen, "tray-99", None, 18), None);
    }

    #[test]
    fn simultaneous_joiners_mostly_pick_different_indices() {
        // Each of a rack's trays joins seeing only the rows of the trays before it but
        // one (its view lags one write): count how many must move afterwards.
        let names: Vec<String> = (0..16).map(|i| format!("tray-{i:02}")).collect();
        let mut placed: Vec<(String, i64)> = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let visible: Vec<(&str, i64)> = placed[..k.saturating_sub(1)]
                .iter()
                .map(|(n, i)| (n.as_str(), *i))
                .collect();
            let index = choose(&rows(&visible), name, None, 18).unwrap();
            placed.push((name.clone(), i64::from(index)));
        }
        let distinct: BTreeSet<i64> = placed.iter().map(|(_, i)| *i).collect();
        // "Lowest free" gives every second tray the index of the one before it (8 moves).
        assert!(
            placed.len() - distinct.len() <= 2,
            "{} collisions: {placed:?}",
            placed.len() - distinct.len()
        );
    }

    #[test]
    fn home_is_a_fixed_function_of_the_name() {
        // Pinned: daemons of different builds must agree.
        assert_eq!(home("tray-00", 18), 4);
        assert_eq!(home("tray-01", 18), 5);
        assert_eq!(home("n3", 8), 6);
        assert_eq!(home("anything", 1), 0);
        assert_eq!(home("anything", 0), 0);
    }

    #[test]
    fn own_reads_the_row_of_the_node() {
        let list = rows(&[("n1", 0), ("n2", 5), ("n3", -1)]);
        assert_eq!(own(&list, "n2"), Some(5));
        assert_eq!(own(&list, "n3"), None);
        assert_eq!(own(&list, "n4"), None);
    }
}

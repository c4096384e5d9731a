//! Which index (and so which IMEX DNS name) this daemon holds in its clique.
//!
//! The rule is conflict-free without any lock or read-modify-write, because every daemon
//! applies it to the same list and only ever writes its own row:
//!
//! 1. An index is *held* by the row claiming it with the smallest node name; a row holding
//!    its index keeps it.
//! 2. Every other row (no index yet, or a lost duplicate) is *unplaced*. The unplaced rows,
//!    sorted by node name, take the free indices (not held by anyone) in ascending order:
//!    the k-th unplaced name gets the k-th free index.
//!
//! Existing members therefore keep their names (so `nvidia-imex` peers need not reconnect),
//! gaps left by departed members are filled first, and because every daemon computes the
//! same assignment from the same list, a burst of joiners settles in one round instead of
//! moving up one index per round (the first rule we tried, "losers take the lowest free
//! index", sent every loser to the same index again and took O(n) rounds under load). Rows
//! a daemon has not seen yet can still collide with it; rule 1 settles that on the next
//! round. The result is `None` when no free index is left for this node.

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
    // Rule 2: unplaced names, in order, take the free indices, in order.
    let unplaced: BTreeSet<&str> = rows
        .iter()
        .filter(|(name, index)| index.is_none_or(|i| holder.get(&i) != Some(name)))
        .map(|(name, _)| *name)
        .collect();
    let position = unplaced.iter().position(|n| *n == node)?;
    (0..max_nodes)
        .filter(|i| !holder.contains_key(i))
        .nth(position)
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
        let cases: &[Case<'_>] = &[
            ("first member", &[], "n1", None, 4, Some(0)),
            (
                "new member takes lowest free",
                &[("n1", 0), ("n2", 1)],
                "n3",
                None,
                4,
                Some(2),
            ),
            (
                "new member fills a gap",
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
                "duplicate: larger name re-picks",
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
                "n2",
                Some(2),
                4,
                Some(0),
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
                "others without a usable index are unplaced too: names share out the free ones",
                &[("n1", 9), ("n3", -1)],
                "n2",
                None,
                4,
                Some(1),
            ),
            (
                "a burst of joiners gets distinct indices in one round",
                &[("a", 0), ("d", -1), ("b", -1), ("e", -1)],
                "d",
                None,
                8,
                Some(2),
            ),
            (
                "losers of several duplicates spread over the free indices",
                &[("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 0)],
                "e",
                Some(0),
                8,
                Some(4),
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
        assert_eq!((n1, n2), (Some(0), Some(1)));
        let settled = rows(&[("n1", 0), ("n2", 1)]);
        assert_eq!(choose(&settled, "n1", Some(0), 18), Some(0));
        assert_eq!(choose(&settled, "n2", Some(1), 18), Some(1));
    }

    #[test]
    fn own_reads_the_row_of_the_node() {
        let list = rows(&[("n1", 0), ("n2", 5), ("n3", -1)]);
        assert_eq!(own(&list, "n2"), Some(5));
        assert_eq!(own(&list, "n3"), None);
        assert_eq!(own(&list, "n4"), None);
    }
}

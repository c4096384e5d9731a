//! Which index (and so which IMEX DNS name) this daemon holds in its clique.
//!
//! The rule is conflict-free without any lock or read-modify-write, because every daemon
//! applies it to the same list and only ever writes its own row:
//!
//! 1. Keep your index if no other row has it.
//! 2. When rows share an index, the one with the smaller node name keeps it; the others
//!    re-pick the lowest index no row uses.
//! 3. A new member (no index yet) picks the lowest index no row uses.
//!
//! Existing members therefore keep their names (so `nvidia-imex` peers need not reconnect),
//! gaps left by departed members are filled first, and two members racing for one free index
//! settle after one more round: the larger name moves on. The result is `None` when all
//! `max_nodes` indices are taken by other rows.

use std::collections::BTreeSet;

use nvdra_api::ComputeDomainDaemonInfo;

/// The index `node` should hold among `daemons` (rows of its clique, its own row included or
/// not), given the index it holds now, if any.
pub fn choose(
    daemons: &[ComputeDomainDaemonInfo],
    node: &str,
    current: Option<u32>,
    max_nodes: u32,
) -> Option<u32> {
    let valid = |i: i64| u32::try_from(i).ok().filter(|i| *i < max_nodes);
    let others: Vec<(u32, &str)> = daemons
        .iter()
        .filter(|d| d.node_name != node)
        .filter_map(|d| valid(d.index).map(|i| (i, d.node_name.as_str())))
        .collect();
    if let Some(mine) = current.filter(|i| *i < max_nodes) {
        let keeps = others
            .iter()
            .filter(|(i, _)| *i == mine)
            .all(|(_, other)| node < *other);
        if keeps {
            return Some(mine);
        }
    }
    let used: BTreeSet<u32> = others.iter().map(|(i, _)| *i).collect();
    (0..max_nodes).find(|i| !used.contains(i))
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
                "others out of range are ignored",
                &[("n1", 9), ("n3", -1)],
                "n2",
                None,
                4,
                Some(0),
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

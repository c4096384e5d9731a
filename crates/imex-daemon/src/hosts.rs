//! The daemon's block in the container's `/etc/hosts`: peer pod IP → stable IMEX DNS name.
//!
//! `nodes.cfg` names every possible peer (`compute-domain-daemon-0000` …); this block decides
//! which pod answers to which name. Only daemons of this daemon's clique are peers, each under
//! the name of its index. When two rows briefly share an index (two new members picked the
//! same free index at once), the row with the smaller node name wins the name, which is the
//! row that keeps the index under the membership rule ([`crate::index`]), so the mapping never
//! flips back and forth while the other daemon re-picks.
//!
//! The block sits between two marker lines; every other line of the file is preserved, so
//! the runtime's own entries (`localhost`, the pod's hostname) survive every rewrite. A block
//! missing its end marker (a crash mid-write) extends to the end of the file.

use std::collections::BTreeMap;

use nvdra_api::ComputeDomainDaemonInfo;

use crate::config::dns_name;

/// First line of the managed block.
pub const BEGIN_MARKER: &str = "# BEGIN nvdra-imex-daemon: IMEX peers (managed; do not edit)";
/// Last line of the managed block.
pub const END_MARKER: &str = "# END nvdra-imex-daemon";

/// One line of the block: `ip` answers to `name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mapping {
    /// The peer's pod IP.
    pub ip: String,
    /// Its IMEX DNS name.
    pub name: String,
}

/// The mapping the rows of a clique imply for a daemon of `clique_id`, ordered by index.
/// Rows of other cliques, without an IP, or with an index outside `0..max_nodes` are left out.
pub fn mappings(
    daemons: &[ComputeDomainDaemonInfo],
    clique_id: &str,
    max_nodes: u32,
) -> Vec<Mapping> {
    let mut by_index: BTreeMap<u32, &ComputeDomainDaemonInfo> = BTreeMap::new();
    for d in daemons {
        let Ok(index) = u32::try_from(d.index) else {
            continue;
        };
        if d.clique_id != clique_id || d.ip_address.is_empty() || index >= max_nodes {
            continue;
        }
        by_index
            .entry(index)
            .and_modify(|kept| {
                if d.node_name < kept.node_name {
                    *kept = d;
                }
            })
            .or_insert(d);
    }
    by_index
        .into_iter()
        .map(|(index, d)| Mapping {
            ip: d.ip_address.clone(),
            name: dns_name(index),
        })
        .collect()
}

/// `existing` with its managed block replaced by one holding `mappings`; every other line is
/// kept in order and the block goes at the end.
pub fn rewrite(existing: &str, mappings: &[Mapping]) -> String {
    let mut out = String::with_capacity(existing.len() + 64 * mappings.len());
    let mut in_block = false;
    for line in existing.lines() {
        if in_block {
            in_block = line != END_MARKER;
        } else if line == BEGIN_MARKER {
            in_block = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(BEGIN_MARKER);
    out.push('\n');
    for m in mappings {
        out.push_str(&m.ip);
        out.push('\t');
        out.push_str(&m.name);
        out.push('\n');
    }
    out.push_str(END_MARKER);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvdra_api::Readiness;
    use pretty_assertions::assert_eq;

    fn row(node: &str, ip: &str, clique: &str, index: i64) -> ComputeDomainDaemonInfo {
        ComputeDomainDaemonInfo {
            node_name: node.into(),
            ip_address: ip.into(),
            clique_id: clique.into(),
            index,
            status: Readiness::NotReady,
        }
    }

    fn m(ip: &str, index: u32) -> Mapping {
        Mapping {
            ip: ip.into(),
            name: dns_name(index),
        }
    }

    #[test]
    fn mappings_keep_peers_of_the_clique_with_valid_indices() {
        let cases: &[(&str, Vec<ComputeDomainDaemonInfo>, Vec<Mapping>)] = &[
            ("empty", vec![], vec![]),
            (
                "ordered by index",
                vec![row("b", "10.0.0.2", "c", 1), row("a", "10.0.0.1", "c", 0)],
                vec![m("10.0.0.1", 0), m("10.0.0.2", 1)],
            ),
            (
                "other clique, no IP, out of range, negative",
                vec![
                    row("a", "10.0.0.1", "c", 0),
                    row("x", "10.0.0.9", "other", 1),
                    row("y", "", "c", 2),
                    row("z", "10.0.0.8", "c", 4),
                    row("w", "10.0.0.7", "c", -1),
                ],
                vec![m("10.0.0.1", 0)],
            ),
            (
                "a shared index goes to the smaller node name",
                vec![row("n2", "10.0.0.2", "c", 0), row("n1", "10.0.0.1", "c", 0)],
                vec![m("10.0.0.1", 0)],
            ),
        ];
        for (name, rows, want) in cases {
            assert_eq!(&mappings(rows, "c", 4), want, "{name}");
        }
    }

    #[test]
    fn rewrite_replaces_only_the_block() {
        let block = |lines: &str| format!("{BEGIN_MARKER}\n{lines}{END_MARKER}\n");
        let two = [m("10.0.0.1", 0), m("10.0.0.2", 1)];
        let cases: Vec<(&str, String, &[Mapping], String)> = vec![
            (
                "empty file",
                String::new(),
                &two,
                block(
                    "10.0.0.1\tcompute-domain-daemon-0000\n10.0.0.2\tcompute-domain-daemon-0001\n",
                ),
            ),
            (
                "runtime lines kept, block appended",
                "127.0.0.1 localhost\n10.1.1.1\tpod-a\n".into(),
                &two[..1],
                format!(
                    "127.0.0.1 localhost\n10.1.1.1\tpod-a\n{}",
                    block("10.0.0.1\tcompute-domain-daemon-0000\n")
                ),
            ),
            (
                "old block replaced, lines around it kept",
                format!(
                    "127.0.0.1 localhost\n{}::1 ip6-localhost\n",
                    block("10.9.9.9\tcompute-domain-daemon-0000\n")
                ),
                &two,
                format!(
                    "127.0.0.1 localhost\n::1 ip6-localhost\n{}",
                    block(
                        "10.0.0.1\tcompute-domain-daemon-0000\n10.0.0.2\tcompute-domain-daemon-0001\n"
                    )
                ),
            ),
            (
                "no final newline",
                "127.0.0.1 localhost".into(),
                &[],
                format!("127.0.0.1 localhost\n{}", block("")),
            ),
            (
                "unterminated block runs to the end",
                format!(
                    "127.0.0.1 localhost\n{BEGIN_MARKER}\n10.9.9.9\tcompute-domain-daemon-0003\n"
                ),
                &two[1..],
                format!(
                    "127.0.0.1 localhost\n{}",
                    block("10.0.0.2\tcompute-domain-daemon-0001\n")
                ),
            ),
        ];
        for (name, existing, mappings, want) in cases {
            let got = rewrite(&existing, mappings);
            assert_eq!(got, want, "{name}");
            // Rewriting the result with the same mapping changes nothing.
            assert_eq!(rewrite(&got, mappings), got, "{name}: idempotent");
        }
    }
}

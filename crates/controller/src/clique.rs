//! ComputeDomain status from the domain's ComputeDomainCliques and daemon pods (pure).
//!
//! Job: turn what the daemons published (one `daemons[]` row per node in the clique objects)
//! and what the kubelet reports (daemon pod readiness, driven by the 2 s `check` probe) into
//! `status.nodes`, the global `status.status` and a `Ready` condition.
//!
//! Rules:
//! - `status.nodes` has one row per daemon row of the domain's cliques, sorted by node name; a
//!   node listed in two cliques (a daemon that moved clique while the old row lingers) keeps
//!   the row from the clique whose name sorts first.
//! - A node is Ready only if its daemon says Ready **and** a non-terminating daemon pod of the
//!   domain on that node is Ready. A crashed daemon cannot retract its row, but its pod turns
//!   NotReady at once, so the domain never stays Ready on a dead daemon.
//! - `status.status` is [`nvdra_api::computedomain::global_status`] (upstream's rule: Ready iff
//!   at least `numNodes` nodes joined and all are Ready; `numNodes` 0 with no nodes is Ready).
//! - The `Ready` condition carries the domain's `metadata.generation` as `observedGeneration`
//!   and keeps its `lastTransitionTime` while its status is unchanged, so an unchanged domain
//!   produces an identical status and the controller writes nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;
use nvdra_api::computedomain::global_status;
use nvdra_api::names::{conditions, reasons};
use nvdra_api::{
    ComputeDomain, ComputeDomainClique, ComputeDomainNode, ComputeDomainStatus, Readiness,
};

/// Whether the pod is Ready and not being deleted.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conds| {
                conds
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
}

/// `status.nodes` from the domain's cliques and daemon pods.
pub fn node_rows<'a>(
    cliques: impl IntoIterator<Item = &'a ComputeDomainClique>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<ComputeDomainNode> {
    let ready_nodes: Vec<&str> = pods
        .into_iter()
        .filter(|pod| pod_ready(pod))
        .filter_map(|pod| pod.spec.as_ref()?.node_name.as_deref())
        .collect();
    let mut cliques: Vec<&ComputeDomainClique> = cliques.into_iter().collect();
    cliques.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut rows: BTreeMap<&str, ComputeDomainNode> = BTreeMap::new();
    for clique in cliques {
        for daemon in &clique.spec.daemons {
            rows.entry(daemon.node_name.as_str()).or_insert_with(|| {
                let pod_ready = ready_nodes.contains(&daemon.node_name.as_str());
                ComputeDomainNode {
                    name: daemon.node_name.clone(),
                    ip_address: daemon.ip_address.clone(),
                    clique_id: daemon.clique_id.clone(),
                    index: daemon.index,
                    status: if pod_ready && daemon.status == Readiness::Ready {
                        Readiness::Ready
                    } else {
                        Readiness::NotReady
                    },
                }
            });
        }
    }
    rows.into_values().collect()
}

/// The full status of `cd` given its node rows; `now` stamps a changed condition.
pub fn desired_status(
    cd: &ComputeDomain,
    nodes: Vec<ComputeDomainNode>,
    now: Time,
) -> ComputeDomainStatus {
    let num_nodes = cd.spec.num_nodes;
    let status = global_status(num_nodes, nodes.iter().map(|n| &n.status));
    let ready = nodes
        .iter()
        .filter(|n| n.status == Readiness::Ready)
        .count();
    let (condition_status, reason) = match status {
        Readiness::Ready => ("True", reasons::DAEMONS_READY),
        Readiness::NotReady => ("False", reasons::DAEMONS_NOT_READY),
    };
    let message = format!(
        "{ready} of {} joined nodes ready, {num_nodes} required",
        nodes.len()
    );
    let previous = cd
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::READY));
    let last_transition_time = match previous {
        Some(prev) if prev.status == condition_status => prev.last_transition_time.clone(),
        _ => now,
    };
    ComputeDomainStatus {
        status,
        nodes,
        conditions: vec![Condition {
            type_: conditions::READY.to_owned(),
            status: condition_status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: cd.metadata.generation,
            last_transition_time,
        }],
    }
}

/// The Event to record when the global status goes from `previous` to `next`: `DaemonsReady`
/// on becoming Ready, a Warning `DaemonsNotReady` on losing readiness; nothing for the first
/// NotReady of a new domain or for no change.
pub fn transition_event(
    previous: Option<Readiness>,
    next: Readiness,
) -> Option<(EventType, &'static str)> {
    match (previous, next) {
        (Some(Readiness::Ready), Readiness::Ready) => None,
        (_, Readiness::Ready) => Some((EventType::Normal, reasons::DAEMONS_READY)),
        (Some(Readiness::Ready), Readiness::NotReady) => {
            Some((EventType::Warning, reasons::DAEMONS_NOT_READY))
        }
        (_, Readiness::NotReady) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{clique, compute_domain, daemon_pod, time};
    use Readiness::{NotReady, Ready};
    use pretty_assertions::assert_eq;

    fn row(name: &str, clique: &str, index: i64, status: Readiness) -> ComputeDomainNode {
        ComputeDomainNode {
            name: name.into(),
            ip_address: format!("10.0.0.{}", &name[1..]),
            clique_id: clique.into(),
            index,
            status,
        }
    }

    #[test]
    fn node_rows_table() {
        struct Case {
            name: &'static str,
            cliques: Vec<ComputeDomainClique>,
            pods: Vec<Pod>,
            want: Vec<ComputeDomainNode>,
        }
        let cases = vec![
            Case {
                name: "nothing joined",
                cliques: vec![],
                pods: vec![daemon_pod("n1", true, false)],
                want: vec![],
            },
            Case {
                name: "ready daemon and ready pod",
                cliques: vec![clique("c", &[("n1", 0, Ready), ("n2", 1, Ready)])],
                pods: vec![daemon_pod("n1", true, false), daemon_pod("n2", true, false)],
                want: vec![row("n1", "c", 0, Ready), row("n2", "c", 1, Ready)],
            },
            Case {
                name: "pod not ready, missing or terminating",
                cliques: vec![clique(
                    "c",
                    &[("n1", 0, Ready), ("n2", 1, Ready), ("n3", 2, Ready)],
                )],
                pods: vec![daemon_pod("n1", false, false), daemon_pod("n3", true, true)],
                want: vec![
                    row("n1", "c", 0, NotReady),
                    row("n2", "c", 1, NotReady),
                    row("n3", "c", 2, NotReady),
                ],
            },
            Case {
                name: "daemon says not ready",
                cliques: vec![clique("c", &[("n1", 0, NotReady)])],
                pods: vec![daemon_pod("n1", true, false)],
                want: vec![row("n1", "c", 0, NotReady)],
            },
            Case {
                name: "several cliques, sorted by node, first clique wins a duplicate",
                cliques: vec![
                    clique("d", &[("n1", 5, Ready), ("n3", 0, Ready)]),
                    clique("c", &[("n2", 0, Ready), ("n1", 1, Ready)]),
                ],
                pods: vec![
                    daemon_pod("n1", true, false),
                    daemon_pod("n2", true, false),
                    daemon_pod("n3", true, false),
                ],
                want: vec![
                    row("n1", "c", 1, Ready),
                    row("n2", "c", 0, Ready),
                    row("n3", "d", 0, Ready),
                ],
            },
        ];
        for case in cases {
            assert_eq!(
                node_rows(&case.cliques, &case.pods),
                case.want,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn desired_status_table() {
        let cases: Vec<(i64, Vec<ComputeDomainNode>, Readiness, &str, &str)> = vec![
            (
                0,
                vec![],
                Ready,
                "True",
                "0 of 0 joined nodes ready, 0 required",
            ),
            (
                1,
                vec![],
                NotReady,
                "False",
                "0 of 0 joined nodes ready, 1 required",
            ),
            (
                2,
                vec![row("n1", "c", 0, Ready), row("n2", "c", 1, NotReady)],
                NotReady,
                "False",
                "1 of 2 joined nodes ready, 2 required",
            ),
            (
                2,
                vec![row("n1", "c", 0, Ready), row("n2", "c", 1, Ready)],
                Ready,
                "True",
                "2 of 2 joined nodes ready, 2 required",
            ),
        ];
        for (num_nodes, nodes, want_status, want_cond, want_message) in cases {
            let mut cd = compute_domain("cd", "ns", "uid-1", num_nodes);
            cd.metadata.generation = Some(3);
            let got = desired_status(&cd, nodes.clone(), time(100));
            let reason = if want_status == Ready {
                "DaemonsReady"
            } else {
                "DaemonsNotReady"
            };
            assert_eq!(
                got,
                ComputeDomainStatus {
                    status: want_status,
                    nodes,
                    conditions: vec![Condition {
                        type_: "Ready".into(),
                        status: want_cond.into(),
                        reason: reason.into(),
                        message: want_message.into(),
                        observed_generation: Some(3),
                        last_transition_time: time(100),
                    }],
                },
                "numNodes {num_nodes}"
            );
        }
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let mut cd = compute_domain("cd", "ns", "uid-1", 0);
        let first = desired_status(&cd, vec![], time(100));
        cd.status = Some(first.clone());
        // Same status later: identical object, so nothing is written.
        assert_eq!(desired_status(&cd, vec![], time(200)), first);
        // Status flips: new transition time.
        cd.spec.num_nodes = 1;
        let flipped = desired_status(&cd, vec![], time(300));
        assert_eq!(flipped.conditions[0].last_transition_time, time(300));
        assert_eq!(flipped.conditions[0].status, "False");
    }

    #[test]
    fn transition_events() {
        let cases = [
            (None, NotReady, None),
            (Some(NotReady), NotReady, None),
            (Some(Ready), Ready, None),
            (None, Ready, Some((EventType::Normal, "DaemonsReady"))),
            (
                Some(NotReady),
                Ready,
                Some((EventType::Normal, "DaemonsReady")),
            ),
            (
                Some(Ready),
                NotReady,
                Some((EventType::Warning, "DaemonsNotReady")),
            ),
        ];
        for (previous, next, want) in cases {
            assert_eq!(
                transition_event(previous, next),
                want,
                "{previous:?} -> {next:?}"
            );
        }
    }
}

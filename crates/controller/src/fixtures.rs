//! Builders for test objects.

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use nvdra_api::{
    AllocationMode, ComputeDomain, ComputeDomainChannelSpec, ComputeDomainClique,
    ComputeDomainCliqueSpec, ComputeDomainDaemonInfo, ComputeDomainResourceClaimTemplate,
    ComputeDomainSpec, Readiness,
};

use crate::daemonset::DaemonSettings;

/// A ComputeDomain `namespace/name` with UID `uid`, workload template `<name>-channel`.
pub fn compute_domain(name: &str, namespace: &str, uid: &str, num_nodes: i64) -> ComputeDomain {
    let mut cd = ComputeDomain::new(
        name,
        ComputeDomainSpec {
            num_nodes,
            channel: ComputeDomainChannelSpec {
                resource_claim_template: ComputeDomainResourceClaimTemplate {
                    name: format!("{name}-channel"),
                },
                allocation_mode: AllocationMode::Single,
            },
        },
    );
    cd.metadata.namespace = Some(namespace.into());
    cd.metadata.uid = Some(uid.into());
    cd
}

/// Daemon settings as the chart would set them.
pub fn settings() -> DaemonSettings {
    DaemonSettings {
        namespace: "nvdra".into(),
        image: "registry.example/nvdra:1".into(),
        image_pull_secrets: vec![],
        max_nodes_per_imex_domain: 18,
        feature_gates: "ComputeDomainCliques=true".into(),
        log_filter: "info".into(),
        log_format: nvdra_api::flags::LogFormat::Text,
        metrics_port: None,
        priority_class_name: Some("system-node-critical".into()),
    }
}

/// A clique `uid-1.<clique_id>` with daemons `(node, index, status)`; IPs `10.0.0.<n>`.
pub fn clique(clique_id: &str, daemons: &[(&str, i64, Readiness)]) -> ComputeDomainClique {
    let mut clique = ComputeDomainClique::new(
        &format!("uid-1.{clique_id}"),
        ComputeDomainCliqueSpec {
            daemons: daemons
                .iter()
                .map(|(node, index, status)| ComputeDomainDaemonInfo {
                    node_name: (*node).into(),
                    ip_address: format!("10.0.0.{}", &node[1..]),
                    clique_id: clique_id.into(),
                    index: *index,
                    status: *status,
                })
                .collect(),
        },
    );
    clique.metadata.labels = Some(nvdra_api::clique::clique_labels("uid-1", clique_id));
    clique
}

/// A daemon pod of `uid-1` on `node`.
pub fn daemon_pod(node: &str, ready: bool, terminating: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("daemon-{node}")),
            namespace: Some("nvdra".into()),
            labels: Some(crate::daemonset::daemon_labels("uid-1")),
            deletion_timestamp: terminating.then(|| time(1)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// A fixed instant `seconds` after the epoch.
pub fn time(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap())
}

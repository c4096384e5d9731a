//! The IMEX daemon DaemonSet of a ComputeDomain, as a pure function of the domain UID and the
//! controller's [`DaemonSettings`].
//!
//! One DaemonSet `computedomain-daemon-<uid>` per domain in the driver namespace. Its pods land
//! only on nodes carrying the per-domain label `resource.nvidia.com/computeDomain.<uid>=true`
//! (set by the agent when a workload's channel claim is prepared there), tolerate every taint,
//! run `nvdra-imex-daemon run` with the domain's daemon claim, and are probed with
//! `nvdra-imex-daemon check` (readiness every 2 s so a domain turns Ready quickly). They carry
//! a high PriorityClass (`system-node-critical` by default): every workload pod of the domain
//! waits for its node's daemon, so the scheduler should place daemons ahead of pending
//! workloads (in a 64-node burst they otherwise queued behind all 256 workers) and never
//! preempt one for a workload.
//!
//! Invariants: the selector is `resource.nvidia.com/computeDomain=<uid>` and never changes (it
//! is immutable on the API server); the same inputs give the same object, so re-applying is a
//! no-op and a controller restart rolls no daemon pods.
//!
//! Failure modes: none here; whether the image can be pulled or the ServiceAccount exists shows
//! up on the pods, not in this function.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use nvdra_api::names::{labels, objects};

/// Everything about the daemon pods that comes from the controller's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// The driver namespace.
    pub namespace: String,
    /// Image of the daemon container.
    pub image: String,
    /// Image pull secret names.
    pub image_pull_secrets: Vec<String>,
    /// `MAX_NODES_PER_IMEX_DOMAIN`.
    pub max_nodes_per_imex_domain: u32,
    /// `FEATURE_GATES`, as the controller's effective gates.
    pub feature_gates: String,
    /// `NVDRA_LOG` of the daemons.
    pub log_filter: String,
    /// `NVDRA_LOG_FORMAT` of the daemons: the controller's own.
    pub log_format: nvdra_api::flags::LogFormat,
    /// Port of the daemons' metrics endpoint (container port `metrics`, bound on the pod
    /// IP); `None` serves none.
    pub metrics_port: Option<u16>,
    /// `priorityClassName` of the daemon pods.
    pub priority_class_name: Option<String>,
}

/// Name of the daemon container's metrics port, for scrape configurations.
pub const METRICS_PORT_NAME: &str = "metrics";

/// Labels of the DaemonSet and its pods; also the selector.
pub fn daemon_labels(domain_uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(labels::COMPUTE_DOMAIN.to_owned(), domain_uid.to_owned())])
}

/// The daemon DaemonSet of the domain with UID `domain_uid`.
pub fn desired(domain_uid: &str, settings: &DaemonSettings) -> apps::DaemonSet {
    let name = objects::daemon_name(domain_uid);
    let probe = |period: i32, failures: i32| core::Probe {
        exec: Some(core::ExecAction {
            command: Some(vec![objects::DAEMON_BINARY.to_owned(), "check".to_owned()]),
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        // `check` waits up to 10 s for nvidia-imex-ctl; the kubelet's default 1 s
        // would fail it on a loaded node and flap the daemon's readiness.
        timeout_seconds: Some(10),
        ..Default::default()
    };
    let tolerations = ["NoSchedule", "NoExecute", "PreferNoSchedule"]
        .into_iter()
        .map(|effect| core::Toleration {
            operator: Some("Exists".to_owned()),
            effect: Some(effect.to_owned()),
            ..Default::default()
        })
        .collect();
    let image_pull_secrets = settings
        .image_pull_secrets
        .iter()
        .filter(|name| !name.is_empty())
        .map(|name| core::LocalObjectReference { name: name.clone() })
        .collect::<Vec<_>>();
    let mut env = vec![
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_IP", "status.podIP"),
        field_env("POD_UID", "metadata.uid"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        value_env(
            "MAX_NODES_PER_IMEX_DOMAIN",
            &settings.max_nodes_per_imex_domain.to_string(),
        ),
        // The daemon needs no GPU; `void` keeps the NVIDIA runtime from injecting any.
        value_env("NVIDIA_VISIBLE_DEVICES", "void"),
        value_env("FEATURE_GATES", &settings.feature_gates),
        value_env("NVDRA_LOG", &settings.log_filter),
        value_env("NVDRA_LOG_FORMAT", settings.log_format.as_str()),
    ];
    let mut ports = None;
    if let Some(port) = settings.metrics_port {
        env.push(value_env("HTTP_ENDPOINT", &format!(":{port}")));
        ports = Some(vec![core::ContainerPort {
            name: Some(METRICS_PORT_NAME.to_owned()),
            container_port: i32::from(port),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]);
    }
    let container = core::Container {
        name: objects::DAEMON_CONTAINER.to_owned(),
        image: Some(settings.image.clone()),
        command: Some(vec![objects::DAEMON_BINARY.to_owned(), "run".to_owned()]),
        env: Some(env),
        ports,
        resources: Some(core::ResourceRequirements {
            claims: Some(vec![core::ResourceClaim {
                name: objects::DAEMON_CONTAINER.to_owned(),
                request: None,
            }]),
            // Requests from measured use (docs/performance.md: the daemon itself held
            // 12.4 MiB). No limits: nvidia-imex runs in this container too, its
            // footprint grows with the domain and is not ours to cap, and an OOM kill
            // would cut the node out of the domain's shared memory.
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".to_owned())),
                ("memory".to_owned(), Quantity("64Mi".to_owned())),
            ])),
            ..Default::default()
        }),
        startup_probe: Some(probe(1, 1200)),
        liveness_probe: Some(probe(60, 20)),
        readiness_probe: Some(probe(2, 1)),
        ..Default::default()
    };
    apps::DaemonSet {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(daemon_labels(domain_uid)),
            ..ObjectMeta::default()
        },
        spec: Some(apps::DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(daemon_labels(domain_uid)),
                match_expressions: None,
            },
            template: core::PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(daemon_labels(domain_uid)),
                    ..ObjectMeta::default()
                }),
                spec: Some(core::PodSpec {
                    node_selector: Some(BTreeMap::from([(
                        labels::compute_domain_node_label(domain_uid),
                        "true".to_owned(),
                    )])),
                    service_account_name: Some(objects::DAEMON_SERVICE_ACCOUNT.to_owned()),
                    priority_class_name: settings.priority_class_name.clone(),
                    image_pull_secrets: (!image_pull_secrets.is_empty())
                        .then_some(image_pull_secrets),
                    tolerations: Some(tolerations),
                    resource_claims: Some(vec![core::PodResourceClaim {
                        name: objects::DAEMON_CONTAINER.to_owned(),
                        resource_claim_template_name: Some(name),
                        resource_claim_name: None,
                    }]),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn field_env(name: &str, path: &str) -> core::EnvVar {
    core::EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(core::EnvVarSource {
            field_ref: Some(core::ObjectFieldSelector {
                api_version: None,
                field_path: path.to_owned(),
            }),
            ..Default::default()
        }),
    }
}

fn value_env(name: &str, value: &str) -> core::EnvVar {
    core::EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::settings;
    use pretty_assertions::assert_eq;
    use serde_json::json;

    fn probe(period: i32, failures: i32) -> serde_json::Value {
        json!({
            "exec": {"command": ["nvdra-imex-daemon", "check"]},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 10,
        })
    }

    fn expected(pull_secrets: Option<serde_json::Value>) -> serde_json::Value {
        let mut pod_spec = json!({
            "nodeSelector": {"resource.nvidia.com/computeDomain.uid-1": "true"},
            "serviceAccountName": "compute-domain-daemon-service-account",
            "priorityClassName": "system-node-critical",
            "tolerations": [
                {"operator": "Exists", "effect": "NoSchedule"},
                {"operator": "Exists", "effect": "NoExecute"},
                {"operator": "Exists", "effect": "PreferNoSchedule"},
            ],
            "resourceClaims": [{
                "name": "compute-domain-daemon",
                "resourceClaimTemplateName": "computedomain-daemon-uid-1",
            }],
            "containers": [{
                "name": "compute-domain-daemon",
                "image": "registry.example/nvdra:1",
                "command": ["nvdra-imex-daemon", "run"],
                "env": [
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "MAX_NODES_PER_IMEX_DOMAIN", "value": "18"},
                    {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"},
                    {"name": "FEATURE_GATES", "value": "ComputeDomainCliques=true"},
                    {"name": "NVDRA_LOG", "value": "info"},
                    {"name": "NVDRA_LOG_FORMAT", "value": "text"},
                ],
                "resources": {
                    "claims": [{"name": "compute-domain-daemon"}],
                    "requests": {"cpu": "10m", "memory": "64Mi"},
                },
                "startupProbe": probe(1, 1200),
                "livenessProbe": probe(60, 20),
                "readinessProbe": probe(2, 1),
            }],
        });
        if let Some(secrets) = pull_secrets {
            pod_spec["imagePullSecrets"] = secrets;
        }
        json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {
                "name": "computedomain-daemon-uid-1",
                "namespace": "nvdra",
                "labels": {"resource.nvidia.com/computeDomain": "uid-1"},
            },
            "spec": {
                "selector": {"matchLabels": {"resource.nvidia.com/computeDomain": "uid-1"}},
                "template": {
                    "metadata": {"labels": {"resource.nvidia.com/computeDomain": "uid-1"}},
                    "spec": pod_spec,
                },
            },
        })
    }

    #[test]
    fn daemonset_table() {
        let cases: Vec<(Vec<String>, Option<serde_json::Value>)> = vec![
            (vec![], None),
            (vec![String::new()], None),
            (
                vec!["a".into(), "b".into()],
                Some(json!([{"name": "a"}, {"name": "b"}])),
            ),
        ];
        for (secrets, want) in cases {
            let mut s = settings();
            s.image_pull_secrets = secrets.clone();
            let got = serde_json::to_value(desired("uid-1", &s)).unwrap();
            assert_eq!(got, expected(want), "{secrets:?}");
        }
    }

    #[test]
    fn no_priority_class_leaves_the_field_out() {
        let mut s = settings();
        s.priority_class_name = None;
        let got = serde_json::to_value(desired("uid-1", &s)).unwrap();
        let mut want = expected(None);
        want["spec"]["template"]["spec"]
            .as_object_mut()
            .unwrap()
            .remove("priorityClassName");
        assert_eq!(got, want);
    }

    #[test]
    fn metrics_port_adds_endpoint_and_container_port() {
        let mut s = settings();
        s.metrics_port = Some(8082);
        let got = serde_json::to_value(desired("uid-1", &s)).unwrap();
        let container = &got["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["ports"],
            json!([{"name": "metrics", "containerPort": 8082, "protocol": "TCP"}])
        );
        let env = container["env"].as_array().unwrap();
        assert_eq!(
            env.last().unwrap(),
            &json!({"name": "HTTP_ENDPOINT", "value": ":8082"})
        );
        let mut want = expected(None);
        want["spec"]["template"]["spec"]["containers"][0]["ports"] = container["ports"].clone();
        want["spec"]["template"]["spec"]["containers"][0]["env"] = container["env"].clone();
        assert_eq!(got, want, "nothing else changes");
    }
}

//! ComputeDomain manifests users already have for the Go driver deserialize into our types
//! and serialize back unchanged.

use nvdra_api::{AllocationMode, ComputeDomain, Readiness};
use pretty_assertions::assert_eq;
use serde_json::Value;

const USER_MANIFEST: &str = r#"
apiVersion: resource.nvidia.com/v1beta1
kind: ComputeDomain
metadata:
  name: imex-channel-injection
  namespace: default
spec:
  numNodes: 2
  channel:
    resourceClaimTemplate:
      name: imex-channel-0
    allocationMode: All
"#;

#[test]
fn typical_user_compute_domain_round_trips() {
    let cd: ComputeDomain = serde_saphyr::from_str(USER_MANIFEST).unwrap();
    assert_eq!(cd.metadata.name.as_deref(), Some("imex-channel-injection"));
    assert_eq!(cd.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(cd.spec.num_nodes, 2);
    assert_eq!(
        cd.spec.channel.resource_claim_template.name,
        "imex-channel-0"
    );
    assert_eq!(cd.spec.channel.allocation_mode, AllocationMode::All);
    assert_eq!(cd.status, None);

    let original: Value = serde_saphyr::from_str(USER_MANIFEST).unwrap();
    assert_eq!(serde_json::to_value(&cd).unwrap(), original);
}

#[test]
fn minimal_compute_domain_gets_upstream_defaults() {
    let cd: ComputeDomain = serde_saphyr::from_str(
        r#"
apiVersion: resource.nvidia.com/v1beta1
kind: ComputeDomain
metadata:
  name: cd
spec:
  channel:
    resourceClaimTemplate:
      name: rct
"#,
    )
    .unwrap();
    assert_eq!(cd.spec.num_nodes, 0);
    assert_eq!(cd.spec.channel.allocation_mode, AllocationMode::Single);
}

#[test]
fn go_written_status_round_trips() {
    let json = serde_json::json!({
        "apiVersion": "resource.nvidia.com/v1beta1",
        "kind": "ComputeDomain",
        "metadata": {"name": "cd", "namespace": "ns", "uid": "1b7c"},
        "spec": {
            "numNodes": 1,
            "channel": {"resourceClaimTemplate": {"name": "rct"}, "allocationMode": "Single"}
        },
        "status": {
            "status": "Ready",
            "nodes": [{
                "name": "node-a", "ipAddress": "10.1.2.3",
                "cliqueID": "2df84740-3a0b-4d2e-9c9e-0123456789ab.2",
                "index": 0, "status": "Ready"
            }]
        }
    });
    let cd: ComputeDomain = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(cd.status.as_ref().unwrap().status, Readiness::Ready);
    assert_eq!(cd.global_status_from_nodes(), Readiness::Ready);
    assert_eq!(serde_json::to_value(&cd).unwrap(), json);
}

#[test]
fn unknown_enum_values_are_rejected() {
    let err = serde_json::from_value::<ComputeDomain>(serde_json::json!({
        "apiVersion": "resource.nvidia.com/v1beta1",
        "kind": "ComputeDomain",
        "metadata": {"name": "cd"},
        "spec": {"channel": {"resourceClaimTemplate": {"name": "rct"}, "allocationMode": "Some"}}
    }))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown variant `Some`, expected `All` or `Single`"
    );
}

//! The two ResourceClaimTemplates of a ComputeDomain, as pure functions of the domain.
//!
//! - The **daemon** template `computedomain-daemon-<uid>` lives in the driver namespace and is
//!   referenced by the daemon DaemonSet's pods: one request `daemon` of class
//!   `compute-domain-daemon.nvidia.com` with an opaque `ComputeDomainDaemonConfig{domainID}`.
//!   It cannot carry an ownerReference (the domain lives in another namespace), so the
//!   domain's finalizer deletes it.
//! - The **workload** template carries the user's name in the domain's namespace: one request
//!   `channel` of class `compute-domain-default-channel.nvidia.com` with an opaque
//!   `ComputeDomainChannelConfig{domainID, allocationMode}`. It has the domain as controller
//!   owner, so the garbage collector removes it with the domain. The reference does not set
//!   `blockOwnerDeletion`: nothing needs the domain to wait for the template, and leaving it
//!   out spares the controller RBAC on `computedomains/finalizers`.
//!
//! Invariants: the output depends only on the domain (name, namespace, UID, spec) and the driver
//! namespace, so applying it twice is a no-op; labels carry the domain UID and the target
//! (`Daemon`/`Workload`) exactly as upstream, so upstream tooling and selectors keep working.
//!
//! Failure modes: none here; [`workload`] returns `None` for a domain without a UID (never
//! the case for an object read from the API server).

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1 as resource;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource as _;
use nvdra_api::ComputeDomain;
use nvdra_api::names::{
    api_group, compute_domain_target, device_classes, drivers, kinds, labels, objects,
};
use serde_json::json;

/// Labels of a domain's claim template for `target` (`Daemon` or `Workload`).
pub fn template_labels(domain_uid: &str, target: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::COMPUTE_DOMAIN.to_owned(), domain_uid.to_owned()),
        (labels::COMPUTE_DOMAIN_TARGET.to_owned(), target.to_owned()),
    ])
}

/// The daemon ResourceClaimTemplate of the domain with UID `domain_uid`.
pub fn daemon(domain_uid: &str, driver_namespace: &str) -> resource::ResourceClaimTemplate {
    let parameters = json!({
        "apiVersion": api_group::API_VERSION,
        "kind": kinds::COMPUTE_DOMAIN_DAEMON_CONFIG,
        "domainID": domain_uid,
    });
    template(
        ObjectMeta {
            name: Some(objects::daemon_name(domain_uid)),
            namespace: Some(driver_namespace.to_owned()),
            labels: Some(template_labels(domain_uid, compute_domain_target::DAEMON)),
            ..ObjectMeta::default()
        },
        objects::DAEMON_REQUEST,
        device_classes::COMPUTE_DOMAIN_DAEMON,
        parameters,
    )
}

/// The workload ResourceClaimTemplate of `cd`, owned by it.
pub fn workload(cd: &ComputeDomain) -> Option<resource::ResourceClaimTemplate> {
    let uid = cd.meta().uid.as_deref()?;
    let owner = cd.controller_owner_ref(&())?;
    let parameters = json!({
        "apiVersion": api_group::API_VERSION,
        "kind": kinds::COMPUTE_DOMAIN_CHANNEL_CONFIG,
        "domainID": uid,
        "allocationMode": cd.spec.channel.allocation_mode.as_str(),
    });
    Some(template(
        ObjectMeta {
            name: Some(cd.spec.channel.resource_claim_template.name.clone()),
            namespace: cd.meta().namespace.clone(),
            labels: Some(template_labels(uid, compute_domain_target::WORKLOAD)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        objects::CHANNEL_REQUEST,
        device_classes::COMPUTE_DOMAIN_DEFAULT_CHANNEL,
        parameters,
    ))
}

fn template(
    metadata: ObjectMeta,
    request: &str,
    device_class: &str,
    parameters: serde_json::Value,
) -> resource::ResourceClaimTemplate {
    resource::ResourceClaimTemplate {
        metadata,
        spec: resource::ResourceClaimTemplateSpec {
            metadata: None,
            spec: resource::ResourceClaimSpec {
                devices: Some(resource::DeviceClaim {
                    requests: Some(vec![resource::DeviceRequest {
                        name: request.to_owned(),
                        exactly: Some(resource::ExactDeviceRequest {
                            device_class_name: device_class.to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    config: Some(vec![resource::DeviceClaimConfiguration {
                        requests: None,
                        opaque: Some(resource::OpaqueDeviceConfiguration {
                            driver: drivers::COMPUTE_DOMAIN.to_owned(),
                            parameters: k8s_openapi::apimachinery::pkg::runtime::RawExtension(
                                parameters,
                            ),
                        }),
                    }]),
                    constraints: None,
                }),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::compute_domain;
    use nvdra_api::AllocationMode;
    use pretty_assertions::assert_eq;

    #[test]
    fn daemon_template() {
        let got = serde_json::to_value(daemon("uid-1", "nvdra")).unwrap();
        assert_eq!(
            got,
            json!({
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaimTemplate",
                "metadata": {
                    "name": "computedomain-daemon-uid-1",
                    "namespace": "nvdra",
                    "labels": {
                        "resource.nvidia.com/computeDomain": "uid-1",
                        "resource.nvidia.com/computeDomainTarget": "Daemon",
                    },
                },
                "spec": {"spec": {"devices": {
                    "requests": [{
                        "name": "daemon",
                        "exactly": {"deviceClassName": "compute-domain-daemon.nvidia.com"},
                    }],
                    "config": [{"opaque": {
                        "driver": "compute-domain.nvidia.com",
                        "parameters": {
                            "apiVersion": "resource.nvidia.com/v1beta1",
                            "kind": "ComputeDomainDaemonConfig",
                            "domainID": "uid-1",
                        },
                    }}],
                }}},
            })
        );
    }

    #[test]
    fn workload_template_per_allocation_mode() {
        for (mode, wire) in [
            (AllocationMode::Single, "Single"),
            (AllocationMode::All, "All"),
        ] {
            let mut cd = compute_domain("cd", "team-a", "uid-1", 2);
            cd.spec.channel.allocation_mode = mode;
            let got = serde_json::to_value(workload(&cd).unwrap()).unwrap();
            assert_eq!(
                got,
                json!({
                    "apiVersion": "resource.k8s.io/v1",
                    "kind": "ResourceClaimTemplate",
                    "metadata": {
                        "name": "cd-channel",
                        "namespace": "team-a",
                        "labels": {
                            "resource.nvidia.com/computeDomain": "uid-1",
                            "resource.nvidia.com/computeDomainTarget": "Workload",
                        },
                        "ownerReferences": [{
                            "apiVersion": "resource.nvidia.com/v1beta1",
                            "kind": "ComputeDomain",
                            "name": "cd",
                            "uid": "uid-1",
                            "controller": true,
                        }],
                    },
                    "spec": {"spec": {"devices": {
                        "requests": [{
                            "name": "channel",
                            "exactly": {
                                "deviceClassName": "compute-domain-default-channel.nvidia.com"
                            },
                        }],
                        "config": [{"opaque": {
                            "driver": "compute-domain.nvidia.com",
                            "parameters": {
                                "apiVersion": "resource.nvidia.com/v1beta1",
                                "kind": "ComputeDomainChannelConfig",
                                "domainID": "uid-1",
                                "allocationMode": wire,
                            },
                        }}],
                    }}},
                }),
                "{wire}"
            );
        }
    }

    #[test]
    fn workload_needs_a_uid() {
        let mut cd = compute_domain("cd", "team-a", "uid-1", 0);
        cd.metadata.uid = None;
        assert_eq!(workload(&cd), None);
    }
}

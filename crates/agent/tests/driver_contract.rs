//! The GPU driver behind the real kubelet-plugin servers: a tonic client plays the kubelet over
//! the Unix sockets (registration `GetInfo`, then DRA v1 and v1beta1 Prepare/Unprepare), the
//! claims are realistic allocated `resource.k8s.io/v1` ResourceClaims, and the CDI specs and
//! checkpoint on disk are checked after each step.

#[path = "driver/fixtures.rs"]
mod fixtures;

#[cfg(test)]
mod driver_contract {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use nvdra_agent::checkpoint::CheckpointStore;
    use nvdra_kubelet_plugin::InMemoryClaimReader;
    use nvdra_kubelet_plugin::proto::registration::registration_client::RegistrationClient;
    use nvdra_kubelet_plugin::proto::registration::{InfoRequest, PluginInfo};
    use nvdra_kubelet_plugin::proto::{dra_v1, dra_v1beta1};
    use pretty_assertions::assert_eq;

    use crate::fixtures::*;

    fn v1_claim(name: &str, claim_uid: &str) -> dra_v1::Claim {
        dra_v1::Claim {
            namespace: "ns".into(),
            uid: claim_uid.into(),
            name: name.into(),
        }
    }

    fn v1beta1_claim(name: &str, claim_uid: &str) -> dra_v1beta1::Claim {
        dra_v1beta1::Claim {
            namespace: "ns".into(),
            uid: claim_uid.into(),
            name: name.into(),
        }
    }

    fn cdi_id(claim_uid: &str, device: &str) -> String {
        format!("k8s.gpu.nvidia.com/claim={claim_uid}-{device}")
    }

    fn v1_device(claim_uid: &str, request: &str, device: &str) -> dra_v1::Device {
        dra_v1::Device {
            request_names: vec![request.into()],
            pool_name: NODE.into(),
            device_name: device.into(),
            cdi_device_ids: vec![cdi_id(claim_uid, device)],
            share_id: None,
        }
    }

    fn v1beta1_device(claim_uid: &str, request: &str, device: &str) -> dra_v1beta1::Device {
        dra_v1beta1::Device {
            request_names: vec![request.into()],
            pool_name: NODE.into(),
            device_name: device.into(),
            cdi_device_ids: vec![cdi_id(claim_uid, device)],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kubelet_prepares_and_unprepares_over_both_protocol_versions() {
        let dirs = Dirs::new();
        let started = start(&dirs, H100);
        let (single, pair, sub, taken, missing) = (uid(1), uid(2), uid(3), uid(4), uid(5));
        let reader = Arc::new(InMemoryClaimReader::new());
        reader.insert(allocated_claim(
            "single",
            &single,
            &[("gpu", "gpu-0", false)],
        ));
        reader.insert(allocated_claim(
            "pair",
            &pair,
            &[("gpus", "gpu-1", false), ("gpus", "gpu-2", false)],
        ));
        reader.insert(allocated_claim(
            "sub",
            &sub,
            &[("gpu/small", "gpu-3", false)],
        ));
        reader.insert(allocated_claim("taken", &taken, &[("gpu", "gpu-0", false)]));
        let plugin = RunningPlugin::start(&dirs, Arc::new(started.driver), reader).await;

        // The kubelet learns the endpoint and versions first.
        let info = RegistrationClient::new(channel(&plugin.registration_socket).await)
            .get_info(InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info,
            PluginInfo {
                r#type: "DRAPlugin".into(),
                name: DRIVER.into(),
                endpoint: dirs.data.join("dra.sock").to_str().unwrap().into(),
                supported_versions: vec!["v1.DRAPlugin".into(), "v1beta1.DRAPlugin".into()],
            }
        );

        // v1 Prepare: every claim answered, devices with CDI IDs, errors per claim.
        let mut v1 = plugin.dra_v1().await;
        let response = v1
            .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
                claims: vec![
                    v1_claim("single", &single),
                    v1_claim("pair", &pair),
                    v1_claim("sub", &sub),
                    v1_claim("taken", &taken),
                    v1_claim("missing", &missing),
                ],
            })
            .await
            .unwrap()
            .into_inner();
        let got: BTreeMap<String, (Vec<dra_v1::Device>, String)> = response
            .claims
            .into_iter()
            .map(|(uid, r)| (uid, (r.devices, r.error)))
            .collect();
        assert_eq!(
            got,
            BTreeMap::from([
                (
                    single.clone(),
                    (vec![v1_device(&single, "gpu", "gpu-0")], String::new())
                ),
                (
                    pair.clone(),
                    (
                        vec![
                            v1_device(&pair, "gpus", "gpu-1"),
                            v1_device(&pair, "gpus", "gpu-2")
                        ],
                        String::new()
                    )
                ),
                // The library strips the subrequest for the kubelet.
                (
                    sub.clone(),
                    (vec![v1_device(&sub, "gpu", "gpu-3")], String::new())
                ),
                (
                    taken.clone(),
                    (
                        vec![],
                        format!(
                            "device node-a/gpu-0 requested by claim ns/taken ({taken}) is already \
                             in use by claim ns/single ({single}) (PrepareStarted)"
                        )
                    )
                ),
                (
                    missing.clone(),
                    (
                        vec![],
                        format!("claim ns/missing (uid {missing}) not found")
                    )
                ),
            ])
        );
        for claim_uid in [&single, &pair, &sub] {
            assert!(dirs.spec_path(claim_uid).exists(), "spec of {claim_uid}");
        }
        let spec = dirs.read_spec(&pair);
        assert_eq!(
            spec.devices
                .iter()
                .map(|d| d.name.clone())
                .collect::<Vec<_>>(),
            [format!("{pair}-gpu-1"), format!("{pair}-gpu-2")]
        );
        assert_eq!(dirs.cdi_files().len(), 3);

        // v1beta1 Prepare of the same claims (a kubelet restart): the recorded devices.
        let mut v1beta1 = plugin.dra_v1beta1().await;
        let response = v1beta1
            .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
                claims: vec![v1beta1_claim("single", &single), v1beta1_claim("sub", &sub)],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.claims[&single].devices,
            [v1beta1_device(&single, "gpu", "gpu-0")]
        );
        assert_eq!(
            response.claims[&sub].devices,
            [v1beta1_device(&sub, "gpu", "gpu-3")]
        );
        assert_eq!(response.claims[&sub].error, "");

        // A health probe's empty Prepare is answered without touching anything.
        let empty = v1
            .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims: vec![] })
            .await
            .unwrap()
            .into_inner();
        assert!(empty.claims.is_empty());

        // Unprepare over both versions, including a claim that was never prepared.
        let response = v1
            .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
                claims: vec![v1_claim("single", &single), v1_claim("pair", &pair)],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response
                .claims
                .into_iter()
                .map(|(uid, r)| (uid, r.error))
                .collect::<BTreeMap<_, _>>(),
            BTreeMap::from([
                (single.clone(), String::new()),
                (pair.clone(), String::new())
            ])
        );
        let response = v1beta1
            .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
                claims: vec![
                    v1beta1_claim("sub", &sub),
                    v1beta1_claim("missing", &missing),
                ],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response
                .claims
                .into_iter()
                .map(|(uid, r)| (uid, r.error))
                .collect::<BTreeMap<_, _>>(),
            BTreeMap::from([
                (sub.clone(), String::new()),
                (missing.clone(), String::new())
            ])
        );
        assert_eq!(dirs.cdi_files(), Vec::<String>::new());
        assert!(
            CheckpointStore::new(&dirs.data)
                .load(BOOT_ID)
                .unwrap()
                .state
                .is_empty()
        );

        let text = scrape(&started.registry);
        assert_eq!(
            samples(&text, "nvidia_dra_requests_total"),
            [
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="prepare"} 5"#,
                r#"nvidia_dra_requests_total{driver="gpu.nvidia.com",operation="unprepare"} 4"#,
            ]
        );
        plugin.stop().await;
    }
}

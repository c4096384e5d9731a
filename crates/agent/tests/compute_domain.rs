//! The compute-domain driver end to end on one node: real checkpoint and CDI files in a temp
//! dir, the fake GB200 profile (in an NVLink clique), and a mocked API server that serves
//! ComputeDomains, records Node patches and answers clique LISTs.

#[cfg(test)]
mod compute_domain_driver {
    use std::collections::HashSet;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Bytes;
    use http::{Method, Request, Response};
    use http_body_util::Full;
    use k8s_openapi::api::resource::v1::{DeviceRequestAllocationResult, ResourceClaim};
    use kube::client::Body;
    use nvdra_agent::cdi::spec::{ContainerEdits, Spec};
    use nvdra_agent::cdi::{CdiStore, Vendor};
    use nvdra_agent::checkpoint::{ClaimRef as CpRef, ClaimState, DeviceInfo, PreparedChannel};
    use nvdra_agent::cleanup::{StaleClaim, StaleReason, cleanup_stale_claims};
    use nvdra_agent::computedomain::{
        CONFIG_TEMPLATE, Cluster, ComputeDomainDriver, ComputeDomainDriverConfig, specs,
    };
    use nvdra_agent::metrics::Metrics;
    use nvdra_gpu::{FakeBackend, GpuBackend as _};
    use nvdra_kubelet_plugin::{
        ClaimRef, ConfigSource, DraDriver, InMemoryClaimReader, OpaqueConfig, PrepareClaim,
    };
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    const NODE: &str = "node-a";
    const DRIVER_NS: &str = "nvdra";
    const CLIQUE: &str = "0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1";

    #[derive(Default)]
    struct ApiState {
        /// (uid, namespace, name)
        domains: Vec<(String, String, String)>,
        /// Domains whose daemon on this node is Ready.
        ready: HashSet<String>,
        /// Merge patches sent to this node.
        node_patches: Vec<Value>,
        /// Clique LISTs of one domain (a wait's last word), as opposed to the watch's LIST.
        domain_clique_lists: usize,
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Full<Bytes>>>;

    fn respond(body: &Value) -> Response<Full<Bytes>> {
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap()
    }

    /// Serves requests until the client goes away.
    /// Watches are held open and never answered, so the driver's watch caches see the first
    /// LIST only and every later change reaches it through the LIST a wait makes at its deadline.
    async fn serve(mut handle: Handle, state: Arc<Mutex<ApiState>>) {
        let mut held = Vec::new();
        while let Some((request, reply)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or("").to_owned();
            let method = request.method().clone();
            if query.contains("watch=true") {
                held.push(reply);
                continue;
            }
            let body = http_body_util::BodyExt::collect(request.into_body())
                .await
                .unwrap()
                .to_bytes();
            let mut state = state.lock().unwrap();
            let response = match (method, path.as_str()) {
                // All domains, or (confirming a cached one) those of one namespace with
                // one name.
                (Method::GET, p) if p.ends_with("/computedomains") => {
                    let scope = p
                        .strip_prefix("/apis/resource.nvidia.com/v1beta1/namespaces/")
                        .and_then(|rest| rest.strip_suffix("/computedomains"));
                    let name = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name%3D"));
                    let items: Vec<Value> = state
                        .domains
                        .iter()
                        .filter(|(_, ns, n)| {
                            scope.is_none_or(|s| s == ns) && name.is_none_or(|want| want == n)
                        })
                        .map(|(uid, ns, name)| {
                            json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomain",
                                   "metadata": {"uid": uid, "namespace": ns, "name": name}})
                        })
                        .collect();
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                           "metadata": {"resourceVersion": "1"}, "items": items})
                }
                (Method::PATCH, "/api/v1/nodes/node-a") => {
                    assert!(query.contains("fieldManager=nvdra-agent"), "{query}");
                    state
                        .node_patches
                        .push(serde_json::from_slice(&body).unwrap());
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
                }
                (
                    Method::GET,
                    "/apis/resource.nvidia.com/v1beta1/namespaces/nvdra/computedomaincliques",
                ) => {
                    // The watch's LIST asks for the cliques of this node's NVLink clique; a
                    // wait's LIST for one domain's.
                    let selector = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("labelSelector="))
                        .map(|s| s.replace("%2F", "/").replace("%3D", "="))
                        .unwrap();
                    let (key, value) = selector.split_once('=').unwrap();
                    let wanted = match key {
                        "resource.nvidia.com/computeDomain" => Some(value.to_owned()),
                        "resource.nvidia.com/computeDomain.cliqueID" => {
                            assert_eq!(value, CLIQUE);
                            None
                        }
                        other => panic!("clique list by {other}"),
                    };
                    state.domain_clique_lists += usize::from(wanted.is_some());
                    let items: Vec<Value> = state
                        .domains
                        .iter()
                        .map(|(uid, _, _)| uid)
                        .filter(|uid| wanted.as_ref().is_none_or(|w| w == *uid))
                        .map(|uid| {
                            let status = if state.ready.contains(uid) {
                                "Ready"
                            } else {
                                "NotReady"
                            };
                            json!({
                               "apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomainClique",
                               "metadata": {"name": format!("{uid}.{CLIQUE}"), "namespace": DRIVER_NS,
                                            "labels": {"resource.nvidia.com/computeDomain": uid,
                                                       "resource.nvidia.com/computeDomain.cliqueID": CLIQUE}},
                               "daemons": [{"nodeName": NODE, "ipAddress": "10.0.0.1",
                                            "cliqueID": CLIQUE, "index": 0, "status": status}]})
                        })
                        .collect();
                    json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomainCliqueList",
                           "metadata": {"resourceVersion": "1"}, "items": items})
                }
                (method, path) => panic!("unexpected request {method} {path}?{query}"),
            };
            reply.send_response(respond(&response));
        }
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        data: PathBuf,
        cdi: PathBuf,
        driver: ComputeDomainDriver,
        api: Arc<Mutex<ApiState>>,
    }

    fn setup(timeout: Duration) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("plugins/compute-domain.nvidia.com");
        let cdi = tmp.path().join("cdi");
        let backend = FakeBackend::builtin("gb200-x4").unwrap().unwrap();
        let api = Arc::new(Mutex::new(ApiState {
            domains: vec![
                ("cd-1".into(), "team-a".into(), "imex".into()),
                ("cd-2".into(), "team-b".into(), "other".into()),
            ],
            ..ApiState::default()
        }));
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Full<Bytes>>>();
        tokio::spawn(serve(handle, Arc::clone(&api)));
        let client = kube::Client::new(service, "default");
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry, "compute-domain.nvidia.com", NODE).unwrap();
        let (driver, _) = ComputeDomainDriver::start(ComputeDomainDriverConfig {
            node_name: NODE.into(),
            plugin_data_dir: data.clone(),
            cdi: CdiStore::for_vendor(&cdi, Vendor::COMPUTE_DOMAIN),
            base_spec: specs::render_base_spec(&ContainerEdits::default(), &[]).unwrap(),
            imex: backend.imex().unwrap(),
            clique_id: Some(CLIQUE.into()),
            gates: Default::default(),
            boot_id: "boot".into(),
            metrics,
            cluster: Cluster::new(client, DRIVER_NS, NODE),
            readiness_timeout: timeout,
        })
        .unwrap();
        Setup {
            _tmp: tmp,
            data,
            cdi,
            driver,
            api,
        }
    }

    fn claim(
        uid: &str,
        namespace: &str,
        device: &str,
        request: &str,
        parameters: Value,
    ) -> PrepareClaim {
        PrepareClaim {
            claim_ref: ClaimRef::new(namespace, format!("claim-{uid}"), uid),
            claim: ResourceClaim::default(),
            results: vec![DeviceRequestAllocationResult {
                driver: "compute-domain.nvidia.com".into(),
                pool: NODE.into(),
                device: device.into(),
                request: request.into(),
                share_id: Some(format!("share-{uid}")),
                ..Default::default()
            }],
            configs: vec![OpaqueConfig {
                source: ConfigSource::FromClaim,
                requests: vec![request.into()],
                parameters,
            }],
        }
    }

    fn channel_claim(uid: &str, namespace: &str, domain: &str) -> PrepareClaim {
        claim(
            uid,
            namespace,
            "channel-0",
            "channel",
            json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomainChannelConfig",
                   "domainID": domain, "allocationMode": "Single"}),
        )
    }

    fn daemon_claim(uid: &str, domain: &str) -> PrepareClaim {
        claim(
            uid,
            DRIVER_NS,
            "daemon-0",
            "daemon",
            json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomainDaemonConfig",
                   "domainID": domain}),
        )
    }

    fn spec(cdi: &Path, uid: &str) -> Spec {
        let text =
            std::fs::read_to_string(cdi.join(Vendor::COMPUTE_DOMAIN.claim_spec_file_name(uid)))
                .unwrap();
        serde_saphyr::from_str(&text).unwrap()
    }

    fn label(uid: &str, value: Value) -> Value {
        json!({"metadata": {"labels": {format!("resource.nvidia.com/computeDomain.{uid}"): value}}})
    }

    #[tokio::test]
    async fn daemon_and_channels_of_two_domains() {
        let s = setup(Duration::from_secs(5));
        assert!(
            s.cdi
                .join("k8s.compute-domain.nvidia.com-device_base.yaml")
                .is_file()
        );

        // The daemon claim of cd-1: identity env, /imexd, fabric capability, base device.
        let got = s
            .driver
            .prepare_resource_claims(vec![daemon_claim("d1", "cd-1")])
            .await;
        let devices = got["d1"].as_ref().unwrap();
        assert_eq!(
            devices[0].cdi_device_ids,
            [
                "k8s.compute-domain.nvidia.com/claim=d1-daemon-0",
                "k8s.compute-domain.nvidia.com/device=all"
            ]
        );
        let edits = &spec(&s.cdi, "d1").devices[0].container_edits;
        assert_eq!(
            edits.env,
            [
                format!("CLIQUE_ID={CLIQUE}"),
                "COMPUTE_DOMAIN_UUID=cd-1".into(),
                "COMPUTE_DOMAIN_NAME=imex".into(),
                "COMPUTE_DOMAIN_NAMESPACE=team-a".into(),
            ]
        );
        assert_eq!(
            edits.device_nodes[0].path,
            "/dev/nvidia-caps/nvidia-cap4323"
        );
        let dir = s.data.join("domains/cd-1");
        assert_eq!(edits.mounts[0].host_path, dir.to_string_lossy());
        assert_eq!(
            std::fs::read_to_string(dir.join("imexd.cfg.tmpl")).unwrap(),
            CONFIG_TEMPLATE
        );

        // Channel claims: the node is labelled, the daemon is Ready, channel 0 for cd-1, channel 1
        // for cd-2, channel 0 again for a second claim of cd-1.
        s.api
            .lock()
            .unwrap()
            .ready
            .extend(["cd-1".to_owned(), "cd-2".to_owned()]);
        let got = s
            .driver
            .prepare_resource_claims(vec![
                channel_claim("c1", "team-a", "cd-1"),
                channel_claim("c2", "team-b", "cd-2"),
            ])
            .await;
        assert!(got.values().all(Result::is_ok), "{got:?}");
        let got = s
            .driver
            .prepare_resource_claims(vec![channel_claim("c3", "team-a", "cd-1")])
            .await;
        assert!(got["c3"].is_ok(), "{got:?}");
        // Readiness came from the clique watch: no per-domain LIST, and the timeout is 5 s.
        assert_eq!(s.api.lock().unwrap().domain_clique_lists, 0);
        let node_of = |uid: &str| {
            spec(&s.cdi, uid).devices[0].container_edits.device_nodes[0]
                .path
                .clone()
        };
        assert_eq!(node_of("c1"), "/dev/nvidia-caps-imex-channels/channel0");
        assert_eq!(node_of("c2"), "/dev/nvidia-caps-imex-channels/channel1");
        assert_eq!(node_of("c3"), "/dev/nvidia-caps-imex-channels/channel0");
        let state = s.driver.checkpoint_state();
        let info = &state.claim("c2").unwrap().prepared_devices[0].devices[0].info;
        assert_eq!(
            *info,
            DeviceInfo::Channel(PreparedChannel {
                id: 1,
                domain_id: Some("cd-2".into()),
                allocation_mode: Some("Single".into()),
            })
        );
        {
            let mut patches = s.api.lock().unwrap().node_patches.clone();
            patches.sort_by_key(Value::to_string);
            // One patch per domain: the second claim of cd-1 finds its label set.
            assert_eq!(
                patches,
                [label("cd-1", json!("true")), label("cd-2", json!("true"))]
            );
            s.api.lock().unwrap().node_patches.clear();
        }

        // Unprepare: the label of cd-1 goes with its last channel claim only.
        let got = s
            .driver
            .unprepare_resource_claims(vec![ClaimRef::new("team-a", "claim-c1", "c1")])
            .await;
        assert!(got["c1"].is_ok());
        assert!(s.api.lock().unwrap().node_patches.is_empty());
        let got = s
            .driver
            .unprepare_resource_claims(vec![ClaimRef::new("team-a", "claim-c3", "c3")])
            .await;
        assert!(got["c3"].is_ok());
        assert_eq!(
            s.api.lock().unwrap().node_patches,
            [label("cd-1", Value::Null)]
        );
        assert!(
            !s.cdi
                .join(Vendor::COMPUTE_DOMAIN.claim_spec_file_name("c3"))
                .exists()
        );

        // The daemon's unprepare removes the domain directory.
        let got = s
            .driver
            .unprepare_resource_claims(vec![ClaimRef::new(DRIVER_NS, "claim-d1", "d1")])
            .await;
        assert!(got["d1"].is_ok());
        assert!(!dir.exists());
        // Unknown claims succeed.
        let got = s
            .driver
            .unprepare_resource_claims(vec![ClaimRef::new("x", "y", "nope")])
            .await;
        assert!(got["nope"].is_ok());
    }

    #[tokio::test]
    async fn channel_claims_that_cannot_be_prepared() {
        let s = setup(Duration::from_millis(150));
        let err = |got: &nvdra_kubelet_plugin::PrepareResults, uid: &str| {
            got[uid].as_ref().unwrap_err().to_string()
        };

        let got = s
            .driver
            .prepare_resource_claims(vec![channel_claim("m", "team-b", "cd-1")])
            .await;
        assert_eq!(
            err(&got, "m"),
            "claim namespace \"team-b\" does not match the namespace of ComputeDomain team-a/imex: a \
             channel claim must be in its ComputeDomain's namespace"
        );
        assert!(s.driver.checkpoint_state().claim("m").is_none());

        let mut unknown = channel_claim("u", "team-a", "cd-1");
        unknown.configs[0].parameters["allocationMod"] = json!("All");
        let got = s.driver.prepare_resource_claims(vec![unknown]).await;
        assert_eq!(
            err(&got, "u"),
            "invalid device configuration: claim config 0 (FromClaim): ComputeDomainChannelConfig: \
             unknown field \"allocationMod\""
        );

        let got = s
            .driver
            .prepare_resource_claims(vec![channel_claim("g", "team-a", "gone")])
            .await;
        assert_eq!(err(&got, "g"), "no ComputeDomain with UID gone exists");
        assert!(s.api.lock().unwrap().node_patches.is_empty());

        // The daemon never becomes Ready: a retriable error; the claim stays started, so its
        // Unprepare removes the label it set.
        let got = s
            .driver
            .prepare_resource_claims(vec![channel_claim("w", "team-a", "cd-1")])
            .await;
        assert_eq!(
            err(&got, "w"),
            "waiting for the IMEX daemon of ComputeDomain team-a/imex on node node-a to be Ready"
        );
        // The watch never said Ready, so the wait asked the API once at its deadline.
        assert_eq!(s.api.lock().unwrap().domain_clique_lists, 1);
        assert_eq!(
            s.driver.checkpoint_state().claim("w").unwrap().state,
            ClaimState::PrepareStarted
        );
        // Ready now: the kubelet's retry succeeds.
        s.api.lock().unwrap().ready.insert("cd-1".into());
        let got = s
            .driver
            .prepare_resource_claims(vec![channel_claim("w", "team-a", "cd-1")])
            .await;
        assert!(got["w"].is_ok(), "{got:?}");
        assert_eq!(s.api.lock().unwrap().domain_clique_lists, 2);
        let got = s
            .driver
            .unprepare_resource_claims(vec![ClaimRef::new("team-a", "claim-w", "w")])
            .await;
        assert!(got["w"].is_ok());
        // The retry found the label it had set; the last unprepare removed it.
        assert_eq!(
            s.api.lock().unwrap().node_patches,
            [label("cd-1", json!("true")), label("cd-1", Value::Null)]
        );
    }

    fn resource_claim(namespace: &str, uid: &str) -> ResourceClaim {
        let mut claim = ResourceClaim::default();
        claim.metadata.namespace = Some(namespace.into());
        claim.metadata.name = Some(format!("claim-{uid}"));
        claim.metadata.uid = Some(uid.into());
        claim
    }

    /// A channel claim whose ResourceClaim is gone is unprepared by the clean-up as the kubelet
    /// would have: its CDI spec goes and, with the domain's last channel on the node, the node
    /// label (so the domain's daemon leaves the node). Live claims stay.
    #[tokio::test]
    async fn stale_channel_claims_are_cleaned_up() {
        let s = setup(Duration::from_secs(5));
        s.api.lock().unwrap().ready.insert("cd-1".to_owned());
        let got = s
            .driver
            .prepare_resource_claims(vec![
                daemon_claim("d1", "cd-1"),
                channel_claim("c1", "team-a", "cd-1"),
            ])
            .await;
        assert!(got.values().all(Result::is_ok), "{got:?}");
        s.api.lock().unwrap().node_patches.clear();

        let reader = InMemoryClaimReader::new();
        reader.insert(resource_claim(DRIVER_NS, "d1"));
        let report = cleanup_stale_claims(&s.driver, &reader).await;
        assert_eq!(report.checked, 2);
        assert_eq!(
            report.unprepared,
            [StaleClaim {
                claim: CpRef {
                    uid: "c1".into(),
                    namespace: "team-a".into(),
                    name: "claim-c1".into(),
                },
                reason: StaleReason::NotFound,
            }]
        );
        assert!(
            report.failed.is_empty() && report.unknown.is_empty(),
            "{report:?}"
        );
        assert_eq!(
            s.api.lock().unwrap().node_patches,
            [label("cd-1", Value::Null)]
        );
        let spec_of = |uid: &str| s.cdi.join(Vendor::COMPUTE_DOMAIN.claim_spec_file_name(uid));
        assert!(!spec_of("c1").exists());
        assert!(spec_of("d1").exists());
        let left: Vec<String> = s
            .driver
            .checkpoint_state()
            .claims()
            .map(|(uid, _)| uid.to_owned())
            .collect();
        assert_eq!(left, ["d1"]);

        // A second pass finds nothing more; the kubelet's own unprepare still succeeds.
        assert!(
            cleanup_stale_claims(&s.driver, &reader)
                .await
                .unprepared
                .is_empty()
        );
        let got = s
            .driver
            .unprepare_resource_claims(vec![ClaimRef::new("team-a", "claim-c1", "c1")])
            .await;
        assert!(got["c1"].is_ok());
    }
}

//! DRA node-service client over the version chosen at registration.
//!
//! Each call is bounded by the kubelet's 45 s per-call timeout. A gRPC error
//! fails the whole call (the kubelet ignores the response and retries); a
//! per-claim error or a claim missing from the response map fails only that
//! claim, as in the kubelet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nvdra_kubelet_plugin::ClaimRef;
use nvdra_kubelet_plugin::proto::{dra_v1, dra_v1beta1};
use tonic::transport::Channel;

use crate::Error;
use crate::registry::{DraVersion, GET_INFO_TIMEOUT, RegisteredPlugin, call, connect};

/// One device of a prepared claim, as the plugin reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedDevice {
    /// The claim requests the device serves; empty means all of them.
    pub request_names: Vec<String>,
    /// The pool holding the device.
    pub pool: String,
    /// The device's name in the pool.
    pub device: String,
    /// Fully qualified CDI device IDs for the device.
    pub cdi_device_ids: Vec<String>,
}

/// The kubelet's `defaultClientCallTimeout`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(45);

/// One claim's outcome: its CDI device IDs (prepare) or `()` (unprepare), or
/// the plugin's error text.
pub type ClaimOutcome<T> = Result<T, String>;

#[derive(Clone)]
enum Client {
    V1(dra_v1::dra_plugin_client::DraPluginClient<Channel>),
    V1beta1(dra_v1beta1::dra_plugin_client::DraPluginClient<Channel>),
}

/// A connection to one registered plugin's DRA socket; clones share the
/// connection, so concurrent pods call the plugin concurrently.
#[derive(Clone)]
pub struct DraClient {
    endpoint: PathBuf,
    client: Client,
}

impl DraClient {
    /// Connects to `plugin.endpoint` (waiting at most 1 s, like the kubelet).
    pub async fn connect(plugin: &RegisteredPlugin) -> Result<Self, Error> {
        let channel = connect(&plugin.endpoint, GET_INFO_TIMEOUT).await?;
        let client = match plugin.version {
            DraVersion::V1 => Client::V1(dra_v1::dra_plugin_client::DraPluginClient::new(channel)),
            DraVersion::V1beta1 => Client::V1beta1(
                dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel),
            ),
        };
        Ok(Self {
            endpoint: plugin.endpoint.clone(),
            client,
        })
    }

    /// `NodePrepareResources`: per claim UID, the CDI device IDs of all its devices.
    pub async fn prepare(
        &mut self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, ClaimOutcome<Vec<String>>>, Error> {
        Ok(self
            .prepare_devices(claims)
            .await?
            .into_iter()
            .map(|(uid, outcome)| {
                let ids = outcome
                    .map(|devices| devices.into_iter().flat_map(|d| d.cdi_device_ids).collect());
                (uid, ids)
            })
            .collect())
    }

    /// `NodePrepareResources`: per claim UID, the devices the plugin prepared.
    pub async fn prepare_devices(
        &mut self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, ClaimOutcome<Vec<PreparedDevice>>>, Error> {
        const METHOD: &str = "NodePrepareResources";
        let mut answers: BTreeMap<String, (String, Vec<PreparedDevice>)> = match &mut self.client {
            Client::V1(c) => {
                let request = dra_v1::NodePrepareResourcesRequest {
                    claims: claims.iter().map(v1_claim).collect(),
                };
                call(
                    METHOD,
                    &self.endpoint,
                    CALL_TIMEOUT,
                    c.node_prepare_resources(request),
                )
                .await?
                .claims
                .into_iter()
                .map(|(uid, r)| {
                    let devices = r
                        .devices
                        .into_iter()
                        .map(|d| PreparedDevice {
                            request_names: d.request_names,
                            pool: d.pool_name,
                            device: d.device_name,
                            cdi_device_ids: d.cdi_device_ids,
                        })
                        .collect();
                    (uid, (r.error, devices))
                })
                .collect()
            }
            Client::V1beta1(c) => {
                let request = dra_v1beta1::NodePrepareResourcesRequest {
                    claims: claims.iter().map(v1beta1_claim).collect(),
                };
                call(
                    METHOD,
                    &self.endpoint,
                    CALL_TIMEOUT,
                    c.node_prepare_resources(request),
                )
                .await?
                .claims
                .into_iter()
                .map(|(uid, r)| {
                    let devices = r
                        .devices
                        .into_iter()
                        .map(|d| PreparedDevice {
                            request_names: d.request_names,
                            pool: d.pool_name,
                            device: d.device_name,
                            cdi_device_ids: d.cdi_device_ids,
                        })
                        .collect();
                    (uid, (r.error, devices))
                })
                .collect()
            }
        };
        Ok(claims
            .iter()
            .map(|claim| {
                let outcome = match answers.remove(&claim.uid) {
                    None => Err(missing(claim)),
                    Some((error, _)) if !error.is_empty() => Err(error),
                    Some((_, devices)) => Ok(devices),
                };
                (claim.uid.clone(), outcome)
            })
            .collect())
    }

    /// `NodeUnprepareResources`: per claim UID, success or the plugin's error.
    pub async fn unprepare(
        &mut self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, ClaimOutcome<()>>, Error> {
        const METHOD: &str = "NodeUnprepareResources";
        let mut answers: BTreeMap<String, String> = match &mut self.client {
            Client::V1(c) => {
                let request = dra_v1::NodeUnprepareResourcesRequest {
                    claims: claims.iter().map(v1_claim).collect(),
                };
                call(
                    METHOD,
                    &self.endpoint,
                    CALL_TIMEOUT,
                    c.node_unprepare_resources(request),
                )
                .await?
                .claims
                .into_iter()
                .map(|(uid, r)| (uid, r.error))
                .collect()
            }
            Client::V1beta1(c) => {
                let request = dra_v1beta1::NodeUnprepareResourcesRequest {
                    claims: claims.iter().map(v1beta1_claim).collect(),
                };
                call(
                    METHOD,
                    &self.endpoint,
                    CALL_TIMEOUT,
                    c.node_unprepare_resources(request),
                )
                .await?
                .claims
                .into_iter()
                .map(|(uid, r)| (uid, r.error))
                .collect()
            }
        };
        Ok(claims
            .iter()
            .map(|claim| {
                let outcome = match answers.remove(&claim.uid) {
                    None => Err(missing(claim)),
                    Some(error) if !error.is_empty() => Err(error),
                    Some(_) => Ok(()),
                };
                (claim.uid.clone(), outcome)
            })
            .collect())
    }
}

fn missing(claim: &ClaimRef) -> String {
    format!(
        "plugin returned no result for claim {}/{} ({})",
        claim.namespace, claim.name, claim.uid
    )
}

fn v1_claim(claim: &ClaimRef) -> dra_v1::Claim {
    dra_v1::Claim {
        namespace: claim.namespace.clone(),
        uid: claim.uid.clone(),
        name: claim.name.clone(),
    }
}

fn v1beta1_claim(claim: &ClaimRef) -> dra_v1beta1::Claim {
    dra_v1beta1::Claim {
        namespace: claim.namespace.clone(),
        uid: claim.uid.clone(),
        name: claim.name.clone(),
    }
}

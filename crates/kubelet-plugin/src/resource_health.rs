//! The kubelet's DRA resource-health stream (`v1alpha1.DRAResourceHealth`,
//! KEP-4680): the kubelet calls `NodeWatchResources` on the DRA socket and
//! reads the driver's device health from the stream, which it shows in the
//! status of the pods using those devices (`allocatedResourcesStatus`).
//!
//! A driver offers it with [`crate::KubeletPluginBuilder::device_health`],
//! handing over a [`HealthFeed`]: a watch channel holding the complete list
//! of its devices' health. The plugin then serves the service on the DRA
//! socket and advertises it at registration. Each stream sends the current
//! list at once and the whole list again after every change, as the
//! protocol wants (every response is complete for the driver).
//!
//! Messages are cut to the protocol's 1024 characters (1021 + `...`).

use std::pin::Pin;

use futures::Stream;
use tokio::sync::watch;

use crate::proto::health_v1alpha1::dra_resource_health_server::DraResourceHealth;
use crate::proto::health_v1alpha1::{
    DeviceHealth as WireHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesRequest,
    NodeWatchResourcesResponse,
};

/// The registration string of the service.
pub const SERVICE: &str = "v1alpha1.DRAResourceHealth";
/// The longest message the kubelet keeps.
const MAX_MESSAGE: usize = 1024;

/// What a driver says of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Usable.
    Healthy,
    /// Failing.
    Unhealthy,
    /// Not known.
    Unknown,
}

/// One device's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// The pool (normally the node's name).
    pub pool: String,
    /// The device's name in the pool.
    pub device: String,
    /// Its health.
    pub health: Health,
    /// Why, for people (shown in the pod's status).
    pub message: String,
    /// When this was last determined, seconds since the epoch.
    pub last_updated: i64,
}

/// The complete, current list of a driver's device health.
pub type HealthFeed = watch::Receiver<Vec<DeviceHealth>>;

fn to_wire(devices: &[DeviceHealth]) -> NodeWatchResourcesResponse {
    NodeWatchResourcesResponse {
        devices: devices
            .iter()
            .map(|d| WireHealth {
                device: Some(DeviceIdentifier {
                    pool_name: d.pool.clone(),
                    device_name: d.device.clone(),
                }),
                health: match d.health {
                    Health::Healthy => HealthStatus::Healthy,
                    Health::Unhealthy => HealthStatus::Unhealthy,
                    Health::Unknown => HealthStatus::Unknown,
                }
                .into(),
                last_updated_time: d.last_updated,
                // The kubelet's default.
                health_check_timeout_seconds: 0,
                message: truncate(&d.message),
            })
            .collect(),
    }
}

fn truncate(message: &str) -> String {
    if message.chars().count() <= MAX_MESSAGE {
        return message.to_owned();
    }
    let kept: String = message.chars().take(MAX_MESSAGE - 3).collect();
    format!("{kept}...")
}

/// The service over a feed.
#[derive(Debug)]
pub(crate) struct HealthService {
    feed: HealthFeed,
}

impl HealthService {
    pub(crate) fn new(feed: HealthFeed) -> Self {
        Self { feed }
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<NodeWatchResourcesResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = ResponseStream;

    async fn node_watch_resources(
        &self,
        _request: tonic::Request<NodeWatchResourcesRequest>,
    ) -> Result<tonic::Response<Self::NodeWatchResourcesStream>, tonic::Status> {
        let mut feed = self.feed.clone();
        feed.mark_changed();
        let stream = futures::stream::unfold(feed, |mut feed| async move {
            // Ends the stream when the driver drops its sender (shutdown).
            feed.changed().await.ok()?;
            let response = to_wire(&feed.borrow_and_update());
            Some((Ok(response), feed))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_as_the_kubelet_cuts_them() {
        assert_eq!(truncate("short"), "short");
        let long = "x".repeat(2000);
        let cut = truncate(&long);
        assert_eq!(cut.len(), 1024);
        assert!(cut.ends_with("xxx..."));
    }

    #[test]
    fn devices_map_to_the_wire() {
        let wire = to_wire(&[DeviceHealth {
            pool: "node-a".into(),
            device: "gpu-0".into(),
            health: Health::Unhealthy,
            message: "xid 79".into(),
            last_updated: 7,
        }]);
        let device = &wire.devices[0];
        assert_eq!(device.health, HealthStatus::Unhealthy as i32);
        assert_eq!(device.device.as_ref().unwrap().device_name, "gpu-0");
        assert_eq!(device.last_updated_time, 7);
    }
}

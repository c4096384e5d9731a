//! The devices a node offers under `compute-domain.nvidia.com`: `channel-0` and `daemon-0`,
//! each with upstream's attributes (`type`, `id`) and, beyond upstream, `allowMultipleAllocations`
//! so several ComputeDomains can share a node (each claim gets its own share; on API servers
//! without DRAConsumableCapacity the field is dropped and one domain per node remains).
//!
//! Pure; the set never changes while the agent runs (the channel count only decides which
//! physical channels Prepare hands out, not what is published).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::resource::v1::{Device, DeviceAttribute};
use nvdra_api::names::{attributes, device_types};

/// Name of the published channel device.
pub const CHANNEL_DEVICE: &str = "channel-0";
/// Name of the published daemon device.
pub const DAEMON_DEVICE: &str = "daemon-0";

/// What an allocated device of this driver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CdDeviceType {
    /// An IMEX channel (`channel`).
    Channel,
    /// The IMEX daemon's device (`daemon`).
    Daemon,
}

impl CdDeviceType {
    /// The `type` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Channel => device_types::CHANNEL,
            Self::Daemon => device_types::DAEMON,
        }
    }

    /// The type of a published device name; `None` for a name this node does not publish.
    pub fn of_device(name: &str) -> Option<Self> {
        match name {
            CHANNEL_DEVICE => Some(Self::Channel),
            DAEMON_DEVICE => Some(Self::Daemon),
            _ => None,
        }
    }
}

impl fmt::Display for CdDeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The devices to publish, sorted by name.
pub fn node_devices() -> Vec<Device> {
    [
        (CHANNEL_DEVICE, CdDeviceType::Channel),
        (DAEMON_DEVICE, CdDeviceType::Daemon),
    ]
    .into_iter()
    .map(|(name, device_type)| Device {
        name: name.to_owned(),
        attributes: Some(BTreeMap::from([
            (
                attributes::TYPE.to_owned(),
                DeviceAttribute {
                    string: Some(device_type.as_str().to_owned()),
                    ..DeviceAttribute::default()
                },
            ),
            (
                attributes::ID.to_owned(),
                DeviceAttribute {
                    int: Some(0),
                    ..DeviceAttribute::default()
                },
            ),
        ])),
        allow_multiple_allocations: Some(true),
        ..Device::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;
    use serde_json::json;

    use super::*;

    #[test]
    fn published_devices_on_the_wire() {
        assert_eq!(
            serde_json::to_value(node_devices()).unwrap(),
            json!([
                {
                    "name": "channel-0",
                    "attributes": {"id": {"int": 0}, "type": {"string": "channel"}},
                    "allowMultipleAllocations": true
                },
                {
                    "name": "daemon-0",
                    "attributes": {"id": {"int": 0}, "type": {"string": "daemon"}},
                    "allowMultipleAllocations": true
                }
            ])
        );
    }

    #[test]
    fn device_types_by_name() {
        let cases = [
            ("channel-0", Some(CdDeviceType::Channel)),
            ("daemon-0", Some(CdDeviceType::Daemon)),
            ("channel-1", None),
            ("gpu-0", None),
        ];
        for (name, want) in cases {
            assert_eq!(CdDeviceType::of_device(name), want, "{name}");
        }
    }
}

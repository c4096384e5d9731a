//! Pod events, written as core/v1 Events from source `kubelet` on this node.
//!
//! The same (pod, reason, message) is recorded at most once per
//! [`REPEAT_AFTER`], so a retry loop does not flood the API server; a new
//! message is recorded at once. Failures to record are logged, never fatal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;

use crate::Error;

/// Minimum time between two identical events for one pod.
pub const REPEAT_AFTER: Duration = Duration::from_secs(60);

/// Reason of a failed NodePrepareResources (the kubelet's).
pub const FAILED_PREPARE: &str = "FailedPrepareDynamicResources";
/// Reason of a failed NodeUnprepareResources.
pub const FAILED_UNPREPARE: &str = "FailedUnprepareDynamicResources";

/// Records events for pods on one node.
pub struct Recorder {
    client: kube::Client,
    node: String,
    sent: Dedupe,
}

/// Remembers which (pod UID, reason, message) went out when.
#[derive(Debug, Default)]
pub struct Dedupe(Mutex<HashMap<(String, String, String), Instant>>);

impl Dedupe {
    /// Whether an event with `key` may go out at `now`; if so, remembers it.
    pub fn due(&self, key: (String, String, String), now: Instant) -> bool {
        let mut sent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sent.retain(|_, at| now.saturating_duration_since(*at) < REPEAT_AFTER);
        if sent.contains_key(&key) {
            return false;
        }
        sent.insert(key, now);
        true
    }
}

/// The Event the kubelet of `node` would write about `pod`.
pub fn event(
    pod: &Pod,
    node: &str,
    type_: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Event {
    let m = &pod.metadata;
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", m.name.as_deref().unwrap_or("pod"))),
            namespace: m.namespace.clone(),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            ..Default::default()
        },
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Default::default()
    }
}

impl Recorder {
    /// A recorder writing as `node`'s kubelet.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_owned(),
            sent: Dedupe::default(),
        }
    }

    /// Records a Warning about `pod` unless the same one went out recently.
    pub async fn warn(&self, pod: &Pod, reason: &str, message: &str) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !self
            .sent
            .due((uid, reason.to_owned(), message.to_owned()), Instant::now())
        {
            return;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        tracing::warn!(pod = %format!("{ns}/{name}"), reason, message, "event");
        let ev = event(
            pod,
            &self.node,
            "Warning",
            reason,
            message,
            Timestamp::now(),
        );
        let api: kube::Api<Event> = kube::Api::namespaced(self.client.clone(), &ns);
        if let Err(source) = api.create(&PostParams::default(), &ev).await {
            let err = Error::CreateEvent {
                namespace: ns,
                name,
                source,
            };
            tracing::warn!(error = %crate::plugins::error_chain(&err), "record event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn identical_events_go_out_once_a_minute() {
        let d = Dedupe::default();
        let key = |m: &str| ("u".to_owned(), FAILED_PREPARE.to_owned(), m.to_owned());
        let t0 = Instant::now();
        let cases = [
            (key("a"), Duration::ZERO, true),
            (key("a"), Duration::from_secs(59), false),
            (key("b"), Duration::from_secs(59), true),
            (key("a"), Duration::from_secs(60), true),
            (key("b"), Duration::from_secs(100), false),
        ];
        for (k, at, want) in cases {
            assert_eq!(d.due(k.clone(), t0 + at), want, "{k:?} at {at:?}");
        }
    }

    #[test]
    fn event_names_the_pod_and_the_kubelet_source() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("p".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let now: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let got = serde_json::to_value(event(
            &pod,
            "node-a",
            "Warning",
            FAILED_PREPARE,
            "boom",
            now,
        ))
        .unwrap();
        assert_eq!(
            got,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": "p.", "namespace": "ns"},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": "ns", "name": "p", "uid": "u"},
                "type": "Warning",
                "reason": "FailedPrepareDynamicResources",
                "message": "boom",
                "source": {"component": "kubelet", "host": "node-a"},
                "reportingComponent": "kubelet",
                "reportingInstance": "node-a",
                "firstTimestamp": "2025-01-01T00:00:00Z",
                "lastTimestamp": "2025-01-01T00:00:00Z",
                "count": 1,
            })
        );
    }
}

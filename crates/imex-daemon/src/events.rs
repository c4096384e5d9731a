//! Kubernetes Events the daemon reports on its own pod.
//!
//! An operator learns from `kubectl describe pod` (or the ComputeDomain's pods' events) that
//! `nvidia-imex` died and was restarted: between two probe periods a restart is otherwise
//! invisible, yet it drops the node's IMEX connections. Publishing is best effort: a failure
//! is logged and never stops the daemon, which has already restarted the process.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use nvdra_api::names::reasons;

/// The events this daemon reports on its pod.
#[derive(Clone)]
pub struct PodEvents {
    recorder: Recorder,
    pod: ObjectReference,
}

impl PodEvents {
    /// Events on pod `namespace/name` (uid `uid`), reported by `nvdra-imex-daemon` from `node`.
    pub fn new(client: kube::Client, namespace: &str, name: &str, uid: &str, node: &str) -> Self {
        let reporter = Reporter {
            controller: "nvdra-imex-daemon".to_owned(),
            instance: Some(node.to_owned()).filter(|n| !n.is_empty()),
        };
        let pod = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            uid: Some(uid.to_owned()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        };
        Self {
            recorder: Recorder::new(client, reporter),
            pod,
        }
    }

    /// `nvidia-imex` ended (`how`: its exit status or why it could not be waited for) and is
    /// restarted for the `restart`-th time.
    pub async fn imex_exited(&self, how: &str, restart: u32) {
        let event = imex_exited_event(how, restart);
        if let Err(err) = self.recorder.publish(&event, &self.pod).await {
            tracing::warn!(reason = %event.reason, error = %err, "could not publish pod event");
        }
    }
}

/// The Warning for an `nvidia-imex` restart.
pub fn imex_exited_event(how: &str, restart: u32) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reasons::IMEX_RESTARTED.to_owned(),
        note: Some(format!(
            "nvidia-imex {how}; restarting it (restart {restart} since this daemon started)"
        )),
        action: "RestartIMEX".to_owned(),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_event_says_how_and_how_often() {
        let event = imex_exited_event("exited with signal: 9 (SIGKILL)", 2);
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.reason, "IMEXRestarted");
        assert_eq!(
            event.note.as_deref(),
            Some(
                "nvidia-imex exited with signal: 9 (SIGKILL); restarting it (restart 2 since this \
                 daemon started)"
            )
        );
    }
}

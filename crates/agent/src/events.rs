//! Kubernetes Events the agent reports on its Node.
//!
//! Events are how an operator learns, with `kubectl describe node`, about
//! something the agent recovered from by itself (a corrupt checkpoint set
//! aside, claims discarded after a reboot). Publishing is best effort: a
//! failure to publish is logged and never stops the agent, because the
//! recovery already happened and the agent must keep serving.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use nvdra_api::names::reasons;

use crate::checkpoint::LoadOutcome;

/// The events this agent reports on its Node.
#[derive(Clone)]
pub struct NodeEvents {
    recorder: Recorder,
    node: ObjectReference,
}

impl NodeEvents {
    /// Events on Node `node_name` (with `node_uid` when known, so the event
    /// is tied to this incarnation of the Node), reported as `controller`
    /// from pod/host `instance`.
    pub fn new(
        client: kube::Client,
        controller: &str,
        instance: Option<String>,
        node_name: &str,
        node_uid: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: controller.to_owned(),
            instance,
        };
        let node = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node_name.to_owned()),
            uid: node_uid,
            ..ObjectReference::default()
        };
        Self {
            recorder: Recorder::new(client, reporter),
            node,
        }
    }

    /// Reports what loading the checkpoint found, if it deserves an Event.
    pub async fn checkpoint_loaded(&self, outcome: &LoadOutcome) {
        if let Some(event) = checkpoint_event(outcome) {
            self.publish(event).await;
        }
    }

    async fn publish(&self, event: Event) {
        let reason = event.reason.clone();
        if let Err(err) = self.recorder.publish(&event, &self.node).await {
            tracing::warn!(%reason, error = %err, "could not publish node event");
        }
    }
}

/// The Event for a checkpoint load outcome: a warning for a corrupt file, a
/// normal event for claims discarded after a reboot, nothing otherwise.
pub fn checkpoint_event(outcome: &LoadOutcome) -> Option<Event> {
    match outcome {
        LoadOutcome::Corrupt { aside_path, reason } => Some(Event {
            type_: EventType::Warning,
            reason: reasons::CHECKPOINT_CORRUPTED.to_owned(),
            note: Some(truncate_note(format!(
                "the gpu.nvidia.com checkpoint was unreadable ({reason}); it was moved to {} \
                 and the agent started from an empty state",
                aside_path.display()
            ))),
            action: "LoadCheckpoint".to_owned(),
            secondary: None,
        }),
        LoadOutcome::BootIdChanged { discarded, .. } if !discarded.is_empty() => Some(Event {
            type_: EventType::Normal,
            reason: "CheckpointDiscardedAfterReboot".to_owned(),
            note: Some(truncate_note(format!(
                "the node rebooted since the gpu.nvidia.com checkpoint was written; {} prepared \
                 claim(s) were dropped and will be prepared again",
                discarded.len()
            ))),
            action: "LoadCheckpoint".to_owned(),
            secondary: None,
        }),
        _ => None,
    }
}

/// Events notes are limited to 1 kB.
fn truncate_note(mut note: String) -> String {
    const MAX: usize = 1000;
    if note.len() > MAX {
        let mut cut = MAX - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn corrupt_checkpoint_is_a_warning_naming_the_aside_file() {
        let event = checkpoint_event(&LoadOutcome::Corrupt {
            aside_path: PathBuf::from("/plugins/gpu/checkpoint.json.corrupt-1700000000"),
            reason: "checksum mismatch".to_owned(),
        })
        .unwrap();
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.reason, "CheckpointCorrupted");
        assert_eq!(
            event.note.as_deref(),
            Some(
                "the gpu.nvidia.com checkpoint was unreadable (checksum mismatch); it was moved \
                 to /plugins/gpu/checkpoint.json.corrupt-1700000000 and the agent started from \
                 an empty state"
            )
        );
    }

    #[test]
    fn quiet_outcomes_make_no_event() {
        assert!(checkpoint_event(&LoadOutcome::Missing).is_none());
    }

    #[test]
    fn long_notes_are_cut_to_the_api_limit() {
        let note = truncate_note("é".repeat(800));
        assert!(note.len() <= 1000, "{}", note.len());
        assert!(note.ends_with("..."));
    }
}

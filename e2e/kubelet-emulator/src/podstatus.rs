//! Pod status as the kubelet would write it, built from container views.
//!
//! [`build`] is pure: given the pod as last seen and the emulator's view of
//! each container it returns the full status to send. Condition
//! `lastTransitionTime`s and `startTime` are carried over from the current
//! status when unchanged, and condition types the emulator does not own
//! (e.g. `DisruptionTarget`) are kept, so re-building the status of a pod
//! that did not change yields exactly its current status and [`patch`]
//! returns `None`: an emulator restart does not rewrite running pods.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The pod and host IP of every pod without `--pod-cidr` (all run on the loopback).
pub const POD_IP: &str = crate::ipam::LOOPBACK;

/// The condition types the emulator owns, in the kubelet's order.
const OWNED: [&str; 5] = [
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
];

/// The emulator's view of one container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    /// Container name.
    pub name: String,
    /// Image as written in the spec.
    pub image: String,
    /// Readiness.
    pub ready: bool,
    /// Whether the running container passed its startup probe (at once
    /// without one); `containerStatuses[].started`.
    pub started: bool,
    /// Restarts so far.
    pub restart_count: i32,
    /// Current state.
    pub state: RunState,
    /// The previous run, once restarted.
    pub last_terminated: Option<Terminated>,
}

/// A container's state.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// Running since.
    Running(Timestamp),
    /// Not running, with why.
    Waiting {
        /// e.g. `ContainerCreating`, `CrashLoopBackOff`.
        reason: String,
        /// Details, if any.
        message: Option<String>,
    },
    /// Ended for good.
    Terminated(Terminated),
}

/// One ended run of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Terminated {
    /// Exit code.
    pub exit_code: i32,
    /// `Completed`, `Error`, `StartError`.
    pub reason: String,
    /// Details, if any.
    pub message: Option<String>,
    /// Start.
    pub started_at: Timestamp,
    /// End.
    pub finished_at: Timestamp,
}

/// Why a pod failed before any container ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFailure {
    /// Machine-readable reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

/// The pod phase the containers imply: `Succeeded`/`Failed` once every
/// container has ended for good, `Running` otherwise.
pub fn phase(containers: &[ContainerView]) -> &'static str {
    let ended: Option<Vec<i32>> = containers
        .iter()
        .map(|c| match &c.state {
            RunState::Terminated(t) => Some(t.exit_code),
            _ => None,
        })
        .collect();
    match ended {
        Some(codes) if !codes.is_empty() && codes.iter().all(|c| *c == 0) => "Succeeded",
        Some(codes) if !codes.is_empty() => "Failed",
        _ => "Running",
    }
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

/// The full status to write for `pod`, which has the addresses `ips`.
pub fn build(
    pod: &Pod,
    containers: &[ContainerView],
    failure: Option<&PodFailure>,
    ips: &crate::ipam::Addresses,
    now: Timestamp,
) -> PodStatus {
    let current = pod.status.as_ref();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let phase = if failure.is_some() {
        "Failed"
    } else {
        phase(containers)
    };
    let terminal = phase != "Running";
    let unready: Vec<&str> = containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let all_ready = unready.is_empty() && !terminal;
    let (not_ready_reason, not_ready_message) = if terminal {
        ("PodCompleted", None)
    } else {
        (
            "ContainersNotReady",
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    let existing = |ty: &str| {
        current
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == ty))
    };
    let condition = |ty: &str, ok: bool| {
        let status = if ok { "True" } else { "False" };
        let since = existing(ty)
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| time(now));
        let (reason, message) = match (ok, ty) {
            (false, "Ready" | "ContainersReady") => {
                (Some(not_ready_reason.to_owned()), not_ready_message.clone())
            }
            _ => (None, None),
        };
        PodCondition {
            type_: ty.to_owned(),
            status: status.to_owned(),
            last_transition_time: Some(since),
            reason,
            message,
            ..Default::default()
        }
    };
    let mut conditions: Vec<PodCondition> = OWNED
        .iter()
        .map(|ty| match *ty {
            "Ready" | "ContainersReady" => condition(ty, all_ready),
            "PodReadyToStartContainers" => condition(ty, !terminal),
            _ => condition(ty, true),
        })
        .collect();
    conditions.extend(
        current
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !OWNED.contains(&c.type_.as_str())),
    );
    let statuses = containers
        .iter()
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone(),
            image_id: c.image.clone(),
            container_id: Some(format!("emulator://{uid}/{}", c.name)),
            ready: c.ready,
            started: Some(c.started && matches!(c.state, RunState::Running(_))),
            restart_count: c.restart_count,
            state: Some(state(&c.state)),
            last_state: c
                .last_terminated
                .as_ref()
                .map(|t| state(&RunState::Terminated(t.clone()))),
            ..Default::default()
        })
        .collect();
    PodStatus {
        phase: Some(phase.to_owned()),
        reason: failure.map(|f| f.reason.clone()),
        message: failure.map(|f| f.message.clone()),
        conditions: Some(conditions),
        container_statuses: Some(statuses),
        host_ip: Some(ips.host.clone()),
        host_ips: Some(vec![HostIP {
            ip: ips.host.clone(),
        }]),
        pod_ip: Some(ips.pod.clone()),
        pod_ips: Some(vec![PodIP {
            ip: ips.pod.clone(),
        }]),
        start_time: Some(
            current
                .and_then(|s| s.start_time.clone())
                .unwrap_or_else(|| time(now)),
        ),
        ..Default::default()
    }
}

fn state(s: &RunState) -> ContainerState {
    match s {
        RunState::Running(at) => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*at)),
            }),
            ..Default::default()
        },
        RunState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        RunState::Terminated(t) => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.exit_code,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: Some(time(t.started_at)),
                finished_at: Some(time(t.finished_at)),
                container_id: None,
                signal: None,
            }),
            ..Default::default()
        },
    }
}

/// The merge patch that turns `pod`'s status into `desired`, or `None` when
/// every field the emulator writes already has the desired value.
pub fn patch(pod: &Pod, desired: &PodStatus) -> Option<serde_json::Value> {
    let want = serde_json::to_value(desired).ok()?;
    // The API server writes `lastProbeTime: null` and `lastState: {}`; the
    // emulator leaves them out. Both mean "unset".
    let have = pod
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .map_or(serde_json::Value::Null, prune);
    let want_pruned = prune(want.clone());
    let serde_json::Value::Object(want_fields) = &want_pruned else {
        return None;
    };
    let changed = want_fields.iter().any(|(k, v)| have.get(k) != Some(v))
        // reason/message set by an earlier failure must be cleared.
        || (have.get("reason").is_some() && desired.reason.is_none())
        || (have.get("message").is_some() && desired.message.is_none());
    if !changed {
        return None;
    }
    let mut status = want;
    if let serde_json::Value::Object(fields) = &mut status {
        for k in ["reason", "message"] {
            fields.entry(k).or_insert(serde_json::Value::Null);
        }
    }
    Some(serde_json::json!({ "status": status }))
}

/// `v` without null members and members that are empty objects, recursively.
fn prune(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| {
                    !v.is_null() && !v.as_object().is_some_and(serde_json::Map::is_empty)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(prune).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn view(name: &str, ready: bool, state: RunState) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: "img:v1".into(),
            ready,
            started: true,
            restart_count: 0,
            state,
            last_terminated: None,
        }
    }

    fn ended(code: i32) -> RunState {
        RunState::Terminated(Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: ts("2025-01-01T00:00:00Z"),
            finished_at: ts("2025-01-01T00:00:01Z"),
        })
    }

    #[test]
    fn phase_follows_container_ends() {
        let running = RunState::Running(ts("2025-01-01T00:00:00Z"));
        let waiting = RunState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: None,
        };
        let cases: &[(&[RunState], &str)] = &[
            (&[], "Running"),
            (std::slice::from_ref(&running), "Running"),
            (&[ended(0), running.clone()], "Running"),
            (&[ended(1), waiting], "Running"),
            (&[ended(0), ended(0)], "Succeeded"),
            (&[ended(0), ended(2)], "Failed"),
        ];
        for (states, want) in cases {
            let views: Vec<_> = states.iter().map(|s| view("c", false, s.clone())).collect();
            assert_eq!(phase(&views), *want, "{states:?}");
        }
    }

    fn pod(status: Option<PodStatus>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: None,
            status,
        }
    }

    #[test]
    fn build_writes_running_status_and_is_stable_on_rebuild() {
        let now = ts("2025-01-01T00:00:05Z");
        let mut p = pod(Some(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![
                PodCondition {
                    type_: "PodScheduled".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(ts("2025-01-01T00:00:00Z"))),
                    ..Default::default()
                },
                PodCondition {
                    type_: "DisruptionTarget".into(),
                    status: "False".into(),
                    ..Default::default()
                },
            ]),
            qos_class: Some("BestEffort".into()),
            ..Default::default()
        }));
        let views = [
            view("a", true, RunState::Running(ts("2025-01-01T00:00:04Z"))),
            view("b", false, RunState::Running(ts("2025-01-01T00:00:04Z"))),
        ];
        let status = build(&p, &views, None, &crate::ipam::Addresses::loopback(), now);
        let got = serde_json::to_value(&status).unwrap();
        let want = serde_json::json!({
            "phase": "Running",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"},
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "2025-01-01T00:00:05Z",
                 "reason": "ContainersNotReady", "message": "containers with unready status: [b]"},
                {"type": "ContainersReady", "status": "False", "lastTransitionTime": "2025-01-01T00:00:05Z",
                 "reason": "ContainersNotReady", "message": "containers with unready status: [b]"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "DisruptionTarget", "status": "False"},
            ],
            "containerStatuses": [
                {"name": "a", "image": "img:v1", "imageID": "img:v1", "containerID": "emulator://u1/a",
                 "ready": true, "started": true, "restartCount": 0,
                 "state": {"running": {"startedAt": "2025-01-01T00:00:04Z"}}},
                {"name": "b", "image": "img:v1", "imageID": "img:v1", "containerID": "emulator://u1/b",
                 "ready": false, "started": true, "restartCount": 0,
                 "state": {"running": {"startedAt": "2025-01-01T00:00:04Z"}}},
            ],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": "2025-01-01T00:00:05Z",
        });
        assert_eq!(got, want);
        let first = patch(&p, &status).unwrap();
        assert_eq!(first["status"]["reason"], serde_json::Value::Null);
        assert_eq!(first["status"]["phase"], "Running");

        // Once written, the same views a minute later change nothing.
        // As the API server returns it: explicit nulls and empty lastState.
        let mut written = serde_json::to_value(&status).unwrap();
        written["qosClass"] = "BestEffort".into();
        for c in written["conditions"].as_array_mut().unwrap() {
            c["lastProbeTime"] = serde_json::Value::Null;
        }
        written["containerStatuses"][0]["lastState"] = serde_json::json!({});
        let written: PodStatus = serde_json::from_value(written).unwrap();
        p.status = Some(written);
        let again = build(
            &p,
            &views,
            None,
            &crate::ipam::Addresses::loopback(),
            ts("2025-01-01T00:01:05Z"),
        );
        assert_eq!(patch(&p, &again), None);

        // b turns ready: only the readiness fields change, with new transition times.
        let ready = [
            views[0].clone(),
            ContainerView {
                ready: true,
                ..views[1].clone()
            },
        ];
        let later = ts("2025-01-01T00:02:00Z");
        let status = build(&p, &ready, None, &crate::ipam::Addresses::loopback(), later);
        let conditions = status.conditions.clone().unwrap();
        assert_eq!(
            conditions
                .iter()
                .map(|c| (
                    c.type_.as_str(),
                    c.status.as_str(),
                    c.last_transition_time.clone().map(|t| t.0)
                ))
                .collect::<Vec<_>>(),
            vec![
                ("PodReadyToStartContainers", "True", Some(now)),
                ("Initialized", "True", Some(now)),
                ("Ready", "True", Some(later)),
                ("ContainersReady", "True", Some(later)),
                ("PodScheduled", "True", Some(ts("2025-01-01T00:00:00Z"))),
                ("DisruptionTarget", "False", None),
            ]
        );
        assert!(patch(&p, &status).is_some());

        // With a pod network the pod shows its own address and the node's.
        let ips = crate::ipam::Addresses {
            host: "127.1.3.1".into(),
            pod: "127.1.3.2".into(),
        };
        let status = serde_json::to_value(build(&p, &ready, None, &ips, later)).unwrap();
        assert_eq!(
            [
                &status["hostIP"],
                &status["hostIPs"],
                &status["podIP"],
                &status["podIPs"]
            ],
            [
                &serde_json::json!("127.1.3.1"),
                &serde_json::json!([{"ip": "127.1.3.1"}]),
                &serde_json::json!("127.1.3.2"),
                &serde_json::json!([{"ip": "127.1.3.2"}]),
            ]
        );
    }

    #[test]
    fn failure_and_completion_make_the_pod_terminal() {
        let now = ts("2025-01-01T00:00:05Z");
        let failure = PodFailure {
            reason: "CreateContainerConfigError".into(),
            message: "container c: env T: unsupported env source secretKeyRef".into(),
        };
        let views = [view(
            "c",
            false,
            RunState::Waiting {
                reason: "CreateContainerConfigError".into(),
                message: Some(failure.message.clone()),
            },
        )];
        let status = build(
            &pod(None),
            &views,
            Some(&failure),
            &crate::ipam::Addresses::loopback(),
            now,
        );
        assert_eq!(
            (
                status.phase.as_deref(),
                status.reason.as_deref(),
                status.message.as_deref()
            ),
            (
                Some("Failed"),
                Some("CreateContainerConfigError"),
                Some(failure.message.as_str())
            )
        );
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("PodCompleted"))
        );

        let done = build(
            &pod(None),
            &[view("c", false, ended(0))],
            None,
            &crate::ipam::Addresses::loopback(),
            now,
        );
        assert_eq!(done.phase.as_deref(), Some("Succeeded"));
        assert_eq!(
            serde_json::to_value(&done.container_statuses.unwrap()[0].state).unwrap(),
            serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed",
                "startedAt": "2025-01-01T00:00:00Z", "finishedAt": "2025-01-01T00:00:01Z"}})
        );
    }
}

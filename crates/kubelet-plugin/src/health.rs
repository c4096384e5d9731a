//! Liveness and readiness over HTTP (`/livez`, `/readyz`).
//!
//! [`Readiness`] is a registry of named checks that any part of the agent can
//! add to and update: the plugin registers `registration` (ready once the
//! kubelet confirms registration); the ResourceSlice publisher and device
//! health monitors add their own. [`Liveness`] is set while the gRPC servers
//! run.
//!
//! Endpoints:
//! - `GET /livez`: 200 `ok` while the servers run, else 503 `not running`.
//! - `GET /readyz`: 200 `ok` when live and every check is ready; else 503
//!   with one line per failing check, `<name>: <reason>`, in name order.
//!
//! Invariants: a newly registered check starts not ready, so readiness is
//! never claimed before a component reported. Checks are updated under a
//! short synchronous lock that is never held across an await.
//!
//! Failure modes: binding the address fails plugin start
//! ([`Error::BindHealth`]); the server failing later ends
//! [`crate::KubeletPlugin::run`] ([`Error::ServeHealth`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::error::Error;

/// Whether the plugin's servers are running. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Liveness(Arc<AtomicBool>);

impl Liveness {
    /// Records whether the servers run.
    pub fn set(&self, alive: bool) {
        self.0.store(alive, Ordering::SeqCst);
    }

    /// Whether the servers run.
    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

type Checks = BTreeMap<String, Result<(), String>>;

/// A registry of named readiness checks. Cheap to clone; clones share state.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Checks>>,
}

/// The handle one component uses to report its readiness.
#[derive(Debug, Clone)]
pub struct ReadinessCheck {
    name: String,
    checks: Arc<Mutex<Checks>>,
}

impl Readiness {
    /// An empty registry (ready, as there is nothing to wait for).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check named `name`, initially not ready with `initial_reason`.
    /// Registering an existing name resets that check.
    pub fn register(
        &self,
        name: impl Into<String>,
        initial_reason: impl Into<String>,
    ) -> ReadinessCheck {
        let name = name.into();
        lock(&self.checks).insert(name.clone(), Err(initial_reason.into()));
        ReadinessCheck {
            name,
            checks: Arc::clone(&self.checks),
        }
    }

    /// `Ok` when every check is ready, else the failing checks as
    /// `(name, reason)` in name order.
    pub fn status(&self) -> Result<(), Vec<(String, String)>> {
        let failing: Vec<_> = lock(&self.checks)
            .iter()
            .filter_map(|(name, state)| {
                state
                    .as_ref()
                    .err()
                    .map(|reason| (name.clone(), reason.clone()))
            })
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }
}

impl ReadinessCheck {
    /// The check's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks the check ready.
    pub fn set_ready(&self) {
        lock(&self.checks).insert(self.name.clone(), Ok(()));
    }

    /// Marks the check not ready, with a short human-readable reason.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        lock(&self.checks).insert(self.name.clone(), Err(reason.into()));
    }
}

fn lock(checks: &Mutex<Checks>) -> MutexGuard<'_, Checks> {
    // Every critical section is one map operation, so a panic elsewhere
    // cannot leave the map half-updated.
    checks.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the HTTP endpoints report on.
#[derive(Debug, Clone, Default)]
pub struct HealthState {
    /// Set while the servers run.
    pub liveness: Liveness,
    /// Named readiness checks.
    pub readiness: Readiness,
}

/// The `/livez` + `/readyz` router, for embedding into another server.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn livez(State(state): State<HealthState>) -> (StatusCode, String) {
    if state.liveness.is_alive() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not running\n".to_owned())
    }
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    if !state.liveness.is_alive() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not running\n".to_owned());
    }
    match state.readiness.status() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(failing) => {
            let body = failing
                .iter()
                .map(|(name, reason)| format!("{name}: {reason}\n"))
                .collect();
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HealthState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::ServeHealth { source })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use pretty_assertions::assert_eq;
    use tower::ServiceExt;

    use super::*;

    async fn probe(state: &HealthState, path: &str) -> (u16, String) {
        let response = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn endpoints_follow_state() {
        let state = HealthState::default();
        let registration = state
            .readiness
            .register("registration", "waiting for the kubelet");
        let slices = state
            .readiness
            .register("resourceslices", "not yet published");

        let not_running = (503, "not running\n".to_owned());
        assert_eq!(probe(&state, "/livez").await, not_running);
        assert_eq!(probe(&state, "/readyz").await, not_running);

        state.liveness.set(true);
        assert_eq!(probe(&state, "/livez").await, (200, "ok\n".to_owned()));
        assert_eq!(
            probe(&state, "/readyz").await,
            (
                503,
                "registration: waiting for the kubelet\nresourceslices: not yet published\n"
                    .to_owned()
            )
        );

        registration.set_ready();
        assert_eq!(
            probe(&state, "/readyz").await,
            (503, "resourceslices: not yet published\n".to_owned())
        );

        slices.set_ready();
        assert_eq!(probe(&state, "/readyz").await, (200, "ok\n".to_owned()));

        registration.set_not_ready("kubelet rejected registration: boom");
        assert_eq!(
            probe(&state, "/readyz").await,
            (
                503,
                "registration: kubelet rejected registration: boom\n".to_owned()
            )
        );
        assert_eq!(registration.name(), "registration");
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        assert_eq!(probe(&HealthState::default(), "/metrics").await.0, 404);
    }
}

//! The kubelet plugin-registration service (`pluginregistration.Registration`).
//!
//! The kubelet discovers the registration socket, calls `GetInfo`, registers
//! the DRA endpoint it learned and reports the outcome through
//! `NotifyRegistrationStatus`. It re-probes `GetInfo` with a one-second
//! timeout and drops plugins that do not answer.
//!
//! Invariants:
//! - `GetInfo` answers from immutable data and shares no lock with Prepare;
//!   the service runs on its own server task, so it never waits behind a
//!   driver call.
//! - `supported_versions` lists the short strings the kubelet expects,
//!   `v1.DRAPlugin` first, never tonic's full service names.
//! - Every `NotifyRegistrationStatus` is recorded in a watch channel
//!   ([`RegistrationState`]) and in the `registration` readiness check.
//!
//! Failure modes: a rejected registration is logged, marks the plugin not
//! ready, and is answered with an error status (as the kubelet's other
//! plugins do), so the kubelet restarts its registration sequence.

use tokio::sync::watch;

use crate::health::ReadinessCheck;
use crate::proto::registration::registration_server::Registration;
use crate::proto::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};

/// Plugin type a DRA driver registers as.
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";

/// DRA services offered, most preferred first, as the kubelet spells them.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["v1.DRAPlugin", "v1beta1.DRAPlugin"];

/// Name of the readiness check fed by `NotifyRegistrationStatus`.
pub const READINESS_CHECK: &str = "registration";

/// Readiness reason before the kubelet said anything.
pub const PENDING_REASON: &str = "waiting for the kubelet to confirm registration";

/// What the kubelet last said about our registration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RegistrationState {
    /// The kubelet has not reported yet.
    #[default]
    Pending,
    /// The kubelet accepted the plugin.
    Registered,
    /// The kubelet rejected the plugin.
    Failed {
        /// The kubelet's error text.
        error: String,
    },
}

/// `pluginregistration.Registration` for one DRA driver.
#[derive(Debug)]
pub struct RegistrationService {
    info: PluginInfo,
    state: watch::Sender<RegistrationState>,
    readiness: ReadinessCheck,
}

impl RegistrationService {
    /// A service advertising `driver_name` at the absolute `dra_endpoint`.
    pub fn new(
        driver_name: &str,
        dra_endpoint: &str,
        state: watch::Sender<RegistrationState>,
        readiness: ReadinessCheck,
    ) -> Self {
        Self {
            info: PluginInfo {
                r#type: DRA_PLUGIN_TYPE.to_owned(),
                name: driver_name.to_owned(),
                endpoint: dra_endpoint.to_owned(),
                supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
            },
            state,
            readiness,
        }
    }
}

impl RegistrationService {
    /// Also advertises `services` (e.g. the resource-health stream).
    pub fn with_services<'a>(mut self, services: impl IntoIterator<Item = &'a str>) -> Self {
        self.info
            .supported_versions
            .extend(services.into_iter().map(str::to_owned));
        self
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: tonic::Request<InfoRequest>,
    ) -> Result<tonic::Response<PluginInfo>, tonic::Status> {
        tracing::trace!("kubelet requested plugin info");
        Ok(tonic::Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: tonic::Request<RegistrationStatus>,
    ) -> Result<tonic::Response<RegistrationStatusResponse>, tonic::Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.info.name, "kubelet registered the plugin");
            self.readiness.set_ready();
            self.state.send_replace(RegistrationState::Registered);
            Ok(tonic::Response::new(RegistrationStatusResponse {}))
        } else {
            tracing::error!(
                driver = %self.info.name,
                error = %status.error,
                "kubelet rejected the plugin registration"
            );
            self.readiness
                .set_not_ready(format!("kubelet rejected registration: {}", status.error));
            self.state.send_replace(RegistrationState::Failed {
                error: status.error.clone(),
            });
            Err(tonic::Status::internal(format!(
                "failed registration process: {}",
                status.error
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::health::Readiness;

    fn service() -> (
        RegistrationService,
        watch::Receiver<RegistrationState>,
        Readiness,
    ) {
        let readiness = Readiness::new();
        let check = readiness.register(READINESS_CHECK, PENDING_REASON);
        let (tx, rx) = watch::channel(RegistrationState::Pending);
        (
            RegistrationService::new("gpu.example.com", "/plugins/gpu/dra.sock", tx, check),
            rx,
            readiness,
        )
    }

    #[tokio::test]
    async fn get_info_advertises_short_service_names_v1_first() {
        let (svc, _rx, _readiness) = service();
        let info = svc
            .get_info(tonic::Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info,
            PluginInfo {
                r#type: "DRAPlugin".into(),
                name: "gpu.example.com".into(),
                endpoint: "/plugins/gpu/dra.sock".into(),
                supported_versions: vec!["v1.DRAPlugin".into(), "v1beta1.DRAPlugin".into()],
            }
        );
    }

    #[tokio::test]
    async fn notify_records_status_and_readiness() {
        let (svc, rx, readiness) = service();
        assert_eq!(
            readiness.status(),
            Err(vec![("registration".into(), PENDING_REASON.into())])
        );

        let err = svc
            .notify_registration_status(tonic::Request::new(RegistrationStatus {
                plugin_registered: false,
                error: "version mismatch".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(
            err.message(),
            "failed registration process: version mismatch"
        );
        assert_eq!(
            *rx.borrow(),
            RegistrationState::Failed {
                error: "version mismatch".into()
            }
        );
        assert_eq!(
            readiness.status(),
            Err(vec![(
                "registration".into(),
                "kubelet rejected registration: version mismatch".into()
            )])
        );

        svc.notify_registration_status(tonic::Request::new(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        }))
        .await
        .unwrap();
        assert_eq!(*rx.borrow(), RegistrationState::Registered);
        assert_eq!(readiness.status(), Ok(()));
    }
}

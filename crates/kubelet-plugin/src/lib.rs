//! A Kubernetes DRA kubelet plugin library: the Rust counterpart of Go's
//! `k8s.io/dynamic-resource-allocation/kubeletplugin`. It knows nothing
//! about any particular device.
//!
//! A driver implements [`DraDriver`] and hands it to
//! [`KubeletPlugin::builder`]. The plugin then
//! - serves the kubelet's plugin-registration API on
//!   `<registrar dir>/<driver>-reg.sock` ([`registration`]),
//! - serves the DRA node API as both `v1.DRAPlugin` and `v1beta1.DRAPlugin`
//!   on `<plugin data dir>/dra.sock` ([`dra`]), bound before registration,
//! - reads and checks each claim before calling the driver ([`claims`]),
//! - serializes driver calls, across processes in rolling-update mode
//!   ([`serialize`]),
//! - optionally serves `/livez` and `/readyz` ([`health`]),
//! - removes its own sockets on shutdown ([`socket`]).
//!
//! Failures of single claims are per-claim results ([`ClaimError`]); the
//! plugin's own failures are [`Error`]s and end [`KubeletPlugin::run`].
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use nvdra_kubelet_plugin::{
//!     ClaimRef, DraDriver, KubeletPlugin, PrepareClaim, PrepareResults, UnprepareResults,
//!     shutdown_signal,
//! };
//!
//! struct MyDriver;
//!
//! impl DraDriver for MyDriver {
//!     async fn prepare_resource_claims(&self, claims: Vec<PrepareClaim>) -> PrepareResults {
//!         claims.into_iter().map(|c| (c.claim_ref.uid, Ok(vec![]))).collect()
//!     }
//!
//!     async fn unprepare_resource_claims(&self, claims: Vec<ClaimRef>) -> UnprepareResults {
//!         claims.into_iter().map(|c| (c.uid, Ok(()))).collect()
//!     }
//! }
//!
//! # async fn agent(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let shutdown = shutdown_signal()?;
//! let plugin = KubeletPlugin::builder("gpu.example.com", Arc::new(MyDriver))
//!     .kube_client(client)
//!     .rolling_update("pod-uid-from-the-downward-api")
//!     .health_addr(([0, 0, 0, 0], 8080).into())
//!     .build()?;
//! // Other components add readiness checks and report through them.
//! let slices = plugin.readiness().register("resourceslices", "not yet published");
//! slices.set_ready();
//! plugin.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```

pub mod claims;
pub mod dra;
pub mod driver;
pub mod error;
pub mod health;
pub mod plugin;
pub mod proto;
pub mod registration;
pub mod resource_health;
pub mod resourceslice;
pub mod serialize;
pub mod socket;

pub use claims::{ClaimReader, InMemoryClaimReader};
pub use driver::{
    ClaimRef, ConfigSource, DraDriver, OpaqueConfig, PrepareClaim, PrepareResults, PreparedDevice,
    UnprepareResults,
};
pub use error::{BoxError, ClaimError, Error};
pub use health::{HealthState, Liveness, Readiness, ReadinessCheck};
pub use plugin::{KubeletPlugin, KubeletPluginBuilder, shutdown_signal};
pub use registration::RegistrationState;

//! nvdra's shared API surface: the contract every other crate builds on.
//!
//! - [`names`]: well-known strings (driver names, labels, finalizers, attributes, …).
//! - [`computedomain`] and [`clique`]: the `resource.nvidia.com/v1beta1` CRDs; [`crd`] renders
//!   them for the chart.
//! - [`config`]: the opaque device configuration kinds users put in ResourceClaims, with strict
//!   and lenient decoding, normalization and validation.
//! - [`featuregates`]: the typed feature-gate set shared by all components.
//! - [`quantity`]: a Kubernetes `resource.Quantity` parser (k8s-openapi only carries the text).
//!
//! Everything here is pure: no I/O, no async runtime, no API client. Wire formats match the
//! upstream Go driver so nvdra is a drop-in replacement.

pub mod clique;
pub mod computedomain;
pub mod config;
pub mod crd;
pub mod featuregates;
pub mod flags;
pub mod names;
pub mod quantity;

pub use clique::{ComputeDomainClique, ComputeDomainCliqueSpec, ComputeDomainDaemonInfo};
pub use computedomain::{
    AllocationMode, ComputeDomain, ComputeDomainChannelSpec, ComputeDomainNode,
    ComputeDomainResourceClaimTemplate, ComputeDomainSpec, ComputeDomainStatus, Readiness,
};
pub use config::{ConfigError, ConfigKind, DeviceConfig, Strictness};
pub use crd::{crd_files, crds};
pub use featuregates::{FeatureGate, FeatureGates};
pub use quantity::Quantity;

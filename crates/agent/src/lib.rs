//! nvdra's node agent: the node side of the `gpu.nvidia.com` and `compute-domain.nvidia.com`
//! DRA drivers.
//!
//! `main` parses [`args::Args`] and calls [`run::run`], which wires the
//! device layer (`nvdra-gpu`), the kubelet-plugin library and the modules
//! here: what is published ([`devices`]), how opaque configs apply
//! ([`config`]), what a container gets ([`cdi`], and [`metadata`] with the
//! `DeviceMetadata` gate), what survives a restart
//! ([`checkpoint`]) and how it is rebuilt when lost ([`rebuild`]), and
//! the events an operator sees ([`events`]). [`computedomain`] is the
//! `compute-domain.nvidia.com` driver (IMEX channels and daemons), which
//! reuses the checkpoint, CDI store and metrics of the GPU side.

pub mod args;
pub mod cdi;
pub mod checkpoint;
pub mod cleanup;
pub mod computedomain;
pub mod config;
pub mod devices;
pub mod driver;
pub mod events;
pub mod health;
pub mod metadata;
pub mod metrics;
pub mod mps;
pub mod rebuild;
pub mod run;

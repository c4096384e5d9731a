//! nvdra's node agent: the node side of the `gpu.nvidia.com` DRA driver.
//!
//! `main` parses [`args::Args`] and calls [`run::run`], which wires the
//! device layer (`nvdra-gpu`), the kubelet-plugin library and the modules
//! here: what is published ([`devices`]), how opaque configs apply
//! ([`config`]), what a container gets ([`cdi`]), what survives a restart
//! ([`checkpoint`]) and how it is rebuilt when lost ([`rebuild`]), and
//! the events an operator sees ([`events`]).

pub mod args;
pub mod cdi;
pub mod checkpoint;
pub mod cleanup;
pub mod config;
pub mod devices;
pub mod driver;
pub mod events;
pub mod metrics;
pub mod rebuild;
pub mod run;

//! A kubelet emulator for local e2e clusters.
//!
//! One process plays the kubelet of one simulated node against a real API
//! server: [`node`] registers the Node and heartbeats it, [`registry`] and
//! [`plugins`] find and register DRA plugins in the node's
//! `plugins_registry` directory, [`pods`] runs each bound pod's lifecycle
//! (claims via [`claims`], [`dra::DraClient`] prepare/unprepare, CDI checks
//! via [`cdi`], local processes via [`container`], status via
//! [`podstatus`], events via [`events`], pod addresses via [`ipam`], container
//! roots via [`rootfs`]), and [`run`] ties them together.
//!
//! Everything plugin-facing is a client: the plugin under test owns its
//! sockets and spec files; the emulator only reads them.

pub mod args;
pub mod cdi;
pub mod claims;
pub mod container;
pub mod device_health;
pub mod dra;
pub mod error;
pub mod events;
pub mod identity;
pub mod ipam;
pub mod node;
pub mod plugins;
pub mod pods;
pub mod podstatus;
pub mod registry;
pub mod rootfs;
pub mod run;

pub use error::Error;
pub use nvdra_kubelet_plugin::ClaimRef;

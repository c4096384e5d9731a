//! The plugin-facing half of a kubelet, for local e2e clusters.
//!
//! A simulated node uses [`registry`] to find DRA plugins in its
//! `plugins_registry` directory and register them the way the kubelet does,
//! [`dra::DraClient`] to prepare and unprepare claims over the version chosen
//! at registration, and [`cdi`] to check that every CDI device ID a plugin
//! returns resolves to a device in the node's CDI spec files.
//!
//! Everything here is a client: the plugin under test owns its sockets and
//! spec files; the emulator only reads them.

pub mod cdi;
pub mod dra;
pub mod error;
pub mod registry;

pub use error::Error;
pub use nvdra_kubelet_plugin::ClaimRef;

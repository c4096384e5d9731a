//! nvdra's node agent: the node side of the `gpu.nvidia.com` DRA driver.
//!
//! Modules are added as the agent is built; see docs/architecture.md.

pub mod cdi;
pub mod checkpoint;
pub mod config;
pub mod devices;

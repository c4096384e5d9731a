//! A mock `libnvidia-ml.so.1`: the NVML C functions nvdra's `NvmlBackend`
//! calls (through nvml-wrapper and its own raw calls), with NVML's ABI and
//! return codes, answering from a fake profile, the same YAML the
//! `FakeBackend` serves. Built as a cdylib, copied to
//! `<driver-root>/usr/lib64/libnvidia-ml.so.1` with a config beside it
//! ([`config`]), and loaded by the agent's normal driver-root discovery.
//!
//! Fidelity rules:
//! - state is a [`FakeNode`], the model the fake backend uses, so both
//!   backends accept and refuse MIG changes identically; created MIG
//!   instances persist for the process and, with a state file, across
//!   processes;
//! - NVML's lifecycle: calls before `nvmlInit*` or after the last
//!   `nvmlShutdown` answer `NVML_ERROR_UNINITIALIZED`; init is counted;
//! - what the profile does not model answers `NVML_ERROR_NOT_SUPPORTED`
//!   (fabric and addressing mode when the profile has none, attributes of a
//!   full GPU, compute instances smaller than their GPU instance, events of
//!   a GPU whose profile says `health_events: false`);
//! - health events are lines appended to the events file beside the config
//!   ([`config::EVENTS_FILE`]), delivered by `nvmlEventSetWait_v2` to each
//!   event set that registered the line's GPU for its type, with the
//!   `nvmlEventData_t` NVML would fill (`lost` is `NVML_ERROR_GPU_IS_LOST`);
//!   GPUs support the critical-Xid and both ECC event types, nothing else;
//!   functions nvdra never calls are not exported at all, which is how an
//!   older driver looks to nvml-wrapper;
//! - handles are opaque values encoding what they name (GPU, MIG device,
//!   GPU instance, compute instance), checked on every use, so a stale
//!   handle answers `NVML_ERROR_NOT_FOUND` or `INVALID_ARGUMENT` instead of
//!   touching freed memory.
//!
//! A configuration error makes `nvmlInit*` fail with
//! `NVML_ERROR_DRIVER_NOT_LOADED` and prints the reason on stderr.

pub mod config;
mod exports;
pub mod layout;
pub mod pci;
pub mod procfs;

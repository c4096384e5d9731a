//! GPU health events: what NVML's event API reports about failing GPUs, and
//! the [`HealthWatch`] a backend hands out to wait for them
//! ([`crate::GpuBackend::watch_health`]).
//!
//! Upstream's device health check, which nvdra follows: every GPU is
//! registered for the critical-Xid, double-bit-ECC and single-bit-ECC
//! event types ([`HEALTH_EVENT_TYPES`], masked by the types the GPU
//! supports); a GPU whose registration fails is *unmonitored* (logged, and
//! listed by [`HealthWatch::unmonitored`]), not an error of the watch. An
//! event names its GPU by UUID; a MIG device's event carries its GPU- and
//! compute-instance IDs, a full GPU's event carries none (NVML's
//! `0xFFFFFFFF`, here `None`). NVML's `GPU_IS_LOST` answer to a wait, or an
//! event whose device cannot be named, is one [`HealthEventKind::GpuLost`]
//! event with an empty UUID: NVML does not say which GPU is gone, so the
//! consumer must treat it as affecting every GPU.
//!
//! A watch delivers only events that happen after it was created, for the
//! monitored GPUs it was created for (plus `GpuLost`), in order; every watch
//! gets every such event, as every NVML event set does. Its
//! [`HealthWatch::wait`] never blocks longer than the timeout given (the
//! NVML backend adds at most its call timeout when the driver hangs, and
//! then fails with [`Error::Timeout`]); which thread waits, and why that
//! never stalls the backend's other calls, is each backend's business (see
//! `crate::nvml::health` and [`crate::FakeBackend::inject_health_event`]).
//!
//! Events also have a one-line text form ([`HealthEvent`]'s `Display` and
//! `FromStr`), which the mock NVML library reads from its events file:
//!
//! ```text
//! GPU-<uuid> xid 79             # a critical Xid on a full GPU
//! GPU-<uuid> gi 1 ci 0 xid 94   # on MIG device GI 1 / CI 0 of that GPU
//! GPU-<uuid> dbe                # a double-bit ECC error
//! GPU-<uuid> sbe                # a single-bit ECC error
//! lost                          # NVML_ERROR_GPU_IS_LOST
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::device::GpuInfo;

/// NVML's `nvmlEventTypeSingleBitEccError`.
const SINGLE_BIT_ECC: u64 = 1;
/// NVML's `nvmlEventTypeDoubleBitEccError`.
const DOUBLE_BIT_ECC: u64 = 2;
/// NVML's `nvmlEventTypeXidCriticalError`.
const XID_CRITICAL: u64 = 8;

/// The NVML event types a health watch registers for (XID critical error,
/// double-bit ECC, single-bit ECC), as upstream does.
pub const HEALTH_EVENT_TYPES: u64 = XID_CRITICAL | DOUBLE_BIT_ECC | SINGLE_BIT_ECC;

/// NVML's GPU-/compute-instance ID of an event on a full GPU.
const NO_INSTANCE: u32 = 0xFFFF_FFFF;

/// One health event of one GPU or MIG device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthEvent {
    /// The full GPU's UUID (a MIG device's event names its parent); empty
    /// for [`HealthEventKind::GpuLost`].
    pub gpu_uuid: String,
    /// The MIG device's GPU-instance ID; `None` for the full GPU.
    pub gi_id: Option<u32>,
    /// The MIG device's compute-instance ID; `None` for the full GPU.
    pub ci_id: Option<u32>,
    /// What happened.
    pub kind: HealthEventKind,
}

/// What a health event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthEventKind {
    /// A critical Xid error, with its number (NVML reports the latest Xid
    /// of the GPU when several happened before the wait).
    Xid(u64),
    /// An uncorrectable (double-bit) ECC error.
    DoubleBitEcc,
    /// A corrected (single-bit) ECC error.
    SingleBitEcc,
    /// A GPU fell off the bus or is otherwise inaccessible; NVML does not
    /// say which, so it concerns every GPU.
    GpuLost,
}

impl HealthEvent {
    /// The event that stands for NVML's `GPU_IS_LOST`.
    pub fn gpu_lost() -> Self {
        Self {
            gpu_uuid: String::new(),
            gi_id: None,
            ci_id: None,
            kind: HealthEventKind::GpuLost,
        }
    }

    /// `kind` on the full GPU `gpu_uuid`.
    pub fn gpu(gpu_uuid: impl Into<String>, kind: HealthEventKind) -> Self {
        Self {
            gpu_uuid: gpu_uuid.into(),
            gi_id: None,
            ci_id: None,
            kind,
        }
    }

    /// The event as NVML would deliver it, with everything `GpuLost` cannot
    /// know dropped (NVML's `GPU_IS_LOST` names no GPU).
    pub fn normalized(self) -> Self {
        match self.kind {
            HealthEventKind::GpuLost => Self::gpu_lost(),
            _ => self,
        }
    }

    /// From the fields of NVML's `nvmlEventData_t` (the device's UUID
    /// already read); `None` for event types other than
    /// [`HEALTH_EVENT_TYPES`].
    pub fn from_nvml(
        gpu_uuid: String,
        event_type: u64,
        event_data: u64,
        gpu_instance_id: u32,
        compute_instance_id: u32,
    ) -> Option<Self> {
        let kind = match event_type {
            XID_CRITICAL => HealthEventKind::Xid(event_data),
            DOUBLE_BIT_ECC => HealthEventKind::DoubleBitEcc,
            SINGLE_BIT_ECC => HealthEventKind::SingleBitEcc,
            _ => return None,
        };
        let id = |raw: u32| (raw != NO_INSTANCE).then_some(raw);
        Some(Self {
            gpu_uuid,
            gi_id: id(gpu_instance_id),
            ci_id: id(compute_instance_id),
            kind,
        })
    }

    /// NVML's `nvmlEventData_t` fields `(eventType, eventData,
    /// gpuInstanceId, computeInstanceId)`; `None` for `GpuLost`, which NVML
    /// reports as a return code, not as event data.
    pub fn to_nvml(&self) -> Option<(u64, u64, u32, u32)> {
        let (event_type, data) = match self.kind {
            HealthEventKind::Xid(xid) => (XID_CRITICAL, xid),
            HealthEventKind::DoubleBitEcc => (DOUBLE_BIT_ECC, 0),
            HealthEventKind::SingleBitEcc => (SINGLE_BIT_ECC, 0),
            HealthEventKind::GpuLost => return None,
        };
        Some((
            event_type,
            data,
            self.gi_id.unwrap_or(NO_INSTANCE),
            self.ci_id.unwrap_or(NO_INSTANCE),
        ))
    }
}

/// The one-line form (see the module docs).
impl fmt::Display for HealthEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == HealthEventKind::GpuLost {
            return f.write_str("lost");
        }
        f.write_str(&self.gpu_uuid)?;
        if let Some(gi) = self.gi_id {
            write!(f, " gi {gi}")?;
        }
        if let Some(ci) = self.ci_id {
            write!(f, " ci {ci}")?;
        }
        match self.kind {
            HealthEventKind::Xid(xid) => write!(f, " xid {xid}"),
            HealthEventKind::DoubleBitEcc => f.write_str(" dbe"),
            HealthEventKind::SingleBitEcc => f.write_str(" sbe"),
            HealthEventKind::GpuLost => Ok(()),
        }
    }
}

/// Parses the one-line form; `#` starts a comment. Fails with
/// [`Error::ParseHealthEvent`].
impl FromStr for HealthEvent {
    type Err = Error;

    fn from_str(line: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::ParseHealthEvent {
            line: line.to_owned(),
            reason: reason.to_owned(),
        };
        let text = line.split_once('#').map_or(line, |(text, _)| text);
        let mut words = text.split_whitespace();
        let gpu_uuid = match words.next() {
            Some("lost") if words.next().is_none() => return Ok(Self::gpu_lost()),
            Some("lost") => return Err(invalid("`lost` takes nothing after it")),
            Some(uuid) if uuid.starts_with("GPU-") => uuid.to_owned(),
            _ => return Err(invalid("expected `lost` or a GPU-<uuid>")),
        };
        let number = |word: Option<&str>, what: &str| {
            word.and_then(|w| w.parse::<u64>().ok())
                .ok_or_else(|| invalid(&format!("`{what}` needs a number")))
        };
        let instance = |word: Option<&str>, what: &str| {
            number(word, what).and_then(|n| {
                u32::try_from(n)
                    .ok()
                    .filter(|n| *n != NO_INSTANCE)
                    .ok_or_else(|| invalid(&format!("`{what}` is out of range")))
            })
        };
        let (mut gi_id, mut ci_id) = (None, None);
        let kind = loop {
            match words.next() {
                Some("gi") if gi_id.is_none() && ci_id.is_none() => {
                    gi_id = Some(instance(words.next(), "gi")?);
                }
                Some("ci") if ci_id.is_none() => ci_id = Some(instance(words.next(), "ci")?),
                Some("xid") => break HealthEventKind::Xid(number(words.next(), "xid")?),
                Some("dbe") => break HealthEventKind::DoubleBitEcc,
                Some("sbe") => break HealthEventKind::SingleBitEcc,
                _ => {
                    return Err(invalid(
                        "expected [gi <n>] [ci <n>] then `xid <n>`, `dbe` or `sbe`",
                    ));
                }
            }
        };
        if words.next().is_some() {
            return Err(invalid("unexpected words after the event"));
        }
        Ok(Self {
            gpu_uuid,
            gi_id,
            ci_id,
            kind,
        })
    }
}

/// Where a watch's events come from; one implementation per backend.
pub(crate) trait HealthSource: Send + Sync {
    /// The next event, waiting at most `timeout`; `Ok(None)` when none came.
    fn wait(&self, timeout: Duration) -> Result<Option<HealthEvent>, Error>;
}

/// A running watch over GPUs' health events (see the module docs). Dropping
/// it stops watching.
pub struct HealthWatch {
    unmonitored: Vec<String>,
    source: Box<dyn HealthSource>,
}

impl fmt::Debug for HealthWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthWatch")
            .field("unmonitored", &self.unmonitored)
            .finish_non_exhaustive()
    }
}

impl HealthWatch {
    pub(crate) fn new(unmonitored: Vec<String>, source: Box<dyn HealthSource>) -> Self {
        Self {
            unmonitored,
            source,
        }
    }

    /// A watch that monitors nothing, for a backend without health events:
    /// every GPU of `gpus` is unmonitored, and [`HealthWatch::wait`] only
    /// ever times out.
    pub fn none(gpus: &[GpuInfo]) -> Self {
        Self::new(
            gpus.iter().map(|g| g.uuid.clone()).collect(),
            Box::new(NoEvents),
        )
    }

    /// UUIDs of the GPUs asked for whose events cannot be watched (the
    /// reason for each was logged), in the order asked.
    pub fn unmonitored(&self) -> &[String] {
        &self.unmonitored
    }

    /// The next event, waiting at most `timeout`; `Ok(None)` when none came
    /// in time. An error means the watch could not wait (e.g. NVML hung);
    /// later calls may succeed again.
    pub fn wait(&self, timeout: Duration) -> Result<Option<HealthEvent>, Error> {
        self.source.wait(timeout)
    }
}

/// The source of [`HealthWatch::none`].
struct NoEvents;

impl HealthSource for NoEvents {
    fn wait(&self, timeout: Duration) -> Result<Option<HealthEvent>, Error> {
        std::thread::sleep(timeout);
        Ok(None)
    }
}

/// When a wait of `timeout` from now ends; `None` when that is beyond what
/// an `Instant` can hold, i.e. never.
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const UUID: &str = "GPU-00000000-0000-4000-8000-000000000001";

    #[test]
    fn lines_round_trip() {
        let mig = HealthEvent {
            gpu_uuid: UUID.into(),
            gi_id: Some(1),
            ci_id: Some(0),
            kind: HealthEventKind::Xid(94),
        };
        for (line, event) in [
            (
                format!("{UUID} xid 79"),
                HealthEvent::gpu(UUID, HealthEventKind::Xid(79)),
            ),
            (format!("{UUID} gi 1 ci 0 xid 94"), mig),
            (
                format!("{UUID} dbe"),
                HealthEvent::gpu(UUID, HealthEventKind::DoubleBitEcc),
            ),
            (
                format!("{UUID} sbe"),
                HealthEvent::gpu(UUID, HealthEventKind::SingleBitEcc),
            ),
            ("lost".to_owned(), HealthEvent::gpu_lost()),
        ] {
            assert_eq!(line.parse::<HealthEvent>().unwrap(), event, "{line}");
            assert_eq!(event.to_string(), line);
        }
        assert_eq!(
            format!("  {UUID}   dbe  # from the test")
                .parse::<HealthEvent>()
                .unwrap()
                .kind,
            HealthEventKind::DoubleBitEcc
        );
    }

    #[test]
    fn bad_lines_say_why() {
        for (line, reason) in [
            ("", "expected `lost` or a GPU-<uuid>"),
            ("MIG-x xid 1", "expected `lost` or a GPU-<uuid>"),
            ("lost GPU-x", "`lost` takes nothing after it"),
            ("GPU-x xid", "`xid` needs a number"),
            ("GPU-x xid -1", "`xid` needs a number"),
            ("GPU-x gi 4294967295 dbe", "`gi` is out of range"),
            (
                "GPU-x ci 0 gi 1 dbe",
                "expected [gi <n>] [ci <n>] then `xid <n>`, `dbe` or `sbe`",
            ),
            (
                "GPU-x ecc",
                "expected [gi <n>] [ci <n>] then `xid <n>`, `dbe` or `sbe`",
            ),
            ("GPU-x dbe sbe", "unexpected words after the event"),
        ] {
            let err = line.parse::<HealthEvent>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid health event {line:?}: {reason}")
            );
        }
    }

    #[test]
    fn nvml_fields_round_trip() {
        let full = HealthEvent::gpu(UUID, HealthEventKind::Xid(48));
        assert_eq!(full.to_nvml(), Some((8, 48, NO_INSTANCE, NO_INSTANCE)));
        assert_eq!(
            HealthEvent::from_nvml(UUID.into(), 8, 48, NO_INSTANCE, NO_INSTANCE),
            Some(full)
        );
        let mig = HealthEvent {
            gpu_uuid: UUID.into(),
            gi_id: Some(2),
            ci_id: Some(0),
            kind: HealthEventKind::DoubleBitEcc,
        };
        let (t, d, gi, ci) = mig.to_nvml().unwrap();
        assert_eq!((t, d, gi, ci), (2, 0, 2, 0));
        assert_eq!(HealthEvent::from_nvml(UUID.into(), t, d, gi, ci), Some(mig));
        assert_eq!(HealthEvent::from_nvml(UUID.into(), 4, 0, 0, 0), None);
        assert_eq!(HealthEvent::gpu_lost().to_nvml(), None);
        assert_eq!(
            HealthEvent::gpu(UUID, HealthEventKind::GpuLost).normalized(),
            HealthEvent::gpu_lost()
        );
    }

    #[test]
    fn a_watch_of_nothing_only_times_out() {
        let gpu = crate::FakeBackend::builtin("l4-x2")
            .unwrap()
            .unwrap()
            .fake_node()
            .inventory
            .gpus[1]
            .info
            .clone();
        let watch = HealthWatch::none(std::slice::from_ref(&gpu));
        assert_eq!(watch.unmonitored(), [gpu.uuid]);
        let t0 = Instant::now();
        assert_eq!(watch.wait(Duration::from_millis(20)).unwrap(), None);
        assert!(t0.elapsed() >= Duration::from_millis(20));
    }
}

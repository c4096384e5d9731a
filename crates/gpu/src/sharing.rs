//! GPU sharing settings the agent applies for a claim and undoes after it:
//! the compute mode (NVML) and the time slice of time-sliced sharing
//! (`nvidia-smi compute-policy`, which NVML has no call for).
//!
//! Both are per full GPU. Values follow NVML and `nvidia-smi`:
//! [`ComputeMode`] is `nvmlComputeMode_t`, [`TimeSlice`] is the
//! `--set-timeslice` number (0 default, 1 short, 2 medium, 3 long).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// How many CUDA contexts a GPU admits (`nvmlComputeMode_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ComputeMode {
    /// Any number of contexts, from any process.
    #[default]
    Default,
    /// One context, usable from one process (what MPS needs).
    ExclusiveProcess,
    /// No contexts.
    Prohibited,
}

impl ComputeMode {
    /// NVML's value.
    pub fn to_nvml(self) -> u32 {
        match self {
            Self::Default => 0,
            Self::Prohibited => 2,
            Self::ExclusiveProcess => 3,
        }
    }

    /// From NVML's value; `None` for values nvdra never sets (the removed
    /// exclusive-thread mode) or does not know.
    pub fn from_nvml(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Default,
            2 => Self::Prohibited,
            3 => Self::ExclusiveProcess,
            _ => return None,
        })
    }
}

/// The length of a GPU's time slice between processes sharing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TimeSlice {
    /// The driver's default.
    #[default]
    Default,
    /// Short.
    Short,
    /// Medium.
    Medium,
    /// Long.
    Long,
}

impl TimeSlice {
    /// The `nvidia-smi compute-policy --set-timeslice` value.
    pub fn nvidia_smi_value(self) -> u8 {
        match self {
            Self::Default => 0,
            Self::Short => 1,
            Self::Medium => 2,
            Self::Long => 3,
        }
    }

    /// The slice of an `--set-timeslice` value.
    pub fn from_nvidia_smi(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Default,
            1 => Self::Short,
            2 => Self::Medium,
            3 => Self::Long,
            _ => return None,
        })
    }
}

/// Runs `nvidia-smi compute-policy -i <uuid> --set-timeslice=<n>` from the
/// driver root, with the driver root's NVML first on the library path (so a
/// containerised driver's `nvidia-smi` loads its own library, without a
/// chroot), killing it after `timeout`.
pub(crate) fn run_set_time_slice(
    nvidia_smi: &Path,
    nvml_dir: &Path,
    uuid: &str,
    slice: TimeSlice,
    timeout: Duration,
) -> Result<(), Error> {
    let args = vec![
        "compute-policy".to_owned(),
        "-i".to_owned(),
        uuid.to_owned(),
        format!("--set-timeslice={}", slice.nvidia_smi_value()),
    ];
    let command = || format!("{} {}", nvidia_smi.display(), args.join(" "));
    let mut child = Command::new(nvidia_smi)
        .args(&args)
        .env("LD_LIBRARY_PATH", nvml_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::RunNvidiaSmi {
            command: command(),
            source,
        })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    op: command(),
                    after: timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(Error::RunNvidiaSmi {
                    command: command(),
                    source,
                });
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| Error::RunNvidiaSmi {
            command: command(),
            source,
        })?;
    let said = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    let mut message = said(&output.stderr);
    if message.is_empty() {
        message = said(&output.stdout);
    }
    Err(Error::NvidiaSmiFailed {
        command: command(),
        status: status.to_string(),
        output: message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn values_round_trip() {
        for s in [
            TimeSlice::Default,
            TimeSlice::Short,
            TimeSlice::Medium,
            TimeSlice::Long,
        ] {
            assert_eq!(TimeSlice::from_nvidia_smi(s.nvidia_smi_value()), Some(s));
        }
        for m in [
            ComputeMode::Default,
            ComputeMode::ExclusiveProcess,
            ComputeMode::Prohibited,
        ] {
            assert_eq!(ComputeMode::from_nvml(m.to_nvml()), Some(m));
        }
        assert_eq!(ComputeMode::from_nvml(1), None);
    }

    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("nvidia-smi");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn runs_nvidia_smi_and_reports_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let ok = script(
            dir.path(),
            &format!("echo \"$LD_LIBRARY_PATH $*\" >> {}", log.display()),
        );
        run_set_time_slice(
            &ok,
            Path::new("/lib/x"),
            "GPU-1",
            TimeSlice::Long,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "/lib/x compute-policy -i GPU-1 --set-timeslice=3\n"
        );

        let bad = script(dir.path(), "echo 'Insufficient Permissions' >&2; exit 4");
        let err = run_set_time_slice(
            &bad,
            dir.path(),
            "GPU-1",
            TimeSlice::Default,
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("exited with exit status: 4: Insufficient Permissions"),
            "{err}"
        );

        let slow = script(dir.path(), "sleep 5");
        let err = run_set_time_slice(
            &slow,
            dir.path(),
            "GPU-1",
            TimeSlice::Short,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
    }
}

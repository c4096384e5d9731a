//! `nvdra-e2e-nvidia-smi`: stands in for `nvidia-smi` in the driver root of a
//! mock-NVML node, for the one command the agent runs,
//! `compute-policy -i <uuid> --set-timeslice=<0..3>`.
//!
//! Each accepted command is appended to `nvidia-smi.calls` beside the
//! program (the harness copies it into each node's driver root, so each node
//! has its own record), which is what the e2e checks. Anything else fails as
//! the real tool fails on a bad command line: a message on stderr, exit 1.

// A command-line tool reports on stderr.
#![allow(clippy::print_stderr)]

use std::io::Write as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let valid = match args.as_slice() {
        [policy, i, uuid, slice] => {
            policy == "compute-policy"
                && i == "-i"
                && uuid.starts_with("GPU-")
                && slice
                    .strip_prefix("--set-timeslice=")
                    .is_some_and(|n| matches!(n, "0" | "1" | "2" | "3"))
        }
        _ => false,
    };
    if !valid {
        eprintln!("nvdra-e2e-nvidia-smi: unsupported command line: {args:?}");
        return ExitCode::FAILURE;
    }
    let calls = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("nvidia-smi.calls"),
        Err(err) => {
            eprintln!("nvdra-e2e-nvidia-smi: cannot locate myself: {err}");
            return ExitCode::FAILURE;
        }
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&calls)
        .and_then(|mut f| writeln!(f, "{}", args.join(" ")));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "nvdra-e2e-nvidia-smi: cannot write {}: {err}",
                calls.display()
            );
            ExitCode::FAILURE
        }
    }
}

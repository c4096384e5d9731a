//! `nvdra-e2e-imex-ctl`: stands in for `nvidia-imex-ctl` in the local e2e cluster.
//!
//! Only the query the daemon's probe makes is supported: `-c <config> -q` prints `READY` and
//! exits 0 when `imex.state` next to the config (a container path resolved under
//! `NVDRA_CONTAINER_ROOT`) says `READY` and the process that wrote it is still alive;
//! otherwise it prints `NOT_READY` and exits 1.

// Its output is the answer the probe reads.
#![allow(clippy::print_stdout)]

use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use clap::Parser as _;

/// The stand-in for `nvidia-imex-ctl`.
#[derive(Debug, clap::Parser)]
#[command(name = "nvdra-e2e-imex-ctl")]
struct Args {
    /// Container path of the IMEX config.
    #[arg(short = 'c', value_name = "CONFIG")]
    config: PathBuf,
    /// Query the local daemon's status once.
    #[arg(short = 'q', required = true)]
    query: bool,
    /// The container's root directory.
    #[arg(long, env = "NVDRA_CONTAINER_ROOT", default_value = "/")]
    container_root: PathBuf,
}

/// `path` (a container path) as seen from the host.
fn resolve(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for part in path.components() {
        if let Component::Normal(name) = part {
            out.push(name);
        }
    }
    out
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

fn ready(state: &str) -> bool {
    let mut lines = state.lines();
    lines.next() == Some("READY")
        && lines
            .next()
            .and_then(|pid| pid.trim().parse().ok())
            .is_some_and(alive)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = args.config.parent().unwrap_or(Path::new("/"));
    let state = resolve(&args.container_root, &dir.join("imex.state"));
    let is_ready = args.query && std::fs::read_to_string(state).is_ok_and(|s| ready(&s));
    if is_ready {
        println!("READY");
        ExitCode::SUCCESS
    } else {
        println!("NOT_READY");
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_the_marker_and_a_live_writer() {
        let me = std::process::id();
        let cases = [
            (format!("READY\n{me}\n"), true),
            (format!("READY\n{me}"), true),
            (format!("NOT_READY\n{me}\n"), false),
            ("READY\n".to_owned(), false),
            ("READY\nnot-a-pid\n".to_owned(), false),
            // PID 0 has no /proc entry; u32::MAX is beyond pid_max.
            (format!("READY\n{}\n", u32::MAX), false),
            (String::new(), false),
        ];
        for (state, want) in cases {
            assert_eq!(ready(&state), want, "{state:?}");
        }
    }
}

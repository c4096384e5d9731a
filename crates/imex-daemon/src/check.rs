//! The `check` subcommand: the daemon pod's startup, liveness and readiness probe.
//!
//! A node without a clique has nothing to check and always passes. Otherwise the local IMEX
//! daemon is asked once (`nvidia-imex-ctl -c /imexd/imexd.cfg -q`) and the check passes only
//! if it prints exactly `READY` and a newline; anything else (other text, a failure exit, no
//! answer within [`CTL_TIMEOUT`]) fails with the reason. This probes the local daemon, not the
//! whole domain.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::Error;
use crate::args::DaemonArgs;
use crate::rootfs;

/// How long `nvidia-imex-ctl` may take to answer (below the probe's 1 s default timeout
/// would be too tight for a loaded node; the kubelet enforces its own limit anyway).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a passing check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    /// The node has no clique: nothing to check.
    NoClique,
    /// The local IMEX daemon answered `READY`.
    Ready,
}

/// Runs the check.
pub async fn check(args: &DaemonArgs) -> Result<Passed, Error> {
    if args.clique_id.is_empty() {
        return Ok(Passed::NoClique);
    }
    let program = rootfs::resolve(&args.container_root, &args.imex_ctl_bin);
    query(&program, &args.config_dir.join("imexd.cfg"), CTL_TIMEOUT).await
}

/// Asks the local IMEX daemon once (`program -c config -q`, `config` a container path passed
/// as is), giving it `timeout` to answer. The daemon's own readiness checks
/// ([`crate::readiness`]) ask the same question the probe does.
pub async fn query(program: &Path, config: &Path, timeout: Duration) -> Result<Passed, Error> {
    let output = tokio::process::Command::new(program)
        .arg("-c")
        .arg(config)
        .arg("-q")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout, output)
        .await
        .map_err(|_| Error::ImexCtlTimedOut {
            program: program.to_owned(),
            timeout,
        })?
        .map_err(|source| Error::RunImexCtl {
            program: program.to_owned(),
            source,
        })?;
    verdict(output.status, &output.stdout, &output.stderr)
}

/// Pass only on a successful exit that printed exactly `READY\n` (and nothing on stderr, as
/// upstream compares the combined output).
pub fn verdict(
    status: std::process::ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<Passed, Error> {
    if status.success() && stdout == b"READY\n" && stderr.is_empty() {
        return Ok(Passed::Ready);
    }
    let mut text = String::from_utf8_lossy(stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(stderr));
    Err(Error::NotReady {
        status,
        output: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use pretty_assertions::assert_eq;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn verdict_wants_exactly_ready() {
        let ok = std::process::ExitStatus::from_raw(0);
        let failed = std::process::ExitStatus::from_raw(1 << 8);
        let cases: &[(std::process::ExitStatus, &str, &str, Result<Passed, &str>)] = &[
            (ok, "READY\n", "", Ok(Passed::Ready)),
            (
                ok,
                "READY",
                "",
                Err(
                    r#"IMEX daemon not ready: nvidia-imex-ctl exited with exit status: 0 and printed "READY""#,
                ),
            ),
            (
                ok,
                "NOT_READY\n",
                "",
                Err(
                    r#"IMEX daemon not ready: nvidia-imex-ctl exited with exit status: 0 and printed "NOT_READY\n""#,
                ),
            ),
            (
                failed,
                "READY\n",
                "",
                Err(
                    r#"IMEX daemon not ready: nvidia-imex-ctl exited with exit status: 1 and printed "READY\n""#,
                ),
            ),
            (
                ok,
                "READY\n",
                "warning\n",
                Err(
                    r#"IMEX daemon not ready: nvidia-imex-ctl exited with exit status: 0 and printed "READY\nwarning\n""#,
                ),
            ),
        ];
        for (status, out, err, want) in cases {
            let got = verdict(*status, out.as_bytes(), err.as_bytes()).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "{out:?} {err:?}");
        }
    }

    fn args(root: &std::path::Path, clique: &str) -> DaemonArgs {
        crate::args::Args::try_parse_from([
            "d".as_ref(),
            "check".as_ref(),
            format!("--cliqueid={clique}").as_ref(),
            std::ffi::OsStr::new("--container-root"),
            root.as_os_str(),
        ])
        .unwrap()
        .daemon
    }

    #[tokio::test]
    async fn check_runs_imex_ctl_under_the_root_with_the_container_config_path() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            check(&args(dir.path(), "")).await.unwrap(),
            Passed::NoClique
        );
        assert_eq!(
            check(&args(dir.path(), "c.1"))
                .await
                .unwrap_err()
                .to_string(),
            format!("run {}/usr/bin/nvidia-imex-ctl", dir.path().display())
        );
        let bin = dir.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        // Prints READY only when called exactly as upstream calls it.
        std::fs::write(
            bin.join("nvidia-imex-ctl"),
            "#!/bin/sh\n[ \"$*\" = \"-c /imexd/imexd.cfg -q\" ] && echo READY || echo \"$*\"\n",
        )
        .unwrap();
        std::fs::set_permissions(
            bin.join("nvidia-imex-ctl"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(
            check(&args(dir.path(), "c.1")).await.unwrap(),
            Passed::Ready
        );
    }
}

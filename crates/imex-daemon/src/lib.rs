//! `nvdra-imex-daemon`: the per-node ComputeDomain daemon.
//!
//! One daemon pod runs on every node of a ComputeDomain (the controller's DaemonSet). It
//! publishes the node's membership in its NVLink clique ([`clique`], [`index`]), keeps the
//! IMEX peers' names in `/etc/hosts` ([`hosts`]), and runs and supervises `nvidia-imex`
//! ([`imex`]) with the config it renders ([`config`]), checking it as its probe does
//! ([`readiness`]), reporting restarts as Events ([`events`]) and its state as Prometheus
//! metrics ([`metrics`]). [`daemon`] is the `run`
//! subcommand,
//! [`check`] the probe. Every container path goes through [`rootfs`], so the e2e can run the
//! daemon as a local process in a private root.
//!
//! Failure modes: `run` fails at start when the CDI edits are missing (`COMPUTE_DOMAIN_UUID`
//! empty), a required downward-API value is empty, the pod cannot be labelled or the config
//! cannot be written; later API errors are retried forever. `check` fails with a one-line
//! reason.

pub mod args;
pub mod check;
pub mod clique;
pub mod config;
pub mod daemon;
pub mod error;
pub mod events;
pub mod hosts;
pub mod imex;
pub mod index;
pub mod metrics;
pub mod readiness;
pub mod rootfs;

use std::io::Write as _;
use std::process::ExitCode;

pub use args::{Args, Command, DaemonArgs};
pub use error::Error;

/// Runs the subcommand `args` names; the exit code is what the process returns.
///
/// `run` logs through `tracing` (filter `--log`/`NVDRA_LOG`) to stderr. `check` is run by
/// probes every few seconds, so it logs nothing and writes one line to stderr: the reason
/// it passed or failed.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(args.command, &Error::Runtime(err)),
    };
    match args.command {
        Command::Run => {
            let filter = tracing_subscriber::EnvFilter::try_new(&args.daemon.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            match args.daemon.log_format {
                nvdra_api::flags::LogFormat::Text => builder.init(),
                nvdra_api::flags::LogFormat::Json => builder.json().init(),
            }
            // Every line of a daemon concerns one ComputeDomain on one node: say so on each.
            let span = tracing::info_span!(
                "imex_daemon",
                compute_domain = %args.daemon.compute_domain_uuid,
                node = %args.daemon.node_name,
            );
            match runtime.block_on(tracing::Instrument::instrument(
                daemon::run(args.daemon),
                span,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %error::chain(&err), "run failed");
                    fail(args.command, &err)
                }
            }
        }
        Command::Check => match runtime.block_on(check::check(&args.daemon)) {
            Ok(passed) => {
                let why = match passed {
                    check::Passed::NoClique => "check succeeded (no clique ID: nothing to check)",
                    check::Passed::Ready => "check succeeded (IMEX daemon READY)",
                };
                let _ = writeln!(std::io::stderr(), "{why}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(args.command, &err),
        },
    }
}

fn fail(command: Command, err: &Error) -> ExitCode {
    let what = match command {
        Command::Run => "run",
        Command::Check => "check",
    };
    let _ = writeln!(std::io::stderr(), "{what} failed: {}", error::chain(err));
    ExitCode::FAILURE
}

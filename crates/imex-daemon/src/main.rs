//! `nvdra-imex-daemon`: parses the command line and hands over to the library.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    nvdra_imex_daemon::run(nvdra_imex_daemon::Args::parse())
}

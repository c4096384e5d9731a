//! Project chores, run as `cargo xtask <command>` from anywhere in the workspace.

mod generate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "nvdra project chores")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CRD YAML generated from the nvdra-api types into charts/nvdra/crds/.
    Generate,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate => generate::crds(&generate::workspace_root()),
    }
}

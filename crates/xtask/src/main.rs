//! Project chores, run as `cargo xtask <command>` from anywhere in the workspace.

mod apidoc;
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
    /// Write what the nvdra-api types generate: the CRD YAML in charts/nvdra/crds/ and the
    /// API reference docs/api.md.
    Generate,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate => {
            let root = generate::workspace_root();
            generate::crds(&root)?;
            generate::api_doc(&root)
        }
    }
}

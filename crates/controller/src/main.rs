//! `nvdra-controller`: the ComputeDomain controller.

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = nvdra_controller::args::Args::parse();
    nvdra_controller::run::run(args).await?;
    Ok(())
}

//! `nvdra-agent`: the node agent of the `gpu.nvidia.com` DRA driver.

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = nvdra_agent::args::Args::parse();
    nvdra_agent::run::run(args).await?;
    Ok(())
}

//! `nvdra-kubelet-emulator`: plays the kubelet of one simulated node.

use std::time::Duration;

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let args = nvdra_kubelet_emulator::args::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(nvdra_kubelet_emulator::run::run(args));
    // Everything has stopped by now; do not linger on idle connection tasks.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result?;
    Ok(())
}

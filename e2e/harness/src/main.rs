//! `nvdra-local-cluster`: starts and stops the local cluster.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = nvdra_e2e::local_cluster::Args::parse();
    match nvdra_e2e::local_cluster::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

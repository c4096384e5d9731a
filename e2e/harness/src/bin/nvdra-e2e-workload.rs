//! `nvdra-e2e-workload`: the container process of e2e pods that run as local
//! processes (the chart's image). It prints its environment, sorted, one
//! `KEY=VALUE` per line, then `ready`, and exits 0 on SIGTERM after printing
//! `terminated`: the suite reads the log to check what the kubelet emulator
//! gave the container and that it was stopped gracefully.

// This program's output is its whole job.
#![allow(clippy::print_stdout)]

use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Environment inspection is this program's purpose.
    #[allow(clippy::disallowed_methods)]
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.sort();
    let mut out = std::io::stdout().lock();
    for (k, v) in env {
        writeln!(out, "{k}={v}")?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    term.recv().await;
    println!("terminated");
    Ok(())
}

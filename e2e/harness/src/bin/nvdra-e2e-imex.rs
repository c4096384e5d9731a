//! `nvdra-e2e-imex`: stands in for `nvidia-imex` in the local e2e cluster.
//!
//! It does what the suite can observe of the real daemon: reads its config (`-c`, a container
//! path resolved under `NVDRA_CONTAINER_ROOT`), finds the node list through
//! `IMEX_NODE_CONFIG_FILE`, resolves every listed name through the container's `/etc/hosts`
//! and prints `peers: <name>=<ip>, ...` (names nobody answers to are left out). SIGUSR1
//! re-reads everything and prints the peers again, as the real daemon re-resolves its peers.
//! Once started it writes `imex.state` next to its config (`READY` and its PID), which
//! `nvdra-e2e-imex-ctl -q` reads; SIGTERM removes it and exits 0.
//!
//! Like the real daemon, it spends a moment initializing ([`STARTUP`]) before it handles any
//! signal: a SIGUSR1 sent in that window kills it, as it would kill `nvidia-imex`. Peers join
//! in bursts, so the ComputeDomain scenarios signal inside that window unless the IMEX daemon
//! holds the signal back until the handler is in place.

// Its output is this program's whole job: the suite reads it from the container log.
#![allow(clippy::print_stdout)]

use std::path::{Component, Path, PathBuf};

use std::time::Duration;

use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};

/// Time from exec to the signal handlers being in place.
const STARTUP: Duration = Duration::from_millis(300);

/// The stand-in for `nvidia-imex`.
#[derive(Debug, clap::Parser)]
#[command(name = "nvdra-e2e-imex")]
struct Args {
    /// Container path of the IMEX config.
    #[arg(short = 'c', value_name = "CONFIG")]
    config: PathBuf,
    /// The container's root directory.
    #[arg(long, env = "NVDRA_CONTAINER_ROOT", default_value = "/")]
    container_root: PathBuf,
}

/// `path` (a container path) as seen from the host.
fn resolve(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for part in path.components() {
        if let Component::Normal(name) = part {
            out.push(name);
        }
    }
    out
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// `name=ip` for every name in the node list that `/etc/hosts` maps, in list order.
fn peers(root: &Path, config: &Path) -> Result<Vec<String>, String> {
    let config_text = read(&resolve(root, config))?;
    let nodes = config_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("IMEX_NODE_CONFIG_FILE="))
        .next_back()
        .ok_or_else(|| format!("{}: no IMEX_NODE_CONFIG_FILE", config.display()))?;
    let names = read(&resolve(root, Path::new(nodes.trim())))?;
    let hosts = read(&resolve(root, Path::new("/etc/hosts")))?;
    let lookup = |name: &str| {
        hosts.lines().find_map(|line| {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            let ip = fields.next()?;
            fields.any(|n| n == name).then(|| ip.to_owned())
        })
    };
    Ok(names
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .filter_map(|name| lookup(name).map(|ip| format!("{name}={ip}")))
        .collect())
}

fn log_peers(root: &Path, config: &Path) -> Result<(), String> {
    let list = peers(root, config)?;
    println!("peers: {}", list.join(", "));
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let io = |e: std::io::Error| e.to_string();
    tokio::time::sleep(STARTUP).await;
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(io)?;
    log_peers(&args.container_root, &args.config)?;
    let state_dir = args.config.parent().unwrap_or(Path::new("/"));
    let state = resolve(&args.container_root, &state_dir.join("imex.state"));
    std::fs::write(&state, format!("READY\n{}\n", std::process::id()))
        .map_err(|e| format!("write {}: {e}", state.display()))?;
    println!("imex: READY");
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                println!("imex: SIGUSR1");
                if let Err(message) = log_peers(&args.container_root, &args.config) {
                    println!("imex: {message}");
                }
            }
            _ = term.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&state);
    println!("imex: terminated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_resolve_listed_names_through_etc_hosts() {
        let root = std::env::temp_dir().join(format!("nvdra-e2e-imex-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("imexd")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("imexd/imexd.cfg"),
            "SERVER_PORT=50000\nIMEX_NODE_CONFIG_FILE=/imexd/nodes.cfg\n",
        )
        .unwrap();
        std::fs::write(
            root.join("imexd/nodes.cfg"),
            "compute-domain-daemon-0000\ncompute-domain-daemon-0001\ncompute-domain-daemon-0002\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/hosts"),
            "127.0.0.1 localhost\n# BEGIN x\n127.1.3.3\tcompute-domain-daemon-0002\n127.1.3.2\tcompute-domain-daemon-0000 # self\n# END x\n",
        )
        .unwrap();
        let got = peers(&root, Path::new("/imexd/imexd.cfg"));
        let missing = peers(&root, Path::new("/imexd/other.cfg"));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            got,
            Ok(vec![
                "compute-domain-daemon-0000=127.1.3.2".to_owned(),
                "compute-domain-daemon-0002=127.1.3.3".to_owned(),
            ])
        );
        assert_eq!(
            missing,
            Err(format!(
                "read {}/imexd/other.cfg: No such file or directory (os error 2)",
                root.display()
            ))
        );
        assert_eq!(
            resolve(Path::new("/r"), Path::new("/imexd/../etc/hosts")),
            PathBuf::from("/r/imexd/etc/hosts")
        );
    }
}

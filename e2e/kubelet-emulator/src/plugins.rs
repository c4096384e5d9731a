//! The node's set of registered DRA plugins, kept in step with the sockets
//! in `plugins_registry`.
//!
//! [`Plugins::poll`] rescans the directory: a new socket, or one replaced by
//! a restarted plugin (new inode or change time), is registered; a socket
//! that vanished takes its driver's registration with it. Registration
//! failures are retried every [`RETRY_FAILED`]. Each change bumps a counter
//! that pod workers waiting for a driver watch, so they retry at once.
//!
//! A DRA connection is made lazily per driver and shared by all pods;
//! callers [`Plugins::invalidate`] it after a failed call so the next call
//! reconnects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::device_health::DeviceHealth;
use crate::dra::DraClient;
use crate::registry::{self, RegisteredPlugin};

/// How often the registry directory is rescanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a socket whose registration failed is left alone.
pub const RETRY_FAILED: Duration = Duration::from_secs(5);

/// Identity of a socket file: inode and change time.
type SocketId = (u64, i64, i64);

#[derive(Debug)]
struct Socket {
    id: SocketId,
    driver: Option<String>,
    tried: Instant,
}

struct Registered {
    plugin: RegisteredPlugin,
    socket: PathBuf,
    client: Option<DraClient>,
}

#[derive(Default)]
struct State {
    sockets: HashMap<PathBuf, Socket>,
    drivers: HashMap<String, Registered>,
}

/// Registered plugins by driver name.
pub struct Plugins {
    dir: PathBuf,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    health: Arc<DeviceHealth>,
}

impl Plugins {
    /// Plugins registered through `dir` (none yet).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            state: Mutex::default(),
            changed: watch::channel(0).0,
            health: Arc::new(DeviceHealth::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data: a panic elsewhere leaves it consistent enough to go on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver that changes whenever a driver registers or goes away.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Rescans the directory once and (re)registers what changed.
    pub async fn poll(&self) {
        let found = match registry::scan(&self.dir) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "scan plugin registry");
                return;
            }
        };
        let mut todo = Vec::new();
        {
            let mut state = self.state();
            let gone: Vec<PathBuf> = state
                .sockets
                .keys()
                .filter(|p| !found.contains(p))
                .cloned()
                .collect();
            for path in gone {
                if let Some(socket) = state.sockets.remove(&path) {
                    forget(&mut state, &path, socket.driver.as_deref());
                    tracing::info!(socket = %path.display(), driver = ?socket.driver, "plugin socket removed; unregistered");
                }
            }
            for path in found {
                let Some(id) = socket_id(&path) else { continue };
                match state.sockets.get(&path) {
                    Some(s)
                        if s.id == id
                            && (s.driver.is_some() || s.tried.elapsed() < RETRY_FAILED) => {}
                    _ => todo.push((path, id)),
                }
            }
        }
        let mut changed = false;
        for (path, id) in todo {
            let result = registry::register(&path).await;
            let mut state = self.state();
            if let Some(old) = state.sockets.remove(&path) {
                forget(&mut state, &path, old.driver.as_deref());
                changed = true;
            }
            let driver = match result {
                Ok(plugin) => {
                    let driver = plugin.driver.clone();
                    if plugin.health {
                        self.health.follow(&driver, plugin.endpoint.clone());
                    }
                    state.drivers.insert(
                        driver.clone(),
                        Registered {
                            plugin,
                            socket: path.clone(),
                            client: None,
                        },
                    );
                    changed = true;
                    Some(driver)
                }
                Err(err) => {
                    tracing::warn!(socket = %path.display(), error = %err, "plugin registration failed");
                    None
                }
            };
            state.sockets.insert(
                path,
                Socket {
                    id,
                    driver,
                    tried: Instant::now(),
                },
            );
        }
        if changed {
            self.bump();
        }
    }

    /// Polls every [`POLL_INTERVAL`] until `shutdown` turns true.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.poll().await;
            tokio::select! {
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// A client for `driver`, connecting if needed; `Err` is the message a
    /// pod event shows.
    pub async fn client(&self, driver: &str) -> Result<DraClient, String> {
        let plugin = {
            let state = self.state();
            let Some(entry) = state.drivers.get(driver) else {
                return Err(format!(
                    "DRA driver {driver} is not registered on this node"
                ));
            };
            if let Some(client) = &entry.client {
                return Ok(client.clone());
            }
            entry.plugin.clone()
        };
        let client = DraClient::connect(&plugin)
            .await
            .map_err(|e| error_chain(&e))?;
        if let Some(entry) = self.state().drivers.get_mut(driver)
            && entry.plugin == plugin
        {
            entry.client = Some(client.clone());
        }
        Ok(client)
    }

    /// Drops `driver`'s connection so the next call reconnects.
    pub fn invalidate(&self, driver: &str) {
        if let Some(entry) = self.state().drivers.get_mut(driver) {
            entry.client = None;
        }
    }

    /// What the plugins say of their devices' health.
    pub fn health(&self) -> &Arc<DeviceHealth> {
        &self.health
    }

    /// The registered drivers, sorted.
    pub fn drivers(&self) -> Vec<String> {
        let mut out: Vec<String> = self.state().drivers.keys().cloned().collect();
        out.sort();
        out
    }
}

/// Drops `driver`'s registration if it came from `path` (a newer socket of
/// the same driver may have replaced it).
fn forget(state: &mut State, path: &Path, driver: Option<&str>) {
    if let Some(driver) = driver
        && state.drivers.get(driver).is_some_and(|r| r.socket == path)
    {
        state.drivers.remove(driver);
    }
}

fn socket_id(path: &Path) -> Option<SocketId> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.ctime(), meta.ctime_nsec()))
}

/// `err` and its sources, joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_sources() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }

    #[tokio::test]
    async fn unregistered_driver_is_reported_and_garbage_sockets_stay_unregistered() {
        let dir = tempfile::Builder::new()
            .prefix("kp")
            .tempdir_in("/tmp")
            .unwrap();
        let _listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("x-reg.sock")).unwrap();
        let plugins = Plugins::new(dir.path());
        let rx = plugins.subscribe();
        // The socket accepts but speaks no gRPC: registration fails, nothing registers.
        plugins.poll().await;
        assert_eq!(plugins.drivers(), Vec::<String>::new());
        assert_eq!(*rx.borrow(), 0);
        assert_eq!(
            plugins.client("gpu.nvidia.com").await.err(),
            Some("DRA driver gpu.nvidia.com is not registered on this node".to_owned())
        );
    }
}

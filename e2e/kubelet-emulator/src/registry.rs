//! Plugin discovery and registration, as the kubelet's plugin watcher does it.
//!
//! [`scan`] lists the sockets in a `plugins_registry` directory (names starting
//! with `.` are ignored, like the kubelet). [`register`] runs the sequence
//! `GetInfo` (1 s limit, no retry) → validate → `NotifyRegistrationStatus`:
//! a plugin that fails validation is told why with `plugin_registered=false`
//! and the validation error is returned. Transport failures are returned
//! without a notification, since the plugin cannot be reached to receive one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nvdra_kubelet_plugin::proto::registration::registration_client::RegistrationClient;
use nvdra_kubelet_plugin::proto::registration::{InfoRequest, PluginInfo, RegistrationStatus};
use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// The kubelet's `GetInfo` limit (also used to connect).
pub const GET_INFO_TIMEOUT: Duration = Duration::from_secs(1);

/// A DRA node-service version the kubelet speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraVersion {
    /// `v1.DRAPlugin` (Kubernetes 1.34+).
    V1,
    /// `v1beta1.DRAPlugin` (1.32+, deprecated from 1.34).
    V1beta1,
}

impl DraVersion {
    /// The string plugins advertise in `supported_versions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1.DRAPlugin",
            Self::V1beta1 => "v1beta1.DRAPlugin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::V1, Self::V1beta1]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// A plugin the emulator has registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredPlugin {
    /// Driver name (`PluginInfo.name`).
    pub driver: String,
    /// DRA socket path (`PluginInfo.endpoint`).
    pub endpoint: PathBuf,
    /// The version chosen for DRA calls.
    pub version: DraVersion,
    /// Whether it serves the resource-health stream.
    pub health: bool,
}

/// The kubelet's rule: the first entry of the plugin's list that it supports;
/// the plugin's order, not the kubelet's preference, decides.
pub fn choose_version(driver: &str, offered: &[String]) -> Result<DraVersion, Error> {
    offered
        .iter()
        .find_map(|s| DraVersion::parse(s))
        .ok_or_else(|| Error::NoSupportedVersion {
            driver: driver.to_owned(),
            offered: offered.to_vec(),
        })
}

/// Checks a `GetInfo` answer and turns it into a registration.
pub fn validate(info: &PluginInfo) -> Result<RegisteredPlugin, Error> {
    if info.r#type != "DRAPlugin" {
        return Err(Error::WrongPluginType {
            driver: info.name.clone(),
            found: info.r#type.clone(),
        });
    }
    Ok(RegisteredPlugin {
        driver: info.name.clone(),
        endpoint: PathBuf::from(&info.endpoint),
        version: choose_version(&info.name, &info.supported_versions)?,
        health: info
            .supported_versions
            .iter()
            .any(|v| v == "v1alpha1.DRAResourceHealth"),
    })
}

/// The sockets in `dir`, sorted by name; dot files and non-sockets are skipped.
pub fn scan(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    use std::os::unix::fs::FileTypeExt;
    let read_err = |source| Error::ReadRegistryDir {
        dir: dir.to_owned(),
        source,
    };
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if entry.file_type().map_err(read_err)?.is_socket() {
            sockets.push(entry.path());
        }
    }
    sockets.sort();
    Ok(sockets)
}

/// Connects to a plugin socket the way the kubelet does: h2c over `unix:`,
/// waiting at most `timeout` for the connection.
pub async fn connect(socket: &Path, timeout: Duration) -> Result<Channel, Error> {
    let connect_err = |source| Error::Connect {
        socket: socket.to_owned(),
        source,
    };
    Endpoint::from_shared(format!("unix:{}", socket.display()))
        .map_err(connect_err)?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(connect_err)
}

/// Runs a call under `limit`, mapping both failure kinds to [`Error`].
pub(crate) async fn call<T>(
    method: &'static str,
    socket: &Path,
    limit: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(source)) => Err(Error::Call {
            method,
            socket: socket.to_owned(),
            source,
        }),
        Err(_) => Err(Error::CallTimedOut {
            method,
            socket: socket.to_owned(),
            timeout: limit,
        }),
    }
}

/// Registers the plugin behind one registration socket.
pub async fn register(socket: &Path) -> Result<RegisteredPlugin, Error> {
    let mut client = RegistrationClient::new(connect(socket, GET_INFO_TIMEOUT).await?);
    let info = call(
        "GetInfo",
        socket,
        GET_INFO_TIMEOUT,
        client.get_info(InfoRequest {}),
    )
    .await?;
    let outcome = validate(&info);
    let status = match &outcome {
        Ok(_) => RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        },
        Err(err) => RegistrationStatus {
            plugin_registered: false,
            error: err.to_string(),
        },
    };
    call(
        "NotifyRegistrationStatus",
        socket,
        GET_INFO_TIMEOUT,
        client.notify_registration_status(status),
    )
    .await?;
    match &outcome {
        Ok(plugin) => tracing::info!(
            driver = %plugin.driver,
            version = plugin.version.as_str(),
            endpoint = %plugin.endpoint.display(),
            "registered DRA plugin"
        ),
        Err(err) => tracing::warn!(socket = %socket.display(), error = %err, "rejected plugin"),
    }
    outcome
}

/// Registers every plugin found in `dir`; one result per socket, in [`scan`] order.
pub async fn register_all(
    dir: &Path,
) -> Result<Vec<(PathBuf, Result<RegisteredPlugin, Error>)>, Error> {
    let mut out = Vec::new();
    for socket in scan(dir)? {
        let result = register(&socket).await;
        out.push((socket, result));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn version_is_the_first_supported_entry_of_the_plugins_list() {
        let cases: &[(&[&str], Result<DraVersion, &str>)] = &[
            (&["v1.DRAPlugin", "v1beta1.DRAPlugin"], Ok(DraVersion::V1)),
            (
                &["v1beta1.DRAPlugin", "v1.DRAPlugin"],
                Ok(DraVersion::V1beta1),
            ),
            (
                &["v1alpha4.DRAPlugin", "v1beta1.DRAPlugin"],
                Ok(DraVersion::V1beta1),
            ),
            (
                &["v1alpha1.DRAResourceHealth", "v1.DRAPlugin"],
                Ok(DraVersion::V1),
            ),
            // The generated full service name is not a registration string.
            (
                &["k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"],
                Err(
                    r#"plugin "gpu.nvidia.com" supports none of v1.DRAPlugin, v1beta1.DRAPlugin (offered: ["k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"])"#,
                ),
            ),
            (
                &[],
                Err(
                    r#"plugin "gpu.nvidia.com" supports none of v1.DRAPlugin, v1beta1.DRAPlugin (offered: [])"#,
                ),
            ),
        ];
        for (offered, want) in cases {
            let got =
                choose_version("gpu.nvidia.com", &strings(offered)).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "offered {offered:?}");
        }
    }

    #[test]
    fn validate_checks_type_then_version() {
        let info = |ty: &str, versions: &[&str]| PluginInfo {
            r#type: ty.into(),
            name: "gpu.nvidia.com".into(),
            endpoint: "/var/lib/kubelet/plugins/gpu.nvidia.com/dra.sock".into(),
            supported_versions: strings(versions),
        };
        assert_eq!(
            validate(&info("DRAPlugin", &["v1beta1.DRAPlugin"])).unwrap(),
            RegisteredPlugin {
                driver: "gpu.nvidia.com".into(),
                endpoint: "/var/lib/kubelet/plugins/gpu.nvidia.com/dra.sock".into(),
                version: DraVersion::V1beta1,
                health: false,
            }
        );
        assert!(
            validate(&info(
                "DRAPlugin",
                &["v1.DRAPlugin", "v1alpha1.DRAResourceHealth"]
            ))
            .unwrap()
            .health
        );
        assert_eq!(
            validate(&info("DevicePlugin", &["v1.DRAPlugin"]))
                .unwrap_err()
                .to_string(),
            r#"plugin "gpu.nvidia.com" has type "DevicePlugin", want "DRAPlugin""#
        );
    }

    #[test]
    fn scan_lists_sockets_and_skips_dot_files_and_regular_files() {
        let dir = tempfile::Builder::new()
            .prefix("ke")
            .tempdir_in("/tmp")
            .unwrap();
        let _b = std::os::unix::net::UnixListener::bind(dir.path().join("b-reg.sock")).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(dir.path().join("a-reg.sock")).unwrap();
        let _hidden =
            std::os::unix::net::UnixListener::bind(dir.path().join(".x-reg.sock")).unwrap();
        std::fs::write(dir.path().join("stale.sock"), "").unwrap();
        assert_eq!(
            scan(dir.path()).unwrap(),
            vec![dir.path().join("a-reg.sock"), dir.path().join("b-reg.sock")]
        );
        let missing = dir.path().join("nope");
        assert_eq!(
            scan(&missing).unwrap_err().to_string(),
            format!("read plugin registry dir {}", missing.display())
        );
    }
}

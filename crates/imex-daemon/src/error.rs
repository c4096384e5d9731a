//! The crate's one error type; each variant names the operation that failed.

use std::path::PathBuf;

/// What went wrong in `run` or `check`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `COMPUTE_DOMAIN_UUID` is empty: the runtime did not apply the claim's CDI edits.
    #[error(
        "COMPUTE_DOMAIN_UUID is empty: CDI container edits did not apply (is CDI enabled in the container runtime?)"
    )]
    CdiEditsMissing,
    /// A setting the daemon cannot work without is empty.
    #[error("{flag} ({env}) is required")]
    MissingSetting {
        /// The flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// Reading or interpreting the kubeconfig failed.
    #[error("load kubeconfig")]
    LoadKubeconfig(#[source] kube::config::KubeconfigError),
    /// Inferring the in-cluster (or default) client configuration failed.
    #[error("infer API client configuration")]
    InferConfig(#[source] kube::config::InferConfigError),
    /// Building the API client failed.
    #[error("build API client")]
    BuildClient(#[source] kube::Error),
    /// Registering the metrics failed (a name registered twice: a bug).
    #[error("register metrics")]
    RegisterMetrics(#[source] prometheus::Error),
    /// Binding or serving the metrics endpoint failed.
    #[error("serve HTTP on {addr}")]
    ServeHttp {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Labelling the daemon's own pod with its clique ID failed.
    #[error("label Pod {namespace}/{name} with its clique ID")]
    LabelPod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Reading a file under the container root failed.
    #[error("read {}", path.display())]
    ReadFile {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file under the container root failed.
    #[error("write {}", path.display())]
    WriteFile {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The IMEX config template could not be rendered.
    #[error("render {}", path.display())]
    RenderTemplate {
        /// The template (host path), or `<built-in>`.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::config::TemplateError,
    },
    /// Starting `nvidia-imex` failed.
    #[error("start {}", program.display())]
    StartImex {
        /// The program (host path).
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Installing a signal handler failed.
    #[error("install signal handler")]
    Signal(#[source] std::io::Error),
    /// Building the async runtime failed.
    #[error("build async runtime")]
    Runtime(#[source] std::io::Error),
    /// Running `nvidia-imex-ctl` failed.
    #[error("run {}", program.display())]
    RunImexCtl {
        /// The program (host path).
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nvidia-imex-ctl` did not answer in time.
    #[error("{} did not answer within {timeout:?}", program.display())]
    ImexCtlTimedOut {
        /// The program (host path).
        program: PathBuf,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// `nvidia-imex-ctl -q` answered something other than `READY`.
    #[error("IMEX daemon not ready: nvidia-imex-ctl exited with {status} and printed {output:?}")]
    NotReady {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stdout and stderr.
        output: String,
    },
}

/// `err` and its sources on one line, `: `-separated.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn chain_joins_sources() {
        let err = Error::WriteFile {
            path: "/r/etc/hosts".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(chain(&err), "write /r/etc/hosts: denied");
        assert_eq!(
            chain(&Error::MissingSetting {
                flag: "--pod-ip",
                env: "POD_IP"
            }),
            "--pod-ip (POD_IP) is required"
        );
    }
}

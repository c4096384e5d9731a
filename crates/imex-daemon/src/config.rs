//! The files `nvidia-imex` reads: its config (`imexd.cfg`) and its node list (`nodes.cfg`).
//!
//! The config is rendered from the template the agent copies into the domain directory
//! (`/imexd/imexd.cfg.tmpl`), or from [`BUILTIN_TEMPLATE`] when there is none. Templates use
//! upstream's two placeholders, `{{.IMEXCmdBindInterfaceIP}}` and
//! `{{.IMEXDaemonNodesConfigPath}}` (spaces inside the braces allowed), so a template written
//! for the Go daemon renders the same here. Any other placeholder is an error rather than left
//! in the file, where `nvidia-imex` would fail on it much later and less clearly.
//!
//! DNS-names mode: `nodes.cfg` is static and lists `compute-domain-daemon-0000` … one name per
//! possible index; which pod answers to which name is decided in `/etc/hosts` (see
//! [`crate::hosts`]), so membership changes never rewrite this file.

/// Placeholder for the pod IP the IMEX daemon binds to.
pub const BIND_IP_PLACEHOLDER: &str = ".IMEXCmdBindInterfaceIP";
/// Placeholder for the container path of `nodes.cfg`.
pub const NODES_PATH_PLACEHOLDER: &str = ".IMEXDaemonNodesConfigPath";

/// The config used when the domain directory holds no template: upstream's keys and values
/// (§9 of the compatibility contract), logging to stderr, no daemonizing (we supervise it).
pub const BUILTIN_TEMPLATE: &str = "\
# Rendered by nvdra-imex-daemon.
LOG_FILE_NAME=
LOG_LEVEL=4
LOG_APPEND_TO_LOG=1
DAEMONIZE=0
IMEX_CMD_BIND_INTERFACE_IP={{.IMEXCmdBindInterfaceIP}}
IMEX_NODE_CONFIG_FILE={{.IMEXDaemonNodesConfigPath}}
SERVER_PORT=50000
IMEX_CMD_PORT=50005
IMEX_CMD_ENABLED=1
IMEX_WAIT_FOR_QUORUM=RECOVERY
IMEX_ENABLE_AUTH_ENCRYPTION=0
IMEX_NODE_DISCONNECTED_GRACE_TIME=-1
";

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` without a closing `}}`.
    #[error("unclosed placeholder at byte {offset}")]
    Unclosed {
        /// Byte offset of the `{{`.
        offset: usize,
    },
    /// A placeholder other than the two known ones.
    #[error("unknown placeholder {{{{{name}}}}}")]
    Unknown {
        /// The text between the braces, trimmed.
        name: String,
    },
}

/// Fills `template`'s placeholders with the pod IP and the container path of `nodes.cfg`.
pub fn render(template: &str, pod_ip: &str, nodes_path: &str) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(TemplateError::Unclosed {
                offset: template.len() - rest.len() + start,
            });
        };
        match after[..end].trim() {
            BIND_IP_PLACEHOLDER => out.push_str(pod_ip),
            NODES_PATH_PLACEHOLDER => out.push_str(nodes_path),
            other => {
                return Err(TemplateError::Unknown {
                    name: other.to_owned(),
                });
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The stable DNS name of the daemon with `index`: `compute-domain-daemon-%04d`.
pub fn dns_name(index: u32) -> String {
    format!("compute-domain-daemon-{index:04}")
}

/// `nodes.cfg` in DNS-names mode: one name per possible index, one per line.
pub fn nodes_cfg(max_nodes: u32) -> String {
    (0..max_nodes).map(|i| dns_name(i) + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn render_fills_both_placeholders_and_rejects_others() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("", Ok("")),
            ("A=1\n", Ok("A=1\n")),
            (
                "IP={{.IMEXCmdBindInterfaceIP}}\nN={{ .IMEXDaemonNodesConfigPath }}\n",
                Ok("IP=10.0.0.7\nN=/imexd/nodes.cfg\n"),
            ),
            (
                "{{.IMEXCmdBindInterfaceIP}}{{.IMEXCmdBindInterfaceIP}}",
                Ok("10.0.0.710.0.0.7"),
            ),
            ("X={{.Other}}", Err("unknown placeholder {{.Other}}")),
            (
                "X=1\nY={{.IMEXCmdBindInterfaceIP",
                Err("unclosed placeholder at byte 6"),
            ),
        ];
        for (template, want) in cases {
            let got = render(template, "10.0.0.7", "/imexd/nodes.cfg").map_err(|e| e.to_string());
            assert_eq!(
                got,
                want.map(str::to_owned).map_err(str::to_owned),
                "{template:?}"
            );
        }
    }

    #[test]
    fn builtin_template_carries_upstreams_keys() {
        let got = render(BUILTIN_TEMPLATE, "127.1.3.2", "/imexd/nodes.cfg").unwrap();
        let keys: Vec<&str> = got
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("LOG_"))
            .collect();
        assert_eq!(
            keys,
            [
                "DAEMONIZE=0",
                "IMEX_CMD_BIND_INTERFACE_IP=127.1.3.2",
                "IMEX_NODE_CONFIG_FILE=/imexd/nodes.cfg",
                "SERVER_PORT=50000",
                "IMEX_CMD_PORT=50005",
                "IMEX_CMD_ENABLED=1",
                "IMEX_WAIT_FOR_QUORUM=RECOVERY",
                "IMEX_ENABLE_AUTH_ENCRYPTION=0",
                "IMEX_NODE_DISCONNECTED_GRACE_TIME=-1",
            ]
        );
    }

    #[test]
    fn nodes_cfg_lists_one_name_per_index() {
        assert_eq!(nodes_cfg(0), "");
        assert_eq!(
            nodes_cfg(3),
            "compute-domain-daemon-0000\ncompute-domain-daemon-0001\ncompute-domain-daemon-0002\n"
        );
        assert_eq!(nodes_cfg(18).lines().count(), 18);
        assert_eq!(dns_name(17), "compute-domain-daemon-0017");
        assert_eq!(dns_name(12345), "compute-domain-daemon-12345");
    }
}

//! Command-line flags; every flag can also be given as an `NVDRA_EMU_*`
//! environment variable. The flag names are a contract with the e2e
//! orchestrator, so they only ever gain entries.
//!
//! Parsers here reject malformed values at start-up with a message naming
//! the flag's expected form, so a typo in the orchestrator fails fast
//! instead of producing a node with a missing label or capacity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Capacity a simulated node reports when `--capacity` does not say otherwise.
pub const DEFAULT_CAPACITY: &str = "cpu=16,memory=128Gi,pods=110,ephemeral-storage=100Gi";

/// Plays the kubelet of one simulated node against a real API server.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "nvdra-kubelet-emulator", version)]
pub struct Args {
    /// Kubeconfig for user system:node:<node-name> (group system:nodes).
    #[arg(long, env = "NVDRA_EMU_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: PathBuf,

    /// Name of the Node this emulator registers and serves.
    #[arg(long, env = "NVDRA_EMU_NODE_NAME", value_name = "NAME")]
    pub node_name: String,

    /// Node root: plugins_registry/, plugins/, cdi/ and pods/<uid>/ live here.
    #[arg(long, env = "NVDRA_EMU_ROOT_DIR", value_name = "DIR")]
    pub root_dir: PathBuf,

    /// Extra Node label (repeatable; comma-separated in the env var).
    #[arg(long = "label", env = "NVDRA_EMU_LABEL", value_name = "KEY=VALUE",
          value_parser = parse_label, value_delimiter = ',')]
    pub labels: Vec<(String, String)>,

    /// Node capacity (also its allocatable); entries override the defaults.
    #[arg(long, env = "NVDRA_EMU_CAPACITY", value_name = "NAME=QTY,...",
          default_value = DEFAULT_CAPACITY, value_parser = parse_capacity)]
    pub capacity: Capacity,

    /// Run containers whose image repository is REPO as local processes from
    /// BIN_DIR (repeatable; comma-separated in the env var).
    #[arg(long = "local-image", env = "NVDRA_EMU_LOCAL_IMAGE", value_name = "REPO=BIN_DIR",
          value_parser = parse_local_image, value_delimiter = ',')]
    pub local_images: Vec<LocalImage>,

    /// How often the node Lease is renewed; Node status is re-posted every
    /// fourth interval.
    #[arg(long, env = "NVDRA_EMU_HEARTBEAT_INTERVAL", value_name = "DURATION",
          default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// A /24 pod network (e.g. `127.1.3.0/24`): the node's InternalIP is `.1` and each pod
    /// gets the lowest free address from `.2`. Unset: everything uses 127.0.0.1.
    #[arg(long, env = "NVDRA_EMU_POD_CIDR", value_name = "A.B.C.0/24",
          value_parser = crate::ipam::parse_pod_cidr)]
    pub pod_cidr: Option<crate::ipam::PodCidr>,
}

/// Resource name → quantity, defaults merged under the given entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity(pub BTreeMap<String, String>);

/// Containers from image repository `repo` run as programs from `bin_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// The image reference without tag or digest.
    pub repo: String,
    /// Where the programs named by `command[0]` are found.
    pub bin_dir: PathBuf,
}

fn split_pair<'a>(s: &'a str, form: &str) -> Result<(&'a str, &'a str), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => Err(format!("{s:?} is not of the form {form}")),
    }
}

/// `KEY=VALUE`; the value may be empty, the key may not.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = split_pair(s, "KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `NAME=QTY,...` merged over [`DEFAULT_CAPACITY`].
pub fn parse_capacity(s: &str) -> Result<Capacity, String> {
    let mut out = BTreeMap::new();
    for list in [DEFAULT_CAPACITY, s] {
        for entry in list.split(',').filter(|e| !e.trim().is_empty()) {
            let (k, v) = split_pair(entry.trim(), "NAME=QUANTITY")?;
            if v.is_empty() {
                return Err(format!("{entry:?} has an empty quantity"));
            }
            out.insert(k.to_owned(), v.to_owned());
        }
    }
    Ok(Capacity(out))
}

/// `REPO=BIN_DIR`; both parts non-empty, REPO without tag or digest.
pub fn parse_local_image(s: &str) -> Result<LocalImage, String> {
    let (repo, dir) = split_pair(s, "REPO=BIN_DIR")?;
    if dir.is_empty() {
        return Err(format!("{s:?} has an empty BIN_DIR"));
    }
    if crate::container::image_repo(repo) != repo {
        return Err(format!(
            "{repo:?} carries a tag or digest; give the bare repository"
        ));
    }
    Ok(LocalImage {
        repo: repo.to_owned(),
        bin_dir: PathBuf::from(dir),
    })
}

/// `10s`, `500ms`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 10s, 500ms or 2m");
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(bad()),
    };
    if seconds <= 0.0 || !seconds.is_finite() {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use pretty_assertions::assert_eq;

    #[test]
    fn value_parsers_accept_their_forms_and_name_them_in_errors() {
        assert_eq!(parse_label("a/b=c"), Ok(("a/b".into(), "c".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        assert_eq!(
            parse_label("=v"),
            Err(r#""=v" is not of the form KEY=VALUE"#.into())
        );
        assert_eq!(
            parse_label("kv"),
            Err(r#""kv" is not of the form KEY=VALUE"#.into())
        );
        assert_eq!(
            parse_local_image("ghcr.io/x/nvdra=/opt/bin"),
            Ok(LocalImage {
                repo: "ghcr.io/x/nvdra".into(),
                bin_dir: "/opt/bin".into()
            })
        );
        assert_eq!(
            parse_local_image("nvdra:v1=/opt/bin"),
            Err(r#""nvdra:v1" carries a tag or digest; give the bare repository"#.into())
        );
        assert_eq!(
            parse_local_image("nvdra="),
            Err(r#""nvdra=" has an empty BIN_DIR"#.into())
        );
        let cases: &[(&str, Result<Duration, &str>)] = &[
            ("10s", Ok(Duration::from_secs(10))),
            ("250ms", Ok(Duration::from_millis(250))),
            ("2m", Ok(Duration::from_secs(120))),
            ("3", Ok(Duration::from_secs(3))),
            ("1.5s", Ok(Duration::from_millis(1500))),
            ("0s", Err(r#""0s" must be positive"#)),
            (
                "10h",
                Err(r#""10h" is not a duration like 10s, 500ms or 2m"#),
            ),
            ("s", Err(r#""s" is not a duration like 10s, 500ms or 2m"#)),
        ];
        for (given, want) in cases {
            assert_eq!(
                parse_duration(given),
                want.map_err(str::to_owned),
                "{given}"
            );
        }
    }

    #[test]
    fn capacity_entries_override_defaults() {
        let got = parse_capacity("cpu=4,nvidia.com/x=2").unwrap();
        let want: BTreeMap<String, String> = [
            ("cpu", "4"),
            ("ephemeral-storage", "100Gi"),
            ("memory", "128Gi"),
            ("nvidia.com/x", "2"),
            ("pods", "110"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(got, Capacity(want));
        assert_eq!(
            parse_capacity("cpu="),
            Err(r#""cpu=" has an empty quantity"#.into())
        );
    }

    #[test]
    fn repeatable_flags_collect_in_order() {
        let args = Args::try_parse_from([
            "emu",
            "--kubeconfig=/k",
            "--node-name=n",
            "--root-dir=/r",
            "--label=a=1",
            "--label=b=2",
            "--local-image=img=/bin1",
            "--heartbeat-interval=1s",
        ])
        .unwrap();
        assert_eq!(
            args.labels,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(args.local_images.len(), 1);
        assert_eq!(args.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(args.capacity, parse_capacity("").unwrap());
        assert_eq!(args.pod_cidr, None);
        let with_cidr = Args::try_parse_from([
            "emu",
            "--kubeconfig=/k",
            "--node-name=n",
            "--root-dir=/r",
            "--pod-cidr=127.1.3.0/24",
        ])
        .unwrap();
        assert_eq!(
            with_cidr.pod_cidr.map(|c| c.to_string()).as_deref(),
            Some("127.1.3.0/24")
        );
    }
}

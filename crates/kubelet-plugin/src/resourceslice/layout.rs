//! Where shared counters go, decided by the API server version.
//!
//! Kubernetes 1.34 resolves `consumesCounters[].counterSet` within the consuming device's own
//! slice, so counter sets must be published next to their consumers. From 1.35 counter sets are
//! resolved across the pool and a slice may hold `devices` or `sharedCounters`, never both: the
//! server rejects combined slices. The caller learns the version once (`GET /version`, e.g.
//! `kube::Client::apiserver_version`) and maps it with [`CounterLayout::for_server_version`].
//!
//! Failure mode: a version string we cannot read is an error rather than a guess, because
//! either wrong guess makes every write fail (1.35+) or the counters unusable (1.34).

use k8s_openapi::apimachinery::pkg::version::Info;

use super::Error;

/// How shared counters and devices are arranged into slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterLayout {
    /// Kubernetes < 1.35: each group of counter sets shares a slice with the devices consuming
    /// from it; devices without counters fill further slices.
    Combined,
    /// Kubernetes ≥ 1.35: counters-only slices first, then device-only slices.
    Separate,
}

impl CounterLayout {
    /// The first minor release of Kubernetes 1.x that wants counters in their own slices.
    pub const SEPARATE_SINCE_MINOR: u32 = 35;

    /// Layout for a server version `major.minor`.
    pub fn for_version(major: u32, minor: u32) -> Self {
        if major > 1 || (major == 1 && minor >= Self::SEPARATE_SINCE_MINOR) {
            Self::Separate
        } else {
            Self::Combined
        }
    }

    /// Layout for a server's `version.Info`.
    ///
    /// Uses the emulated version when the server reports one (a 1.35 binary emulating 1.34
    /// validates like 1.34), else `major`/`minor` (suffixes such as `"35+"` are ignored), else
    /// the `gitVersion` (`v1.35.2-gke.100`).
    pub fn for_server_version(info: &Info) -> Result<Self, Error> {
        let emulated = match (&info.emulation_major, &info.emulation_minor) {
            (Some(major), Some(minor)) => leading_number(major).zip(leading_number(minor)),
            _ => None,
        };
        let (major, minor) = emulated
            .or_else(|| leading_number(&info.major).zip(leading_number(&info.minor)))
            .or_else(|| git_version(&info.git_version))
            .ok_or_else(|| Error::ServerVersion(describe(info)))?;
        Ok(Self::for_version(major, minor))
    }
}

/// The decimal number a version component starts with: `"35+"` → 35, `""` → none.
fn leading_number(component: &str) -> Option<u32> {
    let end = component
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(component.len());
    component[..end].parse().ok()
}

/// `v1.35.2-gke.100` → (1, 35).
fn git_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.strip_prefix('v')?.split('.');
    let major = leading_number(parts.next()?)?;
    let minor = leading_number(parts.next()?)?;
    Some((major, minor))
}

fn describe(info: &Info) -> String {
    format!(
        "major={:?} minor={:?} gitVersion={:?}",
        info.major, info.minor, info.git_version
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(major: &str, minor: &str, git: &str) -> Info {
        Info {
            major: major.into(),
            minor: minor.into(),
            git_version: git.into(),
            ..Info::default()
        }
    }

    #[test]
    fn maps_versions_to_layouts() {
        let cases = [
            (info("1", "34", "v1.34.1"), CounterLayout::Combined),
            (info("1", "35", "v1.35.0"), CounterLayout::Separate),
            (info("1", "35+", "v1.35.0-eks-1"), CounterLayout::Separate),
            (info("1", "34+", ""), CounterLayout::Combined),
            (info("1", "36", ""), CounterLayout::Separate),
            (info("2", "0", ""), CounterLayout::Separate),
            (info("", "", "v1.35.2-gke.100"), CounterLayout::Separate),
            (info("", "", "v1.34.0"), CounterLayout::Combined),
            (
                Info {
                    emulation_major: Some("1".into()),
                    emulation_minor: Some("34".into()),
                    ..info("1", "35", "v1.35.0")
                },
                CounterLayout::Combined,
            ),
        ];
        for (info, want) in cases {
            assert_eq!(
                CounterLayout::for_server_version(&info).unwrap(),
                want,
                "{info:?}"
            );
        }
    }

    #[test]
    fn unreadable_version_is_an_error() {
        let err = CounterLayout::for_server_version(&info("", "x", "devel")).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unrecognised API server version "major=\"\" minor=\"x\" gitVersion=\"devel\"""#
        );
    }
}

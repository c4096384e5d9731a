//! Device names as the upstream driver publishes them in ResourceSlices, and
//! the parser back.
//!
//! - full GPU: `gpu-<minor>` (`gpu-0`)
//! - MIG: `gpu-<parentMinor>-mig-<profile slug>-<giProfileId>-<placementStart>`
//!   (`gpu-1-mig-2g47gb-14-0`), where the slug is the profile name without
//!   dots, lower-cased, with anything outside `[a-z0-9-]` turned into `-` and
//!   leading/trailing `-` trimmed (`1g.10gb+me` → `1g10gb-me`).
//!
//! Invariants: names are valid DRA device names (DNS labels) for any profile
//! NVML reports; [`DeviceName::parse`] accepts exactly the names these
//! functions produce (the slug is not mapped back to a profile name, since
//! `+me` and `-me` share a slug: the GI profile ID disambiguates).

use std::fmt;

use crate::Error;

/// `gpu-<minor>`.
pub fn gpu_device_name(minor: u32) -> String {
    format!("gpu-{minor}")
}

/// `gpu-<parentMinor>-mig-<slug>-<giProfileId>-<placementStart>`.
pub fn mig_device_name(
    parent_minor: u32,
    profile: &str,
    gi_profile_id: u32,
    placement_start: u32,
) -> String {
    format!(
        "gpu-{parent_minor}-mig-{}-{gi_profile_id}-{placement_start}",
        profile_slug(profile)
    )
}

/// The profile part of a MIG device name: no dots, lower case, characters
/// outside `[a-z0-9-]` replaced by `-`, outer `-` trimmed, at most 253 bytes.
pub fn profile_slug(profile: &str) -> String {
    let slug: String = profile
        .chars()
        .filter(|&c| c != '.')
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut slug = slug.trim_matches('-').to_owned();
    slug.truncate(253);
    slug
}

/// A parsed device name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceName {
    /// A full GPU.
    Gpu {
        /// Its minor number.
        minor: u32,
    },
    /// A MIG device.
    Mig(MigDeviceName),
}

/// The parts of a MIG device name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MigDeviceName {
    /// Minor number of the parent GPU.
    pub parent_minor: u32,
    /// The profile slug (e.g. `1g10gb`), not the profile name.
    pub profile_slug: String,
    /// GPU-instance profile ID.
    pub gi_profile_id: u32,
    /// First memory slice of the placement.
    pub placement_start: u32,
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gpu { minor } => write!(f, "gpu-{minor}"),
            Self::Mig(m) => write!(
                f,
                "gpu-{}-mig-{}-{}-{}",
                m.parent_minor, m.profile_slug, m.gi_profile_id, m.placement_start
            ),
        }
    }
}

impl DeviceName {
    /// Parses `gpu-<minor>` or a MIG device name.
    pub fn parse(name: &str) -> Result<Self, Error> {
        let err = |reason: &str| Error::ParseDeviceName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = name
            .strip_prefix("gpu-")
            .ok_or_else(|| err("does not start with `gpu-`"))?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let minor = parse_decimal(&rest[..digits]).ok_or_else(|| err("no GPU minor number"))?;
        let rest = &rest[digits..];
        if rest.is_empty() {
            return Ok(Self::Gpu { minor });
        }
        let mig = rest
            .strip_prefix("-mig-")
            .ok_or_else(|| err("expected `-mig-` after the GPU minor number"))?;
        // The slug may itself contain `-`; the last two fields are numbers.
        let mut fields = mig.rsplitn(3, '-');
        let (Some(start), Some(gi), Some(slug)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(err(
                "expected `<profile>-<giProfileId>-<placementStart>` after `-mig-`",
            ));
        };
        if slug.is_empty() {
            return Err(err("empty MIG profile"));
        }
        let gi_profile_id =
            parse_decimal(gi).ok_or_else(|| err("GPU-instance profile ID is not a number"))?;
        let placement_start =
            parse_decimal(start).ok_or_else(|| err("placement start is not a number"))?;
        Ok(Self::Mig(MigDeviceName {
            parent_minor: minor,
            profile_slug: slug.to_owned(),
            gi_profile_id,
            placement_start,
        }))
    }
}

fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        let cases = [
            ("1g.10gb", "1g10gb"),
            ("2g.47gb", "2g47gb"),
            ("1g.10gb+me", "1g10gb-me"),
            ("1g.24gb-me", "1g24gb-me"),
            ("1g.10gb+me.all", "1g10gb-meall"),
            ("1c.2g.20gb", "1c2g20gb"),
            ("4g.96gb+gfx", "4g96gb-gfx"),
            ("+Weird_", "weird"),
        ];
        for (profile, want) in cases {
            assert_eq!(profile_slug(profile), want, "{profile}");
        }
    }

    #[test]
    fn mig_names_round_trip() {
        let cases = [
            (1, "2g.47gb", 14, 0, "gpu-1-mig-2g47gb-14-0"),
            (0, "1g.10gb+me", 20, 6, "gpu-0-mig-1g10gb-me-20-6"),
            (17, "1c.2g.20gb", 14, 4, "gpu-17-mig-1c2g20gb-14-4"),
        ];
        for (minor, profile, gi, start, want) in cases {
            let name = mig_device_name(minor, profile, gi, start);
            assert_eq!(name, want);
            let parsed = DeviceName::parse(&name).unwrap();
            assert_eq!(
                parsed,
                DeviceName::Mig(MigDeviceName {
                    parent_minor: minor,
                    profile_slug: profile_slug(profile),
                    gi_profile_id: gi,
                    placement_start: start,
                })
            );
            assert_eq!(parsed.to_string(), name);
        }
    }

    #[test]
    fn gpu_names_round_trip() {
        assert_eq!(gpu_device_name(7), "gpu-7");
        assert_eq!(
            DeviceName::parse("gpu-7").unwrap(),
            DeviceName::Gpu { minor: 7 }
        );
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("channel-0", "does not start with `gpu-`"),
            ("gpu-", "no GPU minor number"),
            ("gpu-x", "no GPU minor number"),
            ("gpu-vfio-0", "no GPU minor number"),
            ("gpu-0-foo", "expected `-mig-` after the GPU minor number"),
            (
                "gpu-0-mig-14-0",
                "expected `<profile>-<giProfileId>-<placementStart>` after `-mig-`",
            ),
            ("gpu-0-mig--14-0", "empty MIG profile"),
            (
                "gpu-0-mig-1g10gb-x-0",
                "GPU-instance profile ID is not a number",
            ),
            ("gpu-0-mig-1g10gb-19-", "placement start is not a number"),
            ("gpu-99999999999", "no GPU minor number"),
        ];
        for (name, reason) in cases {
            let err = DeviceName::parse(name).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid device name {name:?}: {reason}"),
                "{name}"
            );
        }
    }
}

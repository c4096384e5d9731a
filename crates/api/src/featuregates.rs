//! Feature gates shared by every nvdra component.
//!
//! The gate names, defaults and stages are upstream's, so the chart's `featureGates` map and the
//! `FEATURE_GATES` / `--feature-gates` value (`Name=true,Other=false`) mean the same to nvdra.
//! One [`FeatureGates`] value is parsed at startup and passed down explicitly (no global);
//! components hand it to child processes via its [`Display`](fmt::Display) form, which lists
//! every gate and parses back to an equal value.
//!
//! Parsing ([`FromStr`]) also runs [`FeatureGates::validate`], so a value accepted as a clap
//! argument is always consistent: gates that depend on each other or exclude each other are
//! rejected at startup with an error naming both gates.
//!
//! The chart hands one `FEATURE_GATES` string to every component, and upstream's components parse
//! it with Kubernetes' component-base registry, so nvdra also accepts that registry's generic
//! names: `AllAlpha` / `AllBeta` set every Alpha / Beta gate of ours that the same string does not
//! name explicitly (an explicit entry wins wherever it appears), and `ContextualLogging`,
//! `LoggingAlphaOptions`, `LoggingBetaOptions` are accepted for compatibility only and change
//! nothing (nvdra's logging is always structured and contextual). None of these five appear in the
//! [`Display`](fmt::Display) form: it already carries the expanded per-gate values. Validation runs
//! after the expansion, so `AllAlpha=true` alone is refused (it enables mutually exclusive gates),
//! as it would be upstream.
//!
//! Two Beta gates are locked on ([`FeatureGate::locked_on`]): `IMEXDaemonsWithDNSNames` and
//! `ComputeDomainCliques` select how IMEX daemons address peers and where they publish
//! membership, and nvdra implements only the on side (upstream's off side is its legacy
//! behaviour). Setting either to false is refused with the reason rather than accepted and
//! ignored; `AllBeta=false` leaves them on, as component-base's `AllBeta` leaves locked gates.

use std::fmt;
use std::str::FromStr;

/// Maturity of a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Off by default, may change or disappear.
    Alpha,
    /// On or off by default, well tested.
    Beta,
}

impl Stage {
    /// `Alpha` or `Beta`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alpha => "Alpha",
            Self::Beta => "Beta",
        }
    }
}

macro_rules! gates {
    ($($(#[$doc:meta])* $variant:ident = $default:literal, $stage:ident;)*) => {
        /// A feature gate, named as upstream.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum FeatureGate {
            $($(#[$doc])* $variant,)*
        }

        impl FeatureGate {
            /// Every gate, in declaration (and `Display`) order.
            pub const ALL: &'static [FeatureGate] = &[$(FeatureGate::$variant,)*];

            /// The gate's name as written in `--feature-gates`.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => stringify!($variant),)* }
            }

            /// Whether the gate is on when not set.
            pub fn default_enabled(self) -> bool {
                match self { $(Self::$variant => $default,)* }
            }

            /// The gate's maturity.
            pub fn stage(self) -> Stage {
                match self { $(Self::$variant => Stage::$stage,)* }
            }
        }
    };
}

gates! {
    /// `sharing.strategy: TimeSlicing` and time-slice intervals; TimeSlicing becomes the
    /// implied default sharing.
    TimeSlicingSettings = false, Alpha;
    /// `sharing.strategy: MPS` (per-claim MPS control daemon).
    MPSSupport = false, Alpha;
    /// IMEX peers addressed by stable DNS names instead of IPs.
    IMEXDaemonsWithDNSNames = true, Beta;
    /// VFIO passthrough devices.
    PassthroughSupport = false, Alpha;
    /// Dynamic MIG partitioning (KEP-4815 partitionable devices).
    DynamicMIG = false, Alpha;
    /// NVML health events as device taints (KEP-5055).
    NVMLDeviceHealthCheck = false, Alpha;
    /// Per-daemon rows in ComputeDomainClique objects instead of ComputeDomain status.
    ComputeDomainCliques = true, Beta;
    /// The compute-domain plugin fails startup on NVLink fabric errors.
    CrashOnNVLinkFabricErrors = true, Beta;
    /// Device metadata on prepared devices (KEP-5304).
    DeviceMetadata = false, Alpha;
}

impl FeatureGate {
    /// Looks a gate up by its exact (case-sensitive) name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|g| g.name() == name)
    }
}

impl fmt::Display for FeatureGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Sets every Alpha gate not named explicitly in the same string.
const ALL_ALPHA: &str = "AllAlpha";
/// Sets every Beta gate not named explicitly in the same string.
const ALL_BETA: &str = "AllBeta";
/// component-base logging gates: accepted so a shared `FEATURE_GATES` string parses, but they
/// have no effect because nvdra's logging is always structured and contextual.
const LOGGING_GATES: &[&str] = &[
    "ContextualLogging",
    "LoggingAlphaOptions",
    "LoggingBetaOptions",
];

/// Comma-separated names of every gate and every accepted generic name, for error messages.
fn known_gates() -> String {
    FeatureGate::ALL
        .iter()
        .map(|g| g.name())
        .chain([ALL_ALPHA, ALL_BETA])
        .chain(LOGGING_GATES.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a name in `--feature-gates` refers to.
enum Entry {
    Gate(FeatureGate),
    AllAlpha,
    AllBeta,
    /// Accepted for compatibility, no effect.
    Ignored,
}

impl Entry {
    fn from_name(name: &str) -> Option<Self> {
        if let Some(gate) = FeatureGate::from_name(name) {
            return Some(Self::Gate(gate));
        }
        match name {
            ALL_ALPHA => Some(Self::AllAlpha),
            ALL_BETA => Some(Self::AllBeta),
            _ if LOGGING_GATES.contains(&name) => Some(Self::Ignored),
            _ => None,
        }
    }
}

/// Parsing or validating feature gates failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeatureGateError {
    /// An entry is not `Name=value`.
    #[error("invalid feature gate entry {entry:?}: expected Name=true or Name=false")]
    MissingValue {
        /// The entry as written.
        entry: String,
    },
    /// The name is not a known gate.
    #[error("unknown feature gate {name:?}; known gates: {known}")]
    UnknownGate {
        /// The unknown name.
        name: String,
        /// Every known gate and accepted generic name.
        known: String,
    },
    /// The value is not a boolean.
    #[error("invalid value {value:?} for feature gate {gate}: expected true or false")]
    InvalidValue {
        /// The gate or generic name (such as `AllAlpha`) as written.
        gate: String,
        /// The rejected value.
        value: String,
    },
    /// A gate is enabled without a gate it builds on.
    #[error("feature gate {gate} requires feature gate {required} to be enabled")]
    MissingDependency {
        /// The enabled gate.
        gate: FeatureGate,
        /// The disabled gate it needs.
        required: FeatureGate,
    },
    /// A gate nvdra implements only enabled was disabled.
    #[error("feature gate {gate} cannot be disabled in nvdra ({why}); remove {gate}=false")]
    LockedOn {
        /// The gate.
        gate: FeatureGate,
        /// Why only its enabled side exists.
        why: &'static str,
    },
    /// Two gates that cannot work together are both enabled.
    #[error("feature gates {first} and {second} are mutually exclusive; enable at most one")]
    MutuallyExclusive {
        /// One gate.
        first: FeatureGate,
        /// The other gate.
        second: FeatureGate,
    },
}

/// Gates nvdra implements only enabled, with why the disabled side does not exist here.
const LOCKED_ON: &[(FeatureGate, &str)] = &[
    (
        FeatureGate::IMEXDaemonsWithDNSNames,
        "nvdra's IMEX daemons always give nvidia-imex a static config of stable DNS names \
         and map them to peer IPs in /etc/hosts, so a peer whose IP changed needs no restart",
    ),
    (
        FeatureGate::ComputeDomainCliques,
        "nvdra's IMEX daemons always publish membership as their own rows of \
         ComputeDomainClique objects; upstream's alternative, all daemons rewriting one \
         ComputeDomain status, is what caused its 409 storms",
    ),
];

impl FeatureGate {
    /// Why this gate cannot be disabled in nvdra, if it cannot.
    pub fn locked_on(self) -> Option<&'static str> {
        LOCKED_ON
            .iter()
            .find(|(gate, _)| *gate == self)
            .map(|(_, why)| *why)
    }
}

/// `gate` needs `required` to be enabled too.
const DEPENDENCIES: &[(FeatureGate, FeatureGate)] = &[
    (
        FeatureGate::ComputeDomainCliques,
        FeatureGate::IMEXDaemonsWithDNSNames,
    ),
    (FeatureGate::DeviceMetadata, FeatureGate::PassthroughSupport),
];

/// Pairs that must not both be enabled. Unlike upstream, DynamicMIG works
/// with NVMLDeviceHealthCheck (events on created MIG devices taint their
/// partitions).
const EXCLUSIONS: &[(FeatureGate, FeatureGate)] = &[
    (FeatureGate::DynamicMIG, FeatureGate::PassthroughSupport),
    (FeatureGate::DynamicMIG, FeatureGate::MPSSupport),
    (
        FeatureGate::PassthroughSupport,
        FeatureGate::NVMLDeviceHealthCheck,
    ),
];

/// The effective value of every gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureGates {
    enabled: [bool; FeatureGate::ALL.len()],
}

impl Default for FeatureGates {
    /// Every gate at its default.
    fn default() -> Self {
        let mut enabled = [false; FeatureGate::ALL.len()];
        for gate in FeatureGate::ALL {
            enabled[*gate as usize] = gate.default_enabled();
        }
        Self { enabled }
    }
}

impl FeatureGates {
    /// Whether `gate` is on.
    pub fn enabled(&self, gate: FeatureGate) -> bool {
        self.enabled[gate as usize]
    }

    /// Sets `gate`. Does not validate: call [`validate`](Self::validate) when done.
    pub fn set(&mut self, gate: FeatureGate, enabled: bool) {
        self.enabled[gate as usize] = enabled;
    }

    /// A copy with `gate` set; handy in tests and builders.
    #[must_use]
    pub fn with(mut self, gate: FeatureGate, enabled: bool) -> Self {
        self.set(gate, enabled);
        self
    }

    /// Parses `Name=bool,…` on top of the defaults without checking dependencies. Whitespace
    /// around names and values and empty entries are ignored; a later entry for the same name
    /// wins. Values accept Go's `strconv.ParseBool` spellings (`true`, `1`, `T`, `FALSE`, …).
    /// `AllAlpha` / `AllBeta` apply to the gates of that stage not named explicitly, wherever
    /// they appear; the logging gates are accepted and ignored (see the module docs).
    pub fn parse_unvalidated(text: &str) -> Result<Self, FeatureGateError> {
        let mut explicit = [None::<bool>; FeatureGate::ALL.len()];
        let mut all_alpha = None;
        let mut all_beta = None;
        for entry in text.split(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some((name, value)) = entry.split_once('=') else {
                return Err(FeatureGateError::MissingValue {
                    entry: entry.to_owned(),
                });
            };
            let name = name.trim();
            let target = Entry::from_name(name).ok_or_else(|| FeatureGateError::UnknownGate {
                name: name.to_owned(),
                known: known_gates(),
            })?;
            let value = value.trim();
            let enabled = parse_bool(value).ok_or_else(|| FeatureGateError::InvalidValue {
                gate: name.to_owned(),
                value: value.to_owned(),
            })?;
            match target {
                Entry::Gate(gate) => explicit[gate as usize] = Some(enabled),
                Entry::AllAlpha => all_alpha = Some(enabled),
                Entry::AllBeta => all_beta = Some(enabled),
                Entry::Ignored => {}
            }
        }
        let mut gates = Self::default();
        for &gate in FeatureGate::ALL {
            let stage_wide = match gate.stage() {
                _ if gate.locked_on().is_some() => None,
                Stage::Alpha => all_alpha,
                Stage::Beta => all_beta,
            };
            if let Some(enabled) = explicit[gate as usize].or(stage_wide) {
                gates.set(gate, enabled);
            }
        }
        Ok(gates)
    }

    /// Checks locked gates, dependencies and exclusions; reports the first violation.
    pub fn validate(&self) -> Result<(), FeatureGateError> {
        for &(gate, why) in LOCKED_ON {
            if !self.enabled(gate) {
                return Err(FeatureGateError::LockedOn { gate, why });
            }
        }
        for &(gate, required) in DEPENDENCIES {
            if self.enabled(gate) && !self.enabled(required) {
                return Err(FeatureGateError::MissingDependency { gate, required });
            }
        }
        for &(first, second) in EXCLUSIONS {
            if self.enabled(first) && self.enabled(second) {
                return Err(FeatureGateError::MutuallyExclusive { first, second });
            }
        }
        Ok(())
    }

    /// `(gate, enabled)` for every gate, in [`FeatureGate::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (FeatureGate, bool)> + '_ {
        FeatureGate::ALL.iter().map(|g| (*g, self.enabled(*g)))
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl FromStr for FeatureGates {
    type Err = FeatureGateError;

    /// [`parse_unvalidated`](Self::parse_unvalidated) followed by
    /// [`validate`](Self::validate); usable directly as a clap value parser.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let gates = Self::parse_unvalidated(s)?;
        gates.validate()?;
        Ok(gates)
    }
}

impl fmt::Display for FeatureGates {
    /// Every gate as `Name=true|false`, comma-separated, in [`FeatureGate::ALL`] order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (gate, enabled)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{gate}={enabled}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FeatureGate::*;
    use pretty_assertions::assert_eq;

    const KNOWN: &str = "TimeSlicingSettings, MPSSupport, IMEXDaemonsWithDNSNames, \
                         PassthroughSupport, DynamicMIG, NVMLDeviceHealthCheck, \
                         ComputeDomainCliques, CrashOnNVLinkFabricErrors, DeviceMetadata, \
                         AllAlpha, AllBeta, ContextualLogging, LoggingAlphaOptions, \
                         LoggingBetaOptions";

    #[test]
    fn defaults_and_stages() {
        let want = [
            (TimeSlicingSettings, false, Stage::Alpha),
            (MPSSupport, false, Stage::Alpha),
            (IMEXDaemonsWithDNSNames, true, Stage::Beta),
            (PassthroughSupport, false, Stage::Alpha),
            (DynamicMIG, false, Stage::Alpha),
            (NVMLDeviceHealthCheck, false, Stage::Alpha),
            (ComputeDomainCliques, true, Stage::Beta),
            (CrashOnNVLinkFabricErrors, true, Stage::Beta),
            (DeviceMetadata, false, Stage::Alpha),
        ];
        assert_eq!(FeatureGate::ALL.len(), want.len());
        let defaults = FeatureGates::default();
        for (gate, enabled, stage) in want {
            assert_eq!(defaults.enabled(gate), enabled, "{gate}");
            assert_eq!(gate.default_enabled(), enabled, "{gate}");
            assert_eq!(gate.stage(), stage, "{gate}");
            assert_eq!(FeatureGate::from_name(gate.name()), Some(gate));
        }
        assert_eq!(Stage::Alpha.as_str(), "Alpha");
        assert_eq!(Stage::Beta.as_str(), "Beta");
        assert_eq!(FeatureGate::from_name("mpssupport"), None);
        defaults.validate().unwrap();
    }

    #[test]
    fn parse_ok() {
        let cases: &[(&str, &[(FeatureGate, bool)])] = &[
            ("", &[]),
            ("   ", &[]),
            ("MPSSupport=true", &[(MPSSupport, true)]),
            (
                " MPSSupport = true , TimeSlicingSettings=1 ,",
                &[(MPSSupport, true), (TimeSlicingSettings, true)],
            ),
            ("ComputeDomainCliques=true,IMEXDaemonsWithDNSNames=T", &[]),
            ("MPSSupport=true,MPSSupport=False", &[(MPSSupport, false)]),
            (
                "PassthroughSupport=TRUE,DeviceMetadata=t",
                &[(PassthroughSupport, true), (DeviceMetadata, true)],
            ),
            (
                "CrashOnNVLinkFabricErrors=0",
                &[(CrashOnNVLinkFabricErrors, false)],
            ),
            // Logging gates are accepted and change nothing.
            (
                "ContextualLogging=true,LoggingAlphaOptions=false,LoggingBetaOptions=1",
                &[],
            ),
            (
                "ContextualLogging=true,DynamicMIG=true",
                &[(DynamicMIG, true)],
            ),
            (
                "DynamicMIG=true,NVMLDeviceHealthCheck=true",
                &[(DynamicMIG, true), (NVMLDeviceHealthCheck, true)],
            ),
            // AllAlpha / AllBeta cover the unnamed gates of their stage; explicit entries win
            // wherever they appear.
            (
                "AllAlpha=true,DynamicMIG=false,NVMLDeviceHealthCheck=false",
                &[
                    (TimeSlicingSettings, true),
                    (MPSSupport, true),
                    (PassthroughSupport, true),
                    (DeviceMetadata, true),
                ],
            ),
            (
                "DynamicMIG=false,NVMLDeviceHealthCheck=false,AllAlpha=true",
                &[
                    (TimeSlicingSettings, true),
                    (MPSSupport, true),
                    (PassthroughSupport, true),
                    (DeviceMetadata, true),
                ],
            ),
            ("AllAlpha=false", &[]),
            ("AllAlpha=false,MPSSupport=true", &[(MPSSupport, true)]),
            ("MPSSupport=true,AllAlpha=false", &[(MPSSupport, true)]),
            ("AllAlpha=true,AllAlpha=false", &[]),
            ("AllBeta=true", &[]),
            // Locked gates stay on.
            ("AllBeta=false", &[(CrashOnNVLinkFabricErrors, false)]),
            ("CrashOnNVLinkFabricErrors=true,AllBeta=false", &[]),
            (
                "AllBeta=false,AllAlpha=true,PassthroughSupport=false,NVMLDeviceHealthCheck=false,\
                 MPSSupport=false,DeviceMetadata=false",
                &[
                    (CrashOnNVLinkFabricErrors, false),
                    (TimeSlicingSettings, true),
                    (DynamicMIG, true),
                ],
            ),
        ];
        for (text, changes) in cases {
            let mut want = FeatureGates::default();
            for (gate, enabled) in *changes {
                want.set(*gate, *enabled);
            }
            assert_eq!(text.parse::<FeatureGates>().unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, String)] = &[
            (
                "MPSSupport",
                "invalid feature gate entry \"MPSSupport\": expected Name=true or Name=false"
                    .into(),
            ),
            (
                "Foo=true",
                format!("unknown feature gate \"Foo\"; known gates: {KNOWN}"),
            ),
            (
                "mpssupport=true",
                format!("unknown feature gate \"mpssupport\"; known gates: {KNOWN}"),
            ),
            (
                "MPSSupport=yes",
                "invalid value \"yes\" for feature gate MPSSupport: expected true or false".into(),
            ),
            (
                "MPSSupport=",
                "invalid value \"\" for feature gate MPSSupport: expected true or false".into(),
            ),
            (
                "IMEXDaemonsWithDNSNames=false",
                format!(
                    "feature gate IMEXDaemonsWithDNSNames cannot be disabled in nvdra ({}); \
                     remove IMEXDaemonsWithDNSNames=false",
                    IMEXDaemonsWithDNSNames.locked_on().unwrap()
                ),
            ),
            (
                "AllBeta=false,ComputeDomainCliques=f",
                format!(
                    "feature gate ComputeDomainCliques cannot be disabled in nvdra ({}); \
                     remove ComputeDomainCliques=false",
                    ComputeDomainCliques.locked_on().unwrap()
                ),
            ),
            (
                "DeviceMetadata=true",
                "feature gate DeviceMetadata requires feature gate PassthroughSupport to be \
                 enabled"
                    .into(),
            ),
            (
                "DynamicMIG=true,PassthroughSupport=true",
                "feature gates DynamicMIG and PassthroughSupport are mutually exclusive; \
                 enable at most one"
                    .into(),
            ),
            (
                "DynamicMIG=true,MPSSupport=true",
                "feature gates DynamicMIG and MPSSupport are mutually exclusive; enable at \
                 most one"
                    .into(),
            ),
            (
                "PassthroughSupport=true,NVMLDeviceHealthCheck=true",
                "feature gates PassthroughSupport and NVMLDeviceHealthCheck are mutually \
                 exclusive; enable at most one"
                    .into(),
            ),
            (
                "allalpha=true",
                format!("unknown feature gate \"allalpha\"; known gates: {KNOWN}"),
            ),
            (
                "AllAlpha=yes",
                "invalid value \"yes\" for feature gate AllAlpha: expected true or false".into(),
            ),
            (
                "ContextualLogging=on",
                "invalid value \"on\" for feature gate ContextualLogging: expected true or \
                 false"
                    .into(),
            ),
            (
                "LoggingBetaOptions",
                "invalid feature gate entry \"LoggingBetaOptions\": expected Name=true or \
                 Name=false"
                    .into(),
            ),
            // Validation runs after expansion: every Alpha gate on includes exclusive pairs.
            (
                "AllAlpha=true",
                "feature gates DynamicMIG and PassthroughSupport are mutually exclusive; \
                 enable at most one"
                    .into(),
            ),
            (
                "AllAlpha=true,DynamicMIG=false",
                "feature gates PassthroughSupport and NVMLDeviceHealthCheck are mutually \
                 exclusive; enable at most one"
                    .into(),
            ),
            (
                "DynamicMIG=false,AllAlpha=true",
                "feature gates PassthroughSupport and NVMLDeviceHealthCheck are mutually \
                 exclusive; enable at most one"
                    .into(),
            ),
            (
                "AllAlpha=true,PassthroughSupport=false,NVMLDeviceHealthCheck=false",
                "feature gate DeviceMetadata requires feature gate PassthroughSupport to be \
                 enabled"
                    .into(),
            ),
            (
                "AllAlpha=true,PassthroughSupport=false,NVMLDeviceHealthCheck=false,\
                 DeviceMetadata=false",
                "feature gates DynamicMIG and MPSSupport are mutually exclusive; enable at \
                 most one"
                    .into(),
            ),
        ];
        for (text, want) in cases {
            let err = text.parse::<FeatureGates>().unwrap_err();
            assert_eq!(err.to_string(), *want, "{text:?}");
        }
    }

    #[test]
    fn compatible_combinations_validate() {
        for text in [
            "ComputeDomainCliques=true,IMEXDaemonsWithDNSNames=true",
            "DeviceMetadata=true,PassthroughSupport=true",
            "DynamicMIG=true,TimeSlicingSettings=true",
            "MPSSupport=true,TimeSlicingSettings=true,NVMLDeviceHealthCheck=true",
        ] {
            text.parse::<FeatureGates>()
                .unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn unvalidated_parse_keeps_conflicts() {
        let gates = FeatureGates::parse_unvalidated("DynamicMIG=true,MPSSupport=true").unwrap();
        assert!(gates.enabled(DynamicMIG) && gates.enabled(MPSSupport));
        assert!(gates.validate().is_err());
    }

    #[test]
    fn display_round_trips() {
        assert_eq!(
            FeatureGates::default().to_string(),
            "TimeSlicingSettings=false,MPSSupport=false,IMEXDaemonsWithDNSNames=true,\
             PassthroughSupport=false,DynamicMIG=false,NVMLDeviceHealthCheck=false,\
             ComputeDomainCliques=true,CrashOnNVLinkFabricErrors=true,DeviceMetadata=false"
        );
        let gates: FeatureGates = "MPSSupport=true,CrashOnNVLinkFabricErrors=false"
            .parse()
            .unwrap();
        assert_eq!(gates.to_string().parse::<FeatureGates>().unwrap(), gates);
        // Generic names never reach Display; only their effect on our gates does.
        let gates: FeatureGates = "ContextualLogging=true,AllBeta=false,\
                                   IMEXDaemonsWithDNSNames=true,DynamicMIG=true"
            .parse()
            .unwrap();
        assert_eq!(
            gates.to_string(),
            "TimeSlicingSettings=false,MPSSupport=false,IMEXDaemonsWithDNSNames=true,\
             PassthroughSupport=false,DynamicMIG=true,NVMLDeviceHealthCheck=false,\
             ComputeDomainCliques=true,CrashOnNVLinkFabricErrors=false,DeviceMetadata=false"
        );
        assert_eq!(gates.to_string().parse::<FeatureGates>().unwrap(), gates);
        assert_eq!(
            FeatureGates::default()
                .with(DynamicMIG, true)
                .to_string()
                .parse::<FeatureGates>()
                .unwrap(),
            FeatureGates::default().with(DynamicMIG, true)
        );
    }

    #[test]
    fn usable_as_clap_value_parser() {
        use clap::Parser;

        #[derive(Parser, Debug)]
        struct Args {
            #[arg(long, default_value = "")]
            feature_gates: FeatureGates,
        }

        let args = Args::try_parse_from(["bin", "--feature-gates", "MPSSupport=true"]).unwrap();
        assert!(args.feature_gates.enabled(MPSSupport));
        let args = Args::try_parse_from(["bin"]).unwrap();
        assert_eq!(args.feature_gates, FeatureGates::default());
        let err = Args::try_parse_from(["bin", "--feature-gates", "DeviceMetadata=true"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "feature gate DeviceMetadata requires feature gate PassthroughSupport to be enabled"
            ),
            "{err}"
        );
    }
}

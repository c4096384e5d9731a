//! Kubernetes `resource.Quantity` parsing.
//!
//! k8s-openapi's `Quantity` only carries the text. Opaque device configs need the value (MPS
//! pinned-memory limits), so this module parses the same grammar as apimachinery:
//!
//! ```text
//! quantity ::= [+-] number suffix
//! number   ::= digits | digits "." digits? | "." digits
//! suffix   ::= "" | binarySI | decimalSI | ("e" | "E") [+-] digits
//! binarySI ::= Ki | Mi | Gi | Ti | Pi | Ei           (powers of 1024)
//! decimalSI::= m | k | M | G | T | P | E              (10^-3 … 10^18)
//! ```
//!
//! Invariants: the value is kept exactly as a fraction `numerator / 10^scale`, so `1.5Gi` and
//! `100m` are exact; [`Quantity::value`] rounds away from zero to a whole number like Go's
//! `Quantity.Value()`. The original text is kept and is what serializes back.
//!
//! Failure modes: malformed text is a [`QuantityError::Malformed`]; values whose exact
//! fraction does not fit 128 bits (beyond ~10^38, or exponents past ±38) are
//! [`QuantityError::OutOfRange`] instead of being silently rounded.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parsing a quantity failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The text does not follow the quantity grammar.
    #[error(
        "invalid quantity {text:?}: expected a number with an optional suffix \
         (Ki, Mi, Gi, Ti, Pi, Ei, m, k, M, G, T, P, E or an exponent like e3)"
    )]
    Malformed {
        /// The rejected text.
        text: String,
    },
    /// The text is well-formed but its value cannot be represented exactly.
    #[error("quantity {text:?} is out of range")]
    OutOfRange {
        /// The rejected text.
        text: String,
    },
}

/// A parsed Kubernetes quantity, e.g. `1.5Gi`, `100m`, `1e3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    text: String,
    negative: bool,
    /// Absolute value = `numerator / 10^scale`.
    numerator: u128,
    scale: u32,
}

/// Bytes in one mebibyte.
const MIB: i128 = 1 << 20;

impl Quantity {
    /// Parses `text` (no surrounding whitespace allowed, as in apimachinery).
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let malformed = || QuantityError::Malformed {
            text: text.to_owned(),
        };
        let out_of_range = || QuantityError::OutOfRange {
            text: text.to_owned(),
        };

        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);

        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(malformed());
        }

        // Multiplier as (power of two, power of ten) so the value stays exact.
        let (pow2, pow10): (u32, i32) = match suffix {
            "" => (0, 0),
            "Ki" => (10, 0),
            "Mi" => (20, 0),
            "Gi" => (30, 0),
            "Ti" => (40, 0),
            "Pi" => (50, 0),
            "Ei" => (60, 0),
            "m" => (0, -3),
            "k" => (0, 3),
            "M" => (0, 6),
            "G" => (0, 9),
            "T" => (0, 12),
            "P" => (0, 15),
            "E" => (0, 18),
            _ => (0, parse_exponent(suffix).ok_or_else(malformed)?),
        };

        let mut numerator: u128 = 0;
        for digit in whole.bytes().chain(fraction.bytes()) {
            numerator = numerator
                .checked_mul(10)
                .and_then(|n| n.checked_add(u128::from(digit - b'0')))
                .ok_or_else(out_of_range)?;
        }
        numerator = numerator
            .checked_mul(1u128 << pow2)
            .ok_or_else(out_of_range)?;

        // value = numerator * 10^(pow10 - fraction digits)
        let fraction_digits = i32::try_from(fraction.len()).map_err(|_| out_of_range())?;
        let exponent = pow10
            .checked_sub(fraction_digits)
            .ok_or_else(out_of_range)?;
        let scale = if exponent >= 0 {
            numerator = numerator
                .checked_mul(pow10_u128(exponent.unsigned_abs()).ok_or_else(out_of_range)?)
                .ok_or_else(out_of_range)?;
            0
        } else {
            let scale = exponent.unsigned_abs();
            pow10_u128(scale).ok_or_else(out_of_range)?;
            scale
        };

        Ok(Self {
            text: text.to_owned(),
            negative: negative && numerator != 0,
            numerator,
            scale,
        })
    }

    /// The text the quantity was parsed from.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value as a whole number, rounded away from zero (Go's `Quantity.Value()`), e.g.
    /// `1.5` → 2, `100m` → 1, `1Ki` → 1024. `None` if it does not fit an `i128`.
    pub fn value(&self) -> Option<i128> {
        let divisor = pow10_u128(self.scale)?;
        let mut whole = self.numerator / divisor;
        if !self.numerator.is_multiple_of(divisor) {
            whole += 1;
        }
        let whole = i128::try_from(whole).ok()?;
        Some(if self.negative { -whole } else { whole })
    }

    /// The value in whole mebibytes, truncated toward zero (`1.5Mi` → 1, `1023Ki` → 0).
    pub fn whole_mebibytes(&self) -> Option<i128> {
        self.value().map(|bytes| bytes / MIB)
    }

    /// Whether the value is below zero.
    pub fn is_negative(&self) -> bool {
        self.negative
    }
}

/// `e3`, `E-3`, `e+12` → the exponent; anything else → `None`.
fn parse_exponent(suffix: &str) -> Option<i32> {
    let digits = suffix.strip_prefix(['e', 'E'])?;
    let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn pow10_u128(exponent: u32) -> Option<u128> {
    10u128.checked_pow(exponent)
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// Schema as Kubernetes declares quantities: an integer or a string.
impl schemars::JsonSchema for Quantity {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [{ "type": "integer" }, { "type": "string" }],
            "x-kubernetes-int-or-string": true,
            "description": "A Kubernetes quantity, e.g. 512Mi or 1Gi.",
        })
    }
}

impl<'de> Deserialize<'de> for Quantity {
    /// Accepts a string or a JSON number, as apimachinery does.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = Quantity;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity string like \"1Gi\" or a number")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Quantity::parse(v).map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                self.visit_str(&v.to_string())
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const KI: i128 = 1024;
    const MI: i128 = KI * 1024;
    const GI: i128 = MI * 1024;

    #[test]
    fn values() {
        let cases: &[(&str, i128)] = &[
            ("0", 0),
            ("1", 1),
            ("+7", 7),
            ("-7", -7),
            ("1Ki", KI),
            ("1Mi", MI),
            ("1Gi", GI),
            ("1.5Gi", 3 * GI / 2),
            ("2Ti", 2 * GI * KI),
            ("1Pi", GI * MI),
            ("1Ei", GI * GI),
            ("1k", 1_000),
            ("1M", 1_000_000),
            ("1G", 1_000_000_000),
            ("1T", 1_000_000_000_000),
            ("1P", 1_000_000_000_000_000),
            ("1E", 1_000_000_000_000_000_000),
            ("1e3", 1_000),
            ("1E3", 1_000),
            ("1e+3", 1_000),
            ("15e-1", 2),
            ("100m", 1),
            ("1500m", 2),
            ("1000m", 1),
            ("-1500m", -2),
            ("0.5", 1),
            (".5", 1),
            ("5.", 5),
            ("0.0001Ki", 1),
            ("1024Ki", MI),
            ("12345678901234567890", 12_345_678_901_234_567_890),
            ("-0", 0),
        ];
        for (text, want) in cases {
            let q = Quantity::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(q.value(), Some(*want), "{text}");
            assert_eq!(q.as_str(), *text);
        }
    }

    #[test]
    fn whole_mebibytes() {
        let cases: &[(&str, i128)] = &[
            ("1Mi", 1),
            ("1.5Mi", 1),
            ("1023Ki", 0),
            ("1024Ki", 1),
            ("10Gi", 10 * 1024),
            ("1G", 953),
            ("1048576", 1),
            ("-2Mi", -2),
        ];
        for (text, want) in cases {
            assert_eq!(
                Quantity::parse(text).unwrap().whole_mebibytes(),
                Some(*want),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed() {
        for text in [
            "", " 1", "1 ", "abc", ".", "+", "-", "1..2", "1.2.3", "1K", "1mi", "1Kib", "1e",
            "1e+", "1ee3", "1e3.5", "Gi", "1Gi3", "--1", "1,5",
        ] {
            assert_eq!(
                Quantity::parse(text),
                Err(QuantityError::Malformed {
                    text: text.to_owned()
                }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn out_of_range() {
        for text in [
            "1e39",
            "1e-39",
            "999999999999999999999999999999999999999999",
            "1000000000000000000000Ei",
        ] {
            assert_eq!(
                Quantity::parse(text),
                Err(QuantityError::OutOfRange {
                    text: text.to_owned()
                }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            Quantity::parse("1K").unwrap_err().to_string(),
            "invalid quantity \"1K\": expected a number with an optional suffix \
             (Ki, Mi, Gi, Ti, Pi, Ei, m, k, M, G, T, P, E or an exponent like e3)"
        );
        assert_eq!(
            Quantity::parse("1e39").unwrap_err().to_string(),
            "quantity \"1e39\" is out of range"
        );
    }

    #[test]
    fn serde_round_trip_and_numbers() {
        let q: Quantity = serde_json::from_value(serde_json::json!("1.5Gi")).unwrap();
        assert_eq!(
            serde_json::to_value(&q).unwrap(),
            serde_json::json!("1.5Gi")
        );
        let n: Quantity = serde_json::from_value(serde_json::json!(1048576)).unwrap();
        assert_eq!(n.value(), Some(MI));
        let neg: Quantity = serde_json::from_value(serde_json::json!(-3)).unwrap();
        assert!(neg.is_negative());
        let err = serde_json::from_value::<Quantity>(serde_json::json!("1K")).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid quantity \"1K\""),
            "{err}"
        );
        let err = serde_json::from_value::<Quantity>(serde_json::json!(true)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid type: boolean `true`, expected a quantity string like \"1Gi\" or a number"
        );
        assert_eq!("2Mi".parse::<Quantity>().unwrap().to_string(), "2Mi");
    }
}

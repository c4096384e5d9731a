//! The numeric value of a Kubernetes `Quantity` string, so quantities can be compared by value.
//!
//! The API server stores quantities in canonical form ("1024Mi" comes back as "1Gi", "0.5" as
//! "500m"); comparing what we want with what the server holds must therefore compare values, or
//! every sync after a restart would look like a change. Values are exact integers of nano-units
//! in an `i128` (enough for `Ei` with nine decimals). Precision below a nano-unit is rounded away
//! from zero as the API server does. Anything unparsable or out of range yields `None`, and
//! callers then fall back to comparing strings: a needless rewrite is the worst outcome.

/// Value of `quantity` in nano-units (10⁻⁹), following the API server's grammar:
/// `[+-]<digits>[.<digits>]` then one of `n u m "" k M G T P E`, `Ki … Ei`, or `e<int>`/`E<int>`.
pub(crate) fn nano_value(quantity: &str) -> Option<i128> {
    let (negative, rest) = match quantity.as_bytes().first()? {
        b'-' => (true, &quantity[1..]),
        b'+' => (false, &quantity[1..]),
        _ => (false, quantity),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let mut mantissa: i128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(i128::from(digit - b'0'))?;
    }
    let mut exp10 = -i32::try_from(fraction.len()).ok()?;
    let mut exp2 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        exponent if exponent.starts_with(['e', 'E']) => {
            exp10 = exp10.checked_add(exponent[1..].parse::<i32>().ok()?)?;
        }
        _ => return None,
    }
    let value = mantissa.checked_mul(1i128.checked_shl(exp2)?)?;
    let scale = exp10.checked_add(9)?;
    let magnitude = if scale >= 0 {
        value.checked_mul(10i128.checked_pow(scale.unsigned_abs())?)?
    } else {
        let divisor = 10i128.checked_pow(scale.unsigned_abs())?;
        value.div_euclid(divisor) + i128::from(value.rem_euclid(divisor) != 0)
    };
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::nano_value;

    #[test]
    fn values() {
        let cases: &[(&str, Option<i128>)] = &[
            ("0", Some(0)),
            ("1", Some(1_000_000_000)),
            ("+1", Some(1_000_000_000)),
            ("-2", Some(-2_000_000_000)),
            ("500m", Some(500_000_000)),
            ("0.5", Some(500_000_000)),
            (".5", Some(500_000_000)),
            ("5.", Some(5_000_000_000)),
            ("1n", Some(1)),
            ("0.1n", Some(1)),
            ("-0.1n", Some(-1)),
            ("3u", Some(3_000)),
            ("1k", Some(1_000_000_000_000)),
            ("1e3", Some(1_000_000_000_000)),
            ("1E3", Some(1_000_000_000_000)),
            ("1e-3", Some(1_000_000)),
            ("1E", Some(1_000_000_000_000_000_000_000_000_000)),
            ("1Ki", Some(1_024_000_000_000)),
            ("0.5Ki", Some(512_000_000_000)),
            ("1Ei", Some((1i128 << 60) * 1_000_000_000)),
            ("", None),
            ("-", None),
            (".", None),
            ("1.2.3", None),
            ("1x", None),
            ("1 Gi", None),
            ("Gi", None),
            ("1e", None),
            ("99999999999999999999999999999999999999999", None),
            ("1e400", None),
        ];
        for (input, want) in cases {
            assert_eq!(nano_value(input), *want, "{input:?}");
        }
    }

    #[test]
    fn canonical_forms_compare_equal() {
        let pairs = [
            ("1024Mi", "1Gi"),
            ("1536Mi", "1.5Gi"),
            ("1000k", "1M"),
            ("0.5", "500m"),
            ("40Gi", "42949672960"),
        ];
        for (a, b) in pairs {
            assert_eq!(nano_value(a), nano_value(b), "{a} vs {b}");
            assert!(nano_value(a).is_some(), "{a}");
        }
        assert_ne!(nano_value("1G"), nano_value("1Gi"));
    }
}

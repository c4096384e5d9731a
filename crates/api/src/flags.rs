//! Value parsers shared by the binaries' command-line flags (clap `value_parser`s), so every
//! nvdra binary reads `:8080` and `15s` the same way and names bad values the same way.
//!
//! Pure functions of the flag text; errors are the message clap shows after the flag name.

use std::net::SocketAddr;
use std::time::Duration;

/// Log output format of every nvdra binary (`--log-format`, `NVDRA_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl LogFormat {
    /// The flag value (`text`, `json`), as the controller passes it to the IMEX daemons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Accepts `text` or `json` (any case).
pub fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{raw:?} is not a log format: use text or json")),
    }
}

/// An optional listen address (`None`: serve nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint(pub Option<SocketAddr>);

/// Accepts Go-style `:8080` (all interfaces), `host:port`, or empty (off).
pub fn parse_endpoint(raw: &str) -> Result<Endpoint, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(Endpoint(None));
    }
    let full = match raw.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => raw.to_owned(),
    };
    full.parse()
        .map(|addr| Endpoint(Some(addr)))
        .map_err(|_| format!("{raw:?} is not an address like ':8080' or '127.0.0.1:8080'"))
}

/// Accepts Go-style single-unit durations: `<n>ms`, `<n>s`, `<n>m`, `<n>h`, longer than zero
/// (every duration flag is a period, a timeout or a deadline; zero would spin or panic).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like '15s', '10m' or '500ms'"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "{raw:?} has no unit; use ms, s, m or h (e.g. '15s')"
            ));
        }
    };
    if duration.is_zero() {
        return Err(format!("{raw:?} must be longer than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats() {
        assert_eq!(parse_log_format("json"), Ok(LogFormat::Json));
        assert_eq!(parse_log_format(" Text "), Ok(LogFormat::Text));
        assert_eq!(
            parse_log_format("yaml"),
            Err("\"yaml\" is not a log format: use text or json".to_owned())
        );
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(parse_log_format(f.as_str()), Ok(f));
        }
    }

    #[test]
    fn endpoints() {
        let cases = [
            (":9090", Ok(Endpoint(Some("0.0.0.0:9090".parse().unwrap())))),
            (
                "127.0.0.1:1",
                Ok(Endpoint(Some("127.0.0.1:1".parse().unwrap()))),
            ),
            ("", Ok(Endpoint(None))),
            (
                "localhost",
                Err("\"localhost\" is not an address like ':8080' or '127.0.0.1:8080'".to_owned()),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_endpoint(raw), want, "{raw}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        let errors = [
            ("10", "\"10\" has no unit; use ms, s, m or h (e.g. '15s')"),
            ("m", "\"m\" is not a duration like '15s', '10m' or '500ms'"),
            ("0s", "\"0s\" must be longer than zero"),
        ];
        for (raw, want) in errors {
            assert_eq!(parse_duration(raw), Err(want.to_owned()), "{raw}");
        }
    }
}

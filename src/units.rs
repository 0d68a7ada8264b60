//! Sizes and durations as people write them in the config and on the command line, parsed by
//! maintained crates: sizes by `parse-size` (binary units, as systemd reads `MemoryMax=512M`),
//! durations by `jiff`'s friendly format. Plus the serde glue that lets a TOML value be either a
//! plain integer (bytes, seconds) or such a string.
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// K, M, G, T (and KiB, MB, …) are powers of 1024, as in systemd and podman.
const SIZES: parse_size::Config = parse_size::Config::new().with_binary();

/// Parses a byte size: `1073741824`, `512M`, `20G`, `1.5 GiB` (units are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    SIZES
        .parse_size(s.trim())
        .map_err(|e| format!("{s:?} is not a size ({e}): use bytes or a K, M, G or T suffix"))
}

/// Parses a duration: seconds (`90`) or a friendly span (`90s`, `15m`, `12h`, `14d`, `2w`,
/// `1h 30m`). Days are 24 hours; months and years are refused (they have no fixed length);
/// only whole seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let bad =
        |why: String| format!("{s:?} is not a duration ({why}): use e.g. 90s, 15m, 12h, 14d or 2w");
    let span: jiff::Span = t.parse().map_err(|e: jiff::Error| bad(e.to_string()))?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|_| bad("months and years have no fixed length".into()))?;
    let d = Duration::try_from(d).map_err(|_| bad("negative".into()))?;
    if d.subsec_nanos() != 0 {
        return Err(bad("not whole seconds".into()));
    }
    Ok(d)
}

/// A TOML integer or string.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrStr {
    Int(u64),
    Str(String),
}

/// serde: an optional size (integer bytes, or a string for [`parse_size`]).
pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Some(match IntOrStr::deserialize(d)? {
        IntOrStr::Int(n) => n,
        IntOrStr::Str(s) => parse_size(&s).map_err(serde::de::Error::custom)?,
    }))
}

/// serde: an optional duration (integer seconds, or a string for [`parse_duration`]).
pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(Some(match IntOrStr::deserialize(d)? {
        IntOrStr::Int(n) => Duration::from_secs(n),
        IntOrStr::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom)?,
    }))
}

/// serde: an optional duration in whole seconds (integer seconds, or a string for
/// [`parse_duration`]), for the JSON run config.
/// `null` is unset, as for the config's other fields.
pub fn opt_duration_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<IntOrStr>::deserialize(d)? {
        None => None,
        Some(IntOrStr::Int(n)) => Some(n),
        Some(IntOrStr::Str(s)) => Some(
            parse_duration(&s)
                .map_err(serde::de::Error::custom)?
                .as_secs(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("7"), Ok(7));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size(" 20G "), Ok(20 << 30));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert!(parse_size("x").is_err());
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations_parse_to_whole_seconds() {
        let s = |n| Ok(Duration::from_secs(n));
        assert_eq!(parse_duration("15m"), s(900));
        assert_eq!(parse_duration("3"), s(3));
        assert_eq!(parse_duration("90s"), s(90));
        assert_eq!(parse_duration("12h"), s(12 * 3600));
        assert_eq!(parse_duration("14d"), s(14 * 86_400));
        assert_eq!(parse_duration("2w"), s(14 * 86_400));
        assert_eq!(parse_duration("1h 30m"), s(5400));
        // the extremes of docs/openapi.yaml's pattern for run-config durations all parse
        for ok in [
            "0", "00000", "99999", "0s", "00000s", "99999s", "99999m", "0m", "99h", "00h", "99d",
            "0d",
        ] {
            assert!(parse_duration(ok).is_ok(), "{ok:?} refused");
        }
        for bad in ["3y", "1mo", "x", "", "-5s", "1.5s", "5 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}

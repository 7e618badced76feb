//! Human-readable durations (`250ms`, `10s`, `5m`, `1h`) and byte sizes (`512KiB`, `4MiB`).

use std::time::Duration;

/// Parses a duration such as `250ms`, `1.5s`, `5m` or `1h`. A bare number is rejected so that a
/// unit is always explicit in config files.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; use a number with a unit: ms, s, m, h"))?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "" => return Err(format!("`{s}` has no unit; write e.g. `{s}s` or `{s}ms`")),
        u => return Err(format!("unknown duration unit `{u}`; use us, ms, s, m or h")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 366.0 * 86400.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte size such as `4096`, `512KiB`, `4MiB`, `1GiB` (binary) or `10kB`, `5MB` (decimal).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; use bytes or a unit: KiB, MiB, GiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => return Err(format!("unknown size unit `{u}`; use B, KiB, MiB, GiB, kB, MB or GB")),
    };
    value.checked_mul(scale).ok_or_else(|| format!("`{s}` is out of range"))
}

/// Formats a duration the way config files write it (used by `inspect` and messages).
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(3_600_000_000) && us > 0 {
        format!("{}h", us / 3_600_000_000)
    } else if us.is_multiple_of(60_000_000) && us > 0 {
        format!("{}m", us / 60_000_000)
    } else if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("10").expect_err("no unit").contains("no unit"));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("9999999h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("10kB"), Ok(10_000));
        assert!(parse_size("4 mebibytes").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn duration_formatting_round_trips() {
        for s in ["250ms", "10s", "5m", "1h", "0s", "15us"] {
            assert_eq!(format_duration(parse_duration(s).expect(s)), s);
        }
    }
}

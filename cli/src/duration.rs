//! Durations and instants as people type them: `90s`, `5m`, `1h30m`, `250ms`, `2d`; RFC 3339
//! instants, or `+DURATION` for "this long from now".

use keel_core::Timestamp;

const UNITS: &str = "use ms, s, m, h or d, as in 90s, 5m, 1h30m or 250ms";

/// Parses a duration into milliseconds. The error names the text and what is wrong with it.
pub(crate) fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let bad = |why: String| format!("invalid duration {text:?}: {why}");
    if text.is_empty() {
        return Err(bad(format!("it is empty ({UNITS})")));
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad(format!("expected a number at {rest:?} ({UNITS})")));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(bad(format!("the number {number} has no unit ({UNITS})"))),
            other => return Err(bad(format!("unknown unit {other:?} ({UNITS})"))),
        };
        let part = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .and_then(|ms| total.checked_add(ms));
        total = part.ok_or_else(|| bad("it is too long".into()))?;
        rest = after;
    }
    Ok(total)
}

/// Formats milliseconds the way [`parse_duration_ms`] reads them: `1h30m`, `250ms`, `0s`.
pub(crate) fn format_duration_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if rest >= scale {
            out.push_str(&format!("{}{unit}", rest / scale));
            rest %= scale;
        }
    }
    out
}

/// Parses an instant: RFC 3339 (`2026-01-01T09:00:00Z`, `2026-01-01T10:00:00+01:00`), or
/// `+DURATION`, meaning that long after `now`.
pub(crate) fn parse_time(text: &str, now: Timestamp) -> Result<Timestamp, String> {
    if let Some(offset) = text.strip_prefix('+') {
        let ms = parse_duration_ms(offset).map_err(|e| format!("invalid time {text:?}: {e}"))?;
        return Ok(now.plus_ms(ms));
    }
    Timestamp::parse_rfc3339(text).map_err(|e| {
        format!(
            "invalid time {text:?} ({e}): expected RFC 3339 such as 2026-01-01T09:00:00Z or \
             2026-01-01T10:00:00+01:00, or +DURATION such as +10m"
        )
    })
}

/// True if `text` is a relative instant (`+DURATION`).
pub(crate) fn is_relative_time(text: &str) -> bool {
    text.starts_with('+')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_combined_units() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_duration_ms("1m30s500ms"), Ok(90_500));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
    }

    #[test]
    fn errors_name_the_text_and_the_problem() {
        let e = parse_duration_ms("5x").unwrap_err();
        assert!(
            e.contains("\"5x\"") && e.contains("unknown unit \"x\""),
            "{e}"
        );
        let e = parse_duration_ms("90").unwrap_err();
        assert!(e.contains("has no unit"), "{e}");
        let e = parse_duration_ms("").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_duration_ms("m5").unwrap_err();
        assert!(e.contains("expected a number"), "{e}");
        let e = parse_duration_ms("1 h").unwrap_err();
        assert!(e.contains("\"1 h\""), "{e}");
        let e = parse_duration_ms("99999999999999999999d").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let e = parse_duration_ms("-5s").unwrap_err();
        assert!(e.contains("expected a number"), "{e}");
    }

    #[test]
    fn formats_what_it_parses() {
        for ms in [0, 250, 1_000, 90_000, 5_400_000, 90_061_001] {
            let text = format_duration_ms(ms);
            assert_eq!(parse_duration_ms(&text), Ok(ms), "{text}");
        }
        assert_eq!(format_duration_ms(5_400_000), "1h30m");
    }

    #[test]
    fn times_are_rfc3339_or_relative() {
        let now = Timestamp(1_000_000);
        assert_eq!(parse_time("+5s", now), Ok(Timestamp(1_005_000)));
        assert_eq!(
            parse_time("2026-01-01T01:00:00+01:00", now),
            Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").map_err(|e| e.to_string())
        );
        let e = parse_time("tomorrow", now).unwrap_err();
        assert!(e.contains("\"tomorrow\"") && e.contains("RFC 3339"), "{e}");
        let e = parse_time("+5", now).unwrap_err();
        assert!(e.contains("no unit"), "{e}");
    }
}

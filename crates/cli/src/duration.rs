//! Durations on the command line, written as docker and skopeo take them (Go's
//! `time.ParseDuration`: `500ms`, `30s`, `2m`, `1m30s`, `1.5h`).
//!
//! A unit is required (except for `0`): a bare `30` is seconds to a docker user
//! (`--stop-timeout`) and milliseconds to a SQLite user (`PRAGMA busy_timeout`), so it is
//! refused rather than guessed.

use std::time::Duration;

/// Parse `500ms`, `30s`, `2m`, `1h`, a sum of them (`1m30s`), or `0`.
pub fn parse(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = |why: &str| format!("{text:?} is not a duration: {why} (e.g. 500ms, 30s, 2m, 1m30s)");
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() {
            return Err(bad("expected a number"));
        }
        let value: f64 = number.parse().map_err(|_| bad("expected a number"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let seconds = match unit {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(bad("add a unit: ms, s, m or h")),
            _ => return Err(bad(&format!("unknown unit {unit:?}: use ms, s, m or h"))),
        };
        total += Duration::try_from_secs_f64(value * seconds).map_err(|_| bad("too long"))?;
        rest = after;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_and_bare_numbers_are_refused() {
        for (text, millis) in [
            ("0", 0),
            ("500ms", 500),
            ("30s", 30_000),
            ("2m", 120_000),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            ("1h", 3_600_000),
            ("0s", 0),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_millis(millis)), "{text}");
        }
        for (text, why) in [
            ("30", "add a unit"),
            ("", "empty"),
            ("s", "expected a number"),
            ("5 s", "unknown unit \" s\""),
            ("5sec", "unknown unit \"sec\""),
            ("-1s", "expected a number"),
            ("1..2s", "expected a number"),
            ("99999999999999999999h", "too long"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains("e.g. 500ms, 30s"), "{text}: {e}");
        }
    }
}

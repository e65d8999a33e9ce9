//! Timestamps: SOURCE_DATE_EPOCH handling and RFC 3339 formatting without a date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// The latest time a build can record: the largest mtime a ustar header's 11 octal digits
/// hold (2242-03-16T12:56:31Z). Beyond it tar writers switch to a non-standard binary field
/// that readers misread or wrap; it is also well inside RFC 3339's four-digit years, which
/// `created` needs (skopeo and umoci cannot parse a year 10000).
pub const MAX_EPOCH: i64 = 0o77777777777;

/// The range a SOURCE_DATE_EPOCH may take, said the same way in every refusal.
const RANGE: &str = "use whole seconds since 1970 from 0 (1970-01-01T00:00:00Z) to 8589934591 (2242-03-16T12:56:31Z), the range both a tar header's mtime and an RFC 3339 `created` hold";

/// A SOURCE_DATE_EPOCH bakedb cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("SOURCE_DATE_EPOCH={text:?} is not a number of seconds; {RANGE}")]
    NotANumber { text: String },
    #[error("SOURCE_DATE_EPOCH={text:?} is before 1970; {RANGE}")]
    BeforeEpoch { text: String },
    #[error("SOURCE_DATE_EPOCH={text:?} is after 2242-03-16T12:56:31Z; {RANGE}")]
    AfterMax { text: String },
}

/// When a build happens, decided once: SOURCE_DATE_EPOCH when set (reproducible builds),
/// else now. Every timestamp of the build derives from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildTime {
    epoch: i64,
}

impl BuildTime {
    /// From SOURCE_DATE_EPOCH, or the clock.
    pub fn from_env() -> Result<BuildTime, EpochError> {
        match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => parse_epoch(&v).map(|epoch| BuildTime { epoch }),
            Err(_) => Ok(BuildTime { epoch: now() }),
        }
    }

    /// The image's `created` and its annotation.
    pub fn created(&self) -> String {
        rfc3339(self.epoch)
    }

    /// The mtime of every entry of the layers that carry data.
    pub fn mtime(&self) -> u64 {
        self.epoch as u64
    }

    /// When the snapshot was taken, as image.json records it: the build time, but never
    /// later than now (a SOURCE_DATE_EPOCH in the future does not date a snapshot).
    pub fn snapshot_time(&self) -> String {
        rfc3339(self.epoch.min(now()))
    }
}

/// A SOURCE_DATE_EPOCH value: whole seconds from 0 (1970-01-01T00:00:00Z) to MAX_EPOCH.
pub fn parse_epoch(text: &str) -> Result<i64, EpochError> {
    let seconds: i128 = text.trim().parse().map_err(|_| EpochError::NotANumber {
        text: text.to_owned(),
    })?;
    if seconds < 0 {
        return Err(EpochError::BeforeEpoch {
            text: text.to_owned(),
        });
    }
    if seconds > i128::from(MAX_EPOCH) {
        return Err(EpochError::AfterMax {
            text: text.to_owned(),
        });
    }
    Ok(seconds as i64)
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `1970-01-01T00:00:00Z` style, as the OCI spec asks for `created`.
pub fn rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::{MAX_EPOCH, RANGE, parse_epoch, rfc3339};

    #[test]
    fn source_date_epoch_must_fit_tar_and_rfc3339() {
        assert_eq!(parse_epoch("1700000000"), Ok(1_700_000_000));
        assert_eq!(parse_epoch(" 0\n"), Ok(0));
        assert_eq!(parse_epoch("8589934591"), Ok(MAX_EPOCH));
        assert_eq!(rfc3339(MAX_EPOCH), "2242-03-16T12:56:31Z");
        assert!(RANGE.contains(&MAX_EPOCH.to_string()) && RANGE.contains(&rfc3339(MAX_EPOCH)));
        for (text, why) in [
            ("8589934592", "is after 2242-03-16T12:56:31Z"),
            // 10000-01-01T00:00:00Z: skopeo and umoci cannot parse its `created`.
            ("253402300800", "is after 2242-03-16T12:56:31Z"),
            ("99999999999999999999999", "is after 2242-03-16T12:56:31Z"),
            ("-1", "is before 1970"),
            ("1.5", "is not a number of seconds"),
            ("", "is not a number of seconds"),
        ] {
            let err = parse_epoch(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
            assert!(
                err.ends_with("from 0 (1970-01-01T00:00:00Z) to 8589934591 (2242-03-16T12:56:31Z), the range both a tar header's mtime and an RFC 3339 `created` hold"),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn formats_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}

//! Wall-clock timestamps in the formats Testflinger uses, without a date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current UTC time as Python's `isoformat()` renders an aware UTC value:
/// `2026-01-05T10:00:00.123456+00:00` (used in log fragments and events).
pub fn now_iso() -> String {
    iso_at(SystemTime::now())
}

/// `at` as `YYYY-MM-DDTHH:MM:SS.ffffff+00:00`.
pub fn iso_at(at: SystemTime) -> String {
    let (date, secs_of_day, micros) = split(at);
    format!(
        "{date}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// The current UTC time for the agent's log: `2026-01-05 10:00:00.123Z`.
pub fn log_stamp() -> String {
    let (date, secs_of_day, micros) = split(SystemTime::now());
    format!(
        "{date} {:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        micros / 1000
    )
}

/// How long ago a server timestamp (`YYYY-MM-DDTHH:MM:SS` with an optional fraction and a
/// `Z` or `+00:00` suffix) was; `None` when it does not parse or lies in the future.
pub fn age_of(stamp: &str) -> Option<std::time::Duration> {
    let b = stamp.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = stamp.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = u64::try_from(days * 86_400 + h * 3600 + mi * 60 + s).ok()?;
    SystemTime::now()
        .duration_since(UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .ok()
}

/// (year, month, day) to days since 1970-01-01 (the inverse of `civil_from_days`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn split(at: SystemTime) -> (String, u64, u32) {
    // A clock before 1970 is a broken host; render it as the epoch rather than fail.
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        secs % 86_400,
        since.subsec_micros(),
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_458), (2026, 1, 5));
        let at = UNIX_EPOCH + Duration::new(1_767_607_200, 123_456_000);
        assert_eq!(iso_at(at), "2026-01-05T10:00:00.123456+00:00");
    }

    #[test]
    fn ages() {
        for days in [0, 11_016, 20_458, -1, 40_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let old = age_of("2020-01-01T00:00:00Z").expect("parses");
        assert!(old > Duration::from_secs(86_400 * 365));
        assert!(age_of("2020-01-01T00:00:00+00:00Z").is_some());
        assert_eq!(age_of("2999-01-01T00:00:00Z"), None);
        assert_eq!(age_of("yesterday"), None);
        assert_eq!(age_of("2020-13-01T00:00:00Z"), None);
    }
}

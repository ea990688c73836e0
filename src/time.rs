//! Wall-clock timestamps in the formats Testflinger uses, and the host's local date and
//! midnight (for the agent log's rotation), without a date crate.
//!
//! Local time comes from the C library's `localtime_r` in [`local_time`], the one function
//! here with `unsafe`: it follows `TZ` (else `/etc/localtime`) as read by `tzset` on first
//! use, as Python's `time.localtime` does. Everything else is pure arithmetic, and
//! [`next_midnight_in`] takes the zone as a function so tests can feed it any offsets.

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
    log_stamp_at(SystemTime::now())
}

/// `at` as the agent's log renders it: `2026-01-05 10:00:00.123Z` (UTC).
pub fn log_stamp_at(at: SystemTime) -> String {
    let (date, secs_of_day, micros) = split(at);
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

/// A moment as the clock on the wall of the host reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// Seconds east of UTC in force at that moment.
    pub offset_secs: i64,
}

impl LocalTime {
    /// `unix_secs` (whole seconds since 1970-01-01 UTC) read at a fixed offset east of UTC.
    pub fn at_offset(unix_secs: i64, offset_secs: i64) -> Self {
        let local = unix_secs + offset_secs;
        let (year, month, day) = civil_from_days(local.div_euclid(86_400));
        let of_day = local.rem_euclid(86_400);
        LocalTime {
            year,
            month,
            day,
            hour: (of_day / 3600) as u32,
            minute: (of_day / 60 % 60) as u32,
            second: (of_day % 60) as u32,
            offset_secs,
        }
    }

    /// (year, month, day), ordered as dates are.
    pub fn date(&self) -> (i64, u32, u32) {
        (self.year, self.month, self.day)
    }

    /// `YYYY-MM-DD`, the suffix Python's midnight rotation gives a rotated log.
    pub fn date_string(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `YY-MM-DD HH:MM:SS`, Python's `%y-%m-%d %H:%M:%S`.
    pub fn python_stamp(&self) -> String {
        format!(
            "{:02}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year.rem_euclid(100),
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second
        )
    }
}

/// Whole seconds since 1970-01-01 UTC (negative before; the fraction is dropped toward the past).
pub fn unix_secs(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(before) => {
            let before = before.duration();
            let whole = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            if before.subsec_nanos() > 0 {
                whole.saturating_neg().saturating_sub(1)
            } else {
                whole.saturating_neg()
            }
        }
    }
}

/// The moment `secs` whole seconds after (or before, when negative) 1970-01-01 UTC.
pub fn from_unix_secs(secs: i64) -> SystemTime {
    let magnitude = std::time::Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// `at` in the host's zone, through `localtime_r`; UTC when the C library cannot convert it
/// (a moment outside `time_t` or the zone data).
pub fn local_time(at: SystemTime) -> LocalTime {
    local_time_secs(unix_secs(at))
}

// `time_t` and `c_long` are 64 bits here but 32 on some targets: keep the checked conversions.
#[allow(irrefutable_let_patterns, clippy::useless_conversion)]
fn local_time_secs(secs: i64) -> LocalTime {
    static TZSET: std::sync::Once = std::sync::Once::new();
    extern "C" {
        // POSIX; the libc crate declares it for Windows only.
        fn tzset();
    }
    let Ok(clock) = libc::time_t::try_from(secs) else {
        return LocalTime::at_offset(secs, 0);
    };
    // SAFETY: `tzset` takes no arguments and only reads the environment (`TZ`) and the zone
    // files into the C library's own state; it runs once, and nothing in this program
    // writes `TZ` after start-up. `localtime_r` reads `clock` and writes only into `tm`, a
    // zeroed `struct tm` (all-integer plus a pointer the C library sets, so all-zero is a
    // valid value) owned by this frame; both pointers are valid for the call, and the
    // reentrant form shares no static buffer with other threads. A null return (conversion
    // failed) is checked before `tm` is read.
    let tm = unsafe {
        TZSET.call_once(|| tzset());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&clock, &mut tm).is_null() {
            return LocalTime::at_offset(secs, 0);
        }
        tm
    };
    let field = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
    LocalTime {
        year: i64::from(tm.tm_year) + 1900,
        month: field(tm.tm_mon) + 1,
        day: field(tm.tm_mday),
        hour: field(tm.tm_hour),
        minute: field(tm.tm_min),
        second: field(tm.tm_sec),
        offset_secs: i64::from(tm.tm_gmtoff),
    }
}

/// The first moment after `at` whose local date is later than `at`'s: the next local midnight
/// (or, in a zone where midnight does not exist that day, the first moment of the new day).
pub fn next_local_midnight(at: SystemTime) -> SystemTime {
    next_midnight_in(at, local_time_secs)
}

/// [`next_local_midnight`] in the zone `zone`, which maps Unix seconds to local time.
///
/// A day lasts 23 to 25 hours around a DST change, so rather than adding 24 hours this
/// searches the next two days for the second where the date changes (18 conversions).
pub fn next_midnight_in(at: SystemTime, zone: impl Fn(i64) -> LocalTime) -> SystemTime {
    let start = unix_secs(at);
    let today = zone(start).date();
    let later = |s: i64| zone(s).date() > today;
    let (mut lo, mut hi) = (start, start.saturating_add(2 * 86_400));
    if !later(hi) {
        // A zone (or clock) where no new day begins within two days: rotate daily anyway.
        return from_unix_secs(start.saturating_add(86_400));
    }
    // Invariant: `later(lo)` is false and `later(hi)` is true.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if later(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    from_unix_secs(hi)
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

    fn utc(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60
    }

    #[test]
    fn fixed_offsets() {
        let at = utc(2026, 1, 5, 23, 30);
        let east = LocalTime::at_offset(at, 3600);
        assert_eq!((east.date(), east.hour, east.minute), ((2026, 1, 6), 0, 30));
        assert_eq!(east.date_string(), "2026-01-06");
        assert_eq!(east.python_stamp(), "26-01-06 00:30:00");
        let west = LocalTime::at_offset(utc(2000, 1, 1, 2, 0) + 7, -5 * 3600);
        assert_eq!(west.python_stamp(), "99-12-31 21:00:07");
        assert_eq!(west.offset_secs, -18_000);
        // Midnight in a zone one hour east is 23:00 UTC the day before.
        let zone = |s| LocalTime::at_offset(s, 3600);
        let next = next_midnight_in(from_unix_secs(utc(2026, 1, 5, 10, 0)), zone);
        assert_eq!(unix_secs(next), utc(2026, 1, 5, 23, 0));
        // Exactly at midnight, the next one is a day later.
        assert_eq!(
            unix_secs(next_midnight_in(next, zone)),
            utc(2026, 1, 6, 23, 0)
        );
        // Half a second before midnight still rotates at midnight, not a day later.
        let just_before = next - Duration::from_millis(500);
        assert_eq!(next_midnight_in(just_before, zone), next);
    }

    #[test]
    fn midnights_across_dst_changes() {
        // Offset +1 h until 2026-03-29 01:00 UTC (02:00 local), +2 h after: a 23-hour day.
        let switch = utc(2026, 3, 29, 1, 0);
        let spring = |s: i64| LocalTime::at_offset(s, if s < switch { 3600 } else { 7200 });
        let day_start = next_midnight_in(from_unix_secs(utc(2026, 3, 28, 12, 0)), spring);
        assert_eq!(unix_secs(day_start), utc(2026, 3, 28, 23, 0));
        let day_end = next_midnight_in(day_start, spring);
        assert_eq!(unix_secs(day_end), utc(2026, 3, 29, 22, 0));
        assert_eq!(unix_secs(day_end) - unix_secs(day_start), 23 * 3600);
        // A zone whose clocks jump from 00:00 to 01:00: the new day begins at 01:00 local.
        let jump = utc(2026, 9, 6, 3, 0); // 00:00 at -3 h
        let skip = |s: i64| LocalTime::at_offset(s, if s < jump { -3 * 3600 } else { -2 * 3600 });
        let first = next_midnight_in(from_unix_secs(utc(2026, 9, 5, 15, 0)), skip);
        assert_eq!(unix_secs(first), jump);
        let local = skip(unix_secs(first));
        assert_eq!((local.date(), local.hour), ((2026, 9, 6), 1));
    }

    #[test]
    fn unix_seconds_round_trip() {
        for secs in [0, 1, -1, -86_401, 1_767_607_200] {
            assert_eq!(unix_secs(from_unix_secs(secs)), secs);
        }
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_millis(500)), -1);
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_millis(1500)), 1);
    }

    /// The C library's answer agrees with the arithmetic at its own offset, and the next
    /// midnight is where the date changes. Run again by `local_time_follows_tz` in a child
    /// with `TZ` set (this process never changes its own environment), where it also checks
    /// known New York times.
    #[test]
    fn local_time_is_consistent() {
        for secs in [
            0,
            utc(2026, 3, 8, 5, 30),
            utc(2026, 11, 1, 5, 30),
            utc(2025, 11, 30, 19, 2),
        ] {
            let local = local_time(from_unix_secs(secs));
            assert_eq!(
                local,
                LocalTime::at_offset(secs, local.offset_secs),
                "{secs}"
            );
            let midnight = unix_secs(next_local_midnight(from_unix_secs(secs)));
            assert!(midnight > secs);
            assert!(local_time(from_unix_secs(midnight)).date() > local.date());
            assert_eq!(
                local_time(from_unix_secs(midnight - 1)).date(),
                local.date()
            );
            let at_midnight = local_time(from_unix_secs(midnight));
            assert!(
                at_midnight.hour <= 1 && at_midnight.minute == 0,
                "{at_midnight:?}"
            );
        }
        if std::env::var_os("TFA_TIME_EXPECT_NEW_YORK").is_some() {
            let winter = local_time(from_unix_secs(utc(2026, 1, 5, 10, 0)));
            assert_eq!((winter.hour, winter.offset_secs), (5, -5 * 3600));
            let summer = local_time(from_unix_secs(utc(2026, 7, 5, 10, 0)));
            assert_eq!((summer.hour, summer.offset_secs), (6, -4 * 3600));
            // 2026-03-08 lasts 23 hours in New York.
            let day = next_local_midnight(from_unix_secs(utc(2026, 3, 7, 12, 0)));
            assert_eq!(unix_secs(day), utc(2026, 3, 8, 5, 0));
            assert_eq!(unix_secs(next_local_midnight(day)), utc(2026, 3, 9, 4, 0));
        }
    }

    #[test]
    fn local_time_follows_tz() {
        let exe = std::env::current_exe().expect("the test binary knows its path");
        let out = std::process::Command::new(exe)
            .args([
                "time::tests::local_time_is_consistent",
                "--exact",
                "--test-threads=1",
            ])
            .env("TZ", "EST5EDT,M3.2.0,M11.1.0")
            .env("TFA_TIME_EXPECT_NEW_YORK", "1")
            .output()
            .expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

//! Wall-clock timestamps in the formats Testflinger uses, without a date crate, and the
//! host's local time (its UTC offset from the C library, which honours `TZ` and
//! `/etc/localtime`), for the log's midnight rotation and the Python agent's log layout.

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

/// A moment in local time, broken down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl LocalTime {
    /// `YYYY-MM-DD`, as Python's midnight-rotated log files are named.
    pub fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `YY-MM-DD HH:MM:SS`, the Python agent's log timestamp (`%y-%m-%d %H:%M:%S`).
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

/// Where local time comes from: the host's time zone, or a fixed offset in tests.
pub trait Zone: Send + Sync {
    /// Seconds east of UTC in force at `at`.
    fn offset(&self, at: SystemTime) -> i64;
}

/// The host's time zone, through the C library's `localtime_r`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostZone;

impl Zone for HostZone {
    fn offset(&self, at: SystemTime) -> i64 {
        // time_t is 64 bits on every target the agent supports.
        let t: libc::time_t = unix_secs(at);
        // SAFETY: `localtime_r` is the reentrant variant: it reads `t` and writes only into
        // the `tm` we own; both pointers are valid for the call. On failure it returns null
        // and `tm` is not read.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        if ok {
            tm.tm_gmtoff
        } else {
            0
        }
    }
}

/// A fixed UTC offset (tests, or a host without a time zone).
#[derive(Clone, Copy, Debug)]
pub struct FixedZone(pub i64);

impl Zone for FixedZone {
    fn offset(&self, _at: SystemTime) -> i64 {
        self.0
    }
}

fn unix_secs(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// `at` in local time.
pub fn local(zone: &dyn Zone, at: SystemTime) -> LocalTime {
    let secs = unix_secs(at).saturating_add(zone.offset(at));
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    LocalTime {
        year,
        month,
        day,
        hour: (of_day / 3600) as u32,
        minute: (of_day / 60 % 60) as u32,
        second: (of_day % 60) as u32,
    }
}

/// The first local midnight after `at`.
pub fn next_local_midnight(zone: &dyn Zone, at: SystemTime) -> SystemTime {
    let local_secs = unix_secs(at).saturating_add(zone.offset(at));
    let midnight_local = (local_secs.div_euclid(86_400) + 1) * 86_400;
    // The offset may change by then (daylight saving time): take the one in force there.
    let guess = midnight_local - zone.offset(at);
    let utc = midnight_local - zone.offset(from_unix(guess));
    let next = from_unix(utc);
    if next > at {
        next
    } else {
        from_unix(guess).max(at + std::time::Duration::from_secs(1))
    }
}

fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - std::time::Duration::from_secs(secs.unsigned_abs())
    }
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
    fn local_time_and_midnight_with_a_fixed_offset() {
        // 2026-01-05 23:30:00 UTC is 2026-01-06 01:30:00 at UTC+2.
        let at = UNIX_EPOCH + Duration::from_secs(1_767_655_800);
        let zone = FixedZone(7200);
        let l = local(&zone, at);
        assert_eq!(l.date(), "2026-01-06");
        assert_eq!(l.python_stamp(), "26-01-06 01:30:00");
        // The next local midnight is 2026-01-06 22:00:00 UTC.
        let midnight = next_local_midnight(&zone, at);
        assert_eq!(
            midnight
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
            1_767_736_800
        );
        assert_eq!(local(&zone, midnight).python_stamp(), "26-01-07 00:00:00");
        // Exactly at midnight, the next one is a day later.
        assert_eq!(
            next_local_midnight(&zone, midnight)
                .duration_since(midnight)
                .expect("later"),
            Duration::from_secs(86_400)
        );
        // West of UTC too.
        let west = FixedZone(-5 * 3600);
        assert_eq!(local(&west, at).date(), "2026-01-05");
        assert_eq!(local(&west, at).hour, 18);
    }

    #[test]
    fn the_host_zone_gives_a_sane_offset() {
        let offset = HostZone.offset(SystemTime::now());
        assert!((-14 * 3600..=14 * 3600).contains(&offset), "{offset}");
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

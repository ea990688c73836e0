//! UTC timestamps for the fake server: the server's renderings and an ISO 8601 parser.
//!
//! Times are microseconds since the Unix epoch (`i64`), which is all the fake needs to
//! render `updated_at`/`started_at` and to compare fragment timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

const MICROS_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Now, in microseconds since the epoch.
pub fn now_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (seconds precision, no zone).
fn seconds_text(micros: i64) -> String {
    let secs = micros.div_euclid(MICROS_PER_SECOND);
    let days = secs.div_euclid(SECONDS_PER_DAY);
    let rem = secs.rem_euclid(SECONDS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// How the server renders a stored (naive UTC) datetime: `2026-01-05T10:00:00Z`.
pub fn render_naive(micros: i64) -> String {
    format!("{}Z", seconds_text(micros))
}

/// How the server renders a timezone-aware datetime (quirk): `2026-01-05T10:00:00+00:00Z`.
pub fn render_aware(micros: i64) -> String {
    format!("{}+00:00Z", seconds_text(micros))
}

/// Like Python's `isoformat()` on an aware UTC value: `2026-01-05T10:00:00.123456+00:00`.
pub fn render_isoformat(micros: i64) -> String {
    format!(
        "{}.{:06}+00:00",
        seconds_text(micros),
        micros.rem_euclid(MICROS_PER_SECOND)
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Fixed-width decimal field.
fn digits(s: &[u8], range: std::ops::Range<usize>) -> Option<i64> {
    let part = s.get(range)?;
    if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
        return None;
    }
    part.iter().try_fold(0i64, |acc, b| {
        acc.checked_mul(10)?.checked_add(i64::from(b - b'0'))
    })
}

/// Parses an ISO 8601 date-time as the server's schema accepts it:
/// `YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]][Z|±HH[:MM]]`. A value without a zone is UTC (the
/// server stores naive datetimes as UTC). Returns microseconds since the epoch.
pub fn parse_iso_datetime(text: &str) -> Option<i64> {
    let s = text.as_bytes();
    if s.len() < 16 || s[4] != b'-' || s[7] != b'-' || (s[10] != b'T' && s[10] != b' ') {
        return None;
    }
    let year = digits(s, 0..4)?;
    let month = digits(s, 5..7)?;
    let day = digits(s, 8..10)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let hour = digits(s, 11..13)?;
    if s[13] != b':' {
        return None;
    }
    let minute = digits(s, 14..16)?;
    let mut pos = 16;
    let mut second = 0;
    let mut micros = 0;
    if s.get(pos) == Some(&b':') {
        second = digits(s, pos + 1..pos + 3)?;
        pos += 3;
        if s.get(pos) == Some(&b'.') || s.get(pos) == Some(&b',') {
            let start = pos + 1;
            let mut end = start;
            while s.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            if end == start || end - start > 9 {
                return None;
            }
            let frac = &s[start..end.min(start + 6)];
            let mut value = digits(s, start..start + frac.len())?;
            for _ in frac.len()..6 {
                value *= 10;
            }
            micros = value;
            pos = end;
        }
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let offset_seconds = match s.get(pos) {
        None => 0,
        Some(b'Z') | Some(b'z') if pos + 1 == s.len() => 0,
        Some(sign @ (b'+' | b'-')) => {
            let oh = digits(s, pos + 1..pos + 3)?;
            let om = match s.len() - (pos + 3) {
                0 => 0,
                3 if s[pos + 3] == b':' => digits(s, pos + 4..pos + 6)?,
                2 => digits(s, pos + 3..pos + 5)?,
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(secs * MICROS_PER_SECOND + micros)
}

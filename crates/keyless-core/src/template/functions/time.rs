//! The date functions: `dateTimeAdd`, `dateTimeFromEpoch`, `dateTimeToEpoch`. Times are UTC
//! seconds; durations are ISO 8601 as ARM reads them (`P1Y` is 365 days and `P1M` 30 days: ARM
//! does no calendar arithmetic), with an optional sign.

use super::{arity, format_time, int, s};
use crate::clock::{civil_from_days, days_from_civil};
use serde_json::Value;

/// ISO 8601 with seconds and `Z`: what a date function answers without a format.
const ISO: &str = "yyyy-MM-ddTHH:mm:ssZ";
/// `utcNow()`'s default format.
const COMPACT: &str = "yyyyMMddTHHmmssZ";

fn bad_time(name: &str, v: &str) -> String {
    format!("The template language function '{name}' expects a date-time value in ISO 8601 format; '{v}' is not one. Please see https://aka.ms/arm-functions-date for usage details.")
}

/// `text` as UTC seconds, and whether it was written in `utcNow()`'s compact form. Accepted:
/// `2020-04-07T14:53:14Z` (or a space for `T`, fractional seconds, an offset `+01:00`, or no
/// zone: UTC), `2020-04-07` and `20200407T145314Z`.
fn parse_time(text: &str) -> Option<(i64, bool)> {
    let t = text.trim();
    // every form is ASCII (and slicing at byte offsets below needs it)
    if !t.is_ascii() {
        return None;
    }
    let digits = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    // the compact form
    if t.len() == 16 && t.as_bytes()[8] == b'T' && t.ends_with('Z') {
        let (y, mo, d) = (digits(&t[0..4])?, digits(&t[4..6])?, digits(&t[6..8])?);
        let (h, mi, s) = (digits(&t[9..11])?, digits(&t[11..13])?, digits(&t[13..15])?);
        return seconds(y, mo, d, h, mi, s).map(|x| (x, true));
    }
    if t.len() < 10 || t.as_bytes()[4] != b'-' || t.as_bytes()[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (digits(&t[0..4])?, digits(&t[5..7])?, digits(&t[8..10])?);
    let rest = &t[10..];
    if rest.is_empty() {
        return seconds(y, mo, d, 0, 0, 0).map(|x| (x, false));
    }
    let rest = rest.strip_prefix(['T', ' '])?;
    if rest.len() < 8 || rest.as_bytes()[2] != b':' || rest.as_bytes()[5] != b':' {
        return None;
    }
    let (h, mi, s) = (
        digits(&rest[0..2])?,
        digits(&rest[3..5])?,
        digits(&rest[6..8])?,
    );
    let mut zone = &rest[8..];
    if let Some(frac) = zone.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        zone = &frac[n..];
    }
    let offset = match zone {
        "" | "Z" | "z" => 0,
        z if z.len() == 6 && (z.starts_with('+') || z.starts_with('-')) && &z[3..4] == ":" => {
            let m = digits(&z[1..3])? * 3600 + digits(&z[4..6])? * 60;
            if z.starts_with('+') {
                m
            } else {
                -m
            }
        }
        _ => return None,
    };
    seconds(y, mo, d, h, mi, s).map(|x| (x - offset, false))
}

fn seconds(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    let valid = (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..24).contains(&h)
        && (0..60).contains(&mi)
        && (0..60).contains(&s);
    if !valid {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    // a day that does not exist (February 30) comes back as another date
    if civil_from_days(days) != (y, mo as u32, d as u32) {
        return None;
    }
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// An ISO 8601 duration in seconds (`P1Y` = 365 days, `P1M` = 30 days, `P1W` = 7 days).
fn parse_duration(text: &str) -> Option<i64> {
    let t = text.trim();
    let (sign, t) = match t.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, t.strip_prefix('+').unwrap_or(t)),
    };
    let mut rest = t.strip_prefix('P')?;
    let (mut total, mut time, mut any, mut timed) = (0i64, false, false, false);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('T') {
            if time {
                return None;
            }
            time = true;
            rest = r;
            continue;
        }
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 12 || n == rest.len() {
            return None;
        }
        let v: i64 = rest[..n].parse().ok()?;
        let unit = match (time, rest.as_bytes()[n]) {
            (false, b'Y') => 365 * 86_400,
            (false, b'M') => 30 * 86_400,
            (false, b'W') => 7 * 86_400,
            (false, b'D') => 86_400,
            (true, b'H') => 3600,
            (true, b'M') => 60,
            (true, b'S') => 1,
            _ => return None,
        };
        total = total.checked_add(v.checked_mul(unit)?)?;
        any = true;
        timed |= time;
        rest = &rest[n + 1..];
    }
    // a `T` names a time part: one must follow
    (any && timed == time).then_some(sign * total)
}

/// `secs` as text in `format`; before 1970 or past 9999 it is no date ARM would answer.
fn show(name: &str, secs: i64, format: &str) -> Result<Value, String> {
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(0..=MAX).contains(&secs) {
        return Err(format!("The template language function '{name}' produced a date-time outside 1970-01-01 to 9999-12-31. Please see https://aka.ms/arm-functions-date for usage details."));
    }
    Ok(Value::String(format_time(secs as u64, format)))
}

/// The functions here (lower-case).
pub(super) const NAMES: &[&str] = &["datetimeadd", "datetimefromepoch", "datetimetoepoch"];

/// The functions here, if `lname` (lower-case) is one.
pub(super) fn apply(name: &str, lname: &str, a: &[Value]) -> Option<Result<Value, String>> {
    let n = a.len();
    let r = match lname {
        "datetimeadd" => (|| {
            arity(name, n, 2, 3)?;
            let base = s(name, &a[0])?;
            let (t, compact) = parse_time(base).ok_or_else(|| bad_time(name, base))?;
            let d = s(name, &a[1])?;
            let by = parse_duration(d).ok_or_else(|| {
                format!("The template language function '{name}' expects a duration in ISO 8601 format (as 'P1D' or 'PT1H'); '{d}' is not one. Please see https://aka.ms/arm-functions-date for usage details.")
            })?;
            let format = match a.get(2) {
                Some(f) => s(name, f)?,
                None if compact => COMPACT,
                None => ISO,
            };
            show(name, t.saturating_add(by), format)
        })(),
        "datetimefromepoch" => (|| {
            arity(name, n, 1, 1)?;
            show(name, int(name, &a[0])?, ISO)
        })(),
        "datetimetoepoch" => (|| {
            arity(name, n, 1, 1)?;
            let v = s(name, &a[0])?;
            let (t, _) = parse_time(v).ok_or_else(|| bad_time(name, v))?;
            Ok(Value::from(t))
        })(),
        _ => return None,
    };
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_parse_as_arm_reads_them() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some((0, false)));
        assert_eq!(
            parse_time("2020-04-07 14:53:14Z"),
            Some((1_586_271_194, false))
        );
        assert_eq!(
            parse_time("2020-04-07T14:53:14.1234567Z"),
            Some((1_586_271_194, false))
        );
        assert_eq!(
            parse_time("2020-04-07T16:53:14+02:00"),
            Some((1_586_271_194, false))
        );
        assert_eq!(parse_time("20200407T145314Z"), Some((1_586_271_194, true)));
        assert_eq!(parse_time("2020-04-07"), Some((1_586_217_600, false)));
        for bad in [
            "",
            "2020-02-30",
            "2020-13-01T00:00:00Z",
            "yesterday",
            "2020-04-07T25:00:00Z",
            "2020-04-07X",
            // not ASCII: refused, never sliced through a character
            "aaaéxxxT123456Z",
            "2020-04-0é",
            "2020-04-07T14:53:1é",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_duration("P1Y"), Some(365 * 86_400));
        assert_eq!(parse_duration("P1M"), Some(30 * 86_400));
        assert_eq!(parse_duration("PT1M"), Some(60));
        assert_eq!(parse_duration("-PT1H30M"), Some(-5400));
        assert_eq!(parse_duration("P1DT2H3M4S"), Some(86_400 + 7384));
        for bad in [
            "",
            "P",
            "1D",
            "PT",
            "P1H",
            "PT1D",
            "P1DT",
            "PTT1H",
            "P999999999999999D",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}

//! Showing values: times (RFC 3339, UTC), durations, hex, outcome previews,
//! scopes; and writing to stdout without panicking on a closed pipe.

use std::fmt::Write as _;
use std::time::Duration;

use idem_core::{Scope, Timestamp};

/// The most outcome bytes `inspect` ever shows.
pub(crate) const MAX_PREVIEW: usize = 1024;

/// Writes a line on stdout; a closed pipe (`idem … | head`) is not an error
/// worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use out;

/// `t` as RFC 3339 in UTC, to the millisecond: `2025-01-31T23:59:59.123Z`.
pub(crate) fn rfc3339(t: Timestamp) -> String {
    let ms = t.as_millis();
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A duration for people, to the second: `42 s`, `3 min 5 s`, `2 h 10 min`,
/// `3 d 4 h`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3_600 => format!("{} min {} s", s / 60, s % 60),
        3_600..86_400 => format!("{} h {} min", s / 3_600, s % 3_600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// How far `t` is from `now`: `in 3 min 5 s` or `3 min 5 s ago`.
pub(crate) fn relative(t: Timestamp, now: Timestamp) -> String {
    if t > now {
        format!("in {}", human(t.since(now)))
    } else {
        format!("{} ago", human(now.since(t)))
    }
}

/// Milliseconds from `now` to `t`, negative if `t` is past.
pub(crate) fn millis_until(t: Timestamp, now: Timestamp) -> i64 {
    let signed = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
    if t >= now {
        signed(t.as_millis() - now.as_millis())
    } else {
        -signed(now.as_millis() - t.as_millis())
    }
}

/// Lowercase hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// The first `max` bytes of `bytes` (at most [`MAX_PREVIEW`]) as text safe
/// for a terminal: printable ASCII as is, `\"`, `\\`, `\n`, `\r`, `\t`, and
/// every other byte as `\xNN`. Also whether bytes were left out.
pub(crate) fn preview(bytes: &[u8], max: usize) -> (String, bool) {
    let shown = &bytes[..bytes.len().min(max.min(MAX_PREVIEW))];
    let mut out = String::with_capacity(shown.len());
    for &byte in shown {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(char::from(byte)),
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
        }
    }
    (out, shown.len() < bytes.len())
}

/// The scope for people: `tenant "acme", principal "u1", operation "pay"`
/// (or `the global scope`); each part quoted and escaped.
pub(crate) fn scope(scope: &Scope) -> String {
    let mut out = if scope.tenant_id().is_empty() {
        "the global scope".to_string()
    } else {
        format!("tenant {:?}", scope.tenant_id())
    };
    if let Some(principal) = scope.principal() {
        let _ = write!(out, ", principal {principal:?}");
    }
    if let Some(operation) = scope.operation() {
        let _ = write!(out, ", operation {operation:?}");
    }
    out
}

/// The scope as JSON.
pub(crate) fn scope_json(scope: &Scope) -> serde_json::Value {
    serde_json::json!({
        "tenant": scope.tenant_id(),
        "principal": scope.principal(),
        "operation": scope.operation(),
    })
}

/// `part` as a percentage of `whole`: ` 12.5%` (`   -` when `whole` is 0).
pub(crate) fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "     -".to_string();
    }
    #[allow(clippy::cast_precision_loss)]
    let share = part as f64 * 100.0 / whole as f64;
    format!("{share:5.1}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(rfc3339(Timestamp::EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Timestamp::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(Timestamp::from_millis(1_767_225_599_999)),
            "2025-12-31T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339(Timestamp::from_millis(4_107_542_400_000)),
            "2100-03-01T00:00:00.000Z"
        );
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human(Duration::from_millis(999)), "0 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(human(Duration::from_secs(7_800)), "2 h 10 min");
        assert_eq!(human(Duration::from_secs(273_600)), "3 d 4 h");
        let now = Timestamp::from_millis(10_000);
        assert_eq!(relative(Timestamp::from_millis(52_000), now), "in 42 s");
        assert_eq!(relative(Timestamp::from_millis(4_000), now), "6 s ago");
        assert_eq!(millis_until(Timestamp::from_millis(4_000), now), -6_000);
    }

    #[test]
    fn previews_escape_and_truncate() {
        let (text, cut) = preview(b"{\"a\":1}\n\x00\xff", 64);
        assert_eq!(text, "{\\\"a\\\":1}\\n\\x00\\xff");
        assert!(!cut);
        let (text, cut) = preview(&[b'x'; 100], 10);
        assert_eq!(text, "x".repeat(10));
        assert!(cut);
        let (text, cut) = preview(&[b'x'; 5000], usize::MAX);
        assert_eq!(text.len(), MAX_PREVIEW);
        assert!(cut);
        assert_eq!(preview(b"abc", 0), (String::new(), true));
    }

    #[test]
    fn scopes() {
        let s = Scope::tenant("acme")
            .with_principal("u\n1")
            .with_operation("pay");
        assert_eq!(
            scope(&s),
            "tenant \"acme\", principal \"u\\n1\", operation \"pay\""
        );
        assert_eq!(scope(&Scope::global()), "the global scope");
        assert_eq!(percent(1, 8), " 12.5%");
    }
}

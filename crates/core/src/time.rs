//! Small helpers to show wall-clock times and durations to people.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Displays a [`SystemTime`] as an RFC 3339 UTC timestamp with milliseconds,
/// for example `2026-11-24T19:35:02.123Z`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Utc(pub SystemTime);

impl fmt::Display for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ok(since_epoch) = self.0.duration_since(UNIX_EPOCH) else {
            return f.write_str("before-1970");
        };
        let secs = since_epoch.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            since_epoch.subsec_millis()
        )
    }
}

impl fmt::Debug for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Displays a duration compactly: `850ms`, `12.3s`, `4m05s`, `2h03m`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Short(pub Duration);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let secs = d.as_secs();
        if secs < 1 {
            write!(f, "{}ms", d.as_millis())
        } else if secs < 60 {
            write!(f, "{:.1}s", d.as_secs_f64())
        } else if secs < 3600 {
            write!(f, "{}m{:02}s", secs / 60, secs % 60)
        } else {
            write!(f, "{}h{:02}m", secs / 3600, secs % 3600 / 60)
        }
    }
}

impl fmt::Debug for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `start + d`, or the latest instant this platform can represent near it
/// when the sum overflows: a deadline of "practically never" instead of a
/// panic, for durations such as [`Duration::MAX`].
pub fn saturating_add(start: Instant, d: Duration) -> Instant {
    if let Some(sum) = start.checked_add(d) {
        return sum;
    }
    // Halve the step until it fits: at worst ~64 tries, each one checked.
    let mut at = start;
    let mut step = d;
    while !step.is_zero() {
        match at.checked_add(step) {
            Some(next) => at = next,
            None => step /= 2,
        }
    }
    at
}

/// Milliseconds since the Unix epoch, saturating (0 before 1970).
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_millis`].
pub fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_549_502_123);
        assert_eq!(Utc(t).to_string(), "2026-11-24T19:45:02.123Z");
        assert_eq!(Utc(UNIX_EPOCH).to_string(), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(Utc(leap).to_string(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn saturating_add_never_panics() {
        let now = Instant::now();
        assert_eq!(
            saturating_add(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        let far = saturating_add(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(1_000_000_000));
    }

    #[test]
    fn formats_short() {
        assert_eq!(Short(Duration::from_millis(850)).to_string(), "850ms");
        assert_eq!(Short(Duration::from_millis(12_345)).to_string(), "12.3s");
        assert_eq!(Short(Duration::from_secs(245)).to_string(), "4m05s");
        assert_eq!(Short(Duration::from_secs(7380)).to_string(), "2h03m");
    }
}

//! Time as the core sees it: milliseconds since the Unix epoch, handed in by the driver.
//!
//! Leases, deadlines and fire times are persisted and compared across restarts and processes,
//! so the core uses wall-clock milliseconds rather than a process-local monotonic clock. Because
//! a wall clock can jump backwards, the [`Scheduler`](crate::Scheduler) clamps every `now` it is
//! given to the latest one it has seen.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// An instant: milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);
    /// The latest representable instant; used as "never" in comparisons.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// The instant `ms` milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus `ms` milliseconds, saturating at [`Timestamp::MAX`].
    pub fn plus_ms(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_add_unsigned(ms))
    }

    /// This instant minus `ms` milliseconds (saturating).
    pub fn minus_ms(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_sub_unsigned(ms))
    }

    /// This instant plus `ms` milliseconds, or `None` past [`Timestamp::MAX`]. For computing
    /// slots, where a saturated instant would be a slot that is not on the schedule.
    pub fn checked_plus_ms(self, ms: u64) -> Option<Self> {
        self.0.checked_add_unsigned(ms).map(Timestamp)
    }

    /// Milliseconds from `earlier` to `self`, or 0 if `earlier` is not earlier.
    pub fn ms_since(self, earlier: Timestamp) -> u64 {
        u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0)
    }

    /// This instant as a chrono UTC date-time, if it is within chrono's range.
    pub fn to_utc(self) -> Option<DateTime<Utc>> {
        DateTime::<Utc>::from_timestamp_millis(self.0)
    }

    /// Parses an RFC 3339 instant such as `2026-03-08T07:00:00Z`.
    pub fn parse_rfc3339(text: &str) -> Result<Self, chrono::ParseError> {
        DateTime::parse_from_rfc3339(text).map(|t| Timestamp(t.timestamp_millis()))
    }
}

impl<Tz: chrono::TimeZone> From<DateTime<Tz>> for Timestamp {
    fn from(t: DateTime<Tz>) -> Self {
        Timestamp(t.timestamp_millis())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_utc() {
            Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
            None => write!(f, "{}ms", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_overflowing() {
        assert_eq!(Timestamp::MAX.plus_ms(5), Timestamp::MAX);
        assert_eq!(Timestamp(-1).plus_ms(u64::MAX), Timestamp::MAX);
        assert_eq!(Timestamp(i64::MAX - 1).checked_plus_ms(2), None);
        assert_eq!(Timestamp(-1).checked_plus_ms(1), Some(Timestamp(0)));
        assert_eq!(Timestamp(10).ms_since(Timestamp(20)), 0);
        assert_eq!(Timestamp(20).ms_since(Timestamp(5)), 15);
    }

    #[test]
    fn displays_as_rfc3339_utc() {
        let t = Timestamp::parse_rfc3339("2026-03-08T07:00:00.250Z").unwrap();
        assert_eq!(t.to_string(), "2026-03-08T07:00:00.250Z");
    }
}

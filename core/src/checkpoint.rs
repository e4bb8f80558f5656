//! Checkpoint throttling (SPEC C1): a run's saves are persisted no more often than an interval,
//! and the throttle clock advances only when the store acknowledges a save.
//!
//! | state | input | result |
//! |---|---|---|
//! | idle, window open | save | write it (`Write { seq }`), now in flight |
//! | idle, window closed | save | keep it as pending (`Throttled { until }`) |
//! | in flight | save | keep it as pending (the newest wins) |
//! | in flight | the store acknowledged it | idle; the window closes until `acked_at + interval` |
//! | in flight | the store failed it | idle; the window opens: the next save is written at once |
//! | any | flush (graceful shutdown) | the pending save is written, unthrottled |
//!
//! A failed save is reported to the caller (an `Event::CheckpointFailed`) and never throttles
//! the next one away: only an acknowledged save closes the window.

use crate::time::Timestamp;

/// What happens to one save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDecision {
    /// Write it now.
    Write,
    /// Kept as the run's pending save; written by the next save after `until`, by a flush, or
    /// when a write fails; kept in the run if the attempt ends first.
    Throttled {
        /// When the window opens again (or, while a save is in flight, its earliest).
        until: Timestamp,
    },
}

/// The throttle of one run's checkpoint saves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Throttle {
    /// When the last save was acknowledged.
    acked_at: Option<Timestamp>,
    /// The save being written, by sequence number.
    in_flight: Option<u64>,
    /// The newest save not yet written.
    pub(crate) pending: Option<String>,
}

impl Throttle {
    /// Decides what to do with a save at `now`. A throttled save's data must be kept by the
    /// caller in `pending`.
    pub fn save(&mut self, now: Timestamp, interval_ms: u64) -> SaveDecision {
        let window_opens = self
            .acked_at
            .map_or(now, |acked| acked.plus_ms(interval_ms));
        if self.in_flight.is_some() || now < window_opens {
            return SaveDecision::Throttled {
                until: window_opens.max(now),
            };
        }
        SaveDecision::Write
    }

    /// A save with sequence number `seq` went into a batch.
    pub fn writing(&mut self, seq: u64) {
        self.in_flight = Some(seq);
        self.pending = None;
    }

    /// The store acknowledged save `seq` at `now`: the window closes. Returns false if `seq`
    /// was not the save in flight (a newer one replaced it).
    pub fn acknowledged(&mut self, seq: u64, now: Timestamp) -> bool {
        if self.in_flight != Some(seq) {
            return false;
        }
        self.in_flight = None;
        self.acked_at = Some(now);
        true
    }

    /// The store failed save `seq`: the window opens, so the next save is written at once
    /// (SPEC C1: a failed save never throttles the next one away, even one that a flush wrote
    /// inside the window).
    pub fn failed(&mut self, seq: u64) -> bool {
        if self.in_flight != Some(seq) {
            return false;
        }
        self.in_flight = None;
        self.acked_at = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_are_throttled_until_the_window_after_an_acknowledged_save() {
        let mut t = Throttle::default();
        assert_eq!(t.save(Timestamp(0), 5_000), SaveDecision::Write);
        t.writing(1);
        assert_eq!(
            t.save(Timestamp(10), 5_000),
            SaveDecision::Throttled {
                until: Timestamp(10)
            }
        );
        assert!(t.acknowledged(1, Timestamp(20)));
        assert_eq!(
            t.save(Timestamp(1_000), 5_000),
            SaveDecision::Throttled {
                until: Timestamp(5_020)
            }
        );
        assert_eq!(t.save(Timestamp(5_020), 5_000), SaveDecision::Write);
    }

    // SPEC C1: the throttle clock advances only after a successful persist.
    #[test]
    fn a_failed_save_never_throttles_the_next_one_away() {
        let mut t = Throttle::default();
        assert_eq!(t.save(Timestamp(0), 5_000), SaveDecision::Write);
        t.writing(1);
        assert!(t.failed(1));
        assert_eq!(t.save(Timestamp(1), 5_000), SaveDecision::Write);
    }

    #[test]
    fn stale_acknowledgements_are_ignored() {
        let mut t = Throttle::default();
        t.writing(1);
        t.writing(2);
        assert!(!t.acknowledged(1, Timestamp(5)));
        assert!(t.acknowledged(2, Timestamp(6)));
    }
}

//! Worker health: what each worker did with each kind of work, and a score (SPEC A4).
//!
//! The scheduler counts, per (worker, kind), in memory since it started (a restart starts the
//! counts over; the store keeps the runs and their audit trails, which say the same at length):
//!
//! | counter | counts |
//! |---|---|
//! | `claims` | runs of the kind the worker claimed |
//! | `successes` | attempts of the kind the worker ended in success |
//! | `failures` | attempts it ended in failure (retryable or permanent, a timeout, a release) |
//! | `lease_losses` | its leases the watchdog reclaimed after they expired |
//! | `idle_loops` | idle-claim-loop incidents opened against it while it asked for the kind |
//! | `last_seen` | its last claim naming the kind, or its last attempt of it ending |
//!
//! The in-process executor is a worker like any other (`Scheduler::worker`, "local" by
//! default). At most [`limits::WORKER_HEALTH_MAX`](crate::limits::WORKER_HEALTH_MAX) pairs are
//! tracked; a pair first seen beyond that is not counted.
//!
//! # Score
//!
//! `score` is in `0..=100`, from the counts alone (so it is the same whenever it is read):
//!
//! ```text
//! reliability = 100 × (successes + 1) / (successes + failures + 2 × lease_losses + 1)
//! score       = reliability − 10 × min(idle_loops, 5), at least 0
//! ```
//!
//! A worker with no history scores 100; every failure pulls the score down, a lost lease
//! twice as hard (the run waited a TTL and a grace for nothing, and the work may have been
//! done twice), and each idle claim loop (a worker asking for work nobody queues) costs 10
//! points, at most 50. The +1s keep one early failure from sinking a new worker to 0.

use serde::{Deserialize, Serialize};

use crate::ids::WorkerId;
use crate::time::Timestamp;

/// The counts of one (worker, kind) pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Runs claimed.
    pub claims: u64,
    /// Attempts ended in success.
    pub successes: u64,
    /// Attempts ended in failure.
    pub failures: u64,
    /// Leases reclaimed by the watchdog.
    pub lease_losses: u64,
    /// Idle-claim-loop incidents opened while it asked for this kind.
    pub idle_loops: u64,
    /// When it was last seen asking for or ending work of this kind.
    pub last_seen: Timestamp,
}

impl WorkerStats {
    /// The health score in `0..=100` (see the module docs for the formula).
    pub fn score(&self) -> u8 {
        let good = self.successes.saturating_add(1);
        let all = self
            .successes
            .saturating_add(self.failures)
            .saturating_add(self.lease_losses.saturating_mul(2))
            .saturating_add(1);
        let reliability = good.saturating_mul(100) / all;
        let idle = 10 * self.idle_loops.min(5);
        // `reliability` is at most 100, so the cast cannot truncate.
        reliability.saturating_sub(idle) as u8
    }
}

/// One (worker, kind) pair's health, the view the API and console show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHealth {
    /// The worker.
    pub worker: WorkerId,
    /// The handler kind.
    pub kind: String,
    /// Its counts.
    #[serde(flatten)]
    pub stats: WorkerStats,
    /// [`WorkerStats::score`].
    pub score: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(successes: u64, failures: u64, lease_losses: u64, idle_loops: u64) -> WorkerStats {
        WorkerStats {
            successes,
            failures,
            lease_losses,
            idle_loops,
            ..WorkerStats::default()
        }
    }

    #[test]
    fn the_score_follows_the_documented_formula() {
        assert_eq!(stats(0, 0, 0, 0).score(), 100, "no history");
        assert_eq!(stats(9, 0, 0, 0).score(), 100);
        assert_eq!(stats(0, 1, 0, 0).score(), 50);
        // 10 / (9 + 1 + 1) = 90.9 → 90
        assert_eq!(stats(9, 1, 0, 0).score(), 90);
        // A lost lease counts twice: 10 / (9 + 2 + 1) = 83.3 → 83
        assert_eq!(stats(9, 0, 1, 0).score(), 83);
        assert_eq!(stats(9, 0, 0, 2).score(), 80, "10 points per idle loop");
        assert_eq!(stats(9, 0, 0, 50).score(), 50, "at most 50 for idle loops");
        assert_eq!(stats(0, 9, 0, 9).score(), 0, "never below 0");
        assert!(
            stats(u64::MAX, u64::MAX, u64::MAX, 0).score() <= 100,
            "no overflow"
        );
    }
}

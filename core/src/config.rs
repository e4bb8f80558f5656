//! The scheduler's settings, in a module of their own: the scheduler and the watchdog both read
//! them, and neither should import the other for it.

use serde::{Deserialize, Serialize};

use crate::audit::HistoryPolicy;
use crate::lease::LeasePolicy;
use crate::outbox::OutboxConfig;

/// Scheduler-wide settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// A slot reached later than this is a misfire and the job's misfire policy applies.
    pub misfire_grace_ms: u64,
    /// How much history stores keep per job.
    pub history: HistoryPolicy,
    /// Lease timing: TTL, reclaim grace, holder margin.
    pub lease: LeasePolicy,
    /// After an attempt times out and is asked to stop, how long it has before it is killed.
    pub kill_grace_ms: u64,
    /// The backstop: an attempt is killed at this multiple of its timeout, extension or not.
    pub backstop_factor: u32,
    /// A running attempt with no heartbeat or progress for this long raises a stuck incident.
    pub stuck_after_ms: u64,
    /// Consecutive empty claims by one worker, while work of other kinds waits, that raise an
    /// idle-claim-loop incident.
    pub idle_claims_max: u32,
    /// Checkpoint saves of one run are persisted no more often than this.
    pub checkpoint_interval_ms: u64,
    /// The delivery outbox: capacity, overflow policy, delivery retry policy.
    pub outbox: OutboxConfig,
    /// A job whose runs fail this many times in a row raises a `failing_job` incident, which
    /// its next success resolves (SPEC O4). 0: never.
    pub failing_after: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            misfire_grace_ms: 60_000,
            history: HistoryPolicy::default(),
            lease: LeasePolicy::default(),
            kill_grace_ms: 10_000,
            backstop_factor: 3,
            stuck_after_ms: 20_000,
            idle_claims_max: 10,
            checkpoint_interval_ms: 5_000,
            outbox: OutboxConfig::default(),
            failing_after: 3,
        }
    }
}

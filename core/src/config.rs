//! The scheduler's settings, in a module of their own: the scheduler and the watchdog both read
//! them, and neither should import the other for it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::HistoryPolicy;
use crate::lease::LeasePolicy;
use crate::outbox::OutboxConfig;

/// Scheduler-wide settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// A running attempt with no heartbeat or progress for this long raises a stuck incident
    /// (the `queue_stuck` rule, running work).
    pub stuck_after_ms: u64,
    /// A queued run that external workers must claim, unclaimed for this long, raises an
    /// `unclaimed_queue` incident for its kind (the `queue_stuck` rule, queued work). 0: never.
    pub unclaimed_after_ms: u64,
    /// Consecutive empty claims by one worker, while work of other kinds waits, that raise an
    /// idle-claim-loop incident (the `claim_loop_idle` rule).
    pub idle_claims_max: u32,
    /// Checkpoint saves of one run are persisted no more often than this.
    pub checkpoint_interval_ms: u64,
    /// The delivery outbox: capacity, overflow policy, delivery retry policy.
    pub outbox: OutboxConfig,
    /// A job whose runs fail this many times in a row raises a `failing_job` incident, which
    /// its next success resolves (SPEC O4). 0: never.
    pub failing_after: u32,
    /// The sinks told when an incident opens, is acknowledged or resolves (SPEC A3), named
    /// as a job's `sinks` are; each notification is one outbox delivery per sink.
    pub incident_sinks: Vec<Arc<str>>,
    /// An incident still open and not acknowledged this long after it opened escalates,
    /// once: its notification goes to `escalation_sinks`. 0: never.
    pub escalate_after_ms: u64,
    /// The sinks an escalation goes to; empty: `incident_sinks`.
    pub escalation_sinks: Vec<Arc<str>>,
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
            unclaimed_after_ms: 600_000,
            idle_claims_max: 10,
            checkpoint_interval_ms: 5_000,
            outbox: OutboxConfig::default(),
            failing_after: 3,
            incident_sinks: Vec::new(),
            escalate_after_ms: 0,
            escalation_sinks: Vec::new(),
        }
    }
}

/// A named set of watchdog thresholds (`[watchdog] profile` in keel.toml). Each rule's key
/// overrides the profile's value.
///
/// | threshold | `keel` | `design` |
/// |---|---|---|
/// | `lease.grace_ms` (reclaim at expiry + grace) | 10 s | 60 s |
/// | `stuck_after_ms` (running work silent) | 20 s | 10 min |
/// | `unclaimed_after_ms` (queued work nobody claims) | 10 min | 10 min |
/// | `idle_claims_max` (empty claims in a row) | 10 | 3 |
/// | `failing_after` (failed runs in a row) | 3 | 3 |
///
/// `keel` is [`Config::default`]: tuned for one daemon running its own handlers, where a
/// heartbeat arrives every half lease TTL (15 s), so 20 s of silence is already unusual, and a
/// worker polling every second reaches 10 empty claims in seconds. `design` is the watchdog
/// design keel's rules generalise (`docs/spec.md`), for fleets of slow external workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchdogProfile {
    /// keel's own defaults.
    #[default]
    Keel,
    /// The reference design's values.
    Design,
}

impl WatchdogProfile {
    /// Every profile, in the order the docs list them.
    pub const ALL: [WatchdogProfile; 2] = [WatchdogProfile::Keel, WatchdogProfile::Design];

    /// Its name in keel.toml.
    pub fn name(self) -> &'static str {
        match self {
            WatchdogProfile::Keel => "keel",
            WatchdogProfile::Design => "design",
        }
    }

    /// The profile named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// `config` with this profile's watchdog thresholds; every other setting is kept.
    pub fn apply(self, config: Config) -> Config {
        match self {
            WatchdogProfile::Keel => {
                let keel = Config::default();
                Config {
                    lease: crate::lease::LeasePolicy {
                        grace_ms: keel.lease.grace_ms,
                        ..config.lease
                    },
                    stuck_after_ms: keel.stuck_after_ms,
                    unclaimed_after_ms: keel.unclaimed_after_ms,
                    idle_claims_max: keel.idle_claims_max,
                    failing_after: keel.failing_after,
                    ..config
                }
            }
            WatchdogProfile::Design => Config {
                lease: crate::lease::LeasePolicy {
                    grace_ms: 60_000,
                    ..config.lease
                },
                stuck_after_ms: 600_000,
                unclaimed_after_ms: 600_000,
                idle_claims_max: 3,
                failing_after: 3,
                ..config
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keel_profile_is_the_default_and_design_changes_only_watchdog_thresholds() {
        let default = Config::default();
        assert_eq!(WatchdogProfile::Keel.apply(default.clone()), default);
        let design = WatchdogProfile::Design.apply(default.clone());
        assert_eq!(
            (
                design.lease.grace_ms,
                design.stuck_after_ms,
                design.idle_claims_max
            ),
            (60_000, 600_000, 3)
        );
        assert_eq!(design.lease.ttl_ms, default.lease.ttl_ms);
        assert_eq!(design.outbox, default.outbox);
        assert_eq!(WatchdogProfile::Keel.apply(design.clone()), default);
        for profile in WatchdogProfile::ALL {
            assert_eq!(WatchdogProfile::from_name(profile.name()), Some(profile));
        }
        assert_eq!(WatchdogProfile::from_name("strict"), None);
    }
}

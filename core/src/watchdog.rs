//! The watchdog: deadlines of a running attempt and what happens at each (SPEC L3, W1–W3, W5).
//!
//! A pure function of the run and the settings: [`next_deadline`] says when the watchdog must
//! look at a running attempt again, and [`due_action`] what it does then. The scheduler keeps
//! that deadline in its due index and applies the action.
//!
//! | deadline | at | action |
//! |---|---|---|
//! | lease reclaim | `lease.expires_at + grace_ms` | the attempt is lost; the run retries or is poison (L3) |
//! | backstop | `started_at + backstop_factor × timeout` | kill, whatever extension was granted (W3) |
//! | kill | `kill_at`, set `kill_grace_ms` after the timeout | kill (W1) |
//! | timeout | `timeout_at` (+ the one extension) | ask the attempt to stop (`CancelAttempt`), set `kill_at` (W1) |
//! | stuck | `last_activity + stuck_after_ms` | open a stuck incident, once per silence (W5) |
//!
//! When several are due, the first in this table wins: a reclaimed lease needs no kill, and a
//! kill needs no stuck report. A kill is sticky (W2): the attempt's lease is revoked, so it can
//! report nothing afterwards, and `extend` refuses a killed or timed-out attempt.
//!
//! The rules the console shows (lease_expired, queue_stuck, claim_loop_idle, artifact_gate,
//! job_failing), with their live thresholds, are data: [`rules()`].

pub mod rules;

pub use rules::{rules, Rule};

use crate::config::Config;
use crate::run::{Run, RunState};
use crate::time::Timestamp;

/// What the watchdog does to a running attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchAction {
    /// The lease expired more than the grace ago: reclaim it.
    Reclaim,
    /// Kill the attempt, for this reason.
    Kill(String),
    /// The attempt timed out: ask it to stop, and kill it at `kill_at` if it does not.
    Timeout {
        /// When it will be killed.
        kill_at: Timestamp,
    },
    /// No sign of life for too long: open a stuck incident.
    Stuck,
}

/// When the watchdog must next look at `run`, if it is running.
pub fn next_deadline(run: &Run, config: &Config) -> Option<Timestamp> {
    let RunState::Running { .. } = run.state else {
        return None;
    };
    let watch = &run.watch;
    let reclaim = run
        .lease
        .as_ref()
        .map(|lease| lease.expires_at.plus_ms(config.lease.grace_ms));
    let timeout = watch.timeout_at.filter(|_| watch.kill_at.is_none());
    let stuck = run
        .last_activity
        .filter(|_| !watch.stuck_reported)
        .map(|at| at.plus_ms(config.stuck_after_ms));
    [reclaim, watch.backstop_at, watch.kill_at, timeout, stuck]
        .into_iter()
        .flatten()
        .min()
}

/// What the watchdog does to `run` at `now`, if anything is due.
pub fn due_action(run: &Run, now: Timestamp, config: &Config) -> Option<WatchAction> {
    let RunState::Running { .. } = run.state else {
        return None;
    };
    let watch = &run.watch;
    let lease = run.lease.as_ref()?;
    if lease.expires_at.plus_ms(config.lease.grace_ms) <= now {
        return Some(WatchAction::Reclaim);
    }
    if watch.backstop_at.is_some_and(|at| at <= now) {
        return Some(WatchAction::Kill(format!(
            "backstop: ran {} times its timeout",
            config.backstop_factor
        )));
    }
    if watch.kill_at.is_some_and(|at| at <= now) {
        return Some(WatchAction::Kill(format!(
            "did not stop within {} ms of its timeout",
            config.kill_grace_ms
        )));
    }
    if watch.kill_at.is_none() && watch.timeout_at.is_some_and(|at| at <= now) {
        return Some(WatchAction::Timeout {
            kill_at: now.plus_ms(config.kill_grace_ms),
        });
    }
    let silent_since = run.last_activity?;
    if !watch.stuck_reported && silent_since.plus_ms(config.stuck_after_ms) <= now {
        return Some(WatchAction::Stuck);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{FencingToken, WorkerId};
    use crate::lease::Lease;

    use crate::run::RunTerms;

    fn running(timeout_ms: Option<u64>) -> (Run, Config) {
        let config = Config::default();
        let mut run = crate::run::tests::manual_run(RunTerms {
            timeout_ms,
            ..RunTerms::new("k")
        });
        run.grant(Lease {
            owner: WorkerId::new("w").unwrap(),
            token: FencingToken(1),
            renewed_at: Timestamp(0),
            expires_at: Timestamp(0),
        });
        run.mark_running(Timestamp(0), config.lease.ttl_ms, config.backstop_factor);
        (run, config)
    }

    #[test]
    fn deadlines_in_order_of_the_table() {
        let (mut run, config) = running(Some(20_000));
        // Heartbeats keep the lease alive and the run busy; only the timeout matters.
        run.lease.as_mut().unwrap().expires_at = Timestamp(1_000_000);
        run.watch.stuck_reported = true;
        assert_eq!(next_deadline(&run, &config), Some(Timestamp(20_000)));
        let Some(WatchAction::Timeout { kill_at }) = due_action(&run, Timestamp(20_000), &config)
        else {
            panic!("the timeout is due");
        };
        assert_eq!(kill_at, Timestamp(30_000));
        run.watch.kill_at = Some(kill_at);
        assert_eq!(next_deadline(&run, &config), Some(Timestamp(30_000)));
        assert!(matches!(
            due_action(&run, Timestamp(30_000), &config),
            Some(WatchAction::Kill(_))
        ));
    }

    #[test]
    fn the_backstop_ignores_extensions() {
        let (mut run, config) = running(Some(20_000));
        run.lease.as_mut().unwrap().expires_at = Timestamp(1_000_000);
        run.last_activity = Some(Timestamp(59_000));
        run.watch.stuck_reported = true;
        run.watch.timeout_at = Some(Timestamp(500_000)); // a generous extension
        assert_eq!(next_deadline(&run, &config), Some(Timestamp(60_000)));
        let action = due_action(&run, Timestamp(60_000), &config);
        assert!(matches!(action, Some(WatchAction::Kill(ref r)) if r.contains("backstop")));
    }

    #[test]
    fn an_expired_lease_is_reclaimed_after_the_grace_and_before_anything_else() {
        let (run, config) = running(Some(1_000));
        let expiry = run.lease.as_ref().unwrap().expires_at;
        assert_eq!(expiry, Timestamp(30_000));
        let at = expiry.plus_ms(config.lease.grace_ms);
        assert_eq!(due_action(&run, at, &config), Some(WatchAction::Reclaim));
        assert_ne!(
            due_action(&run, Timestamp(at.0 - 1), &config),
            Some(WatchAction::Reclaim)
        );
    }

    #[test]
    fn silence_raises_one_stuck_report() {
        let (mut run, config) = running(None);
        run.lease.as_mut().unwrap().expires_at = Timestamp(1_000_000);
        assert_eq!(next_deadline(&run, &config), Some(Timestamp(20_000)));
        assert_eq!(
            due_action(&run, Timestamp(20_000), &config),
            Some(WatchAction::Stuck)
        );
        run.watch.stuck_reported = true;
        assert_eq!(next_deadline(&run, &config), Some(Timestamp(1_010_000)));
        assert_eq!(due_action(&run, Timestamp(20_000), &config), None);
    }
}

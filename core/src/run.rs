//! Runs: one firing of a job, through its attempts, to exactly one terminal state.
//!
//! # States and legal transitions
//!
//! | from | input | to |
//! |---|---|---|
//! | (new) | slot fires / operator triggers | `Starting { attempt: 1 }` |
//! | `BackingOff { until }` | `until` reached | `Starting { attempt + 1 }` |
//! | `Starting { attempt }` | store acknowledged the batch recording it | `Running { attempt }` (the attempt is handed to the executor only now) |
//! | `Running` | outcome `success` | `Succeeded` |
//! | `Running` | outcome `retryable`, attempts left | `BackingOff { until: now + delay }` |
//! | `Running` | outcome `retryable`, no attempts left or past the deadline | `Failed` |
//! | `Running` | outcome `permanent` | `FailedDropped` |
//! | `Running` | outcome `snooze(d)` | `BackingOff { until: now + d }` (no attempt consumed) |
//! | `Running` | outcome `cancelled`, or any failure or snooze after a cancel request | `Cancelled` |
//! | `BackingOff`, `Starting` | operator cancels | `Cancelled` |
//! | `Running` | operator cancels | `Running` with a cancel request (cooperative) |
//! | `Starting`, `Running` | found after a crash with a cancel request | `Cancelled` |
//! | `Starting`, `Running` | found after a crash, resumable, attempts left | `BackingOff { until: now }` |
//! | `Starting`, `Running` | found after a crash otherwise | `Interrupted` |
//!
//! Terminal states (`succeeded`, `failed`, `failed_dropped`, `cancelled`, `interrupted`) have no
//! way out; each keeps the last concrete error (SPEC R4).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, IdempotencyKey, JobId, RunId};
use crate::limits;
use crate::retry::{RetryDecision, RetryPolicy};
use crate::rng::SplitMix64;
use crate::time::Timestamp;

/// Why a run exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "trigger")]
pub enum Trigger {
    /// A slot of the job's schedule fired.
    Scheduled {
        /// The nominal fire time: with the job, the run's identity (SPEC S6).
        slot: Timestamp,
    },
    /// An operator asked for a run now.
    Manual,
}

/// A run's state (see the module docs for the transition table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RunState {
    /// Waits for `until` to start its next attempt (after a retryable error, a snooze or a
    /// crash).
    BackingOff {
        /// When the next attempt starts.
        until: Timestamp,
    },
    /// Waits for the store to acknowledge the record of this attempt.
    Starting {
        /// The attempt about to start.
        attempt: Attempt,
    },
    /// Waits for the executor to report the attempt's outcome.
    Running {
        /// The attempt in progress.
        attempt: Attempt,
        /// When the attempt was handed to the executor.
        started_at: Timestamp,
    },
    /// Terminal: the handler succeeded.
    Succeeded,
    /// Terminal: retryable failures exhausted the attempts or the deadline.
    Failed,
    /// Terminal: a permanent error; never retried.
    FailedDropped,
    /// Terminal: cancelled by an operator or the handler.
    Cancelled,
    /// Terminal: found unfinished after a crash and not resumable.
    Interrupted,
}

impl RunState {
    /// True for the five terminal states.
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self,
            RunState::BackingOff { .. } | RunState::Starting { .. } | RunState::Running { .. }
        )
    }

    /// The state's name as it appears on the wire and in the audit trail.
    pub fn name(&self) -> StateName {
        match self {
            RunState::BackingOff { .. } => StateName::BackingOff,
            RunState::Starting { .. } => StateName::Starting,
            RunState::Running { .. } => StateName::Running,
            RunState::Succeeded => StateName::Succeeded,
            RunState::Failed => StateName::Failed,
            RunState::FailedDropped => StateName::FailedDropped,
            RunState::Cancelled => StateName::Cancelled,
            RunState::Interrupted => StateName::Interrupted,
        }
    }
}

/// Every state name that appears in the audit trail, for jobs and runs, in snake_case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    /// A job waiting for its next slot.
    Scheduled,
    /// A paused job.
    Paused,
    /// A disabled job.
    Disabled,
    /// A removed job.
    Removed,
    /// A run waiting to retry.
    BackingOff,
    /// A run whose attempt is being persisted.
    Starting,
    /// A run whose attempt is executing.
    Running,
    /// Terminal run state.
    Succeeded,
    /// Terminal run state.
    Failed,
    /// Terminal run state.
    FailedDropped,
    /// Terminal run state.
    Cancelled,
    /// Terminal run state.
    Interrupted,
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateName::Scheduled => "scheduled",
            StateName::Paused => "paused",
            StateName::Disabled => "disabled",
            StateName::Removed => "removed",
            StateName::BackingOff => "backing_off",
            StateName::Starting => "starting",
            StateName::Running => "running",
            StateName::Succeeded => "succeeded",
            StateName::Failed => "failed",
            StateName::FailedDropped => "failed_dropped",
            StateName::Cancelled => "cancelled",
            StateName::Interrupted => "interrupted",
        })
    }
}

/// What a handler reports for an attempt (SPEC R1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The work is done.
    Success {
        /// A short result, kept in the run record.
        summary: Option<String>,
    },
    /// It failed, and trying again may help (a timeout, a 503, a panic).
    Retryable {
        /// The concrete error.
        message: String,
    },
    /// It failed, and trying again cannot help (a missing target, invalid input).
    Permanent {
        /// The concrete error.
        message: String,
    },
    /// Not now: try again after `for_ms`, without using up an attempt.
    Snooze {
        /// How long to wait.
        for_ms: u64,
    },
    /// The handler gave up because it was asked to, or decided the run should not happen.
    Cancelled {
        /// Why.
        reason: String,
    },
}

/// The class of a recorded error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A retryable handler error.
    Retryable,
    /// A permanent handler error.
    Permanent,
    /// The attempt was cut short by a crash or shutdown of the scheduler.
    Interrupted,
    /// An operator or the handler cancelled the run.
    Cancelled,
    /// The run's retry deadline passed.
    DeadlineExceeded,
    /// The run snoozed more than [`limits::SNOOZES_MAX`] times.
    SnoozeLimit,
}

/// A concrete error kept with a run (SPEC R4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunError {
    /// Its class.
    pub kind: ErrorKind,
    /// The message, truncated to [`limits::MESSAGE_MAX_BYTES`].
    pub message: String,
    /// The attempt it happened in.
    pub attempt: Attempt,
    /// When it was recorded.
    pub at: Timestamp,
}

/// A run, in memory and as persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Its id.
    pub id: RunId,
    /// The job it belongs to.
    pub job: JobId,
    /// Why it exists.
    pub trigger: Trigger,
    /// When it was created.
    pub created_at: Timestamp,
    /// The latest attempt started (0 before the first).
    pub attempt: Attempt,
    /// Attempts that ended in a snooze; they do not count against `attempts_max`.
    pub snoozes: u32,
    /// The state.
    pub state: RunState,
    /// The last concrete error, kept in every terminal state.
    pub last_error: Option<RunError>,
    /// The success summary.
    pub summary: Option<String>,
    /// An operator asked to cancel the attempt in progress.
    pub cancel_requested: bool,
    /// When it reached its terminal state.
    pub finished_at: Option<Timestamp>,
    /// The retry policy in force when the run was created; a later job update does not change
    /// the rules of a run already under way.
    pub retry: RetryPolicy,
    /// Copied from the job: retry after a crash (true) or end `interrupted`.
    pub resume_after_crash: bool,
    /// The handler kind in force when the run was created; attempts keep it even if the job is
    /// updated or removed meanwhile.
    pub kind: Arc<str>,
    /// The job's payload when the run was created.
    #[serde(default)]
    pub payload: String,
    /// The instant of the one-shot the job was when the run was created, if it was one: only a
    /// run of that very one-shot finishes it when it settles (a run left over from an earlier
    /// definition does not).
    #[serde(default)]
    pub of_one_shot: Option<Timestamp>,
}

/// What a run copies from its job when it is created, so that its attempts run under the rules
/// they started with.
#[derive(Clone, Debug, PartialEq)]
pub struct RunTerms {
    /// The retry policy.
    pub retry: RetryPolicy,
    /// Retry after a crash (true) or end `interrupted`.
    pub resume_after_crash: bool,
    /// The handler kind.
    pub kind: Arc<str>,
    /// The payload.
    pub payload: String,
    /// The one-shot's instant, if the job is a one-shot.
    pub of_one_shot: Option<Timestamp>,
}

/// A state change of a run, for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub old: StateName,
    /// The state after.
    pub new: StateName,
    /// Why, in words.
    pub reason: String,
}

impl Run {
    /// A new run about to start its first attempt.
    pub fn new(id: RunId, job: JobId, trigger: Trigger, now: Timestamp, terms: RunTerms) -> Self {
        Run {
            id,
            job,
            trigger,
            created_at: now,
            attempt: Attempt(1),
            snoozes: 0,
            state: RunState::Starting {
                attempt: Attempt(1),
            },
            last_error: None,
            summary: None,
            cancel_requested: false,
            finished_at: None,
            retry: terms.retry,
            resume_after_crash: terms.resume_after_crash,
            kind: terms.kind,
            payload: terms.payload,
            of_one_shot: terms.of_one_shot,
        }
    }

    /// The idempotency key of the latest attempt.
    pub fn idempotency_key(&self) -> IdempotencyKey {
        IdempotencyKey {
            run: self.id,
            attempt: self.attempt,
        }
    }

    /// The nominal fire time, for scheduled runs.
    pub fn slot(&self) -> Option<Timestamp> {
        match self.trigger {
            Trigger::Scheduled { slot } => Some(slot),
            Trigger::Manual => None,
        }
    }

    /// Attempts that count against `attempts_max`: every attempt started except snoozed ones.
    pub fn attempts_counted(&self) -> u32 {
        self.attempt.0.saturating_sub(self.snoozes)
    }

    /// `BackingOff { until }` reached: start the next attempt.
    pub fn begin_next_attempt(&mut self) -> Transition {
        self.attempt = Attempt(self.attempt.0 + 1);
        self.change(
            RunState::Starting {
                attempt: self.attempt,
            },
            format!("attempt {} due", self.attempt),
        )
    }

    /// The store acknowledged the starting attempt; it is handed to the executor.
    pub fn mark_running(&mut self, now: Timestamp) -> Transition {
        self.change(
            RunState::Running {
                attempt: self.attempt,
                started_at: now,
            },
            format!(
                "attempt {} persisted and handed to the executor",
                self.attempt
            ),
        )
    }

    /// Applies a handler's outcome for the running attempt.
    pub fn apply_outcome(
        &mut self,
        now: Timestamp,
        outcome: Outcome,
        rng: &mut SplitMix64,
    ) -> Transition {
        let attempt = self.attempt;
        match outcome {
            Outcome::Success { summary } => {
                self.summary = summary.map(|s| truncate(&s));
                self.finish(
                    now,
                    RunState::Succeeded,
                    format!("attempt {attempt} succeeded"),
                )
            }
            Outcome::Cancelled { reason } => {
                self.record_error(now, ErrorKind::Cancelled, &reason);
                self.finish(now, RunState::Cancelled, format!("cancelled: {reason}"))
            }
            Outcome::Permanent { message } if self.cancel_requested => {
                self.record_error(now, ErrorKind::Cancelled, &message);
                self.finish(
                    now,
                    RunState::Cancelled,
                    "failed after a cancel request".into(),
                )
            }
            Outcome::Permanent { message } => {
                self.record_error(now, ErrorKind::Permanent, &message);
                self.finish(
                    now,
                    RunState::FailedDropped,
                    format!("attempt {attempt}: permanent error, not retried"),
                )
            }
            Outcome::Retryable { message } if self.cancel_requested => {
                self.record_error(now, ErrorKind::Cancelled, &message);
                self.finish(
                    now,
                    RunState::Cancelled,
                    "failed after a cancel request".into(),
                )
            }
            Outcome::Retryable { message } => {
                self.record_error(now, ErrorKind::Retryable, &message);
                self.retry_or_fail(now, rng, format!("attempt {attempt} failed"))
            }
            Outcome::Snooze { .. } if self.cancel_requested => {
                self.record_error(
                    now,
                    ErrorKind::Cancelled,
                    &format!("attempt {attempt} snoozed after a cancel request"),
                );
                self.finish(
                    now,
                    RunState::Cancelled,
                    "snoozed after a cancel request".into(),
                )
            }
            Outcome::Snooze { for_ms } => {
                self.snoozes += 1;
                if self.snoozes >= limits::SNOOZES_MAX {
                    self.record_error(
                        now,
                        ErrorKind::SnoozeLimit,
                        &format!("snoozed more than {} times", limits::SNOOZES_MAX),
                    );
                    return self.finish(now, RunState::Failed, "snooze limit reached".into());
                }
                let until = now.plus_ms(for_ms.min(limits::DELAY_MAX_MS));
                self.change(
                    RunState::BackingOff { until },
                    format!("attempt {attempt} snoozed until {until}; no attempt used"),
                )
            }
        }
    }

    /// The run was found mid-attempt after a crash: cancelled if a cancel was requested,
    /// retried if the job resumes after crashes and attempts remain, else `interrupted`.
    pub fn recover_after_crash(&mut self, now: Timestamp) -> Transition {
        let attempt = self.attempt;
        self.record_error(
            now,
            ErrorKind::Interrupted,
            &format!("attempt {attempt} was cut short by a crash or shutdown"),
        );
        if self.cancel_requested {
            // The operator's cancel was durable; the crash must not resurrect the run.
            self.record_error(
                now,
                ErrorKind::Cancelled,
                &format!("attempt {attempt} cut short by a crash after a cancel request"),
            );
            return self.finish(
                now,
                RunState::Cancelled,
                format!("attempt {attempt} interrupted by a crash; it had been cancelled"),
            );
        }
        if !self.resume_after_crash {
            return self.finish(
                now,
                RunState::Interrupted,
                format!("attempt {attempt} interrupted; job does not resume after a crash"),
            );
        }
        // The lost attempt counts: a run that keeps crashing its host must not loop forever.
        // The retry starts at once, so the deadline is checked against now, with no backoff.
        match self
            .retry
            .decide_immediate(self.attempts_counted(), now.ms_since(self.created_at))
        {
            RetryDecision::RetryAfter { .. } => self.change(
                RunState::BackingOff { until: now },
                format!("attempt {attempt} interrupted by a crash; retrying"),
            ),
            RetryDecision::Exhausted => self.finish(
                now,
                RunState::Interrupted,
                format!("attempt {attempt} interrupted by a crash; no attempts left"),
            ),
            RetryDecision::DeadlineExceeded => self.finish(
                now,
                RunState::Interrupted,
                format!("attempt {attempt} interrupted by a crash; the run's deadline has passed"),
            ),
        }
    }

    /// An operator cancels the run. Returns `None` if the run is running (a cancel request is
    /// recorded and the attempt is asked to stop).
    pub fn cancel(&mut self, now: Timestamp, reason: &str) -> Option<Transition> {
        if let RunState::Running { .. } = self.state {
            self.cancel_requested = true;
            return None;
        }
        self.record_error(now, ErrorKind::Cancelled, reason);
        Some(self.finish(now, RunState::Cancelled, format!("cancelled: {reason}")))
    }

    fn retry_or_fail(&mut self, now: Timestamp, rng: &mut SplitMix64, what: String) -> Transition {
        let decision =
            self.retry
                .decide(self.attempts_counted(), now.ms_since(self.created_at), rng);
        match decision {
            RetryDecision::RetryAfter { delay_ms } => {
                let until = now.plus_ms(delay_ms);
                self.change(
                    RunState::BackingOff { until },
                    format!(
                        "{what}; attempt {} of {} at {until} (backoff {delay_ms} ms)",
                        self.attempts_counted() + 1,
                        self.retry.attempts_max
                    ),
                )
            }
            RetryDecision::Exhausted => self.finish(
                now,
                RunState::Failed,
                format!("{what}; {} attempts exhausted", self.retry.attempts_max),
            ),
            RetryDecision::DeadlineExceeded => {
                if let Some(e) = &mut self.last_error {
                    e.kind = ErrorKind::DeadlineExceeded;
                }
                self.finish(
                    now,
                    RunState::Failed,
                    format!("{what}; the next retry would pass the run's deadline"),
                )
            }
        }
    }

    fn record_error(&mut self, now: Timestamp, kind: ErrorKind, message: &str) {
        self.last_error = Some(RunError {
            kind,
            message: truncate(message),
            attempt: self.attempt,
            at: now,
        });
    }

    fn finish(&mut self, now: Timestamp, state: RunState, reason: String) -> Transition {
        debug_assert!(state.is_terminal());
        self.finished_at = Some(now);
        self.cancel_requested = false;
        self.change(state, reason)
    }

    fn change(&mut self, state: RunState, reason: String) -> Transition {
        let old = self.state.name();
        assert!(
            !self.state.is_terminal(),
            "run {} left terminal state {old}",
            self.id
        );
        self.state = state;
        Transition {
            old,
            new: state.name(),
            reason,
        }
    }
}

/// Truncates to [`limits::MESSAGE_MAX_BYTES`] on a char boundary.
pub(crate) fn truncate(text: &str) -> String {
    if text.len() <= limits::MESSAGE_MAX_BYTES {
        return text.to_owned();
    }
    let mut end = limits::MESSAGE_MAX_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running_run(policy: RetryPolicy) -> Run {
        let terms = RunTerms {
            retry: policy,
            resume_after_crash: true,
            kind: "k".into(),
            payload: String::new(),
            of_one_shot: None,
        };
        let mut run = Run::new(
            RunId(1),
            JobId::new("j").unwrap(),
            Trigger::Manual,
            Timestamp(0),
            terms,
        );
        run.mark_running(Timestamp(0));
        run
    }

    fn retryable() -> Outcome {
        Outcome::Retryable {
            message: "boom".into(),
        }
    }

    #[test]
    fn retryable_errors_back_off_then_fail_with_the_last_error() {
        let mut rng = SplitMix64::new(0);
        let mut run = running_run(RetryPolicy {
            attempts_max: 2,
            ..RetryPolicy::default()
        });
        let t = run.apply_outcome(Timestamp(10), retryable(), &mut rng);
        assert_eq!(t.new, StateName::BackingOff);
        run.begin_next_attempt();
        run.mark_running(Timestamp(2_000));
        let t = run.apply_outcome(
            Timestamp(2_010),
            Outcome::Retryable {
                message: "boom 2".into(),
            },
            &mut rng,
        );
        assert_eq!((t.old, t.new), (StateName::Running, StateName::Failed));
        let err = run.last_error.unwrap();
        assert_eq!(err.message, "boom 2");
        assert_eq!(err.attempt, Attempt(2));
        assert_eq!(run.finished_at, Some(Timestamp(2_010)));
    }

    #[test]
    fn permanent_error_is_never_retried() {
        let mut run = running_run(RetryPolicy::default());
        let t = run.apply_outcome(
            Timestamp(1),
            Outcome::Permanent {
                message: "no such bucket".into(),
            },
            &mut SplitMix64::new(0),
        );
        assert_eq!(t.new, StateName::FailedDropped);
        assert_eq!(run.last_error.unwrap().kind, ErrorKind::Permanent);
    }

    #[test]
    fn snooze_does_not_use_an_attempt() {
        let mut run = running_run(RetryPolicy {
            attempts_max: 1,
            ..RetryPolicy::default()
        });
        let mut rng = SplitMix64::new(0);
        run.apply_outcome(Timestamp(0), Outcome::Snooze { for_ms: 500 }, &mut rng);
        assert_eq!(
            run.state,
            RunState::BackingOff {
                until: Timestamp(500)
            }
        );
        run.begin_next_attempt();
        run.mark_running(Timestamp(500));
        assert_eq!(run.attempt, Attempt(2));
        assert_eq!(run.attempts_counted(), 1);
        // The only counted attempt now fails: attempts_max 1 means no retry.
        let t = run.apply_outcome(Timestamp(600), retryable(), &mut rng);
        assert_eq!(t.new, StateName::Failed);
    }

    #[test]
    fn failure_after_cancel_request_is_cancelled_not_retried() {
        let mut run = running_run(RetryPolicy::default());
        assert!(run.cancel(Timestamp(1), "operator").is_none());
        let t = run.apply_outcome(Timestamp(2), retryable(), &mut SplitMix64::new(0));
        assert_eq!(t.new, StateName::Cancelled);
    }

    #[test]
    fn crash_recovery_counts_the_lost_attempt() {
        let mut run = running_run(RetryPolicy {
            attempts_max: 2,
            ..RetryPolicy::default()
        });
        assert_eq!(
            run.recover_after_crash(Timestamp(5)).new,
            StateName::BackingOff
        );
        run.begin_next_attempt();
        assert_eq!(
            run.recover_after_crash(Timestamp(6)).new,
            StateName::Interrupted
        );
        assert_eq!(run.last_error.unwrap().kind, ErrorKind::Interrupted);
    }

    #[test]
    #[should_panic(expected = "left terminal state")]
    fn terminal_states_have_no_way_out() {
        let mut run = running_run(RetryPolicy::default());
        let mut rng = SplitMix64::new(0);
        run.apply_outcome(Timestamp(0), Outcome::Success { summary: None }, &mut rng);
        run.apply_outcome(Timestamp(1), retryable(), &mut rng);
    }

    #[test]
    fn terminal_states_serialise_in_snake_case() {
        let names: Vec<String> = [
            RunState::Succeeded,
            RunState::Failed,
            RunState::FailedDropped,
            RunState::Cancelled,
            RunState::Interrupted,
        ]
        .iter()
        .map(|s| serde_json::to_string(&s.name()).unwrap())
        .collect();
        assert_eq!(
            names,
            [
                "\"succeeded\"",
                "\"failed\"",
                "\"failed_dropped\"",
                "\"cancelled\"",
                "\"interrupted\""
            ]
        );
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(limits::MESSAGE_MAX_BYTES);
        let t = truncate(&long);
        assert!(t.len() <= limits::MESSAGE_MAX_BYTES + "…".len());
        assert!(t.ends_with('…'));
    }
}

//! Runs: one firing of a job, through its attempts, to exactly one terminal state.
//!
//! # States and legal transitions
//!
//! | from | input | to |
//! |---|---|---|
//! | (new), in-process job | slot fires / operator triggers | `Starting { attempt: 1 }` (with a lease) |
//! | (new), external job | slot fires / operator triggers | `Queued { since }` |
//! | `Queued` | a worker claims it | `Starting { attempt + 1 }` (with the worker's lease) |
//! | `BackingOff { until }` | `until` reached | `Starting { attempt + 1 }`, or `Queued` for an external job |
//! | `Starting { attempt }` | store acknowledged the batch recording it | `Running { attempt }` (the attempt is handed to the executor only now) |
//! | `Running` | outcome `success` | `Succeeded` |
//! | `Running` | outcome `retryable`, attempts left | `BackingOff { until: now + delay }` |
//! | `Running` | outcome `retryable`, no attempts left or past the deadline | `Failed` |
//! | `Running` | outcome `permanent` | `FailedDropped` |
//! | `Running` | outcome `snooze(d)` | `BackingOff { until: now + d }` (no attempt consumed) |
//! | `Running` | outcome `cancelled`, or any failure or snooze after a cancel request | `Cancelled` |
//! | `Running` | lease reclaimed, or released by its holder: the attempt is lost | `BackingOff { until: now }`, or `FailedDropped` (poison) once `lost_attempts_max` attempts were lost |
//! | `Starting`, `Running` | a graceful shutdown stopped it, or ran out of budget before it ended (SPEC O1) | `BackingOff { until: now }`, resumed at the next start; no attempt used (`Cancelled` after a cancel request) |
//! | `Running` | the watchdog kills it (timeout, backstop) | as a retryable failure; the kill is sticky |
//! | `Queued`, `BackingOff`, `Starting` | operator cancels | `Cancelled` |
//! | `Running` | operator cancels | `Running` with a cancel request (cooperative) |
//! | `Starting`, `Running` | found after a crash with a cancel request | `Cancelled` |
//! | `Starting`, `Running` | found after a crash, resumable | a lost attempt (as above) |
//! | `Starting`, `Running` | found after a crash otherwise | `Interrupted` |
//!
//! Terminal states (`succeeded`, `failed`, `failed_dropped`, `cancelled`, `interrupted`) have no
//! way out; each keeps the last concrete error (SPEC R4).
//!
//! # The machine and its stored form
//!
//! [`Run`] is the machine: its fields are private to the core, so only the
//! [`Scheduler`](crate::Scheduler) changes a run; everyone else reads it through accessors named
//! after the fields (`run.state()`, `run.job()`, `run.lease()`, ...), `Copy` values by value and
//! others by reference.
//!
//! [`RunRecord`] is the stored form: a plain struct with public fields whose serde shape is the
//! store format for runs, and which `Run` serializes to byte for byte. Both are declared from
//! one field list (`run_and_record!`), so they cannot drift apart; two tests prove and pin the
//! shape (`record_and_run_serialize_alike`, `the_stored_form_of_a_run_is_pinned`). Stores gate that
//! format with their markers (store-fs's `VERSION` file, store-sled's `format` marker): renaming,
//! retyping or removing a field of `RunRecord` (or changing its `#[serde]` attributes) is a format
//! change that needs a new format version and a migration; a new field needs
//! `#[serde(default)]` so that existing stores still open. Tests and stores that need a run in an
//! arbitrary state build a `RunRecord` and convert it with [`Run::from_record`];
//! [`Run::record`] goes the other way. What the CLI and the daemon show is a third thing again,
//! the JSON views of `keel-cli`'s `views` module.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, FencingToken, IdempotencyKey, JobId, RunId};
use crate::lease::Lease;
use crate::limits;
use crate::retry::{RetryDecision, RetryPolicy};
use crate::rng::SplitMix64;
use crate::time::Timestamp;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

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
    /// Waits for an external worker to claim its next attempt (jobs run by external workers).
    Queued {
        /// Since when it has waited.
        since: Timestamp,
    },
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
            RunState::Queued { .. }
                | RunState::BackingOff { .. }
                | RunState::Starting { .. }
                | RunState::Running { .. }
        )
    }

    /// The state's name as it appears on the wire and in the audit trail.
    pub fn name(&self) -> StateName {
        match self {
            RunState::Queued { .. } => StateName::Queued,
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
    /// A run waiting for an external worker to claim it.
    Queued,
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
            StateName::Queued => "queued",
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
        /// Named outputs (a job may require some before it accepts a completion).
        #[serde(default)]
        artifacts: BTreeMap<String, String>,
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

impl Outcome {
    /// Success with no summary and no artifacts.
    pub fn ok() -> Self {
        Outcome::Success {
            summary: None,
            artifacts: BTreeMap::new(),
        }
    }

    /// The outcome's kind in one word, for logs and metric labels: `success`, `retryable`,
    /// `permanent`, `snooze` or `cancelled`.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::Retryable { .. } => "retryable",
            Outcome::Permanent { .. } => "permanent",
            Outcome::Snooze { .. } => "snooze",
            Outcome::Cancelled { .. } => "cancelled",
        }
    }
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
    /// The attempt's lease was reclaimed, or its holder released it: the attempt was lost.
    Lost,
    /// The watchdog killed the attempt after its timeout (or the backstop).
    TimedOut,
    /// Attempts kept getting lost (crashes, stalls): the run was given up as poison.
    Poison,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Retryable,
        ErrorKind::Permanent,
        ErrorKind::Interrupted,
        ErrorKind::Cancelled,
        ErrorKind::DeadlineExceeded,
        ErrorKind::SnoozeLimit,
        ErrorKind::Lost,
        ErrorKind::TimedOut,
        ErrorKind::Poison,
    ];
}

impl fmt::Display for ErrorKind {
    /// The name it is stored under: `retryable`, `timed_out`...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::SnoozeLimit => "snooze_limit",
            ErrorKind::Lost => "lost",
            ErrorKind::TimedOut => "timed_out",
            ErrorKind::Poison => "poison",
        })
    }
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

impl fmt::Display for RunError {
    /// `attempt 2, retryable: upstream 503`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempt {}, {}: {}",
            self.attempt, self.kind, self.message
        )
    }
}

/// Declares [`Run`] and [`RunRecord`] from one field list, so that the machine and its stored
/// form cannot drift apart, and the conversions between them.
macro_rules! run_and_record {
    ($( $(#[$attr:meta])* $field:ident : $ty:ty, )*) => {
        /// A run, the machine: changed only by the [`Scheduler`](crate::Scheduler), read
        /// through its accessors. It serializes exactly as its [`RunRecord`], the stored form.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub struct Run {
            $( $(#[$attr])* pub(crate) $field: $ty, )*
        }

        /// A run as stored: the store format (see the module docs). Every field is public, for
        /// stores and for tests that build runs in arbitrary states; [`Run::from_record`] turns
        /// it into a run. Its serde shape is that of [`Run`] by construction (one field list,
        /// `run_and_record!`), and pinned by `run::tests::the_stored_form_of_a_run_is_pinned`.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub struct RunRecord {
            $( $(#[$attr])* pub $field: $ty, )*
        }

        impl From<RunRecord> for Run {
            fn from(record: RunRecord) -> Self {
                Run { $( $field: record.$field, )* }
            }
        }

        impl From<Run> for RunRecord {
            fn from(run: Run) -> Self {
                RunRecord { $( $field: run.$field, )* }
            }
        }
    };
}

run_and_record! {
    /// Its id.
    id: RunId,
    /// The job it belongs to.
    job: JobId,
    /// Why it exists.
    trigger: Trigger,
    /// When it was created.
    created_at: Timestamp,
    /// The latest attempt started (0 before the first).
    attempt: Attempt,
    /// Attempts that ended in a snooze; they do not count against `attempts_max`.
    snoozes: u32,
    /// The state.
    state: RunState,
    /// The last concrete error, kept in every terminal state.
    last_error: Option<RunError>,
    /// The success summary.
    summary: Option<String>,
    /// An operator asked to cancel the attempt in progress.
    cancel_requested: bool,
    /// When it reached its terminal state.
    finished_at: Option<Timestamp>,
    /// The retry policy in force when the run was created; a later job update does not change
    /// the rules of a run already under way.
    retry: RetryPolicy,
    /// Copied from the job: retry after a crash (true) or end `interrupted`.
    resume_after_crash: bool,
    /// The handler kind in force when the run was created; attempts keep it even if the job is
    /// updated or removed meanwhile.
    kind: Arc<str>,
    /// The job's payload when the run was created.
    #[serde(default)]
    payload: Arc<str>,
    /// The instant of the one-shot the job was when the run was created, if it was one: only a
    /// run of that very one-shot finishes it when it settles (a run left over from an earlier
    /// definition does not).
    #[serde(default)]
    of_one_shot: Option<Timestamp>,
    /// Attempts run by an external worker that claims them (copied from the job).
    #[serde(default)]
    external: bool,
    /// The attempt timeout copied from the job, if any.
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Artifacts the job requires before it accepts a completion (copied from the job).
    #[serde(default)]
    required_artifacts: Box<[String]>,
    /// Sinks the run's result is delivered to (copied from the job).
    #[serde(default)]
    sinks: Box<[Arc<str>]>,
    /// The lease of the attempt in progress (`Starting` and `Running` only).
    #[serde(default)]
    lease: Option<Lease>,
    /// The token of the last lease that ended. A store uses it to tell a writer that saw the
    /// stored lease end from one that never knew of it (see `store::check_batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_token: Option<FencingToken>,
    /// Attempts lost to crashes, reclaimed leases or releases; budgeted apart from handler
    /// errors by `RetryPolicy::lost_attempts_max`.
    #[serde(default)]
    lost: u32,
    /// Attempts a graceful shutdown stopped (SPEC O1); they count against no budget.
    #[serde(default, skip_serializing_if = "is_zero")]
    shutdowns: u32,
    /// The last progress the holder reported.
    #[serde(default)]
    progress: Option<Progress>,
    /// The last sign of life of the attempt in progress: its start, a heartbeat or progress.
    #[serde(default)]
    last_activity: Option<Timestamp>,
    /// Artifacts of the successful completion.
    #[serde(default)]
    artifacts: BTreeMap<String, String>,
    /// The watchdog's deadlines for the attempt in progress.
    #[serde(default)]
    watch: Watch,
    /// True once an extension was granted: at most one per run (SPEC W1).
    #[serde(default)]
    extended: bool,
    /// The attempt the watchdog killed, if any: a kill is sticky, nothing revives it (W2).
    #[serde(default)]
    killed: Option<Attempt>,
    /// The latest checkpoint, handed to the next attempt; deleted when the run completes or
    /// fails terminally, kept when it is interrupted (SPEC C2).
    #[serde(default)]
    checkpoint: Option<Checkpoint>,
}

/// Read access, one accessor per field: `Copy` values by value, others by reference.
impl Run {
    /// Its id.
    pub fn id(&self) -> RunId {
        self.id
    }

    /// The job it belongs to.
    pub fn job(&self) -> &JobId {
        &self.job
    }

    /// Why it exists.
    pub fn trigger(&self) -> Trigger {
        self.trigger
    }

    /// When it was created.
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// The latest attempt started (0 before the first).
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// Attempts that ended in a snooze; they do not count against `attempts_max`.
    pub fn snoozes(&self) -> u32 {
        self.snoozes
    }

    /// The state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// The last concrete error, kept in every terminal state.
    pub fn last_error(&self) -> Option<&RunError> {
        self.last_error.as_ref()
    }

    /// The success summary.
    pub fn summary(&self) -> Option<&str> {
        self.summary.as_deref()
    }

    /// An operator asked to cancel the attempt in progress.
    pub fn cancel_requested(&self) -> bool {
        self.cancel_requested
    }

    /// When it reached its terminal state.
    pub fn finished_at(&self) -> Option<Timestamp> {
        self.finished_at
    }

    /// The retry policy in force when the run was created.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Retry after a crash (true) or end `interrupted` (copied from the job).
    pub fn resume_after_crash(&self) -> bool {
        self.resume_after_crash
    }

    /// The handler kind in force when the run was created.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The job's payload when the run was created.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The instant of the one-shot the job was when the run was created, if it was one.
    pub fn of_one_shot(&self) -> Option<Timestamp> {
        self.of_one_shot
    }

    /// Attempts run by an external worker that claims them (copied from the job).
    pub fn external(&self) -> bool {
        self.external
    }

    /// The attempt timeout copied from the job, if any.
    pub fn timeout_ms(&self) -> Option<u64> {
        self.timeout_ms
    }

    /// Artifacts the job requires before it accepts a completion (copied from the job).
    pub fn required_artifacts(&self) -> &[String] {
        &self.required_artifacts
    }

    /// Sinks the run's result is delivered to (copied from the job).
    pub fn sinks(&self) -> &[Arc<str>] {
        &self.sinks
    }

    /// The lease of the attempt in progress (`Starting` and `Running` only).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The token of the last lease that ended.
    pub fn last_token(&self) -> Option<FencingToken> {
        self.last_token
    }

    /// Attempts lost to crashes, reclaimed leases or releases.
    pub fn lost(&self) -> u32 {
        self.lost
    }

    /// Attempts a graceful shutdown stopped (SPEC O1).
    pub fn shutdowns(&self) -> u32 {
        self.shutdowns
    }

    /// The last progress the holder reported.
    pub fn progress(&self) -> Option<&Progress> {
        self.progress.as_ref()
    }

    /// The last sign of life of the attempt in progress: its start, a heartbeat or progress.
    pub fn last_activity(&self) -> Option<Timestamp> {
        self.last_activity
    }

    /// Artifacts of the successful completion.
    pub fn artifacts(&self) -> &BTreeMap<String, String> {
        &self.artifacts
    }

    /// The watchdog's deadlines for the attempt in progress.
    pub fn watch(&self) -> Watch {
        self.watch
    }

    /// True once an extension was granted: at most one per run (SPEC W1).
    pub fn extended(&self) -> bool {
        self.extended
    }

    /// The attempt the watchdog killed, if any.
    pub fn killed(&self) -> Option<Attempt> {
        self.killed
    }

    /// The latest checkpoint, handed to the next attempt.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }
}

impl Run {
    /// A run rebuilt from its stored form, as a store loads it or a test makes it.
    pub fn from_record(record: RunRecord) -> Self {
        record.into()
    }

    /// The stored form of this run (a copy).
    pub fn record(&self) -> RunRecord {
        self.clone().into()
    }
}

/// What a holder last said it was doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// A short phase name ("download", "upload").
    pub phase: String,
    /// A free-form message.
    pub message: String,
    /// When it was reported.
    pub at: Timestamp,
}

/// A saved progress snapshot of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Increases with every save of the run.
    pub seq: u64,
    /// The attempt that saved it.
    pub attempt: Attempt,
    /// When it was saved.
    pub saved_at: Timestamp,
    /// The snapshot, opaque to keel; at most
    /// [`limits::CHECKPOINT_MAX_BYTES`].
    pub data: String,
}

/// The watchdog's deadlines for the attempt in progress (SPEC W1–W3). All `None` when the job
/// has no timeout, apart from the lease and stuck deadlines the scheduler derives itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    /// When the attempt times out and is asked to stop.
    pub timeout_at: Option<Timestamp>,
    /// When the attempt is killed if it has not stopped after being asked to.
    pub kill_at: Option<Timestamp>,
    /// The absolute cap on the attempt (a multiple of the timeout); no extension moves it.
    pub backstop_at: Option<Timestamp>,
    /// True once a stuck incident was raised for this attempt.
    pub stuck_reported: bool,
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
    pub payload: Arc<str>,
    /// The one-shot's instant, if the job is a one-shot.
    pub of_one_shot: Option<Timestamp>,
    /// Run by external workers.
    pub external: bool,
    /// The attempt timeout.
    pub timeout_ms: Option<u64>,
    /// Artifacts required before a completion is accepted.
    pub required_artifacts: Box<[String]>,
    /// Sinks the result goes to.
    pub sinks: Box<[Arc<str>]>,
}

impl RunTerms {
    /// The terms of a run of `kind` with nothing else said: the default retry policy, resumed
    /// after a crash, run in process, no payload, timeout, required artifacts or sinks. Set
    /// the rest with struct update syntax: `RunTerms { external: true, ..RunTerms::new("k") }`.
    pub fn new(kind: &str) -> RunTerms {
        RunTerms {
            retry: RetryPolicy::default(),
            resume_after_crash: true,
            kind: kind.into(),
            payload: "".into(),
            of_one_shot: None,
            external: false,
            timeout_ms: None,
            required_artifacts: Box::default(),
            sinks: Box::default(),
        }
    }
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
    /// A new run. An in-process run is about to start its first attempt (`Starting`, its lease
    /// granted when the scheduler hands it out); an external one waits for a worker (`Queued`).
    pub fn new(id: RunId, job: JobId, trigger: Trigger, now: Timestamp, terms: RunTerms) -> Self {
        let (attempt, state) = if terms.external {
            (Attempt(0), RunState::Queued { since: now })
        } else {
            (
                Attempt(1),
                RunState::Starting {
                    attempt: Attempt(1),
                },
            )
        };
        Run {
            id,
            job,
            trigger,
            created_at: now,
            attempt,
            snoozes: 0,
            state,
            last_error: None,
            summary: None,
            cancel_requested: false,
            finished_at: None,
            retry: terms.retry,
            resume_after_crash: terms.resume_after_crash,
            kind: terms.kind,
            payload: terms.payload,
            of_one_shot: terms.of_one_shot,
            external: terms.external,
            timeout_ms: terms.timeout_ms,
            required_artifacts: terms.required_artifacts,
            sinks: terms.sinks,
            lease: None,
            last_token: None,
            lost: 0,
            shutdowns: 0,
            progress: None,
            last_activity: None,
            artifacts: BTreeMap::new(),
            watch: Watch::default(),
            extended: false,
            killed: None,
            checkpoint: None,
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

    /// Attempts that count against `attempts_max`: every attempt started except snoozed and
    /// lost ones (lost attempts have their own budget) and those a shutdown stopped.
    pub fn attempts_counted(&self) -> u32 {
        self.attempt
            .0
            .saturating_sub(self.snoozes)
            .saturating_sub(self.lost)
            .saturating_sub(self.shutdowns)
    }

    /// `BackingOff { until }` reached: an in-process run starts its next attempt (its lease is
    /// granted by [`Run::grant`]); an external run queues for a worker.
    pub(crate) fn begin_next_attempt(&mut self, now: Timestamp) -> Transition {
        if self.external {
            return self.change(
                RunState::Queued { since: now },
                format!("attempt {} due; waiting for a worker", self.attempt.0 + 1),
            );
        }
        self.attempt = Attempt(self.attempt.0 + 1);
        self.change(
            RunState::Starting {
                attempt: self.attempt,
            },
            format!("attempt {} due", self.attempt),
        )
    }

    /// A worker claimed the queued run: its next attempt starts under `lease`.
    pub(crate) fn claim(&mut self, lease: Lease) -> Transition {
        debug_assert!(matches!(self.state, RunState::Queued { .. }));
        self.attempt = Attempt(self.attempt.0 + 1);
        let reason = format!(
            "attempt {} claimed by {} with {}",
            self.attempt, lease.owner, lease.token
        );
        self.lease = Some(lease);
        self.change(
            RunState::Starting {
                attempt: self.attempt,
            },
            reason,
        )
    }

    /// Grants the lease of the attempt about to start (in-process runs).
    pub(crate) fn grant(&mut self, lease: Lease) {
        debug_assert!(matches!(self.state, RunState::Starting { .. }));
        self.lease = Some(lease);
    }

    /// The store acknowledged the starting attempt; it is handed to the executor. The lease
    /// runs from now, and the watchdog's deadlines are set from the job's timeout.
    pub(crate) fn mark_running(
        &mut self,
        now: Timestamp,
        ttl_ms: u64,
        backstop_factor: u32,
    ) -> Transition {
        if let Some(lease) = &mut self.lease {
            lease.renewed_at = now;
            lease.expires_at = now.plus_ms(ttl_ms);
        }
        self.last_activity = Some(now);
        self.watch = match self.timeout_ms {
            Some(timeout) => Watch {
                timeout_at: Some(now.plus_ms(timeout)),
                kill_at: None,
                backstop_at: Some(now.plus_ms(timeout.saturating_mul(u64::from(backstop_factor)))),
                stuck_reported: false,
            },
            None => Watch::default(),
        };
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
    pub(crate) fn apply_outcome(
        &mut self,
        now: Timestamp,
        outcome: Outcome,
        rng: &mut SplitMix64,
    ) -> Transition {
        let attempt = self.attempt;
        self.end_attempt();
        match outcome {
            Outcome::Success { summary, artifacts } => {
                self.summary = summary.map(|s| truncate(&s));
                self.artifacts = artifacts;
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
    /// `interrupted` if the job does not resume after crashes, otherwise the attempt counts as
    /// lost ([`Run::lose_attempt`]). An interrupted run keeps its checkpoint (SPEC C2).
    pub(crate) fn recover_after_crash(&mut self, now: Timestamp) -> Transition {
        let attempt = self.attempt;
        if self.cancel_requested {
            self.end_attempt();
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
            self.end_attempt();
            self.record_error(
                now,
                ErrorKind::Interrupted,
                &format!("attempt {attempt} was cut short by a crash or shutdown"),
            );
            return self.finish(
                now,
                RunState::Interrupted,
                format!("attempt {attempt} interrupted; job does not resume after a crash"),
            );
        }
        self.lose_attempt(
            now,
            ErrorKind::Interrupted,
            &format!("attempt {attempt} was cut short by a crash or shutdown"),
        )
    }

    /// A graceful shutdown stopped the attempt in progress, or its budget ran out before the
    /// attempt ended (SPEC O1). It uses no attempt and no lost-attempt budget: the run retries
    /// at the next start (`BackingOff { until: now }`, which a shutting-down scheduler leaves
    /// for the next start). A run an operator had cancelled ends `cancelled`.
    pub(crate) fn interrupt_for_shutdown(&mut self, now: Timestamp) -> Transition {
        let attempt = self.attempt;
        self.end_attempt();
        self.record_error(
            now,
            ErrorKind::Interrupted,
            &format!("attempt {attempt} was stopped by a shutdown"),
        );
        if self.cancel_requested {
            return self.finish(
                now,
                RunState::Cancelled,
                format!("attempt {attempt} stopped by a shutdown after a cancel request"),
            );
        }
        self.shutdowns += 1;
        self.change(
            RunState::BackingOff { until: now },
            format!(
                "attempt {attempt} interrupted by shutdown; it resumes at the next start and \
                 uses no attempt"
            ),
        )
    }

    /// The attempt in progress was lost: its lease was reclaimed, its holder released it, or
    /// the process crashed. Lost attempts have their own budget (`lost_attempts_max`): within
    /// it the run retries at once; past it the run is poison and ends `failed_dropped`, so a
    /// run that keeps killing its host cannot loop forever.
    pub(crate) fn lose_attempt(
        &mut self,
        now: Timestamp,
        kind: ErrorKind,
        message: &str,
    ) -> Transition {
        let attempt = self.attempt;
        self.end_attempt();
        self.lost += 1;
        self.record_error(now, kind, message);
        if self.cancel_requested {
            return self.finish(
                now,
                RunState::Cancelled,
                format!("attempt {attempt} lost after a cancel request"),
            );
        }
        if self.lost >= self.retry.lost_attempts_max {
            self.record_error(
                now,
                ErrorKind::Poison,
                &format!(
                    "{} attempts lost (crashes, stalls, releases); last: {message}",
                    self.lost
                ),
            );
            // Like an interrupted run, a poison run keeps its checkpoint: it is what an operator
            // inspects, and reclaiming never deletes data (SPEC C2, L3).
            let checkpoint = self.checkpoint.take();
            let t = self.finish(
                now,
                RunState::FailedDropped,
                format!("poison: {} attempts lost", self.lost),
            );
            self.checkpoint = checkpoint;
            return t;
        }
        match self
            .retry
            .decide_immediate(self.attempts_counted(), now.ms_since(self.created_at))
        {
            RetryDecision::RetryAfter { .. } => self.change(
                RunState::BackingOff { until: now },
                format!(
                    "attempt {attempt} lost ({message}); retrying, {} of {} lost attempts used",
                    self.lost, self.retry.lost_attempts_max
                ),
            ),
            RetryDecision::Exhausted => self.finish(
                now,
                RunState::Failed,
                format!("attempt {attempt} lost; no attempts left"),
            ),
            RetryDecision::DeadlineExceeded => self.finish(
                now,
                RunState::Failed,
                format!("attempt {attempt} lost; the run's deadline has passed"),
            ),
        }
    }

    /// The watchdog kills the attempt in progress (timeout or backstop). The kill is sticky:
    /// the attempt's lease is revoked, so nothing it reports later is accepted, and no
    /// extension revives it. The attempt counts as a retryable failure.
    pub(crate) fn kill(
        &mut self,
        now: Timestamp,
        reason: &str,
        rng: &mut SplitMix64,
    ) -> Transition {
        let attempt = self.attempt;
        self.killed = Some(attempt);
        self.end_attempt();
        self.record_error(now, ErrorKind::TimedOut, reason);
        if self.cancel_requested {
            return self.finish(
                now,
                RunState::Cancelled,
                format!("attempt {attempt} killed after a cancel request"),
            );
        }
        self.retry_or_fail(now, rng, format!("attempt {attempt} killed: {reason}"))
    }

    /// An operator cancels the run. Returns `None` if the run is running (a cancel request is
    /// recorded and the attempt is asked to stop).
    pub(crate) fn cancel(&mut self, now: Timestamp, reason: &str) -> Option<Transition> {
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

    /// The attempt in progress is over, whatever its end: its lease and deadlines go.
    fn end_attempt(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.last_token = Some(lease.token);
        }
        self.watch = Watch::default();
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
        self.end_attempt();
        // SPEC C2: completion and terminal failure delete the checkpoint; an interrupted run
        // keeps it for whoever resumes it.
        if state != RunState::Interrupted {
            self.checkpoint = None;
        }
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
    crate::text::truncate(text, limits::MESSAGE_MAX_BYTES)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn an_error_kind_displays_as_it_is_stored_and_an_error_says_its_attempt() {
        // `ALL` is every kind: a new one fails to compile here until it is listed.
        for kind in ErrorKind::ALL {
            match kind {
                ErrorKind::Retryable
                | ErrorKind::Permanent
                | ErrorKind::Interrupted
                | ErrorKind::Cancelled
                | ErrorKind::DeadlineExceeded
                | ErrorKind::SnoozeLimit
                | ErrorKind::Lost
                | ErrorKind::TimedOut
                | ErrorKind::Poison => {}
            }
            let stored = serde_json::to_value(kind).unwrap();
            assert_eq!(stored.as_str(), Some(kind.to_string().as_str()));
        }
        let error = RunError {
            kind: ErrorKind::Retryable,
            message: "upstream 503".into(),
            attempt: Attempt(2),
            at: Timestamp(0),
        };
        assert_eq!(error.to_string(), "attempt 2, retryable: upstream 503");
    }

    /// A manual run 1 of job `j` under `terms`, created at time 0: the unit tests' fixture.
    pub(crate) fn manual_run(terms: RunTerms) -> Run {
        Run::new(
            RunId(1),
            JobId::new("j").unwrap(),
            Trigger::Manual,
            Timestamp(0),
            terms,
        )
    }

    fn running_run(policy: RetryPolicy) -> Run {
        let mut run = manual_run(RunTerms {
            retry: policy,
            ..RunTerms::new("k")
        });
        run.mark_running(Timestamp(0), 30_000, 3);
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
        run.begin_next_attempt(Timestamp(0));
        run.mark_running(Timestamp(2_000), 30_000, 3);
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
        run.begin_next_attempt(Timestamp(0));
        run.mark_running(Timestamp(500), 30_000, 3);
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
    fn crashes_use_the_lost_attempt_budget_then_the_run_is_poison() {
        let mut run = running_run(RetryPolicy {
            attempts_max: 2,
            lost_attempts_max: 3,
            ..RetryPolicy::default()
        });
        // Lost attempts do not count against attempts_max: three crashes in a row are
        // survived twice, and the third makes the run poison.
        for crash in 1..=2 {
            let t = run.recover_after_crash(Timestamp(crash));
            assert_eq!(t.new, StateName::BackingOff, "crash {crash}");
            assert_eq!(run.attempts_counted(), 0);
            run.begin_next_attempt(Timestamp(crash));
            run.mark_running(Timestamp(crash), 30_000, 3);
        }
        let t = run.recover_after_crash(Timestamp(9));
        assert_eq!(t.new, StateName::FailedDropped);
        assert!(t.reason.contains("poison"), "{}", t.reason);
        assert_eq!(run.last_error.unwrap().kind, ErrorKind::Poison);
    }

    #[test]
    #[should_panic(expected = "left terminal state")]
    fn terminal_states_have_no_way_out() {
        let mut run = running_run(RetryPolicy::default());
        let mut rng = SplitMix64::new(0);
        run.apply_outcome(Timestamp(0), Outcome::ok(), &mut rng);
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

    /// A stored run with every field away from its default, so that a field serialized
    /// differently by `Run` and `RunRecord` shows. The literal is exhaustive: a new field must
    /// be added here.
    fn full_record() -> RunRecord {
        RunRecord {
            id: RunId(42),
            job: JobId::new("backup").unwrap(),
            trigger: Trigger::Scheduled {
                slot: Timestamp(60_000),
            },
            created_at: Timestamp(60_001),
            attempt: Attempt(3),
            snoozes: 1,
            state: RunState::Running {
                attempt: Attempt(3),
                started_at: Timestamp(70_000),
            },
            last_error: Some(RunError {
                kind: ErrorKind::Retryable,
                message: "upstream 503".into(),
                attempt: Attempt(2),
                at: Timestamp(65_000),
            }),
            summary: Some("half".into()),
            cancel_requested: true,
            finished_at: Some(Timestamp(90_000)),
            retry: RetryPolicy {
                attempts_max: 5,
                backoff_factor: 1.7,
                jitter: 0.1,
                deadline_ms: Some(3_600_000),
                ..RetryPolicy::default()
            },
            resume_after_crash: true,
            kind: "copy".into(),
            payload: "{\"from\": \"a\"}".into(),
            of_one_shot: Some(Timestamp(60_000)),
            external: true,
            timeout_ms: Some(30_000),
            required_artifacts: vec!["report".to_string()].into(),
            sinks: vec![Arc::from("mail")].into(),
            lease: Some(Lease {
                owner: crate::WorkerId::new("w1").unwrap(),
                token: FencingToken(9),
                renewed_at: Timestamp(70_000),
                expires_at: Timestamp(100_000),
            }),
            last_token: Some(FencingToken(8)),
            lost: 1,
            shutdowns: 2,
            progress: Some(Progress {
                phase: "upload".into(),
                message: "40 of 100".into(),
                at: Timestamp(75_000),
            }),
            last_activity: Some(Timestamp(75_000)),
            artifacts: BTreeMap::from([("report".to_string(), "s3://r".to_string())]),
            watch: Watch {
                timeout_at: Some(Timestamp(100_000)),
                kill_at: Some(Timestamp(110_000)),
                backstop_at: Some(Timestamp(200_000)),
                stuck_reported: true,
            },
            extended: true,
            killed: Some(Attempt(2)),
            checkpoint: Some(Checkpoint {
                seq: 4,
                attempt: Attempt(3),
                saved_at: Timestamp(74_000),
                data: "copied 40".into(),
            }),
        }
    }

    /// The store format is `RunRecord`'s serde shape, and `Run` serializes exactly as it did
    /// before `RunRecord` existed: both must give the same bytes, field order included.
    #[test]
    fn record_and_run_serialize_alike() {
        let mut fresh = running_run(RetryPolicy::default()).record();
        fresh.state = RunState::Queued {
            since: Timestamp(0),
        };
        // `fresh` leaves the skipped-when-default fields (`last_token`, `shutdowns`) at their
        // defaults, `full_record` sets every field.
        for record in [fresh, full_record()] {
            let run = Run::from_record(record.clone());
            let from_run = serde_json::to_string(&run).unwrap();
            assert_eq!(from_run, serde_json::to_string(&record).unwrap());
            assert_eq!(
                serde_json::to_string_pretty(&run).unwrap(),
                serde_json::to_string_pretty(&record).unwrap()
            );
        }
        let fresh = serde_json::to_value(running_run(RetryPolicy::default())).unwrap();
        assert!(fresh.get("last_token").is_none() && fresh.get("shutdowns").is_none());
    }

    /// The stored bytes of a run, pinned: a change here is a store format change (a new format
    /// version and a migration, see the module docs).
    #[test]
    fn the_stored_form_of_a_run_is_pinned() {
        let golden = concat!(
            r#"{"#,
            r#""id":42,"#,
            r#""job":"backup","#,
            r#""trigger":{"trigger":"scheduled","slot":60000},"#,
            r#""created_at":60001,"#,
            r#""attempt":3,"#,
            r#""snoozes":1,"#,
            r#""state":{"state":"running","attempt":3,"started_at":70000},"#,
            r#""last_error":{"kind":"retryable","message":"upstream 503","attempt":2,"at":65000},"#,
            r#""summary":"half","#,
            r#""cancel_requested":true,"#,
            r#""finished_at":90000,"#,
            r#""retry":{"attempts_max":5,"backoff_base_ms":1000,"backoff_factor":1.7,"backoff_cap_ms":300000,"jitter":0.1,"deadline_ms":3600000,"lost_attempts_max":3},"#,
            r#""resume_after_crash":true,"#,
            r#""kind":"copy","#,
            r#""payload":"{\"from\": \"a\"}","#,
            r#""of_one_shot":60000,"#,
            r#""external":true,"#,
            r#""timeout_ms":30000,"#,
            r#""required_artifacts":["report"],"#,
            r#""sinks":["mail"],"#,
            r#""lease":{"owner":"w1","token":9,"renewed_at":70000,"expires_at":100000},"#,
            r#""last_token":8,"#,
            r#""lost":1,"#,
            r#""shutdowns":2,"#,
            r#""progress":{"phase":"upload","message":"40 of 100","at":75000},"#,
            r#""last_activity":75000,"#,
            r#""artifacts":{"report":"s3://r"},"#,
            r#""watch":{"timeout_at":100000,"kill_at":110000,"backstop_at":200000,"stuck_reported":true},"#,
            r#""extended":true,"#,
            r#""killed":2,"#,
            r#""checkpoint":{"seq":4,"attempt":3,"saved_at":74000,"data":"copied 40"}"#,
            r#"}"#,
        );
        assert_eq!(serde_json::to_string(&full_record()).unwrap(), golden);
        assert_eq!(
            serde_json::from_str::<RunRecord>(golden).unwrap(),
            full_record()
        );
    }

    /// Both read the same bytes to the same run, including a record written before the
    /// defaulted fields existed.
    #[test]
    fn record_and_run_read_alike_and_round_trip() {
        let record = full_record();
        let run = Run::from_record(record.clone());
        assert_eq!(run.record(), record);
        assert_eq!(RunRecord::from(run.clone()), record);
        assert_eq!(Run::from(record.clone()), run);

        let json = serde_json::to_string(&run).unwrap();
        assert_eq!(serde_json::from_str::<Run>(&json).unwrap(), run);
        assert_eq!(serde_json::from_str::<RunRecord>(&json).unwrap(), record);

        // An old record: only the fields without `#[serde(default)]`.
        let mut old = serde_json::to_value(&record).unwrap();
        let fields = old.as_object_mut().unwrap();
        for defaulted in [
            "payload",
            "of_one_shot",
            "external",
            "timeout_ms",
            "required_artifacts",
            "sinks",
            "lease",
            "last_token",
            "lost",
            "shutdowns",
            "progress",
            "last_activity",
            "artifacts",
            "watch",
            "extended",
            "killed",
            "checkpoint",
        ] {
            assert!(fields.remove(defaulted).is_some(), "{defaulted}");
        }
        let old_run: Run = serde_json::from_value(old.clone()).unwrap();
        let old_record: RunRecord = serde_json::from_value(old).unwrap();
        assert_eq!(old_run, Run::from_record(old_record.clone()));
        assert_eq!(old_record.payload.as_ref(), "");
        assert_eq!(old_record.watch, Watch::default());
    }

    #[test]
    fn accessors_read_the_fields() {
        let record = full_record();
        let run = Run::from_record(record.clone());
        assert_eq!(run.id(), record.id);
        assert_eq!(run.job(), &record.job);
        assert_eq!(run.trigger(), record.trigger);
        assert_eq!(run.created_at(), record.created_at);
        assert_eq!(run.attempt(), record.attempt);
        assert_eq!(run.snoozes(), record.snoozes);
        assert_eq!(run.state(), record.state);
        assert_eq!(run.last_error(), record.last_error.as_ref());
        assert_eq!(run.summary(), record.summary.as_deref());
        assert_eq!(run.cancel_requested(), record.cancel_requested);
        assert_eq!(run.finished_at(), record.finished_at);
        assert_eq!(run.retry(), &record.retry);
        assert_eq!(run.resume_after_crash(), record.resume_after_crash);
        assert_eq!(run.kind(), &*record.kind);
        assert_eq!(run.payload(), &*record.payload);
        assert_eq!(run.of_one_shot(), record.of_one_shot);
        assert_eq!(run.external(), record.external);
        assert_eq!(run.timeout_ms(), record.timeout_ms);
        assert_eq!(run.required_artifacts(), &*record.required_artifacts);
        assert_eq!(run.sinks(), &*record.sinks);
        assert_eq!(run.lease(), record.lease.as_ref());
        assert_eq!(run.last_token(), record.last_token);
        assert_eq!(run.lost(), record.lost);
        assert_eq!(run.shutdowns(), record.shutdowns);
        assert_eq!(run.progress(), record.progress.as_ref());
        assert_eq!(run.last_activity(), record.last_activity);
        assert_eq!(run.artifacts(), &record.artifacts);
        assert_eq!(run.watch(), record.watch);
        assert_eq!(run.extended(), record.extended);
        assert_eq!(run.killed(), record.killed);
        assert_eq!(run.checkpoint(), record.checkpoint.as_ref());
    }

    // Moved from core/tests/review_regressions.rs when the run machine's methods became
    // private to the core: regressions an independent review found in the run machine.

    /// limits::SNOOZES_MAX: "a run snoozed this many times ends `failed`". The 1 000th snooze
    /// backs off; only the 1 001st fails the run.
    #[test]
    fn a_run_snoozed_snoozes_max_times_ends_failed() {
        let mut run = running_run(RetryPolicy::default());
        let mut rng = SplitMix64::new(0);
        for n in 1..=limits::SNOOZES_MAX {
            run.apply_outcome(Timestamp(0), Outcome::Snooze { for_ms: 1 }, &mut rng);
            if n < limits::SNOOZES_MAX {
                run.begin_next_attempt(Timestamp(0));
                run.mark_running(Timestamp(0), 30_000, 3);
            }
        }
        assert_eq!(
            run.state(),
            RunState::Failed,
            "after {} snoozes: {:?}",
            run.snoozes(),
            run.state()
        );
    }

    /// Crash recovery retries "at once", but asks the policy for a (random) backoff delay and
    /// checks the deadline against it: a run with attempts left and time left before its
    /// deadline ends `interrupted`, with the reason "no attempts left".
    #[test]
    fn crash_recovery_checks_the_deadline_against_now() {
        let retry = RetryPolicy {
            attempts_max: 5,
            backoff_base_ms: 5_000,
            backoff_cap_ms: 5_000,
            jitter: 0.0,
            deadline_ms: Some(10_000),
            ..RetryPolicy::default()
        };
        let mut run = running_run(retry);
        // Restored 6 s after creation: attempt 2 could start now, 4 s before the deadline.
        let t = run.recover_after_crash(Timestamp(6_000));
        assert_eq!(
            run.state(),
            RunState::BackingOff {
                until: Timestamp(6_000)
            },
            "{}",
            t.reason
        );
    }
}

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
//! | `Running` | an operator releases its lease (SPEC W6) | `Queued { since: now }` (external) or `BackingOff { until: now }`; no attempt used; the lease kept in `released_lease` (`Cancelled` after a cancel request) |
//! | `Running` | an operator reclaims its lease | as a reclaimed lease (the attempt is lost); the lease kept in `released_lease` |
//! | `Queued`, `BackingOff` | an operator restores the lease released or reclaimed in this attempt | `Starting { attempt }`, the same attempt, re-granted to its previous owner under a new token; the budget the release or reclaim used is given back |
//! | `Running` | a success waits for the artifact gate (`crate::artifact`) | `Running` until the checks' answer: `Succeeded`, or still `Running` if refused |
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
//! `#[serde(default)]` so that existing stores still open. One change is not: a field is left
//! out of the stored form while it holds the value its absence decodes to in every build of the
//! format (the rule of the `omit` module, checked field by field by its tests), so a fresh run
//! writes about a third fewer bytes and earlier builds still read it. Tests and stores that need a run in an
//! arbitrary state build a `RunRecord` and convert it with [`Run::from_record`];
//! [`Run::record`] goes the other way. What the CLI and the daemon show is a third thing again,
//! the JSON views of `keel-cli`'s `views` module.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::artifact::Verification;
use crate::ids::{Attempt, FencingToken, IdempotencyKey, JobId, RunId, WorkerId};
use crate::lease::Lease;
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
///
/// Parts most runs never carry (an error, progress, a checkpoint) are boxed: `None` costs a
/// pointer instead of their 40 to 56 bytes, in every run the scheduler and a store hold and in
/// every record that copies one. A `Box` serializes as what it holds, so the stored form is
/// unchanged.
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
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<Box<RunError>>,
    /// The success summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<String>,
    /// An operator asked to cancel the attempt in progress.
    cancel_requested: bool,
    /// When it reached its terminal state.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "crate::omit::is_empty_text")]
    payload: Arc<str>,
    /// The instant of the one-shot the job was when the run was created, if it was one: only a
    /// run of that very one-shot finishes it when it settles (a run left over from an earlier
    /// definition does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    of_one_shot: Option<Timestamp>,
    /// Attempts run by an external worker that claims them (copied from the job).
    #[serde(default, skip_serializing_if = "crate::omit::is_false")]
    external: bool,
    /// The attempt timeout copied from the job, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    /// Artifacts the job requires before it accepts a completion (copied from the job).
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    required_artifacts: Box<[String]>,
    /// Sinks the run's result is delivered to (copied from the job).
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    sinks: Box<[Arc<str>]>,
    /// The lease of the attempt in progress (`Starting` and `Running` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<Lease>,
    /// The token of the last lease that ended. A store uses it to tell a writer that saw the
    /// stored lease end from one that never knew of it (see `store::check_batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_token: Option<FencingToken>,
    /// Attempts lost to crashes, reclaimed leases or releases; budgeted apart from handler
    /// errors by `RetryPolicy::lost_attempts_max`.
    #[serde(default, skip_serializing_if = "crate::omit::is_zero")]
    lost: u32,
    /// Attempts a graceful shutdown stopped (SPEC O1); they count against no budget.
    #[serde(default, skip_serializing_if = "crate::omit::is_zero")]
    shutdowns: u32,
    /// The last progress the holder reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress: Option<Box<Progress>>,
    /// The last sign of life of the attempt in progress: its start, a heartbeat or progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_activity: Option<Timestamp>,
    /// Artifacts of the successful completion.
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    artifacts: BTreeMap<String, String>,
    /// The watchdog's deadlines for the attempt in progress.
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    watch: Watch,
    /// True once an extension was granted: at most one per run (SPEC W1).
    #[serde(default, skip_serializing_if = "crate::omit::is_false")]
    extended: bool,
    /// The attempt the watchdog killed, if any: a kill is sticky, nothing revives it (W2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    killed: Option<Attempt>,
    /// The latest checkpoint, handed to the next attempt; deleted when the run completes or
    /// fails terminally, kept when it is interrupted (SPEC C2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint: Option<Box<Checkpoint>>,
    /// Verification evidence of the artifact gate and of explicit `verify` calls, oldest first,
    /// the newest [`limits::VERIFICATIONS_KEPT_MAX`] (SPEC A2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    verifications: Vec<Verification>,
    /// Attempts an operator released (SPEC W6); like shutdowns, they count against no budget.
    #[serde(default, skip_serializing_if = "crate::omit::is_zero")]
    handed_back: u32,
    /// The lease an operator last released or reclaimed, kept so that it can be restored to its
    /// owner while the run has not been claimed or started since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released_lease: Option<ReleasedLease>,
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
        self.last_error.as_deref()
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
        self.progress.as_deref()
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
        self.checkpoint.as_deref()
    }

    /// Verification evidence, oldest first (SPEC A2).
    pub fn verifications(&self) -> &[Verification] {
        &self.verifications
    }

    /// Attempts an operator released (SPEC W6).
    pub fn handed_back(&self) -> u32 {
        self.handed_back
    }

    /// The lease an operator last released or reclaimed, while it can be restored.
    pub fn released_lease(&self) -> Option<&ReleasedLease> {
        self.released_lease.as_ref()
    }
}

/// A lease an operator took away (SPEC W6: a released lease is re-granted, never erased).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedLease {
    /// Who held it.
    pub owner: WorkerId,
    /// Its token; a restored lease gets a new one (tokens are never reused).
    pub token: FencingToken,
    /// The attempt it was for; a restore resumes that attempt.
    pub attempt: Attempt,
    /// When it was taken.
    pub at: Timestamp,
    /// True if it was reclaimed (the attempt counted as lost), false if released (no budget
    /// used). A restore gives the lost attempt back.
    pub reclaimed: bool,
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
            verifications: Vec::new(),
            handed_back: 0,
            released_lease: None,
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
    /// lost ones (lost attempts have their own budget), those a shutdown stopped and those an
    /// operator released.
    pub fn attempts_counted(&self) -> u32 {
        self.attempt
            .0
            .saturating_sub(self.snoozes)
            .saturating_sub(self.lost)
            .saturating_sub(self.shutdowns)
            .saturating_sub(self.handed_back)
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
        self.released_lease = None;
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
        self.released_lease = None;
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

    /// Keeps verification evidence, the newest [`limits::VERIFICATIONS_KEPT_MAX`].
    pub(crate) fn record_verification(&mut self, verification: Verification) {
        if self.verifications.len() >= limits::VERIFICATIONS_KEPT_MAX {
            self.verifications.remove(0);
        }
        self.verifications.push(verification);
    }

    /// A verification of `target` that passed in the attempt in progress, if any.
    pub(crate) fn passed_verification(&self, target: &str) -> Option<&Verification> {
        self.verifications
            .iter()
            .rev()
            .find(|v| v.ok && v.attempt == self.attempt && v.target == target)
    }

    /// An operator takes the running attempt's lease away (SPEC W6). The attempt is handed
    /// back, not failed: like an attempt a shutdown stopped (SPEC O1) it uses no attempt and no
    /// lost-attempt budget, because the job did nothing wrong. An external run queues for a
    /// worker again, an in-process one starts its next attempt at once; the lease is kept in
    /// `released_lease` so that [`Run::restore_lease`] can give it back. A run an operator had
    /// cancelled ends `cancelled`.
    pub(crate) fn hand_back(&mut self, now: Timestamp, by: &str) -> Transition {
        let attempt = self.attempt;
        let lease = self.lease.clone().expect("a running attempt holds a lease");
        self.end_attempt();
        if self.cancel_requested {
            self.record_error(
                now,
                ErrorKind::Cancelled,
                &format!("attempt {attempt} released by {by} after a cancel request"),
            );
            return self.finish(
                now,
                RunState::Cancelled,
                format!("attempt {attempt} released by {by} after a cancel request"),
            );
        }
        self.handed_back += 1;
        self.released_lease = Some(ReleasedLease {
            owner: lease.owner.clone(),
            token: lease.token,
            attempt,
            at: now,
            reclaimed: false,
        });
        let what = format!(
            "lease {} of attempt {attempt} held by {} released by {by}; no attempt used",
            lease.token, lease.owner
        );
        if self.external {
            self.change(
                RunState::Queued { since: now },
                format!("{what}; waiting for a worker"),
            )
        } else {
            self.change(RunState::BackingOff { until: now }, what)
        }
    }

    /// After an operator's reclaim ([`Run::lose_attempt`]): remembers the lease so that it can
    /// be restored, unless the run ended.
    pub(crate) fn note_reclaimed(
        &mut self,
        lease: &crate::lease::Lease,
        attempt: Attempt,
        now: Timestamp,
    ) {
        if self.state.is_terminal() {
            return;
        }
        self.released_lease = Some(ReleasedLease {
            owner: lease.owner.clone(),
            token: lease.token,
            attempt,
            at: now,
            reclaimed: true,
        });
    }

    /// Why the released lease cannot be restored now, if it cannot: none was released by an
    /// operator, or the run was claimed or started since.
    pub(crate) fn restorable(&self) -> Result<&ReleasedLease, String> {
        let Some(released) = &self.released_lease else {
            return Err("its lease was not released or reclaimed by an operator".into());
        };
        let waiting = matches!(
            self.state,
            RunState::Queued { .. } | RunState::BackingOff { .. }
        );
        if !waiting || released.attempt != self.attempt {
            return Err(format!(
                "it was claimed or started again since (now {})",
                self.state.name()
            ));
        }
        Ok(released)
    }

    /// Re-grants the released lease's attempt to its previous owner under `lease`, a new token
    /// (SPEC W6). The attempt resumes with its number and idempotency key; the budget its
    /// release or reclaim used is given back. The caller checked [`Run::restorable`].
    pub(crate) fn restore_lease(&mut self, lease: crate::lease::Lease) -> Transition {
        let released = self
            .released_lease
            .take()
            .expect("the caller checked restorable");
        if released.reclaimed {
            self.lost = self.lost.saturating_sub(1);
        } else {
            self.handed_back = self.handed_back.saturating_sub(1);
        }
        let reason = format!(
            "lease {} of attempt {} restored to {} as {}",
            released.token, released.attempt, lease.owner, lease.token
        );
        self.lease = Some(lease);
        self.change(
            RunState::Starting {
                attempt: self.attempt,
            },
            reason,
        )
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
        self.last_error = Some(Box::new(RunError {
            kind,
            message: truncate(message),
            attempt: self.attempt,
            at: now,
        }));
    }

    fn finish(&mut self, now: Timestamp, state: RunState, reason: String) -> Transition {
        debug_assert!(state.is_terminal());
        self.finished_at = Some(now);
        self.cancel_requested = false;
        self.released_lease = None;
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
pub(crate) mod tests;

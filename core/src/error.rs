//! Refused commands (tier 1 of the error model): the command did not apply and the state is
//! unchanged.

use crate::artifact::{Verification, VerifyId};
use crate::ids::{FencingToken, JobId, JobIdError, RunId};
use crate::outbox::OutboxRejected;
use crate::retry::RetryPolicyError;
use crate::run::StateName;
use crate::schedule::ScheduleError;
use crate::time::Timestamp;

/// Why a command or input was refused. A refused command changes nothing.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// No job has this id.
    #[error("no job named {0}")]
    UnknownJob(JobId),
    /// A job with this id exists already.
    #[error("a job named {0} already exists (use update to change it)")]
    JobExists(JobId),
    /// No active run has this id (it never existed or has finished and left memory).
    #[error("no active run {0}")]
    UnknownRun(RunId),
    /// The schedule is invalid or never fires.
    #[error("invalid schedule: {0}")]
    Schedule(#[from] ScheduleError),
    /// The retry policy is invalid.
    #[error("invalid retry policy: {0}")]
    RetryPolicy(#[from] RetryPolicyError),
    /// The job name is invalid.
    #[error("invalid job name: {0}")]
    JobId(#[from] JobIdError),
    /// A field of the job is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The job's first slot fired already, under this name (SPEC S6): a one-shot cannot be
    /// re-armed at an instant it already ran.
    #[error("job {job}: slot {slot} is not after {last}, the last slot fired under this name")]
    AlreadyFired {
        /// The job.
        job: JobId,
        /// The first slot the new definition would fire.
        slot: Timestamp,
        /// The last slot fired under this name.
        last: Timestamp,
    },
    /// A job already has [`limits::ACTIVE_RUNS_PER_JOB_MAX`](crate::limits::ACTIVE_RUNS_PER_JOB_MAX)
    /// active runs.
    #[error("job {job} already has {active} active runs, the limit")]
    TooManyActiveRuns {
        /// The job.
        job: JobId,
        /// Its active runs.
        active: u32,
    },
    /// The job is disabled; only an update re-arms it.
    #[error("job {job} is disabled ({reason}); update it to re-arm it")]
    JobDisabled {
        /// The job.
        job: JobId,
        /// Why it was disabled.
        reason: String,
    },
    /// The job is already paused.
    #[error("job {0} is already paused")]
    AlreadyPaused(JobId),
    /// The job is not paused.
    #[error("job {0} is not paused")]
    NotPaused(JobId),
    /// The job's overlap policy forbids another run while one is active.
    #[error("job {job} already has an active run {run} and its overlap policy is not `allow`")]
    RunActive {
        /// The job.
        job: JobId,
        /// The active run.
        run: RunId,
    },
    /// A write carried a fencing token that is not the run's current lease (SPEC L1).
    #[error("{run}: {got} is not the current lease (current: {current:?}); the write was refused")]
    StaleToken {
        /// The run.
        run: RunId,
        /// The token the caller carried.
        got: FencingToken,
        /// The run's current token, if it has a lease.
        current: Option<FencingToken>,
    },
    /// A completion lacked artifacts the job requires; it was recorded and refused, and the run
    /// stays running.
    #[error("{run}: completion refused, missing artifacts {missing:?}")]
    MissingArtifacts {
        /// The run.
        run: RunId,
        /// The missing artifact names.
        missing: Vec<String>,
    },
    /// The artifact gate refused a completion: these required artifacts did not answer HTTP 200
    /// or are missing (SPEC A2). The evidence is stored with the run and audited, an
    /// `artifact_gate` incident is open, and the run stays running under its lease, so the
    /// holder can fix the artifacts and complete again.
    #[error(
        "{run}: completion refused by the artifact gate: {}",
        crate::artifact::describe(failed)
    )]
    ArtifactGate {
        /// The run.
        run: RunId,
        /// The checks that failed.
        failed: Vec<Verification>,
    },
    /// A completion of the run is waiting for its artifact checks, or the run has
    /// [`limits::VERIFICATIONS_PENDING_PER_RUN_MAX`](crate::limits::VERIFICATIONS_PENDING_PER_RUN_MAX)
    /// verifications in flight.
    #[error("{0}: artifact checks are in progress; wait for their answer")]
    VerificationPending(RunId),
    /// No verification with this id is in flight (answered already, or made before a restart).
    #[error("no {0} is in flight")]
    UnknownVerification(VerifyId),
    /// An operator asked to restore a lease, but the run's last lease was not taken by an
    /// operator, or the run was claimed or started again since (SPEC W6).
    #[error("{run}: no released lease to restore ({why})")]
    NothingToRestore {
        /// The run.
        run: RunId,
        /// Why.
        why: String,
    },
    /// The run's timeout was already extended once (SPEC W1).
    #[error("{0}: the timeout was already extended once")]
    AlreadyExtended(RunId),
    /// The watchdog killed an attempt of this run; a kill is sticky (SPEC W2).
    #[error("{0}: the watchdog killed it; nothing undoes a kill")]
    Killed(RunId),
    /// The run's attempt has no timeout to extend.
    #[error("{0}: the job has no timeout to extend")]
    NoTimeout(RunId),
    /// The attempt's timeout already fired; it was asked to stop.
    #[error("{0}: the attempt already timed out and was asked to stop")]
    TimedOut(RunId),
    /// A delivery result was refused by the outbox (unknown delivery, stale attempt).
    #[error("delivery result refused: {0}")]
    Delivery(#[from] OutboxRejected),
    /// The scheduler is shutting down: nothing new starts.
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    /// An outcome arrived for a run that is not running.
    #[error("{run} is {state}, not running")]
    NotRunning {
        /// The run.
        run: RunId,
        /// Its state.
        state: StateName,
    },
    /// No open incident has this id (it never existed, or it is resolved).
    #[error("no open incident #{0}")]
    UnknownIncident(u64),
    /// The incident was acknowledged already.
    #[error("incident #{incident} was already acknowledged by {by}")]
    AlreadyAcknowledged {
        /// The incident.
        incident: u64,
        /// Who acknowledged it.
        by: String,
    },
    /// [`limits::INCIDENTS_OPEN_MAX`](crate::limits::INCIDENTS_OPEN_MAX) incidents are open.
    #[error("{0} incidents are open, the limit; resolve some first")]
    TooManyIncidents(usize),
}

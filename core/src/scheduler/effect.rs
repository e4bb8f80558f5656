//! What the scheduler emits: [`Effect`]s for the driver to carry out, with the [`Event`]s and
//! [`AttemptStart`]s they carry.

use super::*;

/// Why an attempt is asked to stop (`Effect::CancelAttempt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StopReason {
    /// An operator cancelled the run.
    Cancel,
    /// The job's timeout passed.
    Timeout,
    /// The scheduler is shutting down (SPEC O1).
    Shutdown,
    /// The attempt's lease was lost (its renewals did not become durable in time).
    LeaseLost,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Cancel => "the run was cancelled",
            StopReason::Timeout => "the job's timeout passed",
            StopReason::Shutdown => "keel is shutting down",
            StopReason::LeaseLost => "the attempt lost its lease",
        })
    }
}

/// An output of the scheduler, drained with [`Scheduler::poll_effect`].
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Write these records atomically and durably, in order, then call
    /// [`Scheduler::handle_persisted`] (or [`Scheduler::handle_persist_failed`]).
    Persist(Batch),
    /// Execute an attempt, then report with [`Scheduler::handle_outcome`]. Released only after
    /// the batch recording the attempt was acknowledged.
    StartAttempt(AttemptStart),
    /// Ask the attempt to stop cooperatively; its handler still reports an outcome.
    CancelAttempt {
        /// The run.
        run: RunId,
        /// The attempt.
        attempt: Attempt,
        /// Why, for the handler to say (a command job's message names it).
        reason: StopReason,
    },
    /// Stop the attempt now (the watchdog killed it). Its lease is already revoked: nothing it
    /// reports afterwards is accepted.
    KillAttempt {
        /// The run.
        run: RunId,
        /// The attempt.
        attempt: Attempt,
    },
    /// Check artifacts (SPEC A2): open each URL (HTTP 200 passes) and look for each file, then
    /// report one result per check, in order, with [`Scheduler::handle_verified`]. Not gated on
    /// a write: checking changes nothing, and the core decides nothing until the answer.
    VerifyArtifacts(VerifyRequest),
    /// Send a run's result or an incident notification to a sink, then report with [`Scheduler::handle_delivery_result`].
    /// Released only after the outbox record of this attempt is durable.
    Deliver(SendRequest),
    /// Something happened that a driver may log or count. Not durable.
    Event(Event),
}

/// Everything an executor needs to run one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptStart {
    /// The run.
    pub run: RunId,
    /// The job.
    pub job: JobId,
    /// The handler to call.
    pub kind: Arc<str>,
    /// The job's payload.
    pub payload: Arc<str>,
    /// The attempt number, from 1.
    pub attempt: Attempt,
    /// `run id + attempt`, for the handler's own side effects.
    pub idempotency_key: IdempotencyKey,
    /// Why the run exists.
    pub trigger: Trigger,
    /// The attempt's lease: its owner, fencing token and expiry. Every write the attempt
    /// makes carries the token; handlers pass it to their own side effects.
    pub lease: Lease,
    /// The run's last checkpoint, to resume from (SPEC C2).
    pub checkpoint: Option<Checkpoint>,
}

/// A domain event (tier 2 of the error model), for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A run reached a terminal state.
    RunFinished {
        /// The run.
        run: RunId,
        /// The job.
        job: JobId,
        /// The terminal state.
        state: StateName,
    },
    /// A retry was scheduled.
    RetryScheduled {
        /// The run.
        run: RunId,
        /// When the next attempt starts.
        at: Timestamp,
    },
    /// A job was disabled by the scheduler.
    JobDisabled {
        /// The job.
        job: JobId,
        /// Why.
        reason: String,
    },
    /// A job was deleted by the scheduler (a one-shot with `delete_after_run` finished).
    JobDeleted {
        /// The job.
        job: JobId,
        /// Why.
        reason: String,
    },
    /// Slots were dropped by the misfire or overlap policy.
    SlotsDropped {
        /// The job.
        job: JobId,
        /// How many, in words ("3", "at least 1000").
        count: String,
        /// Which policy dropped them.
        reason: String,
    },
    /// A lease was granted (an attempt started, or a worker claimed a run).
    LeaseGranted {
        /// The run.
        run: RunId,
        /// The holder.
        owner: WorkerId,
        /// Its token.
        token: FencingToken,
    },
    /// The watchdog reclaimed an expired lease.
    LeaseReclaimed {
        /// The run.
        run: RunId,
        /// The reclaimed token.
        token: FencingToken,
    },
    /// An operator released a lease (`Scheduler::release_lease`): its holder's writes are
    /// refused from now on, and an attempt of this process's own is to be stopped.
    LeaseReleased {
        /// The run.
        run: RunId,
        /// The released token.
        token: FencingToken,
    },
    /// An incident opened.
    IncidentOpened(Incident),
    /// An incident was not opened because
    /// [`limits::INCIDENTS_OPEN_MAX`] are open.
    IncidentSuppressed {
        /// Its kind.
        kind: IncidentKind,
        /// The run concerned, if any.
        run: Option<RunId>,
        /// What it would have said.
        details: String,
    },
    /// An incident resolved.
    IncidentResolved(Incident),
    /// An operator acknowledged an incident (`Incident::acknowledged` says who and when).
    IncidentAcknowledged(Incident),
    /// An incident stayed open and unacknowledged `Config::escalate_after_ms` after it opened
    /// (`Incident::escalated_at` says when); its notification goes to the escalation sinks.
    IncidentEscalated(Incident),
    /// A checkpoint save was made durable.
    CheckpointSaved {
        /// The run.
        run: RunId,
        /// The save.
        seq: u64,
    },
    /// A checkpoint save was throttled: kept, and written later or on flush.
    CheckpointThrottled {
        /// The run.
        run: RunId,
    },
    /// A checkpoint save failed to persist; the next save is not throttled.
    CheckpointFailed {
        /// The run.
        run: RunId,
        /// The save.
        seq: u64,
        /// The store's error.
        error: String,
    },
    /// Something happened in the delivery outbox; `Finished` is the counter event of SPEC D4
    /// (one per delivery, labelled by status and sink).
    Delivery(OutboxEvent),
    /// The store failed a batch; it will be retried at `retry_at`.
    PersistFailed {
        /// The batch.
        batch: BatchId,
        /// The store's error.
        error: String,
        /// When the next batch is emitted.
        retry_at: Timestamp,
    },
    /// A write succeeded after writes had failed (SPEC O5: an outage's end, as the first
    /// `PersistFailed` is its start).
    StoreRecovered {
        /// When the first of the failures happened.
        failing_since: Timestamp,
        /// How many writes failed in a row.
        failures: u32,
    },
}

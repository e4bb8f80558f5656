//! The composer: owns jobs, runs, the due index and the journal, and wires the sub-machines
//! together. See the crate docs for the driving contract.
//!
//! # Deadlines
//!
//! `poll_timeout` is the earliest of five named deadlines:
//!
//! - **job due**: the first entry of `due_jobs`, the `Scheduled` jobs ordered by cursor. A tick
//!   pops only due entries, so it costs O(log n) per due item, never a scan of all jobs.
//! - **run due**: the first entry of `due_runs`: a `BackingOff` run's `until`, or the
//!   watchdog's next deadline for a `Running` one (`watchdog::next_deadline`).
//! - **delivery due**: the outbox's next due delivery (`Outbox::poll_timeout`).
//! - **persist retry**: after a failed batch, when to emit the next one.
//! - **history sweep**: hourly, prune history by age for all jobs.
//!
//! The worker protocol (claims and fenced writes) lives in `scheduler/workers.rs`, the
//! watchdog and incidents in `scheduler/supervise.rs`.

mod supervise;
mod workers;

pub use workers::{CheckpointSave, Claimed, Released, RunContext, Shutdown};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::{Actor, AuditRecord};
use crate::checkpoint::Throttle;
pub use crate::config::Config;
use crate::error::Rejected;
use crate::ids::{Attempt, BatchId, FencingToken, IdempotencyKey, JobId, RunId, WorkerId};
use crate::incident::{Incident, IncidentKind, IncidentSubject};
use crate::job::{Backlog, Ensured, Job, JobSpec, JobState, LastRun, NotifyOn, OverlapPolicy};
use crate::lease::Lease;
use crate::limits;
use crate::outbox::{
    DeliveryId, DeliveryPayload, DeliveryResult, Outbox, OutboxEvent, SendRequest,
};
use crate::persist::{Batch, JobWrite, Journal, Meta, Record, Snapshot, Tombstone};
use crate::rng::SplitMix64;
use crate::run::{Checkpoint, Outcome, Run, RunState, RunTerms, StateName, Transition, Trigger};
use crate::schedule::{MisfirePolicy, Schedule, ScheduleError, ScheduleSpec};
use crate::time::Timestamp;

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
    /// Send a run's result to a sink, then report with [`Scheduler::handle_delivery_result`].
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

/// What the scheduler's inputs have cost, counted in entries of its indexes visited rather
/// than timed: tests assert that a firing, a command or an acknowledgement costs the same with
/// a thousand jobs as with a hundred thousand (`docs/performance.md` has the audit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Work {
    /// Due jobs and runs taken off the timer indexes by `handle_timeout`.
    pub timers_popped: u64,
    /// Job groups moved into batches.
    pub groups_batched: u64,
    /// Entries of the run-by-job index visited to find one job's runs (adding a job, refusing
    /// a trigger).
    pub runs_visited: u64,
    /// Entries of the incident-by-subject index visited to find one run's or one worker's
    /// incidents.
    pub incidents_visited: u64,
}

/// The scheduler's [`Work`], kept out of its `Debug` text: a cost, not state. A refused command
/// still costs a look-up, and must leave the state exactly as it was.
#[derive(Clone, Copy, Default)]
struct WorkCounter(Work);

impl std::fmt::Debug for WorkCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("..")
    }
}

impl std::ops::Deref for WorkCounter {
    type Target = Work;
    fn deref(&self) -> &Work {
        &self.0
    }
}

impl std::ops::DerefMut for WorkCounter {
    fn deref_mut(&mut self) -> &mut Work {
        &mut self.0
    }
}

impl Work {
    /// Every entry visited, of any kind.
    pub fn total(&self) -> u64 {
        self.timers_popped + self.groups_batched + self.runs_visited + self.incidents_visited
    }
}

/// The sans-IO scheduler. See the crate docs for how to drive it.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    now: Timestamp,
    rng: SplitMix64,
    // Boxed: B-tree nodes then hold pointers, not half-empty slots of a large struct, which
    // roughly halves the memory of an idle job (docs/performance.md).
    jobs: BTreeMap<JobId, Box<Job>>,
    runs: BTreeMap<RunId, Run>,
    /// The runs in `runs`, by job: adding a job and refusing a trigger look at that job's runs
    /// only, not at every run in memory.
    runs_by_job: BTreeSet<(JobId, RunId)>,
    /// Scheduled jobs by cursor.
    due_jobs: BTreeSet<(Timestamp, JobId)>,
    /// Runs by their next deadline: `until` of a backing-off run, the watchdog's next deadline
    /// of a running one (lease reclaim, timeout, kill, backstop, stuck).
    due_runs: BTreeSet<(Timestamp, RunId)>,
    /// Where each run sits in `due_runs`.
    run_due: BTreeMap<RunId, Timestamp>,
    /// Queued runs of external jobs, by kind, oldest first.
    queued: BTreeMap<Arc<str>, BTreeSet<(Timestamp, RunId)>>,
    /// Where each queued run sits in `queued`.
    run_queue: BTreeMap<RunId, (Arc<str>, Timestamp)>,
    /// The worker id of the in-process executor, owner of the leases it is granted.
    worker: WorkerId,
    /// Open incidents, by id.
    incidents: BTreeMap<u64, Incident>,
    /// The open incidents by subject (run, worker), so that opening one and resolving those of
    /// a run or a worker (on every run transition, every claim) look at that subject's few
    /// incidents rather than at all of them.
    incident_subjects: BTreeSet<IncidentSubject>,
    /// Consecutive empty claims per worker (idle claim loop detection).
    empty_claims: BTreeMap<WorkerId, u32>,
    /// Reclaims whose batch failed, by run: two failures escalate (SPEC W5).
    reclaim_failures: BTreeMap<RunId, u32>,
    /// What the inputs have cost, in index entries visited.
    work: WorkCounter,
    /// Completions refused for missing artifacts, audited once per attempt.
    refused_completions: BTreeSet<(RunId, Attempt)>,
    /// Checkpoint throttles of running attempts.
    throttles: BTreeMap<RunId, Throttle>,
    /// Set by `begin_shutdown`: nothing new fires or is claimed.
    shutting_down: bool,
    /// Since when, and how many times in a row, store writes have failed (none: they succeed).
    store_failing: Option<(Timestamp, u32)>,
    /// Own attempts a shutdown asked to stop (`stop_for_shutdown`): whatever they report but
    /// a success interrupts them for the next start, using no attempt (SPEC O1).
    stopped_for_shutdown: BTreeSet<(RunId, Attempt)>,
    /// Results waiting to be delivered to sinks (SPEC D1–D5).
    outbox: Outbox,
    /// The job of each delivery in the outbox (deliveries travel in their job's group).
    delivery_jobs: BTreeMap<DeliveryId, JobId>,
    meta: Meta,
    journal: Journal,
    effects: VecDeque<Effect>,
    /// The next hourly history sweep; `None` at the end of time.
    history_sweep_at: Option<Timestamp>,
    /// The latest slot fired by each deleted job, so a job re-added under its name never fires
    /// it again (SPEC S6). Expired by the history policy's age limit.
    tombstones: BTreeMap<JobId, Tombstone>,
    /// One shared copy of each distinct handler kind, zone name and short payload: a million
    /// jobs of a few kinds in a few zones should not hold a million copies of each.
    shared_text: BTreeSet<Arc<str>>,
}

impl Scheduler {
    /// An empty scheduler. `seed` drives backoff jitter; `now` is the current time.
    pub fn new(config: Config, seed: u64, now: Timestamp) -> Self {
        let config = Config {
            history: config.history.clamped(),
            misfire_grace_ms: config.misfire_grace_ms.min(limits::MISFIRE_GRACE_MAX_MS),
            backstop_factor: config.backstop_factor.max(1),
            ..config
        };
        Scheduler {
            config,
            now,
            rng: SplitMix64::new(seed),
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            runs_by_job: BTreeSet::new(),
            due_jobs: BTreeSet::new(),
            due_runs: BTreeSet::new(),
            run_due: BTreeMap::new(),
            queued: BTreeMap::new(),
            run_queue: BTreeMap::new(),
            worker: WorkerId::new("local").expect("a valid worker id"),
            incidents: BTreeMap::new(),
            incident_subjects: BTreeSet::new(),
            empty_claims: BTreeMap::new(),
            reclaim_failures: BTreeMap::new(),
            refused_completions: BTreeSet::new(),
            work: WorkCounter::default(),
            throttles: BTreeMap::new(),
            shutting_down: false,
            stopped_for_shutdown: BTreeSet::new(),
            store_failing: None,
            outbox: Outbox::new(config.outbox),
            delivery_jobs: BTreeMap::new(),
            meta: Meta {
                next_run_id: 1,
                next_audit_seq: 1,
                clock: now,
                epoch: 0,
                next_token: 1,
                next_incident: 1,
                next_delivery: 1,
            },
            journal: Journal::default(),
            effects: VecDeque::new(),
            history_sweep_at: now.checked_plus_ms(limits::HISTORY_SWEEP_INTERVAL_MS),
            tombstones: BTreeMap::new(),
            shared_text: BTreeSet::new(),
        }
    }

    /// Rebuilds a scheduler from what a store persisted (after a crash or a clean stop).
    ///
    /// Stored jobs are checked like new ones: a job whose definition no longer validates (a
    /// schedule that no longer parses, a policy an older version allowed) is disabled with the
    /// reason (SPEC S2), and a cursor at or before the job's last fired slot is moved past it.
    /// Runs found mid-attempt are recovered: cancelled if a cancel was requested, retried if
    /// the job resumes after crashes and attempts remain, otherwise ended `interrupted`. The
    /// clock resumes no earlier than the persisted high-water mark. Every such change is
    /// audited and persisted through the usual effects.
    pub fn restore(config: Config, seed: u64, now: Timestamp, snapshot: Snapshot) -> Self {
        let worker = WorkerId::new("local").expect("a valid worker id");
        Scheduler::restore_as(worker, config, seed, now, snapshot)
    }

    /// Like [`Scheduler::restore`], for an in-process executor named `worker` (see
    /// [`Scheduler::with_worker`]). The name decides which restored attempts were this
    /// executor's own, cut short by the restart and recovered at once, and which belong to
    /// external workers, whose leases stand until they expire. A daemon should therefore keep
    /// its name across restarts.
    pub fn restore_as(
        worker: WorkerId,
        config: Config,
        seed: u64,
        now: Timestamp,
        snapshot: Snapshot,
    ) -> Self {
        let Snapshot {
            jobs,
            runs,
            meta,
            tombstones,
            incidents,
            deliveries,
        } = snapshot;
        // Time never runs backwards, not even across a restart (SPEC S4).
        let now = now.max(meta.clock);
        let mut s = Scheduler::new(config, seed, now).with_worker(worker);
        s.meta = Meta {
            next_run_id: meta.next_run_id.max(1),
            next_audit_seq: meta.next_audit_seq.max(1),
            clock: now,
            epoch: meta.epoch + 1,
            next_token: meta.next_token.max(1),
            next_incident: meta.next_incident.max(1),
            next_delivery: meta.next_delivery.max(1),
        };
        s.delivery_jobs = deliveries
            .iter()
            .map(|d| (d.id, d.payload.job.clone()))
            .collect();
        s.outbox = Outbox::restore(s.config.outbox, deliveries, s.meta.next_delivery, now);
        s.journal.set_epoch(s.meta.epoch);
        s.tombstones = tombstones.into_iter().map(|t| (t.job.clone(), t)).collect();
        s.incidents = incidents
            .into_iter()
            .filter(|i| i.resolved_at.is_none())
            .map(|i| (i.id, i))
            .collect();
        s.incident_subjects = s.incidents.values().map(IncidentSubject::of).collect();
        for job in jobs {
            s.restore_job(job);
        }
        for run in runs {
            if run.state.is_terminal() {
                continue;
            }
            s.meta.next_run_id = s.meta.next_run_id.max(run.id.0 + 1);
            if let Some(job) = s.jobs.get_mut(&run.job) {
                job.active_runs += 1;
            }
            let id = run.id;
            s.runs_by_job.insert((run.job.clone(), id));
            s.runs.insert(id, run);
            match s.runs[&id].state {
                RunState::BackingOff { .. } | RunState::Queued { .. } => s.index_run(id),
                // An attempt handed out to an external worker outlives this process: its
                // lease stands, and the watchdog reclaims it only if it expires (SPEC L3).
                RunState::Running { .. } if s.held_elsewhere(id) => s.index_run(id),
                RunState::Starting { .. } | RunState::Running { .. } => {
                    let run = s.runs.get_mut(&id).expect("just inserted");
                    let t = run.recover_after_crash(now);
                    s.after_run_transition(id, t, Actor::Scheduler);
                }
                _ => unreachable!("terminal runs were skipped"),
            }
        }
        // A slot left waiting by a shutdown starts now.
        let waiting: Vec<JobId> = s
            .jobs
            .values()
            .filter(|j| !j.backlog.is_empty() && j.active_runs == 0)
            .map(|j| j.spec.id.clone())
            .collect();
        for id in waiting {
            s.start_from_backlog(now, &id);
        }
        s.journal.meta();
        s.pump_outbox();
        s
    }

    /// Brings one stored job back, checked like new input (see `restore`).
    fn restore_job(&mut self, mut job: Job) {
        job.active_runs = 0;
        self.share_text(&mut job.spec);
        let id = job.spec.id.clone();
        let old = job_state_name(&job.state);
        match validate_fields(&job.spec) {
            Err(e) => {
                let reason = format!("stored definition is no longer valid: {e}");
                job.state = JobState::Disabled { reason };
            }
            Ok(schedule) => {
                // Data from an older version or a hand-edited store: never re-fire a slot.
                let fired = |next: Timestamp| job.last_fired.is_some_and(|last| next <= last);
                let past_fired = || job.last_fired.and_then(|last| schedule.next_after(last));
                match job.state {
                    JobState::Scheduled { next } if fired(next) => {
                        job.state = match past_fired() {
                            Some(next) => JobState::Scheduled { next },
                            None => JobState::Disabled {
                                reason: format!(
                                    "stored cursor {next} is not after the last fired slot and \
                                     the schedule has no later slot"
                                ),
                            },
                        };
                    }
                    JobState::Paused { next: Some(next) } if fired(next) => {
                        job.state = JobState::Paused { next: past_fired() };
                    }
                    _ => {}
                }
            }
        }
        let new = job_state_name(&job.state);
        let changed = old != new;
        if let (true, JobState::Disabled { reason }) = (changed, &job.state) {
            let reason = reason.clone();
            self.audit_job(&id, Some(old), new, Actor::Scheduler, &reason);
            self.effects.push_back(Effect::Event(Event::JobDisabled {
                job: id.clone(),
                reason,
            }));
        }
        if let JobState::Scheduled { next } = job.state {
            self.due_jobs.insert((next, id.clone()));
        }
        self.jobs.insert(id.clone(), Box::new(job));
        self.journal.put_job(&id);
    }

    /// Names the in-process executor: the owner of the leases its attempts are granted
    /// ("local" by default). Processes sharing a store must use distinct names.
    pub fn with_worker(mut self, worker: WorkerId) -> Self {
        self.worker = worker;
        self
    }

    // ----- getters -----------------------------------------------------------------------

    /// The latest `now` seen (every input's `now` is clamped to at least this).
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A job by id.
    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id).map(|job| &**job)
    }

    /// All jobs, ordered by id.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().map(|job| &**job)
    }

    /// A run still in memory (active, or terminal and not yet acknowledged by the store).
    pub fn run(&self, id: RunId) -> Option<&Run> {
        self.runs.get(&id)
    }

    /// Runs in memory, ordered by id.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    /// Open incidents, by id.
    pub fn incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values()
    }

    /// The delivery outbox.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// True if no batch is in flight, nothing waits to be persisted and no effect waits to be
    /// polled.
    pub fn is_quiescent(&self) -> bool {
        self.journal.in_flight.is_none() && !self.journal.has_pending() && self.effects.is_empty()
    }

    // ----- commands ----------------------------------------------------------------------

    /// Registers a job. Its schedule is parsed and its first slot computed now: an invalid
    /// schedule, an unknown zone or a schedule that never fires is refused (SPEC S1).
    ///
    /// `Ok` means accepted. The job is durable once the batch that carries it is acknowledged
    /// ([`Scheduler::handle_persisted`]); if the process dies before that, the job is gone and
    /// the caller must add it again. Every command has the same contract.
    pub fn add_job(&mut self, now: Timestamp, mut spec: JobSpec) -> Result<(), Rejected> {
        let now = self.now.max(now);
        if self.jobs.contains_key(&spec.id) {
            return Err(Rejected::JobExists(spec.id));
        }
        let schedule = validate_fields(&spec)?;
        let next = first_slot(&schedule, &spec, now, self.config.misfire_grace_ms)?;
        let id = spec.id.clone();
        // A job deleted under this name, or runs of it still finishing, fired slots that must
        // not fire again (SPEC S6). Leftover runs settle against this job, so they are counted.
        let leftovers: Vec<&Run> = self
            .active_runs_of(&id)
            .iter()
            .filter_map(|r| self.runs.get(r))
            .collect();
        let active_runs = leftovers.len() as u32;
        let tombstone = self.tombstones.get(&id).map(|t| t.last_fired);
        let last_fired = leftovers
            .into_iter()
            .filter_map(|r| r.slot())
            .chain(tombstone)
            .max();
        if let Some(last) = last_fired.filter(|last| next <= *last) {
            return Err(Rejected::AlreadyFired {
                job: id,
                slot: next,
                last,
            });
        }
        self.clamp(now);
        self.share_text(&mut spec);
        if self.tombstones.remove(&id).is_some() {
            self.journal.tombstone(&id, JobWrite::Delete);
        }
        let job = Job {
            spec,
            state: JobState::Scheduled { next },
            backlog: Backlog::default(),
            last_fired,
            active_runs,
            delete_when_idle: false,
            last_run: None,
            failures_in_a_row: 0,
        };
        self.due_jobs.insert((next, id.clone()));
        self.jobs.insert(id.clone(), Box::new(job));
        self.mark_job(&id);
        self.audit_job(
            &id,
            None,
            StateName::Scheduled,
            Actor::Operator,
            &format!("added; first slot {next}"),
        );
        Ok(())
    }

    /// Replaces a job's definition. A changed schedule moves the cursor to its first slot (the
    /// first after `now`, or a one-shot's instant even if it has passed) and re-arms a disabled
    /// job; an unchanged schedule keeps the cursor and a disabled job stays disabled. A slot
    /// that already fired is refused ([`Rejected::AlreadyFired`]). Runs already under way keep
    /// the terms they started with.
    pub fn update_job(&mut self, now: Timestamp, mut spec: JobSpec) -> Result<(), Rejected> {
        let now = self.now.max(now);
        let Some(job) = self.jobs.get(&spec.id) else {
            return Err(Rejected::UnknownJob(spec.id));
        };
        let schedule = validate_fields(&spec)?;
        let first = first_slot(&schedule, &spec, now, self.config.misfire_grace_ms)?;
        let schedule_changed = job.spec.schedule != spec.schedule;
        if let Some(last) = job
            .last_fired
            .filter(|last| schedule_changed && first <= *last)
        {
            // SPEC S6: a slot that fired never fires again, even through an update.
            return Err(Rejected::AlreadyFired {
                job: spec.id,
                slot: first,
                last,
            });
        }
        self.clamp(now);
        self.share_text(&mut spec);
        let job = &self.jobs[&spec.id];
        let id = spec.id.clone();
        let old = job_state_name(&job.state);
        let state = match (&job.state, schedule_changed) {
            (JobState::Scheduled { next }, false) => JobState::Scheduled { next: *next },
            (JobState::Paused { next }, false) => JobState::Paused { next: *next },
            // A disabled job stays disabled unless its schedule changes: only a new schedule
            // re-arms it (a finished one-shot keeps its verdict when its payload is edited).
            (JobState::Disabled { reason }, false) => JobState::Disabled {
                reason: reason.clone(),
            },
            (JobState::Paused { .. }, true) => JobState::Paused { next: Some(first) },
            (_, true) => JobState::Scheduled { next: first },
        };
        self.unindex_job(&id);
        let job = self.jobs.get_mut(&id).expect("checked above");
        job.spec = spec;
        job.state = state;
        if schedule_changed {
            // Slots waiting under the old schedule are not the new schedule's to run.
            job.delete_when_idle = false;
            job.backlog.clear();
        }
        let new = job_state_name(&job.state);
        self.index_job(&id);
        self.mark_job(&id);
        self.audit_job(&id, Some(old), new, Actor::Operator, "definition updated");
        Ok(())
    }

    /// Makes the job be as `spec` says, the way a configuration file is applied at every
    /// start: adds it if it is not there, updates it if its definition differs, and leaves it
    /// alone if it is the same. Says which ([`Ensured`]).
    ///
    /// A one-shot (`ScheduleSpec::Once`) is done once it has fired: ensuring it again leaves it
    /// alone and returns [`Ensured::Done`], whatever its instant now says. So an application
    /// that computes "in five seconds" at each start runs the one-shot once in total, not once
    /// per start. "Fired" means a slot fired under this name, while the job or its tombstone is
    /// kept (a deleted job's tombstone lasts as long as the history policy keeps history). To
    /// re-arm a fired one-shot on purpose, use [`Scheduler::update_job`].
    ///
    /// Refused as `add_job` and `update_job` refuse.
    pub fn ensure_job(&mut self, now: Timestamp, spec: JobSpec) -> Result<Ensured, Rejected> {
        let one_shot = matches!(spec.schedule, ScheduleSpec::Once { .. });
        let fired = match self.jobs.get(&spec.id) {
            Some(job) if job.spec == spec => return Ok(Ensured::Unchanged),
            Some(job) => job
                .last_fired
                .filter(|_| matches!(job.spec.schedule, ScheduleSpec::Once { .. })),
            None => self.tombstones.get(&spec.id).map(|t| t.last_fired),
        };
        if let Some(last) = fired.filter(|_| one_shot) {
            return Ok(Ensured::Done { last });
        }
        let result = if self.jobs.contains_key(&spec.id) {
            self.update_job(now, spec).map(|()| Ensured::Updated)
        } else {
            self.add_job(now, spec).map(|()| Ensured::Added)
        };
        match result {
            Err(Rejected::AlreadyFired { last, .. }) if one_shot => Ok(Ensured::Done { last }),
            result => result,
        }
    }

    /// Removes a job definition. Runs under way finish normally; its history stays, subject to
    /// the history policy.
    pub fn remove_job(&mut self, now: Timestamp, id: &JobId) -> Result<(), Rejected> {
        if !self.jobs.contains_key(id) {
            return Err(Rejected::UnknownJob(id.clone()));
        }
        self.clamp(now);
        self.delete_job(id, Actor::Operator, "removed");
        Ok(())
    }

    /// Pauses a job: it stops firing; runs under way continue.
    pub fn pause_job(&mut self, now: Timestamp, id: &JobId) -> Result<(), Rejected> {
        let Some(job) = self.jobs.get(id) else {
            return Err(Rejected::UnknownJob(id.clone()));
        };
        let next = match &job.state {
            JobState::Scheduled { next } => *next,
            JobState::Paused { .. } => return Err(Rejected::AlreadyPaused(id.clone())),
            JobState::Disabled { reason } => {
                return Err(Rejected::JobDisabled {
                    job: id.clone(),
                    reason: reason.clone(),
                })
            }
        };
        self.clamp(now);
        self.unindex_job(id);
        self.jobs.get_mut(id).expect("checked").state = JobState::Paused { next: Some(next) };
        self.mark_job(id);
        self.audit_job(
            id,
            Some(StateName::Scheduled),
            StateName::Paused,
            Actor::Operator,
            "paused",
        );
        Ok(())
    }

    /// Resumes a paused job. Its cursor is kept: slots that passed while it was paused are
    /// misfires, and its misfire policy decides (the default fires once now).
    pub fn resume_job(&mut self, now: Timestamp, id: &JobId) -> Result<(), Rejected> {
        let Some(job) = self.jobs.get(id) else {
            return Err(Rejected::UnknownJob(id.clone()));
        };
        let JobState::Paused { next } = job.state else {
            return Err(Rejected::NotPaused(id.clone()));
        };
        self.clamp(now);
        let job = self.jobs.get_mut(id).expect("checked above");
        job.state = match next {
            Some(next) => JobState::Scheduled { next },
            None => JobState::Disabled {
                reason: "schedule has no slot left".into(),
            },
        };
        let new = job_state_name(&job.state);
        self.index_job(id);
        self.mark_job(id);
        self.audit_job(id, Some(StateName::Paused), new, Actor::Operator, "resumed");
        let now = self.now;
        self.start_from_backlog(now, id);
        Ok(())
    }

    /// Starts a run now, outside the schedule (the job's cursor does not move). Refused if a
    /// run is active and the job's overlap policy is not `allow`. When it ends it settles like
    /// any run: a one-shot job is then finished (SPEC R5).
    pub fn trigger(&mut self, now: Timestamp, id: &JobId) -> Result<RunId, Rejected> {
        let Some(job) = self.jobs.get(id) else {
            return Err(Rejected::UnknownJob(id.clone()));
        };
        if job.active_runs > 0 && job.spec.overlap != OverlapPolicy::Allow {
            let run = *self
                .active_runs_of(id)
                .first()
                .expect("active_runs counts runs in memory");
            return Err(Rejected::RunActive {
                job: id.clone(),
                run,
            });
        }
        if job.active_runs >= limits::ACTIVE_RUNS_PER_JOB_MAX {
            return Err(Rejected::TooManyActiveRuns {
                job: id.clone(),
                active: job.active_runs,
            });
        }
        let now = self.clamp(now);
        Ok(self.create_run(now, id, Trigger::Manual, Actor::Operator))
    }

    /// Cancels a run. A waiting run ends `cancelled` at once; a running attempt is asked to
    /// stop (`Effect::CancelAttempt`) and the run ends `cancelled` unless it succeeds first.
    pub fn cancel_run(&mut self, now: Timestamp, id: RunId) -> Result<(), Rejected> {
        if self.runs.get(&id).is_none_or(|r| r.state.is_terminal()) {
            return Err(Rejected::UnknownRun(id));
        }
        let now = self.clamp(now);
        let run = self.runs.get_mut(&id).expect("checked above");
        match run.cancel(now, "cancelled by operator") {
            Some(t) => self.after_run_transition(id, t, Actor::Operator),
            None => {
                let attempt = run.attempt;
                let job = run.job.clone();
                self.journal.put_run(&job, id);
                self.audit_run(
                    id,
                    Some(StateName::Running),
                    StateName::Running,
                    Actor::Operator,
                    "cancel requested; the attempt is asked to stop",
                );
                self.effects.push_back(Effect::CancelAttempt {
                    run: id,
                    attempt,
                    reason: StopReason::Cancel,
                });
            }
        }
        Ok(())
    }

    // ----- inputs from the world --------------------------------------------------------

    /// Time has reached `now`: fire due slots, start due retries, run named deadlines.
    /// Afterwards, `poll_timeout()` is later than `now` (or `None`).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let now = self.clamp(now);
        loop {
            let run = self.due_runs.first().filter(|(at, _)| *at <= now).copied();
            // Runs before jobs at the same instant: an overdue retry starts before new
            // firings. Nothing new fires while shutting down.
            let job = self
                .due_jobs
                .first()
                .filter(|(at, _)| *at <= now && !self.shutting_down)
                .cloned();
            match (run, job) {
                (Some((at, id)), job) if job.as_ref().is_none_or(|(j, _)| at <= *j) => {
                    self.work.timers_popped += 1;
                    self.unindex_run(id);
                    self.run_due(now, id);
                }
                (_, Some((at, id))) => {
                    self.work.timers_popped += 1;
                    self.due_jobs.remove(&(at, id.clone()));
                    self.fire(now, &id);
                }
                (_, None) => break,
            }
        }
        if !self.shutting_down {
            self.outbox.handle_timeout(now);
        }
        self.pump_outbox();
        if self.journal.retry_at.is_some_and(|at| at <= now) {
            self.journal.retry_at = None;
        }
        if self.history_sweep_at.is_some_and(|at| at <= now) {
            self.history_sweep_at = now.checked_plus_ms(limits::HISTORY_SWEEP_INTERVAL_MS);
            self.expire_tombstones(now);
            let finished_before = Timestamp(
                now.as_millis()
                    .saturating_sub(self.config.history.age_max_ms as i64),
            );
            let prune = Record::PruneHistory {
                job: None,
                keep_last: self.config.history.runs_max,
                finished_before,
            };
            self.journal.prune(None, prune);
        }
    }

    /// The store made batch `id` durable: release the effects that waited for it.
    /// Acknowledgements for unknown or already failed batches are ignored.
    pub fn handle_persisted(&mut self, now: Timestamp, id: BatchId) {
        let Some(batch) = self.journal.acknowledge(id) else {
            return;
        };
        let now = self.clamp(now);
        // Announced after what the write released.
        let recovered = self.store_failing.take();
        // Terminal runs whose final record is now durable leave memory: they are history.
        for (job, group) in &batch.groups {
            for run_id in &group.runs {
                if self.journal.run_pending(job, *run_id) {
                    continue; // a newer write of the run is still to come
                }
                self.reclaim_failures.remove(run_id);
                if self.runs.get(run_id).is_some_and(|r| r.state.is_terminal()) {
                    self.runs.remove(run_id);
                    self.runs_by_job.remove(&(job.clone(), *run_id));
                }
            }
            for (run, seq) in &group.checkpoints {
                let saved = self
                    .throttles
                    .get_mut(run)
                    .is_some_and(|t| t.acknowledged(*seq, now));
                if saved {
                    self.effects
                        .push_back(Effect::Event(Event::CheckpointSaved {
                            run: *run,
                            seq: *seq,
                        }));
                }
            }
        }
        for (_, group) in &batch.groups {
            let durable: Vec<DeliveryId> = group
                .deliveries
                .iter()
                .filter(|(_, write)| **write == JobWrite::Put)
                .map(|(id, _)| *id)
                .collect();
            self.outbox.mark_durable(&durable);
            for (id, write) in &group.deliveries {
                if *write == JobWrite::Delete {
                    self.delivery_jobs.remove(id);
                }
            }
            self.effects
                .extend(group.sends.iter().cloned().map(Effect::Deliver));
            self.effects.extend(
                group
                    .events
                    .iter()
                    .cloned()
                    .map(|e| Effect::Event(Event::Delivery(e))),
            );
        }
        // Deliveries that just became durable may be due already.
        if !self.shutting_down {
            self.outbox.handle_timeout(now);
        }
        self.pump_outbox();
        let gates = batch.groups.into_iter().flat_map(|(_, group)| group.gates);
        let mut starts = Vec::new();
        for (run_id, attempt) in gates {
            // A run cancelled (or otherwise moved on) while its record was in flight is not
            // started.
            let Some(run) = self.runs.get(&run_id) else {
                continue;
            };
            // Nothing new starts once shutdown began; the attempt is recovered at the next
            // start.
            if run.state != (RunState::Starting { attempt }) || self.shutting_down {
                continue;
            }
            let (ttl, factor) = (self.config.lease.ttl_ms, self.config.backstop_factor);
            let run = self.runs.get_mut(&run_id).expect("checked above");
            let t = run.mark_running(now, ttl, factor);
            let lease = run.lease.clone().expect("a starting run holds a lease");
            let start = AttemptStart {
                run: run_id,
                job: run.job.clone(),
                kind: run.kind.clone(),
                payload: run.payload.clone(),
                attempt,
                idempotency_key: run.idempotency_key(),
                trigger: run.trigger,
                lease,
                checkpoint: run.checkpoint.clone(),
            };
            self.resolve_incidents_of_run(run_id, "the run's next attempt is running");
            self.after_run_transition(run_id, t, Actor::Scheduler);
            starts.push(start);
        }
        // Hand out in grant order, so tokens handed out together rise with the hand-out. A
        // grant is announced only now that it is durable (a token announced earlier could be
        // granted again after a crash).
        starts.sort_by_key(|start| start.lease.token);
        for start in starts {
            let granted = Event::LeaseGranted {
                run: start.run,
                owner: start.lease.owner.clone(),
                token: start.lease.token,
            };
            self.effects.push_back(Effect::StartAttempt(start));
            self.effects.push_back(Effect::Event(granted));
        }
        if let Some((failing_since, failures)) = recovered {
            self.effects.push_back(Effect::Event(Event::StoreRecovered {
                failing_since,
                failures,
            }));
        }
    }

    /// The store failed to write batch `id`. Its records are re-sent (rebuilt from current
    /// state) after a delay; the effects it gated stay held until then.
    pub fn handle_persist_failed(&mut self, now: Timestamp, id: BatchId, error: &str) {
        if self.journal.in_flight.as_ref().map(|b| b.id) != Some(id) {
            return;
        }
        let now = self.clamp(now);
        let Some(failed) = self.journal.fail(id, now) else {
            return;
        };
        let error = crate::run::truncate(error);
        let (since, failures) = self.store_failing.unwrap_or((now, 0));
        self.store_failing = Some((since, failures + 1));
        self.effects.push_back(Effect::Event(Event::PersistFailed {
            batch: id,
            error: error.clone(),
            retry_at: failed.retry_at,
        }));
        // SPEC C1: a failed checkpoint save is reported, does not close the window, and does
        // not throttle away the save kept behind it: that one is written now.
        for (run, seq) in failed.checkpoints {
            let Some(throttle) = self.throttles.get_mut(&run) else {
                continue;
            };
            if !throttle.failed(seq) {
                continue;
            }
            let pending = throttle.pending.take();
            self.effects
                .push_back(Effect::Event(Event::CheckpointFailed {
                    run,
                    seq,
                    error: error.clone(),
                }));
            if let Some(data) = pending {
                self.write_checkpoint(run, data);
            }
        }
        self.note_failed_reclaims(now, &failed.runs);
    }

    // ----- outputs ----------------------------------------------------------------------

    /// The next output, or `None` when there is nothing to do until an input arrives.
    #[must_use = "an effect polled is removed from the queue: carry it out"]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        if let Some(effect) = self.effects.pop_front() {
            return Some(effect);
        }
        if !self.journal.can_emit() {
            return None;
        }
        Some(Effect::Persist(self.build_batch()))
    }

    /// A mark for every change made so far; [`Scheduler::is_durable`] says when the store has
    /// acknowledged all of them. A driver answers a command once its mark is durable. Marks
    /// only rise, so a driver can keep its waiters in the order it took their marks and wake
    /// them from the front while their mark is at most [`Scheduler::durable_mark`].
    pub fn write_mark(&self) -> u64 {
        self.journal.mark()
    }

    /// The latest write mark whose changes are all acknowledged by the store, in O(log n) of
    /// what is pending. Exact whatever the backlog: a batch holds at most
    /// [`limits::BATCH_RECORDS_MAX`] records, so a change may wait several batches.
    pub fn durable_mark(&self) -> u64 {
        self.journal.durable_mark()
    }

    /// True once every change made up to `mark` ([`Scheduler::write_mark`]) is acknowledged
    /// by the store: `mark <= durable_mark()`.
    pub fn is_durable(&self, mark: u64) -> bool {
        mark <= self.journal.durable_mark()
    }

    /// True while some change is not yet acknowledged by the store: written to a batch in
    /// flight, or waiting for the next one.
    pub fn has_unwritten_changes(&self) -> bool {
        self.journal.in_flight.is_some() || self.journal.has_pending()
    }

    /// When to call `handle_timeout` next, or `None` if nothing is scheduled.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let runs = self.due_runs.first().map(|(at, _)| *at);
        let jobs = self
            .due_jobs
            .first()
            .filter(|_| !self.shutting_down)
            .map(|(at, _)| *at);
        let deliveries = self.outbox.poll_timeout().filter(|_| !self.shutting_down);
        [
            runs,
            jobs,
            deliveries,
            self.journal.retry_at,
            self.history_sweep_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The runs of `job` in memory that are not terminal, in O(log runs + the job's runs).
    fn active_runs_of(&mut self, job: &JobId) -> Vec<RunId> {
        let first = (job.clone(), RunId(0));
        let mut visited = 0;
        let runs = self
            .runs_by_job
            .range(first..)
            .take_while(|(j, _)| j == job)
            .inspect(|_| visited += 1)
            .filter(|(_, id)| self.runs.get(id).is_some_and(|r| !r.state.is_terminal()))
            .map(|(_, id)| *id)
            .collect();
        self.work.runs_visited += visited;
        runs
    }

    /// What the scheduler's inputs have cost so far, counted in index entries visited.
    pub fn work(&self) -> Work {
        self.work.0
    }

    // ----- invariants -------------------------------------------------------------------

    /// Checks whole-state invariants and panics with a description if one is broken. Cheap
    /// enough for a simulator to call after every step; not for production hot paths (it is
    /// O(jobs + runs)).
    pub fn check_invariants(&self) {
        let mut expected_runs = BTreeSet::new();
        let mut expected_queue: BTreeMap<&str, BTreeSet<(Timestamp, RunId)>> = BTreeMap::new();
        let mut active: BTreeMap<&JobId, u32> = BTreeMap::new();
        let mut slots = BTreeSet::new();
        let mut tokens = BTreeSet::new();
        assert_eq!(
            self.runs_by_job.len(),
            self.runs.len(),
            "runs_by_job and runs disagree"
        );
        for (id, run) in &self.runs {
            assert_eq!(*id, run.id, "run stored under the wrong id");
            assert!(
                self.runs_by_job.contains(&(run.job.clone(), *id)),
                "run {id} missing from runs_by_job"
            );
            assert!(
                run.id.0 < self.meta.next_run_id,
                "{id} not below next_run_id"
            );
            match run.state {
                RunState::BackingOff { until } if !self.shutting_down => {
                    expected_runs.insert((until, run.id));
                }
                RunState::Queued { since } => {
                    assert!(run.external, "{id} queued but not external");
                    expected_queue
                        .entry(&run.kind)
                        .or_default()
                        .insert((since, run.id));
                }
                RunState::Running { .. } => {
                    if let Some(at) = crate::watchdog::next_deadline(run, &self.config) {
                        expected_runs.insert((at, run.id));
                    }
                }
                _ => {}
            }
            // L1: exactly the attempts in progress hold a lease; at most one live lease per run,
            // and no two runs share a token.
            let in_progress = matches!(
                run.state,
                RunState::Starting { .. } | RunState::Running { .. }
            );
            assert_eq!(
                run.lease.is_some(),
                in_progress,
                "{id} is {:?} with lease {:?}",
                run.state,
                run.lease
            );
            if let Some(lease) = &run.lease {
                assert!(
                    lease.token.0 < self.meta.next_token,
                    "{id} holds {} not below next_token {}",
                    lease.token,
                    self.meta.next_token
                );
                assert!(
                    tokens.insert(lease.token),
                    "{} held by two runs",
                    lease.token
                );
            }
            if let Some(killed) = run.killed {
                assert!(
                    !(in_progress && run.attempt == killed),
                    "{id}: killed attempt {killed} is in progress again"
                );
            }
            if !run.state.is_terminal() {
                *active.entry(&run.job).or_default() += 1;
                assert!(
                    run.attempt.0 >= 1 || run.external,
                    "{id} active with attempt 0"
                );
                assert!(
                    run.attempts_counted() <= run.retry.attempts_max,
                    "{id} started {} counted attempts, more than attempts_max {}",
                    run.attempts_counted(),
                    run.retry.attempts_max
                );
                assert!(
                    run.lost < run.retry.lost_attempts_max,
                    "{id} lost {} attempts but is not poison",
                    run.lost
                );
            } else {
                assert!(
                    run.finished_at.is_some(),
                    "{id} terminal without finished_at"
                );
            }
            if let Some(slot) = run.slot() {
                assert!(
                    slots.insert((run.job.clone(), slot)),
                    "two runs for slot {slot} of job {}",
                    run.job
                );
            }
        }
        let mut expected_jobs = BTreeSet::new();
        for (id, job) in &self.jobs {
            assert_eq!(id, &job.spec.id, "job stored under the wrong id");
            if let JobState::Scheduled { next } = job.state {
                expected_jobs.insert((next, id.clone()));
                if let Some(last) = job.last_fired {
                    assert!(
                        next > last,
                        "job {id}: cursor {next} not after last fired {last}"
                    );
                }
            }
            let counted = active.get(id).copied().unwrap_or(0);
            assert_eq!(
                job.active_runs, counted,
                "job {id}: active_runs {} but {counted} active runs",
                job.active_runs
            );
            assert!(job.backlog.len() <= limits::BACKLOG_MAX);
            assert!(
                job.backlog.is_empty()
                    || job.active_runs > 0
                    || self.shutting_down
                    || matches!(job.state, JobState::Paused { .. }),
                "job {id} has a backlog but no active run to drain it"
            );
        }
        assert_eq!(
            self.due_jobs, expected_jobs,
            "the job due index disagrees with job states"
        );
        assert_eq!(
            self.due_runs, expected_runs,
            "the run due index disagrees with run states"
        );
        let queue: BTreeMap<&str, BTreeSet<(Timestamp, RunId)>> = self
            .queued
            .iter()
            .filter(|(_, runs)| !runs.is_empty())
            .map(|(kind, runs)| (&**kind, runs.clone()))
            .collect();
        assert_eq!(
            queue, expected_queue,
            "the claim queue disagrees with run states"
        );
        assert!(self.incidents.len() <= limits::INCIDENTS_OPEN_MAX);
        let subjects: BTreeSet<IncidentSubject> =
            self.incidents.values().map(IncidentSubject::of).collect();
        assert_eq!(
            subjects, self.incident_subjects,
            "incident_subjects disagrees with the open incidents"
        );
        if let Some(batch) = &self.journal.in_flight {
            for (run, attempt) in batch.groups.iter().flat_map(|(_, g)| &g.gates) {
                if let Some(r) = self.runs.get(run) {
                    assert!(
                        !matches!(r.state, RunState::Running { attempt: a, .. } if a == *attempt),
                        "{run} attempt {attempt} running before its batch was acknowledged"
                    );
                }
            }
        }
    }

    // ----- helpers ----------------------------------------------------------------------

    /// Points the spec's kind and zone at the shared copy of that text.
    fn share_text(&mut self, spec: &mut JobSpec) {
        let mut share = |text: &mut Arc<str>| match self.shared_text.get(text) {
            Some(shared) => *text = Arc::clone(shared),
            None => {
                self.shared_text.insert(Arc::clone(text));
            }
        };
        share(&mut spec.kind);
        if let ScheduleSpec::Cron { zone, .. } = &mut spec.schedule {
            share(zone);
        }
        // Most jobs have no payload; even an empty `Arc<str>` is an allocation, so the empty
        // one (and any other short, common one) is shared too.
        if spec.payload.len() <= limits::SHARED_PAYLOAD_MAX_BYTES {
            share(&mut spec.payload);
        }
    }

    fn clamp(&mut self, now: Timestamp) -> Timestamp {
        self.now = self.now.max(now);
        self.now
    }

    /// A `Scheduled` job's cursor came due.
    fn fire(&mut self, now: Timestamp, id: &JobId) {
        let grace = self.config.misfire_grace_ms;
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let JobState::Scheduled { next: cursor } = job.state else {
            unreachable!("only scheduled jobs are in the due index");
        };
        // The spec was validated when the job was added or restored.
        let schedule = Schedule::parse_trusted(&job.spec.schedule)
            .expect("a scheduled job's schedule was validated");
        let due = schedule.resolve_due(cursor, now, job.spec.misfire, grace);
        // SPEC S2: the next slot is decided (and persisted with the run) before any run starts.
        // A cursor that does not move past what fired would fire forever in this one tick; no
        // valid schedule does that, but a broken one must disable its job, not hang the loop.
        let fired_up_to = due.fire.last().copied().unwrap_or(cursor).max(cursor);
        job.state = match due.next {
            Some(next) if next > fired_up_to => JobState::Scheduled { next },
            Some(stuck) => JobState::Disabled {
                reason: format!("schedule did not advance: next slot {stuck} after {cursor}"),
            },
            None => JobState::Disabled {
                reason: if job.is_one_shot() && due.fire.is_empty() {
                    "one-shot slot was missed and dropped by the misfire policy".into()
                } else if job.is_one_shot() {
                    "one-shot job has fired".into()
                } else {
                    format!("schedule has no slot after {cursor}")
                },
            },
        };
        if let Some(last) = due.fire.last() {
            job.last_fired = Some(*last);
        }
        let policy = job.spec.misfire;
        let catching_up = matches!(policy, MisfirePolicy::CatchUp { .. }) && due.misfired;
        self.index_job(id);
        self.mark_job(id);
        if let JobState::Disabled { reason } = &self.jobs[id].state {
            let reason = reason.clone();
            self.audit_job(
                id,
                Some(StateName::Scheduled),
                StateName::Disabled,
                Actor::Scheduler,
                &reason,
            );
            // A one-shot that fired is only finished when its run settles; the event comes then,
            // with the final verdict (JobDisabled or JobDeleted).
            let fired_one_shot = self.jobs[id].is_one_shot() && !due.fire.is_empty();
            if !fired_one_shot {
                self.effects.push_back(Effect::Event(Event::JobDisabled {
                    job: id.clone(),
                    reason,
                }));
            }
        }
        if due.dropped.counted > 0 {
            let reason = format!(
                "misfire policy {policy} dropped {} missed slot(s)",
                due.dropped
            );
            let dropped = due.dropped;
            self.note_dropped(id, dropped.counted.into(), dropped.at_least, reason);
        }
        for slot in due.fire {
            self.admit(now, id, slot, catching_up);
        }
    }

    /// A slot fires: start a run, buffer it, or drop it, by the overlap policy (SPEC S5). The
    /// check and the creation happen in this one transition.
    fn admit(&mut self, now: Timestamp, id: &JobId, slot: Timestamp, catching_up: bool) {
        let job = self
            .jobs
            .get_mut(id)
            .expect("admit is called for a known job");
        let free = job.active_runs == 0
            || (job.spec.overlap == OverlapPolicy::Allow
                && job.active_runs < limits::ACTIVE_RUNS_PER_JOB_MAX);
        if free {
            self.create_run(now, id, Trigger::Scheduled { slot }, Actor::Scheduler);
            return;
        }
        // Slots a catch-up produced wait their turn whatever the overlap policy: dropping them
        // would defeat the catch-up. Live slots follow the overlap policy.
        let capacity = match (catching_up, job.spec.overlap) {
            (true, _) => limits::BACKLOG_MAX,
            (false, OverlapPolicy::BufferOne) => 1,
            (false, _) => 0,
        };
        if job.backlog.len() < capacity {
            job.backlog.push(slot);
            self.mark_job(id);
            return;
        }
        let reason = if job.spec.overlap == OverlapPolicy::Allow {
            format!(
                "slot {slot} dropped: {} runs active, the limit",
                job.active_runs
            )
        } else {
            format!(
                "overlap policy {}: slot {slot} dropped, a run is active",
                job.spec.overlap
            )
        };
        self.note_dropped(id, 1, false, reason);
    }

    fn create_run(&mut self, now: Timestamp, id: &JobId, trigger: Trigger, actor: Actor) -> RunId {
        let job = self
            .jobs
            .get_mut(id)
            .expect("create_run is called for a known job");
        let run_id = RunId(self.meta.next_run_id);
        self.meta.next_run_id += 1;
        self.journal.meta();
        job.active_runs += 1;
        let terms = RunTerms {
            retry: job.spec.retry.clone(),
            resume_after_crash: job.spec.resume_after_crash,
            kind: job.spec.kind.clone(),
            payload: job.spec.payload.clone(),
            of_one_shot: match job.spec.schedule {
                ScheduleSpec::Once { at } => Some(at),
                _ => None,
            },
            external: job.spec.external,
            timeout_ms: job.spec.timeout_ms,
            required_artifacts: job.spec.required_artifacts.clone(),
            sinks: job.spec.sinks.clone(),
        };
        let run = Run::new(run_id, id.clone(), trigger, now, terms);
        let reason = match trigger {
            Trigger::Scheduled { slot } => format!("slot {slot} fired"),
            Trigger::Manual => "triggered by operator".into(),
        };
        let first = run.state.name();
        self.mark_job(id);
        self.runs_by_job.insert((id.clone(), run_id));
        self.runs.insert(run_id, run);
        self.audit_run(run_id, None, first, actor, &reason);
        self.begin_attempt(run_id);
        run_id
    }

    /// A `BackingOff` run's `until` came due.
    fn start_next_attempt(&mut self, id: RunId) {
        let now = self.now;
        let run = self.runs.get_mut(&id).expect("due runs are in memory");
        let t = run.begin_next_attempt(now);
        self.after_run_transition(id, t, Actor::Scheduler);
        self.begin_attempt(id);
    }

    /// A run that just entered `Starting` (in-process) gets its lease and waits for the batch
    /// recording both (persist before act); one that entered `Queued` waits for a worker.
    fn begin_attempt(&mut self, id: RunId) {
        let run = &self.runs[&id];
        let job = run.job.clone();
        match run.state {
            RunState::Starting { attempt } => {
                let owner = self.worker.clone();
                let lease = self.new_lease(owner);
                let run = self.runs.get_mut(&id).expect("checked above");
                run.grant(lease);
                self.journal.gate(&job, id, attempt);
            }
            RunState::Queued { .. } => {
                self.journal.put_run(&job, id);
                self.index_run(id);
            }
            _ => {}
        }
    }

    /// A run ended: its result goes to each of its sinks through the outbox (SPEC D1). A job
    /// retry creates a new run and so new deliveries; a delivery retry never re-runs a job (D2).
    fn enqueue_deliveries(&mut self, id: RunId) {
        let run = &self.runs[&id];
        if run.sinks.is_empty() {
            return;
        }
        // The job's current wish; a run of a removed job is delivered as it always was.
        let notify_on = self
            .jobs
            .get(&run.job)
            .map_or(NotifyOn::Always, |job| job.spec.notify_on);
        if !notify_on.delivers(run.state.name()) {
            return;
        }
        let payload = DeliveryPayload {
            run: run.id,
            job: run.job.clone(),
            state: run.state.name(),
            summary: run.summary.clone(),
            error: run.last_error.clone(),
            finished_at: run.finished_at.unwrap_or(self.now),
        };
        let sinks = run.sinks.clone();
        self.outbox.enqueue(self.now, &sinks, &payload);
        self.pump_outbox();
    }

    /// Moves what the outbox produced into the journal, each in the group of the job whose
    /// run it reports: writes, sends (released when their attempt is durable) and end-of-delivery
    /// events (released when the end is durable).
    fn pump_outbox(&mut self) {
        let (puts, deletes) = self.outbox.take_writes();
        for delivery in puts {
            let job = delivery.payload.job.clone();
            self.delivery_jobs.insert(delivery.id, job.clone());
            self.journal.delivery(&job, delivery.id, JobWrite::Put);
        }
        for id in deletes {
            if let Some(job) = self.delivery_jobs.get(&id).cloned() {
                self.journal.delivery(&job, id, JobWrite::Delete);
            }
        }
        while let Some(send) = self.outbox.poll_send() {
            let job = send.payload.job.clone();
            self.journal.send(&job, send);
        }
        while let Some(event) = self.outbox.poll_event() {
            let held = match &event {
                OutboxEvent::Finished { id, .. } | OutboxEvent::Dropped { id: Some(id), .. } => {
                    self.delivery_jobs.get(id).cloned()
                }
                _ => None,
            };
            match held {
                Some(job) => self.journal.held_event(&job, event),
                None => self
                    .effects
                    .push_back(Effect::Event(Event::Delivery(event))),
            }
        }
        // The delivery id counter rides in `Meta`; write it only when it moved, or every
        // acknowledgement would call for another batch.
        if self.outbox.next_id() != self.meta.next_delivery {
            self.meta.next_delivery = self.outbox.next_id();
            self.journal.meta();
        }
    }

    /// True if `run`'s lease is held by a worker other than this process's executor.
    fn held_elsewhere(&self, run: RunId) -> bool {
        self.runs[&run]
            .lease
            .as_ref()
            .is_some_and(|lease| lease.owner != self.worker)
    }

    /// A new lease for `owner`, with the next fencing token (persisted with the batch; announced
    /// only when the attempt is handed out).
    fn new_lease(&mut self, owner: WorkerId) -> Lease {
        let token = FencingToken(self.meta.next_token);
        self.meta.next_token += 1;
        self.journal.meta();
        Lease {
            owner,
            token,
            renewed_at: self.now,
            expires_at: self.now.plus_ms(self.config.lease.ttl_ms),
        }
    }

    /// Bookkeeping after any run transition: persist, audit, index, and settle if terminal.
    fn after_run_transition(&mut self, id: RunId, t: Transition, actor: Actor) {
        let job = self.runs[&id].job.clone();
        self.journal.put_run(&job, id);
        self.audit_run(id, Some(t.old), t.new, actor, &t.reason);
        self.index_run(id);
        let state = self.runs[&id].state;
        if !matches!(state, RunState::Running { .. }) {
            // A throttled save outlives its attempt: the next attempt resumes from it.
            let pending = self.throttles.remove(&id).and_then(|t| t.pending);
            let run = self
                .runs
                .get_mut(&id)
                .expect("transitions are of runs in memory");
            if let (Some(data), Some(checkpoint)) = (pending, &mut run.checkpoint) {
                checkpoint.seq += 1;
                checkpoint.data = data;
                checkpoint.saved_at = self.now;
            }
            self.resolve_incidents_of_kind(id, IncidentKind::StuckRun, "the attempt ended");
            // Refusals are audited once per attempt; the attempt is over, so is its entry.
            let attempts = (id, Attempt(0))..=(id, Attempt(u32::MAX));
            let ended: Vec<(RunId, Attempt)> =
                self.refused_completions.range(attempts).copied().collect();
            for key in ended {
                self.refused_completions.remove(&key);
            }
        }
        match state {
            RunState::BackingOff { until } => {
                self.effects
                    .push_back(Effect::Event(Event::RetryScheduled { run: id, at: until }));
            }
            state if state.is_terminal() => {
                self.resolve_incidents_of_run(id, "the run ended");
                self.enqueue_deliveries(id);
                self.effects.push_back(Effect::Event(Event::RunFinished {
                    run: id,
                    job: job.clone(),
                    state: state.name(),
                }));
                self.settle(id, &job);
            }
            _ => {}
        }
    }

    /// The one settle-after-run transition (SPEC R5), for scheduled and manual runs alike.
    fn settle(&mut self, run_id: RunId, id: &JobId) {
        let now = self.now;
        let history = self.config.history;
        self.journal.prune(
            Some(id),
            Record::PruneHistory {
                job: Some(id.clone()),
                keep_last: history.runs_max,
                finished_before: Timestamp(
                    now.as_millis().saturating_sub(history.age_max_ms as i64),
                ),
            },
        );
        let Some(job) = self.jobs.get_mut(id) else {
            return; // the job was removed while the run was active
        };
        job.active_runs -= 1;
        let run = &self.runs[&run_id];
        let state = run.state.name();
        job.last_run = Some(LastRun {
            run: run_id,
            state,
            finished_at: run.finished_at.unwrap_or(now),
        });
        self.count_failures(id, run_id, state);
        let job = self.jobs.get_mut(id).expect("checked above");
        let run = &self.runs[&run_id];
        // Only a run of this very one-shot finishes it: its slot, or a manual run made while the
        // job was this one-shot. A run left from an earlier definition does not.
        let own_one_shot = match (&job.spec.schedule, run.trigger) {
            (ScheduleSpec::Once { at }, Trigger::Manual) => run.of_one_shot == Some(*at),
            (ScheduleSpec::Once { at }, Trigger::Scheduled { slot }) => slot == *at,
            _ => false,
        };
        if own_one_shot {
            // A one-shot job never fires again, whatever the outcome.
            let dropped = job.backlog.len();
            if dropped > 0 {
                job.backlog.clear();
                let reason = format!("one-shot job finished; {dropped} waiting slot(s) dropped");
                self.note_dropped(id, dropped as u64, false, reason);
            }
            self.unindex_job(id);
            let job = self.jobs.get_mut(id).expect("checked above");
            let old = job_state_name(&job.state);
            let reason = format!("one-shot job finished ({state})");
            job.delete_when_idle = job.spec.delete_after_run;
            job.state = JobState::Disabled {
                reason: reason.clone(),
            };
            let deleting_now = job.delete_when_idle && job.active_runs == 0;
            self.mark_job(id);
            self.audit_job(
                id,
                Some(old),
                StateName::Disabled,
                Actor::Scheduler,
                &reason,
            );
            if !deleting_now {
                self.effects.push_back(Effect::Event(Event::JobDisabled {
                    job: id.clone(),
                    reason,
                }));
            }
        }
        // A finished one-shot with delete_after_run goes once no run of it is left, including
        // runs left over from an earlier definition.
        let job = &self.jobs[id];
        if job.delete_when_idle && job.active_runs == 0 {
            let reason = format!("one-shot job finished ({state}); delete_after_run");
            self.delete_job(id, Actor::Scheduler, &reason);
            self.effects.push_back(Effect::Event(Event::JobDeleted {
                job: id.clone(),
                reason,
            }));
            return;
        }
        if own_one_shot {
            return;
        }
        // The cursor already moved when the slot fired; a waiting slot starts now, unless an
        // operator paused the job (it starts on resume).
        self.start_from_backlog(now, id);
    }

    /// Starts the oldest waiting slot if the job may run it now.
    fn start_from_backlog(&mut self, now: Timestamp, id: &JobId) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let free = job.active_runs == 0 || job.spec.overlap == OverlapPolicy::Allow;
        let paused = matches!(job.state, JobState::Paused { .. });
        // A waiting slot waits for the next start once shutdown began.
        if job.backlog.is_empty() || !free || paused || self.shutting_down {
            return;
        }
        let slot = job.backlog.pop_oldest().expect("checked non-empty");
        self.create_run(now, id, Trigger::Scheduled { slot }, Actor::Scheduler);
    }

    /// Forgets tombstones older than the history policy's age limit.
    /// A walk over every tombstone, bounded by its rate: the history sweep runs once per
    /// [`limits::HISTORY_SWEEP_INTERVAL_MS`], never per firing or per command.
    fn expire_tombstones(&mut self, now: Timestamp) {
        let age_max = self.config.history.age_max_ms;
        let expired: Vec<JobId> = self
            .tombstones
            .values()
            .filter(|t| now.ms_since(t.deleted_at) > age_max)
            .map(|t| t.job.clone())
            .collect();
        for job in expired {
            self.tombstones.remove(&job);
            self.journal.tombstone(&job, JobWrite::Delete);
        }
    }

    /// Deletes a job, keeping a tombstone of its last fired slot (SPEC S6).
    fn delete_job(&mut self, id: &JobId, actor: Actor, reason: &str) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let old = job_state_name(&job.state);
        if let Some(last_fired) = job.last_fired {
            let tombstone = Tombstone {
                job: id.clone(),
                last_fired,
                deleted_at: self.now,
            };
            self.tombstones.insert(id.clone(), tombstone);
            self.journal.tombstone(id, JobWrite::Put);
        }
        self.unindex_job(id);
        self.jobs.remove(id);
        self.journal.delete_job(id);
        self.audit_job(id, Some(old), StateName::Removed, actor, reason);
    }

    /// Audits and reports slots dropped by a policy. While the job's writes are pending, drop
    /// records fold into one, so a slow store cannot make a job's pending writes grow.
    fn note_dropped(&mut self, id: &JobId, slots: u64, at_least: bool, reason: String) {
        let state = job_state_name(&self.jobs[id].state);
        let seq = self.next_seq();
        self.journal.audit_drop(
            AuditRecord {
                seq,
                at: self.now,
                job: id.clone(),
                run: None,
                attempt: None,
                fencing_token: None,
                old: Some(state),
                new: state,
                actor: Actor::Scheduler,
                reason: reason.clone(),
            },
            slots,
        );
        let count = if at_least {
            format!("at least {slots}")
        } else {
            slots.to_string()
        };
        self.effects.push_back(Effect::Event(Event::SlotsDropped {
            job: id.clone(),
            count,
            reason,
        }));
    }

    fn index_job(&mut self, id: &JobId) {
        if let Some(JobState::Scheduled { next }) = self.jobs.get(id).map(|j| &j.state) {
            self.due_jobs.insert((*next, id.clone()));
        }
    }

    fn unindex_job(&mut self, id: &JobId) {
        if let Some(JobState::Scheduled { next }) = self.jobs.get(id).map(|j| &j.state) {
            self.due_jobs.remove(&(*next, id.clone()));
        }
    }

    /// Puts a run where its state says it waits: the run due index (a backoff's end, the
    /// watchdog's next deadline) or the claim queue. Idempotent.
    pub(crate) fn index_run(&mut self, id: RunId) {
        self.unindex_run(id);
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        let due = match run.state {
            // Nothing new starts once shutdown began: a retry waits for the next start.
            RunState::BackingOff { until } => (!self.shutting_down).then_some(until),
            RunState::Running { .. } => crate::watchdog::next_deadline(run, &self.config),
            _ => None,
        };
        if let Some(at) = due {
            self.due_runs.insert((at, id));
            self.run_due.insert(id, at);
        }
        if let RunState::Queued { since } = run.state {
            let kind = run.kind.clone();
            self.queued
                .entry(kind.clone())
                .or_default()
                .insert((since, id));
            self.run_queue.insert(id, (kind, since));
        }
    }

    /// Takes a run out of the run due index and the claim queue.
    pub(crate) fn unindex_run(&mut self, id: RunId) {
        if let Some(at) = self.run_due.remove(&id) {
            self.due_runs.remove(&(at, id));
        }
        if let Some((kind, since)) = self.run_queue.remove(&id) {
            if let Some(queue) = self.queued.get_mut(&kind) {
                queue.remove(&(since, id));
                if queue.is_empty() {
                    self.queued.remove(&kind);
                }
            }
        }
    }

    /// A run's entry in the run due index came due.
    fn run_due(&mut self, now: Timestamp, id: RunId) {
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        match run.state {
            RunState::BackingOff { .. } => self.start_next_attempt(id),
            RunState::Running { .. } => self.supervise(now, id),
            _ => {}
        }
    }

    fn mark_job(&mut self, id: &JobId) {
        self.journal.put_job(id);
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.meta.next_audit_seq;
        self.meta.next_audit_seq += 1;
        self.journal.meta();
        seq
    }

    fn audit_job(
        &mut self,
        id: &JobId,
        old: Option<StateName>,
        new: StateName,
        actor: Actor,
        reason: &str,
    ) {
        let seq = self.next_seq();
        self.journal.audit(AuditRecord {
            seq,
            at: self.now,
            job: id.clone(),
            run: None,
            attempt: None,
            fencing_token: None,
            old,
            new,
            actor,
            reason: crate::run::truncate(reason),
        });
    }

    fn audit_run(
        &mut self,
        id: RunId,
        old: Option<StateName>,
        new: StateName,
        actor: Actor,
        reason: &str,
    ) {
        let seq = self.next_seq();
        let run = &self.runs[&id];
        self.journal.audit(AuditRecord {
            seq,
            at: self.now,
            job: run.job.clone(),
            run: Some(id),
            attempt: Some(run.attempt),
            // The lease under which the change was made: the live one, or for the end of an
            // attempt the one that just ended, so a completion names its holder's token.
            fencing_token: match (&run.lease, old) {
                (Some(lease), _) => Some(lease.token),
                (None, Some(StateName::Starting | StateName::Running)) => run.last_token,
                (None, _) => None,
            },
            old,
            new,
            actor,
            reason: crate::run::truncate(reason),
        });
    }

    fn build_batch(&mut self) -> Batch {
        let batch = self.journal.start_batch();
        self.work.groups_batched += batch.groups.len() as u64;
        let mut records = Vec::new();
        for (id, group) in &batch.groups {
            match group.job {
                JobWrite::Put => {
                    if let Some(job) = self.jobs.get(id) {
                        records.push(Record::PutJob((**job).clone()));
                    }
                }
                JobWrite::Delete => records.push(Record::DeleteJob { id: id.clone() }),
                JobWrite::Nothing => {}
            }
            match group.tombstone {
                JobWrite::Put => {
                    if let Some(tombstone) = self.tombstones.get(id) {
                        records.push(Record::PutTombstone(tombstone.clone()));
                    }
                }
                JobWrite::Delete => records.push(Record::DeleteTombstone { job: id.clone() }),
                JobWrite::Nothing => {}
            }
            records.extend(
                group
                    .runs
                    .iter()
                    .filter_map(|run| self.runs.get(run).cloned().map(Record::PutRun)),
            );
            records.extend(group.audit.iter().cloned().map(Record::Audit));
            records.extend(group.prunes.iter().cloned());
            for (delivery, write) in &group.deliveries {
                match write {
                    JobWrite::Put => {
                        if let Some(d) = self.outbox.delivery(*delivery) {
                            records.push(Record::PutDelivery(d.clone()));
                        }
                    }
                    JobWrite::Delete => records.push(Record::DeleteDelivery { id: *delivery }),
                    JobWrite::Nothing => {}
                }
            }
        }
        records.extend(batch.global_prunes.iter().cloned());
        records.extend(batch.incidents.iter().cloned().map(Record::PutIncident));
        // The counters ride in every batch, so a durable run id or audit seq is never ahead
        // of the durable counters.
        records.push(Record::PutMeta(Meta {
            clock: self.now,
            ..self.meta
        }));
        Batch {
            id: batch.id,
            at: self.now,
            records,
        }
    }
}

/// Checks every field of a spec; used for new input and for stored jobs alike.
fn validate_fields(spec: &JobSpec) -> Result<Schedule, Rejected> {
    if spec.kind.is_empty() || spec.kind.len() > limits::JOB_KIND_MAX_BYTES {
        return Err(Rejected::InvalidField {
            field: "kind",
            reason: format!("must be 1 to {} bytes", limits::JOB_KIND_MAX_BYTES),
        });
    }
    if spec.payload.len() > limits::JOB_PAYLOAD_MAX_BYTES {
        return Err(Rejected::InvalidField {
            field: "payload",
            reason: format!(
                "is {} bytes; the limit is {}",
                spec.payload.len(),
                limits::JOB_PAYLOAD_MAX_BYTES
            ),
        });
    }
    if spec
        .origin
        .as_ref()
        .is_some_and(|o| o.len() > limits::JOB_ORIGIN_MAX_BYTES)
    {
        return Err(Rejected::InvalidField {
            field: "origin",
            reason: format!("is longer than {} bytes", limits::JOB_ORIGIN_MAX_BYTES),
        });
    }
    if let MisfirePolicy::CatchUp { max } = spec.misfire {
        if max == 0 || max > limits::CATCH_UP_MAX {
            return Err(Rejected::InvalidField {
                field: "misfire.max",
                reason: format!(
                    "catch-up max must be 1 to {}; got {max}",
                    limits::CATCH_UP_MAX
                ),
            });
        }
    }
    spec.retry.validate()?;
    Ok(Schedule::parse(&spec.schedule)?)
}

/// The first cursor of a new or changed schedule: its first slot after `now`, or a one-shot's
/// instant even if it has passed (it fires at once), unless the misfire policy would skip it.
fn first_slot(
    schedule: &Schedule,
    spec: &JobSpec,
    now: Timestamp,
    grace_ms: u64,
) -> Result<Timestamp, Rejected> {
    let never = || ScheduleError::NeverFires {
        schedule: schedule.to_string(),
        after: now,
    };
    if schedule.is_recurring() {
        return Ok(schedule.next_after(now).ok_or_else(never)?);
    }
    let at = schedule.next_after(Timestamp(i64::MIN)).ok_or_else(never)?;
    // Under skip, a one-shot in the past would never fire: refused rather than stored dead.
    if spec.misfire == MisfirePolicy::Skip && now.ms_since(at) > grace_ms {
        return Err(never().into());
    }
    Ok(at)
}

fn job_state_name(state: &JobState) -> StateName {
    match state {
        JobState::Scheduled { .. } => StateName::Scheduled,
        JobState::Paused { .. } => StateName::Paused,
        JobState::Disabled { .. } => StateName::Disabled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_minute(name: &str) -> JobSpec {
        JobSpec::new(
            JobId::new(name).unwrap(),
            "k",
            ScheduleSpec::Cron {
                expr: "0 * * * * *".into(),
                zone: "UTC".into(),
            },
        )
    }

    fn persist_batches(s: &mut Scheduler, now: Timestamp) -> Vec<Batch> {
        let mut batches = Vec::new();
        while let Some(effect) = s.poll_effect() {
            if let Effect::Persist(batch) = effect {
                s.handle_persisted(now, batch.id);
                batches.push(batch);
            }
        }
        batches
    }

    /// Acknowledges every write and finishes every attempt with success. Returns the number
    /// of attempts started.
    fn settle(s: &mut Scheduler, now: Timestamp) -> usize {
        let mut started = 0;
        while let Some(effect) = s.poll_effect() {
            match effect {
                Effect::Persist(batch) => s.handle_persisted(now, batch.id),
                Effect::StartAttempt(a) => {
                    started += 1;
                    s.handle_outcome(now, a.run, a.lease.token, Outcome::ok())
                        .unwrap();
                }
                _ => {}
            }
        }
        started
    }

    /// Acknowledges every write; returns the attempts started and the attempts asked to stop.
    fn ack_all(s: &mut Scheduler, now: Timestamp) -> (Vec<AttemptStart>, Vec<RunId>) {
        let (mut started, mut stopped) = (Vec::new(), Vec::new());
        while let Some(effect) = s.poll_effect() {
            match effect {
                Effect::Persist(batch) => s.handle_persisted(now, batch.id),
                Effect::StartAttempt(a) => started.push(a),
                Effect::CancelAttempt { run, .. } => stopped.push(run),
                _ => {}
            }
        }
        (started, stopped)
    }

    /// A scheduler running two one-shot attempts of a job with one attempt in all: one its own,
    /// one an external worker's.
    fn shutdown_world() -> (Scheduler, Timestamp, AttemptStart, Claimed) {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        let at = t0.plus_ms(1_000);
        let own =
            JobSpec::new(JobId::new("own").unwrap(), "k", ScheduleSpec::once(at)).with_attempts(1);
        let ext = JobSpec::new(JobId::new("ext").unwrap(), "x", ScheduleSpec::once(at))
            .with_attempts(1)
            .for_external_workers();
        s.add_job(t0, own).unwrap();
        s.add_job(t0, ext).unwrap();
        ack_all(&mut s, t0);
        s.handle_timeout(at);
        let (started, _) = ack_all(&mut s, at);
        let worker = WorkerId::new("w").unwrap();
        let claimed = s.claim(at, &worker, &["x"]).unwrap().unwrap();
        ack_all(&mut s, at);
        (s, at, started.into_iter().next().unwrap(), claimed)
    }

    #[test]
    fn a_graceful_shutdown_lets_attempts_finish_and_stops_only_its_own_late() {
        let (mut s, at, own, ext) = shutdown_world();
        let shutdown = s.begin_shutdown(at);
        assert_eq!(
            shutdown.attempts,
            vec![(own.run, own.attempt)],
            "its own only"
        );
        let (_, stopped) = ack_all(&mut s, at);
        assert!(stopped.is_empty(), "attempts keep their budget to finish");
        // Near the end of the budget, its own attempt is asked to stop; the worker's is not.
        let late = at.plus_ms(7_500);
        assert_eq!(s.stop_for_shutdown(late), vec![(own.run, own.attempt)]);
        assert_eq!(ack_all(&mut s, late).1, vec![own.run]);
        // Stopped, the handler reports a failure: that is the shutdown's doing.
        let failed = Outcome::Retryable {
            message: "asked to stop".into(),
        };
        s.handle_outcome(late, own.run, own.lease.token, failed)
            .unwrap();
        ack_all(&mut s, late);
        let run = s.run(own.run).unwrap();
        assert_eq!(run.state, RunState::BackingOff { until: late });
        assert_eq!(
            (run.shutdowns, run.attempts_counted()),
            (1, 0),
            "no attempt used"
        );
        assert!(run
            .last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("stopped by a shutdown")));
        let ext_run = s.run(ext.run).unwrap();
        assert!(matches!(ext_run.state, RunState::Running { .. }));
        // A retry waits for the next start.
        s.handle_timeout(late.plus_ms(60_000));
        assert!(ack_all(&mut s, late.plus_ms(60_000)).0.is_empty());
        s.check_invariants();
    }

    #[test]
    fn a_success_after_the_stop_stands_and_the_budget_end_interrupts_the_rest() {
        let (mut s, at, own, _) = shutdown_world();
        s.begin_shutdown(at);
        s.stop_for_shutdown(at);
        ack_all(&mut s, at);
        s.handle_outcome(at, own.run, own.lease.token, Outcome::ok())
            .unwrap();
        assert_eq!(s.run(own.run).map(|r| r.state), Some(RunState::Succeeded));

        let (mut s, at, own, ext) = shutdown_world();
        s.begin_shutdown(at);
        let end = at.plus_ms(10_000);
        assert_eq!(s.end_shutdown(end), vec![own.run]);
        ack_all(&mut s, end);
        let run = s.run(own.run).unwrap();
        assert_eq!(
            (run.state, run.shutdowns),
            (RunState::BackingOff { until: end }, 1)
        );
        // The abandoned attempt's late word is refused: its lease ended with the shutdown.
        let late = s.handle_outcome(end, own.run, own.lease.token, Outcome::ok());
        assert!(late.is_err(), "{late:?}");
        assert!(matches!(
            s.run(ext.run).unwrap().state,
            RunState::Running { .. }
        ));
        s.check_invariants();
    }

    #[test]
    fn a_cancelled_run_stopped_by_a_shutdown_ends_cancelled() {
        let (mut s, at, own, _) = shutdown_world();
        s.cancel_run(at, own.run).unwrap();
        s.begin_shutdown(at);
        s.end_shutdown(at);
        assert_eq!(s.run(own.run).map(|r| r.state), Some(RunState::Cancelled));
        s.check_invariants();
    }

    #[test]
    fn a_job_failing_in_a_row_raises_one_incident_that_its_next_success_resolves() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        let other = every_minute("other").with_attempts(1);
        s.add_job(t0, every_minute("check").with_attempts(1))
            .unwrap();
        s.add_job(t0, other).unwrap();
        ack_all(&mut s, t0);
        let id = JobId::new("check").unwrap();
        let failing = |s: &Scheduler| {
            s.incidents()
                .filter(|i| i.kind == IncidentKind::FailingJob)
                .map(|i| i.job.clone().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        // Minute k: "check" ends as `outcomes[k]`, "other" fails every time.
        let outcomes = [false, false, false, false, true, false];
        let mut opened_at = Vec::new();
        for (k, ok) in outcomes.into_iter().enumerate() {
            let minute = Timestamp::parse_rfc3339("2026-01-01T00:01:00Z")
                .unwrap()
                .plus_ms(k as u64 * 60_000);
            s.handle_timeout(minute);
            let (started, _) = ack_all(&mut s, minute);
            for a in started {
                let outcome = if ok && a.job == id {
                    Outcome::ok()
                } else {
                    Outcome::Permanent {
                        message: "exit 1".into(),
                    }
                };
                s.handle_outcome(minute, a.run, a.lease.token, outcome)
                    .unwrap();
            }
            ack_all(&mut s, minute);
            let job = s.job(&id).unwrap();
            let last = job.last_run.as_ref().unwrap();
            assert_eq!(last.finished_at, minute);
            opened_at.push((job.failures_in_a_row, failing(&s)));
        }
        let check = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            opened_at,
            vec![
                (1, check(&[])),
                (2, check(&[])),
                (3, check(&["check", "other"])),
                (4, check(&["check", "other"])),
                (0, check(&["other"])),
                (1, check(&["other"])),
            ],
            "one incident per failing job, from the third failure, until a success"
        );
        let resolved = s.incidents().count();
        assert_eq!(resolved, 1, "the resolved one left the open set");
        s.check_invariants();
    }

    #[test]
    fn a_job_notifying_on_failure_delivers_its_failures_only() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        let job = every_minute("check")
            .with_attempts(1)
            .with_sinks(["ops"])
            .with_notify_on(NotifyOn::Failure);
        s.add_job(t0, job).unwrap();
        ack_all(&mut s, t0);
        let mut delivered = Vec::new();
        for (k, ok) in [true, false, true].into_iter().enumerate() {
            let minute = Timestamp::parse_rfc3339("2026-01-01T00:01:00Z")
                .unwrap()
                .plus_ms(k as u64 * 60_000);
            s.handle_timeout(minute);
            for a in ack_all(&mut s, minute).0 {
                let outcome = if ok {
                    Outcome::ok()
                } else {
                    Outcome::Permanent {
                        message: "down".into(),
                    }
                };
                s.handle_outcome(minute, a.run, a.lease.token, outcome)
                    .unwrap();
            }
            while let Some(effect) = s.poll_effect() {
                match effect {
                    Effect::Persist(batch) => s.handle_persisted(minute, batch.id),
                    Effect::Deliver(request) => delivered.push(request.payload.state),
                    _ => {}
                }
            }
        }
        assert_eq!(
            delivered,
            vec![StateName::FailedDropped],
            "the failure only"
        );
        assert!(NotifyOn::Always.delivers(StateName::Succeeded));
        assert!(!NotifyOn::Failure.delivers(StateName::Cancelled));
        assert!(NotifyOn::Failure.delivers(StateName::Interrupted));
    }

    #[test]
    fn the_schedule_and_job_helpers_build_what_the_fields_would() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:02:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        let id = |name: &str| JobId::new(name).unwrap();
        let five_minutes = std::time::Duration::from_secs(300);
        let spec = JobSpec::new(id("grid"), "k", ScheduleSpec::every(five_minutes))
            .with_payload("p")
            .with_attempts(4)
            .with_timeout(std::time::Duration::from_secs(30))
            .with_sinks(["log"]);
        assert_eq!(
            (&*spec.payload, spec.retry.attempts_max, spec.timeout_ms),
            ("p", 4, Some(30_000))
        );
        assert_eq!(&*spec.sinks, &[Arc::<str>::from("log")]);
        s.add_job(t0, spec).unwrap();
        let next = |s: &Scheduler, name: &str| s.job(&id(name)).unwrap().next_fire();
        let at = |t: &str| Some(Timestamp::parse_rfc3339(t).unwrap());
        assert_eq!(
            next(&s, "grid"),
            at("2026-01-01T00:05:00Z"),
            "on the epoch grid"
        );
        s.add_job(
            t0,
            JobSpec::new(id("cron"), "k", ScheduleSpec::cron("*/10 * * * *")),
        )
        .unwrap();
        assert_eq!(next(&s, "cron"), at("2026-01-01T00:10:00Z"));
        let paris = ScheduleSpec::cron_in("0 0 9 * * *", "Europe/Paris");
        s.add_job(t0, JobSpec::new(id("paris"), "k", paris))
            .unwrap();
        assert_eq!(next(&s, "paris"), at("2026-01-01T08:00:00Z"));
        let once = ScheduleSpec::once(t0.plus_ms(1_000));
        s.add_job(t0, JobSpec::new(id("once"), "k", once).deleted_after_run())
            .unwrap();
        assert_eq!(next(&s, "once"), Some(t0.plus_ms(1_000)));
        assert!(s.job(&id("once")).unwrap().spec.delete_after_run);
    }

    #[test]
    fn ensure_adds_updates_or_leaves_a_job_and_says_which() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        let spec = every_minute("report");
        assert_eq!(s.ensure_job(t0, spec.clone()), Ok(Ensured::Added));
        assert_eq!(s.ensure_job(t0, spec.clone()), Ok(Ensured::Unchanged));
        let mut changed = spec.clone();
        changed.payload = "v2".into();
        assert_eq!(s.ensure_job(t0, changed.clone()), Ok(Ensured::Updated));
        assert_eq!(s.job(&spec.id).unwrap().spec, changed);
        assert_eq!(s.ensure_job(t0, changed), Ok(Ensured::Unchanged));
        let mut bad = every_minute("bad");
        bad.schedule = ScheduleSpec::Cron {
            expr: "nope".into(),
            zone: "UTC".into(),
        };
        assert!(matches!(s.ensure_job(t0, bad), Err(Rejected::Schedule(_))));
        settle(&mut s, t0);
        s.check_invariants();
    }

    #[test]
    fn ensure_leaves_a_fired_one_shot_done_whatever_its_new_instant() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        // "In five seconds", computed at each start of the application.
        let in_5s = |now: Timestamp| {
            JobSpec::new(
                JobId::new("welcome").unwrap(),
                "k",
                ScheduleSpec::Once {
                    at: now.plus_ms(5_000),
                },
            )
        };
        assert_eq!(s.ensure_job(t0, in_5s(t0)), Ok(Ensured::Added));
        // Before it fires, a new instant moves it.
        let t1 = t0.plus_ms(1_000);
        assert_eq!(s.ensure_job(t1, in_5s(t1)), Ok(Ensured::Updated));
        settle(&mut s, t1);
        let fired_at = t1.plus_ms(5_000);
        s.handle_timeout(fired_at);
        assert_eq!(settle(&mut s, fired_at), 1);
        let t2 = fired_at.plus_ms(60_000);
        let done = Ok(Ensured::Done { last: fired_at });
        assert_eq!(s.ensure_job(t2, in_5s(t2)), done);
        // Deleted, its tombstone still says it fired.
        s.remove_job(t2, &JobId::new("welcome").unwrap()).unwrap();
        assert_eq!(s.ensure_job(t2, in_5s(t2)), done);
        s.handle_timeout(t2.plus_ms(10_000));
        assert_eq!(settle(&mut s, t2.plus_ms(10_000)), 0, "fired once in total");
        // A recurring job under a fired name is not a one-shot: it is added.
        assert_eq!(
            s.ensure_job(t2, every_minute("welcome")),
            Ok(Ensured::Added)
        );
        s.check_invariants();
    }

    #[test]
    fn batches_are_bounded_and_never_split_a_firing() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        let jobs = 3 * limits::BATCH_RECORDS_MAX;
        for i in 0..jobs {
            s.add_job(t0, every_minute(&format!("job-{i:05}"))).unwrap();
        }
        let batches = persist_batches(&mut s, t0);
        assert!(batches.len() >= 3, "{} batches", batches.len());
        // Each job group is 2 records (the job and its audit record); a batch stops at the
        // first group that reaches the bound, and carries the counters.
        for batch in &batches {
            assert!(batch.records.len() <= limits::BATCH_RECORDS_MAX + 2 + 1);
            assert!(matches!(batch.records.last(), Some(Record::PutMeta(_))));
        }
        // Every job fires at 00:01: each batch that carries a fired job's new cursor also
        // carries the run it fired.
        let t1 = Timestamp::parse_rfc3339("2026-01-01T00:01:00Z").unwrap();
        s.handle_timeout(t1);
        let batches = persist_batches(&mut s, t1);
        assert!(batches.len() >= 3);
        for batch in &batches {
            let jobs: BTreeSet<&JobId> = batch
                .records
                .iter()
                .filter_map(|r| match r {
                    Record::PutJob(job) => Some(&job.spec.id),
                    _ => None,
                })
                .collect();
            let run_jobs: BTreeSet<&JobId> = batch
                .records
                .iter()
                .filter_map(|r| match r {
                    Record::PutRun(run) => Some(&run.job),
                    _ => None,
                })
                .collect();
            // Runs may also appear alone (their next transition), but a moved cursor never
            // travels without the run it fired.
            let split = jobs.difference(&run_jobs).count();
            assert_eq!(
                split, 0,
                "{split} jobs persisted without the run they fired"
            );
        }
    }

    #[test]
    fn after_a_timeout_the_next_deadline_is_in_the_future() {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        let mut s = Scheduler::new(Config::default(), 1, t0);
        s.add_job(t0, every_minute("a")).unwrap();
        let mut now = t0;
        for _ in 0..100 {
            persist_batches(&mut s, now);
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            assert!(s.poll_timeout().unwrap() > now);
        }
    }
}

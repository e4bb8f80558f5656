//! The composer: owns jobs, runs, the due index and the journal, and wires the sub-machines
//! together. See the crate docs for the driving contract.
//!
//! # Deadlines
//!
//! `poll_timeout` is the earliest of seven named deadlines:
//!
//! - **job due**: the first entry of `due_jobs`, the `Scheduled` jobs ordered by cursor. A tick
//!   pops only due entries, so it costs O(log n) per due item, never a scan of all jobs.
//! - **run due**: the first entry of `due_runs`: a `BackingOff` run's `until`, or the
//!   watchdog's next deadline for a `Running` one (`watchdog::next_deadline`).
//! - **delivery due**: the outbox's next due delivery (`Outbox::poll_timeout`).
//! - **persist retry**: after a failed batch, when to emit the next one.
//! - **history sweep**: hourly, prune history by age for all jobs.
//! - **unclaimed queue**: when the first claim queue's wait reaches `unclaimed_after_ms`
//!   (`watch.rs`).
//! - **incident escalation**: when the first open, unacknowledged incident has been open for
//!   `escalate_after_ms` (`supervise.rs`).
//!
//! # Layout
//!
//! [`Scheduler`] is one type with one `impl` spread over the files of this module, each file
//! an `impl Scheduler` block for one concern. Every file starts with `use super::*`, so they
//! share this file's imports; a helper one file calls in another is `pub(super)`, never more.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the struct, construction, getters, the commands, the `handle_*` inputs and the `poll_*` outputs |
//! | `effect.rs` | what the scheduler emits: [`Effect`], [`Event`], [`AttemptStart`], [`StopReason`] |
//! | `restore.rs` | [`Scheduler::restore`]: rebuilding from a store's snapshot |
//! | `firing.rs` | due jobs fire; slots are admitted, buffered or dropped; runs are created; tombstones |
//! | `attempts.rs` | attempts start, and are handed out once their grant is durable (persist before act); run transitions, settling and deliveries; the run due index |
//! | `journal.rs` | audit records, the outbox's writes moved into the journal, batches, and what an acknowledged batch releases |
//! | `workers.rs` | the worker protocol: claims and fenced writes, checkpoints, shutdown |
//! | `gate.rs` | the artifact gate and explicit verifications: requests, their answers, evidence (see [`crate::artifact`]) |
//! | `leases.rs` | operator lease actions: release, reclaim, restore (SPEC W6) |
//! | `supervise.rs` | applying the watchdog's decisions, and incidents: opening, resolving, notifying sinks, escalating |
//! | `watch.rs` | the rules about queues and workers (unclaimed queues, idle claim loops' backlog, worker health), and operators' incidents |
//! | `invariants.rs` | [`Scheduler::check_invariants`] |
//! | `tests.rs` | unit tests of the composer (the simulator and sequence tests live in `tests/`) |

mod attempts;
mod effect;
mod firing;
mod gate;
mod invariants;
mod journal;
mod leases;
mod restore;
mod supervise;
mod watch;
mod workers;

pub use effect::{AttemptStart, Effect, Event, StopReason};
pub use gate::Verified;
pub use leases::LeaseAction;
pub use watch::QueueHealth;
pub use workers::{CheckpointSave, Claimed, Released, RunContext, Shutdown};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::artifact::{
    ArtifactCheck, CheckResult, TargetKind, Verification, VerifyId, VerifyRequest,
};
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
    DeliveryId, DeliveryPayload, DeliveryResult, Outbox, OutboxEvent, RunResult, SendRequest,
};
use crate::persist::{Batch, JobWrite, Journal, Meta, Record, Snapshot, Tombstone};
use crate::rng::SplitMix64;
use crate::run::{Checkpoint, Outcome, Run, RunState, RunTerms, StateName, Transition, Trigger};
use crate::schedule::{MisfirePolicy, Schedule, ScheduleError, ScheduleSpec};
use crate::time::Timestamp;

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
    // Behind a pointer: B-tree nodes then hold pointers, not half-empty slots of a large
    // struct, which roughly halves the memory of an idle job (docs/performance.md). An `Arc`,
    // shared with the `PutJob` record and so with a store that keeps it: a job is copied when
    // it next changes (`Arc::make_mut`), and an idle job is held once, not by each.
    jobs: BTreeMap<JobId, Arc<Job>>,
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
    /// Kinds of queued work reported unclaimed (`watch.rs`), with their open incident, if any.
    unclaimed: BTreeMap<Arc<str>, Option<u64>>,
    /// The last claim of each kind, since the scheduler started: a kind's wait for a claim
    /// starts again at each.
    last_claimed: BTreeMap<Arc<str>, Timestamp>,
    /// Worker health by worker and kind, since the scheduler started (`crate::health`):
    /// nested so that a claim, counted on every poll, looks its pairs up without allocating.
    health: BTreeMap<WorkerId, BTreeMap<String, crate::health::WorkerStats>>,
    /// The (worker, kind) pairs in `health`, bounded by `limits::WORKER_HEALTH_MAX`.
    health_pairs: usize,
    /// Reclaims whose batch failed, by run: two failures escalate (SPEC W5).
    reclaim_failures: BTreeMap<RunId, u32>,
    /// What the inputs have cost, in index entries visited.
    work: WorkCounter,
    /// Completions refused for missing artifacts, audited once per attempt.
    refused_completions: BTreeSet<(RunId, Attempt)>,
    /// Checkpoint throttles of running attempts.
    throttles: BTreeMap<RunId, Throttle>,
    /// Verification requests in flight (not persisted: after a restart the holder asks again).
    verifying: BTreeMap<VerifyId, gate::Pending>,
    /// The requests in `verifying` by run, so that counting one run's costs O(log n).
    verifying_runs: BTreeSet<(RunId, VerifyId)>,
    /// The completion of each run waiting for its artifact gate, by its request.
    gates: BTreeMap<RunId, VerifyId>,
    /// The next verification request's id.
    next_verify: u64,
    /// Set by `begin_shutdown`: nothing new fires or is claimed.
    shutting_down: bool,
    /// Since when, and how many times in a row, store writes have failed (none: they succeed).
    store_failing: Option<(Timestamp, u32)>,
    /// Own attempts a shutdown asked to stop (`stop_for_shutdown`): whatever they report but
    /// a success interrupts them for the next start, using no attempt (SPEC O1).
    stopped_for_shutdown: BTreeSet<(RunId, Attempt)>,
    /// Results waiting to be delivered to sinks (SPEC D1–D5).
    outbox: Outbox,
    /// The job of each run result in the outbox (deliveries travel in their job's group).
    delivery_jobs: BTreeMap<DeliveryId, JobId>,
    /// The incident notifications in the outbox (they travel with the incident records).
    notice_deliveries: BTreeSet<DeliveryId>,
    /// Open incidents not acknowledged nor escalated, by when they escalate
    /// (`Config::escalate_after_ms`; empty when that is 0).
    escalations: BTreeSet<(Timestamp, u64)>,
    meta: Meta,
    journal: Journal,
    effects: VecDeque<Effect>,
    /// The next hourly history sweep; `None` at the end of time.
    history_sweep_at: Option<Timestamp>,
    /// The latest slot fired by each deleted job, so a job re-added under its name never fires
    /// it again (SPEC S6). Kept until the name is added again, whatever the history policy.
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
        let outbox = Outbox::new(config.outbox);
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
            unclaimed: BTreeMap::new(),
            last_claimed: BTreeMap::new(),
            health: BTreeMap::new(),
            health_pairs: 0,
            refused_completions: BTreeSet::new(),
            work: WorkCounter::default(),
            throttles: BTreeMap::new(),
            verifying: BTreeMap::new(),
            verifying_runs: BTreeSet::new(),
            gates: BTreeMap::new(),
            next_verify: 1,
            shutting_down: false,
            stopped_for_shutdown: BTreeSet::new(),
            store_failing: None,
            outbox,
            delivery_jobs: BTreeMap::new(),
            notice_deliveries: BTreeSet::new(),
            escalations: BTreeSet::new(),
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

    /// The jobs after `after` (from the first if `None`), ordered by id, as the shared
    /// pointers the scheduler holds them by: one page of a listing taken in several steps, so
    /// that none holds the scheduler for long. Taking one costs a reference count, not a copy,
    /// so a driver can hand jobs to a reader in pointer copies and leave the copying to it. A
    /// job changed while a reader still holds it is copied then (`Arc::make_mut`); the reader
    /// keeps the version it took.
    pub fn shared_jobs_after(&self, after: Option<&JobId>) -> impl Iterator<Item = &Arc<Job>> {
        let from = after.map_or(std::ops::Bound::Unbounded, |id| {
            std::ops::Bound::Excluded(id.clone())
        });
        self.jobs
            .range((from, std::ops::Bound::Unbounded))
            .map(|(_, job)| job)
    }

    /// How many jobs there are.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
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
        self.jobs.insert(id.clone(), Arc::new(job));
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
        let job = self
            .jobs
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("checked above");
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
    /// per start. "Fired" means a slot fired under this name: the job, or its tombstone once
    /// deleted (kept until the name is added again), remembers its latest fired slot. To
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
        self.jobs
            .get_mut(id)
            .map(Arc::make_mut)
            .expect("checked")
            .state = JobState::Paused { next: Some(next) };
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
        let job = self
            .jobs
            .get_mut(id)
            .map(Arc::make_mut)
            .expect("checked above");
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
        self.watch_queues(now);
        self.escalate_incidents(now);
        if !self.shutting_down {
            self.outbox.handle_timeout(now);
        }
        self.pump_outbox();
        if self.journal.retry_at.is_some_and(|at| at <= now) {
            self.journal.retry_at = None;
        }
        if self.history_sweep_at.is_some_and(|at| at <= now) {
            self.history_sweep_at = now.checked_plus_ms(limits::HISTORY_SWEEP_INTERVAL_MS);
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
        self.acknowledge_runs(now, &batch.groups);
        let groups = batch.groups.iter().map(|(_, group)| group);
        self.acknowledge_deliveries(groups.chain([&batch.notices]));
        // Deliveries that just became durable may be due already.
        if !self.shutting_down {
            self.outbox.handle_timeout(now);
        }
        self.pump_outbox();
        let gates = batch.groups.into_iter().flat_map(|(_, group)| group.gates);
        self.hand_out_gated(now, gates);
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
            self.unclaimed_deadline(),
            self.escalations.first().map(|(at, _)| *at),
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
mod tests;

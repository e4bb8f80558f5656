//! Random command and event sequences against one `Scheduler`, with whole-state invariants
//! checked after every step (STYLE.md "Tests"), plus deterministic scenarios for paths that
//! random sequences rarely reach.
//!
//! The test plays the driver, the store, the in-process executor, three external workers and
//! the sinks. It keeps a model store: the records of every acknowledged batch, applied in order
//! after a serde round trip, exactly what a real store would hand back to
//! `Scheduler::restore`. A "crash" drops the scheduler with everything not acknowledged (the
//! batch in flight, pending effects, in-process attempts, sends in flight), possibly keeping
//! the in-flight batch as a write that became durable but was never acknowledged, and restores
//! a new scheduler from the model store; attempts of external workers outlive it with the lease
//! the store holds. Half the scenarios stress the worker protocol; some have a small outbox;
//! some shut down gracefully near the end. Every scenario ends with a liveness phase.
//!
//! `Scheduler::check_invariants` runs after every step and every drained effect. Besides, the
//! test checks:
//!
//! - at most one persist batch is unacknowledged at a time;
//! - persist before act (SPEC T1): an attempt is handed out only if the model store holds
//!   the run in `Starting` for exactly that attempt, with its lease and checkpoint (C2);
//! - an idempotency key (`run + attempt`) is handed out at most once, across crashes too;
//! - a slot of a job gets at most one run id in the store (SPEC S6), across crashes and
//!   backwards clocks;
//! - a terminal run's stored record never changes, every terminal record other than
//!   `succeeded` keeps its last error (SPEC R4), and none keeps a checkpoint unless it is
//!   interrupted or poison (C2);
//! - after `handle_timeout(now)` and a full drain, `poll_timeout()` is later than `now`;
//! - after a drain, the runs in `Running` are exactly the attempts handed out and neither
//!   reported, released, reclaimed nor killed, each under the lease it was handed out with;
//!   once nothing is pending, the store mirrors memory, open incidents included;
//! - a refused command changes nothing (tier 1); no write is accepted with a stale token: an
//!   outcome, heartbeat, progress report, context read or checkpoint save carrying a token that
//!   is not the run's current lease (an attempt already reported, released, reclaimed, killed
//!   or lost in a crash, a newer token, another run's token, an unknown run) is refused and
//!   changes nothing, and such a release is `AlreadyReleased` (SPEC L4; `UnknownRun` for a run
//!   not in memory) and changes nothing; an executing attempt's writes are always accepted,
//!   except a success without a required artifact, which leaves the attempt running (and is
//!   audited once per attempt);
//! - the artifact gate (SPEC A2): a success whose required artifact is a URL waits for its
//!   checks with the attempt running under its lease, holds up any other success of the
//!   attempt, and when `Op::Verified` answers (a `/404` target answers 404) is applied or
//!   refused (`ArtifactGate`, the attempt running on); an answer for an attempt that is over is
//!   refused and leaves its run alone;
//! - fencing tokens (SPEC L1): an attempt is handed out with the lease the store holds for it,
//!   owned by the executor or the worker that claimed it, above its run's previous tokens and
//!   every token handed out before the last restore, never twice, and its grant
//!   (`Event::LeaseGranted`) is announced right after the hand-out; a claim gets the oldest
//!   queued run of its kinds, or nothing, and is refused while shutting down;
//! - the watchdog (SPEC L3, W1-W3): a lease is reclaimed only once it expired plus the grace,
//!   always with an `Event::LeaseReclaimed`, and after a tick no running attempt is past that
//!   deadline or its backstop; an attempt is killed only if its job has a timeout and not
//!   before it; `extend` answers exactly what the run's state allows, is granted at most once
//!   per run (also across crashes: the flag is durable and never cleared), and a kill is
//!   sticky: the run's `killed` stays set (in memory and in the store), and the killed
//!   attempt's token is stale;
//! - checkpoints (SPEC C1, C3): after `Event::CheckpointFailed`, the attempt's next save is
//!   `Saving`, never `Throttled`, unless a newer save was written meanwhile (a save written by a
//!   flush is left out: see the ignored `the_save_after_a_failed_flushed_save_is_written_at_once`);
//!   a flush writes every throttled save;
//! - the outbox (SPEC D1-D5): it never holds more than its capacity; a send is released only
//!   once its attempt's record and its run's terminal record are durable, and never twice for
//!   one attempt across crashes; an answer to the current send is accepted, and an answer
//!   already given, lost in a crash, for a later attempt or an unknown delivery is refused and
//!   changes nothing; each delivery ends (`Finished` or `Dropped`) at most once, across crashes
//!   too, only once its end is durable, and every end made durable by an acknowledgement is
//!   counted in the same drain;
//! - a graceful shutdown asks every attempt in progress to stop, lists the sends in flight,
//!   flushes throttled checkpoints, and afterwards nothing is handed out and nothing new fires
//!   (a buffered slot aside: see the ignored
//!   `a_buffered_slot_waits_for_the_next_start_after_a_shutdown`);
//! - no run loops forever: an active run never has `lost >= lost_attempts_max` (the poison
//!   verdict comes first), and `attempt <= attempts_max + lost + snoozes`, in memory and in the
//!   store; at the end of every scenario, a liveness phase stops the faults, pauses every job,
//!   claims and answers every attempt and send, and moves time on in steps of at most 10
//!   minutes: within 6 simulated hours every run is terminal in memory and in the store, the
//!   outbox is empty, and every delivery the store ever held has ended (bar a count a crash
//!   swallowed between the durable end and its event, which docs/semantics.md allows);
//! - `restore` is deterministic: the same snapshot and seed give the same scheduler;
//! - records survive a serde round trip; stored counters (run ids, audit seqs, tokens,
//!   incident ids, delivery ids) never go backwards and stay above every stored id and lease
//!   token; a stored incident keeps its identity and a resolved one stays resolved.
//!
//! The deterministic tests at the end of this file are regressions for core bugs this suite
//! found (cancel requests lost or ignored, attempts of removed jobs, one-shots finished by
//! leftover runs), scenarios for the worker protocol, watchdog, checkpoints and outbox, and
//! ignored tests pinning core bugs not fixed yet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use keel_core::rng::SplitMix64;
use keel_core::run::Checkpoint;
use keel_core::{
    Attempt, AttemptStart, Batch, BatchId, CheckpointSave, Config, DeliveryId, DeliveryResult,
    DeliveryState, Effect, Event, FencingToken, HistoryPolicy, IdempotencyKey, Incident, Job,
    JobId, JobSpec, JobState, MisfirePolicy, OutboxConfig, OutboxEvent, Outcome, OverflowPolicy,
    OverlapPolicy, Record, Rejected, Released, RetryPolicy, Run, RunId, RunState, ScheduleSpec,
    Scheduler, SendRequest, Timestamp, Trigger, Verified, VerifyId, VerifyRequest, WorkerId,
};
use keel_harness::promises::{
    attempts_in_progress, checkpoint_seqs, expected_extend, missing_artifacts,
    own_attempts_in_progress, refused_as_stale, InProgress, Promises,
};
use keel_testkit::MemStore;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

mod regressions;
mod scenario;
mod world_ops;

use scenario::*;

// ----- the world ------------------------------------------------------------------------

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    batches_acked: u64,
    batches_failed: u64,
    attempts_started: u64,
    outcomes: u64,
    refusals: u64,
    crashes: u64,
    terminal_runs: u64,
    cancel_requests: u64,
    /// Leases the watchdog reclaimed from attempts that went silent.
    reclaims: u64,
    /// Heartbeats accepted.
    heartbeats: u64,
    /// Outcomes and heartbeats refused for carrying a token that is not current.
    stale_refused: u64,
    /// Incidents opened.
    incidents: u64,
    max_in_memory_runs: usize,
    /// Claims that found a run, and claims that found none.
    claims: u64,
    empty_claims: u64,
    /// Progress reports and context reads accepted.
    progress: u64,
    contexts: u64,
    /// Attempts given back by their holder.
    releases: u64,
    /// Releases with a stale token answered `AlreadyReleased`.
    already_released: u64,
    /// Extensions granted, and refused.
    extensions: u64,
    extensions_refused: u64,
    /// Attempts the watchdog killed.
    kills: u64,
    /// Checkpoint saves written, throttled, and failed to persist.
    checkpoints_saved: u64,
    checkpoints_throttled: u64,
    checkpoints_failed: u64,
    /// Saves that had to be written at once because the save before them failed.
    saves_after_failure: u64,
    /// Completions refused for a missing artifact, or by the artifact gate.
    artifact_refusals: u64,
    /// Successes that passed the artifact gate, and that it refused.
    gates_passed: u64,
    gates_refused: u64,
    /// Sends released, answers accepted, and stale answers refused.
    sends: u64,
    /// Sends of incident notifications, and of escalations among them.
    notice_sends: u64,
    escalation_sends: u64,
    answers: u64,
    stale_answers: u64,
    /// Deliveries finished, and dropped on overflow.
    deliveries_finished: u64,
    deliveries_dropped: u64,
    /// Graceful shutdowns.
    shutdowns: u64,
    /// Rounds of the liveness phase, over all cases.
    liveness_rounds: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.batches_acked += o.batches_acked;
        self.batches_failed += o.batches_failed;
        self.attempts_started += o.attempts_started;
        self.outcomes += o.outcomes;
        self.refusals += o.refusals;
        self.crashes += o.crashes;
        self.terminal_runs += o.terminal_runs;
        self.cancel_requests += o.cancel_requests;
        self.reclaims += o.reclaims;
        self.heartbeats += o.heartbeats;
        self.stale_refused += o.stale_refused;
        self.incidents += o.incidents;
        self.max_in_memory_runs = self.max_in_memory_runs.max(o.max_in_memory_runs);
        self.claims += o.claims;
        self.empty_claims += o.empty_claims;
        self.progress += o.progress;
        self.contexts += o.contexts;
        self.releases += o.releases;
        self.already_released += o.already_released;
        self.extensions += o.extensions;
        self.extensions_refused += o.extensions_refused;
        self.kills += o.kills;
        self.checkpoints_saved += o.checkpoints_saved;
        self.checkpoints_throttled += o.checkpoints_throttled;
        self.checkpoints_failed += o.checkpoints_failed;
        self.saves_after_failure += o.saves_after_failure;
        self.artifact_refusals += o.artifact_refusals;
        self.gates_passed += o.gates_passed;
        self.gates_refused += o.gates_refused;
        self.sends += o.sends;
        self.notice_sends += o.notice_sends;
        self.escalation_sends += o.escalation_sends;
        self.answers += o.answers;
        self.stale_answers += o.stale_answers;
        self.deliveries_finished += o.deliveries_finished;
        self.deliveries_dropped += o.deliveries_dropped;
        self.shutdowns += o.shutdowns;
        self.liveness_rounds += o.liveness_rounds;
    }
}

/// An attempt handed out and neither reported nor reclaimed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Executing {
    attempt: Attempt,
    /// Its lease's fencing token, from `AttemptStart::lease`.
    token: FencingToken,
    /// Its lease's owner: the in-process executor, or the worker that claimed the run.
    owner: WorkerId,
    /// When it was handed out (its lease, timeout and backstop run from then).
    started_at: Timestamp,
    /// When its lease expires, as of the hand-out or the last accepted heartbeat.
    expires_at: Timestamp,
    /// The run's attempt timeout.
    timeout_ms: Option<u64>,
    /// The request whose artifact checks its success waits for, if any.
    gate: Option<VerifyId>,
}

struct World {
    config: Config,
    /// The wall clock; it may run behind the scheduler's clamped `now`.
    clock: Timestamp,
    keel: Scheduler,
    /// The in-process executor, owner of every lease in these scenarios.
    local: WorkerId,
    /// The test's own choices (ack, fail or hold a batch; restore seeds).
    rng: SplitMix64,
    store: MemStore,
    /// The batch the store has neither acknowledged nor failed.
    held: Option<Batch>,
    /// Batches that failed, for late acknowledgements.
    failed: Vec<BatchId>,
    /// Attempts handed out and not yet reported, reclaimed or lost in a crash.
    executing: BTreeMap<RunId, Executing>,
    /// Leases whose writes must no longer be accepted: their attempt reported already, was
    /// reclaimed by the watchdog, or was lost in a crash.
    stale: Vec<(RunId, FencingToken)>,
    /// Every idempotency key ever handed out.
    handed_out: BTreeSet<(RunId, Attempt)>,
    /// Every token ever handed out (in any incarnation), with its run.
    tokens: BTreeMap<FencingToken, RunId>,
    /// The latest token handed out to each run (in any incarnation).
    run_tokens: BTreeMap<RunId, FencingToken>,
    /// The highest token handed out before the latest restore.
    floor: Option<FencingToken>,
    /// The attempt just handed out, whose grant (`Event::LeaseGranted`) must follow at once.
    announce: Option<(RunId, FencingToken, WorkerId)>,
    /// The latest acknowledgement came after `begin_shutdown`: it may hand nothing out.
    acked_in_shutdown: bool,
    /// Completions refused for a missing artifact, by attempt (audited once per attempt).
    refused_completions: BTreeSet<(RunId, Attempt)>,
    /// Artifact checks asked for (`Effect::VerifyArtifacts`) and not yet answered.
    verifying: Vec<VerifyRequest>,
    /// The scheduler's `now` after the latest `handle_timeout`: when the watchdog last ran.
    last_tick: Timestamp,
    /// External workers.
    workers: Vec<WorkerId>,
    /// What the scheduler promised (claims, W1, W2, C1, D1–D4).
    promises: Promises,
    /// The latest throttled save of each executing attempt, until a save or a flush writes it.
    throttled: BTreeMap<RunId, (Attempt, String)>,
    /// After `begin_shutdown`: the highest run id at the time; no later run is scheduled.
    shutdown_floor: Option<RunId>,
    /// The slots waiting in job backlogs at `begin_shutdown`: a run that ends during the
    /// shutdown still starts its job's buffered slot, the core bug pinned by the ignored test
    /// `a_buffered_slot_does_not_start_during_a_shutdown`, left out here.
    shutdown_backlog: BTreeSet<(JobId, Timestamp)>,
    /// False in the liveness phase: every batch is acknowledged.
    faults: bool,
    stats: Stats,
}

impl World {
    fn new(scenario: &Scenario) -> Self {
        let start = ts(STARTS[scenario.start]);
        let config = Config {
            misfire_grace_ms: scenario.misfire_grace_ms,
            history: HistoryPolicy {
                runs_max: scenario.history_runs_max,
                ..HistoryPolicy::default()
            },
            outbox: OutboxConfig {
                capacity: scenario.outbox_capacity,
                overflow: scenario.overflow,
                ..OutboxConfig::default()
            },
            // Incidents are told through the same outbox, and escalate: their deliveries
            // share its capacity and face the same crashes and store failures.
            incident_sinks: vec![SINKS[0].into()],
            escalate_after_ms: 5 * 60_000,
            escalation_sinks: vec![SINKS[1].into()],
            ..Config::default()
        };
        let mut rng = SplitMix64::new(scenario.seed);
        let keel = Scheduler::new(config.clone(), rng.next_u64(), start);
        World {
            config,
            clock: start,
            keel,
            local: WorkerId::new("local").expect("a valid worker id"),
            rng,
            store: MemStore::keeping_history(),
            held: None,
            failed: Vec::new(),
            executing: BTreeMap::new(),
            stale: Vec::new(),
            handed_out: BTreeSet::new(),
            tokens: BTreeMap::new(),
            run_tokens: BTreeMap::new(),
            floor: None,
            announce: None,
            acked_in_shutdown: false,
            refused_completions: BTreeSet::new(),
            verifying: Vec::new(),
            last_tick: start,
            workers: (0..WORKERS)
                .map(|i| WorkerId::new(&format!("worker-{i}")).expect("a valid worker id"))
                .collect(),
            promises: Promises::default(),
            throttled: BTreeMap::new(),
            shutdown_floor: None,
            shutdown_backlog: BTreeSet::new(),
            faults: true,
            stats: Stats::default(),
        }
    }

    fn run(scenario: &Scenario) -> Stats {
        let mut w = World::new(scenario);
        for (i, template) in scenario.jobs.iter().enumerate() {
            w.step(&Op::Add {
                job: i,
                template: template.clone(),
            });
        }
        w.step(&Op::Drain);
        let shutdown_at = scenario
            .shutdown_before_end
            .map(|before| scenario.ops.len().saturating_sub(before + 1));
        for (i, op) in scenario.ops.iter().enumerate() {
            if shutdown_at == Some(i) {
                w.step(&Op::Shutdown);
            }
            w.step(op);
        }
        w.liveness();
        w.stats
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Advance(ms) => self.clock = self.clock.plus_ms(*ms),
            Op::JumpDay => self.clock = self.clock.plus_ms(DAY_MS),
            Op::JumpBack => self.clock = Timestamp(self.clock.0 - HOUR_MS as i64),
            Op::Timeout => {
                self.keel.handle_timeout(self.clock);
                self.last_tick = self.keel.now();
                self.keel.check_invariants();
                self.drain();
                let now = self.keel.now();
                if let Some(next) = self.keel.poll_timeout() {
                    assert!(
                        next > now,
                        "after handle_timeout({now}) and a drain, poll_timeout() is {next}"
                    );
                }
                // SPEC L3: the watchdog misses no expired lease.
                let grace = self.config.lease.grace_ms;
                for run in self.keel.runs() {
                    if let (RunState::Running { .. }, Some(lease)) = (run.state(), &run.lease()) {
                        assert!(
                            lease.expires_at.plus_ms(grace) > self.last_tick,
                            "{} still running at {} with {} expired at {}",
                            run.id(),
                            self.last_tick,
                            lease.token,
                            lease.expires_at
                        );
                    }
                    // SPEC W3: no attempt outlives its backstop, extension or not.
                    if let RunState::Running { started_at, .. } = run.state() {
                        if let Some(timeout) = run.timeout_ms() {
                            let factor = u64::from(self.config.backstop_factor);
                            let backstop = started_at.plus_ms(timeout * factor);
                            assert!(
                                backstop > self.last_tick,
                                "{} still running at {}, past its backstop {backstop}",
                                run.id(),
                                self.last_tick
                            );
                        }
                    }
                    // Nothing new fires while shutting down.
                    if let Some(floor) = self.shutdown_floor {
                        let buffered = run.slot().is_some_and(|slot| {
                            self.shutdown_backlog.contains(&(run.job().clone(), slot))
                        });
                        assert!(
                            run.id() <= floor || run.trigger() == Trigger::Manual || buffered,
                            "{} fired by the schedule after begin_shutdown",
                            run.id()
                        );
                    }
                }
            }
            Op::Drain => self.drain(),
            Op::Complete { pick, outcome } => self.complete(*pick, outcome),
            Op::Stale { pick } => self.stale_outcome(*pick),
            Op::Heartbeat { pick, stale } => self.heartbeat(*pick, *stale),
            Op::Add { job, template } => self.add(*job, template),
            Op::Update { job, template } => {
                let id = job_id(*job);
                let spec = template.spec(&id, self.clock);
                let before = fingerprint(&self.keel);
                let r = self.keel.update_job(self.clock, spec);
                self.refused_changes_nothing("update_job", before, r);
            }
            Op::Pause(job) => {
                let before = fingerprint(&self.keel);
                let r = self.keel.pause_job(self.clock, &job_id(*job));
                self.refused_changes_nothing("pause_job", before, r);
            }
            Op::Resume(job) => {
                let before = fingerprint(&self.keel);
                let r = self.keel.resume_job(self.clock, &job_id(*job));
                self.refused_changes_nothing("resume_job", before, r);
            }
            Op::Remove(job) => {
                let before = fingerprint(&self.keel);
                let r = self.keel.remove_job(self.clock, &job_id(*job));
                self.refused_changes_nothing("remove_job", before, r);
            }
            Op::Trigger(job) => {
                let before = fingerprint(&self.keel);
                let r = self.keel.trigger(self.clock, &job_id(*job));
                if let Some(run) = self.refused_changes_nothing("trigger", before, r) {
                    let run = self.keel.run(run).expect("a triggered run is in memory");
                    assert_eq!(run.trigger(), Trigger::Manual);
                    if run.external() {
                        assert_eq!(
                            run.state(),
                            RunState::Queued {
                                since: self.keel.now()
                            }
                        );
                        assert_eq!(run.attempt(), Attempt(0));
                    } else {
                        assert_eq!(
                            run.state(),
                            RunState::Starting {
                                attempt: Attempt(1)
                            }
                        );
                    }
                }
            }
            Op::Cancel { pick } => self.cancel(*pick),
            Op::AckHeld => {
                if let Some(batch) = self.held.take() {
                    self.ack(batch);
                }
            }
            Op::FailHeld => {
                if let Some(batch) = self.held.take() {
                    self.fail(batch.id);
                }
            }
            Op::StaleAck { fail } => {
                if let Some(&id) = self.failed.last() {
                    let before = fingerprint(&self.keel);
                    if *fail {
                        self.keel
                            .handle_persist_failed(self.clock, id, "late failure");
                    } else {
                        self.keel.handle_persisted(self.clock, id);
                    }
                    assert_eq!(
                        before,
                        fingerprint(&self.keel),
                        "a late report for failed {id} (fail: {fail}) changed the state"
                    );
                }
            }
            Op::Crash => self.crash(),
            Op::Claim { worker, kinds } => {
                self.claim(*worker, CLAIM_KINDS[*kinds % CLAIM_KINDS.len()]);
            }
            Op::Progress { pick, stale } => self.progress(*pick, *stale),
            Op::Context { pick, stale } => self.context(*pick, *stale),
            Op::Release { pick, stale } => self.release(*pick, *stale),
            Op::Extend {
                pick,
                target,
                by_ms,
            } => self.extend(*pick, *target, *by_ms),
            Op::Checkpoint { pick, stale } => self.checkpoint(*pick, *stale),
            Op::Flush => {
                let seqs = checkpoint_seqs(&self.keel);
                self.keel.flush_checkpoints(self.clock);
                self.after_flush(&seqs);
            }
            Op::Answer { pick, answer } => self.answer(*pick, *answer),
            Op::StaleAnswer { pick } => self.stale_answer(*pick),
            Op::Verified { pick } => self.verified(*pick),
            Op::Shutdown => self.shutdown(),
        }
        self.keel.check_invariants();
        self.check_executing();
        self.check_world();
        self.stats.max_in_memory_runs = self.stats.max_in_memory_runs.max(self.keel.runs().count());
    }

    /// Every attempt the test believes is executing is running in the scheduler under the lease
    /// it was handed out with: an attempt stops executing only when it reports, when the
    /// watchdog reclaims its lease (`Event::LeaseReclaimed`), or in a crash.
    fn check_executing(&self) {
        for (run, exec) in &self.executing {
            let current = self
                .keel
                .run(*run)
                .map(|r| (r.state(), r.lease().map(|l| (l.token, l.expires_at))));
            assert!(
                matches!(
                    current,
                    Some((RunState::Running { attempt, .. }, Some((token, expires_at))))
                        if attempt == exec.attempt
                            && token == exec.token
                            && expires_at == exec.expires_at
                ),
                "{run} attempt {} ({}, expiring {}) is executing, but the scheduler has {current:?}",
                exec.attempt,
                exec.token,
                exec.expires_at
            );
        }
    }

    fn add(&mut self, job: usize, template: &Template) {
        let id = job_id(job);
        let spec = template.spec(&id, self.clock);
        let before = fingerprint(&self.keel);
        let r = self.keel.add_job(self.clock, spec);
        // A job added under a deleted job's name inherits its fired slots from its tombstone,
        // which is kept until then; the model store's `fired` checks it over the whole history.
        self.refused_changes_nothing("add_job", before, r);
    }

    /// The executing attempt at `pick` (modulo their count).
    fn pick_executing(&self, pick: usize) -> Option<(RunId, Executing)> {
        if self.executing.is_empty() {
            return None;
        }
        self.executing
            .iter()
            .nth(pick % self.executing.len())
            .map(|(r, e)| (*r, e.clone()))
    }

    fn complete(&mut self, pick: usize, outcome: &OutcomeChoice) {
        let Some((run_id, _)) = self.pick_executing(pick) else {
            return;
        };
        self.complete_run(run_id, outcome);
    }

    /// The executing attempt of `run_id` reports an outcome: accepted, unless it is a success
    /// without an artifact the job requires.
    fn complete_run(&mut self, run_id: RunId, outcome: &OutcomeChoice) {
        let exec = self.executing[&run_id].clone();
        let run = self
            .keel
            .run(run_id)
            .expect("an executing run is in memory");
        let cancel_requested = run.cancel_requested();
        let required = run.required_artifacts().to_vec();
        let outcome = outcome.outcome();
        let missing = missing_artifacts(run, &outcome);
        let before = fingerprint(&self.keel);
        let result = self
            .keel
            .handle_outcome(self.clock, run_id, exec.token, outcome.clone());
        if !missing.is_empty() {
            // Audited once per attempt: a refused retry changes nothing.
            if !self.refused_completions.insert((run_id, exec.attempt)) {
                assert_eq!(
                    before,
                    fingerprint(&self.keel),
                    "a repeated refusal changed the state"
                );
            }
            // The artifact gate: refused and recorded, and the attempt keeps running under
            // its lease (`check_executing` verifies the lease is untouched).
            assert_eq!(
                result,
                Err(Rejected::MissingArtifacts {
                    run: run_id,
                    missing
                }),
                "a success without the required artifacts"
            );
            let run = self.keel.run(run_id).expect("still running");
            assert!(
                matches!(run.state(), RunState::Running { attempt, .. } if attempt == exec.attempt),
                "{run_id} is {:?} after a refused completion",
                run.state()
            );
            self.stats.artifact_refusals += 1;
            return;
        }
        if let Outcome::Success { artifacts, .. } = &outcome {
            // A success waiting for its artifact gate holds up every other success of the
            // attempt, and changes nothing.
            if exec.gate.is_some() {
                assert_eq!(result, Err(Rejected::VerificationPending(run_id)));
                assert_eq!(
                    before,
                    fingerprint(&self.keel),
                    "a refusal changed the state"
                );
                return;
            }
            // A required artifact that is a URL is checked first: the success waits, the run
            // runs on under its lease, and `Op::Verified` decides.
            let checked = required.iter().any(|name| {
                artifacts
                    .get(name)
                    .is_some_and(|v| v.starts_with("https://"))
            });
            if checked {
                assert_eq!(result, Ok(()), "a success sent to the artifact gate");
                let gate = self
                    .keel
                    .gate(run_id)
                    .expect("the success waits for its gate");
                self.executing.get_mut(&run_id).expect("checked above").gate = Some(gate);
                return;
            }
        }
        result.unwrap_or_else(|e| {
            panic!(
                "outcome for executing {run_id} attempt {} ({}): {e}",
                exec.attempt, exec.token
            )
        });
        self.retire(run_id);
        self.stats.outcomes += 1;
        let run = self
            .keel
            .run(run_id)
            .expect("a run stays in memory until its record is acknowledged");
        assert!(
            run.lease().is_none(),
            "{run_id} kept its lease after reporting"
        );
        if cancel_requested && !matches!(outcome, Outcome::Success { .. }) {
            assert_eq!(
                run.state(),
                RunState::Cancelled,
                "a failure after a cancel request must end the run cancelled"
            );
        }
        if let Outcome::Success { summary, artifacts } = outcome {
            assert_eq!(run.state(), RunState::Succeeded);
            assert_eq!(run.summary(), summary.as_deref());
            assert_eq!(run.artifacts(), &artifacts, "{run_id} lost its artifacts");
        }
        if run.state().is_terminal() {
            self.stats.terminal_runs += 1;
        }
    }

    /// A write that must be refused: the token of an attempt that is over (reported,
    /// reclaimed, lost in a crash), a token newer than an executing attempt's, the token of
    /// another run's executing attempt, or a run that does not exist.
    fn stale_write(&self, pick: usize) -> (RunId, FencingToken) {
        let others: Vec<(RunId, FencingToken)> = self
            .executing
            .keys()
            .flat_map(|run| {
                self.executing
                    .iter()
                    .filter(move |(other, _)| *other != run)
                    .map(move |(_, o)| (*run, o.token))
            })
            .collect();
        match pick % 4 {
            0 | 1 if !self.stale.is_empty() => self.stale[(pick / 4) % self.stale.len()],
            2 if !others.is_empty() => others[(pick / 4) % others.len()],
            _ => match self.pick_executing(pick / 4) {
                Some((run, exec)) => (run, FencingToken(exec.token.0 + 1)),
                None => (RunId(u64::MAX / 2), FencingToken(1)),
            },
        }
    }

    /// Asserts `result` is a refusal for a write with a token that is not current.
    fn assert_stale_refused<T: Debug>(
        &self,
        what: &str,
        run: RunId,
        token: FencingToken,
        result: &Result<T, Rejected>,
    ) {
        let current = self.keel.run(run).and_then(|r| r.lease()).map(|l| l.token);
        let known = self.keel.run(run).is_some();
        let refused = refused_as_stale(result, run, token, current, known);
        assert!(
            refused,
            "{what} for {run} with {token} (current lease {current:?}) was not refused as \
             stale: {result:?}"
        );
    }

    fn stale_outcome(&mut self, pick: usize) {
        let (run, token) = self.stale_write(pick);
        let before = fingerprint(&self.keel);
        let r = self
            .keel
            .handle_outcome(self.clock, run, token, Outcome::ok());
        self.assert_stale_refused("an outcome", run, token, &r);
        self.stats.stale_refused += 1;
        self.refused_changes_nothing("handle_outcome (stale)", before, r);
    }

    fn heartbeat(&mut self, pick: usize, stale: bool) {
        if stale {
            let (run, token) = self.stale_write(pick);
            let before = fingerprint(&self.keel);
            let r = self.keel.heartbeat(self.clock, run, token);
            self.assert_stale_refused("a heartbeat", run, token, &r);
            self.stats.stale_refused += 1;
            self.refused_changes_nothing("heartbeat (stale)", before, r);
            return;
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let lease = self
            .keel
            .heartbeat(self.clock, run, exec.token)
            .unwrap_or_else(|e| panic!("heartbeat of executing {run} ({}): {e}", exec.token));
        let now = self.keel.now();
        assert_eq!(lease.token, exec.token, "a heartbeat changed the token");
        assert_eq!(lease.owner, exec.owner);
        assert_eq!(
            (lease.renewed_at, lease.expires_at),
            (now, now.plus_ms(self.config.lease.ttl_ms)),
            "a heartbeat renews the lease for a TTL from now"
        );
        assert_eq!(self.keel.run(run).and_then(|r| r.lease()), Some(&lease));
        self.executing
            .get_mut(&run)
            .expect("picked from executing")
            .expires_at = lease.expires_at;
        self.stats.heartbeats += 1;
    }

    fn cancel(&mut self, pick: usize) {
        let ids: Vec<RunId> = self.keel.runs().map(|r| r.id()).collect();
        let i = pick % (ids.len() + 1);
        let id = ids.get(i).copied().unwrap_or(RunId(u64::MAX / 2));
        let was = self.keel.run(id).map(|r| r.state());
        let before = fingerprint(&self.keel);
        let r = self.keel.cancel_run(self.clock, id);
        if self
            .refused_changes_nothing("cancel_run", before, r)
            .is_none()
        {
            return;
        }
        let run = self
            .keel
            .run(id)
            .expect("a cancelled run is still in memory");
        match was.expect("accepted cancels name a known run") {
            RunState::Running { .. } => {
                assert!(matches!(run.state(), RunState::Running { .. }));
                assert!(run.cancel_requested());
                self.stats.cancel_requests += 1;
            }
            _ => {
                assert_eq!(run.state(), RunState::Cancelled);
                self.stats.terminal_runs += 1;
            }
        }
    }

    /// Drains every effect, playing the store and the executor.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            let Some(effect) = self.keel.poll_effect() else {
                self.check_after_drain();
                return;
            };
            match effect {
                Effect::Persist(batch) => {
                    if let Some(held) = &self.held {
                        panic!(
                            "{} emitted while {} is still unacknowledged",
                            batch.id, held.id
                        );
                    }
                    // In the liveness phase the store never fails.
                    let choice = if self.faults {
                        self.rng.below_inclusive(99)
                    } else {
                        0
                    };
                    match choice {
                        0..=64 => self.ack(batch),
                        65..=79 => self.fail(batch.id),
                        _ => self.held = Some(batch),
                    }
                }
                Effect::StartAttempt(start) => self.start(start),
                Effect::CancelAttempt { run, attempt, .. } => {
                    assert!(
                        self.handed_out.contains(&(run, attempt)),
                        "cancel for {run} attempt {attempt}, which was never handed out"
                    );
                }
                Effect::KillAttempt { run, attempt } => self.kill(run, attempt),
                Effect::VerifyArtifacts(request) => {
                    // Only a holder asks, under a token it was handed; `Op::Verified` answers.
                    assert_eq!(
                        self.tokens.get(&request.token),
                        Some(&request.run),
                        "{} asked for checks under {}, which it was never handed",
                        request.run,
                        request.token
                    );
                    self.verifying.push(request);
                }
                Effect::Deliver(send) => self.deliver(send),
                Effect::Event(event) => self.event(event),
            }
            self.keel.check_invariants();
            self.check_world();
        }
        panic!("the scheduler produced effects forever");
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::LeaseGranted { run, owner, token } => {
                // A grant is announced with its hand-out, once it is durable, never before (a
                // token announced earlier could be granted again after a crash).
                assert_eq!(
                    self.announce.take(),
                    Some((run, token, owner.clone())),
                    "{run} granted {token} to {owner}, but that is not the attempt just handed out"
                );
            }
            Event::LeaseReclaimed { run, token } => {
                let exec = self.executing.get(&run).cloned().unwrap_or_else(|| {
                    panic!("{token} of {run} reclaimed, but no attempt of {run} is executing")
                });
                assert_eq!(
                    exec.token, token,
                    "{run}: {token} reclaimed, but {} is executing",
                    exec.token
                );
                // SPEC L3: only after the lease expired, plus the grace.
                let due = exec.expires_at.plus_ms(self.config.lease.grace_ms);
                assert!(
                    self.last_tick >= due,
                    "{run}: {token} reclaimed at {}, before its expiry {} plus the grace",
                    self.last_tick,
                    exec.expires_at
                );
                let state = self.keel.run(run).map(|r| r.state());
                assert!(
                    !matches!(state, Some(RunState::Running { .. })),
                    "{run} still running after its lease was reclaimed"
                );
                self.retire(run);
                self.stats.reclaims += 1;
            }
            Event::IncidentOpened(_) => self.stats.incidents += 1,
            Event::CheckpointFailed { run, seq, .. } => {
                self.stats.checkpoints_failed += 1;
                // A save written by a flush may fail while the window of an earlier
                // acknowledged save is still closed; the next save is then throttled. That is
                // the core bug pinned by the ignored test
                // `the_save_after_a_failed_flushed_save_is_written_at_once`, left out here.
                // Events are polled after the fact: if a newer save was written since the
                // failure, that was the next save (checked then, or it had not failed yet).
                let latest = self
                    .keel
                    .run(run)
                    .and_then(|r| r.checkpoint())
                    .map(|c| c.seq);
                if !self.promises.flushed.contains(&(run, seq)) && latest == Some(seq) {
                    if let Some(exec) = self.executing.get(&run) {
                        self.promises.must_write.insert(run, exec.attempt);
                    }
                }
            }
            Event::CheckpointSaved { run, .. } => {
                self.promises.must_write.remove(&run);
            }
            Event::Delivery(event) => self.delivery_event(event),
            _ => {}
        }
    }

    fn ack(&mut self, batch: Batch) {
        self.promises.acknowledged(&batch, &mut self.store);
        self.acked_in_shutdown = self.keel.is_shutting_down();
        self.keel.handle_persisted(self.clock, batch.id);
        self.stats.batches_acked += 1;
    }

    fn fail(&mut self, id: BatchId) {
        self.keel
            .handle_persist_failed(self.clock, id, "injected: disk full");
        self.failed.push(id);
        self.stats.batches_failed += 1;
    }

    fn start(&mut self, start: AttemptStart) {
        let AttemptStart {
            run,
            attempt,
            idempotency_key,
            ref lease,
            ..
        } = start;
        let token = lease.token;
        let stored = self.store.run(run).unwrap_or_else(|| {
            panic!("persist before act: {run} attempt {attempt} handed out, but the store has never acknowledged the run")
        });
        assert_eq!(
            stored.state(),
            RunState::Starting { attempt },
            "persist before act: {run} attempt {attempt} handed out, but the store holds {:?}",
            stored.state()
        );
        assert_eq!(
            stored.lease().map(|l| l.token),
            Some(token),
            "persist before act: {run} attempt {attempt} handed out with {token}, but the \
             store holds {:?}",
            stored.lease()
        );
        assert!(
            !stored.cancel_requested(),
            "{run} attempt {attempt} handed out although the run's cancel request is durable"
        );
        assert_eq!(idempotency_key, IdempotencyKey { run, attempt });
        assert!(
            self.handed_out.insert((run, attempt)),
            "idempotency key {idempotency_key} handed out twice"
        );
        // Every job in these scenarios has kind "work" and a payload naming it.
        let expected = ("work".to_owned(), format!("payload of {}", start.job));
        assert!(
            (start.kind.to_string(), start.payload.to_string()) == expected,
            "{run} attempt {attempt} handed out with kind {:?} and payload {:?}",
            start.kind,
            start.payload
        );
        // SPEC C2: the attempt resumes from the run's durable checkpoint.
        assert_eq!(
            start.checkpoint.as_ref(),
            stored.checkpoint(),
            "{run} attempt {attempt} handed out with another checkpoint than the stored one"
        );
        // The lease: the one the store holds for this run (checked above), owned by the
        // executor (or the worker that claimed an external run), running for a TTL from the
        // hand-out; its grant is announced next.
        assert_eq!(
            stored.external(),
            self.promises.claims.contains_key(&run),
            "{run} attempt {attempt}: external runs, and only they, are claimed"
        );
        let owner = self.promises.owner_of(run, &self.local);
        assert_eq!(lease.owner, owner);
        let timeout_ms = stored.timeout_ms();
        assert_eq!(
            self.announce, None,
            "a hand-out before the previous one's grant was announced"
        );
        self.announce = Some((run, token, owner.clone()));
        // Nothing starts once shutdown began (the last acknowledgement handed this out: when a
        // batch is emitted no hand-out is queued).
        assert!(
            !self.acked_in_shutdown,
            "{run} attempt {attempt} handed out after begin_shutdown"
        );
        assert_eq!(
            lease.expires_at,
            lease.renewed_at.plus_ms(self.config.lease.ttl_ms),
            "{run} attempt {attempt}: the lease lasts a TTL"
        );
        // Unless the watchdog reclaimed it before this effect was polled, the attempt is
        // running, and its lease runs from the acknowledgement that handed it out.
        if let Some(RunState::Running { started_at, .. }) = self.keel.run(run).map(|r| r.state()) {
            assert_eq!(
                lease.renewed_at, started_at,
                "{run} attempt {attempt}: the lease does not run from the hand-out"
            );
        }
        // Tokens rise and never repeat, across crashes and restores: a token is above every
        // token handed out before the last restore and its run's earlier tokens. (Attempts
        // granted in one incarnation are handed out in batch order, which need not be grant
        // order: see `attempts_granted_together_are_handed_out_in_grant_order`.)
        if let Some(of) = self.tokens.insert(token, run) {
            panic!("{run} attempt {attempt} handed out with {token}, already handed out to {of}");
        }
        if let Some(floor) = self.floor {
            assert!(
                token > floor,
                "{run} attempt {attempt} handed out with {token}, not above {floor} handed out \
                 before the last restore"
            );
        }
        if let Some(last) = self.run_tokens.insert(run, token) {
            assert!(
                token > last,
                "{run} attempt {attempt} handed out with {token}, not above {last}, the token \
                 of its previous attempt"
            );
        }
        let previous = self.executing.insert(
            run,
            Executing {
                attempt,
                token,
                owner,
                started_at: lease.renewed_at,
                expires_at: lease.expires_at,
                timeout_ms,
                gate: None,
            },
        );
        assert!(
            previous.is_none(),
            "{run} attempt {attempt} handed out while {previous:?} executes"
        );
        self.stats.attempts_started += 1;
    }

    fn check_after_drain(&mut self) {
        assert!(
            self.promises.awaiting_end.is_empty(),
            "SPEC D4: deliveries {:?} ended durably, but no event counted them",
            self.promises.awaiting_end
        );
        let running: BTreeMap<RunId, (Attempt, Option<FencingToken>)> = self
            .keel
            .runs()
            .filter_map(|r| match r.state() {
                RunState::Running { attempt, .. } => {
                    Some((r.id(), (attempt, r.lease().map(|l| l.token))))
                }
                _ => None,
            })
            .collect();
        let executing: BTreeMap<RunId, (Attempt, Option<FencingToken>)> = self
            .executing
            .iter()
            .map(|(run, e)| (*run, (e.attempt, Some(e.token))))
            .collect();
        assert_eq!(
            running, executing,
            "runs in `Running` differ from the attempts handed out and neither reported nor \
             reclaimed"
        );
        if self.held.is_some() || !self.keel.is_quiescent() {
            return;
        }
        // Nothing pending: the store must say exactly what memory says.
        let memory: BTreeMap<&JobId, serde_json::Value> =
            self.keel.jobs().map(|j| (&j.spec.id, json(j))).collect();
        let stored: BTreeMap<&JobId, serde_json::Value> =
            self.store.jobs().map(|j| (&j.spec.id, json(j))).collect();
        assert_eq!(
            memory, stored,
            "quiescent, but stored jobs differ from memory"
        );
        for run in self.keel.runs() {
            assert!(
                !run.state().is_terminal(),
                "quiescent, but terminal {} is still in memory",
                run.id()
            );
            let stored = self.store.run(run.id()).map(json);
            assert_eq!(
                Some(json(run)),
                stored,
                "quiescent, but stored {} differs from memory",
                run.id()
            );
        }
        for run in self.store.runs() {
            assert!(
                run.state().is_terminal() || self.keel.run(run.id()).is_some(),
                "the store holds active {} but memory has forgotten it",
                run.id()
            );
        }
        let memory: BTreeMap<u64, Incident> =
            self.keel.incidents().map(|i| (i.id, i.clone())).collect();
        assert_eq!(
            memory,
            self.store
                .open_incidents()
                .map(|i| (i.id, i.clone()))
                .collect(),
            "quiescent, but the store's open incidents differ from memory"
        );
    }

    fn crash(&mut self) {
        if let Some(batch) = self.held.take() {
            // The write may have become durable without its acknowledgement arriving.
            if self.rng.chance(1, 2) {
                self.promises
                    .durable_unacknowledged(&batch, &mut self.store);
            }
        }
        self.promises.after_crash(&self.store);
        // Attempts of the in-process executor die with the process; external workers' attempts
        // do not (their leases are revived below, from what the store holds).
        let lost = std::mem::take(&mut self.executing);
        self.stale
            .extend(lost.into_iter().map(|(run, e)| (run, e.token)));
        self.throttled.clear();
        self.shutdown_floor = None;
        self.shutdown_backlog.clear();
        self.announce = None;
        self.acked_in_shutdown = false;
        self.refused_completions.clear();
        // The checks in flight were the old process's: the new one knows nothing of them.
        self.verifying.clear();
        self.floor = self.tokens.keys().next_back().copied();
        self.failed.clear();
        let snapshot = self.store.restore();
        let seed = self.rng.next_u64();
        let keel = Scheduler::restore(self.config.clone(), seed, self.clock, snapshot.clone());
        let twin = Scheduler::restore(self.config.clone(), seed, self.clock, snapshot);
        assert_eq!(
            format!("{keel:?}"),
            format!("{twin:?}"),
            "restore from the same snapshot and seed is not deterministic"
        );
        self.keel = keel;
        self.last_tick = self.keel.now();
        self.stats.crashes += 1;
        // SPEC L3: an attempt handed out to an external worker outlives the process; its lease
        // stands as the store holds it (a report the store never received is undone with the
        // rest, so the worker's token is current again), and only expiry reclaims it.
        for InProgress {
            run,
            attempt,
            started_at,
            lease,
            timeout_ms,
        } in attempts_in_progress(&self.keel)
        {
            assert_ne!(
                lease.owner, self.local,
                "{run}: an in-process attempt survived a crash"
            );
            assert_eq!(
                self.tokens.get(&lease.token),
                Some(&run),
                "{run} restored running with {}, never handed out",
                lease.token
            );
            self.stale.retain(|stale| *stale != (run, lease.token));
            self.executing.insert(
                run,
                Executing {
                    attempt,
                    token: lease.token,
                    owner: lease.owner,
                    started_at,
                    expires_at: lease.expires_at,
                    timeout_ms,
                    gate: None,
                },
            );
        }
    }

    /// The executing attempt of `run` is over (reported, released, reclaimed, killed): its
    /// token is stale from now on, and so is what the test knew about its checkpoints.
    /// The checks of the request in flight at `pick` come back. A success waiting for them is
    /// applied if every target was found and refused (`ArtifactGate`, the attempt running on)
    /// otherwise; a request whose attempt is over is refused and leaves its run alone.
    fn verified(&mut self, pick: usize) {
        if self.verifying.is_empty() {
            return;
        }
        let request = self.verifying.remove(pick % self.verifying.len());
        let results: Vec<keel_core::CheckResult> = request
            .checks
            .iter()
            .map(|check| keel_core::CheckResult {
                status: Some(if check.target.ends_with("/404") {
                    404
                } else {
                    200
                }),
                error: None,
                excerpt: String::new(),
            })
            .collect();
        let found = results.iter().all(|r| r.status == Some(200));
        let waiting = self
            .executing
            .get(&request.run)
            .is_some_and(|e| e.token == request.token && e.gate == Some(request.id));
        let before = self.keel.run(request.run).cloned();
        let result = self.keel.handle_verified(self.clock, request.id, results);
        if !waiting {
            assert!(
                matches!(
                    result,
                    Err(Rejected::StaleToken { .. }
                        | Rejected::NotRunning { .. }
                        | Rejected::UnknownRun(_))
                ),
                "{}: checks of an attempt that is over answered {result:?}",
                request.run
            );
            // The answer is used up; the run is left as it was (no evidence for an attempt
            // that is over).
            assert_eq!(
                before.as_ref(),
                self.keel.run(request.run),
                "a refused answer changed its run"
            );
            return;
        }
        if !found {
            assert!(
                matches!(&result, Err(Rejected::ArtifactGate { run, failed })
                    if *run == request.run && failed.iter().all(|v| v.status == Some(404))),
                "{}: a 404 must refuse the completion: {result:?}",
                request.run
            );
            self.executing
                .get_mut(&request.run)
                .expect("checked above")
                .gate = None;
            self.stats.artifact_refusals += 1;
            self.stats.gates_refused += 1;
            return;
        }
        assert!(
            matches!(result, Ok(Verified::Accepted(_))),
            "{}: every artifact was found: {result:?}",
            request.run
        );
        self.retire(request.run);
        self.stats.outcomes += 1;
        self.stats.gates_passed += 1;
        let run = self
            .keel
            .run(request.run)
            .expect("a run stays in memory until its record is acknowledged");
        assert_eq!(run.state(), RunState::Succeeded);
        assert!(run.verifications().iter().any(|v| v.ok));
        self.stats.terminal_runs += 1;
    }

    fn retire(&mut self, run: RunId) -> Executing {
        let exec = self
            .executing
            .remove(&run)
            .unwrap_or_else(|| panic!("{run} has no executing attempt"));
        self.stale.push((run, exec.token));
        self.promises.must_write.remove(&run);
        self.throttled.remove(&run);
        exec
    }

    /// Whole-world invariants beyond `Scheduler::check_invariants`, after every step and every
    /// drained effect.
    fn check_world(&self) {
        // SPEC D1: the outbox is bounded.
        let outbox = self.keel.outbox();
        outbox.check_invariants();
        assert!(
            outbox.len() <= self.config.outbox.capacity,
            "the outbox holds {} deliveries, above its capacity {}",
            outbox.len(),
            self.config.outbox.capacity
        );
        for run in self.keel.runs() {
            // SPEC W1: one extension per run at most, and the run's flag says whether it had it.
            let granted = self.promises.extended.get(&run.id()).copied().unwrap_or(0);
            assert!(granted <= 1, "{} extended {granted} times", run.id());
            assert_eq!(
                run.extended(),
                granted == 1,
                "{}: extended flag {} but {granted} extensions granted",
                run.id(),
                run.extended()
            );
            // No run loops forever: attempts stay within the budgets.
            assert!(
                run.attempt().0 <= run.retry().attempts_max + run.lost() + run.snoozes(),
                "{} at attempt {}, above attempts_max {} + lost {} + snoozes {}",
                run.id(),
                run.attempt(),
                run.retry().attempts_max,
                run.lost(),
                run.snoozes()
            );
        }
        // SPEC W2: a kill is sticky.
        for (run, attempt) in &self.promises.killed {
            let Some(r) = self.keel.run(*run) else {
                continue;
            };
            assert!(
                r.killed() >= Some(*attempt),
                "{run}: attempt {attempt} was killed, but the run says killed {:?}",
                r.killed()
            );
            assert!(
                !matches!(
                    r.state(),
                    RunState::Starting { attempt: a } | RunState::Running { attempt: a, .. }
                        if a == *attempt
                ),
                "{run}: killed attempt {attempt} is in progress again"
            );
        }
    }
}

// ----- helpers ----------------------------------------------------------------------------

fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).expect("a valid RFC 3339 instant")
}

fn job_id(i: usize) -> JobId {
    JobId::new(&format!("job-{}", i % JOB_POOL)).expect("a valid job id")
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("serialisable")
}

/// Everything observable about a scheduler except its clamped `now`, which every input may
/// move forward whether or not it is refused.
fn fingerprint(keel: &Scheduler) -> String {
    let jobs: Vec<&Job> = keel.jobs().collect();
    let runs: Vec<&Run> = keel.runs().collect();
    // The whole state, clock included: a refused command must not even move `now`.
    let full = format!("{keel:?}");
    format!(
        "jobs {jobs:?}\nruns {runs:?}\ntimeout {:?} quiescent {}\nall {full}",
        keel.poll_timeout(),
        keel.is_quiescent()
    )
}

// ----- property tests ---------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_sequences_keep_every_invariant(scenario in scenario()) {
        World::run(&scenario);
    }
}

/// Guards against a vacuous property test: the same generator, with a fixed seed, must reach
/// every kind of step the invariants are about.
#[test]
fn random_sequences_reach_the_interesting_states() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let mut total = Stats::default();
    for _ in 0..64 {
        let scenario = strategy
            .new_tree(&mut runner)
            .expect("a scenario")
            .current();
        total.add(&World::run(&scenario));
    }
    assert!(total.batches_acked > 0, "{total:?}");
    assert!(total.batches_failed > 0, "{total:?}");
    assert!(total.attempts_started > 20, "{total:?}");
    assert!(total.outcomes > 20, "{total:?}");
    assert!(total.refusals > 0, "{total:?}");
    assert!(total.crashes > 0, "{total:?}");
    assert!(total.terminal_runs > 10, "{total:?}");
    assert!(total.cancel_requests > 0, "{total:?}");
    assert!(total.reclaims > 0, "{total:?}");
    assert!(total.heartbeats > 5, "{total:?}");
    assert!(total.stale_refused > 10, "{total:?}");
    assert!(total.incidents > 0, "{total:?}");
    // The worker protocol, the watchdog, checkpoints, the outbox, shutdown and liveness.
    assert!(total.claims > 20 && total.empty_claims > 0, "{total:?}");
    assert!(total.progress > 5 && total.contexts > 0, "{total:?}");
    assert!(
        total.releases > 5 && total.already_released > 0,
        "{total:?}"
    );
    assert!(
        total.extensions > 5 && total.extensions_refused > 5,
        "{total:?}"
    );
    assert!(total.kills > 0, "{total:?}");
    assert!(total.checkpoints_saved > 20, "{total:?}");
    assert!(total.checkpoints_throttled > 5, "{total:?}");
    assert!(total.checkpoints_failed > 0, "{total:?}");
    assert!(total.saves_after_failure > 0, "{total:?}");
    assert!(total.artifact_refusals > 0, "{total:?}");
    assert!(
        total.gates_passed > 0 && total.gates_refused > 0,
        "{total:?}"
    );
    assert!(total.sends > 20 && total.answers > 20, "{total:?}");
    assert!(total.notice_sends > 5, "{total:?}");
    assert!(total.escalation_sends > 0, "{total:?}");
    assert!(total.stale_answers > 10, "{total:?}");
    assert!(total.deliveries_finished > 20, "{total:?}");
    assert!(total.deliveries_dropped > 0, "{total:?}");
    assert!(total.shutdowns > 0, "{total:?}");
    assert!(total.liveness_rounds > 0, "{total:?}");
}

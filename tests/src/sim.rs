//! The deterministic simulator: a seeded world around one [`Scheduler`].
//!
//! The world has two clocks. *Real* time only moves forward and orders every event the world
//! schedules (a store write completing, a handler finishing). *Wall* time is what the scheduler
//! is told (`now`); it is real time plus an offset that [`Sim::jump_clock`] changes, so a test
//! can make the wall clock jump forwards or backwards under the scheduler.
//!
//! Each step takes the earliest of (a) the next world event and (b) the scheduler's
//! `poll_timeout`, advances real time to it, delivers it, drains every effect, and then checks
//! invariants: the scheduler's own [`Scheduler::check_invariants`], the store's safety
//! properties ([`MemStore`]), persist-before-act (an attempt is only handed out after the store
//! holds its record), and that `poll_timeout` is later than `now` after a timeout.
//!
//! Faults ([`Faults`]): store writes that take time, fail, or complete without their
//! acknowledgement reaching the core before a crash; and crashes at random steps, which drop
//! every unacknowledged write and every executing attempt and rebuild the scheduler with
//! [`Scheduler::restore`] from what the store holds.
//!
//! Every step appends one line to a trace; the same seed gives the same trace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use keel_core::outbox::{DeliveryId, DeliveryResult, OutboxEvent, SendRequest};
use keel_core::rng::SplitMix64;
use keel_core::{
    Attempt, AttemptStart, BatchId, Config, Effect, Event, FencingToken, JobId, JobSpec, Outcome,
    Rejected, Run, RunId, Scheduler, Timestamp, WorkerId,
};

use crate::store::MemStore;

/// What a simulated handler does with one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    /// How long the attempt takes, in real milliseconds.
    pub takes_ms: u64,
    /// What it reports at the end.
    pub outcome: Outcome,
}

impl Execution {
    /// Succeeds after `takes_ms`.
    pub fn succeed_after(takes_ms: u64) -> Self {
        Execution {
            takes_ms,
            outcome: Outcome::ok(),
        }
    }

    /// Fails retryably after `takes_ms`.
    pub fn fail_after(takes_ms: u64, message: &str) -> Self {
        Execution {
            takes_ms,
            outcome: Outcome::Retryable {
                message: message.into(),
            },
        }
    }

    /// Fails permanently after `takes_ms`.
    pub fn fail_permanently_after(takes_ms: u64, message: &str) -> Self {
        Execution {
            takes_ms,
            outcome: Outcome::Permanent {
                message: message.into(),
            },
        }
    }
}

/// A simulated sink: for each delivery attempt, how long the answer takes and what it is.
pub type Sink = Box<dyn FnMut(&SendRequest, &mut SplitMix64) -> (u64, DeliveryResult)>;

/// A simulated handler: decides each attempt's duration and outcome. It gets the attempt and
/// the world's generator, so random behaviour is still reproducible from the seed.
pub type Handler = Box<dyn FnMut(&AttemptStart, &mut SplitMix64) -> Execution>;

/// Faults the world injects. Probabilities are per mille.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// Shortest time a store write takes, in ms.
    pub persist_delay_min_ms: u64,
    /// Longest time a store write takes, in ms.
    pub persist_delay_max_ms: u64,
    /// Chance that a store write fails (nothing applied; the core is told).
    pub persist_fail_per_mille: u64,
    /// Longest delay between a write becoming durable and its acknowledgement reaching the
    /// core; a crash in between leaves durable-but-unacknowledged data.
    pub ack_delay_max_ms: u64,
    /// Chance, per step, that the process crashes (and restarts at once).
    pub crash_per_mille: u64,
    /// Chance, per attempt, that its holder stalls: it stops heartbeating (an event loop
    /// blocked) but still reports its outcome when it finishes, possibly after its lease was
    /// reclaimed (the report must then be refused).
    pub stall_per_mille: u64,
}

impl Faults {
    /// No faults: writes complete in 1 ms and never fail; no crashes.
    pub const NONE: Faults = Faults {
        persist_delay_min_ms: 1,
        persist_delay_max_ms: 1,
        persist_fail_per_mille: 0,
        ack_delay_max_ms: 0,
        crash_per_mille: 0,
        stall_per_mille: 0,
    };

    /// A hostile world: slow and failing writes, late acknowledgements and frequent crashes.
    pub const HOSTILE: Faults = Faults {
        persist_delay_min_ms: 1,
        persist_delay_max_ms: 200,
        persist_fail_per_mille: 100,
        ack_delay_max_ms: 50,
        crash_per_mille: 5,
        stall_per_mille: 20,
    };
}

/// How to build a [`Sim`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seeds the world and the scheduler.
    pub seed: u64,
    /// Where real and wall time start.
    pub start: Timestamp,
    /// The scheduler's settings.
    pub scheduler: Config,
    /// Faults to inject until [`Sim::heal`].
    pub faults: Faults,
}

impl SimConfig {
    /// A fault-free world starting at 2026-01-01T00:00:00Z.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            start: Timestamp::from_millis(1_767_225_600_000),
            scheduler: Config::default(),
            faults: Faults::NONE,
        }
    }

    /// Sets the start instant.
    pub fn start(mut self, start: Timestamp) -> Self {
        self.start = start;
        self
    }

    /// Sets the faults.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Sets the scheduler's settings.
    pub fn scheduler(mut self, config: Config) -> Self {
        self.scheduler = config;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum WorldEvent {
    /// A store write finished: applied (and its acknowledgement scheduled) or failed.
    WriteDone { batch_index: usize, ok: bool },
    /// The acknowledgement of a durable write reaches the core.
    Ack { batch: BatchId },
    /// An attempt finished.
    AttemptDone {
        run: RunId,
        attempt: Attempt,
        token: FencingToken,
        outcome: Outcome,
    },
    /// The holder of an attempt renews its lease.
    Heartbeat { run: RunId, token: FencingToken },
    /// An external worker asks for work.
    WorkerPoll { worker: usize },
    /// A sink answered a delivery attempt.
    DeliveryDone {
        id: DeliveryId,
        attempt: u32,
        result: DeliveryResult,
    },
    /// Artifact checks came back (in this world every artifact is there: URLs answer 200,
    /// files exist).
    Verified {
        id: keel_core::VerifyId,
        results: Vec<keel_core::CheckResult>,
    },
}

/// The answers of a world where every artifact is there: each URL answers HTTP 200 and each
/// file exists. For simulated worlds that answer `Effect::VerifyArtifacts`.
pub fn artifacts_present(request: &keel_core::VerifyRequest) -> Vec<keel_core::CheckResult> {
    request
        .checks
        .iter()
        .map(|check| keel_core::CheckResult {
            status: (check.kind == keel_core::TargetKind::Url).then_some(200),
            error: None,
            excerpt: "ok".into(),
        })
        .collect()
}

/// A simulated external worker: polls `claim` for its kinds every `poll_ms`.
#[derive(Clone, Debug)]
struct Worker {
    id: WorkerId,
    kinds: Vec<String>,
    poll_ms: u64,
}

/// A seeded, simulated world around one scheduler.
pub struct Sim {
    config: SimConfig,
    faults: Faults,
    rng: SplitMix64,
    core: Scheduler,
    store: MemStore,
    handlers: BTreeMap<String, Handler>,
    sinks: BTreeMap<String, Sink>,
    /// Delivery results by sink and status, counted from `Finished` events (SPEC D4).
    delivery_counts: BTreeMap<(String, String), u64>,
    real: Timestamp,
    offset_ms: i64,
    events: BTreeMap<(Timestamp, u64), (u64, WorldEvent)>,
    event_seq: u64,
    incarnation: u64,
    writes: Vec<keel_core::Batch>,
    /// Attempts in progress, by run and token.
    executing: BTreeSet<(RunId, FencingToken)>,
    workers: Vec<Worker>,
    trace: Vec<String>,
    crashes: u64,
    /// Tokens of attempts whose holder stalled (no heartbeats, no reaction to cancels).
    stalled: BTreeSet<FencingToken>,
    tokens: BTreeSet<FencingToken>,
    run_tokens: BTreeMap<RunId, FencingToken>,
    tokens_before_restart: FencingToken,
    refused_reports: u64,
    steps: u64,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.config.seed)
            .field("real", &self.real)
            .field("wall", &self.wall())
            .field("steps", &self.steps)
            .field("crashes", &self.crashes)
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// A world with an empty scheduler and store.
    pub fn new(config: SimConfig) -> Self {
        let core = Scheduler::new(config.scheduler.clone(), config.seed, config.start);
        Sim {
            faults: config.faults,
            rng: SplitMix64::new(config.seed ^ 0x5EED_0F57_0123_4567),
            core,
            store: MemStore::new(),
            handlers: BTreeMap::new(),
            sinks: BTreeMap::new(),
            delivery_counts: BTreeMap::new(),
            real: config.start,
            offset_ms: 0,
            events: BTreeMap::new(),
            event_seq: 0,
            incarnation: 0,
            writes: Vec::new(),
            executing: BTreeSet::new(),
            workers: Vec::new(),
            trace: Vec::new(),
            crashes: 0,
            stalled: BTreeSet::new(),
            tokens: BTreeSet::new(),
            run_tokens: BTreeMap::new(),
            tokens_before_restart: FencingToken(0),
            refused_reports: 0,
            steps: 0,
            config,
        }
    }

    /// Registers the handler for jobs of `kind`. Attempts of a kind without a handler fail
    /// permanently with a message that says so.
    pub fn handle(
        &mut self,
        kind: &str,
        handler: impl FnMut(&AttemptStart, &mut SplitMix64) -> Execution + 'static,
    ) {
        self.handlers.insert(kind.to_owned(), Box::new(handler));
    }

    /// Adds a job at the current wall time and runs the world until the store holds it.
    ///
    /// Faults are suspended until then: this is a test's setup, and a job lost to a simulated
    /// crash before its first write would make the test about nothing. (`Ok` from
    /// [`Scheduler::add_job`] means accepted, not stored: a real driver knows the job is durable
    /// when the batch carrying it is acknowledged, and re-adds it if the process died first.)
    pub fn add_job(&mut self, spec: JobSpec) -> Result<(), Rejected> {
        let now = self.wall();
        let id = spec.id.clone();
        self.core.add_job(now, spec)?;
        self.log(format!("add_job {id}"));
        let faults = std::mem::replace(&mut self.faults, Faults::NONE);
        while self.store.job(&id).is_none() && self.step(Timestamp::MAX) {}
        self.faults = faults;
        Ok(())
    }

    /// Runs a command against the scheduler at the current wall time, then drains its effects.
    /// For commands the simulator does not wrap (update, pause, trigger, cancel …).
    pub fn command<T>(
        &mut self,
        what: &str,
        command: impl FnOnce(&mut Scheduler, Timestamp) -> Result<T, Rejected>,
    ) -> Result<T, Rejected> {
        let now = self.wall();
        let result = command(&mut self.core, now);
        self.log(format!(
            "{what} -> {}",
            if result.is_ok() { "ok" } else { "rejected" }
        ));
        self.drain();
        self.core.check_invariants();
        result
    }

    /// The current wall time (what the scheduler is told).
    pub fn wall(&self) -> Timestamp {
        Timestamp(self.real.as_millis() + self.offset_ms)
    }

    /// The current real time.
    pub fn real(&self) -> Timestamp {
        self.real
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.core
    }

    /// The durable store.
    pub fn store(&self) -> &MemStore {
        &self.store
    }

    /// The trace so far: one line per step.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// Crashes so far.
    pub fn crashes(&self) -> u64 {
        self.crashes
    }

    /// Durable runs of a job (terminal ones included), ordered by id.
    pub fn runs_of(&self, job: &str) -> Vec<Run> {
        let id = JobId::new(job).expect("a valid job name");
        self.store.runs_of(&id).cloned().collect()
    }

    /// Moves the wall clock by `delta_ms` (negative: backwards) without moving real time.
    pub fn jump_clock(&mut self, delta_ms: i64) {
        self.offset_ms += delta_ms;
        self.log(format!("clock jumps {delta_ms:+} ms"));
    }

    /// Stops injecting faults (liveness phase).
    pub fn heal(&mut self) {
        self.faults = Faults::NONE;
        self.log("heal".into());
    }

    /// Crashes the process now and restarts it: unacknowledged writes and executing attempts
    /// are lost; the scheduler is rebuilt from the store.
    pub fn crash(&mut self) {
        self.crashes += 1;
        self.incarnation += 1;
        if let Some(max) = self.tokens.last() {
            self.tokens_before_restart = *max;
        }
        self.events.clear();
        self.writes.clear();
        self.executing.clear();
        let now = self.wall();
        self.core = Scheduler::restore(
            self.config.scheduler.clone(),
            self.config.seed.wrapping_add(self.incarnation),
            now,
            self.store.restore(),
        );
        self.log(format!("crash #{} and restore", self.crashes));
        // External workers are other processes: they survive the crash and poll again.
        for worker in 0..self.workers.len() {
            let poll = self.workers[worker].poll_ms;
            self.schedule(poll, WorldEvent::WorkerPoll { worker });
        }
        self.drain();
        self.core.check_invariants();
    }

    /// Runs until real time reaches `until` (or nothing at all is left to happen).
    pub fn run_until(&mut self, until: Timestamp) {
        while self.step(until) {}
        if self.real < until {
            self.real = until;
        }
    }

    /// Runs for `ms` of real time.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.real.plus_ms(ms);
        self.run_until(until);
    }

    /// The liveness phase: heal every fault, run for up to `within_ms`, and panic unless every
    /// run that existed when it began has reached a terminal state in the store.
    pub fn check_liveness(&mut self, within_ms: u64) {
        self.heal();
        let pending: Vec<RunId> = self.core.runs().map(|r| r.id()).collect();
        let deadline = self.real.plus_ms(within_ms);
        while self.real < deadline {
            let done = pending.iter().all(|id| {
                self.store
                    .run(*id)
                    .is_some_and(|run| run.state().is_terminal())
                    || self.core.run(*id).is_none() && self.store.run(*id).is_none()
            });
            if done {
                return;
            }
            if !self.step(deadline) {
                break;
            }
        }
        let stuck: Vec<String> = pending
            .iter()
            .filter_map(|id| self.core.run(*id))
            .filter(|r| !r.state().is_terminal())
            .map(|r| format!("{} {:?}", r.id(), r.state()))
            .collect();
        assert!(
            stuck.is_empty(),
            "liveness: runs not terminal after {within_ms} ms of healed time: {stuck:?}"
        );
    }

    /// One step: deliver the earliest world event or scheduler timeout at or before `until`.
    /// Returns false if there was none.
    fn step(&mut self, until: Timestamp) -> bool {
        self.drain();
        let next_event = self.events.keys().next().map(|(at, _)| *at);
        // The scheduler's deadlines are wall instants; convert to real time. A wall clock set
        // back means a deadline further away in real time, never one in the past.
        let next_timeout = self
            .core
            .poll_timeout()
            .map(|wall| Timestamp(wall.as_millis() - self.offset_ms).max(self.real));
        let (at, is_event) = match (next_event, next_timeout) {
            (Some(e), Some(t)) if e <= t => (e, true),
            (Some(e), None) => (e, true),
            (_, Some(t)) => (t, false),
            (None, None) => return false,
        };
        if at > until {
            return false;
        }
        self.real = self.real.max(at);
        self.steps += 1;
        if self.faults.crash_per_mille > 0 && self.rng.chance(self.faults.crash_per_mille, 1000) {
            self.crash();
            return true;
        }
        if is_event {
            let (key, (incarnation, event)) = self.events.pop_first().expect("peeked");
            debug_assert_eq!(key.0, at);
            if incarnation == self.incarnation {
                self.deliver(event);
            }
        } else {
            let now = self.wall();
            self.core.handle_timeout(now);
            self.log(format!("tick {now}"));
            let clamped = self.core.now();
            if let Some(next) = self.core.poll_timeout() {
                assert!(
                    next > clamped,
                    "poll_timeout {next} not after now {clamped}: the scheduler would busy-loop"
                );
            }
        }
        self.drain();
        self.core.check_invariants();
        true
    }

    fn deliver(&mut self, event: WorldEvent) {
        let now = self.wall();
        match event {
            WorldEvent::WriteDone { batch_index, ok } => {
                let batch = self.writes[batch_index].clone();
                if ok {
                    self.store.apply(&batch);
                    let delay = self.rng.below_inclusive(self.faults.ack_delay_max_ms);
                    self.log(format!(
                        "{} durable ({} records)",
                        batch.id,
                        batch.records.len()
                    ));
                    self.schedule(delay, WorldEvent::Ack { batch: batch.id });
                } else {
                    self.log(format!("{} failed", batch.id));
                    self.core
                        .handle_persist_failed(now, batch.id, "simulated write failure");
                }
            }
            WorldEvent::Ack { batch } => {
                self.log(format!("{batch} acknowledged"));
                self.core.handle_persisted(now, batch);
            }
            WorldEvent::AttemptDone {
                run,
                attempt,
                token,
                outcome,
            } => {
                self.executing.remove(&(run, token));
                let result = self.core.handle_outcome(now, run, token, outcome.clone());
                if let Err(refusal) = &result {
                    // Only a holder that lost its lease may be refused.
                    assert!(
                        matches!(
                            refusal,
                            Rejected::StaleToken { .. }
                                | Rejected::NotRunning { .. }
                                | Rejected::UnknownRun(_)
                        ),
                        "{run} attempt {attempt}: outcome refused: {refusal}"
                    );
                    self.refused_reports += 1;
                }
                self.log(format!(
                    "{run} attempt {attempt} -> {} {}",
                    outcome.name(),
                    if result.is_ok() {
                        ""
                    } else {
                        "(refused: lease lost)"
                    }
                ));
            }
            WorldEvent::Heartbeat { run, token } => {
                if !self.executing.contains(&(run, token)) {
                    return;
                }
                match self.core.heartbeat(now, run, token) {
                    Ok(_) => {
                        let every = self.config.scheduler.lease.ttl_ms / 2;
                        self.schedule(every, WorldEvent::Heartbeat { run, token });
                    }
                    Err(e) => self.log(format!("{run} heartbeat refused: {e}")),
                }
            }
            WorldEvent::DeliveryDone {
                id,
                attempt,
                result,
            } => {
                let answer = format!("{result:?}");
                let accepted = self
                    .core
                    .handle_delivery_result(now, id, attempt, result)
                    .is_ok();
                self.log(format!(
                    "{id} attempt {attempt} -> {answer}{}",
                    if accepted { "" } else { " (refused)" }
                ));
            }
            WorldEvent::Verified { id, results } => {
                match self.core.handle_verified(now, id, results) {
                    Ok(verified) => self.log(format!("{id} -> {verified:?}")),
                    // The attempt ended (or changed hands) while its artifacts were checked.
                    Err(e) => self.log(format!("{id} refused: {e}")),
                }
            }
            WorldEvent::WorkerPoll { worker } => {
                let Worker { id, kinds, poll_ms } = self.workers[worker].clone();
                let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
                match self.core.claim(now, &id, &kinds) {
                    Ok(Some(claimed)) => self.log(format!("{id} claimed {}", claimed.run)),
                    Ok(None) => {}
                    Err(e) => self.log(format!("{id} claim refused: {e}")),
                }
                self.schedule(poll_ms, WorldEvent::WorkerPoll { worker });
            }
        }
    }

    fn drain(&mut self) {
        while let Some(effect) = self.core.poll_effect() {
            match effect {
                Effect::Persist(batch) => {
                    let f = self.faults;
                    let span = f
                        .persist_delay_max_ms
                        .saturating_sub(f.persist_delay_min_ms);
                    let delay = f.persist_delay_min_ms + self.rng.below_inclusive(span);
                    let ok = !self.rng.chance(f.persist_fail_per_mille, 1000);
                    self.log(format!(
                        "persist {} ({} records)",
                        batch.id,
                        batch.records.len()
                    ));
                    self.writes.push(batch);
                    let batch_index = self.writes.len() - 1;
                    self.schedule(delay, WorldEvent::WriteDone { batch_index, ok });
                }
                Effect::StartAttempt(start) => self.start_attempt(start),
                Effect::CancelAttempt { run, attempt, .. } => {
                    // The simulated handler honours cancellation at once (unless stalled).
                    let done = self.events.iter().find_map(|(key, (_, e))| match e {
                        WorldEvent::AttemptDone {
                            run: r,
                            attempt: a,
                            token,
                            ..
                        } if *r == run && *a == attempt && !self.stalled.contains(token) => {
                            Some((*key, *token))
                        }
                        _ => None,
                    });
                    if let Some((key, token)) = done {
                        self.events.remove(&key);
                        let outcome = Outcome::Cancelled {
                            reason: "cancel requested".into(),
                        };
                        let done = WorldEvent::AttemptDone {
                            run,
                            attempt,
                            token,
                            outcome,
                        };
                        self.schedule(1, done);
                    }
                    self.log(format!("cancel {run} attempt {attempt}"));
                }
                Effect::KillAttempt { run, attempt } => {
                    // The process running the attempt is killed: it reports nothing.
                    self.events.retain(|_, (_, e)| {
                        !matches!(e, WorldEvent::AttemptDone { run: r, attempt: a, .. } if *r == run && *a == attempt)
                    });
                    self.executing.retain(|(r, _)| *r != run);
                    self.log(format!("kill {run} attempt {attempt}"));
                }
                Effect::VerifyArtifacts(request) => {
                    let results = artifacts_present(&request);
                    self.log(format!(
                        "verify {} of {}: {} check(s)",
                        request.id,
                        request.run,
                        request.checks.len()
                    ));
                    let takes_ms = 1 + self.rng.below_inclusive(50);
                    let done = WorldEvent::Verified {
                        id: request.id,
                        results,
                    };
                    self.schedule(takes_ms, done);
                }
                Effect::Deliver(send) => {
                    let (takes_ms, result) = match self.sinks.get_mut(&*send.sink) {
                        Some(sink) => sink(&send, &mut self.rng),
                        None => (
                            0,
                            DeliveryResult::Permanent {
                                error: format!("no sink named {:?}", send.sink),
                            },
                        ),
                    };
                    self.log(format!(
                        "deliver {} attempt {} of {} to {}",
                        send.id,
                        send.attempt,
                        send.payload.subject(),
                        send.sink
                    ));
                    let done = WorldEvent::DeliveryDone {
                        id: send.id,
                        attempt: send.attempt,
                        result,
                    };
                    self.schedule(takes_ms, done);
                }
                Effect::Event(event) => {
                    if let Event::Delivery(OutboxEvent::Finished { sink, status, .. }) = &event {
                        *self
                            .delivery_counts
                            .entry((sink.to_string(), status.to_string()))
                            .or_default() += 1;
                    }
                    self.log(format!("event {event:?}"));
                }
            }
        }
    }

    fn start_attempt(&mut self, start: AttemptStart) {
        // Persist before act: the store must already hold this attempt's record, with its
        // lease (SPEC T1).
        let durable = self
            .store
            .run(start.run)
            .map(|r| (r.attempt(), r.lease().map(|l| l.token)));
        assert!(
            durable.is_some_and(
                |(a, token)| a >= start.attempt && token.is_none_or(|t| t >= start.lease.token)
            ),
            "{} attempt {} handed out before the store held it with its lease (store has \
             {durable:?})",
            start.run,
            start.attempt
        );
        // Fencing tokens never repeat, rise for each run, and rise across restarts (SPEC L1).
        // (Attempts granted together are handed out in job order, so across different runs
        // hand-out order need not follow grant order; fencing is per run.)
        let token = start.lease.token;
        assert!(self.tokens.insert(token), "{token} handed out twice");
        let previous = self.run_tokens.insert(start.run, token);
        assert!(
            previous.is_none_or(|p| p < token),
            "{} got {token} after {previous:?}",
            start.run
        );
        assert!(
            token > self.tokens_before_restart,
            "{token} not above {} handed out before the last restart",
            self.tokens_before_restart
        );
        let execution = match self.handlers.get_mut(&*start.kind) {
            Some(handler) => handler(&start, &mut self.rng),
            None => Execution::fail_permanently_after(
                0,
                &format!("no handler for kind {:?}", start.kind),
            ),
        };
        let token = start.lease.token;
        let stalls = self.rng.chance(self.faults.stall_per_mille, 1000);
        self.log(format!(
            "start {} attempt {} of {} by {} with {token} ({} ms{})",
            start.run,
            start.attempt,
            start.job,
            start.lease.owner,
            execution.takes_ms,
            if stalls { ", stalls" } else { "" }
        ));
        self.executing.insert((start.run, token));
        if stalls {
            self.stalled.insert(token);
        } else {
            let every = self.config.scheduler.lease.ttl_ms / 2;
            self.schedule(
                every,
                WorldEvent::Heartbeat {
                    run: start.run,
                    token,
                },
            );
        }
        self.schedule(
            execution.takes_ms,
            WorldEvent::AttemptDone {
                run: start.run,
                attempt: start.attempt,
                token,
                outcome: execution.outcome,
            },
        );
    }

    /// Adds an external worker that claims runs of `kinds` every `poll_ms` (another process:
    /// it survives simulated crashes of the scheduler). Its attempts run the handlers
    /// registered for their kinds.
    pub fn add_worker(&mut self, name: &str, kinds: &[&str], poll_ms: u64) {
        let worker = self.workers.len();
        self.workers.push(Worker {
            id: WorkerId::new(name).expect("a valid worker name"),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            poll_ms,
        });
        self.schedule(poll_ms, WorldEvent::WorkerPoll { worker });
    }

    /// Registers a sink: for each delivery attempt, how long the answer takes and what it is.
    pub fn sink(
        &mut self,
        name: &str,
        sink: impl FnMut(&SendRequest, &mut SplitMix64) -> (u64, DeliveryResult) + 'static,
    ) {
        self.sinks.insert(name.to_owned(), Box::new(sink));
    }

    /// Finished deliveries counted by (sink, status), from the `Finished` events: the counter
    /// of SPEC D4, one increment per delivery.
    pub fn delivery_counts(&self) -> &BTreeMap<(String, String), u64> {
        &self.delivery_counts
    }

    /// Outcomes refused because their holder had lost its lease (stale token).
    pub fn refused_reports(&self) -> u64 {
        self.refused_reports
    }

    fn schedule(&mut self, delay_ms: u64, event: WorldEvent) {
        self.event_seq += 1;
        self.events.insert(
            (self.real.plus_ms(delay_ms), self.event_seq),
            (self.incarnation, event),
        );
    }

    fn log(&mut self, line: String) {
        let mut entry = String::new();
        let _ = write!(entry, "{} {}", self.real.as_millis(), line);
        self.trace.push(entry);
    }
}

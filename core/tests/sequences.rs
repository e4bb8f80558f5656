//! Random command and event sequences against one `Scheduler`, with whole-state invariants
//! checked after every step (STYLE.md "Tests"), plus deterministic scenarios for paths that
//! random sequences rarely reach.
//!
//! The test plays the driver and the store. It keeps a model store: the records of every
//! acknowledged batch, applied in order after a serde round trip, exactly what a real store
//! would hand back to `Scheduler::restore`. A "crash" drops the scheduler with everything not
//! acknowledged (the batch in flight, pending effects, attempts executing), possibly keeping
//! the in-flight batch as a write that became durable but was never acknowledged, and
//! restores a new scheduler from the model store.
//!
//! `Scheduler::check_invariants` runs after every step and every drained effect. Besides, the
//! test checks:
//!
//! - at most one persist batch is unacknowledged at a time;
//! - persist before act (SPEC T1): an attempt is handed out only if the model store holds
//!   the run in `Starting` for exactly that attempt;
//! - an idempotency key (`run + attempt`) is handed out at most once, across crashes too;
//! - a slot of a job gets at most one run id in the store (SPEC S6), across crashes and
//!   backwards clocks;
//! - a terminal run's stored record never changes, and every terminal record other than
//!   `succeeded` keeps its last error (SPEC R4);
//! - after `handle_timeout(now)` and a full drain, `poll_timeout()` is later than `now`;
//! - after a drain, the runs in `Running` are exactly the attempts handed out and neither
//!   reported nor reclaimed, each under the lease it was handed out with; once nothing is
//!   pending, the store mirrors memory, open incidents included;
//! - a refused command changes nothing (tier 1); an outcome or heartbeat carrying a token that
//!   is not the run's current lease (an attempt already reported, reclaimed or lost in a crash,
//!   a newer token, another run's token, an unknown run) is always refused as stale, and an
//!   executing attempt's outcome and heartbeat are always accepted (a heartbeat renews the
//!   lease for a TTL from now);
//! - fencing tokens (SPEC L1): every grant (`Event::LeaseGranted`) is above every earlier
//!   grant of the incarnation, every token ever handed out and every token the store ever
//!   held, so tokens rise across crashes and restores; an attempt is handed out with the token
//!   its run was granted, durable in the store, above its run's previous tokens and every token
//!   handed out before the last restore, and no token is handed out twice;
//! - the watchdog (SPEC L3): a lease is reclaimed only once it expired plus the grace, always
//!   with an `Event::LeaseReclaimed` for the attempt that held it, and after a tick no running
//!   attempt's lease is past that deadline; nothing is killed (no job here has a timeout);
//! - `restore` is deterministic: the same snapshot and seed give the same scheduler;
//! - records survive a serde round trip; stored counters (run ids, audit seqs, tokens,
//!   incident ids) never go backwards and stay above every stored id and lease token; a stored
//!   incident keeps its identity and a resolved one stays resolved.
//!
//! The deterministic tests at the end of this file are regressions for core bugs this suite
//! found (cancel requests lost or ignored, attempts of removed jobs, one-shots finished by
//! leftover runs).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use keel_core::rng::SplitMix64;
use keel_core::{
    Attempt, AttemptStart, Batch, BatchId, Config, Effect, Event, FencingToken, HistoryPolicy,
    IdempotencyKey, Incident, Job, JobId, JobSpec, JobState, Meta, MisfirePolicy, Outcome,
    OverlapPolicy, Record, Rejected, RetryPolicy, Run, RunId, RunState, ScheduleSpec, Scheduler,
    Snapshot, Timestamp, Trigger, WorkerId,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

// ----- scenario ---------------------------------------------------------------------------

/// Job ids are `job-0` to `job-5`; scenarios start with up to four, and `Add` can (re-)add any.
const JOB_POOL: usize = 6;

/// Start instants: the 2026 New York spring-forward and fall-back days, and a quiet day.
const STARTS: [&str; 3] = [
    "2026-03-08T06:30:00Z",
    "2026-11-01T05:30:00Z",
    "2026-01-01T00:00:00Z",
];

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

#[derive(Clone, Debug)]
enum Sched {
    Cron {
        expr: &'static str,
        new_york: bool,
    },
    Once {
        offset_ms: i64,
    },
    Every {
        interval_ms: u64,
        anchor_offset_ms: i64,
    },
}

#[derive(Clone, Debug)]
struct Template {
    schedule: Sched,
    misfire: MisfirePolicy,
    overlap: OverlapPolicy,
    attempts_max: u32,
    backoff_base_ms: u64,
    deadline_ms: Option<u64>,
    delete_after_run: bool,
    resume_after_crash: bool,
}

impl Template {
    /// The spec for job `id`; one-shot and interval times are relative to `now`.
    fn spec(&self, id: &JobId, now: Timestamp) -> JobSpec {
        let schedule = match self.schedule {
            Sched::Cron { expr, new_york } => ScheduleSpec::Cron {
                expr: expr.into(),
                zone: if new_york { "America/New_York" } else { "UTC" }.into(),
            },
            Sched::Once { offset_ms } => ScheduleSpec::Once {
                at: Timestamp(now.0 + offset_ms),
            },
            Sched::Every {
                interval_ms,
                anchor_offset_ms,
            } => ScheduleSpec::Every {
                interval_ms,
                anchor: Timestamp(now.0 + anchor_offset_ms),
            },
        };
        let mut spec = JobSpec::new(id.clone(), "work", schedule);
        spec.payload = format!("payload of {id}");
        spec.retry = RetryPolicy {
            attempts_max: self.attempts_max,
            backoff_base_ms: self.backoff_base_ms,
            deadline_ms: self.deadline_ms,
            ..RetryPolicy::default()
        };
        spec.misfire = self.misfire;
        spec.overlap = self.overlap;
        spec.delete_after_run = self.delete_after_run;
        spec.resume_after_crash = self.resume_after_crash;
        spec
    }
}

#[derive(Clone, Debug)]
enum OutcomeChoice {
    Success,
    Retryable,
    Permanent,
    Snooze(u64),
    Cancelled,
}

impl OutcomeChoice {
    fn outcome(&self) -> Outcome {
        match self {
            OutcomeChoice::Success => Outcome::Success {
                summary: Some("done".into()),
                artifacts: BTreeMap::from([("report".to_owned(), "s3://reports/1".to_owned())]),
            },
            OutcomeChoice::Retryable => Outcome::Retryable {
                message: "upstream 503".into(),
            },
            OutcomeChoice::Permanent => Outcome::Permanent {
                message: "no such target".into(),
            },
            OutcomeChoice::Snooze(for_ms) => Outcome::Snooze { for_ms: *for_ms },
            OutcomeChoice::Cancelled => Outcome::Cancelled {
                reason: "handler gave up".into(),
            },
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// The wall clock moves forward.
    Advance(u64),
    /// The wall clock jumps a day forward.
    JumpDay,
    /// The wall clock jumps an hour back (the scheduler clamps it).
    JumpBack,
    /// `handle_timeout(clock)`, then drain.
    Timeout,
    /// Drain effects: persist batches are acknowledged, failed or held in flight.
    Drain,
    /// An executing attempt reports an outcome.
    Complete {
        pick: usize,
        outcome: OutcomeChoice,
    },
    /// An outcome for an attempt that is not current (finished, reclaimed, or lost in a
    /// crash), or with a token the run was never granted.
    Stale {
        pick: usize,
    },
    /// An executing attempt renews its lease (`stale`: with a token that is no longer
    /// current, which must be refused).
    Heartbeat {
        pick: usize,
        stale: bool,
    },
    Add {
        job: usize,
        template: Template,
    },
    Update {
        job: usize,
        template: Template,
    },
    Pause(usize),
    Resume(usize),
    Remove(usize),
    Trigger(usize),
    Cancel {
        pick: usize,
    },
    /// The store acknowledges the batch held in flight.
    AckHeld,
    /// The store fails the batch held in flight.
    FailHeld,
    /// A late acknowledgement or failure for a batch that already failed.
    StaleAck {
        fail: bool,
    },
    /// The process dies and restarts from the model store.
    Crash,
}

#[derive(Clone, Debug)]
struct Scenario {
    start: usize,
    seed: u64,
    misfire_grace_ms: u64,
    history_runs_max: u32,
    jobs: Vec<Template>,
    ops: Vec<Op>,
}

fn sched() -> impl Strategy<Value = Sched> {
    prop_oneof![
        1 => any::<bool>().prop_map(|new_york| Sched::Cron { expr: "*/5 * * * * *", new_york }),
        3 => any::<bool>().prop_map(|new_york| Sched::Cron { expr: "0 * * * * *", new_york }),
        // Fixed times inside the New York DST gap (2:30 on 8 March) and overlap (1:30 on
        // 1 November).
        1 => prop_oneof![Just("0 30 2 * * *"), Just("0 30 1 * * *")]
            .prop_map(|expr| Sched::Cron { expr, new_york: true }),
        3 => (-5 * MINUTE_MS as i64..20 * MINUTE_MS as i64)
            .prop_map(|offset_ms| Sched::Once { offset_ms }),
        3 => (1_000u64..=120_000, -10 * MINUTE_MS as i64..10 * MINUTE_MS as i64).prop_map(
            |(interval_ms, anchor_offset_ms)| Sched::Every { interval_ms, anchor_offset_ms }
        ),
    ]
}

fn template() -> impl Strategy<Value = Template> {
    let misfire = prop_oneof![
        Just(MisfirePolicy::FireOnceNow),
        Just(MisfirePolicy::Skip),
        (1u32..=5).prop_map(|max| MisfirePolicy::CatchUp { max }),
    ];
    let overlap = prop_oneof![
        Just(OverlapPolicy::Skip),
        Just(OverlapPolicy::BufferOne),
        Just(OverlapPolicy::Allow),
    ];
    let retry = (
        1u32..=4,
        prop_oneof![Just(0u64), Just(1_000), Just(30_000)],
        prop_oneof![3 => Just(None), 1 => Just(Some(20_000u64))],
    );
    (
        sched(),
        misfire,
        overlap,
        retry,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                schedule,
                misfire,
                overlap,
                (attempts_max, backoff_base_ms, deadline_ms),
                delete_after_run,
                resume_after_crash,
            )| Template {
                schedule,
                misfire,
                overlap,
                attempts_max,
                backoff_base_ms,
                deadline_ms,
                delete_after_run,
                resume_after_crash,
            },
        )
}

fn outcome() -> impl Strategy<Value = OutcomeChoice> {
    prop_oneof![
        4 => Just(OutcomeChoice::Success),
        3 => Just(OutcomeChoice::Retryable),
        1 => Just(OutcomeChoice::Permanent),
        1 => (0u64..120_000).prop_map(OutcomeChoice::Snooze),
        1 => Just(OutcomeChoice::Cancelled),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let time = prop_oneof![
        // Day jumps are rare: each one makes every cron job count up to CATCH_UP_MAX missed
        // slots, about 0.1 ms per slot in a debug build.
        60 => prop_oneof![3 => 0u64..5_000, 1 => 0u64..10 * MINUTE_MS].prop_map(Op::Advance),
        1 => Just(Op::JumpDay),
        3 => Just(Op::JumpBack),
    ];
    let io = prop_oneof![
        6 => Just(Op::Timeout),
        6 => Just(Op::Drain),
        5 => (any::<usize>(), outcome()).prop_map(|(pick, outcome)| Op::Complete { pick, outcome }),
        1 => any::<usize>().prop_map(|pick| Op::Stale { pick }),
        3 => (any::<usize>(), prop_oneof![4 => Just(false), 1 => Just(true)])
            .prop_map(|(pick, stale)| Op::Heartbeat { pick, stale }),
        2 => Just(Op::AckHeld),
        1 => Just(Op::FailHeld),
        1 => any::<bool>().prop_map(|fail| Op::StaleAck { fail }),
        1 => Just(Op::Crash),
    ];
    let commands = prop_oneof![
        1 => (0..JOB_POOL, template()).prop_map(|(job, template)| Op::Add { job, template }),
        1 => (0..JOB_POOL, template()).prop_map(|(job, template)| Op::Update { job, template }),
        1 => (0..JOB_POOL).prop_map(Op::Pause),
        1 => (0..JOB_POOL).prop_map(Op::Resume),
        1 => (0..JOB_POOL).prop_map(Op::Remove),
        2 => (0..JOB_POOL).prop_map(Op::Trigger),
        2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
    ];
    prop_oneof![3 => time, 10 => io, 3 => commands]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        0..STARTS.len(),
        any::<u64>(),
        prop_oneof![Just(0u64), Just(1_000), Just(MINUTE_MS)],
        1u32..=5,
        prop::collection::vec(template(), 1..=4),
        prop::collection::vec(op(), 50..=200),
    )
        .prop_map(
            |(start, seed, misfire_grace_ms, history_runs_max, jobs, ops)| Scenario {
                start,
                seed,
                misfire_grace_ms,
                history_runs_max,
                jobs,
                ops,
            },
        )
}

// ----- the model store ------------------------------------------------------------------

/// What a store holds after applying every acknowledged (or durably written) batch.
#[derive(Debug, Default)]
struct Store {
    jobs: BTreeMap<JobId, Job>,
    runs: BTreeMap<RunId, Run>,
    meta: Meta,
    audit: BTreeMap<u64, keel_core::AuditRecord>,
    prunes: u64,
    /// `(job, slot)` to the run that fired it, for every job ever known under that name: a job
    /// added again under a deleted job's name inherits its fired slots (tombstones).
    slots: BTreeMap<(JobId, Timestamp), RunId>,
    tombstones: BTreeMap<JobId, keel_core::Tombstone>,
    /// Every incident ever written, open or resolved, by id.
    incidents: BTreeMap<u64, Incident>,
    /// The highest lease token any stored run record ever held.
    max_token: Option<FencingToken>,
    /// The delivery outbox (no job here has sinks, so it stays empty).
    deliveries: BTreeMap<keel_core::DeliveryId, keel_core::Delivery>,
}

impl Store {
    fn apply(&mut self, batch: &Batch) {
        for record in &batch.records {
            // What a real store writes and reads back: the serde form, not the Rust value.
            let text = serde_json::to_string(record).expect("a record serialises");
            let record: Record = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("record does not deserialise: {e}\n{text}"));
            match record {
                Record::PutJob(job) => {
                    self.jobs.insert(job.spec.id.clone(), job);
                }
                Record::DeleteJob { id } => {
                    self.jobs.remove(&id);
                }
                Record::PutTombstone(tombstone) => {
                    self.tombstones.insert(tombstone.job.clone(), tombstone);
                }
                Record::DeleteTombstone { job } => {
                    self.tombstones.remove(&job);
                }
                Record::PutRun(run) => self.put_run(run),
                Record::Audit(audit) => {
                    if let Some(old) = self.audit.get(&audit.seq) {
                        assert_eq!(
                            old, &audit,
                            "audit seq {} written twice with different content",
                            audit.seq
                        );
                    }
                    self.audit.insert(audit.seq, audit);
                }
                Record::PruneHistory { .. } => self.prunes += 1,
                Record::PutMeta(meta) => {
                    assert!(
                        meta.next_run_id >= self.meta.next_run_id
                            && meta.next_audit_seq >= self.meta.next_audit_seq
                            && meta.next_token >= self.meta.next_token
                            && meta.next_incident >= self.meta.next_incident,
                        "stored counters went backwards: {:?} -> {meta:?}",
                        self.meta
                    );
                    self.meta = meta;
                }
                Record::PutIncident(incident) => self.put_incident(incident),
                Record::PutDelivery(delivery) => {
                    self.deliveries.insert(delivery.id, delivery);
                }
                Record::DeleteDelivery { id } => {
                    self.deliveries.remove(&id);
                }
            }
        }
        if let Some((&last, _)) = self.incidents.last_key_value() {
            assert!(
                last < self.meta.next_incident,
                "stored incident {last} is not below the stored next_incident {}",
                self.meta.next_incident
            );
        }
        for run in self.runs.values() {
            if let Some(lease) = &run.lease {
                assert!(
                    lease.token.0 < self.meta.next_token,
                    "stored {} holds {} not below the stored next_token {}: a restart could \
                     grant it again",
                    run.id,
                    lease.token,
                    self.meta.next_token
                );
            }
        }
        if let Some((&last, _)) = self.runs.last_key_value() {
            assert!(
                last.0 < self.meta.next_run_id,
                "stored {last} is not below the stored next_run_id {}: a restart could reuse it",
                self.meta.next_run_id
            );
        }
        if let Some((&last, _)) = self.audit.last_key_value() {
            assert!(
                last < self.meta.next_audit_seq,
                "stored audit seq {last} is not below the stored next_audit_seq {}",
                self.meta.next_audit_seq
            );
        }
    }

    fn put_run(&mut self, run: Run) {
        if let Some(old) = self.runs.get(&run.id) {
            assert!(
                !old.state.is_terminal() || *old == run,
                "terminal {} changed in the store:\nwas {old:?}\nnow {run:?}",
                run.id
            );
            assert_eq!(old.job, run.job, "{} changed job", run.id);
            assert_eq!(old.trigger, run.trigger, "{} changed trigger", run.id);
            assert!(
                run.attempt >= old.attempt,
                "{} attempt went back from {} to {}",
                run.id,
                old.attempt,
                run.attempt
            );
        }
        if run.state.is_terminal() && run.state != RunState::Succeeded {
            assert!(
                run.last_error.is_some(),
                "SPEC R4: terminal {} ({:?}) stored without its last error",
                run.id,
                run.state
            );
        }
        if let Some(slot) = run.slot() {
            let first = *self.slots.entry((run.job.clone(), slot)).or_insert(run.id);
            assert_eq!(
                first, run.id,
                "SPEC S6: slot {slot} of job {} fired twice: {first} and {}",
                run.job, run.id
            );
        }
        if let Some(lease) = &run.lease {
            self.max_token = self.max_token.max(Some(lease.token));
        }
        self.runs.insert(run.id, run);
    }

    /// An incident is written when it opens and when it resolves: its identity never changes,
    /// and a resolved incident stays resolved.
    fn put_incident(&mut self, incident: Incident) {
        if let Some(old) = self.incidents.get(&incident.id) {
            assert!(
                (
                    old.kind,
                    old.opened_at,
                    old.job.as_ref(),
                    old.run,
                    old.worker.as_ref()
                ) == (
                    incident.kind,
                    incident.opened_at,
                    incident.job.as_ref(),
                    incident.run,
                    incident.worker.as_ref()
                ),
                "incident {} changed identity:\nwas {old:?}\nnow {incident:?}",
                incident.id
            );
            if old.resolved_at.is_some() {
                assert_eq!(
                    old, &incident,
                    "resolved incident {} written again with different content",
                    incident.id
                );
            }
        }
        if let Some(resolved) = incident.resolved_at {
            assert!(
                resolved >= incident.opened_at,
                "incident {} resolved before it opened",
                incident.id
            );
        }
        self.incidents.insert(incident.id, incident);
    }

    /// The incidents still open.
    fn open_incidents(&self) -> BTreeMap<u64, Incident> {
        self.incidents
            .iter()
            .filter(|(_, i)| i.resolved_at.is_none())
            .map(|(id, i)| (*id, i.clone()))
            .collect()
    }

    /// What a store hands to `Scheduler::restore`.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            jobs: self.jobs.values().cloned().collect(),
            runs: self
                .runs
                .values()
                .filter(|r| !r.state.is_terminal())
                .cloned()
                .collect(),
            meta: self.meta,
            tombstones: self.tombstones.values().cloned().collect(),
            incidents: self.open_incidents().into_values().collect(),
            deliveries: self.deliveries.values().cloned().collect(),
        }
    }
}

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
    }
}

/// An attempt handed out and neither reported nor reclaimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Executing {
    attempt: Attempt,
    /// Its lease's fencing token, from `AttemptStart::lease`.
    token: FencingToken,
    /// When its lease expires, as of the hand-out or the last accepted heartbeat.
    expires_at: Timestamp,
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
    store: Store,
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
    /// The latest token granted (`Event::LeaseGranted`) to each run by this incarnation.
    granted: BTreeMap<RunId, FencingToken>,
    /// The latest token granted by this incarnation.
    last_grant: Option<FencingToken>,
    /// The scheduler's `now` after the latest `handle_timeout`: when the watchdog last ran.
    last_tick: Timestamp,
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
            ..Config::default()
        };
        let mut rng = SplitMix64::new(scenario.seed);
        let keel = Scheduler::new(config, rng.next_u64(), start);
        World {
            config,
            clock: start,
            keel,
            local: WorkerId::new("local").expect("a valid worker id"),
            rng,
            store: Store::default(),
            held: None,
            failed: Vec::new(),
            executing: BTreeMap::new(),
            stale: Vec::new(),
            handed_out: BTreeSet::new(),
            tokens: BTreeMap::new(),
            run_tokens: BTreeMap::new(),
            floor: None,
            granted: BTreeMap::new(),
            last_grant: None,
            last_tick: start,
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
        for op in &scenario.ops {
            w.step(op);
        }
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
                    if let (RunState::Running { .. }, Some(lease)) = (run.state, &run.lease) {
                        assert!(
                            lease.expires_at.plus_ms(grace) > self.last_tick,
                            "{} still running at {} with {} expired at {}",
                            run.id,
                            self.last_tick,
                            lease.token,
                            lease.expires_at
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
                    assert_eq!(run.trigger, Trigger::Manual);
                    assert_eq!(
                        run.state,
                        RunState::Starting {
                            attempt: Attempt(1)
                        }
                    );
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
        }
        self.keel.check_invariants();
        self.check_executing();
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
                .map(|r| (r.state, r.lease.as_ref().map(|l| (l.token, l.expires_at))));
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
        // A job added under a deleted job's name inherits its fired slots (tombstones), so
        // the store's slot claims are kept.
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
            .map(|(r, e)| (*r, *e))
    }

    fn complete(&mut self, pick: usize, outcome: &OutcomeChoice) {
        let Some((run_id, exec)) = self.pick_executing(pick) else {
            return;
        };
        let run = self
            .keel
            .run(run_id)
            .expect("an executing run is in memory");
        let cancel_requested = run.cancel_requested;
        let outcome = outcome.outcome();
        self.keel
            .handle_outcome(self.clock, run_id, exec.token, outcome.clone())
            .unwrap_or_else(|e| {
                panic!(
                    "outcome for executing {run_id} attempt {} ({}): {e}",
                    exec.attempt, exec.token
                )
            });
        self.executing.remove(&run_id);
        self.stale.push((run_id, exec.token));
        self.stats.outcomes += 1;
        let run = self
            .keel
            .run(run_id)
            .expect("a run stays in memory until its record is acknowledged");
        assert!(
            run.lease.is_none(),
            "{run_id} kept its lease after reporting"
        );
        if cancel_requested && !matches!(outcome, Outcome::Success { .. }) {
            assert_eq!(
                run.state,
                RunState::Cancelled,
                "a failure after a cancel request must end the run cancelled"
            );
        }
        if let Outcome::Success { summary, artifacts } = outcome {
            assert_eq!(run.state, RunState::Succeeded);
            assert_eq!(run.summary, summary);
            assert_eq!(run.artifacts, artifacts, "{run_id} lost its artifacts");
        }
        if run.state.is_terminal() {
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
        let current = self
            .keel
            .run(run)
            .and_then(|r| r.lease.as_ref())
            .map(|l| l.token);
        let refused = match result {
            Err(Rejected::StaleToken {
                run: r,
                got,
                current: c,
            }) => *r == run && *got == token && *c == current,
            Err(Rejected::NotRunning { run: r, .. }) => *r == run,
            Err(Rejected::UnknownRun(r)) => *r == run && self.keel.run(run).is_none(),
            _ => false,
        };
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
        assert_eq!(lease.owner, self.local);
        assert_eq!(
            (lease.renewed_at, lease.expires_at),
            (now, now.plus_ms(self.config.lease.ttl_ms)),
            "a heartbeat renews the lease for a TTL from now"
        );
        assert_eq!(
            self.keel.run(run).and_then(|r| r.lease.as_ref()),
            Some(&lease)
        );
        self.executing
            .get_mut(&run)
            .expect("picked from executing")
            .expires_at = lease.expires_at;
        self.stats.heartbeats += 1;
    }

    fn cancel(&mut self, pick: usize) {
        let ids: Vec<RunId> = self.keel.runs().map(|r| r.id).collect();
        let i = pick % (ids.len() + 1);
        let id = ids.get(i).copied().unwrap_or(RunId(u64::MAX / 2));
        let was = self.keel.run(id).map(|r| r.state);
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
                assert!(matches!(run.state, RunState::Running { .. }));
                assert!(run.cancel_requested);
                self.stats.cancel_requests += 1;
            }
            _ => {
                assert_eq!(run.state, RunState::Cancelled);
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
                    match self.rng.below_inclusive(99) {
                        0..=64 => self.ack(batch),
                        65..=79 => self.fail(batch.id),
                        _ => self.held = Some(batch),
                    }
                }
                Effect::StartAttempt(start) => self.start(start),
                Effect::CancelAttempt { run, attempt } => {
                    assert!(
                        self.handed_out.contains(&(run, attempt)),
                        "cancel for {run} attempt {attempt}, which was never handed out"
                    );
                }
                Effect::KillAttempt { run, attempt } => {
                    panic!("{run} attempt {attempt} killed, but no job here has a timeout")
                }
                Effect::Deliver(send) => {
                    panic!("delivery {send:?}, but no job here has a sink")
                }
                Effect::Event(event) => self.event(event),
            }
            self.keel.check_invariants();
        }
        panic!("the scheduler produced effects forever");
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::LeaseGranted { run, owner, token } => {
                // SPEC L1: the token rises on every grant, across crashes: above every grant of
                // this incarnation, every token handed out, and every token the store holds.
                assert_eq!(owner, self.local, "{run} granted to {owner}");
                let highest = [
                    self.last_grant,
                    self.tokens.keys().next_back().copied(),
                    self.store.max_token,
                ]
                .into_iter()
                .flatten()
                .max();
                assert!(
                    highest.is_none_or(|h| token > h),
                    "{run} granted {token}, not above {highest:?}"
                );
                self.last_grant = Some(token);
                self.granted.insert(run, token);
            }
            Event::LeaseReclaimed { run, token } => {
                let exec = self.executing.remove(&run).unwrap_or_else(|| {
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
                let state = self.keel.run(run).map(|r| r.state);
                assert!(
                    !matches!(state, Some(RunState::Running { .. })),
                    "{run} still running after its lease was reclaimed"
                );
                self.stale.push((run, token));
                self.stats.reclaims += 1;
            }
            Event::IncidentOpened(_) => self.stats.incidents += 1,
            _ => {}
        }
    }

    fn ack(&mut self, batch: Batch) {
        self.store.apply(&batch);
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
        let stored = self.store.runs.get(&run).unwrap_or_else(|| {
            panic!("persist before act: {run} attempt {attempt} handed out, but the store has never acknowledged the run")
        });
        assert_eq!(
            stored.state,
            RunState::Starting { attempt },
            "persist before act: {run} attempt {attempt} handed out, but the store holds {:?}",
            stored.state
        );
        assert_eq!(
            stored.lease.as_ref().map(|l| l.token),
            Some(token),
            "persist before act: {run} attempt {attempt} handed out with {token}, but the \
             store holds {:?}",
            stored.lease
        );
        assert!(
            !stored.cancel_requested,
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
            (start.kind.to_string(), start.payload.clone()) == expected,
            "{run} attempt {attempt} handed out with kind {:?} and payload {:?}",
            start.kind,
            start.payload
        );
        // The lease: granted by this incarnation to this run, owned by the executor, running
        // for a TTL from the hand-out.
        assert_eq!(lease.owner, self.local);
        assert_eq!(
            self.granted.get(&run),
            Some(&token),
            "{run} attempt {attempt} handed out with {token}, not the token it was granted"
        );
        assert_eq!(
            lease.expires_at,
            lease.renewed_at.plus_ms(self.config.lease.ttl_ms),
            "{run} attempt {attempt}: the lease lasts a TTL"
        );
        // Unless the watchdog reclaimed it before this effect was polled, the attempt is
        // running, and its lease runs from the acknowledgement that handed it out.
        if let Some(RunState::Running { started_at, .. }) = self.keel.run(run).map(|r| r.state) {
            assert_eq!(
                lease.renewed_at, started_at,
                "{run} attempt {attempt}: the lease does not run from the hand-out"
            );
        }
        // Tokens rise and never repeat, across crashes and restores. They rise in grant order
        // (checked with `Event::LeaseGranted`), so a token is above every token handed out
        // before it was granted; attempts granted together are handed out in batch order,
        // which need not be grant order (see `attempts_granted_together_are_handed_out_in_grant_order`).
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
                expires_at: lease.expires_at,
            },
        );
        assert!(
            previous.is_none(),
            "{run} attempt {attempt} handed out while {previous:?} executes"
        );
        self.stats.attempts_started += 1;
    }

    fn check_after_drain(&mut self) {
        let running: BTreeMap<RunId, (Attempt, Option<FencingToken>)> = self
            .keel
            .runs()
            .filter_map(|r| match r.state {
                RunState::Running { attempt, .. } => {
                    Some((r.id, (attempt, r.lease.as_ref().map(|l| l.token))))
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
        let stored: BTreeMap<&JobId, serde_json::Value> = self
            .store
            .jobs
            .iter()
            .map(|(id, j)| (id, json(j)))
            .collect();
        assert_eq!(
            memory, stored,
            "quiescent, but stored jobs differ from memory"
        );
        for run in self.keel.runs() {
            assert!(
                !run.state.is_terminal(),
                "quiescent, but terminal {} is still in memory",
                run.id
            );
            let stored = self.store.runs.get(&run.id).map(json);
            assert_eq!(
                Some(json(run)),
                stored,
                "quiescent, but stored {} differs from memory",
                run.id
            );
        }
        for run in self.store.runs.values() {
            assert!(
                run.state.is_terminal() || self.keel.run(run.id).is_some(),
                "the store holds active {} but memory has forgotten it",
                run.id
            );
        }
        let memory: BTreeMap<u64, Incident> =
            self.keel.incidents().map(|i| (i.id, i.clone())).collect();
        assert_eq!(
            memory,
            self.store.open_incidents(),
            "quiescent, but the store's open incidents differ from memory"
        );
    }

    fn crash(&mut self) {
        if let Some(batch) = self.held.take() {
            // The write may have become durable without its acknowledgement arriving.
            if self.rng.chance(1, 2) {
                self.store.apply(&batch);
            }
        }
        let lost = std::mem::take(&mut self.executing);
        self.stale
            .extend(lost.into_iter().map(|(run, e)| (run, e.token)));
        self.granted.clear();
        self.last_grant = None;
        self.floor = self.tokens.keys().next_back().copied();
        self.failed.clear();
        let snapshot = self.store.snapshot();
        let seed = self.rng.next_u64();
        let keel = Scheduler::restore(self.config, seed, self.clock, snapshot.clone());
        let twin = Scheduler::restore(self.config, seed, self.clock, snapshot);
        assert_eq!(
            format!("{keel:?}"),
            format!("{twin:?}"),
            "restore from the same snapshot and seed is not deterministic"
        );
        self.keel = keel;
        self.last_tick = self.keel.now();
        self.stats.crashes += 1;
    }

    /// Returns the command's value; if it was refused, asserts it changed nothing.
    fn refused_changes_nothing<T: Debug>(
        &mut self,
        what: &str,
        before: String,
        result: Result<T, Rejected>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                let after = fingerprint(&self.keel);
                if before != after {
                    panic!("refused {what} ({e}) changed the state:\nbefore: {before}\nafter:  {after}");
                }
                self.stats.refusals += 1;
                None
            }
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
    #![proptest_config(ProptestConfig::with_cases(64))]

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
    for _ in 0..8 {
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
}

// ----- deterministic scenarios --------------------------------------------------------------

fn once_spec(name: &str, at: Timestamp) -> JobSpec {
    JobSpec::new(
        JobId::new(name).expect("a valid job id"),
        "work",
        ScheduleSpec::Once { at },
    )
}

fn every_minute(name: &str) -> JobSpec {
    JobSpec::new(
        JobId::new(name).expect("a valid job id"),
        "work",
        ScheduleSpec::Cron {
            expr: "0 * * * * *".into(),
            zone: "UTC".into(),
        },
    )
}

/// The next persist batch, skipping events (a one-shot that fires is also disabled).
fn next_batch(keel: &mut Scheduler) -> Batch {
    loop {
        match keel.poll_effect() {
            Some(Effect::Persist(batch)) => return batch,
            Some(Effect::Event(_)) => {}
            other => panic!("expected a persist batch, got {other:?}"),
        }
    }
}

fn expect_start(effect: Option<Effect>) -> AttemptStart {
    match effect {
        Some(Effect::StartAttempt(start)) => start,
        other => panic!("expected an attempt to start, got {other:?}"),
    }
}

fn drain_all(keel: &mut Scheduler) -> Vec<Effect> {
    std::iter::from_fn(|| keel.poll_effect())
        .take(1_000)
        .collect()
}

fn stored_run_states(batch: &Batch) -> Vec<(RunId, RunState)> {
    batch
        .records
        .iter()
        .filter_map(|r| match r {
            Record::PutRun(run) => Some((run.id, run.state)),
            _ => None,
        })
        .collect()
}

/// A scheduler at `t0` with `spec` added and its first batch acknowledged.
fn with_job(t0: Timestamp, spec: JobSpec) -> Scheduler {
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, spec).expect("a valid job");
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t0, batch.id);
    assert_eq!(keel.poll_effect(), None);
    keel
}

#[test]
fn a_failed_persist_holds_the_attempt_back_until_a_later_batch_is_acknowledged() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(1_000);
    let mut keel = with_job(t0, once_spec("once", t1));

    keel.handle_timeout(t1);
    let first = next_batch(&mut keel);
    let run = keel.runs().next().expect("the slot fired").id;
    assert_eq!(
        stored_run_states(&first),
        vec![(
            run,
            RunState::Starting {
                attempt: Attempt(1)
            }
        )]
    );
    // Nothing is handed out while the batch is in flight.
    assert_eq!(keel.poll_effect(), None);

    keel.handle_persist_failed(t1, first.id, "disk full");
    let effects = drain_all(&mut keel);
    let retry_at = match effects.as_slice() {
        [Effect::Event(Event::PersistFailed {
            batch, retry_at, ..
        })] if *batch == first.id => *retry_at,
        other => panic!("expected only a PersistFailed event, got {other:?}"),
    };
    assert!(retry_at > t1);
    assert_eq!(keel.poll_timeout(), Some(retry_at));
    keel.check_invariants();

    // A late acknowledgement of the failed batch releases nothing.
    keel.handle_persisted(t1, first.id);
    assert_eq!(keel.poll_effect(), None);
    assert_eq!(
        keel.run(run).map(|r| r.state),
        Some(RunState::Starting {
            attempt: Attempt(1)
        })
    );

    // No batch before the retry deadline.
    keel.handle_timeout(Timestamp(retry_at.0 - 1));
    assert_eq!(keel.poll_effect(), None);

    keel.handle_timeout(retry_at);
    let second = next_batch(&mut keel);
    assert_ne!(second.id, first.id);
    assert_eq!(
        stored_run_states(&second),
        vec![(
            run,
            RunState::Starting {
                attempt: Attempt(1)
            }
        )]
    );
    assert_eq!(
        keel.poll_effect(),
        None,
        "still held while the retry is in flight"
    );
    keel.check_invariants();

    keel.handle_persisted(retry_at, second.id);
    let start = expect_start(keel.poll_effect());
    assert_eq!((start.run, start.attempt), (run, Attempt(1)));
    assert_eq!(
        keel.run(run).map(|r| r.state.name()),
        Some(keel_core::StateName::Running)
    );
    keel.check_invariants();
}

#[test]
fn a_run_cancelled_while_starting_is_never_handed_out() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(1_000);

    // Cancelled while the batch recording its first attempt is in flight.
    let mut keel = with_job(t0, once_spec("once", t1));
    keel.handle_timeout(t1);
    let first = next_batch(&mut keel);
    let run = keel.runs().next().expect("the slot fired").id;
    keel.cancel_run(t1, run)
        .expect("a starting run can be cancelled");
    assert_eq!(keel.run(run).map(|r| r.state), Some(RunState::Cancelled));
    keel.handle_persisted(t1, first.id);
    let effects = drain_all(&mut keel);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::StartAttempt(_) | Effect::CancelAttempt { .. })),
        "{effects:?}"
    );
    let second = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist(b) => Some(b.clone()),
            _ => None,
        })
        .expect("the cancellation is persisted");
    assert_eq!(stored_run_states(&second), vec![(run, RunState::Cancelled)]);
    keel.handle_persisted(t1, second.id);
    assert_eq!(keel.poll_effect(), None);
    assert!(
        keel.run(run).is_none(),
        "a settled, persisted run leaves memory"
    );
    keel.check_invariants();

    // Cancelled before its first batch was even emitted (a manual run).
    let mut keel = with_job(t0, every_minute("minutely"));
    let run = keel
        .trigger(t0, &JobId::new("minutely").expect("valid"))
        .expect("no run is active");
    keel.cancel_run(t0, run)
        .expect("a starting run can be cancelled");
    let effects = drain_all(&mut keel);
    let batch = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist(b) => Some(b.clone()),
            _ => None,
        })
        .expect("a batch");
    assert_eq!(stored_run_states(&batch), vec![(run, RunState::Cancelled)]);
    keel.handle_persisted(t0, batch.id);
    let effects = drain_all(&mut keel);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::StartAttempt(_))),
        "{effects:?}"
    );
    keel.check_invariants();
}

#[test]
fn refused_commands_change_nothing() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let later = t1.plus_ms(5_000);
    let id = JobId::new("minutely").expect("valid");
    let ghost = JobId::new("ghost").expect("valid");
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());
    let token = start.lease.token;
    let (older, newer) = (FencingToken(token.0 - 1), FencingToken(token.0 + 1));
    // Leave the Running record unpersisted too, so the journal has something pending.
    let _in_flight = next_batch(&mut keel);
    keel.check_invariants();

    type Command<'a> = Box<dyn Fn(&mut Scheduler) -> Result<(), Rejected> + 'a>;
    let refusals: Vec<(&str, Command)> = vec![
        (
            "pause an unknown job",
            Box::new(|k| k.pause_job(later, &ghost)),
        ),
        (
            "resume an unknown job",
            Box::new(|k| k.resume_job(later, &ghost)),
        ),
        (
            "remove an unknown job",
            Box::new(|k| k.remove_job(later, &ghost)),
        ),
        (
            "trigger an unknown job",
            Box::new(|k| k.trigger(later, &ghost).map(drop)),
        ),
        (
            "update an unknown job",
            Box::new(|k| k.update_job(later, every_minute("ghost"))),
        ),
        (
            "add a duplicate job",
            Box::new(|k| k.add_job(later, every_minute("minutely"))),
        ),
        (
            "add a job with an unknown zone",
            Box::new(|k| {
                let mut spec = every_minute("new");
                spec.schedule = ScheduleSpec::Cron {
                    expr: "0 * * * * *".into(),
                    zone: "Mars/Olympus_Mons".into(),
                };
                k.add_job(later, spec)
            }),
        ),
        (
            "update with a bad cron expression",
            Box::new(|k| {
                let mut spec = every_minute("minutely");
                spec.schedule = ScheduleSpec::Cron {
                    expr: "61 * * * * *".into(),
                    zone: "UTC".into(),
                };
                k.update_job(later, spec)
            }),
        ),
        (
            "resume a job that is not paused",
            Box::new(|k| k.resume_job(later, &id)),
        ),
        (
            "trigger while a run is active (overlap skip)",
            Box::new(|k| k.trigger(later, &id).map(drop)),
        ),
        (
            "cancel an unknown run",
            Box::new(|k| k.cancel_run(later, RunId(9_999))),
        ),
        (
            "report with a newer token",
            Box::new(|k| k.handle_outcome(later, start.run, newer, Outcome::ok())),
        ),
        (
            "report with an older token",
            Box::new(|k| k.handle_outcome(later, start.run, older, Outcome::ok())),
        ),
        (
            "report for an unknown run",
            Box::new(|k| k.handle_outcome(later, RunId(9_999), token, Outcome::ok())),
        ),
        (
            "heartbeat with a newer token",
            Box::new(|k| k.heartbeat(later, start.run, newer).map(drop)),
        ),
        (
            "heartbeat with an older token",
            Box::new(|k| k.heartbeat(later, start.run, older).map(drop)),
        ),
        (
            "heartbeat for an unknown run",
            Box::new(|k| k.heartbeat(later, RunId(9_999), token).map(drop)),
        ),
        (
            "extend a run whose job has no timeout",
            Box::new(|k| k.extend(later, start.run, 1_000, "more time").map(drop)),
        ),
    ];
    for (what, command) in &refusals {
        let before = fingerprint(&keel);
        let result = command(&mut keel);
        assert!(
            result.is_err(),
            "{what}: expected a refusal, got {result:?}"
        );
        assert_eq!(
            before,
            fingerprint(&keel),
            "{what}: refused, but state changed"
        );
        keel.check_invariants();
    }
    assert_eq!(keel.poll_effect(), None, "refusals emit no effects");

    // The fingerprint does see real changes, so the comparisons above can fail.
    let before = fingerprint(&keel);
    keel.pause_job(later, &id)
        .expect("a scheduled job can be paused");
    assert_ne!(before, fingerprint(&keel));
}

/// A job removed while its run is active and added again under the same name counts the old
/// run, so the invariants hold and settling it does not underflow `active_runs`.
#[test]
fn readding_a_job_removed_while_its_run_is_active_keeps_active_runs_consistent() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let id = JobId::new("minutely").expect("valid");
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());

    keel.remove_job(t1, &id).expect("known job");
    keel.add_job(t1, every_minute("minutely"))
        .expect("the name is free again");
    keel.check_invariants();
    keel.handle_outcome(t1, start.run, start.lease.token, Outcome::ok())
        .expect("the attempt is current");
    keel.check_invariants();
}

// ----- core bugs found by these tests (ignored until core/src is fixed) --------------------

/// The run module's transition table and `cancel_run`'s docs say any failure after a cancel
/// request ends the run `cancelled`; a permanent error ends it `failed_dropped` instead.
#[test]
fn permanent_error_after_a_cancel_request_ends_the_run_cancelled() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());
    keel.cancel_run(t1, start.run).expect("running");
    let outcome = Outcome::Permanent {
        message: "stopped".into(),
    };
    keel.handle_outcome(t1, start.run, start.lease.token, outcome)
        .expect("current attempt");
    assert_eq!(
        keel.run(start.run).map(|r| r.state),
        Some(RunState::Cancelled)
    );
}

/// SPEC R4: every terminal record keeps the concrete last error. A snooze after a cancel
/// request ends the run `cancelled` without recording any error.
#[test]
fn snooze_after_a_cancel_request_keeps_a_last_error() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());
    keel.cancel_run(t1, start.run).expect("running");
    keel.handle_outcome(
        t1,
        start.run,
        start.lease.token,
        Outcome::Snooze { for_ms: 1_000 },
    )
    .expect("current attempt");
    let run = keel.run(start.run).expect("in memory until persisted");
    assert_eq!(run.state, RunState::Cancelled);
    assert!(run.last_error.is_some(), "{run:?}");
}

/// An operator's cancel request is persisted with the running attempt (`cancel_requested`),
/// but when a crash cuts that attempt short, `restore` retries the run like any interrupted
/// one: attempt 2 is handed out, and no `CancelAttempt` is ever sent for it. The cancelled run
/// runs again, and completes `succeeded` if its handler does. Recovery should end it
/// `cancelled` instead.
#[test]
fn a_cancel_request_survives_a_crash() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut store = Store::default();
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, every_minute("minutely")).expect("valid");
    flush(&mut keel, &mut store, t0);
    keel.handle_timeout(t1);
    let start = flush(&mut keel, &mut store, t1)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(start) => Some(start),
            _ => None,
        })
        .expect("the slot fired and its attempt was handed out");
    keel.cancel_run(t1, start.run)
        .expect("a running run can be cancelled");
    flush(&mut keel, &mut store, t1);
    assert!(
        store.runs[&start.run].cancel_requested,
        "the request is durable"
    );

    // Crash before the handler reports.
    let t2 = t1.plus_ms(1_000);
    let mut keel = Scheduler::restore(Config::default(), 7, t2, store.snapshot());
    keel.handle_timeout(t2);
    let effects = flush(&mut keel, &mut store, t2);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::StartAttempt(s) if s.run == start.run)),
        "the cancelled run was handed out again: {effects:?}"
    );
    assert_eq!(store.runs[&start.run].state, RunState::Cancelled);
}

/// SPEC R5 finishes a one-shot job when its run settles, but settle treats any run of the job
/// as the one-shot's run. A recurring job updated to a one-shot while a run of the old
/// schedule is active is disabled ("one-shot job finished (succeeded)") the moment that old run
/// settles, so the new one-shot never fires. The same happens to a one-shot added under the
/// name of a removed job whose run is still active, and with `delete_after_run` the new job is
/// deleted before it ever fires.
#[test]
fn a_one_shot_is_not_finished_by_a_run_of_an_earlier_schedule() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let at = t1.plus_ms(3_600_000);
    let id = JobId::new("minutely").expect("valid");
    for readd in [false, true] {
        let mut keel = with_job(t0, every_minute("minutely"));
        keel.handle_timeout(t1);
        let batch = next_batch(&mut keel);
        keel.handle_persisted(t1, batch.id);
        let start = expect_start(keel.poll_effect());
        let mut once = once_spec("minutely", at);
        once.delete_after_run = readd;
        if readd {
            keel.remove_job(t1, &id).expect("known job");
            keel.add_job(t1, once).expect("the name is free");
        } else {
            keel.update_job(t1, once).expect("a valid update");
        }
        keel.handle_outcome(t1, start.run, start.lease.token, Outcome::ok())
            .expect("current attempt");
        let state = keel.job(&id).map(|j| j.state.clone());
        assert_eq!(
            state,
            Some(JobState::Scheduled { next: at }),
            "readd: {readd}: the one-shot at {at} has not fired yet"
        );
    }
}

/// Drains every effect, writing and acknowledging each batch into `store`; returns the other
/// effects.
fn flush(keel: &mut Scheduler, store: &mut Store, now: Timestamp) -> Vec<Effect> {
    let mut others = Vec::new();
    while let Some(effect) = keel.poll_effect() {
        match effect {
            Effect::Persist(batch) => {
                store.apply(&batch);
                keel.handle_persisted(now, batch.id);
            }
            other => others.push(other),
        }
        keel.check_invariants();
    }
    others
}

/// `remove_job` lets runs under way finish, but their later attempts are handed out with the
/// job's kind and payload looked up from the (now missing) job: both are empty, so no handler
/// can be found for the attempt. The same happens after a restore, and for a first attempt
/// whose job is removed before its batch is acknowledged.
#[test]
fn an_attempt_of_a_removed_job_keeps_its_kind_and_payload() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut spec = every_minute("minutely");
    spec.payload = "p".into();
    spec.retry.jitter = 0.0;
    let mut keel = with_job(t0, spec);
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let first = expect_start(keel.poll_effect());
    assert_eq!((&*first.kind, first.payload.as_str()), ("work", "p"));

    keel.remove_job(t1, &JobId::new("minutely").expect("valid"))
        .expect("known job");
    let failed = Outcome::Retryable {
        message: "503".into(),
    };
    keel.handle_outcome(t1, first.run, first.lease.token, failed)
        .expect("current attempt");
    let retry_at = t1.plus_ms(1_000);
    let mut store = Store::default();
    flush(&mut keel, &mut store, t1);
    keel.handle_timeout(retry_at);
    let second = flush(&mut keel, &mut store, retry_at)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(start) => Some(start),
            _ => None,
        })
        .expect("the retry is handed out");
    assert_eq!(second.attempt, Attempt(2));
    assert_eq!((&*second.kind, second.payload.as_str()), ("work", "p"));
}

/// SPEC W5 and `keel_core::incident`: incidents are persisted (`Record::PutIncident`) when
/// they open and when they resolve. (A first version of the lease work collected them in the
/// journal but never put them in a batch.)
#[test]
fn an_incident_is_persisted_when_it_opens_and_when_it_resolves() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let config = Config::default();
    let mut store = Store::default();
    let mut keel = Scheduler::new(config, 7, t0);
    keel.add_job(t0, every_minute("minutely")).expect("valid");
    flush(&mut keel, &mut store, t0);
    keel.handle_timeout(t1);
    let start = flush(&mut keel, &mut store, t1)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(start) => Some(start),
            _ => None,
        })
        .expect("the slot fired and its attempt was handed out");

    // The attempt goes silent: its lease is reclaimed, which opens an incident, and the retry
    // that starts at once resolves it.
    let t2 = start.lease.expires_at.plus_ms(config.lease.grace_ms);
    keel.handle_timeout(t2);
    let mut incidents = BTreeMap::new();
    for effect in flush(&mut keel, &mut store, t2) {
        if let Effect::Event(Event::IncidentOpened(i) | Event::IncidentResolved(i)) = effect {
            incidents.insert(i.id, i);
        }
    }
    assert!(
        incidents.values().any(|i| i.run == Some(start.run)),
        "the reclaim opened no incident"
    );
    assert!(keel.is_quiescent());
    assert_eq!(
        store.incidents, incidents,
        "the store does not hold the incidents in their latest state"
    );
}

/// Attempts granted together (in one batch) are handed out in grant order, so the tokens a
/// driver sees rise with the hand-out, not with job names. (Fencing itself is per run.)
#[test]
fn attempts_granted_together_are_handed_out_in_grant_order() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, once_spec("b", t0.plus_ms(1_000)))
        .expect("valid");
    keel.add_job(t0, once_spec("a", t0.plus_ms(2_000)))
        .expect("valid");
    let mut store = Store::default();
    flush(&mut keel, &mut store, t0);
    let t1 = t0.plus_ms(2_000);
    keel.handle_timeout(t1);
    let handed_out: Vec<(String, FencingToken)> = flush(&mut keel, &mut store, t1)
        .into_iter()
        .filter_map(|e| match e {
            Effect::StartAttempt(start) => Some((start.job.to_string(), start.lease.token)),
            _ => None,
        })
        .collect();
    assert_eq!(handed_out.len(), 2, "{handed_out:?}");
    assert!(
        handed_out[0].1 < handed_out[1].1,
        "handed out in this order: {handed_out:?}"
    );
}

/// SPEC L1: a token never repeats. `claim` once returned the granted token before the grant
/// (and the token counter) was durable; a crash then let the restored scheduler grant the same
/// token to another worker, and the first worker's completion was accepted as the new holder's.
/// Now a claim reveals only the run: the lease reaches the worker with the StartAttempt that
/// follows the durable grant.
#[test]
fn a_claimed_token_is_not_granted_again_after_a_crash() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut spec = once_spec("external", t0);
    spec.external = true;
    let mut store = Store::default();
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, spec).expect("valid");
    keel.handle_timeout(t0);
    flush(&mut keel, &mut store, t0);
    let a = WorkerId::new("worker-a").expect("valid");
    let first = keel
        .claim(t0, &a, &["work"])
        .expect("not shutting down")
        .expect("the run is queued");
    // The claim reveals no token: worker a gets its lease only with the StartAttempt that
    // follows the durable grant. The process dies before that batch is written.
    let mut keel = Scheduler::restore(Config::default(), 7, t0, store.snapshot());
    flush(&mut keel, &mut store, t0);
    let b = WorkerId::new("worker-b").expect("valid");
    let second = keel
        .claim(t0, &b, &["work"])
        .expect("not shutting down")
        .expect("the run is queued again");
    assert_eq!(second.run, first.run);
    let mut handed_out = Vec::new();
    while let Some(effect) = keel.poll_effect() {
        match effect {
            Effect::Persist(batch) => {
                store.apply(&batch);
                keel.handle_persisted(t0, batch.id);
            }
            Effect::StartAttempt(start) => handed_out.push(start),
            _ => {}
        }
    }
    assert_eq!(handed_out.len(), 1, "one hand-out, to worker b");
    assert_eq!(handed_out[0].lease.owner, b);
    keel.handle_outcome(t0, second.run, handed_out[0].lease.token, Outcome::ok())
        .expect("worker b holds the lease");
}

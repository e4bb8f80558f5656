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
    JobId, JobSpec, JobState, Lease, MisfirePolicy, OutboxConfig, OutboxEvent, Outcome,
    OverflowPolicy, OverlapPolicy, Record, Rejected, Released, RetryPolicy, Run, RunId, RunState,
    ScheduleSpec, Scheduler, SendRequest, Timestamp, Trigger, WorkerId,
};
use keel_testkit::MemStore;
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

/// Sinks a job's results may go to.
const SINKS: [&str; 2] = ["hook-a", "hook-b"];

/// What workers ask for when they claim: every job here has kind `work`, so a claim for
/// `other` alone finds nothing (and, repeated while work waits, is an idle claim loop).
const CLAIM_KINDS: [&[&str]; 4] = [&["work"], &["work", "other"], &["other"], &[]];

/// External workers.
const WORKERS: usize = 3;

/// The artifact jobs with required artifacts require.
const REPORT: &str = "report";

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The liveness phase moves time on in steps of at most this...
const LIVENESS_STEP_MS: u64 = 10 * MINUTE_MS;
/// ...and every run must have ended within this.
const LIVENESS_HORIZON_MS: u64 = 6 * HOUR_MS;

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
    /// Run by external workers that claim it.
    external: bool,
    /// The attempt timeout (the watchdog times out, kills; `extend` once).
    timeout_ms: Option<u64>,
    /// Completions must carry the `report` artifact.
    requires_report: bool,
    /// How many of [`SINKS`] the results go to.
    sinks: usize,
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
        spec.payload = format!("payload of {id}").into();
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
        spec.external = self.external;
        spec.timeout_ms = self.timeout_ms;
        if self.requires_report {
            spec.required_artifacts = vec![REPORT.to_owned()].into();
        }
        spec.sinks = SINKS[..self.sinks.min(SINKS.len())]
            .iter()
            .map(|sink| (*sink).into())
            .collect();
        spec
    }
}

#[derive(Clone, Debug)]
enum OutcomeChoice {
    /// Success with the `report` artifact.
    Success,
    /// Success without artifacts: refused for a job that requires `report`.
    SuccessBare,
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
                artifacts: BTreeMap::from([(REPORT.to_owned(), "s3://reports/1".to_owned())]),
            },
            OutcomeChoice::SuccessBare => Outcome::Success {
                summary: None,
                artifacts: BTreeMap::new(),
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
    /// An external worker claims work of some kinds (`CLAIM_KINDS[kinds % 4]`).
    Claim {
        worker: usize,
        kinds: usize,
    },
    /// An executing attempt reports progress (`stale`: with a token that is not current).
    Progress {
        pick: usize,
        stale: bool,
    },
    /// An executing attempt asks for its context (`stale`: refused).
    Context {
        pick: usize,
        stale: bool,
    },
    /// An executing attempt gives its lease back (`stale`: already released, or unknown).
    Release {
        pick: usize,
        stale: bool,
    },
    /// `extend` the timeout of an executing attempt's run (`target % 4` 0 or 1), of a run the
    /// watchdog killed (2), or of any run in memory or an unknown one (3).
    Extend {
        pick: usize,
        target: u8,
        by_ms: u64,
    },
    /// An executing attempt saves a checkpoint (`stale`: refused).
    Checkpoint {
        pick: usize,
        stale: bool,
    },
    /// `flush_checkpoints`.
    Flush,
    /// A sink answers a send.
    Answer {
        pick: usize,
        answer: AnswerChoice,
    },
    /// An answer for a send that is not current (answered already, lost in a crash, a newer
    /// attempt, or an unknown delivery): refused, changing nothing.
    StaleAnswer {
        pick: usize,
    },
    /// `begin_shutdown` (placed near the end of a scenario, never generated by `op()`).
    Shutdown,
}

#[derive(Clone, Copy, Debug)]
enum AnswerChoice {
    Delivered,
    Transient { retry_after_ms: Option<u64> },
    Permanent,
}

impl AnswerChoice {
    fn result(self) -> DeliveryResult {
        match self {
            AnswerChoice::Delivered => DeliveryResult::Delivered,
            AnswerChoice::Transient { retry_after_ms } => DeliveryResult::Transient {
                error: "HTTP 503".into(),
                retry_after_ms,
            },
            AnswerChoice::Permanent => DeliveryResult::Permanent {
                error: "HTTP 404".into(),
            },
        }
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    start: usize,
    seed: u64,
    misfire_grace_ms: u64,
    history_runs_max: u32,
    /// The outbox capacity: small ones overflow.
    outbox_capacity: usize,
    overflow: OverflowPolicy,
    /// `begin_shutdown` this many operations before the end, if any.
    shutdown_before_end: Option<usize>,
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
    let workers = (
        prop_oneof![2 => Just(false), 1 => Just(true)],
        // A 5 s timeout is killed at its backstop (15 s), before an unrenewed lease is
        // reclaimed (40 s); a 20 s one times out, and is killed 10 s later unless extended.
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(5_000u64)),
            1 => Just(Some(20_000u64)),
        ],
        prop_oneof![2 => Just(false), 1 => Just(true)],
        prop_oneof![2 => Just(0usize), 2 => Just(1), 1 => Just(2)],
    );
    (
        sched(),
        misfire,
        overlap,
        retry,
        any::<bool>(),
        any::<bool>(),
        workers,
    )
        .prop_map(
            |(
                schedule,
                misfire,
                overlap,
                (attempts_max, backoff_base_ms, deadline_ms),
                delete_after_run,
                resume_after_crash,
                (external, timeout_ms, requires_report, sinks),
            )| Template {
                schedule,
                misfire,
                overlap,
                attempts_max,
                backoff_base_ms,
                deadline_ms,
                delete_after_run,
                resume_after_crash,
                external,
                timeout_ms,
                requires_report,
                sinks,
            },
        )
}

fn outcome() -> impl Strategy<Value = OutcomeChoice> {
    prop_oneof![
        4 => Just(OutcomeChoice::Success),
        2 => Just(OutcomeChoice::SuccessBare),
        3 => Just(OutcomeChoice::Retryable),
        1 => Just(OutcomeChoice::Permanent),
        1 => (0u64..120_000).prop_map(OutcomeChoice::Snooze),
        1 => Just(OutcomeChoice::Cancelled),
    ]
}

/// One operation. `commands` and `workers` weigh job commands and the worker protocol
/// (claims, progress, releases, extensions, checkpoints, sink answers) against time and I/O
/// (weights 3 and 10); `back` weighs the hour-long backward clock jumps among time steps (a
/// jump back stalls firing until the clock has caught up).
fn op(commands: u32, workers: u32, back: u32) -> impl Strategy<Value = Op> {
    let time = prop_oneof![
        // Day jumps are rare: each one makes every cron job count up to CATCH_UP_MAX missed
        // slots, about 0.1 ms per slot in a debug build.
        // Steps of tens of seconds reach the watchdog's deadlines (timeouts, kills, reclaims)
        // one at a time.
        60 => prop_oneof![
            3 => 0u64..5_000,
            2 => 5_000u64..30_000,
            1 => 0u64..10 * MINUTE_MS,
        ]
        .prop_map(Op::Advance),
        1 => Just(Op::JumpDay),
        back => Just(Op::JumpBack),
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
    let commands_op = prop_oneof![
        1 => (0..JOB_POOL, template()).prop_map(|(job, template)| Op::Add { job, template }),
        1 => (0..JOB_POOL, template()).prop_map(|(job, template)| Op::Update { job, template }),
        1 => (0..JOB_POOL).prop_map(Op::Pause),
        1 => (0..JOB_POOL).prop_map(Op::Resume),
        1 => (0..JOB_POOL).prop_map(Op::Remove),
        2 => (0..JOB_POOL).prop_map(Op::Trigger),
        2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
    ];
    let answer = prop_oneof![
        3 => Just(AnswerChoice::Delivered),
        2 => prop_oneof![Just(None), (0u64..=120_000).prop_map(Some)]
            .prop_map(|retry_after_ms| AnswerChoice::Transient { retry_after_ms }),
        1 => Just(AnswerChoice::Permanent),
    ];
    let stale = || prop_oneof![4 => Just(false), 1 => Just(true)];
    let workers_op = prop_oneof![
        3 => (0..WORKERS, prop_oneof![3 => 0..2usize, 1 => 2..CLAIM_KINDS.len()])
            .prop_map(|(worker, kinds)| Op::Claim { worker, kinds }),
        1 => (any::<usize>(), stale()).prop_map(|(pick, stale)| Op::Progress { pick, stale }),
        1 => (any::<usize>(), stale()).prop_map(|(pick, stale)| Op::Context { pick, stale }),
        1 => (any::<usize>(), stale()).prop_map(|(pick, stale)| Op::Release { pick, stale }),
        3 => (any::<usize>(), any::<u8>(), 1_000u64..=60_000)
            .prop_map(|(pick, target, by_ms)| Op::Extend { pick, target, by_ms }),
        8 => (any::<usize>(), stale()).prop_map(|(pick, stale)| Op::Checkpoint { pick, stale }),
        1 => Just(Op::Flush),
        3 => (any::<usize>(), answer).prop_map(|(pick, answer)| Op::Answer { pick, answer }),
        1 => any::<usize>().prop_map(|pick| Op::StaleAnswer { pick }),
    ];
    prop_oneof![3 => time, 10 => io, commands => commands_op, workers => workers_op]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        0..STARTS.len(),
        any::<u64>(),
        prop_oneof![Just(0u64), Just(1_000), Just(MINUTE_MS)],
        1u32..=5,
        prop::collection::vec(template(), 1..=4),
        // Half the scenarios stress the worker protocol, with few job commands.
        prop_oneof![
            prop::collection::vec(op(3, 4, 3), 50..=200),
            prop::collection::vec(op(1, 10, 1), 100..=300),
        ],
        (
            prop_oneof![1 => Just(10_000usize), 2 => 3usize..=8],
            prop_oneof![
                Just(OverflowPolicy::DropOldest),
                Just(OverflowPolicy::RejectNewest)
            ],
            prop_oneof![3 => Just(None), 1 => (0usize..10).prop_map(Some)],
        ),
    )
        .prop_map(
            |(
                start,
                seed,
                misfire_grace_ms,
                history_runs_max,
                jobs,
                ops,
                (outbox_capacity, overflow, shutdown_before_end),
            )| Scenario {
                start,
                seed,
                misfire_grace_ms,
                history_runs_max,
                outbox_capacity,
                overflow,
                shutdown_before_end,
                jobs,
                ops,
            },
        )
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
    /// Completions refused for a missing artifact.
    artifact_refusals: u64,
    /// Sends released, answers accepted, and stale answers refused.
    sends: u64,
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
        self.sends += o.sends;
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
    /// The scheduler's `now` after the latest `handle_timeout`: when the watchdog last ran.
    last_tick: Timestamp,
    /// External workers.
    workers: Vec<WorkerId>,
    /// The worker of each claim this incarnation granted, by run.
    claims: BTreeMap<RunId, WorkerId>,
    /// Extensions granted per run: in this incarnation, or durable before it (SPEC W1).
    extended: BTreeMap<RunId, u32>,
    /// Attempts the watchdog killed (`Effect::KillAttempt`) whose kill is in memory or durable:
    /// their run's `killed` stays set (SPEC W2).
    killed: BTreeSet<(RunId, Attempt)>,
    /// Runs whose last checkpoint save failed to persist (`Event::CheckpointFailed`), with the
    /// attempt: its next save must be written, not throttled (SPEC C1).
    must_write: BTreeMap<RunId, Attempt>,
    /// Checkpoint saves written by `flush_checkpoints` (or `begin_shutdown`), not by a save.
    flushed: BTreeSet<(RunId, u64)>,
    /// The latest throttled save of each executing attempt, until a save or a flush writes it.
    throttled: BTreeMap<RunId, (Attempt, String)>,
    /// Sends released (`Effect::Deliver`) and not yet answered, by delivery.
    sends: BTreeMap<DeliveryId, SendRequest>,
    /// Every `(delivery, attempt)` ever released, across crashes.
    sent: BTreeSet<(DeliveryId, u32)>,
    /// Sends that are no longer current: answered, or lost in a crash.
    answered: Vec<(DeliveryId, u32)>,
    /// Deliveries that ended (`Finished` or `Dropped`) and may not end again: in this
    /// incarnation, or before it with their deletion durable (SPEC D4, at-least-once across
    /// crashes for deletions that were not).
    ended: BTreeSet<DeliveryId>,
    /// Every delivery that ever ended, in any incarnation.
    ended_ever: BTreeSet<DeliveryId>,
    /// Deliveries whose end (their deletion) an acknowledged batch made durable, and whose
    /// end event has not been polled yet: it must be, in the same drain.
    awaiting_end: BTreeSet<DeliveryId>,
    /// Deliveries whose end became durable but whose event a crash swallowed (before the driver
    /// read it, or with the batch written but never acknowledged): the one count docs/semantics.md
    /// allows a crash to lose (D4).
    uncounted: BTreeSet<DeliveryId>,
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
            last_tick: start,
            workers: (0..WORKERS)
                .map(|i| WorkerId::new(&format!("worker-{i}")).expect("a valid worker id"))
                .collect(),
            claims: BTreeMap::new(),
            extended: BTreeMap::new(),
            killed: BTreeSet::new(),
            must_write: BTreeMap::new(),
            flushed: BTreeSet::new(),
            throttled: BTreeMap::new(),
            sends: BTreeMap::new(),
            sent: BTreeSet::new(),
            answered: Vec::new(),
            ended: BTreeSet::new(),
            ended_ever: BTreeSet::new(),
            awaiting_end: BTreeSet::new(),
            uncounted: BTreeSet::new(),
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
                    if let (RunState::Running { .. }, Some(lease)) = (run.state(), run.lease()) {
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
                let seqs = self.checkpoint_seqs();
                self.keel.flush_checkpoints(self.clock);
                self.after_flush(&seqs);
            }
            Op::Answer { pick, answer } => self.answer(*pick, *answer),
            Op::StaleAnswer { pick } => self.stale_answer(*pick),
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
        let outcome = outcome.outcome();
        let missing: Vec<String> = match &outcome {
            Outcome::Success { artifacts, .. } => run
                .required_artifacts()
                .iter()
                .filter(|name| !artifacts.contains_key(*name))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
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
                if !self.flushed.contains(&(run, seq)) && latest == Some(seq) {
                    if let Some(exec) = self.executing.get(&run) {
                        self.must_write.insert(run, exec.attempt);
                    }
                }
            }
            Event::CheckpointSaved { run, .. } => {
                self.must_write.remove(&run);
            }
            Event::Delivery(event) => self.delivery_event(event),
            _ => {}
        }
    }

    fn ack(&mut self, batch: Batch) {
        self.store.apply(&batch);
        self.awaiting_end.extend(deleted_deliveries(&batch));
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
            self.claims.contains_key(&run),
            "{run} attempt {attempt}: external runs, and only they, are claimed"
        );
        let owner = self.claims.get(&run).unwrap_or(&self.local).clone();
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
            self.awaiting_end.is_empty(),
            "SPEC D4: deliveries {:?} ended durably, but no event counted them",
            self.awaiting_end
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
                self.store.apply(&batch);
                self.uncounted.extend(deleted_deliveries(&batch));
            }
        }
        self.uncounted.append(&mut self.awaiting_end);
        // Attempts of the in-process executor die with the process; external workers' attempts
        // do not (their leases are revived below, from what the store holds).
        let lost = std::mem::take(&mut self.executing);
        self.stale
            .extend(lost.into_iter().map(|(run, e)| (run, e.token)));
        // Sends in flight die with the process: their answers are stale from now on.
        let lost = std::mem::take(&mut self.sends);
        self.answered
            .extend(lost.into_values().map(|send| (send.id, send.attempt)));
        self.claims.clear();
        self.must_write.clear();
        self.flushed.clear();
        self.throttled.clear();
        self.shutdown_floor = None;
        self.shutdown_backlog.clear();
        self.announce = None;
        self.acked_in_shutdown = false;
        self.refused_completions.clear();
        // What outlives the process is what the store holds. An end of delivery is announced
        // only once durable, so a delivery ends once across crashes too; only an id above the
        // durable counter (of a delivery never written) may be handed out again.
        let next_delivery = self.store.meta().next_delivery;
        self.ended.retain(|id| id.0 < next_delivery);
        self.extended = self
            .store
            .runs()
            .filter(|r| r.extended())
            .map(|r| (r.id(), 1))
            .collect();
        let store = &self.store;
        self.killed.retain(|(run, attempt)| {
            store
                .run(*run)
                .is_some_and(|r| r.killed() >= Some(*attempt))
        });
        self.floor = self.tokens.keys().next_back().copied();
        self.failed.clear();
        let snapshot = self.store.restore();
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
        // SPEC L3: an attempt handed out to an external worker outlives the process; its lease
        // stands as the store holds it (a report the store never received is undone with the
        // rest, so the worker's token is current again), and only expiry reclaims it.
        let restored: Vec<(RunId, Attempt, Timestamp, Lease, Option<u64>)> = self
            .keel
            .runs()
            .filter_map(|r| match (r.state(), r.lease()) {
                (
                    RunState::Running {
                        attempt,
                        started_at,
                    },
                    Some(lease),
                ) => Some((r.id(), attempt, started_at, lease.clone(), r.timeout_ms())),
                _ => None,
            })
            .collect();
        for (run, attempt, started_at, lease, timeout_ms) in restored {
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
                },
            );
        }
    }

    /// The executing attempt of `run` is over (reported, released, reclaimed, killed): its
    /// token is stale from now on, and so is what the test knew about its checkpoints.
    fn retire(&mut self, run: RunId) -> Executing {
        let exec = self
            .executing
            .remove(&run)
            .unwrap_or_else(|| panic!("{run} has no executing attempt"));
        self.stale.push((run, exec.token));
        self.must_write.remove(&run);
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
            let granted = self.extended.get(&run.id()).copied().unwrap_or(0);
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
        for (run, attempt) in &self.killed {
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

    /// A worker claims work of `kinds`: it gets the oldest queued run of those kinds, or
    /// nothing if none is queued; refused while shutting down. Returns the claimed run.
    fn claim(&mut self, worker: usize, kinds: &[&str]) -> Option<RunId> {
        let worker = self.workers[worker % WORKERS].clone();
        let oldest = self
            .keel
            .runs()
            .filter_map(|r| match r.state() {
                RunState::Queued { since } if kinds.contains(&r.kind()) => {
                    Some((since, r.id(), r.attempt()))
                }
                _ => None,
            })
            .min();
        let shutting_down = self.keel.is_shutting_down();
        let before = fingerprint(&self.keel);
        let result = self.keel.claim(self.clock, &worker, kinds);
        if shutting_down {
            assert_eq!(result, Err(Rejected::ShuttingDown));
        }
        let claimed = self.refused_changes_nothing("claim", before, result)?;
        match (claimed, oldest) {
            (None, None) => {
                self.stats.empty_claims += 1;
                None
            }
            (Some(claimed), Some((_, id, attempt))) => {
                assert_eq!(
                    claimed.run, id,
                    "a claim for {kinds:?} gets the oldest queued run"
                );
                let run = self.keel.run(id).expect("a claimed run is in memory");
                assert_eq!(
                    run.state(),
                    RunState::Starting {
                        attempt: Attempt(attempt.0 + 1)
                    }
                );
                assert_eq!(run.lease().map(|l| &l.owner), Some(&worker));
                self.claims.insert(id, worker);
                self.stats.claims += 1;
                Some(id)
            }
            (claimed, oldest) => panic!(
                "a claim for {kinds:?} returned {claimed:?}, but the oldest queued run is \
                 {oldest:?}"
            ),
        }
    }

    /// A write with a token that is not current must be refused and change nothing.
    fn stale_refused<T: Debug>(
        &mut self,
        what: &str,
        pick: usize,
        write: impl FnOnce(&mut Scheduler, RunId, FencingToken) -> Result<T, Rejected>,
    ) {
        let (run, token) = self.stale_write(pick);
        let before = fingerprint(&self.keel);
        let result = write(&mut self.keel, run, token);
        self.assert_stale_refused(what, run, token, &result);
        self.stats.stale_refused += 1;
        self.refused_changes_nothing(what, before, result);
    }

    fn progress(&mut self, pick: usize, stale: bool) {
        let clock = self.clock;
        if stale {
            return self.stale_refused("progress (stale)", pick, |k, run, token| {
                k.progress(clock, run, token, "upload", "from a stale holder")
            });
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let message = format!("{} items", pick % 1_000);
        self.keel
            .progress(clock, run, exec.token, "upload", &message)
            .unwrap_or_else(|e| panic!("progress of executing {run} ({}): {e}", exec.token));
        let now = self.keel.now();
        let r = self.keel.run(run).expect("an executing run is in memory");
        let progress = r.progress().expect("progress is recorded");
        assert_eq!(
            (
                progress.phase.as_str(),
                progress.message.as_str(),
                progress.at
            ),
            ("upload", message.as_str(), now)
        );
        assert_eq!(r.last_activity(), Some(now), "progress is a sign of life");
        self.stats.progress += 1;
    }

    fn context(&mut self, pick: usize, stale: bool) {
        if stale {
            return self.stale_refused("context (stale)", pick, |k, run, token| {
                k.context(run, token)
            });
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let context = self
            .keel
            .context(run, exec.token)
            .unwrap_or_else(|e| panic!("context of executing {run} ({}): {e}", exec.token));
        let r = self.keel.run(run).expect("an executing run is in memory");
        assert_eq!(
            (context.run, context.attempt, context.lease.token),
            (run, exec.attempt, exec.token)
        );
        assert_eq!(context.lease.owner, exec.owner);
        assert_eq!(context.lease.expires_at, exec.expires_at);
        assert_eq!(&*context.payload, format!("payload of {}", context.job));
        assert_eq!(context.checkpoint.as_ref(), r.checkpoint());
        assert_eq!(context.progress.as_ref(), r.progress());
        self.stats.contexts += 1;
    }

    fn release(&mut self, pick: usize, stale: bool) {
        if stale {
            // SPEC L4: releasing a lease that is no longer the holder's is "already released",
            // not an error, and changes nothing; a run the scheduler does not know is refused.
            let (run, token) = self.stale_write(pick);
            let known = self.keel.run(run).is_some();
            let before = fingerprint(&self.keel);
            let result = self.keel.release(self.clock, run, token);
            let expected = if known {
                Ok(Released::AlreadyReleased)
            } else {
                Err(Rejected::UnknownRun(run))
            };
            assert_eq!(result, expected, "release of {run} with {token}");
            assert_eq!(
                before,
                fingerprint(&self.keel),
                "a release of {run} with {token} changed the state"
            );
            if known {
                self.stats.already_released += 1;
            } else {
                self.stats.refusals += 1;
            }
            return;
        }
        if let Some((run, _)) = self.pick_executing(pick) {
            self.release_run(run);
        }
    }

    /// The executing attempt of `run` gives its lease back: it counts as lost, and the run
    /// retries at once or ends (poison, exhausted, cancelled).
    fn release_run(&mut self, run: RunId) {
        let token = self.executing[&run].token;
        let lost = self.keel.run(run).expect("executing").lost();
        let result = self.keel.release(self.clock, run, token);
        assert_eq!(result, Ok(Released::Released), "release of executing {run}");
        self.retire(run);
        let now = self.keel.now();
        let r = self
            .keel
            .run(run)
            .expect("in memory until its record is acknowledged");
        assert_eq!(r.lost(), lost + 1, "a released attempt counts as lost");
        assert!(r.lease().is_none(), "{run} kept its lease after a release");
        assert!(
            r.state().is_terminal() || r.state() == RunState::BackingOff { until: now },
            "{run} is {:?} after a release",
            r.state()
        );
        if r.state().is_terminal() {
            self.stats.terminal_runs += 1;
        }
        self.stats.releases += 1;
    }

    /// `extend` a run: the answer is exactly what the run's state allows (SPEC W1, W2).
    fn extend(&mut self, pick: usize, target: u8, by_ms: u64) {
        let in_memory: Vec<RunId> = self.keel.runs().map(|r| r.id()).collect();
        let killed: Vec<RunId> = self
            .keel
            .runs()
            .filter(|r| r.killed().is_some())
            .map(|r| r.id())
            .collect();
        let run_id = match target % 4 {
            0 | 1 if !self.executing.is_empty() => self.pick_executing(pick).expect("some").0,
            2 if !killed.is_empty() => killed[pick % killed.len()],
            _ => in_memory
                .get(pick % (in_memory.len() + 1))
                .copied()
                .unwrap_or(RunId(u64::MAX / 2)),
        };
        let now = self.keel.now().max(self.clock);
        let expected = match self.keel.run(run_id) {
            None => Err(Rejected::UnknownRun(run_id)),
            Some(run) if run.killed().is_some() => Err(Rejected::Killed(run_id)),
            Some(run) if !matches!(run.state(), RunState::Running { .. }) => {
                Err(Rejected::NotRunning {
                    run: run_id,
                    state: run.state().name(),
                })
            }
            Some(run) if run.extended() => Err(Rejected::AlreadyExtended(run_id)),
            Some(run) => match (run.watch().timeout_at, run.watch().kill_at) {
                (None, _) => Err(Rejected::NoTimeout(run_id)),
                (Some(_), Some(_)) => Err(Rejected::TimedOut(run_id)),
                (Some(timeout_at), None) => {
                    let extended = timeout_at.max(now).plus_ms(by_ms);
                    Ok(run
                        .watch()
                        .backstop_at
                        .map_or(extended, |cap| extended.min(cap)))
                }
            },
        };
        let seen_killed = self.killed.iter().any(|(run, _)| *run == run_id);
        let before = fingerprint(&self.keel);
        let result = self
            .keel
            .extend(self.clock, run_id, by_ms, "the upstream is slow today");
        assert_eq!(result, expected, "extend({run_id}, {by_ms} ms)");
        if seen_killed {
            assert_eq!(result, Err(Rejected::Killed(run_id)), "SPEC W2");
        }
        match result {
            Ok(deadline) => {
                let granted = self.extended.entry(run_id).or_default();
                *granted += 1;
                assert_eq!(*granted, 1, "SPEC W1: {run_id} extended twice");
                let run = self.keel.run(run_id).expect("extended");
                assert!(run.extended());
                assert_eq!(run.watch().timeout_at, Some(deadline));
                self.stats.extensions += 1;
            }
            Err(e) => {
                assert_eq!(
                    before,
                    fingerprint(&self.keel),
                    "refused extend ({e}) changed the state"
                );
                self.stats.extensions_refused += 1;
            }
        }
    }

    /// The watchdog killed an attempt (`Effect::KillAttempt`): only an attempt with a timeout,
    /// not before it, and for good (SPEC W1, W2).
    fn kill(&mut self, run: RunId, attempt: Attempt) {
        let exec = self.retire(run);
        assert_eq!(
            exec.attempt, attempt,
            "{run}: attempt {attempt} killed, but attempt {} is executing",
            exec.attempt
        );
        let timeout = exec.timeout_ms.unwrap_or_else(|| {
            panic!("{run} attempt {attempt} killed, but its job has no timeout")
        });
        assert!(
            self.last_tick >= exec.started_at.plus_ms(timeout),
            "{run} attempt {attempt} killed at {}, before its timeout ({timeout} ms from {})",
            self.last_tick,
            exec.started_at
        );
        let r = self
            .keel
            .run(run)
            .expect("a killed run is in memory until its record is acknowledged");
        assert_eq!(r.killed(), Some(attempt));
        // The lease is revoked (a retry due at once may already hold a new one).
        assert!(
            r.lease().is_none_or(|l| l.token != exec.token),
            "a kill revokes the lease"
        );
        self.killed.insert((run, attempt));
        self.stats.kills += 1;
    }

    fn checkpoint(&mut self, pick: usize, stale: bool) {
        let clock = self.clock;
        if stale {
            return self.stale_refused("save_checkpoint (stale)", pick, |k, run, token| {
                k.save_checkpoint(clock, run, token, "from a stale holder".into())
            });
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let previous = self.keel.run(run).and_then(|r| r.checkpoint().cloned());
        let data = format!("{run} attempt {} at {}", exec.attempt, pick % 1_000);
        let result = self
            .keel
            .save_checkpoint(clock, run, exec.token, data.clone())
            .unwrap_or_else(|e| panic!("checkpoint of executing {run} ({}): {e}", exec.token));
        let now = self.keel.now();
        let current = self.keel.run(run).and_then(|r| r.checkpoint().cloned());
        if let Some(attempt) = self.must_write.remove(&run) {
            // SPEC C1: a failed save never throttles the next one away.
            assert_eq!(attempt, exec.attempt);
            assert!(
                matches!(result, CheckpointSave::Saving { .. }),
                "SPEC C1: {run}: the save after a failed save was {result:?}"
            );
            self.stats.saves_after_failure += 1;
        }
        match result {
            CheckpointSave::Saving { seq } => {
                assert_eq!(seq, previous.as_ref().map_or(1, |c| c.seq + 1));
                assert_eq!(
                    current,
                    Some(Checkpoint {
                        seq,
                        attempt: exec.attempt,
                        saved_at: now,
                        data,
                    })
                );
                self.throttled.remove(&run);
                self.stats.checkpoints_saved += 1;
            }
            CheckpointSave::Throttled { until } => {
                assert!(until >= now, "throttled until {until}, before {now}");
                assert_eq!(current, previous, "a throttled save changed the checkpoint");
                self.throttled.insert(run, (exec.attempt, data));
                self.stats.checkpoints_throttled += 1;
            }
        }
    }

    /// The checkpoint sequence number of every run in memory.
    fn checkpoint_seqs(&self) -> BTreeMap<RunId, Option<u64>> {
        self.keel
            .runs()
            .map(|r| (r.id(), r.checkpoint().map(|c| c.seq)))
            .collect()
    }

    /// After `flush_checkpoints` (or `begin_shutdown`): every throttled save was written
    /// (SPEC C3), and each write is the save that follows a failed one, if any.
    fn after_flush(&mut self, before: &BTreeMap<RunId, Option<u64>>) {
        for (run, (attempt, data)) in std::mem::take(&mut self.throttled) {
            let r = self.keel.run(run).expect("an executing run is in memory");
            assert_eq!(
                r.checkpoint().map(|c| (c.attempt, c.data.as_str())),
                Some((attempt, data.as_str())),
                "SPEC C3: the flush did not write {run}'s throttled save"
            );
        }
        let written: Vec<(RunId, u64)> = self
            .keel
            .runs()
            .filter_map(|r| {
                let seq = r.checkpoint().map(|c| c.seq);
                (seq != before.get(&r.id()).copied().flatten()).then_some((r.id(), seq))
            })
            .map(|(run, seq)| (run, seq.expect("a flush writes checkpoints, never deletes")))
            .collect();
        for (run, seq) in written {
            self.flushed.insert((run, seq));
            self.must_write.remove(&run);
        }
    }

    /// `Effect::Deliver`: released only once its record is durable, carrying a durable result,
    /// and never twice for one attempt, across crashes too (SPEC D1).
    fn deliver(&mut self, send: SendRequest) {
        let (id, attempt) = (send.id, send.attempt);
        assert!(
            self.sent.insert((id, attempt)),
            "{id} attempt {attempt} sent twice"
        );
        assert_eq!(
            self.store.delivery(id).map(|d| d.state),
            Some(DeliveryState::Sending { attempt }),
            "{id} attempt {attempt} sent before its record was durable"
        );
        let run = self.store.run(send.payload.run);
        assert!(
            run.is_some_and(|r| r.state().is_terminal() && r.state().name() == send.payload.state),
            "{id} carries {} {}, but the store holds {run:?}",
            send.payload.run,
            send.payload.state
        );
        assert!(
            SINKS.contains(&&*send.sink),
            "{id} to unknown sink {}",
            send.sink
        );
        let attempts_max = self.keel.outbox().config().policy.attempts_max;
        assert!(
            (1..=attempts_max).contains(&attempt),
            "{id} attempt {attempt}"
        );
        let previous = self.sends.insert(id, send);
        assert!(previous.is_none(), "{id}: two attempts in flight");
        self.stats.sends += 1;
    }

    /// A sink answers a send: accepted; the delivery ends, or retries after its backoff.
    fn answer(&mut self, pick: usize, answer: AnswerChoice) {
        let Some(&id) = self.sends.keys().nth(pick % self.sends.len().max(1)) else {
            return;
        };
        self.answer_send(id, answer);
    }

    fn answer_send(&mut self, id: DeliveryId, answer: AnswerChoice) {
        let send = self.sends.remove(&id).expect("a send in flight");
        let attempt = send.attempt;
        let state = self.keel.outbox().delivery(id).map(|d| d.state);
        assert_eq!(state, Some(DeliveryState::Sending { attempt }));
        self.keel
            .handle_delivery_result(self.clock, id, attempt, answer.result())
            .unwrap_or_else(|e| panic!("answer to {id} attempt {attempt}: {e}"));
        self.answered.push((id, attempt));
        self.stats.answers += 1;
        let now = self.keel.now();
        let after = self.keel.outbox().delivery(id);
        let attempts_max = self.keel.outbox().config().policy.attempts_max;
        match answer {
            AnswerChoice::Transient { .. } if attempt < attempts_max => {
                // SPEC D2, D3: the outbox retries it after its backoff, without the job.
                let state = after.map(|d| d.state);
                assert!(
                    matches!(state, Some(DeliveryState::Waiting { due }) if due > now),
                    "{id} is {state:?} after a transient failure of attempt {attempt}"
                );
            }
            _ => assert!(
                after.is_none(),
                "{id} still in the outbox after {answer:?} to attempt {attempt}"
            ),
        }
    }

    /// An answer for a send that is not current is refused and changes nothing.
    fn stale_answer(&mut self, pick: usize) {
        let (id, attempt) = match pick % 3 {
            0 if !self.answered.is_empty() => self.answered[(pick / 3) % self.answered.len()],
            1 if !self.sends.is_empty() => {
                let send = self
                    .sends
                    .values()
                    .nth((pick / 3) % self.sends.len())
                    .expect("not empty");
                (send.id, send.attempt + 1)
            }
            _ => (DeliveryId(u64::MAX / 2), 1),
        };
        let before = fingerprint(&self.keel);
        let result =
            self.keel
                .handle_delivery_result(self.clock, id, attempt, DeliveryResult::Delivered);
        assert!(
            matches!(result, Err(Rejected::Delivery(_))),
            "an answer for {id} attempt {attempt}, not current, was not refused: {result:?}"
        );
        self.stats.stale_answers += 1;
        self.refused_changes_nothing("handle_delivery_result (stale)", before, result);
    }

    /// SPEC D4: every delivery that ends is counted once (`Finished` or `Dropped`).
    fn delivery_event(&mut self, event: OutboxEvent) {
        let id = match event {
            OutboxEvent::Finished { id, .. } => {
                self.stats.deliveries_finished += 1;
                Some(id)
            }
            OutboxEvent::Dropped { id, .. } => {
                self.stats.deliveries_dropped += 1;
                id
            }
            OutboxEvent::RetryScheduled { .. } => None,
        };
        let Some(id) = id else {
            return;
        };
        assert!(
            self.ended.insert(id),
            "SPEC D4: {id} ended (was counted) twice"
        );
        self.ended_ever.insert(id);
        // Announced only once the end is durable (a delivery never written ends at once).
        assert!(
            self.store.delivery(id).is_none(),
            "{id} ended before its end was durable"
        );
        self.awaiting_end.remove(&id);
        assert!(
            !self.sends.contains_key(&id),
            "{id} ended with its send unanswered"
        );
        assert!(
            self.keel.outbox().delivery(id).is_none(),
            "{id} ended but is still in the outbox"
        );
    }

    /// `begin_shutdown`: lists its own attempts in progress (they go on, with the driver's
    /// budget to finish: SPEC O1), lists the sends in flight (SPEC D5), flushes throttled
    /// checkpoints (C3), and nothing new fires or is claimed.
    fn shutdown(&mut self) {
        if self.keel.is_shutting_down() {
            return;
        }
        let seqs = self.checkpoint_seqs();
        let running: BTreeSet<(RunId, Attempt)> = self
            .keel
            .runs()
            .filter(|r| {
                let worker = self.keel.worker();
                r.lease().is_some_and(|l| &l.owner == worker)
            })
            .filter_map(|r| match r.state() {
                RunState::Running { attempt, .. } => Some((r.id(), attempt)),
                _ => None,
            })
            .collect();
        let in_flight = self.keel.outbox().in_flight();
        let shutdown = self.keel.begin_shutdown(self.clock);
        assert!(self.keel.is_shutting_down());
        let asked: BTreeSet<(RunId, Attempt)> = shutdown.attempts.iter().copied().collect();
        assert_eq!(
            asked, running,
            "begin_shutdown lists its own attempts in progress"
        );
        let own = self.keel.worker().clone();
        for (run, exec) in self.executing.iter().filter(|(_, e)| e.owner == own) {
            assert!(asked.contains(&(*run, exec.attempt)));
        }
        assert_eq!(shutdown.deliveries, in_flight);
        for id in self.sends.keys() {
            assert!(shutdown.deliveries.contains(id), "{id} is being sent");
        }
        self.after_flush(&seqs);
        let highest = self
            .keel
            .runs()
            .map(|r| r.id())
            .chain(self.store.runs().map(|r| r.id()))
            .max();
        self.shutdown_floor = Some(highest.unwrap_or(RunId(0)));
        self.shutdown_backlog = self
            .keel
            .jobs()
            .flat_map(|j| j.backlog.iter().map(|slot| (j.spec.id.clone(), *slot)))
            .collect();
        self.stats.shutdowns += 1;
    }

    /// No run loops forever (the poison verdict, bounded retries and snoozes) and every
    /// delivery ends: faults stop, nothing new fires (every job is paused), workers claim what
    /// is queued, every attempt and send is answered, and time moves on in bounded steps. Within
    /// a bounded horizon every run must be terminal in the store and the outbox empty, and
    /// every delivery the store ever held must have ended.
    fn liveness(&mut self) {
        self.faults = false;
        if let Some(batch) = self.held.take() {
            self.ack(batch);
        }
        if self.keel.is_shutting_down() {
            // After a graceful shutdown the process stops; it is started again.
            self.crash();
        }
        self.clock = self.clock.max(self.keel.now());
        let scheduled: Vec<JobId> = self
            .keel
            .jobs()
            .filter(|j| matches!(j.state, JobState::Scheduled { .. }))
            .map(|j| j.spec.id.clone())
            .collect();
        for id in scheduled {
            self.keel
                .pause_job(self.clock, &id)
                .expect("a scheduled job can be paused");
        }
        let horizon = self.clock.plus_ms(LIVENESS_HORIZON_MS);
        loop {
            self.drain();
            while self.claim(0, &["work"]).is_some() {}
            self.drain();
            let executing: Vec<RunId> = self.executing.keys().copied().collect();
            for run in executing {
                match self.rng.below_inclusive(9) {
                    0..=5 => self.complete_run(run, &OutcomeChoice::Success),
                    6 | 7 => self.complete_run(run, &OutcomeChoice::Retryable),
                    8 => self.complete_run(run, &OutcomeChoice::Permanent),
                    _ => self.release_run(run),
                }
            }
            let sends: Vec<DeliveryId> = self.sends.keys().copied().collect();
            for id in sends {
                let answer = match self.rng.below_inclusive(9) {
                    0..=6 => AnswerChoice::Delivered,
                    7 | 8 => AnswerChoice::Transient {
                        retry_after_ms: None,
                    },
                    _ => AnswerChoice::Permanent,
                };
                self.answer_send(id, answer);
            }
            self.drain();
            self.keel.check_invariants();
            self.check_world();
            if self.settled() {
                break;
            }
            let step = self.clock.plus_ms(LIVENESS_STEP_MS);
            let next = self.keel.poll_timeout().map_or(step, |next| next.min(step));
            self.clock = self.clock.max(next);
            self.step(&Op::Timeout);
            self.stats.liveness_rounds += 1;
            assert!(
                self.clock <= horizon,
                "no run loops forever, but after {} h without faults: runs {:?}, stored active \
                 runs {:?}, outbox {:?}",
                LIVENESS_HORIZON_MS / HOUR_MS,
                self.keel.runs().collect::<Vec<_>>(),
                self.store
                    .runs()
                    .filter(|r| !r.state().is_terminal())
                    .collect::<Vec<_>>(),
                self.keel.outbox().deliveries().collect::<Vec<_>>()
            );
        }
        let missing: Vec<&DeliveryId> = self
            .store
            .ever_delivered()
            .difference(&self.ended_ever)
            .filter(|id| !self.uncounted.contains(id))
            .collect();
        assert!(
            missing.is_empty(),
            "SPEC D4: deliveries {missing:?} were stored but never ended"
        );
    }

    /// Nothing is left to do: every run is terminal in memory and in the store, and no
    /// delivery is left.
    fn settled(&self) -> bool {
        self.held.is_none()
            && self.keel.is_quiescent()
            && self.executing.is_empty()
            && self.sends.is_empty()
            && self.keel.runs().all(|r| r.state().is_terminal())
            && self.store.runs().all(|r| r.state().is_terminal())
            && self.keel.outbox().is_empty()
            && self.store.deliveries().next().is_none()
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

/// The deliveries a batch deletes: each has ended (finished or dropped).
fn deleted_deliveries(batch: &Batch) -> impl Iterator<Item = DeliveryId> + '_ {
    batch.records.iter().filter_map(|r| match r {
        Record::DeleteDelivery { id } => Some(*id),
        _ => None,
    })
}

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
    assert!(total.sends > 20 && total.answers > 20, "{total:?}");
    assert!(total.stale_answers > 10, "{total:?}");
    assert!(total.deliveries_finished > 20, "{total:?}");
    assert!(total.deliveries_dropped > 0, "{total:?}");
    assert!(total.shutdowns > 0, "{total:?}");
    assert!(total.liveness_rounds > 0, "{total:?}");
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
            Record::PutRun(run) => Some((run.id(), run.state())),
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
    let run = keel.runs().next().expect("the slot fired").id();
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
        keel.run(run).map(|r| r.state()),
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
        keel.run(run).map(|r| r.state().name()),
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
    let run = keel.runs().next().expect("the slot fired").id();
    keel.cancel_run(t1, run)
        .expect("a starting run can be cancelled");
    assert_eq!(keel.run(run).map(|r| r.state()), Some(RunState::Cancelled));
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
        keel.run(start.run).map(|r| r.state()),
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
    assert_eq!(run.state(), RunState::Cancelled);
    assert!(run.last_error().is_some(), "{run:?}");
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
    let mut store = MemStore::keeping_history();
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
        store.run(start.run).unwrap().cancel_requested(),
        "the request is durable"
    );

    // Crash before the handler reports.
    let t2 = t1.plus_ms(1_000);
    let mut keel = Scheduler::restore(Config::default(), 7, t2, store.restore());
    keel.handle_timeout(t2);
    let effects = flush(&mut keel, &mut store, t2);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::StartAttempt(s) if s.run == start.run)),
        "the cancelled run was handed out again: {effects:?}"
    );
    assert_eq!(store.run(start.run).unwrap().state(), RunState::Cancelled);
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
fn flush(keel: &mut Scheduler, store: &mut MemStore, now: Timestamp) -> Vec<Effect> {
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
    assert_eq!((&*first.kind, &*first.payload), ("work", "p"));

    keel.remove_job(t1, &JobId::new("minutely").expect("valid"))
        .expect("known job");
    let failed = Outcome::Retryable {
        message: "503".into(),
    };
    keel.handle_outcome(t1, first.run, first.lease.token, failed)
        .expect("current attempt");
    let retry_at = t1.plus_ms(1_000);
    let mut store = MemStore::keeping_history();
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
    assert_eq!((&*second.kind, &*second.payload), ("work", "p"));
}

/// SPEC W5 and `keel_core::incident`: incidents are persisted (`Record::PutIncident`) when
/// they open and when they resolve. (A first version of the lease work collected them in the
/// journal but never put them in a batch.)
#[test]
fn an_incident_is_persisted_when_it_opens_and_when_it_resolves() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let config = Config::default();
    let mut store = MemStore::keeping_history();
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
        store
            .incidents()
            .map(|i| (i.id, i.clone()))
            .collect::<BTreeMap<_, _>>(),
        incidents,
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
    let mut store = MemStore::keeping_history();
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
    let mut store = MemStore::keeping_history();
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
    let mut keel = Scheduler::restore(Config::default(), 7, t0, store.restore());
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

// ----- workers, watchdog, checkpoints, outbox ----------------------------------------------

/// Runs `keel` until its first attempt is handed out, persisting into `store`.
fn first_start(keel: &mut Scheduler, store: &mut MemStore, now: Timestamp) -> AttemptStart {
    keel.handle_timeout(now);
    flush(keel, store, now)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(start) => Some(start),
            _ => None,
        })
        .expect("an attempt was handed out")
}

/// Fails every batch until no effect is left; returns the effects other than batches.
fn fail_all(keel: &mut Scheduler, now: Timestamp) -> Vec<Effect> {
    let mut others = Vec::new();
    while let Some(effect) = keel.poll_effect() {
        match effect {
            Effect::Persist(batch) => keel.handle_persist_failed(now, batch.id, "disk full"),
            other => others.push(other),
        }
        keel.check_invariants();
    }
    others
}

/// SPEC C1: a save whose persist failed is reported, and the next save is written at once.
#[test]
fn the_save_after_a_failed_save_is_written_at_once() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, every_minute("minutely")).expect("valid");
    flush(&mut keel, &mut store, t0);
    let start = first_start(&mut keel, &mut store, t1);
    let (run, token) = (start.run, start.lease.token);
    let save = |keel: &mut Scheduler, at: Timestamp, data: &str| {
        keel.save_checkpoint(at, run, token, data.into())
            .expect("the holder may save")
    };
    assert!(matches!(
        save(&mut keel, t1, "1"),
        CheckpointSave::Saving { seq: 1 }
    ));
    flush(&mut keel, &mut store, t1);
    // Within the window after an acknowledged save: throttled.
    let t2 = t1.plus_ms(6_000);
    assert!(matches!(
        save(&mut keel, t1.plus_ms(1_000), "2"),
        CheckpointSave::Throttled { .. }
    ));
    // After it: written, and the store fails it.
    assert!(matches!(
        save(&mut keel, t2, "3"),
        CheckpointSave::Saving { seq: 2 }
    ));
    let events = fail_all(&mut keel, t2);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Effect::Event(Event::CheckpointFailed { run: r, seq: 2, .. }) if *r == run
        )),
        "{events:?}"
    );
    // The next save goes through at once, even a millisecond later.
    assert!(matches!(
        save(&mut keel, t2.plus_ms(1), "4"),
        CheckpointSave::Saving { seq: 3 }
    ));
}

/// SPEC C1 and docs/semantics.md ("A failed save is reported (`Event::CheckpointFailed`) and
/// the next save is written at once"): not so when the failed save was written by
/// `flush_checkpoints` (or `begin_shutdown`) inside the throttle window of an earlier
/// acknowledged save. `Throttle::failed` keeps the window "as it was", which the flush had
/// bypassed, so the next save is `Throttled` until `acked_at + interval`.
#[test]
fn the_save_after_a_failed_flushed_save_is_written_at_once() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, every_minute("minutely")).expect("valid");
    flush(&mut keel, &mut store, t0);
    let start = first_start(&mut keel, &mut store, t1);
    let (run, token) = (start.run, start.lease.token);
    keel.save_checkpoint(t1, run, token, "1".into())
        .expect("the holder may save");
    flush(&mut keel, &mut store, t1);
    let t2 = t1.plus_ms(1_000);
    let throttled = keel
        .save_checkpoint(t2, run, token, "2".into())
        .expect("the holder may save");
    assert!(matches!(throttled, CheckpointSave::Throttled { .. }));
    keel.flush_checkpoints(t2);
    let events = fail_all(&mut keel, t2);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Effect::Event(Event::CheckpointFailed { seq: 2, .. }))),
        "the flushed save failed: {events:?}"
    );
    let next = keel
        .save_checkpoint(t2.plus_ms(10), run, token, "3".into())
        .expect("the holder may save");
    assert!(
        matches!(next, CheckpointSave::Saving { .. }),
        "the save after a failed save must be written, got {next:?}"
    );
}

/// `begin_shutdown`: nothing new fires or starts; attempts in progress are asked to stop and
/// the rest waits for the next start. But a run that ends during the shutdown settles, and
/// settle takes its job's buffered slot (`overlap: buffer-one`, or a catch-up backlog): a new
/// run is created, with a lease, during the shutdown. Its attempt is held, so the next start
/// finds it cut short: a lost attempt, or, for a job that does not resume after crashes, a
/// run that ends `interrupted` without ever having run. The slot should stay buffered until
/// the next start.
#[test]
fn a_buffered_slot_waits_for_the_next_start_after_a_shutdown() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let t2 = t1.plus_ms(60_000);
    let mut spec = every_minute("minutely");
    spec.overlap = OverlapPolicy::BufferOne;
    spec.resume_after_crash = false;
    let config = Config::default();
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(config, 7, t0);
    keel.add_job(t0, spec).expect("valid");
    flush(&mut keel, &mut store, t0);
    let start = first_start(&mut keel, &mut store, t1);
    keel.heartbeat(t2, start.run, start.lease.token)
        .expect("the holder renews");
    keel.handle_timeout(t2);
    flush(&mut keel, &mut store, t2);
    let id = JobId::new("minutely").expect("valid");
    assert_eq!(
        keel.job(&id).map(|j| j.backlog.len()),
        Some(1),
        "slot 2 waits"
    );

    let shutdown = keel.begin_shutdown(t2);
    assert_eq!(shutdown.attempts, vec![(start.run, start.attempt)]);
    flush(&mut keel, &mut store, t2);
    keel.handle_outcome(t2, start.run, start.lease.token, Outcome::ok())
        .expect("the attempt stops in time");
    flush(&mut keel, &mut store, t2);
    // The process stops and starts again.
    let mut keel = Scheduler::restore(config, 7, t2, store.restore());
    flush(&mut keel, &mut store, t2);
    let interrupted: Vec<&Run> = store
        .runs()
        .filter(|r| r.state() == RunState::Interrupted)
        .collect();
    assert!(
        interrupted.is_empty(),
        "slot 2 ended interrupted without running: {interrupted:?}"
    );
    // The next start drains the backlog: slot 2 runs now.
    assert_eq!(keel.job(&id).map(|j| j.backlog.len()), Some(0));
    assert!(
        keel.runs()
            .any(|r| r.slot() == Some(t2) && !r.state().is_terminal()),
        "slot 2 runs after the restart"
    );
}

/// SPEC W1, W2: the timeout is extended once per run; a killed run is never extended, and
/// nothing its killed attempt reports is accepted.
#[test]
fn extend_once_and_a_kill_is_sticky() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut spec = every_minute("minutely");
    spec.timeout_ms = Some(20_000);
    let config = Config::default();
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(config, 7, t0);
    keel.add_job(t0, spec).expect("valid");
    flush(&mut keel, &mut store, t0);
    let start = first_start(&mut keel, &mut store, t1);
    let (run, token) = (start.run, start.lease.token);
    let deadline = keel
        .extend(t1, run, 5_000, "slow upstream")
        .expect("the first extension");
    assert_eq!(deadline, t1.plus_ms(25_000));
    assert_eq!(
        keel.extend(t1, run, 5_000, "again"),
        Err(Rejected::AlreadyExtended(run))
    );
    flush(&mut keel, &mut store, t1);
    assert!(
        store.run(run).unwrap().extended(),
        "the extension is durable"
    );
    // A restart does not grant a second one.
    let mut keel = Scheduler::restore(config, 7, t1, store.restore());
    flush(&mut keel, &mut store, t1);
    let retry = first_start(&mut keel, &mut store, t1);
    assert_eq!(retry.run, run);
    assert!(
        matches!(
            keel.heartbeat(t1, run, token),
            Err(Rejected::StaleToken { .. })
        ),
        "the attempt lost in the crash is fenced off"
    );
    assert_eq!(
        keel.extend(t1, run, 5_000, "after the restart"),
        Err(Rejected::AlreadyExtended(run))
    );
    // Time out, then kill.
    let token = retry.lease.token;
    let t2 = t1.plus_ms(20_000);
    keel.heartbeat(t2, run, token).expect("alive");
    keel.handle_timeout(t2);
    let effects = flush(&mut keel, &mut store, t2);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::CancelAttempt { run: r, .. } if *r == run)));
    let t3 = t2.plus_ms(config.kill_grace_ms);
    keel.handle_timeout(t3);
    let effects = flush(&mut keel, &mut store, t3);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::KillAttempt { run: r, attempt: a }
                if *r == run && *a == retry.attempt)),
        "{effects:?}"
    );
    assert_eq!(
        keel.extend(t3, run, 5_000, "too late"),
        Err(Rejected::Killed(run))
    );
    assert!(matches!(
        keel.heartbeat(t3, run, token),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(matches!(
        keel.handle_outcome(t3, run, token, Outcome::ok()),
        Err(Rejected::StaleToken { .. } | Rejected::NotRunning { .. })
    ));
    assert_eq!(
        keel.release(t3, run, token),
        Ok(Released::AlreadyReleased),
        "SPEC L4: releasing a lost lease is not an error"
    );
    assert_eq!(
        store.run(run).unwrap().killed(),
        Some(retry.attempt),
        "the kill is durable"
    );
}

/// SPEC D1, D4: a small outbox stays bounded (overflow evicts the oldest waiting delivery,
/// never one in flight), each delivery ends once, and a stale answer is refused and changes
/// nothing.
#[test]
fn a_small_outbox_stays_bounded_and_counts_each_delivery_once() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let config = Config {
        outbox: OutboxConfig {
            capacity: 3,
            ..OutboxConfig::default()
        },
        ..Config::default()
    };
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(config, 7, t0);
    let mut spec = every_minute("minutely");
    spec.sinks = vec!["hook-a".into(), "hook-b".into()].into();
    spec.overlap = OverlapPolicy::Allow;
    keel.add_job(t0, spec).expect("valid");
    flush(&mut keel, &mut store, t0);
    let mut ended = BTreeMap::new();
    let mut evicted = 0;
    let mut sends = Vec::new();
    let mut note = |effects: Vec<Effect>, sends: &mut Vec<SendRequest>| {
        for effect in effects {
            match effect {
                Effect::Event(Event::Delivery(OutboxEvent::Finished { id, .. })) => {
                    *ended.entry(id).or_insert(0) += 1;
                }
                Effect::Event(Event::Delivery(OutboxEvent::Dropped { id, .. })) => {
                    let id = id.expect("evicted, not refused: one delivery waits");
                    *ended.entry(id).or_insert(0) += 1;
                    evicted += 1;
                }
                Effect::Deliver(send) => sends.push(send),
                _ => {}
            }
        }
    };
    // Two runs finish: four deliveries for an outbox of three. The first two are in flight
    // when the second run finishes; its first delivery is evicted for its second.
    for minute in 1..=2 {
        let now = t0.plus_ms(minute * 60_000);
        let start = first_start(&mut keel, &mut store, now);
        keel.handle_outcome(now, start.run, start.lease.token, Outcome::ok())
            .expect("current");
        let effects = flush(&mut keel, &mut store, now);
        note(effects, &mut sends);
        assert!(keel.outbox().len() <= 3);
    }
    let t3 = t0.plus_ms(3 * 60_000);
    keel.handle_timeout(t3);
    let effects = flush(&mut keel, &mut store, t3);
    note(effects, &mut sends);
    assert!(!sends.is_empty(), "deliveries were sent");
    for send in std::mem::take(&mut sends) {
        let before = format!("{keel:?}");
        assert!(keel
            .handle_delivery_result(t3, send.id, send.attempt + 1, DeliveryResult::Delivered)
            .is_err());
        assert_eq!(
            before,
            format!("{keel:?}"),
            "a stale answer changed nothing"
        );
        keel.handle_delivery_result(t3, send.id, send.attempt, DeliveryResult::Delivered)
            .expect("the current attempt");
        assert!(keel
            .handle_delivery_result(t3, send.id, send.attempt, DeliveryResult::Delivered)
            .is_err());
        let effects = flush(&mut keel, &mut store, t3);
        note(effects, &mut sends);
    }
    assert!(keel.outbox().is_empty());
    assert!(store.deliveries().next().is_none());
    assert_eq!(
        (ended.len(), evicted),
        (4, 1),
        "four deliveries ended, one evicted: {ended:?}"
    );
    assert!(
        ended.values().all(|n| *n == 1),
        "each counted once: {ended:?}"
    );
}

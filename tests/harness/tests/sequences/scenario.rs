//! The scenarios the property tests draw: jobs, templates and operations.

use super::*;

// ----- scenario ---------------------------------------------------------------------------

/// Job ids are `job-0` to `job-5`; scenarios start with up to four, and `Add` can (re-)add any.
pub(super) const JOB_POOL: usize = 6;

/// Start instants: the 2026 New York spring-forward and fall-back days, and a quiet day.
pub(super) const STARTS: [&str; 3] = [
    "2026-03-08T06:30:00Z",
    "2026-11-01T05:30:00Z",
    "2026-01-01T00:00:00Z",
];

/// Sinks a job's results may go to.
pub(super) const SINKS: [&str; 2] = ["hook-a", "hook-b"];

/// What workers ask for when they claim: every job here has kind `work`, so a claim for
/// `other` alone finds nothing (and, repeated while work waits, is an idle claim loop).
pub(super) const CLAIM_KINDS: [&[&str]; 4] = [&["work"], &["work", "other"], &["other"], &[]];

/// External workers.
pub(super) const WORKERS: usize = 3;

/// The artifact jobs with required artifacts require.
pub(super) const REPORT: &str = "report";

pub(super) const MINUTE_MS: u64 = 60_000;
pub(super) const HOUR_MS: u64 = 60 * MINUTE_MS;
pub(super) const DAY_MS: u64 = 24 * HOUR_MS;

/// The liveness phase moves time on in steps of at most this...
pub(super) const LIVENESS_STEP_MS: u64 = 10 * MINUTE_MS;
/// ...and every run must have ended within this.
pub(super) const LIVENESS_HORIZON_MS: u64 = 6 * HOUR_MS;

#[derive(Clone, Debug)]
pub(super) enum Sched {
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
pub(super) struct Template {
    pub(super) schedule: Sched,
    pub(super) misfire: MisfirePolicy,
    pub(super) overlap: OverlapPolicy,
    pub(super) attempts_max: u32,
    pub(super) backoff_base_ms: u64,
    pub(super) deadline_ms: Option<u64>,
    pub(super) delete_after_run: bool,
    pub(super) resume_after_crash: bool,
    /// Run by external workers that claim it.
    pub(super) external: bool,
    /// The attempt timeout (the watchdog times out, kills; `extend` once).
    pub(super) timeout_ms: Option<u64>,
    /// Completions must carry the `report` artifact.
    pub(super) requires_report: bool,
    /// How many of [`SINKS`] the results go to.
    pub(super) sinks: usize,
}

impl Template {
    /// The spec for job `id`; one-shot and interval times are relative to `now`.
    pub(super) fn spec(&self, id: &JobId, now: Timestamp) -> JobSpec {
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
pub(super) enum OutcomeChoice {
    /// Success with the `report` artifact.
    Success,
    /// Success without artifacts: refused for a job that requires `report`.
    SuccessBare,
    /// Success with a `report` URL the artifact gate checks: found (200) or not (404).
    SuccessChecked {
        found: bool,
    },
    Retryable,
    Permanent,
    Snooze(u64),
    Cancelled,
}

impl OutcomeChoice {
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            OutcomeChoice::Success => Outcome::Success {
                summary: Some("done".into()),
                artifacts: BTreeMap::from([(REPORT.to_owned(), "s3://reports/1".to_owned())]),
            },
            OutcomeChoice::SuccessChecked { found } => Outcome::Success {
                summary: Some("checked".into()),
                artifacts: BTreeMap::from([(
                    REPORT.to_owned(),
                    format!(
                        "https://reports.example/{}",
                        if *found { "1" } else { "404" }
                    ),
                )]),
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
pub(super) enum Op {
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
    /// The artifact checks of a request in flight come back: in this world a target ending in
    /// `/404` answers 404 and any other 200.
    Verified {
        pick: usize,
    },
    /// `begin_shutdown` (placed near the end of a scenario, never generated by `op()`).
    Shutdown,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum AnswerChoice {
    Delivered,
    Transient { retry_after_ms: Option<u64> },
    Permanent,
}

impl AnswerChoice {
    pub(super) fn result(self) -> DeliveryResult {
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
pub(super) struct Scenario {
    pub(super) start: usize,
    pub(super) seed: u64,
    pub(super) misfire_grace_ms: u64,
    pub(super) history_runs_max: u32,
    /// The outbox capacity: small ones overflow.
    pub(super) outbox_capacity: usize,
    pub(super) overflow: OverflowPolicy,
    /// `begin_shutdown` this many operations before the end, if any.
    pub(super) shutdown_before_end: Option<usize>,
    pub(super) jobs: Vec<Template>,
    pub(super) ops: Vec<Op>,
}

pub(super) fn sched() -> impl Strategy<Value = Sched> {
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

pub(super) fn template() -> impl Strategy<Value = Template> {
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

pub(super) fn outcome() -> impl Strategy<Value = OutcomeChoice> {
    prop_oneof![
        4 => Just(OutcomeChoice::Success),
        2 => Just(OutcomeChoice::SuccessBare),
        2 => any::<bool>().prop_map(|found| OutcomeChoice::SuccessChecked { found }),
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
pub(super) fn op(commands: u32, workers: u32, back: u32) -> impl Strategy<Value = Op> {
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
        2 => any::<usize>().prop_map(|pick| Op::Verified { pick }),
    ];
    prop_oneof![3 => time, 10 => io, commands => commands_op, workers => workers_op]
}

pub(super) fn scenario() -> impl Strategy<Value = Scenario> {
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

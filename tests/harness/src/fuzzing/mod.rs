//! Fuzz target bodies, shared by the cargo-fuzz crate in `fuzz/` (nightly, libFuzzer) and by the
//! corpus-replay test `tests/fuzz_corpus.rs` (stable).
//!
//! Each function takes arbitrary bytes and must return normally for every input: a panic means
//! keel-core has a bug (or broke a documented property), never that the input was "bad". The
//! targets never call anything that is allowed to panic on valid input, and keep every input's
//! work bounded so that one run takes milliseconds.
//!
//! - [`schedule_parse`]: the schedule parser and fire-time arithmetic on hostile text and
//!   extreme instants.
//! - [`core_events`]: a decoded sequence of commands, inputs, store acknowledgements, failures
//!   and crashes driving a [`Scheduler`], with [`Scheduler::check_invariants`] after every step
//!   and a model store that checks what the core asked to persist.

use std::collections::{BTreeMap, BTreeSet};

use crate::promises::{
    attempts_in_progress, checkpoint_seqs, expected_extend, missing_artifacts,
    own_attempts_in_progress, refused_as_stale, Promises,
};
use keel_core::schedule::Due;
use keel_core::{
    limits, Attempt, AttemptStart, Batch, CheckpointSave, Config, DeliveryId, DeliveryResult,
    DeliveryState, Effect, Event, FencingToken, Incident, IncidentKind, Job, JobId, JobSpec,
    JobState, MisfirePolicy, OutboxConfig, OutboxEvent, Outcome, OverflowPolicy, OverlapPolicy,
    Rejected, Released, RetryPolicy, RunId, RunState, Schedule, ScheduleSpec, Scheduler,
    SendRequest, Timestamp, WorkerId,
};
use keel_testkit::MemStore;

mod schedule_parse;
mod world;
mod world_ops;

pub use schedule_parse::schedule_parse;
use schedule_parse::T_2026;
use world::*;

// ----- byte decoding ------------------------------------------------------------------------

/// Reads little pieces of an input, yielding zeros once it is exhausted, so every byte string
/// decodes to something.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        let mut bytes = [0; 8];
        for b in &mut bytes {
            *b = self.u8();
        }
        u64::from_le_bytes(bytes)
    }
}

/// FNV-1a: a cheap, stable hash to derive instants and choices from the whole input.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `x` mapped into `lo..=hi` (`lo <= hi`).
fn in_range(x: u64, lo: i64, hi: i64) -> i64 {
    let span = hi.abs_diff(lo).saturating_add(1);
    lo.saturating_add_unsigned(x % span)
}

// ----- core_events --------------------------------------------------------------------------

/// The most operations decoded from one input.
pub const CORE_EVENTS_MAX_OPS: usize = 256;

/// How many times one drain loop may call `poll_effect` (each acknowledgement can release more).
const DRAIN_MAX_EFFECTS: usize = 256;

/// How many effects of one drain are each followed by `check_invariants`.
const DRAIN_CHECKED_EFFECTS: usize = 16;

/// How many executing attempts one driver step reports on.
const STEP_MAX_OUTCOMES: usize = 64;

/// How many rounds [`CoreOp::Settle`] may take, besides two per slot waiting in a backlog,
/// before a run is deemed to loop forever.
const SETTLE_ROUNDS: usize = 64;

/// The furthest the clock may run from its start: 300 years.
const CLOCK_SPAN_MS: i64 = 300 * 365 * 86_400_000;

/// Start instants: just before a US spring-forward, just before a US fall-back, a new year, a
/// leap day.
const STARTS: [i64; 4] = [
    1_772_942_400_000, // 2026-03-08T04:00:00Z (23:00 EST the evening before spring-forward)
    1_793_507_400_000, // 2026-11-01T04:30:00Z (00:30 EDT, before fall-back)
    T_2026 - 30_000,   // 2025-12-31T23:59:30Z
    1_709_164_800_000, // 2024-02-29T00:00:00Z
];

/// A schedule from a small canned set; `arg` steers one-shot instants.
fn canned_schedule(pick: u8, arg: u8, now: Timestamp, start: Timestamp) -> ScheduleSpec {
    let cron = |expr: &str, zone: &str| ScheduleSpec::Cron {
        expr: expr.into(),
        zone: zone.into(),
    };
    match pick % 14 {
        0 => cron("0 * * * * *", "UTC"),
        1 => cron("*/10 * * * * *", "UTC"),
        2 => cron("0 30 2 * * *", "America/New_York"), // in the spring-forward gap
        3 => cron("0 0 * * * *", "America/New_York"),  // both passes of the fall-back hour
        4 => cron("30 1 * * *", "America/New_York"),   // 5 fields, in the fall-back overlap
        5 => cron("@daily", "Europe/Paris"),
        6 => cron("0 0 12 * * MON-FRI", "Asia/Kathmandu"),
        7 => cron("0 0 0 1 1 * 2027", "UTC"), // one slot, then none
        8 => cron("0 0 0 1 1 * 2020", "UTC"), // no slot left: refused
        9 => ScheduleSpec::Every {
            interval_ms: 1_000 * (1 + u64::from(arg % 16)),
            anchor: start,
        },
        10 => ScheduleSpec::Every {
            interval_ms: 3_600_000,
            anchor: Timestamp(start.0 - 1),
        },
        11 => ScheduleSpec::Once {
            at: now.plus_ms(1_000 * u64::from(arg)),
        },
        12 => ScheduleSpec::Once {
            at: Timestamp(now.0.saturating_sub(60_000 * i64::from(arg))),
        },
        _ => ScheduleSpec::Every {
            interval_ms: u64::from(arg) * 8, // below the minimum unless arg >= 125
            anchor: now,
        },
    }
}

fn job_id(pick: u8) -> JobId {
    const IDS: [&str; 4] = ["a", "b", "nightly-backup.eu:1", "d_4"];
    JobId::new(IDS[usize::from(pick % 4)]).expect("canned ids are valid")
}

/// The five argument bytes of an add or update: which job, schedule and policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecArgs {
    /// Job id (one of four names).
    pub id: u8,
    /// Canned schedule.
    pub schedule: u8,
    /// Steers one-shot instants and intervals.
    pub arg: u8,
    /// Misfire and overlap policy, delete-after-run, resume-after-crash.
    pub policy: u8,
    /// Retry policy (and a few invalid fields, and an attempt timeout).
    pub retry: u8,
}

impl SpecArgs {
    fn decode(bytes: &mut Bytes<'_>) -> Self {
        SpecArgs {
            id: bytes.u8(),
            schedule: bytes.u8(),
            arg: bytes.u8(),
            policy: bytes.u8(),
            retry: bytes.u8(),
        }
    }
}

fn canned_spec(args: SpecArgs, now: Timestamp, start: Timestamp) -> JobSpec {
    let SpecArgs {
        id,
        schedule: schedule_pick,
        arg,
        policy,
        retry: retry_bits,
    } = args;
    let id = job_id(id);
    let mut spec = JobSpec::new(id, "work", canned_schedule(schedule_pick, arg, now, start));
    spec.misfire = match policy % 4 {
        0 => MisfirePolicy::FireOnceNow,
        1 => MisfirePolicy::Skip,
        2 => MisfirePolicy::CatchUp {
            max: u32::from(1 + (policy >> 2) % 4),
        },
        _ => MisfirePolicy::CatchUp {
            // Invalid (0 or above the limit) or larger. The limit itself is exercised by
            // `schedule_parse`: here a thousand runs per catch-up would make inputs slow.
            max: [0, 100, limits::CATCH_UP_MAX + 1, 20][usize::from(policy >> 6)],
        },
    };
    spec.overlap = match (policy >> 2) % 3 {
        0 => OverlapPolicy::Skip,
        1 => OverlapPolicy::BufferOne,
        _ => OverlapPolicy::Allow,
    };
    spec.delete_after_run = policy & 0x10 != 0;
    spec.resume_after_crash = policy & 0x20 == 0;
    spec.retry = RetryPolicy {
        attempts_max: if retry_bits == 0xff {
            0 // invalid: refused
        } else {
            1 + u32::from(retry_bits % 4)
        },
        backoff_base_ms: 1_000,
        backoff_factor: 2.0,
        backoff_cap_ms: 60_000,
        jitter: if retry_bits & 0x04 != 0 { 1.0 } else { 0.0 },
        deadline_ms: (retry_bits & 0x08 != 0).then_some(5_000),
        lost_attempts_max: RetryPolicy::default().lost_attempts_max,
    };
    match retry_bits >> 5 {
        // 0xd8 to 0xdb: an attempt timeout, so the watchdog times attempts out and kills
        // them. (Added with leases: these values, refused for their empty kind before, are
        // used by no committed corpus input, so the corpus keeps its meaning.)
        6 if retry_bits & 0xfc == 0xd8 => spec.timeout_ms = Some(ATTEMPT_TIMEOUT_MS),
        6 => spec.kind = "".into(),                // refused: empty kind
        7 => spec.payload = "p".repeat(64).into(), // a payload the attempt must carry
        _ => {}
    }
    spec
}

/// The attempt timeout of jobs that have one (retry byte 0xd8 to 0xdb).
const ATTEMPT_TIMEOUT_MS: u64 = 20_000;

/// Sinks a job's results may go to.
const SINKS: [&str; 3] = ["hook-a", "hook-b", "hook-c"];

/// The artifact jobs with required artifacts require.
const REPORT: &str = "report";

/// External workers (`worker-0` to `worker-2`).
const WORKERS: usize = 3;

/// The worker-protocol features of a job added or updated with [`CoreOp::AddJobExt`] or
/// [`CoreOp::UpdateJobExt`] (see there).
fn with_features(mut spec: JobSpec, features: u8) -> JobSpec {
    spec.external = features & 1 != 0;
    spec.sinks = SINKS[..usize::from((features >> 1) & 3)]
        .iter()
        .map(|sink| (*sink).into())
        .collect();
    if features & 8 != 0 {
        spec.required_artifacts = vec![REPORT.to_owned()].into();
    }
    match (features >> 4) & 3 {
        0 => {}
        1 => spec.timeout_ms = Some(5_000),
        2 => spec.timeout_ms = Some(ATTEMPT_TIMEOUT_MS),
        _ => spec.timeout_ms = Some(45_000),
    }
    spec
}

fn outcome(kind: u8, arg: u8) -> Outcome {
    match kind % 6 {
        0 | 1 => Outcome::Success {
            summary: (arg & 1 == 0).then(|| "ok".to_owned()),
            artifacts: if arg & 2 == 0 {
                BTreeMap::new()
            } else {
                BTreeMap::from([("report".to_owned(), "s3://reports/1".to_owned())])
            },
        },
        2 => Outcome::Retryable {
            message: if arg & 1 == 0 {
                "503".to_owned()
            } else {
                // Longer than MESSAGE_MAX_BYTES, with multi-byte chars around the cut.
                "é".repeat(limits::MESSAGE_MAX_BYTES)
            },
        },
        3 => Outcome::Permanent {
            message: "missing target".to_owned(),
        },
        4 => Outcome::Snooze {
            for_ms: match arg % 4 {
                0 => 0,
                1 => 1_000 * u64::from(arg),
                2 => limits::DELAY_MAX_MS + 1,
                _ => u64::MAX,
            },
        },
        _ => Outcome::Cancelled {
            reason: "not today".to_owned(),
        },
    }
}

/// How [`core_events`] moves the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockMove {
    /// Forwards by this many milliseconds.
    Forward(i64),
    /// Backwards by this many milliseconds (the scheduler clamps; a restore does not).
    Backward(i64),
    /// To the scheduler's next deadline (at most 400 days ahead), without ticking.
    ToNextDeadline,
}

/// One decoded operation of [`core_events`]; see its documentation for the byte layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreOp {
    /// `add_job` with a canned spec.
    AddJob(SpecArgs),
    /// `update_job` with a canned spec.
    UpdateJob(SpecArgs),
    /// Move the clock.
    Clock(ClockMove),
    /// `handle_timeout(now)`.
    Tick,
    /// Drain effects, holding (0), acknowledging (1, 2) or failing (3) persist batches.
    Drain(u8),
    /// The store applies the batch in flight and it is acknowledged.
    Ack,
    /// The batch in flight failed.
    Fail,
    /// Report outcome `kind`/`arg` for the executing attempt at `index` (modulo their count).
    Outcome {
        /// Which executing attempt.
        index: u8,
        /// Which outcome.
        kind: u8,
        /// Its argument.
        arg: u8,
    },
    /// Report a stale outcome, then send a heartbeat with the same token: for an attempt
    /// that is over (`variant % 3 == 0`: reported, reclaimed, killed or lost in a crash), with
    /// a newer token than an executing attempt's (1), or for an unknown run (2).
    StaleOutcome {
        /// Which attempt.
        index: u8,
        /// Which kind of staleness, and the outcome.
        variant: u8,
    },
    /// The executing attempt at `index` sends a heartbeat (if `variant % 4 != 3`), or a
    /// stale heartbeat is sent (`variant % 4 == 3`, staleness from `variant >> 2` as for
    /// [`CoreOp::StaleOutcome`]).
    Heartbeat {
        /// Which attempt.
        index: u8,
        /// Live or stale, and which kind of staleness.
        variant: u8,
    },
    /// `pause_job`.
    Pause(u8),
    /// `resume_job`.
    Resume(u8),
    /// `remove_job`.
    Remove(u8),
    /// `trigger`.
    Trigger(u8),
    /// `cancel_run` for the run at `index` in memory (modulo their count; 255 = unknown).
    Cancel(u8),
    /// Crash and restore from the store. Flag bit 0: the in-flight batch became durable
    /// first; bit 1: the clock goes back `flags >> 2` hours across the restart.
    Crash {
        /// Flags.
        flags: u8,
        /// The restored scheduler's seed.
        seed: u8,
    },
    /// One driver-loop step: to the next deadline, tick, drain acknowledging, report outcome
    /// `kind + i` for each executing attempt (at most 64), drain again.
    Step(u8),
    /// `add_job` with a canned spec and a feature byte: bit 0 external (run by workers that
    /// claim it), bits 1-2 how many sinks (of three) its results go to, bit 3 completions must
    /// carry the `report` artifact, bits 4-5 an attempt timeout (none unless the retry byte
    /// gives one, 5 s, 20 s, 45 s).
    AddJobExt(SpecArgs, u8),
    /// `update_job` with a canned spec and worker-protocol features.
    UpdateJobExt(SpecArgs, u8),
    /// Worker `worker % 3` claims work of kinds `kinds % 4`: `work`; `work` and `other`;
    /// `other`; none.
    Claim {
        /// Which worker.
        worker: u8,
        /// Which kinds.
        kinds: u8,
    },
    /// The executing attempt at `index` reports progress (if `variant % 4 != 3`), or a stale
    /// report is refused (`variant % 4 == 3`, staleness from `variant >> 2` as for
    /// [`CoreOp::StaleOutcome`]).
    Progress {
        /// Which attempt.
        index: u8,
        /// Live or stale.
        variant: u8,
    },
    /// `context`, live or stale as for [`CoreOp::Progress`].
    Context {
        /// Which attempt.
        index: u8,
        /// Live or stale.
        variant: u8,
    },
    /// `release`, live or stale as for [`CoreOp::Progress`]; a stale release is "already
    /// released" (or, for a run not in memory, refused as unknown) and changes nothing.
    Release {
        /// Which attempt.
        index: u8,
        /// Live or stale.
        variant: u8,
    },
    /// `save_checkpoint`, live or stale as for [`CoreOp::Progress`]; `variant % 8 == 7` with
    /// data over the size limit (refused).
    SaveCheckpoint {
        /// Which attempt.
        index: u8,
        /// Live, stale or oversized.
        variant: u8,
    },
    /// `extend` by `by + 1` seconds the run of the executing attempt at `index` (`target % 4`
    /// 0), a run the watchdog killed (1), any run in memory (2) or an unknown run (3).
    Extend {
        /// Which run.
        index: u8,
        /// Which kind of run.
        target: u8,
        /// How much, in seconds minus one.
        by: u8,
    },
    /// `flush_checkpoints`.
    Flush,
    /// The sink answers the send at `index` (modulo their count): `kind % 4` delivered,
    /// transient with a `Retry-After` of `arg` seconds, transient, permanent.
    Answer {
        /// Which send.
        index: u8,
        /// Which answer.
        kind: u8,
        /// `Retry-After`, in seconds.
        arg: u8,
    },
    /// An answer that is not current is refused and changes nothing: for a send answered or
    /// lost in a crash (`variant % 3 == 0`), a later attempt than the one in flight (1), an
    /// unknown delivery (2).
    StaleAnswer {
        /// Which send.
        index: u8,
        /// Which kind of staleness.
        variant: u8,
    },
    /// `begin_shutdown`.
    Shutdown,
    /// The liveness check: faults stop, every job is paused, workers claim what is queued,
    /// attempts succeed, sends are delivered, and time jumps to each next deadline; within 64
    /// rounds (plus two per slot waiting in a backlog) every run must be terminal (in memory
    /// and in the store) and every delivery ended, each at most once (and exactly once unless
    /// a crash swallowed the count).
    Settle,
}

/// The opcode byte of [`CoreOp::Heartbeat`]; every other byte `b` with `b % 16 == 3` is
/// [`CoreOp::Tick`].
pub const HEARTBEAT_OPCODE: u8 = 0x73;

/// Opcode bytes added with external workers, the watchdog's extensions, checkpoints and the
/// outbox. Every byte decodes to an operation by `op % 16`, so each of these takes over one
/// exact byte that no committed corpus input uses as an opcode (checked when they were
/// added): the corpus keeps its meaning.
pub mod opcodes {
    /// [`super::CoreOp::AddJobExt`].
    pub const ADD_JOB_EXT: u8 = 0x80;
    /// [`super::CoreOp::UpdateJobExt`].
    pub const UPDATE_JOB_EXT: u8 = 0xa0;
    /// [`super::CoreOp::Claim`].
    pub const CLAIM: u8 = 0x41;
    /// [`super::CoreOp::Progress`].
    pub const PROGRESS: u8 = 0xf1;
    /// [`super::CoreOp::Context`].
    pub const CONTEXT: u8 = 0x72;
    /// [`super::CoreOp::Release`].
    pub const RELEASE: u8 = 0xd2;
    /// [`super::CoreOp::Extend`].
    pub const EXTEND: u8 = 0x15;
    /// [`super::CoreOp::SaveCheckpoint`].
    pub const SAVE_CHECKPOINT: u8 = 0x85;
    /// [`super::CoreOp::Flush`].
    pub const FLUSH: u8 = 0xa5;
    /// [`super::CoreOp::Answer`].
    pub const ANSWER: u8 = 0xb5;
    /// [`super::CoreOp::StaleAnswer`].
    pub const STALE_ANSWER: u8 = 0xe6;
    /// [`super::CoreOp::Shutdown`].
    pub const SHUTDOWN: u8 = 0x87;
    /// [`super::CoreOp::Settle`].
    pub const SETTLE: u8 = 0x18;
}

/// The setup and operations [`core_events`] decodes from `data`, for explaining an input.
pub fn decode_core_events(data: &[u8]) -> (Config, Timestamp, u64, Vec<CoreOp>) {
    let mut bytes = Bytes::new(data);
    let setup = bytes.u8();
    let config = Config {
        misfire_grace_ms: [60_000, 0, 1_000, 300_000][usize::from(setup % 4)],
        // Bits 4 to 6 matter only to jobs with sinks, which inputs older than the outbox
        // opcodes cannot create.
        outbox: OutboxConfig {
            capacity: [limits::OUTBOX_CAPACITY_DEFAULT, 2, 4, 8][usize::from((setup >> 4) % 4)],
            overflow: if setup & 0x40 == 0 {
                OverflowPolicy::DropOldest
            } else {
                OverflowPolicy::RejectNewest
            },
            ..OutboxConfig::default()
        },
        ..Config::default()
    };
    let start = Timestamp(STARTS[usize::from((setup >> 2) % 4)]);
    let seed = u64::from(bytes.u16());
    let mut ops = Vec::new();
    while !bytes.is_empty() && ops.len() < CORE_EVENTS_MAX_OPS {
        let opcode = bytes.u8();
        let op = match opcode {
            opcodes::ADD_JOB_EXT => CoreOp::AddJobExt(SpecArgs::decode(&mut bytes), bytes.u8()),
            opcodes::UPDATE_JOB_EXT => {
                CoreOp::UpdateJobExt(SpecArgs::decode(&mut bytes), bytes.u8())
            }
            opcodes::CLAIM => CoreOp::Claim {
                worker: bytes.u8(),
                kinds: bytes.u8(),
            },
            opcodes::PROGRESS => CoreOp::Progress {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            opcodes::CONTEXT => CoreOp::Context {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            opcodes::RELEASE => CoreOp::Release {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            opcodes::EXTEND => CoreOp::Extend {
                index: bytes.u8(),
                target: bytes.u8(),
                by: bytes.u8(),
            },
            opcodes::SAVE_CHECKPOINT => CoreOp::SaveCheckpoint {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            opcodes::FLUSH => CoreOp::Flush,
            opcodes::ANSWER => CoreOp::Answer {
                index: bytes.u8(),
                kind: bytes.u8(),
                arg: bytes.u8(),
            },
            opcodes::STALE_ANSWER => CoreOp::StaleAnswer {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            opcodes::SHUTDOWN => CoreOp::Shutdown,
            opcodes::SETTLE => CoreOp::Settle,
            _ => CoreOp::legacy(opcode, &mut bytes),
        };
        ops.push(op);
    }
    (config, start, seed, ops)
}

impl CoreOp {
    /// The operations of the original byte layout, by `opcode % 16`.
    fn legacy(opcode: u8, bytes: &mut Bytes<'_>) -> CoreOp {
        match opcode % 16 {
            0 => CoreOp::AddJob(SpecArgs::decode(bytes)),
            1 => CoreOp::UpdateJob(SpecArgs::decode(bytes)),
            2 => {
                let mode = bytes.u8();
                let m = i64::from(bytes.u8());
                CoreOp::Clock(match mode % 8 {
                    0 => ClockMove::Forward(m * 10),
                    1 => ClockMove::Forward(m * 1_000),
                    2 => ClockMove::Forward(m * 60_000),
                    3 => ClockMove::Forward(m * 3_600_000),
                    4 => ClockMove::Forward(m * 86_400_000),
                    5 => ClockMove::Backward(m * 1_000),
                    6 => ClockMove::Backward(m * 3_600_000),
                    _ => ClockMove::ToNextDeadline,
                })
            }
            // Added with leases, in a byte no committed corpus input uses as an opcode, so the
            // corpus keeps its meaning.
            3 if opcode == HEARTBEAT_OPCODE => CoreOp::Heartbeat {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            3 => CoreOp::Tick,
            4 => CoreOp::Drain(bytes.u8() % 4),
            5 => CoreOp::Ack,
            6 => CoreOp::Fail,
            7 => CoreOp::Outcome {
                index: bytes.u8(),
                kind: bytes.u8(),
                arg: bytes.u8(),
            },
            8 => CoreOp::StaleOutcome {
                index: bytes.u8(),
                variant: bytes.u8(),
            },
            9 => CoreOp::Pause(bytes.u8()),
            10 => CoreOp::Resume(bytes.u8()),
            11 => CoreOp::Remove(bytes.u8()),
            12 => CoreOp::Trigger(bytes.u8()),
            13 => CoreOp::Cancel(bytes.u8()),
            14 => CoreOp::Crash {
                flags: bytes.u8(),
                seed: bytes.u8(),
            },
            _ => CoreOp::Step(bytes.u8()),
        }
    }
}

/// Fuzz target body: a sequence of operations driving a [`Scheduler`].
///
/// The first byte chooses the misfire grace (`% 4`: 60 s, 0, 1 s, 5 min), the start instant
/// (`>> 2 % 4`: before the 2026 US spring-forward, before the fall-back, a new year's eve, a leap
/// day), the outbox capacity (`>> 4 % 4`: 10 000, 2, 4, 8) and its overflow policy (bit 6:
/// reject the newest instead of dropping the oldest); the next two bytes the seed. Then each
/// operation is one opcode byte followed by its argument bytes ([`decode_core_events`] turns an
/// input into a readable [`CoreOp`] list). The original operations are chosen by `op % 16`;
/// those added later each take over one exact byte that no committed corpus input used as an
/// opcode (see [`opcodes`]), so the corpus keeps its meaning:
///
/// | op | bytes | does |
/// |---|---|---|
/// | 0 | id, schedule, arg, policy, retry | `add_job` with a canned spec |
/// | 1 | id, schedule, arg, policy, retry | `update_job` with a canned spec |
/// | 2 | mode, magnitude | move the clock (forwards by ms, s, min, h or days; backwards by s or h; or to `poll_timeout`) |
/// | 3 | | `handle_timeout(now)` (except `0x73`, below) |
/// | `0x73` | index, variant | an executing attempt sends a heartbeat, or a stale heartbeat is refused |
/// | 4 | mode | drain effects, holding, acknowledging or failing persist batches |
/// | 5 | | acknowledge the batch in flight (the store applies it first) |
/// | 6 | | fail the batch in flight |
/// | 7 | index, kind, arg | report an outcome for an executing attempt |
/// | 8 | index, variant | report a stale outcome and heartbeat (token of an attempt that is over, a newer token, unknown run) |
/// | 9, 10, 11, 12 | id | pause, resume, remove, trigger |
/// | 13 | index | cancel a run in memory (or an unknown one) |
/// | 14 | flags, seed | crash and restore from the store (optionally after the in-flight batch became durable) |
/// | 15 | kind | one driver step: jump to the next deadline, tick, drain acknowledging, report outcomes for executing attempts (at most 64), drain again |
/// | `0x80`, `0xa0` | id, schedule, arg, policy, retry, features | `add_job`, `update_job` with a canned spec and features: external, sinks, a required artifact, a timeout |
/// | `0x41` | worker, kinds | a worker claims work (`work`, `work` and `other`, `other`, nothing) |
/// | `0xf1`, `0x72`, `0xd2` | index, variant | an executing attempt reports progress, reads its context, releases its lease; or a stale one is refused (a stale release is "already released") |
/// | `0x85` | index, variant | an executing attempt saves a checkpoint (or a stale or oversized save is refused) |
/// | `0x15` | index, target, by | `extend` an executing attempt's run, a killed run, any run, an unknown run |
/// | `0xa5` | | `flush_checkpoints` |
/// | `0xb5` | index, kind, arg | a sink answers a send: delivered, transient (with or without `Retry-After`), permanent |
/// | `0xe6` | index, variant | a stale answer (already answered or lost, a later attempt, an unknown delivery) is refused |
/// | `0x87` | | `begin_shutdown` |
/// | `0x18` | | the liveness check (see [`CoreOp::Settle`]) |
///
/// A retry byte of `0xd8` to `0xdb` also gives a job a 20 s attempt timeout.
///
/// At most [`CORE_EVENTS_MAX_OPS`] operations run, and the clock stays within 300 years of its
/// start. [`Scheduler::check_invariants`] runs after every operation and after each of the
/// first 16 effects of a drain (it is O(jobs + runs), and a catch-up can create many runs). The
/// model store checks that run ids, audit sequence numbers, incident ids, delivery ids and
/// counters are never reused or moved back, that no durable lease token is at or above the
/// durable token counter, that a run never leaves a durable terminal state, never loses a
/// durable extension flag or kill, never stays active with its lost-attempt budget spent, and
/// never starts more attempts than its budgets allow, that a terminal run keeps no checkpoint
/// unless interrupted or poison, that a resolved incident stays resolved, and that an attempt
/// is handed out only after its record, with its lease, is durable (persist before act);
/// whenever the scheduler is quiescent the store must mirror its jobs, runs and open incidents
/// exactly, and a restore brings back only incidents the store holds open.
///
/// Fencing (SPEC L1): an attempt is handed out with the lease the store holds for it, owned by
/// the executor or the worker that claimed it, a token never handed out before and above every
/// token handed out before the last restart, and its grant is announced right after. An
/// external worker's attempt outlives a crash with its durable lease; an in-process one does
/// not. Commands may be refused, but an outcome, heartbeat, progress report, context read,
/// checkpoint save or release of an attempt that is executing must be accepted (a heartbeat
/// renews the lease for a TTL from now; a success without a required artifact is the one
/// refusal, and leaves the attempt running), and one carrying a token that is not the run's
/// current lease refused as stale without any change (a stale release is "already released").
/// The watchdog (SPEC L3, W1, W3) ends an executing attempt only in a tick and only once its
/// lease expired plus the grace or its timeout has run out, and after a tick no executing
/// attempt is past its lease's expiry plus the grace or its backstop; an extension is granted
/// at most once per run and never after a kill, which is sticky (W2). After a checkpoint save
/// fails to persist, the attempt's next save is written, not throttled (C1). The outbox never
/// exceeds its capacity; a send goes out only once its attempt's record and its run's terminal
/// record are durable, and never twice; an answer to the current send is accepted and any
/// other refused without change; each delivery ends (is counted) at most once, across crashes
/// too, and only once its end is durable (D1–D4). After `begin_shutdown` nothing is claimed or
/// handed out. [`CoreOp::Settle`] checks that no run loops forever.
pub fn core_events(data: &[u8]) {
    let (config, start, seed, ops) = decode_core_events(data);
    let mut world = World {
        config: config.clone(),
        start,
        now: start,
        sched: Scheduler::new(config.clone(), seed, start),
        store: MemStore::keeping_history(),
        in_flight: None,
        local: WorkerId::new("local").expect("a valid worker id"),
        started: Vec::new(),
        stale: Vec::new(),
        handed_out: BTreeSet::new(),
        tokens: BTreeSet::new(),
        floor: None,
        announce: None,
        acked_in_shutdown: false,
        workers: (0..WORKERS)
            .map(|i| WorkerId::new(&format!("worker-{i}")).expect("a valid worker id"))
            .collect(),
        promises: Promises::default(),
    };
    world.check();
    for op in ops {
        world.apply(op);
        world.check();
    }
}

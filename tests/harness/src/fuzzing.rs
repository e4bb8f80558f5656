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

use keel_core::schedule::Due;
use keel_core::{
    limits, Attempt, AttemptStart, Batch, CheckpointSave, Config, DeliveryId, DeliveryResult,
    DeliveryState, Effect, Event, FencingToken, Incident, IncidentKind, Job, JobId, JobSpec,
    JobState, MisfirePolicy, OutboxConfig, OutboxEvent, Outcome, OverflowPolicy, OverlapPolicy,
    Record, Rejected, Released, RetryPolicy, RunId, RunState, Schedule, ScheduleSpec, Scheduler,
    SendRequest, Timestamp, WorkerId,
};
use keel_testkit::MemStore;

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

/// The deliveries a batch deletes: each has ended (finished or dropped).
fn deleted_deliveries(batch: &Batch) -> impl Iterator<Item = DeliveryId> + '_ {
    batch.records.iter().filter_map(|r| match r {
        Record::DeleteDelivery { id } => Some(*id),
        _ => None,
    })
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

// ----- schedule_parse -----------------------------------------------------------------------

/// The earliest instant the fuzz targets feed to fire-time arithmetic.
const T_MIN: i64 = i64::MIN / 2;
/// 1900-01-01T00:00:00Z.
const T_1900: i64 = -2_208_988_800_000;
/// 2026-01-01T00:00:00Z.
const T_2026: i64 = 1_767_225_600_000;
/// 4999-06-01T00:00:00Z: near the end of the range croner searches.
const T_4999: i64 = 95_599_094_400_000;
/// 5000-01-01T00:00:00Z.
const T_5000: i64 = 95_617_584_000_000;

/// Zones with interesting offsets and transitions, picked when the input names none.
const ZONES: [&str; 8] = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe", // 30-minute DST shift
    "Asia/Kathmandu",      // +05:45
    "Pacific/Apia",        // skipped 2011-12-30 entirely
    "America/Sao_Paulo",   // DST changes at midnight (until 2019)
    "Pacific/Chatham",     // +12:45 / +13:45
];

/// Fuzz target body: the schedule parser and fire-time arithmetic.
///
/// The input is read as UTF-8 (lossily). Its first line is a cron expression and its second
/// line, if any, an IANA zone name (otherwise a zone is picked from a list of awkward ones by a
/// hash of the input). Numbers for instants, grace periods, intervals and anchors come from a
/// hash of the input and from its trailing bytes.
///
/// Checked, for every input:
///
/// - a refused expression, zone or interval has a non-empty `Display` message;
/// - a parsed schedule's `spec()` parses back to the same schedule, and `Schedule::parse`
///   agrees with `Schedule::cron`;
/// - `next_after(t) > t` and `latest_at_or_before(t) <= t` whenever they return a slot, for
///   instants from `i64::MIN / 2` through 1900, 1970, 2026 and year 4999 to year 5000;
/// - `resolve_due(cursor, now, policy, grace)` with a real slot as `cursor`, for each
///   [`MisfirePolicy`]: the slots to fire are strictly increasing, within `cursor..=now`, at most
///   [`limits::CATCH_UP_MAX`] (and at most what the policy allows), and the new cursor is after
///   all of them;
///
/// and the same for `Schedule::every` (any interval, an anchor within `i64::MIN / 2 ..=
/// i64::MAX / 2`, both from the input) and `Schedule::once`.
pub fn schedule_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let expr = lines.next().unwrap_or_default();
    let hash = fnv1a(data);
    let picked_zone = ZONES[(hash % ZONES.len() as u64) as usize];
    let zone = lines.next().unwrap_or(picked_zone);

    // Numbers from the tail of the input, so that a fuzzer can steer them directly.
    let tail = &data[data.len().saturating_sub(24)..];
    let mut nums = Bytes::new(tail);
    let (w0, w1, w2) = (nums.u64(), nums.u64(), nums.u64());

    let instants = [
        T_MIN,
        T_1900,
        -1,
        0,
        T_2026,
        T_2026 + 499, // mid-second
        T_4999,
        T_5000 - 1,
        in_range(hash, T_1900, T_5000),
        in_range(w0, T_MIN, T_5000),
        in_range(
            w1.rotate_left(17),
            T_2026 - 86_400_000 * 400,
            T_2026 + 86_400_000 * 400,
        ),
    ];

    match Schedule::cron(expr, zone) {
        Ok(schedule) => {
            let spec = ScheduleSpec::Cron {
                expr: expr.into(),
                zone: zone.into(),
            };
            assert_eq!(
                Schedule::parse(&spec).as_ref(),
                Ok(&schedule),
                "Schedule::parse and Schedule::cron disagree on {expr:?} in {zone:?}"
            );
            check_schedule(&schedule, &instants, w2, hash);
        }
        Err(e) => {
            assert!(
                !e.to_string().is_empty(),
                "empty error message for {expr:?} in {zone:?}"
            );
            // The field it names must display too.
            assert!(!e.field().to_string().is_empty());
            // An unknown zone must not hide what is wrong with the expression: try a known one.
            if let Ok(schedule) = Schedule::cron(expr, picked_zone) {
                check_schedule(&schedule, &instants, w2, hash);
            }
        }
    }

    // Fixed intervals: any interval (short ones are refused), anchors over a wide range.
    let interval = match w1 % 4 {
        0 => w0,                  // anything, including < 1000 and u64::MAX
        1 => 1_000 + w0 % 10_000, // seconds
        2 => 60_000 * (1 + w0 % 1_440),
        _ => 1 + w0 % 2_000, // around the minimum
    };
    let anchor = Timestamp(in_range(w2, T_MIN, -T_MIN));
    match Schedule::every(interval, anchor) {
        Ok(schedule) => {
            assert!(schedule.is_recurring());
            check_schedule(&schedule, &instants, w2, hash);
            check_schedule(&schedule, &[anchor.0, anchor.0.saturating_sub(1)], w0, hash);
        }
        Err(e) => {
            assert!(interval < keel_core::schedule::INTERVAL_MIN_MS);
            assert!(!e.to_string().is_empty());
        }
    }

    // One-shots.
    let once = Schedule::once(anchor);
    assert!(!once.is_recurring());
    check_schedule(&once, &instants, w1, hash);
    check_schedule(&once, &[anchor.0, anchor.0.saturating_sub(1)], w1, hash);
}

/// Checks the fire-time properties of one valid schedule at each instant in `instants`.
fn check_schedule(schedule: &Schedule, instants: &[i64], w: u64, hash: u64) {
    assert!(!schedule.to_string().is_empty());
    let spec = schedule.spec();
    assert_eq!(
        Schedule::parse(&spec).as_ref(),
        Ok(schedule),
        "{schedule}: spec {spec:?} does not parse back to the same schedule"
    );

    // Fire-time searches are not free (an impossible date such as 30 February makes croner
    // search up to year 5000), so instants go in ascending order for `next_after` and
    // descending for `latest_at_or_before`, and each stops at the first `None`: no slot after
    // `t` means none after any later instant either.
    let mut sorted = instants.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut nexts = Vec::new();
    for &t in &sorted {
        let t = Timestamp(t);
        match schedule.next_after(t) {
            Some(next) => {
                assert!(
                    next > t,
                    "{schedule}: next_after({t}) = {next} is not after it"
                );
                nexts.push(next);
            }
            None if t.to_utc().is_none() => {} // outside chrono's range: no answer expected
            None => break,
        }
    }
    for &t in sorted.iter().rev() {
        let t = Timestamp(t);
        match schedule.latest_at_or_before(t) {
            Some(latest) => {
                assert!(
                    latest <= t,
                    "{schedule}: latest_at_or_before({t}) = {latest} is after it"
                );
            }
            None if t.to_utc().is_none() => {}
            None => break,
        }
    }

    // resolve_due needs a real slot as the cursor and a `now` at or after it: on time, just
    // past a grace period, a long outage. Two cursors per schedule keep the cost bounded
    // (after an outage each resolution may walk up to CATCH_UP_MAX slots).
    let graces = [0, 999, 60_000, w % 100_000_000];
    let catch_up = [0, 1, 3, (w >> 32) as u32 % 1_500, u32::MAX];
    for (i, &cursor) in nexts.iter().rev().take(2).enumerate() {
        // Only the first cursor gets a long outage.
        let lateness = match (hash >> (8 * i)) % if i == 0 { 4 } else { 2 } {
            0 => 0,
            1 => 60_001,
            2 => 86_400_000 * 3 + 1,
            _ => w % (86_400_000 * 400),
        };
        let now = cursor.plus_ms(lateness);
        let grace = graces[(hash as usize).wrapping_add(i) % graces.len()];
        let max = catch_up[(w as usize).wrapping_add(i) % catch_up.len()];
        for policy in [
            MisfirePolicy::FireOnceNow,
            MisfirePolicy::Skip,
            MisfirePolicy::CatchUp { max },
        ] {
            let due = schedule.resolve_due(cursor, now, policy, grace);
            check_due(schedule, &due, cursor, now, policy, grace);
        }
    }
}

fn check_due(
    schedule: &Schedule,
    due: &Due,
    cursor: Timestamp,
    now: Timestamp,
    policy: MisfirePolicy,
    grace: u64,
) {
    let ctx = || format!("{schedule}: resolve_due({cursor}, {now}, {policy:?}, {grace}) = {due:?}");
    assert!(
        due.fire.windows(2).all(|w| w[0] < w[1]),
        "{}: fire list not strictly increasing",
        ctx()
    );
    assert!(
        due.fire.len() <= limits::CATCH_UP_MAX as usize,
        "{}: more than CATCH_UP_MAX slots",
        ctx()
    );
    let allowed = match policy {
        MisfirePolicy::FireOnceNow | MisfirePolicy::Skip => 1,
        MisfirePolicy::CatchUp { max } => max.clamp(1, limits::CATCH_UP_MAX) as usize,
    };
    assert!(
        due.fire.len() <= allowed,
        "{}: more slots than the policy allows",
        ctx()
    );
    if policy != MisfirePolicy::Skip {
        assert!(!due.fire.is_empty(), "{}: a due slot fired nothing", ctx());
    }
    for slot in &due.fire {
        assert!(*slot <= now, "{}: fires {slot}, after now", ctx());
        assert!(
            *slot >= cursor,
            "{}: fires {slot}, before the cursor",
            ctx()
        );
    }
    if let Some(next) = due.next {
        assert!(
            next > cursor,
            "{}: the new cursor does not move forward",
            ctx()
        );
        if let Some(last) = due.fire.last() {
            assert!(
                next > *last,
                "{}: the new cursor is not after the fired slots",
                ctx()
            );
        }
    }
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

/// What to do with each persist batch while draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PersistMode {
    /// Leave it in flight.
    Hold,
    /// Apply it to the store and acknowledge it.
    Ack,
    /// Report the write as failed.
    Fail,
}

/// An attempt handed to the executor and not yet reported, reclaimed or killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Started {
    run: RunId,
    attempt: Attempt,
    /// Its lease's fencing token.
    token: FencingToken,
    /// When it was handed out (its lease runs from then).
    started_at: Timestamp,
    /// When its lease expires: at the hand-out, or as renewed by the last heartbeat.
    expires_at: Timestamp,
    /// The run's attempt timeout.
    timeout_ms: Option<u64>,
}

/// The world around one scheduler: clock, store, executor.
#[derive(Debug)]
struct World {
    config: Config,
    start: Timestamp,
    now: Timestamp,
    sched: Scheduler,
    store: MemStore,
    /// The batch the store is writing, if any.
    in_flight: Option<Batch>,
    /// The in-process executor: the owner of every lease here.
    local: WorkerId,
    /// Attempts handed to the executor in this incarnation and not yet reported, reclaimed or
    /// killed: each is running under the lease it was handed out with.
    started: Vec<Started>,
    /// Leases whose writes must be refused, in any incarnation: their attempt was reported,
    /// reclaimed, killed, or lost in a crash.
    stale: Vec<(RunId, FencingToken)>,
    /// Every attempt ever handed out, across crashes.
    handed_out: BTreeSet<(RunId, Attempt)>,
    /// Every token ever handed out, across crashes.
    tokens: BTreeSet<FencingToken>,
    /// The highest token handed out before the latest restore.
    floor: Option<FencingToken>,
    /// The attempt just handed out, whose grant (`Event::LeaseGranted`) must follow at once.
    announce: Option<(RunId, FencingToken, WorkerId)>,
    /// The latest acknowledgement came after `begin_shutdown`: it may hand nothing out.
    acked_in_shutdown: bool,
    /// External workers.
    workers: Vec<WorkerId>,
    /// The worker of each claim this incarnation granted, by run.
    claims: BTreeMap<RunId, WorkerId>,
    /// Extensions granted per run, in this incarnation or durable before it (SPEC W1).
    extended: BTreeMap<RunId, u32>,
    /// Attempts the watchdog killed, whose kill is in memory or durable (SPEC W2).
    killed: BTreeSet<(RunId, Attempt)>,
    /// Runs whose latest checkpoint save failed to persist: the attempt's next save must be
    /// written, not throttled (SPEC C1).
    must_write: BTreeMap<RunId, Attempt>,
    /// Checkpoint saves written by a flush rather than by a save.
    flushed: BTreeSet<(RunId, u64)>,
    /// Sends released and not yet answered, by delivery.
    sends: BTreeMap<DeliveryId, SendRequest>,
    /// Every `(delivery, attempt)` ever released, across crashes.
    sent: BTreeSet<(DeliveryId, u32)>,
    /// Sends that are no longer current: answered, or lost in a crash.
    answered: Vec<(DeliveryId, u32)>,
    /// Deliveries that ended and may not end again (SPEC D4; across a crash only those whose
    /// end was durable).
    ended: BTreeSet<DeliveryId>,
    /// Every delivery that ever ended.
    ended_ever: BTreeSet<DeliveryId>,
    /// Deliveries whose end an acknowledged batch made durable and whose end event has not
    /// been polled yet.
    awaiting_end: BTreeSet<DeliveryId>,
    /// Deliveries whose durable end a crash kept from being counted (docs/semantics.md, D4).
    uncounted: BTreeSet<DeliveryId>,
}

impl World {
    fn check(&self) {
        self.sched.check_invariants();
        // SPEC D1: the outbox is bounded.
        let outbox = self.sched.outbox();
        outbox.check_invariants();
        assert!(
            outbox.len() <= self.config.outbox.capacity.max(1),
            "the outbox holds {} deliveries, above its capacity",
            outbox.len()
        );
        for run in self.sched.runs() {
            // SPEC W1: at most one extension per run, and the run's flag agrees.
            let granted = self.extended.get(&run.id()).copied().unwrap_or(0);
            assert!(
                granted <= 1 && run.extended() == (granted == 1),
                "{}: extended {} with {granted} extensions granted",
                run.id(),
                run.extended()
            );
        }
        // SPEC W2: a kill is sticky.
        for (run, attempt) in &self.killed {
            if let Some(r) = self.sched.run(*run) {
                assert!(
                    r.killed() >= Some(*attempt),
                    "{run}: attempt {attempt} was killed, but the run says {:?}",
                    r.killed()
                );
            }
        }
        // Only the watchdog (in a tick, see `after_tick`) ends an attempt that did not report.
        for s in &self.started {
            let current = self
                .sched
                .run(s.run)
                .map(|r| (r.state(), r.lease().map(|l| (l.token, l.expires_at))));
            assert!(
                matches!(
                    current,
                    Some((RunState::Running { attempt, .. }, Some((token, expires_at))))
                        if attempt == s.attempt && token == s.token && expires_at == s.expires_at
                ),
                "{} attempt {} is executing under {} (expiring {}), but the scheduler has \
                 {current:?}",
                s.run,
                s.attempt,
                s.token,
                s.expires_at
            );
        }
    }

    fn set_now(&mut self, t: i64) {
        let lo = self.start.0 - 86_400_000;
        let hi = self.start.0 + CLOCK_SPAN_MS;
        self.now = Timestamp(t.clamp(lo, hi));
    }

    /// `handle_timeout(now)`: the watchdog may reclaim or kill executing attempts, but only
    /// those whose deadline passed, and after the tick no executing attempt is past one.
    fn tick(&mut self) {
        self.sched.handle_timeout(self.now);
        let now = self.sched.now();
        let mut still = Vec::new();
        for s in std::mem::take(&mut self.started) {
            let running = self.sched.run(s.run).is_some_and(|r| {
                matches!(r.state(), RunState::Running { attempt, .. } if attempt == s.attempt)
                    && r.lease().is_some_and(|l| l.token == s.token)
            });
            let (may_end_at, must_end_at) = self.watchdog_deadlines(&s);
            if running {
                assert!(
                    now < must_end_at,
                    "{} attempt {} ({}) still running at {now}, past its lease expiry {} plus \
                     the grace or its backstop",
                    s.run,
                    s.attempt,
                    s.token,
                    s.expires_at
                );
                still.push(s);
            } else {
                assert!(
                    may_end_at <= now,
                    "{} attempt {} ({}) ended by the watchdog at {now}, before its lease \
                     expiry {} plus the grace and before any kill deadline",
                    s.run,
                    s.attempt,
                    s.token,
                    s.expires_at
                );
                self.stale.push((s.run, s.token));
            }
        }
        self.started = still;
    }

    /// When the watchdog may first end an executing attempt, and when it must have: the
    /// lease's expiry plus the grace (SPEC L3), or for an attempt with a timeout its earliest
    /// kill (`kill_grace` after the timeout, or the backstop if that comes first: the tick that
    /// notices the timeout may come late) and its backstop (SPEC W1, W3).
    fn watchdog_deadlines(&self, s: &Started) -> (Timestamp, Timestamp) {
        let reclaim = s.expires_at.plus_ms(self.config.lease.grace_ms);
        let Some(timeout) = s.timeout_ms else {
            return (reclaim, reclaim);
        };
        let backstop = timeout.saturating_mul(u64::from(self.config.backstop_factor.max(1)));
        let kill = backstop.min(timeout.saturating_add(self.config.kill_grace_ms));
        (
            reclaim.min(s.started_at.plus_ms(kill)),
            reclaim.min(s.started_at.plus_ms(backstop)),
        )
    }

    /// Drains effects, doing `mode` with persist batches.
    fn drain(&mut self, mode: PersistMode) {
        for i in 0..DRAIN_MAX_EFFECTS {
            let Some(effect) = self.sched.poll_effect() else {
                // SPEC D4: every end of delivery an acknowledgement made durable was counted.
                assert!(
                    self.awaiting_end.is_empty(),
                    "deliveries {:?} ended durably, but no event counted them",
                    self.awaiting_end
                );
                break;
            };
            match effect {
                Effect::Persist(batch) => {
                    assert!(
                        self.in_flight.is_none(),
                        "a second batch ({}) emitted while {} is in flight",
                        batch.id,
                        self.in_flight.as_ref().map_or(0, |b| b.id.0)
                    );
                    assert!(!batch.records.is_empty(), "empty batch {}", batch.id);
                    self.in_flight = Some(batch);
                    match mode {
                        PersistMode::Hold => {}
                        PersistMode::Ack => self.ack(),
                        PersistMode::Fail => self.fail(),
                    }
                }
                Effect::StartAttempt(start) => self.start_attempt(start),
                Effect::CancelAttempt { run, attempt, .. } => {
                    // The outcome may have been reported since the cancel was requested.
                    assert!(
                        self.handed_out.contains(&(run, attempt)),
                        "cancel for {run} attempt {attempt}, which was never handed out"
                    );
                }
                Effect::KillAttempt { run, attempt } => {
                    assert!(
                        self.handed_out.contains(&(run, attempt)),
                        "kill for {run} attempt {attempt}, which was never handed out"
                    );
                    let killed = self.sched.run(run).map(|r| r.killed());
                    assert!(
                        killed.is_none_or(|k| k >= Some(attempt)),
                        "{run} attempt {attempt} killed, but the run says {killed:?}"
                    );
                    self.killed.insert((run, attempt));
                }
                Effect::Deliver(send) => self.deliver(send),
                Effect::Event(event) => self.event(event),
            }
            // check_invariants is O(jobs + runs), and a catch-up can create a thousand runs:
            // check after each of the first effects, then once the drain is over.
            if i < DRAIN_CHECKED_EFFECTS {
                self.check();
            }
        }
        self.check();
        self.check_mirror();
    }

    fn start_attempt(&mut self, start: AttemptStart) {
        let AttemptStart {
            run,
            attempt,
            ref lease,
            ..
        } = start;
        let token = lease.token;
        // Persist before act: the attempt's record, with its lease, is durable.
        let durable = self.store.run(run);
        assert!(
            durable.is_some_and(|r| r.attempt() == attempt
                && r.state() == RunState::Starting { attempt }
                && r.lease().map(|l| l.token) == Some(token)),
            "{run} attempt {attempt} ({token}) handed out before it was durable (store has \
             {durable:?})"
        );
        assert_eq!(start.idempotency_key.run, run);
        assert_eq!(start.idempotency_key.attempt, attempt);
        assert!(
            self.handed_out.insert((run, attempt)),
            "{run} attempt {attempt} handed out twice"
        );
        // SPEC C2: the attempt resumes from the durable checkpoint.
        assert_eq!(
            start.checkpoint,
            durable.and_then(|r| r.checkpoint().cloned()),
            "{run} attempt {attempt} handed out with another checkpoint than the durable one"
        );
        // SPEC L1: the lease the store holds for the run (checked above), owned by the
        // executor or the worker that claimed it, a token never handed out before, above every
        // token handed out before the last restart; its grant is announced next.
        let owner = self.claims.get(&run).unwrap_or(&self.local).clone();
        assert_eq!(lease.owner, owner, "{run} attempt {attempt}");
        assert_eq!(
            self.announce, None,
            "a grant was not announced with its hand-out"
        );
        self.announce = Some((run, token, owner));
        // Nothing starts once shutdown began: a hand-out comes from the latest
        // acknowledgement (none is queued when a batch is emitted).
        assert!(
            !self.acked_in_shutdown,
            "{run} attempt {attempt} handed out after begin_shutdown"
        );
        assert!(self.tokens.insert(token), "{token} handed out twice");
        assert!(
            self.floor.is_none_or(|floor| token > floor),
            "{run} attempt {attempt}: {token} not above {:?}, handed out before the restart",
            self.floor
        );
        assert_eq!(
            lease.expires_at,
            lease.renewed_at.plus_ms(self.config.lease.ttl_ms)
        );
        let s = Started {
            run,
            attempt,
            token,
            started_at: lease.renewed_at,
            expires_at: lease.expires_at,
            timeout_ms: self.sched.run(run).and_then(|r| r.timeout_ms()),
        };
        let running = self.sched.run(run).is_some_and(|r| {
            matches!(r.state(), RunState::Running { attempt: a, started_at } if a == attempt && started_at == lease.renewed_at)
                && r.lease() == Some(lease)
        });
        if running {
            self.started.push(s);
        } else {
            // A tick between the acknowledgement and this poll reclaimed or killed it.
            let now = self.sched.now();
            assert!(
                self.watchdog_deadlines(&s).0 <= now,
                "{run} attempt {attempt} ({token}) not running when handed out at {now}"
            );
            self.stale.push((run, token));
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::LeaseGranted { run, owner, token } => {
                // A grant is announced with its hand-out, once durable, never before.
                assert_eq!(
                    self.announce.take(),
                    Some((run, token, owner)),
                    "a grant announced apart from its hand-out"
                );
            }
            Event::LeaseReclaimed { run, token } => {
                assert!(
                    self.tokens.contains(&token),
                    "{run}: {token} reclaimed, but it was never handed out"
                );
                let current = self.sched.run(run).and_then(|r| r.lease());
                assert!(
                    current.is_none_or(|l| l.token != token),
                    "{run}: {token} reclaimed but still current"
                );
            }
            Event::CheckpointFailed { run, seq, .. } => {
                // Polled after the fact: only if no newer save was written since. A save
                // written by a flush is left out: after it fails the next save is throttled
                // (a core bug, pinned by an ignored test in tests/harness/tests/sequences.rs).
                let latest = self
                    .sched
                    .run(run)
                    .and_then(|r| r.checkpoint())
                    .map(|c| c.seq);
                let attempt = self
                    .started
                    .iter()
                    .find(|s| s.run == run)
                    .map(|s| s.attempt);
                if let (Some(attempt), true) = (
                    attempt,
                    latest == Some(seq) && !self.flushed.contains(&(run, seq)),
                ) {
                    self.must_write.insert(run, attempt);
                }
            }
            Event::CheckpointSaved { run, .. } => {
                self.must_write.remove(&run);
            }
            Event::Delivery(event) => self.delivery_event(event),
            _ => {}
        }
    }

    fn ack(&mut self) {
        if let Some(batch) = self.in_flight.take() {
            self.store.apply(&batch);
            self.awaiting_end.extend(deleted_deliveries(&batch));
            self.acked_in_shutdown = self.sched.is_shutting_down();
            self.sched.handle_persisted(self.now, batch.id);
        }
    }

    fn fail(&mut self) {
        if let Some(batch) = self.in_flight.take() {
            self.sched
                .handle_persist_failed(self.now, batch.id, "disk full");
        }
    }

    /// When nothing is pending or in flight, the store holds exactly the scheduler's state.
    fn check_mirror(&self) {
        if !self.sched.is_quiescent() || self.in_flight.is_some() {
            return;
        }
        let normalise = |job: &Job| {
            let mut job = job.clone();
            job.active_runs = 0; // derived, never persisted
            job
        };
        let memory: Vec<Job> = self.sched.jobs().map(normalise).collect();
        let durable: Vec<Job> = self.store.jobs().map(normalise).collect();
        assert_eq!(memory, durable, "quiescent, but the store's jobs differ");
        for run in self.sched.runs() {
            assert_eq!(
                self.store.run(run.id()),
                Some(run),
                "quiescent, but {} differs in the store",
                run.id()
            );
        }
        for run in self.store.runs() {
            if !run.state().is_terminal() {
                assert!(
                    self.sched.run(run.id()).is_some(),
                    "{} is active in the store but not in memory",
                    run.id()
                );
            }
        }
        let memory: Vec<&Incident> = self.sched.incidents().collect();
        assert_eq!(
            memory,
            self.store.open_incidents().collect::<Vec<_>>(),
            "quiescent, but the store's open incidents differ"
        );
    }

    /// Reports an outcome for an attempt that is executing: it must be accepted, unless it is a
    /// success without an artifact its job requires (refused; the attempt keeps running).
    fn report(&mut self, index: usize, outcome: Outcome) {
        if self.started.is_empty() {
            return;
        }
        let i = index % self.started.len();
        let s = self.started.remove(i);
        let missing: Vec<String> = match (&outcome, self.sched.run(s.run)) {
            (Outcome::Success { artifacts, .. }, Some(run)) => run
                .required_artifacts()
                .iter()
                .filter(|name| !artifacts.contains_key(*name))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let result = self.sched.handle_outcome(self.now, s.run, s.token, outcome);
        if !missing.is_empty() {
            assert_eq!(
                result,
                Err(Rejected::MissingArtifacts {
                    run: s.run,
                    missing
                }),
                "a success without the required artifacts"
            );
            self.started.insert(i, s);
            return;
        }
        assert!(
            result.is_ok(),
            "outcome for executing {} attempt {} ({}) refused: {result:?}",
            s.run,
            s.attempt,
            s.token
        );
        self.stale.push((s.run, s.token));
    }

    /// An executing attempt renews its lease: accepted, for a TTL from now.
    fn heartbeat(&mut self, index: usize) {
        if self.started.is_empty() {
            return;
        }
        let i = index % self.started.len();
        let s = self.started[i];
        let lease = self
            .sched
            .heartbeat(self.now, s.run, s.token)
            .unwrap_or_else(|e| {
                panic!(
                    "heartbeat of executing {} attempt {} ({}) refused: {e}",
                    s.run, s.attempt, s.token
                )
            });
        let now = self.sched.now();
        assert_eq!(lease.token, s.token);
        assert_eq!(
            (lease.renewed_at, lease.expires_at),
            (now, now.plus_ms(self.config.lease.ttl_ms)),
            "a heartbeat renews the lease for a TTL from now"
        );
        self.started[i].expires_at = lease.expires_at;
    }

    /// A write that must be refused: `variant % 3` picks the token of an attempt that is over
    /// (0), a newer token than an executing attempt's (1), or an unknown run (2, or when there
    /// is nothing to pick from).
    fn stale_target(&self, index: usize, variant: u8) -> (RunId, FencingToken) {
        match variant % 3 {
            0 if !self.stale.is_empty() => self.stale[index % self.stale.len()],
            1 if !self.started.is_empty() => {
                let s = self.started[index % self.started.len()];
                (s.run, FencingToken(s.token.0 + 1 + u64::from(variant >> 4)))
            }
            _ => (RunId(1_000_000 + index as u64), FencingToken(1)),
        }
    }

    /// A write carrying `token` for `run` must be refused as stale and change nothing.
    fn expect_refused<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        run: RunId,
        token: FencingToken,
        write: impl FnOnce(&mut Scheduler) -> Result<T, Rejected>,
    ) {
        let before = self.sched.run(run).cloned();
        let timeout = self.sched.poll_timeout();
        let now = self.sched.now();
        let current = before.as_ref().and_then(|r| r.lease()).map(|l| l.token);
        let result = write(&mut self.sched);
        let refused = match &result {
            Err(Rejected::StaleToken {
                run: r,
                got,
                current: c,
            }) => *r == run && *got == token && *c == current,
            Err(Rejected::NotRunning { run: r, .. }) => *r == run,
            Err(Rejected::UnknownRun(r)) => *r == run && before.is_none(),
            _ => false,
        };
        assert!(
            refused,
            "stale {what} for {run} with {token} (current {current:?}) not refused: {result:?}"
        );
        assert_eq!(
            self.sched.run(run),
            before.as_ref(),
            "refused {what} changed {run}"
        );
        assert_eq!(self.sched.poll_timeout(), timeout);
        assert_eq!(self.sched.now(), now, "refused {what} moved the clock");
    }

    fn crash(&mut self, flags: u8, seed: u64) {
        // The store may have made the in-flight batch durable just before the crash.
        if flags & 1 != 0 {
            if let Some(batch) = self.in_flight.take() {
                self.store.apply(&batch);
                self.uncounted.extend(deleted_deliveries(&batch));
            }
        }
        self.in_flight = None;
        self.uncounted.append(&mut self.awaiting_end);
        self.announce = None;
        self.acked_in_shutdown = false;
        let lost = std::mem::take(&mut self.started);
        self.stale.extend(lost.iter().map(|s| (s.run, s.token)));
        let lost = std::mem::take(&mut self.sends);
        self.answered
            .extend(lost.into_values().map(|send| (send.id, send.attempt)));
        self.claims.clear();
        self.must_write.clear();
        self.flushed.clear();
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
        self.floor = self.tokens.last().copied();
        // The clock may have moved either way across the restart.
        if flags & 2 != 0 {
            self.set_now(self.now.0 - 3_600_000 * i64::from(flags >> 2));
        }
        self.sched = Scheduler::restore(
            self.config,
            seed,
            self.now,
            self.store.restore_with_history(),
        );
        // Only attempts handed out to external workers outlive the process, with their lease
        // as the store holds it (a report the store never received is undone, so the token is
        // current again); in-process attempts were cut short.
        let restored: Vec<Started> = self
            .sched
            .runs()
            .filter_map(|r| match (r.state(), r.lease()) {
                (
                    RunState::Running {
                        attempt,
                        started_at,
                    },
                    Some(lease),
                ) => Some(Started {
                    run: r.id(),
                    attempt,
                    token: lease.token,
                    started_at,
                    expires_at: lease.expires_at,
                    timeout_ms: r.timeout_ms(),
                }),
                _ => None,
            })
            .collect();
        for s in restored {
            let owner = self
                .sched
                .run(s.run)
                .and_then(|r| r.lease())
                .map(|l| &l.owner);
            assert_ne!(
                owner,
                Some(&self.local),
                "{}: an in-process attempt survived",
                s.run
            );
            assert!(
                self.tokens.contains(&s.token),
                "{} restored with a token never handed out",
                s.run
            );
            self.stale.retain(|stale| *stale != (s.run, s.token));
            self.started.push(s);
        }
        self.check();
        // Open incidents come back as stored; resolved ones stay resolved. The restore may
        // open new ones itself (a run it recovered ended a job's streak of failures), written
        // with its first batch.
        for incident in self.sched.incidents() {
            match self.store.incident(incident.id) {
                Some(stored) => assert_eq!(
                    stored, incident,
                    "restored incident {} differs from the store's",
                    incident.id
                ),
                None => assert!(
                    incident.kind == IncidentKind::FailingJob && incident.resolved_at.is_none(),
                    "restored incident {} is not in the store: {incident:?}",
                    incident.id
                ),
            }
        }
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
        config,
        start,
        now: start,
        sched: Scheduler::new(config, seed, start),
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
        claims: BTreeMap::new(),
        extended: BTreeMap::new(),
        killed: BTreeSet::new(),
        must_write: BTreeMap::new(),
        flushed: BTreeSet::new(),
        sends: BTreeMap::new(),
        sent: BTreeSet::new(),
        answered: Vec::new(),
        ended: BTreeSet::new(),
        ended_ever: BTreeSet::new(),
        awaiting_end: BTreeSet::new(),
        uncounted: BTreeSet::new(),
    };
    world.check();
    for op in ops {
        world.apply(op);
        world.check();
    }
}

impl World {
    fn apply(&mut self, op: CoreOp) {
        let now = self.now;
        let start = self.start;
        match op {
            CoreOp::AddJob(args) => {
                let _ = self.sched.add_job(now, canned_spec(args, now, start));
            }
            CoreOp::UpdateJob(args) => {
                let _ = self.sched.update_job(now, canned_spec(args, now, start));
            }
            CoreOp::Clock(ClockMove::Forward(ms)) => self.set_now(now.0 + ms),
            CoreOp::Clock(ClockMove::Backward(ms)) => self.set_now(now.0 - ms),
            CoreOp::Clock(ClockMove::ToNextDeadline) => self.advance_to_next_deadline(),
            CoreOp::Tick => self.tick(),
            CoreOp::Drain(mode) => self.drain(match mode % 4 {
                0 => PersistMode::Hold,
                3 => PersistMode::Fail,
                _ => PersistMode::Ack,
            }),
            CoreOp::Ack => self.ack(),
            CoreOp::Fail => self.fail(),
            CoreOp::Outcome { index, kind, arg } => {
                self.report(usize::from(index), outcome(kind, arg));
            }
            CoreOp::StaleOutcome { index, variant } => {
                let (run, token) = self.stale_target(usize::from(index), variant);
                let outcome = outcome(variant >> 2, variant);
                self.expect_refused("outcome", run, token, |s| {
                    s.handle_outcome(now, run, token, outcome)
                });
                self.expect_refused("heartbeat", run, token, |s| s.heartbeat(now, run, token));
            }
            CoreOp::Heartbeat { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("heartbeat", run, token, |s| s.heartbeat(now, run, token));
            }
            CoreOp::Heartbeat { index, .. } => self.heartbeat(usize::from(index)),
            CoreOp::Pause(id) => {
                let _ = self.sched.pause_job(now, &job_id(id));
            }
            CoreOp::Resume(id) => {
                let _ = self.sched.resume_job(now, &job_id(id));
            }
            CoreOp::Remove(id) => {
                let _ = self.sched.remove_job(now, &job_id(id));
            }
            CoreOp::Trigger(id) => {
                let _ = self.sched.trigger(now, &job_id(id));
            }
            CoreOp::Cancel(index) => {
                let runs: Vec<RunId> = self.sched.runs().map(|r| r.id()).collect();
                let run = if runs.is_empty() || index == 0xff {
                    RunId(u64::from(index))
                } else {
                    runs[usize::from(index) % runs.len()]
                };
                let _ = self.sched.cancel_run(now, run);
            }
            CoreOp::Crash { flags, seed } => self.crash(flags, u64::from(seed)),
            CoreOp::Step(kind) => {
                self.advance_to_next_deadline();
                self.tick();
                self.check();
                self.drain(PersistMode::Ack);
                for i in 0..self.started.len().min(STEP_MAX_OUTCOMES) {
                    self.report(0, outcome(kind.wrapping_add(i as u8), kind));
                    if i < DRAIN_CHECKED_EFFECTS {
                        self.check();
                    }
                }
                self.drain(PersistMode::Ack);
            }
            CoreOp::AddJobExt(args, features) => {
                let spec = with_features(canned_spec(args, now, start), features);
                let _ = self.sched.add_job(now, spec);
            }
            CoreOp::UpdateJobExt(args, features) => {
                let spec = with_features(canned_spec(args, now, start), features);
                let _ = self.sched.update_job(now, spec);
            }
            CoreOp::Claim { worker, kinds } => {
                let kinds: &[&str] = match kinds % 4 {
                    0 => &["work"],
                    1 => &["work", "other"],
                    2 => &["other"],
                    _ => &[],
                };
                self.claim(usize::from(worker), kinds);
            }
            CoreOp::Progress { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("progress", run, token, |s| {
                    s.progress(now, run, token, "phase", "stale")
                });
            }
            CoreOp::Progress { index, .. } => {
                if let Some(s) = self.pick_started(index) {
                    self.sched
                        .progress(now, s.run, s.token, "upload", "42 items")
                        .unwrap_or_else(|e| panic!("progress of executing {}: {e}", s.run));
                    let run = self.sched.run(s.run).expect("executing");
                    assert_eq!(run.last_activity(), Some(self.sched.now()));
                    assert_eq!(run.progress().map(|p| p.phase.as_str()), Some("upload"));
                }
            }
            CoreOp::Context { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("context", run, token, |s| s.context(run, token));
            }
            CoreOp::Context { index, .. } => {
                if let Some(s) = self.pick_started(index) {
                    let context = self
                        .sched
                        .context(s.run, s.token)
                        .unwrap_or_else(|e| panic!("context of executing {}: {e}", s.run));
                    let run = self.sched.run(s.run).expect("executing");
                    assert_eq!(
                        (
                            context.attempt,
                            context.lease.token,
                            context.lease.expires_at
                        ),
                        (s.attempt, s.token, s.expires_at)
                    );
                    assert_eq!(context.checkpoint.as_ref(), run.checkpoint());
                }
            }
            CoreOp::Release { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.stale_release(run, token);
            }
            CoreOp::Release { index, .. } => self.release(usize::from(index)),
            CoreOp::SaveCheckpoint { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("save_checkpoint", run, token, |s| {
                    s.save_checkpoint(now, run, token, "stale".into())
                });
            }
            CoreOp::SaveCheckpoint { index, variant } => {
                self.save_checkpoint(usize::from(index), variant);
            }
            CoreOp::Extend { index, target, by } => {
                self.extend(usize::from(index), target, 1_000 * (1 + u64::from(by)));
            }
            CoreOp::Flush => {
                let seqs = self.checkpoint_seqs();
                self.sched.flush_checkpoints(now);
                self.after_flush(&seqs);
            }
            CoreOp::Answer { index, kind, arg } => {
                let result = match kind % 4 {
                    0 => DeliveryResult::Delivered,
                    1 => DeliveryResult::Transient {
                        error: "HTTP 503".into(),
                        retry_after_ms: Some(1_000 * u64::from(arg)),
                    },
                    2 => DeliveryResult::Transient {
                        error: "connection reset".into(),
                        retry_after_ms: None,
                    },
                    _ => DeliveryResult::Permanent {
                        error: "HTTP 404".into(),
                    },
                };
                self.answer(usize::from(index), result);
            }
            CoreOp::StaleAnswer { index, variant } => {
                self.stale_answer(usize::from(index), variant);
            }
            CoreOp::Shutdown => self.shutdown(),
            CoreOp::Settle => self.settle(),
        }
    }

    /// The executing attempt at `index` (modulo their count).
    fn pick_started(&self, index: u8) -> Option<Started> {
        if self.started.is_empty() {
            return None;
        }
        Some(self.started[usize::from(index) % self.started.len()])
    }

    /// A worker claims work of `kinds`: the oldest queued run of those kinds, or nothing;
    /// refused while shutting down. Returns the claimed run.
    fn claim(&mut self, worker: usize, kinds: &[&str]) -> Option<RunId> {
        let worker = self.workers[worker % WORKERS].clone();
        let oldest = self
            .sched
            .runs()
            .filter_map(|r| match r.state() {
                RunState::Queued { since } if kinds.contains(&r.kind()) => Some((since, r.id())),
                _ => None,
            })
            .min();
        let shutting_down = self.sched.is_shutting_down();
        let result = self.sched.claim(self.now, &worker, kinds);
        match result {
            Err(Rejected::ShuttingDown) if shutting_down => None,
            Ok(None) if oldest.is_none() && !shutting_down => None,
            Ok(Some(claimed)) if oldest.map(|(_, id)| id) == Some(claimed.run) => {
                let run = self
                    .sched
                    .run(claimed.run)
                    .expect("a claimed run is in memory");
                assert!(matches!(run.state(), RunState::Starting { .. }));
                assert_eq!(run.lease().map(|l| &l.owner), Some(&worker));
                self.claims.insert(claimed.run, worker);
                Some(claimed.run)
            }
            other => panic!(
                "claim for {kinds:?} (shutting down: {shutting_down}) returned {other:?}, but \
                 the oldest queued run is {oldest:?}"
            ),
        }
    }

    /// SPEC L4: releasing a lease that is not the holder's is "already released" (a run not in
    /// memory is unknown), and changes nothing.
    fn stale_release(&mut self, run: RunId, token: FencingToken) {
        let before = self.sched.run(run).cloned();
        let timeout = self.sched.poll_timeout();
        let now = self.sched.now();
        let result = self.sched.release(self.now, run, token);
        let expected = if before.is_some() {
            Ok(Released::AlreadyReleased)
        } else {
            Err(Rejected::UnknownRun(run))
        };
        assert_eq!(result, expected, "stale release of {run} with {token}");
        assert_eq!(
            self.sched.run(run),
            before.as_ref(),
            "a stale release changed {run}"
        );
        assert_eq!(self.sched.poll_timeout(), timeout);
        assert_eq!(self.sched.now(), now, "a stale release moved the clock");
    }

    /// An executing attempt gives its lease back: accepted; it counts as lost.
    fn release(&mut self, index: usize) {
        if self.started.is_empty() {
            return;
        }
        let s = self.started.remove(index % self.started.len());
        let lost = self.sched.run(s.run).map(|r| r.lost());
        let result = self.sched.release(self.now, s.run, s.token);
        assert_eq!(
            result,
            Ok(Released::Released),
            "release of executing {}",
            s.run
        );
        let run = self.sched.run(s.run).expect("in memory until acknowledged");
        assert_eq!(
            Some(run.lost()),
            lost.map(|l| l + 1),
            "a release counts as lost"
        );
        assert!(run.lease().is_none());
        self.stale.push((s.run, s.token));
    }

    /// An executing attempt saves a checkpoint (`variant % 8 == 7`: too large, refused).
    fn save_checkpoint(&mut self, index: usize, variant: u8) {
        if self.started.is_empty() {
            return;
        }
        let s = self.started[index % self.started.len()];
        let previous = self.sched.run(s.run).and_then(|r| r.checkpoint().cloned());
        if variant % 8 == 7 {
            let data = "x".repeat(limits::CHECKPOINT_MAX_BYTES + 1);
            let timeout = self.sched.poll_timeout();
            let result = self.sched.save_checkpoint(self.now, s.run, s.token, data);
            assert!(
                matches!(
                    result,
                    Err(Rejected::InvalidField {
                        field: "checkpoint",
                        ..
                    })
                ),
                "an oversized checkpoint: {result:?}"
            );
            let current = self.sched.run(s.run).and_then(|r| r.checkpoint().cloned());
            assert_eq!(current, previous);
            assert_eq!(self.sched.poll_timeout(), timeout);
            return;
        }
        let data = format!("{} at {variant}", s.attempt);
        let result = self
            .sched
            .save_checkpoint(self.now, s.run, s.token, data.clone())
            .unwrap_or_else(|e| panic!("checkpoint of executing {} ({}): {e}", s.run, s.token));
        let current = self.sched.run(s.run).and_then(|r| r.checkpoint().cloned());
        if self.must_write.remove(&s.run) == Some(s.attempt) {
            // SPEC C1: a failed save never throttles the next one away.
            assert!(
                matches!(result, CheckpointSave::Saving { .. }),
                "SPEC C1: {}: the save after a failed save was {result:?}",
                s.run
            );
        }
        match result {
            CheckpointSave::Saving { seq } => {
                assert_eq!(seq, previous.map_or(1, |c| c.seq + 1));
                assert_eq!(
                    current.map(|c| (c.seq, c.attempt, c.data)),
                    Some((seq, s.attempt, data))
                );
            }
            CheckpointSave::Throttled { .. } => assert_eq!(current, previous),
        }
    }

    /// `extend`: granted at most once per run, never for a killed run, and otherwise exactly
    /// as the run's state allows (SPEC W1, W2).
    fn extend(&mut self, index: usize, target: u8, by_ms: u64) {
        let runs: Vec<RunId> = self.sched.runs().map(|r| r.id()).collect();
        let killed: Vec<RunId> = self
            .sched
            .runs()
            .filter(|r| r.killed().is_some())
            .map(|r| r.id())
            .collect();
        let run_id = match target % 4 {
            0 if !self.started.is_empty() => self.started[index % self.started.len()].run,
            1 if !killed.is_empty() => killed[index % killed.len()],
            2 if !runs.is_empty() => runs[index % runs.len()],
            _ => RunId(1_000_000 + index as u64),
        };
        let now = self.sched.now().max(self.now);
        let expected = match self.sched.run(run_id) {
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
                (Some(at), None) => {
                    let extended = at.max(now).plus_ms(by_ms);
                    Ok(run
                        .watch()
                        .backstop_at
                        .map_or(extended, |cap| extended.min(cap)))
                }
            },
        };
        let before = self.sched.run(run_id).cloned();
        let timeout = self.sched.poll_timeout();
        let result = self.sched.extend(self.now, run_id, by_ms, "slow upstream");
        assert_eq!(result, expected, "extend({run_id}, {by_ms} ms)");
        if self.killed.iter().any(|(run, _)| *run == run_id) {
            assert_eq!(result, Err(Rejected::Killed(run_id)), "SPEC W2");
        }
        if result.is_ok() {
            let granted = self.extended.entry(run_id).or_default();
            *granted += 1;
            assert_eq!(*granted, 1, "SPEC W1: {run_id} extended twice");
        } else {
            assert_eq!(
                self.sched.run(run_id),
                before.as_ref(),
                "a refused extend changed it"
            );
            assert_eq!(self.sched.poll_timeout(), timeout);
        }
    }

    /// The checkpoint sequence number of every run in memory.
    fn checkpoint_seqs(&self) -> BTreeMap<RunId, Option<u64>> {
        self.sched
            .runs()
            .map(|r| (r.id(), r.checkpoint().map(|c| c.seq)))
            .collect()
    }

    /// After a flush: what it wrote is the save after a failed one, if any.
    fn after_flush(&mut self, before: &BTreeMap<RunId, Option<u64>>) {
        let written: Vec<(RunId, u64)> = self
            .sched
            .runs()
            .filter_map(|r| {
                let seq = r.checkpoint().map(|c| c.seq)?;
                (Some(seq) != before.get(&r.id()).copied().flatten()).then_some((r.id(), seq))
            })
            .collect();
        for (run, seq) in written {
            self.flushed.insert((run, seq));
            self.must_write.remove(&run);
        }
    }

    /// `Effect::Deliver`: only once the record of that attempt is durable, carrying a durable
    /// terminal result, never twice for one attempt (across crashes too).
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
            "{id} carries a result the store does not hold: {run:?}"
        );
        let previous = self.sends.insert(id, send);
        assert!(previous.is_none(), "{id}: two attempts in flight");
    }

    /// The sink answers the send at `index`: accepted.
    fn answer(&mut self, index: usize, result: DeliveryResult) {
        let Some(&id) = self.sends.keys().nth(index % self.sends.len().max(1)) else {
            return;
        };
        let send = self.sends.remove(&id).expect("picked");
        let state = self.sched.outbox().delivery(id).map(|d| d.state);
        assert_eq!(
            state,
            Some(DeliveryState::Sending {
                attempt: send.attempt
            })
        );
        self.sched
            .handle_delivery_result(self.now, id, send.attempt, result)
            .unwrap_or_else(|e| panic!("answer to {id} attempt {}: {e}", send.attempt));
        self.answered.push((id, send.attempt));
    }

    /// An answer that is not current is refused and changes nothing.
    fn stale_answer(&mut self, index: usize, variant: u8) {
        let (id, attempt) = match variant % 3 {
            0 if !self.answered.is_empty() => self.answered[index % self.answered.len()],
            1 if !self.sends.is_empty() => {
                let send = self
                    .sends
                    .values()
                    .nth(index % self.sends.len())
                    .expect("some");
                (send.id, send.attempt + 1 + u32::from(variant >> 4))
            }
            _ => (DeliveryId(1_000_000 + index as u64), 1),
        };
        let outbox = self.sched.outbox().clone();
        let now = self.sched.now();
        let timeout = self.sched.poll_timeout();
        let result =
            self.sched
                .handle_delivery_result(self.now, id, attempt, DeliveryResult::Delivered);
        assert!(
            matches!(result, Err(Rejected::Delivery(_))),
            "an answer for {id} attempt {attempt}, not current, was not refused: {result:?}"
        );
        assert_eq!(
            self.sched.outbox(),
            &outbox,
            "a stale answer changed the outbox"
        );
        assert_eq!(self.sched.now(), now, "a stale answer moved the clock");
        assert_eq!(self.sched.poll_timeout(), timeout);
    }

    /// SPEC D4: every delivery that ends is counted once.
    fn delivery_event(&mut self, event: OutboxEvent) {
        let (OutboxEvent::Finished { id, .. } | OutboxEvent::Dropped { id: Some(id), .. }) = event
        else {
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
    }

    /// `begin_shutdown`: the scheduler's own attempts in progress are listed (they go on, with
    /// the driver's budget to finish), the sends in flight are listed, and throttled
    /// checkpoints are written.
    fn shutdown(&mut self) {
        if self.sched.is_shutting_down() {
            return;
        }
        let seqs = self.checkpoint_seqs();
        let running: BTreeSet<(RunId, Attempt)> = self
            .sched
            .runs()
            .filter(|r| {
                let worker = self.sched.worker();
                r.lease().is_some_and(|l| &l.owner == worker)
            })
            .filter_map(|r| match r.state() {
                RunState::Running { attempt, .. } => Some((r.id(), attempt)),
                _ => None,
            })
            .collect();
        let in_flight = self.sched.outbox().in_flight();
        let shutdown = self.sched.begin_shutdown(self.now);
        let listed: BTreeSet<(RunId, Attempt)> = shutdown.attempts.iter().copied().collect();
        assert_eq!(
            listed, running,
            "begin_shutdown lists the own attempts in progress"
        );
        assert_eq!(shutdown.deliveries, in_flight);
        for id in self.sends.keys() {
            assert!(shutdown.deliveries.contains(id), "{id} is being sent");
        }
        self.after_flush(&seqs);
    }

    /// The liveness check: see [`CoreOp::Settle`].
    fn settle(&mut self) {
        self.ack();
        if self.sched.is_shutting_down() {
            // After a graceful shutdown the process stops; it is started again.
            self.crash(0, 0);
        }
        let scheduled: Vec<JobId> = self
            .sched
            .jobs()
            .filter(|j| matches!(j.state, JobState::Scheduled { .. }))
            .map(|j| j.spec.id.clone())
            .collect();
        for id in scheduled {
            self.sched
                .pause_job(self.now, &id)
                .expect("a scheduled job can be paused");
        }
        let success = Outcome::Success {
            summary: None,
            artifacts: BTreeMap::from([(REPORT.to_owned(), "s3://reports/1".to_owned())]),
        };
        // Slots waiting in a backlog (a catch-up, even of a job disabled since) run one after
        // another, about a round each.
        let backlog: usize = self.sched.jobs().map(|j| j.backlog.len()).sum();
        let rounds = SETTLE_ROUNDS + 2 * backlog;
        for _ in 0..rounds {
            self.drain(PersistMode::Ack);
            for _ in 0..STEP_MAX_OUTCOMES {
                if self.claim(0, &["work"]).is_none() {
                    break;
                }
            }
            self.drain(PersistMode::Ack);
            while !self.started.is_empty() {
                self.report(0, success.clone());
            }
            while !self.sends.is_empty() {
                self.answer(0, DeliveryResult::Delivered);
            }
            self.drain(PersistMode::Ack);
            self.check();
            if self.settled() {
                let missing: Vec<&DeliveryId> = self
                    .store
                    .ever_delivered()
                    .difference(&self.ended_ever)
                    .filter(|id| !self.uncounted.contains(id))
                    .collect();
                assert!(
                    missing.is_empty(),
                    "SPEC D4: {missing:?} stored but never ended"
                );
                return;
            }
            // Jump to the next thing to wait for: a retry, a delivery retry, a persist retry
            // (the hourly history sweep is not worth a round).
            let retry = self
                .sched
                .runs()
                .filter_map(|r| match r.state() {
                    RunState::BackingOff { until } => Some(until),
                    _ => None,
                })
                .min();
            let next = [retry, self.sched.outbox().poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .or(self.sched.poll_timeout());
            if let Some(next) = next {
                if next.0 > self.start.0 + CLOCK_SPAN_MS {
                    return; // past the end of the fuzzed time span: nothing to assert
                }
                self.set_now(next.0.max(self.now.0));
            }
            self.tick();
            self.check();
        }
        panic!(
            "no run loops forever, but {rounds} rounds without faults left runs {:?} and \
             deliveries {:?}",
            self.sched
                .runs()
                .map(|r| (r.id(), r.state()))
                .collect::<Vec<_>>(),
            self.sched
                .outbox()
                .deliveries()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        );
    }

    /// Nothing is left to do: every run terminal in memory and in the store, no delivery left.
    fn settled(&self) -> bool {
        self.in_flight.is_none()
            && self.sched.is_quiescent()
            && self.started.is_empty()
            && self.sends.is_empty()
            && self.sched.runs().all(|r| r.state().is_terminal())
            && self.store.runs().all(|r| r.state().is_terminal())
            && self.sched.outbox().is_empty()
            && self.store.deliveries().next().is_none()
    }

    fn advance_to_next_deadline(&mut self) {
        if let Some(t) = self.sched.poll_timeout() {
            if t > self.now {
                self.set_now(t.0.min(self.now.0 + 400 * 86_400_000));
            }
        }
    }
}

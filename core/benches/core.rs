//! keel-core benchmark: transitions per second, `add_job` throughput and memory per idle job.
//!
//! A self-contained `harness = false` binary (no criterion): `std::time::Instant` and the
//! thread's on-CPU time from `/proc/thread-self/schedstat` for time, `/proc/self/status` for
//! memory. Rates are per on-CPU second (falling back to wall time where schedstat is missing),
//! so that other processes competing for the cores do not distort them; wall-clock rates are
//! printed alongside. Each scenario runs in a fresh child process (this binary
//! re-executed with `--child`) so that its memory figures start from a clean heap.
//!
//! ```text
//! cargo bench -p keel-core                   # 10k and 1M jobs, shared and distinct exprs
//! cargo bench -p keel-core --bench core -- --quick   # 10k jobs only, fewer firings
//! KEEL_BENCH_JOBS=10000,100000 cargo bench -p keel-core
//! ```
//!
//! Environment:
//!
//! - `KEEL_BENCH_JOBS`: comma-separated job counts (default `10000,1000000`; `--quick`: `10000`).
//! - `KEEL_BENCH_FIRINGS`: firings driven per scenario (default 100000; `--quick`: 20000).
//! - `KEEL_BENCH_DISTINCT`: comma-separated percentages of jobs whose cron text is unique to
//!   them (default `0,100`). At 0% the jobs share 3600 texts (`"{sec} {min} * * * *"`).
//! - `KEEL_BENCH_ORDER`: `sorted` (job ids added in id order, as a restore from a store that
//!   iterates by key does) or `shuffled` (a fixed permutation). Default `sorted`.
//!
//! Without `--bench` (that is, under `cargo test --benches`) it runs a small smoke test instead
//! of measuring.
//!
//! # Memory
//!
//! Memory is resident anonymous memory (`RssAnon`), not a count of live allocations: a counting
//! `#[global_allocator]` needs `unsafe impl GlobalAlloc`, and the workspace sets
//! `unsafe_code = "forbid"` for every target of the package, which an inner `#![allow]` cannot
//! lift (E0453). The figures therefore include malloc's per-allocation overhead (an 8-byte
//! header, 16-byte rounding, a 32-byte minimum chunk), which a counting allocator would not
//! see. So that freed journal memory does not inflate the idle figure, the idle measurement
//! adds jobs in chunks of [`CHUNK`] and drains and acknowledges the persist batch after each
//! chunk, as a driver does: the heap only ever holds one chunk's garbage, which the next chunk
//! reuses.

use std::env;
use std::hint::black_box;
use std::io::Read as _;
use std::ops::AddAssign;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_core::{
    drive, Effect, Event, Job, JobId, JobSpec, JobState, Outcome, RetryPolicy, Run, Schedule,
    ScheduleSpec, Scheduler, Timestamp,
};

/// Jobs added between two drains in the idle-memory measurement.
const CHUNK: usize = 64;

/// Schedule time at which every scenario starts. Nothing fires at `START` itself.
const START: &str = "2026-01-01T00:00:00Z";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Add in chunks, drain and ack after each: idle memory, then drive firings.
    Steady,
    /// Add everything, then drain one batch: memory with a full journal, drain cost, peak.
    Bulk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    Sorted,
    Shuffled,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    jobs: usize,
    distinct_pct: u32,
    firings: usize,
    order: Order,
    mode: Mode,
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let scenario = parse_child_args(&args[1..]);
        println!("{}", run_scenario(scenario).encode());
        return;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: cargo bench -p keel-core --bench core [-- --quick]; see core/benches/core.rs"
        );
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    if !bench && env::var_os("KEEL_BENCH_JOBS").is_none() {
        smoke();
        return;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: built without optimisations; use `cargo bench`");
    }
    let sizes = env_list(
        "KEEL_BENCH_JOBS",
        if quick { "10000" } else { "10000,1000000" },
    );
    let mixes = env_list("KEEL_BENCH_DISTINCT", "0,100");
    let firings = env_list("KEEL_BENCH_FIRINGS", if quick { "20000" } else { "100000" })
        .first()
        .copied()
        .unwrap_or(100_000);
    let order = match env::var("KEEL_BENCH_ORDER").as_deref() {
        Ok("shuffled") => Order::Shuffled,
        Ok("sorted") | Err(_) => Order::Sorted,
        Ok(other) => panic!("KEEL_BENCH_ORDER must be sorted or shuffled, not {other:?}"),
    };
    run_all(&sizes, &mixes, firings, order);
}

/// Runs every scenario in a child process and prints the tables.
fn run_all(sizes: &[usize], mixes: &[usize], firings: usize, order: Order) {
    let started = Instant::now();
    println!("# keel-core bench");
    println!();
    println!(
        "job ids added {order:?}; {firings} firings per scenario; layout: Job {} B \
         (JobSpec {}, ScheduleSpec {}, RetryPolicy {}, JobState {}), \
         JobId {} B, Run {} B",
        size_of::<Job>(),
        size_of::<JobSpec>(),
        size_of::<ScheduleSpec>(),
        size_of::<RetryPolicy>(),
        size_of::<JobState>(),
        size_of::<JobId>(),
        size_of::<Run>(),
    );
    println!();
    micro();

    let mut steady = Vec::new();
    let mut bulk = Vec::new();
    for &jobs in sizes {
        for (i, &pct) in mixes.iter().enumerate() {
            let pct = u32::try_from(pct.min(100)).expect("at most 100");
            let mut scenario = Scenario {
                jobs,
                distinct_pct: pct,
                firings,
                order,
                mode: Mode::Steady,
            };
            eprintln!("running {scenario:?} ...");
            steady.push(run_child(scenario));
            // The bulk path barely depends on the mix; run it for the first mix only.
            if i == 0 {
                scenario.mode = Mode::Bulk;
                eprintln!("running {scenario:?} ...");
                bulk.push(run_child(scenario));
            }
        }
    }

    println!("## Transitions");
    println!();
    println!(
        "Time jumps from deadline to deadline; every batch is acked at once and every attempt \
         succeeds at once. A firing = slot due -> run created -> batch -> attempt started -> \
         outcome -> run finished -> batch; 2 effects per firing plus 2 batches per tick."
    );
    println!();
    println!(
        "| jobs | distinct exprs | firings | ticks | firings/tick | firings/s | effects/s | \
         records/s | us/firing | firings/s (wall) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &steady {
        let secs = r.fire_time.cpu.as_secs_f64();
        println!(
            "| {} | {}% | {} | {} | {:.1} | {} | {} | {} | {:.1} | {} |",
            r.scenario.jobs,
            r.scenario.distinct_pct,
            r.fired,
            r.ticks,
            r.fired as f64 / r.ticks as f64,
            si(r.fired as f64 / secs),
            si(r.effects as f64 / secs),
            si(r.records as f64 / secs),
            secs * 1e6 / r.fired as f64,
            si(r.fired as f64 / r.fire_time.wall.as_secs_f64()),
        );
    }
    println!();
    println!("## add_job throughput");
    println!();
    println!(
        "| jobs | distinct exprs | how | add_job/s | add_job/s (wall) | drain+ack total | \
         largest batch |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|");
    for r in steady.iter().chain(&bulk) {
        let how = match r.scenario.mode {
            Mode::Steady => format!("chunks of {CHUNK}, drain+ack after each"),
            Mode::Bulk => "all jobs, then one drain+ack".to_owned(),
        };
        println!(
            "| {} | {}% | {how} | {} | {} | {:.3} s | {} records |",
            r.scenario.jobs,
            r.scenario.distinct_pct,
            si(r.scenario.jobs as f64 / r.add_time.cpu.as_secs_f64()),
            si(r.scenario.jobs as f64 / r.add_time.wall.as_secs_f64()),
            r.drain_time.cpu.as_secs_f64(),
            r.largest_add_batch,
        );
    }
    println!();
    println!("## Memory per job (resident anonymous memory, malloc overhead included)");
    println!();
    println!("| jobs | distinct exprs | how | idle bytes/job | journal pending | peak |");
    println!("|---:|---:|---|---:|---:|---:|");
    for r in steady.iter().chain(&bulk) {
        let how = match r.scenario.mode {
            Mode::Steady => "chunked adds (driver-like)",
            Mode::Bulk => "bulk add, one drain",
        };
        println!(
            "| {} | {}% | {how} | {} | {} | {} |",
            r.scenario.jobs,
            r.scenario.distinct_pct,
            per_job(r.idle_bytes, r.scenario.jobs),
            per_job(r.pending_bytes, r.scenario.jobs),
            per_job(r.peak_bytes, r.scenario.jobs),
        );
    }
    println!();
    println!(
        "idle: every batch acked, journal empty (the 512-byte target). After a bulk add the \
         freed journal and batch leave holes that stay resident, so that row is higher than \
         the live data. journal pending: after all adds, before the drain. peak: high-water \
         mark during the bulk drain."
    );
    println!();
    println!(
        "total bench time: {:.1} s wall; the bench waited {:.1} s for a core \
         (other load on the machine; rates above use on-CPU time)",
        started.elapsed().as_secs_f64(),
        steady
            .iter()
            .chain(&bulk)
            .map(|r| r.waited)
            .chain(run_delay())
            .sum::<Duration>()
            .as_secs_f64(),
    );
}

/// The cost of the cron work the core repeats: it keeps only the expression text and
/// re-parses on every `next_after` (once per firing, twice per `add_job`).
fn micro() {
    println!("## Schedule micro-costs");
    println!();
    println!("| expression | Schedule::cron (parse) | Schedule::next_after |");
    println!("|---|---:|---:|");
    let start = Timestamp::parse_rfc3339(START).expect("valid start");
    let exprs = [(expr(2537, false), ""), (expr(123_456, true), "")];
    for (text, note) in exprs {
        let n = 20_000;
        let t = Stopwatch::start();
        for _ in 0..n {
            black_box(Schedule::cron(black_box(&text), "UTC").expect("valid"));
        }
        let parse = t.stop().cpu.as_secs_f64() * 1e6 / n as f64;
        let schedule = Schedule::cron(&text, "UTC").expect("valid");
        let mut at = start;
        let t = Stopwatch::start();
        for _ in 0..n {
            at = schedule.next_after(black_box(at)).expect("a next slot");
        }
        let next = t.stop().cpu.as_secs_f64() * 1e6 / n as f64;
        println!("| `{text}`{note} | {parse:.2} us | {next:.2} us |");
    }
    println!();
}

fn per_job(bytes: Option<i64>, jobs: usize) -> String {
    match bytes {
        Some(b) => format!("{:.0} B", b as f64 / jobs as f64),
        None => "-".to_owned(),
    }
}

/// `12345678.9` -> `"12.35 M"`.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    let text = env::var(name).unwrap_or_else(|_| default.to_owned());
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        })
        .collect()
}

// ----- child processes ----------------------------------------------------------------------

fn run_child(s: Scenario) -> ScenarioResult {
    let exe = env::current_exe().expect("current exe");
    let mode = match s.mode {
        Mode::Steady => "steady",
        Mode::Bulk => "bulk",
    };
    let order = match s.order {
        Order::Sorted => "sorted",
        Order::Shuffled => "shuffled",
    };
    let out = Command::new(exe)
        .args(["--child", mode, order])
        .arg(s.jobs.to_string())
        .arg(s.distinct_pct.to_string())
        .arg(s.firings.to_string())
        .output()
        .expect("spawn the bench child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench child {s:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("KEEL_RESULT"))
        .expect("the child prints a KEEL_RESULT line");
    ScenarioResult::decode(s, line)
}

fn parse_child_args(args: &[String]) -> Scenario {
    let [mode, order, jobs, pct, firings] = args else {
        panic!("usage: --child steady|bulk sorted|shuffled JOBS DISTINCT_PCT FIRINGS");
    };
    Scenario {
        mode: match mode.as_str() {
            "steady" => Mode::Steady,
            "bulk" => Mode::Bulk,
            other => panic!("unknown mode {other}"),
        },
        order: match order.as_str() {
            "sorted" => Order::Sorted,
            "shuffled" => Order::Shuffled,
            other => panic!("unknown order {other}"),
        },
        jobs: jobs.parse().expect("jobs"),
        distinct_pct: pct.parse().expect("distinct_pct"),
        firings: firings.parse().expect("firings"),
    }
}

#[derive(Debug)]
struct ScenarioResult {
    scenario: Scenario,
    add_time: Span,
    drain_time: Span,
    largest_add_batch: u64,
    /// Resident bytes above the baseline once every batch is acked.
    idle_bytes: Option<i64>,
    /// Resident bytes above the baseline after all adds, before the drain (bulk mode).
    pending_bytes: Option<i64>,
    /// Peak resident bytes above the baseline (bulk mode).
    peak_bytes: Option<i64>,
    fired: u64,
    effects: u64,
    records: u64,
    ticks: u64,
    fire_time: Span,
    /// How long the child waited for a CPU, all phases together.
    waited: Duration,
}

impl ScenarioResult {
    fn encode(&self) -> String {
        let opt = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
        format!(
            "KEEL_RESULT {} {} {} {} {} {} {} {} {} {} {} {}",
            self.add_time.encode(),
            self.drain_time.encode(),
            self.largest_add_batch,
            opt(self.idle_bytes),
            opt(self.pending_bytes),
            opt(self.peak_bytes),
            self.fired,
            self.effects,
            self.records,
            self.ticks,
            self.fire_time.encode(),
            self.waited.as_nanos(),
        )
    }

    fn decode(scenario: Scenario, line: &str) -> Self {
        let f: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(f.len(), 12, "malformed child line {line:?}");
        let num = |i: usize| -> u64 { f[i].parse().expect("a number") };
        let span = |i: usize| Span::decode(f[i]);
        let nanos = |i: usize| Duration::from_nanos(num(i));
        let opt = |i: usize| f[i].parse::<i64>().ok();
        ScenarioResult {
            scenario,
            add_time: span(0),
            drain_time: span(1),
            largest_add_batch: num(2),
            idle_bytes: opt(3),
            pending_bytes: opt(4),
            peak_bytes: opt(5),
            fired: num(6),
            effects: num(7),
            records: num(8),
            ticks: num(9),
            fire_time: span(10),
            waited: nanos(11),
        }
    }
}

// ----- the scenario itself ------------------------------------------------------------------

/// The cron text of job `i`. Jobs are spread over the 3600 seconds of the hour and each fires
/// once an hour. A distinct job spells "every hour" and "every day" in a way unique to it
/// (e.g. `"17 42 0-5,5-23 1-3,3-31 * *"`), so no two distinct jobs share a text.
fn expr(i: usize, distinct: bool) -> String {
    let sec = i % 60;
    let min = (i / 60) % 60;
    if !distinct {
        return format!("{sec} {min} * * * *");
    }
    // Unique for up to 3600 * 24 * 31 = 2.68M jobs.
    let u = i / 3600;
    let hour = u % 24;
    let day = (u / 24) % 31 + 1;
    format!("{sec} {min} 0-{hour},{hour}-23 1-{day},{day}-31 * *")
}

fn spec(i: usize, distinct_pct: u32) -> JobSpec {
    // `pct` of every 100 consecutive job numbers, spread evenly.
    let pct = distinct_pct.min(100) as usize;
    let distinct = (i * pct) % 100 < pct;
    let id = JobId::new(&format!("job-{i:07}")).expect("valid id");
    let schedule = ScheduleSpec::Cron {
        expr: expr(i, distinct).into(),
        zone: "UTC".into(),
    };
    JobSpec::new(id, "report", schedule)
}

/// The job number added `k`-th: `k`, or a fixed permutation of `0..n`.
fn job_number(k: usize, n: usize, order: Order) -> usize {
    match order {
        Order::Sorted => k,
        Order::Shuffled => {
            // k * a mod n with a coprime to n is a bijection on 0..n.
            let mut a = 2_654_435_761 % n.max(1);
            while gcd(a, n) != 1 {
                a += 1;
            }
            ((k as u128 * a as u128) % n as u128) as usize
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[derive(Default)]
struct Counters {
    effects: u64,
    records: u64,
    largest_batch: u64,
    started: u64,
    finished: u64,
}

/// Drains effects as a driver does (`keel_core::drive`): ack every batch at once, succeed every
/// attempt at once.
fn drain(s: &mut Scheduler, now: Timestamp, c: &mut Counters) {
    let drained = drive::drain(s, now, drive::acknowledge, |s, now, effect| match effect {
        Effect::StartAttempt(a) => {
            c.started += 1;
            s.handle_outcome(now, a.run, a.lease.token, Outcome::ok())
                .expect("the attempt is running");
        }
        Effect::Event(Event::RunFinished { .. }) => c.finished += 1,
        _ => {}
    })
    .expect("acknowledging cannot fail");
    c.effects += drained.effects;
    c.records += drained.records;
    c.largest_batch = c.largest_batch.max(drained.largest_batch);
}

fn run_scenario(sc: Scenario) -> ScenarioResult {
    let start = Timestamp::parse_rfc3339(START).expect("valid start");
    let base = Memory::read();
    let mut s = Scheduler::new(Default::default(), 42, start);
    let mut c = Counters::default();
    let mut add_time = Span::default();
    let mut drain_time = Span::default();
    let mut pending_bytes = None;
    // Specs are built a chunk at a time, outside the timed loop; their strings move into the
    // scheduler, so they belong to the job and are counted.
    let mut specs = Vec::with_capacity(CHUNK);
    let mut k = 0;
    while k < sc.jobs {
        let end = (k + CHUNK).min(sc.jobs);
        specs.extend((k..end).map(|k| spec(job_number(k, sc.jobs, sc.order), sc.distinct_pct)));
        let t = Stopwatch::start();
        for spec in specs.drain(..) {
            s.add_job(start, spec).expect("a valid job");
        }
        add_time += t.stop();
        if sc.mode == Mode::Steady {
            let t = Stopwatch::start();
            drain(&mut s, start, &mut c);
            drain_time += t.stop();
        }
        k = end;
    }
    drop(specs);
    if sc.mode == Mode::Bulk {
        pending_bytes = Memory::read().delta(&base);
        let t = Stopwatch::start();
        drain(&mut s, start, &mut c);
        drain_time += t.stop();
    }
    assert!(s.is_quiescent(), "every batch was acknowledged");
    let after = Memory::read();
    let idle_bytes = after.delta(&base);
    let peak_bytes = match sc.mode {
        Mode::Bulk => after.peak.zip(base.rss).map(|(p, b)| p - b),
        Mode::Steady => None,
    };
    let largest_add_batch = c.largest_batch;

    // Drive firings (steady mode only; bulk mode is about memory and the drain).
    let mut f = Counters::default();
    let mut ticks = 0;
    let mut fire_time = Span::default();
    if sc.mode == Mode::Steady {
        let t = Stopwatch::start();
        while f.finished < sc.firings as u64 {
            let now = s.poll_timeout().expect("cron jobs always have a next slot");
            s.handle_timeout(now);
            drain(&mut s, now, &mut f);
            ticks += 1;
        }
        fire_time = t.stop();
        check_firings(&s, sc, &f, ticks);
    }
    ScenarioResult {
        scenario: sc,
        add_time,
        drain_time,
        largest_add_batch,
        idle_bytes,
        pending_bytes,
        peak_bytes,
        fired: f.finished,
        effects: f.effects,
        records: f.records,
        ticks,
        fire_time,
        waited: run_delay().unwrap_or_default(),
    }
}

/// Every job fires once an hour, so `ticks` one-second slots fire about `jobs / 3600` each.
fn check_firings(s: &Scheduler, sc: Scenario, f: &Counters, ticks: u64) {
    assert_eq!(f.started, f.finished, "every started attempt finished");
    assert!(s.is_quiescent(), "nothing waits to be persisted");
    assert!(s.runs().next().is_none(), "finished runs left memory");
    let per_tick = sc.jobs as f64 / 3600.0;
    let expected = ticks as f64 * per_tick;
    assert!(
        (f.finished as f64 - expected).abs() <= per_tick.ceil() + 1.0,
        "fired {} in {ticks} ticks; expected about {expected:.0}",
        f.finished
    );
}

/// A measured interval: wall-clock time and the time this thread was on a CPU.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    wall: Duration,
    cpu: Duration,
}

impl AddAssign for Span {
    fn add_assign(&mut self, other: Span) {
        self.wall += other.wall;
        self.cpu += other.cpu;
    }
}

impl Span {
    fn encode(&self) -> String {
        format!("{}/{}", self.wall.as_nanos(), self.cpu.as_nanos())
    }

    fn decode(text: &str) -> Span {
        let (wall, cpu) = text.split_once('/').expect("wall/cpu");
        let nanos = |t: &str| Duration::from_nanos(t.parse().expect("nanoseconds"));
        Span {
            wall: nanos(wall),
            cpu: nanos(cpu),
        }
    }
}

struct Stopwatch {
    wall: Instant,
    cpu: Option<u64>,
}

impl Stopwatch {
    fn start() -> Self {
        Stopwatch {
            cpu: schedstat().map(|(cpu, _)| cpu),
            wall: Instant::now(),
        }
    }

    fn stop(self) -> Span {
        let wall = self.wall.elapsed();
        let cpu = match (self.cpu, schedstat()) {
            (Some(a), Some((b, _))) if b >= a => Duration::from_nanos(b - a),
            _ => wall,
        };
        Span { wall, cpu }
    }
}

/// This thread's (on-CPU, waiting-for-a-CPU) nanoseconds, if the kernel reports them. Read into
/// a stack buffer so that measuring allocates nothing.
fn schedstat() -> Option<(u64, u64)> {
    let mut buf = [0u8; 128];
    let mut file = std::fs::File::open("/proc/thread-self/schedstat").ok()?;
    let n = file.read(&mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let cpu = fields.next()??;
    let wait = fields.next()??;
    // Some kernels report zeros when scheduler statistics are off.
    (cpu > 0).then_some((cpu, wait))
}

/// How long this process's main thread has waited for a CPU so far.
fn run_delay() -> Option<Duration> {
    schedstat().map(|(_, wait)| Duration::from_nanos(wait))
}

/// Resident memory of this process, from `/proc/self/status` (Linux only; `None` elsewhere).
struct Memory {
    rss: Option<i64>,
    peak: Option<i64>,
}

impl Memory {
    fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<i64>().ok())
                .map(|kb| kb * 1024)
        };
        Memory {
            // Anonymous memory only: the binary's own pages are file-backed.
            rss: field("RssAnon:"),
            // VmHWM counts file-backed pages too; those barely move during a run.
            peak: field("VmHWM:").zip(field("RssFile:")).map(|(h, f)| h - f),
        }
    }

    fn delta(&self, base: &Memory) -> Option<i64> {
        self.rss.zip(base.rss).map(|(a, b)| a - b)
    }
}

/// `cargo test --benches` runs this binary without `--bench`: check that the scenario code
/// works, quickly, without measuring or printing tables.
fn smoke() {
    for mode in [Mode::Steady, Mode::Bulk] {
        for distinct_pct in [0, 30, 100] {
            let r = run_scenario(Scenario {
                jobs: 3600,
                distinct_pct,
                firings: 3600,
                order: Order::Shuffled,
                mode,
            });
            assert!(mode == Mode::Bulk || r.fired >= 3600);
        }
    }
    // Distinct texts are distinct, and every form of them parses.
    let texts: std::collections::BTreeSet<String> = (0..100_000).map(|i| expr(i, true)).collect();
    assert_eq!(texts.len(), 100_000);
    for i in [0, 3599, 3600, 24 * 3600, 31 * 24 * 3600 - 1] {
        Schedule::cron(&expr(i, true), "UTC").expect("valid");
    }
    println!("keel-core bench smoke test: ok (run `cargo bench -p keel-core` to measure)");
}

//! Firing benchmark: keel against tokio-cron-scheduler, running the same cron schedules in the
//! same binary invocation, one library after the other.
//!
//! A self-contained `harness = false` binary (no criterion). Each case runs in a fresh child
//! process (this binary re-executed with `--child`), so that one library's threads, heap and
//! leftover tasks never run during the other's window, and so that process-wide CPU time is
//! attributable to the library under test.
//!
//! ```text
//! cargo bench -p keel-runtime --bench firing                     # 10k and 100k jobs, 20 s windows
//! KEEL_BENCH_JOBS=10000 KEEL_BENCH_WINDOW_S=10 cargo bench -p keel-runtime --bench firing
//! KEEL_BENCH_LIBS=keel-sync cargo bench -p keel-runtime --bench firing
//! ```
//!
//! Environment:
//!
//! - `KEEL_BENCH_JOBS`: comma-separated job counts (default `10000,100000`).
//! - `KEEL_BENCH_WINDOW_S`: the measurement window per case, in seconds (default 20).
//! - `KEEL_BENCH_PERIOD_S`: how often each job fires, `60` (the default: once a minute) or
//!   `3600` (once an hour: job `i` is `"{i % 60} {i / 60 % 60} * * * *"`, issue 16's
//!   million-job case, 278 firings/s).
//! - `KEEL_BENCH_LIBS`: comma-separated cases among `tcs`, `keel-sync`, `keel-nosync`
//!   (default: all three, in that order).
//! - `KEEL_BENCH_HISTORY_RUNS`: keel's history policy, terminal runs kept per job (default:
//!   keel's, 100). With `1`, each job's previous run (and its audit records and slot claim) is
//!   pruned as the next one settles, so from a job's second firing on its history stops
//!   growing: what "memory flat while history accumulates" needs.
//! - `KEEL_BENCH_WARMUP_S`: seconds between setup and the window (default 3). `65` starts the
//!   window once every job has fired once, so that with `KEEL_BENCH_HISTORY_RUNS=1` the
//!   window sees only steady state.
//! - `KEEL_BENCH_DIR`: where keel's stores are created (default: cargo's
//!   `CARGO_TARGET_TMPDIR`, on the target directory's filesystem; not `/tmp`, which may be a
//!   tmpfs on which `fsync` costs nothing).
//!
//! Without `--bench` (that is, under `cargo test --benches`) it runs a smoke test instead: each
//! case with 120 jobs and a 2 s window, about half a minute in all.
//!
//! # The schedules
//!
//! Job `i` is `"{i % 60} * * * * *"` (6 fields, seconds first) in UTC: once a minute, at second
//! `i % 60` (or once an hour, at second `i % 3600` of it, with `KEEL_BENCH_PERIOD_S=3600`). Both libraries read the same text (tokio-cron-scheduler through croner with
//! seconds required, keel through croner 6-field with the IANA zone `UTC`). Every second of the
//! minute has `jobs / 60` firings due, so firing is continuous: 167/s with 10 000 jobs, 1 667/s
//! with 100 000.
//!
//! # What is measured
//!
//! - **Lateness**: the handler records the wall time (`SystemTime`) at its first poll; the slot
//!   it was due at is the last whole second of the period matching job `i`'s (a firing that
//!   looks more than half a period late is read as early, so lateness must stay under 30 s,
//!   or 30 min with hourly jobs, to be read right). Percentiles are over the slots due in the window that fired.
//! - **Fired**: of the slots due in the window, how many reached their handler within
//!   [`GRACE`] after the window's end. Duplicates (a slot run twice) are counted apart. For
//!   tokio-cron-scheduler, a `tracing` subscriber counts the activations its job runner
//!   reports lost (`Lagged(n)` on its activation channel), which explains a shortfall.
//! - **CPU per firing**: the process's user and system time over the window
//!   (`/proc/self/stat`, 10 ms ticks, which count threads that exited too: keel-store-fs
//!   writes a compaction's snapshot on a thread that ends when it is done) divided by the
//!   handler starts in the window.
//! - **CPU per firing, first half → second half** of the window: keel's rises as its store
//!   fills with runs (the "runs stored" column).
//! - keel runs with its embedded store, keel-store-fs, in a fresh directory, once with
//!   `sync: true` (the default: every batch `fsync`ed before a handler runs) and once with
//!   `sync: false`, to show what the `fsync`s cost. tokio-cron-scheduler runs with its default
//!   in-memory store and `JobScheduler::new()` (channel size 200).
//!
//! Both get the same tokio runtime: multi-threaded, one worker per core, and the system's
//! allocator, what a program that embeds either library gets. `--bench firing_daemon` is this
//! bench with the `keel` daemon's allocator, mimalloc, for every case.

// A bench is a measuring tool: a broken setup should stop it loudly, so `unwrap` is fine here.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::env;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_core::{Config, HistoryPolicy, JobId, JobSpec, Outcome, ScheduleSpec, Store};
use keel_runtime::{AttemptContext, Runtime};
use keel_store_fs::{FsOptions, FsStore};
use tokio_cron_scheduler::{Job, JobScheduler};

/// Time between setup and the window, so that both libraries are past their start-up.
const WARMUP_DEFAULT_S: u64 = 3;

fn warmup() -> Duration {
    Duration::from_secs(env_number("KEEL_BENCH_WARMUP_S").unwrap_or(WARMUP_DEFAULT_S))
}

/// A whole number from the environment variable `name`, if it is set.
fn env_number(name: &str) -> Option<u64> {
    let text = env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name} is a whole number, not {text:?}")),
    )
}

/// keel's history policy, with `KEEL_BENCH_HISTORY_RUNS` as its runs kept per job if set.
fn history_policy() -> HistoryPolicy {
    let mut policy = HistoryPolicy::default();
    if let Some(runs) = env_number("KEEL_BENCH_HISTORY_RUNS") {
        policy.runs_max = u32::try_from(runs).unwrap();
    }
    policy
}

/// How long after the window a slot due in it may still fire and be counted.
const GRACE: Duration = Duration::from_secs(3);

const US_PER_S: i64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lib {
    /// tokio-cron-scheduler, in-memory.
    Tcs,
    /// keel with keel-store-fs, `sync: true`.
    KeelSync,
    /// keel with keel-store-fs, `sync: false`.
    KeelNoSync,
}

impl Lib {
    fn arg(self) -> &'static str {
        match self {
            Lib::Tcs => "tcs",
            Lib::KeelSync => "keel-sync",
            Lib::KeelNoSync => "keel-nosync",
        }
    }

    fn from_arg(arg: &str) -> Lib {
        match arg {
            "tcs" => Lib::Tcs,
            "keel-sync" => Lib::KeelSync,
            "keel-nosync" => Lib::KeelNoSync,
            other => panic!("unknown library {other:?} (tcs, keel-sync, keel-nosync)"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Lib::Tcs => "tokio-cron-scheduler 0.15.1 (in memory)",
            Lib::KeelSync => "keel + store-fs, sync on",
            Lib::KeelNoSync => "keel + store-fs, sync off",
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    lib: Lib,
    jobs: u32,
    window: Duration,
    /// Each job fires once per this many seconds: 60 or 3600.
    period_s: u32,
    dir: PathBuf,
}

/// What a child measured; one line of text between the processes.
#[derive(Clone, Debug, Default)]
struct CaseResult {
    setup_ms: u64,
    window_ms: u64,
    /// Slots due in the window.
    due: u64,
    /// Of those, how many fired (first firing of each slot).
    fired: u64,
    /// Extra firings of a slot that had already fired.
    duplicates: u64,
    /// Handler starts inside the window (any slot): the denominator of CPU per firing.
    started: u64,
    /// Of those, the ones in the window's first half.
    started_first_half: u64,
    /// Every handler start from setup to the window's end: for keel, the runs its store holds
    /// under its default policy (100 per job: none is pruned in a window of minutes), more than
    /// it holds with `KEEL_BENCH_HISTORY_RUNS`.
    runs_total: u64,
    p50_us: i64,
    p99_us: i64,
    max_us: i64,
    cpu_ns: u64,
    /// On-CPU time in the window's first half.
    cpu_first_half_ns: u64,
    utime_ticks: u64,
    stime_ticks: u64,
    /// Resident memory at the window's start and end.
    rss_start_kib: u64,
    rss_kib: u64,
    /// keel only: store batches, fsyncs and compactions during the window.
    batches: u64,
    syncs: u64,
    compactions: u64,
    /// tokio-cron-scheduler only, from the window's start to the grace's end: activations its
    /// job runner reported lost (`Lagged(n)` on its broadcast channel), and every error it
    /// logged.
    lagged: u64,
    errors: u64,
}

impl CaseResult {
    fn encode(&self) -> String {
        format!(
            "KEEL_RESULT {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            self.setup_ms,
            self.window_ms,
            self.due,
            self.fired,
            self.duplicates,
            self.started,
            self.started_first_half,
            self.runs_total,
            self.p50_us,
            self.p99_us,
            self.max_us,
            self.cpu_ns,
            self.cpu_first_half_ns,
            self.utime_ticks,
            self.stime_ticks,
            self.rss_start_kib,
            self.rss_kib,
            self.batches,
            self.syncs,
            self.compactions,
            self.lagged,
            self.errors,
        )
    }

    fn decode(line: &str) -> CaseResult {
        let f: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(f.len(), 22, "malformed result line {line:?}");
        let u = |i: usize| f[i].parse::<u64>().unwrap();
        let s = |i: usize| f[i].parse::<i64>().unwrap();
        CaseResult {
            setup_ms: u(0),
            window_ms: u(1),
            due: u(2),
            fired: u(3),
            duplicates: u(4),
            started: u(5),
            started_first_half: u(6),
            runs_total: u(7),
            p50_us: s(8),
            p99_us: s(9),
            max_us: s(10),
            cpu_ns: u(11),
            cpu_first_half_ns: u(12),
            utime_ticks: u(13),
            stime_ticks: u(14),
            rss_start_kib: u(15),
            rss_kib: u(16),
            batches: u(17),
            syncs: u(18),
            compactions: u(19),
            lagged: u(20),
            errors: u(21),
        }
    }
}

pub(crate) fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let case = parse_child_args(&args[1..]);
        let result = run_case(&case);
        println!("{}", result.encode());
        // Dropping 100 000 jobs and a runtime full of tasks measures nothing: leave at once.
        std::process::exit(0);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: cargo bench -p keel-runtime --bench firing; see runtime/benches/firing.rs"
        );
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    if !bench && env::var_os("KEEL_BENCH_JOBS").is_none() {
        smoke();
        return;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: built without optimisations; use `cargo bench`");
    }
    let jobs = env_list("KEEL_BENCH_JOBS", "10000,100000");
    let window = Duration::from_secs(
        env::var("KEEL_BENCH_WINDOW_S")
            .ok()
            .map(|s| s.parse().unwrap())
            .unwrap_or(20),
    );
    let period_s: u32 = env::var("KEEL_BENCH_PERIOD_S")
        .ok()
        .map(|s| s.parse().unwrap())
        .unwrap_or(60);
    assert!(
        matches!(period_s, 60 | 3600),
        "KEEL_BENCH_PERIOD_S is 60 or 3600"
    );
    let libs: Vec<Lib> = env::var("KEEL_BENCH_LIBS")
        .unwrap_or_else(|_| "tcs,keel-sync,keel-nosync".to_owned())
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Lib::from_arg)
        .collect();
    let dir = bench_dir();
    let started = Instant::now();
    println!("# keel-runtime firing bench: keel vs tokio-cron-scheduler");
    println!();
    println!(
        "job i = \"{}\" UTC; window {} s per case (+{} s warm-up, +{} s grace); \
         keel stores under {}",
        if period_s == 60 {
            "{i % 60} * * * * *"
        } else {
            "{i % 60} {i / 60 % 60} * * * *"
        },
        window.as_secs(),
        warmup().as_secs(),
        GRACE.as_secs(),
        dir.display()
    );
    println!(
        "keel's history policy: {} terminal runs kept per job",
        history_policy().runs_max
    );
    println!();
    let mut rows = Vec::new();
    for &n in &jobs {
        for &lib in &libs {
            let case = Case {
                lib,
                jobs: n,
                window,
                period_s,
                dir: dir.clone(),
            };
            eprintln!("running {} with {n} jobs...", lib.arg());
            let result = run_child(&case);
            rows.push((case, result));
        }
    }
    print_table(&rows);
    println!();
    println!("total wall time {:.0} s", started.elapsed().as_secs_f64());
}

fn env_list(name: &str, default: &str) -> Vec<u32> {
    env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        })
        .collect()
}

fn bench_dir() -> PathBuf {
    env::var_os("KEEL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

fn smoke() {
    let dir = bench_dir();
    for lib in [Lib::Tcs, Lib::KeelSync, Lib::KeelNoSync] {
        let case = Case {
            lib,
            jobs: 120,
            window: Duration::from_secs(2),
            period_s: 60,
            dir: dir.clone(),
        };
        let r = run_child(&case);
        assert!(r.due > 0 && r.fired > 0, "{lib:?}: nothing fired: {r:?}");
    }
    println!("keel-runtime firing bench smoke test: ok (run `cargo bench -p keel-runtime --bench firing` to measure)");
}

// ----- the table ----------------------------------------------------------------------------

fn print_table(rows: &[(Case, CaseResult)]) {
    println!(
        "| library | jobs | setup | due/s | fired | dup | lateness p50 | p99 | max | \
         CPU µs/firing | 1st → 2nd half | sys share | CPU (% of a core) | log appends/s | \
         compactions | runs stored | tcs: lost (Lagged) / errors | RSS (window start → end) |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (case, r) in rows {
        let window_s = r.window_ms as f64 / 1000.0;
        let cpu_s = r.cpu_ns as f64 / 1e9;
        let per = |cpu_ns: u64, started: u64| {
            if started > 0 {
                format!("{:.1}", cpu_ns as f64 / 1e3 / started as f64)
            } else {
                "–".to_owned()
            }
        };
        let per_firing = per(r.cpu_ns, r.started);
        let halves = format!(
            "{} → {}",
            per(r.cpu_first_half_ns, r.started_first_half),
            per(
                r.cpu_ns.saturating_sub(r.cpu_first_half_ns),
                r.started - r.started_first_half
            )
        );
        let ticks = r.utime_ticks + r.stime_ticks;
        let sys = if ticks > 0 {
            format!("{:.0}%", 100.0 * r.stime_ticks as f64 / ticks as f64)
        } else {
            "–".to_owned()
        };
        let keel = case.lib != Lib::Tcs;
        println!(
            "| {} | {} | {:.1} s | {:.0} | {:.2}% | {} | {} | {} | {} | {} | {} | {} | {:.0}% | {} | {} | {} | {} | {} → {} MiB |",
            case.lib.label(),
            group(u64::from(case.jobs)),
            r.setup_ms as f64 / 1000.0,
            r.due as f64 / (case.window.as_secs_f64()),
            if r.due > 0 {
                100.0 * r.fired as f64 / r.due as f64
            } else {
                0.0
            },
            r.duplicates,
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.max_us),
            per_firing,
            halves,
            sys,
            100.0 * cpu_s / window_s,
            if keel {
                format!("{:.0}", r.syncs as f64 / window_s)
            } else {
                "–".to_owned()
            },
            if keel {
                r.compactions.to_string()
            } else {
                "–".to_owned()
            },
            if keel {
                group(r.runs_total)
            } else {
                "–".to_owned()
            },
            if keel {
                "–".to_owned()
            } else {
                format!("{} / {}", group(r.lagged), group(r.errors))
            },
            r.rss_start_kib / 1024,
            r.rss_kib / 1024,
        );
    }
}

fn ms(us: i64) -> String {
    if us.abs() >= 100_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

// ----- child processes ----------------------------------------------------------------------

fn run_child(case: &Case) -> CaseResult {
    let exe = env::current_exe().unwrap();
    let out = Command::new(exe)
        .arg("--child")
        .arg(case.lib.arg())
        .arg(case.jobs.to_string())
        .arg(case.window.as_secs().to_string())
        .arg(case.period_s.to_string())
        .arg(&case.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench child {case:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("KEEL_RESULT"))
        .unwrap();
    CaseResult::decode(line)
}

fn parse_child_args(args: &[String]) -> Case {
    let [lib, jobs, window, period, dir] = args else {
        panic!("usage: --child tcs|keel-sync|keel-nosync JOBS WINDOW_S PERIOD_S DIR");
    };
    Case {
        lib: Lib::from_arg(lib),
        jobs: jobs.parse().unwrap(),
        window: Duration::from_secs(window.parse().unwrap()),
        period_s: period.parse().unwrap(),
        dir: PathBuf::from(dir),
    }
}

/// Handler starts: `(job index, wall-clock µs at the handler's first poll)`.
#[derive(Debug, Default)]
struct Recorder {
    firings: Mutex<Vec<(u32, i64)>>,
}

impl Recorder {
    fn record(&self, job: u32) {
        let at = now_us();
        self.firings.lock().unwrap().push((job, at));
    }
}

fn now_us() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_micros()).unwrap()
}

fn expr(job: u32, period_s: u32) -> String {
    let second = job % period_s;
    if period_s == 60 {
        format!("{second} * * * * *")
    } else {
        format!("{} {} * * * *", second % 60, second / 60)
    }
}

fn run_case(case: &Case) -> CaseResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // keel writes on the blocking pool; a thread that exited mid-window would take its
        // CPU time out of /proc/self/task with it.
        .thread_keep_alive(Duration::from_secs(3600))
        .build()
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    match case.lib {
        Lib::Tcs => {
            let lag = Arc::new(LagCounter::default());
            tracing::subscriber::set_global_default(LagSubscriber(Arc::clone(&lag))).unwrap();
            let setup = Instant::now();
            let scheduler = runtime.block_on(start_tcs(case, &recorder));
            let setup = setup.elapsed();
            let result = measure(case, &recorder, None, Some(&lag), setup);
            drop(scheduler);
            result
        }
        Lib::KeelSync | Lib::KeelNoSync => {
            let dir = case
                .dir
                .join(format!("firing-{}-{}", std::process::id(), case.jobs));
            let _ = std::fs::remove_dir_all(&dir);
            let options = FsOptions {
                sync: case.lib == Lib::KeelSync,
                ..FsOptions::default()
            };
            let store = Arc::new(FsStore::open_with(&dir, options).unwrap());
            let setup = Instant::now();
            let keel = runtime.block_on(start_keel(case, &recorder, &store));
            let setup = setup.elapsed();
            let result = measure(case, &recorder, Some(&store), None, setup);
            runtime
                .block_on(keel.shutdown(Duration::from_secs(2)))
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
    }
}

async fn start_tcs(case: &Case, recorder: &Arc<Recorder>) -> JobScheduler {
    let scheduler = JobScheduler::new().await.unwrap();
    for i in 0..case.jobs {
        let recorder = Arc::clone(recorder);
        let job = Job::new_async(expr(i, case.period_s), move |_, _| {
            let recorder = Arc::clone(&recorder);
            Box::pin(async move { recorder.record(i) })
        })
        .unwrap();
        // One at a time: its job-creation channel drops additions that overrun it.
        scheduler.add(job).await.unwrap();
    }
    scheduler.start().await.unwrap();
    scheduler
}

async fn start_keel(case: &Case, recorder: &Arc<Recorder>, store: &Arc<FsStore>) -> Runtime {
    let rec = Arc::clone(recorder);
    let config = Config {
        history: history_policy(),
        ..Config::default()
    };
    let runtime = Runtime::builder(Arc::clone(store) as Arc<dyn Store>)
        .config(config)
        .handler("tick", move |ctx: AttemptContext| {
            let rec = Arc::clone(&rec);
            async move {
                rec.record(ctx.payload.parse().unwrap());
                Outcome::ok()
            }
        })
        .start()
        .await
        .unwrap();
    // add_job answers once durable; many in flight at once share batches.
    let handle = runtime.handle();
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..case.jobs {
        let mut spec = JobSpec::new(
            JobId::new(&format!("job-{i:06}")).unwrap(),
            "tick",
            ScheduleSpec::Cron {
                expr: expr(i, case.period_s).into(),
                zone: "UTC".into(),
            },
        );
        spec.payload = i.to_string().into();
        let handle = handle.clone();
        pending.spawn(async move { handle.add_job(spec).await });
        if pending.len() >= 2048 {
            while let Some(added) = pending.join_next().await {
                added.unwrap().unwrap();
            }
        }
    }
    while let Some(added) = pending.join_next().await {
        added.unwrap().unwrap();
    }
    runtime
}

// ----- measuring ----------------------------------------------------------------------------

/// Runs on the process's main thread, outside the tokio workers, so that a saturated library
/// cannot delay the window's edges.
fn measure(
    case: &Case,
    recorder: &Recorder,
    store: Option<&FsStore>,
    lag: Option<&LagCounter>,
    setup: Duration,
) -> CaseResult {
    let window_us = i64::try_from(case.window.as_micros()).unwrap();
    let warmup_us = i64::try_from(warmup().as_micros()).unwrap();
    // The window starts on a whole second: slots are whole seconds.
    let t0 = (now_us() + warmup_us) / US_PER_S * US_PER_S + US_PER_S;
    let t1 = t0 + window_us;
    sleep_until_us(t0);
    let (a0, stat0, store0) = (now_us(), proc_stat(), store.map(FsStore::stats));
    let rss_start_kib = rss_kib();
    let lag0 = lag.map(LagCounter::read).unwrap_or_default();
    sleep_until_us(t0 + window_us / 2);
    let (am, statm) = (now_us(), proc_stat());
    sleep_until_us(t1);
    let (a1, stat1, store1) = (now_us(), proc_stat(), store.map(FsStore::stats));
    let rss_kib = rss_kib();
    std::thread::sleep(GRACE);
    let lag1 = lag.map(LagCounter::read).unwrap_or_default();
    let firings = std::mem::take(&mut *recorder.firings.lock().unwrap());

    let mut started = 0u64;
    let mut started_first_half = 0u64;
    let runs_total = firings.iter().filter(|&&(_, at)| at < a1).count() as u64;
    let mut first: HashMap<(u32, i64), i64> = HashMap::new();
    let mut duplicates = 0u64;
    for &(job, at) in &firings {
        if (a0..a1).contains(&at) {
            started += 1;
        }
        if (a0..am).contains(&at) {
            started_first_half += 1;
        }
        let lateness = lateness_us(job, at, case.period_s);
        let slot = at - lateness;
        if (t0..t1).contains(&slot) {
            match first.entry((job, slot)) {
                std::collections::hash_map::Entry::Occupied(_) => duplicates += 1,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(lateness);
                }
            }
        }
    }
    let mut late: Vec<i64> = first.into_values().collect();
    late.sort_unstable();
    let pct = |p: f64| -> i64 {
        if late.is_empty() {
            return 0;
        }
        let rank = ((p * late.len() as f64).ceil() as usize).clamp(1, late.len());
        late[rank - 1]
    };

    // Slots due in [t0, t1): every whole second t fires the jobs with i % period == t % period.
    let (jobs, period) = (i64::from(case.jobs), i64::from(case.period_s));
    let due: i64 = (t0 / US_PER_S..t1 / US_PER_S)
        .map(|t| jobs / period + i64::from(t % period < jobs % period))
        .sum();

    let cpu_ns = cpu_delta(stat0, stat1);
    let (s0, s1) = (store0.unwrap_or_default(), store1.unwrap_or_default());
    CaseResult {
        setup_ms: u64::try_from(setup.as_millis()).unwrap(),
        window_ms: u64::try_from((a1 - a0) / 1000).unwrap(),
        due: u64::try_from(due).unwrap(),
        fired: late.len() as u64,
        duplicates,
        started,
        started_first_half,
        runs_total,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: late.last().copied().unwrap_or(0),
        cpu_ns,
        cpu_first_half_ns: cpu_delta(stat0, statm),
        utime_ticks: stat1.0.saturating_sub(stat0.0),
        stime_ticks: stat1.1.saturating_sub(stat0.1),
        rss_start_kib,
        rss_kib,
        batches: s1.batches - s0.batches,
        syncs: s1.syncs - s0.syncs,
        compactions: s1.compactions - s0.compactions,
        lagged: lag1.0 - lag0.0,
        errors: lag1.1 - lag0.1,
    }
}

/// What tokio-cron-scheduler logs at ERROR level, counted. Its job runner receives activations
/// on a `tokio::sync::broadcast` channel (capacity 200 with `JobScheduler::new()`); when it falls
/// behind, it logs `Error receiving Lagged(n)` and carries on: those `n` firings never run.
#[derive(Debug, Default)]
struct LagCounter {
    lagged: AtomicU64,
    errors: AtomicU64,
}

impl LagCounter {
    fn read(&self) -> (u64, u64) {
        (
            self.lagged.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// A `tracing` subscriber that only counts tokio-cron-scheduler's errors (installed in its
/// child process only).
struct LagSubscriber(Arc<LagCounter>);

impl tracing::Subscriber for LagSubscriber {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
            && metadata.target().starts_with("tokio_cron_scheduler")
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        self.0.errors.fetch_add(1, Ordering::Relaxed);
        if event.metadata().target() != "tokio_cron_scheduler::job::runner" {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let lagged = message
            .0
            .split("Lagged(")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = lagged {
            self.0.lagged.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// How late a handler that started at `at` (µs since the epoch) was for its slot: the last
/// whole second of the period that matches job `job`'s second. More than half a period reads
/// as early.
fn lateness_us(job: u32, at: i64, period_s: u32) -> i64 {
    let period = i64::from(period_s) * US_PER_S;
    let second = i64::from(job % period_s) * US_PER_S;
    let off = (at - second).rem_euclid(period);
    if off >= period / 2 {
        off - period
    } else {
        off
    }
}

fn sleep_until_us(at: i64) {
    let now = now_us();
    if at > now {
        std::thread::sleep(Duration::from_micros(u64::try_from(at - now).unwrap()));
    }
}

/// The clock ticks of `/proc/self/stat` per second (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: u64 = 100;

/// The process's CPU time between two readings of [`proc_stat`], in nanoseconds.
fn cpu_delta(before: (u64, u64), after: (u64, u64)) -> u64 {
    let ticks = (after.0 + after.1).saturating_sub(before.0 + before.1);
    ticks * (1_000_000_000 / TICKS_PER_S)
}

/// `(utime, stime)` of the whole process in clock ticks (`/proc/self/stat` fields 14 and 15).
fn proc_stat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; count fields after its closing parenthesis.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0);
    // After the ')', field 3 (state) is index 0, so field 14 is index 11.
    (get(11), get(12))
}

/// Resident memory of this process (`VmRSS`), KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

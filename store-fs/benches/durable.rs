//! keel-store-fs benchmark: durable transitions per second, against the raw fsync rate of the
//! same filesystem, with group commit, with core-shaped batches, with a second process reading
//! the store, and the time a second process takes to become the writer.
//!
//! A self-contained `harness = false` binary (no criterion): `std::time::Instant` for wall time,
//! `/proc/thread-self/schedstat` for the on-CPU time of the writing threads.
//!
//! ```text
//! cargo bench -p keel-store-fs                         # about 45 s: disk, then /dev/shm
//! KEEL_BENCH_SECS=1 cargo bench -p keel-store-fs       # shorter cases
//! KEEL_BENCH_THREADS=32 cargo bench -p keel-store-fs   # group commit with 32 threads
//! KEEL_BENCH_HANDOFF_RUNS=250000 cargo bench -p keel-store-fs  # handoffs of a larger history
//! ```
//!
//! Every store lives in a `keel_harness::TempDir`, that is under `std::env::temp_dir()`
//! (`$TMPDIR`, default `/tmp`), so the raw fsync rate is measured on the same filesystem as the
//! store. The whole suite then runs again in a child process with `TMPDIR=/dev/shm` (tmpfs,
//! where fsync returns at once), which shows what the store's own software costs.
//!
//! Cases, each on a fresh store with default [`FsOptions`] (fsync on, compaction at 64 MiB):
//!
//! 1. **raw fsync**: append 200 bytes to a file and `sync_data()` it, in a loop. One durable
//!    transition per fsync can never go faster than this.
//! 2. **sequential**: one handle, `restore()`, then one `apply` after the other, each batch one
//!    transition: a `PutRun`, its `Audit` record and a `PutMeta`, as the core writes them. Runs
//!    go through a life of three transitions: created (queued), leased (running, with a
//!    fencing token) and succeeded (lease ended, `last_token` kept), so the write rules check
//!    real token and lease history.
//! 3. **group commit**: 8 threads applying such batches on one handle at once.
//! 4. **core-shaped**: one thread, 64 transitions per batch (64 `PutRun`s, 64 audit records, one
//!    `PutMeta`), which is how the core batches when many jobs fire in one tick.
//! 5. **a second process**: this binary, started again with `KEEL_STORE_FS_BENCH_ROLE=reader`,
//!    loops on `read()` and `runs()` (the first page, as `keel runs` does) against the writer's
//!    directory, while the writer runs case 2 or 4; then alone for a second. And the
//!    **writer handoff**: a child process (`KEEL_STORE_FS_BENCH_ROLE=handoff`) opens a store
//!    holding about 10 000 runs and calls `restore()`, deposing the live writer in this process.
//!
//! Without `--bench` (under `cargo test --benches`) it runs every case for a few milliseconds,
//! as a smoke test, and measures nothing.

// A benchmark: a failed setup step or a refused batch must stop it loudly, and `unwrap` is the
// shortest way to say so.
#![allow(clippy::unwrap_used)]

use std::env;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use keel_core::{
    Actor, Attempt, Batch, Conflict, FencingToken, Meta, Record, RunQuery, RunState, StateName,
    Store, StoreError, Timestamp,
};
use keel_harness::conformance::{audit_record, batch, leased, run};
use keel_harness::TempDir;
use keel_store_fs::{FsOptions, FsStats, FsStore};
use serde::{Deserialize, Serialize};

/// Which part this process plays; unset in the process `cargo bench` starts.
const ROLE_ENV: &str = "KEEL_STORE_FS_BENCH_ROLE";
/// The store directory of a `reader` or `handoff` child.
const DIR_ENV: &str = "KEEL_STORE_FS_BENCH_DIR";
/// Seconds per measured case (default 3).
const SECS_ENV: &str = "KEEL_BENCH_SECS";
/// Threads of the group commit case (default 8).
const THREADS_ENV: &str = "KEEL_BENCH_THREADS";
/// Runs in the store of the handoff case (default 10 000; each run leaves three audit records).
const HANDOFF_RUNS_ENV: &str = "KEEL_BENCH_HANDOFF_RUNS";

/// Where the schedule starts; every timestamp of the generated runs is after it.
const T0: Timestamp = Timestamp(1_800_000_000_000);

/// Bytes appended per fsync in the raw case: about one small transition frame.
const RAW_APPEND: usize = 200;

#[derive(Clone, Copy, Debug)]
struct Config {
    /// Length of each measured case.
    case: Duration,
    /// Length of the raw fsync loop.
    raw: Duration,
    /// How long the reading process runs alone after the writer stopped.
    reader_alone: Duration,
    /// Threads of the group commit case.
    group_threads: usize,
    /// Transitions per batch in the core-shaped case.
    core_width: u64,
    /// Runs in the store a second process takes over.
    handoff_runs: u64,
    /// Handoffs per store layout.
    handoffs: usize,
}

impl Config {
    fn bench() -> Config {
        let secs = env::var(SECS_ENV)
            .ok()
            .map(|s| {
                s.parse::<f64>()
                    .expect("KEEL_BENCH_SECS is a number of seconds")
            })
            .unwrap_or(3.0);
        Config {
            case: Duration::from_secs_f64(secs),
            raw: Duration::from_secs_f64(secs * 2.0 / 3.0),
            reader_alone: Duration::from_secs_f64(secs / 3.0),
            group_threads: env::var(THREADS_ENV).ok().map_or(8, |s| {
                s.parse()
                    .expect("KEEL_BENCH_THREADS is a number of threads")
            }),
            core_width: 64,
            handoff_runs: env::var(HANDOFF_RUNS_ENV).ok().map_or(10_000, |s| {
                s.parse()
                    .expect("KEEL_BENCH_HANDOFF_RUNS is a number of runs")
            }),
            handoffs: 5,
        }
    }

    fn smoke() -> Config {
        Config {
            case: Duration::from_millis(50),
            raw: Duration::from_millis(20),
            reader_alone: Duration::from_millis(20),
            group_threads: 4,
            core_width: 8,
            handoff_runs: 200,
            handoffs: 1,
        }
    }
}

fn main() {
    match env::var(ROLE_ENV).as_deref() {
        Ok("reader") => return reader_child(),
        Ok("handoff") => return handoff_child(),
        Ok("suite") => {
            let suite = suite(&Config::bench(), "tmpfs");
            println!("KEEL_SUITE {}", serde_json::to_string(&suite).unwrap());
            return;
        }
        Ok(other) => panic!("{ROLE_ENV}={other:?} is not a role"),
        Err(_) => {}
    }
    let args: Vec<String> = env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: cargo bench -p keel-store-fs; see store-fs/benches/durable.rs");
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: built without optimisations; use `cargo bench`");
    }
    let started = Instant::now();
    let config = Config::bench();
    let mut suites = vec![suite(&config, "disk")];
    if Path::new("/dev/shm").is_dir() {
        suites.push(tmpfs_suite());
    } else {
        eprintln!("no /dev/shm: skipping the tmpfs run");
    }
    print_report(&config, &suites, started.elapsed());
}

// ----- the suite --------------------------------------------------------------------------------

/// Everything measured on one filesystem.
#[derive(Debug, Serialize, Deserialize)]
struct Suite {
    label: String,
    storage: Storage,
    /// Per batch width: CPU nanoseconds to build one batch (not the store's cost, but inside
    /// the rates), and log bytes per transition.
    batch_costs: Vec<(u64, f64, f64)>,
    cases: Vec<Case>,
    contention: Vec<Contention>,
    handoffs: Vec<Handoff>,
}

/// Where the stores of a suite live.
#[derive(Debug, Serialize, Deserialize)]
struct Storage {
    temp_dir: String,
    device: String,
    mount_point: String,
    fs_type: String,
    mount_options: String,
}

/// One measured write case.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Case {
    name: String,
    /// Threads applying, and transitions per batch (0 for the raw case).
    threads: usize,
    width: u64,
    /// Transitions made durable (for the raw case: fsyncs).
    transitions: u64,
    /// `apply` calls (for the raw case: fsyncs).
    batches: u64,
    /// Fsyncs of the log (the handle's `syncs`, minus the one of `restore`).
    fsyncs: u64,
    compactions: u64,
    wall_s: f64,
    /// Per `apply` (per fsync for the raw case).
    mean_ns: f64,
    p99_ns: f64,
    max_ns: f64,
    /// On-CPU time of the writing threads.
    cpu_ns: f64,
}

impl Case {
    fn rate(&self) -> f64 {
        self.transitions as f64 / self.wall_s
    }
}

/// The writer, once alone and once with a reading process.
#[derive(Debug, Serialize, Deserialize)]
struct Contention {
    workload: String,
    /// The writer while the reader runs.
    writer: Case,
    /// The reader while the writer runs, then alone.
    with_writer: ReaderPhase,
    alone: ReaderPhase,
}

/// What the reading process did in one phase.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct ReaderPhase {
    reads: u64,
    pages: u64,
    read_ns: f64,
    page_ns: f64,
    wall_ns: f64,
    cpu_ns: f64,
}

impl ReaderPhase {
    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / (self.wall_ns / 1e9)
    }
}

/// A second process becoming the writer of a store.
#[derive(Debug, Serialize, Deserialize)]
struct Handoff {
    layout: String,
    runs: usize,
    files: Vec<(String, u64)>,
    /// Per handoff: the child's `open`, its `restore`, and spawn to `restore` returned as the
    /// parent sees it.
    open_ns: Vec<f64>,
    restore_ns: Vec<f64>,
    total_ns: Vec<f64>,
    /// The live writer's next batch was refused as deposed.
    deposed: bool,
}

fn suite(config: &Config, label: &str) -> Suite {
    let probe = TempDir::created("keel-bench-probe");
    let storage = storage_of(probe.path());
    drop(probe);
    eprintln!(
        "[{label}] stores under {} ({} on {})",
        storage.temp_dir, storage.fs_type, storage.mount_point
    );
    let batch_costs = [1, config.core_width]
        .into_iter()
        .map(|width| {
            let (build_ns, bytes) = batch_cost(width);
            (width, build_ns, bytes)
        })
        .collect();
    let mut cases = Vec::new();

    eprintln!("[{label}] raw fsync ...");
    cases.push(raw_fsync(config.raw));

    eprintln!("[{label}] sequential ...");
    cases.push(write_case(
        "sequential: 1 thread, 1 transition/batch",
        1,
        1,
        config.case,
    ));

    eprintln!("[{label}] group commit ...");
    cases.push(write_case(
        &format!(
            "group commit: {} threads, 1 transition/batch",
            config.group_threads
        ),
        config.group_threads,
        1,
        config.case,
    ));

    eprintln!("[{label}] core-shaped ...");
    cases.push(write_case(
        &format!(
            "core-shaped: 1 thread, {} transitions/batch",
            config.core_width
        ),
        1,
        config.core_width,
        config.case,
    ));

    let mut contention = Vec::new();
    for width in [1, config.core_width] {
        eprintln!("[{label}] writer + reading process, {width} transitions/batch ...");
        contention.push(contended(config, width));
    }

    let mut handoffs = Vec::new();
    for (layout, compact_after_bytes) in [
        ("all in the log", FsOptions::default().compact_after_bytes),
        ("snapshot + log (compacted every 4 MiB)", 4 << 20),
    ] {
        eprintln!("[{label}] handoff, {layout} ...");
        handoffs.push(handoff(config, layout, compact_after_bytes));
    }

    Suite {
        label: label.to_string(),
        storage,
        batch_costs,
        cases,
        contention,
        handoffs,
    }
}

/// Runs the suite again in a child process whose temporary directory is `/dev/shm`.
fn tmpfs_suite() -> Suite {
    let out = Command::new(env::current_exe().unwrap())
        .env(ROLE_ENV, "suite")
        .env("TMPDIR", "/dev/shm")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the tmpfs suite failed: {}\n{stdout}",
        out.status
    );
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("KEEL_SUITE "))
        .expect("the tmpfs suite prints a KEEL_SUITE line");
    serde_json::from_str(json).unwrap()
}

// ----- the workload -----------------------------------------------------------------------------

/// Batches of one writer thread. Run `r` lives through three transitions, each a batch (or part
/// of one): created and queued, leased to a worker and running, succeeded. A batch moves
/// `width` runs through the same transition, as the core does when that many jobs fire in one
/// tick; with width 1 every batch is one transition.
struct Stream {
    epoch: u64,
    /// Run numbers of this stream start here; streams of different threads never overlap.
    first_run: u64,
    width: u64,
    /// Batch numbers of this stream start here (they only need to stay below 2^32).
    first_batch: u64,
    built: u64,
}

impl Stream {
    fn new(epoch: u64, thread: u64, width: u64) -> Stream {
        Stream {
            epoch,
            first_run: thread * 1_000_000_000,
            width,
            first_batch: thread << 26,
            built: 0,
        }
    }

    fn next_batch(&mut self) -> Batch {
        let n = self.built;
        self.built += 1;
        let (group, phase) = (n / 3, n % 3);
        let at = T0.plus_ms(1_000 * (n + 1));
        let first = self.first_run + group * self.width;
        let runs = first..first + self.width;
        let mut records = Vec::with_capacity(2 * self.width as usize + 1);
        records.extend(runs.clone().map(|r| Record::PutRun(run_at(r, phase, at))));
        records.extend(runs.map(|r| Record::Audit(audit_at(r, phase, at))));
        let last = first + self.width - 1;
        records.push(Record::PutMeta(Meta {
            next_run_id: last + 2,
            next_audit_seq: audit_seq(last, phase) + 1,
            clock: at,
            epoch: self.epoch,
            next_token: last + 2,
            next_incident: 1,
            next_delivery: 1,
        }));
        batch(self.epoch, self.first_batch + n, at, records)
    }
}

fn job_of(r: u64) -> String {
    format!("job-{:04}", r % 1000)
}

fn audit_seq(r: u64, phase: u64) -> u64 {
    r * 3 + phase + 1
}

/// Run number `r` after transition `phase` (0 created, 1 leased, 2 succeeded).
fn run_at(r: u64, phase: u64, at: Timestamp) -> keel_core::Run {
    let created = run(r + 1, &job_of(r), T0.plus_ms(r * 1_000));
    let token = r + 1;
    match phase {
        0 => created,
        1 => {
            let running = leased(created, "worker-1", token, at.plus_ms(30_000));
            let mut running = running.record();
            running.attempt = Attempt(1);
            keel_core::Run::from_record(running)
        }
        _ => {
            let mut done = created.record();
            done.attempt = Attempt(1);
            done.state = RunState::Succeeded;
            done.last_token = Some(FencingToken(token));
            done.finished_at = Some(at);
            done.summary = Some("ok".to_string());
            keel_core::Run::from_record(done)
        }
    }
}

fn audit_at(r: u64, phase: u64, at: Timestamp) -> keel_core::AuditRecord {
    let mut record = audit_record(audit_seq(r, phase), &job_of(r), Some(r + 1), at);
    let (old, new, actor, reason) = match phase {
        0 => (None, StateName::Queued, Actor::Scheduler, "slot due"),
        1 => (
            Some(StateName::Queued),
            StateName::Running,
            Actor::Scheduler,
            "claimed by worker-1",
        ),
        _ => (
            Some(StateName::Running),
            StateName::Succeeded,
            Actor::Worker("worker-1".to_string()),
            "completed",
        ),
    };
    record.old = old;
    record.new = new;
    record.actor = actor;
    record.reason = reason.to_string();
    if phase > 0 {
        record.attempt = Some(Attempt(1));
        record.fencing_token = Some(FencingToken(r + 1));
    }
    record
}

/// CPU nanoseconds to build one batch of `width` transitions, and the log bytes one transition
/// takes (measured on a store with fsync off: the log's growth over a few hundred batches).
fn batch_cost(width: u64) -> (f64, f64) {
    let mut stream = Stream::new(1, 0, width);
    let n = (30_000 / width).max(30);
    let cpu = thread_cpu();
    for _ in 0..n {
        std::hint::black_box(stream.next_batch());
    }
    let build_ns = (thread_cpu() - cpu) as f64 / n as f64;

    let dir = TempDir::created("keel-bench-size");
    let options = FsOptions {
        sync: false,
        ..FsOptions::default()
    };
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let log = || {
        dir_files(dir.path())
            .iter()
            .map(|(_, len)| len)
            .sum::<u64>()
    };
    let before = log();
    let batches = (3_000 / width).max(3) / 3 * 3;
    let case = drive(&store, epoch, 1, width, Until::Batches(batches));
    assert_eq!(case.compactions, 0, "the log alone holds the batches");
    let bytes = (log() - before) as f64 / case.transitions as f64;
    (build_ns, bytes)
}

// ----- the cases --------------------------------------------------------------------------------

fn raw_fsync(length: Duration) -> Case {
    let dir = TempDir::created("keel-bench-raw");
    let path = dir.path().join("raw");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let line = [b'x'; RAW_APPEND];
    let mut append = || {
        file.write_all(&line).unwrap();
        file.sync_data().unwrap();
    };
    for _ in 0..10 {
        append();
    }
    let cpu = thread_cpu();
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < length {
        let t = Instant::now();
        append();
        latencies.push(t.elapsed());
    }
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu;
    let (mean_ns, p99_ns, max_ns) = mean_p99_max(&mut latencies);
    let n = latencies.len() as u64;
    Case {
        name: format!("raw fsync: append {RAW_APPEND} B + sync_data"),
        threads: 1,
        width: 0,
        transitions: n,
        batches: n,
        fsyncs: n,
        compactions: 0,
        wall_s: wall.as_secs_f64(),
        mean_ns,
        p99_ns,
        max_ns,
        cpu_ns: cpu as f64,
    }
}

/// A fresh store, `restore`, then `threads` threads applying batches of `width` for `length`.
fn write_case(name: &str, threads: usize, width: u64, length: Duration) -> Case {
    let dir = TempDir::created("keel-bench-write");
    let store = FsStore::open(dir.path()).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let mut case = drive(&store, epoch, threads, width, Until::Elapsed(length));
    case.name = name.to_string();
    case
}

#[derive(Clone, Copy, Debug)]
enum Until {
    Elapsed(Duration),
    /// Batches per thread.
    Batches(u64),
}

/// `threads` threads apply batches of `width` transitions on `store` until `until`.
fn drive(store: &FsStore, epoch: u64, threads: usize, width: u64, until: Until) -> Case {
    let before = store.stats();
    let start = Instant::now();
    let per_thread: Vec<(Vec<Duration>, u64)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                scope.spawn(move || {
                    let mut stream = Stream::new(epoch, t, width);
                    let mut latencies = Vec::new();
                    let cpu = thread_cpu();
                    loop {
                        let more = match until {
                            Until::Elapsed(length) => start.elapsed() < length,
                            Until::Batches(n) => stream.built < n,
                        };
                        if !more {
                            break;
                        }
                        let batch = stream.next_batch();
                        let t = Instant::now();
                        store
                            .apply(&batch)
                            .unwrap_or_else(|e| panic!("batch {} refused: {e}", batch.id));
                        latencies.push(t.elapsed());
                    }
                    (latencies, thread_cpu() - cpu)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = start.elapsed();
    let after = store.stats();
    let cpu_ns: u64 = per_thread.iter().map(|(_, cpu)| cpu).sum();
    let mut latencies: Vec<Duration> = per_thread.into_iter().flat_map(|(l, _)| l).collect();
    let (mean_ns, p99_ns, max_ns) = mean_p99_max(&mut latencies);
    let batches = latencies.len() as u64;
    let delta = |f: fn(&FsStats) -> u64| f(&after) - f(&before);
    assert_eq!(delta(|s| s.batches), batches, "every batch was applied");
    Case {
        name: String::new(),
        threads,
        width,
        transitions: batches * width,
        batches,
        fsyncs: delta(|s| s.syncs),
        compactions: delta(|s| s.compactions),
        wall_s: wall.as_secs_f64(),
        mean_ns,
        p99_ns,
        max_ns,
        cpu_ns: cpu_ns as f64,
    }
}

/// The writer applies batches of `width` while another process reads the store in a loop;
/// then the reader goes on alone.
fn contended(config: &Config, width: u64) -> Contention {
    let dir = TempDir::created("keel-bench-contended");
    let store = FsStore::open(dir.path()).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let mut reader = Command::new(env::current_exe().unwrap())
        .env(ROLE_ENV, "reader")
        .env(DIR_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("the reader says ready").unwrap();
    assert_eq!(ready, "ready", "unexpected line from the reader");
    let mut writer = drive(&store, epoch, 1, width, Until::Elapsed(config.case));
    writer.name = format!("{width} transition(s)/batch");
    let mut stdin = reader.stdin.take().unwrap();
    stdin.write_all(b"alone\n").unwrap();
    stdin.flush().unwrap();
    thread::sleep(config.reader_alone);
    drop(stdin);
    let result = lines
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("KEEL_READER ").map(str::to_string))
        .expect("the reader prints a KEEL_READER line");
    assert!(reader.wait().unwrap().success(), "the reader failed");
    let phases: Vec<ReaderPhase> = serde_json::from_str(&result).unwrap();
    Contention {
        workload: writer.name.clone(),
        writer,
        with_writer: phases[0],
        alone: phases[1],
    }
}

/// The reading process: loops on `read()` and `runs()` until its stdin closes; a line on stdin
/// starts the next phase. Prints one `ReaderPhase` per phase.
fn reader_child() {
    let dir = env::var_os(DIR_ENV).expect("the store directory");
    let store = FsStore::open(&dir).unwrap();
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (phase, stop) = (Arc::clone(&phase), Arc::clone(&stop));
        thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
                phase.fetch_add(1, Ordering::SeqCst);
            }
            stop.store(true, Ordering::SeqCst);
        });
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let query = RunQuery::default();
    let mut phases = vec![ReaderPhase::default(); 2];
    let mut current = 0;
    let mut started = (Instant::now(), thread_cpu());
    let close = |p: &mut ReaderPhase, started: (Instant, u64)| {
        p.wall_ns = started.0.elapsed().as_nanos() as f64;
        p.cpu_ns = (thread_cpu() - started.1) as f64;
    };
    while !stop.load(Ordering::SeqCst) {
        let now = phase.load(Ordering::SeqCst).min(1);
        if now != current {
            close(&mut phases[current], started);
            current = now;
            started = (Instant::now(), thread_cpu());
        }
        let p = &mut phases[current];
        let t = Instant::now();
        std::hint::black_box(store.read().unwrap());
        p.read_ns += t.elapsed().as_nanos() as f64;
        p.reads += 1;
        let t = Instant::now();
        std::hint::black_box(store.runs(&query).unwrap());
        p.page_ns += t.elapsed().as_nanos() as f64;
        p.pages += 1;
    }
    close(&mut phases[current], started);
    println!("KEEL_READER {}", serde_json::to_string(&phases).unwrap());
}

/// Builds a store of `config.handoff_runs` finished runs with a live writer (this process),
/// then lets a new process take it over `config.handoffs` times.
fn handoff(config: &Config, layout: &str, compact_after_bytes: u64) -> Handoff {
    let dir = TempDir::created("keel-bench-handoff");
    let options = FsOptions {
        compact_after_bytes,
        // The layout under test: compact at exactly this size, whatever the snapshot's.
        compact_at_snapshot_size: false,
        ..FsOptions::default()
    };
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let width = 64;
    let batches = config.handoff_runs.div_ceil(width) * 3;
    drive(&store, epoch, 1, width, Until::Batches(batches));
    let files = dir_files(dir.path());
    let mut handoff = Handoff {
        layout: layout.to_string(),
        runs: 0,
        files,
        open_ns: Vec::new(),
        restore_ns: Vec::new(),
        total_ns: Vec::new(),
        deposed: false,
    };
    for round in 0..config.handoffs {
        let spawned = Instant::now();
        let mut child = Command::new(env::current_exe().unwrap())
            .env(ROLE_ENV, "handoff")
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("the child reports").unwrap();
        let total = spawned.elapsed();
        assert!(child.wait().unwrap().success(), "the handoff child failed");
        let report: HandoffReport =
            serde_json::from_str(line.strip_prefix("KEEL_HANDOFF ").expect("a report")).unwrap();
        handoff.runs = report.runs;
        handoff.open_ns.push(report.open_ns);
        handoff.restore_ns.push(report.restore_ns);
        handoff.total_ns.push(total.as_nanos() as f64);
        if round == 0 {
            // The writer in this process was deposed: its next batch is refused.
            let mut stream = Stream::new(epoch, 1, 1);
            handoff.deposed = matches!(
                store.apply(&stream.next_batch()),
                Err(StoreError::Conflict(Conflict::Deposed { .. }))
            );
        }
    }
    handoff
}

#[derive(Debug, Serialize, Deserialize)]
struct HandoffReport {
    open_ns: f64,
    restore_ns: f64,
    /// Runs in the store (`runs` paged to the end would say the same; `read` only returns the
    /// unfinished ones).
    runs: usize,
}

/// The handoff child: opens the store and becomes its writer.
fn handoff_child() {
    let dir = env::var_os(DIR_ENV).expect("the store directory");
    let t = Instant::now();
    let store = FsStore::open(&dir).unwrap();
    let open_ns = t.elapsed().as_nanos() as f64;
    let t = Instant::now();
    let snapshot = store.restore().unwrap();
    let restore_ns = t.elapsed().as_nanos() as f64;
    std::hint::black_box(&snapshot);
    // Counted after the timing: every page of the history.
    let mut runs = 0;
    let mut query = RunQuery {
        limit: keel_core::limits::HISTORY_PAGE_MAX,
        ..RunQuery::default()
    };
    loop {
        let page = store.runs(&query).unwrap();
        runs += page.runs.len();
        match page.next {
            Some(next) => query.before = Some(next),
            None => break,
        }
    }
    let report = HandoffReport {
        open_ns,
        restore_ns,
        runs,
    };
    println!("KEEL_HANDOFF {}", serde_json::to_string(&report).unwrap());
}

// ----- the report -------------------------------------------------------------------------------

fn print_report(config: &Config, suites: &[Suite], elapsed: Duration) {
    println!("# keel-store-fs durability bench");
    println!();
    println!("{}", machine());
    for suite in suites {
        let s = &suite.storage;
        println!(
            "- {}: stores under `{}`: {} on `{}` ({}, {})",
            suite.label, s.temp_dir, s.fs_type, s.mount_point, s.device, s.mount_options
        );
    }
    println!(
        "- {:.1} s per case; default FsOptions (fsync on, compaction at 64 MiB)",
        config.case.as_secs_f64()
    );
    if let Some(suite) = suites.first() {
        for (width, build_ns, bytes) in &suite.batch_costs {
            println!(
                "- a batch of {width} transition(s): {bytes:.0} log bytes per transition; \
                 building it (inside the rates) takes {}",
                time(*build_ns)
            );
        }
    }
    println!();

    println!("## Durable writes");
    println!();
    println!(
        "| storage | case | transitions/s | x raw fsync | fsyncs/batch | mean latency | \
         p99 latency | max latency | writer CPU/transition | compactions |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for suite in suites {
        let raw = suite.cases[0].rate();
        for (i, c) in suite.cases.iter().enumerate() {
            let (rate, ratio, per_batch) = if i == 0 {
                (
                    format!("{} fsyncs/s", si(c.rate())),
                    "1".to_string(),
                    "-".to_string(),
                )
            } else {
                (
                    si(c.rate()),
                    format!("{:.2}", c.rate() / raw),
                    format!(
                        "{:.3} ({:.1} batches/fsync)",
                        c.fsyncs as f64 / c.batches as f64,
                        c.batches as f64 / c.fsyncs as f64
                    ),
                )
            };
            println!(
                "| {} | {} | {rate} | {ratio} | {per_batch} | {} | {} | {} | {} | {} |",
                suite.label,
                c.name,
                time(c.mean_ns),
                time(c.p99_ns),
                time(c.max_ns),
                time(c.cpu_ns / c.transitions as f64),
                c.compactions,
            );
        }
    }
    println!();
    println!(
        "Latency is per `apply` call (per fsync for raw; a core-shaped apply carries all its \
         transitions). Writer CPU is the on-CPU time of the applying threads, batch building \
         included. Every run lives through 3 transitions and stays in the store as history, \
         so the store grows during a case; a compaction rewrites all of it."
    );
    println!();

    println!("## A second process reading the store");
    println!();
    println!(
        "| storage | writer workload | writer transitions/s alone | with the reader | change | \
         writer mean latency | reader pairs/s | mean read() | mean runs() | reader CPU | \
         runs stored at the end | reader alone: mean read() | mean runs() |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for suite in suites {
        for c in &suite.contention {
            let alone = suite
                .cases
                .iter()
                .skip(1)
                .find(|a| a.threads == 1 && a.width == c.writer.width)
                .map_or(f64::NAN, Case::rate);
            let (r, a) = (&c.with_writer, &c.alone);
            println!(
                "| {} | {} | {} | {} | {:+.0}% | {} | {} | {} | {} | {:.0}% | {} | {} | {} |",
                suite.label,
                c.workload,
                si(alone),
                si(c.writer.rate()),
                (c.writer.rate() / alone - 1.0) * 100.0,
                time(c.writer.mean_ns),
                si(r.per_sec(r.reads)),
                time(r.read_ns / r.reads as f64),
                time(r.page_ns / r.pages as f64),
                r.cpu_ns / r.wall_ns * 100.0,
                si(c.writer.transitions as f64 / 3.0),
                time(a.read_ns / a.reads as f64),
                time(a.page_ns / a.pages as f64),
            );
        }
    }
    println!();
    println!(
        "The reader is a separate process (this binary re-executed) on the same directory, \
         looping on `read()` then `runs()` (the first page, 100 runs): a pair. Each call takes \
         the lock shared and first catches up on the writer's new frames. \"alone\" is the \
         writer case of the table above (same workload, same run); reader CPU is its on-CPU \
         share of the wall time; \"reader alone\" is the reader for {:.1} s after the writer \
         stopped.",
        config.reader_alone.as_secs_f64()
    );
    println!();

    println!("## Writer handoff");
    println!();
    println!(
        "| storage | layout | runs | files | open p50 | restore p50 | spawn → restored p50 | \
         min–max | live writer deposed |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---|");
    for suite in suites {
        for h in &suite.handoffs {
            let files = h
                .files
                .iter()
                .map(|(name, len)| format!("{name} {}", bytes(*len)))
                .collect::<Vec<_>>()
                .join(", ");
            let total = sorted(&h.total_ns);
            println!(
                "| {} | {} | {} | {files} | {} | {} | {} | {}–{} | {} |",
                suite.label,
                h.layout,
                h.runs,
                time(median(&h.open_ns)),
                time(median(&h.restore_ns)),
                time(median(&h.total_ns)),
                time(total[0]),
                time(total[total.len() - 1]),
                if h.deposed { "yes" } else { "NO" },
            );
        }
    }
    println!();
    println!(
        "Each handoff is a new process: `FsStore::open` (loads the newest snapshot and log \
         under the exclusive lock) then `restore()` (appends and fsyncs a writer frame), while \
         this process holds the store as its writer. {} handoffs per layout.",
        config.handoffs
    );
    println!();
    println!("total bench time: {:.1} s wall", elapsed.as_secs_f64());
}

/// The machine facts this process can read.
fn machine() -> String {
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim())
        .to_string();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or("?".to_string(), |kb| {
            format!("{:.1} GiB", kb / 1024.0 / 1024.0)
        });
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "- machine: nproc {nproc}, {model}, {mem} RAM, Linux {}",
        kernel.trim()
    )
}

/// The mount that holds `path`, from `/proc/mounts` (the longest mount point that is a prefix;
/// of equal ones the last, which is the one on top).
fn storage_of(path: &Path) -> Storage {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<Vec<&str>> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 || !path.starts_with(fields[1]) {
            continue;
        }
        if best.as_ref().is_none_or(|b| fields[1].len() >= b[1].len()) {
            best = Some(fields);
        }
    }
    let field = |i: usize| best.as_ref().map_or("?", |b| b[i]).to_string();
    Storage {
        temp_dir: path.parent().unwrap_or(&path).display().to_string(),
        device: field(0),
        mount_point: field(1),
        fs_type: field(2),
        mount_options: field(3),
    }
}

// ----- helpers ----------------------------------------------------------------------------------

/// Mean, 99th percentile and maximum, in nanoseconds.
fn mean_p99_max(latencies: &mut [Duration]) -> (f64, f64, f64) {
    let Some(max) = latencies.iter().max() else {
        return (f64::NAN, f64::NAN, f64::NAN);
    };
    let max = max.as_nanos() as f64;
    latencies.sort_unstable();
    let sum: Duration = latencies.iter().sum();
    let mean = sum.as_nanos() as f64 / latencies.len() as f64;
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    (mean, p99.as_nanos() as f64, max)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn median(values: &[f64]) -> f64 {
    let v = sorted(values);
    v[v.len() / 2]
}

/// The store's snapshots and logs with their sizes.
fn dir_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = fs::read_dir(dir)
        .unwrap()
        .map(Result::unwrap)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let short = name
                .strip_prefix("snapshot-")
                .map(|g| ("snapshot", g))
                .or_else(|| name.strip_prefix("log-").map(|g| ("log", g)))?;
            let generation = u64::from_str_radix(short.1, 16).ok()?;
            Some((
                format!("{}-{generation}", short.0),
                e.metadata().ok()?.len(),
            ))
        })
        .collect();
    files.sort();
    files
}

/// On-CPU nanoseconds of the calling thread (0 where the kernel does not say).
fn thread_cpu() -> u64 {
    let mut buf = [0u8; 128];
    let Ok(mut file) = File::open("/proc/thread-self/schedstat") else {
        return 0;
    };
    let n = file.read(&mut buf).unwrap_or(0);
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// `12345.6` -> `"12.3 k"`.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Nanoseconds, readably.
fn time(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / f64::from(1 << 10))
    } else {
        format!("{n} B")
    }
}

/// `cargo test --benches` runs this binary without `--bench`: run every case briefly, so the
/// bench is known to work, without measuring.
fn smoke() {
    let config = Config::smoke();
    let suite = suite(&config, "smoke");
    for case in &suite.cases {
        assert!(case.transitions > 0, "{} did nothing", case.name);
    }
    for c in &suite.contention {
        assert!(
            c.with_writer.reads > 0 && c.alone.reads > 0,
            "the reader read"
        );
    }
    for h in &suite.handoffs {
        assert!(h.deposed, "the handoff deposed the live writer");
        assert!(
            h.runs as u64 >= config.handoff_runs,
            "the store holds every run"
        );
    }
    println!("keel-store-fs bench smoke test: ok (run `cargo bench -p keel-store-fs` to measure)");
}

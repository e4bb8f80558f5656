//! Durable one-shot runs per second, end to end: keel with keel-store-fs against apalis with
//! apalis-sqlite, the same count, on the same machine, back to back (issue 16).
//!
//! ```text
//! CARGO_TARGET_DIR=… cargo bench --manifest-path benches-peers/Cargo.toml --bench oneshot
//! KEEL_BENCH_COUNTS=2000 KEEL_BENCH_LIBS=keel cargo bench --manifest-path benches-peers/Cargo.toml
//! ```
//!
//! Environment: `KEEL_BENCH_COUNTS` (comma-separated, default `2000,20000`), `KEEL_BENCH_LIBS`
//! (`keel`, `apalis`; default both, keel first), `KEEL_BENCH_IN_FLIGHT` (keel's enqueues in
//! flight at once, default 256), `KEEL_BENCH_DIR` (where the stores go;
//! default cargo's `CARGO_TARGET_TMPDIR`, on the target directory's filesystem, not a tmpfs on
//! which an fsync costs nothing).
//!
//! Each case runs in a fresh child process (this binary with `--child LIB N`), so that its
//! CPU time and peak RSS are its own. The clock runs from the first enqueue to the moment the
//! last run is known **recorded done**:
//!
//! - **keel**: N one-shot jobs (`ScheduleSpec::Once` at the current time, kind `work`) added
//!   through `RuntimeHandle::add_job`, each answered once durable, up to 256 in flight
//!   (`KEEL_BENCH_IN_FLIGHT`). The
//!   handler counts and returns `Outcome::ok()`. Done when the handler has run N times and the
//!   scheduler holds no run in memory (`Scheduler::runs()` keeps a finished run only until its
//!   final record is durable; `RuntimeHandle::call` answers once durable). keel-store-fs with
//!   its defaults: `fsync` on.
//! - **apalis**: N tasks pushed with `push_bulk` (its bulk insert) to an `SqliteStorage` (the README's setup:
//!   `SqliteStorage::setup` runs the migrations), one worker with apalis's defaults. The
//!   handler counts and returns `Ok(())`. Done when the handler has run N times and
//!   `SELECT COUNT(*) FROM Jobs WHERE status = 'Done'` is N. `setup` sets `synchronous = OFF`
//!   on the connection it uses; the pool the worker and the counts use is opened afterwards
//!   with WAL and `synchronous = FULL` on every connection, so that a task acknowledged done
//!   survives a power loss, as keel's runs do.
//!
//! Under `cargo test --benches` (no `--bench` flag) it runs each case once with 50 runs.

// A bench is a measuring tool: a broken setup should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_sqlite::{SqliteConnectOptions, SqlitePool, SqliteStorage};
use keel_core::{JobId, JobSpec, Outcome, ScheduleSpec, Store};
use keel_runtime::{AttemptContext, Runtime};
use keel_store_fs::FsStore;
use sqlx::sqlite::{SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// keel's enqueues in flight at once by default (a sliding window, as a bulk import would);
/// `KEEL_BENCH_IN_FLIGHT=1` enqueues one at a time, each waiting for its own fsync.
const IN_FLIGHT: usize = 256;

/// How often the end condition is polled.
const POLL: Duration = Duration::from_millis(2);

/// A case gives up after this long (apalis at 20 000 tasks takes minutes on this machine).
const GIVE_UP: Duration = Duration::from_secs(600);

/// Handler runs in this process.
static HANDLED: AtomicU64 = AtomicU64::new(0);

fn main() {
    let args: Vec<String> = env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let lib = args[at + 1].clone();
        let count: u64 = args[at + 2].parse().unwrap();
        let dir = PathBuf::from(&args[at + 3]);
        return child(&lib, count, &dir);
    }
    let bench = args.iter().any(|a| a == "--bench");
    let counts: Vec<u64> = if bench {
        env::var("KEEL_BENCH_COUNTS")
            .unwrap_or_else(|_| "2000,20000".to_string())
            .split(',')
            .map(|n| n.trim().parse().unwrap())
            .collect()
    } else {
        vec![50]
    };
    let libs: Vec<String> = env::var("KEEL_BENCH_LIBS")
        .unwrap_or_else(|_| "keel,apalis".to_string())
        .split(',')
        .map(|l| l.trim().to_string())
        .collect();
    let base = env::var_os("KEEL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    println!("# durable one-shot runs, end to end (enqueue → handler → recorded done)\n");
    println!("stores under {}\n", base.display());
    println!("| library | runs | enqueue all | all recorded done | runs/s | CPU µs/run | peak RSS | load average at start |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for &count in &counts {
        for lib in &libs {
            let dir = base.join(format!("oneshot-{lib}-{count}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let load: Vec<&str> = load.split_whitespace().take(3).collect();
            let out = Command::new(env::current_exe().unwrap())
                .args(["--child", lib, &count.to_string(), dir.to_str().unwrap()])
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
                eprintln!(
                    "{lib} {count}: no result\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                continue;
            };
            let f: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap())
                .collect();
            let (enqueue_s, total_s, cpu_s, rss_kib) = (f[0], f[1], f[2], f[3]);
            let label = match (lib.as_str(), env::var("KEEL_BENCH_IN_FLIGHT")) {
                ("keel", Ok(n)) => format!("keel ({} in flight)", n.trim()),
                ("keel", Err(_)) => format!("keel ({IN_FLIGHT} in flight)"),
                _ => "apalis + apalis-sqlite".to_string(),
            };
            println!(
                "| {label} | {count} | {enqueue_s:.2} s | {total_s:.2} s | {:.0} | {:.0} | {:.0} MiB | {} |",
                count as f64 / total_s,
                cpu_s * 1e6 / count as f64,
                rss_kib / 1024.0,
                load.join(" "),
            );
        }
    }
}

/// One case, in its own process: prints `RESULT enqueue_s total_s cpu_s peak_rss_kib`.
fn child(lib: &str, count: u64, dir: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cpu_before = process_cpu_s();
    let (enqueue, total) = match lib {
        "keel" => runtime.block_on(keel(count, dir)),
        "apalis" => runtime.block_on(apalis(count, dir)),
        other => panic!("unknown library {other:?} (keel, apalis)"),
    };
    let cpu = process_cpu_s() - cpu_before;
    println!(
        "RESULT {} {} {cpu} {}",
        enqueue.as_secs_f64(),
        total.as_secs_f64(),
        peak_rss_kib()
    );
    // Neither library's background tasks need to finish: the process ends here.
    std::process::exit(0);
}

async fn keel(count: u64, dir: &Path) -> (Duration, Duration) {
    let store: Arc<dyn Store> = Arc::new(FsStore::open(dir).unwrap());
    let runtime = Runtime::builder(store)
        .handler("work", |_ctx: AttemptContext| async {
            HANDLED.fetch_add(1, Ordering::Relaxed);
            Outcome::ok()
        })
        .start()
        .await
        .unwrap();
    let handle = runtime.handle();
    let started = Instant::now();
    let in_flight: usize =
        env::var("KEEL_BENCH_IN_FLIGHT").map_or(IN_FLIGHT, |n| n.trim().parse().unwrap());
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..count {
        let handle = handle.clone();
        pending.spawn(async move {
            let id = JobId::new(&format!("once-{i:07}")).unwrap();
            let spec = JobSpec::new(id, "work", ScheduleSpec::once(handle.now()));
            handle.add_job(spec).await
        });
        while pending.len() >= in_flight {
            pending.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(added) = pending.join_next().await {
        added.unwrap().unwrap();
    }
    let enqueued = started.elapsed();
    loop {
        if HANDLED.load(Ordering::Relaxed) >= count {
            // Answers once every change so far is durable: no run left means every run's
            // final record is on disk.
            let left = handle.call(|core, _| core.runs().count()).await.unwrap();
            if left == 0 {
                break;
            }
        }
        assert!(started.elapsed() < GIVE_UP, "keel did not finish");
        tokio::time::sleep(POLL).await;
    }
    (enqueued, started.elapsed())
}

async fn apalis(count: u64, dir: &Path) -> (Duration, Duration) {
    let path = dir.join("apalis.sqlite3");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    // The migrations, as the README sets up (this connection gets `synchronous = OFF`).
    let setup = SqlitePool::connect_with(options.clone()).await.unwrap();
    SqliteStorage::<()>::setup(&setup).await.unwrap();
    setup.close().await;
    // Every connection of the pool the worker uses: fsync at each commit.
    let pool = SqlitePoolOptions::new()
        .connect_with(options.synchronous(SqliteSynchronous::Full))
        .await
        .unwrap();
    let mut backend = SqliteStorage::<u64>::new(&pool);
    let started = Instant::now();
    backend.push_bulk((0..count).collect()).await.unwrap();
    let enqueued = started.elapsed();
    async fn work(_task: u64) -> Result<(), BoxDynError> {
        HANDLED.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    let worker = WorkerBuilder::new("bench").backend(backend).build(work);
    tokio::spawn(async move { worker.run().await });
    loop {
        if HANDLED.load(Ordering::Relaxed) >= count {
            let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM Jobs WHERE status = 'Done'")
                .fetch_one(&pool)
                .await
                .unwrap();
            if done as u64 >= count {
                break;
            }
        }
        assert!(started.elapsed() < GIVE_UP, "apalis did not finish");
        tokio::time::sleep(POLL).await;
    }
    (enqueued, started.elapsed())
}

/// This process's user + system CPU time (`/proc/self/stat`, clock ticks of 10 ms).
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the whole line (utime, stime) are 11 and 12 after the `)`.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident memory of this process (`VmHWM`), KiB.
fn peak_rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

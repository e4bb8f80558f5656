//! Adding jobs through the runtime: how long N `RuntimeHandle::add_job` calls take, each
//! answered once its job is durable, at 10k, 100k and 1M jobs, beside the floor (the core
//! alone, no store, no runtime) and tokio-cron-scheduler in the same run.
//!
//! ```text
//! cargo bench -p keel-runtime --bench adding                   # 10k, 100k, 1M
//! KEEL_BENCH_JOBS=10000,100000 cargo bench -p keel-runtime --bench adding
//! KEEL_BENCH_LIBS=keel-sync cargo bench -p keel-runtime --bench adding
//! ```
//!
//! Each case runs in a fresh child process (this binary re-executed with `--child`), so one
//! case's heap never weighs on the next and peak memory (`VmHWM`) is the case's own. Cases:
//!
//! - `core`: `Scheduler::add_job` N times, then every batch acknowledged at once: the floor,
//!   what the state machine costs with no I/O and no runtime.
//! - `keel-mem`: the runtime over the testkit's in-memory model store: what the driver adds.
//!   Only up to `KEEL_BENCH_MEM_MAX` jobs (default 100 000): the model store checks each
//!   history prune by walking every run it holds, which is right for a test oracle and
//!   quadratic once the jobs added start firing.
//! - `keel-sync`: the runtime over keel-store-fs with `fsync` on, the daemon's setting.
//! - `tcs`: tokio-cron-scheduler 0.15.1, in memory, one `add` at a time (its job-creation
//!   channel drops additions that overrun it); only up to `KEEL_BENCH_TCS_MAX` jobs
//!   (default 100 000).
//!
//! After the adds, the runtime cases also measure how long a command waits behind a listing of
//! every job (`RuntimeHandle::jobs`, what the daemon's job list and console ask for): the
//! listing is sent, then a cheap command right behind it, whose answer takes as long as the
//! driver is busy with the listing's first step (all of it when a listing was one step; a page
//! since listings are taken in pages). Meanwhile no slot fires and no write is acknowledged.
//! Also the time the whole listing takes its caller, and how long a write (one more
//! `add_job`) takes while another thread reads the whole store (`Store::read`, what
//! `keel doctor` and an active-runs listing ask for). The median of five each.
//!
//! The runtime cases keep up to `KEEL_BENCH_IN_FLIGHT` adds in flight (default 2,048): a
//! bulk import's shape, where many commands wait for durability at once. Jobs are hourly,
//! `"{i % 60} {i / 60 % 60} * * * *"` in UTC, so those added first fire while the rest are
//! added (1M jobs fire 278 times a second). Without `--bench` (under
//! `cargo test --benches`) it runs every case with 2,000 jobs as a smoke test.

// A bench is a measuring tool: a broken setup should stop it loudly, so `unwrap` is fine here.
#![allow(clippy::unwrap_used)]

use std::env;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{
    drive, Config, JobId, JobSpec, Outcome, ScheduleSpec, Scheduler, Store, Timestamp,
};
use keel_runtime::{AttemptContext, Runtime};
use keel_store_fs::{FsOptions, FsStore};
use keel_testkit::SharedMemStore;

const CASES: [&str; 4] = ["core", "keel-mem", "keel-sync", "tcs"];

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let (case, jobs, dir) = (&args[1], args[2].parse().unwrap(), PathBuf::from(&args[3]));
        let in_flight = env_number("KEEL_BENCH_IN_FLIGHT", 2_048) as usize;
        let (setup, listing) = run_case(case, jobs, &dir, in_flight);
        let listing = listing.map_or_else(
            || "- - -".to_owned(),
            |(wait, took, write)| {
                format!(
                    "{} {} {}",
                    wait.as_micros(),
                    took.as_micros(),
                    write.as_micros()
                )
            },
        );
        println!(
            "KEEL_RESULT {} {} {listing}",
            setup.as_micros(),
            peak_rss_kib()
        );
        // Dropping a million jobs measures nothing: leave at once.
        std::process::exit(0);
    }
    let bench = args.iter().any(|a| a == "--bench");
    let jobs = if bench || env::var_os("KEEL_BENCH_JOBS").is_some() {
        env_list("KEEL_BENCH_JOBS", "10000,100000,1000000")
    } else {
        vec![2_000]
    };
    if bench && cfg!(debug_assertions) {
        eprintln!("warning: built without optimisations; use `cargo bench`");
    }
    let cases: Vec<String> = env::var("KEEL_BENCH_LIBS")
        .map(|s| s.split(',').map(|c| c.trim().to_owned()).collect())
        .unwrap_or_else(|_| CASES.iter().map(|c| (*c).to_owned()).collect());
    let tcs_max = env_number("KEEL_BENCH_TCS_MAX", 100_000);
    let mem_max = env_number("KEEL_BENCH_MEM_MAX", 100_000);
    let dir = env::var_os("KEEL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    println!("# adding jobs through the runtime (each add answered once durable)");
    println!();
    println!("| jobs | case | time | adds/s | µs per add | peak RSS | a command's wait behind a job listing | the listing | a write during a store read |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &jobs {
        for case in &cases {
            if (case == "tcs" && n > tcs_max) || (case == "keel-mem" && n > mem_max) {
                continue;
            }
            eprintln!("running {case} with {n} jobs...");
            let (setup, rss_kib, listing) = run_child(case, n, &dir);
            let secs = setup.as_secs_f64();
            let ms = |d: Option<Duration>| {
                d.map_or_else(
                    || "–".to_owned(),
                    |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
                )
            };
            let (wait, took) = (ms(listing.map(|l| l.0)), ms(listing.map(|l| l.1)));
            let write = ms(listing.map(|l| l.2));
            println!(
                "| {n} | {case} | {secs:.2} s | {:.0} | {:.1} | {} MiB | {wait} | {took} | {write} |",
                n as f64 / secs,
                secs * 1e6 / n as f64,
                rss_kib / 1024
            );
        }
    }
    if !bench {
        println!("adding bench smoke test: ok (run `cargo bench -p keel-runtime --bench adding` to measure)");
    }
}

/// A command's wait behind a listing of every job, the listing's own time, and a write's
/// time during a read of the whole store.
type Listing = (Duration, Duration, Duration);

fn run_child(case: &str, jobs: u64, dir: &std::path::Path) -> (Duration, u64, Option<Listing>) {
    let out = Command::new(env::current_exe().unwrap())
        .args([
            "--child",
            case,
            &jobs.to_string(),
            &dir.display().to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find(|l| l.starts_with("KEEL_RESULT ")) else {
        panic!(
            "{case} with {jobs} jobs failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
    let micros = |field: &str| field.parse().ok().map(Duration::from_micros);
    let listing = micros(fields[2])
        .zip(micros(fields[3]))
        .zip(micros(fields[4]))
        .map(|((wait, took), write)| (wait, took, write));
    (
        micros(fields[0]).unwrap(),
        fields[1].parse().unwrap(),
        listing,
    )
}

fn spec(i: u64) -> JobSpec {
    JobSpec::new(
        JobId::new(&format!("job-{i:07}")).unwrap(),
        "tick",
        ScheduleSpec::Cron {
            expr: expr(i).into(),
            zone: "UTC".into(),
        },
    )
}

/// Once an hour, at a second of the hour spread by `i`: jobs fire while later ones are still
/// being added, at 278 firings/s with a million jobs (the firing bench's once-a-minute jobs
/// would be 16,667/s there, a firing load, not an import).
fn expr(i: u64) -> String {
    format!("{} {} * * * *", i % 60, (i / 60) % 60)
}

/// Adds `jobs` jobs and returns how long until the last one was durable, and for the runtime
/// cases how long a command then waits behind a listing of every job.
fn run_case(
    case: &str,
    jobs: u64,
    dir: &std::path::Path,
    in_flight: usize,
) -> (Duration, Option<Listing>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match case {
        "core" => {
            let now = Timestamp(1_800_000_000_000);
            let started = Instant::now();
            let mut keel = Scheduler::new(Config::default(), 7, now);
            for i in 0..jobs {
                keel.add_job(now, spec(i)).unwrap();
            }
            drive::drain(&mut keel, now, drive::acknowledge, |_, _, _| {}).unwrap();
            (started.elapsed(), None)
        }
        "keel-mem" => {
            let store: Arc<dyn Store> = Arc::new(SharedMemStore::new());
            runtime.block_on(add_through_runtime(store, jobs, in_flight))
        }
        "keel-sync" => {
            let dir = dir.join(format!("adding-{}-{jobs}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let store = FsStore::open_with(&dir, FsOptions::default()).unwrap();
            let took = runtime.block_on(add_through_runtime(Arc::new(store), jobs, in_flight));
            let _ = std::fs::remove_dir_all(&dir);
            took
        }
        "tcs" => runtime.block_on(async {
            use tokio_cron_scheduler::{Job, JobScheduler};
            let scheduler = JobScheduler::new().await.unwrap();
            let started = Instant::now();
            for i in 0..jobs {
                let job = Job::new_async(expr(i), |_, _| Box::pin(async {})).unwrap();
                scheduler.add(job).await.unwrap();
            }
            (started.elapsed(), None)
        }),
        other => panic!("unknown case {other:?} (one of {CASES:?})"),
    }
}

async fn add_through_runtime(
    store: Arc<dyn Store>,
    jobs: u64,
    in_flight: usize,
) -> (Duration, Option<Listing>) {
    let keel = Runtime::builder(Arc::clone(&store))
        .handler("tick", |_ctx: AttemptContext| async { Outcome::ok() })
        .start()
        .await
        .unwrap();
    let handle = keel.handle();
    let started = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..jobs {
        let handle = handle.clone();
        pending.spawn(async move { handle.add_job(spec(i)).await });
        // A sliding window: another add starts as soon as one is answered.
        while pending.len() >= in_flight {
            pending.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(added) = pending.join_next().await {
        added.unwrap().unwrap();
    }
    let took = started.elapsed();
    let (mut waits, mut listings) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let mut listing = std::pin::pin!(handle.jobs());
        // The first poll sends the listing to the driver; the probe queues behind it.
        std::future::poll_fn(|cx| {
            assert!(listing.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        let sent = Instant::now();
        handle.driver_stats().await.unwrap();
        waits.push(sent.elapsed());
        assert_eq!(listing.await.unwrap().len() as u64, jobs);
        listings.push(sent.elapsed());
    }
    let mut writes = Vec::new();
    for extra in 0..5 {
        let reader = Arc::clone(&store);
        let reading = std::thread::spawn(move || reader.read().unwrap().jobs.len() as u64);
        // Lets the reader reach the store first: a bench orders its two threads by waiting.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sent = Instant::now();
        handle.add_job(spec(jobs + extra)).await.unwrap();
        writes.push(sent.elapsed());
        assert!(reading.join().unwrap() >= jobs);
    }
    waits.sort();
    listings.sort();
    writes.sort();
    (took, Some((waits[2], listings[2], writes[2])))
}

/// Peak resident memory of this process (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

fn env_number(name: &str, default: u64) -> u64 {
    env::var(name).map_or(default, |s| {
        s.replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
    })
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| {
            s.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        })
        .collect()
}

//! keel-store-postgres benchmark, beside the database's own floor measured in the same run.
//!
//! ```text
//! cargo bench -p keel-store-postgres --bench postgres
//! ```
//!
//! A `harness = false` binary that prints a table. It starts a throwaway cluster with the test
//! support (`tests/common/mod.rs`: the installed server binaries, a Unix socket, fsync on; as
//! root the server runs as the `postgres` user), then:
//!
//! 1. **Floor**: `pgbench -i` and `pgbench -N -c 1 -T 5` from the same install against the same
//!    cluster: single-client commits per second (each a few statements and one WAL flush),
//!    before keel's timed phase and again right after it (a shared disk's fsync rate drifts).
//! 2. **keel**: a real `keel_core::Scheduler` on a `PgStore`, every batch applied (one
//!    transaction each) before it is acknowledged, as the daemon does. 10,000 cron jobs, each
//!    firing once an hour (`"{sec} {min} * * * *"`, about 2.8 per one-second slot), driven
//!    slot by slot for 5 s of wall time, every attempt succeeding at once: durable batches/s,
//!    records (transitions) per second and the mean records per batch. Then slots whose
//!    attempts are left running (about 1,000 active runs), `restore` (10,000 jobs, the active
//!    runs), and history pages of 50 runs.
//!
//! The target (issue 15): transitions/s at least half of (pgbench commits/s × mean batch
//! size), with the mean of the two floors. Only with a throwaway cluster (the floor must come from the server measured);
//! without `--bench` (`cargo test --benches`) it does nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use keel_core::{
    drive, Effect, JobId, JobSpec, Outcome, RunQuery, ScheduleSpec, Scheduler, StateName, Store,
    Timestamp,
};

const JOBS: usize = 10_000;
/// How long each timed phase runs (as long as pgbench's `-T 5`).
const PHASE: Duration = Duration::from_secs(5);
/// Attempts left running for the restore measurement.
const ACTIVE: usize = 1_000;
const START: &str = "2026-01-01T00:00:00Z";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("keel-store-postgres bench: run it with `cargo bench`");
        return;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: built without optimisations; use `cargo bench`");
    }
    let load_before = loadavg();
    let db = common::TestDb::new().expect("a Postgres (see tests/common/mod.rs)");

    // The floor: pgbench's single-client commit rate on this very cluster.
    db.pgbench(&["-i", "-q"])
        .expect("a throwaway cluster: the floor must be measured on the server keel uses");
    let (version, floor_before) = pgbench(&db);

    // keel: a scheduler on the store, every batch durable before it is acknowledged.
    let store = db.open();
    let start = Timestamp::parse_rfc3339(START).unwrap();
    let snapshot = store.restore().unwrap();
    let mut s = Scheduler::restore(Default::default(), 42, start, snapshot);
    let added = Instant::now();
    for i in 0..JOBS {
        s.add_job(start, spec(i)).unwrap();
    }
    let write = |b: &keel_core::Batch| store.apply(b);
    let setup = drive::drain(&mut s, start, write, |_, _, _| {}).unwrap();
    let add_time = added.elapsed();

    // Firings, every attempt succeeding at once.
    let mut now;
    let mut fired = Firing::default();
    let began = Instant::now();
    while began.elapsed() < PHASE {
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        fired.add(&mut s, now, &store, true);
    }
    let fire_wall = began.elapsed();
    // The floor again right after keel's phase: a shared disk's fsync rate drifts, and the
    // target is judged against the mean of the two.
    let (_, floor_after) = pgbench(&db);
    let floor = f64::midpoint(floor_before, floor_after);

    // Slots whose attempts are left running: active runs for the restore.
    let mut left = Firing::default();
    while left.started < ACTIVE as u64 {
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        left.add(&mut s, now, &store, false);
    }

    // restore: 10k jobs and the active runs, each read whole (median of 5).
    let mut restores = Vec::new();
    let mut active = 0;
    for _ in 0..5 {
        let reader = db.open();
        let t = Instant::now();
        let snapshot = reader.restore().unwrap();
        restores.push(t.elapsed());
        assert_eq!(snapshot.jobs.len(), JOBS);
        active = snapshot.runs.len();
    }
    // Fewer than `ACTIVE`: the leases of the earliest ran out as the slots advanced (30 s each),
    // and the watchdog ended those runs.
    assert!(active > 0, "no active runs");
    // The restores above deposed `store`'s writer; reads need no writer.

    // History: the newest page of 50, a page of one job, a page 1,000 runs deep (median of 50).
    let newest = RunQuery {
        limit: 50,
        ..RunQuery::default()
    };
    let deep_cursor = store
        .runs(&RunQuery {
            limit: 1000,
            ..RunQuery::default()
        })
        .unwrap()
        .next;
    let deep = RunQuery {
        limit: 50,
        before: deep_cursor,
        ..RunQuery::default()
    };
    let one_job = RunQuery {
        job: Some(JobId::new("job-0000007").unwrap()),
        limit: 50,
        ..RunQuery::default()
    };
    let succeeded = RunQuery {
        state: Some(StateName::Succeeded),
        limit: 50,
        ..RunQuery::default()
    };
    // The median time of 50 reads of `query`'s page, and how many runs the page held.
    let page = |query: &RunQuery| {
        let mut len = 0;
        let mut times: Vec<Duration> = (0..50)
            .map(|_| {
                let t = Instant::now();
                let page = store.runs(query).unwrap();
                let took = t.elapsed();
                len = page.runs.len();
                assert!(len <= 50);
                took
            })
            .collect();
        times.sort();
        (times[times.len() / 2], len)
    };
    let (t_newest, t_deep, t_job, t_state) =
        (page(&newest), page(&deep), page(&one_job), page(&succeeded));
    let total_runs = fired.started + left.started;
    restores.sort();
    let load_after = loadavg();

    // The table.
    let batches_s = fired.batches as f64 / fired.store.as_secs_f64();
    let records_s = fired.records as f64 / fired.store.as_secs_f64();
    let mean_batch = fired.records as f64 / fired.batches as f64;
    let target = floor * mean_batch / 2.0;
    println!("# keel-store-postgres bench");
    println!();
    println!(
        "{version}; throwaway cluster on a Unix socket (fsync on); {} cores ({}); load average \
         {load_before} before, {load_after} after",
        cores(),
        cpu_model()
    );
    println!();
    println!("| what | figure |");
    println!("|---|---|");
    println!(
        "| floor: `pgbench -N -c 1 -T 5` commits/s, before / after keel's phase (mean) | \
         {floor_before:.0} / {floor_after:.0} ({floor:.0}) |"
    );
    println!(
        "| setup: {JOBS} jobs added, {} batches of {} records (largest {}) | {:.2} s |",
        setup.batches,
        setup.records,
        setup.largest_batch,
        add_time.as_secs_f64()
    );
    println!(
        "| firings driven (5 s) | {} slots, {} runs, {} batches, {} records |",
        fired.ticks, fired.started, fired.batches, fired.records
    );
    println!("| mean records per batch (a firing's batch) | {mean_batch:.1} |");
    println!(
        "| durable batches/s (store time; wall {:.0}) | {batches_s:.0} |",
        fired.batches as f64 / fire_wall.as_secs_f64()
    );
    println!(
        "| durable transitions (records)/s (store time; wall {:.0}) | {records_s:.0} |",
        fired.records as f64 / fire_wall.as_secs_f64()
    );
    println!(
        "| mean batch latency | {:.2} ms |",
        fired.store.as_secs_f64() * 1000.0 / fired.batches as f64
    );
    println!(
        "| target: transitions/s >= floor × mean batch / 2 = {target:.0} | {} |",
        if records_s >= target {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "| restore: {JOBS} jobs, {active} active runs ({total_runs} runs stored), median of 5 | {:.1} ms |",
        ms(restores[2])
    );
    for (what, (took, len)) in [
        ("newest page", t_newest),
        ("a page 1,000 runs deep", t_deep),
        ("one job's page", t_job),
        ("a page of succeeded runs", t_state),
    ] {
        println!(
            "| history: {what} ({len} runs), median of 50 | {:.2} ms |",
            ms(took)
        );
    }
    println!("| claims/s through the HTTP API, 8 workers | `cargo bench -p keel-cli --bench claims_postgres` |");
}

/// What a stretch of firings wrote.
#[derive(Default)]
struct Firing {
    ticks: u64,
    batches: u64,
    records: u64,
    started: u64,
    /// Time inside `Store::apply`.
    store: Duration,
}

impl Firing {
    /// Drains the effects of one slot: every batch applied to `store` before it is
    /// acknowledged; each started attempt succeeds at once if `finish`, else stays running.
    fn add(&mut self, s: &mut Scheduler, now: Timestamp, store: &impl Store, finish: bool) {
        let mut in_store = Duration::ZERO;
        let mut started = 0;
        let drained = drive::drain(
            s,
            now,
            |batch| {
                let t = Instant::now();
                let done = store.apply(batch);
                in_store += t.elapsed();
                done
            },
            |s, now, effect| {
                if let Effect::StartAttempt(a) = effect {
                    started += 1;
                    if finish {
                        s.handle_outcome(now, a.run, a.lease.token, Outcome::ok())
                            .unwrap();
                    }
                }
            },
        )
        .unwrap();
        // Outcomes handled inside the drain are written by it too (the loop drains until
        // nothing is left).
        self.ticks += 1;
        self.batches += drained.batches;
        self.records += drained.records;
        self.started += started;
        self.store += in_store;
    }
}

/// `pgbench -N -c 1 -T 5` on the cluster: its version line and commits per second.
fn pgbench(db: &common::TestDb) -> (String, f64) {
    let out = db.pgbench(&["-N", "-c", "1", "-T", "5"]).unwrap();
    let version = out
        .lines()
        .find(|l| l.starts_with("pgbench ("))
        .unwrap_or("pgbench (version unknown)")
        .to_string();
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{out}"));
    (version, tps)
}

fn spec(i: usize) -> JobSpec {
    let id = JobId::new(&format!("job-{i:07}")).unwrap();
    let schedule = ScheduleSpec::Cron {
        expr: format!("{} {} * * * *", i % 60, (i / 60) % 60).into(),
        zone: "UTC".into(),
    };
    JobSpec::new(id, "report", schedule)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

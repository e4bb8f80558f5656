//! Claims per second through the HTTP API, 8 worker threads on loopback, against a
//! `keel run --store postgres` daemon (issue 15's target: at least 1,000/s).
//!
//! ```text
//! cargo bench -p keel-cli --bench claims_postgres
//! ```
//!
//! A `harness = false` binary: a throwaway cluster from store-postgres's test support, one
//! daemon (the release build of `keel`) leading it with `--http 127.0.0.1:0`, `JOBS` external
//! jobs with overlap `allow`, each triggered `PER_JOB` times (queued runs), then 8 threads that
//! each loop claim → complete until a claim answers 204. A claim and a completion are each a
//! durable batch. Without `--bench` (`cargo test --benches`) it does nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

const JOBS: usize = 20;
/// Triggers per job (keel allows 100 active runs per job).
const PER_JOB: usize = 100;
const WORKERS: usize = 8;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("keel-cli claims bench: run it with `cargo bench`");
        return;
    }
    let load_before = load();
    let db = pg::TestDb::new().expect("a Postgres (see store-postgres/tests/common/mod.rs)");
    let place = common::Place::new("claims-bench");
    let config = place.config("[daemon]\nshutdown_budget = \"2s\"\n");
    let url = db.url();
    let mut daemon = place.spawn_daemon(
        &[
            "--store",
            "postgres",
            "--database-url",
            &url,
            "run",
            "--config",
            config.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ],
        &[("KEEL_HOSTNAME", "bench")],
    );
    daemon.wait_for(&["ready: postgres store"]);
    let base = daemon.http_url();
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let setup = Instant::now();
    for j in 0..JOBS {
        let job = json!({
            "name": format!("q{j}"),
            "cron": "0 0 0 1 1 *",
            "worker_kind": "bench",
            "overlap": "allow",
        });
        let r = http
            .post(format!("{base}/api/v1/jobs"))
            .json(&job)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
    }
    for _ in 0..PER_JOB {
        for j in 0..JOBS {
            let r = http
                .post(format!("{base}/api/v1/jobs/q{j}/trigger"))
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
        }
    }
    let setup = setup.elapsed();

    let claimed = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let threads: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (http, base, claimed) = (http.clone(), base.clone(), Arc::clone(&claimed));
            std::thread::spawn(move || loop {
                let r = http
                    .post(format!("{base}/api/v1/claims"))
                    .json(&json!({"worker": format!("w{w}"), "kinds": ["bench"]}))
                    .send()
                    .unwrap();
                if r.status() == StatusCode::NO_CONTENT {
                    return;
                }
                assert_eq!(r.status(), StatusCode::OK);
                let attempt: serde_json::Value = r.json().unwrap();
                claimed.fetch_add(1, Ordering::SeqCst);
                let run = &attempt["run"];
                let run = run
                    .as_u64()
                    .map(|n| format!("run-{n}"))
                    .or_else(|| run.as_str().map(str::to_string))
                    .unwrap();
                let done = http
                    .post(format!("{base}/api/v1/runs/{run}/complete"))
                    .json(&json!({"token": attempt["token"]}))
                    .send()
                    .unwrap();
                assert!(done.status().is_success(), "{}", done.text().unwrap());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = began.elapsed();
    let claims = claimed.load(Ordering::SeqCst);
    assert_eq!(claims, (JOBS * PER_JOB) as u64);
    daemon.stop();
    let rate = claims as f64 / took.as_secs_f64();

    println!("# keel-cli claims bench (daemon on Postgres, HTTP API on loopback)");
    println!();
    println!(
        "{} cores; load average {load_before} before, {} after",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );
    println!();
    println!("| what | figure |");
    println!("|---|---|");
    println!(
        "| setup: {JOBS} jobs, {} runs queued through the API | {:.2} s |",
        JOBS * PER_JOB,
        setup.as_secs_f64()
    );
    println!(
        "| {WORKERS} workers: {claims} claims, each completed, in | {:.2} s |",
        took.as_secs_f64()
    );
    println!("| claims/s (claim + complete per run) | {rate:.0} |");
    println!(
        "| target: >= 1,000 claims/s | {} |",
        if rate >= 1000.0 { "met" } else { "NOT met" }
    );
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

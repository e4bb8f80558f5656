//! Cross-process safety: several real processes run keel schedulers on one data directory and
//! contend for the same runs. Each round a process restores from the store (which deposes the
//! others), claims queued runs for its worker and completes them. The store decides at write
//! time; afterwards no token was granted twice and every completion a process saw acknowledged
//! is what the store holds.
//!
//! The children are this same test binary, started again with `KEEL_PROCESS_CHILD`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use keel_core::{
    drive, AuditQuery, Conflict, Effect, FencingToken, JobId, JobSpec, Outcome, RunId, RunQuery,
    RunState, ScheduleSpec, Scheduler, Store, StoreError, Timestamp, WorkerId,
};
use keel_harness::TempDir;
use keel_store_fs::FsStore;

const CHILD_ENV: &str = "KEEL_PROCESS_CHILD";
const PROCESSES: usize = 3;
const ROUNDS: usize = 25;
const JOBS: usize = 40;

fn wall() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    Timestamp(i64::try_from(ms).unwrap())
}

/// Sends every pending batch to the store (`keel_core::drive`). Returns false if the store
/// refused one (this process was deposed): its scheduler must be dropped and restored.
fn pump(
    store: &FsStore,
    scheduler: &mut Scheduler,
    out: &mut impl Write,
    started: &mut Vec<(RunId, FencingToken)>,
) -> bool {
    let granted = |_: &mut Scheduler, _, effect| {
        if let Effect::StartAttempt(start) = effect {
            writeln!(out, "granted {} {}", start.run.0, start.lease.token.0).unwrap();
            started.push((start.run, start.lease.token));
        }
    };
    let drained = drive::drain(scheduler, wall(), |b| store.apply(b), granted);
    match drained {
        Ok(_) => true,
        Err(StoreError::Conflict(Conflict::Deposed { .. })) => {
            writeln!(out, "deposed").unwrap();
            false
        }
        Err(e) => {
            writeln!(out, "refused {e}").unwrap();
            false
        }
    }
}

fn child(dir: &Path, name: &str) {
    let store = FsStore::open(dir).unwrap();
    let worker = WorkerId::new(name).unwrap();
    let mut out = std::io::stdout().lock();
    for round in 0..ROUNDS {
        let snapshot = store.restore().unwrap();
        let mut scheduler = Scheduler::restore(Default::default(), round as u64, wall(), snapshot);
        let mut started = Vec::new();
        if !pump(&store, &mut scheduler, &mut out, &mut started) {
            continue;
        }
        for _ in 0..2 {
            let _ = scheduler.claim(wall(), &worker, &["remote"]);
        }
        if !pump(&store, &mut scheduler, &mut out, &mut started) {
            continue;
        }
        for (run, token) in started.drain(..) {
            let done = Outcome::Success {
                summary: Some(format!("{name} with {}", token.0)),
                artifacts: Default::default(),
            };
            if scheduler.handle_outcome(wall(), run, token, done).is_err() {
                continue;
            }
            let mut none = Vec::new();
            if !pump(&store, &mut scheduler, &mut out, &mut none) {
                break;
            }
            writeln!(out, "completed {} {}", run.0, token.0).unwrap();
        }
        out.flush().unwrap();
    }
    writeln!(out, "done").unwrap();
}

#[test]
fn processes_contending_for_runs_never_share_a_token() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let name = std::env::var("KEEL_PROCESS_NAME").unwrap();
        child(Path::new(&dir), &name);
        return;
    }
    let dir = TempDir::new("keel-processes");
    // Queue JOBS external runs.
    {
        let store = FsStore::open(dir.path()).unwrap();
        let mut scheduler =
            Scheduler::restore(Default::default(), 1, wall(), store.restore().unwrap());
        for i in 0..JOBS {
            let mut spec = JobSpec::new(
                JobId::new(&format!("job-{i}")).unwrap(),
                "remote",
                ScheduleSpec::Once { at: wall() },
            );
            spec.external = true;
            scheduler.add_job(wall(), spec).unwrap();
        }
        scheduler.handle_timeout(wall().plus_ms(1));
        let mut started = Vec::new();
        assert!(pump(
            &store,
            &mut scheduler,
            &mut std::io::sink(),
            &mut started
        ));
    }

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "processes_contending_for_runs_never_share_a_token",
                    "--nocapture",
                ])
                .env(CHILD_ENV, dir.path())
                .env("KEEL_PROCESS_NAME", format!("worker-{i}"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut granted: BTreeMap<u64, (u64, usize)> = BTreeMap::new(); // token -> (run, process)
    let mut completed: Vec<(u64, u64)> = Vec::new();
    let mut deposed = 0;
    for (i, mut child) in children.into_iter().enumerate() {
        let stdout = child.stdout.take().unwrap();
        let mut finished = false;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["granted", run, token] => {
                    let (run, token) = (run.parse().unwrap(), token.parse().unwrap());
                    if let Some(earlier) = granted.insert(token, (run, i)) {
                        panic!(
                            "token {token} granted twice: {earlier:?} and {:?}",
                            (run, i)
                        );
                    }
                }
                ["completed", run, token] => {
                    completed.push((run.parse().unwrap(), token.parse().unwrap()))
                }
                ["deposed"] => deposed += 1,
                ["done"] => finished = true,
                _ => {}
            }
        }
        assert!(child.wait().unwrap().success(), "child {i} failed");
        assert!(finished, "child {i} did not finish");
    }
    assert!(deposed > 0, "the processes never contended");
    assert!(!completed.is_empty(), "no run was ever completed");

    let store = FsStore::open(dir.path()).unwrap();
    for (run, token) in &completed {
        let stored = store.run(RunId(*run)).unwrap().unwrap();
        assert_eq!(stored.state(), RunState::Succeeded, "run {run}");
        let audit = store
            .audit(&AuditQuery {
                run: Some(RunId(*run)),
                ..AuditQuery::default()
            })
            .unwrap();
        let success = audit
            .iter()
            .find(|a| a.new == keel_core::StateName::Succeeded)
            .unwrap();
        assert_eq!(
            success.fencing_token,
            Some(FencingToken(*token)),
            "run {run}: {audit:#?}"
        );
    }
    // No stale write landed: within each run, tokens in the audit trail never go back.
    let runs = store
        .runs(&RunQuery {
            limit: 10_000,
            ..RunQuery::default()
        })
        .unwrap();
    let mut succeeded = BTreeSet::new();
    for run in &runs.runs {
        let audit = store
            .audit(&AuditQuery {
                run: Some(run.id()),
                ..AuditQuery::default()
            })
            .unwrap();
        let tokens: Vec<u64> = audit
            .iter()
            .filter_map(|a| a.fencing_token)
            .map(|t| t.0)
            .collect();
        assert!(
            tokens.windows(2).all(|w| w[0] <= w[1]),
            "{}: tokens {tokens:?}",
            run.id()
        );
        if run.state() == RunState::Succeeded {
            succeeded.insert(run.id().0);
        }
    }
    let completed_runs: BTreeSet<u64> = completed.iter().map(|(r, _)| *r).collect();
    assert!(completed_runs.is_subset(&succeeded));
}

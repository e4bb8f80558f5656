//! Crash tests: a child process writes to a store from several threads and reports every
//! acknowledged batch; the parent kills it (SIGKILL on Unix) at a varying point, reopens the
//! store, and checks that every acknowledged batch is there. The child compacts often, so
//! kills also land inside compactions.
//!
//! A killed process loses nothing the kernel already has, so this exercises the store's own
//! crash windows (interrupted group writes and compactions, the lock released by death), not
//! power loss; every other round also leaves part of a frame at the end of the log, as a
//! write cut short would.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use keel_core::rng::SplitMix64;
use keel_core::{AuditQuery, Record, RunId, RunQuery, Store};
use keel_harness::conformance;
use keel_store_fs::format::{decode_current, frame_bytes};
use keel_store_fs::{FsOptions, FsStore};

const CHILD_DIR: &str = "KEEL_STORE_FS_CRASH_CHILD_DIR";
const THREADS: u64 = 4;

fn options() -> FsOptions {
    FsOptions {
        compact_after_bytes: 64 * 1024,
        compact_at_snapshot_size: false,
        sync: true,
    }
}

/// The child's body; does nothing unless the parent started this process as a child.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let store = FsStore::open_with(&dir, options()).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = &store;
            scope.spawn(move || {
                // Ids are unique across children: each child has its own epoch.
                for i in 0..100_000u64 {
                    let n = t * 1_000_000 + i;
                    let id = (epoch << 32) + n;
                    let job = format!("job-{t}");
                    let records = vec![
                        Record::PutRun(run(id, &job, T0.plus_ms(id))),
                        Record::Audit(audit(id, &job, Some(id))),
                    ];
                    store.apply(&batch(epoch, n, records)).unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {id}").unwrap();
                    out.flush().unwrap();
                }
            });
        }
    });
}

/// This test binary again, running only `crash_child` on `dir`, its output piped.
fn spawn_child(dir: &std::path::Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("crash");
    let mut acked = BTreeSet::new();
    for (round, kill_after) in [1, 5, 40, 150, 17, 300, 3, 90].into_iter().enumerate() {
        let mut child = spawn_child(dir.path());
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut this_round = 0;
        while this_round < kill_after {
            let Some(line) = lines.next() else {
                let output = child.wait_with_output().unwrap();
                panic!(
                    "the child stopped after {this_round} acks: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            };
            if let Some(id) = line.unwrap().strip_prefix("ack ") {
                acked.insert(id.parse::<u64>().unwrap());
                this_round += 1;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Acks already in the pipe count too.
        for line in lines {
            if let Some(id) = line.unwrap().strip_prefix("ack ") {
                acked.insert(id.parse::<u64>().unwrap());
            }
        }

        // A kill rarely cuts a write short (only between pages of a large one); a power loss
        // may. Every other round, leave what that leaves: part of a frame at the end.
        let torn = round % 2 == 1;
        if torn {
            // The committed generation's log: a kill inside a compaction can leave files of
            // a newer generation that `CURRENT` does not name yet (ignored, so a tail torn
            // there would not be seen).
            let current = fs::read(dir.file("CURRENT")).unwrap();
            let newest = decode_current(&current).unwrap().generation;
            let frame = frame_bytes(br#"{"writer":{"epoch":1}}"#).unwrap();
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.file(&format!("log-{newest:016x}")))
                .unwrap();
            log.write_all(&frame[..(kill_after as usize % (frame.len() - 1)) + 1])
                .unwrap();
        }

        let store = FsStore::open_with(dir.path(), options()).unwrap();
        for &id in &acked {
            let run = store.run(RunId(id)).unwrap();
            assert!(
                run.is_some(),
                "acknowledged run {id} is gone after kill at {kill_after}"
            );
        }
        let report = store.recovery();
        // A kill can also cut a write of several pages short (Linux stops between pages).
        let torn_tails = report.torn_tails.len();
        assert!(torn_tails <= 1 && (torn_tails == 1 || !torn), "{report}");
        assert!(
            report.quarantined.is_empty(),
            "a crash is not corruption: {report}"
        );
        assert!(report.snapshot_fallbacks.is_empty(), "{report}");
    }
    assert!(acked.len() >= 606, "{} acks", acked.len());
    assert!(
        dir.entries()
            .iter()
            .any(|name| name.starts_with("snapshot-")),
        "the children compacted: {:?}",
        dir.entries()
    );
}

/// A reader in another process follows the writer through compactions whose snapshots are
/// written in the background: every batch the child acknowledged is visible to the parent's
/// handle at once, and a generation whose snapshot is not written yet is not reported as
/// anything found.
#[test]
fn a_reader_in_another_process_follows_background_compactions() {
    let dir = TempDir::new("crash-follow");
    let reader = FsStore::open_with(dir.path(), options()).unwrap();
    let mut child = spawn_child(dir.path());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut generations = BTreeSet::new();
    let mut seen = 0;
    while seen < 600 {
        let Some(line) = lines.next() else {
            let output = child.wait_with_output().unwrap();
            panic!(
                "the child stopped after {seen} acks: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let Some(id) = line
            .unwrap()
            .strip_prefix("ack ")
            .map(|id| id.parse().unwrap())
        else {
            continue;
        };
        assert!(
            reader.run(RunId(id)).unwrap().is_some(),
            "acknowledged run {id} is not visible to the reader"
        );
        seen += 1;
        let current = fs::read(dir.file("CURRENT")).unwrap();
        generations.insert(decode_current(&current).unwrap().generation);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        generations.len() >= 3,
        "the child compacted while the reader read: {generations:?}"
    );
    assert!(reader.recovery().is_clean(), "{}", reader.recovery());
}

// ---------------------------------------------------------------------------------------------
// Random kill points, one writer thread, 200 kills by default.
//
// The child restores (becoming the writer) and writes batches forever, printing `ack N` after
// batch N is acknowledged; the parent kills it after 0 to 12 acknowledgements (0: while it
// opens and restores). After every kill the store opens, every acknowledged batch is there,
// batches are contiguous, and every batch present is whole. `KEEL_CRASH_ITERATIONS` runs more
// kills, `KEEL_CRASH_SEED` replays a sequence.

const RANDOM_CHILD_ENV: &str = "KEEL_CRASH_CHILD";

/// Compact often, so kills also land in the middle of snapshot writes.
fn small_options() -> FsOptions {
    FsOptions {
        compact_after_bytes: 16 * 1024,
        compact_at_snapshot_size: false,
        ..FsOptions::default()
    }
}

/// Batch `n`: run `n` and its audit records, `1 + n % 5` of them, with every tenth batch large
/// (a wider window for a torn write).
fn records(n: u64) -> Vec<Record> {
    let audits = audit_count(n);
    let job = format!("job-{}", n % 7);
    let mut records = vec![Record::PutRun(conformance::run(n, &job, T0.plus_ms(n)))];
    records.extend(
        (0..audits)
            .map(|k| Record::Audit(conformance::audit_record(n * 1_000 + k, &job, Some(n), T0))),
    );
    records
}

fn audit_count(n: u64) -> u64 {
    if n.is_multiple_of(10) {
        100
    } else {
        1 + n % 5
    }
}

/// The child: write batches until killed.
fn random_child(dir: &Path) -> ! {
    let store = FsStore::open_with(dir, small_options()).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let next = store
        .runs(&RunQuery {
            limit: 1,
            ..RunQuery::default()
        })
        .unwrap()
        .runs
        .first()
        .map_or(1, |r| r.id().0 + 1);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {next}").unwrap();
    out.flush().unwrap();
    for (i, n) in (next..).enumerate() {
        store
            .apply(&conformance::batch(epoch, i as u64, T0, records(n)))
            .unwrap();
        writeln!(out, "ack {n}").unwrap();
        out.flush().unwrap();
    }
    unreachable!("the child writes until it is killed")
}

/// Every acknowledged batch is present; every batch present is whole.
fn verify(dir: &Path, acknowledged: &BTreeSet<u64>, iteration: u64) {
    let store = FsStore::open_with(dir, small_options())
        .unwrap_or_else(|e| panic!("iteration {iteration}: the store does not open: {e}"));
    let report = store.recovery();
    assert!(
        report.quarantined.is_empty(),
        "iteration {iteration}: a crash is not corruption: {report}"
    );
    assert!(
        report.snapshot_fallbacks.is_empty(),
        "iteration {iteration}: {report}"
    );
    let mut runs = BTreeSet::new();
    let mut before = None;
    loop {
        let page = store
            .runs(&RunQuery {
                before,
                limit: 10_000,
                ..RunQuery::default()
            })
            .unwrap();
        runs.extend(page.runs.iter().map(|r| r.id().0));
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let mut audits: BTreeMap<u64, u64> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = store
            .audit(&AuditQuery {
                after,
                limit: 10_000,
                ..AuditQuery::default()
            })
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        for record in &page {
            *audits.entry(record.run.unwrap().0).or_default() += 1;
        }
    }
    for n in acknowledged {
        assert!(
            runs.contains(n),
            "iteration {iteration}: acknowledged batch {n} is lost; recovery: {report:?}"
        );
    }
    // Contiguous: batches are applied in order, so nothing after a gap.
    if let Some(max) = runs.last() {
        assert_eq!(
            runs.len() as u64,
            *max,
            "iteration {iteration}: a batch is missing before {max}"
        );
    }
    for n in &runs {
        assert_eq!(
            audits.get(n).copied().unwrap_or(0),
            audit_count(*n),
            "iteration {iteration}: batch {n} is half-applied"
        );
    }
    assert!(
        audits.keys().all(|n| runs.contains(n)),
        "iteration {iteration}: audit records without their run"
    );
}

#[test]
fn sigkill_at_random_points_loses_nothing_acknowledged() {
    if let Some(dir) = std::env::var_os(RANDOM_CHILD_ENV) {
        random_child(Path::new(&dir));
    }
    let iterations: u64 = std::env::var("KEEL_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b65656c);
    let mut rng = SplitMix64::new(seed);
    let exe = std::env::current_exe().unwrap();
    let mut dir = keel_harness::TempDir::new("keel-crash");
    let mut acknowledged = BTreeSet::new();
    let mut total_acknowledged = 0;
    let mut kills_before_ready = 0;
    for iteration in 0..iterations {
        // A fresh store every 25 kills keeps each open cheap (the store's size, not the kill
        // count, drives its cost) while every store still goes through several compactions.
        if iteration % 25 == 0 && iteration > 0 {
            total_acknowledged += acknowledged.len();
            acknowledged.clear();
            dir = keel_harness::TempDir::new("keel-crash");
        }
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_at_random_points_loses_nothing_acknowledged",
                "--nocapture",
            ])
            .env(RANDOM_CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after 0 to 12 acknowledgements; 0 kills while the child opens and restores.
        let kill_after = rng.below_inclusive(12);
        let mut acks = 0;
        let mut lines = BufReader::new(stdout).lines();
        if kill_after == 0 {
            kills_before_ready += 1;
        } else {
            for line in lines.by_ref() {
                let line = line.unwrap();
                if let Some(n) = line.strip_prefix("ack ") {
                    acknowledged.insert(n.parse::<u64>().unwrap());
                    acks += 1;
                    if acks == kill_after {
                        break;
                    }
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Acknowledgements printed before the kill landed are acknowledged too.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ack ") {
                acknowledged.insert(n.parse::<u64>().unwrap());
            }
        }
        verify(dir.path(), &acknowledged, iteration);
    }
    total_acknowledged += acknowledged.len();
    assert!(
        total_acknowledged as u64 >= iterations,
        "only {total_acknowledged} batches were acknowledged in {iterations} runs"
    );
    assert!(kills_before_ready > 0, "no kill landed during open");
}

//! Tests that need the store's insides: group commit, and a state that survives a snapshot.

use std::sync::Arc;

use keel_core::{
    BatchId, Conflict, JobId, Record, Run, RunState, RunTerms, Store, StoreError, Timestamp,
    Trigger,
};

use super::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);

use keel_harness::conformance::{audit_record, incident};
use keel_harness::TempDir;

/// A point in a background compaction where a test can hold the thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Point {
    /// The new generation is committed and being appended to; no snapshot written yet.
    Started,
    /// The snapshot is complete and durable under its temporary name, not yet renamed.
    Written,
    /// The snapshot has its name; the old generations are not yet removed.
    Renamed,
    /// A read has taken its frozen copy of the state and not yet answered from it.
    Reading,
}

/// Holds a handle's compaction thread at a chosen [`Point`] until released.
#[derive(Debug, Default)]
pub(crate) struct Pause {
    state: std::sync::Mutex<PauseState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    hold_at: Option<Point>,
    held: Option<Point>,
}

impl Pause {
    /// Called by the compaction thread at `point`: waits there while a test holds it.
    pub(crate) fn at(&self, point: Point) {
        let mut state = self.state.lock().unwrap();
        if state.hold_at != Some(point) {
            return;
        }
        state.held = Some(point);
        self.changed.notify_all();
        while state.hold_at == Some(point) {
            state = self.changed.wait(state).unwrap();
        }
        state.held = None;
    }

    fn hold_at(&self, point: Point) {
        self.state.lock().unwrap().hold_at = Some(point);
    }

    /// Waits until the thread is held.
    fn wait_held(&self) -> Point {
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(point) = state.held {
                return point;
            }
            state = self.changed.wait(state).unwrap();
        }
    }

    /// Waits until the thread is held, or `deadline` passes (then `None`): turns a point
    /// never reached into a failure instead of a hang.
    fn wait_held_for(&self, deadline: std::time::Duration) -> Option<Point> {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, deadline, |state| state.held.is_none())
            .unwrap();
        state.held
    }

    fn release(&self) {
        self.state.lock().unwrap().hold_at = None;
        self.changed.notify_all();
    }
}

fn run(id: u64, job: &str, slot: Timestamp) -> Run {
    let terms = RunTerms::new("work");
    Run::new(
        keel_core::RunId(id),
        JobId::new(job).unwrap(),
        Trigger::Scheduled { slot },
        slot,
        terms,
    )
}

fn batch(epoch: u64, n: u64, records: Vec<Record>) -> Batch {
    Batch {
        id: BatchId((epoch << 32) + n),
        at: T0,
        records,
    }
}

/// Eight threads apply at once; while the first waits for the store, the other seven queue
/// behind it, and all eight go to disk with one fsync. A refused batch in the group gets its
/// own conflict and keeps nobody else's batch out.
#[test]
fn concurrent_applies_share_one_fsync() {
    let dir = TempDir::new("keel-store-fs-unit-group");
    let store = Arc::new(FsStore::open(dir.path()).unwrap());
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let before = store.stats();

    let held = store.inner();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                // Thread 7 writes as a writer that never restored.
                let writer = if t == 7 { 0 } else { epoch };
                let records = vec![Record::PutRun(run(t + 1, "job", T0.plus_ms(t)))];
                store.apply(&batch(writer, t, records))
            })
        })
        .collect();
    let mut queue = store.queue();
    while queue.pending.len() < 8 {
        queue = store.queued.wait(queue).unwrap();
    }
    drop(queue);
    drop(held);

    let results: Vec<Result<(), StoreError>> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (t, result) in results.iter().enumerate() {
        if t == 7 {
            assert_eq!(
                result,
                &Err(StoreError::Conflict(Conflict::Deposed {
                    batch: 0,
                    current: epoch
                }))
            );
        } else {
            assert_eq!(result, &Ok(()), "thread {t}");
        }
    }
    let after = store.stats();
    assert_eq!(
        after.syncs - before.syncs,
        1,
        "one fsync for the whole group"
    );
    assert_eq!(after.batches - before.batches, 7);
    assert_eq!(after.refused - before.refused, 1);

    let reopened = FsStore::open(dir.path()).unwrap();
    for id in 1..=7 {
        assert!(
            reopened.run(keel_core::RunId(id)).unwrap().is_some(),
            "run {id}"
        );
    }
    assert_eq!(reopened.run(keel_core::RunId(8)).unwrap(), None);
}

/// Batches in one group are checked against the state including the group's earlier
/// batches: two runs claiming one slot in one group, one wins.
#[test]
fn a_group_checks_each_batch_against_the_ones_before_it() {
    let dir = TempDir::new("keel-store-fs-unit-group-order");
    let store = Arc::new(FsStore::open(dir.path()).unwrap());
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let held = store.inner();
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let records = vec![Record::PutRun(run(t + 1, "job", T0))];
                store.apply(&batch(epoch, t, records))
            })
        })
        .collect();
    let mut queue = store.queue();
    while queue.pending.len() < 2 {
        queue = store.queued.wait(queue).unwrap();
    }
    drop(queue);
    drop(held);
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(results
        .iter()
        .any(|r| matches!(r, Err(StoreError::Conflict(Conflict::SlotTaken { .. })))));
    assert_eq!(store.stats().syncs, 2, "restore, then the group");
}

/// A store in `dir` that never compacts and never syncs, made the writer; the epoch its
/// batches carry.
fn quiet_writer(dir: &TempDir) -> (FsStore, u64) {
    let options = FsOptions {
        compact_after_bytes: u64::MAX,
        sync: false,
        ..FsOptions::default()
    };
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    (store, epoch)
}

/// Every part of the state goes through a snapshot and comes back equal, including slot
/// claims and the writer epoch; a pruned run's claim went with it.
#[test]
fn state_survives_a_snapshot_exactly() {
    let dir = TempDir::new("keel-store-fs-unit-snapshot-state");
    let (store, epoch) = quiet_writer(&dir);
    let mut done = run(1, "job", T0).record();
    done.state = RunState::Succeeded;
    done.finished_at = Some(T0);
    let records = vec![
        Record::PutRun(Run::from_record(done)),
        Record::PutRun(run(2, "job", T0.plus_ms(1))),
        Record::PruneHistory {
            job: None,
            keep_last: 0,
            finished_before: T0.plus_ms(1),
        },
    ];
    store.apply(&batch(epoch, 0, records)).unwrap();
    let state = store.inner().replica.state.clone();
    assert!(state.slots.len() == 1 && state.runs.len() == 1);

    let mut bytes = Vec::new();
    state.write_snapshot(&mut bytes, 7, None).unwrap();
    let read = State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 7).unwrap();
    assert_eq!(read, state);
    assert!(State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 8).is_err());
}

/// A snapshot past `PIPELINE_MIN_BYTES` is decoded on one thread and built on another: it
/// comes back equal, and a corrupt frame in its middle still fails the whole read (with both
/// threads done: the test ends).
#[test]
fn a_large_snapshot_is_read_on_two_threads_and_comes_back_equal() {
    let payload: Arc<str> = "x".repeat(4096).into();
    let records: Vec<Record> = (1..=2_500u64)
        .flat_map(|i| {
            let mut record = run(i, "job", T0.plus_ms(i)).record();
            record.payload = Arc::clone(&payload);
            [
                Record::PutRun(Run::from_record(record)),
                Record::Audit(audit_record(i, "job", Some(i), T0)),
            ]
        })
        .collect();
    let mut state = State::default();
    state.apply(&records);
    let mut bytes = Vec::new();
    state.write_snapshot(&mut bytes, 3, None).unwrap();
    assert!(
        bytes.len() as u64 > crate::state::PIPELINE_MIN_BYTES,
        "{}",
        bytes.len()
    );

    let read = State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 3).unwrap();
    assert_eq!(read, state);

    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let broken = State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 3);
    assert!(broken.is_err(), "a flipped byte at {middle} went unnoticed");
}

/// Builds before claims went with their runs kept the claims of pruned runs in their
/// snapshots; reading one leaves those behind and keeps the claims of stored runs.
#[test]
fn a_snapshot_drops_the_claims_of_runs_it_does_not_hold() {
    let dir = TempDir::new("keel-store-fs-unit-snapshot-old-claims");
    let (store, epoch) = quiet_writer(&dir);
    let records = vec![Record::PutRun(run(2, "job", T0.plus_ms(1)))];
    store.apply(&batch(epoch, 0, records)).unwrap();
    let mut old = store.inner().replica.state.clone();
    // As an older build left it: run 1 pruned, its claim kept.
    old.slots.insert((JobId::new("job").unwrap(), T0), RunId(1));
    assert_eq!(old.slots.len(), 2);

    let mut bytes = Vec::new();
    old.write_snapshot(&mut bytes, 7, None).unwrap();
    let read = State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 7).unwrap();
    let claims: Vec<_> = read.slots.iter().map(|(k, v)| (k.clone(), *v)).collect();
    assert_eq!(
        claims,
        vec![((JobId::new("job").unwrap(), T0.plus_ms(1)), RunId(2))]
    );
}

/// The indexed prune deletes exactly what the reference store (`MemStore`, a full scan)
/// deletes, over random histories: ties in finish time, several jobs, age and count limits,
/// per-job and global prunes, audit records of pruned runs.
#[test]
fn indexed_prune_matches_the_reference_store() {
    use keel_core::rng::SplitMix64;
    use keel_harness::conformance::{audit_record, run};
    for seed in 0..40 {
        let mut rng = SplitMix64::new(seed);
        let mut reference = keel_testkit::MemStore::store_rules_only();
        let epoch = next_writer_epoch(0, 0);
        let _ = reference.restore();
        let mut state = State {
            writer_epoch: epoch,
            ..State::default()
        };
        let mut seq = 0;
        for round in 0..30u64 {
            let mut records = Vec::new();
            for k in 0..rng.below_inclusive(6) {
                let id = round * 10 + k + 1;
                let job = format!("job-{}", rng.below_inclusive(3));
                let mut r = run(id, &job, T0.plus_ms(id * 1_000)).record();
                if rng.chance(3, 4) {
                    r.state = RunState::Succeeded;
                    // Few distinct finish times: ties are common.
                    r.finished_at = Some(T0.plus_ms(rng.below_inclusive(8) * 1_000));
                }
                records.push(Record::PutRun(Run::from_record(r)));
                for _ in 0..rng.below_inclusive(2) {
                    seq += 1;
                    records.push(Record::Audit(audit_record(seq, &job, Some(id), T0)));
                }
            }
            if rng.chance(1, 3) {
                let job = rng
                    .chance(1, 2)
                    .then(|| JobId::new(&format!("job-{}", rng.below_inclusive(3))).unwrap());
                records.push(Record::PruneHistory {
                    job,
                    keep_last: rng.below_inclusive(4) as u32,
                    finished_before: T0.plus_ms(rng.below_inclusive(8) * 1_000),
                });
            }
            let batch = Batch {
                id: BatchId((epoch << 32) + round),
                at: T0,
                records,
            };
            reference.apply(&batch);
            state.apply(&batch.records);
            let runs: Vec<&Run> = state.runs.values().map(|run| &**run).collect();
            let expected: Vec<&Run> = reference.runs().collect();
            assert_eq!(runs, expected, "seed {seed}, round {round}: runs differ");
            let audit: Vec<u64> = state.audit.keys().copied().collect();
            let expected: Vec<u64> = reference.audit().map(|a| a.seq).collect();
            assert_eq!(audit, expected, "seed {seed}, round {round}: audit differs");
            assert_eq!(
                state.snapshot().runs,
                reference.snapshot().runs,
                "seed {seed}, round {round}: the active runs differ"
            );
        }
    }
}

/// The indexes kept in step write by write equal those a snapshot load rebuilds from the runs
/// alone, over random updates of the same runs: queued, running, finished and back (a run
/// written again with another state), moved to another job, finish times changed, pruned.
#[test]
fn indexes_kept_in_step_equal_those_rebuilt_from_the_runs() {
    use keel_core::rng::SplitMix64;
    use keel_harness::conformance::run;
    for seed in 0..40 {
        let mut rng = SplitMix64::new(seed);
        let mut state = State::default();
        for round in 0..40u64 {
            let mut records = Vec::new();
            for _ in 0..=rng.below_inclusive(5) {
                // Few ids: most writes update a run already stored.
                let id = rng.below_inclusive(8) + 1;
                let job = format!("job-{}", rng.below_inclusive(2));
                let mut r = run(id, &job, T0.plus_ms(id * 1_000)).record();
                match rng.below_inclusive(3) {
                    0 => {}
                    1 => r.state = RunState::BackingOff { until: T0 },
                    2 => {
                        r.state = RunState::Succeeded;
                        r.finished_at = Some(T0.plus_ms(rng.below_inclusive(4) * 1_000));
                    }
                    _ => {
                        // A finish time on a run that is not terminal: not in `finished`.
                        r.finished_at = Some(T0.plus_ms(rng.below_inclusive(4) * 1_000));
                    }
                }
                records.push(Record::PutRun(Run::from_record(r)));
            }
            if rng.chance(1, 4) {
                records.push(Record::PruneHistory {
                    job: None,
                    keep_last: rng.below_inclusive(3) as u32,
                    finished_before: T0,
                });
            }
            state.apply(&records);
            let mut bytes = Vec::new();
            state.write_snapshot(&mut bytes, 1, None).unwrap();
            let rebuilt = State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 1).unwrap();
            assert_eq!(rebuilt.index, state.index, "seed {seed}, round {round}");
        }
    }
}

/// Options that compact after every write, each compaction waiting for the one before.
fn compacting_always() -> FsOptions {
    FsOptions {
        compact_after_bytes: 1,
        compact_at_snapshot_size: false,
        sync: true,
    }
}

/// What a crash at this instant leaves: a copy of every file of the store (a killed process
/// loses nothing the kernel has; the copy is taken while the compaction thread is held).
fn crash_image(dir: &TempDir, name: &str) -> TempDir {
    let image = TempDir::created(name);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), image.path().join(entry.file_name())).unwrap();
        }
    }
    image
}

/// Writes runs `ids` (one batch each) and returns them, acknowledged.
fn write_runs(store: &FsStore, epoch: u64, ids: std::ops::Range<u64>) -> Vec<u64> {
    for id in ids.clone() {
        let records = vec![Record::PutRun(run(id, "job", T0.plus_ms(id)))];
        store.apply(&batch(epoch, id, records)).unwrap();
    }
    ids.collect()
}

#[track_caller]
fn assert_has_runs(store: &FsStore, ids: &[u64]) {
    for &id in ids {
        assert!(
            store.run(RunId(id)).unwrap().is_some(),
            "run {id} is missing"
        );
    }
}

/// While the compaction thread is held (before it read anything, with its snapshot written
/// but not named, and named but the old generations not yet removed), writes are
/// acknowledged without waiting for it, go to the new generation's log, start no second
/// compaction, and a second handle sees them. A crash at each of those points, and after the
/// compaction, loses no acknowledged batch: the store reopens clean and accepts writes.
#[test]
fn a_crash_at_any_point_of_a_compaction_loses_nothing() {
    for point in [Point::Started, Point::Written, Point::Renamed] {
        let dir = TempDir::new("keel-store-fs-unit-compaction-crash");
        let store = FsStore::open_with(dir.path(), compacting_always()).unwrap();
        let reader = FsStore::open_with(dir.path(), compacting_always()).unwrap();
        store.pause.hold_at(point);
        // The writer frame `restore` appends passes the threshold: generation 1 starts.
        let epoch = store.restore().unwrap().meta.epoch + 1;
        assert_eq!(store.pause.wait_held(), point);
        let generation = store.inner().replica.generation();
        assert_eq!(generation, 1);
        let mut acknowledged = write_runs(&store, epoch, 1..20);
        assert_eq!(
            store.inner().replica.generation(),
            generation,
            "{point:?}: one compaction at a time"
        );
        assert_eq!(store.stats().batches, 19);
        assert_eq!(store.stats().compactions, 0, "{point:?}: still running");
        assert_has_runs(&reader, &acknowledged);

        let crashed = crash_image(&dir, "keel-store-fs-unit-compaction-crash-image");
        store.pause.release();
        store.wait_for_compaction();
        assert_eq!(store.stats().compactions, 1);
        assert_eq!(store.stats().compactions_failed, 0);
        acknowledged.extend(write_runs(&store, epoch, 20..25));
        assert_has_runs(&reader, &acknowledged);
        // These writes started another compaction: the image is taken once it is done.
        store.wait_for_compaction();
        let after = crash_image(&dir, "keel-store-fs-unit-compaction-after-image");

        for (image, written) in [(&crashed, 19), (&after, acknowledged.len())] {
            let reopened = FsStore::open_with(image.path(), compacting_always()).unwrap();
            let report = reopened.recovery();
            assert!(report.is_clean(), "{point:?}: {report}");
            assert_has_runs(&reopened, &acknowledged[..written]);
            assert!(reopened.verify().unwrap().is_clean(), "{point:?}");
            // The reopened store is a writer like any other; its compactions complete.
            let epoch = reopened.restore().unwrap().meta.epoch + 1;
            write_runs(&reopened, epoch, 100..103);
            reopened.wait_for_compaction();
            assert_has_runs(&reopened, &[100, 101, 102]);
            drop(reopened);
            let again = FsStore::open(image.path()).unwrap();
            assert!(again.recovery().is_clean(), "{}", again.recovery());
            assert_has_runs(&again, &acknowledged[..written]);
            assert_has_runs(&again, &[100, 101, 102]);
        }
    }
}

/// A snapshot that cannot be written is reported and counted, loses nothing (the logs hold
/// every batch), and a later compaction writes one.
#[test]
fn a_failed_snapshot_loses_nothing_and_is_retried() {
    let dir = TempDir::new("keel-store-fs-unit-compaction-fails");
    let store = FsStore::open_with(dir.path(), compacting_always()).unwrap();
    store.pause.hold_at(Point::Started);
    let epoch = store.restore().unwrap().meta.epoch + 1;
    store.pause.wait_held();
    // A directory where the snapshot's temporary file goes: writing it fails.
    let blocker = dir.file(&format!("{}.tmp", files::snapshot_name(1)));
    std::fs::create_dir(&blocker).unwrap();
    let mut acknowledged = write_runs(&store, epoch, 1..5);
    store.pause.release();
    store.wait_for_compaction();
    assert_eq!(store.stats().compactions, 0);
    assert_eq!(store.stats().compactions_failed, 1);
    assert!(!dir.file(&files::snapshot_name(1)).exists());
    {
        let image = crash_image(&dir, "keel-store-fs-unit-failed");
        let reopened = FsStore::open(image.path()).unwrap();
        assert!(reopened.recovery().is_clean(), "{}", reopened.recovery());
        assert_has_runs(&reopened, &acknowledged);
    }

    std::fs::remove_dir(&blocker).unwrap();
    acknowledged.extend(write_runs(&store, epoch, 5..10));
    store.wait_for_compaction();
    assert!(store.stats().compactions >= 1, "{:?}", store.stats());
    drop(store);
    let reopened = FsStore::open(dir.path()).unwrap();
    assert!(reopened.recovery().is_clean(), "{}", reopened.recovery());
    assert_has_runs(&reopened, &acknowledged);
}

#[test]
fn cleanup_spares_a_snapshot_being_written_for_a_newer_generation() {
    let dir = TempDir::created("keel-store-fs-unit-obsolete");
    let names = [
        files::log_name(2),
        files::snapshot_name(2),
        format!("{}.tmp", files::snapshot_name(2)),
        files::log_name(3),
        files::snapshot_name(3),
        // Another handle's compaction thread, writing the next generation's snapshot.
        format!("{}.tmp", files::snapshot_name(4)),
    ];
    for name in &names {
        std::fs::write(dir.path().join(name), b"").unwrap();
    }
    let mut doomed: Vec<String> = files::obsolete_files(dir.path(), 3)
        .unwrap()
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    doomed.sort();
    let mut older = names[..3].to_vec();
    older.sort();
    assert_eq!(
        doomed, older,
        "generation 2 and its half-written snapshot only"
    );
}

/// The cost of the frozen copy a background compaction takes under the lock, at the firing
/// benchmark's size (100 000 jobs, 40 000 runs, 120 000 audit records). Measures, asserts
/// nothing: `cargo test --release -p keel-store-fs clone_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement"]
fn clone_cost() {
    use keel_harness::conformance::{audit_record, once_job, run};
    let mut state = state::State::default();
    let mut records = Vec::new();
    for i in 0..100_000u64 {
        records.push(Record::PutJob(once_job(&format!("job-{i}")).into()));
    }
    for i in 0..40_000u64 {
        let job = format!("job-{i}");
        records.push(Record::PutRun(run(i + 1, &job, Timestamp(T0.0 + i as i64))));
        for k in 0..3 {
            let seq = i * 3 + k + 1;
            records.push(Record::Audit(audit_record(seq, &job, Some(i + 1), T0)));
        }
    }
    state.apply_owned(records);
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let copy = std::hint::black_box(state.clone());
        times.push(started.elapsed());
        drop(copy);
    }
    times.sort();
    eprintln!(
        "clone of 100k jobs, 40k runs, 120k audit: min {:?}, median {:?}, max {:?}",
        times[0], times[10], times[19]
    );
}

/// Reads answer from a frozen copy of the state, taken under the handle's lock and walked
/// after it is released: while each of `read`, `runs`, `audit` and `incidents` is held after
/// taking its copy, the same handle acknowledges a write, and the read answers with the state
/// as of its start.
#[test]
fn reads_hold_up_no_write_and_see_the_state_they_started_from() {
    let dir = TempDir::new("keel-store-fs-unit-frozen-read");
    let (store, epoch) = quiet_writer(&dir);
    store
        .apply(&batch(epoch, 0, vec![Record::PutRun(run(1, "job", T0))]))
        .unwrap();
    type Read = fn(&FsStore) -> usize;
    let reads: [(&str, Read); 4] = [
        ("read", |s| s.read().unwrap().runs.len()),
        ("runs", |s| s.runs(&RunQuery::default()).unwrap().runs.len()),
        ("audit", |s| s.audit(&AuditQuery::default()).unwrap().len()),
        ("incidents", |s| s.incidents().unwrap().len()),
    ];
    for (n, (name, read)) in (1u64..).zip(reads) {
        store.pause.hold_at(Point::Reading);
        let seen = std::thread::scope(|scope| {
            let reading = scope.spawn(|| read(&store));
            let held = store
                .pause
                .wait_held_for(std::time::Duration::from_secs(60));
            assert_eq!(held, Some(Point::Reading), "{name} takes no frozen copy");
            // The read holds its copy; a write of each kind it reads goes through meanwhile.
            let later = vec![
                Record::PutRun(run(n + 1, "job", T0.plus_ms(n))),
                Record::Audit(audit_record(n, "job", Some(n + 1), T0)),
                Record::PutIncident(incident(n, false)),
            ];
            let written = store.apply(&batch(epoch, n, later));
            store.pause.release();
            assert_eq!(written, Ok(()), "{name}");
            reading.join().unwrap()
        });
        // Before the write: n runs, n - 1 audit records and incidents.
        let before = usize::try_from(n).unwrap();
        let expected = if matches!(name, "read" | "runs") {
            before
        } else {
            before - 1
        };
        assert_eq!(
            seen, expected,
            "{name} answers with the state as of its start"
        );
    }
    assert!(store.run(keel_core::RunId(5)).unwrap().is_some());
    assert_eq!(store.incidents().unwrap().len(), 4);
}

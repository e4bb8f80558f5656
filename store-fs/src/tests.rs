//! Tests that need the store's insides: group commit, and a state that survives a snapshot.

use std::sync::Arc;

use keel_core::{
    BatchId, Conflict, JobId, Record, Run, RunState, RunTerms, Store, StoreError, Timestamp,
    Trigger,
};

use super::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);

use keel_harness::TempDir;

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

/// Every part of the state goes through a snapshot and comes back equal, including slot
/// claims of pruned runs and the writer epoch.
#[test]
fn state_survives_a_snapshot_exactly() {
    let dir = TempDir::new("keel-store-fs-unit-snapshot-state");
    let options = FsOptions {
        compact_after_bytes: u64::MAX,
        sync: false,
        ..FsOptions::default()
    };
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
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
    assert!(state.slots.len() == 2 && state.runs.len() == 1);

    let mut bytes = Vec::new();
    state.write_snapshot(&mut bytes, 7, None).unwrap();
    let read = State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 7).unwrap();
    assert_eq!(read, state);
    assert!(State::read_snapshot(bytes.as_slice(), bytes.len() as u64, 8).is_err());
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
            let runs: Vec<&Run> = state.runs.values().collect();
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

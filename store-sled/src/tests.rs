//! Unit tests of the sled store: reopening, the write rules end to end, pruning (also against
//! the reference `MemStore`), the format marker, corrupt data, locking and permissions. The
//! shared conformance suite runs in `tests/conformance.rs`.

use std::collections::BTreeSet;
use std::path::Path;

use keel_core::persist::Tombstone;
use keel_core::{
    AuditQuery, AuditRecord, Batch, BatchId, Conflict, Delivery, FencingToken, Incident,
    IncidentKind, Job, JobId, Meta, Record, Run, RunId, RunQuery, RunState, RunTerms, Snapshot,
    Store, StoreError, Timestamp, Trigger,
};
use keel_testkit::MemStore;

use super::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);

/// A fresh directory, removed on drop.
use keel_harness::conformance::{self, audit_record, edit, run};
use keel_harness::TempDir;

fn job_id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

fn job(name: &str) -> Job {
    conformance::once_job(name)
}

fn batch(epoch: u64, n: u64, records: Vec<Record>) -> Batch {
    Batch {
        id: BatchId((epoch << 32) + n),
        at: T0,
        records,
    }
}

fn terms() -> RunTerms {
    RunTerms {
        external: true,
        ..RunTerms::new("work")
    }
}

/// A manual run of `job`, queued.
fn manual(id: u64, job: &str) -> Run {
    Run::new(RunId(id), job_id(job), Trigger::Manual, T0, terms())
}

/// `run`, succeeded at `finished_at`.
fn finished(run: Run, finished_at: Timestamp) -> Run {
    edit(run, |r| {
        r.state = RunState::Succeeded;
        r.finished_at = Some(finished_at);
    })
}

/// `run`, running under a lease of `owner` with `token` for 30 s.
fn leased(run: Run, owner: &str, token: u64) -> Run {
    conformance::leased(run, owner, token, T0.plus_ms(30_000))
}

fn audit(seq: u64, job: &str, run: Option<u64>) -> AuditRecord {
    audit_record(seq, job, run, T0.plus_ms(seq))
}

fn incident(id: u64, resolved_at: Option<Timestamp>) -> Incident {
    Incident {
        id,
        kind: IncidentKind::StuckRun,
        opened_at: T0,
        resolved_at,
        job: Some(job_id("a")),
        run: Some(RunId(1)),
        worker: None,
        details: format!("incident {id}"),
        queue: None,
        opened_by: None,
        acknowledged: None,
        resolved_by: None,
        escalated_at: None,
    }
}

fn delivery(id: u64) -> Delivery {
    conformance::delivery(id, 2)
}

/// Restores a writer and returns its epoch.
fn become_writer(store: &SledStore) -> u64 {
    store.restore().unwrap().meta.epoch + 1
}

fn conflict(result: Result<(), StoreError>) -> Conflict {
    match result {
        Err(StoreError::Conflict(conflict)) => conflict,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn all_runs(store: &SledStore) -> Vec<u64> {
    let query = RunQuery {
        limit: 10_000,
        ..RunQuery::default()
    };
    let page = store.runs(&query).unwrap();
    assert_eq!(page.next, None);
    page.runs.iter().map(|r| r.id().0).collect()
}

fn all_audit(store: &SledStore) -> Vec<AuditRecord> {
    let query = AuditQuery {
        limit: 10_000,
        ..AuditQuery::default()
    };
    store.audit(&query).unwrap()
}

/// Overwrites one raw value of a closed store.
fn poke(dir: &Path, tree: TreeId, key: &[u8], value: &[u8]) {
    // Through `open_db`: it waits for the lock a just-dropped store may still hold.
    let db = open_db(dir).unwrap();
    db.open_tree(tree.name())
        .unwrap()
        .insert(key, value)
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn everything_acknowledged_survives_reopen() {
    let dir = TempDir::new("keel-store-sled-unit");
    let meta = Meta {
        next_run_id: 4,
        next_audit_seq: 4,
        clock: T0,
        epoch: 1,
        next_token: 6,
        next_incident: 3,
        next_delivery: 2,
    };
    let tombstone = Tombstone {
        job: job_id("gone"),
        last_fired: T0,
        deleted_at: T0,
    };
    let active = leased(run(1, "a", T0), "w1", 5);
    let done = finished(run(2, "a", T0.plus_ms(1_000)), T0.plus_ms(1_500));
    let records = vec![
        Record::PutJob(job("a").into()),
        Record::PutJob(job("b").into()),
        Record::PutRun(active.clone()),
        Record::PutRun(done.clone()),
        Record::PutRun(manual(3, "b")),
        Record::Audit(audit(1, "a", Some(1))),
        Record::Audit(audit(2, "a", Some(2))),
        Record::Audit(audit(3, "b", None)),
        Record::PutMeta(meta),
        Record::PutTombstone(tombstone.clone()),
        Record::PutIncident(incident(1, None)),
        Record::PutIncident(incident(2, Some(T0))),
        Record::PutDelivery(delivery(1)),
    ];
    {
        let store = SledStore::open(dir.path()).unwrap();
        let epoch = become_writer(&store);
        assert_eq!(epoch, 1);
        store.apply(&batch(epoch, 0, records)).unwrap();
    }

    let store = SledStore::open(dir.path()).unwrap();
    let expected = Snapshot {
        jobs: vec![job("a"), job("b")],
        runs: vec![active.clone(), manual(3, "b")],
        meta,
        tombstones: vec![tombstone],
        incidents: vec![incident(1, None)],
        deliveries: vec![delivery(1)],
    };
    assert_eq!(store.read().unwrap(), expected);
    // History: the terminal run is not restored, but it is kept.
    assert_eq!(store.run(RunId(2)).unwrap(), Some(done));
    assert_eq!(all_runs(&store), vec![3, 2, 1]);
    assert_eq!(
        all_audit(&store),
        vec![
            audit(1, "a", Some(1)),
            audit(2, "a", Some(2)),
            audit(3, "b", None)
        ]
    );
    assert_eq!(
        store.incidents().unwrap(),
        vec![incident(1, None), incident(2, Some(T0))]
    );
    // The restored writer is the next epoch.
    let restored = store.restore().unwrap();
    assert_eq!(restored.meta.epoch, 1);
    assert_eq!(Snapshot { meta, ..restored }, expected);
}

#[test]
fn restore_raises_the_writer_epoch_durably() {
    let dir = TempDir::new("keel-store-sled-unit");
    {
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.restore().unwrap().meta.epoch, 0);
        assert_eq!(store.restore().unwrap().meta.epoch, 1);
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(
        become_writer(&store),
        3,
        "the writer epoch survived reopening"
    );
    // Counters written by a writer that knew a later epoch lift the next one past it.
    let meta = Meta {
        epoch: 7,
        ..Meta::default()
    };
    store
        .apply(&batch(3, 0, vec![Record::PutMeta(meta)]))
        .unwrap();
    assert_eq!(
        store.read().unwrap().meta.epoch,
        7,
        "read reports the counters"
    );
    assert_eq!(store.restore().unwrap().meta.epoch, 7);
    assert_eq!(become_writer(&store), 9);
}

#[test]
fn deposed_batch_is_refused_and_applies_nothing() {
    let dir = TempDir::new("keel-store-sled-unit");
    let store = SledStore::open(dir.path()).unwrap();
    let first = become_writer(&store);
    store
        .apply(&batch(first, 0, vec![Record::PutRun(run(1, "a", T0))]))
        .unwrap();
    drop(store);

    // A later incarnation restores from the same directory: the first writer is deposed.
    let store = SledStore::open(dir.path()).unwrap();
    let second = become_writer(&store);
    let records = vec![
        Record::PutJob(job("late").into()),
        Record::PutRun(run(2, "a", T0.plus_ms(1))),
    ];
    assert_eq!(
        conflict(store.apply(&batch(first, 1, records))),
        Conflict::Deposed {
            batch: first,
            current: second
        }
    );
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert!(store.read().unwrap().jobs.is_empty());
    assert_eq!(store.run(RunId(2)).unwrap(), None);
    assert_eq!(all_runs(&store), vec![1]);
    store
        .apply(&batch(second, 0, vec![Record::PutJob(job("late").into())]))
        .unwrap();
    assert_eq!(store.read().unwrap().jobs, vec![job("late")]);
}

#[test]
fn stale_token_is_refused_and_applies_nothing() {
    let dir = TempDir::new("keel-store-sled-unit");
    let epoch = {
        let store = SledStore::open(dir.path()).unwrap();
        let epoch = become_writer(&store);
        let held = leased(run(1, "a", T0), "w1", 5);
        store
            .apply(&batch(epoch, 0, vec![Record::PutRun(held)]))
            .unwrap();
        epoch
    };
    let store = SledStore::open(dir.path()).unwrap();
    let stale = leased(run(1, "a", T0), "w0", 4);
    let records = vec![
        Record::Audit(audit(1, "a", Some(1))),
        Record::PutRun(stale),
        Record::PutRun(run(2, "a", T0.plus_ms(1))),
    ];
    assert_eq!(
        conflict(store.apply(&batch(epoch, 1, records))),
        Conflict::StaleToken {
            run: RunId(1),
            token: FencingToken(4),
            current: FencingToken(5),
        }
    );
    let stored = store.run(RunId(1)).unwrap().unwrap();
    assert_eq!(stored.lease().map(|l| l.token), Some(FencingToken(5)));
    assert_eq!(store.run(RunId(2)).unwrap(), None);
    assert!(all_audit(&store).is_empty());
    // The slot run 2 would have claimed is still free.
    store
        .apply(&batch(
            epoch,
            2,
            vec![Record::PutRun(run(3, "a", T0.plus_ms(1)))],
        ))
        .unwrap();
}

#[test]
fn prune_keeps_the_newest_terminal_runs_and_their_slot_claims() {
    let store = SledStore::temporary().unwrap();
    let epoch = become_writer(&store);
    // Job a: runs 1..=5 finish at 10, 20, 20, 30, 40 (2 and 3 tie); run 6 is still queued;
    // run 7 is terminal without a finish time (never pruned). Job b: run 8, finished long ago.
    let finish = [10, 20, 20, 30, 40];
    let mut records: Vec<Record> = finish
        .iter()
        .zip(1..)
        .map(|(&at, id)| {
            let slot = T0.plus_ms(id * 1_000);
            Record::PutRun(finished(run(id, "a", slot), Timestamp(at)))
        })
        .collect();
    records.push(Record::PutRun(run(6, "a", T0.plus_ms(6_000))));
    let mut unfinished = run(7, "a", T0.plus_ms(7_000)).record();
    unfinished.state = RunState::Cancelled;
    records.push(Record::PutRun(Run::from_record(unfinished)));
    records.push(Record::PutRun(finished(run(8, "b", T0), Timestamp(1))));
    for id in 1..=8 {
        let job = if id == 8 { "b" } else { "a" };
        records.push(Record::Audit(audit(id, job, Some(id))));
    }
    records.push(Record::Audit(audit(9, "a", None)));
    store.apply(&batch(epoch, 0, records)).unwrap();

    // Keep a's two newest terminal runs: 5 (40) and 4 (30).
    let prune = Record::PruneHistory {
        job: Some(job_id("a")),
        keep_last: 2,
        finished_before: Timestamp(0),
    };
    store.apply(&batch(epoch, 1, vec![prune])).unwrap();
    assert_eq!(all_runs(&store), vec![8, 7, 6, 5, 4]);
    let audited: Vec<Option<u64>> = all_audit(&store)
        .iter()
        .map(|r| r.run.map(|r| r.0))
        .collect();
    assert_eq!(
        audited,
        vec![Some(4), Some(5), Some(6), Some(7), Some(8), None],
        "pruned runs lose their audit; job-level records stay"
    );

    // Keep one: of the runs finished at 20 the higher id would win a tie; here 5 is newest.
    let prune = Record::PruneHistory {
        job: Some(job_id("a")),
        keep_last: 1,
        finished_before: Timestamp(0),
    };
    store.apply(&batch(epoch, 2, vec![prune])).unwrap();
    assert_eq!(all_runs(&store), vec![8, 7, 6, 5]);

    // Every job, by age.
    let prune = Record::PruneHistory {
        job: None,
        keep_last: 100,
        finished_before: Timestamp(2),
    };
    store.apply(&batch(epoch, 3, vec![prune])).unwrap();
    assert_eq!(all_runs(&store), vec![7, 6, 5]);

    // A claim goes with its run: only the stored runs' slots are claimed.
    let claimed: Vec<RunId> = store
        .tree(TreeId::Slots)
        .iter()
        .map(|item| serde_json::from_slice(&item.unwrap().1).unwrap())
        .collect();
    assert_eq!(claimed, vec![RunId(5), RunId(6), RunId(7)]);
    let slot = T0.plus_ms(5_000);
    let result = store.apply(&batch(epoch, 4, vec![Record::PutRun(run(99, "a", slot))]));
    assert_eq!(
        conflict(result),
        Conflict::SlotTaken {
            job: job_id("a"),
            slot,
            owner: RunId(5),
            run: RunId(99)
        }
    );
}

#[test]
fn prune_breaks_ties_by_run_id() {
    let store = SledStore::temporary().unwrap();
    let epoch = become_writer(&store);
    let records = (1..=3)
        .map(|id| Record::PutRun(finished(manual(id, "a"), Timestamp(5))))
        .chain([Record::PruneHistory {
            job: Some(job_id("a")),
            keep_last: 2,
            finished_before: Timestamp(0),
        }])
        .collect();
    store.apply(&batch(epoch, 0, records)).unwrap();
    assert_eq!(all_runs(&store), vec![3, 2]);
}

#[test]
fn prune_sees_the_records_before_it_in_its_batch() {
    let store = SledStore::temporary().unwrap();
    let epoch = become_writer(&store);
    store
        .apply(&batch(epoch, 0, vec![Record::PutRun(manual(1, "a"))]))
        .unwrap();
    let prune = Record::PruneHistory {
        job: Some(job_id("a")),
        keep_last: 0,
        finished_before: Timestamp(0),
    };
    let records = vec![
        // Run 1 finishes in this batch, with an audit record: the prune deletes both.
        Record::PutRun(finished(manual(1, "a"), T0)),
        Record::Audit(audit(1, "a", Some(1))),
        prune,
        // Written after the prune: kept.
        Record::PutRun(finished(manual(2, "a"), T0)),
        Record::Audit(audit(2, "a", Some(2))),
    ];
    store.apply(&batch(epoch, 1, records)).unwrap();
    assert_eq!(all_runs(&store), vec![2]);
    let audit_runs: Vec<_> = all_audit(&store).iter().map(|r| r.run).collect();
    assert_eq!(audit_runs, vec![Some(RunId(2))]);
    assert!(
        store.read().unwrap().runs.is_empty(),
        "run 1 is no longer active"
    );
}

#[test]
fn prune_keeps_an_audit_record_whose_seq_was_reused() {
    let store = SledStore::temporary().unwrap();
    let epoch = become_writer(&store);
    let records = vec![
        Record::PutRun(finished(manual(1, "a"), T0)),
        Record::Audit(audit(1, "a", Some(1))),
        // Seq 1 now belongs to run 2.
        Record::Audit(audit(1, "a", Some(2))),
        Record::PruneHistory {
            job: Some(job_id("a")),
            keep_last: 0,
            finished_before: Timestamp(0),
        },
    ];
    store.apply(&batch(epoch, 0, records)).unwrap();
    assert_eq!(all_audit(&store), vec![audit(1, "a", Some(2))]);
    let of_run_2 = AuditQuery {
        run: Some(RunId(2)),
        ..AuditQuery::default()
    };
    assert_eq!(
        store.audit(&of_run_2).unwrap(),
        vec![audit(1, "a", Some(2))]
    );
}

/// A small deterministic generator (SplitMix64), so the test needs no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random batches of runs, audit records and prunes leave the sled store and the reference
/// `MemStore` with the same runs, audit trail and snapshot.
#[test]
fn random_histories_match_the_reference_store() {
    for seed in 0..8 {
        let mut rng = Rng(seed);
        let store = SledStore::temporary().unwrap();
        let epoch = become_writer(&store);
        let mut model = MemStore::store_rules_only();
        let _ = model.restore(); // the same writer epoch
        let jobs = ["a", "b", "c"];
        let mut next_run = 1;
        let mut next_seq = 1;
        let mut open: Vec<Run> = Vec::new();
        for n in 0..40 {
            let mut records = Vec::new();
            for _ in 0..rng.below(8) {
                match rng.below(10) {
                    0..=2 => {
                        let job = jobs[rng.below(3) as usize];
                        let slot = T0.plus_ms(next_run * 1_000);
                        let new = run(next_run, job, slot);
                        next_run += 1;
                        if rng.below(2) == 0 {
                            // Finish times collide often, to exercise the tie-break.
                            let at = Timestamp(rng.below(20) as i64);
                            records.push(Record::PutRun(finished(new, at)));
                        } else {
                            open.push(new.clone());
                            records.push(Record::PutRun(new));
                        }
                    }
                    3..=4 if !open.is_empty() => {
                        let done = open.swap_remove(rng.below(open.len() as u64) as usize);
                        let at = Timestamp(rng.below(20) as i64);
                        records.push(Record::PutRun(finished(done, at)));
                    }
                    5..=7 => {
                        let target = (next_run > 1 && rng.below(4) != 0)
                            .then(|| 1 + rng.below(next_run - 1));
                        let job = jobs[rng.below(3) as usize];
                        records.push(Record::Audit(audit(next_seq, job, target)));
                        next_seq += 1;
                    }
                    _ => {
                        let job = (rng.below(3) != 0).then(|| job_id(jobs[rng.below(3) as usize]));
                        records.push(Record::PruneHistory {
                            job,
                            keep_last: rng.below(4) as u32,
                            finished_before: Timestamp(rng.below(10) as i64),
                        });
                    }
                }
            }
            // Audit records name a run of any job; MemStore does not mind, and neither may we.
            let batch = batch(epoch, n, records);
            store.apply(&batch).unwrap();
            model.apply(&batch);

            let mut expected: Vec<u64> = model.runs().map(|r| r.id().0).collect();
            expected.reverse();
            assert_eq!(all_runs(&store), expected, "seed {seed}, batch {n}");
            let expected: Vec<AuditRecord> = model.audit().cloned().collect();
            assert_eq!(all_audit(&store), expected, "seed {seed}, batch {n}");
            for run in 1..next_run {
                let query = AuditQuery {
                    run: Some(RunId(run)),
                    ..AuditQuery::default()
                };
                let expected: Vec<AuditRecord> = model.audit_of_run(RunId(run)).cloned().collect();
                assert_eq!(
                    store.audit(&query).unwrap(),
                    expected,
                    "seed {seed}, run {run}"
                );
            }
            assert_eq!(store.read().unwrap(), model.snapshot(), "seed {seed}");
        }
        let created = next_run - 1;
        let kept = model.runs().count() as u64;
        assert!(kept < created, "seed {seed}: no prune deleted anything");
    }
}

#[test]
fn an_unknown_format_is_refused() {
    let dir = TempDir::new("keel-store-sled-unit");
    drop(SledStore::open(dir.path()).unwrap());
    poke(dir.path(), TreeId::Meta, META_FORMAT, b"keel-store-sled 2");
    assert_eq!(
        SledStore::open(dir.path()).unwrap_err(),
        StoreError::Version {
            found: "keel-store-sled 2".into(),
            supported: "keel-store-sled 1".into(),
        }
    );
}

#[test]
fn data_without_a_format_marker_is_refused() {
    let dir = TempDir::new("keel-store-sled-unit");
    poke(dir.path(), TreeId::Jobs, b"a", b"{}");
    let error = SledStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&error, StoreError::Version { found, .. } if found.contains("\"jobs\"")),
        "{error:?}"
    );
}

#[test]
fn a_corrupt_value_is_reported_where_it_is() {
    let dir = TempDir::new("keel-store-sled-unit");
    {
        let store = SledStore::open(dir.path()).unwrap();
        let epoch = become_writer(&store);
        let records = vec![
            Record::PutRun(manual(7, "a")),
            Record::PutRun(manual(8, "a")),
        ];
        store.apply(&batch(epoch, 0, records)).unwrap();
    }
    poke(dir.path(), TreeId::Runs, &id_key(7), b"{\"id\": 7, \"tru");
    let store = SledStore::open(dir.path()).unwrap();
    let error = store.run(RunId(7)).unwrap_err();
    let StoreError::Corrupt { location, detail } = &error else {
        panic!("expected corruption, got {error:?}");
    };
    assert_eq!(location, "sled tree \"runs\", key 7");
    assert!(detail.starts_with("undecodable value"), "{detail}");
    // The rest of the store still reads.
    assert_eq!(store.run(RunId(8)).unwrap(), Some(manual(8, "a")));
    // A snapshot does not silently leave the run out.
    assert_eq!(store.read().unwrap_err(), error);
    // Nor may a batch overwrite it without the write rules seeing it.
    let result = store.apply(&batch(1, 1, vec![Record::PutRun(manual(7, "a"))]));
    assert_eq!(result.unwrap_err(), error);
}

#[test]
fn a_second_open_is_refused_while_the_first_is_open() {
    let dir = TempDir::new("keel-store-sled-unit");
    let first = SledStore::open(dir.path()).unwrap();
    let error = SledStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&error, StoreError::Io(message) if message.contains("lock")),
        "{error:?}"
    );
    // A clone is the way to share it.
    let clone = first.clone();
    become_writer(&clone);
    drop((first, clone));
    SledStore::open(dir.path()).unwrap();
}

#[test]
fn a_write_staged_against_a_changed_store_is_not_committed() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    // Two stores over one database do not share a write lock: the stamp catches the race.
    let one = SledStore::from_db(db.clone()).unwrap();
    let other = SledStore::from_db(db).unwrap();
    let epoch = become_writer(&one);
    let late = batch(epoch, 0, vec![Record::PutRun(finished(manual(1, "a"), T0))]);
    let stamp = one.stamp().unwrap();
    let stage = Stage::build(&one.shared.trees, &late).unwrap();

    let prune = Record::PruneHistory {
        job: None,
        keep_last: 0,
        finished_before: Timestamp(0),
    };
    other.apply(&batch(epoch, 1, vec![prune])).unwrap();
    assert!(matches!(
        one.commit(&late, stamp, &stage),
        Err(Abort::Stale)
    ));
    assert_eq!(one.run(RunId(1)).unwrap(), None);
    // `apply` stages again and lands.
    one.apply(&late).unwrap();
    assert!(other.run(RunId(1)).unwrap().is_some());
}

#[test]
fn the_transaction_checks_the_rules_again() {
    let store = SledStore::temporary().unwrap();
    let epoch = become_writer(&store);
    let late = batch(epoch, 0, vec![Record::PutRun(manual(1, "a"))]);
    let stamp = store.stamp().unwrap();
    let stage = Stage::build(&store.shared.trees, &late).unwrap();
    // Deposed between staging and committing (only possible through another store object).
    let second = become_writer(&store);
    let result = store.commit(&late, stamp, &stage);
    assert!(
        matches!(
            &result,
            Err(Abort::Failed(StoreError::Conflict(Conflict::Deposed { batch, current })))
                if *batch == epoch && *current == second
        ),
        "{result:?}"
    );
    assert_eq!(store.run(RunId(1)).unwrap(), None);
}

#[cfg(unix)]
#[test]
fn store_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("keel-store-sled-unit");
    let store = SledStore::open(dir.path()).unwrap();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    let files: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.contains("db") && files.contains("conf"), "{files:?}");
    for name in ["db", "conf"] {
        assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
    }
    drop(store);
}

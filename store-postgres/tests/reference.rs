//! The Postgres store against keel's reference store (`keel_testkit::MemStore`): random
//! batches of every kind of record leave both with the same runs, audit trail, incidents and
//! snapshot, and the prune's tie-break and in-batch order match it.

#![allow(clippy::unwrap_used)]

mod common;

use keel_core::persist::Tombstone;
use keel_core::{
    AuditQuery, AuditRecord, Incident, IncidentKind, JobId, Record, Run, RunId, RunQuery, RunState,
    Store, Timestamp,
};
use keel_harness::conformance::{audit_record, batch, delivery, edit, once_job, run, T0};
use keel_store_postgres::PgStore;
use keel_testkit::MemStore;

use common::TestDb;

fn job_id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

/// `run`, succeeded at `finished_at`.
fn finished(run: Run, finished_at: Timestamp) -> Run {
    edit(run, |r| {
        r.state = RunState::Succeeded;
        r.finished_at = Some(finished_at);
    })
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

fn all_runs(store: &PgStore) -> Vec<u64> {
    let page = store
        .runs(&RunQuery {
            limit: 10_000,
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(page.next, None);
    page.runs.iter().map(|r| r.id().0).collect()
}

fn all_audit(store: &PgStore) -> Vec<AuditRecord> {
    store
        .audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .unwrap()
}

/// A small deterministic generator (SplitMix64), as store-sled's comparison uses.
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

#[test]
fn random_histories_match_the_reference_store() {
    // Held across the seeds, so the server is not stopped and started again between them.
    let Some(mut db) = TestDb::new() else { return };
    for seed in 0..6 {
        if seed > 0 {
            db = TestDb::new().unwrap();
        }
        let mut rng = Rng(seed);
        let store = db.open();
        let epoch = store.restore().unwrap().meta.epoch + 1;
        let mut model = MemStore::store_rules_only();
        let _ = model.restore(); // the same writer epoch
        let jobs = ["a", "b", "c", "B", "a-1"];
        let (mut next_run, mut next_seq, mut next_id) = (1, 1, 1);
        let mut open: Vec<Run> = Vec::new();
        for n in 0..30 {
            let mut records = Vec::new();
            for _ in 0..rng.below(10) {
                let job = jobs[rng.below(jobs.len() as u64) as usize];
                match rng.below(16) {
                    0..=2 => {
                        let new = run(next_run, job, T0.plus_ms(next_run * 1_000));
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
                        let at = T0.plus_ms(next_seq);
                        records.push(Record::Audit(audit_record(next_seq, job, target, at)));
                        next_seq += 1;
                    }
                    8 => records.push(Record::PutJob(once_job(job).into())),
                    9 => records.push(Record::DeleteJob { id: job_id(job) }),
                    10 => records.push(Record::PutTombstone(Tombstone {
                        job: job_id(job),
                        last_fired: T0,
                        deleted_at: T0.plus_ms(next_id),
                    })),
                    11 => records.push(Record::DeleteTombstone { job: job_id(job) }),
                    12 => {
                        let resolved = (rng.below(2) == 0).then_some(T0);
                        records.push(Record::PutIncident(incident(next_id, resolved)));
                        next_id += 1;
                    }
                    13 => {
                        records.push(Record::PutDelivery(delivery(next_id, 1)));
                        next_id += 1;
                    }
                    14 if next_id > 1 => records.push(Record::DeleteDelivery {
                        id: keel_core::DeliveryId(rng.below(next_id)),
                    }),
                    _ => {
                        let job = (rng.below(3) != 0).then(|| job_id(job));
                        records.push(Record::PruneHistory {
                            job,
                            keep_last: rng.below(4) as u32,
                            finished_before: Timestamp(rng.below(10) as i64),
                        });
                    }
                }
            }
            let batch = batch(epoch, n, T0, records);
            store.apply(&batch).unwrap();
            model.apply(&batch);

            let mut expected: Vec<u64> = model.runs().map(|r| r.id().0).collect();
            expected.reverse();
            assert_eq!(all_runs(&store), expected, "seed {seed}, batch {n}");
            let expected: Vec<AuditRecord> = model.audit().cloned().collect();
            assert_eq!(all_audit(&store), expected, "seed {seed}, batch {n}");
            assert_eq!(store.read().unwrap(), model.snapshot(), "seed {seed}");
        }
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
        let expected: Vec<Incident> = model.incidents().cloned().collect();
        assert_eq!(store.incidents().unwrap(), expected, "seed {seed}");
        let kept = model.runs().count() as u64;
        assert!(
            kept < next_run - 1,
            "seed {seed}: no prune deleted anything"
        );
    }
}

#[test]
fn a_prune_breaks_ties_by_run_id_and_sees_the_records_before_it_in_its_batch() {
    let Some(db) = TestDb::new() else { return };
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let manual = |id: u64| run(id, "a", T0.plus_ms(id));
    store
        .apply(&batch(epoch, 0, T0, vec![Record::PutRun(manual(9))]))
        .unwrap();
    let prune = |keep_last| Record::PruneHistory {
        job: Some(job_id("a")),
        keep_last,
        finished_before: Timestamp(0),
    };
    let records = vec![
        Record::PutRun(finished(manual(1), Timestamp(5))),
        Record::PutRun(finished(manual(2), Timestamp(5))),
        Record::PutRun(finished(manual(3), Timestamp(5))),
        Record::Audit(audit_record(1, "a", Some(1), T0)),
        // Run 9 finishes in this batch, before the prune: it is the newest and is kept.
        Record::PutRun(finished(manual(9), Timestamp(6))),
        prune(3),
        // Written after the prune: kept whatever it says.
        Record::PutRun(finished(manual(4), Timestamp(1))),
        Record::Audit(audit_record(2, "a", Some(4), T0)),
    ];
    store.apply(&batch(epoch, 1, T0, records)).unwrap();
    let page = store.runs(&RunQuery::default()).unwrap();
    let ids: Vec<u64> = page.runs.iter().map(|r| r.id().0).collect();
    assert_eq!(
        ids,
        vec![9, 4, 3, 2],
        "equal finish times: the higher id is newer"
    );
    let audit_runs: Vec<_> = all_audit(&store).iter().map(|r| r.run).collect();
    assert_eq!(
        audit_runs,
        vec![Some(RunId(4))],
        "run 1's audit went with it"
    );
}

/// The store writes a batch as a few multi-row statements (`src/batch.rs`), moving records
/// past the ones they commute with. Records that do not commute keep their order: checked
/// here against the reference store, one batch per case, each case one a wrong grouping
/// gets wrong.
#[test]
fn records_that_do_not_commute_keep_their_batch_order() {
    let Some(db) = TestDb::new() else { return };
    let a = |id: u64| run(id, "a", T0.plus_ms(id));
    let b = |id: u64| run(id, "b", T0.plus_ms(id));
    let prune = |job: Option<&str>, keep_last| Record::PruneHistory {
        job: job.map(job_id),
        keep_last,
        finished_before: Timestamp(0),
    };
    let tombstone = |at| Tombstone {
        job: job_id("a"),
        last_fired: T0,
        deleted_at: T0.plus_ms(at),
    };
    // Stored before each case: runs 1 and 2 of job a and run 3 of job b, finished; run 4 of
    // a, running; one audit record for each.
    let before = || {
        let mut records: Vec<Record> = vec![
            Record::PutRun(finished(a(1), Timestamp(1))),
            Record::PutRun(finished(a(2), Timestamp(2))),
            Record::PutRun(finished(b(3), Timestamp(3))),
            Record::PutRun(a(4)),
        ];
        for seq in 1..=4 {
            let job = if seq == 3 { "b" } else { "a" };
            records.push(Record::Audit(audit_record(seq, job, Some(seq), T0)));
        }
        records
    };
    let cases: Vec<(&str, Vec<Record>)> = vec![
        (
            "the same run twice: the later record wins",
            vec![
                Record::PutRun(a(5)),
                Record::PutRun(finished(a(5), Timestamp(9))),
            ],
        ),
        (
            "a run finished before its job's prune is ranked by it",
            vec![
                Record::PutRun(finished(a(4), Timestamp(9))),
                prune(Some("a"), 1),
            ],
        ),
        (
            "a run finished after its job's prune is kept",
            vec![
                prune(Some("a"), 1),
                Record::PutRun(finished(a(4), Timestamp(0))),
            ],
        ),
        (
            "a run rewritten after the prune that deleted it is back",
            vec![
                prune(Some("a"), 0),
                Record::PutRun(finished(a(1), Timestamp(1))),
            ],
        ),
        (
            "a prune of every job after a run, before another",
            vec![
                Record::PutRun(finished(b(5), Timestamp(9))),
                prune(None, 1),
                Record::PutRun(finished(a(6), Timestamp(0))),
            ],
        ),
        (
            "an audit record of a stored run, after the prune that deletes the run, stays",
            vec![
                prune(Some("a"), 0),
                Record::Audit(audit_record(5, "a", Some(2), T0)),
            ],
        ),
        (
            "an audit record of a stored run, before the prune that deletes it, goes",
            vec![
                Record::Audit(audit_record(5, "a", Some(2), T0)),
                prune(Some("a"), 0),
            ],
        ),
        (
            "an audit record of a run not in the batch, after one prune, goes with the next",
            vec![
                prune(Some("b"), 0),
                Record::Audit(audit_record(5, "a", Some(2), T0)),
                prune(Some("a"), 0),
            ],
        ),
        (
            "an audit record rewritten after a prune that deleted its first version",
            vec![
                Record::Audit(audit_record(5, "a", Some(1), T0)),
                prune(Some("a"), 0),
                Record::Audit(audit_record(5, "b", Some(3), T0)),
            ],
        ),
        (
            "a prune of another job leaves a run and its audit record alone",
            vec![
                prune(Some("b"), 0),
                Record::PutRun(finished(a(4), Timestamp(0))),
                Record::Audit(audit_record(5, "a", Some(4), T0)),
                prune(Some("a"), 5),
            ],
        ),
        (
            "two prunes of one job",
            vec![
                prune(Some("a"), 2),
                Record::PutRun(finished(a(4), Timestamp(9))),
                prune(Some("a"), 1),
            ],
        ),
        (
            "puts and deletes of one key: the last wins",
            vec![
                Record::PutJob(once_job("a").into()),
                Record::DeleteJob { id: job_id("a") },
                Record::DeleteJob { id: job_id("b") },
                Record::PutJob(once_job("b").into()),
                Record::PutTombstone(tombstone(1)),
                Record::DeleteTombstone { job: job_id("a") },
                Record::PutTombstone(tombstone(2)),
                Record::PutDelivery(delivery(1, 1)),
                Record::DeleteDelivery {
                    id: keel_core::DeliveryId(1),
                },
                Record::PutDelivery(delivery(2, 1)),
                Record::PutDelivery(delivery(2, 2)),
                Record::PutIncident(incident(1, None)),
                Record::PutIncident(incident(1, Some(T0))),
            ],
        ),
    ];
    for (case, records) in cases {
        let db = TestDb::new().unwrap();
        let store = db.open();
        let epoch = store.restore().unwrap().meta.epoch + 1;
        let mut model = MemStore::store_rules_only();
        let _ = model.restore();
        for (n, records) in [before(), records].into_iter().enumerate() {
            let batch = batch(epoch, n as u64, T0, records);
            store
                .apply(&batch)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            model.apply(&batch);
        }
        let mut expected: Vec<u64> = model.runs().map(|r| r.id().0).collect();
        expected.reverse();
        assert_eq!(all_runs(&store), expected, "{case}: runs");
        for id in &expected {
            let stored = store.run(RunId(*id)).unwrap();
            let modelled = model.runs().find(|r| r.id().0 == *id).cloned();
            assert_eq!(stored, modelled, "{case}: run {id}");
        }
        let expected: Vec<AuditRecord> = model.audit().cloned().collect();
        assert_eq!(all_audit(&store), expected, "{case}: audit");
        assert_eq!(store.read().unwrap(), model.snapshot(), "{case}: snapshot");
        let expected: Vec<Incident> = model.incidents().cloned().collect();
        assert_eq!(store.incidents().unwrap(), expected, "{case}: incidents");
    }
    drop(db);
}

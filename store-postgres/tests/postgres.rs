//! What the conformance suite does not cover and Postgres makes possible or likely: two writers
//! on two connections, NUL bytes in bodies, a connection the server dropped, history paging
//! through indexes, format markers, corrupt rows, and calls from keel-runtime's
//! `spawn_blocking`.

#![allow(clippy::unwrap_used)]

mod common;

use keel_core::{
    AuditQuery, Conflict, ErrorKind, Record, RunId, RunQuery, RunState, Store, StoreError,
};
use keel_harness::conformance::{audit_record, batch, edit, run, T0};
use std::time::Duration;

use keel_store_postgres::{PgStore, FORMAT};

use common::TestDb;

/// A fresh schema, or the end of the test if Postgres tests are skipped explicitly.
macro_rules! db {
    () => {
        match TestDb::new() {
            Some(db) => db,
            None => return,
        }
    };
}

#[test]
fn a_second_writer_deposes_the_first_whose_next_batch_is_refused() {
    let db = db!();
    let (first, second) = (db.open(), db.open());
    let first_epoch = first.restore().unwrap().meta.epoch + 1;
    first
        .apply(&batch(
            first_epoch,
            0,
            T0,
            vec![Record::PutRun(run(1, "a", T0))],
        ))
        .unwrap();

    let snapshot = second.restore().unwrap();
    assert_eq!(
        snapshot.runs.len(),
        1,
        "the second writer sees the first's run"
    );
    let second_epoch = snapshot.meta.epoch + 1;
    assert!(second_epoch > first_epoch);

    let late = batch(
        first_epoch,
        1,
        T0,
        vec![Record::PutRun(run(2, "a", T0.plus_ms(1)))],
    );
    assert_eq!(
        first.apply(&late),
        Err(StoreError::Conflict(Conflict::Deposed {
            batch: first_epoch,
            current: second_epoch
        }))
    );
    assert_eq!(second.run(RunId(2)).unwrap(), None, "nothing of it landed");
    second
        .apply(&batch(
            second_epoch,
            0,
            T0,
            vec![Record::PutRun(run(2, "a", T0.plus_ms(1)))],
        ))
        .unwrap();
    assert!(
        first.run(RunId(2)).unwrap().is_some(),
        "every handle reads it"
    );
}

#[test]
fn a_nul_byte_in_an_error_message_round_trips() {
    let db = db!();
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let failed = edit(run(1, "a", T0), |r| {
        r.state = RunState::Failed;
        r.finished_at = Some(T0);
        r.last_error = Some(Box::new(keel_core::RunError {
            kind: ErrorKind::Permanent,
            message: "read \0 from the device".into(),
            attempt: keel_core::Attempt(1),
            at: T0,
        }));
    });
    let mut audit = audit_record(1, "a", Some(1), T0);
    audit.reason = "nul: \0 and \u{1} and \u{fffd}".into();
    store
        .apply(&batch(
            epoch,
            0,
            T0,
            vec![Record::PutRun(failed.clone()), Record::Audit(audit.clone())],
        ))
        .unwrap();

    let again = db.open();
    assert_eq!(again.run(RunId(1)).unwrap(), Some(failed));
    assert_eq!(again.audit(&AuditQuery::default()).unwrap(), vec![audit]);
    // `json`, not `jsonb`, which would have refused the batch.
    let mut client = db.client();
    let body_type: String = client
        .query_one(
            "SELECT data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'keel_runs' \
             AND column_name = 'body'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(body_type, "json");
}

#[test]
fn a_handle_whose_connection_was_dropped_reconnects_and_restores_the_same_state() {
    let db = db!();
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let records = (1..=3)
        .map(|i| Record::PutRun(run(i, "a", T0.plus_ms(i))))
        .collect();
    store.apply(&batch(epoch, 0, T0, records)).unwrap();
    let before = store.read().unwrap();

    // The server ends the handle's session, as a restart or a failover would.
    let mut admin = db.client();
    let ended = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&db.schema()],
        )
        .unwrap();
    assert_eq!(ended, 1, "the handle's one connection");

    // The first call may see the broken connection (the outcome of an apply would be unknown);
    // a later one reconnects.
    let mut result = store.read();
    if let Err(error) = &result {
        assert!(matches!(error, StoreError::Io(_)), "{error:?}");
        result = store.read();
    }
    assert_eq!(result.unwrap(), before);
    let restored = store.restore().unwrap();
    assert_eq!(restored.runs, before.runs);
    assert_eq!(
        restored.meta.epoch, epoch,
        "the new writer comes after the old one"
    );
}

#[test]
fn a_writer_stalled_inside_a_transaction_does_not_hold_up_its_successor() {
    let db = db!();
    let stalled = PgStore::with_stall_limit(db.config(), Duration::from_millis(300)).unwrap();
    let epoch = stalled.restore().unwrap().meta.epoch + 1;
    stalled
        .apply(&batch(epoch, 0, T0, vec![Record::PutRun(run(1, "a", T0))]))
        .unwrap();
    // Stopped in the middle of a batch, holding the store row lock, as SIGSTOP would leave it.
    stalled.stall_in_a_transaction().unwrap();

    // The successor's restore waits for the lock only until the server ends the stalled
    // session; without the limit it would wait until the stalled process woke (here: never).
    let successor = db.open();
    let (done, restored) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let snapshot = successor.restore().unwrap();
        let _ = done.send((snapshot, successor));
    });
    let (snapshot, successor) = restored
        .recv_timeout(Duration::from_secs(60))
        .expect("the successor's restore is not held up by the stalled writer");
    assert_eq!(snapshot.runs.len(), 1, "the acknowledged batch survives");
    assert!(snapshot.meta.epoch >= epoch);

    // Woken, the stalled writer reconnects and is refused as deposed: it never writes beside
    // its successor.
    let late = batch(epoch, 1, T0, vec![Record::PutRun(run(2, "a", T0))]);
    assert!(
        matches!(
            stalled.apply(&late),
            Err(StoreError::Conflict(Conflict::Deposed { .. }))
        ),
        "a stalled writer's next batch is refused"
    );
    assert_eq!(successor.read().unwrap().runs.len(), 1);
}

#[test]
fn history_pages_walk_every_run_and_audit_record_once() {
    const RUNS: u64 = 1_200;
    let db = db!();
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    for chunk in 0..RUNS / 400 {
        let records = (chunk * 400 + 1..=chunk * 400 + 400)
            .flat_map(|i| {
                let job = ["a", "b", "c"][(i % 3) as usize];
                [
                    Record::PutRun(run(i, job, T0.plus_ms(i))),
                    Record::Audit(audit_record(i, job, Some(i), T0.plus_ms(i))),
                ]
            })
            .collect();
        store.apply(&batch(epoch, chunk, T0, records)).unwrap();
    }
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .runs(&RunQuery {
                job: Some(keel_core::JobId::new("b").unwrap()),
                before,
                limit: 97,
                ..RunQuery::default()
            })
            .unwrap();
        assert!(page.runs.len() <= 97);
        seen.extend(page.runs.iter().map(|r| r.id().0));
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let expected: Vec<u64> = (1..=RUNS).rev().filter(|i| i % 3 == 1).collect();
    assert_eq!(seen, expected);

    let mut seqs = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .audit(&AuditQuery {
                after,
                limit: 250,
                ..AuditQuery::default()
            })
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        seqs.extend(page.iter().map(|r| r.seq));
    }
    assert_eq!(seqs, (1..=RUNS).collect::<Vec<_>>());
}

/// Format 6 deletes, once, the claims that earlier formats kept after their runs were pruned;
/// the claims of stored runs stay and still refuse a second run for their slot.
#[test]
fn a_format_5_store_loses_the_claims_of_its_pruned_runs_on_migration() {
    let db = db!();
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    store
        .apply(&batch(epoch, 0, T0, vec![Record::PutRun(run(1, "a", T0))]))
        .unwrap();
    drop(store);
    // As a format-5 build left it after pruning run 7: its claim is still there.
    let mut client = db.client();
    client
        .batch_execute(
            "INSERT INTO keel_slots (job, slot, run) VALUES ('a', 5, 7); \
             UPDATE keel_meta SET format = 'keel-store-postgres 5'",
        )
        .unwrap();
    let store = db.open();
    let claims: Vec<(String, i64)> = client
        .query("SELECT job, run FROM keel_slots ORDER BY run", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(claims, vec![("a".to_owned(), 1)]);
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let again = store.apply(&batch(epoch, 0, T0, vec![Record::PutRun(run(2, "a", T0))]));
    assert!(
        matches!(
            again,
            Err(StoreError::Conflict(Conflict::SlotTaken {
                owner: RunId(1),
                ..
            }))
        ),
        "{again:?}"
    );
}

#[test]
fn a_newer_format_is_refused_by_name_and_foreign_tables_are_not_adopted() {
    let db = db!();
    drop(db.open());
    let mut client = db.client();
    client
        .execute("UPDATE keel_meta SET format = 'keel-store-postgres 7'", &[])
        .unwrap();
    assert_eq!(
        PgStore::with_config(db.config()).unwrap_err(),
        StoreError::Version {
            found: "keel-store-postgres 7".into(),
            supported: FORMAT.into()
        }
    );

    let other = db!();
    other
        .client()
        .batch_execute("CREATE TABLE keel_jobs (id text)")
        .unwrap();
    match PgStore::with_config(other.config()) {
        Err(StoreError::Version { found, .. }) => assert!(found.contains("keel_jobs"), "{found}"),
        result => panic!("adopted a schema with a foreign keel_jobs: {result:?}"),
    }
}

#[test]
fn a_corrupt_row_is_an_error_naming_its_table_and_key_and_the_rest_answers() {
    let db = db!();
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let records = vec![
        Record::PutRun(run(1, "a", T0)),
        Record::PutRun(run(2, "a", T0.plus_ms(1))),
        Record::Audit(audit_record(1, "a", Some(1), T0)),
    ];
    store.apply(&batch(epoch, 0, T0, records)).unwrap();
    db.client()
        .execute(
            "UPDATE keel_runs SET body = '{\"not\": \"a run\"}' WHERE id = 1",
            &[],
        )
        .unwrap();

    let corrupt = |result: Result<_, StoreError>| match result {
        Err(StoreError::Corrupt { location, .. }) => location,
        other => panic!("expected corrupt data, got {other:?}"),
    };
    let location = corrupt(store.run(RunId(1)).map(|_| ()));
    assert!(
        location.contains("keel_runs") && location.contains("id=1"),
        "{location}"
    );
    corrupt(store.read().map(|_| ()));
    corrupt(store.restore().map(|_| ()));
    // A write touching the run is refused as corrupt too, not applied blind.
    corrupt(store.apply(&batch(epoch, 1, T0, vec![Record::PutRun(run(1, "a", T0))])));
    assert!(store.run(RunId(2)).unwrap().is_some());
    assert_eq!(store.audit(&AuditQuery::default()).unwrap().len(), 1);
}

#[test]
fn the_store_works_from_spawn_blocking_as_keel_runtime_calls_it() {
    let db = db!();
    let store = std::sync::Arc::new(db.open());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stored = runtime.block_on(async move {
        let epoch = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.restore())
                .await
                .unwrap()
                .unwrap()
                .meta
                .epoch
                + 1
        };
        let writer = store.clone();
        tokio::task::spawn_blocking(move || {
            writer.apply(&batch(epoch, 0, T0, vec![Record::PutRun(run(1, "a", T0))]))
        })
        .await
        .unwrap()
        .unwrap();
        tokio::task::spawn_blocking(move || store.run(RunId(1)))
            .await
            .unwrap()
            .unwrap()
    });
    assert_eq!(stored, Some(run(1, "a", T0)));
}

#[test]
fn statements_first_prepared_in_a_refused_batch_serve_the_next_one() {
    let db = db!();
    let epoch = db.open().restore().unwrap().meta.epoch + 1;
    // A new connection whose first statements are prepared in a transaction that rolls back.
    let store = db.open();
    let stale = batch(epoch - 1, 0, T0, vec![Record::PutRun(run(1, "a", T0))]);
    assert!(matches!(
        store.apply(&stale),
        Err(StoreError::Conflict(Conflict::Deposed { .. }))
    ));
    store
        .apply(&batch(epoch, 0, T0, vec![Record::PutRun(run(1, "a", T0))]))
        .unwrap();
    assert_eq!(store.run(RunId(1)).unwrap(), Some(run(1, "a", T0)));
}

#[test]
fn a_restore_in_the_middle_of_a_writers_batches_sees_exactly_the_acknowledged_ones() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const BATCHES_MAX: u64 = 20_000;
    let db = db!();
    let writer = db.open();
    let epoch = writer.restore().unwrap().meta.epoch + 1;
    let acknowledged = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&acknowledged);
    let writing = std::thread::spawn(move || {
        for n in 1..=BATCHES_MAX {
            let records = vec![Record::PutRun(run(n, "a", T0.plus_ms(n)))];
            match writer.apply(&batch(epoch, n, T0, records)) {
                Ok(()) => counter.store(n, Ordering::SeqCst),
                Err(error) => return Some(error),
            }
        }
        None
    });
    // Let the writer get going (a condition with a deadline, not a sleep).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while acknowledged.load(Ordering::SeqCst) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        std::thread::yield_now();
    }
    let snapshot = db.open().restore().unwrap();
    let refusal = writing.join().unwrap();
    assert!(
        matches!(
            refusal,
            Some(StoreError::Conflict(Conflict::Deposed { .. }))
        ),
        "the writer was deposed mid-stream: {refusal:?}"
    );
    let last = acknowledged.load(Ordering::SeqCst);
    let restored: Vec<u64> = snapshot.runs.iter().map(|r| r.id().0).collect();
    assert_eq!(
        restored,
        (1..=last).collect::<Vec<_>>(),
        "every acknowledged batch, and nothing after the restore"
    );
}

#[test]
fn a_batch_whose_write_fails_in_the_database_commits_nothing_not_even_its_prunes() {
    let db = db!();
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let finished = |id| {
        edit(run(id, "a", T0.plus_ms(id)), |r| {
            r.state = RunState::Succeeded;
            r.finished_at = Some(T0);
        })
    };
    store
        .apply(&batch(
            epoch,
            0,
            T0,
            vec![Record::PutRun(finished(1)), Record::PutRun(finished(2))],
        ))
        .unwrap();
    // A prune of every job sits alone in its phase: the batch below is written in two phases,
    // the prune between them, all pipelined with the COMMIT. The second phase's write fails.
    let second = batch(
        epoch,
        1,
        T0,
        vec![
            Record::PutRun(run(3, "b", T0)),
            Record::PruneHistory {
                job: None,
                keep_last: 0,
                finished_before: T0.plus_ms(1),
            },
            Record::Audit(audit_record(1, "b", Some(3), T0)),
        ],
    );
    let mut client = db.client();
    client
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON keel_audit \
             FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
        .unwrap();
    let refused = store.apply(&second);
    assert!(
        matches!(&refused, Err(StoreError::Io(m)) if m.contains("refused by the test")),
        "{refused:?}"
    );
    let reader = db.open();
    assert_eq!(
        reader.run(RunId(3)).unwrap(),
        None,
        "the first phase's write"
    );
    assert_eq!(
        reader.run(RunId(1)).unwrap(),
        Some(finished(1)),
        "the prune between the phases"
    );

    client
        .batch_execute("DROP TRIGGER refuse ON keel_audit")
        .unwrap();
    store.apply(&second).unwrap();
    assert_eq!(reader.run(RunId(1)).unwrap(), None, "pruned now");
    assert_eq!(reader.run(RunId(3)).unwrap(), Some(run(3, "b", T0)));
    assert_eq!(reader.audit(&AuditQuery::default()).unwrap().len(), 1);
}

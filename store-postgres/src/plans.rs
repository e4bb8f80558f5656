//! History queries walk an index and stop at their limit: checked on the plans Postgres makes
//! for the store's own statements over a few thousand rows.

#![allow(clippy::unwrap_used)]

use keel_core::store::AuditQuery;
use keel_core::{Record, RunState, Store};
use keel_harness::conformance::{audit_record, batch, edit, run, T0};
use postgres::types::ToSql;

use crate::common::TestDb;
use crate::sql;

/// The plan of `sql` with `params`, as text.
fn plan(client: &mut postgres::Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
    let rows = client.query(&format!("EXPLAIN {sql}"), params).unwrap();
    rows.iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An index walk with a limit: no sequential scan, and no sort of everything that matched.
fn assert_indexed(plan: &str) {
    assert!(
        plan.contains("Index") && plan.contains("Limit"),
        "not an index walk:\n{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "a sequential scan:\n{plan}");
    assert!(!plan.contains("Sort"), "sorts every match:\n{plan}");
}

#[test]
fn history_pages_walk_an_index_and_stop_at_the_limit() {
    const ROWS: u64 = 4_000;
    let Some(db) = TestDb::new() else { return };
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    for chunk in 0..ROWS / 500 {
        let records = (chunk * 500 + 1..=chunk * 500 + 500)
            .flat_map(|i| {
                let job = format!("job-{}", i % 2);
                [
                    Record::PutRun(run(i, &job, T0.plus_ms(i))),
                    Record::Audit(audit_record(i, &job, Some(i), T0.plus_ms(i))),
                ]
            })
            .collect();
        store.apply(&batch(epoch, chunk, T0, records)).unwrap();
    }
    let mut client = db.client();
    client
        .batch_execute("ANALYZE keel_runs, keel_slots, keel_audit")
        .unwrap();
    let state: Option<String> = None;
    let (before, from, until, limit) = (2_000_i64, i64::MIN, i64::MAX, 51_i64);
    let all: [&(dyn ToSql + Sync); 5] = [&before, &from, &until, &state, &limit];
    assert_indexed(&plan(&mut client, &sql::runs_page(false), &all));
    let job = "job-1";
    let mut of_job = all.to_vec();
    of_job.push(&job);
    assert_indexed(&plan(&mut client, &sql::runs_page(true), &of_job));

    let (after, at, page) = (100_i64, i64::MIN, 50_i64);
    let run = 7_i64;
    let base: [&(dyn ToSql + Sync); 3] = [&after, &at, &page];
    assert_indexed(&plan(&mut client, &sql::audit_page(false, false), &base));
    let mut by_run = base.to_vec();
    by_run.push(&run);
    assert_indexed(&plan(&mut client, &sql::audit_page(true, false), &by_run));
    let mut by_job = base.to_vec();
    by_job.push(&job);
    assert_indexed(&plan(&mut client, &sql::audit_page(false, true), &by_job));

    // And the store's answers through them are right.
    let page = store
        .audit(&AuditQuery {
            run: Some(keel_core::RunId(7)),
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7]);
}

/// The plan of a statement prepared by name (`sql::prepare_named`) with `args`, as a batch
/// runs it: generic, under `sql::GENERIC_PLANS`.
fn generic_plan(client: &mut postgres::Client, name: &str, args: &str) -> String {
    let messages = client
        .simple_query(&format!("EXPLAIN EXECUTE {name}({args})"))
        .unwrap();
    messages
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The generic plans a new session `client` makes for a batch's read, per-job prune and write
/// (`keel_stored`, `keel_prune_jobs`, [`sql::WRITE`]), under the batch's planner settings.
fn batch_plans(client: &mut postgres::Client) -> [String; 3] {
    client.batch_execute(&sql::prepare_named()).unwrap();
    client
        .batch_execute(&format!("PREPARE keel_write AS {}", sql::WRITE))
        .unwrap();
    client
        .batch_execute(&format!("BEGIN; {}", sql::GENERIC_PLANS.join("; ")))
        .unwrap();
    let read = generic_plan(
        client,
        "keel_stored",
        "ARRAY[7, 8]::bigint[], ARRAY['job-7']::text[], ARRAY[7]::bigint[]",
    );
    let prune = generic_plan(
        client,
        "keel_prune_jobs",
        "ARRAY['job-7', 'job-8']::text[], ARRAY[3, 3]::bigint[], ARRAY[0, 0]::bigint[]",
    );
    let write = generic_plan(client, "keel_write", &vec!["NULL"; 28].join(", "));
    client.batch_execute("ROLLBACK").unwrap();
    [read, prune, write]
}

#[test]
fn a_batchs_read_and_prunes_probe_indexes_in_their_generic_plans() {
    const ROWS: u64 = 4_000;
    let Some(db) = TestDb::new() else { return };
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    for chunk in 0..ROWS / 500 {
        let records = (chunk * 500 + 1..=chunk * 500 + 500)
            .flat_map(|i| {
                let job = format!("job-{}", i % 200);
                let run = edit(run(i, &job, T0.plus_ms(i)), |r| {
                    r.state = RunState::Succeeded;
                    r.finished_at = Some(T0.plus_ms(i));
                });
                [
                    Record::PutRun(run),
                    Record::Audit(audit_record(i, &job, Some(i), T0.plus_ms(i))),
                ]
            })
            .collect();
        store.apply(&batch(epoch, chunk, T0, records)).unwrap();
    }
    let mut client = db.client();
    client
        .batch_execute("ANALYZE keel_runs, keel_slots, keel_audit")
        .unwrap();
    let [read, prune, _] = batch_plans(&mut client);
    for plan in [&read, &prune] {
        assert!(!plan.contains("Seq Scan on keel_runs"), "{plan}");
        assert!(!plan.contains("Seq Scan on keel_slots"), "{plan}");
        assert!(!plan.contains("Seq Scan on keel_audit"), "{plan}");
    }
    // Generic: the arrays are parameters, not the values given.
    assert!(read.contains("ANY ($1)"), "{read}");
    assert!(prune.contains("keel_audit_by_run"), "{prune}");
    // The pruned runs' claims go by a probe of their jobs' claims.
    assert!(prune.contains("keel_slots_pkey"), "{prune}");
}

/// The plans a batch's statements get on a connection opened on a new store: each is made
/// once, with the statistics of that moment, and kept until they change (or the store
/// re-plans), so a plan that reads a table whole because it was empty then would cost more
/// with every firing.
/// Checked with the tables never analysed and analysed while empty.
#[test]
fn a_batchs_plans_made_on_an_empty_store_probe_indexes() {
    let Some(db) = TestDb::new() else { return };
    let store = db.open();
    store.restore().unwrap();
    let mut client = db.client();
    for analysed in [false, true] {
        if analysed {
            client
                .batch_execute("ANALYZE keel_runs, keel_slots, keel_audit")
                .unwrap();
        }
        // A new session, as a connection opened on this store would be.
        let [read, prune, write] = batch_plans(&mut db.client());
        for plan in [&read, &prune, &write] {
            assert!(!plan.contains("Seq Scan"), "analysed: {analysed}\n{plan}");
            assert!(!plan.contains("Hash Join"), "analysed: {analysed}\n{plan}");
        }
        assert!(read.contains("keel_slots_pkey"), "{read}");
    }
    drop(client);
}

/// A plan made while the tables were tiny is not kept: after `sql::REPLAN_EVERY` batches the
/// connection plans again, and the read probes each run by its key. (Made on empty tables, the
/// read of runs scans a whole index of `keel_runs`: all plans cost alike then.)
#[test]
fn a_connection_plans_its_batches_again_once_the_tables_grew() {
    let Some(db) = TestDb::new() else { return };
    let store = db.open();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let job = "job-0";
    let one_run = |i: u64| {
        batch(
            epoch,
            i,
            T0,
            vec![Record::PutRun(run(i, job, T0.plus_ms(i)))],
        )
    };
    // The first batch makes the connection's plans, on empty tables whose statistics say so.
    // No autovacuum: its `ANALYZE` would also invalidate the plans, and the test would not
    // show that the store re-plans by itself.
    let mut client = db.client();
    client
        .batch_execute(
            "ALTER TABLE keel_runs SET (autovacuum_enabled = off); \
             ALTER TABLE keel_slots SET (autovacuum_enabled = off); \
             ANALYZE keel_runs, keel_slots",
        )
        .unwrap();
    store.apply(&one_run(1)).unwrap();
    let tiny = store.cached_read_plan(&[1, 2], job, &[1]);
    // The premise: on empty tables a whole-index scan costs what a probe does, and the
    // planner picks one (Postgres 15: `keel_runs_by_job`, whose second column is the id).
    assert!(!tiny.contains("keel_runs_pkey"), "{tiny}");
    // The tables grow behind the connection's back.
    client
        .batch_execute(
            "INSERT INTO keel_runs (id, job, state, created_at, active, body) \
             SELECT g, 'job-' || (g % 100), 'queued', g, false, '{}' \
             FROM generate_series(100000, 119999) g; \
             INSERT INTO keel_slots (job, slot, run) \
             SELECT 'job-' || (g % 100), g, g FROM generate_series(100000, 119999) g",
        )
        .unwrap();
    for i in 2..=u64::from(sql::REPLAN_EVERY) + 1 {
        store.apply(&one_run(i)).unwrap();
    }
    let grown = store.cached_read_plan(&[1, 2], job, &[1]);
    assert!(
        grown.contains("keel_runs_pkey") && grown.contains("keel_slots_pkey"),
        "not planned again, or not probes: before\n{tiny}\nafter\n{grown}"
    );
    assert!(!grown.contains("Seq Scan"), "{grown}");
}

/// The re-plan goes with a batch's own `BEGIN`, whatever isolation level the session defaults
/// to (`DISCARD PLANS` sent before `BEGIN ISOLATION LEVEL READ COMMITTED` took a snapshot, and
/// Postgres then refused the level where the default differs).
#[test]
fn a_re_plan_works_whatever_isolation_level_the_session_defaults_to() {
    let Some(db) = TestDb::new() else { return };
    let store =
        crate::PgStore::connect(&db.url_with("-c default_transaction_isolation=serializable"))
            .unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    for i in 1..=u64::from(sql::REPLAN_EVERY) + 2 {
        let records = vec![Record::PutRun(run(i, "job-0", T0.plus_ms(i)))];
        store
            .apply(&batch(epoch, i, T0, records))
            .unwrap_or_else(|e| panic!("batch {i}: {e}"));
    }
}

//! A database failover, for real: a primary with a streaming replica; the primary crashes, the
//! replica is promoted and takes over its address. The store must notice that its database is
//! now another timeline (which, with asynchronous replication, may lack acknowledged batches)
//! and refuse to read or write until an operator accepts it.

#![allow(clippy::unwrap_used)]

mod common;

use keel_core::{Record, Store, StoreError};
use keel_harness::conformance::{batch, run, T0};
use keel_store_postgres::PgStore;

use common::replica::Pair;

#[test]
fn a_promoted_replica_is_refused_until_accepted_and_a_replica_in_recovery_always() {
    let Some(pair) = Pair::start() else { return };
    let store = PgStore::with_config(pair.primary()).unwrap();
    let epoch = store.restore().unwrap().meta.epoch + 1;
    store
        .apply(&batch(epoch, 0, T0, vec![Record::PutRun(run(1, "a", T0))]))
        .unwrap();
    pair.wait_replayed();

    // A replica in recovery is read-only: keel writes on the primary.
    let refused = PgStore::with_config(pair.replica()).unwrap_err();
    assert!(
        matches!(&refused, StoreError::Io(m) if m.contains("replica in recovery")),
        "{refused:?}"
    );

    pair.fail_over();

    // The live handle's connection broke; its next one reaches the promoted replica at the same
    // address, and is refused: the old primary acknowledged batches the replica may lack.
    let late = batch(epoch, 1, T0, vec![Record::PutRun(run(2, "a", T0))]);
    let mut result = store.apply(&late);
    if matches!(&result, Err(StoreError::Io(_))) {
        result = store.apply(&late);
    }
    let Err(StoreError::Diverged(why)) = result else {
        panic!("the handle writes on a failed-over database: {result:?}");
    };
    assert!(
        why.contains("timeline 1") && why.contains("timeline 2"),
        "names both timelines: {why}"
    );
    // So is a new handle (a restarted daemon, a standby taking over).
    let refused = PgStore::with_config(pair.primary()).unwrap_err();
    assert!(matches!(refused, StoreError::Diverged(_)), "{refused:?}");

    // An operator checked, and accepts the promoted database: the store opens on it again, with
    // what was replicated.
    let (before, now) = PgStore::accept_database(&pair.primary()).unwrap();
    let before = before.expect("the store had recorded its database");
    assert_eq!((before.timeline, now.timeline), (1, 2));
    assert_eq!(
        before.system, now.system,
        "a replica keeps its primary's system id"
    );
    let store = PgStore::with_config(pair.primary()).unwrap();
    let snapshot = store.restore().unwrap();
    assert_eq!(snapshot.runs.len(), 1, "the replicated batch is there");
    let epoch = snapshot.meta.epoch + 1;
    store
        .apply(&batch(
            epoch,
            0,
            T0,
            vec![Record::PutRun(run(2, "a", T0.plus_ms(1)))],
        ))
        .unwrap();
}

//! The store conformance suite (`keel_harness::conformance`), run against a real Postgres: each
//! store is a schema of its own (see `common`).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use keel_harness::conformance::{Harness, Opener};
use keel_store_postgres::PgStore;

use common::TestDb;

/// Holds the first schema, so the server outlives every store the test opens.
struct Pg {
    _server: TestDb,
}

impl Pg {
    /// `None` only if the Postgres tests are skipped explicitly.
    fn new() -> Option<Pg> {
        TestDb::new().map(|db| Pg { _server: db })
    }
}

impl Harness for Pg {
    type Store = PgStore;

    fn fresh(&self) -> Opener<PgStore> {
        // Every handle is a connection of its own, like another process or host.
        let db = Arc::new(TestDb::new().unwrap());
        Box::new(move || db.open())
    }
}

// `return` ends the test when the Postgres tests are skipped (KEEL_SKIP_POSTGRES=1, which
// prints that they were); otherwise `Pg::new` fails loudly if there is no Postgres.
keel_harness::conformance_suite!(match Pg::new() {
    Some(pg) => pg,
    None => return,
});

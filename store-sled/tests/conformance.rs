//! The store conformance suite (`keel_testkit::conformance`), run against sled.

#![allow(clippy::unwrap_used)]

use keel_store_sled::SledStore;
use keel_testkit::conformance::{Harness, Opener};
use keel_testkit::TempDir;

struct Sled;

impl Harness for Sled {
    type Store = SledStore;

    fn fresh(&self) -> Opener<SledStore> {
        let dir = TempDir::new("keel-store-sled-conformance");
        Box::new(move || SledStore::open(dir.path()).unwrap())
    }

    /// sled locks its directory: one handle at a time.
    fn concurrent_handles(&self) -> bool {
        false
    }
}

keel_testkit::conformance_suite!(Sled);

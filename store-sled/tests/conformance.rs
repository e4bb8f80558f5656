//! The store conformance suite (`keel_harness::conformance`), run against sled.

#![allow(clippy::unwrap_used)]

use keel_harness::conformance::{Harness, Opener};
use keel_harness::TempDir;
use keel_store_sled::SledStore;

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

keel_harness::conformance_suite!(Sled);

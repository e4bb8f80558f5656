//! The store conformance suite, run against the simulator's in-memory store: the reference
//! every durable adapter is compared with.

#![allow(clippy::unwrap_used)]

use keel_harness::conformance::{Harness, Opener};
use keel_testkit::SharedMemStore;

struct Memory;

impl Harness for Memory {
    type Store = SharedMemStore;

    fn fresh(&self) -> Opener<SharedMemStore> {
        let store = SharedMemStore::store_rules_only();
        Box::new(move || store.clone())
    }
}

keel_harness::conformance_suite!(Memory);

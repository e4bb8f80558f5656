//! The store conformance suite (`keel_harness::conformance`) against `FsStore`: every handle
//! the suite opens is a new `FsStore` on one directory, like a separate process.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use keel_harness::conformance::{Harness, Opener};
use keel_harness::TempDir;
use keel_store_fs::FsStore;

struct Fs;

impl Harness for Fs {
    type Store = FsStore;

    fn fresh(&self) -> Opener<FsStore> {
        let dir = Arc::new(TempDir::new("keel-store-fs-conformance"));
        Box::new(move || FsStore::open(dir.path()).unwrap())
    }
}

keel_harness::conformance_suite!(Fs);

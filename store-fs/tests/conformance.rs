//! The store conformance suite (`keel_testkit::conformance`) against `FsStore`: every handle
//! the suite opens is a new `FsStore` on one directory, like a separate process.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use keel_store_fs::FsStore;
use keel_testkit::conformance::{Harness, Opener};
use keel_testkit::TempDir;

struct Fs;

impl Harness for Fs {
    type Store = FsStore;

    fn fresh(&self) -> Opener<FsStore> {
        let dir = Arc::new(TempDir::new("keel-store-fs-conformance"));
        Box::new(move || FsStore::open(dir.path()).unwrap())
    }
}

keel_testkit::conformance_suite!(Fs);

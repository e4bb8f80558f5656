//! keel-harness: keel's own test harness, not published.
//!
//! What keel's crates share to test themselves, kept apart from [`keel_testkit`] (the
//! simulator users depend on) so that the published crate carries only what users need:
//!
//! - [`conformance`]: the store conformance suite every durable adapter runs
//!   ([`conformance_suite!`]).
//! - [`fuzzing`]: the bodies of the cargo-fuzz targets (`fuzz/`), replayed on stable by this
//!   crate's `fuzz_corpus` test from the committed corpus.
//! - [`promises`]: what the scheduler promised, tracked and checked the same way by keel's two
//!   model-checking worlds (the sequence proptest and the `core_events` fuzz body).
//! - [`TempDir`]: a temporary directory for store and process tests.
//!
//! Its integration tests are keel's scenario worlds: the model-checked sequences of the core
//! (`tests/sequences/`), supervision, and whole scenarios through the simulator.

#![warn(missing_docs)]

pub mod conformance;
pub mod fuzzing;
pub mod promises;
pub mod tempdir;

pub use tempdir::TempDir;

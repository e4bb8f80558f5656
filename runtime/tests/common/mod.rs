//! What the runtime's test files share: the paused clock's start, a one-shot job, and one test
//! store with controls over its writes.

// Each test file uses part of this.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use keel_core::{Batch, JobId, JobSpec, Record, ScheduleSpec, Store, StoreError, Timestamp};
use keel_testkit::SharedMemStore;

/// Where the paused clock starts.
pub(crate) const T0: Timestamp = Timestamp(1_800_000_000_000);

/// A one-shot job of `kind`, `after_ms` after [`T0`].
pub(crate) fn once(name: &str, kind: &str, after_ms: u64) -> JobSpec {
    JobSpec::new(
        JobId::new(name).expect("a valid job name"),
        kind,
        ScheduleSpec::Once {
            at: T0.plus_ms(after_ms),
        },
    )
}

/// The in-memory model store, with three controls over its writes: a `gate` the test can hold
/// (a write waits while it is held, so the test acts while a grant is being written), a
/// `failing` switch (every write fails, as on a full disk), and the first write carrying a
/// checkpoint named `doomed` failing once.
#[derive(Clone, Debug, Default)]
pub(crate) struct TestStore {
    pub(crate) inner: SharedMemStore,
    pub(crate) gate: Arc<Mutex<()>>,
    pub(crate) failing: Arc<AtomicBool>,
    doomed_failed: Arc<AtomicU32>,
}

impl Store for TestStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let _open = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Io("disk full".into()));
        }
        let doomed = batch.records.iter().any(|r| {
            matches!(r, Record::PutRun(run)
                if run.checkpoint().is_some_and(|c| c.data == "doomed"))
        });
        if doomed && self.doomed_failed.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(StoreError::Io("disk full".into()));
        }
        self.inner.apply(batch)
    }

    keel_testkit::store_reads_from!(inner);
}

//! What the runtime's test files share: the paused clock's start, a one-shot job, a runtime
//! started on that clock, waits for runs to finish, and one test store with controls over its
//! writes.

// Each test file uses part of this.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{
    Batch, Event, JobId, JobSpec, Outcome, Record, Run, RunQuery, ScheduleSpec, StateName, Store,
    StoreError, Timestamp,
};
use keel_runtime::{AttemptContext, Clock, Runtime, RuntimeBuilder, RuntimeHandle};
use keel_testkit::SharedMemStore;
use tokio::sync::broadcast;

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

/// A runtime over `store` on the paused clock, starting at [`T0`], with a fixed seed.
pub(crate) fn paused(store: Arc<dyn Store>) -> RuntimeBuilder {
    Runtime::builder(store)
        .clock(Clock::starting_at(T0))
        .seed(7)
}

/// Starting a runtime the tests expect to start.
pub(crate) trait Started {
    /// Starts the runtime, and returns it with a handle to it.
    async fn started(self) -> (Runtime, RuntimeHandle);
}

impl Started for RuntimeBuilder {
    async fn started(self) -> (Runtime, RuntimeHandle) {
        let runtime = self.start().await.unwrap();
        let handle = runtime.handle();
        (runtime, handle)
    }
}

/// A handler whose every attempt succeeds at once.
pub(crate) async fn succeed(_ctx: AttemptContext) -> Outcome {
    Outcome::ok()
}

/// An attempt that holds `guard` while it runs: the first attempt works on, never reporting,
/// so only an abort ends it; a later one succeeds at once.
pub(crate) async fn hang_first_attempt<G: Send>(ctx: AttemptContext, guard: G) -> Outcome {
    let _guard = guard;
    if ctx.attempt.0 == 1 {
        std::future::pending::<()>().await;
    }
    Outcome::ok()
}

/// The state the next run of `job` finishes in; fails (rather than hang) if none finishes
/// within `guard` of the paused clock.
pub(crate) async fn finished_within(
    events: &mut broadcast::Receiver<Event>,
    job: &str,
    guard: Duration,
) -> StateName {
    let wait = async {
        loop {
            if let Event::RunFinished { job: j, state, .. } = events.recv().await.unwrap() {
                if j.as_str() == job {
                    return state;
                }
            }
        }
    };
    tokio::time::timeout(guard, wait)
        .await
        .expect("the run finishes")
}

/// The runs `store` holds for `job`.
pub(crate) fn stored_runs(store: &impl Store, job: &str) -> Vec<Run> {
    store
        .runs(&RunQuery {
            job: Some(JobId::new(job).unwrap()),
            limit: 1_000,
            ..RunQuery::default()
        })
        .unwrap()
        .runs
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

//! What an embedding application writes: handlers that return `Result` and use `?`, jobs
//! ensured at every start, and results read back through the handle. On tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Ensured, Event, JobId, JobSpec, RunState, ScheduleSpec, StateName, Timestamp};
use keel_runtime::{AttemptContext, Clock, Failure, ResultExt, Runtime};
use keel_testkit::SharedMemStore;

mod common;
use common::T0;

fn id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

/// Fails with an I/O error (through `?`) on its first attempt, then succeeds with a summary;
/// a payload that is not a number fails permanently.
async fn import(ctx: AttemptContext, calls: Arc<AtomicU32>) -> Result<String, Failure> {
    let rows: u32 = ctx.payload.parse().permanent()?;
    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
        Err(std::io::Error::other("upstream 503"))?;
    }
    Ok(format!("{rows} rows"))
}

async fn start(store: &SharedMemStore, calls: &Arc<AtomicU32>, at: Timestamp) -> Runtime {
    let calls = Arc::clone(calls);
    Runtime::builder(Arc::new(store.clone()))
        .clock(Clock::starting_at(at))
        .seed(7)
        .handler("import", move |ctx| import(ctx, Arc::clone(&calls)))
        .start()
        .await
        .unwrap()
}

fn jobs(now: Timestamp) -> [JobSpec; 2] {
    let base = |name: &str, payload: &str| {
        JobSpec::new(id(name), "import", ScheduleSpec::once(now.plus_ms(1_000)))
            .with_payload(payload)
            .with_attempts(3)
    };
    [base("good", "12"), base("bad", "twelve")]
}

#[tokio::test(start_paused = true)]
async fn result_handlers_retry_on_errors_fail_on_permanent_ones_and_jobs_are_ensured_once() {
    let store = SharedMemStore::new();
    let calls = Arc::new(AtomicU32::new(0));
    let runtime = start(&store, &calls, T0).await;
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    for spec in jobs(handle.now()) {
        assert_eq!(handle.ensure_job(spec).await, Ok(Ensured::Added));
    }
    let mut finished = Vec::new();
    while finished.len() < 2 {
        if let Event::RunFinished { job, state, .. } = events.recv().await.unwrap() {
            finished.push((job.to_string(), state));
        }
    }
    finished.sort();
    assert_eq!(
        finished,
        [
            ("bad".to_string(), StateName::FailedDropped),
            ("good".to_string(), StateName::Succeeded)
        ]
    );
    let good = handle.runs_of(id("good"), 10).await.unwrap();
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].attempt().0, 2, "the `?` error was retried");
    assert_eq!(good[0].summary(), Some("12 rows"));
    let bad = &handle.runs_of(id("bad"), 10).await.unwrap()[0];
    assert_eq!((bad.state(), bad.attempt().0), (RunState::FailedDropped, 1));
    let message = &bad.last_error().unwrap().message;
    assert!(message.contains("invalid digit"), "{message}");
    // A finished run is read from the store, with its audit trail.
    let run = handle.run(good[0].id()).await.unwrap().unwrap();
    assert_eq!(run.state(), RunState::Succeeded);
    let audit = handle.audit_of_run(run.id(), 100).await.unwrap();
    assert!(audit.len() >= 3, "{audit:?}");
    assert_eq!(audit.last().unwrap().new, StateName::Succeeded);
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();

    // The next start ensures the same jobs, "in one second" from its own now: both one-shots
    // fired already, so both are done and nothing runs again.
    let runtime = start(&store, &calls, T0.plus_ms(60_000)).await;
    let handle = runtime.handle();
    for spec in jobs(handle.now()) {
        assert!(matches!(
            handle.ensure_job(spec).await,
            Ok(Ensured::Done { .. })
        ));
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(handle.runs_of(id("good"), 10).await.unwrap().len(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "two attempts in total");
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

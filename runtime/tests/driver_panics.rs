//! The driver survives its own panics (SPEC W4): a panic in a step of its loop is caught, the
//! scheduler is rebuilt from the store as a restart would, and only a panic that repeats stops
//! the runtime. On tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_core::outbox::{DeliveryResult, SendRequest};
use keel_core::{Event, JobId, StateName, Store, WorkerId};
use keel_runtime::{
    AttemptContext, BoxFuture, CommandError, Runtime, RuntimeError, RuntimeHandle, Sink,
    PANICS_IN_A_ROW_MAX,
};
use keel_testkit::SharedMemStore;

mod common;
use common::{
    finished_within, hang_first_attempt, once, paused, stored_runs, succeed, Started, TestStore,
};

fn builder(store: Arc<dyn Store>) -> keel_runtime::RuntimeBuilder {
    paused(store).worker(WorkerId::new("panics-test").unwrap())
}

/// A sink whose `label` (called by the driver itself, in its own task) panics the first
/// `panics` times.
#[derive(Debug)]
struct PanickingLabel {
    panics: AtomicU32,
    sent: Arc<AtomicU32>,
}

impl Sink for PanickingLabel {
    fn send(&self, _request: SendRequest) -> BoxFuture<DeliveryResult> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { DeliveryResult::Delivered })
    }

    fn label(&self) -> Option<String> {
        let left = self.panics.load(Ordering::SeqCst);
        if left > 0 {
            self.panics.store(left - 1, Ordering::SeqCst);
            panic!("label exploded");
        }
        Some("boom".into())
    }
}

/// A runtime with one job, `notify`, whose result goes to `sink` (registered as `boom`).
async fn notifying(sink: PanickingLabel) -> (Runtime, RuntimeHandle) {
    let (runtime, handle) = builder(Arc::new(SharedMemStore::new()))
        .handler("work", succeed)
        .sink("boom", sink)
        .started()
        .await;
    let mut spec = once("notify", "work", 1_000);
    spec.sinks = vec!["boom".into()].into_boxed_slice();
    handle.add_job(spec).await.unwrap();
    (runtime, handle)
}

/// Counts attempts running at once: up when created, down when dropped (returned or aborted).
struct Running(Arc<AtomicU32>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The state the next run of `job` finishes in; fails (rather than hang) if none finishes
/// within an hour of the paused clock.
async fn finished(events: &mut tokio::sync::broadcast::Receiver<Event>, job: &str) -> StateName {
    finished_within(events, job, Duration::from_secs(3_600)).await
}

#[allow(clippy::await_holding_lock)]
#[tokio::test(start_paused = true)]
async fn a_command_that_panics_is_survived_and_commands_waiting_for_a_write_get_an_error() {
    let store = TestStore::default();
    let (runtime, handle) = builder(Arc::new(store.clone()))
        .handler("work", succeed)
        .started()
        .await;
    handle
        .add_job(once("later", "work", 3_600_000))
        .await
        .unwrap();

    // A pause whose write is held: it waits for durability when the panic comes.
    let held = store.gate.lock().unwrap();
    let pausing = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.pause_job(JobId::new("later").unwrap()).await })
    };
    tokio::task::yield_now().await;
    let panicked = handle
        .call(|_, _| -> () { panic!("a bug in a command") })
        .await;
    assert!(panicked.is_err(), "{panicked:?}");
    drop(held);
    let paused = pausing.await.unwrap();
    assert!(
        matches!(
            &paused,
            Err(CommandError::Runtime(RuntimeError::Interrupted(why))) if why.contains("a bug in a command")
        ),
        "{paused:?}"
    );

    // The runtime carries on, from what the store holds.
    let mut events = handle.subscribe();
    handle.add_job(once("now", "work", 1_000)).await.unwrap();
    assert_eq!(finished(&mut events, "now").await, StateName::Succeeded);
    handle.sync().await.unwrap();
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panic_stops_this_process_attempts_and_the_rebuilt_scheduler_runs_them_again_once() {
    let store = SharedMemStore::new();
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let attempts = Arc::new(AtomicU32::new(0));
    let (counted, seen, started) = (
        Arc::clone(&running),
        Arc::clone(&most),
        Arc::clone(&attempts),
    );
    let (runtime, handle) = builder(Arc::new(store.clone()))
        .handler("slow", move |ctx: AttemptContext| {
            let now = counted.fetch_add(1, Ordering::SeqCst) + 1;
            seen.fetch_max(now, Ordering::SeqCst);
            started.fetch_add(1, Ordering::SeqCst);
            hang_first_attempt(ctx, Running(Arc::clone(&counted)))
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    handle.add_job(once("slow", "slow", 1_000)).await.unwrap();
    while !matches!(events.recv().await.unwrap(), Event::LeaseGranted { .. }) {}
    handle.sync().await.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    let _ = handle.call(|_, _| -> () { panic!("a core bug") }).await;
    assert_eq!(finished(&mut events, "slow").await, StateName::Succeeded);
    handle.sync().await.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "run again, once");
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "the first attempt was stopped before the second started"
    );
    assert_eq!(running.load(Ordering::SeqCst), 0, "nothing left running");
    let runs = stored_runs(&store, "slow");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].attempt().0, 2);
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_sink_label_that_panics_once_is_survived_and_the_delivery_is_sent() {
    let sent = Arc::new(AtomicU32::new(0));
    let (runtime, handle) = notifying(PanickingLabel {
        panics: AtomicU32::new(1),
        sent: Arc::clone(&sent),
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    handle.sync().await.unwrap();
    assert!(
        sent.load(Ordering::SeqCst) >= 1,
        "delivered after the rebuild"
    );
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panic_that_repeats_stops_the_runtime_with_a_clear_error() {
    let (runtime, _handle) = notifying(PanickingLabel {
        panics: AtomicU32::new(u32::MAX),
        sent: Arc::default(),
    })
    .await;
    let stopped = tokio::time::timeout(Duration::from_secs(600), runtime.wait())
        .await
        .expect("the runtime stops");
    assert_eq!(
        stopped,
        Err(RuntimeError::Panicked("label exploded".into()))
    );
    assert_eq!(
        stopped.unwrap_err().to_string(),
        format!(
            "the runtime failed {PANICS_IN_A_ROW_MAX} times in a row and stopped: label exploded"
        )
    );
}

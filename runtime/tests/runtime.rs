//! The runtime on tokio's paused clock: no test sleeps for real; time moves only when every
//! task is idle, straight to the next timer.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_core::{
    Event, JobId, JobSpec, Outcome, RetryPolicy, RunState, ScheduleSpec, StateName, Store, WorkerId,
};
use keel_runtime::{AttemptContext, CommandError, RuntimeError, RuntimeHandle, StartError};
use keel_testkit::SharedMemStore;
use tokio::sync::broadcast;

mod common;
use common::{hang_first_attempt, once, paused, stored_runs, succeed, Started, TestStore, T0};

fn id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

fn every_second(name: &str, kind: &str) -> JobSpec {
    JobSpec::new(
        id(name),
        kind,
        ScheduleSpec::Cron {
            expr: "* * * * * *".into(),
            zone: "UTC".into(),
        },
    )
}

fn builder(store: &SharedMemStore) -> keel_runtime::RuntimeBuilder {
    paused(Arc::new(store.clone())).worker(WorkerId::new("runtime-test").unwrap())
}

/// Waits (on the paused clock) for the `n`th run of `job` to finish and its record to be
/// durable; returns the states seen.
async fn finished(
    handle: &RuntimeHandle,
    events: &mut broadcast::Receiver<Event>,
    job: &str,
    n: usize,
) -> Vec<StateName> {
    let mut states = Vec::new();
    while states.len() < n {
        if let Event::RunFinished { job: j, state, .. } = events.recv().await.unwrap() {
            if j.as_str() == job {
                states.push(state);
            }
        }
    }
    handle.sync().await.unwrap();
    states
}

/// Adds `spec`, waits (on the paused clock) for its first run to end and its record to be
/// durable, and returns the state it ended in and the stored run.
async fn run_to_end(
    handle: &RuntimeHandle,
    store: &SharedMemStore,
    spec: JobSpec,
) -> (StateName, keel_core::Run) {
    let mut events = handle.subscribe();
    let job = spec.id.clone();
    handle.add_job(spec).await.unwrap();
    let state = finished(handle, &mut events, job.as_str(), 1).await[0];
    (state, stored_runs(store, job.as_str()).remove(0))
}

#[tokio::test(start_paused = true)]
async fn a_cron_job_runs_its_handler_every_second_and_each_run_is_stored() {
    let store = SharedMemStore::new();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let (runtime, handle) = builder(&store)
        .handler("tick", move |_ctx: AttemptContext| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Outcome::ok()
            }
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    handle.add_job(every_second("tick", "tick")).await.unwrap();
    assert!(
        store
            .read()
            .unwrap()
            .jobs
            .iter()
            .any(|j| j.spec.id == id("tick")),
        "add_job returns once the job is durable"
    );
    let states = finished(&handle, &mut events, "tick", 5).await;
    assert_eq!(states, vec![StateName::Succeeded; 5]);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    let runs = stored_runs(&store, "tick");
    assert!(runs.len() >= 5);
    assert!(
        runs.iter()
            .filter(|r| r.state() == RunState::Succeeded)
            .count()
            >= 5
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_a_retryable_failure_and_the_runtime_keeps_going() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store)
        .handler("boom", |_ctx: AttemptContext| async move {
            if true {
                panic!("disk on fire");
            }
            Outcome::ok()
        })
        .handler("tick", succeed)
        .started()
        .await;
    let mut events = handle.subscribe();
    let mut boom = once("boom", "boom", 1_000);
    boom.retry = RetryPolicy {
        attempts_max: 2,
        ..RetryPolicy::default()
    };
    handle.add_job(boom).await.unwrap();
    handle.add_job(every_second("tick", "tick")).await.unwrap();
    let states = finished(&handle, &mut events, "boom", 1).await;
    assert_eq!(states, vec![StateName::Failed]);
    let run = &stored_runs(&store, "boom")[0];
    assert_eq!(run.attempt().0, 2, "the panic was retried");
    let error = run.last_error().unwrap();
    assert!(error.message.contains("disk on fire"), "{}", error.message);
    // Still running: the other job keeps firing.
    finished(&handle, &mut events, "tick", 2).await;
    runtime.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_kind_without_a_handler_is_refused_when_added_and_at_start() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store).handler("tick", succeed).started().await;
    let refused = handle
        .add_job(every_second("typo", "tikc"))
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        CommandError::NoHandler {
            job: id("typo"),
            kind: "tikc".into(),
            registered: vec!["tick".into()],
        }
    );
    assert_eq!(
        refused.to_string(),
        "job typo has kind \"tikc\", and no handler is registered for it (registered: \
         \"tick\"); register one with RuntimeBuilder::handler, or mark the job for external \
         workers"
    );
    // A job for external workers needs no handler here.
    let mut external = every_second("remote", "gpu");
    external.external = true;
    handle.add_job(external).await.unwrap();
    handle.add_job(every_second("tick", "tick")).await.unwrap();
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();

    // A later start without the tick handler is refused before anything fires.
    let refused = builder(&store).start().await.unwrap_err();
    assert_eq!(
        refused,
        StartError::NoHandler {
            job: id("tick"),
            kind: "tick".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_handler_is_asked_to_stop_then_killed_at_its_timeout() {
    let store = SharedMemStore::new();
    let cancelled_seen = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&cancelled_seen);
    let (runtime, handle) = builder(&store)
        .handler("hang", move |mut ctx: AttemptContext| {
            let seen = Arc::clone(&seen);
            async move {
                ctx.cancelled().await;
                seen.fetch_add(1, Ordering::SeqCst);
                // Ignores the request and hangs on.
                std::future::pending::<()>().await;
                Outcome::ok()
            }
        })
        .started()
        .await;
    let mut spec = once("hang", "hang", 1_000);
    spec.timeout_ms = Some(5_000);
    spec.retry = RetryPolicy {
        attempts_max: 1,
        ..RetryPolicy::default()
    };
    let (state, run) = run_to_end(&handle, &store, spec).await;
    assert_eq!(state, StateName::Failed);
    assert_eq!(
        cancelled_seen.load(Ordering::SeqCst),
        1,
        "asked to stop first"
    );
    let error = run.last_error().unwrap();
    assert_eq!(error.kind, keel_core::ErrorKind::TimedOut, "{error:?}");
    // Asked to stop at 1 s + 5 s, killed no later than the backstop at 1 s + 3 x 5 s.
    assert!(error.at <= T0.plus_ms(16_000), "{error:?}");
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_saved_by_one_attempt_is_where_the_next_resumes() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store)
        .handler("copy", |ctx: AttemptContext| async move {
            match &ctx.checkpoint {
                None => {
                    ctx.checkpoint("copied 40 of 100").await.unwrap();
                    Outcome::Retryable {
                        message: "connection reset".into(),
                    }
                }
                Some(checkpoint) => Outcome::Success {
                    summary: Some(format!("resumed from: {}", checkpoint.data)),
                    artifacts: Default::default(),
                },
            }
        })
        .started()
        .await;
    let (state, run) = run_to_end(&handle, &store, once("copy", "copy", 1_000)).await;
    assert_eq!(state, StateName::Succeeded);
    assert_eq!(run.attempt().0, 2);
    assert_eq!(run.summary(), Some("resumed from: copied 40 of 100"));
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_external_worker_claims_completes_and_a_stale_token_is_refused() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store).started().await;
    let mut events = handle.subscribe();
    let mut spec = once("render", "gpu", 1_000);
    spec.external = true;
    handle.add_job(spec).await.unwrap();
    let worker = WorkerId::new("gpu-box-1").unwrap();
    // Nothing is queued before the slot.
    assert_eq!(
        handle
            .claim(worker.clone(), vec!["gpu".into()])
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempt = handle
        .claim(worker.clone(), vec!["gpu".into()])
        .await
        .unwrap()
        .expect("the queued run is granted");
    assert_eq!(attempt.lease.owner, worker);
    let stored = store.run(attempt.run).unwrap().unwrap();
    assert_eq!(
        stored.lease().map(|l| l.token),
        Some(attempt.lease.token),
        "the grant is durable before the claim returns"
    );
    let stale = keel_core::FencingToken(attempt.lease.token.0 - 1);
    assert!(matches!(
        handle.complete(attempt.run, stale, Outcome::ok()).await,
        Err(CommandError::Rejected(
            keel_core::Rejected::StaleToken { .. }
        ))
    ));
    handle
        .complete(attempt.run, attempt.lease.token, Outcome::ok())
        .await
        .unwrap();
    assert_eq!(
        finished(&handle, &mut events, "render", 1).await,
        vec![StateName::Succeeded]
    );
    assert_eq!(
        store.run(attempt.run).unwrap().unwrap().state(),
        RunState::Succeeded
    );
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// SPEC O1: attempts get the budget to finish; those still running near its end are asked to
/// stop, and what a shutdown stops uses no attempt and resumes at the next start.
#[tokio::test(start_paused = true)]
async fn shutdown_lets_attempts_finish_and_what_it_stops_resumes_without_using_an_attempt() {
    let store = SharedMemStore::new();
    let asked_at = Arc::new(std::sync::Mutex::new(None));
    let asked = Arc::clone(&asked_at);
    let (runtime, handle) = builder(&store)
        .handler("quick", |_ctx: AttemptContext| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Outcome::ok()
        })
        .handler("polite", move |mut ctx: AttemptContext| {
            let asked = Arc::clone(&asked);
            async move {
                ctx.cancelled().await;
                *asked.lock().unwrap() = Some(tokio::time::Instant::now());
                Outcome::Cancelled {
                    reason: "asked to stop".into(),
                }
            }
        })
        .handler("stubborn", |_ctx: AttemptContext| async move {
            std::future::pending::<()>().await;
            Outcome::ok()
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    for kind in ["quick", "polite", "stubborn"] {
        let job = once(kind, kind, 1_000).with_attempts(1);
        handle.add_job(job).await.unwrap();
    }
    let mut granted = 0;
    while granted < 3 {
        if let Event::LeaseGranted { .. } = events.recv().await.unwrap() {
            granted += 1;
        }
    }
    let started = tokio::time::Instant::now();
    runtime.shutdown(Duration::from_secs(10)).await.unwrap();
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(10),
        "kept to its budget: {took:?}"
    );
    let asked = asked_at.lock().unwrap().expect("polite was asked to stop");
    assert_eq!(
        asked - started,
        Duration::from_secs(5),
        "attempts run undisturbed for the budget less the stop window (half of 10 s)"
    );
    let run = |job: &str| stored_runs(&store, job)[0].clone();
    assert_eq!(
        run("quick").state(),
        RunState::Succeeded,
        "it finished in time"
    );
    for job in ["polite", "stubborn"] {
        let run = run(job);
        assert!(
            matches!(run.state(), RunState::BackingOff { .. }),
            "{job}: {:?}",
            run.state()
        );
        assert_eq!((run.shutdowns(), run.attempts_counted()), (1, 0), "{job}");
    }

    // The next start resumes both at once, with their one attempt still to use.
    let runtime = builder(&store)
        .handler("quick", succeed)
        .handler("polite", succeed)
        .handler("stubborn", succeed)
        .start()
        .await
        .unwrap();
    let mut events = runtime.handle().subscribe();
    finished(&runtime.handle(), &mut events, "polite", 1).await;
    runtime.handle().sync().await.unwrap();
    for job in ["polite", "stubborn"] {
        let run = run(job);
        assert_eq!(
            (run.state(), run.attempt().0),
            (RunState::Succeeded, 2),
            "{job}"
        );
    }
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_runtime_deposed_by_another_process_stops() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store).handler("tick", succeed).started().await;
    handle.add_job(every_second("tick", "tick")).await.unwrap();
    // Another process restores from the same store: it is the writer now.
    let _ = store.restore().unwrap();
    let result = runtime.wait().await;
    assert!(
        matches!(result, Err(RuntimeError::Deposed(_))),
        "{result:?}"
    );
    // A handle used after that says why, not just that the runtime is gone.
    let answer = handle.jobs().await;
    assert!(
        matches!(answer, Err(RuntimeError::Deposed(_))),
        "{answer:?}"
    );
}

/// A store whose database "fails over" to one that may lack acknowledged writes.
#[derive(Debug)]
struct Diverging {
    inner: SharedMemStore,
    diverged: std::sync::atomic::AtomicBool,
}

impl Store for Diverging {
    fn apply(&self, batch: &keel_core::Batch) -> Result<(), keel_core::StoreError> {
        if self.diverged.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(keel_core::StoreError::Diverged(
                "timeline 1 became 2".into(),
            ));
        }
        self.inner.apply(batch)
    }
    keel_testkit::store_reads_from!(inner);
}

#[tokio::test(start_paused = true)]
async fn a_runtime_whose_database_diverged_stops_instead_of_retrying() {
    let store = Arc::new(Diverging {
        inner: SharedMemStore::new(),
        diverged: false.into(),
    });
    let (runtime, handle) = paused(Arc::clone(&store) as Arc<dyn Store>)
        .worker(WorkerId::new("runtime-test").unwrap())
        .handler("tick", succeed)
        .started()
        .await;
    handle.add_job(every_second("tick", "tick")).await.unwrap();
    store
        .diverged
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let result = runtime.wait().await;
    assert!(
        matches!(&result, Err(RuntimeError::Diverged(why)) if why.contains("timeline 1 became 2")),
        "{result:?}"
    );
    let answer = handle.jobs().await;
    assert!(
        matches!(answer, Err(RuntimeError::Diverged(_))),
        "{answer:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_stops_the_runtime() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store)
        .handler("tick", succeed)
        .handler("hang", |_ctx: AttemptContext| async move {
            std::future::pending::<()>().await;
            Outcome::ok()
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    // A hung attempt holds a sender to the driver: it must not keep the runtime alive.
    handle.add_job(once("hang", "hang", 500)).await.unwrap();
    handle.add_job(every_second("tick", "tick")).await.unwrap();
    finished(&handle, &mut events, "tick", 2).await;
    drop(handle);
    drop(runtime);
    let before = stored_runs(&store, "tick").len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        stored_runs(&store, "tick").len() <= before + 1,
        "a runtime nobody can reach kept firing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_claim_under_the_runtimes_own_name_is_refused() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store).started().await;
    let mut spec = once("render", "gpu", 1_000);
    spec.external = true;
    handle.add_job(spec).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let own = WorkerId::new("runtime-test").unwrap();
    assert!(matches!(
        handle.claim(own, vec!["gpu".into()]).await,
        Err(CommandError::ReservedWorker { .. })
    ));
    // The run is still there for a real worker.
    let worker = WorkerId::new("gpu-box").unwrap();
    assert!(handle
        .claim(worker, vec!["gpu".into()])
        .await
        .unwrap()
        .is_some());
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A runtime over `store`, on the paused clock.
fn gated_builder(store: &TestStore) -> keel_runtime::RuntimeBuilder {
    paused(Arc::new(store.clone()))
}

// Holding the store's write across awaits is the point: the driver works while it waits.
#[allow(clippy::await_holding_lock)]
#[tokio::test(start_paused = true)]
async fn a_claim_whose_run_is_cancelled_while_its_grant_is_written_gets_nothing() {
    let store = TestStore::default();
    let (runtime, handle) = gated_builder(&store).started().await;
    let mut spec = once("render", "gpu", 1_000);
    spec.external = true;
    handle.add_job(spec).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    handle.sync().await.unwrap();
    let run = stored_runs(&store.inner, "render")[0].id();
    // Hold the store while the claim's grant is written, and cancel the run meanwhile.
    let held = store.gate.lock().unwrap();
    let claimer = handle.clone();
    let claim = tokio::spawn(async move {
        claimer
            .claim(WorkerId::new("gpu-box").unwrap(), vec!["gpu".into()])
            .await
    });
    let canceller = handle.clone();
    let cancel = tokio::spawn(async move { canceller.cancel_run(run).await });
    tokio::task::yield_now().await;
    drop(held);
    cancel.await.unwrap().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), claim)
        .await
        .expect("the claimer is answered")
        .unwrap();
    assert_eq!(answer.unwrap(), None, "a cancelled run is not handed out");
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// Sets a flag when dropped: proves a handler's future was dropped (its task aborted).
struct DropFlag(Arc<AtomicU32>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_whose_lease_is_reclaimed_is_stopped_not_left_running() {
    let store = SharedMemStore::new();
    let dropped = Arc::new(AtomicU32::new(0));
    let flag = Arc::clone(&dropped);
    let (runtime, handle) = builder(&store)
        .handler("work", move |ctx: AttemptContext| {
            hang_first_attempt(ctx, DropFlag(Arc::clone(&flag)))
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    handle.add_job(once("work", "work", 1_000)).await.unwrap();
    while !matches!(events.recv().await.unwrap(), Event::LeaseGranted { .. }) {}
    // The watchdog sees the lease long expired (as after a stall longer than TTL + grace).
    handle
        .call(|core, now| core.handle_timeout(now.plus_ms(3_600_000)))
        .await
        .unwrap();
    let states = finished(&handle, &mut events, "work", 1).await;
    assert_eq!(states, vec![StateName::Succeeded]);
    assert!(
        dropped.load(Ordering::SeqCst) >= 2,
        "the first attempt was aborted, not left running beside the second"
    );
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

// SPEC C1: a failed checkpoint save returns the error to the caller, and the next save is
// not throttled away.
#[tokio::test(start_paused = true)]
async fn a_checkpoint_the_store_fails_to_write_is_an_error_for_the_handler() {
    let store = TestStore::default();
    let (runtime, handle) = gated_builder(&store)
        .handler("save", |ctx: AttemptContext| async move {
            let failed = ctx.checkpoint("doomed").await;
            let retried = ctx.checkpoint("second").await;
            Outcome::Success {
                summary: Some(format!("{failed:?} / {retried:?}")),
                artifacts: Default::default(),
            }
        })
        .started()
        .await;
    let (state, run) = run_to_end(&handle, &store.inner, once("save", "save", 1_000)).await;
    assert_eq!(state, StateName::Succeeded);
    let summary = run.summary().unwrap();
    assert!(
        summary.starts_with("Err(Failed { seq: 1, error: \"store I/O failed: disk full\" })"),
        "{summary}"
    );
    assert!(summary.ends_with("Ok(Saving { seq: 2 })"), "{summary}");
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

// A save answered by a newer save's acknowledgement: the shutdown flush writes a throttled save
// while an older one is still being written, and both callers must be answered.
#[allow(clippy::await_holding_lock)]
#[tokio::test(start_paused = true)]
async fn a_checkpoint_superseded_by_a_flushed_save_is_still_answered() {
    let store = TestStore::default();
    let go = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&go);
    let (runtime, handle) = gated_builder(&store)
        .handler("save", move |ctx: AttemptContext| {
            let signal = Arc::clone(&signal);
            async move {
                signal.notified().await;
                let (a, b) = tokio::join!(ctx.checkpoint("a"), ctx.checkpoint("b"));
                Outcome::Success {
                    summary: Some(format!("{a:?} / {b:?}")),
                    artifacts: Default::default(),
                }
            }
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    handle.add_job(once("save", "save", 1_000)).await.unwrap();
    while !matches!(events.recv().await.unwrap(), Event::LeaseGranted { .. }) {}
    handle.sync().await.unwrap();
    // Hold every write, let the handler save twice (the second is throttled), then shut down:
    // the flush writes the second save while the first is still in flight.
    let held = store.gate.lock().unwrap();
    go.notify_one();
    while !matches!(
        events.recv().await.unwrap(),
        Event::CheckpointThrottled { .. }
    ) {}
    handle.begin_shutdown(Duration::from_secs(60));
    tokio::task::yield_now().await;
    drop(held);
    let stopped = tokio::time::timeout(Duration::from_secs(30), runtime.wait()).await;
    assert!(stopped.is_ok(), "the handler never got its answer");
    let run = &stored_runs(&store.inner, "save")[0];
    let summary = run.summary().unwrap_or_default();
    assert!(
        summary.starts_with("Ok(Saving { seq: 1 })") && summary.contains("Ok(Throttled"),
        "{run:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_missing_its_artifacts_is_retried_at_once() {
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store)
        .handler("report", |ctx: AttemptContext| async move {
            let mut artifacts = std::collections::BTreeMap::new();
            if ctx.attempt.0 > 1 {
                artifacts.insert("pdf".to_string(), "s3://reports/1.pdf".to_string());
            }
            Outcome::Success {
                summary: None,
                artifacts,
            }
        })
        .started()
        .await;
    let mut spec = once("report", "report", 1_000);
    spec.required_artifacts = vec!["pdf".to_string()].into();
    let (state, run) = run_to_end(&handle, &store, spec).await;
    assert_eq!(state, StateName::Succeeded);
    assert_eq!(run.attempt().0, 2);
    // Given back at once, not left to its lease (30 s TTL + 10 s grace).
    let took = run.finished_at().unwrap().ms_since(run.created_at());
    assert!(took < 30_000, "the retry waited {took} ms");
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_tiny_lease_ttl_is_renewed_in_time() {
    let store = SharedMemStore::new();
    let mut config = keel_core::Config::default();
    config.lease.ttl_ms = 80;
    config.lease.grace_ms = 0;
    let (runtime, handle) = builder(&store)
        .config(config)
        .handler("slow", |_ctx: AttemptContext| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Outcome::ok()
        })
        .started()
        .await;
    let (state, run) = run_to_end(&handle, &store, once("slow", "slow", 1_000)).await;
    assert_eq!(state, StateName::Succeeded);
    assert_eq!(
        (run.attempt().0, run.lost()),
        (1, 0),
        "the lease was never reclaimed"
    );
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A sink made on demand (`RuntimeBuilder::sink_factory`): a job added while the runtime runs
/// delivers to a name no sink was registered under at start.
#[tokio::test(start_paused = true)]
async fn a_sink_factory_makes_the_sink_of_a_job_added_while_running() {
    use keel_core::outbox::{DeliveryResult, DeliveryStatus, OutboxEvent, SendRequest};
    use keel_runtime::{BoxFuture, Sink};

    struct Recorder(Arc<std::sync::Mutex<Vec<String>>>, String);
    impl Sink for Recorder {
        fn send(&self, request: SendRequest) -> BoxFuture<DeliveryResult> {
            let job = request.payload.run_result().map(|r| r.job.to_string());
            let line = format!("{} {}", self.1, job.unwrap_or_default());
            self.0.lock().unwrap().push(line);
            Box::pin(async { DeliveryResult::Delivered })
        }
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let made = Arc::clone(&seen);
    let asked = Arc::new(AtomicU32::new(0));
    let factory_calls = Arc::clone(&asked);
    let store = SharedMemStore::new();
    let (runtime, handle) = builder(&store)
        .handler("tick", succeed)
        .sink_factory(move |name| {
            factory_calls.fetch_add(1, Ordering::SeqCst);
            let sink = Recorder(Arc::clone(&made), name.to_string());
            name.starts_with("rec:")
                .then(|| Arc::new(sink) as Arc<dyn Sink>)
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    for (job, sink) in [("a", "rec:ops"), ("b", "nowhere"), ("c", "rec:ops")] {
        let spec = once(job, "tick", 1_000).with_sinks([sink]);
        handle.add_job(spec).await.unwrap();
    }
    let mut ended = Vec::new();
    while ended.len() < 3 {
        if let Event::Delivery(OutboxEvent::Finished { sink, status, .. }) =
            events.recv().await.unwrap()
        {
            ended.push((sink.to_string(), status));
        }
    }
    ended.sort();
    assert_eq!(
        ended,
        [
            ("nowhere".to_string(), DeliveryStatus::Permanent),
            ("rec:ops".to_string(), DeliveryStatus::Success),
            ("rec:ops".to_string(), DeliveryStatus::Success),
        ]
    );
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["rec:ops a", "rec:ops c"]);
    // "rec:ops" was made once and kept; "nowhere" was asked for and refused.
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// SPEC O5: while the store fails, reads of what the scheduler holds are answered at once (a
/// job accepted but not yet durable included), and the end of the outage is an event.
#[tokio::test(start_paused = true)]
async fn reads_answer_while_the_store_fails_and_its_recovery_is_announced() {
    let store = TestStore::default();
    let (runtime, handle) = gated_builder(&store)
        .handler("tick", succeed)
        .started()
        .await;
    let mut events = handle.subscribe();
    store.failing.store(true, Ordering::SeqCst);
    // The add waits for a durable write, which does not come.
    let adding = tokio::spawn({
        let handle = handle.clone();
        async move { handle.add_job(every_second("late", "tick")).await }
    });
    let mut failures = 0;
    while failures < 3 {
        if let Event::PersistFailed { .. } = events.recv().await.unwrap() {
            failures += 1;
        }
    }
    assert!(!adding.is_finished(), "the add waits for the store");
    let jobs = handle.jobs().await.unwrap();
    assert_eq!(
        jobs.len(),
        1,
        "memory answers, without waiting for the store"
    );
    assert_eq!(handle.job_count().await.unwrap(), 1);
    let late = JobId::new("late").unwrap();
    let job = handle
        .job(&late)
        .await
        .unwrap()
        .expect("the job, from memory");
    assert_eq!(job, jobs[0]);
    let unknown = JobId::new("never-added").unwrap();
    assert_eq!(handle.job(&unknown).await.unwrap(), None);
    store.failing.store(false, Ordering::SeqCst);
    adding.await.unwrap().unwrap();
    loop {
        if let Event::StoreRecovered { failures, .. } = events.recv().await.unwrap() {
            assert!(failures >= 3, "{failures}");
            break;
        }
    }
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

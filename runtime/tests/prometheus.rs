//! The Prometheus recorder: what the runtime records, rendered as an application would
//! serve it (the keel daemon serves it on its HTTP API: cli/tests/e2e_http.rs).

#![allow(clippy::unwrap_used)]

use keel_runtime::metrics_names as m;
use keel_runtime::prometheus;

#[test]
fn renders_the_metrics_recorded_through_the_facade_and_installs_once() {
    let metrics = prometheus::install_recorder().unwrap();
    metrics::counter!("keel_test_scrapes_total", "sink" => "hook").increment(3);
    metrics::counter!(m::RETRIES).increment(1);
    let text = metrics.render();
    assert!(
        text.contains("keel_test_scrapes_total{sink=\"hook\"} 3"),
        "{text}"
    );
    assert!(text.contains("keel_retries_total 1"), "{text}");
    // A second call returns the same recorder rather than failing.
    let again = prometheus::install_recorder().unwrap();
    assert!(again.render().contains("keel_test_scrapes_total"));
}

/// A real run through the runtime records the counters and histograms users scrape.
#[tokio::test]
async fn a_run_records_its_counters_and_histograms() {
    use std::sync::Arc;

    use keel_core::{Event, JobId, JobSpec, Outcome, ScheduleSpec};
    use keel_runtime::{AttemptContext, Clock, Runtime};

    let metrics = prometheus::install_recorder().unwrap();
    let store = Arc::new(keel_testkit::SharedMemStore::new());
    let clock = Clock::system();
    let runtime = Runtime::builder(store)
        .clock(clock)
        .handler("work", |_ctx: AttemptContext| async move { Outcome::ok() })
        .start()
        .await
        .unwrap();
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    let at = clock.now().plus_ms(200);
    let spec = JobSpec::new(
        JobId::new("metered").unwrap(),
        "work",
        ScheduleSpec::Once { at },
    );
    handle.add_job(spec).await.unwrap();
    while !matches!(events.recv().await.unwrap(), Event::RunFinished { .. }) {}
    handle.sync().await.unwrap();
    let response = metrics.render();
    for name in [
        m::ATTEMPT_SECONDS,
        m::FIRING_LATENESS_SECONDS,
        m::ATTEMPTS_FINISHED,
        m::RUNS_FINISHED,
        m::LEASE_GRANTS,
        m::BATCHES,
    ] {
        assert!(response.contains(name), "{name} missing from:\n{response}");
    }
    assert!(
        response.contains("keel_runs_finished_total{job=\"metered\",state=\"succeeded\"} 1")
            && response.contains("keel_job_last_success_timestamp_seconds{job=\"metered\"}"),
        "{response}"
    );
    runtime
        .shutdown(std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

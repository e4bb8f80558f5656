//! The Prometheus endpoint, over real sockets (real time: see tests/sinks.rs for why).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use keel_runtime::metrics_names as m;
use keel_runtime::prometheus::{self, PrometheusExporter, ServeError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one raw HTTP/1.1 request and returns the whole response (the server closes).
async fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn serves_the_metrics_recorded_through_the_facade() {
    let server = prometheus::serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    metrics::counter!("keel_test_scrapes_total", "sink" => "hook").increment(3);
    metrics::counter!(m::RETRIES).increment(1);

    let response = http(addr, "GET", "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("text/plain; version=0.0.4"), "{response}");
    assert!(
        response.contains("keel_test_scrapes_total{sink=\"hook\"} 3"),
        "{response}"
    );
    assert!(response.contains("keel_retries_total 1"), "{response}");

    let response = http(addr, "GET", "/").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    let response = http(addr, "POST", "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    let response = http(addr, "HEAD", "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\n"), "no body: {response}");

    // Stopping the server closes the listener.
    server.stop();
    tokio::task::yield_now().await;
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the listener closed");
}

#[tokio::test]
async fn a_non_loopback_address_is_refused_unless_allowed() {
    for addr in ["0.0.0.0:0", "192.0.2.1:9464", "[::]:0"] {
        let addr: SocketAddr = addr.parse().unwrap();
        assert_eq!(
            prometheus::serve(addr).await.unwrap_err(),
            ServeError::NonLoopback(addr)
        );
    }
    // Explicitly allowed, a wildcard address serves (and is reachable over loopback).
    let server = PrometheusExporter::new("0.0.0.0:0".parse().unwrap())
        .allow_non_loopback(true)
        .serve()
        .await
        .unwrap();
    let local: SocketAddr = format!("127.0.0.1:{}", server.local_addr().port())
        .parse()
        .unwrap();
    let response = http(local, "GET", "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

/// A real run through the runtime records the counters and histograms users scrape.
#[tokio::test]
async fn a_run_records_its_counters_and_histograms() {
    use std::sync::Arc;

    use keel_core::{Event, JobId, JobSpec, Outcome, ScheduleSpec};
    use keel_runtime::{AttemptContext, Clock, Runtime};

    let server = prometheus::serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
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
    let response = http(server.local_addr(), "GET", "/metrics").await;
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

//! The ready-made sinks: the command sink against `sh` scripts and, with the `webhook` feature,
//! the webhook sink against a scripted local HTTP server.
//!
//! These tests use real time: with tokio's clock paused, the runtime idles while it waits on a
//! socket or a child process, and the paused clock would jump straight to the sink's timeout.
//! Nothing sleeps to synchronise: tests wait for requests and events, with a generous
//! `tokio::time::timeout` as a guard against hanging.

#![allow(clippy::unwrap_used)]

mod command;
#[cfg(feature = "webhook")]
mod webhook;

use std::time::Duration;

use keel_core::outbox::{DeliveryId, DeliveryPayload, DeliveryResult, SendRequest};
use keel_core::{JobId, StateName, Timestamp};
use keel_runtime::Sink;

const T0: Timestamp = Timestamp(1_800_000_000_000);

/// A guard against a test hanging; never reached when the code under test works.
const GUARD: Duration = Duration::from_secs(20);

fn request(id: u64, attempt: u32) -> SendRequest {
    SendRequest {
        id: DeliveryId(id),
        sink: "hook".into(),
        payload: DeliveryPayload {
            run: keel_core::RunId(12),
            job: JobId::new("report").unwrap(),
            state: StateName::Succeeded,
            summary: Some("42 rows".into()),
            error: None,
            finished_at: T0,
        },
        attempt,
    }
}

fn assert_document(json: &serde_json::Value, id: &str, attempt: u32) {
    assert_eq!(json["delivery_id"], id, "{json}");
    assert_eq!(json["sink"], "hook", "{json}");
    assert_eq!(json["attempt"], attempt, "{json}");
    assert_eq!(json["run"], 12, "{json}");
    assert_eq!(json["job"], "report", "{json}");
    assert_eq!(json["state"], "succeeded", "{json}");
    assert_eq!(json["summary"], "42 rows", "{json}");
    assert_eq!(json["error"], serde_json::Value::Null, "{json}");
    assert_eq!(json["finished_at"], T0.0, "{json}");
}

/// Sends `sink` a delivery it cannot finish within its timeout, and asserts the attempt ended
/// transient, as timed out, in less than `within` of real time.
async fn assert_times_out(sink: &impl Sink, within: Duration) {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(GUARD, sink.send(request(1, 1)))
        .await
        .unwrap();
    let (error, _) = transient(result);
    assert!(error.contains("timed out"), "{error}");
    assert!(started.elapsed() < within);
}

/// The error and the asked-for delay of a transient result; panics on any other.
fn transient(result: DeliveryResult) -> (String, Option<u64>) {
    match result {
        DeliveryResult::Transient {
            error,
            retry_after_ms,
        } => (error, retry_after_ms),
        other => panic!("expected transient, got {other:?}"),
    }
}

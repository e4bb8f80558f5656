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

use keel_core::outbox::{DeliveryId, DeliveryPayload, DeliveryResult, RunResult, SendRequest};
use keel_core::{JobId, StateName, Timestamp};
use keel_runtime::Sink;

const T0: Timestamp = Timestamp(1_800_000_000_000);

/// A guard against a test hanging; never reached when the code under test works.
const GUARD: Duration = Duration::from_secs(20);

fn request(id: u64, attempt: u32) -> SendRequest {
    SendRequest {
        id: DeliveryId(id),
        sink: "hook".into(),
        payload: DeliveryPayload::Run(RunResult {
            run: keel_core::RunId(12),
            job: JobId::new("report").unwrap(),
            state: StateName::Succeeded,
            summary: Some("42 rows".into()),
            error: None,
            finished_at: T0,
        }),
        attempt,
    }
}

/// A run result's document, byte for byte as sinks have always received it: adding incident
/// notifications to the outbox must not change what a run result's receiver parses.
#[test]
fn a_run_results_document_is_byte_for_byte_what_it_was() {
    let mut failed = request(7, 2);
    if let DeliveryPayload::Run(result) = &mut failed.payload {
        result.state = StateName::Failed;
        result.summary = None;
        result.error = Some(keel_core::RunError {
            kind: keel_core::ErrorKind::Permanent,
            message: "exit 2".into(),
            attempt: keel_core::Attempt(3),
            at: T0,
        });
    }
    let body = String::from_utf8(keel_runtime::sinks::delivery_json(&failed).unwrap()).unwrap();
    assert_eq!(
        body,
        concat!(
            r#"{"delivery_id":"delivery-7","sink":"hook","attempt":2,"run":12,"job":"report","#,
            r#""state":"failed","summary":null,"error":{"kind":"permanent","message":"exit 2","#,
            r#""attempt":3,"at":1800000000000},"finished_at":1800000000000}"#
        )
    );
    let body = String::from_utf8(keel_runtime::sinks::delivery_json(&request(1, 1)).unwrap());
    assert_eq!(
        body.unwrap(),
        concat!(
            r#"{"delivery_id":"delivery-1","sink":"hook","attempt":1,"run":12,"job":"report","#,
            r#""state":"succeeded","summary":"42 rows","error":null,"finished_at":1800000000000}"#
        )
    );
}

/// An incident notification as a sink receives it: the delivery's id, sink and attempt, then
/// the notice under `incident` (docs/cli.md shows this body).
fn incident_request(id: u64, attempt: u32) -> SendRequest {
    let mut incident = keel_core::Incident::new(
        4,
        keel_core::IncidentKind::StuckRun,
        T0,
        Some(JobId::new("report").unwrap()),
        Some(keel_core::RunId(12)),
        Some(keel_core::WorkerId::new("w1").unwrap()),
        "no heartbeat or progress for 600 s".into(),
    );
    incident.resolved_by = Some(keel_core::OperatorAction {
        by: "ana".into(),
        at: T0.plus_ms(60_000),
        reason: "worker restarted".into(),
    });
    let notice = keel_core::IncidentNotice::new(
        keel_core::IncidentEvent::Resolved,
        &incident,
        T0.plus_ms(60_000),
    );
    SendRequest {
        id: DeliveryId(id),
        sink: "ops".into(),
        payload: DeliveryPayload::Incident { incident: notice },
        attempt,
    }
}

#[test]
fn an_incident_notifications_document_nests_the_notice_under_incident() {
    let body = keel_runtime::sinks::delivery_json(&incident_request(9, 1)).unwrap();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        concat!(
            r#"{"delivery_id":"delivery-9","sink":"ops","attempt":1,"incident":{"#,
            r#""event":"resolved","id":4,"kind":"stuck_run","job":"report","run":12,"#,
            r#""worker":"w1","queue":null,"details":"no heartbeat or progress for 600 s","#,
            r#""opened_at":1800000000000,"#,
            r#""operator":{"by":"ana","at":1800000060000,"reason":"worker restarted"},"#,
            r#""at":1800000060000}}"#
        )
    );
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

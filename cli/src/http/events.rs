//! `GET /api/v1/events`: the scheduler's events as server-sent events, as they happen.
//!
//! Each event has a name (`run_finished`, `lease_granted`, `incident_opened`, …, and
//! `job_changed` / `run_changed` for what commands did: a job added, replaced, paused,
//! resumed, triggered or removed, a run cancelled or its lease released, reclaimed or
//! restored) and a JSON body with the ids it concerns and the line the daemon logs for it:
//!
//! ```text
//! event: run_finished
//! data: {"run":"run-7","job":"backup","line":"run-7 of job backup succeeded"}
//! ```
//!
//! Events are not durable: a client that connects later, or falls more than 1024 events
//! behind (it gets a `lagged` event), reads the resources again. The console does exactly
//! that on every event.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::Sse as SseResponse;
use futures_util::stream::{self, Stream};
use keel_core::Event;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::{Api, Reader};

/// An event's name and body.
pub(crate) fn describe(event: &Event) -> (&'static str, Value) {
    let line = crate::show::event_line(event);
    let (name, ids) = match event {
        Event::RunFinished { run, job, state } => (
            "run_finished",
            json!({"run": run.to_string(), "job": job.as_str(), "state": state.to_string()}),
        ),
        Event::RetryScheduled { run, .. } => ("retry_scheduled", json!({"run": run.to_string()})),
        Event::JobDisabled { job, .. } => ("job_disabled", json!({"job": job.as_str()})),
        Event::JobDeleted { job, .. } => ("job_deleted", json!({"job": job.as_str()})),
        Event::SlotsDropped { job, .. } => ("slots_dropped", json!({"job": job.as_str()})),
        Event::LeaseGranted { run, owner, token } => (
            "lease_granted",
            json!({"run": run.to_string(), "worker": owner.as_str(), "token": token.to_string()}),
        ),
        Event::LeaseReclaimed { run, token } => (
            "lease_reclaimed",
            json!({"run": run.to_string(), "token": token.to_string()}),
        ),
        Event::IncidentOpened(i) => ("incident_opened", json!({"incident": i.id})),
        Event::IncidentResolved(i) => ("incident_resolved", json!({"incident": i.id})),
        Event::IncidentAcknowledged(i) => ("incident_acknowledged", json!({"incident": i.id})),
        Event::LeaseReleased { run, token } => (
            "lease_released",
            json!({"run": run.to_string(), "token": token.to_string()}),
        ),
        Event::PersistFailed { .. } => ("store_failing", json!({})),
        Event::StoreRecovered { .. } => ("store_recovered", json!({})),
        _ => ("event", json!({})),
    };
    let mut body = ids;
    body["line"] = json!(line);
    (name, body)
}

fn lagged(missed: u64) -> Sse {
    Sse::default()
        .event("lagged")
        .data(json!({ "missed": missed }).to_string())
}

pub(crate) async fn events(
    _: Reader,
    State(api): State<Api>,
) -> SseResponse<impl Stream<Item = Result<Sse, Infallible>>> {
    let core = stream::unfold(api.server.handle.subscribe(), |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(event) => {
                let (name, body) = describe(&event);
                Sse::default().event(name).data(body.to_string())
            }
            Err(RecvError::Lagged(missed)) => lagged(missed),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), receiver))
    });
    // Changes commands made that the core has no event for: jobs added, paused, removed…
    let commands = stream::unfold(api.server.changes.subscribe(), |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(change) => {
                let name = change["event"].as_str().unwrap_or("event").to_string();
                Sse::default().event(name).data(change.to_string())
            }
            Err(RecvError::Lagged(missed)) => lagged(missed),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), receiver))
    });
    SseResponse::new(stream::select(core, commands)).keep_alive(KeepAlive::default())
}

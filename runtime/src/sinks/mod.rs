//! Ready-made [`Sink`](crate::Sink)s: an HTTP webhook (the `webhook` feature) and a local
//! command (always there).
//!
//! Both send the same JSON document for a delivery attempt, built by [`delivery_json`]: the
//! delivery's id (stable across attempts and restarts, so a receiver can deduplicate), the sink's
//! name, the attempt number, then the payload ([`DeliveryPayload`]).
//!
//! A run's result has every field of [`RunResult`](keel_core::outbox::RunResult) at the top
//! level (this shape is pinned byte for byte by a test):
//!
//! ```json
//! {"delivery_id":"delivery-7","sink":"hook","attempt":1,"run":12,"job":"report",
//!  "state":"succeeded","summary":"42 rows","error":null,"finished_at":1800000000000}
//! ```
//!
//! `error`, when present, is the run's last error: `{"kind", "message", "attempt", "at"}`.
//!
//! An incident notification (SPEC A3) has the notice
//! ([`IncidentNotice`](keel_core::IncidentNotice)) under `incident`, and no `run` key at the
//! top level, which is how a receiver tells the two apart:
//!
//! ```json
//! {"delivery_id":"delivery-9","sink":"ops","attempt":1,"incident":{"event":"resolved",
//!  "id":4,"kind":"stuck_run","job":"report","run":12,"worker":"w1","queue":null,
//!  "details":"no heartbeat or progress for 600 s","opened_at":1800000000000,
//!  "operator":{"by":"ana","at":1800000060000,"reason":"worker restarted"},
//!  "at":1800000060000}}
//! ```
//!
//! `event` is `opened`, `acknowledged`, `resolved` or `escalated`; `operator` says who acted,
//! when and why for an operator's action (opened by hand, acknowledged, resolved by hand) and is
//! `null` when keel acted; `at` is when the event happened. Times are milliseconds since the
//! Unix epoch.
//!
//! A sink makes one attempt and classifies its answer (SPEC D3); the outbox owns retries and
//! their timing. Both sinks time out with tokio timers, so under a paused tokio clock they
//! time out as soon as the runtime idles while waiting on a socket or a child process: drive
//! them on a real-time runtime.

mod command;
#[cfg(feature = "webhook")]
mod webhook;

use keel_core::outbox::{DeliveryPayload, SendRequest};
use serde::Serialize;

pub use command::{CommandSink, CommandSinkError, COMMAND_TIMEOUT_DEFAULT, EX_TEMPFAIL};
#[cfg(feature = "webhook")]
#[cfg_attr(docsrs, doc(cfg(feature = "webhook")))]
pub use webhook::{WebhookError, WebhookSink, IDEMPOTENCY_KEY_HEADER, WEBHOOK_TIMEOUT_DEFAULT};

/// The JSON document a sink sends for one delivery attempt (see the module docs).
#[derive(Debug, Serialize)]
pub struct DeliveryDocument<'a> {
    /// The delivery's id as text (`delivery-7`), the same as the webhook's
    /// [`IDEMPOTENCY_KEY_HEADER`] and the command's `KEEL_DELIVERY_ID`.
    pub delivery_id: String,
    /// The sink's name.
    pub sink: &'a str,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The run's result, its fields at the top level, or `"incident": {…}`.
    #[serde(flatten)]
    pub payload: &'a DeliveryPayload,
}

impl<'a> DeliveryDocument<'a> {
    /// The document for `request`.
    pub fn new(request: &'a SendRequest) -> Self {
        DeliveryDocument {
            delivery_id: request.id.to_string(),
            sink: &request.sink,
            attempt: request.attempt,
            payload: &request.payload,
        }
    }
}

/// The JSON bytes of [`DeliveryDocument::new`]`(request)`.
pub fn delivery_json(request: &SendRequest) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&DeliveryDocument::new(request))
}

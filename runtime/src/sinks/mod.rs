//! Ready-made [`Sink`](crate::Sink)s: an HTTP webhook (the `webhook` feature) and a local
//! command (always there).
//!
//! Both send the same JSON document for a delivery attempt, built by [`delivery_json`]: the
//! delivery's id (stable across attempts and restarts, so a receiver can deduplicate), the sink's
//! name, the attempt number, and every field of the run's result
//! ([`DeliveryPayload`]) at the top level:
//!
//! ```json
//! {"delivery_id":"delivery-7","sink":"hook","attempt":1,"run":12,"job":"report",
//!  "state":"succeeded","summary":"42 rows","error":null,"finished_at":1800000000000}
//! ```
//!
//! `error`, when present, is the run's last error: `{"kind", "message", "attempt", "at"}`.
//! Times are milliseconds since the Unix epoch.
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
    /// The run's result, its fields at the top level.
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

//! Where results go: the sink interface the driver calls for each delivery attempt.

use std::future::Future;
use std::pin::Pin;

use keel_core::outbox::{DeliveryResult, SendRequest};

/// A boxed future, as sinks and handlers return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Sends a run's result or an incident notification somewhere (SPEC D1–D5, A3). The outbox owns retries and their timing: a
/// sink makes one attempt and classifies its answer (`keel_core::outbox::classify_http` for
/// HTTP). `request.id` is stable across attempts and restarts, for the receiver to
/// deduplicate.
pub trait Sink: Send + Sync + 'static {
    /// Makes one delivery attempt.
    fn send(&self, request: SendRequest) -> BoxFuture<DeliveryResult>;

    /// How logs and metric labels name this sink, if not by the name it was registered under:
    /// a sink whose name carries a secret (a webhook URL with a token) returns a redacted form.
    fn label(&self) -> Option<String> {
        None
    }
}

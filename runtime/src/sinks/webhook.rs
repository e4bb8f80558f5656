//! The webhook sink: one HTTP POST per delivery attempt.

use std::fmt;
use std::time::Duration;

use keel_core::limits;
use keel_core::outbox::{classify_http, classify_transport_error, DeliveryResult, SendRequest};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{redirect, Url};

use super::delivery_json;
use crate::sink::{BoxFuture, Sink};

/// How long one attempt may take, connecting and reading the response included, unless
/// [`WebhookSink::with_timeout`] says otherwise.
pub const WEBHOOK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// The header that carries the delivery id (`delivery-7`), the same on every attempt of a
/// delivery, so that a receiver can deduplicate: `Idempotency-Key`, in the lower case HTTP/2
/// requires (header names are case-insensitive).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The header that carries the attempt number, from 1.
const ATTEMPT_HEADER: &str = "keel-delivery-attempt";

/// Why a [`WebhookSink`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The URL does not parse. The URL itself is not repeated: it may hold a secret.
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(String),
    /// The URL's scheme is neither `http` nor `https`.
    #[error("a webhook URL must be http or https, not {0:?}")]
    UnsupportedScheme(String),
    /// A static header's name or value is not valid HTTP.
    #[error("invalid webhook header {name:?}: {reason}")]
    InvalidHeader {
        /// The header's name, as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Delivers a result or an incident notification as an HTTP POST of its JSON document ([`super::DeliveryDocument`]) to a
/// URL, and classifies the answer with [`classify_http`] (SPEC D3).
///
/// - Each request carries `Content-Type: application/json`, [`IDEMPOTENCY_KEY_HEADER`] with the
///   delivery id and `Keel-Delivery-Attempt` with the attempt number, after any static headers
///   ([`WebhookSink::with_header`]); these three win over a static header of the same name.
/// - 2xx is delivered. 408, 429, 500, 502, 503 and 504 are transient, with the response's
///   `Retry-After` (delta-seconds) passed to the outbox; any other status is permanent, and its
///   error quotes the start of the response body.
/// - A failure to get a response (connection refused, DNS, TLS) and a request that takes longer
///   than the timeout ([`WEBHOOK_TIMEOUT_DEFAULT`]) are transient.
/// - Redirects are not followed, so a 3xx is permanent: following one would turn the POST into
///   a GET and send the static headers to another address.
/// - TLS is rustls with the Mozilla root certificates (webpki-roots); no OpenSSL.
///
/// Errors never contain the URL, which may hold a token; nor does `Debug`, beyond its scheme
/// and host.
#[derive(Clone)]
pub struct WebhookSink {
    client: reqwest::Client,
    url: Url,
    headers: HeaderMap,
    timeout: Duration,
    name: Option<String>,
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSink")
            .field("scheme", &self.url.scheme())
            .field("host", &self.url.host_str())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// A sink that posts to `url`, which must be an `http` or `https` URL.
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        let url = Url::parse(url).map_err(|e| WebhookError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(WebhookError::UnsupportedScheme(url.scheme().to_string()));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(WebhookError::InvalidUrl("the URL has no host".into()));
        }
        let client = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .user_agent(concat!("keel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Client(error_chain(&e)))?;
        Ok(WebhookSink {
            client,
            url,
            headers: HeaderMap::new(),
            timeout: WEBHOOK_TIMEOUT_DEFAULT,
            name: None,
        })
    }

    /// Names the sink: logs and metric labels say `name` rather than the URL's scheme and host,
    /// so two webhooks on one host stay apart.
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Sets how long one attempt may take, from connecting to reading the response.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds a header sent with every request (an `Authorization`, say). Its value is marked
    /// sensitive and never shown by `Debug`.
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Self, WebhookError> {
        let invalid = |reason: String| WebhookError::InvalidHeader {
            name: name.to_string(),
            reason,
        };
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        let mut value = HeaderValue::from_str(value).map_err(|e| invalid(e.to_string()))?;
        value.set_sensitive(true);
        self.headers.append(header, value);
        Ok(self)
    }

    /// The timeout of one attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Makes one delivery attempt and classifies its outcome.
    pub async fn deliver(&self, request: &SendRequest) -> DeliveryResult {
        let body = match delivery_json(request) {
            Ok(body) => body,
            Err(e) => {
                return DeliveryResult::Permanent {
                    error: format!("cannot encode the delivery as JSON: {e}"),
                }
            }
        };
        let mut headers = self.headers.clone();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // Both values are ASCII digits, letters and '-', always valid header values.
        if let Ok(value) = HeaderValue::from_str(&request.id.to_string()) {
            headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), value);
        }
        headers.insert(
            HeaderName::from_static(ATTEMPT_HEADER),
            HeaderValue::from(request.attempt),
        );
        let sent = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .timeout(self.timeout)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return self.transport_error(e),
        };
        let status = response.status();
        if status.is_success() {
            return DeliveryResult::Delivered;
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let excerpt = body_excerpt(response).await;
        classify_http(status.as_u16(), retry_after.as_deref(), &excerpt)
    }

    fn transport_error(&self, error: reqwest::Error) -> DeliveryResult {
        let error = error.without_url();
        let message = if error.is_timeout() {
            format!(
                "timed out after {:?}: {}",
                self.timeout,
                error_chain(&error)
            )
        } else {
            error_chain(&error)
        };
        classify_transport_error(&message)
    }
}

impl Sink for WebhookSink {
    fn send(&self, request: SendRequest) -> BoxFuture<DeliveryResult> {
        let sink = self.clone();
        Box::pin(async move { sink.deliver(&request).await })
    }

    /// Scheme, host and port only: paths, queries and user info often carry tokens.
    fn label(&self) -> Option<String> {
        if let Some(name) = &self.name {
            return Some(name.clone());
        }
        let host = self.url.host_str().unwrap_or("?");
        Some(match self.url.port() {
            Some(port) => format!("{}://{host}:{port}", self.url.scheme()),
            None => format!("{}://{host}", self.url.scheme()),
        })
    }
}

/// The start of a response body, enough for `classify_http` to quote: a few bytes past its
/// limit, so that a character cut here is cut again, on a boundary and marked, there. A body
/// that fails halfway (or times out) is quoted as far as it came.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let max = limits::DELIVERY_BODY_EXCERPT_MAX_BYTES + 4;
    let mut bytes = Vec::new();
    while bytes.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(max);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An error and its sources, outermost first (reqwest's own message is terse: the cause, such
/// as "Connection refused", is in the chain).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

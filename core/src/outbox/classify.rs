//! Turning a sink's HTTP answer, or the failure to get one, into a [`DeliveryResult`] (SPEC D3).

use super::DeliveryResult;
use crate::limits;
use crate::run::truncate;

/// Classifies an HTTP response to a delivery (SPEC D3), in one place.
///
/// 2xx is `Delivered`. 408, 429, 500, 502, 503 and 504 are `Transient`, honouring a
/// `Retry-After` given in delta-seconds (`"120"`). A `Retry-After` given as an HTTP-date is
/// ignored, as is anything else unparsable: turning a date into a delay needs a clock, and the
/// backoff applies instead. Every other status, redirects included (`classify_http` sees the
/// final response), is `Permanent`. The error names the status and quotes at most
/// [`limits::DELIVERY_BODY_EXCERPT_MAX_BYTES`] of the body.
pub fn classify_http(status: u16, retry_after: Option<&str>, body_excerpt: &str) -> DeliveryResult {
    if (200..=299).contains(&status) {
        return DeliveryResult::Delivered;
    }
    let excerpt =
        crate::text::truncate(body_excerpt.trim(), limits::DELIVERY_BODY_EXCERPT_MAX_BYTES);
    let error = if excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {excerpt}")
    };
    match status {
        408 | 429 | 500 | 502 | 503 | 504 => DeliveryResult::Transient {
            error,
            retry_after_ms: retry_after.and_then(retry_after_delta_ms),
        },
        _ => DeliveryResult::Permanent { error },
    }
}

/// Classifies a failure to get any response (connection refused, DNS, TLS, timeout): always
/// `Transient` (SPEC D3).
pub fn classify_transport_error(message: &str) -> DeliveryResult {
    DeliveryResult::Transient {
        error: truncate(message),
        retry_after_ms: None,
    }
}

/// A `Retry-After` in delta-seconds, in milliseconds (saturating); `None` for anything else.
fn retry_after_delta_ms(value: &str) -> Option<u64> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only overflow can fail once every byte is a digit.
    let seconds = digits.parse::<u64>().unwrap_or(u64::MAX);
    Some(seconds.saturating_mul(1_000))
}

//! Leases and fencing (SPEC L1–L5).
//!
//! An attempt executes only under a [`Lease`]: an owner (a [`WorkerId`]), a [`FencingToken`]
//! and an expiry. The scheduler grants the lease when the attempt starts (in-process
//! execution) or when a worker claims the run (external workers), and the token is drawn from a
//! persisted counter, so it rises on every grant across restarts and never repeats. Every
//! write a holder makes (heartbeat, progress, checkpoint, outcome, release) carries its token;
//! one carrying an older token than the run's current lease is refused with
//! `Rejected::StaleToken` and changes nothing.
//!
//! # Timeline (defaults of [`LeasePolicy`])
//!
//! ```text
//! granted_at        +15 s           +25 s            +30 s         +40 s
//!     |--------------|----------------|---------------|-------------|
//!     grant          holder renews    holder: lease   expires_at    watchdog reclaims
//!                    (ttl / 2)        lost if no      (ttl)         (expiry + grace)
//!                                     renewal since
//!                                     sent_at + ttl
//!                                     - margin
//! ```
//!
//! - The holder renews at no more than half the TTL (L2), and treats the lease as lost once
//!   `sent_at + ttl - margin` passes without a successful renewal, where `sent_at` is when it
//!   sent the last renewal that succeeded: it stops before the scheduler could reclaim.
//! - The scheduler reclaims a lease `grace_ms` after it expires (L3): the attempt is recorded as
//!   lost and the run retries or fails by policy. Reclaiming never deletes data.
//! - A contender (anything waiting for a lease another holder has) waits with capped backoff for
//!   at least the stale threshold, `ttl + grace`, so a live but slow holder is not given up on
//!   early (L5).

use serde::{Deserialize, Serialize};

use crate::ids::{FencingToken, WorkerId};
use crate::time::Timestamp;

/// A grant to execute one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub owner: WorkerId,
    /// Its fencing token.
    pub token: FencingToken,
    /// When it was granted (or last renewed).
    pub renewed_at: Timestamp,
    /// When it expires unless renewed.
    pub expires_at: Timestamp,
}

/// Lease timing, shared by the scheduler (grant, expiry, reclaim) and holders (renewal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeasePolicy {
    /// How long a grant or renewal lasts.
    pub ttl_ms: u64,
    /// How long after expiry the watchdog waits before reclaiming.
    pub grace_ms: u64,
    /// How long before `sent_at + ttl` a holder gives its lease up as lost.
    pub margin_ms: u64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            ttl_ms: 30_000,
            grace_ms: 10_000,
            margin_ms: 5_000,
        }
    }
}

impl LeasePolicy {
    /// How long after expiry-free silence a lease is stale: `ttl + grace`. Contenders wait at
    /// least this long (L5).
    pub fn stale_after_ms(&self) -> u64 {
        self.ttl_ms.saturating_add(self.grace_ms)
    }
}

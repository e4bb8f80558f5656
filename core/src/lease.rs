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

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{FencingToken, WorkerId};
use crate::limits;
use crate::rng::SplitMix64;
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
    /// How long after the last renewal a lease is stale: `ttl + grace`. Contenders wait at
    /// least this long (L5).
    pub fn stale_after_ms(&self) -> u64 {
        self.ttl_ms.saturating_add(self.grace_ms)
    }
}

/// The holder's side of a lease (SPEC L2): when to renew, and when to give the lease up as lost.
///
/// Used by whoever holds a lease (the in-process runtime, an external worker library). It does
/// no I/O: [`poll_renew`](Self::poll_renew) says when to send a renewal, the caller sends it
/// and reports the reply with [`on_renewed`](Self::on_renewed) or
/// [`on_renew_failed`](Self::on_renew_failed).
///
/// - A renewal is due half a TTL after the last successful one was *sent* (the grant, at
///   first), and at most one is in flight.
/// - The lease is lost once `lost_at` passes, where `lost_at = sent_at + ttl - margin` and
///   `sent_at` is when the last successful renewal was sent (or `granted_at`). It is measured
///   from the sending, not the reply, because the store may have stamped the renewal as early
///   as that: counting from the reply would let a slow reply stretch the holder's belief past
///   the store's expiry.
/// - A failed or refused renewal is retried after `ttl / 10` (at least 1 ms, at most
///   [`limits::LEASE_RENEW_RETRY_MAX_MS`]), and does not move `lost_at`.
/// - Lost is sticky: a success reported after `lost_at` has passed is ignored, and nothing is
///   renewed afterwards. A lost lease is a state, not a crash (L4): see [`guarded_outcome`].
///
/// The states and their transitions are those of [`HolderState`]. With the default policy
/// (ttl 30 s, margin 5 s), a lease granted at 0 is renewed at 15 s and, if no renewal
/// succeeds, lost at 25 s, 15 s before the watchdog could reclaim it (expiry 30 s + grace 10 s).
///
/// # Driving contract
///
/// Every mutating method takes `now`; a `now` earlier than the latest seen is clamped to it.
/// After any `on_*` call (and at every [`poll_timeout`](Self::poll_timeout)), call
/// `poll_renew(now)` until it returns `None`; `poll_timeout()` is then later than `now`, or
/// `None` once the lease is lost.
///
/// ```
/// use keel_core::lease::{LeaseHolder, LeasePolicy};
/// use keel_core::{FencingToken, Timestamp};
///
/// let mut holder = LeaseHolder::new(LeasePolicy::default(), FencingToken(7), Timestamp(0));
/// assert_eq!(holder.poll_renew(Timestamp(0)), None);
/// assert_eq!(holder.poll_timeout(), Some(Timestamp(15_000)));
///
/// let renewal = holder.poll_renew(Timestamp(15_000)).expect("due at ttl / 2");
/// // ... send it; the store accepts it and the reply arrives at 15.2 s:
/// holder.on_renewed(renewal.sent_at, Timestamp(15_200));
/// assert_eq!(holder.lost_at(), Timestamp(40_000)); // 15 s + 30 s - 5 s
/// assert!(!holder.is_lost(Timestamp(39_999)));
/// assert!(holder.is_lost(Timestamp(40_000)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    policy: LeasePolicy,
    token: FencingToken,
    state: HolderState,
    /// When the last successful renewal was sent; the grant, until one succeeds.
    renewed_sent_at: Timestamp,
    /// `renewed_sent_at + ttl - margin`.
    lost_at: Timestamp,
    /// The latest `now` handled; an earlier one is clamped to it.
    now: Timestamp,
}

/// What a [`LeaseHolder`] is waiting for.
///
/// Transitions (`lost_at` is checked first: any call whose `now` has reached it moves the
/// holder to `Lost` before anything else happens):
///
/// | From                   | Input                                  | To                                                                      |
/// |------------------------|----------------------------------------|-------------------------------------------------------------------------|
/// | `Held { renew_at }`    | `poll_renew(now)`, `now < renew_at`    | `Held { renew_at }`, returns `None`                                     |
/// | `Held { renew_at }`    | `poll_renew(now)`, `now >= renew_at`   | `Renewing { sent_at: now }`, returns a [`Renewal`]                      |
/// | `Renewing { sent_at }` | `poll_renew(now)`                      | unchanged, returns `None` (one renewal in flight at most)               |
/// | `Renewing { sent_at }` | `on_renewed(sent_at, now)`             | `Held { renew_at: sent_at + ttl / 2 }`; `lost_at = sent_at + ttl - margin` |
/// | `Renewing { sent_at }` | `on_renew_failed(sent_at, now)`        | `Held { renew_at: max(due, now + retry) }`; `lost_at` unchanged         |
/// | `Held` or `Renewing`   | any call with `now >= lost_at`         | `Lost`                                                                  |
/// | `Lost`                 | anything                               | `Lost`                                                                  |
///
/// A reply whose `sent_at` is not the renewal in flight (a success that arrives after the
/// caller already reported that request as failed) still moves `lost_at` forward if it is
/// newer, but does not change the state otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderState {
    /// Holding the lease with no renewal in flight.
    Held {
        /// When the next renewal is due.
        renew_at: Timestamp,
    },
    /// A renewal is in flight.
    Renewing {
        /// When it was sent.
        sent_at: Timestamp,
    },
    /// The lost deadline passed without a successful renewal. Final.
    Lost,
}

/// A renewal request for the caller to send to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// The token of the lease to renew.
    pub token: FencingToken,
    /// When it was sent: report the reply with this value.
    pub sent_at: Timestamp,
}

impl LeaseHolder {
    /// A holder of the lease with `token`, granted at `granted_at` under `policy`.
    pub fn new(policy: LeasePolicy, token: FencingToken, granted_at: Timestamp) -> Self {
        LeaseHolder {
            policy,
            token,
            state: HolderState::Held {
                renew_at: granted_at.plus_ms(policy.ttl_ms / 2),
            },
            renewed_sent_at: granted_at,
            lost_at: lost_deadline(&policy, granted_at),
            now: granted_at,
        }
    }

    /// A renewal to send now, if one is due and none is in flight; `None` once lost.
    pub fn poll_renew(&mut self, now: Timestamp) -> Option<Renewal> {
        let now = self.advance(now);
        let HolderState::Held { renew_at } = self.state else {
            return None;
        };
        if now < renew_at {
            return None;
        }
        self.state = HolderState::Renewing { sent_at: now };
        Some(Renewal {
            token: self.token,
            sent_at: now,
        })
    }

    /// The renewal sent at `sent_at` succeeded; its reply arrived at `now`.
    ///
    /// Moves the lost deadline to `sent_at + ttl - margin` (never backwards), unless the lease
    /// was already lost by `now`: a late success does not revive it.
    pub fn on_renewed(&mut self, sent_at: Timestamp, now: Timestamp) {
        let now = self.advance(now);
        if self.state == HolderState::Lost {
            return;
        }
        // A renewal cannot have been sent after its reply arrived.
        let effective_sent_at = sent_at.min(now);
        if effective_sent_at > self.renewed_sent_at {
            self.renewed_sent_at = effective_sent_at;
            self.lost_at = lost_deadline(&self.policy, effective_sent_at);
        }
        let due = self.renew_due();
        self.state = match self.state {
            HolderState::Renewing { sent_at: in_flight } if in_flight == sent_at => {
                HolderState::Held { renew_at: due }
            }
            HolderState::Held { renew_at } => HolderState::Held {
                renew_at: renew_at.max(due),
            },
            other => other,
        };
    }

    /// The renewal sent at `sent_at` failed or was refused; the caller learnt so at `now`.
    ///
    /// The lost deadline does not move. The renewal is retried after a short pause (see the
    /// type's docs), or when it is next due if that is later.
    pub fn on_renew_failed(&mut self, sent_at: Timestamp, now: Timestamp) {
        let now = self.advance(now);
        let HolderState::Renewing { sent_at: in_flight } = self.state else {
            return;
        };
        if in_flight != sent_at {
            return;
        }
        let retry_ms = (self.policy.ttl_ms / 10).clamp(1, limits::LEASE_RENEW_RETRY_MAX_MS);
        self.state = HolderState::Held {
            renew_at: self.renew_due().max(now.plus_ms(retry_ms)),
        };
    }

    /// Whether the lease is lost at `now`: `now` (or a later instant already handled) has
    /// reached [`lost_at`](Self::lost_at), or the holder has already found it lost.
    ///
    /// A query: it does not record `now`. Once true for the latest `now` handled, it stays true.
    pub fn is_lost(&self, now: Timestamp) -> bool {
        self.state == HolderState::Lost || now.max(self.now) >= self.lost_at
    }

    /// The next instant the holder must act: the next renewal or the lost deadline, whichever
    /// is first (the lost deadline while a renewal is in flight); `None` once lost.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match self.state {
            HolderState::Held { renew_at } => Some(renew_at.min(self.lost_at)),
            HolderState::Renewing { .. } => Some(self.lost_at),
            HolderState::Lost => None,
        }
    }

    /// The lease's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The instant from which the lease counts as lost, unless a renewal sent before it
    /// succeeds first.
    pub fn lost_at(&self) -> Timestamp {
        self.lost_at
    }

    /// The holder's state.
    pub fn state(&self) -> HolderState {
        self.state
    }

    /// Clamps `now` to the latest instant handled, records it, and moves to `Lost` if the lost
    /// deadline has been reached.
    fn advance(&mut self, now: Timestamp) -> Timestamp {
        self.now = self.now.max(now);
        if self.now >= self.lost_at {
            self.state = HolderState::Lost;
        }
        self.now
    }

    /// When a renewal is due, counting from the last successful one.
    fn renew_due(&self) -> Timestamp {
        self.renewed_sent_at.plus_ms(self.policy.ttl_ms / 2)
    }
}

/// A contender's wait for a lease held by someone else (SPEC L5): capped exponential backoff
/// that never gives up before the stale threshold.
///
/// The contender checks the lease at each [`WaitDecision::RetryAt`]; if the lease is free it
/// takes it, and if it is still held it asks again. [`WaitDecision::Stale`] comes only once
/// `policy.stale_after_ms()` (ttl + grace) has elapsed since the wait started, so a live but
/// slow holder, which renews at least every ttl / 2, is never given up on early. If the
/// contender sees the lease change hands or be renewed, the holder is alive: it starts a new
/// wait.
///
/// # The numbers
///
/// Check `n` (counting from 0) waits a random time in `[ceiling / 2, ceiling]` (at least 1 ms),
/// where `ceiling = min(cap, base * 2^n)`, and never past the stale threshold, so the last
/// check falls on it exactly. The aligned defaults: with ttl 30 s and grace 10 s
/// ([`LeasePolicy::default`]) the lease is stale after 40 s, which is also when the watchdog
/// reclaims it (expiry + grace, L3); the backoff starts at 0.5 s
/// ([`limits::CONTENDER_BACKOFF_BASE_MS`]) and doubles to 5 s
/// ([`limits::CONTENDER_BACKOFF_CAP_MS`]), so a released lease is noticed within 5 s and a
/// contender checks again at least 11 times before it calls the lease stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContenderWait {
    started_at: Timestamp,
    stale_at: Timestamp,
    /// Checks answered with `RetryAt` so far; the exponent of the next ceiling.
    checks: u32,
    /// The latest `now` handled; an earlier one is clamped to it.
    now: Timestamp,
}

/// What a contender does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitDecision {
    /// Check the lease again at this instant (later than `now`, at most the cap away).
    RetryAt(Timestamp),
    /// The stale threshold has passed since the wait started: the holder may be presumed dead.
    Stale,
}

impl ContenderWait {
    /// A wait under `policy` that started at `started_at`.
    pub fn new(policy: LeasePolicy, started_at: Timestamp) -> Self {
        ContenderWait {
            started_at,
            stale_at: started_at.plus_ms(policy.stale_after_ms()),
            checks: 0,
            now: started_at,
        }
    }

    /// The lease was still held at `now`: when to check again, or `Stale` once
    /// `now >= started_at + stale_after`. Draws from `rng` only when it returns `RetryAt`.
    pub fn next_check(&mut self, now: Timestamp, rng: &mut SplitMix64) -> WaitDecision {
        self.now = self.now.max(now);
        if self.now >= self.stale_at {
            return WaitDecision::Stale;
        }
        let ceiling = contender_ceiling_ms(self.checks);
        self.checks = self.checks.saturating_add(1);
        let half = ceiling / 2;
        let wait_ms = (ceiling - half + rng.below_inclusive(half)).max(1);
        WaitDecision::RetryAt(self.now.plus_ms(wait_ms).min(self.stale_at))
    }

    /// When the wait started.
    pub fn started_at(&self) -> Timestamp {
        self.started_at
    }

    /// When the lease counts as stale: `started_at + ttl + grace`.
    pub fn stale_at(&self) -> Timestamp {
        self.stale_at
    }
}

/// How a guarded section (code run under a lease) ended, as seen by its runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectionEnd<T, E> {
    /// It returned a result.
    Succeeded(T),
    /// It returned an error.
    Failed(E),
    /// It had not finished (the runner stopped waiting for it).
    StillRunning,
}

/// What a guarded section amounts to, given its end and the fate of its lease (SPEC L4). See
/// [`guarded_outcome`] for the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardedOutcome<T, E> {
    /// The section's result stands.
    Ok(T),
    /// The section succeeded and the store accepted its token, but the lease was lost meanwhile:
    /// the result stands, with a warning (do not retry blindly).
    OkLeaseLost(T, LeaseLostWarning),
    /// The section's own error wins.
    Err(E),
    /// The section was still running (or its write was refused) when the lease was lost.
    LeaseLost(LeaseLost),
}

/// A guarded section's lease was lost before its result landed (SPEC L4): a state to report,
/// never a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lease {token} was lost: {reason}")]
pub struct LeaseLost {
    /// The token of the lost lease.
    pub token: FencingToken,
    /// Why the section's result did not land.
    pub reason: LeaseLostReason,
}

/// Why a guarded section's result did not land when its lease was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseLostReason {
    /// The section had not finished.
    StillRunning,
    /// The section finished, but the store refused its write under the token (a newer lease
    /// had been granted).
    WriteRefused,
}

impl fmt::Display for LeaseLostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaseLostReason::StillRunning => "the guarded section was still running",
            LeaseLostReason::WriteRefused => {
                "the guarded section finished but the store refused its write under that token"
            }
        })
    }
}

/// A guarded section succeeded and the store accepted its token, but the lease was lost
/// meanwhile: the result stands, and this warning says not to retry the work blindly (another
/// holder may be doing it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseLostWarning {
    /// The token of the lost lease, under which the result was accepted.
    pub token: FencingToken,
}

impl fmt::Display for LeaseLostWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lease {} was lost while the guarded section ran, but the store accepted its result \
             under that token: the result stands; do not retry blindly",
            self.token
        )
    }
}

/// The outcome of a guarded section that ran under the lease with `token` (SPEC L4).
///
/// `lease_lost` is whether the holder found the lease lost ([`LeaseHolder::is_lost`]) before
/// the section's result landed; `store_accepted_token` is whether the store accepted the
/// section's write under `token` (it is ignored when there is no result to write).
///
/// | Section          | Lease | Store accepted token | Outcome                                       |
/// |------------------|-------|----------------------|-----------------------------------------------|
/// | `Succeeded(t)`   | held  | yes                  | `Ok(t)`                                       |
/// | `Succeeded(t)`   | held  | no                   | `LeaseLost` (`WriteRefused`)                  |
/// | `Succeeded(t)`   | lost  | yes                  | `OkLeaseLost(t, warning)`                     |
/// | `Succeeded(t)`   | lost  | no                   | `LeaseLost` (`WriteRefused`)                  |
/// | `Failed(e)`      | any   | any                  | `Err(e)`: the section's own error wins        |
/// | `StillRunning`   | lost  | (ignored)            | `LeaseLost` (`StillRunning`)                  |
/// | `StillRunning`   | held  | (ignored)            | `LeaseLost` (`StillRunning`); see below       |
///
/// - A refused token is proof that a newer lease was granted, whatever the holder believed,
///   so a success whose write was refused is `LeaseLost` even if the lease looked held: the
///   result did not land.
/// - A section's own error is reported as is: the lease adds nothing to it, and the retry
///   policy decides what follows.
/// - Callers ask about a `StillRunning` section only when its lease is lost (that is why they
///   stopped waiting for it). Asked while the lease is held, the answer is still `LeaseLost`:
///   an unfinished section has no result, and `LeaseLost` is the only outcome without one.
///
/// Releasing the lease afterwards is `Scheduler::release`'s business: after a loss it answers
/// `Released::AlreadyReleased`, which is not an error.
pub fn guarded_outcome<T, E>(
    token: FencingToken,
    end: SectionEnd<T, E>,
    lease_lost: bool,
    store_accepted_token: bool,
) -> GuardedOutcome<T, E> {
    let lost = |reason| GuardedOutcome::LeaseLost(LeaseLost { token, reason });
    match end {
        SectionEnd::Failed(error) => GuardedOutcome::Err(error),
        SectionEnd::StillRunning => lost(LeaseLostReason::StillRunning),
        SectionEnd::Succeeded(_) if !store_accepted_token => lost(LeaseLostReason::WriteRefused),
        SectionEnd::Succeeded(value) if lease_lost => {
            GuardedOutcome::OkLeaseLost(value, LeaseLostWarning { token })
        }
        SectionEnd::Succeeded(value) => GuardedOutcome::Ok(value),
    }
}

/// `sent_at + ttl - margin`: when a holder whose last successful renewal was sent at `sent_at`
/// gives its lease up. A margin of a whole TTL or more makes every lease lost as it is granted.
fn lost_deadline(policy: &LeasePolicy, sent_at: Timestamp) -> Timestamp {
    sent_at.plus_ms(policy.ttl_ms.saturating_sub(policy.margin_ms))
}

/// `min(cap, base * 2^checks)`, without overflowing.
fn contender_ceiling_ms(checks: u32) -> u64 {
    let factor = 1_u64.checked_shl(checks).unwrap_or(u64::MAX);
    limits::CONTENDER_BACKOFF_BASE_MS
        .saturating_mul(factor)
        .min(limits::CONTENDER_BACKOFF_CAP_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: FencingToken = FencingToken(7);

    fn ts(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    fn holder_at(granted_ms: i64) -> LeaseHolder {
        LeaseHolder::new(LeasePolicy::default(), TOKEN, ts(granted_ms))
    }

    // --- LeaseHolder (L2) ---

    #[test]
    fn holder_renews_at_half_the_ttl_with_one_renewal_in_flight() {
        let mut holder = holder_at(1_000);
        assert_eq!(holder.poll_renew(ts(1_000)), None);
        assert_eq!(holder.poll_timeout(), Some(ts(16_000)));
        assert_eq!(holder.poll_renew(ts(15_999)), None);

        let renewal = holder.poll_renew(ts(16_000));
        assert_eq!(
            renewal,
            Some(Renewal {
                token: TOKEN,
                sent_at: ts(16_000)
            })
        );
        assert_eq!(
            holder.state(),
            HolderState::Renewing {
                sent_at: ts(16_000)
            }
        );
        // Overdue, but one is in flight: nothing more until it is answered or the lease is lost.
        assert_eq!(holder.poll_renew(ts(20_000)), None);
        assert_eq!(holder.poll_timeout(), Some(ts(26_000)));
        assert_eq!(holder.lost_at(), ts(26_000));
        assert_eq!(holder.token(), TOKEN);
    }

    #[test]
    fn holder_lost_deadline_counts_from_when_the_renewal_was_sent() {
        let mut holder = holder_at(0);
        let renewal = holder.poll_renew(ts(15_000)).unwrap();
        // The reply is slow; the deadline still counts from 15 s, not 24 s.
        holder.on_renewed(renewal.sent_at, ts(24_000));
        assert_eq!(holder.lost_at(), ts(40_000));
        assert_eq!(
            holder.state(),
            HolderState::Held {
                renew_at: ts(30_000)
            }
        );
        assert!(!holder.is_lost(ts(39_999)));
        assert!(holder.is_lost(ts(40_000)));
    }

    #[test]
    fn holder_retries_a_failed_renewal_without_moving_the_deadline() {
        let mut holder = holder_at(0);
        let first = holder.poll_renew(ts(15_000)).unwrap();
        holder.on_renew_failed(first.sent_at, ts(15_300));
        assert_eq!(holder.lost_at(), ts(25_000));
        // ttl / 10 = 3 s, capped at LEASE_RENEW_RETRY_MAX_MS.
        assert_eq!(
            holder.state(),
            HolderState::Held {
                renew_at: ts(16_300)
            }
        );
        assert_eq!(holder.poll_renew(ts(16_299)), None);
        assert_eq!(holder.poll_timeout(), Some(ts(16_300)));

        let retry = holder.poll_renew(ts(16_300)).unwrap();
        holder.on_renewed(retry.sent_at, ts(16_400));
        assert_eq!(holder.lost_at(), ts(41_300));
    }

    #[test]
    fn holder_retry_pause_scales_with_a_short_ttl() {
        let policy = LeasePolicy {
            ttl_ms: 200,
            grace_ms: 0,
            margin_ms: 50,
        };
        let mut holder = LeaseHolder::new(policy, TOKEN, ts(0));
        let renewal = holder.poll_renew(ts(100)).unwrap();
        holder.on_renew_failed(renewal.sent_at, ts(110));
        assert_eq!(holder.state(), HolderState::Held { renew_at: ts(130) });
    }

    #[test]
    fn holder_is_lost_when_no_renewal_succeeds_in_time() {
        let mut holder = holder_at(0);
        let mut now = ts(15_000);
        let mut sent = Vec::new();
        while let Some(renewal) = holder.poll_renew(now) {
            sent.push(renewal.sent_at.as_millis());
            holder.on_renew_failed(renewal.sent_at, now.plus_ms(10));
            assert!(!holder.is_lost(now.plus_ms(10)));
            now = holder.poll_timeout().unwrap();
        }
        // Retried 1 s after each failure is learnt, until the deadline cuts it short.
        assert_eq!(
            sent,
            vec![15_000, 16_010, 17_020, 18_030, 19_040, 20_050, 21_060, 22_070, 23_080, 24_090]
        );
        assert_eq!(now, ts(25_000));
        assert!(holder.is_lost(ts(25_000)));
        assert_eq!(holder.state(), HolderState::Lost);
        assert_eq!(holder.poll_timeout(), None);
    }

    #[test]
    fn holder_lost_is_sticky_even_for_a_late_success() {
        let mut holder = holder_at(0);
        let renewal = holder.poll_renew(ts(15_000)).unwrap();
        // Sent at 15 s, but the reply comes after the lost deadline (25 s): too late.
        holder.on_renewed(renewal.sent_at, ts(25_000));
        assert_eq!(holder.state(), HolderState::Lost);
        assert_eq!(holder.lost_at(), ts(25_000));
        assert!(holder.is_lost(ts(25_000)));
        // A clock that jumps back does not revive it, and nothing is renewed any more.
        assert!(holder.is_lost(ts(0)));
        assert_eq!(holder.poll_renew(ts(100_000)), None);
        holder.on_renewed(ts(99_000), ts(100_000));
        assert_eq!(holder.state(), HolderState::Lost);
        assert_eq!(holder.poll_timeout(), None);
    }

    #[test]
    fn holder_clamps_an_earlier_now() {
        let mut holder = holder_at(0);
        let renewal = holder.poll_renew(ts(15_000)).unwrap();
        holder.on_renew_failed(renewal.sent_at, ts(3_000));
        assert_eq!(
            holder.state(),
            HolderState::Held {
                renew_at: ts(16_000)
            }
        );
        assert_eq!(holder.poll_renew(ts(0)), None);
    }

    #[test]
    fn holder_counts_a_late_success_of_a_request_reported_failed() {
        let mut holder = holder_at(0);
        let first = holder.poll_renew(ts(15_000)).unwrap();
        holder.on_renew_failed(first.sent_at, ts(15_500));
        let second = holder.poll_renew(ts(16_500)).unwrap();
        // The first request had reached the store after all.
        holder.on_renewed(first.sent_at, ts(17_000));
        assert_eq!(holder.lost_at(), ts(40_000));
        assert_eq!(
            holder.state(),
            HolderState::Renewing {
                sent_at: ts(16_500)
            }
        );
        // A failure of something not in flight changes nothing.
        holder.on_renew_failed(first.sent_at, ts(17_100));
        assert_eq!(
            holder.state(),
            HolderState::Renewing {
                sent_at: ts(16_500)
            }
        );
        holder.on_renewed(second.sent_at, ts(17_200));
        assert_eq!(holder.lost_at(), ts(41_500));
        assert_eq!(
            holder.state(),
            HolderState::Held {
                renew_at: ts(31_500)
            }
        );
        // An older success never moves the deadline back.
        holder.on_renewed(first.sent_at, ts(17_300));
        assert_eq!(holder.lost_at(), ts(41_500));
    }

    #[test]
    fn holder_with_a_margin_of_half_the_ttl_or_more_is_lost_before_renewing() {
        let policy = LeasePolicy {
            ttl_ms: 10_000,
            grace_ms: 0,
            margin_ms: 6_000,
        };
        let mut holder = LeaseHolder::new(policy, TOKEN, ts(0));
        assert_eq!(holder.poll_timeout(), Some(ts(4_000)));
        assert_eq!(holder.poll_renew(ts(4_000)), None);
        assert_eq!(holder.state(), HolderState::Lost);

        let whole = LeasePolicy {
            margin_ms: 20_000,
            ..policy
        };
        let mut holder = LeaseHolder::new(whole, TOKEN, ts(0));
        assert!(holder.is_lost(ts(0)));
        assert_eq!(holder.poll_renew(ts(0)), None);
        assert_eq!(holder.poll_timeout(), None);
    }

    #[test]
    fn holder_with_prompt_replies_is_never_lost() {
        let mut holder = holder_at(0);
        let mut now = ts(0);
        for _ in 0..1_000 {
            if let Some(renewal) = holder.poll_renew(now) {
                now = now.plus_ms(2_000);
                holder.on_renewed(renewal.sent_at, now);
                continue;
            }
            now = holder.poll_timeout().unwrap();
        }
        assert!(now > ts(5_000_000));
        assert!(!holder.is_lost(now));
    }

    /// Drives holders with random policies, reply delays, failures and late wake-ups under the
    /// driving contract, checking each step against a reference model of L2.
    #[test]
    fn holder_follows_the_reference_model_under_random_replies() {
        // How many seeds kept their lease for 5 TTLs or more, and how many ended lost: the test
        // means something only if both are common.
        let (mut renewed_far, mut ended_lost) = (0, 0);
        for seed in 0..300 {
            let mut rng = SplitMix64::new(seed);
            let ttl_ms = 2 + rng.below_inclusive(60_000);
            let policy = LeasePolicy {
                ttl_ms,
                grace_ms: 0,
                // Mostly sensible margins, sometimes one that loses every lease.
                margin_ms: if rng.chance(1, 8) {
                    rng.below_inclusive(ttl_ms)
                } else {
                    rng.below_inclusive(ttl_ms / 4)
                },
            };
            let granted = ts(rng.below_inclusive(1_000_000) as i64);
            let mut holder = LeaseHolder::new(policy, TOKEN, granted);

            let mut now = granted;
            let mut model_sent_at = granted;
            let model_lost_at = |sent: Timestamp| sent.plus_ms(policy.ttl_ms - policy.margin_ms);
            // (sent_at, reply arrives at, succeeded)
            let mut in_flight: Option<(Timestamp, Timestamp, bool)> = None;
            let mut was_lost = false;
            for _step in 0..400 {
                while let Some(renewal) = holder.poll_renew(now) {
                    assert!(in_flight.is_none(), "seed {seed}: two renewals in flight");
                    assert_eq!(renewal.sent_at, now);
                    assert!(
                        now < model_lost_at(model_sent_at),
                        "seed {seed}: renewed when lost"
                    );
                    assert!(
                        now >= model_sent_at.plus_ms(policy.ttl_ms / 2),
                        "seed {seed}: renewed early"
                    );
                    // Mostly prompt replies, sometimes one slower than the lease.
                    let reply_ms = if rng.chance(1, 40) {
                        rng.below_inclusive(ttl_ms)
                    } else {
                        rng.below_inclusive(ttl_ms / 8)
                    };
                    in_flight = Some((now, now.plus_ms(reply_ms), rng.chance(7, 8)));
                }
                let lost = holder.is_lost(now);
                assert_eq!(lost, now >= model_lost_at(model_sent_at), "seed {seed}");
                assert_eq!(
                    holder.lost_at(),
                    model_lost_at(model_sent_at),
                    "seed {seed}"
                );
                assert!(lost || !was_lost, "seed {seed}: lost is sticky");
                was_lost = lost;
                match holder.poll_timeout() {
                    Some(at) => assert!(!lost && at > now, "seed {seed}: busy timeout"),
                    None => assert!(lost, "seed {seed}: no timeout while held"),
                }

                let reply_at = in_flight.map(|(_, at, _)| at);
                let Some(next) = [holder.poll_timeout(), reply_at]
                    .into_iter()
                    .flatten()
                    .min()
                else {
                    break;
                };
                // Sometimes the driver wakes late.
                let late_ms = if rng.chance(1, 4) {
                    rng.below_inclusive(ttl_ms / 4)
                } else {
                    0
                };
                now = next.plus_ms(late_ms);
                if let Some((sent_at, at, succeeded)) = in_flight {
                    if at <= now {
                        in_flight = None;
                        if succeeded {
                            if now < model_lost_at(model_sent_at) {
                                model_sent_at = model_sent_at.max(sent_at);
                            }
                            holder.on_renewed(sent_at, now);
                        } else {
                            holder.on_renew_failed(sent_at, now);
                        }
                    }
                }
            }
            renewed_far += u32::from(model_sent_at.ms_since(granted) >= 5 * ttl_ms);
            ended_lost += u32::from(was_lost);
        }
        assert!(
            renewed_far >= 50 && ended_lost >= 50,
            "{renewed_far} {ended_lost}"
        );
    }

    // --- ContenderWait (L5) ---

    fn waits(policy: LeasePolicy, seed: u64) -> Vec<u64> {
        let mut rng = SplitMix64::new(seed);
        let mut wait = ContenderWait::new(policy, ts(1_000));
        let mut now = ts(1_000);
        let mut waits = Vec::new();
        while let WaitDecision::RetryAt(at) = wait.next_check(now, &mut rng) {
            waits.push(at.ms_since(now));
            now = at;
        }
        waits
    }

    // The exact waits for a fixed seed are pinned, so a change to the formula is deliberate. Each
    // lies in [ceiling / 2, ceiling] of 0.5, 1, 2, 4, 5, 5, ... s, and the last is cut to land on 40 s.
    #[test]
    fn contender_default_waits_for_seed_42_are_pinned() {
        assert_eq!(
            waits(LeasePolicy::default(), 42),
            vec![
                436, 580, 1_278, 2_688, 2_595, 4_671, 3_046, 4_502, 3_350, 4_046, 3_012, 3_732,
                3_784, 2_280
            ]
        );
    }

    #[test]
    fn contender_ceilings_double_up_to_the_cap() {
        let ceilings: Vec<u64> = (0..7).map(contender_ceiling_ms).collect();
        assert_eq!(
            ceilings,
            vec![500, 1_000, 2_000, 4_000, 5_000, 5_000, 5_000]
        );
        assert_eq!(contender_ceiling_ms(64), 5_000);
        assert_eq!(contender_ceiling_ms(u32::MAX), 5_000);
    }

    #[test]
    fn contender_never_gives_up_before_the_stale_threshold() {
        let policies = [
            LeasePolicy::default(),
            LeasePolicy {
                ttl_ms: 1_000,
                grace_ms: 0,
                margin_ms: 100,
            },
            LeasePolicy {
                ttl_ms: 7,
                grace_ms: 3,
                margin_ms: 1,
            },
            LeasePolicy {
                ttl_ms: 120_000,
                grace_ms: 60_000,
                margin_ms: 10_000,
            },
        ];
        for policy in policies {
            for seed in 0..50 {
                let waits = waits(policy, seed);
                let total: u64 = waits.iter().sum();
                // Checked punctually, the last wait lands exactly on the threshold.
                assert_eq!(total, policy.stale_after_ms(), "{policy:?} seed {seed}");
                assert!(waits
                    .iter()
                    .all(|&w| (1..=limits::CONTENDER_BACKOFF_CAP_MS).contains(&w)));
                assert!(waits[0] <= limits::CONTENDER_BACKOFF_BASE_MS);
            }
        }
        // Defaults: 40 s in waits of at most 0.5, 1, 2, 4, then 5 s: at least 11 of them.
        assert!((0..50).all(|seed| waits(LeasePolicy::default(), seed).len() >= 11));
    }

    #[test]
    fn contender_checked_late_still_waits_the_threshold() {
        let policy = LeasePolicy::default();
        for seed in 0..50 {
            let mut rng = SplitMix64::new(seed);
            let mut wait = ContenderWait::new(policy, ts(0));
            let mut now = ts(0);
            loop {
                match wait.next_check(now, &mut rng) {
                    WaitDecision::RetryAt(at) => {
                        assert!(at > now && at.ms_since(now) <= limits::CONTENDER_BACKOFF_CAP_MS);
                        now = at.plus_ms(rng.below_inclusive(3_000));
                    }
                    WaitDecision::Stale => {
                        assert!(now.ms_since(ts(0)) >= policy.stale_after_ms());
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn contender_stale_is_final_and_draws_nothing() {
        let mut wait = ContenderWait::new(LeasePolicy::default(), ts(0));
        let mut rng = SplitMix64::new(3);
        assert_eq!(wait.stale_at(), ts(40_000));
        assert_eq!(wait.started_at(), ts(0));
        assert_eq!(
            wait.next_check(ts(39_999), &mut rng),
            WaitDecision::RetryAt(ts(40_000))
        );
        assert_eq!(wait.next_check(ts(40_000), &mut rng), WaitDecision::Stale);
        let before = rng.clone();
        // A clock that jumps back is clamped: still stale.
        assert_eq!(wait.next_check(ts(0), &mut rng), WaitDecision::Stale);
        assert_eq!(rng, before);

        let no_grace = LeasePolicy {
            ttl_ms: 0,
            grace_ms: 0,
            margin_ms: 0,
        };
        let mut wait = ContenderWait::new(no_grace, ts(5));
        assert_eq!(wait.next_check(ts(5), &mut rng), WaitDecision::Stale);
    }

    // --- guarded_outcome (L4): one test per row of its table ---

    fn outcome(
        end: SectionEnd<u32, &'static str>,
        lease_lost: bool,
        store_accepted_token: bool,
    ) -> GuardedOutcome<u32, &'static str> {
        guarded_outcome(TOKEN, end, lease_lost, store_accepted_token)
    }

    fn lease_lost(reason: LeaseLostReason) -> GuardedOutcome<u32, &'static str> {
        GuardedOutcome::LeaseLost(LeaseLost {
            token: TOKEN,
            reason,
        })
    }

    #[test]
    fn succeeded_with_the_lease_held_and_accepted_is_ok() {
        assert_eq!(
            outcome(SectionEnd::Succeeded(1), false, true),
            GuardedOutcome::Ok(1)
        );
    }

    #[test]
    fn succeeded_with_the_lease_held_but_refused_is_lease_lost() {
        assert_eq!(
            outcome(SectionEnd::Succeeded(1), false, false),
            lease_lost(LeaseLostReason::WriteRefused)
        );
    }

    #[test]
    fn succeeded_with_the_lease_lost_but_accepted_stands_with_a_warning() {
        assert_eq!(
            outcome(SectionEnd::Succeeded(1), true, true),
            GuardedOutcome::OkLeaseLost(1, LeaseLostWarning { token: TOKEN })
        );
    }

    #[test]
    fn succeeded_with_the_lease_lost_and_refused_is_lease_lost() {
        assert_eq!(
            outcome(SectionEnd::Succeeded(1), true, false),
            lease_lost(LeaseLostReason::WriteRefused)
        );
    }

    #[test]
    fn failed_section_error_wins_whatever_the_lease() {
        for lease_lost in [false, true] {
            for accepted in [false, true] {
                assert_eq!(
                    outcome(SectionEnd::Failed("boom"), lease_lost, accepted),
                    GuardedOutcome::Err("boom")
                );
            }
        }
    }

    #[test]
    fn still_running_when_the_lease_is_lost_is_lease_lost() {
        for accepted in [false, true] {
            assert_eq!(
                outcome(SectionEnd::StillRunning, true, accepted),
                lease_lost(LeaseLostReason::StillRunning)
            );
        }
    }

    #[test]
    fn still_running_with_the_lease_held_is_still_lease_lost() {
        assert_eq!(
            outcome(SectionEnd::StillRunning, false, true),
            lease_lost(LeaseLostReason::StillRunning)
        );
    }

    #[test]
    fn lease_lost_is_an_error_and_the_warning_says_not_to_retry() {
        let error: &dyn std::error::Error = &LeaseLost {
            token: TOKEN,
            reason: LeaseLostReason::StillRunning,
        };
        assert_eq!(
            error.to_string(),
            "lease token-7 was lost: the guarded section was still running"
        );
        let warning = LeaseLostWarning { token: TOKEN }.to_string();
        assert!(warning.contains("token-7") && warning.contains("do not retry blindly"));
    }
}

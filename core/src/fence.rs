//! Leadership and self-fencing across hosts (SPEC M2).
//!
//! When daemons on several hosts share one store, one of them leads: it holds a leadership
//! lease that the *database's* clock expires `ttl` after the database stamped the last
//! renewal, and a standby may take over (and reclaim the leader's attempts) once it has. The
//! leader must therefore stop firing, stop claiming and kill its own attempts *before* that
//! can happen, judging only by its own clock and by which renewals were acknowledged. That
//! judgement is this module's [`Fence`].
//!
//! # The rule
//!
//! A leader fences itself once `renewed_at + ttl - margin` passes, where `renewed_at` is when
//! the last *acknowledged* renewal (or the acquisition) was **sent**. The database stamped that
//! renewal no earlier than it was sent, so its expiry is no earlier than `renewed_at + ttl`;
//! the margin covers the two clocks running at different rates. Counting from the
//! acknowledgement instead would let a slow reply stretch the leader's belief past the
//! database's expiry. A leader that learns it was deposed (a renewal finds another holder)
//! fences at once. Fenced is sticky for the term: an acknowledgement that arrives afterwards
//! changes nothing, and only a new acquisition with a higher term leads again.
//!
//! # Driving contract
//!
//! After any `handle_*` call, drain [`Fence::poll_effect`] to `None`, then sleep until
//! [`Fence::poll_timeout`] and call [`Fence::handle_timeout`]. A [`FenceEffect::Renew`] means
//! "send a renewal of `term` now"; report its reply with [`Fence::handle_renew_acked`],
//! [`Fence::handle_renew_failed`] or [`Fence::handle_deposed`], passing back its `sent_at`.
//! A [`FenceEffect::Fence`] means: stop firing and claiming, kill this process's attempts and
//! resign, now.
//!
//! ```
//! use keel_core::fence::{Fence, FenceEffect, FencePolicy, FenceReason};
//! use keel_core::Timestamp;
//!
//! let mut fence = Fence::new(FencePolicy::for_ttl(15_000));
//! fence.handle_acquired(Timestamp(0), Timestamp(0), 1).unwrap();
//! assert_eq!(fence.poll_timeout(), Some(Timestamp(5_000))); // renew every ttl / 3
//! fence.handle_timeout(Timestamp(5_000));
//! let Some(FenceEffect::Renew { term: 1, sent_at }) = fence.poll_effect() else { panic!() };
//! // The reply is slow: it arrives 6 s later. The lead counts from the sending.
//! fence.handle_renew_acked(Timestamp(11_000), sent_at);
//! assert_eq!(fence.fence_at(), Some(Timestamp(17_000))); // 5 s + 15 s - 3 s
//! fence.handle_timeout(Timestamp(17_000));
//! assert_eq!(
//!     fence.poll_effect(),
//!     Some(FenceEffect::Fence { term: 1, reason: FenceReason::RenewalsLapsed })
//! );
//! assert!(!fence.is_leading(Timestamp(17_000)));
//! ```

use std::collections::VecDeque;

use crate::limits;
use crate::time::Timestamp;

/// Leadership lease timing, as the leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FencePolicy {
    /// How long the database keeps the lease after it stamps a renewal.
    pub ttl_ms: u64,
    /// How long before `sent_at + ttl` the leader fences itself: covers the rates of the
    /// leader's clock and the database's.
    pub margin_ms: u64,
    /// How long after the last acknowledged renewal was sent the next one is due.
    pub renew_every_ms: u64,
}

impl FencePolicy {
    /// The daemon's timing for a lease of `ttl_ms`: renew every third of it, fence a fifth of
    /// it before it could expire.
    pub fn for_ttl(ttl_ms: u64) -> Self {
        FencePolicy {
            ttl_ms,
            margin_ms: ttl_ms / 5,
            renew_every_ms: (ttl_ms / 3).max(1),
        }
    }

    /// How long after a renewal was sent the leader fences unless a later one is
    /// acknowledged: `ttl - margin`.
    pub fn fence_after_ms(&self) -> u64 {
        self.ttl_ms.saturating_sub(self.margin_ms)
    }

    /// How long after a failed renewal the next one is sent.
    fn retry_ms(&self) -> u64 {
        self.renew_every_ms
            .clamp(1, limits::LEADER_RENEW_RETRY_MAX_MS)
    }
}

/// What a [`Fence`] is waiting for.
///
/// | From                  | Input                                   | To                                                     |
/// |-----------------------|-----------------------------------------|--------------------------------------------------------|
/// | `Standby` or `Fenced` | `acquired(sent_at, term > any seen)`    | `Leading { term, renewed_at: sent_at }`                |
/// | `Leading`             | `acquired(..)`, or a term not above any seen | unchanged, `Err`                                   |
/// | `Leading`             | any input with `now >= renewed_at + ttl - margin` | `Fenced { RenewalsLapsed }`, emits `Fence`   |
/// | `Leading`             | `timeout(now)`, renewal due, none in flight | unchanged, emits `Renew { sent_at: now }`          |
/// | `Leading`             | `renew_acked(sent_at)` of this term     | `renewed_at = max(renewed_at, sent_at)`                |
/// | `Leading`             | `renew_failed(sent_at)`                 | unchanged; the next renewal after a short pause        |
/// | `Leading`             | `deposed`                               | `Fenced { Deposed }`, emits `Fence`                    |
/// | `Leading`             | `resigned`                              | `Standby`                                              |
/// | `Standby` or `Fenced` | renewal replies, `deposed`, `timeout`   | unchanged                                              |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceState {
    /// Not leading: waiting to acquire the lease.
    Standby,
    /// Leading `term`, as long as renewals keep being acknowledged.
    Leading {
        /// The term held.
        term: u64,
        /// When the last acknowledged renewal (or the acquisition) was sent.
        renewed_at: Timestamp,
    },
    /// Stopped leading `term` without resigning; leads again only with a higher term.
    Fenced {
        /// The term it stopped leading.
        term: u64,
        /// Why.
        reason: FenceReason,
    },
}

/// Why a leader fenced itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// No renewal sent in the last `ttl - margin` was acknowledged.
    RenewalsLapsed,
    /// A renewal found another holder of the lease.
    Deposed,
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceEffect {
    /// Send a renewal of `term` now; report its reply with this `sent_at`.
    Renew {
        /// The term to renew.
        term: u64,
        /// When it is sent.
        sent_at: Timestamp,
    },
    /// Stop firing and claiming, kill this process's attempts and resign, now.
    Fence {
        /// The term this process no longer leads.
        term: u64,
        /// Why.
        reason: FenceReason,
    },
}

/// An input the fence refuses; the state is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceRejected {
    /// An acquisition while already leading.
    #[error("already leading term {term}")]
    AlreadyLeading {
        /// The term held.
        term: u64,
    },
    /// An acquisition whose term is not above every term seen before.
    #[error("term {term} is not above term {highest} seen before")]
    StaleTerm {
        /// The term offered.
        term: u64,
        /// The highest term seen.
        highest: u64,
    },
}

/// One process's leadership: when to renew, and when to fence (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    policy: FencePolicy,
    state: FenceState,
    /// The highest term ever acquired.
    highest_term: u64,
    /// When the renewal in flight was sent, if one is.
    in_flight: Option<Timestamp>,
    /// When the next renewal is due (while leading with none in flight).
    renew_at: Timestamp,
    /// The latest `now` handled; an earlier one is clamped to it.
    now: Timestamp,
    effects: VecDeque<FenceEffect>,
}

impl Fence {
    /// A process standing by under `policy`.
    pub fn new(policy: FencePolicy) -> Self {
        Fence {
            policy,
            state: FenceState::Standby,
            highest_term: 0,
            in_flight: None,
            renew_at: Timestamp::EPOCH,
            now: Timestamp::EPOCH,
            effects: VecDeque::new(),
        }
    }

    /// This process acquired the lease for `term`: the acquisition was sent at `sent_at` and
    /// its reply arrived at `now`. The lead counts from `sent_at` (the database stamped the
    /// lease no earlier), not from `now`.
    pub fn handle_acquired(
        &mut self,
        now: Timestamp,
        sent_at: Timestamp,
        term: u64,
    ) -> Result<(), FenceRejected> {
        if let FenceState::Leading { term, .. } = self.state {
            return Err(FenceRejected::AlreadyLeading { term });
        }
        if term <= self.highest_term {
            return Err(FenceRejected::StaleTerm {
                term,
                highest: self.highest_term,
            });
        }
        let now = self.advance(now);
        // Not clamped up to `now`: that would count the lead from the reply.
        let renewed_at = sent_at.min(now);
        self.highest_term = term;
        self.state = FenceState::Leading { term, renewed_at };
        self.in_flight = None;
        self.renew_at = renewed_at.plus_ms(self.policy.renew_every_ms);
        // An acquisition whose reply came too late is no lead at all.
        self.advance(now);
        Ok(())
    }

    /// Time passed: fences if the lease could be about to expire, emits a renewal if one is
    /// due.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let now = self.advance(now);
        let FenceState::Leading { term, .. } = self.state else {
            return;
        };
        if self.in_flight.is_none() && now >= self.renew_at {
            self.in_flight = Some(now);
            self.effects
                .push_back(FenceEffect::Renew { term, sent_at: now });
        }
    }

    /// The renewal sent at `sent_at` was acknowledged; the reply arrived at `now`.
    ///
    /// Extends the lead to `sent_at + ttl - margin` (never backwards), unless this process
    /// already fenced by `now`: a late acknowledgement does not revive a lead.
    pub fn handle_renew_acked(&mut self, now: Timestamp, sent_at: Timestamp) {
        let now = self.advance(now);
        let FenceState::Leading { term, renewed_at } = self.state else {
            return;
        };
        // A renewal cannot have been sent after its reply arrived.
        let sent_at = sent_at.min(now);
        self.state = FenceState::Leading {
            term,
            renewed_at: renewed_at.max(sent_at),
        };
        if self.in_flight == Some(sent_at) {
            self.in_flight = None;
        }
        self.renew_at = self
            .renew_at
            .max(renewed_at.max(sent_at).plus_ms(self.policy.renew_every_ms));
    }

    /// The renewal sent at `sent_at` failed (no answer, an error); the caller learnt so at
    /// `now`. The lead is not extended; the next renewal goes after a short pause.
    pub fn handle_renew_failed(&mut self, now: Timestamp, sent_at: Timestamp) {
        let now = self.advance(now);
        if !matches!(self.state, FenceState::Leading { .. }) || self.in_flight != Some(sent_at) {
            return;
        }
        self.in_flight = None;
        self.renew_at = now.plus_ms(self.policy.retry_ms());
    }

    /// A renewal found another holder of the lease: fences at once.
    pub fn handle_deposed(&mut self, now: Timestamp) {
        self.advance(now);
        if let FenceState::Leading { term, .. } = self.state {
            self.fence(term, FenceReason::Deposed);
        }
    }

    /// This process resigned its term (a graceful stop): stands by, with nothing to fence.
    pub fn handle_resigned(&mut self, now: Timestamp) {
        self.advance(now);
        if let FenceState::Leading { .. } = self.state {
            self.state = FenceState::Standby;
            self.in_flight = None;
        }
    }

    /// The next thing for the driver to do, if any.
    pub fn poll_effect(&mut self) -> Option<FenceEffect> {
        self.effects.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next: the next renewal or the
    /// fence deadline, whichever is first; `None` unless leading.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let fence_at = self.fence_at()?;
        Some(match self.in_flight {
            Some(_) => fence_at,
            None => self.renew_at.min(fence_at),
        })
    }

    /// The instant from which this process fences unless a renewal sent before it is
    /// acknowledged first: `renewed_at + ttl - margin`; `None` unless leading.
    pub fn fence_at(&self) -> Option<Timestamp> {
        match self.state {
            FenceState::Leading { renewed_at, .. } => {
                Some(renewed_at.plus_ms(self.policy.fence_after_ms()))
            }
            _ => None,
        }
    }

    /// Whether this process may act as leader at `now`: leading, and `now` (or a later
    /// instant already handled) is before the fence deadline. A query: it records nothing.
    pub fn is_leading(&self, now: Timestamp) -> bool {
        self.fence_at()
            .is_some_and(|fence_at| now.max(self.now) < fence_at)
    }

    /// The term this process leads, if it does.
    pub fn term(&self) -> Option<u64> {
        match self.state {
            FenceState::Leading { term, .. } => Some(term),
            _ => None,
        }
    }

    /// The state.
    pub fn state(&self) -> FenceState {
        self.state
    }

    /// The policy.
    pub fn policy(&self) -> FencePolicy {
        self.policy
    }

    /// Clamps `now` to the latest instant handled, records it, and fences if the deadline has
    /// been reached.
    fn advance(&mut self, now: Timestamp) -> Timestamp {
        self.now = self.now.max(now);
        if let (FenceState::Leading { term, .. }, Some(fence_at)) = (self.state, self.fence_at()) {
            if self.now >= fence_at {
                self.fence(term, FenceReason::RenewalsLapsed);
            }
        }
        self.now
    }

    fn fence(&mut self, term: u64, reason: FenceReason) {
        self.state = FenceState::Fenced { term, reason };
        self.in_flight = None;
        self.effects.push_back(FenceEffect::Fence { term, reason });
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const TTL: u64 = 15_000;

    fn leading(at: i64, term: u64) -> Fence {
        let mut fence = Fence::new(FencePolicy::for_ttl(TTL));
        fence
            .handle_acquired(Timestamp(at), Timestamp(at), term)
            .unwrap();
        fence
    }

    fn drain(fence: &mut Fence) -> Vec<FenceEffect> {
        std::iter::from_fn(|| fence.poll_effect()).collect()
    }

    #[test]
    fn renews_every_third_of_the_ttl_counting_from_the_sending() {
        let mut fence = leading(1_000, 1);
        assert_eq!(fence.poll_timeout(), Some(Timestamp(6_000)));
        fence.handle_timeout(Timestamp(5_999));
        assert_eq!(drain(&mut fence), vec![]);
        fence.handle_timeout(Timestamp(6_000));
        assert_eq!(
            drain(&mut fence),
            vec![FenceEffect::Renew {
                term: 1,
                sent_at: Timestamp(6_000)
            }]
        );
        // One renewal in flight at most: the timeout is now the fence deadline.
        assert_eq!(fence.poll_timeout(), Some(Timestamp(13_000)));
        fence.handle_timeout(Timestamp(8_000));
        assert_eq!(drain(&mut fence), vec![]);
        fence.handle_renew_acked(Timestamp(8_000), Timestamp(6_000));
        assert_eq!(fence.poll_timeout(), Some(Timestamp(11_000)));
        assert_eq!(fence.fence_at(), Some(Timestamp(18_000)));
    }

    /// The rule's reason to exist: a reply that takes almost the whole TTL to arrive must not
    /// extend the lead past `sent_at + ttl - margin`.
    #[test]
    fn a_slow_acknowledgement_does_not_extend_the_lead() {
        let mut fence = leading(0, 1);
        fence.handle_timeout(Timestamp(5_000));
        drain(&mut fence);
        // Acknowledged 6.9 s after it was sent, just before the first deadline (12 s);
        // counting from the reply would give 23.9 s.
        fence.handle_renew_acked(Timestamp(11_900), Timestamp(5_000));
        assert!(fence.is_leading(Timestamp(11_900)));
        assert_eq!(fence.fence_at(), Some(Timestamp(17_000)));
        assert!(fence.is_leading(Timestamp(16_999)));
        assert!(!fence.is_leading(Timestamp(17_000)));
        // The next renewal (due at 10 s, sent at once) gets no answer.
        fence.handle_timeout(Timestamp(11_900));
        fence.handle_timeout(Timestamp(17_000));
        assert_eq!(
            drain(&mut fence),
            vec![
                FenceEffect::Renew {
                    term: 1,
                    sent_at: Timestamp(11_900)
                },
                FenceEffect::Fence {
                    term: 1,
                    reason: FenceReason::RenewalsLapsed
                }
            ]
        );
        // A reply "sent" in the future is clamped to its arrival.
        let mut fence = leading(0, 1);
        fence.handle_renew_acked(Timestamp(1_000), Timestamp(9_000));
        assert_eq!(fence.fence_at(), Some(Timestamp(13_000)));
    }

    #[test]
    fn failed_renewals_do_not_extend_the_lead_and_are_retried() {
        let mut fence = leading(0, 1);
        fence.handle_timeout(Timestamp(5_000));
        drain(&mut fence);
        fence.handle_renew_failed(Timestamp(5_200), Timestamp(5_000));
        assert_eq!(fence.fence_at(), Some(Timestamp(12_000)));
        assert_eq!(fence.poll_timeout(), Some(Timestamp(6_200)));
        fence.handle_timeout(Timestamp(6_200));
        assert_eq!(
            drain(&mut fence),
            vec![FenceEffect::Renew {
                term: 1,
                sent_at: Timestamp(6_200)
            }]
        );
        fence.handle_timeout(Timestamp(12_000));
        assert_eq!(
            drain(&mut fence),
            vec![FenceEffect::Fence {
                term: 1,
                reason: FenceReason::RenewalsLapsed
            }]
        );
        assert_eq!(fence.poll_timeout(), None);
        // The answer to the renewal sent at 6.2 s arrives too late to matter.
        fence.handle_renew_acked(Timestamp(12_001), Timestamp(6_200));
        assert!(!fence.is_leading(Timestamp(12_001)));
        assert_eq!(drain(&mut fence), vec![]);
    }

    #[test]
    fn a_deposed_leader_fences_at_once_and_a_late_ack_does_not_unfence() {
        let mut fence = leading(0, 3);
        fence.handle_timeout(Timestamp(5_000));
        drain(&mut fence);
        fence.handle_deposed(Timestamp(5_010));
        assert_eq!(
            drain(&mut fence),
            vec![FenceEffect::Fence {
                term: 3,
                reason: FenceReason::Deposed
            }]
        );
        fence.handle_renew_acked(Timestamp(5_020), Timestamp(5_000));
        fence.handle_timeout(Timestamp(5_030));
        assert_eq!(
            fence.state(),
            FenceState::Fenced {
                term: 3,
                reason: FenceReason::Deposed
            }
        );
        assert!(!fence.is_leading(Timestamp(5_030)));
        assert_eq!(drain(&mut fence), vec![]);
        assert_eq!(fence.poll_timeout(), None);
    }

    #[test]
    fn an_acquisition_counts_from_its_sending() {
        let mut fence = Fence::new(FencePolicy::for_ttl(TTL));
        fence.handle_timeout(Timestamp(50_000));
        // Sent at 41 s, answered at 50 s: the lead ends at 41 s + 12 s, not 62 s.
        fence
            .handle_acquired(Timestamp(50_000), Timestamp(41_000), 2)
            .unwrap();
        assert_eq!(fence.fence_at(), Some(Timestamp(53_000)));
        // Answered after that: fenced at once.
        let mut late = Fence::new(FencePolicy::for_ttl(TTL));
        late.handle_acquired(Timestamp(60_000), Timestamp(41_000), 2)
            .unwrap();
        assert!(!late.is_leading(Timestamp(60_000)));
        assert_eq!(
            drain(&mut late),
            vec![FenceEffect::Fence {
                term: 2,
                reason: FenceReason::RenewalsLapsed
            }]
        );
    }

    #[test]
    fn leads_again_only_with_a_higher_term() {
        let mut fence = leading(0, 3);
        fence.handle_deposed(Timestamp(10));
        let before = fence.clone();
        assert_eq!(
            fence.handle_acquired(Timestamp(20), Timestamp(20), 3),
            Err(FenceRejected::StaleTerm {
                term: 3,
                highest: 3
            })
        );
        assert_eq!(
            fence.handle_acquired(Timestamp(20), Timestamp(20), 2),
            Err(FenceRejected::StaleTerm {
                term: 2,
                highest: 3
            })
        );
        assert_eq!(fence, before);
        fence
            .handle_acquired(Timestamp(20), Timestamp(20), 4)
            .unwrap();
        assert_eq!(fence.term(), Some(4));
        assert_eq!(
            fence.handle_acquired(Timestamp(30), Timestamp(30), 5),
            Err(FenceRejected::AlreadyLeading { term: 4 })
        );
        assert_eq!(fence.term(), Some(4));
    }

    #[test]
    fn a_resigned_leader_stands_by_without_fencing() {
        let mut fence = leading(0, 1);
        fence.handle_resigned(Timestamp(100));
        assert_eq!(fence.state(), FenceState::Standby);
        fence.handle_timeout(Timestamp(60_000));
        assert_eq!(drain(&mut fence), vec![]);
        assert_eq!(fence.poll_timeout(), None);
    }

    /// A reply the world gives to a renewal in flight.
    #[derive(Clone, Copy, Debug)]
    enum Reply {
        /// Acknowledged after `delay_ms`; the database stamped it `stamp_ms` after the sending
        /// (at most the delay).
        Acked {
            delay_ms: u64,
            stamp_ms: u64,
        },
        Failed {
            delay_ms: u64,
        },
        Deposed {
            delay_ms: u64,
        },
        /// No reply: the driver gives up on it at the fence deadline.
        Lost,
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            6 => (0..2 * TTL, 0..=1_000u64).prop_map(|(delay_ms, part)| Reply::Acked {
                delay_ms,
                stamp_ms: delay_ms * part / 1_000,
            }),
            2 => (0..TTL).prop_map(|delay_ms| Reply::Failed { delay_ms }),
            1 => (0..TTL).prop_map(|delay_ms| Reply::Deposed { delay_ms }),
            1 => Just(Reply::Lost),
        ]
    }

    proptest! {
        /// Whatever the replies and their delays, and whatever the database's clock rate
        /// (within ±20 %, which the margin of a fifth of the TTL covers), the leader never
        /// believes it leads at an instant the database could already have expired its lease;
        /// once fenced it never leads again; every timeout is in the future.
        #[test]
        fn fences_before_the_database_could_expire_the_lease(
            replies in proptest::collection::vec(reply(), 1..40),
            db_rate_per_mille in 800u64..=1_200,
        ) {
            // The database's clock reading at local instant `t` (its own rate, same origin).
            let db = |t: Timestamp| t.0 as u64 * db_rate_per_mille / 1_000;
            let mut fence = leading(0, 7);
            // The database expiry of the lease, in database time: stamped at acquisition.
            let mut db_expiry = db(Timestamp(0)) + TTL;
            let mut now = Timestamp(0);
            let mut fenced_at = None;
            let mut replies = replies.into_iter();
            while let Some(wake) = fence.poll_timeout() {
                // A deadline may have passed while a reply was awaited: act on it at once.
                now = now.max(wake);
                fence.handle_timeout(now);
                if let Some(next) = fence.poll_timeout() {
                    prop_assert!(next > now, "timeout {next} not after {now}");
                }
                let mut renewal = None;
                for effect in drain(&mut fence) {
                    match effect {
                        FenceEffect::Renew { term, sent_at } => {
                            prop_assert_eq!(term, 7);
                            renewal = Some(sent_at);
                        }
                        FenceEffect::Fence { term, .. } => {
                            prop_assert_eq!(term, 7);
                            fenced_at = Some(now);
                        }
                    }
                }
                if let Some(sent_at) = renewal {
                    let Some(mut reply) = replies.next() else { break };
                    // The driver waits for a reply only until the fence deadline.
                    let fence_at = fence.fence_at().unwrap();
                    let delay = match reply {
                        Reply::Acked { delay_ms, .. }
                        | Reply::Failed { delay_ms }
                        | Reply::Deposed { delay_ms } => delay_ms,
                        Reply::Lost => u64::MAX,
                    };
                    if sent_at.plus_ms(delay) >= fence_at {
                        reply = Reply::Lost;
                    }
                    match reply {
                        Reply::Acked { delay_ms, stamp_ms } => {
                            let stamped = sent_at.plus_ms(stamp_ms);
                            // A renewal of a live lease extends it; one that arrives after
                            // the expiry finds another holder (the lease is gone).
                            if db(stamped) < db_expiry {
                                db_expiry = db_expiry.max(db(stamped) + TTL);
                                now = now.max(sent_at.plus_ms(delay_ms));
                                fence.handle_renew_acked(now, sent_at);
                            } else {
                                now = now.max(sent_at.plus_ms(delay_ms));
                                fence.handle_deposed(now);
                            }
                        }
                        Reply::Failed { delay_ms } => {
                            now = now.max(sent_at.plus_ms(delay_ms));
                            fence.handle_renew_failed(now, sent_at);
                        }
                        Reply::Deposed { delay_ms } => {
                            now = now.max(sent_at.plus_ms(delay_ms));
                            fence.handle_deposed(now);
                        }
                        Reply::Lost => {}
                    }
                    for effect in drain(&mut fence) {
                        if let FenceEffect::Fence { .. } = effect {
                            fenced_at = Some(now);
                        }
                    }
                }
                // The invariant: leading only strictly before the database's expiry.
                if fence.is_leading(now) {
                    prop_assert!(
                        db(now) < db_expiry,
                        "leads at {now} (db {}) past the db expiry {db_expiry}", db(now)
                    );
                    let fence_at = fence.fence_at().unwrap();
                    prop_assert!(db(fence_at) <= db_expiry);
                }
                if fenced_at.is_some() {
                    prop_assert!(!fence.is_leading(now));
                    prop_assert_eq!(fence.term(), None);
                }
            }
            if let Some(at) = fenced_at {
                // Fenced no later than the database's expiry, and for good.
                prop_assert!(db(at) <= db_expiry, "fenced at {at} after the db expiry");
                prop_assert!(fence.handle_acquired(now, now, 7).is_err());
                prop_assert!(!fence.is_leading(now.plus_ms(1)));
            }
        }
    }
}

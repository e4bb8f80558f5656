//! Retry policy: how many attempts a run gets and how long it waits between them (SPEC R2, R3).
//!
//! The policy is a pure function of the failed attempt's number, the run's age and a random
//! draw from the scheduler's seeded generator. It never sleeps: the scheduler turns the delay
//! into a `BackingOff { until }` state and a timer, so a job that is backing off delays nothing
//! else.
//!
//! # The numbers
//!
//! After attempt `n` (counting from 1) fails retryably, and if `n < attempts_max`:
//!
//! ```text
//! ceiling = min(backoff_cap_ms, backoff_base_ms * backoff_factor^(n - 1))
//! delay   = ceiling * (1 - jitter) + uniform(0 ..= ceiling * jitter)
//! ```
//!
//! With the defaults (`attempts_max` 3, base 1 s, factor 2, cap 5 min, jitter 1.0 — "full
//! jitter") the ceilings are 1 s after the first attempt and 2 s after the second, and the
//! third attempt is the last. `attempts_max` **includes** the first attempt: 1 means no
//! retries. If `deadline_ms` is set, a retry that would start later than `deadline_ms` after
//! the run was created is not scheduled and the run fails.

use serde::{Deserialize, Serialize};

use crate::limits;
use crate::rng::SplitMix64;

/// How a run is retried. Validate with [`RetryPolicy::validate`]; the scheduler does so when a
/// job is added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts in total, the first included. 1 to [`limits::ATTEMPTS_MAX`].
    pub attempts_max: u32,
    /// Ceiling of the delay after the first failed attempt.
    pub backoff_base_ms: u64,
    /// Growth of the ceiling per failed attempt; at least 1.0.
    pub backoff_factor: f64,
    /// Largest ceiling; at most [`limits::DELAY_MAX_MS`].
    pub backoff_cap_ms: u64,
    /// Fraction of the ceiling that is random, from 0.0 (no jitter) to 1.0 (full jitter).
    pub jitter: f64,
    /// Optional bound on a run's total life: no retry starts later than this after the run was
    /// created.
    pub deadline_ms: Option<u64>,
    /// Lost attempts (crashes, reclaimed leases, releases) a run may have before it is given up
    /// as poison (`failed_dropped`). Budgeted apart from `attempts_max`.
    pub lost_attempts_max: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 3,
            backoff_base_ms: 1_000,
            backoff_factor: 2.0,
            backoff_cap_ms: 5 * 60 * 1_000,
            jitter: 1.0,
            deadline_ms: None,
            lost_attempts_max: 3,
        }
    }
}

/// Why a [`RetryPolicy`] is invalid; each variant names the field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RetryPolicyError {
    /// `attempts_max` is 0 or above the limit.
    #[error("attempts_max must be 1 to {max} (it includes the first attempt); got {got}", max = limits::ATTEMPTS_MAX)]
    AttemptsMax {
        /// The value given.
        got: u32,
    },
    /// `lost_attempts_max` is 0 or above the limit.
    #[error("lost_attempts_max must be 1 to {max}; got {got}", max = limits::ATTEMPTS_MAX)]
    LostAttemptsMax {
        /// The value given.
        got: u32,
    },
    /// `backoff_factor` is below 1, infinite or not a number.
    #[error("backoff_factor must be a finite number >= 1.0; got {got}")]
    BackoffFactor {
        /// The value given.
        got: f64,
    },
    /// `jitter` is outside 0.0..=1.0.
    #[error("jitter must be between 0.0 and 1.0; got {got}")]
    Jitter {
        /// The value given.
        got: f64,
    },
    /// `backoff_cap_ms` or `backoff_base_ms` is above [`limits::DELAY_MAX_MS`], or the base is
    /// above the cap.
    #[error("backoff must satisfy base ({base_ms} ms) <= cap ({cap_ms} ms) <= {max} ms", max = limits::DELAY_MAX_MS)]
    Backoff {
        /// The base given.
        base_ms: u64,
        /// The cap given.
        cap_ms: u64,
    },
}

/// What the policy decided after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Start the next attempt after this many milliseconds.
    RetryAfter {
        /// The delay.
        delay_ms: u64,
    },
    /// No attempts left.
    Exhausted,
    /// The next attempt would start after the run's deadline.
    DeadlineExceeded,
}

impl RetryPolicy {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if self.attempts_max == 0 || self.attempts_max > limits::ATTEMPTS_MAX {
            return Err(RetryPolicyError::AttemptsMax {
                got: self.attempts_max,
            });
        }
        if self.lost_attempts_max == 0 || self.lost_attempts_max > limits::ATTEMPTS_MAX {
            return Err(RetryPolicyError::LostAttemptsMax {
                got: self.lost_attempts_max,
            });
        }
        if !self.backoff_factor.is_finite() || self.backoff_factor < 1.0 {
            return Err(RetryPolicyError::BackoffFactor {
                got: self.backoff_factor,
            });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(RetryPolicyError::Jitter { got: self.jitter });
        }
        if self.backoff_base_ms > self.backoff_cap_ms || self.backoff_cap_ms > limits::DELAY_MAX_MS
        {
            return Err(RetryPolicyError::Backoff {
                base_ms: self.backoff_base_ms,
                cap_ms: self.backoff_cap_ms,
            });
        }
        Ok(())
    }

    /// The ceiling of the delay after failed attempt number `failed` (1-based).
    pub fn ceiling_ms(&self, failed: u32) -> u64 {
        capped_backoff_ms(
            self.backoff_base_ms,
            self.backoff_factor,
            self.backoff_cap_ms,
            failed,
        )
    }

    /// Like [`RetryPolicy::decide`] for a retry that starts at once (after a crash): checks
    /// the attempts left and the deadline against the run's age, without drawing a delay.
    pub fn decide_immediate(&self, failed: u32, age_ms: u64) -> RetryDecision {
        if failed >= self.attempts_max {
            return RetryDecision::Exhausted;
        }
        if self.deadline_ms.is_some_and(|deadline| age_ms > deadline) {
            return RetryDecision::DeadlineExceeded;
        }
        RetryDecision::RetryAfter { delay_ms: 0 }
    }

    /// Decides what follows failed attempt number `failed` (counted against `attempts_max`) of
    /// a run that is `age_ms` old. Draws from `rng` only when it returns a retry.
    pub fn decide(&self, failed: u32, age_ms: u64, rng: &mut SplitMix64) -> RetryDecision {
        if failed >= self.attempts_max {
            return RetryDecision::Exhausted;
        }
        let ceiling = self.ceiling_ms(failed);
        let random_part = (ceiling as f64 * self.jitter) as u64;
        let delay_ms = ceiling - random_part + rng.below_inclusive(random_part);
        if let Some(deadline) = self.deadline_ms {
            if age_ms.saturating_add(delay_ms) > deadline {
                return RetryDecision::DeadlineExceeded;
            }
        }
        RetryDecision::RetryAfter { delay_ms }
    }
}

/// The capped exponential backoff after failed attempt number `failed` (1-based):
/// `min(cap_ms, base_ms * factor^(failed - 1))`. One formula for job retries
/// ([`RetryPolicy::ceiling_ms`]) and delivery retries ([`DeliveryPolicy::backoff_ms`]).
///
/// [`DeliveryPolicy::backoff_ms`]: crate::outbox::DeliveryPolicy::backoff_ms
pub(crate) fn capped_backoff_ms(base_ms: u64, factor: f64, cap_ms: u64, failed: u32) -> u64 {
    let exponent = i32::try_from(failed.saturating_sub(1)).unwrap_or(i32::MAX);
    let delay = base_ms as f64 * factor.powi(exponent);
    // `as` saturates for floats above u64::MAX and maps NaN to 0; the cap bounds it anyway.
    (delay as u64).min(cap_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays(policy: &RetryPolicy, seed: u64) -> Vec<RetryDecision> {
        let mut rng = SplitMix64::new(seed);
        (1..=policy.attempts_max)
            .map(|n| policy.decide(n, 0, &mut rng))
            .collect()
    }

    // SPEC R2: the exact delays (each within its ceiling of 1, 2, 4, 8 and 16 s) for a fixed seed are pinned, so a change to the formula or the
    // generator is a visible, deliberate change (docs/semantics.md quotes the same numbers).
    #[test]
    fn default_policy_delays_for_seed_42_are_pinned() {
        let policy = RetryPolicy {
            attempts_max: 6,
            ..RetryPolicy::default()
        };
        assert_eq!(
            delays(&policy, 42),
            vec![
                RetryDecision::RetryAfter { delay_ms: 742 },
                RetryDecision::RetryAfter { delay_ms: 319 },
                RetryDecision::RetryAfter { delay_ms: 1_114 },
                RetryDecision::RetryAfter { delay_ms: 2_753 },
                RetryDecision::RetryAfter { delay_ms: 608 },
                RetryDecision::Exhausted,
            ]
        );
    }

    #[test]
    fn ceilings_grow_by_the_factor_up_to_the_cap() {
        let policy = RetryPolicy::default();
        let ceilings: Vec<u64> = (1..=12).map(|n| policy.ceiling_ms(n)).collect();
        assert_eq!(
            ceilings,
            vec![
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
                300_000, 300_000
            ]
        );
        assert_eq!(policy.ceiling_ms(u32::MAX), 300_000);
    }

    #[test]
    fn no_jitter_means_exactly_the_ceiling() {
        let policy = RetryPolicy {
            jitter: 0.0,
            attempts_max: 4,
            ..RetryPolicy::default()
        };
        assert_eq!(
            delays(&policy, 1),
            vec![
                RetryDecision::RetryAfter { delay_ms: 1_000 },
                RetryDecision::RetryAfter { delay_ms: 2_000 },
                RetryDecision::RetryAfter { delay_ms: 4_000 },
                RetryDecision::Exhausted,
            ]
        );
    }

    #[test]
    fn attempts_max_includes_the_first_attempt() {
        let once = RetryPolicy {
            attempts_max: 1,
            ..RetryPolicy::default()
        };
        assert_eq!(
            once.decide(1, 0, &mut SplitMix64::new(0)),
            RetryDecision::Exhausted
        );
    }

    #[test]
    fn deadline_stops_retries() {
        let policy = RetryPolicy {
            jitter: 0.0,
            deadline_ms: Some(10_000),
            ..RetryPolicy::default()
        };
        let mut rng = SplitMix64::new(0);
        assert_eq!(
            policy.decide(1, 8_000, &mut rng),
            RetryDecision::RetryAfter { delay_ms: 1_000 }
        );
        assert_eq!(
            policy.decide(1, 9_500, &mut rng),
            RetryDecision::DeadlineExceeded
        );
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |p: RetryPolicy| p.validate().unwrap_err();
        assert!(matches!(
            bad(RetryPolicy {
                attempts_max: 0,
                ..Default::default()
            }),
            RetryPolicyError::AttemptsMax { got: 0 }
        ));
        assert!(matches!(
            bad(RetryPolicy {
                backoff_factor: f64::NAN,
                ..Default::default()
            }),
            RetryPolicyError::BackoffFactor { .. }
        ));
        assert!(matches!(
            bad(RetryPolicy {
                jitter: 1.5,
                ..Default::default()
            }),
            RetryPolicyError::Jitter { .. }
        ));
        assert!(matches!(
            bad(RetryPolicy {
                backoff_base_ms: 10,
                backoff_cap_ms: 5,
                ..Default::default()
            }),
            RetryPolicyError::Backoff { .. }
        ));
        assert!(RetryPolicy::default().validate().is_ok());
    }
}

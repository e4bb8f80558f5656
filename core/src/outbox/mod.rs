//! The delivery outbox: the results of finished runs on their way to sinks (SPEC D1–D5).
//!
//! When a run finishes, its result ([`DeliveryPayload::Run`]) is queued once per sink (a
//! webhook, a command) as a [`Delivery`]; so is every incident notification
//! ([`DeliveryPayload::Incident`], SPEC A3), with the same retries, capacity and counter. The outbox decides when each delivery is sent, classifies and
//! retries failures with a backoff of its own, and reports every outcome once. It never
//! touches runs: a delivery is keyed to the run that produced it, re-sending a result never
//! re-runs the job, and a run that runs again produces a new result with new deliveries (D2).
//!
//! # States and legal transitions
//!
//! A delivery is `Waiting { due }` (for its send time, and before its first send for its record
//! to become durable) or `Sending { attempt }` (for the sink's answer). Terminal deliveries
//! leave the outbox: their record is deleted and one event says how they ended.
//!
//! | from | input | to | outputs |
//! |---|---|---|---|
//! | (new) | [`enqueue`](Outbox::enqueue), room left | `Waiting { due: now }`, not durable | upsert |
//! | (new) | `enqueue`, full, `drop_oldest` | `Waiting { due: now }`; the oldest `Waiting` delivery is evicted | upsert; `Dropped` + delete for the evicted one |
//! | (new) | `enqueue`, full, `reject_newest` (or `drop_oldest` with every delivery `Sending`) | (not created, no id) | `Dropped { id: None }` |
//! | `Waiting`, not durable | [`mark_durable`](Outbox::mark_durable) | `Waiting`, durable | — |
//! | `Waiting { due }`, durable | [`handle_timeout`](Outbox::handle_timeout) at or after `due` | `Sending { attempt + 1 }` | [`SendRequest`], upsert |
//! | `Sending` | result `Delivered` | (gone) | `Finished { success }`, delete |
//! | `Sending` | result `Permanent` | (gone) | `Finished { permanent }`, delete |
//! | `Sending { n }` | result `Transient`, `n < attempts_max` | `Waiting { due: now + delay(n) }` | `RetryScheduled`, upsert |
//! | `Sending { n }` | result `Transient`, `n = attempts_max` | (gone) | `Finished { exhausted }`, delete |
//! | `Sending { n }` | [`restore`](Outbox::restore), `n < attempts_max` | `Waiting { due: now }`, attempt `n` counted, durable | upsert |
//! | `Sending { n }` | `restore`, `n = attempts_max` | (gone) | `Finished { exhausted }`, delete |
//! | `Waiting` | `restore` over capacity | (gone) by the overflow policy | `Dropped`, delete |
//!
//! A result for an unknown delivery, for another attempt than the current one, or for a
//! delivery that is not `Sending` is refused with [`OutboxRejected`] and changes nothing.
//!
//! # Inputs and outputs
//!
//! Inputs: [`Outbox::enqueue`], [`Outbox::mark_durable`], [`Outbox::handle_timeout`],
//! [`Outbox::handle_result`], and [`Outbox::restore`] after a restart. Every input that takes
//! `now` clamps it to the latest `now` seen. Outputs, drained after every input:
//! [`Outbox::poll_send`] (what to send), [`Outbox::poll_event`] (outcomes, for logs and the
//! D4 counter), [`Outbox::take_writes`] with [`Outbox::next_id`] (what to persist) and
//! [`Outbox::poll_timeout`] (when to call `handle_timeout` next). After `handle_timeout(now)`,
//! `poll_timeout()` is later than `now`.
//!
//! # Persistence
//!
//! Persist before send: a new delivery is not sent until the store has made its record durable
//! and the driver says so with `mark_durable`, so a crash after a send can never lose the
//! delivery. Deliveries restored from the store are durable. Every delivery that finishes
//! yields exactly one [`OutboxEvent::Finished`] and every delivery evicted or refused on
//! overflow exactly one [`OutboxEvent::Dropped`], across restarts as long as the writes taken
//! before the restart reached the store; a delete lost in a crash brings a finished delivery
//! back, and it is sent again (at-least-once). Sinks should deduplicate by delivery id.
//!
//! A delivery found `Sending` after a restart was cut short: its attempt counts, so retries stay
//! bounded by `attempts_max`, provided the record showing `Sending { n }` was durable before
//! attempt `n` went out. The outbox releases a [`SendRequest`] as soon as the delivery's first
//! record is durable; a driver that needs the bound across crashes persists the writes taken
//! after `handle_timeout` before it performs the sends that call produced.
//!
//! # The numbers
//!
//! With the default [`DeliveryPolicy`] (SPEC D3): `attempts_max` 3, the first attempt
//! included. After failed attempt `n` (from 1), if `n < attempts_max`, the next one is due
//!
//! ```text
//! backoff(n) = min(backoff_cap_ms, backoff_base_ms * backoff_factor^(n - 1))
//! delay(n)   = max(backoff(n), min(retry_after_ms, retry_after_max_ms))
//! ```
//!
//! later: 30 s after the first attempt, 60 s after the second, and the third is the last. The
//! cap is 5 minutes, there is no jitter, and a sink's `Retry-After` can lengthen a delay (up to
//! one hour) but never shorten it. [`classify_http`] and [`classify_transport_error`] turn an
//! HTTP exchange into a [`DeliveryResult`]. The outbox holds at most
//! [`limits::OUTBOX_CAPACITY_DEFAULT`] deliveries by default.
//!
//! # Layout
//!
//! This file holds the types and the machine; `classify.rs` the HTTP classification, re-exported
//! here; `tests.rs` the unit tests and `tests/model.rs` the property test.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, RunId};
use crate::incident::IncidentNotice;
use crate::limits;
use crate::run::{truncate, RunError, StateName};
use crate::time::Timestamp;

mod classify;

pub use classify::{classify_http, classify_transport_error};

/// Identifies a delivery. Allocated by the outbox from a counter that is persisted with its
/// writes ([`Outbox::next_id`]), so an id is never reused once its record is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryId(pub u64);

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "delivery-{}", self.0)
    }
}

/// What is sent: the result of a finished run, or an incident notification (SPEC A3).
///
/// Stored as it is sent: a run's result as the flat fields of [`RunResult`] (the only form
/// there was before incidents were delivered, so older delivery records still read), an
/// incident notification as `{"incident": {…}}` ([`IncidentNotice`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeliveryPayload {
    /// An incident notification, stored and sent as `{"incident": {…}}`.
    Incident {
        /// The notification.
        incident: IncidentNotice,
    },
    /// The result of a finished run, its fields at the top level.
    Run(RunResult),
}

/// The result of a finished run, built from the run's id, job, terminal state
/// (`RunState::name`), summary, last error and `finished_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// The run that produced the result.
    pub run: RunId,
    /// The run's job.
    pub job: JobId,
    /// The run's terminal state.
    pub state: StateName,
    /// The success summary, if any.
    pub summary: Option<String>,
    /// The run's last concrete error, if any.
    pub error: Option<RunError>,
    /// When the run reached its terminal state.
    pub finished_at: Timestamp,
}

/// What a delivery is about: a run (its result) or an incident (a notification).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeliverySubject {
    /// The run whose result it carries.
    Run(RunId),
    /// The incident it tells about.
    Incident(u64),
}

impl fmt::Display for DeliverySubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliverySubject::Run(run) => write!(f, "{run}"),
            DeliverySubject::Incident(id) => write!(f, "incident #{id}"),
        }
    }
}

impl DeliveryPayload {
    /// What it is about.
    pub fn subject(&self) -> DeliverySubject {
        match self {
            DeliveryPayload::Run(result) => DeliverySubject::Run(result.run),
            DeliveryPayload::Incident { incident } => DeliverySubject::Incident(incident.id),
        }
    }

    /// The run's result, if it is one.
    pub fn run_result(&self) -> Option<&RunResult> {
        match self {
            DeliveryPayload::Run(result) => Some(result),
            DeliveryPayload::Incident { .. } => None,
        }
    }

    /// The incident notification, if it is one.
    pub fn incident(&self) -> Option<&IncidentNotice> {
        match self {
            DeliveryPayload::Incident { incident } => Some(incident),
            DeliveryPayload::Run(_) => None,
        }
    }

    /// The run it is about: a result's run, or the run an incident concerns.
    pub fn run(&self) -> Option<RunId> {
        match self {
            DeliveryPayload::Run(result) => Some(result.run),
            DeliveryPayload::Incident { incident } => incident.run,
        }
    }
}

impl From<RunResult> for DeliveryPayload {
    fn from(result: RunResult) -> Self {
        DeliveryPayload::Run(result)
    }
}

/// How failed deliveries are retried (SPEC D3). Out-of-range values are clamped by
/// [`DeliveryPolicy::clamped`], which the outbox applies when it is built.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliveryPolicy {
    /// Attempts in total, the first included: 1 to [`limits::DELIVERY_ATTEMPTS_MAX`].
    pub attempts_max: u32,
    /// Delay after the first failed attempt.
    pub backoff_base_ms: u64,
    /// Growth of the delay per failed attempt; at least 1.0.
    pub backoff_factor: f64,
    /// Longest backoff delay; at most [`limits::DELAY_MAX_MS`].
    pub backoff_cap_ms: u64,
    /// Longest delay a sink's `Retry-After` may ask for; at most [`limits::DELAY_MAX_MS`].
    pub retry_after_max_ms: u64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            attempts_max: 3,
            backoff_base_ms: 30_000,
            backoff_factor: 2.0,
            backoff_cap_ms: 5 * 60 * 1_000,
            retry_after_max_ms: 3600 * 1_000,
        }
    }
}

impl DeliveryPolicy {
    /// Clamps every field into its limits: `attempts_max` into 1 to
    /// [`limits::DELIVERY_ATTEMPTS_MAX`], the cap and `retry_after_max_ms` to at most
    /// [`limits::DELAY_MAX_MS`], the base to at most the cap, and a factor that is below 1, infinite
    /// or not a number to 1.0.
    pub fn clamped(self) -> Self {
        let backoff_cap_ms = self.backoff_cap_ms.min(limits::DELAY_MAX_MS);
        let backoff_factor = if self.backoff_factor.is_finite() && self.backoff_factor >= 1.0 {
            self.backoff_factor
        } else {
            1.0
        };
        DeliveryPolicy {
            attempts_max: self.attempts_max.clamp(1, limits::DELIVERY_ATTEMPTS_MAX),
            backoff_base_ms: self.backoff_base_ms.min(backoff_cap_ms),
            backoff_factor,
            backoff_cap_ms,
            retry_after_max_ms: self.retry_after_max_ms.min(limits::DELAY_MAX_MS),
        }
    }

    /// The backoff after failed attempt number `failed` (1-based), before `Retry-After`.
    pub fn backoff_ms(&self, failed: u32) -> u64 {
        crate::retry::capped_backoff_ms(
            self.backoff_base_ms,
            self.backoff_factor,
            self.backoff_cap_ms,
            failed,
        )
    }

    /// The delay before the attempt after failed attempt `failed`: the backoff, or the sink's
    /// `Retry-After` (capped at `retry_after_max_ms`) if that is longer.
    pub fn retry_delay_ms(&self, failed: u32, retry_after_ms: Option<u64>) -> u64 {
        let asked = retry_after_ms.map_or(0, |ms| ms.min(self.retry_after_max_ms));
        self.backoff_ms(failed).max(asked)
    }
}

/// What happens to a new delivery when the outbox is full (SPEC D1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Evict the oldest waiting delivery to make room; fresh results keep flowing past a sink
    /// that has been failing. If every delivery is in flight, the new one is dropped instead.
    #[default]
    DropOldest,
    /// Drop the new delivery; what is queued keeps its place.
    RejectNewest,
}

/// The outbox's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutboxConfig {
    /// Deliveries held at once, waiting and in flight: 1 to [`limits::OUTBOX_CAPACITY_MAX`].
    pub capacity: usize,
    /// What happens when a delivery would exceed `capacity`.
    pub overflow: OverflowPolicy,
    /// How failed deliveries are retried.
    pub policy: DeliveryPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            capacity: limits::OUTBOX_CAPACITY_DEFAULT,
            overflow: OverflowPolicy::default(),
            policy: DeliveryPolicy::default(),
        }
    }
}

impl OutboxConfig {
    /// Clamps the capacity into 1 to [`limits::OUTBOX_CAPACITY_MAX`] and the policy with
    /// [`DeliveryPolicy::clamped`].
    pub fn clamped(self) -> Self {
        OutboxConfig {
            capacity: self.capacity.clamp(1, limits::OUTBOX_CAPACITY_MAX),
            overflow: self.overflow,
            policy: self.policy.clamped(),
        }
    }
}

/// A delivery's state (see the module docs for the transition table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum DeliveryState {
    /// Waits for `due` to send its next attempt (and, before its first, for its record to be
    /// durable).
    Waiting {
        /// When the next attempt may start.
        due: Timestamp,
    },
    /// Waits for the sink's answer to this attempt.
    Sending {
        /// The attempt in flight, from 1.
        attempt: u32,
    },
}

/// One result on its way to one sink, in memory and as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Its id.
    pub id: DeliveryId,
    /// The sink's name.
    pub sink: Arc<str>,
    /// What is sent.
    pub payload: DeliveryPayload,
    /// Attempts started so far (0 before the first).
    pub attempt: u32,
    /// The state.
    pub state: DeliveryState,
    /// When the payload was queued.
    pub created_at: Timestamp,
    /// The last failure, truncated to [`limits::MESSAGE_MAX_BYTES`].
    pub last_error: Option<String>,
    /// The store has this delivery's record: it may be sent. Not persisted, because a record
    /// read back from the store is durable by definition ([`Outbox::restore`] sets it).
    #[serde(skip)]
    durable: bool,
}

impl Delivery {
    /// The delivery as its record reads back: not yet known durable (see
    /// [`Record::into_stored`](crate::Record::into_stored)).
    pub(crate) fn into_stored(mut self) -> Self {
        self.durable = false;
        self
    }

    /// True once the store holds this delivery's record, so that it may be sent.
    pub fn is_durable(&self) -> bool {
        self.durable
    }
}

/// A sink's answer to one attempt, or the failure to get one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum DeliveryResult {
    /// The sink accepted the result.
    Delivered,
    /// It failed, and trying again may help (a network error, a timeout, a 503).
    Transient {
        /// The concrete error.
        error: String,
        /// How long the sink asked us to wait (`Retry-After`), if it did.
        retry_after_ms: Option<u64>,
    },
    /// It failed, and trying again cannot help (a 404, a 400).
    Permanent {
        /// The concrete error.
        error: String,
    },
}

/// How a delivery ended: the status label of the D4 counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// The sink accepted it.
    Success,
    /// Transient failures used up every attempt.
    Exhausted,
    /// The sink refused it for good.
    Permanent,
}

impl DeliveryStatus {
    /// The label: `success`, `exhausted` or `permanent`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Success => "success",
            DeliveryStatus::Exhausted => "exhausted",
            DeliveryStatus::Permanent => "permanent",
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a delivery was dropped on overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Evicted by [`OverflowPolicy::DropOldest`] to make room for a newer delivery.
    Evicted,
    /// Refused because the outbox was full: [`OverflowPolicy::RejectNewest`], or every
    /// delivery was in flight and none could be evicted.
    Rejected,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Evicted => "evicted",
            DropReason::Rejected => "rejected",
        })
    }
}

/// Something the outbox reports, drained with [`Outbox::poll_event`]. Not durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxEvent {
    /// A delivery ended; exactly one per delivery that is not dropped (SPEC D4).
    Finished {
        /// The delivery.
        id: DeliveryId,
        /// Its sink.
        sink: Arc<str>,
        /// What it carried: a run's result or an incident notification.
        subject: DeliverySubject,
        /// How it ended.
        status: DeliveryStatus,
        /// Attempts started, the first included.
        attempts: u32,
        /// The last failure, for `exhausted` and `permanent`.
        error: Option<String>,
    },
    /// A delivery was dropped because the outbox was full; exactly one per dropped delivery.
    Dropped {
        /// The delivery, or `None` if it was refused before it got an id.
        id: Option<DeliveryId>,
        /// Its sink.
        sink: Arc<str>,
        /// What it carried: a run's result or an incident notification.
        subject: DeliverySubject,
        /// Why.
        reason: DropReason,
    },
    /// An attempt failed transiently and the next one is due at `at`.
    RetryScheduled {
        /// The delivery.
        id: DeliveryId,
        /// Its sink.
        sink: Arc<str>,
        /// The attempt that failed.
        attempt: u32,
        /// When the next attempt is due.
        at: Timestamp,
    },
}

/// One attempt to send, drained with [`Outbox::poll_send`]. Answer it with
/// [`Outbox::handle_result`], quoting `id` and `attempt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRequest {
    /// The delivery; stable across attempts and restarts, for the sink to deduplicate.
    pub id: DeliveryId,
    /// The sink's name.
    pub sink: Arc<str>,
    /// What to send.
    pub payload: DeliveryPayload,
    /// The attempt, from 1.
    pub attempt: u32,
}

/// A result the outbox refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutboxRejected {
    /// No such delivery (it never existed, or it has already finished or been dropped).
    #[error("unknown delivery {0}")]
    UnknownDelivery(DeliveryId),
    /// The result is for another attempt than the delivery's latest.
    #[error("result for attempt {got} of {id}, whose current attempt is {current}")]
    StaleAttempt {
        /// The delivery.
        id: DeliveryId,
        /// The attempt the result was for.
        got: u32,
        /// The delivery's current attempt.
        current: u32,
    },
    /// The delivery is waiting, not sending: its attempt has already been answered.
    #[error("{0} has no attempt in flight")]
    NotSending(DeliveryId),
}

/// The outbox: every delivery that has not ended, and what to send, persist and report next.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbox {
    config: OutboxConfig,
    deliveries: BTreeMap<DeliveryId, Delivery>,
    /// Durable `Waiting` deliveries by due time: exactly what `handle_timeout` may send.
    due: BTreeSet<(Timestamp, DeliveryId)>,
    /// Every `Waiting` delivery (durable or not) by id, so that `drop_oldest` finds its victim
    /// in O(log n) instead of walking the deliveries, most of which may be `Sending`.
    waiting: BTreeSet<DeliveryId>,
    /// Attempts started and not yet polled; at most one per `Sending` delivery.
    sends: VecDeque<(DeliveryId, u32)>,
    /// Drained after every input, so it holds what one input produced: at most one event per
    /// delivery in the outbox plus one per sink of an enqueue.
    events: VecDeque<OutboxEvent>,
    /// Deliveries whose record changed since the last `take_writes`.
    upserts: BTreeSet<DeliveryId>,
    /// Deliveries that ended since the last `take_writes`.
    deletes: BTreeSet<DeliveryId>,
    next_id: u64,
    now: Timestamp,
}

impl Outbox {
    /// An empty outbox. The configuration is [clamped](OutboxConfig::clamped).
    pub fn new(config: OutboxConfig) -> Self {
        Outbox {
            config: config.clamped(),
            deliveries: BTreeMap::new(),
            due: BTreeSet::new(),
            waiting: BTreeSet::new(),
            sends: VecDeque::new(),
            events: VecDeque::new(),
            upserts: BTreeSet::new(),
            deletes: BTreeSet::new(),
            next_id: 1,
            now: Timestamp::EPOCH,
        }
    }

    /// Rebuilds the outbox after a restart from the persisted deliveries and id counter.
    ///
    /// Restored deliveries are durable. One found `Sending` was cut short: it goes back to
    /// `Waiting { due: now }` and the cut-short attempt counts, so a delivery whose last
    /// attempt was cut short finishes `exhausted` here (at-least-once, bounded). So does a
    /// waiting delivery with no attempts left under a lowered `attempts_max`. If there are more
    /// deliveries than the capacity, the overflow policy drops the surplus. Every change is
    /// reported as a write and an event, as after any other input.
    pub fn restore(
        config: OutboxConfig,
        deliveries: Vec<Delivery>,
        next_id: u64,
        now: Timestamp,
    ) -> Self {
        let mut outbox = Outbox::new(config);
        outbox.now = now;
        outbox.next_id = next_id.max(1);
        let attempts_max = outbox.config.policy.attempts_max;
        // Store records are keyed by id; order them so that what follows is deterministic.
        let by_id: BTreeMap<DeliveryId, Delivery> =
            deliveries.into_iter().map(|d| (d.id, d)).collect();
        for (id, mut delivery) in by_id {
            outbox.next_id = outbox.next_id.max(id.0.saturating_add(1));
            delivery.durable = true;
            if let DeliveryState::Sending { attempt } = delivery.state {
                delivery.attempt = delivery.attempt.max(attempt);
                delivery.state = DeliveryState::Waiting { due: now };
                delivery.last_error = Some(format!(
                    "attempt {} was cut short by a restart",
                    delivery.attempt
                ));
                outbox.upserts.insert(id);
            }
            outbox.insert(delivery);
            if outbox.deliveries[&id].attempt >= attempts_max {
                outbox.finish(id, DeliveryStatus::Exhausted);
                continue;
            }
            outbox.index(id);
        }
        while outbox.deliveries.len() > outbox.config.capacity {
            let victim = match outbox.config.overflow {
                OverflowPolicy::DropOldest => outbox.oldest_waiting(),
                OverflowPolicy::RejectNewest => outbox.deliveries.keys().next_back().copied(),
            };
            let Some(victim) = victim else { break };
            let reason = match outbox.config.overflow {
                OverflowPolicy::DropOldest => DropReason::Evicted,
                OverflowPolicy::RejectNewest => DropReason::Rejected,
            };
            outbox.drop_delivery(victim, reason);
        }
        outbox
    }

    /// A run finished, or an incident changed: queues its payload for each sink, `Waiting { due: now }` but not durable,
    /// so nothing is sent before [`Outbox::mark_durable`]. A sink named twice gets one
    /// delivery. When the outbox is full the overflow policy applies, and every delivery it
    /// drops (new or old) is reported with [`OutboxEvent::Dropped`]. Returns the ids of the
    /// new deliveries still in the outbox, in the order of `sinks`.
    pub fn enqueue(
        &mut self,
        now: Timestamp,
        sinks: &[Arc<str>],
        payload: &DeliveryPayload,
    ) -> Vec<DeliveryId> {
        let now = self.clamp(now);
        let mut created = Vec::new();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for sink in sinks {
            if !seen.insert(sink) {
                continue;
            }
            if self.deliveries.len() >= self.config.capacity && !self.make_room() {
                self.events.push_back(OutboxEvent::Dropped {
                    id: None,
                    sink: sink.clone(),
                    subject: payload.subject(),
                    reason: DropReason::Rejected,
                });
                continue;
            }
            let id = DeliveryId(self.next_id);
            self.next_id += 1;
            self.insert(Delivery {
                id,
                sink: sink.clone(),
                payload: payload.clone(),
                attempt: 0,
                state: DeliveryState::Waiting { due: now },
                created_at: now,
                last_error: None,
                durable: false,
            });
            self.upserts.insert(id);
            created.push(id);
        }
        // Under `drop_oldest` a small outbox can evict a sibling created a moment ago.
        created.retain(|id| self.deliveries.contains_key(id));
        created
    }

    /// The store has made these deliveries' records durable: they may be sent. Ids that are
    /// unknown (dropped meanwhile) or already durable are ignored.
    pub fn mark_durable(&mut self, ids: &[DeliveryId]) {
        for id in ids {
            let Some(delivery) = self.deliveries.get_mut(id) else {
                continue;
            };
            if delivery.durable {
                continue;
            }
            delivery.durable = true;
            self.index(*id);
        }
    }

    /// Time passed: every durable delivery due by `now` starts its next attempt, becoming
    /// `Sending { attempt + 1 }`, and a [`SendRequest`] is queued for each, earliest due first.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let now = self.clamp(now);
        while let Some(&(due, id)) = self.due.first() {
            if due > now {
                break;
            }
            self.due.remove(&(due, id));
            self.waiting.remove(&id);
            let delivery = self
                .deliveries
                .get_mut(&id)
                .expect("the due index holds only deliveries in the outbox");
            delivery.attempt += 1;
            delivery.state = DeliveryState::Sending {
                attempt: delivery.attempt,
            };
            self.sends.push_back((id, delivery.attempt));
            self.upserts.insert(id);
        }
        assert!(
            self.poll_timeout().is_none_or(|next| next > now),
            "handle_timeout left a delivery due at or before {now}"
        );
    }

    /// The next attempt to send, if any.
    pub fn poll_send(&mut self) -> Option<SendRequest> {
        let (id, attempt) = self.sends.pop_front()?;
        let delivery = &self.deliveries[&id];
        Some(SendRequest {
            id,
            sink: delivery.sink.clone(),
            payload: delivery.payload.clone(),
            attempt,
        })
    }

    /// The sink's answer to attempt `attempt` of delivery `id`.
    ///
    /// `Delivered` finishes it `success` and `Permanent` finishes it `permanent` (never
    /// retried). `Transient` schedules the next attempt after
    /// [`DeliveryPolicy::retry_delay_ms`] if attempts are left, and finishes it `exhausted`
    /// otherwise. A result for an unknown delivery, an older attempt or a delivery with no
    /// attempt in flight is refused and changes nothing.
    pub fn handle_result(
        &mut self,
        now: Timestamp,
        id: DeliveryId,
        attempt: u32,
        result: DeliveryResult,
    ) -> Result<(), OutboxRejected> {
        let Some(delivery) = self.deliveries.get(&id) else {
            return Err(OutboxRejected::UnknownDelivery(id));
        };
        if attempt != delivery.attempt {
            return Err(OutboxRejected::StaleAttempt {
                id,
                got: attempt,
                current: delivery.attempt,
            });
        }
        if !matches!(delivery.state, DeliveryState::Sending { .. }) {
            return Err(OutboxRejected::NotSending(id));
        }
        let now = self.clamp(now);
        // The driver may answer before it polled the request; the request is then moot.
        self.sends.retain(|&(queued, _)| queued != id);
        let policy = self.config.policy;
        let delivery = self.deliveries.get_mut(&id).expect("checked above");
        match result {
            DeliveryResult::Delivered => self.finish(id, DeliveryStatus::Success),
            DeliveryResult::Permanent { error } => {
                delivery.last_error = Some(truncate(&error));
                self.finish(id, DeliveryStatus::Permanent);
            }
            DeliveryResult::Transient {
                error,
                retry_after_ms,
            } => {
                delivery.last_error = Some(truncate(&error));
                if attempt >= policy.attempts_max {
                    self.finish(id, DeliveryStatus::Exhausted);
                    return Ok(());
                }
                let at = now.plus_ms(policy.retry_delay_ms(attempt, retry_after_ms));
                delivery.state = DeliveryState::Waiting { due: at };
                let sink = delivery.sink.clone();
                self.waiting.insert(id);
                self.index(id);
                self.upserts.insert(id);
                self.events.push_back(OutboxEvent::RetryScheduled {
                    id,
                    sink,
                    attempt,
                    at,
                });
            }
        }
        Ok(())
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<OutboxEvent> {
        self.events.pop_front()
    }

    /// When [`Outbox::handle_timeout`] should be called next: the earliest due time among the
    /// durable waiting deliveries.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.due.first().map(|&(due, _)| due)
    }

    /// The writes to persist since the last call, in id order: deliveries to upsert (in their
    /// current state) and ids to delete (finished or dropped). Persist them atomically with
    /// [`Outbox::next_id`], then call [`Outbox::mark_durable`] with the upserted ids. A delete
    /// may name a delivery whose record was never written; deleting nothing is fine.
    pub fn take_writes(&mut self) -> (Vec<Delivery>, Vec<DeliveryId>) {
        let upserts = std::mem::take(&mut self.upserts)
            .into_iter()
            .map(|id| self.deliveries[&id].clone())
            .collect();
        let deletes = std::mem::take(&mut self.deletes).into_iter().collect();
        (upserts, deletes)
    }

    /// The next id the outbox will allocate; persist it with the writes.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The deliveries with an attempt in flight, in id order: what a graceful shutdown waits
    /// for, within its time budget, before it leaves the rest for the next start (SPEC D5).
    /// O(deliveries): called only once, when a shutdown begins, never per event.
    pub fn in_flight(&self) -> Vec<DeliveryId> {
        self.deliveries
            .values()
            .filter(|d| matches!(d.state, DeliveryState::Sending { .. }))
            .map(|d| d.id)
            .collect()
    }

    /// A delivery still in the outbox.
    pub fn delivery(&self, id: DeliveryId) -> Option<&Delivery> {
        self.deliveries.get(&id)
    }

    /// Every delivery still in the outbox, in id order.
    pub fn deliveries(&self) -> impl Iterator<Item = &Delivery> {
        self.deliveries.values()
    }

    /// How many deliveries the outbox holds, waiting and in flight.
    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    /// True when the outbox holds no delivery.
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// The configuration in force, after clamping.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Panics with a description if an invariant is broken.
    pub fn check_invariants(&self) {
        let attempts_max = self.config.policy.attempts_max;
        assert!(
            self.deliveries.len() <= self.config.capacity,
            "{} deliveries exceed the capacity {}",
            self.deliveries.len(),
            self.config.capacity
        );
        let mut expected_due = BTreeSet::new();
        let mut expected_waiting = BTreeSet::new();
        for (id, d) in &self.deliveries {
            assert_eq!(*id, d.id, "{id} is filed under another id");
            assert!(id.0 >= 1 && id.0 < self.next_id, "{id} not below next_id");
            assert!(
                d.attempt <= attempts_max,
                "{id} started {} attempts; the limit is {attempts_max}",
                d.attempt
            );
            match d.state {
                DeliveryState::Waiting { due } => {
                    assert!(d.attempt < attempts_max, "{id} waits with no attempts left");
                    expected_waiting.insert(*id);
                    if d.durable {
                        expected_due.insert((due, *id));
                    }
                }
                DeliveryState::Sending { attempt } => {
                    assert!(d.durable, "{id} is sending before its record is durable");
                    assert!(attempt >= 1, "{id} is sending attempt 0");
                    assert_eq!(
                        attempt, d.attempt,
                        "{id} sends another attempt than its count"
                    );
                }
            }
        }
        assert_eq!(
            self.due, expected_due,
            "the due index does not match the durable waiting deliveries"
        );
        assert_eq!(
            self.waiting, expected_waiting,
            "the waiting index does not match the waiting deliveries"
        );
        let mut queued = BTreeSet::new();
        for &(id, attempt) in &self.sends {
            assert!(queued.insert(id), "{id} queued to send twice");
            let state = self.deliveries.get(&id).map(|d| d.state);
            assert_eq!(
                state,
                Some(DeliveryState::Sending { attempt }),
                "{id} queued to send attempt {attempt} but is not sending it"
            );
        }
        for id in &self.upserts {
            assert!(self.deliveries.contains_key(id), "upsert of absent {id}");
        }
        for id in &self.deletes {
            assert!(!self.deliveries.contains_key(id), "delete of present {id}");
        }
    }

    /// Clamps `now` to the latest instant seen and remembers it.
    fn clamp(&mut self, now: Timestamp) -> Timestamp {
        self.now = self.now.max(now);
        self.now
    }

    /// Puts a new delivery into the outbox, and into the waiting index if it is `Waiting`.
    /// The due index is separate: see [`Outbox::index`].
    fn insert(&mut self, delivery: Delivery) {
        let id = delivery.id;
        if let DeliveryState::Waiting { .. } = delivery.state {
            self.waiting.insert(id);
        }
        let previous = self.deliveries.insert(id, delivery);
        debug_assert!(previous.is_none(), "{id} inserted twice");
    }

    /// Adds a durable waiting delivery to the due index.
    fn index(&mut self, id: DeliveryId) {
        let d = &self.deliveries[&id];
        if let (true, DeliveryState::Waiting { due }) = (d.durable, d.state) {
            self.due.insert((due, id));
        }
    }

    /// The oldest (lowest id) waiting delivery: the one `drop_oldest` evicts.
    fn oldest_waiting(&self) -> Option<DeliveryId> {
        self.waiting.first().copied()
    }

    /// Makes room for one delivery by the overflow policy; false if it cannot.
    fn make_room(&mut self) -> bool {
        if self.config.overflow == OverflowPolicy::RejectNewest {
            return false;
        }
        let Some(victim) = self.oldest_waiting() else {
            return false;
        };
        self.drop_delivery(victim, DropReason::Evicted);
        true
    }

    /// Removes a delivery from the outbox and records its deletion.
    fn remove(&mut self, id: DeliveryId) -> Delivery {
        let delivery = self
            .deliveries
            .remove(&id)
            .expect("only deliveries in the outbox are removed");
        if let DeliveryState::Waiting { due } = delivery.state {
            self.due.remove(&(due, id));
            self.waiting.remove(&id);
        }
        self.upserts.remove(&id);
        self.deletes.insert(id);
        delivery
    }

    fn drop_delivery(&mut self, id: DeliveryId, reason: DropReason) {
        let delivery = self.remove(id);
        self.events.push_back(OutboxEvent::Dropped {
            id: Some(id),
            sink: delivery.sink,
            subject: delivery.payload.subject(),
            reason,
        });
    }

    fn finish(&mut self, id: DeliveryId, status: DeliveryStatus) {
        let delivery = self.remove(id);
        let error = match status {
            DeliveryStatus::Success => None,
            DeliveryStatus::Exhausted | DeliveryStatus::Permanent => delivery.last_error,
        };
        self.events.push_back(OutboxEvent::Finished {
            id,
            sink: delivery.sink,
            subject: delivery.payload.subject(),
            status,
            attempts: delivery.attempt,
            error,
        });
    }
}

#[cfg(test)]
mod tests;

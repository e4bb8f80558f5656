//! keel-core: the sans-IO heart of keel, a durable, crash-safe job scheduler.
//!
//! Everything that decides — when a job fires, which slots a misfire drops, whether a failed
//! attempt is retried and when, what happens to a one-shot job after its run — is a
//! deterministic transition of [`Scheduler`]. Time comes in as an argument (`now`, a
//! [`Timestamp`] in milliseconds since the Unix epoch), randomness from a generator seeded at
//! construction, and every consequence leaves as an [`Effect`] value for a driver to carry
//! out. The crate reads no clock, touches no file, opens no socket and spawns no thread; a test
//! (`tests/architecture.rs`) keeps it that way.
//!
//! Contract: **at-least-once execution**. A run may execute more than once after a crash (its
//! attempt was handed out but its outcome never became durable), but every attempt carries an
//! idempotency key (`run id + attempt`) for the handler's own side effects.
//!
//! # Driving the scheduler
//!
//! After any `handle_*` input or command, drain [`Scheduler::poll_effect`] until it returns
//! `None`, then read [`Scheduler::poll_timeout`] and call [`Scheduler::handle_timeout`] when
//! that instant arrives. Persist effects must be written durably and acknowledged with
//! [`Scheduler::handle_persisted`]; the attempts they record are only handed out after that
//! (persist before act). This loop compiles and runs a job against a clock that jumps straight
//! to each deadline, as keel's simulator does:
//!
//! ```
//! use keel_core::{Effect, JobId, JobSpec, Outcome, ScheduleSpec, Scheduler, Timestamp};
//!
//! let start = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
//! let mut keel = Scheduler::new(Default::default(), 42, start);
//! let every_minute = ScheduleSpec::Cron { expr: "0 * * * * *".into(), zone: "UTC".into() };
//! keel.add_job(start, JobSpec::new(JobId::new("report").unwrap(), "report", every_minute))
//!     .unwrap();
//!
//! let mut now = start;
//! let mut finished = 0;
//! loop {
//!     // 1. Drain effects until there are none.
//!     while let Some(effect) = keel.poll_effect() {
//!         match effect {
//!             // Write the records durably (here: pretend), then acknowledge.
//!             Effect::Persist(batch) => keel.handle_persisted(now, batch.id),
//!             // Run the handler (here: succeed at once) and report its outcome.
//!             Effect::StartAttempt(a) => {
//!                 // Every report carries the attempt's fencing token.
//!                 keel.handle_outcome(now, a.run, a.lease.token, Outcome::ok()).unwrap();
//!             }
//!             // Check artifacts and answer with `handle_verified`; stop an attempt; deliver a
//!             // result or an incident notification to a sink (none in this example).
//!             Effect::VerifyArtifacts(_)
//!             | Effect::CancelAttempt { .. }
//!             | Effect::KillAttempt { .. }
//!             | Effect::Deliver(_) => {}
//!             Effect::Event(keel_core::Event::RunFinished { .. }) => finished += 1,
//!             Effect::Event(_) => {}
//!         }
//!     }
//!     if finished == 3 {
//!         break;
//!     }
//!     // 2. Sleep until the next deadline, then tell the scheduler the time.
//!     now = keel.poll_timeout().expect("a cron job always has a next slot");
//!     keel.handle_timeout(now);
//!     assert!(keel.poll_timeout().map_or(true, |next| next > now));
//! }
//! assert_eq!(now, Timestamp::parse_rfc3339("2026-01-01T00:03:00Z").unwrap());
//! ```
//!
//! [`drive`] is this loop written once, for synchronous drivers that write to a [`Store`].
//!
//! # Error tiers
//!
//! 1. A refused command returns `Err(`[`Rejected`]`)` and changes nothing.
//! 2. A domain outcome (a run failed, a job was disabled) is an [`Event`] and an audit record.
//! 3. A failure of the world (a store write failed) is an input:
//!    [`Scheduler::handle_persist_failed`]; the core decides what follows.
//! 4. A broken invariant panics; [`Scheduler::check_invariants`] checks them all.
//!
//! # Modules
//!
//! Each sub-machine lives in its own module with its states, transition table and tests:
//! [`schedule`] (fire times, DST, misfires), [`run`] (attempts and outcomes), [`retry`]
//! (backoff), [`job`] (job states, overlap), [`lease`] (leases, holders, contenders, the
//! guarded-section table), [`fence`] (leadership across hosts and self-fencing), [`watchdog`] (deadlines of a running attempt, and the rules table),
//! [`checkpoint`] (the save throttle), [`incident`] (incident records), [`health`] (worker
//! health), [`outbox`] (delivering results), [`audit`]
//! (the trail and retention), [`persist`] (records, batches, gating). [`limits`] names every
//! bound.

#![warn(missing_docs)]

pub mod artifact;
pub mod audit;
pub mod checkpoint;
pub mod config;
pub mod drive;
pub mod error;
pub mod fence;
pub mod health;
pub mod ids;
pub mod incident;
pub mod job;
pub mod lease;
pub mod limits;
mod omit;
pub mod outbox;
pub mod persist;
pub mod retry;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod scheduler;
pub mod store;
pub mod text;
pub mod time;
pub mod watchdog;

pub use artifact::{ArtifactCheck, CheckResult, TargetKind, Verification, VerifyId, VerifyRequest};
pub use audit::{Actor, AuditRecord, HistoryPolicy};
pub use config::WatchdogProfile;
pub use error::Rejected;
pub use health::{WorkerHealth, WorkerStats};
pub use ids::{Attempt, BatchId, FencingToken, IdempotencyKey, JobId, JobIdError, RunId, WorkerId};
pub use incident::{
    Incident, IncidentEvent, IncidentKind, IncidentNotice, NewIncident, OperatorAction,
};
pub use job::{Ensured, Job, JobSpec, JobState, LastRun, NotifyOn, OverlapPolicy};
pub use lease::{Lease, LeasePolicy};
pub use outbox::{
    Delivery, DeliveryId, DeliveryPayload, DeliveryPolicy, DeliveryResult, DeliveryState,
    DeliveryStatus, DeliverySubject, Outbox, OutboxConfig, OutboxEvent, OutboxRejected,
    OverflowPolicy, RunResult, SendRequest,
};
pub use persist::{Batch, Meta, Record, Snapshot, Tombstone};
pub use retry::{RetryDecision, RetryPolicy, RetryPolicyError};
pub use run::{
    ErrorKind, Outcome, ReleasedLease, Run, RunError, RunRecord, RunState, RunTerms, StateName,
    Trigger,
};
pub use schedule::{MisfirePolicy, Schedule, ScheduleError, ScheduleField, ScheduleSpec};
pub use scheduler::{
    AttemptStart, CheckpointSave, Claimed, Config, Effect, Event, LeaseAction, QueueHealth,
    Released, RunContext, Scheduler, Shutdown, StopReason, Verified, Work,
};
pub use store::{AuditQuery, Conflict, RunPage, RunQuery, Store, StoreError};
pub use time::Timestamp;

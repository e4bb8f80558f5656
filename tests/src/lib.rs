//! keel-testkit: test keel jobs, and keel itself, against a simulated clock.
//!
//! A [`Sim`] wraps one [`keel_core::Scheduler`] in a seeded world: a simulated clock that you
//! can jump, an in-memory store ([`MemStore`]) whose writes take time, fail, and are lost on a
//! simulated crash, and handlers you write as plain closures that say how long an attempt takes
//! and how it ends. After every step the simulator checks the scheduler's invariants and the
//! store's safety properties, and [`Sim::check_liveness`] heals all faults and asserts that
//! every run reaches a terminal state. The same seed replays the same trace.
//!
//! ```
//! use keel_core::{JobId, JobSpec, RetryPolicy, RunState, ScheduleSpec, Timestamp};
//! use keel_testkit::{Execution, Faults, Sim, SimConfig};
//!
//! // A one-shot job whose handler always fails retryably, in a world that crashes often.
//! let mut sim = Sim::new(SimConfig::new(7).faults(Faults::HOSTILE));
//! sim.handle("flaky", |_attempt, _rng| Execution::fail_after(50, "upstream 503"));
//! let at = sim.wall().plus_ms(1_000);
//! let mut spec = JobSpec::new(JobId::new("once").unwrap(), "flaky", ScheduleSpec::Once { at });
//! spec.retry = RetryPolicy { attempts_max: 3, ..RetryPolicy::default() };
//! sim.add_job(spec).unwrap();
//!
//! sim.run_for(60_000);
//! sim.check_liveness(600_000);
//!
//! // Crashes may have cost attempts, but the job fired once and will never fire again.
//! let runs = sim.runs_of("once");
//! assert_eq!(runs.len(), 1);
//! assert!(matches!(runs[0].state(), RunState::Failed | RunState::Interrupted));
//! sim.run_for(24 * 3600 * 1000);
//! assert_eq!(sim.runs_of("once").len(), 1);
//! ```

#![warn(missing_docs)]

pub mod app;
pub mod leadership;
pub mod sim;
pub mod store;

pub use leadership::{LeaderReport, LeaderSim};
pub use sim::{artifacts_present, Execution, Faults, Handler, Sim, SimConfig, Sink};
pub use store::{MemStore, SharedMemStore};

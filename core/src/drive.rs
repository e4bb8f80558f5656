//! The synchronous driving loop: drain, persist, acknowledge, hand the rest to the caller.
//!
//! Every synchronous driver of a [`Scheduler`] does the same thing after an input: take effects
//! until there are none, write each [`Batch`] and acknowledge it (which may release more
//! effects: the attempts it recorded, the next batch), and pass every other effect to whoever
//! runs attempts and delivers results. keel's direct mode, its store conformance suite, its
//! process tests and its benchmarks all do exactly that, so they share this loop; the async
//! runtime keeps its own (its writes overlap its commands) and the simulator keeps its own (its
//! writes take simulated time and fail).
//!
//! | input | effect of [`drain`] |
//! |---|---|
//! | `Effect::Persist(batch)` | `write(&batch)`; `Ok` → [`Scheduler::handle_persisted`]; `Err` → return it, unacknowledged |
//! | any other effect | `other(core, now, effect)`, which may call back into the scheduler |
//! | no effect left | return what was done ([`Drained`]) |
//!
//! A write that fails stops the loop with the batch neither acknowledged nor reported failed:
//! the caller knows whether that means [`Scheduler::handle_persist_failed`] (a store outage)
//! or dropping the scheduler and restoring (the store was taken over by another writer).
//!
//! [`advance`] adds the clock: it delivers every deadline up to an instant, in order, draining
//! after each, as a driver that sleeps until [`Scheduler::poll_timeout`] would.
//!
//! ```
//! use keel_core::drive::{self, Drained};
//! use keel_core::{Effect, JobId, JobSpec, Outcome, ScheduleSpec, Scheduler, Timestamp};
//!
//! let start = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
//! let mut keel = Scheduler::new(Default::default(), 42, start);
//! let every_minute = ScheduleSpec::Cron { expr: "0 * * * * *".into(), zone: "UTC".into() };
//! keel.add_job(start, JobSpec::new(JobId::new("report").unwrap(), "report", every_minute))
//!     .unwrap();
//!
//! // Pretend to write every batch; succeed every attempt at once.
//! let mut started = 0;
//! let mut run_it = |keel: &mut Scheduler, now, effect| {
//!     if let Effect::StartAttempt(a) = effect {
//!         started += 1;
//!         keel.handle_outcome(now, a.run, a.lease.token, Outcome::ok()).unwrap();
//!     }
//! };
//! let end = start.plus_ms(3 * 60_000);
//! drive::advance(&mut keel, start, end, drive::acknowledge, &mut run_it).unwrap();
//! assert_eq!(started, 3);
//! ```

use crate::persist::Batch;
use crate::scheduler::{Effect, Scheduler};
use crate::store::StoreError;
use crate::time::Timestamp;

/// What one [`drain`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Batches written and acknowledged.
    pub batches: u64,
    /// Records in those batches.
    pub records: u64,
    /// The largest of those batches, in records.
    pub largest_batch: u64,
    /// Every effect taken, writes included.
    pub effects: u64,
}

impl Drained {
    /// Whether anything at all came out of the scheduler.
    pub fn is_empty(&self) -> bool {
        self.effects == 0
    }

    fn add(&mut self, other: Drained) {
        self.batches += other.batches;
        self.records += other.records;
        self.largest_batch = self.largest_batch.max(other.largest_batch);
        self.effects += other.effects;
    }
}

/// A write that acknowledges every batch without storing it: for benchmarks and tests of the
/// scheduler alone, where a store would only measure itself.
pub fn acknowledge(_: &Batch) -> Result<(), StoreError> {
    Ok(())
}

/// Takes effects from `core` until there are none: each batch goes to `write` and, once it
/// returns `Ok`, is acknowledged at `now`; every other effect goes to `other`. Stops at the
/// first failed write and returns its error, the batch unacknowledged (see the module docs).
pub fn drain(
    core: &mut Scheduler,
    now: Timestamp,
    mut write: impl FnMut(&Batch) -> Result<(), StoreError>,
    mut other: impl FnMut(&mut Scheduler, Timestamp, Effect),
) -> Result<Drained, StoreError> {
    let mut done = Drained::default();
    while let Some(effect) = core.poll_effect() {
        done.effects += 1;
        match effect {
            Effect::Persist(batch) => {
                write(&batch)?;
                core.handle_persisted(now, batch.id);
                let len = batch.records.len() as u64;
                done.batches += 1;
                done.records += len;
                done.largest_batch = done.largest_batch.max(len);
            }
            effect => other(core, now, effect),
        }
    }
    Ok(done)
}

/// Delivers every deadline of `core` from `now` up to `until`, in order, draining after each
/// (and once first, for what an earlier input left). Returns what all the drains did.
pub fn advance(
    core: &mut Scheduler,
    now: Timestamp,
    until: Timestamp,
    mut write: impl FnMut(&Batch) -> Result<(), StoreError>,
    mut other: impl FnMut(&mut Scheduler, Timestamp, Effect),
) -> Result<Drained, StoreError> {
    let mut done = drain(core, now, &mut write, &mut other)?;
    while let Some(at) = core.poll_timeout().filter(|at| *at <= until) {
        let at = at.max(now);
        core.handle_timeout(at);
        done.add(drain(core, at, &mut write, &mut other)?);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobId, JobSpec, Outcome, RunState, ScheduleSpec, Snapshot};

    fn t0() -> Timestamp {
        Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
    }

    fn once(name: &str, at: Timestamp) -> JobSpec {
        JobSpec::new(JobId::new(name).unwrap(), "work", ScheduleSpec::Once { at })
    }

    fn succeed(core: &mut Scheduler, now: Timestamp, effect: Effect) {
        if let Effect::StartAttempt(a) = effect {
            core.handle_outcome(now, a.run, a.lease.token, Outcome::ok())
                .unwrap();
        }
    }

    #[test]
    fn a_drain_writes_acknowledges_and_runs_until_nothing_is_left() {
        let mut core = Scheduler::new(Default::default(), 1, t0());
        core.add_job(t0(), once("now", t0())).unwrap();
        core.handle_timeout(t0());
        let mut written: Vec<Batch> = Vec::new();
        let done = drain(
            &mut core,
            t0(),
            |b| {
                written.push(b.clone());
                Ok(())
            },
            succeed,
        )
        .unwrap();
        assert_eq!(done.batches, written.len() as u64);
        assert!(done.batches >= 2, "the start and the outcome are written");
        assert_eq!(
            done.records,
            written.iter().map(|b| b.records.len() as u64).sum::<u64>()
        );
        assert_eq!(core.poll_effect(), None);
        // The run the drain completed is durable as succeeded in what was written.
        let mut snapshot = Snapshot::default();
        for batch in &written {
            for record in &batch.records {
                if let crate::Record::PutRun(run) = record {
                    snapshot.runs.retain(|r| r.id != run.id);
                    snapshot.runs.push(run.clone());
                }
            }
        }
        assert_eq!(snapshot.runs.len(), 1);
        assert_eq!(snapshot.runs[0].state, RunState::Succeeded);
    }

    #[test]
    fn a_failed_write_stops_the_drain_with_the_batch_unacknowledged() {
        let mut core = Scheduler::new(Default::default(), 1, t0());
        core.add_job(t0(), once("later", t0().plus_ms(1_000)))
            .unwrap();
        let refused = drain(
            &mut core,
            t0(),
            |_| Err(StoreError::Io("disk gone".into())),
            succeed,
        );
        assert_eq!(refused, Err(StoreError::Io("disk gone".into())));
        // Unacknowledged: the scheduler still waits for that write.
        assert!(!core.is_durable(core.write_mark()));
        assert!(core.has_unwritten_changes());
    }

    #[test]
    fn advance_delivers_each_deadline_in_order_and_stops_at_the_end() {
        let mut core = Scheduler::new(Default::default(), 1, t0());
        for (name, ms) in [("a", 1_000), ("b", 2_000), ("c", 9_000)] {
            core.add_job(t0(), once(name, t0().plus_ms(ms))).unwrap();
        }
        let mut started = Vec::new();
        let done = advance(
            &mut core,
            t0(),
            t0().plus_ms(5_000),
            acknowledge,
            |c, now, e| {
                if let Effect::StartAttempt(a) = &e {
                    started.push((a.job.as_str().to_owned(), now));
                }
                succeed(c, now, e);
            },
        )
        .unwrap();
        assert!(!done.is_empty());
        assert_eq!(
            started,
            vec![
                ("a".to_owned(), t0().plus_ms(1_000)),
                ("b".to_owned(), t0().plus_ms(2_000))
            ]
        );
        assert_eq!(core.poll_timeout(), Some(t0().plus_ms(9_000)));
    }
}

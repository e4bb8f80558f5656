//! Persist before act (SPEC T1): what the core asks a store to write, and the bookkeeping that
//! holds effects back until the store says the write is durable.
//!
//! # Protocol
//!
//! Every state change marks a key dirty (a job, a run, the id counters) or appends an audit
//! record. `poll_effect` turns everything pending into one [`Batch`] of upsert-style
//! [`Record`]s, built from the *current* state, and emits it as `Effect::Persist`. At most one
//! batch is in flight: changes made meanwhile wait for the next one, which is how many
//! transitions share one fsync (group commit).
//!
//! An effect that must not happen before its record is durable (handing an attempt to the
//! executor) is *gated* on the batch that carries the record, and released only by
//! `handle_persisted` for that batch. If the store reports `handle_persist_failed` instead,
//! the batch's keys become dirty again, its audit records go back to the front of the queue,
//! its gated effects move to the next batch, and no batch is emitted until a retry deadline
//! (100 ms doubling to 10 s). Because records are rebuilt from current state, a retried batch
//! never overwrites a newer state with an older one, and because records are upserts keyed by
//! id (audit records by `seq`), applying one twice is harmless.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::ids::{Attempt, BatchId, JobId, RunId};
use crate::job::Job;
use crate::limits;
use crate::run::Run;
use crate::time::Timestamp;

/// One write the core depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "record")]
pub enum Record {
    /// Insert or replace a job.
    PutJob(Job),
    /// Delete a job definition (its run history stays, subject to the history policy).
    DeleteJob {
        /// The job.
        id: JobId,
    },
    /// Insert or replace a run.
    PutRun(Run),
    /// Append an audit record (idempotent by `seq`).
    Audit(AuditRecord),
    /// Delete terminal runs (with their audit records) that the history policy no longer keeps:
    /// for `job` (or every job if `None`), all but the newest `keep_last` terminal runs, and
    /// every terminal run finished before `finished_before`.
    PruneHistory {
        /// The job, or all jobs.
        job: Option<JobId>,
        /// Terminal runs kept per job, newest first.
        keep_last: u32,
        /// Terminal runs finished before this are deleted.
        finished_before: Timestamp,
    },
    /// The id counters.
    PutMeta(Meta),
}

/// Counters that must survive restarts so ids are never reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The next run id to allocate.
    pub next_run_id: u64,
    /// The next audit sequence number.
    pub next_audit_seq: u64,
}

/// Records to apply atomically and durably, in order, then acknowledge with
/// [`Scheduler::handle_persisted`](crate::Scheduler::handle_persisted).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Its id, for the acknowledgement.
    pub id: BatchId,
    /// The records.
    pub records: Vec<Record>,
}

/// What a store hands back to rebuild a scheduler after a restart: every job, every run that is
/// not terminal (terminal runs are history and are not needed), and the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Every job record.
    pub jobs: Vec<Job>,
    /// Every run not in a terminal state (terminal ones are ignored if included).
    pub runs: Vec<Run>,
    /// The counters.
    pub meta: Meta,
}

/// The pending and in-flight writes of one scheduler.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    pub(crate) dirty_jobs: BTreeSet<JobId>,
    pub(crate) deleted_jobs: BTreeSet<JobId>,
    pub(crate) dirty_runs: BTreeSet<RunId>,
    pub(crate) meta_dirty: bool,
    pub(crate) audit: Vec<AuditRecord>,
    pub(crate) prunes: Vec<Record>,
    /// Attempts to release when the next batch is acknowledged.
    pub(crate) gates_next: Vec<(RunId, Attempt)>,
    pub(crate) in_flight: Option<InFlight>,
    pub(crate) next_batch: u64,
    /// While set, no batch is emitted before this instant (a failed write is being retried).
    pub(crate) retry_at: Option<Timestamp>,
    pub(crate) consecutive_failures: u32,
}

/// A batch the store has not acknowledged yet, with what its acknowledgement releases.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) id: BatchId,
    pub(crate) jobs: Vec<JobId>,
    pub(crate) deleted_jobs: Vec<JobId>,
    pub(crate) runs: Vec<RunId>,
    pub(crate) meta: bool,
    pub(crate) audit: Vec<AuditRecord>,
    pub(crate) prunes: Vec<Record>,
    pub(crate) gates: Vec<(RunId, Attempt)>,
}

impl Journal {
    pub(crate) fn has_pending(&self) -> bool {
        !self.dirty_jobs.is_empty()
            || !self.deleted_jobs.is_empty()
            || !self.dirty_runs.is_empty()
            || self.meta_dirty
            || !self.audit.is_empty()
            || !self.prunes.is_empty()
    }

    /// True if a batch may be emitted now.
    pub(crate) fn can_emit(&self) -> bool {
        self.in_flight.is_none() && self.retry_at.is_none() && self.has_pending()
    }

    /// Takes everything pending into a new in-flight batch; returns its id and keys.
    pub(crate) fn start_batch(&mut self) -> &InFlight {
        debug_assert!(self.can_emit());
        let id = BatchId(self.next_batch);
        self.next_batch += 1;
        self.in_flight = Some(InFlight {
            id,
            jobs: std::mem::take(&mut self.dirty_jobs).into_iter().collect(),
            deleted_jobs: std::mem::take(&mut self.deleted_jobs).into_iter().collect(),
            runs: std::mem::take(&mut self.dirty_runs).into_iter().collect(),
            meta: std::mem::take(&mut self.meta_dirty),
            audit: std::mem::take(&mut self.audit),
            prunes: std::mem::take(&mut self.prunes),
            gates: std::mem::take(&mut self.gates_next),
        });
        self.in_flight.as_ref().expect("just set")
    }

    /// The store acknowledged `id`; returns the batch if it was the one in flight.
    pub(crate) fn acknowledge(&mut self, id: BatchId) -> Option<InFlight> {
        if self.in_flight.as_ref().map(|f| f.id) != Some(id) {
            return None;
        }
        self.consecutive_failures = 0;
        self.in_flight.take()
    }

    /// The store failed to write `id`: everything in it becomes pending again, ahead of what
    /// came after. Returns the retry deadline, or `None` if `id` was not in flight.
    pub(crate) fn fail(&mut self, id: BatchId, now: Timestamp) -> Option<Timestamp> {
        if self.in_flight.as_ref().map(|f| f.id) != Some(id) {
            return None;
        }
        let failed = self.in_flight.take().expect("checked above");
        self.dirty_jobs.extend(failed.jobs);
        // A job deleted and then re-added while the batch was in flight is dirty again; its put
        // supersedes the failed delete.
        for job in failed.deleted_jobs {
            if !self.dirty_jobs.contains(&job) {
                self.deleted_jobs.insert(job);
            }
        }
        self.dirty_runs.extend(failed.runs);
        self.meta_dirty |= failed.meta;
        let mut audit = failed.audit;
        audit.append(&mut self.audit);
        self.audit = audit;
        let mut prunes = failed.prunes;
        prunes.append(&mut self.prunes);
        self.prunes = prunes;
        let mut gates = failed.gates;
        gates.append(&mut self.gates_next);
        self.gates_next = gates;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let shift = self.consecutive_failures.saturating_sub(1).min(16);
        let delay = (limits::PERSIST_RETRY_BASE_MS << shift).min(limits::PERSIST_RETRY_MAX_MS);
        let at = now.plus_ms(delay);
        self.retry_at = Some(at);
        Some(at)
    }
}

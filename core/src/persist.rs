//! Persist before act (SPEC T1): what the core asks a store to write, and the bookkeeping that
//! holds effects back until the store says the write is durable.
//!
//! # Protocol
//!
//! Every state change marks a key dirty (a job, a run, the id counters) or appends an audit
//! record, grouped by job. `poll_effect` turns what is pending into one [`Batch`] of
//! upsert-style [`Record`]s, built from the *current* state, and emits it as `Effect::Persist`.
//! At most one batch is in flight: changes made meanwhile wait for the next one, which is how
//! many transitions share one fsync (group commit). A batch takes whole job groups up to
//! [`limits::BATCH_RECORDS_MAX`] records, so what one transition wrote for a job (a moved cursor
//! and the run it fired) is never split across batches. Every batch carries the id counters.
//!
//! An effect that must not happen before its record is durable (handing an attempt to the
//! executor) is *gated* on the batch that carries the record, and released only by
//! `handle_persisted` for that batch. If the store reports `handle_persist_failed` instead,
//! the batch's keys become dirty again, its audit records go back to the front of the queue,
//! its gated effects move to the next batch, and no batch is emitted until a retry deadline
//! (100 ms doubling to 10 s). Because records are rebuilt from current state, a retried batch
//! never overwrites a newer state with an older one, and because records are upserts keyed by
//! id (audit records by `seq`), applying one twice is harmless.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::ids::{Attempt, BatchId, JobId, RunId};
use crate::incident::Incident;
use crate::job::Job;
use crate::limits;
use crate::outbox::{Delivery, DeliveryId, OutboxEvent, SendRequest};
use crate::run::Run;
use crate::time::Timestamp;

/// One write the core depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "record")]
// Records are transient: built once per write, moved into a batch and handed to the store.
// Boxing the large variants would only add an allocation per record.
#[allow(clippy::large_enum_variant)]
pub enum Record {
    /// Insert or replace a job. Shared with the scheduler's own copy: a store that keeps its
    /// jobs in memory keeps this allocation, and the scheduler copies the job only when it
    /// next changes it, so an idle job is held once, not once by each.
    PutJob(Arc<Job>),
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
    /// Remember the last slot a deleted job fired, so a job added again under its name never
    /// fires that slot again (SPEC S6).
    PutTombstone(Tombstone),
    /// Insert or replace an incident (it opened, or it resolved).
    PutIncident(Incident),
    /// Insert or replace a delivery in the outbox.
    PutDelivery(Delivery),
    /// Remove a delivery from the outbox (it finished or was dropped).
    DeleteDelivery {
        /// The delivery.
        id: DeliveryId,
    },
    /// Forget a tombstone: the name is in use again, and the new job carries its cursor. (Builds
    /// before 2026-12 also expired tombstones with the history policy's age.)
    DeleteTombstone {
        /// The job name.
        job: JobId,
    },
}

impl Record {
    /// The record as a store reads it back: the fields that are not persisted
    /// (`Job::active_runs`, which restore derives from the runs, and a delivery's durable flag,
    /// which the outbox sets on restore) at the values decoding gives them. A store that keeps
    /// the records it writes in memory, instead of decoding them back from its files, keeps
    /// this form, so that its memory equals what a replay of its files builds.
    pub fn into_stored(self) -> Record {
        match self {
            Record::PutJob(mut job) => {
                // Copied only when it differs: an idle job stays shared with the scheduler.
                if job.active_runs != 0 {
                    Arc::make_mut(&mut job).active_runs = 0;
                }
                Record::PutJob(job)
            }
            Record::PutDelivery(delivery) => Record::PutDelivery(delivery.into_stored()),
            other => other,
        }
    }
}

/// What is kept of a deleted job: its name and the latest slot it fired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The deleted job's name.
    pub job: JobId,
    /// The latest slot it fired.
    pub last_fired: Timestamp,
    /// When it was deleted (shown to operators; tombstones do not expire).
    pub deleted_at: Timestamp,
}

/// Counters that must survive restarts so ids are never reused and time never runs backwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The next run id to allocate.
    pub next_run_id: u64,
    /// The next audit sequence number.
    pub next_audit_seq: u64,
    /// The latest `now` the scheduler had seen when this was written. A restored scheduler
    /// starts no earlier, so a wall clock set back across a restart is clamped like one set
    /// back while running.
    #[serde(default)]
    pub clock: Timestamp,
    /// Incremented by every restore; batch ids carry it, so an acknowledgement meant for a
    /// previous incarnation can never release an effect of this one.
    #[serde(default)]
    pub epoch: u64,
    /// The next fencing token to grant; tokens rise across restarts and never repeat.
    #[serde(default)]
    pub next_token: u64,
    /// The next incident id.
    #[serde(default)]
    pub next_incident: u64,
    /// The next delivery id.
    #[serde(default)]
    pub next_delivery: u64,
}

/// Records to apply atomically and durably, in order, then acknowledge with
/// [`Scheduler::handle_persisted`](crate::Scheduler::handle_persisted).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Its id, for the acknowledgement.
    pub id: BatchId,
    /// The writer's clock when it built the batch; the store judges lease expiry by it.
    pub at: Timestamp,
    /// The records.
    pub records: Vec<Record>,
}

/// What a store hands back to rebuild a scheduler after a restart: every job, every run that is
/// not terminal (terminal runs are history and are not needed), the counters and the
/// tombstones.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Every job record.
    pub jobs: Vec<Job>,
    /// Every run not in a terminal state (terminal ones are ignored if included).
    pub runs: Vec<Run>,
    /// The counters.
    pub meta: Meta,
    /// Every tombstone.
    pub tombstones: Vec<Tombstone>,
    /// Every open incident (resolved ones are history and are not needed).
    pub incidents: Vec<Incident>,
    /// Every delivery in the outbox.
    pub deliveries: Vec<Delivery>,
}

/// The pending and in-flight writes of one scheduler, grouped by job.
///
/// A group holds everything pending for one job: its own record, its runs, their audit records
/// and prunes, and the attempts waiting for them. A batch takes whole groups (never part of
/// one) until it holds [`limits::BATCH_RECORDS_MAX`] records, so a firing's new cursor and its
/// new run are always written together, and a huge burst of changes (a bulk import) is written
/// in bounded batches instead of one enormous one.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    pending: BTreeMap<JobId, Group>,
    /// Incident records to write (they may concern no job), newest copy per id.
    incidents: BTreeMap<u64, Incident>,
    /// The outbox's writes, sends and events for incident notifications: they may concern no
    /// job, and travel with the incident records, outside the job groups.
    notices: Group,

    /// The last job whose group went into a batch: the next batch starts after it, so busy
    /// jobs that sort first cannot starve the others.
    last_taken: Option<JobId>,
    global_prunes: Vec<Record>,
    meta_dirty: bool,
    pub(crate) in_flight: Option<InFlight>,
    next_batch: u64,
    /// While set, no batch is emitted before this instant (a failed write is being retried).
    pub(crate) retry_at: Option<Timestamp>,
    consecutive_failures: u32,
    /// Counts the journal's changes; see [`Journal::mark`] and [`Journal::durable_mark`].
    changes: u64,
    /// The first change of what is pending outside job groups (incidents, global prunes, the
    /// counters), if anything is.
    others_since: Option<u64>,
    /// The first change of every write not yet acknowledged, counted: one entry for each
    /// pending or in-flight group and for the pending and in-flight `others_since`. Its first
    /// key answers [`Journal::durable_mark`] in O(log n) however much is waiting; a walk over
    /// every group made each answer cost O(groups) and bulk adds quadratic.
    open: BTreeMap<u64, u32>,
}

/// Pending writes for one job.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub(crate) job: JobWrite,
    pub(crate) tombstone: JobWrite,
    pub(crate) runs: BTreeSet<RunId>,
    pub(crate) audit: Vec<AuditRecord>,
    pub(crate) prunes: Vec<Record>,
    /// Attempts to hand out once this group's batch is acknowledged.
    pub(crate) gates: Vec<(RunId, Attempt)>,
    /// Checkpoint saves (run, seq) whose acknowledgement advances the run's throttle.
    pub(crate) checkpoints: Vec<(RunId, u64)>,
    /// Outbox writes for this job's runs.
    pub(crate) deliveries: BTreeMap<DeliveryId, JobWrite>,
    /// Delivery sends released when this group's batch is acknowledged.
    pub(crate) sends: Vec<SendRequest>,
    /// Outbox events (a delivery finished or was dropped) released with the acknowledgement.
    pub(crate) events: Vec<OutboxEvent>,
    /// The journal's change count when this group was opened: every change in it is later.
    since: u64,
    /// The pending audit record that counts dropped slots, and how many it counts: drops while
    /// a write is pending (a store outage) coalesce into one record instead of piling up.
    drops: Option<(usize, u64)>,
}

/// What to write for the job itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum JobWrite {
    #[default]
    Nothing,
    Put,
    Delete,
}

impl Group {
    /// True if it holds no outbox write, send or event (what the notices group holds).
    fn has_no_deliveries(&self) -> bool {
        self.deliveries.is_empty() && self.sends.is_empty() && self.events.is_empty()
    }

    /// Records this group would write.
    pub(crate) fn records(&self) -> usize {
        usize::from(self.job != JobWrite::Nothing)
            + usize::from(self.tombstone != JobWrite::Nothing)
            + self.deliveries.len()
            + self.runs.len()
            + self.audit.len()
            + self.prunes.len()
    }

    /// Puts an older group (from a failed batch) back in front of this newer one.
    fn merge_older(&mut self, older: Group) {
        self.since = self.since.min(older.since);
        if self.job == JobWrite::Nothing {
            self.job = older.job;
        }
        if self.tombstone == JobWrite::Nothing {
            self.tombstone = older.tombstone;
        }
        self.runs.extend(older.runs);
        let shift = older.audit.len();
        self.drops = match (self.drops, older.drops) {
            (Some((i, n)), _) => Some((i + shift, n)),
            (None, older_drops) => older_drops,
        };
        let mut audit = older.audit;
        audit.append(&mut self.audit);
        self.audit = audit;
        // The newest prune subsumes older ones (same policy, later cut-off).
        if self.prunes.is_empty() {
            self.prunes = older.prunes;
        }
        let mut gates = older.gates;
        gates.append(&mut self.gates);
        self.gates = gates;
        for (id, write) in older.deliveries {
            self.deliveries.entry(id).or_insert(write);
        }
        let mut sends = older.sends;
        sends.append(&mut self.sends);
        self.sends = sends;
        let mut events = older.events;
        events.append(&mut self.events);
        self.events = events;
    }
}

/// A batch the store has not acknowledged yet, with what its acknowledgement releases.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) id: BatchId,
    pub(crate) groups: Vec<(JobId, Group)>,
    pub(crate) global_prunes: Vec<Record>,
    pub(crate) incidents: Vec<Incident>,
    /// The incident notifications' outbox writes, sends and events.
    pub(crate) notices: Group,
    /// The first change of the incidents, notices, prunes and counters it carries.
    others_since: Option<u64>,
}

/// What a failed batch puts back, for the scheduler's own bookkeeping.
#[derive(Debug)]
pub(crate) struct Failed {
    /// When the next batch may be emitted.
    pub(crate) retry_at: Timestamp,
    /// The runs the batch carried.
    pub(crate) runs: Vec<RunId>,
    /// The checkpoint saves the batch carried.
    pub(crate) checkpoints: Vec<(RunId, u64)>,
}

impl Journal {
    /// The job's record must be written.
    pub(crate) fn put_job(&mut self, job: &JobId) {
        self.group(job).job = JobWrite::Put;
    }

    /// The job's record must be deleted.
    pub(crate) fn delete_job(&mut self, job: &JobId) {
        self.group(job).job = JobWrite::Delete;
    }

    /// The job's tombstone must be written (`Put`) or deleted (`Delete`).
    pub(crate) fn tombstone(&mut self, job: &JobId, write: JobWrite) {
        self.group(job).tombstone = write;
    }

    /// A run of `job` must be written.
    pub(crate) fn put_run(&mut self, job: &JobId, run: RunId) {
        self.group(job).runs.insert(run);
    }

    /// Hands `attempt` of `run` out only after the batch carrying the run is acknowledged.
    pub(crate) fn gate(&mut self, job: &JobId, run: RunId, attempt: Attempt) {
        let group = self.group(job);
        group.runs.insert(run);
        group.gates.push((run, attempt));
    }

    /// A checkpoint save of `run` (in `job`'s group) rides with the run's next write.
    pub(crate) fn checkpoint(&mut self, job: &JobId, run: RunId, seq: u64) {
        let group = self.group(job);
        group.runs.insert(run);
        group.checkpoints.push((run, seq));
    }

    /// An outbox delivery of `job`'s run must be written (`Put`) or removed (`Delete`). It
    /// travels in the job's group, with the run record it reports: a result is neither sent
    /// before its run's terminal record is durable nor lost after it.
    pub(crate) fn delivery(&mut self, job: &JobId, id: DeliveryId, write: JobWrite) {
        self.group(job).deliveries.insert(id, write);
    }

    /// A send of `job`'s delivery, held until the batch recording its attempt is acknowledged.
    pub(crate) fn send(&mut self, job: &JobId, send: SendRequest) {
        self.group(job).sends.push(send);
    }

    /// An outbox event held until the batch carrying its write is acknowledged: a delivery is
    /// counted once its end is durable, so a crash cannot count it twice.
    pub(crate) fn held_event(&mut self, job: &JobId, event: OutboxEvent) {
        self.group(job).events.push(event);
    }

    /// An outbox delivery of an incident notification must be written (`Put`) or removed
    /// (`Delete`). It travels with the incident records: a notification is not sent before
    /// the incident's record is durable.
    pub(crate) fn notice_delivery(&mut self, id: DeliveryId, write: JobWrite) {
        self.other_change();
        self.notices.deliveries.insert(id, write);
    }

    /// A send of an incident notification, held until the batch recording its attempt is
    /// acknowledged.
    pub(crate) fn notice_send(&mut self, send: SendRequest) {
        self.other_change();
        self.notices.sends.push(send);
    }

    /// An outbox event of an incident notification, held until its end is durable.
    pub(crate) fn notice_event(&mut self, event: OutboxEvent) {
        self.other_change();
        self.notices.events.push(event);
    }

    /// An incident must be written.
    pub(crate) fn incident(&mut self, incident: Incident) {
        self.other_change();
        self.incidents.insert(incident.id, incident);
    }

    /// Appends an audit record.
    pub(crate) fn audit(&mut self, record: AuditRecord) {
        let job = record.job.clone();
        self.group(&job).audit.push(record);
    }

    /// Appends an audit record for a dropped slot, or folds it into the job's pending one:
    /// while a write waits (a slow or failing store), drops are counted, not piled up.
    pub(crate) fn audit_drop(&mut self, mut record: AuditRecord, slots: u64) {
        let job = record.job.clone();
        let group = self.group(&job);
        match group.drops {
            Some((i, counted)) => {
                let total = counted + slots;
                let pending = &mut group.audit[i];
                pending.reason = format!(
                    "{total} slots dropped while the store was catching up; latest: {}",
                    record.reason
                );
                pending.at = record.at;
                group.drops = Some((i, total));
            }
            None => {
                record.reason = crate::run::truncate(&record.reason);
                group.audit.push(record);
                group.drops = Some((group.audit.len() - 1, slots));
            }
        }
    }

    /// Queues a history prune, for one job or all. Only the newest pending prune is kept: it
    /// applies the same policy with a later cut-off.
    pub(crate) fn prune(&mut self, job: Option<&JobId>, record: Record) {
        match job {
            Some(job) => self.group(job).prunes = vec![record],
            None => {
                self.other_change();
                self.global_prunes = vec![record];
            }
        }
    }

    /// Makes batch ids of this incarnation distinct from every earlier one's.
    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        self.next_batch = epoch << 32;
    }

    /// The id counters changed.
    pub(crate) fn meta(&mut self) {
        self.other_change();
        self.meta_dirty = true;
    }

    /// True if `run` of `job` has a write pending (not yet in a batch).
    pub(crate) fn run_pending(&self, job: &JobId, run: RunId) -> bool {
        self.pending.get(job).is_some_and(|g| g.runs.contains(&run))
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
            || !self.global_prunes.is_empty()
            || !self.incidents.is_empty()
            || !self.notices.has_no_deliveries()
            || self.meta_dirty
    }

    /// True if a batch may be emitted now.
    pub(crate) fn can_emit(&self) -> bool {
        self.in_flight.is_none() && self.retry_at.is_none() && self.has_pending()
    }

    /// Moves whole groups, up to the batch limit, into a new in-flight batch.
    pub(crate) fn start_batch(&mut self) -> &InFlight {
        debug_assert!(self.can_emit());
        let id = BatchId(self.next_batch);
        self.next_batch += 1;
        // Round robin: start after the job the previous batch ended with.
        let mut taken = Vec::new();
        let mut records = 0;
        let (after, before, wrap) = match &self.last_taken {
            Some(last) => (
                (Excluded(last), Unbounded),
                (Unbounded, Included(last)),
                usize::MAX,
            ),
            None => ((Unbounded, Unbounded), (Unbounded, Unbounded), 0),
        };
        let after = self.pending.range::<JobId, _>(after);
        let before = self.pending.range::<JobId, _>(before).take(wrap);
        for (job, group) in after.chain(before) {
            if records >= limits::BATCH_RECORDS_MAX {
                break;
            }
            records += group.records();
            taken.push(job.clone());
        }
        if let Some(last) = taken.last() {
            self.last_taken = Some(last.clone());
        }
        let groups: Vec<(JobId, Group)> = taken
            .into_iter()
            .map(|job| {
                let group = self.pending.remove(&job).expect("taken from pending");
                (job, group)
            })
            .collect();
        let global_prunes = if records < limits::BATCH_RECORDS_MAX {
            std::mem::take(&mut self.global_prunes)
        } else {
            Vec::new()
        };
        self.meta_dirty = false;
        let incidents = std::mem::take(&mut self.incidents).into_values().collect();
        let notices = std::mem::take(&mut self.notices);
        // Global prunes left behind by a full batch keep their place in the order: the pending
        // and the in-flight part each hold the mark until they are written.
        let others_since = if self.global_prunes.is_empty() {
            self.others_since.take()
        } else {
            if let Some(since) = self.others_since {
                open_mark(&mut self.open, since);
            }
            self.others_since
        };
        self.in_flight = Some(InFlight {
            id,
            groups,
            global_prunes,
            incidents,
            notices,
            others_since,
        });
        self.in_flight.as_ref().expect("just set")
    }

    /// The store acknowledged `id`; returns the batch if it was the one in flight.
    pub(crate) fn acknowledge(&mut self, id: BatchId) -> Option<InFlight> {
        if self.in_flight.as_ref().map(|f| f.id) != Some(id) {
            return None;
        }
        self.consecutive_failures = 0;
        let batch = self.in_flight.take()?;
        for (_, group) in &batch.groups {
            close_mark(&mut self.open, group.since);
        }
        if let Some(since) = batch.others_since {
            close_mark(&mut self.open, since);
        }
        Some(batch)
    }

    /// The store failed to write `id`: everything in it becomes pending again, ahead of what
    /// came after. Returns the retry deadline, or `None` if `id` was not in flight.
    pub(crate) fn fail(&mut self, id: BatchId, now: Timestamp) -> Option<Failed> {
        if self.in_flight.as_ref().map(|f| f.id) != Some(id) {
            return None;
        }
        let failed = self.in_flight.take().expect("checked above");
        let mut runs = Vec::new();
        let mut checkpoints = Vec::new();
        for (job, mut older) in failed.groups {
            runs.extend(older.runs.iter().copied());
            checkpoints.append(&mut older.checkpoints);
            match self.pending.entry(job) {
                // Pending again under its own first change, which stays open.
                Entry::Vacant(slot) => {
                    slot.insert(older);
                }
                // The newer group takes the older one's first change; its own closes.
                Entry::Occupied(mut newer) => {
                    close_mark(&mut self.open, newer.get().since.max(older.since));
                    newer.get_mut().merge_older(older);
                }
            }
        }
        for incident in failed.incidents {
            // A newer copy of the same incident wins.
            self.incidents.entry(incident.id).or_insert(incident);
        }
        self.notices.merge_older(failed.notices);

        if self.global_prunes.is_empty() {
            self.global_prunes = failed.global_prunes;
        }
        self.others_since = match (self.others_since, failed.others_since) {
            (Some(a), Some(b)) => {
                close_mark(&mut self.open, a.max(b));
                Some(a.min(b))
            }
            (a, b) => a.or(b),
        };
        self.meta_dirty = true;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let shift = self.consecutive_failures.saturating_sub(1).min(16);
        let delay = (limits::PERSIST_RETRY_BASE_MS << shift).min(limits::PERSIST_RETRY_MAX_MS);
        let at = now.plus_ms(delay);
        self.retry_at = Some(at);
        Some(Failed {
            retry_at: at,
            runs,
            checkpoints,
        })
    }

    fn group(&mut self, job: &JobId) -> &mut Group {
        self.changes += 1;
        let since = self.changes;
        match self.pending.entry(job.clone()) {
            Entry::Occupied(group) => group.into_mut(),
            Entry::Vacant(slot) => {
                open_mark(&mut self.open, since);
                slot.insert(Group {
                    since,
                    ..Group::default()
                })
            }
        }
    }

    fn other_change(&mut self) {
        self.changes += 1;
        if self.others_since.is_none() {
            self.others_since = Some(self.changes);
            open_mark(&mut self.open, self.changes);
        }
    }

    /// A mark for everything changed so far: [`Journal::durable_mark`] says when all of it
    /// is acknowledged.
    pub(crate) fn mark(&self) -> u64 {
        self.changes
    }

    /// The latest mark whose changes are all acknowledged by the store: every change up to it
    /// is durable, and the next one is pending or in flight (or not made yet). O(log n).
    pub(crate) fn durable_mark(&self) -> u64 {
        match self.open.first_key_value() {
            Some((&oldest, _)) => oldest - 1,
            None => self.changes,
        }
    }
}

/// Counts one more unacknowledged write whose first change is `since`.
fn open_mark(open: &mut BTreeMap<u64, u32>, since: u64) {
    *open.entry(since).or_insert(0) += 1;
}

/// That write is acknowledged, or merged into an older one.
fn close_mark(open: &mut BTreeMap<u64, u32>, since: u64) {
    match open.get_mut(&since) {
        Some(count) if *count > 1 => *count -= 1,
        Some(_) => {
            open.remove(&since);
        }
        None => debug_assert!(false, "closing mark {since}, which is not open"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// What `durable_mark` answered before the index: a walk over every open write.
    fn durable_by_walk(journal: &Journal) -> u64 {
        let pending = journal.pending.values().map(|g| g.since);
        let in_flight = journal
            .in_flight
            .iter()
            .flat_map(|f| f.groups.iter().map(|(_, g)| g.since).chain(f.others_since));
        pending
            .chain(journal.others_since)
            .chain(in_flight)
            .min()
            .map_or(journal.changes, |oldest| oldest - 1)
    }

    /// The index holds exactly the first changes of the open writes, counted.
    fn check(journal: &Journal) {
        let mut expected = BTreeMap::new();
        let pending = journal.pending.values().map(|g| g.since);
        let in_flight = journal
            .in_flight
            .iter()
            .flat_map(|f| f.groups.iter().map(|(_, g)| g.since).chain(f.others_since));
        for since in pending.chain(journal.others_since).chain(in_flight) {
            open_mark(&mut expected, since);
        }
        assert_eq!(journal.open, expected, "the open-mark index drifted");
        assert_eq!(journal.durable_mark(), durable_by_walk(journal));
    }

    fn prune() -> Record {
        Record::PruneHistory {
            job: None,
            keep_last: 1,
            finished_before: Timestamp(0),
        }
    }

    #[test]
    fn the_durable_mark_index_agrees_with_a_walk_through_writes_failures_and_full_batches() {
        let jobs: Vec<JobId> = (0..12)
            .map(|i| JobId::new(&format!("job-{i}")).expect("valid name"))
            .collect();
        for seed in 0..40 {
            let mut rng = SplitMix64::new(seed);
            let mut journal = Journal::default();
            let mut next_run = 0;
            let mut marks = Vec::new();
            for step in 0..400 {
                match rng.below_inclusive(9) {
                    0..=3 => {
                        let job = &jobs[rng.below_inclusive(11) as usize];
                        // Now and then a burst big enough to fill a batch on its own, so
                        // global prunes are left behind and split across two writes.
                        let runs = if rng.chance(1, 30) { 5_000 } else { 1 };
                        for _ in 0..runs {
                            next_run += 1;
                            journal.put_run(job, RunId(next_run));
                        }
                    }
                    4 => journal.meta(),
                    5 => journal.prune(None, prune()),
                    6 if journal.can_emit() => {
                        journal.start_batch();
                    }
                    7 => {
                        if let Some(id) = journal.in_flight.as_ref().map(|f| f.id) {
                            journal.acknowledge(id);
                        }
                    }
                    8 => {
                        if let Some(id) = journal.in_flight.as_ref().map(|f| f.id) {
                            journal.fail(id, Timestamp(step));
                            journal.retry_at = None;
                        }
                    }
                    _ => {}
                }
                check(&journal);
                marks.push(journal.mark());
            }
            // Drain: every mark taken becomes durable once everything is acknowledged.
            while journal.can_emit() || journal.in_flight.is_some() {
                if journal.in_flight.is_none() {
                    journal.start_batch();
                }
                let id = journal.in_flight.as_ref().map(|f| f.id).expect("in flight");
                journal.acknowledge(id);
                check(&journal);
            }
            assert!(journal.open.is_empty());
            assert!(marks.iter().all(|&m| m <= journal.durable_mark()));
        }
    }

    #[test]
    fn a_mark_is_not_durable_while_a_change_at_or_before_it_is_pending_or_in_flight() {
        let a = JobId::new("a").expect("valid name");
        let b = JobId::new("b").expect("valid name");
        let mut journal = Journal::default();
        journal.put_run(&a, RunId(1));
        let first = journal.mark();
        assert_eq!(journal.durable_mark(), first - 1);
        let batch = journal.start_batch().id;
        journal.put_run(&b, RunId(2));
        let second = journal.mark();
        assert!(journal.durable_mark() < first);
        // The batch fails: its write is pending again, still holding the oldest change.
        journal.fail(batch, Timestamp(0));
        journal.retry_at = None;
        assert!(journal.durable_mark() < first);
        let batch = journal.start_batch().id;
        journal.acknowledge(batch);
        assert!(journal.durable_mark() >= second);
        check(&journal);
    }
}

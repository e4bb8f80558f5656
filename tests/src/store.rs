//! An in-memory store: what a durable store would hold, applied batch by batch.
//!
//! [`MemStore`] is the simulator's disk. It applies a [`Batch`] atomically when the simulated
//! write completes, keeps every run including terminal ones (the history that the core forgets),
//! keeps the audit trail, executes the history policy, and builds the [`Snapshot`] a restarted
//! core is restored from. It also checks the store-level safety properties that no core bug may
//! break, whatever the faults:
//!
//! - a terminal run never changes again;
//! - two different runs never claim the same `(job, slot)` (SPEC S6);
//! - audit sequence numbers are never reused for a different record.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_core::outbox::{Delivery, DeliveryId};
use keel_core::persist::Tombstone;
use keel_core::store::{check_batch, next_writer_epoch, StoredView};
use keel_core::{
    AuditQuery, AuditRecord, Batch, Incident, Job, JobId, Meta, Record, Run, RunId, RunPage,
    RunQuery, Snapshot, Store, StoreError, Timestamp,
};

/// Durable state, as a real store would hold it after acknowledging batches.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    jobs: BTreeMap<JobId, Job>,
    runs: BTreeMap<RunId, Run>,
    audit: BTreeMap<u64, AuditRecord>,
    slots: BTreeMap<(JobId, Timestamp), RunId>,
    tombstones: BTreeMap<JobId, Tombstone>,
    incidents: BTreeMap<u64, Incident>,
    deliveries: BTreeMap<DeliveryId, Delivery>,
    meta: Meta,
    batches_applied: u64,
    /// The epoch whose batches [`SharedMemStore`] accepts (see `keel_core::store`).
    writer_epoch: u64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }

    /// Applies every record of `batch`, atomically (nothing else can observe a half-applied
    /// batch in a single-threaded simulation). Panics if a store-level safety property breaks.
    pub fn apply(&mut self, batch: &Batch) {
        // The core must never write a batch a durable store would refuse.
        if let Err(conflict) = check_batch(self, batch) {
            panic!("the store refuses {}: {conflict}", batch.id);
        }
        for record in &batch.records {
            self.apply_record(record);
        }
        self.batches_applied += 1;
    }

    /// Like [`Store::restore`]: makes a new incarnation the writer (batches of earlier ones
    /// are refused from now on) and returns what it is restored from.
    pub fn restore(&mut self) -> Snapshot {
        let epoch = next_writer_epoch(self.writer_epoch, self.meta.epoch);
        self.writer_epoch = epoch;
        let mut snapshot = self.snapshot();
        snapshot.meta.epoch = epoch - 1;
        snapshot
    }

    /// What a restarted scheduler needs: every job, every non-terminal run, the counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            jobs: self.jobs.values().cloned().collect(),
            runs: self
                .runs
                .values()
                .filter(|r| !r.state.is_terminal())
                .cloned()
                .collect(),
            meta: self.meta,
            tombstones: self.tombstones.values().cloned().collect(),
            incidents: self
                .incidents
                .values()
                .filter(|i| i.resolved_at.is_none())
                .cloned()
                .collect(),
            deliveries: self.deliveries.values().cloned().collect(),
        }
    }

    /// A job's durable record.
    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// Every durable job.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// A run's durable record (terminal runs included, until pruned).
    pub fn run(&self, id: RunId) -> Option<&Run> {
        self.runs.get(&id)
    }

    /// Every durable run, ordered by id.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    /// The durable runs of one job, ordered by id.
    pub fn runs_of<'a>(&'a self, job: &'a JobId) -> impl Iterator<Item = &'a Run> + 'a {
        self.runs.values().filter(move |r| &r.job == job)
    }

    /// The audit trail of one job (its job-level and run-level records), in order.
    pub fn audit_of<'a>(&'a self, job: &'a JobId) -> impl Iterator<Item = &'a AuditRecord> + 'a {
        self.audit.values().filter(move |a| &a.job == job)
    }

    /// The audit trail of one run, in order.
    pub fn audit_of_run(&self, run: RunId) -> impl Iterator<Item = &AuditRecord> + '_ {
        self.audit.values().filter(move |a| a.run == Some(run))
    }

    /// The whole audit trail, in order.
    pub fn audit(&self) -> impl Iterator<Item = &AuditRecord> {
        self.audit.values()
    }

    /// The outbox as stored: deliveries not yet finished.
    pub fn deliveries(&self) -> impl Iterator<Item = &Delivery> {
        self.deliveries.values()
    }

    /// Every incident, open and resolved, by id.
    pub fn incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values()
    }

    /// The durable counters.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// How many batches were applied.
    pub fn batches_applied(&self) -> u64 {
        self.batches_applied
    }

    fn apply_record(&mut self, record: &Record) {
        match record {
            Record::PutJob(job) => {
                self.jobs.insert(job.spec.id.clone(), job.clone());
            }
            // A job added again under a deleted job's name inherits its fired slots through the
            // tombstone, so slot claims outlive the job record.
            Record::DeleteJob { id } => {
                self.jobs.remove(id);
            }
            Record::PutTombstone(tombstone) => {
                self.tombstones
                    .insert(tombstone.job.clone(), tombstone.clone());
            }
            Record::DeleteTombstone { job } => {
                self.tombstones.remove(job);
            }
            Record::PutDelivery(delivery) => {
                self.deliveries.insert(delivery.id, delivery.clone());
            }
            Record::DeleteDelivery { id } => {
                self.deliveries.remove(id);
            }
            Record::PutIncident(incident) => {
                if let Some(old) = self.incidents.get(&incident.id) {
                    assert!(
                        old.resolved_at.is_none() || old == incident,
                        "incident {} changed after it resolved",
                        incident.id
                    );
                }
                self.incidents.insert(incident.id, incident.clone());
            }
            Record::PutRun(run) => self.put_run(run),
            Record::Audit(entry) => {
                if let Some(old) = self.audit.get(&entry.seq) {
                    assert_eq!(
                        old, entry,
                        "audit seq {} reused for another record",
                        entry.seq
                    );
                }
                self.audit.insert(entry.seq, entry.clone());
            }
            Record::PruneHistory {
                job,
                keep_last,
                finished_before,
            } => self.prune(job.as_ref(), *keep_last, *finished_before),
            Record::PutMeta(meta) => {
                assert!(
                    meta.next_run_id >= self.meta.next_run_id
                        && meta.next_audit_seq >= self.meta.next_audit_seq,
                    "counters went backwards: {:?} -> {meta:?}",
                    self.meta
                );
                self.meta = *meta;
            }
        }
    }

    fn put_run(&mut self, run: &Run) {
        if let Some(old) = self.runs.get(&run.id) {
            assert!(
                !old.state.is_terminal() || old.state == run.state,
                "{} changed after reaching terminal state {:?}: now {:?}",
                run.id,
                old.state,
                run.state
            );
            assert_eq!(old.job, run.job, "{} moved to another job", run.id);
        }
        if let Some(slot) = run.slot() {
            let key = (run.job.clone(), slot);
            if let Some(other) = self.slots.get(&key) {
                assert_eq!(
                    *other, run.id,
                    "slot {slot} of job {} claimed by {} and {}",
                    run.job, other, run.id
                );
            }
            self.slots.insert(key, run.id);
        }
        self.runs.insert(run.id, run.clone());
    }

    fn prune(&mut self, job: Option<&JobId>, keep_last: u32, finished_before: Timestamp) {
        let mut per_job: BTreeMap<&JobId, Vec<(Timestamp, RunId)>> = BTreeMap::new();
        for run in self.runs.values() {
            if job.is_some_and(|j| j != &run.job) {
                continue;
            }
            if let Some(finished) = run.finished_at.filter(|_| run.state.is_terminal()) {
                per_job
                    .entry(&run.job)
                    .or_default()
                    .push((finished, run.id));
            }
        }
        let mut doomed = Vec::new();
        for (_, mut finished) in per_job {
            finished.sort_unstable_by(|a, b| b.cmp(a)); // newest first
            for (i, (at, id)) in finished.into_iter().enumerate() {
                if i >= keep_last as usize || at < finished_before {
                    doomed.push(id);
                }
            }
        }
        for id in doomed {
            self.runs.remove(&id);
            self.audit.retain(|_, a| a.run != Some(id));
            // The slot stays claimed: a pruned slot must still never fire twice.
        }
    }
}

impl StoredView for MemStore {
    fn writer_epoch(&self) -> u64 {
        self.writer_epoch
    }

    fn stored_run(&self, id: RunId) -> Option<Run> {
        self.runs.get(&id).cloned()
    }

    fn slot_owner(&self, job: &JobId, slot: Timestamp) -> Option<RunId> {
        self.slots.get(&(job.clone(), slot)).copied()
    }
}

/// A [`MemStore`] behind the [`Store`] interface: every handle cloned from one shares the same
/// state, like processes sharing a data directory. It checks the write rules exactly as the
/// durable adapters do, so the conformance suite runs against it too; nothing survives the
/// process.
#[derive(Clone, Debug, Default)]
pub struct SharedMemStore {
    inner: Arc<Mutex<MemStore>>,
}

impl SharedMemStore {
    /// An empty store.
    pub fn new() -> Self {
        SharedMemStore::default()
    }

    /// The state, for assertions.
    pub fn lock(&self) -> MutexGuard<'_, MemStore> {
        // A panic while holding the lock (a failed assertion in another test thread) must not
        // hide this thread's own result.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for SharedMemStore {
    fn restore(&self) -> Result<Snapshot, StoreError> {
        Ok(self.lock().restore())
    }

    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut store = self.lock();
        check_batch(&*store, batch)?;
        store.apply(batch);
        Ok(())
    }

    fn read(&self) -> Result<Snapshot, StoreError> {
        Ok(self.lock().snapshot())
    }

    fn run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        Ok(self.lock().runs.get(&id).cloned())
    }

    fn runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        Ok(query.page(self.lock().runs.values().rev()))
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(query.page(self.lock().audit.values()))
    }

    fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        Ok(self.lock().incidents.values().cloned().collect())
    }
}

/// The read half of [`Store`], forwarded to the field `$inner` (any `Store`): for test stores
/// that wrap a [`SharedMemStore`] to do something to its writes and nothing to its reads.
///
/// ```ignore
/// impl Store for Failing {
///     fn apply(&self, batch: &Batch) -> Result<(), StoreError> { /* … */ }
///     keel_testkit::store_reads_from!(inner);
/// }
/// ```
#[macro_export]
macro_rules! store_reads_from {
    ($inner:ident) => {
        fn restore(&self) -> Result<keel_core::Snapshot, keel_core::StoreError> {
            self.$inner.restore()
        }
        fn read(&self) -> Result<keel_core::Snapshot, keel_core::StoreError> {
            self.$inner.read()
        }
        fn run(
            &self,
            id: keel_core::RunId,
        ) -> Result<Option<keel_core::Run>, keel_core::StoreError> {
            self.$inner.run(id)
        }
        fn runs(
            &self,
            query: &keel_core::RunQuery,
        ) -> Result<keel_core::RunPage, keel_core::StoreError> {
            self.$inner.runs(query)
        }
        fn audit(
            &self,
            query: &keel_core::AuditQuery,
        ) -> Result<Vec<keel_core::AuditRecord>, keel_core::StoreError> {
            self.$inner.audit(query)
        }
        fn incidents(&self) -> Result<Vec<keel_core::Incident>, keel_core::StoreError> {
            self.$inner.incidents()
        }
    };
}

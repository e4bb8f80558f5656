//! The model store: what a durable store would hold, applied batch by batch, and every property
//! of what the core asks it to write.
//!
//! [`MemStore`] is the simulator's disk, and the model store of keel's own property tests and
//! fuzz bodies: one implementation, so each checks the same things. It applies a [`Batch`]
//! atomically when the (simulated) write completes, keeps every run including terminal ones
//! (the history that the core forgets), keeps the audit trail, executes the history policy (or,
//! [`MemStore::keeping_history`], keeps everything and counts the prunes), and builds the
//! [`Snapshot`] a restarted core is restored from.
//!
//! Every batch passes the store's [write rules](keel_core::store#write-rules) (a batch a durable
//! store would refuse is a core bug), and every record goes through its serde form, as a real
//! store would write and read it back. Then it checks what no core bug may break, whatever the
//! faults:
//!
//! - **records**: a terminal run never changes again (not one field); a run keeps its job,
//!   trigger and creation time; its attempt number never goes back; the extension flag and a
//!   kill are never undone (SPEC W1, W2); two different runs never claim the same `(job, slot)`
//!   (SPEC S6); an audit sequence number or an incident id is never reused for a different
//!   record, and a resolved incident never changes;
//! - **budgets**: an active run has lost fewer attempts than its budget, and no run is past
//!   `attempts_max + lost + snoozes + shutdowns` (no run loops forever); a job's cursor is after its last
//!   fired slot;
//! - **results**: a finished or failed run has no checkpoint (SPEC C2; an interrupted or poison
//!   run keeps it), and a terminal run that did not succeed says why (SPEC R4);
//! - **counters**: the durable counters never go back, and every stored id and token is below
//!   its counter (as written in the same batch), so a restart can never hand one out again.
//!
//! [`MemStore::store_rules_only`] checks the write rules and the record rules but not the
//! core's budgets and counters: for tests that write hand-made batches to a store, as the
//! conformance suite does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use keel_core::outbox::{Delivery, DeliveryId};
use keel_core::persist::Tombstone;
use keel_core::store::{check_batch, next_writer_epoch, StoredView};
use keel_core::{
    AuditQuery, AuditRecord, Batch, ErrorKind, FencingToken, Incident, Job, JobId, JobState, Meta,
    Record, Run, RunId, RunPage, RunQuery, RunState, Snapshot, Store, StoreError, Timestamp,
};

/// Durable state, as a real store would hold it after acknowledging batches.
#[derive(Clone, Debug)]
pub struct MemStore {
    jobs: BTreeMap<JobId, Job>,
    runs: BTreeMap<RunId, Run>,
    audit: BTreeMap<u64, AuditRecord>,
    /// `(job, slot)` to the stored run that claimed it: what the write rules see. A claim goes
    /// with its run when the history policy prunes it, as in the durable stores.
    slots: BTreeMap<(JobId, Timestamp), RunId>,
    /// `(job, slot)` to the run that fired it, for every slot ever fired under a job's name,
    /// pruned or not: SPEC S6 checked over the whole history (with the core's properties). A
    /// job added again under a deleted job's name inherits its fired slots (tombstones).
    fired: BTreeMap<(JobId, Timestamp), RunId>,
    tombstones: BTreeMap<JobId, Tombstone>,
    /// Every incident ever written, open or resolved, by id.
    incidents: BTreeMap<u64, Incident>,
    deliveries: BTreeMap<DeliveryId, Delivery>,
    /// Every delivery the store ever held.
    ever_delivered: BTreeSet<DeliveryId>,
    /// The highest lease token a stored run ever held.
    max_token: Option<FencingToken>,
    meta: Meta,
    batches_applied: u64,
    prunes: u64,
    /// The epoch whose batches are accepted (see `keel_core::store`).
    writer_epoch: u64,
    /// Whether `PruneHistory` records are executed (or only counted).
    prune: bool,
    /// Whether the core's properties (budgets, counters, results) are checked too.
    core_properties: bool,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            audit: BTreeMap::new(),
            slots: BTreeMap::new(),
            fired: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            incidents: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            ever_delivered: BTreeSet::new(),
            max_token: None,
            meta: Meta::default(),
            batches_applied: 0,
            prunes: 0,
            writer_epoch: 0,
            prune: true,
            core_properties: true,
        }
    }
}

impl MemStore {
    /// An empty store that executes the history policy and checks every property.
    pub fn new() -> Self {
        MemStore::default()
    }

    /// An empty store that keeps every run and audit record (pruning is only counted): for
    /// tests that compare the store with everything the core ever wrote.
    pub fn keeping_history() -> Self {
        MemStore {
            prune: false,
            ..MemStore::default()
        }
    }

    /// An empty store that checks only what a durable store checks (the write rules and the
    /// record rules), not the core's budgets and counters: for hand-made batches.
    pub fn store_rules_only() -> Self {
        MemStore {
            core_properties: false,
            ..MemStore::default()
        }
    }

    /// Applies every record of `batch`, atomically (nothing else can observe a half-applied
    /// batch in a single-threaded simulation). Panics if a write rule refuses the batch or a
    /// property in the [module docs](self) breaks.
    pub fn apply(&mut self, batch: &Batch) {
        // The core must never write a batch a durable store would refuse.
        if let Err(conflict) = check_batch(self, batch) {
            panic!("the store refuses {}: {conflict}", batch.id);
        }
        // Ids may be allocated by the counters written in this same batch.
        let counters = batch
            .records
            .iter()
            .filter_map(|r| match r {
                Record::PutMeta(m) => Some(*m),
                _ => None,
            })
            .fold(self.meta, |a, m| Meta {
                next_run_id: a.next_run_id.max(m.next_run_id),
                next_audit_seq: a.next_audit_seq.max(m.next_audit_seq),
                next_token: a.next_token.max(m.next_token),
                next_incident: a.next_incident.max(m.next_incident),
                next_delivery: a.next_delivery.max(m.next_delivery),
                ..a
            });
        for record in &batch.records {
            let record = round_trip(record);
            if self.core_properties {
                check_counters(&record, &counters);
            }
            self.apply_record(record);
        }
        self.batches_applied += 1;
    }

    /// Like [`Store::restore`]: makes a new incarnation the writer (batches of earlier ones
    /// are refused from now on) and returns what it is restored from.
    pub fn restore(&mut self) -> Snapshot {
        let epoch = self.next_writer();
        let mut snapshot = self.snapshot();
        snapshot.meta.epoch = epoch - 1;
        snapshot
    }

    /// Like [`MemStore::restore`], with terminal runs and resolved incidents in the snapshot:
    /// a restored scheduler must ignore them.
    pub fn restore_with_history(&mut self) -> Snapshot {
        let epoch = self.next_writer();
        let mut snapshot = self.snapshot_with_history();
        snapshot.meta.epoch = epoch - 1;
        snapshot
    }

    fn next_writer(&mut self) -> u64 {
        let epoch = next_writer_epoch(self.writer_epoch, self.meta.epoch);
        self.writer_epoch = epoch;
        epoch
    }

    /// What a restarted scheduler needs: every job, every non-terminal run, the counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            runs: self
                .runs
                .values()
                .filter(|r| !r.state().is_terminal())
                .cloned()
                .collect(),
            incidents: self.open_incidents().cloned().collect(),
            ..self.snapshot_with_history()
        }
    }

    /// Everything the store holds, terminal runs and resolved incidents included.
    pub fn snapshot_with_history(&self) -> Snapshot {
        Snapshot {
            jobs: self.jobs.values().cloned().collect(),
            runs: self.runs.values().cloned().collect(),
            meta: self.meta,
            tombstones: self.tombstones.values().cloned().collect(),
            incidents: self.incidents.values().cloned().collect(),
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
    pub fn runs(&self) -> impl DoubleEndedIterator<Item = &Run> {
        self.runs.values()
    }

    /// The durable runs of one job, ordered by id.
    pub fn runs_of<'a>(&'a self, job: &'a JobId) -> impl Iterator<Item = &'a Run> + 'a {
        self.runs.values().filter(move |r| r.job() == job)
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

    /// One delivery of the outbox, if it is still there.
    pub fn delivery(&self, id: DeliveryId) -> Option<&Delivery> {
        self.deliveries.get(&id)
    }

    /// Every delivery the store ever held, finished ones included.
    pub fn ever_delivered(&self) -> &BTreeSet<DeliveryId> {
        &self.ever_delivered
    }

    /// Every incident, open and resolved, by id.
    pub fn incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values()
    }

    /// One incident, open or resolved.
    pub fn incident(&self, id: u64) -> Option<&Incident> {
        self.incidents.get(&id)
    }

    /// The incidents still open, by id.
    pub fn open_incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values().filter(|i| i.resolved_at.is_none())
    }

    /// The highest lease token a stored run ever held.
    pub fn max_token(&self) -> Option<FencingToken> {
        self.max_token
    }

    /// The durable counters.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// How many batches were applied.
    pub fn batches_applied(&self) -> u64 {
        self.batches_applied
    }

    /// How many history prunes were written (executed or, keeping history, only counted).
    pub fn prunes(&self) -> u64 {
        self.prunes
    }

    fn apply_record(&mut self, record: Record) {
        match record {
            Record::PutJob(job) => {
                if self.core_properties {
                    check_cursor(&job);
                }
                self.jobs
                    .insert(job.spec.id.clone(), Arc::unwrap_or_clone(job));
            }
            // A job added again under a deleted job's name inherits its fired slots through the
            // tombstone, so slot claims (and `fired`) outlive the job record.
            Record::DeleteJob { id } => {
                self.jobs.remove(&id);
            }
            Record::PutTombstone(tombstone) => {
                self.tombstones.insert(tombstone.job.clone(), tombstone);
            }
            Record::DeleteTombstone { job } => {
                self.tombstones.remove(&job);
            }
            Record::PutDelivery(delivery) => {
                self.ever_delivered.insert(delivery.id);
                self.deliveries.insert(delivery.id, delivery);
            }
            Record::DeleteDelivery { id } => {
                self.deliveries.remove(&id);
            }
            Record::PutIncident(incident) => self.put_incident(incident),
            Record::PutRun(run) => self.put_run(run),
            Record::Audit(entry) => {
                if let Some(old) = self.audit.get(&entry.seq) {
                    assert_eq!(
                        old, &entry,
                        "audit seq {} reused for another record",
                        entry.seq
                    );
                }
                self.audit.insert(entry.seq, entry);
            }
            Record::PruneHistory {
                job,
                keep_last,
                finished_before,
            } => {
                self.prunes += 1;
                if self.prune {
                    self.execute_prune(job.as_ref(), keep_last, finished_before);
                }
            }
            Record::PutMeta(meta) => {
                let old = self.meta;
                assert!(
                    meta.next_run_id >= old.next_run_id
                        && meta.next_audit_seq >= old.next_audit_seq
                        && meta.next_token >= old.next_token
                        && meta.next_incident >= old.next_incident
                        && meta.next_delivery >= old.next_delivery,
                    "durable counters went backwards: {old:?} -> {meta:?}"
                );
                self.meta = meta;
            }
        }
    }

    fn put_run(&mut self, run: Run) {
        if let Some(old) = self.runs.get(&run.id()) {
            check_run_update(old, &run);
        }
        if self.core_properties {
            check_run_budgets(&run);
        }
        if let Some(slot) = run.slot().filter(|_| self.core_properties) {
            let first = *self
                .fired
                .entry((run.job().clone(), slot))
                .or_insert(run.id());
            assert_eq!(
                first,
                run.id(),
                "SPEC S6: slot {slot} of job {} fired twice: {first} and {}",
                run.job(),
                run.id()
            );
        }
        if let Some(slot) = run.slot() {
            self.slots.insert((run.job().clone(), slot), run.id());
        }
        if let Some(lease) = run.lease() {
            self.max_token = self.max_token.max(Some(lease.token));
        }
        self.runs.insert(run.id(), run);
    }

    /// An incident is written when it opens and when it resolves: its identity never changes,
    /// and a resolved incident stays resolved.
    fn put_incident(&mut self, incident: Incident) {
        if let Some(old) = self.incidents.get(&incident.id) {
            let identity =
                |i: &Incident| (i.kind, i.opened_at, i.job.clone(), i.run, i.worker.clone());
            assert!(
                identity(old) == identity(&incident),
                "incident id {} reused: stored {old:?}, now {incident:?}",
                incident.id
            );
            assert!(
                old.resolved_at.is_none() || old == &incident,
                "resolved incident {} changed: stored {old:?}, now {incident:?}",
                incident.id
            );
        }
        if let Some(resolved) = incident.resolved_at {
            assert!(
                resolved >= incident.opened_at,
                "incident {} resolved before it opened",
                incident.id
            );
        }
        self.incidents.insert(incident.id, incident);
    }

    fn execute_prune(&mut self, job: Option<&JobId>, keep_last: u32, finished_before: Timestamp) {
        let mut per_job: BTreeMap<&JobId, Vec<(Timestamp, RunId)>> = BTreeMap::new();
        for run in self.runs.values() {
            if job.is_some_and(|j| j != run.job()) {
                continue;
            }
            if let Some(finished) = run.finished_at().filter(|_| run.state().is_terminal()) {
                per_job
                    .entry(run.job())
                    .or_default()
                    .push((finished, run.id()));
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
            let Some(run) = self.runs.remove(&id) else {
                continue;
            };
            self.audit.retain(|_, a| a.run != Some(id));
            // The claim goes with the run; `fired` still remembers the slot.
            if let Some(slot) = run.slot() {
                let key = (run.job().clone(), slot);
                if self.slots.get(&key) == Some(&id) {
                    self.slots.remove(&key);
                }
            }
        }
    }
}

/// What a real store writes and reads back: the serde form, not the Rust value. It must read
/// back equal to the record's stored form (`Record::into_stored`): keel-store-fs no longer
/// decodes each frame back on its write path, and relies on this, which every test and
/// fuzz-corpus replay driving the core through this model store checks.
fn round_trip(record: &Record) -> Record {
    let text = serde_json::to_string(record).expect("a record serialises");
    let read: Record = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("record does not deserialise: {e}\n{text}"));
    assert!(
        read == record.clone().into_stored(),
        "record does not read back equal:\n{text}"
    );
    read
}

/// Every id and token a record stores is below its durable counter, as written in the same
/// batch: a restart allocates from the counters, so it could otherwise hand one out again.
fn check_counters(record: &Record, counters: &Meta) {
    match record {
        Record::PutRun(run) => {
            assert!(
                run.id().0 < counters.next_run_id,
                "{} persisted without a counter above it",
                run.id()
            );
            if let Some(lease) = run.lease() {
                assert!(
                    lease.token.0 < counters.next_token,
                    "{} persisted with {} without a token counter above it",
                    run.id(),
                    lease.token
                );
            }
        }
        Record::Audit(record) => assert!(
            record.seq < counters.next_audit_seq,
            "audit seq {} persisted without a counter above it",
            record.seq
        ),
        Record::PutIncident(incident) => assert!(
            incident.id < counters.next_incident,
            "incident {} persisted without a counter above it",
            incident.id
        ),
        Record::PutDelivery(delivery) => assert!(
            delivery.id.0 < counters.next_delivery,
            "{} persisted without a counter above it",
            delivery.id
        ),
        _ => {}
    }
}

/// A scheduled job's cursor is after the last slot it fired.
fn check_cursor(job: &Job) {
    if let (JobState::Scheduled { next }, Some(last)) = (&job.state, job.last_fired) {
        assert!(
            *next > last,
            "persisted job {}: cursor {next} not after last fired {last}",
            job.spec.id
        );
    }
}

/// What may change when a stored run is written again.
fn check_run_update(old: &Run, run: &Run) {
    assert!(
        !old.state().is_terminal() || old == run,
        "terminal {} changed in the store:\nwas {old:?}\nnow {run:?}",
        run.id()
    );
    assert!(
        old.job() == run.job()
            && old.trigger() == run.trigger()
            && old.created_at() == run.created_at(),
        "run id {} reused: stored {old:?}, now {run:?}",
        run.id()
    );
    assert!(
        run.attempt() >= old.attempt(),
        "{} attempt went back from {} to {}",
        run.id(),
        old.attempt(),
        run.attempt()
    );
    // SPEC W1: the extension flag is persisted with the run and never cleared, so a restart
    // cannot grant a second extension.
    assert!(
        !old.extended() || run.extended(),
        "{} lost its durable extension flag",
        run.id()
    );
    // SPEC W2: a kill is sticky, in the store too.
    assert!(
        run.killed() >= old.killed(),
        "{} was killed ({:?}) but is stored with killed {:?}",
        run.id(),
        old.killed(),
        run.killed()
    );
}

/// The poison verdict (no run loops forever) and what a terminal run keeps.
fn check_run_budgets(run: &Run) {
    assert!(
        run.state().is_terminal() || run.lost() < run.retry().lost_attempts_max,
        "{} stored active with {} lost attempts (budget {})",
        run.id(),
        run.lost(),
        run.retry().lost_attempts_max
    );
    // An attempt a shutdown stops uses no attempt (SPEC O1), like a snooze.
    let budget = run
        .retry()
        .attempts_max
        .saturating_add(run.lost())
        .saturating_add(run.snoozes())
        .saturating_add(run.shutdowns());
    assert!(
        run.attempt().0 <= budget,
        "{} stored with attempt {}, above attempts_max {} + lost {} + snoozes {} + shutdowns {}",
        run.id(),
        run.attempt(),
        run.retry().attempts_max,
        run.lost(),
        run.snoozes(),
        run.shutdowns()
    );
    // SPEC C2: completion and terminal failure delete the checkpoint (an interrupted or poison
    // run keeps it).
    let poison = run
        .last_error()
        .as_ref()
        .is_some_and(|e| e.kind == ErrorKind::Poison);
    assert!(
        !run.state().is_terminal()
            || run.state() == RunState::Interrupted
            || poison
            || run.checkpoint().is_none(),
        "terminal {} ({:?}) stored with a checkpoint",
        run.id(),
        run.state()
    );
    assert!(
        !run.state().is_terminal()
            || run.state() == RunState::Succeeded
            || run.last_error().is_some(),
        "SPEC R4: terminal {} ({:?}) stored without its last error",
        run.id(),
        run.state()
    );
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
    /// An empty store that checks every property of [`MemStore::new`].
    pub fn new() -> Self {
        SharedMemStore::default()
    }

    /// An empty store that checks only the store's own rules ([`MemStore::store_rules_only`]):
    /// for tests that write hand-made batches, such as the conformance suite.
    pub fn store_rules_only() -> Self {
        SharedMemStore {
            inner: Arc::new(Mutex::new(MemStore::store_rules_only())),
        }
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

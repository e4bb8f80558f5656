//! The stored state in memory: what replaying the snapshot and the logs builds, record by
//! record, with the same semantics as the simulator's `MemStore`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use keel_core::outbox::{Delivery, DeliveryId};
use keel_core::store::StoredView;
use keel_core::Tombstone;
use keel_core::{AuditRecord, Incident, Job, JobId, Meta, Record, Run, RunId, Snapshot, Timestamp};

use crate::format::{
    write_snapshot_frame, SlotClaim, SnapshotError, SnapshotFrame, SnapshotFrameRef,
    SnapshotHeader, SnapshotReader,
};

/// Snapshots from this size on are decoded and built on two threads (`State::read_snapshot`).
pub(crate) const PIPELINE_MIN_BYTES: u64 = 8 << 20;

/// Items handed from the decoding thread to the building one at a time.
const PIPELINE_CHUNK: usize = 1024;

/// Everything the store holds.
///
/// The maps are persistent (`imbl`'s B-trees with shared nodes): a clone is O(1) and copies
/// nodes only as either side changes them, so a compaction takes a frozen copy of the state
/// under the lock and writes it in the background (see the module docs' Compaction), and a
/// read answers from one after releasing the lock (`FsStore::read_frozen`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct State {
    /// Jobs, runs and audit records behind `Arc`: a node of these maps that a frozen copy
    /// still shares (a compaction's snapshot, being written) is copied on its first change,
    /// and copying it then costs a pointer per entry, not a deep copy of every record in it.
    pub(crate) jobs: OrdMap<JobId, Arc<Job>>,
    pub(crate) runs: OrdMap<RunId, Arc<Run>>,
    pub(crate) audit: OrdMap<u64, Arc<AuditRecord>>,
    /// The slot claim of every stored run that has a slot: a slot fires once (SPEC S6). A
    /// claim goes with its run when the history policy prunes it; the job's cursor (and its
    /// tombstone once deleted) is what keeps a pruned slot from firing again.
    pub(crate) slots: OrdMap<(JobId, Timestamp), RunId>,
    pub(crate) tombstones: OrdMap<JobId, Tombstone>,
    pub(crate) incidents: OrdMap<u64, Incident>,
    pub(crate) deliveries: OrdMap<DeliveryId, Delivery>,
    pub(crate) meta: Meta,
    /// The epoch whose batches are accepted (0 until the first `restore`).
    pub(crate) writer_epoch: u64,
    /// Derived indexes, kept in step by `insert_run`, `remove_run` and `insert_audit` so that
    /// a prune and a job's history cost what they touch, not the size of the store.
    pub(crate) index: Index,
}

/// Indexes derived from `runs` and `audit`; never written, rebuilt as a snapshot loads.
///
/// Each is one flat set of composite keys, read by key prefix (one job's runs are the range
/// `(job, RunId(0))..=(job, RunId(u64::MAX))`), not a map of small sets: a B-tree node of
/// `imbl` holds room for 16 keys however few it has, so a set per job and one per run cost
/// 150–300 bytes each for the one to three keys most of them hold, about a fifth of the memory
/// a firing added (`docs/performance.md`, *Issue 16, sixth step*).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Index {
    /// Every stored run of each job.
    runs_of_job: OrdSet<(JobId, RunId)>,
    /// The runs that are not terminal: what `restore` and `read` return.
    active: OrdSet<RunId>,
    /// The terminal runs of each job, by finish time: what `PruneHistory` chooses from.
    finished: OrdSet<(JobId, Timestamp, RunId)>,
    /// The audit records of each run.
    audit_of_run: OrdSet<(RunId, u64)>,
}

impl Index {
    /// One job's runs, oldest id first, below `before` if given.
    pub(crate) fn runs_of_job<'a>(
        &'a self,
        job: &JobId,
        before: Option<RunId>,
    ) -> impl DoubleEndedIterator<Item = RunId> + 'a {
        let upper = before.map_or(Bound::Included((job.clone(), RunId(u64::MAX))), |before| {
            Bound::Excluded((job.clone(), before))
        });
        self.runs_of_job
            .range((Bound::Included((job.clone(), RunId(0))), upper))
            .map(|(_, id)| *id)
    }
}

impl State {
    /// Applies records in order. Every record is an upsert or a delete, so applying cannot
    /// fail; whether a batch *may* be applied is `check_batch`'s decision, made before.
    pub(crate) fn apply(&mut self, records: &[Record]) {
        for record in records {
            self.apply_record(record.clone());
        }
    }

    /// [`State::apply`], moving the records into the maps instead of copying them: the write
    /// path owns its batch, so a firing's job, runs and audit records are not cloned again.
    /// The records are kept in the form they read back in (`Record::into_stored`), so memory
    /// equals what a replay of the log builds.
    pub(crate) fn apply_owned(&mut self, records: Vec<Record>) {
        for record in records {
            self.apply_record(record.into_stored());
        }
    }

    /// What `restore` and `read` return: every job, the runs that are not terminal, the
    /// counters, the tombstones, the open incidents and the outbox.
    ///
    /// `Job::active_runs` is not persisted (`Scheduler::restore` derives it from the runs);
    /// it is filled in here the same way, the count of the job's stored runs that are not
    /// terminal, so that readers see a true value rather than 0.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let runs: Vec<Run> = self
            .index
            .active
            .iter()
            .filter_map(|id| self.runs.get(id))
            .map(|run| Run::clone(run))
            .collect();
        let mut active: BTreeMap<&JobId, u32> = BTreeMap::new();
        for run in &runs {
            let count = active.entry(run.job()).or_default();
            *count = count.saturating_add(1);
        }
        let jobs = self
            .jobs
            .values()
            .map(|job| {
                let mut job = Job::clone(job);
                job.active_runs = active.get(&job.spec.id).copied().unwrap_or(0);
                job
            })
            .collect();
        Snapshot {
            jobs,
            runs,
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

    /// Writes the whole state as the snapshot that starts `generation`.
    /// `previous_log_len` is how long the log the state was read from is (see
    /// [`SnapshotHeader::previous_log_len`]).
    pub(crate) fn write_snapshot(
        &self,
        out: &mut impl Write,
        generation: u64,
        previous_log_len: Option<u64>,
    ) -> io::Result<()> {
        let header = SnapshotHeader {
            generation,
            writer_epoch: self.writer_epoch,
            meta: self.meta,
            previous_log_len,
        };
        write_snapshot_frame(out, &SnapshotFrameRef::Begin(&header))?;
        let mut items = 0u64;
        let mut write = |frame: SnapshotFrameRef<'_>| {
            items += 1;
            write_snapshot_frame(out, &frame)
        };
        for job in self.jobs.values() {
            write(SnapshotFrameRef::Job(job))?;
        }
        for run in self.runs.values() {
            write(SnapshotFrameRef::Run(run))?;
        }
        for record in self.audit.values() {
            write(SnapshotFrameRef::Audit(record))?;
        }
        for ((job, slot), run) in &self.slots {
            let claim = SlotClaim {
                job: job.clone(),
                slot: *slot,
                run: *run,
            };
            write(SnapshotFrameRef::Slot(&claim))?;
        }
        for tombstone in self.tombstones.values() {
            write(SnapshotFrameRef::Tombstone(tombstone))?;
        }
        for incident in self.incidents.values() {
            write(SnapshotFrameRef::Incident(incident))?;
        }
        for delivery in self.deliveries.values() {
            write(SnapshotFrameRef::Delivery(delivery))?;
        }
        write_snapshot_frame(out, &SnapshotFrameRef::End { items })
    }

    /// Reads the snapshot that starts `generation` from `reader` (which holds `len` bytes).
    pub(crate) fn read_snapshot(
        reader: impl Read,
        len: u64,
        generation: u64,
    ) -> Result<State, SnapshotError> {
        State::read_snapshot_with_header(reader, len, generation).map(|(state, _)| state)
    }

    /// Like [`State::read_snapshot`], and also returns the snapshot's header.
    pub(crate) fn read_snapshot_with_header(
        reader: impl Read,
        len: u64,
        generation: u64,
    ) -> Result<(State, SnapshotHeader), SnapshotError> {
        let mut snapshot = SnapshotReader::new(reader, len);
        let header = snapshot.header()?.clone();
        if header.generation != generation {
            return Err(SnapshotError::Structure {
                offset: 0,
                detail: format!(
                    "the snapshot says it starts generation {}, its name says {generation}",
                    header.generation
                ),
            });
        }
        let (meta, writer_epoch) = (header.meta, header.writer_epoch);
        let empty = move || State {
            meta,
            writer_epoch,
            ..State::default()
        };
        if len < PIPELINE_MIN_BYTES {
            return Ok((empty().read_items(&mut snapshot)?, header));
        }
        // Decoding (checksums and JSON) takes about as long as building the maps: a large
        // snapshot is decoded here while a second thread builds, in chunks, so that a store
        // of a million history records opens in the time of the longer half, not of both.
        let state = std::thread::scope(|scope| {
            let (chunks, received) = std::sync::mpsc::sync_channel::<Vec<SnapshotFrame>>(4);
            let builder = std::thread::Builder::new()
                .name("keel-store-fs-load".into())
                .spawn_scoped(scope, move || {
                    let mut state = empty();
                    for chunk in received {
                        for item in chunk {
                            state.insert_item(item);
                        }
                    }
                    state
                });
            let Ok(builder) = builder else {
                // No second thread: decode and build on this one.
                return empty().read_items(&mut snapshot);
            };
            let mut chunk = Vec::with_capacity(PIPELINE_CHUNK);
            let decoded = loop {
                match snapshot.next_item() {
                    Ok(Some(item)) => {
                        chunk.push(item);
                        if chunk.len() == PIPELINE_CHUNK {
                            let full =
                                std::mem::replace(&mut chunk, Vec::with_capacity(PIPELINE_CHUNK));
                            if chunks.send(full).is_err() {
                                break Ok(()); // the builder is gone: its join says why
                            }
                        }
                    }
                    Ok(None) => {
                        let _ = chunks.send(chunk);
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                }
            };
            drop(chunks);
            let state = builder
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            decoded.map(|()| state)
        })?;
        Ok((state, header))
    }

    /// Adds the rest of `snapshot`'s items, decoded and built on this thread.
    fn read_items<R: Read>(
        mut self,
        snapshot: &mut SnapshotReader<R>,
    ) -> Result<State, SnapshotError> {
        while let Some(item) = snapshot.next_item()? {
            self.insert_item(item);
        }
        Ok(self)
    }

    /// Adds one item of a snapshot.
    fn insert_item(&mut self, item: SnapshotFrame) {
        match item {
            SnapshotFrame::Job(job) => {
                self.jobs.insert(job.spec.id.clone(), Arc::new(job));
            }
            SnapshotFrame::Run(run) => self.insert_run(run),
            SnapshotFrame::Audit(record) => self.insert_audit(record),
            // Runs come before claims in a snapshot. Stores written before claims went
            // with their runs hold the claims of pruned runs too: those are left behind
            // here, so the next compaction writes them no more.
            SnapshotFrame::Slot(claim) => {
                if self.runs.contains_key(&claim.run) {
                    self.slots.insert((claim.job, claim.slot), claim.run);
                }
            }
            SnapshotFrame::Tombstone(tombstone) => {
                self.tombstones.insert(tombstone.job.clone(), tombstone);
            }
            SnapshotFrame::Incident(incident) => {
                self.incidents.insert(incident.id, incident);
            }
            SnapshotFrame::Delivery(delivery) => {
                self.deliveries.insert(delivery.id, delivery);
            }
            // The reader only returns items.
            SnapshotFrame::Begin(_) | SnapshotFrame::End { .. } => {}
        }
    }

    fn apply_record(&mut self, record: Record) {
        match record {
            // The scheduler's own allocation, shared (see `Record::PutJob`).
            Record::PutJob(job) => {
                self.jobs.insert(job.spec.id.clone(), job);
            }
            // The job's runs, audit and slot claims stay: history outlives the definition.
            Record::DeleteJob { id } => {
                self.jobs.remove(&id);
            }
            Record::PutRun(run) => {
                if let Some(slot) = run.slot() {
                    self.slots.insert((run.job().clone(), slot), run.id());
                }
                self.insert_run(run);
            }
            Record::Audit(record) => self.insert_audit(record),
            Record::PruneHistory {
                job,
                keep_last,
                finished_before,
            } => self.prune(job.as_ref(), keep_last, finished_before),
            Record::PutMeta(meta) => self.meta = meta,
            Record::PutTombstone(tombstone) => {
                self.tombstones.insert(tombstone.job.clone(), tombstone);
            }
            Record::DeleteTombstone { job } => {
                self.tombstones.remove(&job);
            }
            Record::PutIncident(incident) => {
                self.incidents.insert(incident.id, incident);
            }
            Record::PutDelivery(delivery) => {
                self.deliveries.insert(delivery.id, delivery);
            }
            Record::DeleteDelivery { id } => {
                self.deliveries.remove(&id);
            }
        }
    }

    /// Deletes terminal runs the history policy no longer keeps, with their audit records:
    /// per job, all but the newest `keep_last` (by finish time, then id), and all finished
    /// before `finished_before`, each with its slot claim.
    /// Costs the jobs it looks at and the runs it deletes, through the `finished` index.
    fn prune(&mut self, job: Option<&JobId>, keep_last: u32, finished_before: Timestamp) {
        let mut doomed = Vec::new();
        let bounds = match job {
            Some(job) => (
                Bound::Included((job.clone(), Timestamp(i64::MIN), RunId(0))),
                Bound::Included((job.clone(), Timestamp(i64::MAX), RunId(u64::MAX))),
            ),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        // The set is ordered by job, then finish time: one job's terminal runs are
        // consecutive, oldest first.
        let mut group: Vec<(Timestamp, RunId)> = Vec::new();
        let mut current: Option<&JobId> = None;
        for (of, at, id) in self.index.finished.range(bounds) {
            if current != Some(of) {
                doom_prefix(&group, keep_last, finished_before, &mut doomed);
                group.clear();
                current = Some(of);
            }
            group.push((*at, *id));
        }
        doom_prefix(&group, keep_last, finished_before, &mut doomed);
        for id in doomed {
            self.remove_run(id);
        }
    }

    /// Inserts or replaces a run, keeping the indexes in step.
    fn insert_run(&mut self, run: Run) {
        let id = run.id();
        let finished = finished_key(&run);
        let active = !run.state().is_terminal();
        match self.runs.get(&id) {
            // A run's new state under the same job (every update a scheduler writes): its
            // place in `runs_of_job` stays, and only what changed moves.
            Some(old) if old.job() == run.job() => {
                let (was_finished, was_active) = (finished_key(old), !old.state().is_terminal());
                if was_finished != finished {
                    if let Some(key) = was_finished {
                        remove_finished(&mut self.index.finished, run.job(), &key);
                    }
                    if let Some(key) = finished {
                        insert_finished(&mut self.index.finished, run.job(), key);
                    }
                }
                if was_active && !active {
                    self.index.active.remove(&id);
                } else if active && !was_active {
                    self.index.active.insert(id);
                }
            }
            old => {
                if let Some(old) = old {
                    let (job, was_finished) = (old.job().clone(), finished_key(old));
                    self.unindex_run(id, &job, was_finished);
                }
                self.index.runs_of_job.insert((run.job().clone(), id));
                if let Some(key) = finished {
                    insert_finished(&mut self.index.finished, run.job(), key);
                }
                if active {
                    self.index.active.insert(id);
                }
            }
        }
        self.runs.insert(id, Arc::new(run));
    }

    /// Deletes a run with its audit records and its slot claim.
    fn remove_run(&mut self, id: RunId) {
        let Some(run) = self.runs.remove(&id) else {
            return;
        };
        let finished = finished_key(&run);
        self.unindex_run(id, run.job(), finished);
        if let Some(slot) = run.slot() {
            let key = (run.job().clone(), slot);
            if self.slots.get(&key) == Some(&id) {
                self.slots.remove(&key);
            }
        }
        let seqs: Vec<u64> = self
            .index
            .audit_of_run
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, seq)| *seq)
            .collect();
        for seq in seqs {
            self.index.audit_of_run.remove(&(id, seq));
            self.audit.remove(&seq);
        }
    }

    fn unindex_run(&mut self, id: RunId, job: &JobId, finished: Option<(Timestamp, RunId)>) {
        self.index.active.remove(&id);
        self.index.runs_of_job.remove(&(job.clone(), id));
        if let Some(key) = finished {
            remove_finished(&mut self.index.finished, job, &key);
        }
    }

    /// Inserts or replaces an audit record, keeping the per-run index in step.
    fn insert_audit(&mut self, record: AuditRecord) {
        if let Some(old_run) = self.audit.get(&record.seq).and_then(|old| old.run) {
            self.index.audit_of_run.remove(&(old_run, record.seq));
        }
        if let Some(run) = record.run {
            self.index.audit_of_run.insert((run, record.seq));
        }
        self.audit.insert(record.seq, Arc::new(record));
    }
}

/// Where a run sits in the `finished` index: terminal runs with a finish time, the ones
/// `PruneHistory` considers (as `MemStore` does).
/// Adds `key` to `job`'s terminal runs in [`Index::finished`].
fn insert_finished(
    finished: &mut OrdSet<(JobId, Timestamp, RunId)>,
    job: &JobId,
    (at, id): (Timestamp, RunId),
) {
    finished.insert((job.clone(), at, id));
}

/// Removes `key` from `job`'s terminal runs in [`Index::finished`].
fn remove_finished(
    finished: &mut OrdSet<(JobId, Timestamp, RunId)>,
    job: &JobId,
    &(at, id): &(Timestamp, RunId),
) {
    finished.remove(&(job.clone(), at, id));
}

/// Adds to `doomed` what the history policy deletes of one job's terminal runs, `finished`
/// (oldest first): a prefix, those beyond the newest `keep_last` and those finished before
/// the cut-off.
fn doom_prefix(
    finished: &[(Timestamp, RunId)],
    keep_last: u32,
    finished_before: Timestamp,
    doomed: &mut Vec<RunId>,
) {
    let beyond_kept = finished.len().saturating_sub(keep_last as usize);
    let too_old = finished
        .iter()
        .take_while(|(at, _)| *at < finished_before)
        .count();
    let cut = beyond_kept.max(too_old);
    doomed.extend(finished.iter().take(cut).map(|(_, id)| *id));
}

fn finished_key(run: &Run) -> Option<(Timestamp, RunId)> {
    run.finished_at()
        .filter(|_| run.state().is_terminal())
        .map(|at| (at, run.id()))
}

impl StoredView for State {
    fn writer_epoch(&self) -> u64 {
        self.writer_epoch
    }

    fn stored_run(&self, id: RunId) -> Option<Run> {
        self.runs.get(&id).map(|run| Run::clone(run))
    }

    fn slot_owner(&self, job: &JobId, slot: Timestamp) -> Option<RunId> {
        self.slots.get(&(job.clone(), slot)).copied()
    }
}

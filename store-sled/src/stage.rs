//! Applying a batch: the writes it stages, and the stored state the write rules see.
//!
//! sled transactions can read and write keys but cannot iterate, and a plain sled read or scan
//! inside a transaction closure would deadlock (sled 0.34 holds a process-wide write lock for
//! the whole closure, and plain reads take its read side). `PruneHistory` needs scans, so a
//! batch is applied in two steps:
//!
//! 1. [`Stage::build`] applies every record, in order, to an in-memory overlay of the committed
//!    trees: reads see the overlay first, scans merge it in. The result is a write set.
//! 2. The store's transaction checks the write rules against what is stored at that moment
//!    ([`Prefetched`] reads what `check_batch` needs through the transaction) and writes the
//!    write set.
//!
//! The write set is only right if nothing was committed between the two steps. The store
//! guarantees that with a mutex around `apply` (sled's directory lock keeps other processes
//! out), and checks it anyway with a stamp that every applied batch increments.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use keel_core::store::StoredView;
use keel_core::{AuditRecord, Batch, JobId, Record, Run, RunId, StoreError, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::IVec;

use crate::keys::{
    corrupt, finished_key, id_key, job_prefix, parse_finished_key, parse_run_audit_key,
    run_audit_key, slot_key, TreeId, META_META, META_WRITER_EPOCH, TREES,
};

/// The store's trees, indexed by [`TreeId::index`].
pub(crate) type Trees = [sled::Tree; TREES];

/// Staged writes per tree: `Some(value)` to insert, `None` to remove.
pub(crate) type Writes = [BTreeMap<Vec<u8>, Option<Vec<u8>>>; TREES];

/// The write set of one batch, built against the committed trees. (Not `Debug`: sled's
/// `Debug` for a tree prints every key and value in it.)
pub(crate) struct Stage<'a> {
    trees: &'a Trees,
    writes: Writes,
}

impl<'a> Stage<'a> {
    /// Applies every record of `batch`, in order, with the semantics of keel's reference store
    /// (`keel_testkit::MemStore`), and returns the writes that do it.
    pub(crate) fn build(trees: &'a Trees, batch: &Batch) -> Result<Self, StoreError> {
        let mut stage = Stage {
            trees,
            writes: std::array::from_fn(|_| BTreeMap::new()),
        };
        for record in &batch.records {
            stage.apply(record)?;
        }
        Ok(stage)
    }

    /// The staged writes.
    pub(crate) fn writes(&self) -> &Writes {
        &self.writes
    }

    fn apply(&mut self, record: &Record) -> Result<(), StoreError> {
        match record {
            Record::PutJob(job) => self.put_json(TreeId::Jobs, job_key(&job.spec.id), job),
            // The job's runs and slot claims stay: history is pruned by policy, and a job
            // added again under the name inherits its cursor from the tombstone.
            Record::DeleteJob { id } => {
                self.remove(TreeId::Jobs, job_key(id));
                Ok(())
            }
            Record::PutTombstone(tombstone) => {
                self.put_json(TreeId::Tombstones, job_key(&tombstone.job), tombstone)
            }
            Record::DeleteTombstone { job } => {
                self.remove(TreeId::Tombstones, job_key(job));
                Ok(())
            }
            Record::PutDelivery(delivery) => {
                self.put_json(TreeId::Deliveries, id_key(delivery.id.0).to_vec(), delivery)
            }
            Record::DeleteDelivery { id } => {
                self.remove(TreeId::Deliveries, id_key(id.0).to_vec());
                Ok(())
            }
            Record::PutIncident(incident) => {
                self.put_json(TreeId::Incidents, id_key(incident.id).to_vec(), incident)
            }
            Record::PutRun(run) => self.put_run(run),
            Record::Audit(entry) => self.put_audit(entry),
            Record::PruneHistory {
                job,
                keep_last,
                finished_before,
            } => self.prune(job.as_ref(), *keep_last, *finished_before),
            Record::PutMeta(meta) => self.put_json(TreeId::Meta, META_META.to_vec(), meta),
        }
    }

    /// Writes a run and keeps its slot claim and the indexes in step with it.
    fn put_run(&mut self, run: &Run) -> Result<(), StoreError> {
        let key = id_key(run.id().0).to_vec();
        if let Some(bytes) = self.get(TreeId::Runs, &key)? {
            let old: Run = decode(TreeId::Runs, &key, &bytes)?;
            if let Some(old_key) = finished_index_key(&old) {
                self.remove(TreeId::Finished, old_key);
            }
        }
        if let Some(slot) = run.slot() {
            self.put_json(TreeId::Slots, slot_key(run.job(), slot), &run.id())?;
        }
        if let Some(new_key) = finished_index_key(run) {
            self.put(TreeId::Finished, new_key, Vec::new());
        }
        if run.state().is_terminal() {
            self.remove(TreeId::Active, key.clone());
        } else {
            self.put(TreeId::Active, key.clone(), Vec::new());
        }
        self.put_json(TreeId::Runs, key, run)
    }

    /// Writes an audit record (an upsert by `seq`) and indexes it under its run.
    fn put_audit(&mut self, entry: &AuditRecord) -> Result<(), StoreError> {
        // A record that replaces one of another run leaves that run's index entry behind;
        // `delete_run` checks the owner before it deletes, so the stale entry is harmless.
        if let Some(run) = entry.run {
            self.put(
                TreeId::RunAudit,
                run_audit_key(run, entry.seq).to_vec(),
                Vec::new(),
            );
        }
        self.put_json(TreeId::Audit, id_key(entry.seq).to_vec(), entry)
    }

    /// For `job` (or every job), deletes all but the newest `keep_last` terminal runs and every
    /// terminal run finished before `finished_before`, with their audit records. Newest means
    /// latest `finished_at`, then highest id. Each goes with its slot claim.
    fn prune(
        &mut self,
        job: Option<&JobId>,
        keep_last: u32,
        finished_before: Timestamp,
    ) -> Result<(), StoreError> {
        let keep_last = usize::try_from(keep_last).unwrap_or(usize::MAX);
        let prefix = job.map(job_prefix).unwrap_or_default();
        let keys = self.keys_with_prefix(TreeId::Finished, &prefix)?;
        // Index keys sort by job, then finish time, then run id: walked backwards, each job's
        // terminal runs come newest first.
        let mut doomed = Vec::new();
        let mut current: Option<&[u8]> = None;
        let mut newer = 0;
        for key in keys.iter().rev() {
            let Some((job, finished_at, run)) = parse_finished_key(key) else {
                return Err(corrupt(
                    TreeId::Finished,
                    key,
                    "not an index key of a terminal run",
                ));
            };
            if current != Some(job) {
                current = Some(job);
                newer = 0;
            }
            if newer >= keep_last || finished_at < finished_before {
                doomed.push((run, key.clone()));
            }
            newer += 1;
        }
        for (run, index_key) in doomed {
            self.delete_run(run, index_key)?;
        }
        Ok(())
    }

    /// Deletes a terminal run, its index entry, its slot claim and its audit records.
    fn delete_run(&mut self, run: RunId, index_key: Vec<u8>) -> Result<(), StoreError> {
        let key = id_key(run.0).to_vec();
        if let Some(bytes) = self.get(TreeId::Runs, &key)? {
            let stored: Run = decode(TreeId::Runs, &key, &bytes)?;
            if let Some(slot) = stored.slot() {
                let claim = slot_key(stored.job(), slot);
                let owner = self.get(TreeId::Slots, &claim)?;
                let owned = owner.is_some_and(|bytes| {
                    serde_json::from_slice::<RunId>(&bytes).is_ok_and(|owner| owner == run)
                });
                if owned {
                    self.remove(TreeId::Slots, claim);
                }
            }
        }
        self.remove(TreeId::Runs, key);
        self.remove(TreeId::Finished, index_key);
        for key in self.keys_with_prefix(TreeId::RunAudit, &id_key(run.0))? {
            let Some(seq) = parse_run_audit_key(&key) else {
                return Err(corrupt(
                    TreeId::RunAudit,
                    &key,
                    "not an index key of an audit record",
                ));
            };
            self.remove(TreeId::RunAudit, key);
            let audit_key = id_key(seq).to_vec();
            let Some(bytes) = self.get(TreeId::Audit, &audit_key)? else {
                continue;
            };
            // Keep a record that reused the seq for something else; an undecodable one listed
            // under this run goes with it.
            let owned_elsewhere = serde_json::from_slice::<AuditRecord>(&bytes)
                .is_ok_and(|record| record.run != Some(run));
            if !owned_elsewhere {
                self.remove(TreeId::Audit, audit_key);
            }
        }
        Ok(())
    }

    /// The value at `key`, staged or committed.
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(staged) = self.writes[tree.index()].get(key) {
            return Ok(staged.clone());
        }
        let committed = self.trees[tree.index()].get(key).map_err(sled_error)?;
        Ok(committed.map(|value| value.to_vec()))
    }

    /// Every key starting with `prefix`, staged or committed and not staged for removal, in
    /// ascending order.
    fn keys_with_prefix(&self, tree: TreeId, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = BTreeSet::new();
        for item in self.trees[tree.index()].scan_prefix(prefix) {
            let (key, _) = item.map_err(sled_error)?;
            keys.insert(key.to_vec());
        }
        for (key, value) in self.writes[tree.index()].range(prefix.to_vec()..) {
            if !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(_) => keys.insert(key.clone()),
                None => keys.remove(key),
            };
        }
        Ok(keys.into_iter().collect())
    }

    fn put_json(
        &mut self,
        tree: TreeId,
        key: Vec<u8>,
        value: &impl Serialize,
    ) -> Result<(), StoreError> {
        let bytes = encode(value)?;
        self.put(tree, key, bytes);
        Ok(())
    }

    fn put(&mut self, tree: TreeId, key: Vec<u8>, value: Vec<u8>) {
        self.writes[tree.index()].insert(key, Some(value));
    }

    fn remove(&mut self, tree: TreeId, key: Vec<u8>) {
        self.writes[tree.index()].insert(key, None);
    }
}

/// What [`keel_core::store::check_batch`] needs of the stored state for one batch, read up
/// front: the writer epoch, every run the batch writes and every slot it claims.
#[derive(Debug)]
pub(crate) struct Prefetched {
    writer_epoch: u64,
    runs: BTreeMap<RunId, Option<Run>>,
    slots: BTreeMap<(JobId, Timestamp), Option<RunId>>,
}

impl Prefetched {
    /// Reads through `get`: a transaction's trees, or the committed ones.
    pub(crate) fn load(
        batch: &Batch,
        get: impl Fn(TreeId, &[u8]) -> Result<Option<IVec>, StoreError>,
    ) -> Result<Self, StoreError> {
        let writer_epoch = get(TreeId::Meta, META_WRITER_EPOCH)?
            .map(|bytes| decode(TreeId::Meta, META_WRITER_EPOCH, &bytes))
            .transpose()?
            .unwrap_or(0);
        let mut runs = BTreeMap::new();
        let mut slots = BTreeMap::new();
        for record in &batch.records {
            let Record::PutRun(run) = record else {
                continue;
            };
            if let Entry::Vacant(entry) = runs.entry(run.id()) {
                let key = id_key(run.id().0);
                let stored = get(TreeId::Runs, &key)?
                    .map(|bytes| decode::<Run>(TreeId::Runs, &key, &bytes))
                    .transpose()?;
                entry.insert(stored);
            }
            let Some(slot) = run.slot() else {
                continue;
            };
            if let Entry::Vacant(entry) = slots.entry((run.job().clone(), slot)) {
                let key = slot_key(run.job(), slot);
                let owner = get(TreeId::Slots, &key)?
                    .map(|bytes| decode::<RunId>(TreeId::Slots, &key, &bytes))
                    .transpose()?;
                entry.insert(owner);
            }
        }
        Ok(Prefetched {
            writer_epoch,
            runs,
            slots,
        })
    }
}

impl StoredView for Prefetched {
    fn writer_epoch(&self) -> u64 {
        self.writer_epoch
    }

    fn stored_run(&self, id: RunId) -> Option<Run> {
        self.runs.get(&id).cloned().flatten()
    }

    fn slot_owner(&self, job: &JobId, slot: Timestamp) -> Option<RunId> {
        self.slots.get(&(job.clone(), slot)).copied().flatten()
    }
}

/// Decodes the JSON value stored at `key` of `tree`.
pub(crate) fn decode<T: DeserializeOwned>(
    tree: TreeId,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(tree, key, format!("undecodable value: {e}")))
}

/// Encodes a value as JSON.
pub(crate) fn encode(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    // keel's records serialise to JSON by construction; a failure is a bug, reported as a
    // failed write rather than a panic.
    serde_json::to_vec(value).map_err(|e| StoreError::Io(format!("cannot encode a record: {e}")))
}

/// A sled failure as a store error.
pub(crate) fn sled_error(error: sled::Error) -> StoreError {
    match error {
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            location: match at {
                Some(at) => format!("sled log at {at:?}"),
                None => "sled log".to_owned(),
            },
            detail: "sled found corrupt data".to_owned(),
        },
        other => StoreError::Io(format!("sled: {other}")),
    }
}

fn job_key(job: &JobId) -> Vec<u8> {
    job.as_str().as_bytes().to_vec()
}

/// The [`TreeId::Finished`] key of a run, if it is terminal and has finished.
fn finished_index_key(run: &Run) -> Option<Vec<u8>> {
    let finished_at = run.finished_at().filter(|_| run.state().is_terminal())?;
    Some(finished_key(run.job(), finished_at, run.id()))
}

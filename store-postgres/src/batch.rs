//! How a batch's records become a few multi-row statements instead of one statement each.
//!
//! Each statement is one round trip to the server, and a firing's batch of ~13 records cost
//! ~17 of them. [`plan`] groups the records into [`Phase`]s: the writes of a phase are one
//! statement (every table, every row, through `unnest` of one array per column), then its
//! prunes are one more. The result is the one that applying the records one by one, in order,
//! would give, because records are only ever moved past records they commute with:
//!
//! - two writes of the **same key** keep their order: the later one lands in the same phase or
//!   a later one, and within a phase only the last write of a key is kept (every write replaces
//!   the whole row, or deletes it);
//! - a write and a **prune that may touch it** keep their order: a prune deletes terminal runs
//!   of its job (or of every job) and the audit records of the runs it deletes, so it touches a
//!   `PutRun` of a run written under its job in this batch, and an `Audit` of such a run or of
//!   a run the batch does not write at all (its job is unknown here, so it is assumed to be the
//!   prune's); it touches nothing else;
//! - two prunes keep their order if they may touch the same runs (the same job, or either is
//!   for every job).
//!
//! Everything else commutes, so a batch whose records are grouped per job, each job's prune
//! after its runs (the scheduler's batches), is one phase: one statement for the writes, one
//! for the prunes, whatever the number of records.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use keel_core::{JobId, Record, Run, RunId, StoreError};
use tokio_postgres::types::ToSql;

use crate::{encode, int};

/// One `keel_runs` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RunRow {
    pub job: String,
    pub state: String,
    pub created_at: i64,
    /// The finish time of a terminal run (what prunes rank by), else null.
    pub finished_at: Option<i64>,
    pub active: bool,
    pub body: String,
}

/// One `keel_audit` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AuditRow {
    pub job: String,
    pub run: Option<i64>,
    pub at: i64,
    pub body: String,
}

/// What one phase writes: each key once, with what the last record for it in the phase said
/// (`None`: delete the row).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Writes {
    pub jobs: BTreeMap<String, Option<String>>,
    pub tombstones: BTreeMap<String, Option<String>>,
    pub deliveries: BTreeMap<i64, Option<String>>,
    /// Id to (open, body).
    pub incidents: BTreeMap<i64, (bool, String)>,
    pub runs: BTreeMap<i64, RunRow>,
    /// (job, slot) to the run that claimed it.
    pub slots: BTreeMap<(String, i64), i64>,
    pub audit: BTreeMap<i64, AuditRow>,
    pub counters: Option<String>,
}

impl Writes {
    fn is_empty(&self) -> bool {
        self == &Writes::default()
    }
}

/// A `PruneHistory` record's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Prune {
    /// The job, or every job.
    pub job: Option<String>,
    pub keep_last: i64,
    pub finished_before: i64,
}

/// Writes, then prunes that run after them. A phase's prunes never touch the same runs, and a
/// prune for every job is alone in its phase.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Phase {
    pub writes: Writes,
    pub prunes: Vec<Prune>,
}

/// A row a write replaces or deletes, for keeping two writes of it in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Job(String),
    Tombstone(String),
    Delivery(i64),
    Incident(i64),
    Run(i64),
    Audit(i64),
    Counters,
}

/// The jobs each run id is written under in a batch. A run keeps its job (`check_batch`
/// refuses a stored run written under another), but within one batch a new id could be
/// written under two: then it belongs to both, for ordering.
fn run_jobs(records: &[Record]) -> HashMap<RunId, BTreeSet<&str>> {
    let mut jobs: HashMap<RunId, BTreeSet<&str>> = HashMap::new();
    for record in records {
        if let Record::PutRun(run) = record {
            jobs.entry(run.id()).or_default().insert(run.job().as_str());
        }
    }
    jobs
}

/// Which prunes a record may touch (or be touched by).
#[derive(Debug, PartialEq, Eq)]
enum Reach<'a> {
    /// None: the record commutes with every prune.
    Nothing,
    /// Prunes of these jobs, and prunes of every job.
    Jobs(&'a BTreeSet<&'a str>),
    /// Every prune: an audit record of a run whose job is unknown.
    Everything,
}

/// The phases each earlier record forces a later one into, as the records are placed.
#[derive(Default)]
struct Placement<'a> {
    /// The phase of the last write of each key.
    written: HashMap<Key, usize>,
    /// The latest phase of a write that prunes of a job must follow, by job.
    run_writes_by_job: HashMap<&'a str, usize>,
    /// The latest phase of an audit write of a run whose job is unknown.
    unknown_audit: Option<usize>,
    /// The latest phase of any write a prune may touch.
    any_run_write: Option<usize>,
    /// The latest phase of a prune, by job.
    prunes_by_job: HashMap<&'a str, usize>,
    /// The latest phase of a prune of every job.
    global_prune: Option<usize>,
    /// The latest phase of any prune.
    any_prune: Option<usize>,
}

/// The phase after `phase`, if any (0 if none).
fn after(phase: Option<usize>) -> usize {
    phase.map_or(0, |p| p + 1)
}

impl<'a> Placement<'a> {
    /// The earliest phase a write of `key` reaching `reach` may go into.
    fn write_phase(&self, key: &Key, reach: &Reach<'_>) -> usize {
        let same_key = self.written.get(key).copied().unwrap_or(0);
        let prunes = match reach {
            Reach::Nothing => 0,
            Reach::Everything => after(self.any_prune),
            Reach::Jobs(jobs) => jobs
                .iter()
                .map(|job| after(self.prunes_by_job.get(job).copied()))
                .fold(after(self.global_prune), usize::max),
        };
        same_key.max(prunes)
    }

    fn record_write(&mut self, key: Key, reach: &Reach<'a>, phase: usize) {
        self.written.insert(key, phase);
        let raise = |slot: &mut Option<usize>| *slot = Some(slot.map_or(phase, |p| p.max(phase)));
        match reach {
            Reach::Nothing => return,
            Reach::Everything => raise(&mut self.unknown_audit),
            Reach::Jobs(jobs) => {
                for job in jobs.iter() {
                    let at = self.run_writes_by_job.entry(job).or_insert(phase);
                    *at = (*at).max(phase);
                }
            }
        }
        raise(&mut self.any_run_write);
    }

    /// The earliest phase a prune of `job` (or every job) may go into.
    fn prune_phase(&self, job: Option<&str>) -> usize {
        let writes = match job {
            None => self.any_run_write.unwrap_or(0),
            Some(job) => {
                let own = self.run_writes_by_job.get(job).copied().unwrap_or(0);
                own.max(self.unknown_audit.unwrap_or(0))
            }
        };
        let prunes = match job {
            None => after(self.any_prune),
            Some(job) => after(self.prunes_by_job.get(job).copied()).max(after(self.global_prune)),
        };
        writes.max(prunes)
    }

    fn record_prune(&mut self, job: Option<&'a str>, phase: usize) {
        match job {
            None => self.global_prune = Some(phase),
            Some(job) => {
                self.prunes_by_job.insert(job, phase);
            }
        }
        self.any_prune = Some(self.any_prune.map_or(phase, |p| p.max(phase)));
    }
}

/// The phases that apply `records` with the same result as applying them one by one (see the
/// [module docs](self)). Fails only on a number that does not fit a `bigint` or a record that
/// does not encode.
pub(crate) fn plan(records: &[Record]) -> Result<Vec<Phase>, StoreError> {
    static NO_JOBS: BTreeSet<&str> = BTreeSet::new();
    let jobs_of = run_jobs(records);
    let mut placement = Placement::default();
    let mut phases: Vec<Phase> = Vec::new();
    let phase = |phases: &mut Vec<Phase>, n: usize| -> usize {
        if phases.len() <= n {
            phases.resize_with(n + 1, Phase::default);
        }
        n
    };
    for record in records {
        let (key, reach) = match record {
            Record::PruneHistory {
                job,
                keep_last,
                finished_before,
            } => {
                let job = job.as_ref().map(JobId::as_str);
                let n = phase(&mut phases, placement.prune_phase(job));
                placement.record_prune(job, n);
                phases[n].prunes.push(Prune {
                    job: job.map(str::to_owned),
                    keep_last: i64::from(*keep_last),
                    finished_before: finished_before.0,
                });
                continue;
            }
            Record::PutJob(job) => (Key::Job(job.spec.id.as_str().to_owned()), Reach::Nothing),
            Record::DeleteJob { id } => (Key::Job(id.as_str().to_owned()), Reach::Nothing),
            Record::PutTombstone(t) => (Key::Tombstone(t.job.as_str().to_owned()), Reach::Nothing),
            Record::DeleteTombstone { job } => {
                (Key::Tombstone(job.as_str().to_owned()), Reach::Nothing)
            }
            Record::PutDelivery(d) => {
                (Key::Delivery(int(d.id.0, "a delivery id")?), Reach::Nothing)
            }
            Record::DeleteDelivery { id } => {
                (Key::Delivery(int(id.0, "a delivery id")?), Reach::Nothing)
            }
            Record::PutIncident(i) => (Key::Incident(int(i.id, "an incident id")?), Reach::Nothing),
            Record::PutMeta(_) => (Key::Counters, Reach::Nothing),
            Record::PutRun(run) => {
                let jobs = jobs_of.get(&run.id()).unwrap_or(&NO_JOBS);
                (Key::Run(int(run.id().0, "a run id")?), Reach::Jobs(jobs))
            }
            Record::Audit(entry) => {
                let reach = match entry.run {
                    None => Reach::Nothing,
                    Some(run) => jobs_of.get(&run).map_or(Reach::Everything, Reach::Jobs),
                };
                (Key::Audit(int(entry.seq, "an audit seq")?), reach)
            }
        };
        let n = phase(&mut phases, placement.write_phase(&key, &reach));
        placement.record_write(key, &reach, n);
        add(&mut phases[n].writes, record)?;
    }
    phases.retain(|p| !p.writes.is_empty() || !p.prunes.is_empty());
    Ok(phases)
}

/// Adds `record` (not a prune) to `writes`, replacing an earlier write of the same key.
fn add(writes: &mut Writes, record: &Record) -> Result<(), StoreError> {
    match record {
        Record::PutJob(job) => {
            writes
                .jobs
                .insert(job.spec.id.as_str().to_owned(), Some(encode(job)?));
        }
        Record::DeleteJob { id } => {
            writes.jobs.insert(id.as_str().to_owned(), None);
        }
        Record::PutTombstone(tombstone) => {
            let body = encode(tombstone)?;
            writes
                .tombstones
                .insert(tombstone.job.as_str().to_owned(), Some(body));
        }
        Record::DeleteTombstone { job } => {
            writes.tombstones.insert(job.as_str().to_owned(), None);
        }
        Record::PutDelivery(delivery) => {
            let id = int(delivery.id.0, "a delivery id")?;
            writes.deliveries.insert(id, Some(encode(delivery)?));
        }
        Record::DeleteDelivery { id } => {
            writes.deliveries.insert(int(id.0, "a delivery id")?, None);
        }
        Record::PutIncident(incident) => {
            let id = int(incident.id, "an incident id")?;
            let open = incident.resolved_at.is_none();
            writes.incidents.insert(id, (open, encode(incident)?));
        }
        Record::PutRun(run) => add_run(writes, run)?,
        Record::Audit(entry) => {
            let row = AuditRow {
                job: entry.job.as_str().to_owned(),
                run: entry.run.map(|r| int(r.0, "a run id")).transpose()?,
                at: entry.at.0,
                body: encode(entry)?,
            };
            writes.audit.insert(int(entry.seq, "an audit seq")?, row);
        }
        Record::PutMeta(meta) => writes.counters = Some(encode(meta)?),
        Record::PruneHistory { .. } => {}
    }
    Ok(())
}

/// A run and its slot claim. The claim is kept even if a later write of the run in the phase
/// replaces the row: it was made, and only a prune of the run takes it back (SPEC S6).
fn add_run(writes: &mut Writes, run: &Run) -> Result<(), StoreError> {
    let id = int(run.id().0, "a run id")?;
    let terminal = run.state().is_terminal();
    let row = RunRow {
        job: run.job().as_str().to_owned(),
        state: run.state().name().to_string(),
        created_at: run.created_at().0,
        finished_at: run.finished_at().filter(|_| terminal).map(|t| t.0),
        active: !terminal,
        body: encode(run)?,
    };
    if let Some(slot) = run.slot() {
        writes.slots.insert((row.job.clone(), slot.0), id);
    }
    writes.runs.insert(id, row);
    Ok(())
}

/// The parameters of [`sql::WRITE`](crate::sql::WRITE) for one phase's writes: one array per
/// column, in the statement's order.
pub(crate) struct WriteParams<'a> {
    put_job_ids: Vec<&'a str>,
    put_job_bodies: Vec<&'a str>,
    deleted_jobs: Vec<&'a str>,
    put_tombstone_jobs: Vec<&'a str>,
    put_tombstone_bodies: Vec<&'a str>,
    deleted_tombstones: Vec<&'a str>,
    run_ids: Vec<i64>,
    run_jobs: Vec<&'a str>,
    run_states: Vec<&'a str>,
    run_created: Vec<i64>,
    run_finished: Vec<Option<i64>>,
    run_active: Vec<bool>,
    run_bodies: Vec<&'a str>,
    slot_jobs: Vec<&'a str>,
    slot_slots: Vec<i64>,
    slot_runs: Vec<i64>,
    audit_seqs: Vec<i64>,
    audit_jobs: Vec<&'a str>,
    audit_runs: Vec<Option<i64>>,
    audit_at: Vec<i64>,
    audit_bodies: Vec<&'a str>,
    incident_ids: Vec<i64>,
    incident_open: Vec<bool>,
    incident_bodies: Vec<&'a str>,
    put_delivery_ids: Vec<i64>,
    put_delivery_bodies: Vec<&'a str>,
    deleted_deliveries: Vec<i64>,
    counters: Option<&'a str>,
}

/// Splits puts (`Some` body) from deletes (`None`).
fn puts_and_deletes<'a, K: Copy>(
    rows: impl IntoIterator<Item = (K, &'a Option<String>)>,
) -> (Vec<K>, Vec<&'a str>, Vec<K>) {
    let (mut keys, mut bodies, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    for (key, body) in rows {
        match body {
            Some(body) => {
                keys.push(key);
                bodies.push(body.as_str());
            }
            None => deleted.push(key),
        }
    }
    (keys, bodies, deleted)
}

impl<'a> WriteParams<'a> {
    pub(crate) fn new(w: &'a Writes) -> Self {
        let (put_job_ids, put_job_bodies, deleted_jobs) =
            puts_and_deletes(w.jobs.iter().map(|(k, v)| (k.as_str(), v)));
        let (put_tombstone_jobs, put_tombstone_bodies, deleted_tombstones) =
            puts_and_deletes(w.tombstones.iter().map(|(k, v)| (k.as_str(), v)));
        let (put_delivery_ids, put_delivery_bodies, deleted_deliveries) =
            puts_and_deletes(w.deliveries.iter().map(|(k, v)| (*k, v)));
        let runs = w.runs.values();
        let audit = w.audit.values();
        let incidents = w.incidents.values();
        WriteParams {
            put_job_ids,
            put_job_bodies,
            deleted_jobs,
            put_tombstone_jobs,
            put_tombstone_bodies,
            deleted_tombstones,
            run_ids: w.runs.keys().copied().collect(),
            run_jobs: runs.clone().map(|r| r.job.as_str()).collect(),
            run_states: runs.clone().map(|r| r.state.as_str()).collect(),
            run_created: runs.clone().map(|r| r.created_at).collect(),
            run_finished: runs.clone().map(|r| r.finished_at).collect(),
            run_active: runs.clone().map(|r| r.active).collect(),
            run_bodies: runs.map(|r| r.body.as_str()).collect(),
            slot_jobs: w.slots.keys().map(|(job, _)| job.as_str()).collect(),
            slot_slots: w.slots.keys().map(|(_, slot)| *slot).collect(),
            slot_runs: w.slots.values().copied().collect(),
            audit_seqs: w.audit.keys().copied().collect(),
            audit_jobs: audit.clone().map(|a| a.job.as_str()).collect(),
            audit_runs: audit.clone().map(|a| a.run).collect(),
            audit_at: audit.clone().map(|a| a.at).collect(),
            audit_bodies: audit.map(|a| a.body.as_str()).collect(),
            incident_ids: w.incidents.keys().copied().collect(),
            incident_open: incidents.clone().map(|(open, _)| *open).collect(),
            incident_bodies: incidents.map(|(_, body)| body.as_str()).collect(),
            put_delivery_ids,
            put_delivery_bodies,
            deleted_deliveries,
            counters: w.counters.as_deref(),
        }
    }

    /// `$1`.. of [`sql::WRITE`](crate::sql::WRITE).
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 28] {
        [
            &self.put_job_ids,
            &self.put_job_bodies,
            &self.deleted_jobs,
            &self.put_tombstone_jobs,
            &self.put_tombstone_bodies,
            &self.deleted_tombstones,
            &self.run_ids,
            &self.run_jobs,
            &self.run_states,
            &self.run_created,
            &self.run_finished,
            &self.run_active,
            &self.run_bodies,
            &self.slot_jobs,
            &self.slot_slots,
            &self.slot_runs,
            &self.audit_seqs,
            &self.audit_jobs,
            &self.audit_runs,
            &self.audit_at,
            &self.audit_bodies,
            &self.incident_ids,
            &self.incident_open,
            &self.incident_bodies,
            &self.put_delivery_ids,
            &self.put_delivery_bodies,
            &self.deleted_deliveries,
            &self.counters,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::persist::Tombstone;
    use keel_core::{Meta, RunState, Timestamp};
    use keel_harness::conformance::{audit_record, edit, once_job, run, T0};

    fn job(name: &str) -> JobId {
        JobId::new(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn prune(name: Option<&str>) -> Record {
        Record::PruneHistory {
            job: name.map(job),
            keep_last: 1,
            finished_before: Timestamp(0),
        }
    }

    fn put_run(id: u64, name: &str) -> Record {
        Record::PutRun(run(id, name, T0.plus_ms(id)))
    }

    fn audit(seq: u64, name: &str, run: Option<u64>) -> Record {
        Record::Audit(audit_record(seq, name, run, T0))
    }

    /// A phase in short: the run ids written, the audit seqs written, the prunes' jobs.
    type Shape = (Vec<i64>, Vec<i64>, Vec<Option<String>>);

    fn shape(records: &[Record]) -> Vec<Shape> {
        plan(records)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|p| {
                (
                    p.writes.runs.keys().copied().collect(),
                    p.writes.audit.keys().copied().collect(),
                    p.prunes.into_iter().map(|p| p.job).collect(),
                )
            })
            .collect()
    }

    fn some(name: &str) -> Option<String> {
        Some(name.to_owned())
    }

    #[test]
    fn a_schedulers_batch_of_jobs_each_pruned_after_its_runs_is_one_phase() {
        let records = vec![
            put_run(1, "a"),
            audit(1, "a", Some(1)),
            prune(Some("a")),
            put_run(2, "b"),
            audit(2, "b", Some(2)),
            prune(Some("b")),
            Record::PutMeta(Meta::default()),
        ];
        assert_eq!(
            shape(&records),
            vec![(vec![1, 2], vec![1, 2], vec![some("a"), some("b")])]
        );
        let phases = plan(&records).unwrap_or_else(|e| panic!("{e}"));
        assert!(phases[0].writes.counters.is_some());
    }

    #[test]
    fn a_write_after_a_prune_that_may_touch_it_goes_after_the_prune() {
        // Run 1 of job a written after a's prune: the prune must not see it.
        let records = vec![prune(Some("a")), put_run(1, "a"), put_run(2, "b")];
        assert_eq!(
            shape(&records),
            vec![
                (vec![2], vec![], vec![some("a")]),
                (vec![1], vec![], vec![]),
            ]
        );
        // An audit record of a run the batch does not write: its job is unknown, so it waits
        // for every earlier prune; one of a run of another job does not.
        let records = vec![
            put_run(2, "b"),
            prune(Some("a")),
            audit(1, "x", Some(99)),
            audit(2, "b", Some(2)),
            audit(3, "a", None),
        ];
        assert_eq!(
            shape(&records),
            vec![
                (vec![2], vec![2, 3], vec![some("a")]),
                (vec![], vec![1], vec![]),
            ]
        );
    }

    #[test]
    fn a_prune_after_writes_it_may_touch_goes_after_them() {
        // An audit record of a run the batch does not write may be of any job: a prune after
        // it follows it, and a prune of every job follows every write it may touch, and is
        // followed by every such write after it.
        let records = vec![
            prune(Some("b")),
            put_run(1, "b"),
            audit(1, "x", Some(99)),
            prune(Some("a")),
            prune(None),
            put_run(2, "c"),
        ];
        assert_eq!(
            shape(&records),
            vec![
                (vec![], vec![], vec![some("b")]),
                (vec![1], vec![1], vec![some("a")]),
                (vec![], vec![], vec![None]),
                (vec![2], vec![], vec![]),
            ]
        );
    }

    #[test]
    fn prunes_of_one_job_and_of_every_job_keep_their_order() {
        let records = vec![prune(Some("a")), prune(Some("a")), prune(Some("b"))];
        assert_eq!(
            shape(&records),
            vec![
                (vec![], vec![], vec![some("a"), some("b")]),
                (vec![], vec![], vec![some("a")]),
            ]
        );
        let records = vec![prune(Some("a")), prune(None), prune(Some("b"))];
        assert_eq!(
            shape(&records),
            vec![
                (vec![], vec![], vec![some("a")]),
                (vec![], vec![], vec![None]),
                (vec![], vec![], vec![some("b")]),
            ]
        );
    }

    #[test]
    fn the_last_write_of_a_key_wins_and_a_put_after_a_delete_is_a_put() {
        let a = once_job("a");
        let finished = edit(run(1, "a", T0), |r| {
            r.state = RunState::Succeeded;
            r.finished_at = Some(T0.plus_ms(5));
        });
        let tombstone = Tombstone {
            job: job("a"),
            last_fired: T0,
            deleted_at: T0,
        };
        let records = vec![
            Record::PutJob(a.clone().into()),
            Record::DeleteJob { id: job("a") },
            Record::DeleteJob { id: job("b") },
            Record::PutJob(once_job("b").into()),
            Record::PutTombstone(tombstone.clone()),
            Record::DeleteTombstone { job: job("a") },
            put_run(1, "a"),
            Record::PutRun(finished),
        ];
        let phases = plan(&records).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(phases.len(), 1);
        let w = &phases[0].writes;
        assert_eq!(w.jobs["a"], None);
        assert!(w.jobs["b"].is_some());
        assert_eq!(w.tombstones["a"], None);
        assert_eq!(w.runs[&1].state, "succeeded");
        assert_eq!(w.runs[&1].finished_at, Some(T0.plus_ms(5).0));
        assert!(!w.runs[&1].active);
    }

    #[test]
    fn a_run_id_written_under_two_jobs_belongs_to_both_for_ordering() {
        let records = vec![put_run(1, "b"), prune(Some("a")), put_run(1, "a")];
        assert_eq!(
            shape(&records),
            vec![
                (vec![1], vec![], vec![some("a")]),
                (vec![1], vec![], vec![]),
            ]
        );
    }
}

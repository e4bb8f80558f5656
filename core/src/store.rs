//! The store interface: what every storage adapter implements and the runtime drives, and the
//! write rules every adapter enforces at write time.
//!
//! `keel-core` does no I/O; this module only *declares* the contract ([`Store`]) and holds the
//! one implementation of the rules that decide whether a batch may land ([`check_batch`]).
//! Adapters (`keel-store-fs`, `keel-store-sled`, the simulator's in-memory store, a future
//! Postgres store) call [`check_batch`] inside their write transaction, against what is stored
//! *at that moment*, never against a possibly stale in-memory view of another process.
//!
//! # The contract
//!
//! | call | what the store guarantees |
//! |---|---|
//! | [`Store::restore`] | returns everything a [`Scheduler`](crate::Scheduler) is restored from, and makes the caller the store's only writer: from now on every batch of an earlier writer is refused with [`Conflict::Deposed`] |
//! | [`Store::apply`] | checks the write rules, then applies the batch atomically and durably, or not at all; `Ok` is the acknowledgement (`Scheduler::handle_persisted`) |
//! | [`Store::read`] | the same data as `restore`, without becoming the writer (CLI commands, `doctor`) |
//! | [`Store::run`], [`Store::runs`], [`Store::audit`], [`Store::incidents`] | history, including terminal runs the scheduler has forgotten, newest first, paged |
//!
//! A batch is applied whole or not at all: a crash during `apply` leaves either every record
//! of the batch or none of them visible after the next open. An error other than
//! [`StoreError::Conflict`] leaves the outcome unknown (the write may have landed); because
//! every record is an upsert keyed by id, re-sending a rebuilt batch
//! (`Scheduler::handle_persist_failed`) is always safe.
//!
//! # Write rules
//!
//! The rules make leases safe between processes and between incarnations of a scheduler. Each
//! is checked against the stored state at write time, in the same transaction as the write.
//!
//! | rule | refused with | why |
//! |---|---|---|
//! | the batch's epoch is the store's writer epoch | [`Conflict::Deposed`] | a scheduler restored elsewhere took over; an older incarnation (a stalled process, a second daemon) must not write |
//! | a run id keeps its job | [`Conflict::RunIdTaken`] | two writers allocated the same id |
//! | a terminal run never changes state | [`Conflict::TerminalRunChanged`] | history is final |
//! | a `(job, slot)` belongs to one run | [`Conflict::SlotTaken`] | SPEC S6: a slot fires once (see below) |
//! | a run's tokens never go backwards | [`Conflict::StaleToken`] | SPEC L1: a fenced write is accepted only while its token is current |
//! | a token is held by one owner | [`Conflict::TokenReused`] | a grant is unique |
//! | a new grant replaces a stored lease only if it expired or the writer saw it end | [`Conflict::LeaseHeld`] | SPEC L2: grant only if the lease is free or expired |
//!
//! A slot claim lives as long as its run: the history policy's prune deletes it with the run,
//! so claims are bounded by the history kept and not by every slot ever fired (a hundred
//! thousand once-a-minute jobs fire 144 million slots a day). Once a run is pruned, what keeps
//! its slot from firing again is the job's cursor, stored with the job (and with its tombstone
//! after a delete): a scheduler fires only slots after it. The rule still refuses two runs
//! for one slot while either is stored, which covers every run a scheduler can still be
//! writing.
//!
//! A lease "expired" when its stored `expires_at` is not after the batch's `at` (the writer's
//! clock when it built the batch). A renewed expiry reaches the store with the run's next
//! batch, so the stored expiry is never later than the holder's real one: the rule never
//! refuses a grant the in-memory scheduler would make, and the scheduler itself waits
//! `ttl + grace` before it reclaims (SPEC L3).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::ids::{FencingToken, JobId, RunId};
use crate::incident::Incident;
use crate::lease::Lease;
use crate::limits;
use crate::persist::{Batch, Record, Snapshot};
use crate::run::{Run, StateName};
use crate::time::Timestamp;

/// A storage adapter. Implementations must be safe to share between threads; several handles
/// (in one process or several) may use the same underlying store at once.
pub trait Store: Send + Sync + fmt::Debug {
    /// Makes the caller the store's only writer and returns what its scheduler is restored
    /// from. The snapshot's `meta.epoch` is the epoch *before* the caller's incarnation:
    /// `Scheduler::restore` adds one, and that is the epoch the store now accepts batches from.
    fn restore(&self) -> Result<Snapshot, StoreError>;

    /// Checks the [write rules](self#write-rules) against the stored state and, if they hold,
    /// applies every record of `batch` atomically and durably. `Ok` means durable.
    fn apply(&self, batch: &Batch) -> Result<(), StoreError>;

    /// [`Store::apply`], given the batch to keep: a store that holds its records in memory
    /// moves them in instead of copying each one. The runtime writes through this, as it
    /// needs nothing of a batch but its id once it is applied. The default applies the
    /// borrowed batch, so a store (or a wrapper of one) that does not override it behaves
    /// exactly as through `apply`.
    fn apply_owned(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(&batch)
    }

    /// The current state, without becoming the writer: what `restore` would return, except
    /// that `meta` holds the stored counters as the last writer wrote them.
    fn read(&self) -> Result<Snapshot, StoreError>;

    /// One run, terminal or not (until the history policy prunes it).
    fn run(&self, id: RunId) -> Result<Option<Run>, StoreError>;

    /// Runs matching `query`, newest first, one page at a time.
    fn runs(&self, query: &RunQuery) -> Result<RunPage, StoreError>;

    /// Audit records matching `query`, oldest first, one page at a time.
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// Every incident, open and resolved, by id.
    fn incidents(&self) -> Result<Vec<Incident>, StoreError>;
}

/// Why a store did not apply a batch or answer a query.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A write rule refused the batch; nothing of it was applied.
    #[error("batch refused: {0}")]
    Conflict(#[from] Conflict),
    /// Stored data failed its integrity check. `location` names where (a file and byte
    /// offset, a key); the rest of the store is still readable.
    #[error("corrupt data at {location}: {detail}")]
    Corrupt {
        /// Where the bad data is.
        location: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The store was written by a format this build does not read.
    #[error("unsupported store format {found:?} (this build reads {supported:?})")]
    Version {
        /// The format found.
        found: String,
        /// The format this build reads.
        supported: String,
    },
    /// The operation failed (disk full, permission denied, lock lost...). For `apply` the
    /// outcome is unknown; re-sending a rebuilt batch is safe.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// The database under the store is not the one the store was last written on (a replica
    /// promoted after a failover, a restore from a backup): acknowledged writes may be missing
    /// from it, and a writer that went on could run a slot twice. Nothing was written; the
    /// store refuses every handle until an operator has checked and accepted the database
    /// (how is the store's own: keel-store-postgres has `PgStore::accept_database`).
    #[error("the store's database changed: {0}")]
    Diverged(String),
    /// The store refuses a place another user could tamper with (SPEC O3): a directory owned
    /// by someone else or writable by others, or a symbolic link where a store file belongs.
    /// Nothing was read or written there.
    #[error("refusing {path}: {reason}")]
    Unsafe {
        /// The directory or file refused.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
}

/// A write rule that refused a batch (see the [module docs](self#write-rules)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "conflict")]
#[non_exhaustive]
pub enum Conflict {
    /// The batch's writer is no longer the store's writer: another scheduler restored from
    /// the store since.
    #[error("writer epoch {batch} was deposed; the store's writer is now epoch {current}")]
    Deposed {
        /// The batch's epoch.
        batch: u64,
        /// The store's writer epoch.
        current: u64,
    },
    /// The run id is stored for another job.
    #[error("{run} belongs to job {stored}, not {job}")]
    RunIdTaken {
        /// The run.
        run: RunId,
        /// The job the batch wrote it for.
        job: JobId,
        /// The job it is stored for.
        stored: JobId,
    },
    /// A terminal run would change state.
    #[error("{run} is {stored:?}, a terminal state; it cannot become {new:?}")]
    TerminalRunChanged {
        /// The run.
        run: RunId,
        /// Its stored state.
        stored: StateName,
        /// The state the batch wrote.
        new: StateName,
    },
    /// Another run already claimed this slot of the job.
    #[error("slot {slot} of job {job} belongs to {owner}, not {run}")]
    SlotTaken {
        /// The job.
        job: JobId,
        /// The slot.
        slot: Timestamp,
        /// The run that claimed it.
        owner: RunId,
        /// The run the batch wrote.
        run: RunId,
    },
    /// The batch writes a run with an older token than the stored one.
    #[error("{run}: token {token} is stale; the current token is {current}")]
    StaleToken {
        /// The run.
        run: RunId,
        /// The batch's newest token for the run.
        token: FencingToken,
        /// The stored newest token.
        current: FencingToken,
    },
    /// The batch gives a stored token to another owner.
    #[error("{run}: token {token} is held by {owner}, not {claimed_by}")]
    TokenReused {
        /// The run.
        run: RunId,
        /// The token.
        token: FencingToken,
        /// Its stored owner.
        owner: String,
        /// The owner the batch wrote.
        claimed_by: String,
    },
    /// The batch takes a run from a lease that is stored as live and that the writer never
    /// saw end.
    #[error("{run} is leased to {owner} with {token} until {expires_at}")]
    LeaseHeld {
        /// The run.
        run: RunId,
        /// The live lease's owner.
        owner: String,
        /// Its token.
        token: FencingToken,
        /// When it expires.
        expires_at: Timestamp,
    },
}

/// What [`check_batch`] needs to see of the stored state.
pub trait StoredView {
    /// The epoch whose batches the store accepts (0 until the first `restore`).
    fn writer_epoch(&self) -> u64;
    /// The stored run, if any.
    fn stored_run(&self, id: RunId) -> Option<Run>;
    /// The stored run that claimed `slot` of `job`, if any (a pruned run's claim goes with it).
    fn slot_owner(&self, job: &JobId, slot: Timestamp) -> Option<RunId>;
}

/// Checks every [write rule](self#write-rules) for `batch` against `stored`. Stores call this
/// inside their write transaction and apply the batch only on `Ok`.
pub fn check_batch(stored: &impl StoredView, batch: &Batch) -> Result<(), Conflict> {
    let current = stored.writer_epoch();
    if batch.id.epoch() != current {
        return Err(Conflict::Deposed {
            batch: batch.id.epoch(),
            current,
        });
    }
    // Slots claimed earlier in this same batch.
    let mut claimed: BTreeMap<(&JobId, Timestamp), RunId> = BTreeMap::new();
    for record in &batch.records {
        let Record::PutRun(run) = record else {
            continue;
        };
        if let Some(old) = stored.stored_run(run.id) {
            check_run(&old, run, batch.at)?;
        }
        if let Some(slot) = run.slot() {
            let owner = claimed
                .get(&(&run.job, slot))
                .copied()
                .or_else(|| stored.slot_owner(&run.job, slot));
            match owner {
                Some(owner) if owner != run.id => {
                    return Err(Conflict::SlotTaken {
                        job: run.job.clone(),
                        slot,
                        owner,
                        run: run.id,
                    })
                }
                _ => {
                    claimed.insert((&run.job, slot), run.id);
                }
            }
        }
    }
    Ok(())
}

/// The rules for writing `new` over the stored `old`.
fn check_run(old: &Run, new: &Run, at: Timestamp) -> Result<(), Conflict> {
    if old.job != new.job {
        return Err(Conflict::RunIdTaken {
            run: new.id,
            job: new.job.clone(),
            stored: old.job.clone(),
        });
    }
    if old.state.is_terminal() && old.state != new.state {
        return Err(Conflict::TerminalRunChanged {
            run: new.id,
            stored: old.state.name(),
            new: new.state.name(),
        });
    }
    if let (Some(token), Some(current)) = (newest_token(new), newest_token(old)) {
        if token < current {
            return Err(Conflict::StaleToken {
                run: new.id,
                token,
                current,
            });
        }
    } else if let (None, Some(current)) = (newest_token(new), newest_token(old)) {
        return Err(Conflict::StaleToken {
            run: new.id,
            token: FencingToken(0),
            current,
        });
    }
    let Some(held) = &old.lease else {
        return Ok(());
    };
    match &new.lease {
        Some(lease) if lease.token == held.token => {
            if lease.owner != held.owner {
                return Err(Conflict::TokenReused {
                    run: new.id,
                    token: held.token,
                    owner: held.owner.to_string(),
                    claimed_by: lease.owner.to_string(),
                });
            }
            Ok(())
        }
        // The write ends or replaces the stored lease: fine if it expired, or if the writer
        // saw it end (its record remembers a token at least as new).
        _ if held.expires_at <= at || new.last_token.is_some_and(|t| t >= held.token) => Ok(()),
        _ => Err(lease_held(new.id, held)),
    }
}

fn lease_held(run: RunId, lease: &Lease) -> Conflict {
    Conflict::LeaseHeld {
        run,
        owner: lease.owner.to_string(),
        token: lease.token,
        expires_at: lease.expires_at,
    }
}

/// The newest token a run record knows of: its live lease's, or the last one that ended.
fn newest_token(run: &Run) -> Option<FencingToken> {
    let live = run.lease.as_ref().map(|l| l.token);
    live.max(run.last_token)
}

/// The writer epoch a store hands out with `restore`: one past every epoch it has seen, so no
/// two incarnations ever share one.
pub fn next_writer_epoch(writer_epoch: u64, meta_epoch: u64) -> u64 {
    writer_epoch.max(meta_epoch) + 1
}

/// Which runs [`Store::runs`] returns. Every filter is optional; the page is newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunQuery {
    /// Only this job's runs.
    pub job: Option<JobId>,
    /// Only runs currently in this state.
    pub state: Option<StateName>,
    /// Only runs created at or after this instant.
    pub created_from: Option<Timestamp>,
    /// Only runs created before this instant.
    pub created_until: Option<Timestamp>,
    /// Only runs with an id below this one: the `next` cursor of the previous page.
    pub before: Option<RunId>,
    /// At most this many runs (0 means the default, [`limits::HISTORY_PAGE_DEFAULT`]; capped
    /// at [`limits::HISTORY_PAGE_MAX`]).
    pub limit: usize,
}

impl RunQuery {
    /// True if `run` passes every filter (not the cursor or the limit).
    pub fn matches(&self, run: &Run) -> bool {
        self.job.as_ref().is_none_or(|job| &run.job == job)
            && self.state.is_none_or(|state| run.state.name() == state)
            && self.created_from.is_none_or(|from| run.created_at >= from)
            && self
                .created_until
                .is_none_or(|until| run.created_at < until)
    }

    /// The page size this query asks for, after defaults and caps.
    pub fn page_size(&self) -> usize {
        page_size(self.limit)
    }

    /// Builds a page from runs in descending id order (those below the cursor), applying the
    /// filters and the page size. Stores that keep runs ordered by id use it as is.
    pub fn page<'a>(&self, newest_first: impl IntoIterator<Item = &'a Run>) -> RunPage {
        let size = self.page_size();
        let mut runs = Vec::new();
        let mut next = None;
        for run in newest_first {
            if self.before.is_some_and(|before| run.id >= before) || !self.matches(run) {
                continue;
            }
            if runs.len() == size {
                next = runs.last().map(|r: &Run| r.id);
                break;
            }
            runs.push(run.clone());
        }
        RunPage { runs, next }
    }
}

/// One page of runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunPage {
    /// The runs, newest first.
    pub runs: Vec<Run>,
    /// If more match: the cursor for the next page (`RunQuery::before`).
    pub next: Option<RunId>,
}

/// Which audit records [`Store::audit`] returns, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditQuery {
    /// Only this job's records (job-level and its runs').
    pub job: Option<JobId>,
    /// Only this run's records.
    pub run: Option<RunId>,
    /// Only records after this sequence number: the last `seq` of the previous page.
    pub after: Option<u64>,
    /// Only records at or after this instant.
    pub from: Option<Timestamp>,
    /// At most this many (0 means the default; capped like runs).
    pub limit: usize,
}

impl AuditQuery {
    /// True if `record` passes every filter and the cursor.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        self.job.as_ref().is_none_or(|job| &record.job == job)
            && self.run.is_none_or(|run| record.run == Some(run))
            && self.after.is_none_or(|after| record.seq > after)
            && self.from.is_none_or(|from| record.at >= from)
    }

    /// The page size this query asks for, after defaults and caps.
    pub fn page_size(&self) -> usize {
        page_size(self.limit)
    }

    /// Builds a page from records in ascending `seq` order.
    pub fn page<'a>(
        &self,
        oldest_first: impl IntoIterator<Item = &'a AuditRecord>,
    ) -> Vec<AuditRecord> {
        oldest_first
            .into_iter()
            .filter(|r| self.matches(r))
            .take(self.page_size())
            .cloned()
            .collect()
    }
}

fn page_size(limit: usize) -> usize {
    match limit {
        0 => limits::HISTORY_PAGE_DEFAULT,
        n => n.min(limits::HISTORY_PAGE_MAX),
    }
}

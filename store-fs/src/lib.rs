//! keel-store-fs: keel's embedded default store, a crash-safe data directory on the local
//! filesystem that several processes (the daemon, CLI commands, external workers) use at once.
//!
//! [`FsStore`] implements [`keel_core::Store`]: it checks the write rules
//! ([`keel_core::store::check_batch`]) against what is on disk at the moment of each write, in
//! the same transaction as the write, so that two processes sharing a directory never run the
//! same slot twice and never both hold a lease with the same token (SPEC L6).
//!
//! ```no_run
//! use keel_core::Store;
//! use keel_store_fs::FsStore;
//!
//! let store = FsStore::open("/var/lib/keel")?;
//! let snapshot = store.restore()?; // this process is now the writer
//! # Ok::<(), keel_core::StoreError>(())
//! ```
//!
//! # The directory
//!
//! | file | what it holds |
//! |---|---|
//! | `VERSION` | exactly `keel-store-fs 2\n` (or `keel-store-fs 1\n`, migrated at the first open); any other content is refused ([`StoreError::Version`]) |
//! | `CURRENT` | one frame naming the committed generation, written by a compaction once the generation's log exists (its snapshot may follow, see [Compaction](#compaction)) |
//! | `lock` | empty; the advisory lock every transaction takes |
//! | `snapshot-<generation>` | the whole state at the start of a generation (none for generation 0, which starts empty; none yet while a compaction writes it) |
//! | `log-<generation>` | a `start` frame naming the generation, then the frames appended during it |
//! | `quarantine/` | copies of damaged bytes, named `<file>-<offset>.bad` (corrupt frames), `<file>-<offset>.torn` (torn tails) and `<snapshot>.bad` |
//!
//! Generations are 16 hex digits. The directory is created `0700` and every file `0600`
//! (SPEC T4); an existing empty directory is restricted to `0700` when the store is created
//! in it. A directory that holds other files and no `VERSION` is refused, never adopted.
//!
//! # Format
//!
//! Logs and snapshots are sequences of frames, `"KLF1" | length u32 LE | CRC-32C u32 LE |
//! payload`, with a JSON payload of at most 256 MiB (the [`format`](mod@format) module has
//! the details). A log frame is a batch the store accepted (its id, its clock and its
//! records, applied in order) or the writer epoch a `restore` claimed. A snapshot is a
//! `begin` frame (generation, writer epoch, counters), one frame per item (every job, every
//! run including terminal ones, every audit record, the slot claim of every stored run,
//! every tombstone, incident and delivery) and an `end` frame that counts the
//! items.
//!
//! Replaying a snapshot and its log applies every record exactly as the simulator's
//! `MemStore` does: upserts keyed by id, deletes, and `PruneHistory`, which removes terminal
//! runs with their audit records and slot claims. Fields the core marks as not
//! persisted read back as their defaults, except `Job::active_runs`, which `read` and
//! `restore` fill in from the stored runs that are not terminal (as `Scheduler::restore`
//! does).
//!
//! # Transactions and locking
//!
//! Each handle keeps the whole state in memory, with how far into the newest log it has
//! read. Every operation is a transaction on the `lock` file (`File::lock`, advisory):
//!
//! - **Writes** (`apply`, `restore`) take the lock exclusively, catch up (apply the frames
//!   other handles appended since this one last looked; reload from the newest snapshot if
//!   another handle compacted), check the write rules against that state, append the batch
//!   to the log, `fsync` it (`sync_data`), and only then release the lock. `restore`
//!   appends a writer frame with the next writer epoch
//!   ([`keel_core::store::next_writer_epoch`]): from then on every batch of an earlier epoch
//!   is refused.
//! - **Reads** (`read`, `run`, `runs`, `audit`, `incidents`) take the lock shared and catch
//!   up first, so every handle sees every other handle's acknowledged writes. All but `run`
//!   then take a frozen copy of the state (O(1): its maps share nodes) and answer from it
//!   after releasing the handle, so a read that walks every job or much of the history
//!   never holds up a write of the same handle.
//! - **Group commit**: threads calling `apply` on one handle at once queue their batches;
//!   one of them, the leader, takes the lock and every batch queued by then, checks each
//!   against the state including the batches before it in the group (a refused batch is
//!   skipped and gets its own conflict), appends them all, `fsync`s once, and hands every
//!   waiting thread its own result.
//!
//! The lock is advisory and only works between processes that use it: a local filesystem
//! is required (network filesystems' locking is not relied on).
//!
//! # Compaction
//!
//! When a writer's append takes the log past [`FsOptions::compact_after_bytes`] and past the
//! size of the snapshot its state was built on (so a compaction, which rewrites the whole
//! state, is paid for by at least as many bytes appended), it starts a new generation. Writing
//! the snapshot (the whole state, 0.5 s and more at 100 000 jobs) is kept off the write path:
//!
//! 1. **Switch**, by the writer, still holding the lock, after handing out the group's
//!    results: it removes leftovers of an interrupted compaction (files of `g+1`), creates
//!    `log-<g+1>` with its `start` frame, fsyncs it and the directory, commits by writing
//!    `CURRENT` naming `g+1` atomically, and takes a frozen copy of its state: the state
//!    `g+1` starts from, exactly what a load would rebuild (the newest snapshot before `g+1`,
//!    then every log since, `log-<g>` up to the length it had at the switch). Appends go to
//!    `log-<g+1>` from the next group on. This is bounded work: two small files and four
//!    fsyncs, whatever the store's size, and the copy is O(1): `State`'s maps are persistent
//!    B-trees (`imbl`) that share their nodes, copied only as the writer changes them.
//! 2. **Snapshot**, by a thread of the handle, holding no lock: it encodes the frozen copy
//!    to `snapshot-<g+1>.tmp` (recording `log-<g>`'s length), fsyncs it, renames it and
//!    fsyncs the directory. This costs the thread the encoding only, and the writer nothing
//!    but the nodes it copies as it changes maps still shared with the copy.
//! 3. **Cleanup**, by that thread, under the lock again: the handle's state is now based on
//!    `snapshot-<g+1>`, and generations older than the snapshot its state was built on are
//!    removed (that one stays as the fallback), so two good snapshots exist again.
//!
//! One compaction runs at a time per handle: a compaction due while one runs is skipped, and
//! the next write after it asks again. If the snapshot cannot be written, nothing is lost (the
//! logs hold every batch, and `g+1` loads from the previous snapshot and every log since); the
//! failure is logged with `tracing::warn!` and counted ([`FsStats::compactions_failed`]), and
//! the next attempt waits until the log has grown by another threshold. Dropping the handle
//! waits for a running compaction ([`FsStore::wait_for_compaction`]).
//!
//! A crash before the switch's commit leaves `g` committed and `g+1`'s files ignored; after
//! it, `g+1` committed with its log, and its snapshot missing (before step 2's rename) or
//! whole. A missing snapshot is not damage: the generation loads from the previous snapshot
//! and every log since (see [Recovery](#recovery)), and the next compaction writes a new one.
//! The files are those of format 2, and a build that reads only format 2 opens such a
//! directory correctly (it rebuilds the missing snapshot and reports it), so `VERSION` stays
//! 2. A handle notices a new generation when `CURRENT` changes or its own log is gone, and
//! reloads.
//!
//! A format-1 directory (the compaction migrates it: `VERSION` 2 is written after the commit),
//! one whose newest snapshot was unreadable, and [`FsStore::repair`] use the compaction of
//! earlier versions instead: everything under the lock, the snapshot written, renamed and
//! synced before the new log is created and `CURRENT` committed. It is rare, and the snapshot
//! it writes is what makes such a directory whole; opening does it at once. Any other
//! compaction due at open is started by the first write, in the background.
//!
//! # Recovery
//!
//! Opening takes the lock exclusively and loads the committed generation:
//!
//! - A frame cut short at the end of the newest log (a prefix of a frame, or zeros), with no
//!   valid frame after it, is a write interrupted by a crash: it was never acknowledged. A
//!   writer copies it to `quarantine/` and truncates the log there; a reader only skips it.
//! - A whole frame that fails its checksum or does not decode, wherever it is (even last), and
//!   bytes at the end that cannot be the beginning of a frame, are corruption: copied to
//!   `quarantine/<file>-<offset>.bad`, reported and skipped; reading goes on.
//! - The committed generation's log missing, empty or without its `start` frame, a log shorter
//!   than what a handle had read, or `CURRENT` missing or unreadable, is [`Damage`].
//! - A missing newest snapshot (a compaction that has not written it yet, or was interrupted)
//!   is rebuilt from the previous one and every log since, silently: nothing is lost, and the
//!   next compaction writes a new one. An unreadable one is rebuilt the same way, quarantined
//!   and reported, and the store compacts again at its next write. Only if no usable snapshot
//!   is left with the logs that follow it does opening fail ([`StoreError::Corrupt`]).
//!
//! Everything found is reported by [`FsStore::recovery`] (with file and byte offset) and
//! logged with `tracing::warn!`.
//!
//! # Damage and repair
//!
//! While acknowledged writes may be missing (corrupt frames or [`Damage`]), `restore` and
//! `apply` fail with [`StoreError::Corrupt`] naming the damage and `keel doctor --repair`;
//! reads keep working. [`FsStore::verify`] also checks the fallback generation: its snapshot
//! and log must read whole, the log must have the length the next snapshot recorded, and
//! replaying both must rebuild the next snapshot (a generation whose snapshot was never
//! written continues the replay of the one before). [`FsStore::repair`] rewrites the store from
//! what is readable through two compactions, records a `store_repaired` incident listing what
//! was lost, and keeps the damaged bytes in `quarantine/`.
//!
//! A log cut exactly at a frame boundary while no handle that had read past the cut is open
//! cannot be told from one that was never longer (that would need metadata written on every
//! append); `docs/storage.md` states this limit.
//!
//! # Guarantees
//!
//! - `apply` returning `Ok` means the batch is on disk (fsynced) and every handle sees it
//!   from its next operation on. A batch is applied whole or not at all: it is one
//!   checksummed frame, and a frame cut short is discarded whole.
//! - `Err(StoreError::Conflict)` means nothing of the batch was written. Any other error
//!   leaves the outcome unknown; the handle reloads from the files before its next use.
//! - A crash at any instant loses no acknowledged write and leaves a directory that opens
//!   (SPEC T2), provided the filesystem honours `fsync` (and [`FsOptions::sync`] is on).
//!   Damage to the files is reported and the rest stays readable.
//! - Stored bytes never make the store panic: every decoder checks what it reads.
//!
//! Loading a snapshot of 8 MiB or more uses a second thread: the opening thread reads and
//! decodes its frames while the second builds the maps from them, in chunks of 1,024 items.
//!
//! Limits: a batch must encode to at most 256 MiB; a handle reads the newest log into
//! memory when it loads (the log is compacted at [`FsOptions::compact_after_bytes`]);
//! directory fsync is a no-op where directories cannot be opened (non-Unix).

#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use keel_core::store::{check_batch, next_writer_epoch};
use keel_core::{
    AuditQuery, AuditRecord, Batch, BatchId, Incident, IncidentKind, Record, Run, RunId, RunPage,
    RunQuery, Snapshot, Store, StoreError, Timestamp,
};

mod files;
pub mod format;
mod recovery;
mod replica;
mod state;

pub use files::check_private_dir;
pub use recovery::{Damage, Quarantined, RecoveryReport, SnapshotFallback, TornTail};

use files::{io_error, Marker, LOCK_FILE};
use replica::{Access, Replica, SnapshotJob};
use state::State;

/// How an [`FsStore`] behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsOptions {
    /// Start a new generation (snapshot and empty log) once the log passes this many bytes
    /// (and, with `compact_at_snapshot_size`, the size of the newest snapshot). Default: 64 MiB.
    pub compact_after_bytes: u64,
    /// Also wait for the log to grow as large as the newest snapshot before compacting, so that
    /// rewriting the whole state is paid for by at least as many bytes appended and the work of
    /// compacting stays proportional to what was written. Default: true. Off, a large store
    /// compacts every `compact_after_bytes` (tests that want a compaction after every write
    /// turn it off).
    pub compact_at_snapshot_size: bool,
    /// Fsync every append and compaction. Default: true. Turning it off keeps every
    /// guarantee except surviving a machine crash or power loss: for tests and benchmarks
    /// only.
    pub sync: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            compact_after_bytes: 64 * 1024 * 1024,
            compact_at_snapshot_size: true,
            sync: true,
        }
    }
}

/// What [`FsStore::repair`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repaired {
    /// The generation the store now stands at.
    pub generation: u64,
    /// The id of the `store_repaired` incident that records the repair.
    pub incident: u64,
    /// What was lost (acknowledged writes), as found before the repair.
    pub lost: Vec<Damage>,
    /// Damage in a fallback generation: nothing was lost, the repair only replaced it.
    pub fallback: Vec<Damage>,
    /// The damaged files, copied whole into `quarantine/` before the repair removed them.
    pub kept: Vec<String>,
}

/// What a handle did since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Batches applied (accepted by the write rules and made durable).
    pub batches: u64,
    /// Batches refused by the write rules.
    pub refused: u64,
    /// Appends to the log, each made durable by one fsync (when [`FsOptions::sync`]): one
    /// per group of concurrently applied batches, and one per `restore`.
    pub syncs: u64,
    /// Compactions this handle completed (the new generation's snapshot written).
    pub compactions: u64,
    /// Compactions that failed: the current generation goes on (no batch is lost, the logs
    /// hold them all) and a later write tries again.
    pub compactions_failed: u64,
}

/// A keel store in a directory on the local filesystem. See the [crate docs](crate) for the
/// format, the locking and the guarantees.
pub struct FsStore {
    dir: PathBuf,
    options: FsOptions,
    /// The directory's `lock` file. Taken only while `inner` is held, so one handle never
    /// locks or unlocks it from two threads at once. Shared with the compaction thread.
    lock: Arc<File>,
    inner: Arc<Mutex<Inner>>,
    /// Batches waiting for a leader to write them (group commit).
    queue: Mutex<Queue>,
    /// Signalled when a leader hands out results or gives up the lead.
    turn: Condvar,
    counters: Arc<Counters>,
    /// Signalled when a batch is queued, so a test can see a group form.
    #[cfg(test)]
    queued: Condvar,
    /// Where a test holds the compaction thread.
    #[cfg(test)]
    pause: Arc<tests::Pause>,
}

#[derive(Debug)]
struct Inner {
    replica: Replica,
    report: RecoveryReport,
    /// The thread writing a snapshot, if one was started (it may have finished).
    compacting: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Queue {
    pending: Vec<Pending>,
    /// A thread is writing a group.
    leading: bool,
    next_ticket: u64,
    /// Results not yet collected by their threads.
    done: BTreeMap<u64, Result<(), StoreError>>,
}

#[derive(Debug)]
struct Pending {
    ticket: u64,
    /// The batch `frame` encodes.
    batch: Batch,
    frame: Vec<u8>,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    refused: AtomicU64,
    syncs: AtomicU64,
    compactions: AtomicU64,
    compactions_failed: AtomicU64,
}

impl Counters {
    /// Counts the outcome of a compaction done in place (under the lock).
    fn count_compaction(&self, result: Result<(), StoreError>) {
        match result {
            Ok(()) => {
                self.compactions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.compaction_failed(&e),
        }
    }

    /// Counts and logs a compaction that did not happen: the current generation goes on.
    fn compaction_failed(&self, why: &dyn std::fmt::Display) {
        self.compactions_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("compaction failed; the current generation goes on: {why}");
    }
}

impl FsStore {
    /// Opens the store in `dir`, creating the directory and an empty store if needed, with
    /// default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<FsStore, StoreError> {
        FsStore::open_with(dir, FsOptions::default())
    }

    /// Opens the store in `dir` with `options`. Recovers from a crash (see the
    /// [crate docs](crate#recovery)); what it found is in [`FsStore::recovery`].
    pub fn open_with(dir: impl AsRef<Path>, options: FsOptions) -> Result<FsStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        files::create_dir(&dir).map_err(|e| io_error(&dir, "cannot create", &e))?;
        // Refuse a directory another user could tamper with, and a foreign one, before
        // putting anything in it.
        files::check_private_dir(&dir)?;
        files::marker(&dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = files::open_or_create(&lock_path)
            .map_err(|e| io_error(&lock_path, "cannot open", &e))?;
        lock.lock()
            .map_err(|e| io_error(&lock_path, "cannot lock", &e))?;
        let counters = Counters::default();
        let opened = open_locked(&dir, options, &counters);
        let _ = lock.unlock();
        let inner = opened?;
        Ok(FsStore {
            dir,
            options,
            lock: Arc::new(lock),
            inner: Arc::new(Mutex::new(inner)),
            queue: Mutex::new(Queue::default()),
            turn: Condvar::new(),
            counters: Arc::new(counters),
            #[cfg(test)]
            queued: Condvar::new(),
            #[cfg(test)]
            pause: Arc::default(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What opening and catching up found and repaired: torn tails, quarantined frames,
    /// snapshots that had to be rebuilt. Cumulative for this handle.
    pub fn recovery(&self) -> RecoveryReport {
        self.inner().report.clone()
    }

    /// Checks every generation the directory keeps, not only the one loaded: the fallback
    /// generation's snapshot and log must read whole and rebuild the newest snapshot exactly
    /// (see the [crate docs](crate#damage-and-repair)). Returns what is wrong, with what
    /// loading and catching up found (as in [`FsStore::recovery`]); changes nothing.
    pub fn verify(&self) -> Result<RecoveryReport, StoreError> {
        let mut inner = self.inner();
        let _lock = self.lock_file(Access::Shared)?;
        let Inner {
            replica, report, ..
        } = &mut *inner;
        replica.catch_up(Access::Shared, report)?;
        let mut verified = report.clone();
        verified.fallback_damage = replica.verify_fallbacks()?;
        Ok(verified)
    }

    /// Rewrites a damaged store from what is readable, so that it accepts writes again:
    /// under the exclusive lock, it claims the next writer epoch (any earlier writer is
    /// deposed and must restore), records a `store_repaired` incident (opened and resolved at
    /// `now`) listing what was lost, and starts two new generations through the compaction
    /// path, so that neither the damaged files nor a generation built on them are needed; the
    /// damaged bytes stay in `quarantine/`. Returns `None` if [`FsStore::verify`] finds
    /// nothing to repair (nothing is written then).
    pub fn repair(&self, now: Timestamp) -> Result<Option<Repaired>, StoreError> {
        // A repair rewrites the generations a running compaction reads from.
        self.wait_for_compaction();
        let mut inner = self.inner();
        let _lock = self.lock_file(Access::Exclusive)?;
        let Inner {
            replica, report, ..
        } = &mut *inner;
        replica.catch_up(Access::Exclusive, report)?;
        let lost: Vec<Damage> = replica.damage().to_vec();
        let fallback = replica.verify_fallbacks()?;
        if lost.is_empty() && fallback.is_empty() {
            return Ok(None);
        }
        // The compactions below remove the damaged generations: keep their files first, whole,
        // for whoever wants to look at what was lost.
        let mut kept = Vec::new();
        for damage in lost.iter().chain(&fallback) {
            let Ok(bytes) = files::read(&self.dir.join(&damage.file)) else {
                continue; // a missing file has nothing to keep
            };
            let name = format!("{}.before-repair", damage.file);
            let path = files::quarantine(&self.dir, &name, &bytes)
                .map_err(|e| io_error(&self.dir.join(&name), "cannot keep", &e))?;
            kept.push(path.display().to_string());
        }
        let state = &replica.state;
        let epoch = next_writer_epoch(state.writer_epoch, state.meta.epoch);
        let id = state
            .meta
            .next_incident
            .max(state.incidents.keys().next_back().map_or(1, |id| id + 1));
        let mut lines: Vec<String> = lost.iter().map(ToString::to_string).collect();
        lines.extend(fallback.iter().map(|d| format!("{d} (nothing lost)")));
        let incident = Incident {
            id,
            kind: IncidentKind::StoreRepaired,
            opened_at: now,
            resolved_at: Some(now),
            job: None,
            run: None,
            worker: None,
            details: format!(
                "the store was rewritten from what was readable; damaged files and frames are \
                 kept in quarantine/; lost or damaged: {}",
                lines.join("; ")
            ),
            queue: None,
            opened_by: None,
            acknowledged: None,
            resolved_by: None,
            escalated_at: None,
        };
        let mut meta = state.meta;
        meta.next_incident = id + 1;
        let batch = Batch {
            id: BatchId(epoch << 32),
            at: now,
            records: vec![Record::PutIncident(incident), Record::PutMeta(meta)],
        };
        let writer = format::encode_writer(epoch).map_err(|e| StoreError::Io(e.to_string()))?;
        let frame = format::encode_batch(&batch).map_err(|e| StoreError::Io(e.to_string()))?;
        replica.state.writer_epoch = epoch;
        replica.state.apply_owned(batch.records);
        let result = replica.repair(&[writer, frame].concat());
        if result.is_err() {
            replica.invalidate();
        }
        result?;
        self.counters.compactions.fetch_add(2, Ordering::Relaxed);
        // What this handle found is dealt with; it starts a fresh account.
        *report = RecoveryReport::default();
        Ok(Some(Repaired {
            generation: replica.generation(),
            incident: id,
            lost,
            fallback,
            kept,
        }))
    }

    /// What this handle did since it was opened.
    pub fn stats(&self) -> FsStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FsStats {
            batches: get(&self.counters.batches),
            refused: get(&self.counters.refused),
            syncs: get(&self.counters.syncs),
            compactions: get(&self.counters.compactions),
            compactions_failed: get(&self.counters.compactions_failed),
        }
    }

    /// Waits until a compaction running in the background (writing the snapshot of the
    /// generation it started) has finished. Dropping the handle waits too.
    pub fn wait_for_compaction(&self) {
        let running = self.inner().compacting.take();
        if let Some(thread) = running {
            // The thread reports its own failures; a panic in it was a failed compaction.
            let _ = thread.join();
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock_inner(&self.inner)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_file(&self, access: Access) -> Result<FileLock<'_>, StoreError> {
        let locked = match access {
            Access::Shared => self.lock.lock_shared(),
            Access::Exclusive => self.lock.lock(),
        };
        locked.map_err(|e| io_error(&self.dir.join(LOCK_FILE), "cannot lock", &e))?;
        Ok(FileLock(&self.lock))
    }

    /// Catches up under the shared lock, then answers from memory.
    fn read_with<T>(&self, answer: impl FnOnce(&State) -> T) -> Result<T, StoreError> {
        let mut inner = self.inner();
        {
            let _lock = self.lock_file(Access::Shared)?;
            let Inner {
                replica, report, ..
            } = &mut *inner;
            replica.catch_up(Access::Shared, report)?;
        }
        Ok(answer(&inner.replica.state))
    }

    /// [`FsStore::read_with`], answered from a frozen copy of the state taken under the lock
    /// in O(1) (its maps share their nodes) and read after the lock is released: a read that
    /// walks many records (every job, a filtered page of the history) holds up no write. A
    /// write made while the copy lives copies the nodes it changes, as during a compaction;
    /// once the read ends the maps are the writer's alone again, and nothing is copied.
    fn read_frozen<T>(&self, answer: impl FnOnce(&State) -> T) -> Result<T, StoreError> {
        let frozen = self.read_with(State::clone)?;
        #[cfg(test)]
        self.pause.at(tests::Point::Reading);
        Ok(answer(&frozen))
    }

    /// Writes one group of queued batches (group commit). Runs on the leader's thread.
    fn lead(&self, leader: &mut Leader<'_>) {
        let mut inner = self.inner();
        let lock = self.lock_file(Access::Exclusive);
        // Everything queued while this thread waited for the locks joins the group.
        let group = std::mem::take(&mut self.queue().pending);
        leader.taken = group.iter().map(|p| p.ticket).collect();
        let _lock = match lock {
            Ok(lock) => lock,
            Err(e) => return leader.fail_all(&e),
        };
        let Inner {
            replica,
            report,
            compacting,
        } = &mut *inner;
        if let Err(e) = replica
            .catch_up(Access::Exclusive, report)
            .and_then(|()| replica.writable())
        {
            return leader.fail_all(&e);
        }
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut landed = Vec::new();
        for pending in group {
            match check_batch(&replica.state, &pending.batch) {
                Ok(()) => {
                    replica.state.apply_owned(pending.batch.records);
                    frames.push(pending.frame);
                    landed.push(pending.ticket);
                }
                Err(conflict) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    leader.results.push((pending.ticket, Err(conflict.into())));
                }
            }
        }
        if !landed.is_empty() {
            // A group of one (most of them) is appended as it was encoded, without a copy.
            let bytes = match frames.len() {
                1 => frames.swap_remove(0),
                _ => frames.concat(),
            };
            match replica.append(&bytes) {
                Ok(()) => {
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    let count = landed.len() as u64;
                    self.counters.batches.fetch_add(count, Ordering::Relaxed);
                    leader
                        .results
                        .extend(landed.into_iter().map(|ticket| (ticket, Ok(()))));
                }
                Err(e) => leader
                    .results
                    .extend(landed.into_iter().map(|ticket| (ticket, Err(e.clone())))),
            }
        }
        // The writers need not wait for a compaction.
        leader.publish();
        self.maybe_compact(replica, compacting);
    }

    /// Starts a compaction if one is due and none is running. Runs under both locks. A
    /// format-1 directory, or one whose newest snapshot was unreadable, compacts here and now
    /// (rare, and the snapshot it writes is what makes the directory whole again); otherwise
    /// the next generation starts at once and a thread writes its snapshot.
    fn maybe_compact(&self, replica: &mut Replica, compacting: &mut Option<JoinHandle<()>>) {
        let threshold = self.options.compact_after_bytes;
        if !replica.wants_compaction(threshold, self.options.compact_at_snapshot_size) {
            return;
        }
        if compacting.as_ref().is_some_and(|t| !t.is_finished()) {
            return; // one at a time: the next write after it finishes asks again
        }
        if let Some(finished) = compacting.take() {
            let _ = finished.join();
        }
        if !replica.switches_generation() {
            self.counters.count_compaction(replica.compact(threshold));
            return;
        }
        let job = match replica.switch_generation(threshold) {
            Ok(job) => job,
            Err(e) => return self.counters.compaction_failed(&e),
        };
        let background = Background {
            inner: Arc::clone(&self.inner),
            lock: Arc::clone(&self.lock),
            counters: Arc::clone(&self.counters),
            threshold,
            #[cfg(test)]
            pause: Arc::clone(&self.pause),
        };
        let spawned = std::thread::Builder::new()
            .name("keel-store-fs-compaction".into())
            .spawn(move || background.run(&job));
        match spawned {
            Ok(thread) => *compacting = Some(thread),
            // The new generation is committed and loads from the previous snapshot and its
            // logs; the next compaction writes a snapshot.
            Err(e) => self
                .counters
                .compaction_failed(&format!("cannot start its thread: {e}")),
        }
    }
}

impl Drop for FsStore {
    fn drop(&mut self) {
        // A short-lived process (a CLI command) finishes the snapshot it started.
        self.wait_for_compaction();
    }
}

/// Locks a handle's state. After a panic mid-transaction the in-memory state may not match
/// the files, which are the truth: it is reloaded at the next use.
fn lock_inner(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|poisoned| {
        inner.clear_poison();
        let mut inner = poisoned.into_inner();
        inner.replica.invalidate();
        inner
    })
}

/// What the compaction thread needs of its handle.
struct Background {
    inner: Arc<Mutex<Inner>>,
    lock: Arc<File>,
    counters: Arc<Counters>,
    threshold: u64,
    #[cfg(test)]
    pause: Arc<tests::Pause>,
}

impl Background {
    /// Writes the snapshot without any lock, then, under both locks, records it (or the
    /// failure) in the handle's replica and removes the generations no longer needed.
    fn run(&self, job: &SnapshotJob) {
        #[cfg(test)]
        self.pause.at(tests::Point::Started);
        let written = job.write(|| {
            #[cfg(test)]
            self.pause.at(tests::Point::Written);
        });
        #[cfg(test)]
        self.pause.at(tests::Point::Renamed);
        let mut inner = lock_inner(&self.inner);
        // Removing old generations needs the exclusive lock; if it cannot be had, they stay
        // until the next compaction.
        let locked = self.lock.lock().map(|()| FileLock(&self.lock));
        match written {
            Ok(bytes) => {
                if locked.is_ok() {
                    inner.replica.snapshot_written(job, bytes);
                }
                self.counters.compactions.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(generation = job.generation(), bytes, "snapshot written");
            }
            Err(e) => {
                inner.replica.snapshot_failed(job, self.threshold);
                self.counters
                    .compactions_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    generation = job.generation(),
                    "writing the snapshot failed; the generation loads from the previous \
                     snapshot and its logs, and a later compaction tries again: {e}"
                );
            }
        }
    }
}

/// Under the exclusive lock: creates the store if the directory is new, loads it, and
/// compacts at once if the newest snapshot had to be rebuilt.
fn open_locked(dir: &Path, options: FsOptions, counters: &Counters) -> Result<Inner, StoreError> {
    if let Marker::Absent = files::marker(dir)? {
        files::restrict_dir(dir).map_err(|e| io_error(dir, "cannot restrict", &e))?;
        files::write_marker(dir).map_err(|e| io_error(dir, "cannot initialise", &e))?;
    }
    let mut report = RecoveryReport::default();
    let mut replica = Replica::load(dir, Access::Exclusive, options.sync, &mut report)?;
    // A directory in format 1, or whose newest snapshot was unreadable, compacts here and now:
    // the snapshot it writes is what makes it whole. Any other compaction due is left to the
    // first write, which starts it in the background, so that opening a store whose logs grew
    // (a process killed while its compaction wrote the snapshot) does not wait for one.
    if !replica.switches_generation()
        && replica.wants_compaction(
            options.compact_after_bytes,
            options.compact_at_snapshot_size,
        )
    {
        counters.count_compaction(replica.compact(options.compact_after_bytes));
    }
    Ok(Inner {
        replica,
        report,
        compacting: None,
    })
}

impl Store for FsStore {
    fn restore(&self) -> Result<Snapshot, StoreError> {
        let mut inner = self.inner();
        let _lock = self.lock_file(Access::Exclusive)?;
        let Inner {
            replica,
            report,
            compacting,
        } = &mut *inner;
        replica.catch_up(Access::Exclusive, report)?;
        replica.writable()?;
        let epoch = next_writer_epoch(replica.state.writer_epoch, replica.state.meta.epoch);
        let frame = format::encode_writer(epoch).map_err(|e| StoreError::Io(e.to_string()))?;
        replica.append(&frame)?;
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        replica.state.writer_epoch = epoch;
        let mut snapshot = replica.state.snapshot();
        snapshot.meta.epoch = epoch - 1;
        self.maybe_compact(replica, compacting);
        Ok(snapshot)
    }

    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.apply_owned(batch.clone())
    }

    /// Keeps the caller's batch, not one decoded from the frame (`encode_batch` explains why
    /// the two are equal): its records move into the state when it is written.
    fn apply_owned(&self, batch: Batch) -> Result<(), StoreError> {
        let frame = format::encode_batch(&batch)
            .map_err(|why| StoreError::Io(format!("batch {} cannot be stored: {why}", batch.id)))?;
        let mut queue = self.queue();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push(Pending {
            ticket,
            batch,
            frame,
        });
        #[cfg(test)]
        self.queued.notify_all();
        loop {
            if let Some(result) = queue.done.remove(&ticket) {
                return result;
            }
            if queue.leading {
                queue = self
                    .turn
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            queue.leading = true;
            drop(queue);
            let mut leader = Leader {
                store: self,
                taken: BTreeSet::new(),
                results: Vec::new(),
            };
            self.lead(&mut leader);
            drop(leader);
            queue = self.queue();
        }
    }

    fn read(&self) -> Result<Snapshot, StoreError> {
        self.read_frozen(State::snapshot)
    }

    fn run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        self.read_with(|state| state.runs.get(&id).map(|run| Run::clone(run)))
    }

    fn runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        // Frozen: a filter that matches few runs may walk the whole history for a page.
        self.read_frozen(|state| {
            let upper = query.before.map_or(Bound::Unbounded, Bound::Excluded);
            let below = (Bound::Unbounded, upper);
            match &query.job {
                // One job's history: walk its index, not every stored run.
                Some(job) => {
                    let ids = state.index.runs_of_job(job, query.before).rev();
                    query.page(ids.filter_map(|id| state.runs.get(&id).map(|run| &**run)))
                }
                None => query.page(state.runs.range(below).rev().map(|(_, run)| &**run)),
            }
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.read_frozen(|state| {
            let from = query.after.map_or(0, |after| after.saturating_add(1));
            query.page(state.audit.range(from..).map(|(_, record)| &**record))
        })
    }

    fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.read_frozen(|state| state.incidents.values().cloned().collect())
    }
}

impl fmt::Debug for FsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsStore")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The held `lock` file; released on drop.
struct FileLock<'a>(&'a File);

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The thread writing a group: hands out results, and gives up the lead when dropped, even
/// if it panicked (then every batch it took gets an error instead of waiting forever).
struct Leader<'a> {
    store: &'a FsStore,
    taken: BTreeSet<u64>,
    results: Vec<(u64, Result<(), StoreError>)>,
}

impl Leader<'_> {
    fn fail_all(&mut self, error: &StoreError) {
        let answered: BTreeSet<u64> = self.results.iter().map(|(t, _)| *t).collect();
        let unanswered: Vec<u64> = self.taken.difference(&answered).copied().collect();
        self.results
            .extend(unanswered.into_iter().map(|t| (t, Err(error.clone()))));
    }

    /// Hands out the results so far and wakes their threads.
    fn publish(&mut self) {
        let mut queue = self.store.queue();
        for (ticket, result) in self.results.drain(..) {
            self.taken.remove(&ticket);
            queue.done.insert(ticket, result);
        }
        drop(queue);
        self.store.turn.notify_all();
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let unknown = StoreError::Io("the thread writing this batch panicked".to_string());
        self.fail_all(&unknown);
        self.publish();
        self.store.queue().leading = false;
        self.store.turn.notify_all();
    }
}

#[cfg(test)]
mod tests;

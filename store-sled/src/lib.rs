//! keel-store-sled: a keel [`Store`] in an embedded [sled](https://docs.rs/sled/0.34) database.
//!
//! ```
//! use keel_core::Store;
//! use keel_store_sled::SledStore;
//!
//! # fn main() -> Result<(), keel_core::StoreError> {
//! # let dir = std::env::temp_dir().join(format!("keel-store-sled-doc-{}", std::process::id()));
//! let store = SledStore::open(&dir)?;
//! let snapshot = store.restore()?; // the caller is now the store's only writer
//! assert_eq!(snapshot.meta.epoch, 0); // a fresh store: the scheduler becomes epoch 1
//! # drop(store);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```
//!
//! # Durability: process crashes yes, power loss no
//!
//! **sled 0.34 does not make writes durable across a power loss or a kernel crash.** On Linux
//! its flush ends in `sync_file_range(2)`, which starts and waits for the write-back of the
//! log's data pages but neither flushes the drive's volatile write cache nor commits the file's
//! metadata, unlike `fsync` (sled issue [#1452](https://github.com/spacejam/sled/issues/1452);
//! other systems get `fsync`).
//! A batch this store acknowledged can therefore be lost when the machine loses power, and the
//! database may not open afterwards.
//!
//! What holds: **a crashed or killed process loses nothing acknowledged, as long as the
//! operating system keeps running.** [`Store::apply`] returns `Ok` only after `Db::flush` has
//! written the batch into the log file (`pwrite`, then `sync_file_range`), and what the kernel
//! holds for a file outlives the process that wrote it. sled recovers a transaction whole or
//! not at all, so a batch is never half-applied. `tests/crash.rs` kills a writer with SIGKILL
//! in the middle of its writes and checks both.
//!
//! # One process at a time
//!
//! sled takes an exclusive lock on the database directory; a second [`SledStore::open`] of the
//! same directory fails with [`StoreError::Io`] (after waiting a second for the lock) until
//! the first handle is dropped, whether the second open comes from another process or the
//! same one. Several processes can therefore
//! never share this store (the cross-process guarantees of SPEC L6 hold trivially, because the
//! case cannot arise), and a management command cannot read the store while a daemon has it
//! open. Within a process, share one store by cloning it: clones share the database and the
//! write lock.
//!
//! # When to use keel-store-fs instead
//!
//! `keel-store-fs` is keel's default store, and the one to prefer unless you have a reason to
//! pick this one: it `fsync`s every acknowledged write, so use it whenever a write must
//! survive a power loss or a kernel crash, and it is built for several processes on one data
//! directory, so use it whenever more than one process must open the store (the daemon,
//! management commands, external workers). This store fits when process-crash safety is enough, one process owns the store,
//! and you want an ordered embedded database whose history queries are index range scans.
//!
//! # Layout
//!
//! One sled tree per kind of record; every value is JSON, every number in a key big-endian (so
//! key order is numeric order), every timestamp in a key sign-flipped first.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `format`, `writer_epoch`, `meta`, `stamp` | the format marker (`keel-store-sled 1`), the writer epoch, the scheduler's counters ([`Meta`]), the count of applied batches |
//! | `jobs`, `tombstones` | job name | [`Job`], [`Tombstone`] |
//! | `runs` | run id | [`Run`], terminal ones included until pruned |
//! | `audit` | seq | [`AuditRecord`] |
//! | `slots` | job, NUL, slot | the [`RunId`] that claimed the slot (SPEC S6); pruned with its run |
//! | `incidents`, `deliveries` | id | [`Incident`], [`Delivery`] |
//! | `active_runs` | run id | empty: the runs that are not terminal (what `restore` returns) |
//! | `finished_runs` | job, NUL, finished at, run id | empty: the terminal runs `PruneHistory` chooses from |
//! | `run_audit` | run id, seq | empty: a run's audit records (deleted with the run) |
//!
//! A store whose `format` marker is not `keel-store-sled 1` is refused with
//! [`StoreError::Version`].
//!
//! # How a batch is applied
//!
//! sled transactions span trees atomically but cannot iterate, and `PruneHistory` must scan a
//! job's terminal runs. So [`Store::apply`], holding the store's write lock (a mutex shared by
//! clones):
//!
//! 1. checks the [write rules](keel_core::store#write-rules) against the committed state and
//!    refuses the batch early if they fail;
//! 2. applies every record in order to an in-memory overlay of the committed trees, scanning
//!    the indexes where a prune needs to; the result is the batch's write set;
//! 3. in one sled transaction over every tree: reads what [`check_batch`] needs through the
//!    transaction and checks the rules again (the check that counts: against what is stored at
//!    write time), then writes the write set and increments the `stamp`;
//! 4. flushes the database, and only then returns `Ok`.
//!
//! Step 2 reads outside the transaction, which is sound only if nothing commits between steps
//! 2 and 3. The write lock guarantees it within the process, and sled's directory lock rules
//! out other processes. The transaction also checks that the `stamp` it reads is the one step
//! 2 started from, and stages the batch again if not, so even two stores built with
//! [`SledStore::from_db`] over one database never commit a stale write set.
//!
//! # Corrupt data
//!
//! A value that does not decode is reported as [`StoreError::Corrupt`] naming its tree and key;
//! nothing panics on stored data. Queries that do not touch the bad value still answer.
//! [`Store::restore`] and [`Store::read`] fail rather than leave out a record they cannot
//! decode: a scheduler restored without a job or a run would silently forget it.
//!
//! # File permissions
//!
//! [`SledStore::open`] creates a missing directory owner-only (0700) and makes sled's files in
//! it (`conf`, `db`, `snap.*`, `blobs/`) owner-only (0600), as SPEC T4 asks. Snapshots sled
//! writes while the store is open get the process umask until the next open, inside that
//! private directory. An existing directory keeps its mode, and nothing else in it is touched.
//!
//! [`check_batch`]: keel_core::store::check_batch

#![warn(missing_docs)]

mod keys;
mod stage;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use keel_core::store::{check_batch, next_writer_epoch, AuditQuery, RunPage, RunQuery};
use keel_core::{
    AuditRecord, Batch, Delivery, Incident, Job, Meta, Run, RunId, Snapshot, Store, StoreError,
    Tombstone,
};
use serde::de::DeserializeOwned;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
    UnabortableTransactionError,
};
use sled::IVec;

use crate::keys::{
    corrupt, id_key, parse_run_audit_key, run_audit_key, TreeId, FORMAT, META_FORMAT, META_META,
    META_STAMP, META_WRITER_EPOCH,
};
use crate::stage::{decode, encode, sled_error, Prefetched, Stage, Trees};

/// How long [`SledStore::open`] waits for sled's directory lock. A sled database dropped in
/// this process releases the lock only when sled's background I/O for it has finished, a few
/// milliseconds later when other sled databases are busy, so a store dropped and reopened at
/// once would otherwise fail spuriously. A lock held by another process is reported after
/// this wait.
const OPEN_LOCK_WAIT_MAX: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to take the lock.
const OPEN_LOCK_RETRY_MAX: Duration = Duration::from_millis(50);

/// How many times `apply` stages a batch again because another store over the same database
/// committed meanwhile. Only stores built with [`SledStore::from_db`] over one database can
/// race like this; clones share the write lock and never do.
const STALE_RETRIES_MAX: usize = 8;

/// A keel store in a sled database. Cheap to clone; clones share the database and the write
/// lock. See the [crate docs](crate) for what it guarantees and what it does not.
#[derive(Clone)]
pub struct SledStore {
    shared: Arc<Shared>,
}

struct Shared {
    db: sled::Db,
    trees: Trees,
    /// Held by `apply`, `restore` and `read`: writes are staged against a state nothing else
    /// changes, and a snapshot is one consistent cut.
    writer: Mutex<()>,
    /// The directory, if the store was opened from one.
    path: Option<PathBuf>,
}

impl SledStore {
    /// Opens (or creates) the store in directory `dir`. Fails with [`StoreError::Io`] if
    /// another handle, in this process or another, has it open, and with
    /// [`StoreError::Version`] if it holds another format.
    pub fn open(dir: impl AsRef<Path>) -> Result<SledStore, StoreError> {
        let dir = dir.as_ref();
        create_private_dir(dir)?;
        let db = open_db(dir)?;
        restrict_files(dir)?;
        SledStore::with_db(db, Some(dir.to_owned()))
    }

    /// A store in a database opened by the caller (say with a tuned [`sled::Config`]). The
    /// database must hold nothing but this store's trees. Open one `SledStore` per database
    /// and clone it: clones share the write lock.
    pub fn from_db(db: sled::Db) -> Result<SledStore, StoreError> {
        SledStore::with_db(db, None)
    }

    /// A store in a temporary database, deleted when the last clone is dropped. sled never
    /// syncs a temporary database: for tests and benchmarks only.
    pub fn temporary() -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(sled_error)?;
        SledStore::from_db(db)
    }

    fn with_db(db: sled::Db, path: Option<PathBuf>) -> Result<SledStore, StoreError> {
        let mut trees = Vec::with_capacity(TreeId::ALL.len());
        for tree in TreeId::ALL {
            trees.push(db.open_tree(tree.name()).map_err(sled_error)?);
        }
        let trees: Trees = trees
            .try_into()
            .map_err(|_| StoreError::Io("sled returned the wrong number of trees".to_owned()))?;
        let store = SledStore {
            shared: Arc::new(Shared {
                db,
                trees,
                writer: Mutex::new(()),
                path,
            }),
        };
        store.check_format()?;
        Ok(store)
    }

    /// Writes the format marker into a new store, or refuses a store of another format.
    fn check_format(&self) -> Result<(), StoreError> {
        let meta = self.tree(TreeId::Meta);
        match meta.get(META_FORMAT).map_err(sled_error)? {
            Some(found) if found.as_ref() == FORMAT.as_bytes() => Ok(()),
            Some(found) => Err(StoreError::Version {
                found: String::from_utf8_lossy(&found).into_owned(),
                supported: FORMAT.to_owned(),
            }),
            None => {
                // A store without a marker must be new: a keel store is marked before its
                // first record is written.
                for tree in TreeId::ALL {
                    if !self.tree(tree).is_empty() {
                        return Err(StoreError::Version {
                            found: format!("no format marker, but tree {:?} has data", tree.name()),
                            supported: FORMAT.to_owned(),
                        });
                    }
                }
                meta.insert(META_FORMAT, FORMAT.as_bytes())
                    .map_err(sled_error)?;
                self.flush()
            }
        }
    }

    fn tree(&self, tree: TreeId) -> &sled::Tree {
        &self.shared.trees[tree.index()]
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data, only the order of writes; a panic while it was held left
        // nothing half-done (sled transactions are atomic), so a poisoned lock is still good.
        self.shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.shared.db.flush().map_err(sled_error)?;
        Ok(())
    }

    /// The committed value at `key` of `tree`, decoded.
    fn get<T: DeserializeOwned>(&self, tree: TreeId, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.tree(tree)
            .get(key)
            .map_err(sled_error)?
            .map(|bytes| decode(tree, key, &bytes))
            .transpose()
    }

    /// Every value of `tree`, decoded, in key order.
    fn values<T: DeserializeOwned>(&self, tree: TreeId) -> Result<Vec<T>, StoreError> {
        let mut values = Vec::new();
        for item in self.tree(tree).iter() {
            let (key, bytes) = item.map_err(sled_error)?;
            values.push(decode(tree, &key, &bytes)?);
        }
        Ok(values)
    }

    /// The stored counters (defaults before the first `PutMeta`).
    fn meta(&self) -> Result<Meta, StoreError> {
        Ok(self.get(TreeId::Meta, META_META)?.unwrap_or_default())
    }

    fn stamp(&self) -> Result<u64, StoreError> {
        Ok(self.get(TreeId::Meta, META_STAMP)?.unwrap_or(0))
    }

    /// What `restore` and `read` return, with `meta.epoch` set to `epoch`.
    fn snapshot(&self, epoch: u64) -> Result<Snapshot, StoreError> {
        let mut runs = Vec::new();
        for item in self.tree(TreeId::Active).iter() {
            let (key, _) = item.map_err(sled_error)?;
            let Some(run) = self.get::<Run>(TreeId::Runs, &key)? else {
                return Err(corrupt(
                    TreeId::Active,
                    &key,
                    "the index lists a run that is not stored",
                ));
            };
            if !run.state().is_terminal() {
                runs.push(run);
            }
        }
        let incidents: Vec<Incident> = self.values(TreeId::Incidents)?;
        Ok(Snapshot {
            jobs: self.values::<Job>(TreeId::Jobs)?,
            runs,
            meta: Meta {
                epoch,
                ..self.meta()?
            },
            tombstones: self.values::<Tombstone>(TreeId::Tombstones)?,
            incidents: incidents
                .into_iter()
                .filter(|i| i.resolved_at.is_none())
                .collect(),
            deliveries: self.values::<Delivery>(TreeId::Deliveries)?,
        })
    }

    /// Commits a staged batch in one transaction, if the write rules still hold and nothing
    /// was committed since `stamp`.
    fn commit(&self, batch: &Batch, stamp: u64, stage: &Stage<'_>) -> Result<(), Abort> {
        let trees: &[sled::Tree] = &self.shared.trees;
        let result = trees.transaction(|tx: &Vec<TransactionalTree>| {
            commit_in(tx, batch, stamp, stage).map_err(ConflictableTransactionError::Abort)
        });
        result.map_err(|e| match e {
            TransactionError::Abort(abort) => abort,
            TransactionError::Storage(e) => Abort::Failed(sled_error(e)),
        })
    }
}

impl Store for SledStore {
    fn restore(&self) -> Result<Snapshot, StoreError> {
        let _writer = self.lock();
        let epoch = self
            .tree(TreeId::Meta)
            .transaction(|tx| {
                let get = |key: &[u8]| tx.get(key).map_err(tx_error);
                let raise = || -> Result<u64, StoreError> {
                    let writer =
                        decode_or(TreeId::Meta, META_WRITER_EPOCH, get(META_WRITER_EPOCH)?, 0)?;
                    let meta: Meta =
                        decode_or(TreeId::Meta, META_META, get(META_META)?, Meta::default())?;
                    let epoch = next_writer_epoch(writer, meta.epoch);
                    tx.insert(META_WRITER_EPOCH, encode(&epoch)?)
                        .map_err(tx_error)?;
                    Ok(epoch)
                };
                raise().map_err(ConflictableTransactionError::Abort)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => sled_error(e),
            })?;
        self.flush()?;
        tracing::info!(epoch, "sled store: new writer epoch");
        // The scheduler adds one to the snapshot's epoch: that is the epoch now accepted.
        self.snapshot(epoch - 1)
    }

    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let _writer = self.lock();
        for _ in 0..STALE_RETRIES_MAX {
            let stamp = self.stamp()?;
            // Refuse early (a deposed writer's batch need not be staged); the transaction
            // checks again against what is stored at write time.
            let committed = Prefetched::load(batch, |tree, key| {
                self.tree(tree).get(key).map_err(sled_error)
            })?;
            if let Err(conflict) = check_batch(&committed, batch) {
                tracing::debug!(batch = %batch.id, %conflict, "sled store: batch refused");
                return Err(conflict.into());
            }
            let stage = Stage::build(&self.shared.trees, batch)?;
            match self.commit(batch, stamp, &stage) {
                Ok(()) => return self.flush(),
                Err(Abort::Stale) => {
                    tracing::warn!(
                        batch = %batch.id,
                        "sled store: another store over this database committed meanwhile; \
                         staging the batch again"
                    );
                }
                Err(Abort::Failed(error)) => return Err(error),
            }
        }
        Err(StoreError::Io(format!(
            "{} was staged {STALE_RETRIES_MAX} times and each time another store over the same \
             sled database committed first; open one SledStore per database and clone it",
            batch.id
        )))
    }

    fn read(&self) -> Result<Snapshot, StoreError> {
        let _writer = self.lock();
        // The counters as stored, like the reference store: `restore` alone reports the epoch
        // before the writer it creates.
        self.snapshot(self.meta()?.epoch)
    }

    fn run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        self.get(TreeId::Runs, &id_key(id.0))
    }

    fn runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let runs = self.tree(TreeId::Runs);
        let newest_first = match query.before {
            Some(before) => runs.range(..id_key(before.0)).rev(),
            None => runs.iter().rev(),
        };
        // One run more than a page, so `page` can tell whether there is a next one.
        let wanted = query.page_size().saturating_add(1);
        let mut matching = Vec::new();
        for item in newest_first {
            let (key, bytes) = item.map_err(sled_error)?;
            let run: Run = decode(TreeId::Runs, &key, &bytes)?;
            if query.matches(&run) {
                matching.push(run);
                if matching.len() == wanted {
                    break;
                }
            }
        }
        Ok(query.page(&matching))
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let first = match query.after {
            None => 0,
            Some(after) => match after.checked_add(1) {
                Some(first) => first,
                None => return Ok(Vec::new()),
            },
        };
        let size = query.page_size();
        let mut matching = Vec::new();
        let mut offer = |record: AuditRecord| {
            if query.matches(&record) {
                matching.push(record);
            }
            matching.len() < size
        };
        match query.run {
            // One run's records, through its index.
            Some(run) => {
                let prefix = id_key(run.0);
                for item in self
                    .tree(TreeId::RunAudit)
                    .range(run_audit_key(run, first)..)
                {
                    let (index_key, _) = item.map_err(sled_error)?;
                    if !index_key.starts_with(&prefix) {
                        break;
                    }
                    let Some(seq) = parse_run_audit_key(&index_key) else {
                        return Err(corrupt(
                            TreeId::RunAudit,
                            &index_key,
                            "not an index key of an audit record",
                        ));
                    };
                    // Pruned since the index was read, or the seq was reused: skip it.
                    let Some(record) = self.get::<AuditRecord>(TreeId::Audit, &id_key(seq))? else {
                        continue;
                    };
                    if !offer(record) {
                        break;
                    }
                }
            }
            None => {
                for item in self.tree(TreeId::Audit).range(id_key(first)..) {
                    let (key, bytes) = item.map_err(sled_error)?;
                    if !offer(decode(TreeId::Audit, &key, &bytes)?) {
                        break;
                    }
                }
            }
        }
        Ok(query.page(&matching))
    }

    fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.values(TreeId::Incidents)
    }
}

impl fmt::Debug for SledStore {
    // Not derived: sled's own `Debug` prints every key and value of the database.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// Why a commit did not happen.
#[derive(Debug)]
enum Abort {
    /// Another store over the database committed after the batch was staged.
    Stale,
    /// The batch was refused, or the store failed.
    Failed(StoreError),
}

impl From<StoreError> for Abort {
    fn from(error: StoreError) -> Self {
        Abort::Failed(error)
    }
}

/// The body of [`SledStore::commit`]'s transaction.
fn commit_in(
    tx: &[TransactionalTree],
    batch: &Batch,
    stamp: u64,
    stage: &Stage<'_>,
) -> Result<(), Abort> {
    let get = |tree: TreeId, key: &[u8]| tx[tree.index()].get(key).map_err(tx_error);
    let current = decode_or(TreeId::Meta, META_STAMP, get(TreeId::Meta, META_STAMP)?, 0)?;
    if current != stamp {
        return Err(Abort::Stale);
    }
    let stored = Prefetched::load(batch, get)?;
    check_batch(&stored, batch).map_err(StoreError::from)?;
    for (tree, writes) in TreeId::ALL.iter().zip(stage.writes()) {
        let tree = &tx[tree.index()];
        for (key, value) in writes {
            match value {
                Some(value) => tree.insert(key.as_slice(), value.as_slice()),
                None => tree.remove(key.as_slice()),
            }
            .map_err(tx_error)?;
        }
    }
    tx[TreeId::Meta.index()]
        .insert(META_STAMP, encode(&stamp.wrapping_add(1))?)
        .map_err(tx_error)?;
    Ok(())
}

/// A failed read or write inside a sled transaction, as a store error.
fn tx_error(error: UnabortableTransactionError) -> StoreError {
    match error {
        UnabortableTransactionError::Storage(e) => sled_error(e),
        // sled 0.34 never reports a conflict from a read or write (its transactions hold a
        // process-wide lock), so this is an internal error rather than a retry.
        UnabortableTransactionError::Conflict => {
            StoreError::Io("sled reported a transaction conflict".to_owned())
        }
    }
}

/// Decodes an optional stored value, or returns `default` if there is none.
fn decode_or<T: DeserializeOwned>(
    tree: TreeId,
    key: &[u8],
    bytes: Option<IVec>,
    default: T,
) -> Result<T, StoreError> {
    match bytes {
        Some(bytes) => decode(tree, key, &bytes),
        None => Ok(default),
    }
}

/// Opens the sled database in `dir`, waiting up to [`OPEN_LOCK_WAIT_MAX`] for its lock.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let error = match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(error) => error,
        };
        // sled reports a held lock as an `Other` I/O error with this message (0.34).
        let locked = matches!(&error, sled::Error::Io(e) if e.kind() == std::io::ErrorKind::Other
            && e.to_string().contains("could not acquire lock"));
        if locked && started.elapsed() < OPEN_LOCK_WAIT_MAX {
            std::thread::sleep(pause);
            pause = (pause * 2).min(OPEN_LOCK_RETRY_MAX);
            continue;
        }
        let hint = if locked {
            "; another process, or another SledStore in this one, has it open"
        } else {
            ""
        };
        return Err(StoreError::Io(format!(
            "cannot open {}: {error}{hint}",
            dir.display()
        )));
    }
}

/// Creates `dir` (and missing parents) if it does not exist; the store directory itself is
/// owner-only.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let io = |e: std::io::Error| StoreError::Io(format!("cannot create {}: {e}", dir.display()));
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io(e)),
        _ => Ok(()),
    }
}

/// Makes sled's files in `dir` owner-only: `conf`, `db`, its snapshots (`snap.*`) and the
/// `blobs` directory with what is in it. Nothing else in the directory is touched.
#[cfg(unix)]
fn restrict_files(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |path: &Path, e: std::io::Error| {
        StoreError::Io(format!("cannot restrict {}: {e}", path.display()))
    };
    let restrict = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(path, e))
    };
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| io(&path, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind.is_file() && (name == "conf" || name == "db" || name.starts_with("snap.")) {
            restrict(&path, 0o600)?;
        } else if kind.is_dir() && name == "blobs" {
            restrict(&path, 0o700)?;
            for blob in std::fs::read_dir(&path).map_err(|e| io(&path, e))? {
                let blob = blob.map_err(|e| io(&path, e))?;
                if blob.file_type().map_err(|e| io(&blob.path(), e))?.is_file() {
                    restrict(&blob.path(), 0o600)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict_files(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

#[cfg(test)]
mod tests;

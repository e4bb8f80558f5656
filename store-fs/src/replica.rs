//! One handle's copy of the stored state, and where it stands in the files: loading it,
//! catching up with other handles' writes, appending, and compacting.
//!
//! Every method here runs with the directory's `lock` file held by the caller: shared for
//! loading and catching up to read, exclusive for anything that writes (appending,
//! truncating a torn tail, creating a missing log, compacting).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use keel_core::StoreError;

use crate::files::{
    generations, io_error, log_name, obsolete_files, open_or_create, owner_only, quarantine,
    snapshot_name, sync_dir,
};
use crate::format::{decode_log, LogFrame};
use crate::recovery::{Quarantined, RecoveryReport, SnapshotFallback, TornTail};
use crate::state::State;

/// How the caller holds the directory's lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Others may read meanwhile; nothing may change the files.
    Shared,
    /// Nobody else uses the files meanwhile.
    Exclusive,
}

/// The state as of `offset` bytes into the log of `generation`.
#[derive(Debug)]
pub(crate) struct Replica {
    dir: PathBuf,
    pub(crate) state: State,
    generation: u64,
    /// The generation whose snapshot the state was built from (0: the empty start), or last
    /// written by this handle: the oldest generation recovery could need.
    base: u64,
    /// The log of `generation`; `None` while it does not exist (a compaction was interrupted
    /// between writing the snapshot and creating the log, and no writer came since).
    log: Option<File>,
    offset: u64,
    /// The files changed in a way this handle cannot follow incrementally (a failed write, a
    /// log shorter than what was read): reload everything before the next use.
    stale: bool,
    /// The newest snapshot was unusable when the state was loaded: compact at the next
    /// chance, so two good snapshots exist again.
    degraded: bool,
    /// No compaction is attempted before the log reaches this size (set after one failed).
    compact_floor: u64,
    /// The size of the snapshot the state was built on. The log must grow at least this much
    /// before the next compaction, so that rewriting the whole state costs no more than what
    /// was appended since: with a fixed threshold, a store of a million jobs rewrote its
    /// whole state every few seconds while they were added, and the adds were quadratic.
    snapshot_bytes: u64,
    /// Appends and compactions are fsynced (`FsOptions::sync`).
    sync: bool,
}

impl Replica {
    /// Loads the newest generation: its snapshot and log, or, if that snapshot is missing or
    /// unusable, the newest older snapshot that loads and every log since.
    pub(crate) fn load(
        dir: &Path,
        access: Access,
        sync: bool,
        report: &mut RecoveryReport,
    ) -> Result<Replica, StoreError> {
        let on_disk = generations(dir).map_err(|e| io_error(dir, "cannot list", &e))?;
        let newest = on_disk.last().copied().unwrap_or(0);
        let oldest = on_disk.first().copied().unwrap_or(0);

        let mut unusable = Vec::new();
        let mut base = newest;
        let mut state = loop {
            match read_snapshot(dir, base) {
                Ok(state) => break state,
                Err(reason) => {
                    if access == Access::Exclusive && reason != MISSING {
                        keep_bad_snapshot(dir, base);
                    }
                    unusable.push((base, reason));
                    if base <= oldest {
                        return Err(StoreError::Corrupt {
                            location: dir.join(snapshot_name(newest)).display().to_string(),
                            detail: format!(
                                "no usable snapshot, and the logs needed to rebuild without one \
                                 are gone: {}",
                                describe(&unusable)
                            ),
                        });
                    }
                    base -= 1;
                }
            }
        };

        let snapshot_bytes = fs::metadata(dir.join(snapshot_name(base))).map_or(0, |m| m.len());
        let mut log = None;
        let mut offset = 0;
        for generation in base..=newest {
            let path = dir.join(log_name(generation));
            let newest_log = generation == newest;
            let file = if newest_log && access == Access::Exclusive {
                let existed = path.exists();
                let file = open_or_create(&path).map_err(|e| io_error(&path, "cannot open", &e))?;
                if !existed {
                    sync_dir(dir).map_err(|e| io_error(dir, "cannot sync", &e))?;
                }
                Some(file)
            } else {
                open_existing(&path)?
            };
            let Some(mut file) = file else {
                if newest_log {
                    continue;
                }
                return Err(StoreError::Corrupt {
                    location: path.display().to_string(),
                    detail: format!(
                        "the log is missing, and the state cannot be rebuilt without it ({})",
                        describe(&unusable)
                    ),
                });
            };
            let repair = newest_log && access == Access::Exclusive;
            let end = replay_log(dir, generation, &mut file, 0, &mut state, repair, report)?;
            if newest_log {
                log = Some(file);
                offset = end;
            }
        }
        for (generation, reason) in &unusable {
            report.snapshot_fallback(SnapshotFallback {
                generation: *generation,
                reason: reason.clone(),
                restored_from: base,
            });
        }
        Ok(Replica {
            dir: dir.to_path_buf(),
            state,
            generation: newest,
            base,
            log,
            offset,
            stale: false,
            degraded: !unusable.is_empty(),
            compact_floor: 0,
            snapshot_bytes,
            sync,
        })
    }

    /// Applies whatever other handles wrote since this one last looked. If the generation
    /// moved on (another handle compacted) or the files changed in a way that cannot be
    /// followed, reloads from the newest snapshot.
    pub(crate) fn catch_up(
        &mut self,
        access: Access,
        report: &mut RecoveryReport,
    ) -> Result<(), StoreError> {
        if !self.stale && !self.generation_moved()? {
            match self.read_new_frames(access, report) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.stale = true;
                    return Err(e);
                }
            }
        }
        self.stale = true;
        *self = Replica::load(&self.dir, access, self.sync, report)?;
        Ok(())
    }

    /// Appends frames to the log and makes them durable. On failure the frames are taken
    /// back if possible, and the handle reloads before its next use: the state it applied
    /// them to may not match the files.
    pub(crate) fn append(&mut self, frames: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(log_name(self.generation));
        let log = match &mut self.log {
            Some(log) => log,
            None => {
                let log =
                    open_or_create(&path).map_err(|e| io_error(&path, "cannot create", &e))?;
                sync_dir(&self.dir).map_err(|e| io_error(&self.dir, "cannot sync", &e))?;
                self.log.insert(log)
            }
        };
        let start = self.offset;
        let sync = self.sync;
        let written = log
            .seek(SeekFrom::Start(start))
            .and_then(|_| log.write_all(frames))
            .and_then(|()| if sync { log.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.offset += frames.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = log.set_len(start);
                self.stale = true;
                Err(io_error(&path, "cannot append to", &e))
            }
        }
    }

    /// Forgets the in-memory state: the next use reloads it from the files.
    pub(crate) fn invalidate(&mut self) {
        self.stale = true;
    }

    /// True if a writer should compact now: the log passed `threshold` bytes (and, with
    /// `at_snapshot_size`, the size of the snapshot the state was built on) and is not empty,
    /// or the load had to fall back past an unusable snapshot.
    pub(crate) fn wants_compaction(&self, threshold: u64, at_snapshot_size: bool) -> bool {
        let snapshot = if at_snapshot_size {
            self.snapshot_bytes
        } else {
            0
        };
        let due = threshold.max(snapshot).max(self.compact_floor);
        let grown = self.offset > 0 && self.offset >= due;
        !self.stale && (self.degraded || grown)
    }

    /// Starts the next generation: writes the whole state as its snapshot, creates its empty
    /// log, and removes the generations recovery can no longer need. Requires the exclusive
    /// lock and a caught-up state.
    pub(crate) fn compact(&mut self, threshold: u64) -> Result<(), StoreError> {
        let result = self.compact_once();
        if result.is_err() {
            // Retry after the log grew by another threshold's worth, not on every write.
            self.compact_floor = self.offset.saturating_add(threshold.max(1));
        }
        result
    }

    fn compact_once(&mut self) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let next = self.generation + 1;
        let path = dir.join(snapshot_name(next));
        let tmp = dir.join(format!("{}.tmp", snapshot_name(next)));
        // The snapshot is complete and durable before it gets its name.
        let snapshot_bytes = match self.write_snapshot(&tmp, next) {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_error(&tmp, "cannot write", &e));
            }
        };
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(&path, "cannot create", &e));
        }
        // From here on the new generation exists: other handles move to it, and so must this
        // one, if only by reloading.
        let new_log = dir.join(log_name(next));
        let sync_dir = |dir: &Path| if self.sync { sync_dir(dir) } else { Ok(()) };
        let switched = sync_dir(&dir)
            .and_then(|()| owner_only().create_new(true).open(&new_log))
            .and_then(|log| sync_dir(&dir).map(|()| log));
        let log = match switched {
            Ok(log) => log,
            Err(e) => {
                self.stale = true;
                return Err(io_error(&new_log, "cannot create", &e));
            }
        };
        let keep_from = self.base;
        self.generation = next;
        self.base = next;
        self.log = Some(log);
        self.offset = 0;
        self.degraded = false;
        self.compact_floor = 0;
        self.snapshot_bytes = snapshot_bytes;
        tracing::debug!(generation = next, snapshot_bytes, "compacted");
        self.remove_obsolete(keep_from);
        Ok(())
    }

    /// Writes the snapshot and returns its size in bytes.
    fn write_snapshot(&self, path: &Path, generation: u64) -> io::Result<u64> {
        let file = owner_only().create(true).truncate(true).open(path)?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        self.state.write_snapshot(&mut out, generation)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if self.sync {
            file.sync_all()?;
        }
        Ok(file.metadata()?.len())
    }

    /// Removes generations older than `keep_from` (the last one whose snapshot is known
    /// good, so the newest snapshot can always be rebuilt without) and leftover temporary
    /// snapshots. Failing to remove is harmless: the next compaction tries again.
    fn remove_obsolete(&self, keep_from: u64) {
        let doomed = match obsolete_files(&self.dir, keep_from) {
            Ok(doomed) => doomed,
            Err(e) => {
                tracing::warn!("cannot list old generations: {e}");
                return;
            }
        };
        for path in &doomed {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        if !doomed.is_empty() {
            let _ = sync_dir(&self.dir);
        }
    }

    /// True if a newer generation than this handle's exists: the next one has a snapshot or
    /// a log, or this handle's log is gone (removed by a compaction two or more generations
    /// on, which may have removed the next generation too). A log that does not exist yet
    /// (see `log`) also counts: reloading then finds the same generation, at some cost, until
    /// a writer creates the log.
    fn generation_moved(&self) -> Result<bool, StoreError> {
        let exists = |name: String| {
            let path = self.dir.join(name);
            path.try_exists()
                .map_err(|e| io_error(&path, "cannot check", &e))
        };
        let Some(next) = self.generation.checked_add(1) else {
            return Ok(false);
        };
        Ok(exists(snapshot_name(next))?
            || exists(log_name(next))?
            || !exists(log_name(self.generation))?)
    }

    /// Reads frames appended since `offset`. Returns false if the log is shorter than what
    /// was already read (the files changed behind the store's back: reload).
    fn read_new_frames(
        &mut self,
        access: Access,
        report: &mut RecoveryReport,
    ) -> Result<bool, StoreError> {
        let path = self.dir.join(log_name(self.generation));
        if self.log.is_none() {
            self.log = match access {
                Access::Exclusive => {
                    let log =
                        open_or_create(&path).map_err(|e| io_error(&path, "cannot create", &e))?;
                    sync_dir(&self.dir).map_err(|e| io_error(&self.dir, "cannot sync", &e))?;
                    Some(log)
                }
                Access::Shared => open_existing(&path)?,
            };
        }
        let Some(log) = &mut self.log else {
            return Ok(true);
        };
        let len = log
            .metadata()
            .map_err(|e| io_error(&path, "cannot stat", &e))?
            .len();
        if len < self.offset {
            tracing::warn!(
                file = %path.display(),
                len,
                read = self.offset,
                "the log is shorter than what was read; reloading"
            );
            return Ok(false);
        }
        let repair = access == Access::Exclusive;
        self.offset = replay_log(
            &self.dir,
            self.generation,
            log,
            self.offset,
            &mut self.state,
            repair,
            report,
        )?;
        Ok(true)
    }
}

const MISSING: &str = "missing";

/// The state a generation starts from: its snapshot, or the empty state for generation 0.
fn read_snapshot(dir: &Path, generation: u64) -> Result<State, String> {
    if generation == 0 {
        return Ok(State::default());
    }
    let path = dir.join(snapshot_name(generation));
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MISSING.to_string()),
        Err(e) => return Err(format!("cannot open: {e}")),
    };
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    State::read_snapshot(BufReader::with_capacity(1 << 16, file), len, generation)
        .map_err(|e| e.to_string())
}

/// Copies an unusable snapshot to `quarantine/` before a later compaction removes it.
fn keep_bad_snapshot(dir: &Path, generation: u64) {
    let name = snapshot_name(generation);
    let copied =
        fs::read(dir.join(&name)).and_then(|bytes| quarantine(dir, &format!("{name}.bad"), &bytes));
    if let Err(e) = copied {
        tracing::warn!("cannot quarantine {name}: {e}");
    }
}

fn describe(unusable: &[(u64, String)]) -> String {
    unusable
        .iter()
        .map(|(generation, reason)| format!("{}: {reason}", snapshot_name(*generation)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Opens a file for reading and writing if it exists.
fn open_existing(path: &Path) -> Result<Option<File>, StoreError> {
    match owner_only().open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, "cannot open", &e)),
    }
}

/// Replays the log of `generation` from byte `from` (a frame boundary) into `state`:
/// corrupt frames are quarantined and skipped, a torn tail is truncated if `repair` (the
/// caller holds the exclusive lock and this is the newest log) and otherwise left alone.
/// Returns where the readable log ends.
fn replay_log(
    dir: &Path,
    generation: u64,
    log: &mut File,
    from: u64,
    state: &mut State,
    repair: bool,
    report: &mut RecoveryReport,
) -> Result<u64, StoreError> {
    let name = log_name(generation);
    let path = dir.join(&name);
    let len = log
        .metadata()
        .map_err(|e| io_error(&path, "cannot stat", &e))?
        .len();
    if len <= from {
        return Ok(from);
    }
    let size = usize::try_from(len - from)
        .map_err(|_| StoreError::Io(format!("{} is too large to read", path.display())))?;
    let mut bytes = vec![0; size];
    log.seek(SeekFrom::Start(from))
        .and_then(|_| log.read_exact(&mut bytes))
        .map_err(|e| io_error(&path, "cannot read", &e))?;

    let scan = decode_log(&bytes);
    for entry in scan.entries {
        match entry.frame {
            LogFrame::Batch { records, .. } => state.apply(&records),
            LogFrame::Writer { epoch } => state.writer_epoch = epoch,
        }
    }
    let span = |offset: u64, len: u64| {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX);
        bytes.get(start..end).unwrap_or_default()
    };
    for bad in &scan.corrupt {
        let offset = from + bad.offset;
        let copy = quarantine(
            dir,
            &format!("{name}-{offset}.bad"),
            span(bad.offset, bad.len),
        )
        .map_err(|e| tracing::warn!("cannot quarantine {name} at {offset}: {e}"))
        .ok();
        report.quarantined(Quarantined {
            file: name.clone(),
            offset,
            len: bad.len,
            reason: bad.reason.clone(),
            copy,
        });
    }
    if let Some(tail) = &scan.torn_tail {
        let offset = from + tail.offset;
        let mut copy = None;
        if repair {
            // A torn tail is a write that was never acknowledged; its bytes are kept for
            // inspection if they can be, but a failed copy does not stop the repair.
            copy = quarantine(
                dir,
                &format!("{name}-{offset}.torn"),
                span(tail.offset, tail.len),
            )
            .map_err(|e| tracing::warn!("cannot keep the torn tail of {name}: {e}"))
            .ok();
            log.set_len(offset)
                .and_then(|()| log.sync_all())
                .map_err(|e| io_error(&path, "cannot truncate", &e))?;
        }
        report.torn_tail(TornTail {
            file: name.clone(),
            offset,
            len: tail.len,
            reason: tail.reason.clone(),
            truncated: repair,
            copy,
        });
    }
    Ok(from + scan.valid_len)
}

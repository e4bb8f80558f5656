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
    generations, io_error, log_name, marker, obsolete_files, open_or_create, owner_only,
    quarantine, read_current, snapshot_name, sync_dir, write_current, write_marker, CurrentFile,
    Marker, CURRENT_FILE, QUARANTINE_DIR,
};
use crate::format::{decode_log, encode_start, LogFrame};
use crate::recovery::{Damage, Quarantined, RecoveryReport, SnapshotFallback, TornTail};
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
    /// The log of `generation`; `None` while it does not exist (format 1: a compaction was
    /// interrupted between writing the snapshot and creating the log, and no writer came
    /// since; format 2: damage, the committed generation's log is gone).
    log: Option<File>,
    offset: u64,
    /// The length of the log's `start` frame: appended bytes are counted after it.
    log_start: u64,
    /// Format 1: no `CURRENT` file, logs without a `start` frame. The first compaction
    /// migrates the directory to format 2.
    legacy: bool,
    /// What may have lost acknowledged writes, found by the load or a catch-up: while any,
    /// writes are refused.
    damage: Vec<Damage>,
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
    /// Loads the committed generation (the one `CURRENT` names; in format 1, the newest on
    /// disk): its snapshot and log, or, if that snapshot is missing or unusable, the newest
    /// older snapshot that loads and every log since. What should be there and is not is
    /// recorded as damage, and the replica then refuses writes ([`Replica::writable`]).
    pub(crate) fn load(
        dir: &Path,
        access: Access,
        sync: bool,
        report: &mut RecoveryReport,
    ) -> Result<Replica, StoreError> {
        let on_disk = generations(dir).map_err(|e| io_error(dir, "cannot list", &e))?;
        let newest_on_disk = on_disk.last().copied().unwrap_or(0);
        let mut damage = Vec::new();
        let mut legacy = false;
        let committed = match read_current(dir)? {
            CurrentFile::Named(generation) => generation,
            CurrentFile::Missing => match marker(dir)? {
                Marker::V1 => {
                    legacy = true;
                    newest_on_disk
                }
                Marker::Current | Marker::Absent if on_disk.is_empty() => {
                    // A new store, or one whose creation stopped before anything was written.
                    if access == Access::Exclusive {
                        start_log(dir, 0, sync)?;
                        write_current(dir, 0).map_err(|e| io_error(dir, "cannot commit", &e))?;
                    }
                    0
                }
                Marker::Current | Marker::Absent => {
                    damage.push(Damage {
                        file: CURRENT_FILE.to_string(),
                        offset: None,
                        detail: "missing: the committed generation is unknown; the newest \
                                 generation found was loaded"
                            .to_string(),
                    });
                    newest_on_disk
                }
            },
            CurrentFile::Unreadable(reason) => {
                damage.push(Damage {
                    file: CURRENT_FILE.to_string(),
                    offset: None,
                    detail: format!(
                        "unreadable ({reason}): the committed generation is unknown; the newest \
                         generation found was loaded"
                    ),
                });
                newest_on_disk
            }
        };
        let oldest = on_disk.range(..=committed).next().copied().unwrap_or(0);

        let mut unusable = Vec::new();
        let mut base = committed;
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
                            location: dir.join(snapshot_name(committed)).display().to_string(),
                            detail: format!(
                                "no usable snapshot, and the logs needed to rebuild without one \
                                 are gone: {}; nothing was changed: keep a copy of the directory \
                                 and restore it from a backup (damaged snapshots were copied to \
                                 {QUARANTINE_DIR}/)",
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
        let mut log_start = 0;
        for generation in base..=committed {
            let name = log_name(generation);
            let path = dir.join(&name);
            let newest_log = generation == committed;
            let file = if newest_log && legacy && access == Access::Exclusive {
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
                if newest_log && legacy {
                    continue;
                }
                if newest_log {
                    damage.push(Damage {
                        file: name,
                        offset: None,
                        detail: "the log of the committed generation is missing: every write \
                                 since the generation began (the store's creation or its last \
                                 compaction) is lost"
                            .to_string(),
                    });
                    continue;
                }
                return Err(StoreError::Corrupt {
                    location: path.display().to_string(),
                    detail: format!(
                        "the log is missing, and the state cannot be rebuilt without it ({}); \
                         nothing was changed: keep a copy of the directory and restore it from \
                         a backup",
                        describe(&unusable)
                    ),
                });
            };
            let repair = newest_log && access == Access::Exclusive;
            let replayed = replay_log(dir, generation, &mut file, 0, &mut state, repair, report)?;
            damage.extend(replayed.corrupt);
            match replayed.start {
                Some((found, _)) if found != generation => damage.push(Damage {
                    file: name.clone(),
                    offset: Some(0),
                    detail: format!("the log starts generation {found}, not {generation}"),
                }),
                None if newest_log && !legacy => damage.push(Damage {
                    file: name.clone(),
                    offset: Some(0),
                    detail: if replayed.end == 0 {
                        "the log is empty: its start frame is gone, and with it every write \
                         since the compaction"
                            .to_string()
                    } else {
                        "the log does not begin with its start frame".to_string()
                    },
                }),
                _ => {}
            }
            if newest_log {
                log_start = replayed.start.map_or(0, |(_, len)| len);
                log = Some(file);
                offset = replayed.end;
            }
        }
        // A missing snapshot is one a background compaction has not written yet (or was
        // interrupted writing): nothing is lost, the logs since the previous snapshot are all
        // there, and the next compaction writes a new one. Only an unreadable snapshot is news.
        unusable.retain(|(_, reason)| reason != MISSING);
        for (generation, reason) in &unusable {
            report.snapshot_fallback(SnapshotFallback {
                generation: *generation,
                reason: reason.clone(),
                restored_from: base,
            });
        }
        for d in &damage {
            // Corrupt frames are already in the report, as quarantined.
            if d.offset.is_none() || !d.detail.starts_with(CORRUPT_FRAME) {
                report.damage(d.clone());
            }
        }
        Ok(Replica {
            dir: dir.to_path_buf(),
            state,
            generation: committed,
            base,
            log,
            offset,
            log_start,
            legacy,
            damage,
            stale: false,
            degraded: !unusable.is_empty(),
            compact_floor: 0,
            snapshot_bytes,
            sync,
        })
    }

    /// Fails with [`StoreError::Corrupt`] if acknowledged writes may be missing: a writer must
    /// not decide anything (grant a lease, fire a slot) on a state with a hole in it.
    pub(crate) fn writable(&self) -> Result<(), StoreError> {
        let Some(first) = self.damage.first() else {
            return Ok(());
        };
        let all: Vec<String> = self.damage.iter().map(ToString::to_string).collect();
        Err(StoreError::Corrupt {
            location: self.dir.join(&first.file).display().to_string(),
            detail: format!(
                "acknowledged writes may be missing ({}); reading works, writing is refused \
                 until the damage is acknowledged: keep a copy of the data directory, then run \
                 `keel doctor --repair` with the daemon stopped",
                all.join("; ")
            ),
        })
    }

    /// The committed generation this replica stands at.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// What the load and catch-ups found that may have lost acknowledged writes.
    pub(crate) fn damage(&self) -> &[Damage] {
        &self.damage
    }

    /// Applies whatever other handles wrote since this one last looked. If the generation
    /// moved on (another handle compacted) or the files changed in a way that cannot be
    /// followed, reloads from the committed generation. A log shorter than what was already
    /// read from it lost acknowledged writes: that is damage, kept across the reload.
    pub(crate) fn catch_up(
        &mut self,
        access: Access,
        report: &mut RecoveryReport,
    ) -> Result<(), StoreError> {
        let mut shrunk = None;
        if !self.stale && !self.generation_moved()? {
            match self.read_new_frames(access, report) {
                Ok(None) => return Ok(()),
                Ok(Some(damage)) => shrunk = Some(damage),
                Err(e) => {
                    self.stale = true;
                    return Err(e);
                }
            }
        }
        self.stale = true;
        *self = Replica::load(&self.dir, access, self.sync, report)?;
        if let Some(damage) = shrunk {
            report.damage(damage.clone());
            self.damage.push(damage);
        }
        Ok(())
    }

    /// Appends frames to the log and makes them durable. On failure the frames are taken
    /// back if possible, and the handle reloads before its next use: the state it applied
    /// them to may not match the files.
    pub(crate) fn append(&mut self, frames: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(log_name(self.generation));
        let log = match &mut self.log {
            Some(log) => log,
            None if !self.legacy => {
                return Err(self
                    .writable()
                    .err()
                    .unwrap_or_else(|| StoreError::Io(format!("{} is not open", path.display()))))
            }
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
    /// the load had to fall back past an unusable snapshot, or the directory is still in
    /// format 1. Never while damaged: a compaction would make the loss look legitimate, and
    /// only a repair may do that, on purpose.
    pub(crate) fn wants_compaction(&self, threshold: u64, at_snapshot_size: bool) -> bool {
        let snapshot = if at_snapshot_size {
            self.snapshot_bytes
        } else {
            0
        };
        let due = threshold.max(snapshot).max(self.compact_floor);
        let appended = self.offset.saturating_sub(self.log_start);
        let grown = appended > 0 && appended >= due;
        !self.stale && self.damage.is_empty() && (self.degraded || self.legacy || grown)
    }

    /// True if the next compaction may start its generation at once and write the snapshot
    /// in the background ([`Replica::switch_generation`]): not while the directory is in
    /// format 1 (the compaction migrates it) or the newest snapshot was unreadable (the
    /// compaction is what gives the directory two good snapshots again).
    pub(crate) fn switches_generation(&self) -> bool {
        !self.legacy && !self.degraded
    }

    /// Rewrites the store from what is readable: a new generation, then the `frames`
    /// recording the repair, then another generation, so that neither the damaged files nor
    /// a generation built on them are kept (their bad bytes stay in `quarantine/`). Requires
    /// the exclusive lock, a caught-up state, and `frames` already applied to the state.
    pub(crate) fn repair(&mut self, frames: &[u8]) -> Result<(), StoreError> {
        self.compact_once()?;
        self.append(frames)?;
        self.compact_once()
    }

    /// Starts the next generation: writes the whole state as its snapshot, creates its empty
    /// log, and removes the generations recovery can no longer need. Requires the exclusive
    /// lock and a caught-up state.
    pub(crate) fn compact(&mut self, threshold: u64) -> Result<(), StoreError> {
        let result = self.compact_once();
        if result.is_err() {
            self.postpone_compaction(threshold);
        }
        result
    }

    /// After a failed compaction: the next one waits until the log grew by another
    /// threshold's worth, not the next write.
    fn postpone_compaction(&mut self, threshold: u64) {
        self.compact_floor = self.offset.saturating_add(threshold.max(1));
    }

    /// Starts the next generation without writing its snapshot, so that appends go on at
    /// once: removes leftovers of an interrupted compaction, creates the new log with its
    /// `start` frame (durable), and commits the generation in `CURRENT`. From then on the
    /// generation loads from the previous snapshot and every log since, until
    /// [`SnapshotJob::write`] (off the lock) gives it its own snapshot. Requires the exclusive
    /// lock, a caught-up state, and format 2 (a format-1 directory compacts with
    /// [`Replica::compact`], which migrates it).
    pub(crate) fn switch_generation(&mut self, threshold: u64) -> Result<SnapshotJob, StoreError> {
        let result = self.switch_once();
        match &result {
            // A new log: the floor of a failure in the old one does not apply.
            Ok(_) => self.compact_floor = 0,
            Err(_) => self.postpone_compaction(threshold),
        }
        result
    }

    fn switch_once(&mut self) -> Result<SnapshotJob, StoreError> {
        debug_assert!(!self.legacy, "format 1 migrates through compact()");
        let dir = self.dir.clone();
        let next = self.generation + 1;
        // Files of `next` are what an interrupted compaction left: it was never committed.
        let half_written = dir.join(format!("{}.tmp", snapshot_name(next)));
        for leftover in [
            dir.join(snapshot_name(next)),
            dir.join(log_name(next)),
            half_written,
        ] {
            match fs::remove_file(&leftover) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&leftover, "cannot remove", &e)),
            }
        }
        let (log, start) = start_log(&dir, next, self.sync)?;
        if let Err(e) = write_current(&dir, next) {
            // `CURRENT` may name the new generation or not: reload before the next use.
            self.stale = true;
            return Err(io_error(&dir.join(CURRENT_FILE), "cannot write", &e));
        }
        let job = SnapshotJob {
            dir,
            sync: self.sync,
            base: self.base,
            generation: next,
            previous_log_len: self.offset,
            // O(1): the maps are persistent and share their nodes with the live state.
            state: self.state.clone(),
        };
        self.generation = next;
        self.log = Some(log);
        self.offset = start;
        self.log_start = start;
        tracing::debug!(generation = next, base = job.base, "generation started");
        Ok(job)
    }

    /// Records that `job` wrote its generation's snapshot: if this replica still stands at
    /// that generation, its state is now based on it; generations older than the one the
    /// state was built on are removed (that one stays as the fallback). Requires the
    /// exclusive lock.
    pub(crate) fn snapshot_written(&mut self, job: &SnapshotJob, snapshot_bytes: u64) {
        if self.generation == job.generation && self.base < job.generation {
            self.base = job.generation;
            self.snapshot_bytes = snapshot_bytes;
            self.degraded = false;
        }
        self.remove_obsolete(job.base);
    }

    /// Records that `job` failed: the logs still hold every batch, and the next attempt
    /// waits until the log grows by another `threshold` bytes, not the next write.
    pub(crate) fn snapshot_failed(&mut self, job: &SnapshotJob, threshold: u64) {
        let _ = fs::remove_file(job.tmp_path());
        if self.generation == job.generation {
            self.postpone_compaction(threshold);
        }
    }

    fn compact_once(&mut self) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let next = self.generation + 1;
        let path = dir.join(snapshot_name(next));
        let tmp = dir.join(format!("{}.tmp", snapshot_name(next)));
        // Files of `next` are what an interrupted compaction left: it was never committed.
        for leftover in [path.clone(), dir.join(log_name(next))] {
            match fs::remove_file(&leftover) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&leftover, "cannot remove", &e)),
            }
        }
        // The snapshot is complete and durable before it gets its name.
        let previous_log_len = self.log.as_ref().map(|_| self.offset);
        let snapshot_bytes = match self.write_snapshot(&tmp, next, previous_log_len) {
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
        // The new log exists, with its start frame, before `CURRENT` commits the generation:
        // a committed generation whose log is missing or empty is damage, never a crash.
        let new_log = dir.join(log_name(next));
        let sync = self.sync;
        let synced_dir = |dir: &Path| if sync { sync_dir(dir) } else { Ok(()) };
        let switched = synced_dir(&dir)
            .and_then(|()| start_log(&dir, next, sync).map_err(io::Error::other))
            .and_then(|(log, start)| {
                write_current(&dir, next)?;
                if self.legacy {
                    // Format 2 from here on; a build that reads only format 1 now refuses
                    // the directory instead of misreading it.
                    write_marker(&dir)?;
                }
                Ok((log, start))
            });
        let (log, start) = match switched {
            Ok(switched) => switched,
            Err(e) => {
                // Other handles may see the new generation or not: reload before the next use.
                self.stale = true;
                return Err(io_error(&new_log, "cannot create", &e));
            }
        };
        let keep_from = self.base;
        self.generation = next;
        self.base = next;
        self.log = Some(log);
        self.offset = start;
        self.log_start = start;
        self.legacy = false;
        self.damage.clear();
        self.degraded = false;
        self.compact_floor = 0;
        self.snapshot_bytes = snapshot_bytes;
        tracing::debug!(generation = next, snapshot_bytes, "compacted");
        self.remove_obsolete(keep_from);
        Ok(())
    }

    /// Writes the snapshot and returns its size in bytes.
    fn write_snapshot(
        &self,
        path: &Path,
        generation: u64,
        previous_log_len: Option<u64>,
    ) -> io::Result<u64> {
        write_snapshot_file(&self.state, path, generation, previous_log_len, self.sync)
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

    /// True if the committed generation is no longer this handle's (another handle
    /// compacted or repaired), or this handle's log is gone. In format 1 (no `CURRENT`): the
    /// next generation has a snapshot or a log, or this handle's log is gone (removed by a
    /// compaction two or more generations on); a log that does not exist yet also counts, so
    /// reloading finds the same generation until a writer creates the log.
    fn generation_moved(&self) -> Result<bool, StoreError> {
        let exists = |name: &str| {
            let path = self.dir.join(name);
            path.try_exists()
                .map_err(|e| io_error(&path, "cannot check", &e))
        };
        let log_gone = || exists(&log_name(self.generation)).map(|found| !found);
        if !self.legacy {
            return match read_current(&self.dir)? {
                CurrentFile::Named(generation) if generation == self.generation => {
                    // A log already known to be missing is damage, not news.
                    Ok(self.log.is_some() && log_gone()?)
                }
                _ => Ok(true),
            };
        }
        let Some(next) = self.generation.checked_add(1) else {
            return Ok(false);
        };
        Ok(exists(CURRENT_FILE)?
            || exists(&snapshot_name(next))?
            || exists(&log_name(next))?
            || log_gone()?)
    }

    /// Reads frames appended since `offset`. Returns the damage if the log is shorter than
    /// what was already read (the files changed behind the store's back: reload).
    fn read_new_frames(
        &mut self,
        access: Access,
        report: &mut RecoveryReport,
    ) -> Result<Option<Damage>, StoreError> {
        let name = log_name(self.generation);
        let path = self.dir.join(&name);
        if self.log.is_none() && !self.legacy {
            // Known damage: the committed log is missing.
            return Ok(None);
        }
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
            return Ok(None);
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
            return Ok(Some(Damage {
                file: name,
                offset: Some(len),
                detail: format!(
                    "the log is {len} bytes, but {} had been read from it: acknowledged writes \
                     were cut off",
                    self.offset
                ),
            }));
        }
        let repair = access == Access::Exclusive;
        let replayed = replay_log(
            &self.dir,
            self.generation,
            log,
            self.offset,
            &mut self.state,
            repair,
            report,
        )?;
        self.offset = replayed.end;
        self.damage.extend(replayed.corrupt);
        Ok(None)
    }

    /// Checks every generation kept besides the committed one, as it would be used if the
    /// newest snapshot were lost: its snapshot loads, its log reads whole (no corrupt frame,
    /// no torn tail: a compaction read it to its end), has the length the next snapshot was
    /// taken at, and replaying both rebuilds exactly the next snapshot. Changes nothing.
    pub(crate) fn verify_fallbacks(&self) -> Result<Vec<Damage>, StoreError> {
        let dir = &self.dir;
        let on_disk = generations(dir).map_err(|e| io_error(dir, "cannot list", &e))?;
        let mut damage = Vec::new();
        // The state at the end of the previous generation's log, replayed whole: where a
        // generation whose snapshot was never written (a compaction that did not finish)
        // starts.
        let mut carried: Option<State> = None;
        for &generation in on_disk.range(..self.generation) {
            let name = log_name(generation);
            let previous = carried.take();
            let damaged = damage.len();
            let mut state = match (read_snapshot(dir, generation), previous) {
                (Ok(state), _) => state,
                (Err(reason), Some(state)) if reason == MISSING => state,
                (Err(reason), _) => {
                    damage.push(Damage {
                        file: snapshot_name(generation),
                        offset: None,
                        detail: format!("the fallback snapshot is unusable: {reason}"),
                    });
                    continue;
                }
            };
            let bytes = match crate::files::read(&dir.join(&name)) {
                Ok(bytes) => bytes,
                Err(e) => {
                    damage.push(Damage {
                        file: name,
                        offset: None,
                        detail: format!("the fallback log cannot be read: {e}"),
                    });
                    continue;
                }
            };
            let scan = decode_log(&bytes);
            for bad in scan.corrupt.iter().chain(&scan.torn_tail) {
                damage.push(Damage {
                    file: name.clone(),
                    offset: Some(bad.offset),
                    detail: format!(
                        "{CORRUPT_FRAME} in the fallback log ({} bytes): {}",
                        bad.len, bad.reason
                    ),
                });
            }
            for (i, entry) in scan.entries.iter().enumerate() {
                if let LogFrame::Start { generation: found } = entry.frame {
                    if i > 0 || entry.offset > 0 || found != generation {
                        damage.push(Damage {
                            file: name.clone(),
                            offset: Some(entry.offset),
                            detail: format!("a start frame of generation {found} out of place"),
                        });
                    }
                }
                apply_frame(&mut state, &entry.frame);
            }
            let Ok((next, header)) = read_snapshot_with_header(dir, generation + 1) else {
                // The load reports an unusable committed snapshot; an older one was checked
                // above; a missing one starts from this replay.
                if damage.len() == damaged {
                    carried = Some(state);
                }
                continue;
            };
            if let Some(expected) = header.previous_log_len {
                if expected != bytes.len() as u64 {
                    damage.push(Damage {
                        file: name.clone(),
                        offset: Some(bytes.len().min(expected as usize) as u64),
                        detail: format!(
                            "the fallback log is {} bytes, but {} was compacted from {expected}",
                            bytes.len(),
                            snapshot_name(generation + 1)
                        ),
                    });
                    continue;
                }
            }
            if next != state {
                damage.push(Damage {
                    file: name,
                    offset: None,
                    detail: format!(
                        "replaying {} and this log does not rebuild {}",
                        snapshot_name(generation),
                        snapshot_name(generation + 1)
                    ),
                });
            }
        }
        Ok(damage)
    }
}

/// The snapshot of a generation already started by [`Replica::switch_generation`], to be
/// written without the lock: a frozen copy of the state the generation started from, and the
/// generations it replaced (compactions keep the one it was based on as the fallback).
#[derive(Debug)]
pub(crate) struct SnapshotJob {
    dir: PathBuf,
    sync: bool,
    /// The generation whose snapshot the handle's state was built on (0: the empty start):
    /// generations older than it are obsolete once the new snapshot is written.
    base: u64,
    /// The generation the snapshot starts.
    generation: u64,
    /// How long the log of `generation - 1` was when appends moved to the new log.
    previous_log_len: u64,
    /// The state as of the switch: what a load of the new generation builds (the base
    /// snapshot and every log after it, the last one up to `previous_log_len`).
    state: State,
}

impl SnapshotJob {
    /// The generation the snapshot starts.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes the state the new generation started from as its snapshot: complete and
    /// durable under a temporary name, then renamed. Returns the snapshot's size.
    /// `before_rename` runs between the two (a test pauses there). Runs off the lock: a
    /// handle loading meanwhile finds the snapshot whole or not at all, and either way loads
    /// the same state.
    pub(crate) fn write(&self, before_rename: impl FnOnce()) -> Result<u64, StoreError> {
        let dir = &self.dir;
        let state = &self.state;
        let tmp = self.tmp_path();
        let written = write_snapshot_file(
            state,
            &tmp,
            self.generation,
            Some(self.previous_log_len),
            self.sync,
        );
        let snapshot_bytes = match written {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_error(&tmp, "cannot write", &e));
            }
        };
        before_rename();
        let path = dir.join(snapshot_name(self.generation));
        fs::rename(&tmp, &path).map_err(|e| io_error(&path, "cannot create", &e))?;
        if self.sync {
            sync_dir(dir).map_err(|e| io_error(dir, "cannot sync", &e))?;
        }
        Ok(snapshot_bytes)
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir
            .join(format!("{}.tmp", snapshot_name(self.generation)))
    }
}

/// Writes `state` as the snapshot starting `generation` to `path`, durable (with `sync`), and
/// returns its size in bytes.
fn write_snapshot_file(
    state: &State,
    path: &Path,
    generation: u64,
    previous_log_len: Option<u64>,
    sync: bool,
) -> io::Result<u64> {
    let file = owner_only().create(true).truncate(true).open(path)?;
    let file = SyncedEvery {
        file,
        unsynced: 0,
        every: sync.then_some(SNAPSHOT_SYNC_EVERY),
    };
    let mut out = BufWriter::with_capacity(1 << 16, file);
    state.write_snapshot(&mut out, generation, previous_log_len)?;
    let file = out.into_inner().map_err(|e| e.into_error())?.file;
    if sync {
        file.sync_all()?;
    }
    Ok(file.metadata()?.len())
}

/// How much of a snapshot is written between two flushes to disk while it is written. A
/// snapshot is written beside the live log on the same disk: flushed only at its end, its tens
/// of megabytes went to the disk at once, and the writer's log flushes waited behind them.
const SNAPSHOT_SYNC_EVERY: u64 = 1 << 20;

/// A file that is flushed to disk (`sync_data`) every `every` bytes written, if set.
struct SyncedEvery {
    file: File,
    unsynced: u64,
    every: Option<u64>,
}

impl Write for SyncedEvery {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.file.write(buf)?;
        if let Some(every) = self.every {
            self.unsynced += written as u64;
            if self.unsynced >= every {
                self.file.sync_data()?;
                self.unsynced = 0;
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

const MISSING: &str = "missing";

/// How a corrupt frame's [`Damage`] starts (it is reported as quarantined too).
const CORRUPT_FRAME: &str = "corrupt frame";

/// What replaying a log found.
struct Replayed {
    /// Where the readable log ends.
    end: u64,
    /// The generation and length of the `start` frame, if the replay began at byte 0 and the
    /// log begins with one.
    start: Option<(u64, u64)>,
    /// Corrupt frames (quarantined and skipped): acknowledged writes lost.
    corrupt: Vec<Damage>,
}

/// Creates generation `generation`'s log with its `start` frame, durable (with `sync`)
/// before anything names the generation as committed. Returns the log and the frame's length.
fn start_log(dir: &Path, generation: u64, sync: bool) -> Result<(File, u64), StoreError> {
    let path = dir.join(log_name(generation));
    let frame = encode_start(generation).map_err(|e| StoreError::Io(e.to_string()))?;
    let created = owner_only()
        .create_new(true)
        .open(&path)
        .and_then(|mut log| {
            log.write_all(&frame)?;
            if sync {
                log.sync_data()?;
                sync_dir(dir)?;
            }
            Ok(log)
        });
    match created {
        Ok(log) => Ok((log, frame.len() as u64)),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(io_error(&path, "cannot create", &e))
        }
    }
}

/// [`apply_frame`], moving the frame's records into the state.
fn apply_frame_owned(state: &mut State, frame: LogFrame) {
    match frame {
        LogFrame::Batch { records, .. } => state.apply_owned(records),
        LogFrame::Writer { epoch } => state.writer_epoch = epoch,
        LogFrame::Start { .. } => {}
    }
}

/// Applies one log frame to the state.
fn apply_frame(state: &mut State, frame: &LogFrame) {
    match frame {
        LogFrame::Batch { records, .. } => state.apply(records),
        LogFrame::Writer { epoch } => state.writer_epoch = *epoch,
        LogFrame::Start { .. } => {}
    }
}

/// The snapshot that starts `generation` (> 0), with its header.
fn read_snapshot_with_header(
    dir: &Path,
    generation: u64,
) -> Result<(State, crate::format::SnapshotHeader), String> {
    let path = dir.join(snapshot_name(generation));
    let file = crate::files::open_read(&path).map_err(|e| format!("cannot open: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    State::read_snapshot_with_header(BufReader::with_capacity(1 << 16, file), len, generation)
        .map_err(|e| e.to_string())
}

/// The state a generation starts from: its snapshot, or the empty state for generation 0.
fn read_snapshot(dir: &Path, generation: u64) -> Result<State, String> {
    if generation == 0 {
        return Ok(State::default());
    }
    let path = dir.join(snapshot_name(generation));
    let file = match crate::files::open_read(&path) {
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
    let copied = crate::files::read(&dir.join(&name))
        .and_then(|bytes| quarantine(dir, &format!("{name}.bad"), &bytes));
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
) -> Result<Replayed, StoreError> {
    let name = log_name(generation);
    let path = dir.join(&name);
    let len = log
        .metadata()
        .map_err(|e| io_error(&path, "cannot stat", &e))?
        .len();
    let mut replayed = Replayed {
        end: from,
        start: None,
        corrupt: Vec::new(),
    };
    if len <= from {
        return Ok(replayed);
    }
    let size = usize::try_from(len - from)
        .map_err(|_| StoreError::Io(format!("{} is too large to read", path.display())))?;
    let mut bytes = vec![0; size];
    log.seek(SeekFrom::Start(from))
        .and_then(|_| log.read_exact(&mut bytes))
        .map_err(|e| io_error(&path, "cannot read", &e))?;

    let mut scan = decode_log(&bytes);
    // The decoded records are this replay's own: moved into the state, not copied.
    for entry in std::mem::take(&mut scan.entries) {
        if let LogFrame::Start { generation: found } = entry.frame {
            if from == 0 && entry.offset == 0 {
                replayed.start = Some((found, entry.len));
            }
        }
        apply_frame_owned(state, entry.frame);
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
        replayed.corrupt.push(Damage {
            file: name.clone(),
            offset: Some(offset),
            detail: format!(
                "{CORRUPT_FRAME} ({} bytes, copied to {QUARANTINE_DIR}/): {}",
                bad.len, bad.reason
            ),
        });
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
    replayed.end = from + scan.valid_len;
    Ok(replayed)
}

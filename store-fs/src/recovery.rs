//! What opening and catching up found wrong with the files, for `keel doctor`.

use std::fmt;
use std::path::PathBuf;

/// Everything a handle found and repaired or worked around since it was opened. Empty after
/// a clean shutdown and no damage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Interrupted writes cut off the end of a log.
    pub torn_tails: Vec<TornTail>,
    /// Damaged frames copied to `quarantine/` and skipped.
    pub quarantined: Vec<Quarantined>,
    /// Snapshots that were missing or unreadable, and what the state was rebuilt from.
    pub snapshot_fallbacks: Vec<SnapshotFallback>,
    /// Data that should be there and is not (a missing or emptied log of the committed
    /// generation, a log shorter than a handle had read): acknowledged writes may be lost, and
    /// writes are refused until a repair.
    pub damage: Vec<Damage>,
    /// A fallback generation that fails verification ([`FsStore::verify`](crate::FsStore::verify)):
    /// nothing is lost yet and writes go on, but the store could not be rebuilt from it if the
    /// newest snapshot were lost.
    pub fallback_damage: Vec<Damage>,
}

/// Something the store should hold and does not, or holds damaged: acknowledged writes may
/// be lost (or, in a fallback generation, would be if the newest snapshot were lost).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The file's name.
    pub file: String,
    /// Where in it, if the damage has a place.
    pub offset: Option<u64>,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(offset) => write!(f, "{} at byte {offset}: {}", self.file, self.detail),
            None => write!(f, "{}: {}", self.file, self.detail),
        }
    }
}

/// Bytes after the last valid frame of a log: a write interrupted by a crash (or garbage
/// appended by something else).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The log file's name.
    pub file: String,
    /// Where the bad bytes started.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// Why the first of them is not a valid frame.
    pub reason: String,
    /// True if the log was truncated at `offset`. Only a writer (holding the exclusive lock)
    /// truncates, and only the newest log.
    pub truncated: bool,
    /// The copy in `quarantine/`, if it could be saved.
    pub copy: Option<PathBuf>,
}

/// A damaged frame with valid frames after it: skipped, and its bytes kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The file's name.
    pub file: String,
    /// Where the bad bytes start.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// What is wrong.
    pub reason: String,
    /// The copy in `quarantine/`, if it could be saved.
    pub copy: Option<PathBuf>,
}

/// The newest snapshot could not be used; the state was rebuilt from an older one (or from
/// the start) and every log since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFallback {
    /// The generation whose snapshot could not be used.
    pub generation: u64,
    /// Why.
    pub reason: String,
    /// The generation whose snapshot was used instead (0: the empty state before the first
    /// log).
    pub restored_from: u64,
}

impl RecoveryReport {
    /// True if nothing was found.
    pub fn is_clean(&self) -> bool {
        self.torn_tails.is_empty()
            && self.quarantined.is_empty()
            && self.snapshot_fallbacks.is_empty()
            && self.damage.is_empty()
            && self.fallback_damage.is_empty()
    }

    /// True if acknowledged writes may be missing: corrupt frames, or [`Damage`].
    pub fn is_damaged(&self) -> bool {
        !self.quarantined.is_empty() || !self.damage.is_empty()
    }

    pub(crate) fn damage(&mut self, damage: Damage) {
        if self.damage.contains(&damage) {
            return;
        }
        tracing::warn!(file = %damage.file, offset = damage.offset, "damage: {}", damage.detail);
        self.damage.push(damage);
    }

    pub(crate) fn torn_tail(&mut self, tail: TornTail) {
        // A reader meets the same torn tail on every catch-up until a writer cuts it off:
        // report it once, and once more when it is truncated.
        if let Some(seen) = self
            .torn_tails
            .iter_mut()
            .find(|t| t.file == tail.file && t.offset == tail.offset)
        {
            if tail.truncated && !seen.truncated {
                tracing::warn!(file = %tail.file, offset = tail.offset, "torn tail truncated");
                seen.truncated = true;
                seen.copy = tail.copy;
            }
            return;
        }
        tracing::warn!(
            file = %tail.file,
            offset = tail.offset,
            len = tail.len,
            truncated = tail.truncated,
            "torn tail: {}",
            tail.reason
        );
        self.torn_tails.push(tail);
    }

    pub(crate) fn quarantined(&mut self, frame: Quarantined) {
        if self
            .quarantined
            .iter()
            .any(|q| q.file == frame.file && q.offset == frame.offset)
        {
            return;
        }
        tracing::warn!(
            file = %frame.file,
            offset = frame.offset,
            len = frame.len,
            "corrupt frame quarantined: {}",
            frame.reason
        );
        self.quarantined.push(frame);
    }

    pub(crate) fn snapshot_fallback(&mut self, fallback: SnapshotFallback) {
        if self
            .snapshot_fallbacks
            .iter()
            .any(|f| f.generation == fallback.generation)
        {
            return;
        }
        tracing::warn!(
            generation = fallback.generation,
            restored_from = fallback.restored_from,
            "snapshot unusable, rebuilt from an older generation: {}",
            fallback.reason
        );
        self.snapshot_fallbacks.push(fallback);
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return writeln!(f, "no damage found");
        }
        for t in &self.torn_tails {
            let action = if t.truncated { "truncated" } else { "ignored" };
            writeln!(
                f,
                "torn tail: {} at byte {} ({} bytes, {action}): {}",
                t.file, t.offset, t.len, t.reason
            )?;
        }
        for q in &self.quarantined {
            writeln!(
                f,
                "quarantined: {} at byte {} ({} bytes): {}",
                q.file, q.offset, q.len, q.reason
            )?;
        }
        for d in &self.damage {
            writeln!(f, "damage: {d}")?;
        }
        for d in &self.fallback_damage {
            writeln!(
                f,
                "damage in the fallback generation (nothing lost yet): {d}"
            )?;
        }
        for s in &self.snapshot_fallbacks {
            writeln!(
                f,
                "snapshot of generation {} unusable ({}); rebuilt from generation {}",
                s.generation, s.reason, s.restored_from
            )?;
        }
        Ok(())
    }
}

//! The trees of a keel sled database and how their keys are laid out.
//!
//! Integers are big-endian so that sled's byte order is numeric order; timestamps have their
//! sign bit flipped first so that instants before 1970 sort before later ones. A job name never
//! contains a NUL byte (`JobId` allows `[A-Za-z0-9._:-]` only), so `job ++ 0x00` is an
//! unambiguous prefix for every key that starts with a job.

use keel_core::{JobId, RunId, StoreError, Timestamp};

/// The on-disk format this build reads and writes, stored under [`META_FORMAT`].
pub(crate) const FORMAT: &str = "keel-store-sled 1";

/// `meta` key: the format marker.
pub(crate) const META_FORMAT: &[u8] = b"format";
/// `meta` key: the writer epoch (`restore` raises it; batches of other epochs are refused).
pub(crate) const META_WRITER_EPOCH: &[u8] = b"writer_epoch";
/// `meta` key: the scheduler's counters (`Record::PutMeta`).
pub(crate) const META_META: &[u8] = b"meta";
/// `meta` key: how many batches were applied. Every `apply` reads it before it stages its
/// writes and checks it again inside the transaction, so a write staged against a state that
/// changed meanwhile is detected and staged again.
pub(crate) const META_STAMP: &[u8] = b"stamp";

/// One sled tree of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TreeId {
    /// Format marker, writer epoch, counters, stamp; keys above.
    Meta,
    /// Job name -> `Job`.
    Jobs,
    /// Run id -> `Run`, every run including terminal ones until pruned.
    Runs,
    /// Audit seq -> `AuditRecord`.
    Audit,
    /// `job ++ 0 ++ slot` -> the `RunId` that claimed the slot; pruned with its run.
    Slots,
    /// Job name -> `Tombstone`.
    Tombstones,
    /// Incident id -> `Incident`.
    Incidents,
    /// Delivery id -> `Delivery`.
    Deliveries,
    /// Index: run id -> empty, for every run that is not terminal (what `restore` returns).
    Active,
    /// Index: `job ++ 0 ++ finished_at ++ run` -> empty, for every terminal run with a
    /// `finished_at` (what `PruneHistory` may delete), oldest first within a job.
    Finished,
    /// Index: `run ++ seq` -> empty, for every audit record of a run (deleted with the run).
    RunAudit,
}

/// How many trees there are; the length of [`TreeId::ALL`].
pub(crate) const TREES: usize = 11;

impl TreeId {
    /// Every tree, in the order of their indices.
    pub(crate) const ALL: [TreeId; TREES] = [
        TreeId::Meta,
        TreeId::Jobs,
        TreeId::Runs,
        TreeId::Audit,
        TreeId::Slots,
        TreeId::Tombstones,
        TreeId::Incidents,
        TreeId::Deliveries,
        TreeId::Active,
        TreeId::Finished,
        TreeId::RunAudit,
    ];

    /// The tree's name in the sled database.
    pub(crate) fn name(self) -> &'static str {
        match self {
            TreeId::Meta => "meta",
            TreeId::Jobs => "jobs",
            TreeId::Runs => "runs",
            TreeId::Audit => "audit",
            TreeId::Slots => "slots",
            TreeId::Tombstones => "tombstones",
            TreeId::Incidents => "incidents",
            TreeId::Deliveries => "deliveries",
            TreeId::Active => "active_runs",
            TreeId::Finished => "finished_runs",
            TreeId::RunAudit => "run_audit",
        }
    }

    /// The tree's position in [`TreeId::ALL`] (and in a transaction's views).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// The key of a record keyed by a number (runs, audit records, incidents, deliveries).
pub(crate) fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// The key prefix of everything stored under `job` in a tree keyed by job first.
pub(crate) fn job_prefix(job: &JobId) -> Vec<u8> {
    let mut key = Vec::with_capacity(job.as_str().len() + 1);
    key.extend_from_slice(job.as_str().as_bytes());
    key.push(0);
    key
}

/// The key of `slot` of `job` in [`TreeId::Slots`].
pub(crate) fn slot_key(job: &JobId, slot: Timestamp) -> Vec<u8> {
    let mut key = job_prefix(job);
    key.extend_from_slice(&timestamp_bytes(slot));
    key
}

/// The key of a terminal run in [`TreeId::Finished`].
pub(crate) fn finished_key(job: &JobId, finished_at: Timestamp, run: RunId) -> Vec<u8> {
    let mut key = job_prefix(job);
    key.extend_from_slice(&timestamp_bytes(finished_at));
    key.extend_from_slice(&id_key(run.0));
    key
}

/// A [`TreeId::Finished`] key taken apart: the job prefix (name and NUL), when the run
/// finished, and the run. `None` if the key is not one.
pub(crate) fn parse_finished_key(key: &[u8]) -> Option<(&[u8], Timestamp, RunId)> {
    let split = key.len().checked_sub(16)?;
    let (job, rest) = key.split_at(split);
    if job.len() < 2 || job.last() != Some(&0) {
        return None;
    }
    let (at, run) = rest.split_at(8);
    let at = u64::from_be_bytes(at.try_into().ok()?) ^ SIGN_BIT;
    let run = u64::from_be_bytes(run.try_into().ok()?);
    Some((job, Timestamp(at.cast_signed()), RunId(run)))
}

/// The key of audit record `seq` of `run` in [`TreeId::RunAudit`].
pub(crate) fn run_audit_key(run: RunId, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&id_key(run.0));
    key[8..].copy_from_slice(&id_key(seq));
    key
}

/// The audit seq of a [`TreeId::RunAudit`] key, or `None` if the key is not one.
pub(crate) fn parse_run_audit_key(key: &[u8]) -> Option<u64> {
    let seq: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    (key.len() == 16).then(|| u64::from_be_bytes(seq))
}

/// The number stored in an 8-byte key, or `None` if the key is not one.
pub(crate) fn parse_id_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Where a key is, in words, for [`StoreError::Corrupt`].
pub(crate) fn location(tree: TreeId, key: &[u8]) -> String {
    let shown = match tree {
        TreeId::Runs | TreeId::Audit | TreeId::Incidents | TreeId::Deliveries | TreeId::Active => {
            parse_id_key(key).map(|id| id.to_string())
        }
        TreeId::Meta | TreeId::Jobs | TreeId::Tombstones => {
            std::str::from_utf8(key).ok().map(|s| format!("{s:?}"))
        }
        TreeId::Slots | TreeId::Finished | TreeId::RunAudit => None,
    };
    let shown = shown.unwrap_or_else(|| format!("0x{}", hex(key)));
    format!("sled tree {:?}, key {shown}", tree.name())
}

/// A [`StoreError::Corrupt`] for the value (or key) at `key` of `tree`.
pub(crate) fn corrupt(tree: TreeId, key: &[u8], detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: location(tree, key),
        detail: detail.into(),
    }
}

const SIGN_BIT: u64 = 1 << 63;

/// `t` as 8 bytes that sort like the instants they encode.
fn timestamp_bytes(t: Timestamp) -> [u8; 8] {
    (t.0.cast_unsigned() ^ SIGN_BIT).to_be_bytes()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str) -> JobId {
        JobId::new(name).unwrap()
    }

    #[test]
    fn timestamps_sort_like_instants() {
        let instants = [i64::MIN, -1_000, -1, 0, 1, 1_000, i64::MAX];
        let keys: Vec<_> = instants
            .iter()
            .map(|&t| finished_key(&job("a"), Timestamp(t), RunId(0)))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    }

    #[test]
    fn finished_keys_round_trip_and_group_by_job() {
        let key = finished_key(&job("nightly:eu"), Timestamp(-5), RunId(42));
        let (prefix, at, run) = parse_finished_key(&key).unwrap();
        assert_eq!(prefix, job_prefix(&job("nightly:eu")).as_slice());
        assert_eq!((at, run), (Timestamp(-5), RunId(42)));
        // A job whose name extends another's does not share its prefix.
        let longer = finished_key(&job("nightly:eu2"), Timestamp(0), RunId(1));
        assert!(!longer.starts_with(&job_prefix(&job("nightly:eu"))));
        assert_eq!(parse_finished_key(b"short"), None);
        assert_eq!(parse_finished_key(&[1; 17]), None);
    }

    #[test]
    fn run_audit_keys_round_trip() {
        let key = run_audit_key(RunId(7), 9);
        assert!(key.starts_with(&id_key(7)));
        assert_eq!(parse_run_audit_key(&key), Some(9));
        assert_eq!(parse_run_audit_key(&key[..15]), None);
    }

    #[test]
    fn locations_name_tree_and_key() {
        assert_eq!(
            location(TreeId::Runs, &id_key(12)),
            "sled tree \"runs\", key 12"
        );
        assert_eq!(
            location(TreeId::Jobs, b"report"),
            "sled tree \"jobs\", key \"report\""
        );
        assert_eq!(
            location(TreeId::Slots, &[0xab, 0x01]),
            "sled tree \"slots\", key 0xab01"
        );
    }
}

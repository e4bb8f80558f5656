//! Damage the store must notice, never explain away: a lost or emptied newest log, a whole
//! frame that fails its checksum at the end of a log, damage in the fallback generation, and
//! refusals that say what to do. Writes are refused while acknowledged data may be missing,
//! until `FsStore::repair`.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;

use common::*;
use keel_core::{Record, RunId, RunQuery, Store, StoreError};
use keel_store_fs::format::decode_log;
use keel_store_fs::{FsOptions, FsStore};

fn compacting(bytes: u64) -> FsOptions {
    FsOptions {
        compact_after_bytes: bytes,
        compact_at_snapshot_size: false,
        ..FsOptions::default()
    }
}

fn writer(store: &FsStore) -> u64 {
    store.restore().unwrap().meta.epoch + 1
}

fn runs(store: &FsStore, epoch: u64, first: u64, count: u64) {
    for id in first..first + count {
        let records = vec![Record::PutRun(run(id, "a", T0.plus_ms(id * 1_000)))];
        store.apply(&batch(epoch, id, records)).unwrap();
    }
}

fn log_name(generation: u64) -> String {
    format!("log-{generation:016x}")
}

fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:016x}")
}

/// A store that compacted once (to generation 1) and then took `after` more writes, which
/// live only in `log-1`.
fn compacted_then_written(dir: &TempDir, after: u64) {
    let store = FsStore::open_with(dir.path(), compacting(1)).unwrap();
    let epoch = writer(&store);
    store.wait_for_compaction();
    assert!(store.stats().compactions >= 1);
    drop(store);
    // Reopen without compacting, so the next writes stay in the newest log.
    let store = FsStore::open(dir.path()).unwrap();
    runs(&store, epoch, 1, after);
    assert!(dir.file(&log_name(1)).exists(), "{:?}", dir.entries());
    assert!(!dir.file(&log_name(2)).exists(), "{:?}", dir.entries());
}

#[track_caller]
fn assert_refuses_writes(store: &FsStore) {
    match store.restore() {
        Err(StoreError::Corrupt { detail, .. }) => {
            assert!(detail.contains("keel doctor --repair"), "{detail}");
        }
        other => panic!("a damaged store accepted a writer: {other:?}"),
    }
}

#[test]
fn a_deleted_newest_log_is_damage() {
    let dir = TempDir::new("deleted-log");
    compacted_then_written(&dir, 3);
    fs::remove_file(dir.file(&log_name(1))).unwrap();

    let store = FsStore::open(dir.path()).unwrap();
    let report = store.recovery();
    assert!(!report.is_clean(), "a lost log went unnoticed");
    assert!(report.to_string().contains(&log_name(1)), "{report}");
    assert_refuses_writes(&store);
    // Reading still works: what is left is readable.
    assert!(store.read().is_ok());
}

#[test]
fn an_emptied_newest_log_is_damage() {
    let dir = TempDir::new("emptied-log");
    compacted_then_written(&dir, 3);
    fs::write(dir.file(&log_name(1)), b"").unwrap();

    let store = FsStore::open(dir.path()).unwrap();
    let report = store.recovery();
    assert!(!report.is_clean(), "an emptied log went unnoticed");
    assert!(report.to_string().contains(&log_name(1)), "{report}");
    assert_refuses_writes(&store);
}

#[test]
fn a_whole_last_frame_with_a_bad_checksum_is_corrupt_not_torn() {
    let dir = TempDir::new("bad-last-frame");
    let log = dir.file(LOG0);
    {
        let store = FsStore::open(dir.path()).unwrap();
        let epoch = writer(&store);
        runs(&store, epoch, 1, 3);
    }
    let mut bytes = fs::read(&log).unwrap();
    let last = decode_log(&bytes).entries.last().unwrap().clone();
    bytes[(last.offset + last.len - 3) as usize] ^= 0x01;
    fs::write(&log, &bytes).unwrap();

    let store = FsStore::open(dir.path()).unwrap();
    let report = store.recovery();
    assert!(report.torn_tails.is_empty(), "called torn: {report}");
    assert_eq!(report.quarantined.len(), 1, "{report}");
    assert_eq!(report.quarantined[0].offset, last.offset);
    assert_eq!(
        fs::read(&log).unwrap(),
        bytes,
        "the damaged frame is not truncated away"
    );
    assert_eq!(store.run(RunId(3)).unwrap(), None);
    assert_refuses_writes(&store);
}

#[test]
fn a_frame_cut_short_is_still_a_torn_write() {
    let frame = keel_store_fs::format::frame_bytes(br#"{"writer":{"epoch":9}}"#).unwrap();
    for cut in [1, 4, 11, 12, frame.len() - 1] {
        let dir = TempDir::new("cut-short");
        let log = dir.file(LOG0);
        let intact = {
            let store = FsStore::open(dir.path()).unwrap();
            let epoch = writer(&store);
            runs(&store, epoch, 1, 2);
            fs::metadata(&log).unwrap().len()
        };
        let mut bytes = fs::read(&log).unwrap();
        bytes.extend_from_slice(&frame[..cut]);
        fs::write(&log, &bytes).unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let report = store.recovery();
        assert_eq!(report.torn_tails.len(), 1, "cut {cut}: {report}");
        assert!(!report.is_damaged(), "cut {cut}: {report}");
        assert_eq!(fs::metadata(&log).unwrap().len(), intact);
        assert!(
            store.restore().is_ok(),
            "cut {cut}: a torn write blocks nothing"
        );
    }
}

#[test]
fn a_store_without_its_version_file_says_how_to_fix_it() {
    let dir = TempDir::new("no-version");
    {
        let store = FsStore::open(dir.path()).unwrap();
        let epoch = writer(&store);
        runs(&store, epoch, 1, 1);
    }
    fs::remove_file(dir.file("VERSION")).unwrap();
    let error = FsStore::open(dir.path()).unwrap_err().to_string();
    assert!(error.contains("VERSION"), "{error}");
    assert!(
        error.contains("keel store whose VERSION file was lost"),
        "no hint for a lost VERSION: {error}"
    );
    assert!(
        error.contains("keel-store-fs"),
        "names the content: {error}"
    );
}

#[test]
fn a_store_without_a_usable_snapshot_says_what_to_do() {
    let dir = TempDir::new("no-usable-snapshot");
    {
        let store = FsStore::open_with(dir.path(), compacting(1)).unwrap();
        let epoch = writer(&store);
        // A compaction after every write (each waits for the one before): the logs before
        // the fallback generation are gone.
        for id in 1..=3 {
            store.wait_for_compaction();
            runs(&store, epoch, id, 1);
        }
    }
    for entry in dir.entries() {
        if entry.starts_with("snapshot-") {
            fs::remove_file(dir.file(&entry)).unwrap();
        }
    }
    let error = FsStore::open(dir.path()).unwrap_err();
    let StoreError::Corrupt { detail, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(detail.contains("backup"), "no hint: {detail}");
}

#[test]
fn a_foreign_directory_names_what_to_do() {
    let dir = TempDir::new("foreign-hint");
    fs::create_dir_all(dir.path()).unwrap();
    fs::write(dir.file("notes.txt"), "mine").unwrap();
    let error = FsStore::open(dir.path()).unwrap_err().to_string();
    assert!(error.contains("--data-dir"), "{error}");
}

/// Two compactions: generation 2 is committed, generation 1 kept as the fallback.
fn with_a_fallback(dir: &TempDir) {
    let store = FsStore::open_with(dir.path(), compacting(1)).unwrap();
    let epoch = writer(&store);
    // One compaction at a time: the second starts once the first is done.
    store.wait_for_compaction();
    runs(&store, epoch, 1, 1);
    drop(store);
    assert!(dir.file(&log_name(1)).exists() && dir.file(&snapshot_name(2)).exists());
}

#[test]
fn damage_in_the_fallback_generation_is_found_by_verify() {
    let dir = TempDir::new("fallback-damage");
    with_a_fallback(&dir);
    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.verify().unwrap().is_clean());
    drop(store);

    let path = dir.file(&log_name(1));
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.recovery().is_clean(), "loading reads only the newest");
    let verified = store.verify().unwrap();
    assert!(verified.to_string().contains(&log_name(1)), "{verified}");
    assert!(!verified.fallback_damage.is_empty());
    assert!(verified.damage.is_empty(), "nothing is lost: {verified}");
    // The newest generation is whole: writing goes on.
    assert!(store.restore().is_ok());

    // A repair drops the damaged fallback, and verification is clean again.
    let repaired = store.repair(T0).unwrap().expect("something to repair");
    assert!(repaired.fallback.iter().any(|d| d.file == log_name(1)));
    assert!(
        repaired.lost.is_empty(),
        "nothing was lost: {:?}",
        repaired.lost
    );
    assert!(!dir.file(&log_name(1)).exists());
    // The damaged log is kept, whole, in quarantine/.
    let kept = dir
        .path()
        .join("quarantine")
        .join(format!("{}.before-repair", log_name(1)));
    assert!(
        repaired.kept.contains(&kept.display().to_string()),
        "{:?}",
        repaired.kept
    );
    assert!(kept.exists());
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn a_fallback_log_cut_at_a_frame_boundary_is_found_by_verify() {
    let dir = TempDir::new("fallback-short");
    with_a_fallback(&dir);
    let path = dir.file(&log_name(1));
    let bytes = fs::read(&path).unwrap();
    let last = decode_log(&bytes).entries.last().unwrap().clone();
    fs::write(&path, &bytes[..last.offset as usize]).unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let verified = store.verify().unwrap();
    assert!(
        verified
            .fallback_damage
            .iter()
            .any(|d| d.file == log_name(1)),
        "{verified}"
    );
}

#[test]
fn a_repair_records_what_was_lost_and_lets_writers_in_again() {
    let dir = TempDir::new("repair");
    compacted_then_written(&dir, 3);
    fs::remove_file(dir.file(&log_name(1))).unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    assert_refuses_writes(&store);
    let repaired = store.repair(T0).unwrap().expect("damage to repair");
    assert_eq!(repaired.lost[0].file, log_name(1));
    let incidents = store.incidents().unwrap();
    let incident = incidents
        .iter()
        .find(|i| i.id == repaired.incident)
        .unwrap();
    assert_eq!(incident.kind, keel_core::IncidentKind::StoreRepaired);
    assert_eq!(incident.resolved_at, Some(T0));
    assert!(
        incident.details.contains(&log_name(1)),
        "{}",
        incident.details
    );
    assert!(
        store.read().unwrap().incidents.is_empty(),
        "resolved at once"
    );
    assert_eq!(
        store.read().unwrap().meta.next_incident,
        repaired.incident + 1
    );
    let epoch = writer(&store);
    runs(&store, epoch, 10, 1);
    drop(store);

    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert!(store.verify().unwrap().is_clean());
    assert!(store.run(RunId(10)).unwrap().is_some());
    assert_eq!(store.repair(T0).unwrap(), None, "nothing left to repair");
}

#[test]
fn a_handle_notices_a_log_shorter_than_what_it_read() {
    let dir = TempDir::new("shortened");
    let store = FsStore::open(dir.path()).unwrap();
    let epoch = writer(&store);
    runs(&store, epoch, 1, 3);
    let log = dir.file(LOG0);
    let bytes = fs::read(&log).unwrap();
    let last = decode_log(&bytes).entries.last().unwrap().clone();
    fs::write(&log, &bytes[..last.offset as usize]).unwrap();
    // Cut exactly at a frame boundary: only a handle that had read further can tell.
    assert!(store.read().is_ok());
    assert!(!store.recovery().damage.is_empty(), "{}", store.recovery());
    assert_refuses_writes(&store);
}

#[test]
fn a_format_1_store_opens_and_is_migrated() {
    use keel_store_fs::format::{frame_bytes, LogFrame};
    let dir = TempDir::new("format-1");
    fs::create_dir_all(dir.path()).unwrap();
    fs::write(dir.file("VERSION"), "keel-store-fs 1\n").unwrap();
    let mut log = Vec::new();
    for frame in [
        LogFrame::Writer { epoch: 1 },
        LogFrame::Batch {
            id: keel_core::BatchId(1 << 32),
            at: T0,
            records: vec![Record::PutRun(run(1, "a", T0))],
        },
    ] {
        log.extend(frame_bytes(&serde_json::to_vec(&frame).unwrap()).unwrap());
    }
    fs::write(dir.file(LOG0), &log).unwrap();

    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert!(store.run(RunId(1)).unwrap().is_some());
    assert_eq!(
        fs::read_to_string(dir.file("VERSION")).unwrap(),
        "keel-store-fs 2\n",
        "migrated at its first open"
    );
    assert!(dir.file("CURRENT").exists());
    assert_eq!(writer(&store), 2);
    drop(store);
    // From now on a lost newest log is noticed.
    fs::remove_file(dir.file(&log_name(1))).unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    assert!(!store.recovery().damage.is_empty());
    assert_eq!(
        store.runs(&RunQuery::default()).unwrap().runs.len(),
        1,
        "the snapshot still holds the run"
    );
}

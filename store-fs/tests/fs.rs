//! FsStore on real files: reopening, damage and its repair, versions, permissions, several
//! handles on one directory, and compaction.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;

use common::*;
use keel_core::{
    drive, AuditQuery, AuditRecord, Conflict, Effect, Incident, Outcome, Record, Run, RunId,
    RunQuery, Scheduler, Snapshot, Store, StoreError,
};
use keel_store_fs::format::{decode_log, frame_bytes, LogFrame};
use keel_store_fs::{FsOptions, FsStore};
use keel_testkit::MemStore;

/// Everything a store answers, for comparisons.
#[derive(Clone, Debug, PartialEq)]
struct Contents {
    read: Snapshot,
    runs: Vec<Run>,
    audit: Vec<AuditRecord>,
    incidents: Vec<Incident>,
}

fn contents(store: &impl Store) -> Contents {
    let runs = store
        .runs(&RunQuery {
            limit: keel_core::limits::HISTORY_PAGE_MAX,
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(runs.next, None, "the test histories fit one page");
    Contents {
        read: store.read().unwrap(),
        runs: runs.runs,
        audit: store
            .audit(&AuditQuery {
                limit: keel_core::limits::HISTORY_PAGE_MAX,
                ..AuditQuery::default()
            })
            .unwrap(),
        incidents: store.incidents().unwrap(),
    }
}

/// What a model store holds after the same batches.
fn model_contents(model: &MemStore) -> Contents {
    let mut runs: Vec<Run> = model.runs().cloned().collect();
    runs.reverse();
    Contents {
        read: model.snapshot(),
        runs,
        audit: model.audit().cloned().collect(),
        incidents: model.incidents().cloned().collect(),
    }
}

fn writer(store: &FsStore) -> u64 {
    store.restore().unwrap().meta.epoch + 1
}

fn append(path: &std::path::Path, bytes: &[u8]) {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

fn len(path: &std::path::Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// Writes `count` batches of one run each (ids from `first`), one slot apart.
fn runs(store: &FsStore, epoch: u64, first: u64, count: u64) {
    for id in first..first + count {
        let records = vec![Record::PutRun(run(id, "a", T0.plus_ms(id * 1_000)))];
        store.apply(&batch(epoch, id, records)).unwrap();
    }
}

#[test]
fn everything_survives_reopening() {
    let dir = TempDir::new("round-trip");
    let (before, epoch) = {
        let store = FsStore::open(dir.path()).unwrap();
        let epoch = writer(&store);
        store.apply(&everything(epoch, 0)).unwrap();
        (contents(&store), epoch)
    };
    let mut model = MemStore::store_rules_only();
    let _ = model.restore();
    model.apply(&everything(epoch, 0));
    assert_eq!(
        normalized(before.clone()),
        normalized(model_contents(&model)),
        "the store answers like the model"
    );
    // Not persisted, but derived from the stored runs like `Scheduler::restore` does.
    let active: Vec<u32> = before.read.jobs.iter().map(|j| j.active_runs).collect();
    assert_eq!(active, vec![1]);

    let store = FsStore::open(dir.path()).unwrap();
    assert_eq!(
        contents(&store),
        before,
        "a new handle reads exactly the same"
    );
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert_eq!(store.read().unwrap().deliveries, vec![delivery(1)]);
    assert_eq!(store.read().unwrap().incidents, vec![incident(1, false)]);
    assert_eq!(
        store.incidents().unwrap(),
        vec![incident(1, false), incident(2, true)]
    );
    // The writer epoch survived too: the next restore hands out the next one.
    assert_eq!(store.restore().unwrap().meta.epoch, epoch);
    assert_eq!(
        store.apply(&batch(epoch, 1, vec![])),
        Err(StoreError::Conflict(Conflict::Deposed {
            batch: epoch,
            current: epoch + 1
        }))
    );
}

#[test]
fn a_torn_tail_is_truncated() {
    let dir = TempDir::new("torn");
    let log = dir.file(LOG0);
    let intact = {
        let store = FsStore::open(dir.path()).unwrap();
        let epoch = writer(&store);
        runs(&store, epoch, 1, 3);
        len(&log)
    };
    // A crash in the middle of writing a frame: its header and part of its payload.
    let frame = frame_bytes(br#"{"writer":{"epoch":99}}"#).unwrap();
    append(&log, &frame[..20]);

    let store = FsStore::open(dir.path()).unwrap();
    let report = store.recovery();
    assert_eq!(report.torn_tails.len(), 1, "{report}");
    let torn = &report.torn_tails[0];
    assert_eq!(
        (torn.file.as_str(), torn.offset, torn.len),
        (LOG0, intact, 20)
    );
    assert!(torn.truncated);
    assert_eq!(len(&log), intact, "cut back to the last valid frame");
    assert_eq!(fs::read(torn.copy.as_ref().unwrap()).unwrap(), &frame[..20]);
    assert!(report.quarantined.is_empty() && report.snapshot_fallbacks.is_empty());
    for id in 1..=3 {
        assert!(store.run(RunId(id)).unwrap().is_some());
    }
    // The half-written writer claim never happened.
    let epoch = writer(&store);
    assert_eq!(epoch, 2);
    runs(&store, epoch, 4, 1);
    drop(store);

    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert_eq!(store.runs(&RunQuery::default()).unwrap().runs.len(), 4);
}

#[test]
fn a_damaged_frame_is_quarantined_and_the_rest_stays_readable() {
    let dir = TempDir::new("flipped");
    let log = dir.file(LOG0);
    {
        let store = FsStore::open(dir.path()).unwrap();
        let epoch = writer(&store);
        runs(&store, epoch, 1, 5);
    }
    let mut bytes = fs::read(&log).unwrap();
    let scan = decode_log(&bytes);
    let third = scan
        .entries
        .iter()
        .find(|e| matches!(&e.frame, LogFrame::Batch { records, .. } if matches!(&records[0], Record::PutRun(r) if r.id() == RunId(3))))
        .unwrap()
        .clone();
    let middle = (third.offset + third.len / 2) as usize;
    bytes[middle] ^= 0x01;
    fs::write(&log, &bytes).unwrap();
    let damaged = bytes[third.offset as usize..(third.offset + third.len) as usize].to_vec();

    let store = FsStore::open(dir.path()).unwrap();
    let report = store.recovery();
    assert_eq!(report.quarantined.len(), 1, "{report}");
    let bad = &report.quarantined[0];
    assert_eq!(
        (bad.file.as_str(), bad.offset, bad.len),
        (LOG0, third.offset, third.len)
    );
    assert!(bad.reason.contains("checksum"), "{}", bad.reason);
    let copy = bad.copy.clone().unwrap();
    assert_eq!(
        copy,
        dir.file("quarantine")
            .join(format!("{LOG0}-{}.bad", third.offset))
    );
    assert_eq!(fs::read(&copy).unwrap(), damaged);
    assert!(
        report.torn_tails.is_empty(),
        "valid frames follow: not a torn tail"
    );
    assert_eq!(len(&log), bytes.len() as u64, "nothing was truncated");
    assert_eq!(store.run(RunId(3)).unwrap(), None);
    for id in [1, 2, 4, 5] {
        assert!(store.run(RunId(id)).unwrap().is_some(), "run {id}");
    }

    // An acknowledged write is gone: writing is refused until the loss is acknowledged by a
    // repair, and every new handle reports the same meanwhile.
    assert!(matches!(store.restore(), Err(StoreError::Corrupt { .. })));
    drop(store);
    let store = FsStore::open(dir.path()).unwrap();
    assert_eq!(store.recovery().quarantined.len(), 1);
    let repaired = store.repair(T0).unwrap().expect("damage to repair");
    assert_eq!(repaired.lost.len(), 1, "{repaired:?}");
    assert_eq!(repaired.lost[0].offset, Some(third.offset));
    assert_eq!(fs::read(&copy).unwrap(), damaged, "the bad bytes are kept");
    let epoch = writer(&store);
    runs(&store, epoch, 6, 1);
    drop(store);
    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    let ids: Vec<u64> = store
        .runs(&RunQuery::default())
        .unwrap()
        .runs
        .iter()
        .map(|r| r.id().0)
        .collect();
    assert_eq!(ids, vec![6, 5, 4, 2, 1]);
}

/// Bytes at the end that are not the beginning of a frame cannot be a write cut short: they
/// may be a damaged acknowledged frame, so they are quarantined, not cut off.
#[test]
fn garbage_after_the_last_frame_is_quarantined() {
    let dir = TempDir::new("garbage");
    let log = dir.file(LOG0);
    let intact = {
        let store = FsStore::open(dir.path()).unwrap();
        let epoch = writer(&store);
        runs(&store, epoch, 1, 2);
        len(&log)
    };
    // Noise, then something that looks like a frame header with an absurd length.
    let mut garbage: Vec<u8> = (0..200u32).map(|i| (i * 31 + 7) as u8).collect();
    garbage.extend_from_slice(b"KLF1\xff\xff\xff\x7f\0\0\0\0");
    append(&log, &garbage);

    let store = FsStore::open(dir.path()).unwrap();
    let report = store.recovery();
    assert!(report.torn_tails.is_empty(), "{report}");
    assert_eq!(report.quarantined.len(), 1, "{report}");
    assert_eq!(report.quarantined[0].offset, intact);
    assert_eq!(report.quarantined[0].len, garbage.len() as u64);
    assert_eq!(
        len(&log),
        intact + garbage.len() as u64,
        "nothing is cut off"
    );
    assert_eq!(store.runs(&RunQuery::default()).unwrap().runs.len(), 2);
    assert!(matches!(store.restore(), Err(StoreError::Corrupt { .. })));
    store.repair(T0).unwrap().expect("damage to repair");
    let epoch = writer(&store);
    runs(&store, epoch, 3, 1);
    drop(store);
    let store = FsStore::open(dir.path()).unwrap();
    assert!(store.recovery().is_clean());
    assert_eq!(store.runs(&RunQuery::default()).unwrap().runs.len(), 3);
}

/// Options that compact often.
fn compacting(bytes: u64) -> FsOptions {
    FsOptions {
        compact_after_bytes: bytes,
        compact_at_snapshot_size: false,
        ..FsOptions::default()
    }
}

/// The generations whose snapshot and log files are in `dir`.
fn generation_files(dir: &TempDir) -> Vec<String> {
    dir.entries()
        .into_iter()
        .filter(|n| n.starts_with("snapshot-") || n.starts_with("log-"))
        .collect()
}

/// Writes until the store has compacted at least `times` times; returns the writer epoch.
/// Each write waits for the compaction it started, so the files are as if compactions ran
/// on the write path.
fn compact_times(store: &FsStore, times: u64) -> u64 {
    let epoch = writer(store);
    store.wait_for_compaction();
    let mut id = 1;
    while store.stats().compactions < times {
        runs(store, epoch, id, 1);
        store.wait_for_compaction();
        store
            .apply(&batch(
                epoch,
                10_000 + id,
                vec![Record::Audit(audit(id, "a", Some(id)))],
            ))
            .unwrap();
        store.wait_for_compaction();
        id += 1;
    }
    epoch
}

fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:016x}")
}

fn log_name(generation: u64) -> String {
    format!("log-{generation:016x}")
}

/// A missing newest snapshot is what a compaction leaves until its thread has written it (or
/// if it was interrupted): the generation loads from the previous snapshot and every log
/// since, nothing is reported (nothing is lost), and the next compaction writes a snapshot.
#[test]
fn a_missing_snapshot_is_rebuilt_from_the_previous_generation() {
    let dir = TempDir::new("missing-snapshot");
    let before = {
        let store = FsStore::open_with(dir.path(), compacting(4_096)).unwrap();
        compact_times(&store, 3);
        contents(&store)
    };
    // Generation 3 is current; 2 is the fallback; 1 and 0 are gone.
    assert_eq!(
        generation_files(&dir),
        vec![log_name(2), log_name(3), snapshot_name(2), snapshot_name(3)]
    );
    fs::remove_file(dir.file(&snapshot_name(3))).unwrap();

    let store = FsStore::open_with(dir.path(), compacting(4_096)).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert_eq!(contents(&store), before, "nothing was lost");
    assert!(store.verify().unwrap().is_clean());
    // The next compaction rebuilds from generation 2 and keeps it as the fallback.
    compact_times(&store, 1);
    let before = contents(&store);
    assert!(dir.file(&snapshot_name(4)).exists());
    assert!(dir.file(&snapshot_name(2)).exists(), "the fallback is kept");
    drop(store);
    let store = FsStore::open_with(dir.path(), compacting(4_096)).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert_eq!(contents(&store), before);
}

#[test]
fn a_corrupt_snapshot_is_quarantined_and_rebuilt() {
    let dir = TempDir::new("corrupt-snapshot");
    let before = {
        let store = FsStore::open_with(dir.path(), compacting(4_096)).unwrap();
        compact_times(&store, 2);
        contents(&store)
    };
    let path = dir.file(&snapshot_name(2));
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    fs::write(&path, &bytes).unwrap();

    let store = FsStore::open_with(dir.path(), compacting(4_096)).unwrap();
    let fallbacks = store.recovery().snapshot_fallbacks;
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(
        (fallbacks[0].generation, fallbacks[0].restored_from),
        (2, 1)
    );
    assert!(
        fallbacks[0].reason.contains("at byte"),
        "{}",
        fallbacks[0].reason
    );
    assert_eq!(contents(&store), before);
    let kept = dir
        .file("quarantine")
        .join(format!("{}.bad", snapshot_name(2)));
    assert_eq!(fs::read(kept).unwrap(), bytes);
}

#[test]
fn without_any_usable_snapshot_opening_fails_loudly() {
    let dir = TempDir::new("no-snapshot");
    {
        let store = FsStore::open_with(dir.path(), compacting(4_096)).unwrap();
        compact_times(&store, 3);
    }
    fs::remove_file(dir.file(&snapshot_name(3))).unwrap();
    fs::remove_file(dir.file(&snapshot_name(2))).unwrap();
    let error = FsStore::open(dir.path()).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
}

#[test]
fn another_format_is_refused() {
    let dir = TempDir::new("version");
    fs::create_dir_all(dir.path()).unwrap();
    fs::write(dir.file("VERSION"), "keel-store-fs 3\n").unwrap();
    assert_eq!(
        FsStore::open(dir.path()).unwrap_err(),
        StoreError::Version {
            found: "keel-store-fs 3".into(),
            supported: "keel-store-fs 2 or keel-store-fs 1".into()
        }
    );
}

#[test]
fn a_foreign_directory_is_not_adopted() {
    let dir = TempDir::new("foreign");
    fs::create_dir_all(dir.path()).unwrap();
    fs::write(dir.file("notes.txt"), "mine").unwrap();
    let error = FsStore::open(dir.path()).unwrap_err();
    let StoreError::Io(message) = &error else {
        panic!("{error:?}");
    };
    assert!(
        message.contains("not a keel store") && message.contains("notes.txt"),
        "{message}"
    );
    assert_eq!(
        dir.entries(),
        vec!["notes.txt"],
        "nothing was created in it"
    );

    // A store whose marker was deleted is not silently re-adopted either.
    let store_dir = TempDir::new("unmarked");
    drop(FsStore::open(store_dir.path()).unwrap());
    fs::remove_file(store_dir.file("VERSION")).unwrap();
    assert!(FsStore::open(store_dir.path()).is_err());
}

#[test]
fn an_empty_existing_directory_becomes_a_store() {
    let dir = TempDir::new("empty");
    fs::create_dir_all(dir.path()).unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    assert_eq!(
        fs::read_to_string(dir.file("VERSION")).unwrap(),
        "keel-store-fs 2\n"
    );
    assert_eq!(store.read().unwrap(), Snapshot::default());
    assert_eq!(dir.entries(), vec!["CURRENT", "VERSION", "lock", LOG0]);
}

#[cfg(unix)]
#[test]
fn files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;

    let parent = TempDir::new("modes");
    let dir = parent.path().join("nested").join("data");
    let store = FsStore::open_with(&dir, compacting(512)).unwrap();
    compact_times(&store, 1);
    drop(store);
    append(&dir.join(log_name(1)), b"torn");
    drop(FsStore::open(&dir).unwrap());

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&parent.path().join("nested")), 0o700);
    assert_eq!(mode(&dir.join("quarantine")), 0o700);
    let mut checked = 0;
    for entry in fs::read_dir(&dir)
        .unwrap()
        .chain(fs::read_dir(dir.join("quarantine")).unwrap())
    {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
            checked += 1;
        }
    }
    assert!(
        checked >= 6,
        "VERSION, lock, two logs, a snapshot, a quarantined tail: {checked}"
    );

    // An existing directory a store is created in is restricted too.
    let existing = TempDir::new("modes-existing");
    fs::create_dir_all(existing.path()).unwrap();
    fs::set_permissions(existing.path(), fs::Permissions::from_mode(0o755)).unwrap();
    drop(FsStore::open(existing.path()).unwrap());
    assert_eq!(mode(existing.path()), 0o700);
}

#[test]
fn two_handles_see_each_others_writes() {
    let dir = TempDir::new("two-handles");
    let a = FsStore::open(dir.path()).unwrap();
    let b = FsStore::open(dir.path()).unwrap();
    let first = writer(&a);
    runs(&a, first, 1, 1);
    assert!(b.run(RunId(1)).unwrap().is_some(), "b reads a's write");

    let second = writer(&b);
    assert_eq!(second, first + 1);
    let refused = a.apply(&batch(first, 2, vec![Record::PutRun(run(2, "a", T0))]));
    assert_eq!(
        refused,
        Err(StoreError::Conflict(Conflict::Deposed {
            batch: first,
            current: second
        })),
        "a sees b's restore before it writes"
    );
    // The slot b claims next is checked against a's earlier claim.
    let taken = b.apply(&batch(
        second,
        0,
        vec![Record::PutRun(run(9, "a", T0.plus_ms(1_000)))],
    ));
    assert!(matches!(
        taken,
        Err(StoreError::Conflict(Conflict::SlotTaken {
            owner: RunId(1),
            ..
        }))
    ));
    runs(&b, second, 2, 1);
    assert_eq!(contents(&a), contents(&b));
}

#[test]
fn a_reader_leaves_a_torn_tail_to_the_next_writer() {
    let dir = TempDir::new("reader-torn");
    let log = dir.file(LOG0);
    let a = FsStore::open(dir.path()).unwrap();
    let b = FsStore::open(dir.path()).unwrap();
    let epoch = writer(&a);
    runs(&a, epoch, 1, 1);
    let intact = len(&log);
    // A third process crashed mid-write.
    append(&log, b"KLF1\x10\0\0\0");

    assert!(b.run(RunId(1)).unwrap().is_some());
    assert_eq!(len(&log), intact + 8, "a reader does not truncate");
    let seen = b.recovery();
    assert_eq!(seen.torn_tails.len(), 1);
    assert!(!seen.torn_tails[0].truncated);

    runs(&a, epoch, 2, 1);
    assert!(
        a.recovery().torn_tails[0].truncated,
        "the writer cut it off"
    );
    assert!(b.run(RunId(2)).unwrap().is_some(), "and the reader follows");
    assert_eq!(decode_log(&fs::read(&log).unwrap()).torn_tail, None);
}

#[test]
fn epochs_rise_across_reopening_and_compaction() {
    let dir = TempDir::new("epochs");
    let mut seen = Vec::new();
    for _ in 0..3 {
        // Compacting after every write: the epoch lives in the snapshots.
        let store = FsStore::open_with(dir.path(), compacting(0)).unwrap();
        seen.push(store.restore().unwrap().meta.epoch);
        seen.push(store.restore().unwrap().meta.epoch);
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
}

/// A claim lives as long as its run: through snapshots while the run is stored, and gone
/// with it when the history policy prunes it, so claims do not outgrow the history. What
/// keeps a pruned slot from firing again is the job's cursor, stored with the job.
#[test]
fn a_slot_claim_lives_as_long_as_its_run_through_snapshots() {
    let dir = TempDir::new("pruned-slots");
    {
        let store = FsStore::open_with(dir.path(), compacting(0)).unwrap();
        let epoch = writer(&store);
        let done = finished(run(1, "a", T0), T0);
        let active = run(2, "a", T0.plus_ms(1));
        store.wait_for_compaction();
        store
            .apply(&batch(
                epoch,
                0,
                vec![Record::PutRun(done), Record::PutRun(active)],
            ))
            .unwrap();
        let prune = Record::PruneHistory {
            job: None,
            keep_last: 0,
            finished_before: T0.plus_ms(1),
        };
        store.wait_for_compaction();
        store.apply(&batch(epoch, 1, vec![prune])).unwrap();
        store.wait_for_compaction();
        assert_eq!(store.run(RunId(1)).unwrap(), None);
        assert!(store.stats().compactions >= 3);
    }
    let store = FsStore::open(dir.path()).unwrap();
    let epoch = writer(&store);
    let taken = store.apply(&batch(
        epoch,
        0,
        vec![Record::PutRun(run(3, "a", T0.plus_ms(1)))],
    ));
    assert!(
        matches!(
            taken,
            Err(StoreError::Conflict(Conflict::SlotTaken {
                owner: RunId(2),
                ..
            }))
        ),
        "{taken:?}"
    );
    store
        .apply(&batch(epoch, 1, vec![Record::PutRun(run(4, "a", T0))]))
        .expect("the pruned run's claim went with it");
}

/// A real scheduler's batches, through many compactions, read back exactly like a model
/// store that applied the same batches; a second handle that never writes follows along.
#[test]
fn compaction_keeps_everything() {
    let dir = TempDir::new("compaction");
    let options = compacting(16 * 1024);
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let follower = FsStore::open_with(dir.path(), options).unwrap();
    let mut model = MemStore::new();
    let _ = model.restore();

    let config = keel_core::Config {
        history: keel_core::HistoryPolicy {
            runs_max: 3,
            age_max_ms: 3_600_000,
        },
        ..keel_core::Config::default()
    };
    let snapshot = store.restore().unwrap();
    let mut now = T0;
    let mut keel = Scheduler::restore(config.clone(), 7, now, snapshot);
    for name in ["often", "sometimes"] {
        let expr = if name == "often" {
            "* * * * * *"
        } else {
            "*/7 * * * * *"
        };
        let spec = keel_core::JobSpec::new(
            job_id(name),
            "work",
            keel_core::ScheduleSpec::Cron {
                expr: expr.into(),
                zone: "UTC".into(),
            },
        );
        keel.add_job(now, spec).unwrap();
    }
    let mut followed = 0;
    for step in 0..400u64 {
        let write = |batch: &keel_core::Batch| {
            store.apply(batch)?;
            model.apply(batch);
            Ok(())
        };
        drive::drain(&mut keel, now, write, |keel, now, effect| {
            if let Effect::StartAttempt(start) = effect {
                let outcome = if start.run.0 % 4 == 0 {
                    Outcome::Retryable {
                        message: "flaky".into(),
                    }
                } else {
                    Outcome::ok()
                };
                keel.handle_outcome(now, start.run, start.lease.token, outcome)
                    .unwrap();
            }
        })
        .unwrap();
        if step % 50 == 0 {
            assert_eq!(
                normalized(contents(&follower)),
                normalized(model_contents(&model))
            );
            followed += 1;
        }
        now = keel.poll_timeout().unwrap();
        keel.handle_timeout(now);
    }
    store.wait_for_compaction();
    assert!(store.stats().compactions >= 3, "{:?}", store.stats());
    assert!(followed > 1);
    assert!(
        generation_files(&dir).len() <= 4,
        "{:?}",
        generation_files(&dir)
    );

    let expected = normalized(model_contents(&model));
    assert!(expected.runs.len() >= 4 && expected.audit.len() > 10);
    // The history policy pruned most runs: their deletion went through snapshots too.
    assert!(expected.read.meta.next_run_id as usize > expected.runs.len() + 50);
    assert_eq!(normalized(contents(&store)), expected);
    assert_eq!(normalized(contents(&follower)), expected);
    drop(store);
    let reopened = FsStore::open_with(dir.path(), options).unwrap();
    assert_eq!(normalized(contents(&reopened)), expected);
    assert!(reopened.recovery().is_clean());
}

/// `Job::active_runs` is not persisted (the scheduler derives it on restore): the model keeps
/// what was written, the store derives it from the stored runs.
fn normalized(mut contents: Contents) -> Contents {
    for job in &mut contents.read.jobs {
        job.active_runs = 0;
    }
    contents
}

/// A crash inside a compaction: after the new snapshot got its name (and even its log was
/// created) but before `CURRENT` committed the generation, with a half-written snapshot of a
/// later attempt lying around. The uncommitted generation is ignored: both a handle that was
/// open and a new one read everything, and the next compaction replaces the leftovers.
#[test]
fn an_interrupted_compaction_loses_nothing() {
    let dir = TempDir::new("interrupted-compaction");
    let options = compacting(4_096);
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let reader = FsStore::open_with(dir.path(), options).unwrap();
    compact_times(&store, 2);
    drop(store);
    let committed = fs::read(dir.file("CURRENT")).unwrap();
    // With a tiny threshold, the first write compacts (in the background), to generation 3
    // with an empty log.
    let store = FsStore::open_with(dir.path(), compacting(1)).unwrap();
    assert_eq!(
        store.stats().compactions,
        0,
        "opening leaves it to the first write"
    );
    let epoch = writer(&store);
    store.wait_for_compaction();
    assert_eq!(store.stats().compactions, 1);
    let before = contents(&store);
    assert_eq!(contents(&reader), before);
    drop(store);
    // Undo the commit, as if the crash came just before `CURRENT` was renamed.
    fs::write(dir.file("CURRENT"), &committed).unwrap();
    // What the compaction to generation 3 left: its log, its snapshot, a half-written one.
    let half_written = format!("{}.tmp", snapshot_name(3));
    fs::write(dir.file(&half_written), b"KLF1").unwrap();

    assert_eq!(contents(&reader), before, "a handle that was open follows");
    let store = FsStore::open_with(dir.path(), options).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert_eq!(contents(&store), before);

    runs(&store, epoch, 1_000, 1);
    assert!(reader.run(RunId(1_000)).unwrap().is_some());
    compact_times(&store, 1);
    assert!(
        !dir.file(&half_written).exists(),
        "the next compaction removed the leftover"
    );
    drop(store);
    let store = FsStore::open_with(dir.path(), options).unwrap();
    assert!(store.recovery().is_clean(), "{}", store.recovery());
    assert!(store.run(RunId(1_000)).unwrap().is_some());
}

/// With the default `compact_at_snapshot_size`, the log must grow as large as the snapshot
/// before the next compaction: rewriting the whole state costs no more than what was appended
/// since, so a store that keeps growing is not rewritten every few megabytes (adding a million
/// jobs was quadratic).
#[test]
fn a_compaction_waits_for_the_log_to_reach_the_snapshot_size() {
    let dir = TempDir::new("snapshot-sized");
    let options = FsOptions {
        compact_after_bytes: 1,
        ..FsOptions::default()
    };
    let store = FsStore::open_with(dir.path(), options).unwrap();
    let epoch = writer(&store);
    // The first write of the new store compacts at once (its snapshot is empty), and the
    // next ones each take the log past the previous, still small, snapshot.
    // Each compaction finishes before the next write, so none is skipped and the log holds
    // only what was written since the last one.
    for id in 1..=200 {
        runs(&store, epoch, id, 1);
        store.wait_for_compaction();
    }
    let grown = store.stats().compactions;
    assert!(grown >= 3, "a small store compacts often ({grown})");
    let snapshot = newest_size(&dir, "snapshot-");
    let log = newest_size(&dir, "log-");
    assert!(
        log < snapshot,
        "the log is smaller than the snapshot: {log} < {snapshot}"
    );
    // A few more small writes stay in the log: far less than a snapshot's worth.
    runs(&store, epoch, 201, 5);
    store.wait_for_compaction();
    assert_eq!(store.stats().compactions, grown);
    // Once the log has grown past the snapshot's size, the next write compacts.
    let mut id = 206;
    while newest_size(&dir, "log-") < snapshot {
        runs(&store, epoch, id, 1);
        id += 1;
    }
    runs(&store, epoch, id, 1);
    store.wait_for_compaction();
    assert_eq!(store.stats().compactions, grown + 1);
}

/// The size of the newest file whose name starts with `prefix`. A file removed while the
/// directory is listed (a compaction finishing in the background) is skipped.
fn newest_size(dir: &TempDir, prefix: &str) -> u64 {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(prefix) || name.ends_with(".tmp") {
                return None;
            }
            match e.metadata() {
                Ok(meta) => Some((name, meta.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => panic!("{name}: {e}"),
            }
        })
        .collect();
    files.sort();
    files.last().map_or(0, |(_, len)| *len)
}

//! Process-crash safety, the guarantee this store does make: a writer killed with SIGKILL in
//! the middle of its writes loses no batch it was told was durable, and no batch is half
//! applied. (Power loss is another matter; see the crate docs.)
//!
//! The test re-runs its own binary as the writer. The child applies batches in a loop and
//! prints an acknowledgement marker and N after `apply` returns `Ok` for batch N; the parent kills it after a varying
//! number of acknowledgements, so the kill lands somewhere inside a later `apply`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use keel_core::{AuditQuery, Record, RunId, RunQuery, Store, Timestamp};
use keel_harness::conformance::{audit_record, batch, run};
use keel_harness::TempDir;
use keel_store_sled::SledStore;

/// Set in the child: the store directory to write to.
const CHILD_DIR: &str = "KEEL_STORE_SLED_CRASH_CHILD_DIR";
/// What the child prints, followed by the batch number, once a batch is acknowledged.
const ACK: &str = "keel-store-sled-ack:";
const T0: Timestamp = Timestamp(1_800_000_000_000);

/// The writer process, killed (SIGKILL) and reaped when dropped, also if the test fails.
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_writer_loses_nothing_acknowledged() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        write_until_killed(&SledStore::open(dir).unwrap());
    }
    for acks in [1, 7, 23, 60] {
        let dir = TempDir::new("keel-store-sled-crash");
        let mut child = Writer(
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "a_killed_writer_loses_nothing_acknowledged",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_DIR, dir.path())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = BufReader::new(child.0.stdout.take().unwrap());
        let mut acknowledged = 0;
        for line in stdout.lines() {
            // libtest may print on the same line before the marker.
            if let Some((_, n)) = line.unwrap().split_once(ACK) {
                acknowledged = n.trim().parse::<u64>().unwrap();
                if acknowledged >= acks {
                    break;
                }
            }
        }
        assert_eq!(acknowledged, acks, "the writer stopped early");
        drop(child);

        let store = SledStore::open(dir.path()).unwrap();
        let runs = store
            .runs(&RunQuery {
                limit: 10_000,
                ..RunQuery::default()
            })
            .unwrap();
        let stored = runs.runs.len() as u64;
        assert!(
            stored >= acknowledged,
            "{acknowledged} batches acknowledged, {stored} stored"
        );
        // Batches land whole and in order: runs 1..=stored, each with its audit record.
        for id in 1..=stored {
            assert!(store.run(RunId(id)).unwrap().is_some(), "run {id} missing");
        }
        let audit = store
            .audit(&AuditQuery {
                limit: 10_000,
                ..AuditQuery::default()
            })
            .unwrap();
        let seqs: Vec<u64> = audit.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=stored).collect::<Vec<_>>());
        // The store is still writable by a new writer.
        let epoch = store.restore().unwrap().meta.epoch + 1;
        let next = stored + 1;
        let records = vec![Record::PutRun(run(next, "job", T0.plus_ms(next)))];
        store.apply(&batch(epoch, 0, T0, records)).unwrap();
    }
}

/// The child: applies batch after batch, announcing each acknowledgement, until killed.
fn write_until_killed(store: &SledStore) -> ! {
    let epoch = store.restore().unwrap().meta.epoch + 1;
    let mut stdout = std::io::stdout();
    for n in 1.. {
        let records = vec![
            Record::PutRun(run(n, "job", T0.plus_ms(n))),
            Record::Audit(audit_record(n, "job", Some(n), T0)),
        ];
        store.apply(&batch(epoch, n, T0, records)).unwrap();
        writeln!(stdout, "{ACK}{n}").unwrap();
        stdout.flush().unwrap();
    }
    unreachable!("the parent kills the writer first")
}

//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz target bodies
//! in `keel_harness::fuzzing`, on the stable toolchain, so that every input that ever found new
//! coverage keeps passing without nightly or libFuzzer.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// Runs `body` on every file in the target's corpus directory; fails naming every file that
/// panicked. Fails too if the directory is missing or empty, so a moved corpus cannot make this
/// test pass vacuously.
fn replay(target: &str, body: fn(&[u8])) {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} unreadable: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} has no files",
        dir.display()
    );

    // Keep the default hook's message (it names the assertion) but say which file it was.
    let mut failures = Vec::new();
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic payload)");
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} corpus files panicked:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("{target}: replayed {} corpus files", files.len());
}

#[test]
fn schedule_parse_corpus() {
    replay("schedule_parse", keel_harness::fuzzing::schedule_parse);
}

#[test]
fn core_events_corpus() {
    replay("core_events", keel_harness::fuzzing::core_events);
}

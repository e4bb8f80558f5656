//! Replays the committed corpus of the `store_decode` fuzz target (`fuzz/corpus/store_decode/`)
//! on stable: the log and snapshot decoders never panic on any input that ever found new
//! coverage, and the log scan accounts for every byte.

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn store_decode_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/store_decode");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "the corpus in {} is missing",
        dir.display()
    );
    for file in files {
        let data = std::fs::read(&file).unwrap();
        let result = std::panic::catch_unwind(|| keel_store_fs::format::fuzz_decode(&data));
        assert!(result.is_ok(), "{} panicked the decoder", file.display());
    }
}

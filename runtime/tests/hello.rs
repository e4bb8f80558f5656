//! The hello world example (`runtime/examples/hello.rs`, the crate docs' first example), run
//! as a user runs it: twice on the same directory. `cargo test` builds examples first.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/hello`, beside this test's `target/<profile>/deps/`.
fn hello() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap();
    profile.join("examples").join("hello")
}

#[test]
fn hello_runs_twice_on_one_directory_and_its_one_shot_fires_once_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let out = Command::new(hello()).arg(&data).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    assert!(outputs[0].contains("job welcome: added"), "{}", outputs[0]);
    assert!(
        outputs[1].contains("job tick: unchanged")
            && outputs[1].contains("job welcome: done (its one-shot slot"),
        "{}",
        outputs[1]
    );
    let said = |what: &str| {
        let line = format!(": {what}\n");
        outputs
            .iter()
            .map(|o| o.matches(&line).count())
            .sum::<usize>()
    };
    assert_eq!(said("welcome!"), 1, "{outputs:?}");
    assert!(
        said("tick") >= 4,
        "the cron job fired in both runs: {outputs:?}"
    );
}

//! keel-core must stay pure (crate docs, STYLE.md "Shape of the core"): it reads no clock,
//! touches no file, opens no socket, spawns no thread and draws no OS randomness. These tests
//! fail the build the day that stops being true, in two independent ways:
//!
//! - the crate's normal dependency tree must contain no async runtime, storage engine, I/O,
//!   OS-randomness or threading crate;
//! - its own source must not call the clock, the file system, the network, the environment,
//!   processes, threads or the terminal.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates keel-core must never depend on, directly or transitively. A trailing `*` is a prefix
/// match. Names are compared with `_` and `-` treated alike, as cargo does.
const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "tokio-*",
    "async-std",
    "smol",
    "futures",
    "futures-*",
    "mio",
    "sled",
    "reqwest",
    "hyper",
    "socket2",
    "nix",
    "libc",
    "iana-time-zone",
    "rand",
    "rand-*",
    "getrandom",
    "crossbeam*",
    "rayon",
    "memmap2",
    "parking-lot",
    "metrics",
];

/// Dependencies keel-core is known to have; if they are missing from the parsed output, the
/// parser (or cargo's output format) is broken and the forbidden-crate check proves nothing.
const KNOWN_CRATES: &[&str] = &["chrono", "croner", "serde"];

/// Text that must not appear on a non-comment line of keel-core's source.
const FORBIDDEN_SOURCE: &[&str] = &[
    "Instant::now",
    "SystemTime",
    "Utc::now",
    "Local::now",
    "std::fs",
    "std::net",
    "std::env",
    "std::process",
    "std::thread",
    "thread::spawn",
    "thread::sleep",
    "tokio::",
    "sled::",
    "File::open",
    "File::create",
    "std::io::stdin",
    "println!",
    "eprintln!",
];

// ----- dependency tree ----------------------------------------------------------------------

#[test]
fn dependency_tree_has_no_io_runtime_or_os_crates() {
    let deps = normal_dependencies();
    assert!(
        !deps.is_empty(),
        "`cargo tree` listed no dependencies for keel-core; has its output format changed?"
    );
    let names: Vec<&str> = deps.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.contains(&"keel-core"),
        "`cargo tree` output does not list keel-core itself; parsed: {names:?}"
    );
    for known in KNOWN_CRATES {
        assert!(
            names.contains(known),
            "known dependency {known} not found in `cargo tree` output; parsed: {names:?}"
        );
    }

    let offenders: Vec<&(String, String)> = deps
        .iter()
        .filter(|(name, _)| forbidden_crate(name).is_some())
        .collect();
    if offenders.is_empty() {
        return;
    }
    let mut report = String::new();
    for (name, version) in &offenders {
        let rule = forbidden_crate(name).expect("filtered above");
        report.push_str(&format!(
            "\n- {name} v{version} (forbidden by {rule:?}), reached by:\n{}",
            inverted_tree(name, version)
        ));
    }
    panic!(
        "keel-core must stay pure, but its normal dependency tree contains {} forbidden crate(s):{report}",
        offenders.len()
    );
}

#[test]
fn forbidden_crate_matching() {
    assert_eq!(forbidden_crate("tokio"), Some("tokio"));
    assert_eq!(forbidden_crate("tokio-util"), Some("tokio-*"));
    assert_eq!(forbidden_crate("futures_core"), Some("futures-*"));
    assert_eq!(forbidden_crate("rand_core"), Some("rand-*"));
    assert_eq!(forbidden_crate("crossbeam-channel"), Some("crossbeam*"));
    assert_eq!(forbidden_crate("parking_lot"), Some("parking-lot"));
    assert_eq!(forbidden_crate("chrono"), None);
    assert_eq!(forbidden_crate("serde"), None);
    // Exact names are not prefixes: a crate that merely starts with one is not caught.
    assert_eq!(forbidden_crate("randomize"), None);
    assert_eq!(forbidden_crate("libcrux"), None);
}

#[test]
fn cargo_tree_lines_are_parsed() {
    assert_eq!(
        parse_tree_line("keel-core v0.1.0 (/work/main/core)"),
        Some(("keel-core".into(), "0.1.0".into()))
    );
    assert_eq!(
        parse_tree_line("chrono v0.4.45 (*)"),
        Some(("chrono".into(), "0.4.45".into()))
    );
    assert_eq!(
        parse_tree_line("serde_derive v1.0.229 (proc-macro)"),
        Some(("serde_derive".into(), "1.0.229".into()))
    );
    assert_eq!(parse_tree_line(""), None);
    assert_eq!(parse_tree_line("warning: something"), None);
}

/// Returns the rule that forbids `name`, if any.
fn forbidden_crate(name: &str) -> Option<&'static str> {
    let name = name.replace('_', "-");
    FORBIDDEN_CRATES.iter().copied().find(|rule| {
        let rule_norm = rule.replace('_', "-");
        match rule_norm.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == rule_norm,
        }
    })
}

/// `(name, version)` of every package in keel-core's normal dependency tree, keel-core
/// included, deduplicated.
fn normal_dependencies() -> Vec<(String, String)> {
    let stdout = cargo(&[
        "tree",
        "-p",
        "keel-core",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    let mut deps: Vec<(String, String)> = stdout.lines().filter_map(parse_tree_line).collect();
    deps.sort();
    deps.dedup();
    deps
}

/// Parses one `--prefix none --format {p}` line: `name vX.Y.Z [(path)|(*)|(proc-macro)]`.
fn parse_tree_line(line: &str) -> Option<(String, String)> {
    let mut words = line.split_whitespace();
    let name = words.next()?;
    let version = words.next()?.strip_prefix('v')?;
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    Some((name.to_owned(), version.to_owned()))
}

/// How `name` is reached from keel-core, for the failure message.
fn inverted_tree(name: &str, version: &str) -> String {
    let spec = format!("{name}@{version}");
    try_cargo(&["tree", "-p", "keel-core", "-e", "normal", "-i", &spec])
        .unwrap_or_else(|e| format!("(could not show the path: {e})"))
}

/// Runs cargo against this workspace, offline, and returns its stdout; panics with cargo's
/// stderr if it fails.
fn cargo(args: &[&str]) -> String {
    try_cargo(args).unwrap_or_else(|e| panic!("{e}; the purity check cannot run"))
}

fn try_cargo(args: &[&str]) -> Result<String, String> {
    let manifest = workspace_root().join("Cargo.toml");
    let shown = format!(
        "`{} {} --manifest-path {} --offline`",
        env!("CARGO"),
        args.join(" "),
        manifest.display()
    );
    let output = Command::new(env!("CARGO"))
        .args(args)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--offline")
        .output()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{shown} failed ({}); stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    String::from_utf8(output.stdout).map_err(|e| format!("{shown} printed non-UTF-8: {e}"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("keel-core lives in a directory of the workspace")
        .to_path_buf()
}

// ----- source scan ----------------------------------------------------------------------

#[test]
fn source_calls_no_clock_io_env_process_or_thread() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("lib.rs")),
        "found no lib.rs under {}; scanned: {files:?}",
        src.display()
    );

    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let shown = file.strip_prefix(&src).unwrap_or(file);
        for (line, pattern) in scan(&text) {
            offences.push(format!(
                "core/src/{}:{line}: uses `{pattern}`",
                shown.display()
            ));
        }
    }
    assert!(
        offences.is_empty(),
        "keel-core must stay sans-IO (time is an argument, effects are values), but:\n{}",
        offences.join("\n")
    );
}

#[test]
fn scanner_flags_code_and_ignores_comments() {
    let sample = "\
//! Docs may mention Instant::now freely.
fn f() {
    // and so may comments: std::fs::read
    /// even doc comments: println!
    let t = std::time::SystemTime::now();
    let ok = 1;
        println!(\"hi\");
}
";
    assert_eq!(scan(sample), vec![(5, "SystemTime"), (7, "println!")]);
    assert!(scan("let x = 1;\n// tokio::spawn\n").is_empty());
    // One finding per line, naming the first pattern that matches.
    assert_eq!(scan("std::thread::sleep(d);"), vec![(1, "std::thread")]);
}

/// `(1-based line, pattern)` for every non-comment line of `text` containing a forbidden
/// pattern. A line is a comment if its trimmed text starts with `//` (this covers `///` and
/// `//!`).
fn scan(text: &str) -> Vec<(usize, &'static str)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .filter_map(|(i, line)| {
            FORBIDDEN_SOURCE
                .iter()
                .find(|pattern| line.contains(**pattern))
                .map(|pattern| (i + 1, *pattern))
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

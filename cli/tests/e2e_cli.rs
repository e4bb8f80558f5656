//! End-to-end tests of the `keel` commands that need no daemon: jobs, the worker protocol,
//! `doctor`, the data directory's checks, completions and the messages of operator mistakes.
//!
//! Shared helpers and how the tests synchronise (on output and exits, never on sleeps):
//! `common/mod.rs`.

use std::path::Path;

mod common;

use common::*;

#[test]
fn job_add_then_job_ls_json_shows_it() {
    let place = Place::new("add");
    place
        .keel(&[
            "job",
            "add",
            "backup",
            "--cron",
            "0 30 2 * * *",
            "--tz",
            "Europe/Paris",
            "--attempts",
            "5",
            "--backoff",
            "2s..1m",
            "--timeout",
            "1h",
            "--",
            "echo",
            "hi",
        ])
        .expect_code(0);
    let jobs = place.json(&["job", "ls", "--json"]);
    let jobs = jobs.as_array().expect("a list of jobs");
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job["name"], "backup");
    assert_eq!(job["kind"], "command");
    assert_eq!(job["schedule"]["expr"], "0 30 2 * * *");
    assert_eq!(job["schedule"]["zone"], "Europe/Paris");
    assert_eq!(job["attempts_max"], 5);
    assert_eq!(job["timeout_ms"], 3_600_000);
    assert_eq!(job["command"]["argv"], serde_json::json!(["echo", "hi"]));
    assert_eq!(job["state"], "scheduled");

    // The same name again is refused; --replace changes it.
    place
        .keel(&["job", "add", "backup", "--every", "1h", "--", "true"])
        .expect_code(2)
        .expect_stderr("already exists");
    place
        .keel(&[
            "job",
            "add",
            "backup",
            "--every",
            "1h",
            "--replace",
            "--",
            "true",
        ])
        .expect_code(0);
    let jobs = place.json(&["job", "ls", "--json"]);
    assert_eq!(jobs[0]["schedule"]["kind"], "every");
    let next = place.json(&["next", "backup", "-n", "3", "--json"]);
    assert_eq!(next.as_array().map(Vec::len), Some(3));
    place.keel(&["job", "rm", "backup"]).expect_code(0);
    assert_eq!(place.json(&["job", "ls", "--json"]), serde_json::json!([]));
}

#[test]
fn bad_input_exits_2_with_a_message_naming_it() {
    let place = Place::new("bad-input");
    place
        .keel(&["job", "add", "x", "--cron", "0 0 25 * * *", "--", "true"])
        .expect_code(2)
        .expect_stderr("hour field: \"25\"");
    place
        .keel(&[
            "job",
            "add",
            "x",
            "--cron",
            "0 0 * * * *",
            "--tz",
            "Mars/Olympus",
            "--",
            "true",
        ])
        .expect_code(2)
        .expect_stderr("time zone \"Mars/Olympus\" is not a known IANA time zone");
    place
        .keel(&["job", "add", "x", "--every", "5x", "--", "true"])
        .expect_code(2)
        .expect_stderr("invalid duration \"5x\"");
    place
        .keel(&[
            "job",
            "add",
            "x",
            "--every",
            "1m",
            "--timeout",
            "soon",
            "--",
            "true",
        ])
        .expect_code(2)
        .expect_stderr("invalid duration \"soon\"");
    place
        .keel(&["job", "add", "x", "--at", "tomorrow", "--", "true"])
        .expect_code(2)
        .expect_stderr("invalid time \"tomorrow\"");
    place
        .keel(&["job", "add", "x", "--every", "1m"])
        .expect_code(2)
        .expect_stderr("no command");
    // A usage error is bad input too.
    place
        .keel(&["job", "add", "x", "--", "true"])
        .expect_code(2);
    // Something exists, so the store does; then unknown names are bad input.
    place
        .keel(&["job", "add", "ok", "--every", "1m", "--", "true"])
        .expect_code(0);
    place
        .keel(&["job", "pause", "nope"])
        .expect_code(2)
        .expect_stderr("no job named nope");
    place
        .keel(&["next", "nope"])
        .expect_code(2)
        .expect_stderr("no job named nope");
    place
        .keel(&["runs", "show", "run-99"])
        .expect_code(2)
        .expect_stderr("no run run-99");
    place
        .keel(&["runs", "--state", "done"])
        .expect_code(2)
        .expect_stderr("unknown run state \"done\"");
    // Nothing was stored by the refused commands.
    let jobs = place.json(&["job", "ls", "--json"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));
}

#[test]
fn worker_protocol_without_a_daemon() {
    let place = Place::new("worker");
    place
        .keel(&[
            "job",
            "add",
            "render",
            "--cron",
            "0 0 0 1 1 *",
            "--worker-kind",
            "render",
            "--payload",
            "scene-7",
        ])
        .expect_code(0);
    place
        .keel(&["worker", "claim", "--kind", "render", "--worker", "w1"])
        .expect_code(3)
        .expect_stderr("nothing due");
    let triggered = place.json(&["job", "trigger", "render", "--json"]);
    let run = run_number(&triggered["run"]["run"]);

    let claimed = place.json(&["worker", "claim", "--kind", "render", "--worker", "w1"]);
    assert_eq!(claimed["run"].as_u64(), Some(run));
    assert_eq!(claimed["payload"], "scene-7");
    assert_eq!(claimed["attempt"], 1);
    assert_eq!(claimed["idempotency_key"], format!("run-{run}-attempt-1"));
    let token = claimed["token"].as_u64().expect("a token");
    let jobs = place.json(&["job", "ls", "--json"]);
    assert_eq!(jobs[0]["active_runs"], 1, "{jobs}");
    let (run, token, stale) = (run.to_string(), token.to_string(), (token + 1).to_string());

    place
        .keel(&["worker", "touch", &run, "--token", &token])
        .expect_code(0);
    place
        .keel(&[
            "worker", "progress", &run, "--token", &token, "--phase", "render", "page 1",
        ])
        .expect_code(0);
    place
        .keel_with_stdin(&["worker", "checkpoint", &run, "--token", &token], "page=1")
        .expect_code(0);
    let context = place.json(&["worker", "context", &run, "--token", &token]);
    assert_eq!(context["checkpoint"]["data"], "page=1");
    assert_eq!(context["progress"]["phase"], "render");

    // A token that is not the current lease is refused, and changes nothing.
    place
        .complete(&run, &stale, None)
        .expect_code(2)
        .expect_stderr("is not the current lease");
    place.complete(&run, &token, Some("3 pages")).expect_code(0);
    // Completing twice: the run has finished.
    place
        .complete(&run, &token, None)
        .expect_code(2)
        .expect_stderr("no active run");
    let shown = place.json(&["runs", "show", &run, "--json"]);
    assert_eq!(shown["run"]["state"], "succeeded");
    assert_eq!(shown["run"]["summary"], "3 pages");
    assert!(shown["audit"].as_array().is_some_and(|a| a.len() >= 4));
}

#[test]
fn a_command_gives_up_on_a_daemon_that_never_answers() {
    let place = Place::new("timeout");
    std::fs::create_dir_all(place.data()).expect("data directory");
    // A "daemon" that accepts the connection and never answers (a store that keeps failing).
    let listener =
        std::os::unix::net::UnixListener::bind(place.data().join("keel.sock")).expect("bind");
    let silent = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("the command connects");
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line);
        // Holds the connection open, unanswered, until the command gives up.
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &stream, &mut rest);
        line
    });
    let done = Done(
        place
            .command(&["job", "pause", "nightly"])
            .env("KEEL_TIMEOUT", "1")
            .output()
            .expect("keel runs"),
    );
    done.expect_code(1);
    assert!(
        done.stderr().contains("did not answer within 1 s")
            && done.stderr().contains("may still take effect"),
        "{}",
        done.stderr()
    );
    let request = silent.join().expect("the silent daemon");
    assert!(request.contains("nightly"), "{request}");
}

/// Flips one byte inside the last complete frame of `log`.
fn flip_last_frame(log: &Path) {
    let mut bytes = std::fs::read(log).expect("log");
    let scan = keel_store_fs::format::decode_log(&bytes);
    let last = scan.entries.last().expect("a frame");
    let at = (last.offset + last.len - 3) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(log, &bytes).expect("log written");
}

#[test]
fn doctor_fails_on_a_damaged_store_and_repair_recovers_it() {
    let place = Place::new("doctor-repair");
    place
        .keel(&["job", "add", "first", "--every", "1h", "--", "true"])
        .expect_code(0);
    place
        .keel(&["job", "add", "second", "--every", "1h", "--", "true"])
        .expect_code(0);
    place.keel(&["doctor"]).expect_code(0);
    // An acknowledged write, damaged: a whole frame that fails its checksum, at the end.
    flip_last_frame(&place.data().join("log-0000000000000000"));

    let doctor = place.keel(&["doctor"]);
    doctor.expect_code(1);
    assert!(
        doctor.stdout().contains("corrupt frame") && doctor.stdout().contains("--repair"),
        "{}",
        doctor.stdout()
    );
    // Writing is refused until the damage is acknowledged; reading works.
    place
        .keel(&["job", "add", "third", "--every", "1h", "--", "true"])
        .expect_code(1)
        .expect_stderr("keel doctor --repair");
    place.keel(&["job", "ls"]).expect_code(0);

    let repaired = place.keel(&["doctor", "--repair"]);
    repaired.expect_code(0);
    let out = repaired.stdout();
    assert!(out.contains("rewrote the store"), "{out}");
    assert!(
        out.contains("lost: log-0000000000000000 at byte"),
        "what was lost is printed: {out}"
    );
    assert!(
        std::fs::read_dir(place.data().join("quarantine"))
            .expect("quarantine")
            .count()
            >= 1
    );
    place.keel(&["doctor"]).expect_code(0);
    place.expect_incident("store_repaired");
    place
        .keel(&["job", "add", "third", "--every", "1h", "--", "true"])
        .expect_code(0);
    place
        .keel(&["doctor", "--repair"])
        .expect_code(0)
        .stdout()
        .contains("nothing to repair")
        .then_some(())
        .expect("nothing left to repair");
}

#[test]
fn doctor_checks_the_fallback_generation_and_a_deleted_newest_log() {
    use keel_core::Store;
    let place = Place::new("doctor-generations");
    let compacting = keel_store_fs::FsOptions {
        compact_after_bytes: 1,
        compact_at_snapshot_size: false,
        ..keel_store_fs::FsOptions::default()
    };
    {
        let store = keel_store_fs::FsStore::open_with(place.data(), compacting).expect("store");
        store.restore().expect("writer");
        // Two compactions, one after the other (a compaction due while one runs is skipped):
        // generation 2 committed, generation 1 its fallback.
        store.wait_for_compaction();
        store.restore().expect("writer");
    }
    place.keel(&["doctor"]).expect_code(0);
    let fallback = place.data().join("log-0000000000000001");
    assert!(fallback.exists());
    flip_last_frame(&fallback);
    let doctor = place.keel(&["doctor"]);
    doctor.expect_code(1);
    doctor.expect_stdout("log-0000000000000001");
    place.keel(&["doctor", "--repair"]).expect_code(0);
    place.keel(&["doctor"]).expect_code(0);

    // The newest log deleted: every write since the compaction is gone, and doctor says so.
    let newest = std::fs::read_dir(place.data())
        .expect("data")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("log-"))
        .max()
        .expect("a log");
    std::fs::remove_file(place.data().join(&newest)).expect("removed");
    let doctor = place.keel(&["doctor"]);
    doctor.expect_code(1);
    assert!(
        doctor.stdout().contains(&newest) && doctor.stdout().contains("missing"),
        "{}",
        doctor.stdout()
    );
}

#[test]
fn doctor_repair_is_refused_while_a_daemon_runs() {
    let place = Place::new("doctor-repair-daemon");
    let config = place.config("");
    let daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    place
        .keel(&["doctor", "--repair"])
        .expect_code(1)
        .expect_stderr("stop it");
    drop(daemon);
}

/// SPEC O3, the reproduction from the issue: a link planted in the data directory where the
/// first log belongs. `keel job add` must refuse, naming it, and leave its target alone; a
/// directory keel creates is announced; one others may write to is refused with the fix.
#[cfg(unix)]
#[test]
fn a_data_directory_with_a_planted_link_or_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let place = Place::new("safety");
    let created = place.keel(&["job", "add", "x", "--every", "1m", "--", "true"]);
    created.expect_code(0);
    assert!(
        created.stderr().contains(&format!(
            "created the data directory {}",
            place.data().display()
        )),
        "{}",
        created.stderr()
    );
    let again = place.keel(&["job", "add", "y", "--every", "1m", "--", "true"]);
    assert!(!again.stderr().contains("created"), "{}", again.stderr());

    let place = Place::new("planted");
    let victim = place.write("victim", "precious");
    std::fs::create_dir(place.data()).unwrap();
    std::fs::set_permissions(place.data(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&victim, place.data().join("log-0000000000000000")).unwrap();
    let refused = place.keel(&["job", "add", "x", "--every", "1m", "--", "true"]);
    refused.expect_code(1);
    assert!(
        refused.stderr().contains("log-0000000000000000")
            && refused.stderr().contains("symbolic link"),
        "{}",
        refused.stderr()
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    let place = Place::new("open");
    std::fs::create_dir(place.data()).unwrap();
    std::fs::set_permissions(place.data(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = place.keel(&["job", "ls"]);
    assert_ne!(refused.code(), Some(0));
    refused.expect_stderr("chmod 700");
}

/// SPEC O8: completions and the man page come from the parser, so they name every command,
/// and `--tz local` resolves the system's zone by name. None of them needs a data directory.
#[test]
fn completions_the_man_page_and_tz_local() {
    let place = Place::new("install");
    let bash = place.keel(&["completions", "bash"]);
    bash.expect_code(0);
    for word in ["_keel()", "worker", "incidents", "--data-dir"] {
        assert!(bash.stdout().contains(word), "{word}: {}", bash.stdout());
    }
    let zsh = place.keel(&["completions", "zsh"]);
    assert!(
        zsh.stdout().starts_with("#compdef keel"),
        "{}",
        zsh.stdout()
    );
    let man = place.keel(&["man"]);
    man.expect_code(0);
    man.expect_stdout(".TH keel 1");
    man.expect_stdout("completions");
    assert!(!place.data().exists(), "no data directory was created");

    let added = place.keel(&[
        "job",
        "add",
        "local",
        "--cron",
        "0 0 9 * * *",
        "--tz",
        "local",
        "--",
        "true",
    ]);
    match iana_time_zone::get_timezone() {
        Ok(zone) => {
            added.expect_code(0);
            let show = place.keel(&["job", "show", "local"]);
            assert!(
                show.stdout().contains(&format!("({zone})")),
                "{}",
                show.stdout()
            );
        }
        // A machine with no zone configured: refused by name, with what to do.
        Err(_) => {
            added.expect_code(2);
            added.expect_stderr("--tz local: cannot tell");
        }
    }
}

/// Issue 11's messages: idempotent pause and resume, unknown jobs and bad environment values
/// refused by name (exit 2), a data directory that is a file or holds the other store, a
/// final failure not called retryable, and a command's escape sequences shown, not obeyed.
#[test]
fn operator_mistakes_get_messages_that_name_the_real_problem() {
    let place = Place::new("messages");
    place
        .keel(&["job", "add", "x", "--every", "1h", "--", "true"])
        .expect_code(0);
    place.keel(&["job", "pause", "x"]).expect_code(0);
    let again = place.keel(&["job", "pause", "x"]);
    again.expect_code(0);
    again.expect_stdout("already paused");
    place.keel(&["job", "resume", "x"]).expect_code(0);
    let again = place.keel(&["job", "resume", "x"]);
    again.expect_code(0);
    again.expect_stdout("not paused");

    let unknown = place.keel(&["runs", "--job", "nosuch"]);
    unknown.expect_code(2);
    unknown.expect_stderr("nosuch");

    let timeout = place
        .command(&["job", "ls"])
        .env("KEEL_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(timeout.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&timeout.stderr);
    assert!(stderr.contains("KEEL_TIMEOUT=\"soon\""), "{stderr}");

    let sled = place.keel(&["--store", "sled", "job", "ls"]);
    sled.expect_code(2);
    sled.expect_stderr("holds an fs store");
    assert!(
        !place.data().join("sled").exists(),
        "no second store beside it"
    );

    let file = Place::new("file");
    std::fs::write(file.data(), "not a directory").unwrap();
    let refused = file.keel(&["job", "ls"]);
    refused.expect_code(2);
    refused.expect_stderr("is not a directory");

    // A command whose output would clear the screen and retitle the terminal, failing for good.
    let config = place.config("");
    let mut daemon = place.daemon(&config);
    let escape = "printf '\\033[2J\\033]0;pwned\\007' >&2; exit 1";
    place
        .keel(&[
            "job",
            "add",
            "loud",
            "--at",
            "+0s",
            "--attempts",
            "1",
            "--shell",
            "--",
            escape,
        ])
        .expect_code(0);
    let line = daemon.wait_for(&["of job loud failed"]);
    assert!(!line.contains('\u{1b}'), "raw escape in the log: {line:?}");
    let run = run_of(&line);
    let show = place.keel(&["runs", "show", &run]).stdout();
    assert!(!show.contains('\u{1b}'), "raw escape printed: {show:?}");
    assert!(show.contains("^[[2J"), "{show}");
    assert!(show.contains("failed, no attempts left"), "{show}");
    assert!(line.contains("failed, no attempts left"), "{line}");
    daemon.signal("TERM");
    daemon.wait_exit();
}

#[test]
fn status_without_a_daemon_says_it_is_not_running() {
    let place = Place::new("status-none");
    place
        .keel(&["status"])
        .expect_code(0)
        .expect_stdout("not running (start it with `keel run`)");
    let status = place.json(&["status", "--json"]);
    assert_eq!(status["daemon"], "not_running", "{status}");
    assert_eq!(status["via"], "none", "{status}");
    assert_eq!(status["store"], "fs", "{status}");
    assert_eq!(status["pid"], serde_json::Value::Null, "{status}");
    assert_eq!(status["leader"], serde_json::Value::Null, "{status}");
    assert!(!place.data().exists(), "status created {:?}", place.data());
}

//! End-to-end tests of `keel run`, the daemon: its start, its signals (SIGTERM, SIGHUP), a
//! second daemon, crashes and the recovery after them, its log and its control socket.
//!
//! Shared helpers and how the tests synchronise (on output and exits, never on sleeps):
//! `common/mod.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;

#[test]
fn the_daemon_runs_config_jobs_serves_the_socket_and_stops_on_sigterm() {
    let place = Place::new("daemon");
    let config = place.config(
        r#"
[daemon]
shutdown_budget = "5s"

[[job]]
name = "tick"
every = "1s"
command = ["echo", "tick"]

[[job]]
name = "once"
at = "+0s"
command = ["sh", "-c", "echo once $KEEL_JOB"]

[[job]]
name = "flaky"
at = "+0s"
attempts = 3
backoff = "100ms..200ms"
command = ["sh", "-c", "if [ \"$KEEL_ATTEMPT\" -lt 2 ]; then exit 75; fi; echo recovered"]

[[job]]
name = "render"
at = "+0s"
worker_kind = "render"
payload = "scene-1"
"#,
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready", "4 jobs"]);
    assert!(place.data().join("keel.sock").exists());
    #[cfg(unix)]
    {
        // Only the owner may reach the control socket, or the data around it.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(place.data()), 0o700);
        assert_eq!(mode(place.data().join("keel.sock")), 0o600);
    }

    daemon.wait_for_n(2, &["of job tick succeeded", "tick"]);
    daemon.wait_for(&["of job once succeeded", "once once"]);
    daemon.wait_for(&["of job flaky succeeded", "recovered"]);

    // Read through the socket: every run reported is in the store.
    let runs = place.json(&["runs", "--json", "--limit", "100"]);
    let succeeded: Vec<&Value> = runs
        .as_array()
        .expect("a list of runs")
        .iter()
        .filter(|r| r["state"] == "succeeded")
        .collect();
    assert!(succeeded.iter().any(|r| r["job"] == "tick"));
    assert!(succeeded.iter().any(|r| r["job"] == "once"));
    let flaky = succeeded
        .iter()
        .find(|r| r["job"] == "flaky")
        .expect("flaky succeeded");
    assert_eq!(flaky["attempt"], 2);

    // The external worker's run, through the daemon.
    let claimed = place.json(&["worker", "claim", "--kind", "render", "--worker", "w1"]);
    let run = claimed["run"].to_string();
    let token = claimed["token"].as_u64().expect("a token");
    daemon.wait_for(&["claimed by worker w1"]);
    place
        .complete(&run, token + 1, None)
        .expect_code(2)
        .expect_stderr("is not the current lease");
    place.complete(&run, token, Some("ok")).expect_code(0);
    daemon.wait_for(&["of job render succeeded"]);

    // Management commands go through the daemon too.
    place.keel(&["job", "pause", "tick"]).expect_code(0);
    let jobs = place.json(&["job", "ls", "--json"]);
    let tick = jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == "tick"))
        .expect("tick is listed");
    assert_eq!(tick["state"], "paused");
    place.keel(&["doctor"]).expect_code(0);

    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit();
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        !place.data().join("keel.sock").exists(),
        "the socket was removed"
    );

    // Restarting keeps what ran: the one-shots are not run again.
    let mut again = place.daemon(&config);
    again.wait_for(&["job once: unchanged", "disabled"]);
    again.wait_for(&["ready"]);
    again.signal("INT");
    assert!(again.wait_exit().success(), "{}", again.log());
    assert!(
        !again.log().contains("of job once succeeded"),
        "{}",
        again.log()
    );
}

#[test]
fn sigterm_lets_commands_finish_within_the_budget_and_what_it_stops_resumes_unpaid() {
    // SPEC O1. The budget is 4 s: attempts run undisturbed for 2 s, then are asked to stop.
    const BUDGET: Duration = Duration::from_secs(4);
    // Process start-up, the final store writes and the exit, with room for a loaded machine.
    const MARGIN: Duration = Duration::from_secs(3);
    let place = Place::new("budget");
    // `stubborn`'s first attempt ignores SIGTERM and would sleep 30 s; its command (and the
    // `sleep` it starts, which inherits the ignored SIGTERM) runs in a process group of its
    // own, whose id is the shell's pid. Its next attempt succeeds at once. `quick` finishes
    // 1.5 s after it started, well within the budget. Each job has one attempt in all.
    let config = place.config(
        r#"
[daemon]
shutdown_budget = "4s"

[[job]]
name = "stubborn"
at = "+0s"
cwd = "."
attempts = 1
command = ["sh", "-c", "if [ $KEEL_ATTEMPT = 1 ]; then trap '' TERM; echo $$ > pgid; echo '::keel checkpoint trapped'; sleep 30; fi; echo resumed"]

[[job]]
name = "quick"
at = "+0s"
attempts = 1
command = ["sh", "-c", "echo '::keel checkpoint started'; sleep 1.5; echo finished"]
"#,
    );
    let mut daemon = place.daemon(&config);
    // Both commands run (each saves a checkpoint first thing).
    daemon.wait_for_n(2, &["checkpoint #1 saved"]);
    let pgid: u32 = std::fs::read_to_string(place.path("pgid"))
        .expect("the command wrote its pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(!live_in_group(pgid).is_empty() || !Path::new("/proc").exists());
    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "exit {status:?}:\n{}", daemon.log());
    assert!(took >= BUDGET, "stopped before the budget: {took:?}");
    assert!(
        took < BUDGET + MARGIN,
        "took {took:?}, more than the budget {BUDGET:?} + {MARGIN:?}:\n{}",
        daemon.log()
    );
    daemon.wait_for(&["stopping: finishing running attempts within 4s"]);
    daemon.wait_for(&["keel: stopped"]);
    // The budget ran out: the command's group was killed, not left running. (A process
    // killed just before the exit may take a moment to go.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live_in_group(pgid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        live_in_group(pgid),
        Vec::<u32>::new(),
        "the command outlived the daemon"
    );
    assert_eq!(records(&place), Vec::<String>::new());
    // `quick` was never disturbed: it succeeded, though the signal came while it ran.
    let quick = place.json(&["runs", "--json", "--job", "quick"]);
    assert_eq!(quick[0]["state"], "succeeded", "{quick}");
    // `stubborn` was interrupted by the shutdown: waiting for the next start, no attempt used.
    let runs = place.json(&["runs", "--json", "--job", "stubborn"]);
    assert_eq!(runs[0]["state"], "backing_off", "{runs}");
    assert_eq!(runs[0]["shutdown_interruptions"], 1, "{runs}");
    assert!(
        runs[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped by a shutdown")),
        "{runs}"
    );

    // The next start resumes it at once; its one attempt was still unused, so it succeeds.
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["stubborn", "succeeded"]);
    daemon.signal("TERM");
    daemon.wait_exit();
    let runs = place.json(&["runs", "--json", "--job", "stubborn"]);
    assert_eq!(runs[0]["state"], "succeeded", "{runs}");
    assert_eq!(runs[0]["attempt"], 2, "{runs}");
}

#[test]
fn a_second_daemon_waits_and_takes_over_and_no_slot_runs_twice() {
    let place = Place::new("standby");
    let config = place.config(
        r#"
[[job]]
name = "tick"
every = "1s"
overlap = "allow"
command = ["echo", "tick"]
"#,
    );
    let mut first = place.daemon(&config);
    first.wait_for(&["ready"]);
    let mut second = place.daemon(&config);
    second.wait_for(&[
        &format!("another keel daemon (pid {}) is running on", first.pid()),
        "waiting to take over",
    ]);
    first.wait_for_n(2, &["of job tick succeeded"]);

    first.signal("KILL");
    first.wait_exit();
    second.wait_for(&["took over"]);
    second.wait_for(&["ready"]);
    second.wait_for_n(2, &["of job tick succeeded"]);
    second.stop();

    // Read the store directly: each slot belongs to one run.
    let runs = place.json(&["runs", "--json", "--job", "tick", "--limit", "1000"]);
    let runs = runs.as_array().expect("a list of runs");
    // The first daemon logs a success when it happens, which may be before its record is
    // durable: a success the kill cut off is run again by the second. So at least three runs.
    assert!(runs.len() >= 3, "{runs:?}");
    let mut slots: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for run in runs {
        let slot = run["slot_ms"].to_string();
        slots
            .entry(slot)
            .or_default()
            .push(run["run"].as_str().expect("a run").to_string());
    }
    for (slot, ids) in &slots {
        assert_eq!(ids.len(), 1, "slot {slot} has runs {ids:?}");
    }
}

#[test]
fn a_run_triggered_without_a_daemon_starts_when_the_daemon_does() {
    let place = Place::new("trigger");
    place
        .keel(&[
            "job",
            "add",
            "manual",
            "--cron",
            "0 0 0 1 1 *",
            "--",
            "echo",
            "by hand",
        ])
        .expect_code(0);
    let triggered = place.json(&["job", "trigger", "manual", "--json"]);
    let run = run_number(&triggered["run"]["run"]);
    let runs = place.json(&["runs", "--json"]);
    assert_eq!(runs[0]["state"], "backing_off", "{runs}");

    let config = place.config("");
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&[&format!("run-{run} of job manual succeeded"), "by hand"]);
    daemon.stop();
}

#[test]
fn a_daemon_killed_mid_attempt_is_recovered_at_once_by_the_next() {
    let place = Place::new("recover");
    // Each attempt writes its pid, its process group's id, to pgid-N. The first saves a
    // checkpoint and waits for the gate in a child process; the second, resumed from the
    // checkpoint, saves one too and waits for the gate itself.
    let config = place.script_job(
        "slow",
        r#"echo $$ > "pgid-$KEEL_ATTEMPT"
if [ "$KEEL_ATTEMPT" = 1 ]; then
  echo '::keel checkpoint half'
  cat gate > /dev/null
  exit 1
fi
echo '::keel checkpoint again'
read -r _ < gate
echo "resumed from $KEEL_CHECKPOINT"
"#,
    );
    let gate = Gate::new(place.path("gate"));
    let mut first = place.daemon(&config);
    let run = run_of(&first.wait_for(&["checkpoint #1 saved"]));
    let orphan = pgid_of(&place, 1);
    let linux = cfg!(target_os = "linux");
    if linux {
        let record = place.data().join("attempts").join(format!("{run}-1"));
        assert!(record.exists(), "the running command is recorded");
    }
    first.signal("KILL");
    first.wait_exit();
    if linux {
        assert!(
            !live_in_group(orphan).is_empty(),
            "the command outlives the daemon"
        );
        assert_eq!(live_attempts(&place, &run), [1]);
    }

    // Not after the lease expires (40 s): at once, from the checkpoint.
    let started = Instant::now();
    let mut second = place.daemon(&config);
    if linux {
        // Before anything runs (the daemon waits for the group to be gone before it says so).
        let killed = format!(
            "killed the leftover command of {run} attempt 1 (pgid {orphan}) from a previous \
             daemon"
        );
        second.wait_for(&[&killed]);
        assert_eq!(
            live_in_group(orphan),
            Vec::<u32>::new(),
            "the orphaned command and its child are gone"
        );
        second.wait_for(&["ready"]);
        let log = second.log();
        let before = |a: &str, b: &str| log.find(a).zip(log.find(b)).is_some_and(|(a, b)| a < b);
        assert!(before(&killed, "ready"), "{log}");
    }
    // The second attempt runs, alone.
    second.wait_for(&[&format!("{run} checkpoint")]);
    let successor = pgid_of(&place, 2);
    if linux {
        assert!(!live_in_group(successor).is_empty(), "{}", second.log());
        assert_eq!(live_in_group(orphan), Vec::<u32>::new());
        assert_eq!(
            live_attempts(&place, &run),
            [2],
            "only the second attempt's command runs"
        );
    }
    gate.open();
    second.wait_for(&["of job slow succeeded", "resumed from half"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!second.log().contains("reclaimed"), "{}", second.log());
    second.stop();
    assert_eq!(records(&place), Vec::<String>::new());
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let place = Place::new("bad-config");
    let config =
        place.config("[[job]]\nname = \"x\"\nevery = \"1m\"\ncommand = [\"true\"]\nretries = 3\n");
    place
        .keel(&["run", "--config", config.to_str().expect("utf-8")])
        .expect_code(2)
        .expect_stderr("retries")
        .expect_stderr("line 5");
    place
        .keel(&["doctor", "--config", config.to_str().expect("utf-8")])
        .expect_code(1);
    // Bad timings are refused too, each with its line.
    let config = place.write(
        "timings.toml",
        "[daemon]\nlease_ttl = \"500ms\"\ndelivery_attempts = 0\n",
    );
    place
        .keel(&["run", "--config", config.to_str().expect("utf-8")])
        .expect_code(2)
        .expect_stderr("line 2: [daemon] lease_ttl: 500ms is too short")
        .expect_stderr("line 3: [daemon] delivery_attempts: 0 is out of range");
    assert!(!place.data().join("keel.sock").exists());
}

#[test]
fn a_daemon_killed_after_a_checkpoint_resumes_the_run_from_it() {
    let place = Place::new("resume");
    // Each attempt writes its environment to env-N. The first saves a checkpoint and blocks on
    // the gate, which stays shut: only the restarted daemon's attempt, which resumes from the
    // checkpoint, gets past it.
    let config = place.script_job(
        "resumable",
        r#"env > "env-$KEEL_ATTEMPT"
if [ -z "${KEEL_CHECKPOINT+set}" ]; then
  echo '::keel checkpoint step-1'
  read -r _ < gate
fi
echo "finished from ${KEEL_CHECKPOINT:-the start}"
"#,
    );
    let gate = Gate::new(place.path("gate"));
    let mut first = place.daemon(&config);
    let saved = first.wait_for(&["checkpoint #1 saved"]);
    let run = run_of(&saved);
    first.signal("KILL");
    assert_eq!(first.wait_exit().code(), None, "killed by a signal");

    let mut second = place.daemon(&config);
    if cfg!(target_os = "linux") {
        second.wait_for(&[&format!(
            "killed the leftover command of {run} attempt 1 (pgid "
        )]);
    }
    second.wait_for(&[
        &format!("{run} of job resumable succeeded"),
        "finished from step-1",
    ]);
    second.stop();
    second.expect_count(1, &[&format!("{run} of job resumable succeeded")]);

    let shown = place.json(&["runs", "show", &run, "--json"]);
    assert_eq!(shown["run"]["state"], "succeeded", "{shown}");
    let attempt = shown["run"]["attempt"].as_u64().expect("an attempt");
    assert!(attempt >= 2, "{shown}");
    let resumed =
        std::fs::read_to_string(place.path(&format!("env-{attempt}"))).expect("its environment");
    assert!(
        resumed.lines().any(|l| l == "KEEL_CHECKPOINT=step-1"),
        "{resumed}"
    );
    let started = std::fs::read_to_string(place.path("env-1")).expect("the first environment");
    assert!(
        !started.contains("KEEL_CHECKPOINT="),
        "the first attempt had no checkpoint:\n{started}"
    );
    // On Linux the second daemon killed the first attempt, orphaned by the kill and blocked on
    // the gate; elsewhere it is still blocked there: let it go.
    gate.open();
}

#[test]
fn library_warnings_reach_stderr_once_and_keel_log_silences_them() {
    let place = Place::new("log");
    // A checkpoint of 65,550 bytes: over the 64 KiB command jobs may save, so the handler logs
    // a warning (and the line is not saved).
    let config = place.config(
        r#"
[[job]]
name = "big"
cron = "0 0 0 1 1 *"
command = ["sh", "-c", "printf '::keel checkpoint %065550d\\n' 0; echo done"]
"#,
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    let run = run_number(&place.json(&["job", "trigger", "big", "--json"])["run"]["run"]);
    daemon.wait_for(&[&format!("run-{run} of job big succeeded")]);
    let warning = daemon.wait_for(&["WARN", "checkpoint line not saved"]);
    assert!(
        warning.contains(&format!("attempt{{run=run-{run} job=big attempt=1"))
            && warning.contains("65550 bytes"),
        "{warning}"
    );
    daemon.stop();
    // The runtime's copy of each event is not printed: the daemon prints its own line.
    assert!(
        !daemon.log().contains("keel_runtime::observe"),
        "{}",
        daemon.log()
    );
    daemon.expect_count(1, &["WARN"]);

    let mut quiet = place.daemon_with_env(&config, &[("KEEL_LOG", "off")]);
    quiet.wait_for(&["ready"]);
    let run = run_number(&place.json(&["job", "trigger", "big", "--json"])["run"]["run"]);
    quiet.wait_for(&[&format!("run-{run} of job big succeeded")]);
    quiet.stop();
    assert!(!quiet.log().contains("WARN"), "{}", quiet.log());
}

/// A config of more jobs than the daemon ensures at once (256) is applied whole, and its log
/// lines come in the file's order although the jobs' writes overlap.
#[test]
fn a_config_larger_than_the_ensure_window_is_applied_whole_in_order() {
    let place = Place::new("large-config");
    let jobs: String = (0..600)
        .map(|i| {
            format!("[[job]]\nname = \"job-{i:03}\"\nevery = \"1h\"\ncommand = [\"true\"]\n\n")
        })
        .collect();
    let config = place.config(&jobs);
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    let added = daemon.wait_for_n(600, &[": added ("]);
    let names: Vec<&str> = added
        .iter()
        .filter_map(|line| line.split("job ").nth(1)?.split(':').next())
        .collect();
    let expected: Vec<String> = (0..600).map(|i| format!("job-{i:03}")).collect();
    assert_eq!(names, expected, "{}", daemon.log());
    daemon.stop();
}

/// SPEC O2: SIGHUP reloads keel.toml: the file's jobs are added, updated and removed as it now
/// says, each change logged; a job added from the CLI is not the file's to remove; a file that
/// does not load changes nothing. `job history` shows who changed a job and why.
#[test]
fn sighup_reloads_the_config_and_removes_only_the_files_own_jobs() {
    let place = Place::new("reload");
    let first = r#"
[[job]]
name = "kept"
every = "1h"
command = ["true"]

[[job]]
name = "dropped"
every = "1h"
command = ["true"]
"#;
    let config = place.config(first);
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    place
        .keel(&["job", "add", "by-hand", "--every", "1h", "--", "true"])
        .expect_code(0);
    // A change made through the daemon is a line in its log (SPEC O5).
    daemon.wait_for(&["job by-hand: added by a command"]);
    place.config(
        r#"
[[job]]
name = "kept"
every = "2h"
command = ["true"]

[[job]]
name = "new"
every = "1h"
command = ["true"]
"#,
    );
    daemon.signal("HUP");
    daemon.wait_for(&["reloaded"]);
    daemon.wait_for(&["job kept: updated"]);
    daemon.wait_for(&["job new: added"]);
    daemon.wait_for(&["job dropped: removed (no longer in"]);
    let names: Vec<String> = place
        .json(&["job", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["by-hand", "kept", "new"], "{}", daemon.log());
    let show = place.keel(&["job", "show", "kept"]);
    show.expect_stdout("defined in");
    assert!(!place
        .keel(&["job", "show", "by-hand"])
        .stdout()
        .contains("defined in"));

    // A broken file: logged, nothing changes, the daemon runs on.
    place.config("[[job]]\nname = \"kept\"\nevery = \"soon\"\n");
    daemon.signal("HUP");
    daemon.wait_for(&["reload failed; the jobs stay as they were"]);
    // The reason is on the next line of the log: wait for it, not for the log so far.
    daemon.wait_for(&["invalid duration \"soon\""]);
    assert_eq!(
        place
            .json(&["job", "ls", "--json"])
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let history = place.keel(&["job", "history", "dropped"]);
    history.expect_code(0);
    assert!(
        history.stdout().contains("-> scheduled") && history.stdout().contains("removed"),
        "{}",
        history.stdout()
    );
    place.keel(&["job", "history", "never-was"]).expect_code(2);
    daemon.stop();
}

/// The control socket reads a request line up to 4 MiB: a longer one is refused and the
/// connection closed, rather than buffered without bound.
#[test]
fn an_overlong_request_on_the_control_socket_is_refused_not_buffered() {
    use std::io::{BufRead, Write as _};
    let place = Place::new("overlong");
    let config = place.config("");
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    let socket = place.data().join("keel.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..5 {
        if stream.write_all(&chunk).is_err() {
            break; // closed already: refused
        }
    }
    let mut answer = String::new();
    let _ = std::io::BufReader::new(&stream).read_line(&mut answer);
    assert!(answer.contains("request longer than"), "{answer}");
    // The daemon is fine: the next client is answered.
    place.keel(&["job", "ls"]).expect_code(0);
    daemon.stop();
}

/// A daemon names its store kind in its lock file, and a command set up for another kind is
/// refused by name (exit 2), saying what to set, not sent to the wrong store.
#[test]
fn a_command_for_another_store_than_the_daemons_is_refused_by_name() {
    let place = Place::new("other-store");
    let config = place.config(
        r#"
[[job]]
name = "tick"
every = "1h"
command = ["true"]
"#,
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready: fs store in"]);
    // (A sled command is refused before, by what the directory holds.)
    let refused = place.keel(&[
        "--store",
        "postgres",
        "--database-url",
        "host=/nonexistent",
        "status",
    ]);
    refused.expect_code(2);
    let said = refused.stderr();
    assert!(said.contains("runs on the fs store"), "{said}");
    assert!(said.contains("KEEL_STORE=fs"), "{said}");
    assert!(said.contains("not keel.toml"), "{said}");
    // The daemon's own kind is answered.
    place.keel(&["status"]).expect_code(0);
    daemon.stop();
}

/// `[daemon] history_runs` bounds what the daemon keeps: after five runs of a job, only its
/// two newest finished runs are stored, and the oldest is gone with its slot claim (SPEC R6).
#[test]
fn history_runs_bounds_the_runs_the_daemon_keeps() {
    let place = Place::new("history-runs");
    let config = place.config(
        r#"
[daemon]
history_runs = 2

[[job]]
name = "tick"
every = "1s"
command = ["echo", "tick"]
"#,
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for_n(5, &["of job tick succeeded"]);
    daemon.stop();

    let runs = place.json(&["runs", "--json", "--job", "tick", "--limit", "1000"]);
    let runs = runs.as_array().expect("a list of runs");
    let finished: Vec<&str> = runs
        .iter()
        .filter(|run| !run["finished_at"].is_null())
        .map(|run| run["run"].as_str().expect("a run"))
        .collect();
    assert_eq!(finished.len(), 2, "{runs:?}");
    // Five ran, so the two kept are neither of the first two.
    assert!(
        !finished.contains(&"run-1") && !finished.contains(&"run-2"),
        "{runs:?}"
    );
    place
        .keel(&["runs", "show", "run-1"])
        .expect_code(2)
        .expect_stderr("pruned");
}

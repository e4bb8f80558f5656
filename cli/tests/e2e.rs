//! End-to-end tests of the `keel` binary on temporary data directories.
//!
//! They synchronise on what the processes print (the daemon's event lines on stderr) and on
//! process exits, never on sleeps; every wait has a deadline and fails with the daemon's log.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_testkit::TempDir;
use serde_json::Value;

/// The longest any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

/// A temporary place for one test: a data directory and room for config files.
struct Place {
    tmp: TempDir,
}

impl Place {
    fn new(name: &str) -> Place {
        Place {
            tmp: TempDir::new(&format!("keel-e2e-{name}")).expect("a temporary directory"),
        }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("config written");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .env_remove("KEEL_DATA_DIR")
            .arg("--data-dir")
            .arg(self.data())
            .args(args);
        command
    }

    /// Runs a command to completion.
    fn keel(&self, args: &[&str]) -> Done {
        let output = self.command(args).output().expect("keel runs");
        Done(output)
    }

    /// Runs a command with `input` on its stdin.
    fn keel_with_stdin(&self, args: &[&str], input: &str) -> Done {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("keel runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("stdin written");
        Done(child.wait_with_output().expect("keel finishes"))
    }

    /// Runs a command that must succeed and print JSON.
    fn json(&self, args: &[&str]) -> Value {
        let done = self.keel(args);
        done.expect_code(0);
        serde_json::from_str(&done.stdout())
            .unwrap_or_else(|e| panic!("keel {args:?} printed no JSON ({e}):\n{}", done.stdout()))
    }

    fn daemon(&self, config: &Path) -> Daemon {
        let mut child = self
            .command(&["run", "--config", config.to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the daemon starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                keep.lock().expect("log").push(line.clone());
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Daemon {
            child: Some(child),
            lines,
            log,
        }
    }
}

/// A finished command.
struct Done(Output);

impl Done {
    fn code(&self) -> Option<i32> {
        self.0.status.code()
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    #[track_caller]
    fn expect_code(&self, code: i32) -> &Done {
        assert_eq!(
            self.code(),
            Some(code),
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }

    #[track_caller]
    fn expect_stderr(&self, text: &str) -> &Done {
        assert!(
            self.stderr().contains(text),
            "stderr lacks {text:?}:\n{}",
            self.stderr()
        );
        self
    }
}

/// A `keel run` process and its stderr, line by line.
struct Daemon {
    child: Option<Child>,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the log has a line containing every one of `words`; returns the first.
    #[track_caller]
    fn wait_for(&self, words: &[&str]) -> String {
        self.wait_for_n(1, words).swap_remove(0)
    }

    /// Waits until the log has `count` lines containing every one of `words` (counted from
    /// the daemon's start, so the order of other lines does not matter).
    #[track_caller]
    fn wait_for_n(&self, count: usize, words: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let matching: Vec<String> = self
                .log
                .lock()
                .expect("log")
                .iter()
                .filter(|line| words.iter().all(|w| line.contains(w)))
                .cloned()
                .collect();
            if matching.len() >= count {
                return matching;
            }
            // Each new line wakes this up; the reader adds it to the log before sending it.
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "fewer than {count} daemon line(s) with {words:?} within {WAIT:?}; the log:\n{}",
                    self.log()
                ),
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit (on a thread, so the wait has a deadline).
    #[track_caller]
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(WAIT) {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("the daemon did not exit within {WAIT:?}:\n{}", self.log()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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
    let spec = &jobs[0]["spec"];
    assert_eq!(spec["id"], "backup");
    assert_eq!(spec["kind"], "command");
    assert_eq!(spec["schedule"]["expr"], "0 30 2 * * *");
    assert_eq!(spec["schedule"]["zone"], "Europe/Paris");
    assert_eq!(spec["retry"]["attempts_max"], 5);
    assert_eq!(spec["timeout_ms"], 3_600_000);
    let payload: Value =
        serde_json::from_str(spec["payload"].as_str().expect("a payload")).expect("JSON");
    assert_eq!(payload["argv"], serde_json::json!(["echo", "hi"]));
    assert_eq!(jobs[0]["state"]["state"], "scheduled");

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
    assert_eq!(jobs[0]["spec"]["schedule"]["kind"], "every");
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
    let run = triggered["run"].as_u64().expect("a run id");

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
        .keel(&["worker", "complete", &run, "--token", &stale])
        .expect_code(2)
        .expect_stderr("is not the current lease");
    place
        .keel(&[
            "worker",
            "complete",
            &run,
            "--token",
            &token,
            "--summary",
            "3 pages",
        ])
        .expect_code(0);
    // Completing twice: the run has finished.
    place
        .keel(&["worker", "complete", &run, "--token", &token])
        .expect_code(2)
        .expect_stderr("no active run");
    let shown = place.json(&["runs", "show", &run, "--json"]);
    assert_eq!(shown["run"]["state"]["state"], "succeeded");
    assert_eq!(shown["run"]["summary"], "3 pages");
    assert!(shown["audit"].as_array().is_some_and(|a| a.len() >= 4));
}

#[test]
fn the_daemon_runs_config_jobs_serves_the_socket_and_stops_on_sigterm() {
    let place = Place::new("daemon");
    let config = place.write(
        "keel.toml",
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

    daemon.wait_for_n(2, &["of job tick succeeded", "tick"]);
    daemon.wait_for(&["of job once succeeded", "once once"]);
    daemon.wait_for(&["of job flaky succeeded", "recovered"]);

    // Read through the socket: every run reported is in the store.
    let runs = place.json(&["runs", "--json", "--limit", "100"]);
    let succeeded: Vec<&Value> = runs
        .as_array()
        .expect("a list of runs")
        .iter()
        .filter(|r| r["state"]["state"] == "succeeded")
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
        .keel(&[
            "worker",
            "complete",
            &run,
            "--token",
            &(token + 1).to_string(),
        ])
        .expect_code(2)
        .expect_stderr("is not the current lease");
    place
        .keel(&[
            "worker",
            "complete",
            &run,
            "--token",
            &token.to_string(),
            "--summary",
            "ok",
        ])
        .expect_code(0);
    daemon.wait_for(&["of job render succeeded"]);

    // Management commands go through the daemon too.
    place.keel(&["job", "pause", "tick"]).expect_code(0);
    let jobs = place.json(&["job", "ls", "--json"]);
    let tick = jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["spec"]["id"] == "tick"))
        .expect("tick is listed");
    assert_eq!(tick["state"]["state"], "paused");
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
fn sigterm_stops_the_daemon_within_its_budget_even_if_a_command_ignores_it() {
    let place = Place::new("budget");
    let config = place.write(
        "keel.toml",
        r#"
[daemon]
shutdown_budget = "2s"

[[job]]
name = "stubborn"
at = "+0s"
command = ["sh", "-c", "trap '' TERM; echo '::keel checkpoint trapped'; sleep 30"]
"#,
    );
    let mut daemon = place.daemon(&config);
    // The command saves a checkpoint once it ignores SIGTERM.
    daemon.wait_for(&["checkpoint #1 saved"]);
    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit();
    let took = asked.elapsed();
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    assert!(
        took >= Duration::from_secs(2),
        "stopped before the budget: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}:\n{}",
        daemon.log()
    );
    // The attempt it left is still on record, to be recovered at the next start.
    let runs = place.json(&["runs", "--json", "--job", "stubborn"]);
    assert_eq!(runs[0]["state"]["state"], "running", "{runs}");
}

#[test]
fn a_second_daemon_waits_and_takes_over_and_no_slot_runs_twice() {
    let place = Place::new("standby");
    let config = place.write(
        "keel.toml",
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
    second.signal("TERM");
    assert!(second.wait_exit().success(), "{}", second.log());

    // Read the store directly: each slot belongs to one run.
    let runs = place.json(&["runs", "--json", "--job", "tick", "--limit", "1000"]);
    let runs = runs.as_array().expect("a list of runs");
    assert!(runs.len() >= 4, "{runs:?}");
    let mut slots: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for run in runs {
        let slot = run["trigger"]["slot"].to_string();
        slots
            .entry(slot)
            .or_default()
            .push(run["id"].as_u64().expect("an id"));
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
    let run = triggered["run"].as_u64().expect("a run id");
    let runs = place.json(&["runs", "--json"]);
    assert_eq!(runs[0]["state"]["state"], "backing_off", "{runs}");

    let config = place.write("keel.toml", "");
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&[&format!("run-{run} of job manual succeeded"), "by hand"]);
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
}

#[test]
fn a_daemon_killed_mid_attempt_is_recovered_at_once_by_the_next() {
    let place = Place::new("recover");
    let config = place.write(
        "keel.toml",
        r#"
[[job]]
name = "slow"
at = "+0s"
command = ["sh", "-c", "if [ \"$KEEL_ATTEMPT\" = 1 ]; then echo '::keel checkpoint half'; sleep 15; fi; echo \"resumed from $KEEL_CHECKPOINT\""]
"#,
    );
    let mut first = place.daemon(&config);
    first.wait_for(&["checkpoint #1 saved"]);
    // Its `sleep` outlives it, orphaned, and ends by itself.
    first.signal("KILL");
    first.wait_exit();

    // Not after the lease expires (40 s): at once, from the checkpoint.
    let started = Instant::now();
    let mut second = place.daemon(&config);
    second.wait_for(&["of job slow succeeded", "resumed from half"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!second.log().contains("reclaimed"), "{}", second.log());
    second.signal("TERM");
    assert!(second.wait_exit().success(), "{}", second.log());
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let place = Place::new("bad-config");
    let config = place.write(
        "keel.toml",
        "[[job]]\nname = \"x\"\nevery = \"1m\"\ncommand = [\"true\"]\nretries = 3\n",
    );
    place
        .keel(&["run", "--config", config.to_str().expect("utf-8")])
        .expect_code(2)
        .expect_stderr("retries")
        .expect_stderr("line 5");
    place
        .keel(&["doctor", "--config", config.to_str().expect("utf-8")])
        .expect_code(1);
    assert!(!place.data().join("keel.sock").exists());
}

//! End-to-end tests of the `keel` binary on temporary data directories.
//!
//! They synchronise on what the processes print (the daemon's event lines on stderr) and on
//! process exits, never on sleeps; every wait has a deadline and fails with the daemon's log.
//! (One bounded poll of /proc waits for a killed process group to be gone.) Timings that matter are shortened in the config (`lease_ttl`, `delivery_backoff`), and a
//! command that must stay busy blocks on a FIFO the test opens ([`Gate`]), not on `sleep`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
            tmp: TempDir::created(&format!("keel-e2e-{name}")),
        }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("config written");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        // Hermetic: the default log filter, and webhooks on 127.0.0.1 reached directly.
        for name in [
            "KEEL_DATA_DIR",
            "KEEL_LOG",
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        ] {
            command.env_remove(name);
        }
        command.arg("--data-dir").arg(self.data()).args(args);
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
        self.daemon_with_env(config, &[])
    }

    fn daemon_with_env(&self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut child = self
            .command(&["run", "--config", config.to_str().expect("utf-8 path")])
            .envs(env.iter().copied())
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
    fn expect_stdout(&self, text: &str) -> &Done {
        assert!(
            self.stdout().contains(text),
            "stdout lacks {text:?}:\n{}",
            self.stdout()
        );
        self
    }

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

    /// How many lines so far contain every one of `words`.
    fn count(&self, words: &[&str]) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| words.iter().all(|w| line.contains(w)))
            .count()
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

/// The number of a run as views name it (`"run-7"` is 7).
fn run_number(run: &Value) -> u64 {
    run.as_str()
        .and_then(|r| r.strip_prefix("run-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a run: {run}"))
}

/// The run an event line is about: its first `run-N` word.
#[track_caller]
fn run_of(line: &str) -> String {
    line.split([' ', ':'])
        .find(|word| {
            word.strip_prefix("run-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or_else(|| panic!("no run in {line:?}"))
        .to_string()
}

/// Milliseconds since the Unix epoch, as keel stamps its records.
fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_millis()).expect("in range")
}

/// A FIFO that a command job blocks on (`read -r _ < gate`) until the test opens it. Dropping
/// the gate opens it too, so a command orphaned by a killed daemon never outlives its test.
struct Gate {
    path: PathBuf,
}

impl Gate {
    fn new(path: PathBuf) -> Gate {
        let made = Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo {}", path.display());
        Gate { path }
    }

    /// Lets the commands blocked on the gate go on. Never blocks: on Linux a FIFO opened for
    /// reading and writing at once does not wait for a peer.
    fn open(&self) {
        if let Ok(mut fifo) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
        {
            let _ = fifo.write_all(b"go\n");
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

/// The process group id an attempt's command wrote to `pgid-<attempt>` (its pid: it leads a
/// group of its own), once it has (the test waits for a line it prints after that).
#[track_caller]
fn pgid_of(place: &Place, attempt: u32) -> u32 {
    let path = place.path(&format!("pgid-{attempt}"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("a pid")
}

/// The daemon's records of running commands (`<data>/attempts`), by name.
fn records(place: &Place) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(place.data().join("attempts"))
        .map(|dir| {
            dir.filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The processes of group `pgid` that are still alive (zombies left aside), from /proc;
/// nothing where there is no /proc.
fn live_in_group(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid pgrp …"; comm may hold spaces and parentheses.
            let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
            let state = fields.next()?;
            let pgrp: u32 = fields.nth(1)?.parse().ok()?;
            (pgrp == pgid && !matches!(state, "Z" | "X")).then_some(pid)
        })
        .collect()
}

/// The attempts of `run` (`run-N`) whose commands have a live process (zombies aside) working
/// in `place` (tests run at once, each with its own `run-1`), from their environment
/// (`KEEL_RUN_ID`, `KEEL_ATTEMPT`) in /proc, each once, in order.
fn live_attempts(place: &Place, run: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let here = place
        .tmp
        .path()
        .canonicalize()
        .expect("the test's directory");
    let mut attempts: Vec<u32> = entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.get(stat.rfind(')')? + 2..)?.split(' ').next()?;
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            if matches!(state, "Z" | "X") || cwd != here {
                return None;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let var = |name: &str| {
                environ.split(|&b| b == 0).find_map(|pair| {
                    let pair = std::str::from_utf8(pair).ok()?;
                    pair.strip_prefix(name)?
                        .strip_prefix('=')
                        .map(str::to_string)
                })
            };
            (var("KEEL_RUN_ID")? == run).then(|| var("KEEL_ATTEMPT")?.parse().ok())?
        })
        .collect();
    attempts.sort_unstable();
    attempts.dedup();
    attempts
}

/// One request a [`Hook`] received, and what it answered.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    idempotency_key: Option<String>,
    attempt: Option<String>,
    status: u16,
    body: Value,
}

/// What a [`Hook`] answers on one path: the scripted statuses in order, then `then`.
struct Route {
    script: VecDeque<u16>,
    then: u16,
}

#[derive(Default)]
struct HookState {
    routes: BTreeMap<String, Route>,
    received: Vec<Received>,
}

/// A webhook receiver on 127.0.0.1: HTTP/1.1, one request per connection, answered from a
/// script per path (404 on unknown paths), every request recorded before it is answered.
struct Hook {
    addr: SocketAddr,
    state: Arc<Mutex<HookState>>,
    stop: Arc<AtomicBool>,
}

impl Hook {
    fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a local port");
        let addr = listener.local_addr().expect("its address");
        let state = Arc::new(Mutex::new(HookState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (serving, stopping) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    serve_one(stream, &serving);
                }
            }
        });
        Hook { addr, state, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers `path` with `script` in order, then with `then`.
    fn route(&self, path: &str, script: &[u16], then: u16) {
        self.state.lock().expect("hook").routes.insert(
            path.to_string(),
            Route {
                script: script.iter().copied().collect(),
                then,
            },
        );
    }

    fn received(&self, path: &str) -> Vec<Received> {
        let state = self.state.lock().expect("hook");
        state
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads one request, records it, answers it and closes the connection.
fn serve_one(stream: TcpStream, state: &Mutex<HookState>) {
    let _ = stream.set_read_timeout(Some(WAIT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return; // the wake-up connection of `Hook::drop`
    }
    let path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let status = {
        let mut state = state.lock().expect("hook");
        let status = state
            .routes
            .get_mut(&path)
            .map_or(404, |route| route.script.pop_front().unwrap_or(route.then));
        state.received.push(Received {
            path,
            idempotency_key: headers.get("idempotency-key").cloned(),
            attempt: headers.get("keel-delivery-attempt").cloned(),
            status,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        status
    };
    let (reason, text) = match status {
        200 => ("OK", ""),
        404 => ("Not Found", "no such hook"),
        503 => ("Service Unavailable", "try later"),
        _ => ("Status", ""),
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.flush();
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
    assert_eq!(shown["run"]["state"], "succeeded");
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
    let config = place.write(
        "keel.toml",
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

    let config = place.write("keel.toml", "");
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&[&format!("run-{run} of job manual succeeded"), "by hand"]);
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
}

#[test]
fn a_daemon_killed_mid_attempt_is_recovered_at_once_by_the_next() {
    let place = Place::new("recover");
    // Each attempt writes its pid, its process group's id, to pgid-N. The first saves a
    // checkpoint and waits for the gate in a child process; the second, resumed from the
    // checkpoint, saves one too and waits for the gate itself.
    place.write(
        "job.sh",
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
    let config = place.write(
        "keel.toml",
        r#"
[[job]]
name = "slow"
at = "+0s"
cwd = "."
command = ["sh", "job.sh"]
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
    second.signal("TERM");
    assert!(second.wait_exit().success(), "{}", second.log());
    assert_eq!(records(&place), Vec::<String>::new());
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
    place.write(
        "job.sh",
        r#"env > "env-$KEEL_ATTEMPT"
if [ -z "${KEEL_CHECKPOINT+set}" ]; then
  echo '::keel checkpoint step-1'
  read -r _ < gate
fi
echo "finished from ${KEEL_CHECKPOINT:-the start}"
"#,
    );
    let config = place.write(
        "keel.toml",
        r#"
[[job]]
name = "resumable"
at = "+0s"
cwd = "."
command = ["sh", "job.sh"]
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
    second.signal("TERM");
    assert!(second.wait_exit().success(), "{}", second.log());
    assert_eq!(
        second.count(&[&format!("{run} of job resumable succeeded")]),
        1,
        "{}",
        second.log()
    );

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
fn an_external_worker_that_goes_silent_loses_its_lease_and_its_token_goes_stale() {
    let place = Place::new("lease");
    let config = place.write(
        "keel.toml",
        r#"
[daemon]
lease_ttl = "1s"
lease_grace = "1s"

[[job]]
name = "render"
cron = "0 0 0 1 1 *"
worker_kind = "render"
payload = "scene-9"
"#,
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    let triggered = place.json(&["job", "trigger", "render", "--json"]);
    let run = run_number(&triggered["run"]["run"]).to_string();

    let before = now_ms();
    let first = place.json(&["worker", "claim", "--kind", "render", "--worker", "w1"]);
    let after = now_ms();
    assert_eq!(first["run"].to_string(), run, "{first}");
    let old = first["token"].as_u64().expect("a token");
    // The lease is lease_ttl long, from the grant (give or take the daemon's clock, which is
    // its start's wall time plus monotonic time, in whole milliseconds).
    let expires = first["lease_expires_at_ms"].as_i64().expect("an expiry");
    assert!(
        before + 1_000 - 100 <= expires && expires <= after + 1_000 + 100,
        "granted between {before} and {after}, expires at {expires}"
    );

    // The worker stays silent; the watchdog reclaims its lease lease_grace after it expires.
    daemon.wait_for(&[&format!(
        "run-{run}: lease token-{old} reclaimed after its holder went silent"
    )]);
    daemon.wait_for(&["incident", "opened (lease_reclaimed)"]);
    place
        .keel(&["worker", "complete", &run, "--token", &old.to_string()])
        .expect_code(2)
        .expect_stderr(&format!("token-{old} is not the current lease"));

    let second = place.json(&["worker", "claim", "--kind", "render", "--worker", "w2"]);
    assert_eq!(second["run"].to_string(), run, "{second}");
    let new = second["token"].as_u64().expect("a token");
    assert!(new > old, "token-{new} after token-{old}");
    place
        .keel(&[
            "worker",
            "complete",
            &run,
            "--token",
            &new.to_string(),
            "--summary",
            "rendered",
        ])
        .expect_code(0);
    daemon.wait_for(&[&format!("run-{run} of job render succeeded"), "rendered"]);
    // The old token stays refused.
    place
        .keel(&["worker", "complete", &run, "--token", &old.to_string()])
        .expect_code(2)
        .expect_stderr("no active run");
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());

    // It succeeded once, under the second lease.
    assert_eq!(
        daemon.count(&[&format!("run-{run} of job render succeeded")]),
        1,
        "{}",
        daemon.log()
    );
    let shown = place.json(&["runs", "show", &run, "--json"]);
    assert_eq!(shown["run"]["state"], "succeeded", "{shown}");
    assert_eq!(shown["run"]["summary"], "rendered", "{shown}");
    let audit = shown["audit"].as_array().expect("an audit trail");
    let successes: Vec<&Value> = audit.iter().filter(|r| r["to"] == "succeeded").collect();
    assert_eq!(successes.len(), 1, "{shown}");
    assert_eq!(successes[0]["token"], format!("token-{new}"), "{shown}");
    let incidents = place.json(&["incidents", "--json"]);
    assert!(
        incidents
            .as_array()
            .expect("a list")
            .iter()
            .any(|i| i["kind"] == "lease_reclaimed"),
        "{incidents}"
    );
}

#[test]
fn webhook_deliveries_retry_a_503_once_and_drop_a_404() {
    let place = Place::new("webhook");
    let hook = Hook::start();
    hook.route("/flaky", &[503], 200);
    hook.route("/gone", &[], 404);
    let (flaky, gone) = (hook.url("/flaky"), hook.url("/gone"));
    let config = place.write(
        "keel.toml",
        &format!(
            r#"
[daemon]
delivery_backoff = "100ms"
delivery_attempts = 3

[[job]]
name = "flaky-hook"
at = "+0s"
command = ["echo", "done"]
notify = ["{flaky}"]

[[job]]
name = "gone-hook"
at = "+0s"
command = ["echo", "done"]
notify = ["{gone}"]
"#
        ),
    );
    let mut daemon = place.daemon(&config);
    // The log names a webhook by scheme and host only (paths and queries hold secrets).
    let host = hook.url("/");
    daemon.wait_for(&["result delivery to", &host, "will retry (attempt 1)"]);
    let delivered = daemon.wait_for(&["result delivery to", &host, "success after 2 attempt(s)"]);
    let dropped = daemon.wait_for(&["result delivery to", &host, "permanent after 1 attempt(s)"]);
    assert!(!daemon.log().contains("/flaky") && !daemon.log().contains("/gone"));
    assert!(dropped.contains("404"), "{dropped}");
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());

    // Stopped: nothing more can arrive. Two requests for the 503, the same delivery both times.
    let requests = hook.received("/flaky");
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200], "{requests:?}");
    let key = requests[0]
        .idempotency_key
        .clone()
        .expect("an idempotency key");
    assert!(
        requests
            .iter()
            .all(|r| r.idempotency_key.as_ref() == Some(&key)),
        "{requests:?}"
    );
    let attempts: Vec<Option<&str>> = requests.iter().map(|r| r.attempt.as_deref()).collect();
    assert_eq!(attempts, [Some("1"), Some("2")], "{requests:?}");
    let body = &requests[1].body;
    assert_eq!(body["delivery_id"], key.as_str(), "{body}");
    assert_eq!(body["job"], "flaky-hook", "{body}");
    assert_eq!(body["state"], "succeeded", "{body}");
    assert_eq!(body["summary"], "done", "{body}");
    assert_eq!(format!("run-{}", body["run"]), run_of(&delivered));
    assert_eq!(
        daemon.count(&[&host, "success after"]),
        1,
        "{}",
        daemon.log()
    );
    // One request for the 404, never retried.
    let requests = hook.received("/gone");
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].status, 404);
    assert_eq!(requests[0].body["job"], "gone-hook");
    // The 503's one retry is the only one: the 404 was never retried.
    assert_eq!(
        daemon.count(&["result delivery to", "will retry"]),
        1,
        "{}",
        daemon.log()
    );
}

#[test]
fn a_delivery_pending_when_the_daemon_stops_is_sent_by_the_next_start() {
    let place = Place::new("pending");
    let hook = Hook::start();
    hook.route("/later", &[], 503);
    let url = hook.url("/later");
    let config = place.write(
        "keel.toml",
        &format!(
            r#"
[daemon]
delivery_backoff = "200ms"
delivery_attempts = 10

[[job]]
name = "report"
at = "+0s"
command = ["echo", "ready"]
notify = ["{url}"]
"#
        ),
    );
    let mut first = place.daemon(&config);
    first.wait_for(&[
        "result delivery to",
        &hook.url("/"),
        "will retry (attempt 1)",
    ]);
    first.signal("TERM");
    assert!(first.wait_exit().success(), "{}", first.log());
    assert_eq!(
        first.count(&[&url, " after "]),
        0,
        "still pending:\n{}",
        first.log()
    );
    // Every attempt so far was answered 503 (one, or a few if a retry came before the stop).
    let sent = hook.received("/later");
    assert!(
        !sent.is_empty() && sent.iter().all(|r| r.status == 503),
        "{sent:?}"
    );

    // The receiver recovers while no daemon runs; the next start sends the delivery.
    hook.route("/later", &[], 200);
    let mut second = place.daemon(&config);
    second.wait_for(&[
        "result delivery to",
        &hook.url("/"),
        &format!("success after {} attempt(s)", sent.len() + 1),
    ]);
    second.signal("TERM");
    assert!(second.wait_exit().success(), "{}", second.log());
    assert!(
        !second.log().contains("of job report succeeded"),
        "not run again"
    );

    let requests = hook.received("/later");
    assert_eq!(requests.len(), sent.len() + 1, "{requests:?}");
    let last = requests.last().expect("the last request");
    assert_eq!(last.status, 200);
    let expected: Vec<Option<String>> = (1..=requests.len()).map(|n| Some(n.to_string())).collect();
    let attempts: Vec<Option<String>> = requests.iter().map(|r| r.attempt.clone()).collect();
    assert_eq!(attempts, expected, "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| r.idempotency_key.is_some() && r.idempotency_key == last.idempotency_key),
        "{requests:?}"
    );
}

#[test]
fn library_warnings_reach_stderr_once_and_keel_log_silences_them() {
    let place = Place::new("log");
    // A checkpoint of 65,550 bytes: over the 64 KiB command jobs may save, so the handler logs
    // a warning (and the line is not saved).
    let config = place.write(
        "keel.toml",
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
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
    // The runtime's copy of each event is not printed: the daemon prints its own line.
    assert!(
        !daemon.log().contains("keel_runtime::observe"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.count(&["WARN"]), 1, "{}", daemon.log());

    let mut quiet = place.daemon_with_env(&config, &[("KEEL_LOG", "off")]);
    quiet.wait_for(&["ready"]);
    let run = run_number(&place.json(&["job", "trigger", "big", "--json"])["run"]["run"]);
    quiet.wait_for(&[&format!("run-{run} of job big succeeded")]);
    quiet.signal("TERM");
    assert!(quiet.wait_exit().success(), "{}", quiet.log());
    assert!(!quiet.log().contains("WARN"), "{}", quiet.log());
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
    let incidents = place.json(&["incidents", "--json"]);
    assert!(
        incidents
            .as_array()
            .expect("a list")
            .iter()
            .any(|i| i["kind"] == "store_repaired"),
        "{incidents}"
    );
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
    let config = place.write("keel.toml", "");
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

/// SPEC O4: a job failing in a row shows it in `job ls` and raises one incident, which its
/// next success resolves.
#[test]
fn a_job_failing_in_a_row_shows_it_and_raises_an_incident_until_it_succeeds() {
    let place = Place::new("failing");
    let config = place.write(
        "keel.toml",
        r#"
[daemon]
failing_after = 2

[[job]]
name = "health"
every = "1s"
cwd = "."
attempts = 1
command = ["sh", "-c", "test -e healthy"]
"#,
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&[
        "incident #1 opened (failing_job)",
        "job health",
        "2 runs failed in a row",
    ]);
    let ls = place.keel(&["job", "ls"]);
    ls.expect_code(0);
    assert!(
        ls.stdout().contains("LAST") && ls.stdout().contains("in a row)"),
        "{}",
        ls.stdout()
    );
    let doctor = place.keel(&["doctor"]);
    assert!(
        doctor.stdout().contains("failed in a row"),
        "doctor says so too:\n{}",
        doctor.stdout()
    );
    std::fs::write(place.path("healthy"), "").unwrap();
    daemon.wait_for(&["incident #1 resolved (failing_job"]);
    let ls = place.keel(&["job", "ls"]);
    ls.expect_stdout("succeeded");
    daemon.signal("TERM");
    daemon.wait_exit();
    assert_eq!(
        daemon.log().matches("opened (failing_job").count(),
        1,
        "{}",
        daemon.log()
    );
}

/// SPEC O4: a job added while the daemon runs can notify (its URL was not known at start), and
/// `--notify-on failure` posts its failed runs only.
#[test]
fn a_job_added_to_a_running_daemon_notifies_its_failures_only() {
    let place = Place::new("notify-on");
    let hook = Hook::start();
    hook.route("/ops", &[], 200);
    let config = place.write("keel.toml", "[daemon]\ndelivery_backoff = \"100ms\"\n");
    let mut daemon = place.daemon(&config);
    let ok = place.path("ok");
    let script = format!("test -e {}", ok.display());
    let added = place.keel(&[
        "job",
        "add",
        "check",
        "--every",
        "1s",
        "--attempts",
        "1",
        "--notify",
        &hook.url("/ops"),
        "--notify-on",
        "failure",
        "--shell",
        "--",
        &script,
    ]);
    added.expect_code(0);
    daemon.wait_for_n(2, &["result delivery to", "success after 1 attempt(s)"]);
    std::fs::write(&ok, "").unwrap();
    daemon.wait_for_n(2, &["of job check succeeded"]);
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
    let posted = hook.received("/ops");
    assert!(posted.len() >= 2, "{posted:?}");
    assert!(
        posted
            .iter()
            .all(|r| r.body["state"] == "failed_dropped" || r.body["state"] == "failed"),
        "only failures are posted: {posted:?}"
    );
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
    let config = place.write("keel.toml", first);
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["ready"]);
    place
        .keel(&["job", "add", "by-hand", "--every", "1h", "--", "true"])
        .expect_code(0);
    // A change made through the daemon is a line in its log (SPEC O5).
    daemon.wait_for(&["job by-hand: added by a command"]);
    place.write(
        "keel.toml",
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
    place.write("keel.toml", "[[job]]\nname = \"kept\"\nevery = \"soon\"\n");
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
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
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
    let config = place.write("keel.toml", "");
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

/// SPEC O7: each attempt's stdout and stderr are kept, successful or not, readable with
/// `keel logs RUN [--attempt N]`; the summary is the last line (or a `::keel summary` line).
#[test]
fn each_attempts_output_is_kept_and_readable_with_keel_logs() {
    let place = Place::new("logs");
    let config = place.write(
        "keel.toml",
        r#"
[[job]]
name = "chatty"
at = "+0s"
attempts = 2
backoff = "100ms"
shell = true
command = ["for i in $(seq 1 50); do echo line $i; done; echo 'a warning' >&2; [ $KEEL_ATTEMPT = 2 ]"]
"#,
    );
    let mut daemon = place.daemon(&config);
    let line = daemon.wait_for(&["of job chatty succeeded"]);
    assert!(
        line.ends_with("succeeded: line 50"),
        "the last line is the summary: {line}"
    );
    let run = run_of(&line);
    let logs = place.keel(&["logs", &run]);
    logs.expect_code(0);
    let text = logs.stdout();
    assert!(
        text.contains(&format!("== {run} attempt 2: stdout ==")),
        "{text}"
    );
    assert!(
        text.contains("line 1\n") && text.contains("line 50\n"),
        "{text}"
    );
    assert!(text.contains("attempt 2: stderr ==\na warning"), "{text}");
    let first = place.keel(&["logs", &run, "--attempt", "1"]).stdout();
    assert!(
        first.contains(&format!("== {run} attempt 1: stdout ==")),
        "{first}"
    );
    place.keel(&["logs", "run-999"]).expect_code(2);
    let none = place.keel(&["logs", &run, "--attempt", "9"]);
    none.expect_code(2);
    none.expect_stderr("attempts with output: 1, 2");
    daemon.signal("TERM");
    daemon.wait_exit();
}

/// Issue 11: a notify sink may be named (`NAME=URL`), and logs (and metric labels) use the
/// name, so two webhooks on one host stay apart and no URL secret reaches the log.
#[test]
fn named_webhooks_on_one_host_stay_apart_in_the_log() {
    let place = Place::new("named-sinks");
    let hook = Hook::start();
    hook.route("/ops", &[], 200);
    hook.route("/audit", &[], 200);
    let config = place.write(
        "keel.toml",
        &format!(
            r#"
[[job]]
name = "report"
at = "+0s"
command = ["echo", "done"]
notify = ["ops={}", "audit={}"]
"#,
            hook.url("/ops"),
            hook.url("/audit")
        ),
    );
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["result delivery to ops", "success"]);
    daemon.wait_for(&["result delivery to audit", "success"]);
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
    assert!(!daemon.log().contains("/ops") && !daemon.log().contains("/audit"));
    assert_eq!(hook.received("/ops").len(), 1);
    assert_eq!(hook.received("/audit").len(), 1);
}

/// The control socket reads a request line up to 4 MiB: a longer one is refused and the
/// connection closed, rather than buffered without bound.
#[test]
fn an_overlong_request_on_the_control_socket_is_refused_not_buffered() {
    use std::io::{BufRead, Write as _};
    let place = Place::new("overlong");
    let config = place.write("keel.toml", "");
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
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
}

/// `keel logs --follow` prints what a running command writes as it comes, and returns once the
/// run ends.
#[test]
fn keel_logs_follow_prints_a_running_commands_output_until_the_run_ends() {
    let place = Place::new("follow");
    let config = place.write(
        "keel.toml",
        r#"
[[job]]
name = "slow"
at = "+0s"
shell = true
command = ["echo one; sleep 1; echo two"]
"#,
    );
    let mut daemon = place.daemon(&config);
    let started = daemon.wait_for(&["of job slow: attempt 1 started"]);
    let run = run_of(&started);
    let follow = place.keel(&["logs", &run, "--follow"]);
    follow.expect_code(0);
    follow.expect_stdout("one\n");
    follow.expect_stdout("two\n");
    daemon.wait_for(&["of job slow succeeded: two"]);
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
}

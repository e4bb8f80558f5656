//! What the end-to-end tests of the `keel` binary share: a temporary place, the daemon and its
//! log, a gate for commands, /proc probes, and a webhook receiver.
//!
//! The tests synchronise on what the processes print (the daemon's event lines on stderr) and
//! on process exits, never on sleeps; every wait has a deadline and fails with the daemon's
//! log. (One bounded poll of /proc waits for a killed process group to be gone.) Timings that
//! matter are shortened in the config (`lease_ttl`, `delivery_backoff`), and a command that
//! must stay busy blocks on a FIFO the test opens ([`Gate`]), not on `sleep`.

// Each test file uses part of this.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_harness::TempDir;
use serde_json::Value;

/// The longest any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// A temporary place for one test: a data directory and room for config files.
pub struct Place {
    tmp: TempDir,
}

impl Place {
    pub fn new(name: &str) -> Place {
        Place {
            tmp: TempDir::created(&format!("keel-e2e-{name}")),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("config written");
        path
    }

    /// Writes the daemon's config, `keel.toml`.
    pub fn config(&self, toml: &str) -> PathBuf {
        self.write("keel.toml", toml)
    }

    /// Writes `script` as `job.sh`, and a config with one job, `name`, that runs it with `sh`
    /// once at the start, in this place's directory (where the gate and the files it writes
    /// are).
    pub fn script_job(&self, name: &str, script: &str) -> PathBuf {
        self.write("job.sh", script);
        self.config(&format!(
            r#"
[[job]]
name = "{name}"
at = "+0s"
cwd = "."
command = ["sh", "job.sh"]
"#
        ))
    }

    pub fn command(&self, args: &[&str]) -> Command {
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
    pub fn keel(&self, args: &[&str]) -> Done {
        let output = self.command(args).output().expect("keel runs");
        Done(output)
    }

    /// Runs a command with `input` on its stdin.
    pub fn keel_with_stdin(&self, args: &[&str], input: &str) -> Done {
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
    pub fn json(&self, args: &[&str]) -> Value {
        let done = self.keel(args);
        done.expect_code(0);
        serde_json::from_str(&done.stdout())
            .unwrap_or_else(|e| panic!("keel {args:?} printed no JSON ({e}):\n{}", done.stdout()))
    }

    /// `keel worker complete RUN --token TOKEN`, with `--summary` if given.
    pub fn complete(
        &self,
        run: &str,
        token: impl std::fmt::Display,
        summary: Option<&str>,
    ) -> Done {
        let token = token.to_string();
        let mut args = vec!["worker", "complete", run, "--token", &token];
        if let Some(summary) = summary {
            args.extend(["--summary", summary]);
        }
        self.keel(&args)
    }

    /// Checks that `keel incidents` lists one of `kind`.
    #[track_caller]
    pub fn expect_incident(&self, kind: &str) {
        let incidents = self.json(&["incidents", "--json"]);
        assert!(
            incidents
                .as_array()
                .expect("a list")
                .iter()
                .any(|i| i["kind"] == kind),
            "{incidents}"
        );
    }

    pub fn daemon(&self, config: &Path) -> Daemon {
        self.daemon_with_env(config, &[])
    }

    pub fn daemon_with_env(&self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        self.spawn_daemon(
            &["run", "--config", config.to_str().expect("utf-8 path")],
            env,
        )
    }

    /// A daemon started with `args` (which include `run`) and `env`.
    pub fn spawn_daemon(&self, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = self
            .command(args)
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

/// The acceptance scenario's jobs (the reference design's three detections), for a keel.toml:
/// `render` (its claim goes silent: a stale lease), `report` (waits while another kind is
/// claimed: an idle claim loop) and `publish` (requires a `report` artifact: the gate).
pub const ACCEPTANCE_JOBS: &str = r#"
[[job]]
name = "render"
cron = "0 0 0 1 1 *"
worker_kind = "render"

[[job]]
name = "report"
cron = "0 0 0 1 1 *"
worker_kind = "report"

[[job]]
name = "publish"
cron = "0 0 0 1 1 *"
worker_kind = "publish"
require_artifacts = ["report"]
"#;

/// A finished command.
pub struct Done(pub Output);

impl Done {
    pub fn code(&self) -> Option<i32> {
        self.0.status.code()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Done {
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
    pub fn expect_stdout(&self, text: &str) -> &Done {
        assert!(
            self.stdout().contains(text),
            "stdout lacks {text:?}:\n{}",
            self.stdout()
        );
        self
    }

    pub fn expect_stderr(&self, text: &str) -> &Done {
        assert!(
            self.stderr().contains(text),
            "stderr lacks {text:?}:\n{}",
            self.stderr()
        );
        self
    }
}

/// A `keel run` process and its stderr, line by line.
pub struct Daemon {
    child: Option<Child>,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the log has a line containing every one of `words`; returns the first.
    #[track_caller]
    pub fn wait_for(&self, words: &[&str]) -> String {
        self.wait_for_n(1, words).swap_remove(0)
    }

    /// Waits until the log has `count` lines containing every one of `words` (counted from
    /// the daemon's start, so the order of other lines does not matter).
    #[track_caller]
    pub fn wait_for_n(&self, count: usize, words: &[&str]) -> Vec<String> {
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

    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// The HTTP API's base URL, from the line the daemon logs when it listens
    /// (`http api and console at http://ADDR/`), without the trailing slash.
    #[track_caller]
    pub fn http_url(&self) -> String {
        let line = self.wait_for(&["http api and console at http://"]);
        let url = line
            .split("console at ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("a URL");
        url.trim_end_matches('/').to_string()
    }

    /// How many lines so far contain every one of `words`.
    pub fn count(&self, words: &[&str]) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| words.iter().all(|w| line.contains(w)))
            .count()
    }

    /// Checks that exactly `count` lines so far contain every one of `words`.
    #[track_caller]
    pub fn expect_count(&self, count: usize, words: &[&str]) {
        assert_eq!(self.count(words), count, "{}", self.log());
    }

    /// Stops the daemon with SIGTERM and checks that it exits cleanly.
    #[track_caller]
    pub fn stop(&mut self) {
        self.signal("TERM");
        assert!(self.wait_exit().success(), "{}", self.log());
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The exit status if the process has exited, without waiting; `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// Whether the process is still running (not yet reaped by [`Daemon::try_exit`] or
    /// [`Daemon::wait_exit`]).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits for the process to exit (on a thread, so the wait has a deadline).
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(WAIT) {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("the daemon did not exit within {WAIT:?}:\n{}", self.log()),
        };
        // The log is whole once the reader saw the end of stderr: it may still be reading the
        // last lines when the process is reaped. A process the daemon started may hold stderr
        // open after it (its fence guard, briefly), so this wait is bounded.
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(_) | Err(RecvTimeoutError::Timeout) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if Instant::now() >= deadline {
                break;
            }
        }
        status
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
pub fn run_number(run: &Value) -> u64 {
    run.as_str()
        .and_then(|r| r.strip_prefix("run-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a run: {run}"))
}

/// The run an event line is about: its first `run-N` word.
#[track_caller]
pub fn run_of(line: &str) -> String {
    line.split([' ', ':'])
        .find(|word| {
            word.strip_prefix("run-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or_else(|| panic!("no run in {line:?}"))
        .to_string()
}

/// Milliseconds since the Unix epoch, as keel stamps its records.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_millis()).expect("in range")
}

/// A FIFO that a command job blocks on (`read -r _ < gate`) until the test opens it. Dropping
/// the gate opens it too, so a command orphaned by a killed daemon never outlives its test.
pub struct Gate {
    path: PathBuf,
}

impl Gate {
    pub fn new(path: PathBuf) -> Gate {
        let made = Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo {}", path.display());
        Gate { path }
    }

    /// Lets the commands blocked on the gate go on. Never blocks: on Linux a FIFO opened for
    /// reading and writing at once does not wait for a peer.
    pub fn open(&self) {
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
pub fn pgid_of(place: &Place, attempt: u32) -> u32 {
    let path = place.path(&format!("pgid-{attempt}"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("a pid")
}

/// The daemon's records of running commands (`<data>/attempts`), by name.
pub fn records(place: &Place) -> Vec<String> {
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
pub fn live_in_group(pgid: u32) -> Vec<u32> {
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
pub fn live_attempts(place: &Place, run: &str) -> Vec<u32> {
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
pub struct Received {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub attempt: Option<String>,
    pub status: u16,
    pub body: Value,
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
pub struct Hook {
    addr: SocketAddr,
    state: Arc<Mutex<HookState>>,
    stop: Arc<AtomicBool>,
}

impl Hook {
    pub fn start() -> Hook {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers `path` with `script` in order, then with `then`.
    pub fn route(&self, path: &str, script: &[u16], then: u16) {
        self.state.lock().expect("hook").routes.insert(
            path.to_string(),
            Route {
                script: script.iter().copied().collect(),
                then,
            },
        );
    }

    pub fn received(&self, path: &str) -> Vec<Received> {
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

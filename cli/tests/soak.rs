//! A `kill -9` soak of the keel daemon (SPEC T2, L1, L6, S6): cycles of start, work, SIGKILL.
//!
//! Each cycle starts the real daemon on one data directory with command jobs (a cron job, a
//! one-shot, a job whose attempts fail twice before they succeed) and an external kind that
//! three worker threads claim and complete through the `keel` binary. After a random moment it
//! kills the daemon with SIGKILL, sometimes also a running command or a worker in the middle
//! of its claim, and checks what it can see from outside:
//!
//! - the store opens (the next `keel runs` reads it, the next daemon starts on it);
//! - no slot produced two runs (every run ever listed, keyed by job and slot);
//! - no two attempts of one run overlapped (each command attempt takes an exclusive `flock`
//!   on a file named for its run, and logs `OVERLAP` if another live attempt holds it);
//! - no fencing token was handed out twice (command attempts log theirs, workers keep theirs);
//! - every acknowledged completion is present, and no stale token was accepted: a `worker
//!   complete` that exited 0 leaves its run `succeeded` with that very token as its last (a
//!   worker that stalled past its lease and grace tries its old token; while a daemon runs the
//!   lease is reclaimed and the completion refused, while none runs nothing reclaims it and the
//!   token is still the run's own);
//! - every cut-off attempt is recovered within lease TTL + grace: after the last cycle the
//!   daemon runs once more, quietly, and no run is left running on an expired lease.
//!
//! `KEEL_SOAK_CYCLES` sets the number of cycles (default 30, what CI runs; `docs/testing.md`
//! records a 1,000-cycle run) and `KEEL_SOAK_SEED` the seed of the random moments.
//! The daemon's readiness is awaited on its `ready:` line, with a deadline; the random pause before each
//! kill is the point of the test, not synchronisation.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_harness::TempDir;
use serde_json::Value;

/// The longest any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);
/// The daemon's lease TTL and grace in the soak's config: short, so cut-off external attempts
/// are reclaimed within the test.
const LEASE_TTL_MS: u64 = 2_000;
const LEASE_GRACE_MS: u64 = 500;

#[test]
fn the_daemon_survives_kill_9_cycles_without_duplicates_or_lost_completions() {
    let cycles: u32 = env_or("KEEL_SOAK_CYCLES", 30);
    let seed: u64 = env_or("KEEL_SOAK_SEED", 7);
    let soak = Soak::new(seed);
    let workers: Vec<Worker> = (1..=3).map(|n| Worker::start(&soak, n)).collect();
    let mut seen = Seen::default();
    let mut kills = Kills::default();
    for cycle in 0..cycles {
        let mut daemon = soak.daemon();
        daemon.wait_ready();
        // Let it work for a moment, somewhere between two firings and several.
        std::thread::sleep(Duration::from_millis(soak.random(200, 2_000)));
        if soak.chance(1, 4) {
            kills.commands += soak.kill_commands();
        }
        if soak.chance(1, 4) {
            let worker = &workers[soak.random(0, 3) as usize];
            worker.die_next.store(true, Ordering::SeqCst);
            kills.workers += 1;
        }
        daemon.kill9();
        kills.daemons += 1;
        if let Err(broken) = seen.check(&soak, cycle) {
            panic!(
                "{broken}\nthe daemon's log:\n{}\nthe commands' log:\n{}",
                daemon.log(),
                soak.log_lines("").join("\n")
            );
        }
        if (cycle + 1) % 50 == 0 {
            // A long run shows how far it got, should it be stopped before its end.
            eprintln!("soak: {} cycles passed their checks", cycle + 1);
        }
    }
    // Heal: one more daemon, no kills, for long enough that every cut-off attempt is
    // recovered (lease TTL + grace, plus a firing or two).
    let daemon = soak.daemon();
    daemon.wait_ready();
    std::thread::sleep(Duration::from_millis(LEASE_TTL_MS + LEASE_GRACE_MS + 2_500));
    for worker in &workers {
        worker.stop.store(true, Ordering::SeqCst);
    }
    let completions: Vec<Completion> = workers.into_iter().flat_map(|w| w.join()).collect();
    if let Err(broken) = seen.check(&soak, cycles) {
        panic!("{broken}\nthe daemon's log:\n{}", daemon.log());
    }
    seen.check_recovered(&soak);
    seen.check_completions(&soak, &completions);
    drop(daemon);
    let started = soak.log_lines("start ").len();
    eprintln!(
        "soak: {cycles} cycles, {} daemon kills, {} command kills, {} worker deaths; {} runs seen, \
         {started} command attempts, {} worker completions ({} acknowledged, {} stale refused)",
        kills.daemons,
        kills.commands,
        kills.workers,
        seen.runs.len(),
        completions.len(),
        completions.iter().filter(|c| c.accepted).count(),
        completions.iter().filter(|c| c.stale && !c.accepted).count(),
    );
    assert!(
        seen.runs.len() > cycles as usize,
        "the jobs ran: {}",
        seen.runs.len()
    );
}

/// What the soak did to the processes.
#[derive(Default)]
struct Kills {
    daemons: u32,
    commands: u32,
    workers: u32,
}

/// The soak's place: a data directory, the config, the commands' log and their lock files.
struct Soak {
    tmp: TempDir,
    rng: Mutex<u64>,
}

impl Soak {
    fn new(seed: u64) -> Soak {
        let soak = Soak {
            tmp: TempDir::created("keel-soak"),
            rng: Mutex::new(seed),
        };
        std::fs::create_dir_all(soak.path("locks")).unwrap();
        let log = soak.path("attempts.log");
        let locks = soak.path("locks");
        // Each attempt holds an exclusive lock on its run's file while it works: a second live
        // attempt of the same run cannot take it, and says so. The marker lets the test find
        // and kill running commands.
        let attempt = format!(
            "exec 9>{locks}/$KEEL_RUN_ID.lock; flock -n 9 || echo \"OVERLAP $KEEL_RUN_ID $KEEL_ATTEMPT\" >> {log}; \
             echo \"start $KEEL_RUN_ID $KEEL_ATTEMPT $KEEL_FENCING_TOKEN\" >> {log}; sleep 0.3; \
             echo \"end $KEEL_RUN_ID $KEEL_ATTEMPT\" >> {log}",
            locks = locks.display(),
            log = log.display(),
        );
        let flaky = format!("{attempt}; if [ \"$KEEL_ATTEMPT\" -lt 3 ]; then exit 75; fi",);
        let config = format!(
            r#"[daemon]
shutdown_budget = "1s"
lease_ttl = "{ttl}ms"
lease_grace = "{grace}ms"

[[job]]
name = "tick"
cron = "*/2 * * * * *"
command = ["sh", "-c", '{attempt}', "{marker}"]

[[job]]
name = "once"
at = "+3s"
command = ["sh", "-c", '{attempt}', "{marker}"]

[[job]]
name = "flaky"
every = "3s"
attempts = 5
backoff = "100ms..200ms"
command = ["sh", "-c", '{flaky}', "{marker}"]

[[job]]
name = "render"
cron = "* * * * * *"
worker_kind = "render"
"#,
            ttl = LEASE_TTL_MS,
            grace = LEASE_GRACE_MS,
            marker = soak.marker(),
        );
        std::fs::write(soak.path("keel.toml"), config).unwrap();
        soak
    }

    /// The argument that names this soak's commands (`$0` of their shell), for `pgrep`.
    fn marker(&self) -> String {
        format!("keel-soak-command-{}", std::process::id())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn data(&self) -> PathBuf {
        self.path("data")
    }

    /// A uniform number in `low..high`, from the seeded generator (SplitMix64).
    fn random(&self, low: u64, high: u64) -> u64 {
        let mut state = self.rng.lock().unwrap();
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        low + (z ^ (z >> 31)) % (high - low).max(1)
    }

    fn chance(&self, numerator: u64, denominator: u64) -> bool {
        self.random(0, denominator) < numerator
    }

    fn keel(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        for name in ["KEEL_DATA_DIR", "KEEL_LOG", "KEEL_TIMEOUT"] {
            command.env_remove(name);
        }
        command
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A listing that must succeed, as JSON.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn daemon(&self) -> Daemon {
        let config = self.path("keel.toml");
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        for name in ["KEEL_DATA_DIR", "KEEL_LOG"] {
            command.env_remove(name);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(self.data())
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&log);
        let (ready, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready:") {
                    let _ = ready.send(());
                }
                keep.lock().unwrap().push(line);
            }
        });
        Daemon {
            child,
            log,
            ready: ready_rx,
        }
    }

    /// Kills every running command attempt of this soak with SIGKILL, as a whole process group
    /// (the shell and its `sleep`, which holds the run's lock too), the way a crash or the OOM
    /// killer would; returns how many were killed.
    fn kill_commands(&self) -> u32 {
        let found = Command::new("pgrep")
            .args(["-f", &self.marker()])
            .output()
            .unwrap();
        let mut killed = 0;
        for pid in String::from_utf8_lossy(&found.stdout).split_whitespace() {
            // Each command leads its own process group: its pid is the group's id.
            let status = Command::new("kill")
                .args(["-9", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status()
                .unwrap();
            killed += u32::from(status.success());
        }
        killed
    }

    /// The lines of the commands' log that start with `prefix`.
    fn log_lines(&self, prefix: &str) -> Vec<String> {
        std::fs::read_to_string(self.path("attempts.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }
}

struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Wakes when the daemon prints its `ready:` line.
    ready: std::sync::mpsc::Receiver<()>,
}

impl Daemon {
    /// Waits for the daemon's `ready:` line (a daemon that cannot open the store never prints
    /// it, and the test fails with its log).
    fn wait_ready(&self) {
        if self.ready.recv_timeout(WAIT).is_err() {
            panic!("the daemon never got ready:\n{}", self.log());
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `worker complete` a worker thread made.
#[derive(Debug)]
struct Completion {
    run: u64,
    token: u64,
    /// The token was stale on purpose: the worker stalled past its lease and grace first.
    stale: bool,
    /// `keel worker complete` exited 0.
    accepted: bool,
}

/// An external worker: a thread that claims `render` runs and completes them through the
/// binary, until stopped. It dies now and then (abandons its claim) and stalls now and then
/// (sleeps past its lease, then tries its stale token).
struct Worker {
    stop: Arc<AtomicBool>,
    die_next: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Completion>>,
}

impl Worker {
    fn start(soak: &Soak, n: u64) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let die_next = Arc::new(AtomicBool::new(false));
        let (data, keel) = (soak.data(), env!("CARGO_BIN_EXE_keel"));
        let name = format!("worker-{n}");
        let (stop_flag, die_flag) = (Arc::clone(&stop), Arc::clone(&die_next));
        let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let thread = std::thread::spawn(move || {
            let mut done = Vec::new();
            while !stop_flag.load(Ordering::SeqCst) {
                let Some((run, token)) = claim(keel, &data, &name) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if die_flag.swap(false, Ordering::SeqCst) {
                    continue; // dead: the claim is abandoned, its lease expires
                }
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                let stall = (state >> 33).is_multiple_of(10);
                let pause = if stall {
                    LEASE_TTL_MS + LEASE_GRACE_MS + 700
                } else {
                    50
                };
                std::thread::sleep(Duration::from_millis(pause));
                let accepted = complete(keel, &data, run, token);
                done.push(Completion {
                    run,
                    token,
                    stale: stall,
                    accepted,
                });
            }
            done
        });
        Worker {
            stop,
            die_next,
            thread,
        }
    }

    fn join(self) -> Vec<Completion> {
        self.thread.join().unwrap()
    }
}

fn claim(keel: &str, data: &Path, worker: &str) -> Option<(u64, u64)> {
    let out = Command::new(keel)
        .arg("--data-dir")
        .arg(data)
        .args(["worker", "claim", "--kind", "render", "--worker", worker])
        .env_remove("KEEL_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None; // nothing due (3), or the daemon is down and the store busy
    }
    let attempt: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((attempt["run"].as_u64()?, attempt["token"].as_u64()?))
}

fn complete(keel: &str, data: &Path, run: u64, token: u64) -> bool {
    Command::new(keel)
        .arg("--data-dir")
        .arg(data)
        .args(["worker", "complete", &format!("run-{run}")])
        .args(["--token", &token.to_string(), "--summary", "soaked"])
        .env_remove("KEEL_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Every run the soak has listed, by id, and every (job, slot) it has seen fired.
#[derive(Default)]
struct Seen {
    runs: BTreeMap<u64, Value>,
    slots: BTreeMap<(String, i64), u64>,
}

impl Seen {
    /// Reads every run the store holds (the daemon is dead: this opens the store directly) and
    /// checks what a cycle may not break; says what broke.
    fn check(&mut self, soak: &Soak, cycle: u32) -> Result<(), String> {
        let runs = soak.json(&["--json", "runs", "--limit", "100000"]);
        for run in runs.as_array().unwrap() {
            let id = numbered(&run["run"], "run-");
            let job = run["job"].as_str().unwrap().to_owned();
            if let Some(slot) = run["slot_ms"].as_i64() {
                let first = *self.slots.entry((job.clone(), slot)).or_insert(id);
                if first != id {
                    return Err(format!(
                        "cycle {cycle}: slot {slot} of {job} produced two runs: run-{first} and run-{id}"
                    ));
                }
            }
            self.runs.insert(id, run.clone());
        }
        let overlaps = soak.log_lines("OVERLAP");
        if !overlaps.is_empty() {
            return Err(format!(
                "cycle {cycle}: attempts of one run overlapped: {overlaps:?}"
            ));
        }
        let mut tokens = BTreeSet::new();
        for line in soak.log_lines("start ") {
            let token = line.rsplit(' ').next().unwrap().to_owned();
            if !tokens.insert(token.clone()) {
                return Err(format!(
                    "cycle {cycle}: token {token} was handed out twice (line {line:?})"
                ));
            }
        }
        Ok(())
    }

    /// After the healing run: no run is left running on a lease that expired (plus the grace)
    /// before the end of the heal.
    fn check_recovered(&self, soak: &Soak) {
        let running = soak.json(&["--json", "runs", "--state", "running", "--limit", "100000"]);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for run in running.as_array().unwrap() {
            let expires = run["lease"]["expires_at_ms"].as_i64().unwrap_or(i64::MAX);
            assert!(
                expires + (LEASE_GRACE_MS as i64) + 1_000 > now_ms - 2_500,
                "{} still running on a lease that expired at {expires} (now {now_ms}): {run}",
                run["run"]
            );
        }
    }

    /// Every acknowledged completion is in the store under its own token (so no stale token
    /// was accepted), and no token was granted twice, to claims or to command attempts.
    fn check_completions(&self, soak: &Soak, completions: &[Completion]) {
        let mut tokens: BTreeSet<u64> = soak
            .log_lines("start ")
            .iter()
            .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        for c in completions {
            assert!(
                tokens.insert(c.token),
                "token {} was granted twice (a claim of run-{})",
                c.token,
                c.run
            );
            if !c.accepted {
                continue; // refused: its lease was reclaimed, as it must be once lost
            }
            let Some(run) = self.runs.get(&c.run) else {
                panic!(
                    "run-{} was completed (acknowledged) but never listed",
                    c.run
                );
            };
            assert_eq!(
                (
                    run["state"].as_str(),
                    run["last_token"]
                        .as_str()
                        .map(|_| numbered(&run["last_token"], "token-")),
                ),
                (Some("succeeded"), Some(c.token)),
                "run-{} was completed with token {} (acknowledged{}), but the store says: {run}",
                c.run,
                c.token,
                if c.stale { ", after a stall" } else { "" },
            );
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// The number in a view's name for a run or a token (`"run-7"`, `"token-9"`).
fn numbered(value: &Value, prefix: &str) -> u64 {
    value
        .as_str()
        .and_then(|v| v.strip_prefix(prefix))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not {prefix}N: {value}"))
}

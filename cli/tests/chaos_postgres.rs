//! Chaos on one machine (SPEC section 11, M1, M2, M4): three `keel run --store postgres`
//! daemons as three hosts (a data directory and a `KEEL_HOSTNAME` each) on one database, with a
//! 2 s leader TTL, and cron jobs firing every second whose command appends
//! `KEY RUN ATTEMPT HOST` to a shared log. The test `kill -9`s the current leader again and
//! again (the killed host comes back as a standby), stops one leader with SIGSTOP for twice the
//! TTL (woken, it must exit non-zero without firing again), and restarts Postgres under load.
//! Then, from the store (runs, audit) and the shared log, with the checks that
//! `chaos_postgres_faults.rs` ends with too (`chaos::verify`): no slot ran as two runs, no
//! attempt ran twice, no fencing token went to two attempts, every run the store calls
//! succeeded has its line; and every takeover came within TTL + 2 s of the kill or stall
//! (printed).
//!
//! Postgres comes from store-postgres's test support (a throwaway cluster, which the test
//! restarts, or `KEEL_TEST_DATABASE_URL`, which it does not); with none, the test fails unless
//! `KEEL_SKIP_POSTGRES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos::{
    add_logging_job, all_logs, leader, lines, next_leader, pg_keel, start_all, stop_all,
    wait_lines, Host, FIRED, READY, TAKEOVER_BOUND, TTL,
};
use common::{Place, WAIT};

/// How many times the leader is killed.
const KILLS: usize = 5;
/// The cron jobs, each firing every second.
const JOBS: [&str; 3] = ["tick-a", "tick-b", "tick-c"];
const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];
/// The external workers' kind, and the name the worker appends to the log instead of a host.
const EXTERNAL: &str = "ext";
const WORKER: &str = "worker";

#[test]
fn three_hosts_survive_kills_a_stall_and_a_database_restart_without_a_duplicate() {
    let Some(db) = pg::TestDb::new() else { return };
    // No `idle_in_transaction_session_timeout` here: a leader stopped inside a transaction
    // holds the store row lock, and keel's own stall limit (half the leader TTL) must free it.
    let url = db.url();
    let began = Instant::now();
    let shared = Place::new("chaos-shared");
    let fired = shared.path(FIRED);
    // Short attempt leases (`chaos::DAEMON_TOML`): a run whose attempt the killed leader held
    // runs again (as its next attempt) within lease TTL + grace, not 40 s later.
    let mut hosts: Vec<Host> = HOSTS
        .iter()
        .map(|&name| Host::new("chaos", name, url.clone()))
        .collect();

    start_all(&mut hosts);
    // The jobs, through the leader's control socket.
    for job in JOBS {
        add_logging_job(&hosts[0].place, &url, job, &fired);
    }
    // One job for external workers, worked by a worker loop over the current leader's API.
    pg_keel(
        &hosts[0].place,
        &url,
        &[
            "job",
            "add",
            EXTERNAL,
            "--cron",
            "* * * * * *",
            "--worker-kind",
            EXTERNAL,
        ],
    )
    .expect_code(0);
    let api: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    publish(&api, &hosts[0]);
    let worker = Worker::start(Arc::clone(&api), fired.clone());
    wait_lines(&fired, JOBS.len() * 2, "host-a fires every job", &hosts);

    // What happened, how long until the new leader said it leads, and until it was ready
    // (store restored, firing).
    let mut takeovers: Vec<(String, Duration, Duration)> = Vec::new();
    let mut kills = 0;
    let mut stalls = 0;
    let mut restarts_of_postgres = 0;

    // kill -9 of the leader, again and again; the killed host comes back as a standby.
    for _ in 0..KILLS {
        let old = leader(&hosts);
        let killed_at = Instant::now();
        hosts[old].daemon().signal("KILL");
        hosts[old].daemon.as_mut().unwrap().wait_exit();
        kills += 1;
        let (new, took) = next_leader(&hosts, old, killed_at);
        hosts[new].daemon().wait_for(&[READY]);
        publish(&api, &hosts[new]);
        takeovers.push((
            format!("kill -9 of {} -> {}", hosts[old].name, hosts[new].name),
            took,
            killed_at.elapsed(),
        ));
        let before = lines(&fired).len();
        hosts[old].start();
        hosts[old].daemon().wait_for(&["standby:", hosts[new].name]);
        wait_lines(&fired, before + JOBS.len(), "the new leader fires", &hosts);
    }

    // SIGSTOP of the leader for twice the TTL: replaced; woken, it stops itself, fires nothing.
    let old = leader(&hosts);
    let stopped_at = Instant::now();
    hosts[old].daemon().signal("STOP");
    stalls += 1;
    let (new, took) = next_leader(&hosts, old, stopped_at);
    hosts[new].daemon().wait_for(&[READY]);
    publish(&api, &hosts[new]);
    takeovers.push((
        format!("SIGSTOP of {} -> {}", hosts[old].name, hosts[new].name),
        took,
        stopped_at.elapsed(),
    ));
    let before = lines(&fired).len();
    wait_lines(&fired, before + JOBS.len(), "the new leader fires", &hosts);
    // The stall itself lasts 2 × TTL (what is tested, not a wait for something to happen).
    std::thread::sleep((stopped_at + 2 * TTL).saturating_duration_since(Instant::now()));
    let stalled_host = format!(" {}", hosts[old].name);
    let by_stalled = |fired: &[String]| fired.iter().filter(|l| l.ends_with(&stalled_host)).count();
    let fired_by_stalled = by_stalled(&lines(&fired));
    hosts[old].daemon().signal("CONT");
    let status = hosts[old].daemon.as_mut().unwrap().wait_exit();
    let log = hosts[old].daemon().log();
    assert!(!status.success(), "{status:?}:\n{log}");
    assert!(
        log.contains("lost the lead") || log.contains("took over the store"),
        "{log}"
    );
    assert_eq!(
        by_stalled(&lines(&fired)),
        fired_by_stalled,
        "{} fired after it was woken:\n{log}",
        hosts[old].name
    );
    hosts[old].start();
    hosts[old].daemon().wait_for(&["standby:", hosts[new].name]);

    // Postgres restarts under load (every session ends); the daemons recover: a leader that
    // stopped itself meanwhile comes back as a standby, and the jobs fire again.
    let before = lines(&fired).len();
    let restart_at = Instant::now();
    if db.restart_server() {
        restarts_of_postgres += 1;
        let deadline = Instant::now() + WAIT;
        while lines(&fired).len() < before + JOBS.len() * 2 {
            for host in &mut hosts {
                if let Some(status) = host.daemon.as_mut().unwrap().try_exit() {
                    eprintln!(
                        "{} exited ({status}) after the Postgres restart; restarting it",
                        host.name
                    );
                    assert!(!status.success(), "{}", host.daemon().log());
                    host.start();
                }
            }
            assert!(
                Instant::now() < deadline,
                "nothing fired within {WAIT:?} of the Postgres restart; logs:\n{}",
                all_logs(&hosts)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "after the Postgres restart the jobs fired again within {:?}",
            restart_at.elapsed()
        );
    } else {
        eprintln!("not restarting an external Postgres ({})", pg::DATABASE_URL);
    }
    let now_leading = leader(&hosts);
    publish(&api, &hosts[now_leading]);
    let claims_before = worker.completed.load(Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while worker.completed.load(Ordering::SeqCst) < claims_before + 2 {
        assert!(
            Instant::now() < deadline,
            "the worker completed nothing at the end; logs:\n{}",
            all_logs(&hosts)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (claimed, completed, refused) = worker.stop();

    // Stop everything (the leader resigns) so that the store is final.
    stop_all(&mut hosts);

    // The shared log (each line `KEY RUN ATTEMPT HOST`, or `worker` for the external worker)
    // and the store.
    let writers: Vec<&str> = HOSTS.iter().copied().chain([WORKER]).collect();
    let found = chaos::verify(&db, &lines(&fired), &writers);

    eprintln!(
        "chaos on Postgres: {} runs in the store ({} succeeded), {} lines in the \
         shared log, {} fencing tokens, {kills} kills, {stalls} stalls, \
         {restarts_of_postgres} Postgres restarts; the external worker claimed {claimed}, \
         completed {completed}, was refused {refused}; {} duplicates, in {:?}",
        found.runs,
        found.succeeded,
        found.lines,
        found.tokens,
        found.duplicates,
        began.elapsed()
    );
    for (what, leading, ready) in &takeovers {
        eprintln!(
            "takeover after {what}: leading after {leading:?}, ready after {ready:?} \
             (leader TTL {TTL:?})"
        );
    }
    assert_eq!(found.duplicates, 0, "duplicates found (above)");
    assert!(
        found.succeeded >= found.lines / 2,
        "{} of {}",
        found.succeeded,
        found.lines
    );
    assert!(found.tokens > 0);
    assert!(completed >= 2, "the worker completed {completed}");
    for (what, leading, ready) in &takeovers {
        assert!(
            *leading <= TTL + TAKEOVER_BOUND,
            "takeover after {what} took {leading:?}"
        );
        assert!(
            *ready <= TTL + TAKEOVER_BOUND,
            "the new leader after {what} was ready after {ready:?}"
        );
    }
}

/// Points the worker at `host`'s API (it leads).
fn publish(api: &Mutex<Option<String>>, host: &Host) {
    *api.lock().unwrap() = Some(host.daemon().http_url());
}

/// An external worker on a thread of its own: claims `EXTERNAL` runs from whatever API the
/// test says leads, appends `KEY RUN ATTEMPT worker` to the shared log, then completes.
/// Errors (a dead, stalled or new leader) are a worker's everyday life: it polls again.
struct Worker {
    stop: Arc<AtomicBool>,
    claimed: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    fn start(api: Arc<Mutex<Option<String>>>, log: PathBuf) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let (claimed, completed, refused) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, cl, co, re) = (
            Arc::clone(&stop),
            Arc::clone(&claimed),
            Arc::clone(&completed),
            Arc::clone(&refused),
        );
        let thread = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(1))
                .no_proxy()
                .build()
                .unwrap();
            while !s.load(Ordering::SeqCst) {
                let Some(base) = api.lock().unwrap().clone() else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let claim = http
                    .post(format!("{base}/api/v1/claims"))
                    .json(&serde_json::json!({"worker": "w1", "kinds": [EXTERNAL]}))
                    .send();
                let attempt: serde_json::Value = match claim {
                    Ok(r) if r.status() == reqwest::StatusCode::OK => match r.json() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    // Nothing due, or no leader there (yet): poll again shortly.
                    _ => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                cl.fetch_add(1, Ordering::SeqCst);
                let (run, token, n) = (
                    attempt["run"].clone(),
                    attempt["token"].clone(),
                    attempt["attempt"].clone(),
                );
                let run = run
                    .as_u64()
                    .map(|n| format!("run-{n}"))
                    .or_else(|| run.as_str().map(str::to_string))
                    .unwrap_or_else(|| panic!("no run in {attempt}"));
                let n = n
                    .as_u64()
                    .unwrap_or_else(|| panic!("no attempt in {attempt}"));
                let line = format!("{run}-attempt-{n} {run} {n} {WORKER}\n");
                {
                    use std::io::Write;
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap();
                    file.write_all(line.as_bytes()).unwrap();
                }
                let done = http
                    .post(format!("{base}/api/v1/runs/{run}/complete"))
                    .json(&serde_json::json!({"token": token}))
                    .send();
                match done {
                    Ok(r) if r.status().is_success() => {
                        co.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        re.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Worker {
            stop,
            claimed,
            completed,
            refused,
            thread,
        }
    }

    /// Stops the worker; what it claimed, completed, and had refused (or lost on the way).
    fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the worker thread");
        (
            self.claimed.load(Ordering::SeqCst),
            self.completed.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
        )
    }
}

//! Chaos on one machine (SPEC section 11, M1, M2, M4): three `keel run --store postgres`
//! daemons as three hosts (a data directory and a `KEEL_HOSTNAME` each) on one database, with a
//! 2 s leader TTL, and cron jobs firing every second whose command appends
//! `KEY RUN ATTEMPT HOST` to a shared log. The test `kill -9`s the current leader again and
//! again (the killed host comes back as a standby), stops one leader with SIGSTOP for twice the
//! TTL (woken, it must exit non-zero without firing again), and restarts Postgres under load.
//! Then, from the store (runs, audit) and the shared log: no slot ran as two runs, no attempt
//! ran twice, no fencing token went to two attempts, every run the store calls succeeded has
//! its line, and every takeover came within TTL + 2 s of the kill or stall (printed).
//!
//! Postgres comes from store-postgres's test support (a throwaway cluster, which the test
//! restarts, or `KEEL_TEST_DATABASE_URL`, which it does not); with none, the test fails unless
//! `KEEL_SKIP_POSTGRES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Place, WAIT};
use keel_core::{AuditQuery, RunQuery, StateName, Store, Trigger};

/// The leadership lease's TTL in this test.
const TTL: Duration = Duration::from_secs(2);
/// How much later than the TTL a dead or stalled leader may be replaced (issue 15's target
/// for a stall; a `kill -9` is within the same bound here).
const TAKEOVER_BOUND: Duration = Duration::from_secs(2);
/// How many times the leader is killed.
const KILLS: usize = 5;
/// The cron jobs, each firing every second.
const JOBS: [&str; 3] = ["tick-a", "tick-b", "tick-c"];
const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];
/// The shared log every attempt appends to.
const FIRED: &str = "fired.log";
/// The external workers' kind, and the name the worker appends to the log instead of a host.
const EXTERNAL: &str = "ext";
const WORKER: &str = "worker";
/// What a leader logs when it takes the lead.
const LEADING: &str = "leading the postgres store as";

/// One host: its place (data directory, config) and its daemon, if one runs.
struct Host {
    name: &'static str,
    place: Place,
    config: PathBuf,
    daemon: Option<Daemon>,
}

impl Host {
    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a daemon on this host")
    }

    fn leads(&self) -> bool {
        self.daemon
            .as_ref()
            .is_some_and(|d| d.running() && d.count(&[LEADING]) > 0)
    }
}

#[test]
fn three_hosts_survive_kills_a_stall_and_a_database_restart_without_a_duplicate() {
    let Some(db) = pg::TestDb::new() else { return };
    // No `idle_in_transaction_session_timeout` here: a leader stopped inside a transaction
    // holds the store row lock, and keel's own stall limit (half the leader TTL) must free it.
    let url = db.url();
    let began = Instant::now();
    let shared = Place::new("chaos-shared");
    let fired = shared.path(FIRED);
    let mut hosts: Vec<Host> = HOSTS
        .iter()
        .map(|&name| {
            let place = Place::new(&format!("chaos-{name}"));
            // Short attempt leases: a run whose attempt the killed leader held runs again
            // (as its next attempt) within lease TTL + grace, not 40 s later.
            let config = place.config(
                "[daemon]\nshutdown_budget = \"2s\"\nlease_ttl = \"3s\"\nlease_grace = \"1s\"\n",
            );
            Host {
                name,
                place,
                config,
                daemon: None,
            }
        })
        .collect();

    // host-a starts alone and leads; the others stand by.
    start(&mut hosts[0], &url);
    hosts[0].daemon().wait_for(&[LEADING, "host-a:"]);
    hosts[0].daemon().wait_for(&["ready: postgres store"]);
    for host in &mut hosts[1..] {
        start(host, &url);
    }
    for host in &hosts[1..] {
        host.daemon().wait_for(&["standby: host-a:"]);
    }
    // The jobs, through the leader's control socket.
    for job in JOBS {
        let add = [
            "job",
            "add",
            job,
            "--cron",
            "* * * * * *",
            "--",
            "sh",
            "-c",
            &format!(
                "echo \"$KEEL_IDEMPOTENCY_KEY $KEEL_RUN_ID $KEEL_ATTEMPT $KEEL_HOSTNAME\" >> {}",
                fired.display()
            ),
        ];
        pg_keel(&hosts[0].place, &url, &add).expect_code(0);
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
        hosts[new].daemon().wait_for(&["ready: postgres store"]);
        publish(&api, &hosts[new]);
        takeovers.push((
            format!("kill -9 of {} -> {}", hosts[old].name, hosts[new].name),
            took,
            killed_at.elapsed(),
        ));
        let before = lines(&fired).len();
        start(&mut hosts[old], &url);
        hosts[old].daemon().wait_for(&["standby:", hosts[new].name]);
        wait_lines(&fired, before + JOBS.len(), "the new leader fires", &hosts);
    }

    // SIGSTOP of the leader for twice the TTL: replaced; woken, it stops itself, fires nothing.
    let old = leader(&hosts);
    let stopped_at = Instant::now();
    hosts[old].daemon().signal("STOP");
    stalls += 1;
    let (new, took) = next_leader(&hosts, old, stopped_at);
    hosts[new].daemon().wait_for(&["ready: postgres store"]);
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
    start(&mut hosts[old], &url);
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
                    start(host, &url);
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
    let order: Vec<usize> = (0..hosts.len()).collect();
    for i in order {
        let daemon = hosts[i].daemon.as_mut().unwrap();
        if daemon.running() {
            daemon.signal("TERM");
            daemon.wait_exit();
        }
    }

    // The shared log: each line `KEY RUN ATTEMPT HOST`.
    let fired = lines(&fired);
    let mut runs_of_slot: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut attempts: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut duplicates = 0;
    for line in &fired {
        let [key, run, attempt, host] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("malformed line {line:?}");
        };
        assert!(HOSTS.contains(&host) || host == WORKER, "{line:?}");
        runs_of_slot.entry(key).or_default().insert(run);
        if !attempts.insert((run, attempt)) {
            eprintln!("DUPLICATE: {run} attempt {attempt} ran twice");
            duplicates += 1;
        }
    }
    for (key, runs) in &runs_of_slot {
        if runs.len() > 1 {
            eprintln!("DUPLICATE: slot {key} ran as {runs:?}");
            duplicates += 1;
        }
    }

    // The store: every run, every audit record.
    let store = db.open();
    let mut runs = Vec::new();
    let mut query = RunQuery {
        limit: 1000,
        ..RunQuery::default()
    };
    loop {
        let page = store.runs(&query).unwrap();
        runs.extend(page.runs);
        match page.next {
            Some(next) => query.before = Some(next),
            None => break,
        }
    }
    let mut audit = Vec::new();
    let mut query = AuditQuery {
        limit: 1000,
        ..AuditQuery::default()
    };
    loop {
        let page = store.audit(&query).unwrap();
        let Some(last) = page.last() else { break };
        query.after = Some(last.seq);
        audit.extend(page);
    }
    let mut store_slots: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
    let mut succeeded = 0;
    for run in &runs {
        if let Trigger::Scheduled { slot } = run.trigger() {
            let owners = store_slots
                .entry((run.job().to_string(), slot.0))
                .or_default();
            owners.insert(run.id().to_string());
            if owners.len() > 1 {
                eprintln!(
                    "DUPLICATE: the store has slot {slot:?} of {} as {owners:?}",
                    run.job()
                );
                duplicates += 1;
            }
        }
        if run.state().name() == StateName::Succeeded {
            succeeded += 1;
            let (id, attempt) = (run.id().to_string(), run.attempt().to_string());
            assert!(
                attempts.contains(&(id.as_str(), attempt.as_str())),
                "{id} attempt {attempt} succeeded in the store but never wrote its line"
            );
        }
    }
    let mut token_owner: BTreeMap<u64, (String, String)> = BTreeMap::new();
    for record in &audit {
        let (Some(token), Some(run), Some(attempt)) =
            (record.fencing_token, record.run, record.attempt)
        else {
            continue;
        };
        let owner = (run.to_string(), attempt.to_string());
        let first = token_owner.entry(token.0).or_insert_with(|| owner.clone());
        if *first != owner {
            eprintln!("DUPLICATE: {token} went to {first:?} and to {owner:?}");
            duplicates += 1;
        }
    }

    eprintln!(
        "chaos on Postgres: {} runs in the store ({succeeded} succeeded), {} lines in the \
         shared log, {} fencing tokens, {kills} kills, {stalls} stalls, \
         {restarts_of_postgres} Postgres restarts; the external worker claimed {claimed}, \
         completed {completed}, was refused {refused}; {duplicates} duplicates, in {:?}",
        runs.len(),
        fired.len(),
        token_owner.len(),
        began.elapsed()
    );
    for (what, leading, ready) in &takeovers {
        eprintln!(
            "takeover after {what}: leading after {leading:?}, ready after {ready:?} \
             (leader TTL {TTL:?})"
        );
    }
    assert_eq!(duplicates, 0, "duplicates found (above)");
    assert!(
        succeeded >= fired.len() / 2,
        "{succeeded} of {}",
        fired.len()
    );
    assert!(!token_owner.is_empty());
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

/// Starts a daemon on `host` with `--store postgres` and the test's leader TTL.
fn start(host: &mut Host, url: &str) {
    let ttl = format!("{}s", TTL.as_secs());
    let args = [
        "--store",
        "postgres",
        "--database-url",
        url,
        "run",
        "--config",
        host.config.to_str().unwrap(),
        "--leader-ttl",
        &ttl,
        "--http",
        "127.0.0.1:0",
    ];
    host.daemon = Some(
        host.place
            .spawn_daemon(&args, &[("KEEL_HOSTNAME", host.name)]),
    );
}

/// The one host whose running daemon leads (its log says so), waiting for one.
#[track_caller]
fn leader(hosts: &[Host]) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let leading: Vec<usize> = (0..hosts.len()).filter(|&i| hosts[i].leads()).collect();
        match leading[..] {
            [one] => return one,
            [] => {}
            _ => panic!("{} leaders:\n{}", leading.len(), all_logs(hosts)),
        }
        assert!(
            Instant::now() < deadline,
            "no leader within {WAIT:?}:\n{}",
            all_logs(hosts)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host other than `old` that leads next, and how long after `since` it said so.
#[track_caller]
fn next_leader(hosts: &[Host], old: usize, since: Instant) -> (usize, Duration) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(new) = (0..hosts.len()).find(|&i| i != old && hosts[i].leads()) {
            return (new, since.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {WAIT:?}:\n{}",
            all_logs(hosts)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_logs(hosts: &[Host]) -> String {
    hosts
        .iter()
        .filter_map(|h| Some(format!("--- {}:\n{}", h.name, h.daemon.as_ref()?.log())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A keel command on `place` with `--store postgres`.
fn pg_keel(place: &Place, url: &str, args: &[&str]) -> common::Done {
    let mut all = vec!["--store", "postgres", "--database-url", url];
    all.extend_from_slice(args);
    place.keel(&all)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Polls the shared log until it has `count` lines, failing after [`WAIT`].
#[track_caller]
fn wait_lines(path: &Path, count: usize, what: &str, hosts: &[Host]) {
    let deadline = Instant::now() + WAIT;
    while lines(path).len() < count {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; the shared log:\n{}\nthe daemons:\n{}",
            lines(path).join("\n"),
            all_logs(hosts)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

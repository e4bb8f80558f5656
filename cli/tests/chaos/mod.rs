//! What the chaos tests on Postgres (`chaos_postgres.rs`, `chaos_postgres_faults.rs`) share:
//! the hosts (one `keel run --store postgres` daemon each, with its own data directory and
//! `KEEL_HOSTNAME`) and their timings, finding the leader and the next one, the shared log every
//! attempt appends `KEY RUN ATTEMPT WHO` to, and the checks every case ends with ([`verify`]):
//! from that log and the store, no slot ran as two runs, no attempt ran twice, no fencing token
//! went to two attempts, and every run the store calls succeeded has its line.
//!
//! Chaos-only, so not in `common` (which every cli test binary includes). Each including file
//! declares `mod common;` and `mod pg;` (store-postgres's test support) beside `mod chaos;`.

// Each test file uses part of this.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_core::{AuditQuery, AuditRecord, Run, RunQuery, StateName, Store, Trigger};

use crate::common::{self, Daemon, Place, WAIT};
use crate::pg;

/// The leadership lease's TTL.
pub const TTL: Duration = Duration::from_secs(2);
/// How much later than the TTL a dead, stalled or partitioned leader may be replaced (issue
/// 15's target for a stall; a `kill -9` and a partition are within the same bound here).
pub const TAKEOVER_BOUND: Duration = Duration::from_secs(2);
/// Attempts' leases, as [`DAEMON_TOML`] sets them: a run held by a dead or stalled holder (the
/// killed leader, a silent worker) is reclaimed, and runs again as its next attempt, after
/// TTL + grace, not 40 s later.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
pub const LEASE_GRACE: Duration = Duration::from_secs(1);
/// Every host's config: a short shutdown budget and the short attempt leases above.
pub const DAEMON_TOML: &str =
    "[daemon]\nshutdown_budget = \"2s\"\nlease_ttl = \"3s\"\nlease_grace = \"1s\"\n";
/// The shared log every attempt appends `KEY RUN ATTEMPT WHO` to.
pub const FIRED: &str = "fired.log";
/// What a leader logs when it takes the lead.
pub const LEADING: &str = "leading the postgres store as";
/// What a leader logs once its store is restored and it fires.
pub const READY: &str = "ready: postgres store";

/// One host: its place (data directory, config), how it reaches Postgres, and its daemon, if
/// one runs.
pub struct Host {
    pub name: &'static str,
    pub url: String,
    pub place: Place,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
}

impl Host {
    /// A host `name` (its place named `{prefix}-{name}`) reaching Postgres at `url`, its config
    /// [`DAEMON_TOML`]; no daemon yet.
    pub fn new(prefix: &str, name: &'static str, url: String) -> Host {
        let place = Place::new(&format!("{prefix}-{name}"));
        let config = place.config(DAEMON_TOML);
        Host {
            name,
            url,
            place,
            config,
            daemon: None,
        }
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a daemon on this host")
    }

    /// Whether its daemon runs and its log says it leads.
    pub fn leads(&self) -> bool {
        self.daemon
            .as_ref()
            .is_some_and(|d| d.running() && d.count(&[LEADING]) > 0)
    }

    /// Starts a daemon with `--store postgres`, the test's leader TTL and an HTTP API.
    pub fn start(&mut self) {
        let ttl = format!("{}s", TTL.as_secs());
        let args = [
            "--store",
            "postgres",
            "--database-url",
            &self.url,
            "run",
            "--config",
            self.config.to_str().unwrap(),
            "--leader-ttl",
            &ttl,
            "--http",
            "127.0.0.1:0",
        ];
        let daemon = self
            .place
            .spawn_daemon(&args, &[("KEEL_HOSTNAME", self.name)]);
        self.daemon = Some(daemon);
    }
}

/// Starts every host's daemon: the first alone, until it leads and is ready; then the others,
/// until each stands by.
pub fn start_all(hosts: &mut [Host]) {
    hosts[0].start();
    hosts[0].daemon().wait_for(&[LEADING, "host-a:"]);
    hosts[0].daemon().wait_for(&[READY]);
    for host in &mut hosts[1..] {
        host.start();
    }
    for host in &hosts[1..] {
        host.daemon().wait_for(&["standby: host-a:"]);
    }
}

/// Stops every running daemon (a leader resigns), so that the store is final.
pub fn stop_all(hosts: &mut [Host]) {
    for host in hosts {
        if let Some(daemon) = host.daemon.as_mut().filter(|d| d.running()) {
            daemon.signal("TERM");
            daemon.wait_exit();
        }
    }
}

/// The one host whose running daemon leads (its log says so), waiting for one.
#[track_caller]
pub fn leader(hosts: &[Host]) -> usize {
    wait_until("one leader", hosts, || {
        let leading: Vec<usize> = (0..hosts.len()).filter(|&i| hosts[i].leads()).collect();
        match leading[..] {
            [one] => Some(one),
            [] => None,
            _ => panic!("{} leaders:\n{}", leading.len(), all_logs(hosts)),
        }
    })
}

/// The host other than `old` that leads next, and how long after `since` it said so.
#[track_caller]
pub fn next_leader(hosts: &[Host], old: usize, since: Instant) -> (usize, Duration) {
    wait_until("a new leader", hosts, || {
        let new = (0..hosts.len()).find(|&i| i != old && hosts[i].leads())?;
        Some((new, since.elapsed()))
    })
}

/// Polls `found` every 20 ms until it finds something, failing after [`WAIT`] with the hosts'
/// logs.
#[track_caller]
pub fn wait_until<T>(what: &str, hosts: &[Host], mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(it) = found() {
            return it;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}:\n{}",
            all_logs(hosts)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every host's daemon log, each under its host's name.
pub fn all_logs(hosts: &[Host]) -> String {
    hosts
        .iter()
        .filter_map(|h| Some(format!("--- {}:\n{}", h.name, h.daemon.as_ref()?.log())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A keel command on `place` with `--store postgres`.
pub fn pg_keel(place: &Place, url: &str, args: &[&str]) -> common::Done {
    let mut all = vec!["--store", "postgres", "--database-url", url];
    all.extend_from_slice(args);
    place.keel(&all)
}

/// Adds `job`, firing every second, whose attempts append to the shared log at `path` the
/// `KEY RUN ATTEMPT WHO` line [`verify`] reads (`WHO`: the daemon's `KEEL_HOSTNAME`).
pub fn add_logging_job(place: &Place, url: &str, job: &str, path: &Path) {
    let echo = format!(
        "echo \"$KEEL_IDEMPOTENCY_KEY $KEEL_RUN_ID $KEEL_ATTEMPT $KEEL_HOSTNAME\" >> {}",
        path.display()
    );
    let add = [
        "job",
        "add",
        job,
        "--cron",
        "* * * * * *",
        "--",
        "sh",
        "-c",
        &echo,
    ];
    pg_keel(place, url, &add).expect_code(0);
}

/// The lines of the file at `path` (none if it is not there yet).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Polls the shared log until it has `count` lines, failing after [`WAIT`] with the log and the
/// hosts' logs.
#[track_caller]
pub fn wait_lines(path: &Path, count: usize, what: &str, hosts: &[Host]) {
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

/// What [`verify`] counted and found.
pub struct Found {
    pub runs: usize,
    pub succeeded: usize,
    pub lines: usize,
    /// Lines of an attempt after the first (a run whose attempt was lost ran again).
    pub reruns: usize,
    pub tokens: usize,
    pub duplicates: usize,
    /// Every run in the store, by `run-N`.
    pub store_runs: BTreeMap<String, Run>,
    /// The tokens of the attempts the store recorded as succeeded.
    pub succeeded_tokens: BTreeSet<u64>,
    /// Each fencing token in the audit, and the first `(run-N, attempt)` it went to.
    pub token_owner: BTreeMap<u64, (String, String)>,
}

/// The checks every case ends with, from the shared log (`KEY RUN ATTEMPT WHO` lines, each
/// written by one of `writers`) and the store (every run page, every audit page): no slot as
/// two runs (in the log or in the store), no attempt twice, no token for two attempts, every
/// succeeded run has its line, and something succeeded under a token. Duplicates are printed
/// and counted, not asserted: the caller prints its figures first.
#[track_caller]
pub fn verify(db: &pg::TestDb, fired: &[String], writers: &[&str]) -> Found {
    let mut runs_of_slot: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut attempts: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut duplicates = 0;
    for line in fired {
        let [key, run, attempt, who] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("malformed line {line:?}");
        };
        assert!(writers.contains(&who), "{line:?} not by one of {writers:?}");
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
    let mut audit: Vec<AuditRecord> = Vec::new();
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
    let mut succeeded_tokens = BTreeSet::new();
    for record in &audit {
        let (Some(token), Some(run), Some(attempt)) =
            (record.fencing_token, record.run, record.attempt)
        else {
            continue;
        };
        if record.new == StateName::Succeeded {
            succeeded_tokens.insert(token.0);
        }
        let owner = (run.to_string(), attempt.to_string());
        let first = token_owner.entry(token.0).or_insert_with(|| owner.clone());
        if *first != owner {
            eprintln!("DUPLICATE: {token} went to {first:?} and to {owner:?}");
            duplicates += 1;
        }
    }
    assert!(succeeded > 0 && !token_owner.is_empty(), "nothing ran");
    Found {
        runs: runs.len(),
        succeeded,
        lines: fired.len(),
        reruns: attempts
            .iter()
            .filter(|(_, attempt)| *attempt != "1")
            .count(),
        tokens: token_owner.len(),
        duplicates,
        store_runs: runs
            .iter()
            .map(|r| (r.id().to_string(), r.clone()))
            .collect(),
        succeeded_tokens,
        token_owner,
    }
}

//! Daemons on a real Postgres (`--store postgres`), as if on two hosts: each has a data
//! directory and a `KEEL_HOSTNAME` of its own. One leads and the other stands by; `kill -9` of
//! the leader hands over within the leader TTL plus a small bound, a SIGTERM at once; the job
//! keeps firing and no slot fires twice. Commands never act on the shared store directly: `keel
//! status` on either host names the same leader, and a change made on the standby's host is
//! sent to the leader's advertised HTTP API (refused, naming the leader, if it serves none).
//!
//! Postgres comes from store-postgres's test support (a throwaway cluster, or
//! `KEEL_TEST_DATABASE_URL`); with none, the test fails unless `KEEL_SKIP_POSTGRES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, Place, WAIT};
use keel_core::Store;
use serde_json::Value;

/// The leadership lease's TTL in this test (the default is 10 s).
const TTL: Duration = Duration::from_secs(3);
/// How much later than the TTL a `kill -9`ed leader may be replaced: the standby's poll (1 s)
/// and its start-up.
const FAILOVER_BOUND: Duration = Duration::from_secs(2);

/// Each attempt appends `KEY RUN ATTEMPT` to this file (in the first place's directory).
const FIRED: &str = "fired.log";

/// Every daemon's keel.toml: a short shutdown, and attempts' leases of 2 s, so a run held by a
/// dead or stalled leader is reclaimed within the tests' waits rather than after 30 s.
const DAEMON_TOML: &str =
    "[daemon]\nshutdown_budget = \"2s\"\nlease_ttl = \"2s\"\nlease_grace = \"1s\"\n";

#[test]
fn two_daemons_on_postgres_one_leads_and_the_other_takes_over() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = with_password(db.url());
    let a = Place::new("pg-a");
    let b = Place::new("pg-b");
    let fired = a.path(FIRED);
    // Host a's API asks for a token (`--http` keeps `[http] tokens`): a command sent on to it
    // carries KEEL_TOKEN as with --server.
    let tokens = a.write(
        "tokens.toml",
        &format!("[[token]]\nname = \"ops\"\nrole = \"operator\"\nsecret = \"{SECRET}\"\n"),
    );
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config_a = a.config(&format!(
        "{DAEMON_TOML}\n[http]\nlisten = \"127.0.0.1:0\"\ntokens = \"tokens.toml\"\n"
    ));
    let config_b = b.config(DAEMON_TOML);

    // A missing database is refused by name.
    b.keel(&["--store", "postgres", "job", "ls"])
        .expect_code(2)
        .expect_stderr("--database-url");

    let leader = start(&a, &config_a, &url, "host-a", true);
    leader.wait_for(&["leading the postgres store as host-a:"]);
    let standby = start(&b, &config_b, &url, "host-b", false);
    standby.wait_for(&["standby: host-a:", "leads the postgres store"]);
    assert_eq!(standby.count(&["leading the postgres store"]), 0);

    // Who leads, in the leader's status.
    let status: Value = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/status", leader.http_url()))
        .bearer_auth(SECRET)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["store"], "postgres", "{status}");
    assert_eq!(status["worker"], "local:host-a", "{status}");
    assert_eq!(status["leader"]["leading"], true, "{status}");
    assert!(
        status["leader"]["holder"]
            .as_str()
            .unwrap()
            .starts_with("host-a:"),
        "{status}"
    );
    assert!(status["leader"]["since"].is_string(), "{status}");
    let api = leader.http_url();
    assert_eq!(
        status["leader"]["api"], api,
        "the leader advertises the address its listener on port 0 got: {status}"
    );

    // `keel status` on both hosts names the same leader: the leader answers on its socket, the
    // standby's host reads the lease (its daemon opens no socket while it stands by).
    let on_a = pg_keel(&a, &url, &["--json", "status"])
        .expect_code(0)
        .stdout();
    let on_a: Value = serde_json::from_str(&on_a).unwrap();
    let on_b = pg_keel(&b, &url, &["--json", "status"])
        .expect_code(0)
        .stdout();
    let on_b: Value = serde_json::from_str(&on_b).unwrap();
    assert_eq!(
        (on_a["daemon"].as_str(), on_a["via"].as_str()),
        (Some("leading"), Some("socket")),
        "{on_a}"
    );
    assert_eq!(
        (on_b["daemon"].as_str(), on_b["via"].as_str()),
        (Some("standing_by"), Some("database")),
        "{on_b}"
    );
    assert_eq!(on_a["pid"], leader.pid(), "{on_a}");
    assert_eq!(
        on_b["pid"],
        standby.pid(),
        "the standby's pid, from its lock: {on_b}"
    );
    for field in ["holder", "term", "since", "since_ms", "api"] {
        assert_eq!(
            on_a["leader"][field], on_b["leader"][field],
            "{field}: {on_a} {on_b}"
        );
    }
    assert_eq!(on_b["leader"]["host"], "host-a", "{on_b}");
    assert_eq!(on_b["leader"]["api"], api, "{on_b}");
    assert!(
        on_a["leader"]["clock_skew_ms"].is_i64(),
        "the leader knows its skew: {on_a}"
    );
    assert!(
        on_a["leader"]["expires_ms"].as_i64() > on_a["leader"]["since_ms"].as_i64(),
        "{on_a}"
    );
    pg_keel(&b, &url, &["status"])
        .expect_code(0)
        .expect_stdout("running here, standing by")
        .expect_stdout(on_a["leader"]["holder"].as_str().unwrap())
        .expect_stdout(&api);

    let add = tick_job(&fired);
    let add = strs(&add);
    // A change on the standby's host goes to the leader's advertised API (never to the store
    // directly, which would depose the leader), saying once where it went.
    let no_token = pg_keel(&b, &url, &add);
    no_token.expect_code(2).expect_stderr("KEEL_TOKEN");
    let forwarded = with_token(&b, &url, &add);
    forwarded
        .expect_code(0)
        .expect_stdout("added job tick")
        .expect_stderr("sending the command to the leader host-a:")
        .expect_stderr(&api);
    assert_eq!(
        forwarded.stderr().matches("sending the command").count(),
        1,
        "{}",
        forwarded.stderr()
    );
    leader.wait_for(&["job tick: added by token \"ops\" over HTTP"]);
    assert_eq!(
        standby.count(&["leading the postgres store"]),
        0,
        "nobody was deposed"
    );
    // Added by the leader, and fired once per slot.
    wait_until("the leader fires the job twice", || {
        lines(&fired).len() >= 2
    });
    // Read from a host where no daemon ever ran.
    let elsewhere = Place::new("pg-elsewhere");
    let jobs: Value = serde_json::from_str(
        &pg_keel(&elsewhere, &url, &["--json", "job", "ls"])
            .expect_code(0)
            .stdout(),
    )
    .unwrap();
    assert_eq!(jobs[0]["name"], "tick", "{jobs}");
    assert!(
        !elsewhere.data().exists(),
        "a read created {:?}",
        elsewhere.data()
    );

    // kill -9 of the leader: the standby leads within TTL + the bound.
    let mut leader = leader;
    let killed_at = Instant::now();
    leader.signal("KILL");
    leader.wait_exit();
    let before = lines(&fired).len();
    standby.wait_for(&["leading the postgres store as host-b:"]);
    let failover = killed_at.elapsed();
    eprintln!("failover after kill -9 of the leader: {failover:?} (lease TTL {TTL:?})");
    assert!(
        failover <= TTL + FAILOVER_BOUND,
        "took over after {failover:?}:\n{}",
        standby.log()
    );
    wait_until("the new leader fires the job", || {
        lines(&fired).len() >= before + 2
    });

    // The old host comes back as a standby; a SIGTERM of the leader hands over at once.
    let again = start(&a, &config_a, &url, "host-a", false);
    again.wait_for(&["standby: host-b:", "leads the postgres store"]);
    let mut standby = standby;
    let stopped_at = Instant::now();
    standby.signal("TERM");
    again.wait_for(&["leading the postgres store as host-a:"]);
    let handover = stopped_at.elapsed();
    eprintln!("handover after SIGTERM of the leader: {handover:?}");
    assert!(
        handover < TTL,
        "a resigned lease was taken over after {handover:?}:\n{}",
        again.log()
    );
    assert!(standby.wait_exit().success(), "{}", standby.log());
    assert_eq!(
        standby.count(&["resigned the lead"]),
        1,
        "{}",
        standby.log()
    );
    let before = lines(&fired).len();
    wait_until("the third leader fires the job", || {
        lines(&fired).len() >= before + 2
    });

    // No slot fired twice, and no attempt ran twice.
    let fired = lines(&fired);
    expect_each_slot_fired_once(&fired);
    // The store agrees: one run per slot, read directly (reads may).
    let runs: Value = serde_json::from_str(
        &pg_keel(
            &b,
            &url,
            &["--json", "runs", "--job", "tick", "--limit", "1000"],
        )
        .expect_code(0)
        .stdout(),
    )
    .unwrap();
    let runs = runs.as_array().unwrap();
    assert!(runs.len() >= fired.len(), "{runs:?}");
    // The password never reached a log.
    for daemon in [&again, &standby] {
        assert!(!daemon.log().contains(PASSWORD), "{}", daemon.log());
    }
}

#[test]
fn a_change_is_refused_naming_the_leader_when_it_serves_no_api() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-noapi-a");
    let elsewhere = Place::new("pg-noapi-elsewhere");
    let add = ["job", "add", "x", "--every", "1m", "--", "true"];

    // A host with no daemon needs no data directory on Postgres: doctor checks the database.
    assert!(!elsewhere.data().exists());
    pg_keel(&elsewhere, &url, &["doctor"])
        .expect_code(0)
        .expect_stdout("postgres store opens");

    // Nobody leads yet: refused (never written to the store directly), and status says so.
    pg_keel(&elsewhere, &url, &add)
        .expect_code(2)
        .expect_stderr("no daemon leads the postgres store");
    let nobody: Value = serde_json::from_str(
        &pg_keel(&elsewhere, &url, &["--json", "status"])
            .expect_code(0)
            .stdout(),
    )
    .unwrap();
    assert_eq!(nobody["daemon"], "not_running", "{nobody}");
    assert_eq!(nobody["leader"], Value::Null, "{nobody}");

    // A leader without --http: the refusal names it and says it serves no API.
    let leader = start(&a, &a.config(DAEMON_TOML), &url, "host-a", false);
    leader.wait_for(&["ready: postgres store"]);
    let status: Value = serde_json::from_str(
        &pg_keel(&elsewhere, &url, &["--json", "status"])
            .expect_code(0)
            .stdout(),
    )
    .unwrap();
    assert_eq!(
        (status["daemon"].as_str(), status["via"].as_str()),
        (Some("not_running"), Some("database")),
        "no daemon on this host: {status}"
    );
    assert_eq!(status["leader"]["host"], "host-a", "{status}");
    assert_eq!(status["leader"]["api"], Value::Null, "{status}");
    let holder = status["leader"]["holder"].as_str().unwrap().to_string();
    let refused = pg_keel(&elsewhere, &url, &add);
    refused
        .expect_code(2)
        .expect_stderr(&format!("{holder} leads the postgres store"))
        .expect_stderr("serves no HTTP API");
    assert!(
        !refused.stderr().contains("sending the command"),
        "{}",
        refused.stderr()
    );
    let jobs: Value = serde_json::from_str(
        &pg_keel(&elsewhere, &url, &["--json", "job", "ls"])
            .expect_code(0)
            .stdout(),
    )
    .unwrap();
    assert_eq!(jobs, Value::Array(vec![]), "nothing was added");
    assert_eq!(leader.count(&["lost the lead"]), 0, "{}", leader.log());
}

/// A password the test cluster does not ask for (it trusts local connections), in the URL
/// only to check that keel never prints it.
const PASSWORD: &str = "sekrit-never-printed";

/// `url` with [`PASSWORD`], for a key-value connection string (a URL one is left as it is).
fn with_password(url: String) -> String {
    if url.starts_with("postgres") {
        return url;
    }
    format!("{url} password={PASSWORD}")
}

#[test]
fn a_stalled_leader_is_replaced_and_stops_itself_when_it_wakes() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-stall-a");
    let b = Place::new("pg-stall-b");
    let fired = a.path(FIRED);
    let (config_a, config_b) = (a.config(DAEMON_TOML), b.config(DAEMON_TOML));
    let mut leader = start(&a, &config_a, &url, "host-a", false);
    leader.wait_for(&["leading the postgres store as host-a:"]);
    // Its control socket is open: commands on its host reach it.
    leader.wait_for(&["ready: postgres store"]);
    let standby = start(&b, &config_b, &url, "host-b", false);
    standby.wait_for(&["standby: host-a:"]);
    let add = tick_job(&fired);
    let add = strs(&add);
    pg_keel(&a, &url, &add).expect_code(0);
    wait_until("the leader fires the job", || !lines(&fired).is_empty());

    // Stalled (as by a long GC pause or a frozen VM): its lease lapses and the standby leads.
    let stalled_at = Instant::now();
    leader.signal("STOP");
    standby.wait_for(&["leading the postgres store as host-b:"]);
    let failover = stalled_at.elapsed();
    eprintln!("failover after SIGSTOP of the leader: {failover:?} (lease TTL {TTL:?})");
    assert!(failover <= TTL + FAILOVER_BOUND, "{}", standby.log());
    let before = lines(&fired).len();
    wait_until("the new leader fires the job", || {
        lines(&fired).len() >= before + 2
    });

    // Woken, the old leader finds it lost the lead (or the store refuses its writes) and
    // stops with a failure, instead of firing beside the new one.
    leader.signal("CONT");
    let status = leader.wait_exit();
    assert!(!status.success(), "{status:?}:\n{}", leader.log());
    let log = leader.log();
    assert!(
        log.contains("lost the lead") || log.contains("took over the store"),
        "{log}"
    );
    let before = lines(&fired).len();
    wait_until("the new leader keeps firing", || {
        lines(&fired).len() >= before + 2
    });
    expect_each_slot_fired_once(&lines(&fired));
}

/// The arguments of `job add tick`: a job every second whose command appends
/// `KEY RUN ATTEMPT` to `fired`, as [`expect_each_slot_fired_once`] reads them.
fn tick_job(fired: &Path) -> Vec<String> {
    let line = format!(
        "echo \"$KEEL_IDEMPOTENCY_KEY $KEEL_RUN_ID $KEEL_ATTEMPT\" >> {}",
        fired.display()
    );
    [
        "job", "add", "tick", "--every", "1s", "--", "sh", "-c", &line,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// libfaketime (Debian: `apt-get install faketime`), which `.ci/run` installs: it moves a
/// process's wall clock and leaves its monotonic clock alone.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_standby_whose_clock_is_an_hour_ahead_takes_over_on_the_databases_time() {
    let Some(db) = pg::TestDb::new() else { return };
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: install libfaketime (Debian: apt-get install faketime) to run \
         the skewed-clock test"
    );
    let url = db.url();
    let a = Place::new("pg-skew-a");
    let b = Place::new("pg-skew-b");
    let fired = a.path(FIRED);
    let (config_a, config_b) = (a.config(DAEMON_TOML), b.config(DAEMON_TOML));
    let mut leader = start(&a, &config_a, &url, "host-a", false);
    leader.wait_for(&["leading the postgres store as host-a:"]);
    leader.wait_for(&["ready: postgres store"]);
    // Host b's wall clock is an hour ahead (as with a broken NTP); its monotonic clock is not.
    let ttl = format!("{}s", TTL.as_secs());
    let standby = b.spawn_daemon(
        &[
            "--store",
            "postgres",
            "--database-url",
            &url,
            "run",
            "--config",
            config_b.to_str().unwrap(),
            "--leader-ttl",
            &ttl,
        ],
        &[
            ("KEEL_HOSTNAME", "host-b"),
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME", "+1h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    standby.wait_for(&["standby: host-a:"]);
    let add = tick_job(&fired);
    let add = strs(&add);
    pg_keel(&a, &url, &add).expect_code(0);
    wait_until("the leader fires the job", || !lines(&fired).is_empty());

    leader.signal("KILL");
    leader.wait_exit();
    standby.wait_for(&["leading the postgres store as host-b:"]);
    let said = standby.wait_for(&["clock: this host's clock is"]);
    assert!(
        said.contains("warning:") && said.contains("ahead of the database's"),
        "the skew is reported: {said}"
    );
    let before = lines(&fired).len();
    wait_until("the skewed host fires the job", || {
        lines(&fired).len() >= before + 3
    });

    // Every run, the skewed leader's too, was created and has its slot on the database's time
    // (this host's clock, unskewed, within a minute), not an hour ahead.
    let now = common::now_ms();
    let query = keel_core::RunQuery {
        limit: 500,
        ..keel_core::RunQuery::default()
    };
    let runs = db.open().runs(&query).unwrap().runs;
    // The killed leader's runs, and at least two the skewed one created (of its three lines,
    // one may be a killed run's next attempt).
    assert!(runs.len() >= 3, "{} runs", runs.len());
    for run in &runs {
        for (what, at) in [("created", Some(run.created_at())), ("slot", run.slot())] {
            let at = at.unwrap().0;
            assert!(
                (at - now).abs() < 60_000,
                "run {} {what} at {at}, {} s from now: {}",
                run.id(),
                (at - now) / 1000,
                standby.log()
            );
        }
    }
    expect_each_slot_fired_once(&lines(&fired));
}

#[test]
fn a_leader_that_cannot_renew_stops_itself_before_its_lease_ends() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-fence-a");
    let b = Place::new("pg-fence-b");
    let (config_a, config_b) = (a.config(DAEMON_TOML), b.config(DAEMON_TOML));
    let mut leader = start(&a, &config_a, &url, "host-a", false);
    leader.wait_for(&["leading the postgres store as host-a:"]);
    let standby = start(&b, &config_b, &url, "host-b", false);
    standby.wait_for(&["standby: host-a:"]);

    // The lease row locked behind the daemons' backs: every renewal hangs, as over a
    // partition, while the store itself still answers.
    let mut client = db.client();
    let mut blocker = client.transaction().unwrap();
    blocker
        .query("SELECT 1 FROM keel_leader FOR UPDATE", &[])
        .unwrap();
    let blocked_at = Instant::now();
    leader.wait_for(&["lost the lead: no renewal of the leadership lease succeeded"]);
    let stopped = blocked_at.elapsed();
    eprintln!("a leader that could not renew stopped itself after {stopped:?} (lease TTL {TTL:?})");
    let status = leader.wait_exit();
    assert!(!status.success(), "{status:?}:\n{}", leader.log());
    assert_eq!(
        leader.count(&["lost the lead: no renewal of the leadership lease succeeded"]),
        1,
        "{}",
        leader.log()
    );
    // It stopped before its lease could have lapsed: TTL after the last renewal, which was
    // before the block.
    assert!(
        stopped < TTL,
        "stopped after {stopped:?}:\n{}",
        leader.log()
    );
    blocker.commit().unwrap();
    standby.wait_for(&["leading the postgres store as host-b:"]);
}

#[test]
fn after_a_database_failover_the_leader_stops_and_no_daemon_writes_until_it_is_accepted() {
    let Some(pair) = pg::replica::Pair::start() else {
        return;
    };
    let url = pair.primary_url();
    let a = Place::new("pg-failover-a");
    let fired = a.path(FIRED);
    let config = a.config(DAEMON_TOML);
    let mut leader = start(&a, &config, &url, "host-a", false);
    leader.wait_for(&["ready: postgres store"]);
    let add = tick_job(&fired);
    let add = strs(&add);
    pg_keel(&a, &url, &add).expect_code(0);
    wait_until("the leader fires the job", || lines(&fired).len() >= 2);
    pair.wait_replayed();

    // The primary crashes; the replica, promoted, answers at its address.
    pair.fail_over();
    let status = leader.wait_exit();
    assert!(!status.success(), "{status:?}:\n{}", leader.log());
    let log = leader.log();
    assert!(log.contains("the store's database changed"), "{log}");
    let fired_then = lines(&fired).len();

    // A daemon started on it refuses, naming the way out; so does a read.
    let mut again = start(&a, &config, &url, "host-a", false);
    let status = again.wait_exit();
    assert!(!status.success(), "{status:?}");
    let log = again.log();
    assert!(
        log.contains("timeline 1")
            && log.contains("timeline 2")
            && log.contains("keel doctor --accept-database"),
        "{log}"
    );
    pg_keel(&a, &url, &["job", "ls"])
        .expect_code(1)
        .expect_stderr("the store's database changed");
    assert_eq!(
        lines(&fired).len(),
        fired_then,
        "nothing fired on the new timeline"
    );

    // Accepted after a check, the store opens again and the job fires on.
    pg_keel(&a, &url, &["doctor", "--accept-database"]).expect_stdout("(it was system");
    let _daemon = start(&a, &config, &url, "host-a", false);
    wait_until("the job fires again", || {
        lines(&fired).len() >= fired_then + 2
    });
    expect_each_slot_fired_once(&lines(&fired));
}

#[test]
fn a_standby_checks_its_http_at_start_reads_the_config_again_when_it_leads_and_hides_secrets() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-takeover-a");
    let b = Place::new("pg-takeover-b");
    let env_file = a.path("env.txt");
    // One keel.toml for both hosts, as deployed to each.
    let shared = a.config(DAEMON_TOML);
    let ttl = format!("{}s", TTL.as_secs());
    let run = |place: &Place, host: &str, extra: &[&str]| {
        let mut args = vec![
            "--store",
            "postgres",
            "run",
            "--config",
            shared.to_str().unwrap(),
            "--leader-ttl",
            &ttl,
        ];
        args.extend_from_slice(extra);
        // The URL and a token in the daemon's environment, as a service would have them.
        place.spawn_daemon(
            &args,
            &[
                ("KEEL_HOSTNAME", host),
                ("KEEL_DATABASE_URL", &url),
                ("KEEL_TOKEN", "sekrit-token-never-shown"),
            ],
        )
    };
    let mut leader = run(&a, "host-a", &[]);
    leader.wait_for(&["ready: postgres store"]);

    // A standby that could not serve its HTTP API says so at once, not when it takes over.
    let mut refused = run(&b, "host-b", &["--http", "0.0.0.0:0"]);
    assert_eq!(refused.wait_exit().code(), Some(2), "{}", refused.log());
    assert!(
        refused.log().contains("not a loopback address"),
        "{}",
        refused.log()
    );
    assert_eq!(refused.count(&["standby"]), 0, "{}", refused.log());

    let standby = run(&b, "host-b", &[]);
    standby.wait_for(&["standby: host-a:"]);
    // `doctor` on the standby's host calls a standby fine and names the leader.
    pg_keel(&b, &url, &["doctor"]).expect_stdout("standing by (pid");
    pg_keel(&b, &url, &["doctor"]).expect_stdout("host-a:");
    // The file gains a job (deployed everywhere, but the leader not yet told), which dumps its
    // environment: the standby must not remove it when it takes over.
    std::fs::write(
        &shared,
        format!(
            "{DAEMON_TOML}\n[[job]]\nname = \"env\"\nat = \"+1s\"\ncommand = [\"sh\", \"-c\", \"env > {}\"]\n",
            env_file.display()
        ),
    )
    .unwrap();
    leader.signal("KILL");
    leader.wait_exit();
    standby.wait_for(&["leading the postgres store as host-b:"]);
    standby.wait_for(&["again on taking the lead"]);
    wait_until("the new job runs", || {
        std::fs::read_to_string(&env_file).is_ok_and(|env| env.contains("KEEL_RUN_ID="))
    });
    assert_eq!(standby.count(&["env: removed"]), 0, "{}", standby.log());
    let env = std::fs::read_to_string(&env_file).unwrap();
    for secret in [
        "KEEL_DATABASE_URL",
        "KEEL_TOKEN",
        "sekrit-token-never-shown",
    ] {
        assert!(!env.contains(secret), "a command sees {secret}:\n{env}");
    }
}

#[test]
fn keel_toml_says_where_the_store_is_and_the_command_line_wins() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = with_password(db.url());
    let a = Place::new("pg-toml-a");
    let b = Place::new("pg-toml-b");
    // A TOML basic string: the test URL has no quote or backslash to escape.
    assert!(!url.contains(['"', '\\']), "{url}");
    let toml = format!(
        "[daemon]\nshutdown_budget = \"2s\"\nlease_ttl = \"2s\"\nlease_grace = \"1s\"\nstore = \"postgres\"\ndatabase_url = \"{url}\"\n\
         leader_ttl = \"4s\"\n"
    );
    let (config_a, config_b) = (a.config(&toml), b.config(&toml));

    // No --store, --database-url or --leader-ttl: all three come from the file.
    let mut leader = a.spawn_daemon(
        &["run", "--config", config_a.to_str().unwrap()],
        &[("KEEL_HOSTNAME", "host-a")],
    );
    let leading = leader.wait_for(&["leading the postgres store as host-a:"]);
    assert!(leading.contains("lease ttl 4s"), "{leading}");
    // The command line wins over the file.
    let standby = b.spawn_daemon(
        &[
            "run",
            "--config",
            config_b.to_str().unwrap(),
            "--leader-ttl",
            "3s",
        ],
        &[("KEEL_HOSTNAME", "host-b")],
    );
    standby.wait_for(&["standby: host-a:"]);
    leader.stop();
    let leading = standby.wait_for(&["leading the postgres store as host-b:"]);
    assert!(leading.contains("lease ttl 3s"), "{leading}");
    for log in [leader.log(), standby.log()] {
        assert!(!log.contains(PASSWORD), "{log}");
    }

    // A bad URL in the file is refused by key and line, and not printed.
    let bad = a.write(
        "bad.toml",
        &format!(
            "[daemon]\nstore = \"postgres\"\ndatabase_url = \"postgresql://keel:{PASSWORD}@db:port/keel\"\n"
        ),
    );
    let done = a.keel(&["run", "--config", bad.to_str().unwrap()]);
    done.expect_code(2)
        .expect_stderr("line 3: [daemon] database_url: not a Postgres connection string");
    assert!(!done.stderr().contains(PASSWORD), "{}", done.stderr());
}

/// Adds a one-shot job `name` on `place` (through its leading daemon) whose command writes its
/// pid (its process group) to `NAME.pid` and sleeps; returns the pid once it runs, and a guard
/// that kills it when the test ends, whatever happened.
fn start_long_command(place: &Place, url: &str, name: &str) -> (u32, KillOnDrop) {
    let pid_file = place.path(&format!("{name}.pid"));
    let script = format!(
        "echo $$ > {}.tmp && mv {0}.tmp {0} && exec sleep 600",
        pid_file.display()
    );
    pg_keel(
        place,
        url,
        &["job", "add", name, "--at", "+1s", "--", "sh", "-c", &script],
    )
    .expect_code(0);
    wait_until("the long command starts", || pid_file.exists());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    (pid, KillOnDrop(pid))
}

/// The fence guard (`keel fence-guard`) of the daemon whose data directory is `place`'s.
fn fence_guard_of(place: &Place) -> u32 {
    let attempts = place.data().join("attempts");
    let attempts = attempts.to_str().unwrap();
    let found = std::fs::read_dir("/proc").unwrap().find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let has = |arg: &str| args.contains(&arg.as_bytes());
        (has("fence-guard") && has(attempts) && alive(pid)).then_some(pid)
    });
    found.unwrap_or_else(|| panic!("no fence guard for {attempts}"))
}

#[test]
fn a_killed_leaders_guard_kills_its_command_and_a_restart_kills_what_no_guard_did() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-leftover-a");
    let b = Place::new("pg-leftover-b");
    let (config_a, config_b) = (a.config(DAEMON_TOML), b.config(DAEMON_TOML));
    let mut leader = start(&a, &config_a, &url, "host-a", false);
    leader.wait_for(&["ready: "]);
    let mut standby = start(&b, &config_b, &url, "host-b", false);
    standby.wait_for(&["standby: host-a:"]);

    // A command runs in a process group of its own, so it outlives its daemon; its daemon's
    // fence guard kills it as soon as the daemon is gone, before the standby may lead.
    let (pid, _reaper) = start_long_command(&a, &url, "long");
    leader.signal("KILL");
    leader.wait_exit();
    standby.wait_for(&["leading the postgres store as host-b:"]);
    assert!(!alive(pid), "{}", leader.log());
    leader.wait_for(&[
        "fence guard of daemon",
        "exited without stopping its commands; killed 1",
    ]);

    // With its guard killed too (as a whole host's processes would be), a command does outlive
    // its daemon: the other host leaves it alone, and host-a kills it as soon as it comes back.
    let mut back = start(&a, &config_a, &url, "host-a", false);
    back.wait_for(&["standby: host-b:"]);
    standby.stop();
    back.wait_for(&["ready: "]);
    let (pid, _reaper) = start_long_command(&a, &url, "longer");
    let b2 = start(&b, &config_b, &url, "host-b", false);
    b2.wait_for(&["standby: host-a:"]);
    let guard = fence_guard_of(&a);
    std::process::Command::new("kill")
        .args(["-KILL", &guard.to_string()])
        .status()
        .unwrap();
    back.signal("KILL");
    back.wait_exit();
    b2.wait_for(&["leading the postgres store as host-b:"]);
    assert!(alive(pid), "{}", b2.log());
    assert_eq!(b2.count(&["killed the leftover"]), 0, "{}", b2.log());

    // Back on host-a, the daemon kills its own leftover at once, though it only stands by.
    let again = start(&a, &config_a, &url, "host-a", false);
    again.wait_for(&["killed the leftover command of"]);
    again.wait_for(&["standby: host-b:"]);
    assert!(!alive(pid), "{}", again.log());
    assert_eq!(
        again.count(&["leading the postgres store"]),
        0,
        "{}",
        again.log()
    );
}

#[test]
fn a_stopped_leaders_command_is_killed_before_the_next_leader_may_run_it_again() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-guard-a");
    let b = Place::new("pg-guard-b");
    let (config_a, config_b) = (a.config(DAEMON_TOML), b.config(DAEMON_TOML));
    let mut leader = start(&a, &config_a, &url, "host-a", false);
    leader.wait_for(&["ready: "]);
    let standby = start(&b, &config_b, &url, "host-b", false);
    standby.wait_for(&["standby: host-a:"]);
    let (pid, _reaper) = start_long_command(&a, &url, "long");

    // Stopped whole (as by a debugger or a frozen event loop), the leader can neither renew nor
    // stop its command: its guard kills the command at the leader's fence deadline, before the
    // lease lapses and the standby leads.
    let stopped_at = Instant::now();
    leader.signal("STOP");
    standby.wait_for(&["leading the postgres store as host-b:"]);
    assert!(
        !alive(pid),
        "the stopped leader's command still runs as the standby leads ({:?} after the stop)",
        stopped_at.elapsed()
    );
    leader.wait_for(&["fence guard of daemon", "stopped or stalled", "killed 1"]);

    // The run goes on as its next attempt on the new leader, once its lease lapsed.
    standby.wait_for(&["long"]);
    leader.signal("CONT");
    assert!(!leader.wait_exit().success());
}

#[test]
fn a_daemon_without_the_handler_a_stored_job_needs_stands_by_and_says_which() {
    let Some(db) = pg::TestDb::new() else { return };
    let url = db.url();
    let a = Place::new("pg-kinds-a");
    let b = Place::new("pg-kinds-b");
    let (config_a, config_b) = (a.config(DAEMON_TOML), b.config(DAEMON_TOML));
    let mut leader = start(&a, &config_a, &url, "host-a", false);
    leader.wait_for(&["leading the postgres store as host-a:"]);
    leader.wait_for(&["ready: "]);
    pg_keel(
        &a,
        &url,
        &["job", "add", "odd", "--every", "1h", "--", "true"],
    )
    .expect_code(0);
    leader.stop();

    // The job turns into a kind no keel daemon runs, as if a newer keel on another host had
    // added it.
    let mut client = db.client();
    let set_kind =
        |client: &mut postgres::Client, from: &str, to: &str| {
            let changed = client
            .execute(
                "UPDATE keel_jobs SET body = replace(body::text, $1, $2)::json WHERE id = 'odd'",
                &[&format!("\"kind\":\"{from}\""), &format!("\"kind\":\"{to}\"")],
            )
            .unwrap();
            assert_eq!(changed, 1);
        };
    set_kind(&mut client, "command", "mystery");
    let mut standby = start(&b, &config_b, &url, "host-b", false);
    standby.wait_for(&["standby: not taking the lead: job odd has kind \"mystery\""]);
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM keel_leader WHERE expires_at > now()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(live, 0, "{}", standby.log());
    assert_eq!(
        standby.count(&["leading the postgres store"]),
        0,
        "{}",
        standby.log()
    );

    // Once every stored job is one it runs, it leads.
    set_kind(&mut client, "mystery", "command");
    standby.wait_for(&["leading the postgres store as host-b:"]);
    standby.stop();
}

/// Kills process `pid` when dropped, if it still runs.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// Whether process `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// No slot fired as two runs, and no attempt of a run ran twice (`KEY RUN ATTEMPT` lines).
#[track_caller]
fn expect_each_slot_fired_once(fired: &[String]) {
    let mut runs_of_slot: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut attempts = BTreeSet::new();
    for line in fired {
        let [key, run, attempt] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("malformed line {line:?}");
        };
        runs_of_slot
            .entry(key.to_string())
            .or_default()
            .insert(run.to_string());
        assert!(
            attempts.insert((run.to_string(), attempt.to_string())),
            "{run} attempt {attempt} ran twice:\n{fired:?}"
        );
    }
    for (key, runs) in &runs_of_slot {
        assert_eq!(runs.len(), 1, "slot {key} fired as {runs:?}");
    }
}

/// A daemon on `place` with `--store postgres`, named `host` (its worker is `local:HOST`).
fn start(place: &Place, config: &Path, url: &str, host: &str, http: bool) -> Daemon {
    let ttl = format!("{}s", TTL.as_secs());
    let mut args = vec![
        "--store",
        "postgres",
        "--database-url",
        url,
        "run",
        "--config",
        config.to_str().unwrap(),
        "--leader-ttl",
        &ttl,
    ];
    if http {
        args.extend(["--http", "127.0.0.1:0"]);
    }
    place.spawn_daemon(&args, &[("KEEL_HOSTNAME", host)])
}

/// Host a's operator token.
const SECRET: &str = "e2e-postgres-operator-0123456789";

/// [`pg_keel`] with `KEEL_TOKEN` set to [`SECRET`].
fn with_token(place: &Place, url: &str, args: &[&str]) -> common::Done {
    let mut all = vec!["--store", "postgres", "--database-url", url];
    all.extend_from_slice(args);
    let output = place
        .command(&all)
        .env("KEEL_TOKEN", SECRET)
        .output()
        .expect("keel runs");
    common::Done(output)
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

/// Polls `condition` (a file the daemons write) until it holds, failing after [`WAIT`].
#[track_caller]
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

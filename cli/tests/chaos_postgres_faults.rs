//! More chaos on one machine (issue 15), beside `chaos_postgres.rs`, on a throwaway Postgres of
//! this binary's own (that test restarts its server):
//!
//! 1. **A partition.** Three `keel run --store postgres` daemons as three hosts; the leader
//!    reaches Postgres through a TCP proxy (store-postgres's test support) that the test
//!    freezes: no byte goes either way, no socket closes. A blip of 300 ms changes nothing
//!    (the leader keeps the lead and fires). Partitioned for good, the leader cannot renew
//!    its lease: it must fence itself (log `lost the lead`) before a standby leads, and exit
//!    non-zero while still cut off; a standby leads within TTL + 2 s and fires; once the proxy
//!    thaws (the bytes it held arrive late) the old host comes back as a standby through it.
//! 2. **External workers killed and stalled.** Workers are real processes (a shell loop of
//!    `keel --server URL worker claim/touch/complete`, each in a process group of its own,
//!    heartbeating while it works). One is `kill -9`ed mid-run, another SIGSTOPped past its
//!    lease and then continued. The killed worker's run is reclaimed after lease TTL + grace
//!    and completed by another attempt; the stalled worker's late completion is refused (exit
//!    2, stale token) and does not count; every completion a worker was told succeeded is in
//!    the store; no token went to two attempts.
//!
//! Both end with the checks `chaos_postgres.rs` ends with too (`chaos::verify`), from the store
//! and the shared log: no slot ran as two runs, no attempt ran twice, no fencing token went to
//! two attempts, every run the store calls succeeded has its line. With no Postgres the tests
//! fail unless `KEEL_SKIP_POSTGRES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chaos::{
    add_logging_job, all_logs, leader, lines, next_leader, pg_keel, start_all, stop_all, verify,
    wait_lines, wait_until, Found, Host, FIRED, LEADING, LEASE_GRACE, LEASE_TTL, READY,
    TAKEOVER_BOUND, TTL,
};
use common::{Place, WAIT};
use keel_core::StateName;

/// A partition short enough that the leader must not lose the lead: its renewals go every
/// TTL / 3 and it fences only when none sent in TTL − TTL / 5 was answered, so one held this
/// long is answered in time.
const BLIP: Duration = Duration::from_millis(300);
/// How long a fenced leader may take to exit once it fenced (keel's `FENCED_EXIT_WAIT` is 5 s,
/// for a runtime stuck on an unreachable store) plus start-up slack.
const FENCED_EXIT_BOUND: Duration = Duration::from_secs(7);
/// How much later than lease TTL + grace a silent worker's run may be reclaimed (the
/// watchdog's tick and the worker's last heartbeat, up to a second before it went silent).
const RECLAIM_BOUND: Duration = Duration::from_secs(2);

#[test]
fn a_partitioned_leader_fences_itself_and_a_standby_takes_over_without_a_duplicate() {
    let Some(db) = pg::TestDb::new() else { return };
    let proxy = match db.proxy() {
        Ok(proxy) => proxy,
        Err(why) => {
            // Straight to stderr: the harness captures `eprintln!` of a passing test.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPED the partition case: no proxy in front of {}: {why} \
                 !!!!!!!!\n",
                pg::DATABASE_URL
            );
            return;
        }
    };
    let began = Instant::now();
    let url = db.url();
    let shared = Place::new("partition-shared");
    let fired = shared.path(FIRED);
    // host-a reaches Postgres only through the proxy; the others directly.
    let mut hosts: Vec<Host> = [
        ("host-a", proxy.url().to_string()),
        ("host-b", url.clone()),
        ("host-c", url.clone()),
    ]
    .into_iter()
    .map(|(name, url)| Host::new("faults", name, url))
    .collect();
    start_all(&mut hosts);
    for job in ["tick-a", "tick-b", "tick-c"] {
        add_logging_job(&hosts[0].place, &url, job, &fired);
    }
    wait_lines(&fired, 6, "host-a fires every job", &hosts);

    // A blip shorter than the fence's slack (a renewal may be held for it): host-a keeps the
    // lead, and its connections, held and released, carry on.
    proxy.freeze();
    std::thread::sleep(BLIP);
    proxy.thaw();
    let before = lines(&fired).len();
    wait_lines(&fired, before + 3, "host-a fires after the blip", &hosts);
    assert_eq!(
        hosts[0].daemon().count(&["lost the lead"]),
        0,
        "{}",
        all_logs(&hosts)
    );
    assert_eq!(leader(&hosts), 0, "{}", all_logs(&hosts));

    // The partition: host-a can no longer reach Postgres, nor Postgres it.
    let frozen_at = Instant::now();
    let frozen_wall = common::now_ms();
    proxy.freeze();
    let (new, leading) = next_leader(&hosts, 0, frozen_at);
    hosts[new].daemon().wait_for(&[READY]);
    let ready = frozen_at.elapsed();
    // host-a fenced itself (it may already have logged more), and exits non-zero while still
    // cut off, having fired nothing since it fenced.
    let fence_line = hosts[0]
        .daemon()
        .wait_for(&["lost the lead: no renewal of the leadership lease succeeded"]);
    let by_a = |fired: &[String]| fired.iter().filter(|l| l.ends_with(" host-a")).count();
    let fired_by_a = by_a(&lines(&fired));
    let status = hosts[0].daemon.as_mut().unwrap().wait_exit();
    let exited = frozen_at.elapsed();
    let log_a = hosts[0].daemon().log();
    assert!(!status.success(), "{status:?}:\n{log_a}");
    assert!(
        exited <= TTL + FENCED_EXIT_BOUND,
        "exited {exited:?} after the partition:\n{log_a}"
    );
    // Fenced before the successor led (the log lines' wall-clock stamps, one machine), and
    // before its own lease could lapse: within the TTL of the partition.
    let fenced_wall = stamp(&fence_line);
    let leading_line = hosts[new].daemon().wait_for(&[LEADING]);
    let successor_wall = stamp(&leading_line);
    assert!(
        fenced_wall < successor_wall,
        "host-a fenced at {fence_line:?}, after {} led at {leading_line:?}",
        hosts[new].name
    );
    let fenced_after = Duration::from_millis((fenced_wall - frozen_wall).max(0) as u64);
    assert!(
        fenced_after < TTL,
        "fenced {fenced_after:?} after the partition:\n{log_a}"
    );
    let before = lines(&fired).len();
    wait_lines(&fired, before + 3, "the new leader fires", &hosts);

    // Thawed: what the proxy held reaches Postgres late and changes nothing; host-a comes back
    // through the proxy as a standby.
    proxy.thaw();
    let thawed_at = Instant::now();
    assert_eq!(
        by_a(&lines(&fired)),
        fired_by_a,
        "host-a fired after it fenced:\n{log_a}"
    );
    hosts[0].start();
    let name = hosts[new].name;
    hosts[0].daemon().wait_for(&["standby:", name]);
    let before = lines(&fired).len();
    wait_lines(
        &fired,
        before + 6,
        "the leader fires after the thaw",
        &hosts,
    );
    let after_thaw = thawed_at.elapsed();
    assert_eq!(leader(&hosts), new, "{}", all_logs(&hosts));
    stop_all(&mut hosts);

    let writers: Vec<&str> = hosts.iter().map(|h| h.name).collect();
    let found = verify(&db, &lines(&fired), &writers);
    eprintln!(
        "partition on Postgres: {} runs in the store ({} succeeded), {} lines in the shared \
         log ({} of a later attempt), {} fencing tokens; a {BLIP:?} blip kept the lead; \
         then a partition: host-a fenced {fenced_after:?} after the partition and exited \
         after {exited:?}; {} leading after {leading:?}, ready after {ready:?} (leader TTL \
         {TTL:?}); {after_thaw:?} from the thaw to 6 more firings; {} duplicates, in {:?}",
        found.runs,
        found.succeeded,
        found.lines,
        found.reruns,
        found.tokens,
        hosts[new].name,
        found.duplicates,
        began.elapsed()
    );
    assert_eq!(found.duplicates, 0, "duplicates found (above)");
    assert!(leading <= TTL + TAKEOVER_BOUND, "leading after {leading:?}");
    assert!(ready <= TTL + TAKEOVER_BOUND, "ready after {ready:?}");
}

#[test]
fn external_workers_killed_and_stalled_lose_their_runs_and_nothing_counts_twice() {
    let Some(db) = pg::TestDb::new() else { return };
    let began = Instant::now();
    let url = db.url();
    let shared = Place::new("workers-shared");
    let fired = shared.path(FIRED);
    let mut hosts = vec![Host::new("faults", "host-w", url.clone())];
    hosts[0].start();
    hosts[0].daemon().wait_for(&[READY]);
    let server = hosts[0].daemon().http_url();
    // One job per worker case, and the steady work.
    for (job, kind) in [
        ("doomed", "k-kill"),
        ("stalled", "k-stall"),
        ("steady", "k-steady"),
    ] {
        let add = [
            "job",
            "add",
            job,
            "--cron",
            "* * * * * *",
            "--worker-kind",
            kind,
        ];
        pg_keel(&hosts[0].place, &url, &add).expect_code(0);
    }
    let script = shared.write("worker.sh", WORKER_SH);

    // The two doomed workers claim first, each the run of its own kind, and work (wait for
    // their gates) while heartbeating.
    let (gate_kill, gate_stall) = (shared.path("gate-kill"), shared.path("gate-stall"));
    let mut killed = Worker::start(
        &shared,
        &script,
        &server,
        "w-kill",
        Some(&gate_kill),
        &["k-kill"],
    );
    let mut stalled = Worker::start(
        &shared,
        &script,
        &server,
        "w-stall",
        Some(&gate_stall),
        &["k-stall"],
    );
    let kill_claim = killed.wait_for("claimed", 1, &hosts).swap_remove(0);
    let stall_claim = stalled.wait_for("claimed", 1, &hosts).swap_remove(0);
    let claimed_at = Instant::now();
    // No healthy worker claims `k-stall` until the stalled worker was refused, so that its
    // completion meets the run queued again (its token stale), not one already finished.
    let healthy_kinds = ["k-steady", "k-kill"];
    let mut healthy = vec![
        Worker::start(&shared, &script, &server, "w-a", None, &healthy_kinds),
        Worker::start(&shared, &script, &server, "w-b", None, &healthy_kinds),
    ];
    healthy[0].wait_for("completed", 2, &hosts);
    // Held past lease TTL + grace, the heartbeating workers keep their runs (what is tested).
    std::thread::sleep(
        (claimed_at + LEASE_TTL + LEASE_GRACE + Duration::from_secs(1))
            .saturating_duration_since(Instant::now()),
    );
    let log = hosts[0].daemon().log();
    for claim in [&kill_claim, &stall_claim] {
        assert!(
            !log.contains(&reclaimed(claim)),
            "{claim:?} reclaimed while heartbeating:\n{log}"
        );
    }

    // kill -9 of one worker mid-run; SIGSTOP of the other past its lease.
    let killed_at = Instant::now();
    killed.signal("KILL");
    killed.reap();
    let stopped_at = Instant::now();
    stalled.signal("STOP");
    let kill_reclaimed = reclaimed_after(&hosts[0], &kill_claim, killed_at);
    let stall_reclaimed = reclaimed_after(&hosts[0], &stall_claim, stopped_at);
    // The killed worker's run is done by a later attempt of a healthy worker.
    let redone = |claim: &Claim, healthy: &[Worker]| {
        wait_until(
            &format!("{} redone by a healthy worker", claim.run),
            &hosts,
            || {
                healthy
                    .iter()
                    .flat_map(|w| w.entries("completed"))
                    .find(|c| c.run == claim.run && c.attempt > claim.attempt)
            },
        )
    };
    let kill_redone = redone(&kill_claim, &healthy);
    // Woken, the stalled worker finishes its work and tries to complete: refused, as stale; it
    // drops its result and stops.
    stalled.signal("CONT");
    let stalled_for = stopped_at.elapsed();
    std::fs::write(&gate_stall, "go").unwrap();
    let refusal = stalled.wait_for("refused", 1, &hosts).swap_remove(0);
    assert_eq!(refusal.token, stall_claim.token, "{refusal:?}");
    assert_eq!(refusal.code, Some(2), "{refusal:?}");
    assert!(
        refusal.said.contains("not the current lease"),
        "{refusal:?}"
    );
    assert!(stalled.reap().success(), "the stalled worker did not stop");
    // The same completion straight over HTTP, as any worker sees it: 409, nothing changed.
    let answer = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{server}/api/v1/runs/{}/complete", stall_claim.run))
        .json(&serde_json::json!({"token": stall_claim.token}))
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 409);
    let body = answer.text().unwrap();
    assert!(body.contains("stale_token"), "{body}");
    assert_eq!(stalled.entries("completed").len(), 0);
    // Its run is done by a later attempt of a healthy worker.
    healthy.push(Worker::start(
        &shared,
        &script,
        &server,
        "w-c",
        None,
        &["k-stall"],
    ));
    let stall_redone = redone(&stall_claim, &healthy);

    // A little more steady work, then everything stops.
    let done = healthy
        .iter()
        .map(|w| w.entries("completed").len())
        .sum::<usize>();
    wait_until("two more completions", &hosts, || {
        (healthy
            .iter()
            .map(|w| w.entries("completed").len())
            .sum::<usize>()
            >= done + 2)
            .then_some(())
    });
    for worker in &mut healthy {
        worker.signal("KILL");
        worker.reap();
    }
    stop_all(&mut hosts);

    // The workers' own records: every claim a token of its own.
    let workers: Vec<&Worker> = [&killed, &stalled].into_iter().chain(&healthy).collect();
    let claims: Vec<Claim> = workers.iter().flat_map(|w| w.entries("claimed")).collect();
    let completions: Vec<Claim> = workers
        .iter()
        .flat_map(|w| w.entries("completed"))
        .collect();
    let refusals: Vec<Claim> = workers.iter().flat_map(|w| w.entries("refused")).collect();
    let mut duplicates = 0;
    let mut claimed_tokens = BTreeSet::new();
    for claim in &claims {
        if !claimed_tokens.insert(claim.token) {
            eprintln!("DUPLICATE: token-{} claimed twice", claim.token);
            duplicates += 1;
        }
    }
    let writers: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    let found = verify(&db, &lines(&fired), &writers);
    acknowledged(&found, &completions);
    // The reclaimed runs ended as a later attempt, and the refused completion changed nothing.
    for (claim, redo) in [(&kill_claim, &kill_redone), (&stall_claim, &stall_redone)] {
        let run = &found.store_runs[&claim.run];
        assert_eq!(run.state().name(), StateName::Succeeded, "{run:?}");
        assert_eq!(
            run.attempt().to_string(),
            redo.attempt.to_string(),
            "{run:?}"
        );
    }
    for refused in &refusals {
        assert!(
            !found.succeeded_tokens.contains(&refused.token),
            "a refused completion counted: {refused:?}"
        );
    }

    eprintln!(
        "external workers on Postgres: 1 worker killed, 1 stalled; {} claims, {} completions, \
         {} refused; the killed \
         worker's run reclaimed {kill_reclaimed:?} after the kill, the stalled worker's \
         {stall_reclaimed:?} after the stop (lease TTL {LEASE_TTL:?} + grace {LEASE_GRACE:?}); \
         stalled for {stalled_for:?}; {} runs in the store ({} succeeded), {} fencing tokens; \
         {} duplicates, in {:?}",
        claims.len(),
        completions.len(),
        refusals.len(),
        found.runs,
        found.succeeded,
        found.tokens,
        duplicates + found.duplicates,
        began.elapsed()
    );
    assert_eq!(duplicates + found.duplicates, 0, "duplicates found (above)");
    // Not long after the worker went silent.
    for at in [kill_reclaimed, stall_reclaimed] {
        assert!(
            at <= LEASE_TTL + LEASE_GRACE + RECLAIM_BOUND,
            "reclaimed after {at:?}"
        );
    }
}

/// The worker: claims runs of its kinds over `$SERVER`, heartbeats (`touch` every second)
/// while it works, appends `KEY RUN ATTEMPT WORKER` to the shared log, then completes. Its own
/// log says `claimed|completed|refused RUN ATTEMPT TOKEN [EXIT OUTPUT]`; refused, it stops. With
/// a gate, its work is to wait for the test to create that file (so that the test kills or stops
/// it mid-run); a file, not a FIFO, which a stopped and continued opener could miss.
const WORKER_SH: &str = r#"
id=$1 gate=$2
shift 2
kinds=
for kind in "$@"; do kinds="$kinds --kind $kind"; done
log="$DIR/$id.log"
field() { printf '%s\n' "$attempt" | sed -n "s/.*\"$1\": *\"\{0,1\}\([a-z_-]*[0-9][0-9a-z_-]*\).*/\1/p" | head -n 1; }
while :; do
    attempt=$("$KEEL" --server "$SERVER" worker claim $kinds --worker "$id" 2>/dev/null)
    if [ $? -ne 0 ]; then sleep 0.1; continue; fi
    run=$(field run); run=${run#run-}
    n=$(field attempt)
    token=$(field token); token=${token#token-}
    key=$(field idempotency_key)
    echo "claimed $run $n $token" >> "$log"
    (
        while sleep 1; do
            "$KEEL" --server "$SERVER" worker touch "$run" --token "$token" >/dev/null 2>&1 || exit 0
        done
    ) &
    beat=$!
    if [ -n "$gate" ]; then
        until [ -e "$gate" ]; do sleep 0.1; done
        rm "$gate"
    fi
    kill $beat 2>/dev/null
    wait $beat 2>/dev/null
    echo "$key run-$run $n $id" >> "$FIRED"
    "$KEEL" --server "$SERVER" worker complete "$run" --token "$token" > "$DIR/$id.out" 2>&1
    code=$?
    if [ $code -eq 0 ]; then
        echo "completed $run $n $token" >> "$log"
    else
        echo "refused $run $n $token $code $(tr '\n' ' ' < "$DIR/$id.out")" >> "$log"
        exit 0 # the run is another attempt's now: drop the result and stop
    fi
done
"#;

/// One line of a worker's log.
#[derive(Clone, Debug)]
struct Claim {
    /// `run-N`.
    run: String,
    attempt: u32,
    token: u64,
    /// A refusal's exit code and what keel said.
    code: Option<i32>,
    said: String,
}

/// A worker process (`sh worker.sh`), the leader of a process group of its own.
struct Worker {
    id: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Worker {
    fn start(
        place: &Place,
        script: &Path,
        server: &str,
        id: &str,
        gate: Option<&Path>,
        kinds: &[&str],
    ) -> Worker {
        use std::os::unix::process::CommandExt;
        let gate = gate.map_or(String::new(), |g| g.display().to_string());
        let mut command = Command::new("sh");
        command
            .arg(script)
            .arg(id)
            .arg(gate)
            .args(kinds)
            .env("KEEL", env!("CARGO_BIN_EXE_keel"))
            .env("SERVER", server)
            .env("DIR", place.path(""))
            .env("FIRED", place.path(FIRED))
            .process_group(0);
        for name in [
            "KEEL_DATA_DIR",
            "KEEL_SERVER",
            "KEEL_TOKEN",
            "KEEL_TOKEN_FILE",
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        ] {
            command.env_remove(name);
        }
        Worker {
            id: id.to_string(),
            log: place.path(&format!("{id}.log")),
            child: Some(command.spawn().expect("sh runs")),
        }
    }

    /// Signals the whole group: the loop, its heartbeat, the keel command it runs.
    fn signal(&self, signal: &str) {
        let pgid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{pgid}"))
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} of {}", self.id);
    }

    /// Waits for the worker to exit (it must, within [`WAIT`]).
    #[track_caller]
    fn reap(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log's lines that start with `what`.
    fn entries(&self, what: &str) -> Vec<Claim> {
        lines(&self.log)
            .iter()
            .filter_map(|line| {
                let mut words = line.splitn(6, ' ');
                if words.next()? != what {
                    return None;
                }
                Some(Claim {
                    run: format!("run-{}", words.next()?),
                    attempt: words.next()?.parse().ok()?,
                    token: words.next()?.parse().ok()?,
                    code: words.next().and_then(|c| c.parse().ok()),
                    said: words.next().unwrap_or_default().to_string(),
                })
            })
            .collect()
    }

    #[track_caller]
    fn wait_for(&self, what: &str, count: usize, hosts: &[Host]) -> Vec<Claim> {
        wait_until(&format!("{count} {what} by {}", self.id), hosts, || {
            let found = self.entries(what);
            (found.len() >= count).then_some(found)
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// The daemon's line for the reclaim of `claim`'s lease.
fn reclaimed(claim: &Claim) -> String {
    format!("{}: lease token-{} reclaimed", claim.run, claim.token)
}

/// Waits for the reclaim of `claim`'s lease; how long after `since` the test saw it. The
/// daemon's line must come no sooner than the grace after the expiry it names (`lease token-T
/// held by W expired at TIME; reclaimed`, the lease as the last heartbeat left it).
#[track_caller]
fn reclaimed_after(host: &Host, claim: &Claim, since: Instant) -> Duration {
    host.daemon().wait_for(&[&reclaimed(claim)]);
    let seen = since.elapsed();
    let held = format!("lease token-{} held by", claim.token);
    let line = host.daemon().wait_for(&[&held, "expired at", "reclaimed"]);
    let expired = line
        .split("expired at ")
        .nth(1)
        .and_then(|rest| rest.split([';', ' ']).next())
        .unwrap_or_else(|| panic!("no expiry in {line:?}"));
    let expired = stamp(expired);
    let grace = i64::try_from(LEASE_GRACE.as_millis()).unwrap();
    assert!(
        stamp(&line) >= expired + grace,
        "reclaimed before the lease's grace ran out: {line:?}"
    );
    seen
}

/// The wall-clock stamp (milliseconds since the epoch) a daemon's log line starts with.
#[track_caller]
fn stamp(line: &str) -> i64 {
    let word = line.split(' ').next().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(word)
        .unwrap_or_else(|e| panic!("no time stamp in {line:?}: {e}"))
        .timestamp_millis()
}

/// Every completion a worker was told succeeded (`completions`) is the store's outcome of its
/// run (succeeded, that attempt), recorded in the audit as succeeded under its token, which
/// went to that attempt.
#[track_caller]
fn acknowledged(found: &Found, completions: &[Claim]) {
    for done in completions {
        let run = found
            .store_runs
            .get(&done.run)
            .unwrap_or_else(|| panic!("{done:?} acknowledged, but the store has no {}", done.run));
        assert_eq!(
            run.state().name(),
            StateName::Succeeded,
            "{done:?} acknowledged: {run:?}"
        );
        assert_eq!(
            run.attempt().to_string(),
            done.attempt.to_string(),
            "{done:?}: {run:?}"
        );
        assert!(
            found.succeeded_tokens.contains(&done.token),
            "{done:?} not in the audit as succeeded"
        );
        assert_eq!(
            found.token_owner.get(&done.token),
            Some(&(done.run.clone(), done.attempt.to_string())),
            "{done:?}"
        );
    }
}

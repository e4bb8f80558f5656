//! End-to-end tests of what runs do under a daemon: external workers and their leases,
//! webhook notifications, failure streaks and incidents, and each attempt's kept output
//! (`keel logs`).
//!
//! Shared helpers and how the tests synchronise (on output and exits, never on sleeps):
//! `common/mod.rs`.

use serde_json::Value;

mod common;

use common::*;

#[test]
fn an_external_worker_that_goes_silent_loses_its_lease_and_its_token_goes_stale() {
    let place = Place::new("lease");
    let config = place.config(
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
        .complete(&run, old, None)
        .expect_code(2)
        .expect_stderr(&format!("token-{old} is not the current lease"));

    let second = place.json(&["worker", "claim", "--kind", "render", "--worker", "w2"]);
    assert_eq!(second["run"].to_string(), run, "{second}");
    let new = second["token"].as_u64().expect("a token");
    assert!(new > old, "token-{new} after token-{old}");
    place.complete(&run, new, Some("rendered")).expect_code(0);
    daemon.wait_for(&[&format!("run-{run} of job render succeeded"), "rendered"]);
    // The old token stays refused.
    place
        .complete(&run, old, None)
        .expect_code(2)
        .expect_stderr("no active run");
    daemon.stop();

    // It succeeded once, under the second lease.
    daemon.expect_count(1, &[&format!("run-{run} of job render succeeded")]);
    let shown = place.json(&["runs", "show", &run, "--json"]);
    assert_eq!(shown["run"]["state"], "succeeded", "{shown}");
    assert_eq!(shown["run"]["summary"], "rendered", "{shown}");
    let audit = shown["audit"].as_array().expect("an audit trail");
    let successes: Vec<&Value> = audit.iter().filter(|r| r["to"] == "succeeded").collect();
    assert_eq!(successes.len(), 1, "{shown}");
    assert_eq!(successes[0]["token"], format!("token-{new}"), "{shown}");
    place.expect_incident("lease_reclaimed");
}

#[test]
fn webhook_deliveries_retry_a_503_once_and_drop_a_404() {
    let place = Place::new("webhook");
    let hook = Hook::start();
    hook.route("/flaky", &[503], 200);
    hook.route("/gone", &[], 404);
    let (flaky, gone) = (hook.url("/flaky"), hook.url("/gone"));
    let config = place.config(&format!(
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
    ));
    let mut daemon = place.daemon(&config);
    // The log names a webhook by scheme and host only (paths and queries hold secrets).
    let host = hook.url("/");
    daemon.wait_for(&["result delivery to", &host, "will retry (attempt 1)"]);
    let delivered = daemon.wait_for(&["result delivery to", &host, "success after 2 attempt(s)"]);
    let dropped = daemon.wait_for(&["result delivery to", &host, "permanent after 1 attempt(s)"]);
    assert!(!daemon.log().contains("/flaky") && !daemon.log().contains("/gone"));
    assert!(dropped.contains("404"), "{dropped}");
    daemon.stop();

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
    daemon.expect_count(1, &[&host, "success after"]);
    // One request for the 404, never retried.
    let requests = hook.received("/gone");
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].status, 404);
    assert_eq!(requests[0].body["job"], "gone-hook");
    // The 503's one retry is the only one: the 404 was never retried.
    daemon.expect_count(1, &["result delivery to", "will retry"]);
}

#[test]
fn a_delivery_pending_when_the_daemon_stops_is_sent_by_the_next_start() {
    let place = Place::new("pending");
    let hook = Hook::start();
    hook.route("/later", &[], 503);
    let url = hook.url("/later");
    let config = place.config(&format!(
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
    ));
    let mut first = place.daemon(&config);
    first.wait_for(&[
        "result delivery to",
        &hook.url("/"),
        "will retry (attempt 1)",
    ]);
    first.stop();
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
    second.stop();
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

/// SPEC O4: a job failing in a row shows it in `job ls` and raises one incident, which its
/// next success resolves.
#[test]
fn a_job_failing_in_a_row_shows_it_and_raises_an_incident_until_it_succeeds() {
    let place = Place::new("failing");
    let config = place.config(
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
    let config = place.config("[daemon]\ndelivery_backoff = \"100ms\"\n");
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
    daemon.stop();
    let posted = hook.received("/ops");
    assert!(posted.len() >= 2, "{posted:?}");
    assert!(
        posted
            .iter()
            .all(|r| r.body["state"] == "failed_dropped" || r.body["state"] == "failed"),
        "only failures are posted: {posted:?}"
    );
}

/// SPEC O7: each attempt's stdout and stderr are kept, successful or not, readable with
/// `keel logs RUN [--attempt N]`; the summary is the last line (or a `::keel summary` line).
#[test]
fn each_attempts_output_is_kept_and_readable_with_keel_logs() {
    let place = Place::new("logs");
    let config = place.config(
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
    let config = place.config(&format!(
        r#"
[[job]]
name = "report"
at = "+0s"
command = ["echo", "done"]
notify = ["ops={}", "audit={}"]
"#,
        hook.url("/ops"),
        hook.url("/audit")
    ));
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["result delivery to ops", "success"]);
    daemon.wait_for(&["result delivery to audit", "success"]);
    daemon.stop();
    assert!(!daemon.log().contains("/ops") && !daemon.log().contains("/audit"));
    assert_eq!(hook.received("/ops").len(), 1);
    assert_eq!(hook.received("/audit").len(), 1);
}

/// `keel logs --follow` prints what a running command writes as it comes, and returns once the
/// run ends.
#[test]
fn keel_logs_follow_prints_a_running_commands_output_until_the_run_ends() {
    let place = Place::new("follow");
    let config = place.config(
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
    daemon.stop();
}

/// SPEC A3: incidents are delivered to sinks through the outbox. A `failing_job` incident is
/// posted to the `[watchdog] notify` webhook when it opens, and again when it resolves; a
/// first answer of 503 is retried like any delivery.
#[test]
fn a_webhook_is_told_when_an_incident_opens_and_when_it_resolves() {
    let place = Place::new("incident-notify");
    let hook = Hook::start();
    hook.route("/incidents", &[503], 200);
    let url = hook.url("/incidents");
    let config = place.config(&format!(
        r#"
[daemon]
delivery_backoff = "100ms"

[watchdog]
failing_after = 1
notify = ["ops={url}"]

[[job]]
name = "health"
every = "1s"
cwd = "."
attempts = 1
command = ["sh", "-c", "test -e healthy"]
"#
    ));
    let mut daemon = place.daemon(&config);
    daemon.wait_for(&["incident #1 opened (failing_job)"]);
    daemon.wait_for(&["incident #1 notification delivery to ops success after 2 attempt(s)"]);
    std::fs::write(place.path("healthy"), "").unwrap();
    daemon.wait_for(&["incident #1 resolved (failing_job"]);
    daemon.wait_for_n(
        2,
        &["incident #1 notification delivery to ops success after"],
    );
    daemon.signal("TERM");
    daemon.wait_exit();

    let received = hook.received("/incidents");
    let delivered: Vec<&Received> = received.iter().filter(|r| r.status == 200).collect();
    let events: Vec<&str> = delivered
        .iter()
        .map(|r| r.body["incident"]["event"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(events, ["opened", "resolved"], "{received:?}");
    let opened = &delivered[0].body;
    assert_eq!(opened["sink"], "ops=".to_string() + &url, "{opened}");
    assert_eq!(opened["incident"]["id"], 1, "{opened}");
    assert_eq!(opened["incident"]["kind"], "failing_job", "{opened}");
    assert_eq!(opened["incident"]["job"], "health", "{opened}");
    assert!(
        opened["incident"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("1 runs failed in a row")),
        "{opened}"
    );
    assert!(opened.get("run").is_none(), "no run result keys: {opened}");
    // The retry of the 503 carried the same delivery id: a receiver can deduplicate.
    assert_eq!(received[0].status, 503);
    assert_eq!(received[0].idempotency_key, delivered[0].idempotency_key);
    let resolved = &delivered[1].body["incident"];
    assert!(
        resolved["details"]
            .as_str()
            .is_some_and(|d| d.contains("resolved:") && d.contains("succeeded")),
        "{resolved}"
    );
    assert_ne!(delivered[0].idempotency_key, delivered[1].idempotency_key);
}

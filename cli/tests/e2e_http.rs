//! The HTTP API against a real daemon: every resource, status code and role (docs/api.md).

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;

use common::{Place, WAIT};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

const OPERATOR: &str = "operator-secret-0123456789";
const WORKER: &str = "worker-secret-0123456789";
const VIEWER: &str = "viewer-secret-0123456789";

/// A config whose daemon serves the API on a free loopback port with three tokens, and short
/// leases.
fn place_with_tokens(name: &str) -> (Place, std::path::PathBuf) {
    let place = Place::new(name);
    let tokens = place.write(
        "tokens.toml",
        &format!(
            r#"
[[token]]
name = "ops"
role = "operator"
secret = "{OPERATOR}"

[[token]]
name = "render-fleet"
role = "worker"
kinds = ["render"]
secret = "{WORKER}"

[[token]]
name = "dashboard"
role = "viewer"
secret = "{VIEWER}"
"#
        ),
    );
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = place.config(
        r#"
[daemon]
lease_ttl = "5s"

[http]
listen = "127.0.0.1:0"
tokens = "tokens.toml"
"#,
    );
    (place, config)
}

struct Api {
    url: String,
    client: Client,
}

impl Api {
    fn new(url: String) -> Api {
        Api {
            url,
            client: Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    fn with(&self, builder: RequestBuilder, token: Option<&str>) -> Response {
        let builder = match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        };
        builder.send().expect("the daemon answers")
    }

    fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.with(self.client.get(format!("{}{path}", self.url)), token)
    }

    fn send(&self, method: &str, path: &str, token: Option<&str>, body: Value) -> Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let builder = self
            .client
            .request(method, format!("{}{path}", self.url))
            .body(body.to_string());
        self.with(builder, token)
    }

    fn post(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.send("POST", path, token, body)
    }
}

/// The status, and the body as JSON (`null` if empty).
#[track_caller]
fn answer(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

#[track_caller]
fn expect(response: Response, status: StatusCode) -> Value {
    let (got, body) = answer(response);
    assert_eq!(got, status, "{body}");
    body
}

#[track_caller]
fn expect_error(response: Response, status: StatusCode, words: &[&str]) -> Value {
    let body = expect(response, status);
    let message = body["error"]["message"].as_str().unwrap_or("").to_string();
    for word in words {
        assert!(message.contains(word), "{word:?} not in {body}");
    }
    body
}

#[test]
fn jobs_runs_and_the_worker_contract_answer_by_role() {
    let (place, config) = place_with_tokens("http-api");
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    daemon.wait_for(&["ready"]);

    // Probes need no token; everything else does.
    assert_eq!(api.get("/healthz", None).status(), StatusCode::OK);
    assert_eq!(api.get("/readyz", None).status(), StatusCode::OK);
    let refused = api.get("/api/v1/jobs", None);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    expect_error(refused, StatusCode::UNAUTHORIZED, &["Bearer"]);
    expect_error(
        api.get("/api/v1/jobs", Some("not-a-token-of-this-daemon")),
        StatusCode::UNAUTHORIZED,
        &["unknown token"],
    );
    assert_eq!(
        expect(api.get("/api/v1/jobs", Some(VIEWER)), StatusCode::OK),
        json!([])
    );
    expect_error(
        api.get("/api/v1/jobs", Some(WORKER)),
        StatusCode::FORBIDDEN,
        &["render-fleet", "viewer or operator"],
    );

    // Jobs: a keel.toml table as JSON. Only an operator may add one; bad bodies name the field.
    let render = json!({"name": "render", "cron": "0 0 0 1 1 *", "worker_kind": "render"});
    expect_error(
        api.post("/api/v1/jobs", Some(VIEWER), render.clone()),
        StatusCode::FORBIDDEN,
        &["operator"],
    );
    expect_error(
        api.post(
            "/api/v1/jobs",
            Some(OPERATOR),
            json!({"name": "x", "every": 5}),
        ),
        StatusCode::BAD_REQUEST,
        &["every", "invalid type"],
    );
    expect_error(
        api.post("/api/v1/jobs", Some(OPERATOR), json!({"every": "5s"})),
        StatusCode::BAD_REQUEST,
        &["name"],
    );
    expect_error(
        api.post(
            "/api/v1/jobs",
            Some(OPERATOR),
            json!({"name": "x", "cron": "nope"}),
        ),
        StatusCode::BAD_REQUEST,
        &["job x", "nope"],
    );
    let added = expect(
        api.post("/api/v1/jobs", Some(OPERATOR), render.clone()),
        StatusCode::CREATED,
    );
    assert_eq!(added["job"]["name"], "render", "{added}");
    assert_eq!(added["action"], "added", "{added}");
    expect_error(
        api.post("/api/v1/jobs", Some(OPERATOR), render),
        StatusCode::BAD_REQUEST,
        &["already exists", "PUT /api/v1/jobs/render"],
    );
    daemon.wait_for(&["job render: added by token \"ops\" over HTTP"]);
    let shown = expect(api.get("/api/v1/jobs/render", Some(VIEWER)), StatusCode::OK);
    assert_eq!(shown["job"]["kind"], "render", "{shown}");
    expect_error(
        api.get("/api/v1/jobs/nope", Some(VIEWER)),
        StatusCode::NOT_FOUND,
        &["no job named nope"],
    );
    let paused = expect(
        api.post("/api/v1/jobs/render/pause", Some(OPERATOR), Value::Null),
        StatusCode::OK,
    );
    assert_eq!(paused["changed"], true, "{paused}");
    assert_eq!(paused["job"]["state"], "paused", "{paused}");
    let again = expect(
        api.post("/api/v1/jobs/render/pause", Some(OPERATOR), Value::Null),
        StatusCode::OK,
    );
    assert_eq!(again["changed"], false, "{again}");
    expect(
        api.post("/api/v1/jobs/render/resume", Some(OPERATOR), Value::Null),
        StatusCode::OK,
    );
    let triggered = expect(
        api.post("/api/v1/jobs/render/trigger", Some(OPERATOR), Value::Null),
        StatusCode::CREATED,
    );
    assert_eq!(triggered["state"], "queued", "{triggered}");
    let run = triggered["run"].as_str().expect("run-N").to_string();

    // The worker contract, limited to the token's kinds; 204 when nothing is due.
    expect_error(
        api.post(
            "/api/v1/claims",
            Some(WORKER),
            json!({"worker": "w1", "kinds": ["mail"]}),
        ),
        StatusCode::FORBIDDEN,
        &["\"mail\""],
    );
    expect_error(
        api.post(
            "/api/v1/claims",
            Some(OPERATOR),
            json!({"worker": "w1", "kinds": ["render"]}),
        ),
        StatusCode::FORBIDDEN,
        &["worker role"],
    );
    let claimed = expect(
        api.post(
            "/api/v1/claims",
            Some(WORKER),
            json!({"worker": "w1", "kinds": ["render"]}),
        ),
        StatusCode::OK,
    );
    assert_eq!(format!("run-{}", claimed["run"]), run, "{claimed}");
    let token = claimed["token"].as_u64().expect("a token");
    expect(
        api.post(
            "/api/v1/claims",
            Some(WORKER),
            json!({"worker": "w1", "kinds": ["render"]}),
        ),
        StatusCode::NO_CONTENT,
    );
    let path = |call: &str| format!("/api/v1/runs/{run}/{call}");
    let touched = expect(
        api.post(&path("heartbeat"), Some(WORKER), json!({"token": token})),
        StatusCode::OK,
    );
    assert_eq!(touched["token"], format!("token-{token}"), "{touched}");
    // A stale token changes nothing and names the current lease.
    expect_error(
        api.post(
            &path("heartbeat"),
            Some(WORKER),
            json!({"token": token + 7}),
        ),
        StatusCode::CONFLICT,
        &[&format!("the current lease is token-{token}")],
    );
    expect_error(
        api.post(&path("progress"), Some(WORKER), json!({"tokn": token})),
        StatusCode::BAD_REQUEST,
        &["tokn"],
    );
    expect(
        api.post(
            &path("progress"),
            Some(WORKER),
            json!({"token": format!("token-{token}"), "phase": "building_artifact", "message": "half"}),
        ),
        StatusCode::OK,
    );
    let context = expect(
        api.post(&path("context"), Some(WORKER), json!({"token": token})),
        StatusCode::OK,
    );
    assert_eq!(
        context["progress"]["phase"], "building_artifact",
        "{context}"
    );
    let saved = expect(
        api.post(
            &path("checkpoint"),
            Some(WORKER),
            json!({"token": token, "data": "page 3"}),
        ),
        StatusCode::OK,
    );
    assert!(saved["checkpoint"].is_string(), "{saved}");
    expect(
        api.post(
            &path("complete"),
            Some(WORKER),
            json!({"token": token, "summary": "rendered"}),
        ),
        StatusCode::OK,
    );
    daemon.wait_for(&[&format!("{run} of job render succeeded")]);

    // Runs, with filters and the audit trail.
    let runs = expect(
        api.get("/api/v1/runs?job=render&state=succeeded", Some(VIEWER)),
        StatusCode::OK,
    );
    assert_eq!(runs["runs"][0]["run"], run.as_str(), "{runs}");
    assert_eq!(runs["runs"][0]["summary"], "rendered", "{runs}");
    expect_error(
        api.get("/api/v1/runs?state=bogus", Some(VIEWER)),
        StatusCode::BAD_REQUEST,
        &["state", "bogus"],
    );
    expect_error(
        api.get("/api/v1/runs?limit=abc", Some(VIEWER)),
        StatusCode::BAD_REQUEST,
        &["limit"],
    );
    expect_error(
        api.get("/api/v1/incidents?open=yes", Some(VIEWER)),
        StatusCode::BAD_REQUEST,
        &["malformed query"],
    );
    let wrong = expect(
        api.send("DELETE", "/api/v1/status", Some(OPERATOR), Value::Null),
        StatusCode::METHOD_NOT_ALLOWED,
    );
    assert_eq!(wrong["error"]["code"], "method_not_allowed", "{wrong}");
    // Too large: 413, unless the server's answer and close beat the client's last bytes, which
    // the client sees as a reset connection. Either way the daemon goes on answering.
    let big = json!({"token": token, "data": "x".repeat(5 * 1024 * 1024)});
    // Its own client: a connection the server closes must not go back to the shared pool.
    let sent = Client::builder()
        .timeout(WAIT)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .post(format!("{}{}", api.url, path("checkpoint")))
        .bearer_auth(WORKER)
        .body(big.to_string())
        .send();
    if let Ok(response) = sent {
        let too_large = expect(response, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(too_large["error"]["code"], "too_large", "{too_large}");
    }
    assert_eq!(api.get("/healthz", None).status(), StatusCode::OK);
    let shown = expect(
        api.get(&format!("/api/v1/runs/{run}"), Some(VIEWER)),
        StatusCode::OK,
    );
    let states: Vec<&str> = shown["audit"]
        .as_array()
        .expect("an audit trail")
        .iter()
        .map(|r| r["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["queued", "starting", "running", "succeeded"],
        "{shown}"
    );
    expect_error(
        api.get("/api/v1/runs/run-999", Some(VIEWER)),
        StatusCode::NOT_FOUND,
        &["run-999"],
    );
    expect_error(
        api.post(&path("complete"), Some(WORKER), json!({"token": token})),
        StatusCode::NOT_FOUND,
        &["no active run"],
    );
    expect_error(
        api.post(&path("cancel"), Some(VIEWER), Value::Null),
        StatusCode::FORBIDDEN,
        &["operator"],
    );
    expect_error(
        api.post("/api/v1/runs/run-999/cancel", Some(OPERATOR), Value::Null),
        StatusCode::NOT_FOUND,
        &["run-999"],
    );

    // Queue, incidents, status and metrics.
    let queue = expect(api.get("/api/v1/queue", Some(VIEWER)), StatusCode::OK);
    assert!(queue["kinds"].is_array(), "{queue}");
    assert!(expect(api.get("/api/v1/incidents", Some(VIEWER)), StatusCode::OK).is_array());
    let status = expect(api.get("/api/v1/status", Some(VIEWER)), StatusCode::OK);
    assert_eq!(status["pid"], daemon.pid(), "{status}");
    let metrics = api.get("/metrics", Some(VIEWER)).text().unwrap();
    assert!(metrics.contains("keel_lease_grants_total"), "{metrics}");
    assert_eq!(api.get("/metrics", None).status(), StatusCode::UNAUTHORIZED);

    // Replace and delete.
    let replaced = expect(
        api.send(
            "PUT",
            "/api/v1/jobs/render",
            Some(OPERATOR),
            json!({"cron": "0 0 0 2 1 *", "worker_kind": "render"}),
        ),
        StatusCode::OK,
    );
    assert_eq!(replaced["action"], "replaced", "{replaced}");
    expect_error(
        api.send(
            "PUT",
            "/api/v1/jobs/render",
            Some(OPERATOR),
            json!({"name": "other", "every": "1h", "worker_kind": "render"}),
        ),
        StatusCode::BAD_REQUEST,
        &["name", "other"],
    );
    expect(
        api.send("DELETE", "/api/v1/jobs/render", Some(OPERATOR), Value::Null),
        StatusCode::NO_CONTENT,
    );
    let created = expect(
        api.send(
            "PUT",
            "/api/v1/jobs/fresh",
            Some(OPERATOR),
            json!({"every": "1h", "worker_kind": "render"}),
        ),
        StatusCode::CREATED,
    );
    assert_eq!(created["action"], "added", "{created}");
    expect(
        api.get("/api/v1/jobs/render", Some(VIEWER)),
        StatusCode::NOT_FOUND,
    );

    // The socket protocol over HTTP checks roles per request.
    expect_error(
        api.post(
            "/api/v1/rpc",
            Some(VIEWER),
            json!({"request": "pause_job", "job": "x"}),
        ),
        StatusCode::FORBIDDEN,
        &["operator"],
    );
    let jobs = expect(
        api.post("/api/v1/rpc", Some(VIEWER), json!({"request": "jobs"})),
        StatusCode::OK,
    );
    assert_eq!(jobs["ok"][0]["spec"]["id"], "fresh", "{jobs}");
    expect_error(
        api.get("/api/v1/nothing-here", Some(VIEWER)),
        StatusCode::NOT_FOUND,
        &["openapi.json"],
    );
    daemon.stop();
}

#[test]
fn operators_open_acknowledge_and_resolve_incidents_and_read_rules_and_workers() {
    let (place, config) = place_with_tokens("http-watch");
    // The design's thresholds: three empty claims make an idle claim loop.
    let config_text =
        std::fs::read_to_string(&config).unwrap() + "\n[watchdog]\nprofile = \"design\"\n";
    std::fs::write(&config, config_text).unwrap();
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    daemon.wait_for(&["ready"]);

    let rules = expect(api.get("/api/v1/rules", Some(VIEWER)), StatusCode::OK);
    let names: Vec<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "lease_expired",
            "queue_stuck",
            "claim_loop_idle",
            "artifact_gate",
            "job_failing"
        ]
    );
    assert!(
        rules[2]["threshold"].as_str().unwrap().contains('3'),
        "{rules}"
    );
    assert_eq!(rules[0]["incident_kinds"][0], "lease_reclaimed", "{rules}");

    // A worker that claims a kind nobody queues, while render work waits.
    expect(
        api.post(
            "/api/v1/jobs",
            Some(OPERATOR),
            json!({"name": "render", "every": "1h", "worker_kind": "render"}),
        ),
        StatusCode::CREATED,
    );
    expect(
        api.post("/api/v1/jobs/render/trigger", Some(OPERATOR), Value::Null),
        StatusCode::CREATED,
    );
    expect(
        api.post(
            "/api/v1/claims",
            Some(WORKER),
            json!({"worker": "w1", "kinds": ["render"]}),
        ),
        StatusCode::OK,
    );
    let workers = expect(api.get("/api/v1/workers", Some(VIEWER)), StatusCode::OK);
    assert_eq!(workers[0]["worker"], "w1", "{workers}");
    assert_eq!(workers[0]["kind"], "render", "{workers}");
    assert_eq!(workers[0]["claims"], 1, "{workers}");
    assert!(workers[0]["score"].as_u64().is_some(), "{workers}");
    expect(
        api.get("/api/v1/workers", Some(WORKER)),
        StatusCode::FORBIDDEN,
    );

    // By hand: open, acknowledge, resolve; each only by an operator.
    let body = json!({"job": "render", "details": "renders look wrong on host b"});
    expect_error(
        api.post("/api/v1/incidents", Some(VIEWER), body.clone()),
        StatusCode::FORBIDDEN,
        &["operator"],
    );
    expect_error(
        api.post(
            "/api/v1/incidents",
            Some(OPERATOR),
            json!({"job": "render"}),
        ),
        StatusCode::BAD_REQUEST,
        &["details"],
    );
    let opened = expect(
        api.post("/api/v1/incidents", Some(OPERATOR), body),
        StatusCode::CREATED,
    );
    assert_eq!(opened["kind"], "operator", "{opened}");
    assert_eq!(opened["opened_by"], "ops", "{opened}");
    let id = opened["id"].as_u64().unwrap();
    daemon.wait_for(&[&format!("incident #{id} opened (operator) by ops")]);
    let acked = expect(
        api.post(
            &format!("/api/v1/incidents/{id}/acknowledge"),
            Some(OPERATOR),
            json!({"reason": "looking"}),
        ),
        StatusCode::OK,
    );
    assert_eq!(acked["acknowledged_by"], "ops", "{acked}");
    assert!(acked["acknowledged_at"].is_string(), "{acked}");
    expect_error(
        api.post(
            &format!("/api/v1/incidents/{id}/resolve"),
            Some(OPERATOR),
            json!({}),
        ),
        StatusCode::BAD_REQUEST,
        &["reason"],
    );
    let resolved = expect(
        api.post(
            &format!("/api/v1/incidents/{id}/resolve"),
            Some(OPERATOR),
            json!({"reason": "host b rebuilt"}),
        ),
        StatusCode::OK,
    );
    assert_eq!(resolved["open"], false, "{resolved}");
    assert_eq!(resolved["resolved_by"], "ops", "{resolved}");
    expect_error(
        api.post(
            &format!("/api/v1/incidents/{id}/resolve"),
            Some(OPERATOR),
            json!({"reason": "again"}),
        ),
        StatusCode::NOT_FOUND,
        &[&format!("#{id}")],
    );
    expect_error(
        api.post("/api/v1/incidents/x/acknowledge", Some(OPERATOR), json!({})),
        StatusCode::BAD_REQUEST,
        &["invalid incident"],
    );
    // The run's audit trail names the operator's action on the job's incident.
    let history = place.json(&["job", "history", "render", "--json"]);
    assert!(history.to_string().contains("host b rebuilt"), "{history}");
    daemon.stop();
}

/// The reference design's acceptance (docs/api.md, "Acceptance"): one stale lease, one no-job
/// claim loop and one artifact-gate failure, each detected with evidence the API returns.
#[test]
fn acceptance_a_stale_lease_an_idle_claim_loop_and_an_artifact_gate_failure_with_evidence() {
    let place = Place::new("http-acceptance");
    let hook = common::Hook::start();
    hook.route("/report-ok.pdf", &[], 200);
    // The design's profile, with its one-minute grace shortened so the test is quick.
    let config = place.config(&format!(
        "[daemon]\nlease_ttl = \"3s\"\n\n[watchdog]\nprofile = \"design\"\nlease_grace = \"1s\"\n\n\
         [http]\nlisten = \"127.0.0.1:0\"\n{}",
        common::ACCEPTANCE_JOBS
    ));
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    daemon.wait_for(&["ready"]);
    let trigger = |job: &str| {
        let run = expect(
            api.post(&format!("/api/v1/jobs/{job}/trigger"), None, Value::Null),
            StatusCode::CREATED,
        );
        run["run"].as_str().unwrap().to_string()
    };
    let claim = |worker: &str, kind: &str| {
        api.post(
            "/api/v1/claims",
            None,
            json!({"worker": worker, "kinds": [kind]}),
        )
    };
    let incident = |kind: &str| -> Value {
        let all = expect(api.get("/api/v1/incidents", None), StatusCode::OK);
        all.as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} incident in {all}"))
    };

    // 1. A stale lease: claimed, then silent past its expiry and the grace.
    let render = trigger("render");
    let stale = expect(claim("w-stale", "render"), StatusCode::OK);
    let stale_token = stale["token"].as_u64().unwrap();
    daemon.wait_for(&["incident", "opened (lease_reclaimed)"]);
    let reclaimed = incident("lease_reclaimed");
    assert_eq!(reclaimed["run"], render.as_str(), "{reclaimed}");
    assert_eq!(reclaimed["worker"], "w-stale", "{reclaimed}");
    assert!(
        reclaimed["details"]
            .as_str()
            .unwrap()
            .contains(&format!("token-{stale_token}")),
        "{reclaimed}"
    );
    let trail = expect(
        api.get(&format!("/api/v1/runs/{render}"), None),
        StatusCode::OK,
    );
    assert!(
        trail["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "watchdog" && r["from"] == "running"),
        "the reclaim is audited: {trail}"
    );
    // The stale holder is refused; the run is claimable again, under a newer token.
    expect_error(
        api.post(
            &format!("/api/v1/runs/{render}/heartbeat"),
            None,
            json!({"token": stale_token}),
        ),
        StatusCode::CONFLICT,
        &[&format!("token-{stale_token}")],
    );
    let again = expect(claim("w-fresh", "render"), StatusCode::OK);
    assert!(again["token"].as_u64().unwrap() > stale_token, "{again}");
    // The silent worker was last seen when it claimed, not when its lease was reclaimed.
    let workers = expect(api.get("/api/v1/workers", None), StatusCode::OK);
    let silent = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker"] == "w-stale")
        .cloned()
        .unwrap_or_else(|| panic!("{workers}"));
    assert_eq!(silent["lease_losses"], 1, "{silent}");
    assert!(
        silent["last_seen_ms"].as_i64().unwrap() < reclaimed["opened_at_ms"].as_i64().unwrap(),
        "{silent} {reclaimed}"
    );

    // 2. A no-job claim loop: three empty claims of a kind nobody queues, while report waits.
    trigger("report");
    for _ in 0..3 {
        expect(claim("w-idle", "gpu"), StatusCode::NO_CONTENT);
    }
    daemon.wait_for(&["incident", "opened (idle_claim_loop)"]);
    let idle = incident("idle_claim_loop");
    assert_eq!(idle["worker"], "w-idle", "{idle}");
    let details = idle["details"].as_str().unwrap();
    assert!(
        details.contains("3 empty claims") && details.contains("\"report\": 1"),
        "the backlog's shape: {idle}"
    );
    let workers = expect(api.get("/api/v1/workers", None), StatusCode::OK);
    assert!(
        workers
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["worker"] == "w-idle" && w["idle_loops"] == 1),
        "{workers}"
    );

    // 3. An artifact-gate failure: the report URL answers 404.
    let publish = trigger("publish");
    let holder = expect(claim("w-pub", "publish"), StatusCode::OK);
    let token = holder["token"].as_u64().unwrap();
    let missing = hook.url("/report.pdf");
    let refused = expect_error(
        api.post(
            &format!("/api/v1/runs/{publish}/complete"),
            None,
            json!({"token": token, "summary": "published", "artifacts": {"report": missing}}),
        ),
        StatusCode::UNPROCESSABLE_ENTITY,
        &["report", "404"],
    );
    assert_eq!(refused["error"]["code"], "artifact_gate", "{refused}");
    daemon.wait_for(&["incident", "opened (artifact_gate)"]);
    let gate = incident("artifact_gate");
    assert_eq!(gate["run"], publish.as_str(), "{gate}");
    let shown = expect(
        api.get(&format!("/api/v1/runs/{publish}"), None),
        StatusCode::OK,
    );
    assert_eq!(
        shown["run"]["state"], "running",
        "the run stays with its holder: {shown}"
    );
    let evidence = &shown["run"]["verifications"][0];
    assert_eq!(evidence["target"], missing.as_str(), "{shown}");
    assert_eq!(evidence["ok"], false, "{shown}");
    assert_eq!(evidence["status"], 404, "{shown}");
    assert!(
        evidence["excerpt"]
            .as_str()
            .unwrap()
            .contains("no such hook"),
        "a bounded excerpt of the answer: {shown}"
    );
    // The worker fixes the artifact: verified first, then the completion passes the gate.
    let fixed = hook.url("/report-ok.pdf");
    let verified = expect(
        api.post(
            &format!("/api/v1/runs/{publish}/verifications"),
            None,
            json!({"token": token, "target": fixed}),
        ),
        StatusCode::CREATED,
    );
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["status"], 200, "{verified}");
    expect(
        api.post(
            &format!("/api/v1/runs/{publish}/complete"),
            None,
            json!({"token": token, "summary": "published", "artifacts": {"report": fixed}}),
        ),
        StatusCode::OK,
    );
    daemon.wait_for(&[&format!("{publish} of job publish succeeded")]);
    daemon.stop();
}

#[test]
fn operators_release_and_restore_a_lease_and_the_old_token_stays_stale() {
    let place = Place::new("http-lease");
    let config = place.config(
        r#"
[http]
listen = "127.0.0.1:0"

[[job]]
name = "render"
cron = "0 0 0 1 1 *"
worker_kind = "render"
"#,
    );
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    daemon.wait_for(&["ready"]);
    let run = expect(
        api.post("/api/v1/jobs/render/trigger", None, Value::Null),
        StatusCode::CREATED,
    )["run"]
        .as_str()
        .unwrap()
        .to_string();
    let claimed = expect(
        api.post(
            "/api/v1/claims",
            None,
            json!({"worker": "w1", "kinds": ["render"]}),
        ),
        StatusCode::OK,
    );
    let first = claimed["token"].as_u64().unwrap();
    let lease = format!("/api/v1/runs/{run}/lease");
    expect_error(
        api.send("PATCH", &lease, None, json!({"action": "release"})),
        StatusCode::BAD_REQUEST,
        &["reason"],
    );
    expect_error(
        api.send(
            "PATCH",
            &lease,
            None,
            json!({"action": "evict", "reason": "x"}),
        ),
        StatusCode::BAD_REQUEST,
        &["action"],
    );
    let released = expect(
        api.send(
            "PATCH",
            &lease,
            None,
            json!({"action": "release", "reason": "host draining"}),
        ),
        StatusCode::OK,
    );
    assert_eq!(released["action"], "released", "{released}");
    assert_eq!(released["previous_owner"], "w1", "{released}");
    expect_error(
        api.post(
            &format!("/api/v1/runs/{run}/heartbeat"),
            None,
            json!({"token": first}),
        ),
        StatusCode::CONFLICT,
        &[&format!("token-{first}")],
    );
    let restored = expect(
        api.send(
            "PATCH",
            &lease,
            None,
            json!({"action": "restore", "reason": "drain cancelled"}),
        ),
        StatusCode::OK,
    );
    assert_eq!(restored["owner"], "w1", "{restored}");
    let token: u64 = restored["token"]
        .as_str()
        .unwrap()
        .trim_start_matches("token-")
        .parse()
        .unwrap();
    assert!(token > first, "a new token, never the old one: {restored}");
    expect(
        api.post(
            &format!("/api/v1/runs/{run}/heartbeat"),
            None,
            json!({"token": token}),
        ),
        StatusCode::OK,
    );
    expect_error(
        api.post(
            &format!("/api/v1/runs/{run}/heartbeat"),
            None,
            json!({"token": first}),
        ),
        StatusCode::CONFLICT,
        &[],
    );
    // Nothing to restore twice.
    expect_error(
        api.send(
            "PATCH",
            &lease,
            None,
            json!({"action": "restore", "reason": "again"}),
        ),
        StatusCode::BAD_REQUEST,
        &[],
    );
    let trail = expect(
        api.get(&format!("/api/v1/runs/{run}"), None),
        StatusCode::OK,
    );
    let reasons: Vec<&str> = trail["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("host draining"))
            && reasons.iter().any(|r| r.contains("drain cancelled")),
        "{reasons:?}"
    );
    daemon.stop();
}

#[test]
fn every_path_of_the_openapi_document_is_served() {
    let place = Place::new("http-openapi");
    let config = place.config("[http]\nlisten = \"127.0.0.1:0\"\n");
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    let doc = expect(api.get("/api/v1/openapi.json", None), StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 20, "{} paths", paths.len());
    for (path, methods) in paths {
        for method in methods.as_object().expect("methods").keys() {
            if method == "parameters" {
                continue;
            }
            let concrete = path
                .replace("{name}", "nope")
                .replace("{run}", "run-999")
                .replace("{id}", "999");
            let url = concrete.clone();
            // The event stream never ends: its headers are enough.
            let response = if concrete.ends_with("/events") {
                api.get(&url, None)
            } else {
                api.send(&method.to_uppercase(), &url, None, json!({}))
            };
            let status = response.status();
            if concrete.ends_with("/events") {
                assert_eq!(status, StatusCode::OK, "{method} {path}");
                continue;
            }
            let (_, body) = answer(response);
            let fallback = body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no such resource"));
            assert!(
                !fallback && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not served: {status} {body}"
            );
        }
    }
    daemon.stop();
}

/// Every documented operation, with every role: no token 401, a role that may not 403, a role
/// that may neither (whatever the handler then answers). The roles are the document's
/// `x-keel-role`, so the document and the server cannot disagree on who may do what.
#[test]
fn every_operation_answers_each_role_as_the_document_says() {
    let (place, config) = place_with_tokens("http-roles");
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    daemon.wait_for(&["ready"]);
    let doc = expect(api.get("/api/v1/openapi.json", None), StatusCode::OK);
    let tokens = [
        ("viewer", VIEWER),
        ("worker", WORKER),
        ("operator", OPERATOR),
    ];
    let mut checked = 0;
    for (path, methods) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{name}", "nope")
            .replace("{run}", "run-999")
            .replace("{id}", "999");
        for (method, operation) in methods.as_object().unwrap() {
            if method == "parameters" || concrete.ends_with("/events") {
                continue;
            }
            let role = operation["x-keel-role"].as_str().unwrap();
            let send = |token: Option<&str>| {
                answer(api.send(&method.to_uppercase(), &concrete, token, json!({})))
            };
            let (status, body) = send(None);
            if role == "none" {
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
                continue;
            }
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
            if role == "any" {
                continue;
            }
            for (name, secret) in tokens {
                let allowed = name == role || (role == "viewer" && name == "operator");
                let (status, body) = send(Some(secret));
                if allowed {
                    assert!(
                        status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
                        "{name} may {method} {path}: {status} {body}"
                    );
                } else {
                    assert_eq!(
                        status,
                        StatusCode::FORBIDDEN,
                        "{name} {method} {path}: {body}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 3 * 25, "{checked} checks");
    daemon.stop();
}

#[test]
fn the_event_stream_carries_state_changes_as_they_happen() {
    let place = Place::new("http-events");
    let config = place.config("[http]\nlisten = \"127.0.0.1:0\"\n");
    let mut daemon = place.daemon(&config);
    let api = Api::new(daemon.http_url());
    daemon.wait_for(&["ready"]);
    let stream = api.get("/api/v1/events", None);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut lines = BufReader::new(stream).lines();
    expect(
        api.post(
            "/api/v1/jobs",
            None,
            json!({"name": "hello", "at": "+0s", "command": ["true"]}),
        ),
        StatusCode::CREATED,
    );
    // `event: NAME` then `data: JSON`; keep-alive comments in between are skipped.
    let mut seen = Vec::new();
    let finished = loop {
        let line = lines
            .next()
            .expect("the stream stays open")
            .expect("a line");
        if let Some(data) = line.strip_prefix("data: ") {
            let data: Value = serde_json::from_str(data).unwrap();
            if data["line"]
                .as_str()
                .is_some_and(|l| l.contains("of job hello succeeded"))
            {
                break data;
            }
        }
        if let Some(name) = line.strip_prefix("event: ") {
            seen.push(name.to_string());
        }
    };
    assert!(seen.contains(&"lease_granted".to_string()), "{seen:?}");
    assert_eq!(
        seen.first().map(String::as_str),
        Some("job_changed"),
        "{seen:?}"
    );
    assert_eq!(finished["job"], "hello", "{finished}");
    assert_eq!(finished["state"], "succeeded", "{finished}");
    daemon.stop();
}

#[test]
fn a_public_listener_needs_a_tokens_file_that_only_its_owner_reads() {
    let place = Place::new("http-public");
    let config = place.config("[http]\nlisten = \"0.0.0.0:0\"\n");
    place
        .keel(&["run", "--config", config.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("not a loopback address");
    place
        .keel(&["run", "--http", "0.0.0.0:0"])
        .expect_code(2)
        .expect_stderr("not a loopback address");
    place.write(
        "tokens.toml",
        "[[token]]\nname = \"a\"\nrole = \"viewer\"\nsecret = \"0123456789abcdef\"\n",
    );
    std::fs::set_permissions(
        place.path("tokens.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = place.config("[http]\nlisten = \"0.0.0.0:0\"\ntokens = \"tokens.toml\"\n");
    place
        .keel(&["run", "--config", config.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("chmod 600");
}

#[test]
fn the_cli_acts_on_a_remote_daemon_with_server_and_a_token() {
    let (place, config) = place_with_tokens("http-cli");
    let mut daemon = place.daemon(&config);
    let url = daemon.http_url();
    daemon.wait_for(&["ready"]);
    // Another place: no data directory of its own is used.
    let elsewhere = Place::new("http-cli-elsewhere");
    let keel = |token: Option<&str>, args: &[&str]| {
        let mut command = elsewhere.command(args);
        command.env("KEEL_SERVER", &url).env_remove("KEEL_TOKEN");
        if let Some(token) = token {
            command.env("KEEL_TOKEN", token);
        }
        common::Done(command.output().expect("keel runs"))
    };
    keel(None, &["job", "ls"])
        .expect_code(2)
        .expect_stderr("KEEL_TOKEN");
    keel(
        Some(OPERATOR),
        &[
            "job",
            "add",
            "render",
            "--every",
            "1h",
            "--worker-kind",
            "render",
        ],
    )
    .expect_code(0);
    keel(
        Some(OPERATOR),
        &[
            "job",
            "add",
            "hello",
            "--at",
            "+0s",
            "--",
            "echo",
            "from afar",
        ],
    )
    .expect_code(0);
    daemon.wait_for(&["of job hello succeeded"]);
    keel(Some(OPERATOR), &["job", "trigger", "render"]).expect_code(0);
    keel(Some(VIEWER), &["job", "pause", "render"])
        .expect_code(2)
        .expect_stderr("operator");
    let claimed = keel(
        Some(WORKER),
        &["worker", "claim", "--worker", "far", "--kind", "render"],
    );
    claimed.expect_code(0);
    let claimed: Value = serde_json::from_str(&claimed.stdout()).unwrap();
    let run = claimed["run"].to_string();
    let token = claimed["token"].to_string();
    keel(
        Some(WORKER),
        &[
            "worker",
            "complete",
            &run,
            "--token",
            &token,
            "--summary",
            "far away",
        ],
    )
    .expect_code(0);
    daemon.wait_for(&[&format!("run-{run} of job render succeeded"), "far away"]);
    let runs = keel(Some(VIEWER), &["runs", "--json"]);
    runs.expect_code(0);
    let runs: Value = serde_json::from_str(&runs.stdout()).unwrap();
    assert_eq!(runs.as_array().map(Vec::len), Some(2), "{runs}");
    // The hello run's output, read on the daemon's host.
    let hello = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["job"] == "hello")
        .expect("hello's run");
    keel(Some(VIEWER), &["logs", hello["run"].as_str().unwrap()])
        .expect_code(0)
        .expect_stdout("from afar");
    // `keel status` through --server: the daemon there answers; fs has no leader.
    let status = keel(Some(VIEWER), &["status", "--json"]);
    status.expect_code(0);
    let status: Value = serde_json::from_str(&status.stdout()).unwrap();
    assert_eq!(
        (status["daemon"].as_str(), status["via"].as_str()),
        (Some("running"), Some("server")),
        "{status}"
    );
    assert_eq!(status["pid"], daemon.pid(), "{status}");
    assert_eq!(status["leader"], Value::Null, "{status}");
    keel(Some(OPERATOR), &["run"])
        .expect_code(2)
        .expect_stderr("--server");
    assert!(
        !elsewhere.data().exists(),
        "no local data directory is made"
    );
    daemon.stop();
}

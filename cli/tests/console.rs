//! The console in a real headless browser (issue 14, "Tests"; SPEC A4): a real daemon with its
//! HTTP API on a free port, a job for external workers whose worker claims and goes silent (a
//! `lease_reclaimed` incident), and Debian's Chromium driven over WebDriver by
//! `/usr/bin/chromedriver`. The page must show the job and the incident, open the incident's
//! run with its audit trail, and pausing the job with its button must show it paused on the
//! page and in the API.
//!
//! WebDriver is JSON over HTTP, and this test needs eight of its commands; they are sent with
//! the blocking reqwest client the CLI already depends on, so the test stays synchronous like
//! the other end-to-end tests and brings no async runtime or second HTTP stack (a WebDriver
//! crate such as fantoccini would bring both, for the same eight calls).
//!
//! A second test gives the daemon a tokens file: the page must ask for the token and then
//! follow the event stream with it.
//!
//! Screenshots at 1280 px and at a phone's 390 px go to `<target>/console-screenshots/`.
//! Without chromedriver the tests fail, saying how to install it (`.ci/run` does);
//! `KEEL_SKIP_BROWSER=1` skips them, loudly.

mod common;
#[path = "../../store-postgres/tests/common/mod.rs"]
mod pg;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Place, WAIT};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long [`Session::click_until`] waits for a click's effect before it clicks again.
const CLICK_AGAIN: Duration = Duration::from_secs(5);
const CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn the_console_shows_a_job_and_its_incident_and_pauses_the_job() {
    if !browser_wanted() {
        return;
    }
    let started = Instant::now();
    let place = Place::new("console");
    // A lease of 1 s reclaimed at once: the silent worker's incident comes within a second.
    let config = place.config(
        r#"
[daemon]
lease_ttl = "1s"
lease_grace = "0s"

[http]
listen = "127.0.0.1:0"
"#,
    );
    let daemon = place.daemon(&config);
    let base = daemon.http_url();
    let http = Client::builder()
        .timeout(WAIT)
        .build()
        .expect("an HTTP client");
    let api = |method: reqwest::Method, path: &str, body: Value| -> Value {
        let response = http
            .request(method.clone(), format!("{base}/api/v1{path}"))
            .json(&body)
            .send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        let text = response.text().expect("a body");
        assert!(status.is_success(), "{method} {path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };

    api(
        reqwest::Method::POST,
        "/jobs",
        json!({"name": "render", "every": "1h", "worker_kind": "render", "payload": "{}"}),
    );
    api(reqwest::Method::POST, "/jobs/render/trigger", json!({}));
    let claimed = api(
        reqwest::Method::POST,
        "/claims",
        json!({"worker": "w1", "kinds": ["render"]}),
    );
    assert_eq!(claimed["job"], "render", "{claimed}");
    daemon.wait_for(&["incident #1 opened (lease_reclaimed)"]);

    let driver = Driver::start();
    let browser = driver.session();
    browser.open(&format!("{base}/"));
    let incident = browser.wait_text("tr[data-incident='1'] td[data-field='kind']", |t| {
        t == "lease_reclaimed"
    });
    assert_eq!(incident, "lease_reclaimed");
    browser.wait_text("tr[data-incident='1'] td[data-field='details']", |t| {
        t.contains("held by w1")
    });
    browser.wait_text("tr[data-job='render'] td[data-field='state']", |t| {
        t == "scheduled"
    });
    browser.wait_text("#kpi-incidents", |t| t == "1");
    // One daemon on an fs store: nobody to name as leader (the status was read with the rest).
    assert_eq!(
        browser.text("#leader").as_deref(),
        Some(""),
        "no leader on fs"
    );
    // The incident's run opens with its audit trail: the silent worker's claim is in it.
    browser.click("tr[data-incident='1'] button.link");
    browser.wait_text("#run-detail h3", |t| t == "run-1 of job render");
    browser.wait_text("#run-detail", |t| {
        t.contains("attempt 1 claimed by w1") && !t.contains("[object")
    });
    let shots = screenshots_dir();
    browser.screenshot(&shots.join("console-1280.png"));

    browser.click("button[aria-label='Pause job render']");
    browser.wait_text("tr[data-job='render'] td[data-field='state']", |t| {
        t == "paused"
    });
    browser.wait_text("tr[data-job='render'] td[data-field='actions']", |t| {
        t.contains("Resume")
    });
    let job = api(reqwest::Method::GET, "/jobs/render", Value::Null);
    assert_eq!(job["job"]["state"], "paused", "{job}");
    daemon.wait_for(&["job render: paused"]);

    browser.resize(390, 1800);
    browser.wait_text("tr[data-job='render'] td[data-field='state']", |t| {
        t == "paused"
    });
    browser.scroll_to_top();
    browser.screenshot(&shots.join("console-390.png"));
    eprintln!(
        "console test: screenshots in {}, {:?} in all",
        shots.display(),
        started.elapsed()
    );
}

/// On a Postgres store the header names the leader, its term and since when (relative and
/// absolute), as `/api/v1/status` says.
#[test]
fn the_console_shows_who_leads_a_postgres_store() {
    if !browser_wanted() {
        return;
    }
    let Some(db) = pg::TestDb::new() else { return };
    let place = Place::new("console-pg");
    let config = place.config("[http]\nlisten = \"127.0.0.1:0\"\n");
    let url = db.url();
    let daemon = place.spawn_daemon(
        &[
            "--store",
            "postgres",
            "--database-url",
            &url,
            "run",
            "--config",
            config.to_str().expect("a UTF-8 path"),
        ],
        &[("KEEL_HOSTNAME", "host-c")],
    );
    let base = daemon.http_url();
    let status: Value = Client::new()
        .get(format!("{base}/api/v1/status"))
        .send()
        .and_then(|r| r.json())
        .expect("the status");
    let leader = &status["leader"];
    let holder = leader["holder"].as_str().expect("a holder").to_string();
    assert!(holder.starts_with("host-c:"), "{status}");
    let since = leader["since"].as_str().expect("since").to_string();

    let driver = Driver::start();
    let browser = driver.session();
    browser.open(&format!("{base}/"));
    let shown = browser.wait_text("#leader", |t| t.contains(&holder));
    assert!(
        shown.contains(&format!("(term {})", leader["term"])),
        "{shown}"
    );
    assert!(shown.contains(&since), "the absolute time: {shown}");
    assert!(shown.contains("this daemon"), "{shown}");
    let relative = browser.wait_text("#leader time", |t| !t.is_empty());
    assert!(
        relative.ends_with(" ago") || relative.starts_with("in "),
        "a relative time: {relative}"
    );
    browser.screenshot(&screenshots_dir().join("console-postgres-1280.png"));
}

/// The reference design's acceptance, as the console shows it: a stale lease, a no-job claim
/// loop and an artifact-gate failure (a local server answering 404), each an incident whose
/// evidence is on the page, the rules table with the design's thresholds, and the KPI tiles.
#[test]
fn the_console_shows_the_three_acceptance_detections_with_their_evidence() {
    if !browser_wanted() {
        return;
    }
    let place = Place::new("console-acceptance");
    let hook = common::Hook::start();
    let config = place.config(&format!(
        "[daemon]\nlease_ttl = \"1s\"\n\n[watchdog]\nprofile = \"design\"\nlease_grace = \"0s\"\n\n\
         [http]\nlisten = \"127.0.0.1:0\"\n{}",
        common::ACCEPTANCE_JOBS
    ));
    let daemon = place.daemon(&config);
    let base = daemon.http_url();
    let http = Client::builder()
        .timeout(WAIT)
        .build()
        .expect("an HTTP client");
    let api = |method: reqwest::Method, path: &str, body: Value| -> (u16, Value) {
        let response = http
            .request(method.clone(), format!("{base}/api/v1{path}"))
            .json(&body)
            .send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    let post = |path: &str, body: Value| api(reqwest::Method::POST, path, body);
    // A stale lease.
    post("/jobs/render/trigger", json!({}));
    post("/claims", json!({"worker": "w-stale", "kinds": ["render"]}));
    daemon.wait_for(&["opened (lease_reclaimed)"]);
    // A no-job claim loop while report waits.
    post("/jobs/report/trigger", json!({}));
    for _ in 0..3 {
        post("/claims", json!({"worker": "w-idle", "kinds": ["gpu"]}));
    }
    daemon.wait_for(&["opened (idle_claim_loop)"]);
    // An artifact-gate failure.
    post("/jobs/publish/trigger", json!({}));
    let (_, holder) = post("/claims", json!({"worker": "w-pub", "kinds": ["publish"]}));
    let run = format!("run-{}", holder["run"]);
    let (status, refused) = post(
        &format!("/runs/{run}/complete"),
        json!({"token": holder["token"], "artifacts": {"report": hook.url("/report.pdf")}}),
    );
    assert_eq!(status, 422, "{refused}");
    daemon.wait_for(&["opened (artifact_gate)"]);

    let driver = Driver::start();
    let browser = driver.session();
    browser.open(&format!("{base}/"));
    // At least these three: the publish attempt's own 1 s lease may expire meanwhile too.
    browser.wait_text("#kpi-incidents", |t| t.parse::<u32>().is_ok_and(|n| n >= 3));
    browser.wait_text("#kpi-artifacts", |t| t == "1");
    for (id, kind, evidence) in [
        (1, "lease_reclaimed", "held by w-stale"),
        (2, "idle_claim_loop", "\"report\": 1"),
        (3, "artifact_gate", "404"),
    ] {
        browser.wait_text(
            &format!("tr[data-incident='{id}'] td[data-field='kind']"),
            |t| t == kind,
        );
        browser.wait_text(
            &format!("tr[data-incident='{id}'] td[data-field='details']"),
            |t| t.contains(evidence),
        );
    }
    browser.wait_text(
        "tr[data-rule='claim_loop_idle'] td[data-field='threshold']",
        |t| t.contains('3'),
    );
    browser.wait_text("tr[data-rule='artifact_gate'] td[data-field='last']", |t| {
        t.contains("#3")
    });
    // The gate's evidence is on the run: its status and the server's answer.
    browser.click_until("tr[data-incident='3'] button.link", "#run-detail", |t| {
        t.contains("404") && t.contains("no such hook")
    });
    browser.scroll_to_top();
    browser.screenshot(&screenshots_dir().join("console-acceptance-1280.png"));
}

/// With a tokens file the page asks for a token, keeps it, and follows the event stream with
/// it: a run triggered through the API appears on the page with the event's line, which only
/// the stream (not the 5 s polling fallback) puts in the header.
#[test]
fn the_console_asks_for_a_token_and_follows_events_with_it() {
    if !browser_wanted() {
        return;
    }
    const SECRET: &str = "console-operator-0123456789";
    let place = Place::new("console-token");
    let tokens = place.write(
        "tokens.toml",
        &format!("[[token]]\nname = \"ops\"\nrole = \"operator\"\nsecret = \"{SECRET}\"\n"),
    );
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600))
        .expect("the tokens file is its owner's");
    let config = place.config(
        r#"
[http]
listen = "127.0.0.1:0"
tokens = "tokens.toml"

[[job]]
name = "hello"
cron = "0 0 3 1 1 *"
command = ["echo", "hello from the console test"]
"#,
    );
    let daemon = place.daemon(&config);
    let base = daemon.http_url();

    let driver = Driver::start();
    let browser = driver.session();
    browser.open(&format!("{base}/"));
    browser.wait_text("#status", |t| t.contains("waiting for a token"));
    browser.type_into("#token-input", SECRET);
    browser.click("#token-form button[type='submit']");
    browser.wait_text("tr[data-job='hello'] td[data-field='state']", |t| {
        t == "scheduled"
    });
    browser.wait_text("#status", |t| t.starts_with("live"));

    let triggered = Client::new()
        .post(format!("{base}/api/v1/jobs/hello/trigger"))
        .bearer_auth(SECRET)
        .send()
        .expect("the trigger is answered");
    assert_eq!(triggered.status(), reqwest::StatusCode::CREATED);
    browser.wait_text("#status", |t| t.contains("run-1 of job hello succeeded"));
    browser.wait_text("tr[data-run='run-1'] td[data-field='state']", |t| {
        t == "succeeded"
    });
    browser.click("tr[data-run='run-1'] button.link");
    browser.wait_text("#run-detail pre.log", |t| {
        t == "hello from the console test"
    });
}

/// Whether to run a browser test: yes, unless `KEEL_SKIP_BROWSER=1` asks to skip it (said
/// loudly); without chromedriver the test fails, saying how to install it.
fn browser_wanted() -> bool {
    if std::env::var("KEEL_SKIP_BROWSER").as_deref() == Ok("1") {
        // Straight to stderr: the test harness captures eprintln! of a passing test.
        let _ = std::io::stderr()
            .write_all(b"\n*** SKIPPED: the console's browser tests (KEEL_SKIP_BROWSER=1) ***\n\n");
        return false;
    }
    assert!(
        Path::new(CHROMEDRIVER).exists(),
        "{CHROMEDRIVER} is missing: install it with `apt-get install -y chromium \
         chromium-driver` (.ci/run does), or set KEEL_SKIP_BROWSER=1 to skip this test"
    );
    true
}

/// `<target>/console-screenshots`, beside the binary's profile directory.
fn screenshots_dir() -> PathBuf {
    let keel = Path::new(env!("CARGO_BIN_EXE_keel"));
    let target = keel
        .parent()
        .and_then(Path::parent)
        .expect("the target directory");
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("the screenshots directory");
    dir
}

/// A chromedriver process in a process group of its own; dropping it kills the group, with
/// any browser a failed test left behind.
struct Driver {
    child: Child,
    url: String,
    http: Client,
    /// Set once `child` was waited for: its pid, and so its group's id, may belong to another
    /// process by now, so dropping the driver must not kill that group.
    reaped: bool,
}

impl Driver {
    /// chromedriver on a port of its own choosing. With `--port=0` it takes a free IPv4 port
    /// and then wants the same number on IPv6, and exits ("IPv6 port not available") when some
    /// other socket of a busy test run holds it; that race is chromedriver's, so a start that
    /// ends that way is tried again, up to five times. Any other early exit fails the test with
    /// what chromedriver wrote.
    fn start() -> Driver {
        let mut last = String::new();
        for _ in 0..5 {
            match Driver::try_start() {
                Ok(driver) => return driver,
                Err(said) if said.contains("port not available") => last = said,
                Err(said) => panic!("chromedriver did not start: {said}"),
            }
        }
        panic!("chromedriver lost the race for its port five times; last it said: {last}")
    }

    fn try_start() -> Result<Driver, String> {
        let mut child = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        // Both streams go to one channel, read to their ends so that chromedriver never
        // blocks on a full pipe; the channel closes when chromedriver has closed both.
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let tx_err = tx.clone();
        std::thread::spawn(move || forward_lines(stdout, tx));
        std::thread::spawn(move || forward_lines(stderr, tx_err));
        let mut driver = Driver {
            child,
            url: String::new(),
            http: Client::builder()
                .timeout(WAIT)
                .build()
                .expect("an HTTP client"),
            reaped: false,
        };
        // "ChromeDriver was started successfully on port 37647."
        let deadline = Instant::now() + WAIT;
        let mut said = Vec::new();
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("chromedriver did not say its port within {WAIT:?}: {said:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = driver.child.wait().map(|s| s.to_string());
                    driver.reaped = true;
                    return Err(format!("it exited ({status:?}) saying {said:?}"));
                }
            };
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().to_string();
            }
            said.push(line);
        };
        driver.url = format!("http://127.0.0.1:{port}");
        Ok(driver)
    }

    /// A headless Chromium session, 1280 px wide.
    fn session(&self) -> Session<'_> {
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The page's console (errors included), for a failure's message.
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1600"],
            },
        }}});
        let answer = self.call(reqwest::Method::POST, "/session", &capabilities);
        let id = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        Session { driver: self, id }
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: reqwest::Method, path: &str, body: &Value) -> Value {
        self.try_call(method.clone(), path, body)
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    fn try_call(&self, method: reqwest::Method, path: &str, body: &Value) -> Result<Value, String> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
            request = request.json(body);
        }
        let response = request.send().map_err(|e| e.to_string())?;
        let status = response.status();
        let answer: Value = response.json().map_err(|e| e.to_string())?;
        let value = answer.get("value").cloned().unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            Err(format!("{status}: {} {}", value["error"], value["message"]))
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every line of `stream` into `tx`, until the stream ends; lines sent after the receiver is
/// gone are dropped, and reading goes on.
fn forward_lines(stream: impl std::io::Read, tx: mpsc::Sender<String>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let _ = tx.send(line);
    }
}

/// A browser session; dropping it closes the browser.
struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Session<'_> {
    fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.driver.call(method, &path, &body)
    }

    fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({ "url": url }));
    }

    /// The text of the first element `selector` finds, or `None`, read in one step (the page
    /// redraws its tables on every event, so an element found earlier may be gone).
    fn text(&self, selector: &str) -> Option<String> {
        let script = "const e = document.querySelector(arguments[0]); \
                      return e ? e.textContent.trim() : null;";
        let value = self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [selector] }),
        );
        value.as_str().map(str::to_string)
    }

    /// Polls until `selector`'s text satisfies `good`; fails with the page's text at the
    /// deadline.
    #[track_caller]
    fn wait_text(&self, selector: &str, good: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text(selector);
            if let Some(text) = text.as_deref().filter(|t| good(t)) {
                return text.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{selector} read {text:?} for {WAIT:?}; the page:\n{}",
                self.text("body").unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the element `selector` finds, as a user would (WebDriver's element click),
    /// finding it again if a redraw replaced it in between.
    #[track_caller]
    fn click(&self, selector: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.driver.try_call(
                reqwest::Method::POST,
                &format!("/session/{}/element", self.id),
                &json!({ "using": "css selector", "value": selector }),
            );
            let clicked = found.and_then(|element| {
                let id = element
                    .as_object()
                    .and_then(|o| o.values().next())
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("no element id in {element}"))?
                    .to_string();
                self.driver.try_call(
                    reqwest::Method::POST,
                    &format!("/session/{}/element/{id}/click", self.id),
                    &json!({}),
                )
            });
            match clicked {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot click {selector} within {WAIT:?}: {e}"),
            }
        }
    }

    /// Clicks `selector` until `target`'s text satisfies `good`, clicking again after
    /// [`CLICK_AGAIN`] without it, up to [`WAIT`]. One CI run saw a click on an incident's
    /// run open nothing for 30 s while four incidents arrived and redrew their table (not
    /// reproduced); a user would click again, and so does this, saying so on stderr.
    #[track_caller]
    fn click_until(&self, selector: &str, target: &str, good: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut clicks = 0;
        loop {
            self.click(selector);
            clicks += 1;
            let again = Instant::now() + CLICK_AGAIN;
            while Instant::now() < again {
                if let Some(text) = self.text(target).filter(|t| good(t)) {
                    if clicks > 1 {
                        eprintln!("{selector}: {target} showed after {clicks} clicks");
                    }
                    return text;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < deadline,
                "{target} read {:?} after {clicks} clicks on {selector} in {WAIT:?}; the page's \
                 console: {}\nthe page:\n{}",
                self.text(target),
                self.browser_log(),
                self.text("body").unwrap_or_default()
            );
        }
    }

    /// What the page wrote to its console (chromedriver's log endpoint), or why it could not
    /// be read.
    fn browser_log(&self) -> String {
        let path = format!("/session/{}/se/log", self.id);
        match self
            .driver
            .try_call(reqwest::Method::POST, &path, &json!({"type": "browser"}))
        {
            Ok(Value::Array(entries)) if entries.is_empty() => "(empty)".to_string(),
            Ok(Value::Array(entries)) => entries
                .iter()
                .map(|e| format!("\n  {} {}", e["level"], e["message"]))
                .collect(),
            Ok(other) => other.to_string(),
            Err(e) => format!("(unreadable: {e})"),
        }
    }

    /// The phone's screenshot starts at the header, wherever opening the run scrolled to.
    fn scroll_to_top(&self) {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": "window.scrollTo(0, 0);", "args": [] }),
        );
    }

    /// Types `text` into the field `selector` finds, as a user would.
    fn type_into(&self, selector: &str, text: &str) {
        let element = self.command(
            reqwest::Method::POST,
            "/element",
            json!({ "using": "css selector", "value": selector }),
        );
        let id = element
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element id in {element}"))
            .to_string();
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        );
    }

    fn resize(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            json!({ "width": width, "height": height }),
        );
    }

    fn screenshot(&self, path: &Path) {
        let value = self.command(reqwest::Method::GET, "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.driver.try_call(
            reqwest::Method::DELETE,
            &format!("/session/{}", self.id),
            &Value::Null,
        );
    }
}

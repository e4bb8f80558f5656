//! keel.toml: the daemon's settings and the jobs it adds or updates when it starts.
//!
//! ```toml
//! [daemon]
//! shutdown_budget = "30s"          # how long a graceful stop may take
//! metrics = "127.0.0.1:9464"       # serve Prometheus metrics (off unless set)
//!
//! [[job]]
//! name = "heartbeat"
//! cron = "*/10 * * * * *"
//! command = ["echo", "alive"]
//! ```
//!
//! Every `[[job]]` key is a `keel job add` flag ([`JobDef`]). Unknown keys are errors that
//! name the key and its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::duration::parse_duration_ms;
use crate::error::Failure;
use crate::jobdef::{JobDef, Prior, Resolve};
use keel_core::Timestamp;

/// The shutdown budget when the config does not set one.
pub(crate) const SHUTDOWN_BUDGET_DEFAULT: Duration = Duration::from_secs(30);

/// A loaded, checked config file.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// Where it was read from.
    pub(crate) path: PathBuf,
    /// How long a graceful shutdown may take.
    pub(crate) shutdown_budget: Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub(crate) metrics: Option<SocketAddr>,
    /// The jobs, in file order, each with its line.
    pub(crate) jobs: Vec<(JobDef, usize)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    daemon: Daemon,
    #[serde(default)]
    job: Vec<Spanned<JobDef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Daemon {
    shutdown_budget: Option<String>,
    metrics: Option<String>,
}

impl Config {
    /// The directory relative paths in the file (a job's `cwd`) are resolved against.
    pub(crate) fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Where relative `cwd`s of this config's jobs resolve, as an absolute path when possible.
    pub(crate) fn base_dir(&self) -> PathBuf {
        std::path::absolute(self.dir()).unwrap_or_else(|_| self.dir().to_path_buf())
    }
}

/// Reads and checks a config file. Every problem is reported, each with its line.
pub(crate) fn load(path: &Path) -> Result<Config, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read config {}: {e}", path.display())))?;
    parse(&text, path).map_err(|problems| {
        Failure::input(format!(
            "config {} is not valid:\n  {}",
            path.display(),
            problems.join("\n  ")
        ))
    })
}

/// Parses and checks config text; `Err` lists every problem found.
pub(crate) fn parse(text: &str, path: &Path) -> Result<Config, Vec<String>> {
    let file: File = toml::from_str(text).map_err(|e| vec![toml_error(&e)])?;
    let mut problems = Vec::new();
    let shutdown_budget = match &file.daemon.shutdown_budget {
        None => SHUTDOWN_BUDGET_DEFAULT,
        Some(text) => match parse_duration_ms(text) {
            Ok(ms) => Duration::from_millis(ms),
            Err(e) => {
                problems.push(format!("[daemon] shutdown_budget: {e}"));
                SHUTDOWN_BUDGET_DEFAULT
            }
        },
    };
    let metrics = match &file.daemon.metrics {
        None => None,
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(addr) => {
                problems.push(format!(
                    "[daemon] metrics: {addr} is not a loopback address; metrics say what runs \
                     and where results go, so keel serves them on 127.0.0.1 or ::1 only"
                ));
                None
            }
            Err(_) => {
                problems.push(format!(
                    "[daemon] metrics: {text:?} is not an address such as \"127.0.0.1:9464\""
                ));
                None
            }
        },
    };
    let mut config = Config {
        path: path.to_path_buf(),
        shutdown_budget,
        metrics,
        jobs: Vec::new(),
    };
    let base_dir = config.base_dir();
    let mut names = std::collections::BTreeMap::new();
    for job in file.job {
        let line = line_of(text, job.span().start);
        let def = job.into_inner();
        if let Some(first) = names.insert(def.name.clone(), line) {
            problems.push(format!(
                "line {line}: job {:?} is defined twice (first at line {first})",
                def.name
            ));
        }
        let resolve = Resolve {
            now: Timestamp::EPOCH,
            base_dir: &base_dir,
            prior: Prior::None,
        };
        if let Err(e) = check(&def, resolve) {
            problems.push(format!("line {line}: job {:?}: {e}", def.name));
        }
        config.jobs.push((def, line));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// Checks a job definition without depending on the time: a one-shot in the past is fine here
/// (it fires at once, or it already ran).
fn check(def: &JobDef, resolve: Resolve<'_>) -> Result<(), String> {
    def.to_spec(resolve).map(drop)
}

/// toml's message, which names the key and quotes the line, on one line of ours.
fn toml_error(error: &toml::de::Error) -> String {
    let message = error.message();
    match error.span() {
        Some(span) => {
            let text_line = error.to_string();
            // "TOML parse error at line L, column C" is the first line of the full text.
            let at = text_line
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("TOML parse error at "))
                .unwrap_or("");
            if at.is_empty() {
                format!("bytes {}..{}: {message}", span.start, span.end)
            } else {
                format!("{at}: {message}")
            }
        }
        None => message.to_string(),
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |before| {
        before.bytes().filter(|b| *b == b'\n').count() + 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("/etc/keel/keel.toml")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("keel.toml")).unwrap_err().join("\n")
    }

    #[test]
    fn a_full_config_parses() {
        let config = parse_ok(
            r#"
[daemon]
shutdown_budget = "10s"
metrics = "127.0.0.1:9464"

[[job]]
name = "tick"
cron = "*/10 * * * * *"
tz = "Europe/Paris"
command = ["echo", "tick"]
env = { GREETING = "hi" }
cwd = "work"
attempts = 5
backoff = "1s..30s"
timeout = "1m"
overlap = "allow"
misfire = "skip"
notify = ["https://hooks.example.com/keel"]
exit_success = [1]
exit_retryable = [75]
exit_permanent = [2]

[[job]]
name = "once"
at = "+5s"
delete_after_run = true
shell = true
command = ["echo $KEEL_JOB"]

[[job]]
name = "render"
every = "1m"
worker_kind = "render"
payload = "scene-1"
"#,
        );
        assert_eq!(config.shutdown_budget, Duration::from_secs(10));
        assert_eq!(config.metrics, "127.0.0.1:9464".parse().ok());
        let names: Vec<&str> = config.jobs.iter().map(|(j, _)| j.name.as_str()).collect();
        assert_eq!(names, ["tick", "once", "render"]);
        assert_eq!(config.jobs[0].1, 6);
        assert_eq!(
            config.jobs[0].0.env.get("GREETING").map(String::as_str),
            Some("hi")
        );
        assert_eq!(config.base_dir(), PathBuf::from("/etc/keel"));
    }

    #[test]
    fn an_empty_config_is_valid() {
        let config = parse_ok("");
        assert!(config.jobs.is_empty());
        assert_eq!(config.shutdown_budget, SHUTDOWN_BUDGET_DEFAULT);
        assert_eq!(config.metrics, None);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e =
            parse_err("[[job]]\nname = \"x\"\nevery = \"1m\"\ncommand = [\"true\"]\nretries = 3\n");
        assert!(e.contains("retries") && e.contains("line 5"), "{e}");
        let e = parse_err("[daemon]\nbudget = \"1s\"\n");
        assert!(e.contains("budget") && e.contains("line 2"), "{e}");
        let e = parse_err("[deamon]\n");
        assert!(e.contains("deamon") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn bad_values_are_reported_per_job_with_their_lines() {
        let e = parse_err(
            r#"[daemon]
shutdown_budget = "soon"

[[job]]
name = "a"
cron = "0 0 25 * * *"
command = ["true"]

[[job]]
name = "b"
every = "1m"
command = ["true"]

[[job]]
name = "b"
every = "5x"
command = ["true"]
"#,
        );
        assert!(
            e.contains("shutdown_budget") && e.contains("\"soon\""),
            "{e}"
        );
        assert!(
            e.contains("line 4: job \"a\"") && e.contains("hour field"),
            "{e}"
        );
        assert!(
            e.contains("line 14: job \"b\" is defined twice (first at line 9)"),
            "{e}"
        );
        assert!(e.contains("line 14: job \"b\": every"), "{e}");
    }

    #[test]
    fn a_wrong_type_is_an_error_with_its_line() {
        let e = parse_err("[[job]]\nname = \"x\"\nevery = \"1m\"\ncommand = \"echo hi\"\n");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn metrics_must_be_a_loopback_address() {
        let e = parse_err("[daemon]\nmetrics = \"0.0.0.0:9464\"\n");
        assert!(e.contains("loopback"), "{e}");
        let e = parse_err("[daemon]\nmetrics = \"localhost\"\n");
        assert!(e.contains("\"localhost\""), "{e}");
    }
}

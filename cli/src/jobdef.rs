//! A job as a person writes it, on the command line (`keel job add`) or in keel.toml
//! (`[[job]]`), and its translation into a `JobSpec`. Both front ends fill a [`JobDef`] and
//! share [`JobDef::to_spec`], so they accept the same values and give the same errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keel_core::{
    limits, JobId, JobSpec, MisfirePolicy, NotifyOn, OverlapPolicy, RetryPolicy, Schedule,
    ScheduleSpec, Timestamp,
};
use serde::Deserialize;

use crate::command_job::{self, CommandSpec, ExitCodes};
use crate::duration::{is_relative_time, parse_duration_ms, parse_time};

/// A job definition before validation. Field names are keel.toml's keys.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobDef {
    pub(crate) name: String,
    pub(crate) cron: Option<String>,
    pub(crate) tz: Option<String>,
    pub(crate) at: Option<String>,
    pub(crate) every: Option<String>,
    #[serde(default)]
    pub(crate) command: Vec<String>,
    #[serde(default)]
    pub(crate) shell: bool,
    pub(crate) cwd: Option<PathBuf>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) attempts: Option<u32>,
    pub(crate) backoff: Option<String>,
    pub(crate) jitter: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) overlap: Option<String>,
    pub(crate) misfire: Option<String>,
    #[serde(default)]
    pub(crate) delete_after_run: bool,
    #[serde(default)]
    pub(crate) notify: Vec<String>,
    pub(crate) notify_on: Option<String>,
    pub(crate) worker_kind: Option<String>,
    pub(crate) payload: Option<String>,
    /// Artifacts a worker's completion must report (and that must pass the artifact gate).
    #[serde(default)]
    pub(crate) require_artifacts: Vec<String>,
    #[serde(default)]
    pub(crate) exit_success: Vec<i32>,
    #[serde(default)]
    pub(crate) exit_retryable: Vec<i32>,
    #[serde(default)]
    pub(crate) exit_permanent: Vec<i32>,
}

/// `--tz local`: the system's zone, by its IANA name, resolved once when the job is defined
/// (so the job says which zone it runs in, and a later change of the system's zone does not
/// move it silently).
fn local_zone() -> Result<String, String> {
    iana_time_zone::get_timezone().map_err(|e| {
        format!(
            "--tz local: cannot tell the system's time zone ({e}); name it instead, e.g. \
             --tz Europe/Paris"
        )
    })
}

/// What is already stored under a job's name, for resolving a relative `at` (`+5s`) the same
/// way every time the config is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prior {
    /// Nothing: a relative instant counts from now.
    None,
    /// A stored one-shot job at this instant: the instant it was given when first added.
    OneShot(Timestamp),
    /// A deleted job that fired this slot last: the one-shot ran and was deleted.
    Deleted(Timestamp),
}

/// What [`JobDef::to_spec`] needs besides the definition.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolve<'a> {
    /// The current time.
    pub(crate) now: Timestamp,
    /// Relative `cwd`s are resolved against this directory.
    pub(crate) base_dir: &'a Path,
    /// What is stored under the job's name.
    pub(crate) prior: Prior,
}

impl JobDef {
    /// Validates the definition and builds the job spec. Errors name the field and the value.
    pub(crate) fn to_spec(&self, resolve: Resolve<'_>) -> Result<JobSpec, String> {
        let id =
            JobId::new(&self.name).map_err(|e| format!("invalid job name {:?}: {e}", self.name))?;
        let schedule = self.schedule(resolve)?;
        let mut spec = match &self.worker_kind {
            Some(kind) => self.worker_spec(id, kind, schedule)?,
            None => self.command_spec(id, schedule, resolve.base_dir)?,
        };
        spec.retry = self.retry()?;
        spec.timeout_ms = match &self.timeout {
            None => None,
            Some(text) => match parse_duration_ms(text).map_err(|e| format!("timeout: {e}"))? {
                0 => return Err(format!("timeout {text:?} must be longer than zero")),
                ms => Some(ms),
            },
        };
        spec.overlap = match self.overlap.as_deref() {
            None => OverlapPolicy::default(),
            Some(text) => parse_overlap(text)?,
        };
        spec.misfire = match self.misfire.as_deref() {
            None => MisfirePolicy::default(),
            Some(text) => parse_misfire(text)?,
        };
        spec.delete_after_run = self.delete_after_run;
        if self.delete_after_run && self.at.is_none() {
            return Err(
                "delete_after_run applies to one-shot jobs (--at / at = …) only".to_string(),
            );
        }
        for url in &self.notify {
            check_url(url)?;
        }
        spec.sinks = self.notify.iter().map(|u| u.as_str().into()).collect();
        spec.notify_on = match self.notify_on.as_deref() {
            None | Some("always") => NotifyOn::Always,
            Some("failure") => NotifyOn::Failure,
            Some(other) => {
                return Err(format!(
                    "notify_on {other:?}: expected \"failure\" (failed runs only) or \"always\""
                ))
            }
        };
        if self.notify_on.is_some() && self.notify.is_empty() {
            return Err("notify_on says when to notify: give a notify URL too".to_string());
        }
        Ok(spec)
    }

    fn schedule(&self, resolve: Resolve<'_>) -> Result<ScheduleSpec, String> {
        let given = [&self.cron, &self.at, &self.every]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if given != 1 {
            return Err("give exactly one schedule: cron, at or every".to_string());
        }
        if self.tz.is_some() && self.cron.is_none() {
            return Err("tz applies to cron schedules only".to_string());
        }
        let spec = if let Some(expr) = &self.cron {
            let zone = match self.tz.as_deref() {
                None => "UTC".to_string(),
                Some("local") => local_zone()?,
                Some(zone) => zone.to_string(),
            };
            ScheduleSpec::Cron {
                expr: expr.as_str().into(),
                zone: zone.into(),
            }
        } else if let Some(at) = &self.at {
            let at = match (is_relative_time(at), resolve.prior) {
                (true, Prior::OneShot(t) | Prior::Deleted(t)) => {
                    // Checked, then replaced by the instant chosen when the job was added.
                    parse_time(at, resolve.now)?;
                    t
                }
                _ => parse_time(at, resolve.now)?,
            };
            ScheduleSpec::Once { at }
        } else if let Some(every) = &self.every {
            let interval_ms = parse_duration_ms(every).map_err(|e| format!("every: {e}"))?;
            // The grid starts at the Unix epoch, so the same definition is the same schedule
            // at every load, and `every 5m` fires at :00, :05, … UTC.
            ScheduleSpec::Every {
                interval_ms,
                anchor: Timestamp::EPOCH,
            }
        } else {
            unreachable!("one schedule was given")
        };
        Schedule::parse(&spec).map_err(|e| format!("invalid schedule: {e}"))?;
        Ok(spec)
    }

    fn worker_spec(
        &self,
        id: JobId,
        kind: &str,
        schedule: ScheduleSpec,
    ) -> Result<JobSpec, String> {
        if kind.is_empty() || kind.len() > limits::JOB_KIND_MAX_BYTES {
            return Err(format!(
                "worker_kind must be 1 to {} bytes",
                limits::JOB_KIND_MAX_BYTES
            ));
        }
        if kind == command_job::KIND {
            return Err(format!(
                "worker_kind {kind:?} is keel's own kind for command jobs; pick another name"
            ));
        }
        let command_only = [
            (!self.command.is_empty(), "a command"),
            (self.shell, "shell"),
            (self.cwd.is_some(), "cwd"),
            (!self.env.is_empty(), "env"),
            (!self.exit_success.is_empty(), "exit_success"),
            (!self.exit_retryable.is_empty(), "exit_retryable"),
            (!self.exit_permanent.is_empty(), "exit_permanent"),
        ];
        if let Some((_, what)) = command_only.iter().find(|(given, _)| *given) {
            return Err(format!(
                "a job for external workers (worker_kind {kind:?}) takes no {what}: workers run \
                 it, keel does not"
            ));
        }
        let mut spec = JobSpec::new(id, kind, schedule);
        spec.external = true;
        if let Some(name) = self
            .require_artifacts
            .iter()
            .find(|n| n.is_empty() || n.len() > limits::JOB_KIND_MAX_BYTES)
        {
            return Err(format!(
                "require_artifacts: {name:?} is not an artifact name (1 to {} bytes)",
                limits::JOB_KIND_MAX_BYTES
            ));
        }
        spec.required_artifacts = self.require_artifacts.clone().into();
        spec.payload = self.payload.as_deref().unwrap_or("").into();
        if spec.payload.len() > limits::JOB_PAYLOAD_MAX_BYTES {
            return Err(format!(
                "payload is {} bytes; the limit is {}",
                spec.payload.len(),
                limits::JOB_PAYLOAD_MAX_BYTES
            ));
        }
        Ok(spec)
    }

    fn command_spec(
        &self,
        id: JobId,
        schedule: ScheduleSpec,
        base: &Path,
    ) -> Result<JobSpec, String> {
        if self.payload.is_some() {
            return Err(
                "payload is for jobs of external workers (worker_kind); a command job's payload \
                 is its command"
                    .to_string(),
            );
        }
        if !self.require_artifacts.is_empty() {
            return Err(
                "require_artifacts is for jobs of external workers (worker_kind), who report \
                 artifacts when they complete; a command reports none"
                    .to_string(),
            );
        }
        if self.command.is_empty() {
            return Err(
                "no command: give the program and its arguments (after `--`, or command = […]), \
                 or worker_kind for a job that external workers run"
                    .to_string(),
            );
        }
        let command = CommandSpec {
            argv: self.command.clone(),
            shell: self.shell,
            cwd: self.cwd.as_ref().map(|dir| base.join(dir)),
            env: self.env.clone(),
            exit_codes: ExitCodes {
                success: self.exit_success.clone(),
                retryable: self.exit_retryable.clone(),
                permanent: self.exit_permanent.clone(),
            },
            capture_bytes: None,
        };
        command.validate().map_err(|e| format!("command: {e}"))?;
        let mut spec = JobSpec::new(id, command_job::KIND, schedule);
        spec.payload = command.to_payload().into();
        if spec.payload.len() > limits::JOB_PAYLOAD_MAX_BYTES {
            return Err(format!(
                "the command is {} bytes as a payload; the limit is {}",
                spec.payload.len(),
                limits::JOB_PAYLOAD_MAX_BYTES
            ));
        }
        Ok(spec)
    }

    fn retry(&self) -> Result<RetryPolicy, String> {
        let mut retry = RetryPolicy::default();
        if let Some(attempts) = self.attempts {
            retry.attempts_max = attempts;
        }
        if let Some(text) = &self.backoff {
            let (base, cap) = match text.split_once("..") {
                Some((base, cap)) => (base, Some(cap)),
                None => (text.as_str(), None),
            };
            let ms = |t: &str| parse_duration_ms(t).map_err(|e| format!("backoff: {e}"));
            retry.backoff_base_ms = ms(base)?;
            retry.backoff_cap_ms = match cap {
                Some(cap) => ms(cap)?,
                None => retry.backoff_cap_ms.max(retry.backoff_base_ms),
            };
            if retry.backoff_base_ms > retry.backoff_cap_ms {
                return Err(format!(
                    "backoff {text:?}: the first delay is longer than the largest"
                ));
            }
        }
        match self.jitter.as_deref() {
            None | Some("full") => {}
            Some("none") => retry.jitter = 0.0,
            Some(other) => {
                return Err(format!(
                    "jitter {other:?}: expected \"full\" (random delays up to the backoff) or \
                     \"none\" (exact delays)"
                ))
            }
        }
        retry.validate().map_err(|e| match e {
            keel_core::RetryPolicyError::AttemptsMax { got } => format!(
                "attempts must be 1 to {} (the first attempt included); got {got}",
                limits::ATTEMPTS_MAX
            ),
            other => format!("backoff: {other}"),
        })?;
        Ok(retry)
    }
}

/// Parses `skip`, `buffer-one` or `allow`.
pub(crate) fn parse_overlap(text: &str) -> Result<OverlapPolicy, String> {
    match text {
        "skip" => Ok(OverlapPolicy::Skip),
        "buffer-one" => Ok(OverlapPolicy::BufferOne),
        "allow" => Ok(OverlapPolicy::Allow),
        _ => Err(format!(
            "invalid overlap policy {text:?}: use skip, buffer-one or allow"
        )),
    }
}

/// Parses `fire-once-now`, `skip` or `catch-up:N`.
pub(crate) fn parse_misfire(text: &str) -> Result<MisfirePolicy, String> {
    let bad = || {
        format!(
            "invalid misfire policy {text:?}: use fire-once-now, skip or catch-up:N \
             (N from 1 to {})",
            limits::CATCH_UP_MAX
        )
    };
    match text {
        "fire-once-now" => Ok(MisfirePolicy::FireOnceNow),
        "skip" => Ok(MisfirePolicy::Skip),
        _ => {
            let max = text
                .strip_prefix("catch-up:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=limits::CATCH_UP_MAX).contains(n))
                .ok_or_else(bad)?;
            Ok(MisfirePolicy::CatchUp { max })
        }
    }
}

/// Parses `NAME=VALUE` (for `--env` and `--artifact`).
pub(crate) fn parse_pair(text: &str, what: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("invalid {what} {text:?}: expected NAME=VALUE")),
    }
}

/// The names a user gives an overlap policy, for display.
pub(crate) fn overlap_name(policy: OverlapPolicy) -> &'static str {
    match policy {
        OverlapPolicy::Skip => "skip",
        OverlapPolicy::BufferOne => "buffer-one",
        OverlapPolicy::Allow => "allow",
    }
}

/// The names a user gives a misfire policy, for display.
pub(crate) fn misfire_name(policy: MisfirePolicy) -> String {
    match policy {
        MisfirePolicy::FireOnceNow => "fire-once-now".into(),
        MisfirePolicy::Skip => "skip".into(),
        MisfirePolicy::CatchUp { max } => format!("catch-up:{max}"),
    }
}

/// A `notify` entry: `URL`, or `NAME=URL` to name the sink (its label in logs and metrics).
pub(crate) fn notify_entry(entry: &str) -> (Option<&str>, &str) {
    match entry.split_once('=') {
        Some((name, url))
            if !name.is_empty()
                && !name.contains("://")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            (Some(name), url)
        }
        _ => (None, entry),
    }
}

/// The program and arguments of a `command:PROGRAM ARG…` sink entry (`NAME=command:…` too),
/// split on whitespace, or `None` if the entry is not a command. It runs without a shell.
pub(crate) fn command_entry(entry: &str) -> Option<Vec<&str>> {
    let (_, target) = notify_entry(entry);
    let argv: Vec<&str> = target
        .strip_prefix("command:")?
        .split_whitespace()
        .collect();
    Some(argv)
}

/// Checks a sink entry of `[watchdog] notify` or `escalate_to`: a webhook URL as a job's
/// `notify` takes, or `command:PROGRAM ARG…`.
pub(crate) fn check_sink_entry(entry: &str) -> Result<(), String> {
    match command_entry(entry) {
        Some(argv) if argv.is_empty() => Err(format!(
            "{:?}: a command sink needs a program after \"command:\"",
            redact_url(entry)
        )),
        Some(_) => Ok(()),
        None => check_url(entry).map_err(|e| {
            format!("{e}, or command:PROGRAM ARG… (a program run with the notification on stdin)")
        }),
    }
}

fn check_url(entry: &str) -> Result<(), String> {
    let (_, url) = notify_entry(entry);
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        _ => Err(format!(
            "invalid notify URL {:?}: expected http://host/… or https://host/…",
            redact_url(url)
        )),
    }
}

/// A URL without what may be a secret (user info, query), for logs.
pub(crate) fn redact_url(url: &str) -> String {
    // A named sink is shown by its name alone.
    if let (Some(name), _) = notify_entry(url) {
        return name.to_string();
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    // The path goes too: services put their secret in it (hooks.slack.com/services/T/B/SECRET).
    let rest = match rest.split_once('/') {
        Some((authority, _path)) => {
            let host = authority.rsplit('@').next().unwrap_or(authority);
            format!("{host}/")
        }
        None => rest.rsplit('@').next().unwrap_or(rest).to_string(),
    };
    let hidden = if url.contains('?') || url.contains('@') || rest.ends_with('/') {
        "…"
    } else {
        ""
    };
    if scheme.is_empty() {
        format!("{rest}{hidden}")
    } else {
        format!("{scheme}://{rest}{hidden}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve() -> Resolve<'static> {
        Resolve {
            now: Timestamp(1_000_000),
            base_dir: Path::new("/etc/keel"),
            prior: Prior::None,
        }
    }

    fn echo(name: &str) -> JobDef {
        JobDef {
            name: name.into(),
            every: Some("10s".into()),
            command: vec!["echo".into(), "hi".into()],
            ..JobDef::default()
        }
    }

    #[test]
    fn a_command_job_becomes_a_command_payload() {
        let mut def = echo("hello");
        def.cwd = Some("work".into());
        def.exit_retryable = vec![75];
        def.attempts = Some(5);
        def.backoff = Some("2s..1m".into());
        def.timeout = Some("90s".into());
        def.overlap = Some("buffer-one".into());
        def.misfire = Some("catch-up:3".into());
        let spec = def.to_spec(resolve()).unwrap();
        assert_eq!(&*spec.kind, command_job::KIND);
        assert!(!spec.external);
        let command = CommandSpec::from_payload(&spec.payload).unwrap();
        assert_eq!(command.argv, ["echo", "hi"]);
        assert_eq!(command.cwd, Some(PathBuf::from("/etc/keel/work")));
        assert_eq!(command.exit_codes.retryable, [75]);
        assert_eq!(spec.retry.attempts_max, 5);
        assert_eq!(spec.retry.backoff_base_ms, 2_000);
        assert_eq!(spec.retry.backoff_cap_ms, 60_000);
        assert_eq!(spec.timeout_ms, Some(90_000));
        assert_eq!(spec.overlap, OverlapPolicy::BufferOne);
        assert_eq!(spec.misfire, MisfirePolicy::CatchUp { max: 3 });
        assert_eq!(
            spec.schedule,
            ScheduleSpec::Every {
                interval_ms: 10_000,
                anchor: Timestamp::EPOCH
            }
        );
    }

    #[test]
    fn required_artifacts_are_for_worker_jobs_and_named() {
        let def = JobDef {
            name: "render".into(),
            every: Some("1h".into()),
            worker_kind: Some("render".into()),
            require_artifacts: vec!["report".into(), "log".into()],
            ..JobDef::default()
        };
        let spec = def.to_spec(resolve()).unwrap();
        assert_eq!(&*spec.required_artifacts, ["report", "log"]);
        let mut empty = def.clone();
        empty.require_artifacts = vec![String::new()];
        assert!(empty
            .to_spec(resolve())
            .unwrap_err()
            .contains("require_artifacts"));
        let command = JobDef {
            worker_kind: None,
            command: vec!["true".into()],
            ..def
        };
        let e = command.to_spec(resolve()).unwrap_err();
        assert!(
            e.contains("require_artifacts is for jobs of external workers"),
            "{e}"
        );
    }

    #[test]
    fn a_worker_job_has_a_kind_and_a_payload_and_no_command() {
        let def = JobDef {
            name: "render".into(),
            cron: Some("0 0 * * * *".into()),
            tz: Some("Europe/Paris".into()),
            worker_kind: Some("render".into()),
            payload: Some("{\"scene\": 1}".into()),
            ..JobDef::default()
        };
        let spec = def.to_spec(resolve()).unwrap();
        assert!(spec.external);
        assert_eq!(&*spec.kind, "render");
        assert_eq!(&*spec.payload, "{\"scene\": 1}");
        let mut with_command = def.clone();
        with_command.command = vec!["true".into()];
        let e = with_command.to_spec(resolve()).unwrap_err();
        assert!(
            e.contains("takes no a command") || e.contains("takes no"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let mut bad_cron = echo("x");
        bad_cron.every = None;
        bad_cron.cron = Some("0 0 25 * * *".into());
        let e = bad_cron.to_spec(resolve()).unwrap_err();
        assert!(e.contains("hour field") && e.contains("25"), "{e}");

        let mut bad_zone = bad_cron.clone();
        bad_zone.cron = Some("0 0 * * * *".into());
        bad_zone.tz = Some("Mars/Olympus".into());
        let e = bad_zone.to_spec(resolve()).unwrap_err();
        assert!(e.contains("Mars/Olympus"), "{e}");

        let mut bad_every = echo("x");
        bad_every.every = Some("5x".into());
        let e = bad_every.to_spec(resolve()).unwrap_err();
        assert!(e.contains("every") && e.contains("\"5x\""), "{e}");

        let mut short = echo("x");
        short.every = Some("500ms".into());
        let e = short.to_spec(resolve()).unwrap_err();
        assert!(e.contains("shorter than the minimum"), "{e}");

        let mut bad_name = echo("a b");
        bad_name.name = "a b".into();
        let e = bad_name.to_spec(resolve()).unwrap_err();
        assert!(e.contains("\"a b\""), "{e}");

        let mut no_command = echo("x");
        no_command.command.clear();
        assert!(no_command
            .to_spec(resolve())
            .unwrap_err()
            .contains("no command"));

        let mut two = echo("x");
        two.at = Some("+5s".into());
        assert!(two.to_spec(resolve()).unwrap_err().contains("exactly one"));

        let mut misfire = echo("x");
        misfire.misfire = Some("catch-up:0".into());
        assert!(misfire
            .to_spec(resolve())
            .unwrap_err()
            .contains("catch-up:N"));

        let mut attempts = echo("x");
        attempts.attempts = Some(0);
        assert!(attempts
            .to_spec(resolve())
            .unwrap_err()
            .contains("attempts"));

        let mut backoff = echo("x");
        backoff.backoff = Some("1m..1s".into());
        assert!(backoff
            .to_spec(resolve())
            .unwrap_err()
            .contains("longer than"));

        let mut url = echo("x");
        url.notify = vec!["ftp://example.com/x".into()];
        assert!(url.to_spec(resolve()).unwrap_err().contains("notify URL"));
        let mut failures = echo("f");
        failures.notify = vec!["https://example.com/hook".into()];
        failures.notify_on = Some("failure".into());
        assert_eq!(
            failures.to_spec(resolve()).unwrap().notify_on,
            NotifyOn::Failure
        );
        failures.notify_on = Some("errors".into());
        let e = failures.to_spec(resolve()).unwrap_err();
        assert!(
            e.contains("notify_on \"errors\": expected \"failure\""),
            "{e}"
        );
        assert_eq!(
            notify_entry("ops=https://h/x?k=1"),
            (Some("ops"), "https://h/x?k=1")
        );
        assert_eq!(notify_entry("https://h/x?a=b"), (None, "https://h/x?a=b"));
        assert_eq!(redact_url("ops=https://h/secret"), "ops");
        let mut exact = echo("j");
        exact.jitter = Some("none".into());
        assert_eq!(exact.to_spec(resolve()).unwrap().retry.jitter, 0.0);
        exact.jitter = Some("some".into());
        let e = exact.to_spec(resolve()).unwrap_err();
        assert!(e.contains("jitter \"some\""), "{e}");
        let mut alone = echo("a");
        alone.notify_on = Some("failure".into());
        let e = alone.to_spec(resolve()).unwrap_err();
        assert!(e.contains("give a notify URL too"), "{e}");

        let mut code = echo("x");
        code.exit_retryable = vec![300];
        assert!(code.to_spec(resolve()).unwrap_err().contains("0 to 255"));

        let mut tz = echo("x");
        tz.tz = Some("UTC".into());
        assert!(tz
            .to_spec(resolve())
            .unwrap_err()
            .contains("cron schedules only"));

        let mut payload = echo("x");
        payload.payload = Some("p".into());
        assert!(payload
            .to_spec(resolve())
            .unwrap_err()
            .contains("external workers"));

        let mut delete = echo("x");
        delete.delete_after_run = true;
        assert!(delete.to_spec(resolve()).unwrap_err().contains("one-shot"));
    }

    #[test]
    fn a_relative_at_keeps_the_instant_it_was_first_given() {
        let mut def = echo("once");
        def.every = None;
        def.at = Some("+5s".into());
        let fresh = def.to_spec(resolve()).unwrap();
        assert_eq!(
            fresh.schedule,
            ScheduleSpec::Once {
                at: Timestamp(1_005_000)
            }
        );
        for prior in [Prior::OneShot(Timestamp(7)), Prior::Deleted(Timestamp(7))] {
            let again = def.to_spec(Resolve { prior, ..resolve() }).unwrap();
            assert_eq!(again.schedule, ScheduleSpec::Once { at: Timestamp(7) });
        }
        // An absolute instant is what it says, whatever is stored.
        def.at = Some("2030-01-01T00:00:00Z".into());
        let absolute = def
            .to_spec(Resolve {
                prior: Prior::OneShot(Timestamp(7)),
                ..resolve()
            })
            .unwrap();
        assert_ne!(absolute.schedule, ScheduleSpec::Once { at: Timestamp(7) });
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(
            redact_url("https://user:pw@hooks.example.com/x?token=1"),
            "https://hooks.example.com/…"
        );
        // A path can hold the secret itself.
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T0/B0/SECRET"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(redact_url("http://example.com"), "http://example.com");
    }

    #[test]
    fn pairs_need_a_name() {
        assert_eq!(parse_pair("A=b=c", "env"), Ok(("A".into(), "b=c".into())));
        assert!(parse_pair("=b", "env").is_err());
        assert!(parse_pair("A", "env").unwrap_err().contains("NAME=VALUE"));
    }
}

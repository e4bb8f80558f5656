//! Human output: times, schedules, states, tables and detail views, and the daemon's event
//! lines. JSON output is the core's own serde form and lives with each command.

use std::fmt::Write as _;
use std::time::Duration;

use chrono_tz::Tz;
use keel_core::outbox::{DeliverySubject, OutboxEvent};
use keel_core::{
    AuditRecord, Event, Incident, Job, JobState, Run, RunState, ScheduleSpec, StateName, Timestamp,
    Trigger,
};

use crate::command_job::CommandSpec;
use crate::duration::format_duration_ms;
use crate::jobdef::{misfire_name, overlap_name, redact_url};
use crate::table::terminal_safe;
use crate::table::{clip, Table};

/// An instant as `2026-01-01 09:30:00Z` (UTC, to the second).
pub(crate) fn time(t: Timestamp) -> String {
    match t.to_utc() {
        Some(utc) => utc.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        None => t.to_string(),
    }
}

/// An instant in a zone: `2026-01-01 10:30:00 CET (+01:00)`.
pub(crate) fn local_time(t: Timestamp, zone: Tz) -> String {
    match t.to_utc() {
        Some(utc) => utc
            .with_timezone(&zone)
            .format("%Y-%m-%d %H:%M:%S %Z (%:z)")
            .to_string(),
        None => t.to_string(),
    }
}

/// `in 5m`, `3s ago`, relative to `now` (to the second).
pub(crate) fn relative(t: Timestamp, now: Timestamp) -> String {
    let round = |ms: u64| format_duration_ms(ms / 1000 * 1000);
    if t >= now {
        format!("in {}", round(t.ms_since(now)))
    } else {
        format!("{} ago", round(now.ms_since(t)))
    }
}

/// A `std` duration as keel reads them (`30s`).
pub(crate) fn duration(d: Duration) -> String {
    format_duration_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A schedule in one line: `cron 0 30 2 * * * (Europe/Paris)`, `at …`, `every 5m`.
pub(crate) fn schedule(spec: &ScheduleSpec) -> String {
    match spec {
        ScheduleSpec::Cron { expr, zone } => format!("cron {expr} ({zone})"),
        ScheduleSpec::Once { at } => format!("at {}", time(*at)),
        ScheduleSpec::Every {
            interval_ms,
            anchor,
        } if *anchor == Timestamp::EPOCH => format!("every {}", format_duration_ms(*interval_ms)),
        ScheduleSpec::Every {
            interval_ms,
            anchor,
        } => format!(
            "every {} from {}",
            format_duration_ms(*interval_ms),
            time(*anchor)
        ),
    }
}

/// The zone a job's times are shown in: its cron zone, or UTC.
pub(crate) fn zone_of(spec: &ScheduleSpec) -> Tz {
    match spec {
        ScheduleSpec::Cron { zone, .. } => zone.parse().unwrap_or(Tz::UTC),
        _ => Tz::UTC,
    }
}

/// A job's state in a few words: `scheduled, next 2026-… (in 5s)`.
pub(crate) fn job_state(job: &Job) -> String {
    match &job.state {
        JobState::Scheduled { next } => format!("scheduled, next {}", time(*next)),
        JobState::Paused { next: Some(next) } => format!("paused, next slot {}", time(*next)),
        JobState::Paused { next: None } => "paused, no slot left".into(),
        JobState::Disabled { reason } => format!("disabled: {reason}"),
    }
}

fn state_word(state: &JobState) -> &'static str {
    match state {
        JobState::Scheduled { .. } => "scheduled",
        JobState::Paused { .. } => "paused",
        JobState::Disabled { .. } => "disabled",
    }
}

/// The jobs as a table.
pub(crate) fn jobs_table(jobs: &[Job], now: Timestamp) -> String {
    if jobs.is_empty() {
        return "no jobs (add one with `keel job add`)\n".into();
    }
    let mut table = Table::new(&[
        "NAME", "KIND", "SCHEDULE", "STATE", "NEXT", "LEFT", "LAST", "RESULT", "ACTIVE",
    ]);
    for job in jobs {
        let next = job.next_fire();
        let (last, result) = match &job.last_run {
            Some(last) => (
                relative(last.finished_at, now),
                last_result(last.state, job.failures_in_a_row),
            ),
            None => ("-".into(), "-".into()),
        };
        let kind = if job.spec.external {
            format!("worker:{}", job.spec.kind)
        } else {
            job.spec.kind.to_string()
        };
        table.row(vec![
            job.spec.id.to_string(),
            kind,
            clip(&schedule(&job.spec.schedule), 40),
            state_word(&job.state).into(),
            next.map_or_else(|| "-".into(), time),
            next.map_or_else(|| "-".into(), |t| left(t, now)),
            last,
            result,
            job.active_runs.to_string(),
        ]);
    }
    table.render()
}

/// How the last run ended, with the streak of failures it belongs to: `failed (3 in a row)`.
fn last_result(state: StateName, failures_in_a_row: u32) -> String {
    if failures_in_a_row > 1 {
        format!("{state} ({failures_in_a_row} in a row)")
    } else {
        state.to_string()
    }
}

/// The time until `at`: `4m10s`, `now` if past.
fn left(at: Timestamp, now: Timestamp) -> String {
    if at <= now {
        return "now".into();
    }
    // Whole seconds, in the same style as the other durations shown (`38m15s`).
    format_duration_ms(at.ms_since(now).div_ceil(1000) * 1000)
}

/// One job in detail.
pub(crate) fn job_detail(job: &Job, recent: &[Run], now: Timestamp) -> String {
    let spec = &job.spec;
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<14}{value}");
    };
    field("job", spec.id.to_string());
    field("schedule", schedule(&spec.schedule));
    field(
        "state",
        match &job.state {
            JobState::Disabled { reason } => format!("disabled: {reason}"),
            other => state_word(other).to_string(),
        },
    );
    if let Some(next) = job.next_fire() {
        let zone = zone_of(&spec.schedule);
        field(
            "next",
            format!("{} ({})", local_time(next, zone), relative(next, now)),
        );
    }
    if let Some(last) = job.last_fired {
        field("last fired", time(last));
    }
    if let Some(origin) = &spec.origin {
        let origin = origin.strip_prefix("config:").map_or_else(
            || origin.to_string(),
            |path| format!("{path} (taking it out of the file removes the job at the next load)"),
        );
        field("defined in", origin);
    }
    if let Some(last) = &job.last_run {
        field(
            "last run",
            format!(
                "{} {} ({})",
                last.run,
                last_result(last.state, job.failures_in_a_row),
                relative(last.finished_at, now)
            ),
        );
    }
    if spec.external {
        field(
            "run by",
            format!("external workers of kind {:?}", &*spec.kind),
        );
        if !spec.payload.is_empty() {
            field("payload", clip(&spec.payload, 200));
        }
    } else if &*spec.kind == crate::command_job::KIND {
        match CommandSpec::from_payload(&spec.payload) {
            Ok(command) => {
                let argv = command
                    .argv
                    .iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ");
                field(
                    "command",
                    if command.shell {
                        format!("sh -c {}", shell_quote(&command.argv.join(" ")))
                    } else {
                        argv
                    },
                );
                if let Some(cwd) = &command.cwd {
                    field("cwd", cwd.display().to_string());
                }
                for (name, value) in &command.env {
                    field("env", format!("{name}={value}"));
                }
                let codes = &command.exit_codes;
                if !codes.retryable.is_empty() {
                    field("retry on exit", format!("{:?}", codes.retryable));
                }
                if !codes.permanent.is_empty() {
                    field("never retry on", format!("{:?}", codes.permanent));
                }
                if !codes.success.is_empty() {
                    field("success on", format!("{:?}", codes.success));
                }
            }
            Err(e) => field("command", format!("(unreadable payload: {e})")),
        }
    } else {
        field("kind", spec.kind.to_string());
    }
    let retry = &spec.retry;
    field(
        "attempts",
        format!(
            "{} (backoff {}..{}, lost attempts allowed {})",
            retry.attempts_max,
            format_duration_ms(retry.backoff_base_ms),
            format_duration_ms(retry.backoff_cap_ms),
            retry.lost_attempts_max
        ),
    );
    if let Some(timeout) = spec.timeout_ms {
        field("timeout", format_duration_ms(timeout));
    }
    field("overlap", overlap_name(spec.overlap).into());
    field("misfire", misfire_name(spec.misfire));
    if spec.delete_after_run {
        field("after its run", "deleted".into());
    }
    for sink in spec.sinks.iter() {
        field("notify", sink.to_string());
    }
    field("active runs", job.active_runs.to_string());
    if !job.backlog.is_empty() {
        field("waiting slots", job.backlog.len().to_string());
    }
    if !recent.is_empty() {
        out.push_str("\nrecent runs\n");
        out.push_str(&runs_table(recent, now));
    }
    out
}

/// Runs as a table.
pub(crate) fn runs_table(runs: &[Run], _now: Timestamp) -> String {
    if runs.is_empty() {
        return "no runs\n".into();
    }
    let mut table = Table::new(&[
        "RUN", "JOB", "STATE", "ATTEMPT", "TRIGGER", "CREATED", "FINISHED", "NOTE",
    ]);
    for run in runs {
        table.row(vec![
            run.id().to_string(),
            run.job().to_string(),
            run_state(&run.state()),
            run.attempt().to_string(),
            trigger(&run.trigger()),
            time(run.created_at()),
            run.finished_at().map_or_else(|| "-".into(), time),
            run_note(run).map_or_else(String::new, |n| clip(&n, 60)),
        ]);
    }
    table.render()
}

fn trigger(trigger: &Trigger) -> String {
    match trigger {
        Trigger::Scheduled { .. } => "schedule".into(),
        Trigger::Manual => "manual".into(),
    }
}

/// A run's state in a word or two (`backing_off until …`).
pub(crate) fn run_state(state: &RunState) -> String {
    match state {
        RunState::BackingOff { until } => format!("backing_off until {}", time(*until)),
        other => other.name().to_string(),
    }
}

/// What is worth saying about a run: its summary on success, else its last error.
pub(crate) fn run_note(run: &Run) -> Option<String> {
    if run.state() == RunState::Succeeded {
        // An earlier attempt's error is not the note of a success.
        return run.summary().map(terminal_safe);
    }
    if let Some(progress) = run.progress().filter(|_| !run.state().is_terminal()) {
        return Some(format!(
            "{}: {}",
            terminal_safe(&progress.phase),
            terminal_safe(&progress.message)
        ));
    }
    run.last_error().map(|e| {
        let kind = error_kind_word(run, e);
        format!(
            "{kind} (attempt {}): {}",
            e.attempt,
            terminal_safe(&e.message)
        )
    })
}

/// How a run's last error is named: its kind, except that a retryable error that ended the run
/// (no attempts left, or past its deadline) is not called retryable.
fn error_kind_word(run: &Run, error: &keel_core::RunError) -> String {
    if run.state() == RunState::Failed && error.kind == keel_core::ErrorKind::Retryable {
        "failed, no attempts left".into()
    } else {
        error.kind.to_string()
    }
}

/// One run in detail, with its audit trail.
pub(crate) fn run_detail(run: &Run, audit: &[AuditRecord], now: Timestamp) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<14}{value}");
    };
    field("run", format!("{} of job {}", run.id(), run.job()));
    field("state", run_state(&run.state()));
    if run.cancel_requested() && !run.state().is_terminal() {
        field("cancel", "requested; the attempt was asked to stop".into());
    }
    field(
        "trigger",
        match run.trigger() {
            Trigger::Scheduled { slot } => format!("schedule, slot {}", time(slot)),
            Trigger::Manual => "manual".into(),
        },
    );
    field("created", time(run.created_at()));
    if let Some(finished) = run.finished_at() {
        field(
            "finished",
            format!("{} ({})", time(finished), relative(finished, now)),
        );
    }
    // Lost and snoozed attempts have budgets of their own: only the rest count against
    // attempts_max.
    let mut attempts = format!(
        "{} started; {} of {} counted",
        run.attempt().0,
        run.attempts_counted(),
        run.retry().attempts_max
    );
    if run.lost() > 0 {
        attempts.push_str(&format!(
            ", {} of {} lost",
            run.lost(),
            run.retry().lost_attempts_max
        ));
    }
    if run.snoozes() > 0 {
        attempts.push_str(&format!(", {} snoozed", run.snoozes()));
    }
    field("attempts", attempts);
    field(
        "kind",
        if run.external() {
            format!("{} (external workers)", run.kind())
        } else {
            run.kind().to_string()
        },
    );
    if let Some(lease) = run.lease() {
        field(
            "lease",
            format!(
                "{} holds {}, expires {} ({})",
                lease.owner,
                lease.token,
                time(lease.expires_at),
                relative(lease.expires_at, now)
            ),
        );
    }
    if let Some(progress) = run.progress() {
        field(
            "progress",
            format!(
                "{}: {} ({})",
                terminal_safe(&progress.phase),
                terminal_safe(&progress.message),
                time(progress.at)
            ),
        );
    }
    if let Some(checkpoint) = run.checkpoint() {
        field(
            "checkpoint",
            format!(
                "#{} from attempt {} at {}: {}",
                checkpoint.seq,
                checkpoint.attempt,
                time(checkpoint.saved_at),
                clip(&checkpoint.data, 80)
            ),
        );
    }
    if let Some(summary) = run.summary() {
        field("summary", terminal_safe(summary));
    }
    if let Some(error) = run.last_error() {
        field(
            "last error",
            format!(
                "{} in attempt {} at {}",
                error_kind_word(run, error),
                error.attempt,
                time(error.at)
            ),
        );
        for line in terminal_safe(&error.message).lines() {
            let _ = writeln!(out, "{:<14}{line}", "");
        }
    }
    for (name, value) in run.artifacts() {
        let (name, value) = (terminal_safe(name), terminal_safe(value));
        let _ = writeln!(out, "{:<14}{name}={value}", "artifact");
    }
    out.push_str("\naudit trail\n");
    if audit.is_empty() {
        out.push_str("(none: pruned by the history policy)\n");
    } else {
        out.push_str(&audit_table(audit));
    }
    out
}

/// An audit record's change of state: `running -> succeeded`.
fn change(r: &AuditRecord) -> String {
    match r.old {
        Some(old) if old == r.new => r.new.to_string(),
        Some(old) => format!("{old} -> {}", r.new),
        None => format!("-> {}", r.new),
    }
}

fn audit_table(records: &[AuditRecord]) -> String {
    let mut table = Table::new(&["SEQ", "AT", "ACTOR", "ATTEMPT", "TOKEN", "CHANGE", "REASON"]);
    for r in records {
        table.row(vec![
            r.seq.to_string(),
            time(r.at),
            r.actor.to_string(),
            r.attempt.map_or_else(String::new, |a| a.to_string()),
            r.fencing_token
                .map_or_else(String::new, |t| t.0.to_string()),
            change(r),
            clip(&r.reason, 70),
        ]);
    }
    table.render()
}

/// A job's history as a table (SPEC O2, O5): its definition's and state's changes.
pub(crate) fn job_history(job: &keel_core::JobId, records: &[AuditRecord]) -> String {
    if records.is_empty() {
        return format!("no history for job {job} (pruned by the history policy)\n");
    }
    let mut table = Table::new(&["SEQ", "AT", "ACTOR", "CHANGE", "REASON"]);
    for r in records {
        table.row(vec![
            r.seq.to_string(),
            time(r.at),
            r.actor.to_string(),
            change(r),
            clip(&r.reason, 90),
        ]);
    }
    table.render()
}

/// Incidents as a table.
pub(crate) fn incidents_table(incidents: &[Incident]) -> String {
    if incidents.is_empty() {
        return "no incidents\n".into();
    }
    let mut table = Table::new(&["ID", "KIND", "JOB", "RUN", "OPENED", "RESOLVED", "DETAILS"]);
    for i in incidents {
        let kind = serde_json::to_value(i.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        table.row(vec![
            i.id.to_string(),
            kind,
            i.job.as_ref().map_or_else(String::new, |j| j.to_string()),
            i.run.map_or_else(String::new, |r| r.to_string()),
            time(i.opened_at),
            i.resolved_at.map_or_else(|| "open".into(), time),
            clip(&i.details, 70),
        ]);
    }
    table.render()
}

/// `keel queue`: one row per kind.
pub(crate) fn queue_table(queue: &serde_json::Value) -> String {
    let kinds = queue["kinds"].as_array().cloned().unwrap_or_default();
    if kinds.is_empty() {
        return "no work queued or running\n".into();
    }
    let mut table = Table::new(&[
        "KIND",
        "QUEUED",
        "OLDEST WAIT",
        "BACKING OFF",
        "RUNNING",
        "PAST LEASE",
        "STUCK",
        "WORKERS",
    ]);
    let number = |v: &serde_json::Value| v.as_u64().unwrap_or(0).to_string();
    for k in &kinds {
        let wait = k["oldest_wait_ms"].as_u64().map_or_else(String::new, |ms| {
            duration(std::time::Duration::from_millis(ms))
        });
        let workers: Vec<&str> = k["workers_seen"]
            .as_object()
            .map(|w| w.keys().map(String::as_str).collect())
            .unwrap_or_default();
        table.row(vec![
            k["kind"].as_str().unwrap_or("").to_string(),
            number(&k["queued"]),
            wait,
            number(&k["backing_off"]),
            number(&k["running"]),
            number(&k["lease_expired"]),
            number(&k["stuck"]),
            if workers.is_empty() {
                "none seen".into()
            } else {
                clip(&workers.join(", "), 40)
            },
        ]);
    }
    table.render()
}

/// `keel workers`: one row per worker and kind.
pub(crate) fn workers_table(workers: &[keel_core::WorkerHealth]) -> String {
    if workers.is_empty() {
        return "no worker seen since the daemon started\n".into();
    }
    let mut table = Table::new(&[
        "WORKER",
        "KIND",
        "SCORE",
        "CLAIMS",
        "OK",
        "FAILED",
        "LEASES LOST",
        "IDLE LOOPS",
        "LAST SEEN",
    ]);
    for w in workers {
        table.row(vec![
            w.worker.to_string(),
            w.kind.clone(),
            w.score.to_string(),
            w.stats.claims.to_string(),
            w.stats.successes.to_string(),
            w.stats.failures.to_string(),
            w.stats.lease_losses.to_string(),
            w.stats.idle_loops.to_string(),
            time(w.stats.last_seen),
        ]);
    }
    table.render()
}

/// `keel rules`: one row per rule.
pub(crate) fn rules_table(rules: &[keel_core::watchdog::Rule]) -> String {
    let mut table = Table::new(&["RULE", "THRESHOLD", "ACTION", "ESCALATION"]);
    for r in rules {
        table.row(vec![
            r.name.clone(),
            clip(&r.threshold, 40),
            clip(&r.action, 50),
            clip(&r.escalation, 40),
        ]);
    }
    table.render()
}

/// An event as one line of the daemon's log.
pub(crate) fn event_line(event: &Event) -> String {
    match event {
        Event::RunFinished { run, job, state } => format!("{run} of job {job} {state}"),
        Event::RetryScheduled { run, at } => format!("{run} failed; retrying at {}", time(*at)),
        Event::JobDisabled { job, reason } => format!("job {job} disabled: {reason}"),
        Event::JobDeleted { job, reason } => format!("job {job} deleted: {reason}"),
        Event::SlotsDropped { job, count, reason } => {
            format!("job {job}: {count} slot(s) dropped ({reason})")
        }
        Event::LeaseGranted { run, owner, token } => {
            if crate::direct::is_daemon_worker(owner.as_str()) {
                format!("{run} started ({token})")
            } else {
                format!("{run} claimed by worker {owner} ({token})")
            }
        }
        Event::LeaseReclaimed { run, token } => format!(
            "{run}: lease {token} reclaimed after its holder went silent; the attempt counts as \
             lost"
        ),
        Event::LeaseReleased { run, token } => {
            format!("{run}: lease {token} released by an operator; the run waits for a worker")
        }
        Event::IncidentOpened(i) => match &i.opened_by {
            Some(op) => format!(
                "incident #{} opened ({}) by {}: {}",
                i.id,
                incident_kind(i),
                op.by,
                i.details
            ),
            None => format!(
                "incident #{} opened ({}): {}",
                i.id,
                incident_kind(i),
                i.details
            ),
        },
        Event::IncidentResolved(i) => match &i.resolved_by {
            Some(op) => format!(
                "incident #{} resolved ({}) by {}: {}",
                i.id,
                incident_kind(i),
                op.by,
                op.reason
            ),
            None => format!("incident #{} resolved ({})", i.id, incident_kind(i)),
        },
        Event::IncidentAcknowledged(i) => {
            let by = i.acknowledged.as_ref().map_or("", |op| op.by.as_str());
            format!(
                "incident #{} acknowledged ({}) by {by}",
                i.id,
                incident_kind(i)
            )
        }
        Event::IncidentEscalated(i) => format!(
            "incident #{} escalated ({}): open and unacknowledged since {}",
            i.id,
            incident_kind(i),
            time(i.opened_at)
        ),
        Event::IncidentSuppressed { details, .. } => {
            format!("incident not recorded (too many are open): {details}")
        }
        Event::CheckpointSaved { run, seq } => format!("{run} checkpoint #{seq} saved"),
        Event::CheckpointThrottled { run } => {
            format!("{run} checkpoint kept (throttled; written by a later save)")
        }
        Event::CheckpointFailed { run, seq, error } => {
            format!("{run} checkpoint #{seq} failed: {error}")
        }
        Event::Delivery(OutboxEvent::Finished {
            sink,
            subject,
            status,
            attempts,
            error,
            ..
        }) => {
            let status = format!("{status:?}").to_lowercase();
            let mut line = format!(
                "{} delivery to {} {status} after {attempts} attempt(s)",
                delivered(subject),
                redact_url(sink)
            );
            if let Some(error) = error {
                line.push_str(&format!(": {error}"));
            }
            line
        }
        Event::Delivery(OutboxEvent::Dropped {
            sink,
            subject,
            reason,
            ..
        }) => format!(
            "{} delivery to {} dropped: {reason:?}",
            delivered(subject),
            redact_url(sink)
        ),
        Event::Delivery(OutboxEvent::RetryScheduled {
            sink, attempt, at, ..
        }) => format!(
            "result delivery to {} will retry (attempt {attempt}) at {}",
            redact_url(sink),
            time(*at)
        ),
        Event::PersistFailed {
            batch,
            error,
            retry_at,
        } => format!(
            "store write {batch} failed: {error}; retrying at {}",
            time(*retry_at)
        ),
        Event::StoreRecovered {
            failing_since,
            failures,
        } => format!(
            "store outage over: writes succeed again after {failures} failed write(s) since {}; \
             what waited is written now",
            time(*failing_since)
        ),
    }
}

/// What a delivery carried, as a log line names it: `run-12 result`, or
/// `incident #4 notification`.
fn delivered(subject: &DeliverySubject) -> String {
    match subject {
        DeliverySubject::Run(run) => format!("{run} result"),
        DeliverySubject::Incident(id) => format!("incident #{id} notification"),
    }
}

fn incident_kind(incident: &Incident) -> String {
    serde_json::to_value(incident.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A word quoted for a POSIX shell if it needs it.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `keel status`, for people: which daemon answered, and on a shared store who leads.
pub(crate) fn status(found: &crate::anyhost::Found, now: Timestamp) -> String {
    use crate::anyhost::Via;
    let st = &found.status;
    let mut lines: Vec<(&str, String)> = Vec::new();
    let store = match &found.dir {
        Some(dir) if st.store != "postgres" => format!("{} in {}", st.store, dir.display()),
        _ => st.store.clone(),
    };
    lines.push(("store", store));
    let pid = st
        .pid
        .or(found.standby)
        .map_or(String::new(), |p| format!(" (pid {p})"));
    let daemon = match (found.via, found.daemon()) {
        (Via::Server, state) => format!(
            "{} (the daemon --server names){pid}",
            state.replace('_', " ")
        ),
        (_, "leading") => format!("running here and leading{pid}"),
        (_, "standing_by") => format!("running here, standing by{pid}"),
        (_, "running") => format!("running{pid}"),
        _ if st.store == "postgres" => "not running on this host".to_string(),
        _ => "not running (start it with `keel run`)".to_string(),
    };
    lines.push(("daemon", daemon));
    lines.push(("worker", st.worker.clone()));
    if let Some(leader) = &st.leader {
        match &leader.holder {
            None => lines.push((
                "leader",
                "none: no daemon holds the lease (a standby, if one runs, takes it within a second)".to_string(),
            )),
            Some(holder) => {
                let term = leader
                    .term
                    .map_or(String::new(), |t| format!(" (term {t})"));
                lines.push(("leader", format!("{}{term}", terminal_safe(holder))));
                let at = |ms: Option<i64>| {
                    ms.map_or(String::new(), |ms| {
                        let t = Timestamp(ms);
                        format!("{} ({})", time(t), relative(t, now))
                    })
                };
                lines.push(("since", at(leader.since_ms)));
                lines.push((
                    "expires",
                    format!("{}, unless renewed", at(leader.expires_ms)),
                ));
                lines.push((
                    "api",
                    leader.api.as_deref().map_or_else(
                        || "none (commands from other hosts cannot reach it)".to_string(),
                        terminal_safe,
                    ),
                ));
                if let Some(skew) = leader.clock_skew_ms {
                    let size = duration(Duration::from_millis(skew.unsigned_abs()));
                    let side = if skew >= 0 { "ahead of" } else { "behind" };
                    lines.push((
                        "clock",
                        format!("the leader's clock is {size} {side} the database's"),
                    ));
                }
            }
        }
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    lines
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{JobId, RunId, StateName};

    #[test]
    fn a_success_is_not_noted_with_an_earlier_attempts_error() {
        let mut record = keel_harness::conformance::run(1, "backup", Timestamp(0)).record();
        record.state = RunState::Succeeded;
        record.last_error = Some(Box::new(keel_core::RunError {
            kind: keel_core::ErrorKind::Lost,
            message: "attempt 1 released by local".into(),
            attempt: keel_core::Attempt(1),
            at: Timestamp(0),
        }));
        assert_eq!(run_note(&Run::from_record(record.clone())), None);
        record.summary = Some("archived 3 files".into());
        assert_eq!(
            run_note(&Run::from_record(record.clone())).as_deref(),
            Some("archived 3 files")
        );
        record.state = RunState::Failed;
        assert!(run_note(&Run::from_record(record))
            .unwrap()
            .contains("released by local"));
    }

    #[test]
    fn times_and_schedules_read_well() {
        let t = Timestamp::parse_rfc3339("2026-01-01T09:30:00Z").unwrap();
        assert_eq!(time(t), "2026-01-01 09:30:00Z");
        let paris: Tz = "Europe/Paris".parse().unwrap();
        assert_eq!(local_time(t, paris), "2026-01-01 10:30:00 CET (+01:00)");
        assert_eq!(relative(t.plus_ms(5_400), t), "in 5s");
        assert_eq!(relative(t, t.plus_ms(90_000)), "1m30s ago");
        let every = ScheduleSpec::Every {
            interval_ms: 300_000,
            anchor: Timestamp::EPOCH,
        };
        assert_eq!(schedule(&every), "every 5m");
        let cron = ScheduleSpec::Cron {
            expr: "0 30 2 * * *".into(),
            zone: "Europe/Paris".into(),
        };
        assert_eq!(schedule(&cron), "cron 0 30 2 * * * (Europe/Paris)");
    }

    #[test]
    fn events_are_one_line_each() {
        let finished = Event::RunFinished {
            run: RunId(3),
            job: JobId::new("tick").unwrap(),
            state: StateName::Succeeded,
        };
        assert_eq!(event_line(&finished), "run-3 of job tick succeeded");
        let dropped = Event::SlotsDropped {
            job: JobId::new("tick").unwrap(),
            count: "2".into(),
            reason: "overlap skip".into(),
        };
        assert!(!event_line(&dropped).contains('\n'));
    }

    #[test]
    fn words_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("echo"), "echo");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn status_says_who_leads_and_whether_this_host_does() {
        use crate::anyhost::{Found, Via};
        use crate::protocol::{DaemonStatus, LeaderStatus};
        let now = Timestamp(1_800_000_000_000);
        let found = Found {
            via: Via::Database,
            status: DaemonStatus {
                pid: None,
                store: "postgres".into(),
                worker: "local:host-b".into(),
                leader: Some(LeaderStatus {
                    leading: false,
                    holder: Some("host-a:4711:9f2c1a00".into()),
                    term: Some(3),
                    since: None,
                    since_ms: Some(now.0 - 7_500_000),
                    expires: None,
                    expires_ms: Some(now.0 + 8_000),
                    api: Some("http://10.0.0.5:8080".into()),
                    clock_skew_ms: None,
                }),
            },
            standby: Some(5120),
            dir: Some("/var/lib/keel".into()),
        };
        let text = status(&found, now);
        assert_eq!(
            text,
            "store    postgres\n\
             daemon   running here, standing by (pid 5120)\n\
             worker   local:host-b\n\
             leader   host-a:4711:9f2c1a00 (term 3)\n\
             since    2027-01-15 05:55:00Z (2h5m ago)\n\
             expires  2027-01-15 08:00:08Z (in 8s), unless renewed\n\
             api      http://10.0.0.5:8080\n"
        );
        let none = Found {
            via: Via::Nothing,
            status: DaemonStatus {
                pid: None,
                store: "fs".into(),
                worker: "local".into(),
                leader: None,
            },
            standby: None,
            dir: Some("/home/ada/.local/state/keel".into()),
        };
        assert_eq!(
            status(&none, now),
            "store   fs in /home/ada/.local/state/keel\n\
             daemon  not running (start it with `keel run`)\n\
             worker  local\n"
        );
    }
}

//! What `--json` prints (SPEC O6): documented view objects, apart from the stored records and
//! the control socket's wire types, so that neither a change of storage nor of the protocol
//! changes what scripts read. `docs/cli.md` ("JSON output") documents each shape, and the tests
//! below pin them.
//!
//! The rules: states are flat names (`"state": "failed"`); times are RFC 3339 strings with a
//! `*_ms` twin (milliseconds since the Unix epoch); runs, tokens and jobs are named as the
//! tables name them (`"run": "run-7"`, `"token": "token-9"`, `"job": "backup"`); a command
//! job's command is an object with its argv as an array; optional fields are `null` when
//! absent, never missing.

use std::collections::BTreeMap;

use keel_core::{
    AuditRecord, Incident, Job, JobState, NotifyOn, Run, RunState, ScheduleSpec, Timestamp, Trigger,
};
use serde_json::{json, Value};

use crate::command_job::{self, CommandSpec};
use crate::error::Failure;
use crate::jobdef::redact_url;

/// Prints a value as pretty JSON.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::runtime(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// A time as a pair of fields: `name` (RFC 3339) and `name_ms`.
fn time(fields: &mut serde_json::Map<String, Value>, name: &str, at: Option<Timestamp>) {
    fields.insert(
        name.into(),
        at.map_or(Value::Null, |t| json!(t.to_string())),
    );
    fields.insert(format!("{name}_ms"), at.map_or(Value::Null, |t| json!(t.0)));
}

/// An object from `(key, value)` pairs, in order, with times added by `times`.
fn object(
    pairs: Vec<(&str, Value)>,
    times: &[(&str, Option<Timestamp>)],
) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    for (key, value) in pairs {
        fields.insert(key.into(), value);
    }
    for (name, at) in times {
        time(&mut fields, name, *at);
    }
    fields
}

/// A job.
pub(crate) fn job(job: &Job) -> Value {
    let spec = &job.spec;
    let (state, reason) = match &job.state {
        JobState::Scheduled { .. } => ("scheduled", None),
        JobState::Paused { .. } => ("paused", None),
        JobState::Disabled { reason } => ("disabled", Some(reason.clone())),
    };
    let schedule = match &spec.schedule {
        ScheduleSpec::Cron { expr, zone } => json!({ "kind": "cron", "expr": expr, "zone": zone }),
        ScheduleSpec::Once { at } => {
            Value::Object(object(vec![("kind", json!("once"))], &[("at", Some(*at))]))
        }
        ScheduleSpec::Every {
            interval_ms,
            anchor,
        } => Value::Object(object(
            vec![
                ("kind", json!("every")),
                ("interval_ms", json!(interval_ms)),
            ],
            &[("anchor", Some(*anchor))],
        )),
    };
    let command = (&*spec.kind == command_job::KIND && !spec.external)
        .then(|| CommandSpec::from_payload(&spec.payload).ok())
        .flatten()
        .map(|c| {
            json!({
                "argv": c.argv,
                "shell": c.shell,
                "cwd": c.cwd,
                "env": c.env,
            })
        });
    let last_run = job.last_run.as_ref().map(|last| {
        Value::Object(object(
            vec![
                ("run", json!(last.run.to_string())),
                ("state", json!(last.state.to_string())),
            ],
            &[("finished_at", Some(last.finished_at))],
        ))
    });
    let notify: Vec<String> = spec.sinks.iter().map(|s| redact_url(s)).collect();
    let fields = object(
        vec![
            ("name", json!(spec.id.as_str())),
            ("kind", json!(&*spec.kind)),
            ("external", json!(spec.external)),
            ("schedule", schedule),
            ("state", json!(state)),
            ("disabled_reason", json!(reason)),
            ("command", command.unwrap_or(Value::Null)),
            (
                "payload",
                if spec.external {
                    json!(&*spec.payload)
                } else {
                    Value::Null
                },
            ),
            ("required_artifacts", json!(&*spec.required_artifacts)),
            ("attempts_max", json!(spec.retry.attempts_max)),
            ("timeout_ms", json!(spec.timeout_ms)),
            ("notify", json!(notify)),
            (
                "notify_on",
                json!(match spec.notify_on {
                    NotifyOn::Always => "always",
                    NotifyOn::Failure => "failure",
                }),
            ),
            ("defined_in", json!(spec.origin.as_deref())),
            ("active_runs", json!(job.active_runs)),
            ("last_run", last_run.unwrap_or(Value::Null)),
            ("failures_in_a_row", json!(job.failures_in_a_row)),
        ],
        &[("next", job.next_fire()), ("last_fired", job.last_fired)],
    );
    Value::Object(fields)
}

/// A run.
pub(crate) fn run(run: &Run) -> Value {
    let (trigger, slot) = match run.trigger() {
        Trigger::Scheduled { slot } => ("scheduled", Some(slot)),
        Trigger::Manual => ("manual", None),
    };
    let (waiting_since, retry_at) = match run.state() {
        RunState::Queued { since } => (Some(since), None),
        RunState::BackingOff { until } => (None, Some(until)),
        _ => (None, None),
    };
    let error = run.last_error().map(|e| {
        Value::Object(object(
            vec![
                ("kind", json!(e.kind.to_string())),
                ("message", json!(e.message)),
                ("attempt", json!(e.attempt.0)),
            ],
            &[("at", Some(e.at))],
        ))
    });
    let lease = run.lease().map(|l| {
        Value::Object(object(
            vec![
                ("worker", json!(l.owner.as_str())),
                ("token", json!(l.token.to_string())),
            ],
            &[("expires_at", Some(l.expires_at))],
        ))
    });
    let progress = run.progress().map(|p| {
        Value::Object(object(
            vec![("phase", json!(p.phase)), ("message", json!(p.message))],
            &[("at", Some(p.at))],
        ))
    });
    let checkpoint = run.checkpoint().map(|c| {
        Value::Object(object(
            vec![
                ("seq", json!(c.seq)),
                ("attempt", json!(c.attempt.0)),
                ("data", json!(c.data)),
            ],
            &[("saved_at", Some(c.saved_at))],
        ))
    });
    let verifications: Vec<Value> = run.verifications().iter().map(verification).collect();
    let artifacts: BTreeMap<&str, &str> = run
        .artifacts()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Value::Object(object(
        vec![
            ("run", json!(run.id().to_string())),
            ("job", json!(run.job().as_str())),
            ("state", json!(run.state().name().to_string())),
            ("attempt", json!(run.attempt().0)),
            ("trigger", json!(trigger)),
            ("summary", json!(run.summary())),
            ("error", error.unwrap_or(Value::Null)),
            ("cancel_requested", json!(run.cancel_requested())),
            ("lease", lease.unwrap_or(Value::Null)),
            ("last_token", json!(run.last_token().map(|t| t.to_string()))),
            ("progress", progress.unwrap_or(Value::Null)),
            ("checkpoint", checkpoint.unwrap_or(Value::Null)),
            ("artifacts", json!(artifacts)),
            ("verifications", json!(verifications)),
            ("lost_attempts", json!(run.lost())),
            ("shutdown_interruptions", json!(run.shutdowns())),
        ],
        &[
            ("slot", slot),
            ("created_at", Some(run.created_at())),
            ("finished_at", run.finished_at()),
            ("waiting_since", waiting_since),
            ("retry_at", retry_at),
        ],
    ))
}

/// An audit record.
pub(crate) fn audit(record: &AuditRecord) -> Value {
    Value::Object(object(
        vec![
            ("seq", json!(record.seq)),
            ("job", json!(record.job.as_str())),
            ("run", json!(record.run.map(|r| r.to_string()))),
            ("attempt", json!(record.attempt.map(|a| a.0))),
            ("token", json!(record.fencing_token.map(|t| t.to_string()))),
            ("from", json!(record.old.map(|s| s.to_string()))),
            ("to", json!(record.new.to_string())),
            ("actor", json!(record.actor.to_string())),
            ("reason", json!(record.reason)),
            ("output", json!(record.output)),
        ],
        &[("at", Some(record.at))],
    ))
}

/// One artifact check's evidence (the artifact gate, or a worker's `verify`).
pub(crate) fn verification(v: &keel_core::artifact::Verification) -> Value {
    Value::Object(object(
        vec![
            ("artifact", json!(v.name)),
            ("target", json!(v.target)),
            ("ok", json!(v.ok)),
            ("status", json!(v.status)),
            ("error", json!(v.error)),
            ("excerpt", json!(v.excerpt)),
            ("attempt", json!(v.attempt.0)),
        ],
        &[("at", Some(v.at))],
    ))
}

/// What an operator's lease action did.
pub(crate) fn lease_action(run: keel_core::RunId, action: &keel_core::LeaseAction) -> Value {
    match action {
        keel_core::LeaseAction::Released {
            owner,
            token,
            state,
        }
        | keel_core::LeaseAction::Reclaimed {
            owner,
            token,
            state,
        } => json!({
            "run": run.to_string(),
            "action": if matches!(action, keel_core::LeaseAction::Released { .. }) { "released" } else { "reclaimed" },
            "previous_owner": owner.as_str(),
            "previous_token": token.to_string(),
            "state": state.to_string(),
        }),
        keel_core::LeaseAction::Restored { lease, previous } => json!({
            "run": run.to_string(),
            "action": "restored",
            "owner": lease.owner.as_str(),
            "token": lease.token.to_string(),
            "previous_token": previous.to_string(),
            "lease_expires_at": lease.expires_at.to_string(),
            "lease_expires_at_ms": lease.expires_at.0,
            "state": "running",
        }),
    }
}

/// An incident.
pub(crate) fn incident(incident: &Incident) -> Value {
    let kind = serde_json::to_value(incident.kind).unwrap_or(Value::Null);
    Value::Object(object(
        vec![
            ("id", json!(incident.id)),
            ("kind", kind),
            ("open", json!(incident.resolved_at.is_none())),
            ("job", json!(incident.job.as_ref().map(|j| j.as_str()))),
            ("run", json!(incident.run.map(|r| r.to_string()))),
            (
                "worker",
                json!(incident.worker.as_ref().map(|w| w.as_str())),
            ),
            ("details", json!(incident.details)),
            ("queue", json!(incident.queue)),
            (
                "opened_by",
                json!(incident.opened_by.as_ref().map(|op| &op.by)),
            ),
            (
                "acknowledged_by",
                json!(incident.acknowledged.as_ref().map(|op| &op.by)),
            ),
            (
                "acknowledged_note",
                json!(incident.acknowledged.as_ref().map(|op| &op.reason)),
            ),
            (
                "resolved_by",
                json!(incident.resolved_by.as_ref().map(|op| &op.by)),
            ),
            (
                "resolution",
                json!(incident.resolved_by.as_ref().map(|op| &op.reason)),
            ),
        ],
        &[
            ("opened_at", Some(incident.opened_at)),
            (
                "acknowledged_at",
                incident.acknowledged.as_ref().map(|op| op.at),
            ),
            ("resolved_at", incident.resolved_at),
            ("escalated_at", incident.escalated_at),
        ],
    ))
}

/// Views of a list.
pub(crate) fn all<T>(items: &[T], view: impl Fn(&T) -> Value) -> Value {
    Value::Array(items.iter().map(view).collect())
}

/// The object a command acted on, and what it did: `{"job": …, "action": "paused",
/// "changed": true}`.
pub(crate) fn acted(subject: &str, value: Value, action: &str, changed: bool) -> Value {
    let mut fields = serde_json::Map::new();
    fields.insert(subject.into(), value);
    fields.insert("action".into(), json!(action));
    fields.insert("changed".into(), json!(changed));
    Value::Object(fields)
}

/// `keel status`: the daemon that answered (or that none did), and on a shared store who
/// leads.
pub(crate) fn status(found: &crate::anyhost::Found) -> Value {
    let status = &found.status;
    let leader = status
        .leader
        .as_ref()
        .filter(|l| l.holder.is_some())
        .map(|l| {
            let holder = l.holder.clone().unwrap_or_default();
            Value::Object(object(
                vec![
                    ("host", json!(holder_host(&holder))),
                    ("holder", json!(holder)),
                    ("term", json!(l.term)),
                    ("api", json!(l.api)),
                    ("clock_skew_ms", json!(l.clock_skew_ms)),
                ],
                &[
                    ("since", l.since_ms.map(Timestamp)),
                    ("expires", l.expires_ms.map(Timestamp)),
                ],
            ))
        });
    Value::Object(object(
        vec![
            ("daemon", json!(found.daemon())),
            ("via", json!(found.via.name())),
            ("pid", json!(status.pid.or(found.standby))),
            ("store", json!(status.store)),
            ("worker", json!(status.worker)),
            (
                "data_dir",
                json!(found.dir.as_ref().map(|d| d.display().to_string())),
            ),
            ("leader", leader.unwrap_or(Value::Null)),
        ],
        &[],
    ))
}

/// The host of a lease holder's name, `HOST:PID:RANDOM`.
pub(crate) fn holder_host(holder: &str) -> &str {
    holder
        .rsplitn(3, ':')
        .nth(2)
        .filter(|host| !host.is_empty())
        .unwrap_or(holder)
}

#[cfg(test)]
mod tests {
    //! Each view's shape, pinned: a renamed or dropped field fails here before it breaks a
    //! script (`docs/cli.md`, "JSON output", lists the same fields).

    use keel_core::{
        Actor, Attempt, FencingToken, IncidentKind, JobId, JobSpec, JobState, RunId, RunTerms,
        StateName, WorkerId,
    };

    use super::*;

    fn keys(value: &Value) -> Vec<&str> {
        value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    const T: Timestamp = Timestamp(1_800_000_000_000);

    #[test]
    fn a_job_view_has_flat_states_named_ids_times_with_ms_twins_and_argv_as_an_array() {
        let command = CommandSpec::from_payload(r#"{"argv":["tar","czf","x.tgz"]}"#).unwrap();
        let spec = JobSpec::new(
            JobId::new("backup").unwrap(),
            command_job::KIND,
            ScheduleSpec::cron("0 30 2 * * *"),
        )
        .with_payload(command.to_payload());
        let job = Job {
            spec,
            state: JobState::Scheduled { next: T },
            backlog: Default::default(),
            last_fired: None,
            active_runs: 0,
            delete_when_idle: false,
            last_run: Some(keel_core::LastRun {
                run: RunId(7),
                state: StateName::Failed,
                finished_at: T,
            }),
            failures_in_a_row: 2,
        };
        let view = super::job(&job);
        assert_eq!(
            keys(&view),
            [
                "active_runs",
                "attempts_max",
                "command",
                "defined_in",
                "disabled_reason",
                "external",
                "failures_in_a_row",
                "kind",
                "last_fired",
                "last_fired_ms",
                "last_run",
                "name",
                "next",
                "next_ms",
                "notify",
                "notify_on",
                "payload",
                "required_artifacts",
                "schedule",
                "state",
                "timeout_ms",
            ]
        );
        assert_eq!(view["name"], "backup");
        assert_eq!(view["state"], "scheduled");
        assert_eq!(view["next"], "2027-01-15T08:00:00.000Z");
        assert_eq!(view["next_ms"], T.0);
        assert_eq!(view["command"]["argv"], json!(["tar", "czf", "x.tgz"]));
        assert_eq!(
            view["schedule"],
            json!({"kind": "cron", "expr": "0 30 2 * * *", "zone": "UTC"})
        );
        assert_eq!(view["last_run"]["run"], "run-7");
        assert_eq!(view["last_run"]["state"], "failed");
        assert_eq!(view["last_run"]["finished_at_ms"], T.0);
    }

    #[test]
    fn a_run_view_names_its_run_job_token_and_state_as_the_tables_do() {
        let terms = RunTerms {
            external: true,
            ..RunTerms::new("render")
        };
        let mut record = Run::new(
            RunId(7),
            JobId::new("render").unwrap(),
            Trigger::Scheduled { slot: T },
            T,
            terms,
        )
        .record();
        record.last_token = Some(FencingToken(9));
        let run = Run::from_record(record);
        let view = super::run(&run);
        assert_eq!(
            keys(&view),
            [
                "artifacts",
                "attempt",
                "cancel_requested",
                "checkpoint",
                "created_at",
                "created_at_ms",
                "error",
                "finished_at",
                "finished_at_ms",
                "job",
                "last_token",
                "lease",
                "lost_attempts",
                "progress",
                "retry_at",
                "retry_at_ms",
                "run",
                "shutdown_interruptions",
                "slot",
                "slot_ms",
                "state",
                "summary",
                "trigger",
                "verifications",
                "waiting_since",
                "waiting_since_ms",
            ]
        );
        assert_eq!(view["run"], "run-7");
        assert_eq!(view["verifications"], json!([]));
        assert_eq!(view["state"], "queued");
        assert_eq!(view["trigger"], "scheduled");
        assert_eq!(view["slot_ms"], T.0);
        assert_eq!(view["last_token"], "token-9");
        assert_eq!(view["finished_at"], Value::Null);
    }

    #[test]
    fn audit_and_incident_views_are_flat_too() {
        let record = AuditRecord {
            seq: 3,
            at: T,
            job: JobId::new("render").unwrap(),
            run: Some(RunId(7)),
            attempt: Some(Attempt(1)),
            fencing_token: Some(FencingToken(9)),
            old: Some(StateName::Running),
            new: StateName::Succeeded,
            actor: Actor::Worker("w1".into()),
            reason: "attempt 1 succeeded".into(),
            output: None,
        };
        let view = audit(&record);
        assert_eq!(
            keys(&view),
            [
                "actor", "at", "at_ms", "attempt", "from", "job", "output", "reason", "run", "seq",
                "to", "token"
            ]
        );
        assert_eq!(
            (&view["from"], &view["to"], &view["actor"], &view["token"]),
            (
                &json!("running"),
                &json!("succeeded"),
                &json!("worker:w1"),
                &json!("token-9")
            )
        );
        let open = Incident {
            id: 4,
            kind: IncidentKind::FailingJob,
            opened_at: T,
            resolved_at: None,
            job: Some(JobId::new("health").unwrap()),
            run: None,
            worker: Some(WorkerId::new("w1").unwrap()),
            details: "3 runs failed in a row".into(),
            queue: None,
            opened_by: None,
            acknowledged: None,
            resolved_by: None,
            escalated_at: Some(T),
        };
        let view = incident(&open);
        assert_eq!(
            keys(&view),
            [
                "acknowledged_at",
                "acknowledged_at_ms",
                "acknowledged_by",
                "acknowledged_note",
                "details",
                "escalated_at",
                "escalated_at_ms",
                "id",
                "job",
                "kind",
                "open",
                "opened_at",
                "opened_at_ms",
                "opened_by",
                "queue",
                "resolution",
                "resolved_at",
                "resolved_at_ms",
                "resolved_by",
                "run",
                "worker",
            ]
        );
        assert_eq!(
            (&view["kind"], &view["open"]),
            (&json!("failing_job"), &json!(true))
        );
        assert_eq!(view["escalated_at_ms"], json!(T.as_millis()));
    }

    #[test]
    fn the_status_view_is_pinned() {
        use crate::anyhost::{Found, Via};
        use crate::protocol::{DaemonStatus, LeaderStatus};
        let leader = LeaderStatus {
            leading: true,
            holder: Some("host-a:4711:9f2c1a00".into()),
            term: Some(3),
            since: Some("ignored".into()),
            since_ms: Some(T.0),
            expires: None,
            expires_ms: Some(T.0 + 10_000),
            api: Some("http://host-a:8080".into()),
            clock_skew_ms: Some(-12),
        };
        let found = Found {
            via: Via::Socket,
            status: DaemonStatus {
                pid: Some(42),
                store: "postgres".into(),
                worker: "local:host-a".into(),
                leader: Some(leader.clone()),
            },
            standby: None,
            dir: Some("/var/lib/keel".into()),
        };
        let view = status(&found);
        assert_eq!(
            keys(&view),
            ["daemon", "data_dir", "leader", "pid", "store", "via", "worker"]
        );
        assert_eq!(view["daemon"], "leading");
        assert_eq!(view["via"], "socket");
        assert_eq!(view["pid"], 42);
        assert_eq!(
            keys(&view["leader"]),
            [
                "api",
                "clock_skew_ms",
                "expires",
                "expires_ms",
                "holder",
                "host",
                "since",
                "since_ms",
                "term"
            ]
        );
        assert_eq!(view["leader"]["host"], "host-a");
        assert_eq!(view["leader"]["since"], T.to_string());
        assert_eq!(view["leader"]["since_ms"], T.0);
        assert_eq!(view["leader"]["expires_ms"], T.0 + 10_000);
        assert_eq!(view["leader"]["clock_skew_ms"], -12);

        // No daemon here on Postgres: the lease read from the database, a standby's pid.
        let read = Found {
            via: Via::Database,
            status: DaemonStatus {
                pid: None,
                leader: Some(LeaderStatus {
                    leading: false,
                    clock_skew_ms: None,
                    ..leader
                }),
                ..found.status.clone()
            },
            standby: Some(7),
            dir: found.dir.clone(),
        };
        let view = status(&read);
        assert_eq!(
            (view["daemon"].as_str(), view["pid"].as_i64()),
            (Some("standing_by"), Some(7))
        );
        assert_eq!(view["leader"]["clock_skew_ms"], Value::Null);

        // fs with no daemon: nothing leads, nothing answers.
        let none = Found {
            via: Via::Nothing,
            status: DaemonStatus {
                pid: None,
                store: "fs".into(),
                worker: "local".into(),
                leader: None,
            },
            standby: None,
            dir: None,
        };
        let view = status(&none);
        assert_eq!(view["daemon"], "not_running");
        assert_eq!(view["via"], "none");
        assert_eq!(view["leader"], Value::Null);
        assert_eq!(holder_host("a:b:host:1:f"), "a:b:host");
        assert_eq!(holder_host("plain"), "plain");
    }
}

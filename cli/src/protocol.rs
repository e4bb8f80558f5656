//! The control socket's protocol: one JSON [`Request`] per line, answered by one JSON
//! [`Response`] per line, any number per connection.
//!
//! ```text
//! → {"request":"trigger_job","job":"backup"}
//! ← {"ok":17}
//! → {"request":"pause_job","job":"nope"}
//! ← {"err":{"code":"bad_input","message":"no job named nope"}}
//! ```
//!
//! Commands answer once what they changed is durable. Reads answer from the store after every
//! change made before them is durable, so a client that saw an event sees its record.

use keel_core::lease::Lease;
use keel_core::run::{Checkpoint, Progress};
use keel_core::scheduler::{CheckpointSave, RunContext};
use keel_core::{
    AttemptStart, AuditQuery, FencingToken, Job, JobId, JobSpec, Outcome, Run, RunId, RunQuery,
    Store, Timestamp, WorkerId,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Failure;

/// A command or a read, as the CLI sends it to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Adds a job (or replaces its definition, with `replace`). Answers [`Added`].
    AddJob {
        spec: JobSpec,
        #[serde(default)]
        replace: bool,
    },
    /// Removes a job. Answers `null`.
    RemoveJob { job: JobId },
    /// Pauses a job; one already paused is left so. Answers whether it changed (`true`), or
    /// was paused already (`false`).
    PauseJob { job: JobId },
    /// Resumes a job; one not paused is left so. Answers whether it changed.
    ResumeJob { job: JobId },
    /// Starts a run now. Answers the run id.
    TriggerJob { job: JobId },
    /// Cancels an active run. Answers `null`.
    CancelRun { run: RunId },
    /// A worker claims work. Answers a [`ClaimedAttempt`] or `null`.
    Claim {
        worker: WorkerId,
        kinds: Vec<String>,
    },
    /// A heartbeat. Answers the renewed [`Lease`].
    Touch { run: RunId, token: FencingToken },
    /// Progress. Answers `null`.
    Progress {
        run: RunId,
        token: FencingToken,
        phase: String,
        message: String,
    },
    /// The holder's context. Answers a [`ContextView`].
    Context { run: RunId, token: FencingToken },
    /// A checkpoint. Answers a [`CheckpointAnswer`].
    Checkpoint {
        run: RunId,
        token: FencingToken,
        data: String,
    },
    /// The attempt's outcome. Answers `null`.
    Complete {
        run: RunId,
        token: FencingToken,
        outcome: Outcome,
    },
    /// Every job. Answers a list of [`JobView`]s.
    Jobs,
    /// Runs, newest first. Answers a [`RunsPage`].
    Runs { query: RunQuery },
    /// One run. Answers a [`Run`] or `null`.
    Run { run: RunId },
    /// Audit records, oldest first. Answers a list of `AuditRecord`s.
    Audit { query: AuditQuery },
    /// Every incident. Answers a list of `Incident`s.
    Incidents,
    /// Every run that is not terminal. Answers a list of [`Run`]s.
    ActiveRuns,
    /// Who answers. Answers a [`DaemonStatus`].
    Status,
    /// Opens an incident by hand (SPEC A3). Answers the `Incident`.
    OpenIncident {
        #[serde(default)]
        job: Option<JobId>,
        #[serde(default)]
        run: Option<RunId>,
        #[serde(default)]
        worker: Option<WorkerId>,
        details: String,
        by: String,
    },
    /// An operator acknowledges an open incident. Answers the `Incident`.
    AcknowledgeIncident {
        incident: u64,
        by: String,
        #[serde(default)]
        note: String,
    },
    /// An operator resolves an open incident. Answers the `Incident`.
    ResolveIncident {
        incident: u64,
        by: String,
        reason: String,
    },
    /// A holder asks keel to check an artifact (the contract's `verify`). Answers the
    /// `Verification` (a failed check is an answer, not an error).
    Verify {
        run: RunId,
        token: FencingToken,
        target: String,
    },
    /// An operator releases, reclaims or restores a run's lease (SPEC W6). Answers what was
    /// done (`views::lease_action`).
    Lease {
        run: RunId,
        action: LeaseOp,
        by: String,
        reason: String,
    },
    /// Queue health per kind, from the daemon's memory. Answers a [`QueueView`].
    Queue,
    /// Worker health per worker and kind, since the daemon started. Answers a list of
    /// `WorkerHealth`.
    Workers,
    /// The watchdog's rules with the daemon's thresholds. Answers a list of `Rule`s.
    Rules,
}

impl Request {
    /// True for requests that only read the store.
    pub(crate) fn is_read(&self) -> bool {
        matches!(
            self,
            Request::Jobs
                | Request::Runs { .. }
                | Request::Run { .. }
                | Request::Audit { .. }
                | Request::Incidents
                | Request::ActiveRuns
                | Request::Status
                | Request::Queue
                | Request::Workers
                | Request::Rules
        )
    }

    /// True for reads only a running daemon can answer: what it holds in memory.
    pub(crate) fn needs_daemon(&self) -> bool {
        matches!(self, Request::Queue | Request::Workers | Request::Rules)
    }
}

/// What an operator does to a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LeaseOp {
    /// Take it away now; the run waits for a worker (no attempt used).
    Release,
    /// Reclaim it as the watchdog would (the attempt counts as lost).
    Reclaim,
    /// Undo a release or reclaim: re-grant it to its previous owner under a new token.
    Restore,
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Response {
    /// Done; the value depends on the request.
    Ok(Value),
    /// Refused or failed.
    Err(Failure),
}

impl Response {
    /// The response to a handled request.
    pub(crate) fn from_result(result: Result<Value, Failure>) -> Response {
        match result {
            Ok(value) => Response::Ok(value),
            Err(failure) => Response::Err(failure),
        }
    }
}

/// What `add_job` did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Added {
    /// True if an existing definition was replaced.
    pub(crate) replaced: bool,
    /// The job as stored.
    pub(crate) job: Option<Job>,
}

/// An attempt handed to an external worker, as `keel worker claim` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClaimedAttempt {
    /// The run: pass it to the other worker commands.
    pub(crate) run: RunId,
    /// The job.
    pub(crate) job: JobId,
    /// The job's kind.
    pub(crate) kind: String,
    /// The job's payload.
    pub(crate) payload: String,
    /// This attempt, from 1.
    pub(crate) attempt: u32,
    /// `run-<id>-attempt-<n>`: pass it to the systems you change.
    pub(crate) idempotency_key: String,
    /// The fencing token: pass it to every other worker command.
    pub(crate) token: FencingToken,
    /// When the lease expires unless renewed (`worker touch`).
    pub(crate) lease_expires_at: String,
    /// The same, in milliseconds since the Unix epoch.
    pub(crate) lease_expires_at_ms: Timestamp,
    /// The last checkpoint of an earlier attempt, to resume from.
    pub(crate) checkpoint: Option<Checkpoint>,
}

impl From<AttemptStart> for ClaimedAttempt {
    fn from(start: AttemptStart) -> ClaimedAttempt {
        ClaimedAttempt {
            run: start.run,
            job: start.job,
            kind: start.kind.to_string(),
            payload: start.payload.to_string(),
            attempt: start.attempt.0,
            idempotency_key: start.idempotency_key.to_string(),
            token: start.lease.token,
            lease_expires_at: start.lease.expires_at.to_string(),
            lease_expires_at_ms: start.lease.expires_at,
            checkpoint: start.checkpoint,
        }
    }
}

/// What a holder may know about its attempt, as `keel worker context` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ContextView {
    pub(crate) run: RunId,
    pub(crate) job: JobId,
    pub(crate) kind: String,
    pub(crate) payload: String,
    pub(crate) attempt: u32,
    pub(crate) lease: Lease,
    pub(crate) checkpoint: Option<Checkpoint>,
    pub(crate) progress: Option<Progress>,
}

impl From<RunContext> for ContextView {
    fn from(c: RunContext) -> ContextView {
        ContextView {
            run: c.run,
            job: c.job,
            kind: c.kind.to_string(),
            payload: c.payload.to_string(),
            attempt: c.attempt.0,
            lease: c.lease,
            checkpoint: c.checkpoint,
            progress: c.progress,
        }
    }
}

/// What a checkpoint save did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "checkpoint")]
pub(crate) enum CheckpointAnswer {
    /// Written (durable once the command returned).
    Saved { seq: u64 },
    /// Kept, and written by a save after `until` or when the daemon stops.
    Throttled { until: Timestamp },
}

impl From<CheckpointSave> for CheckpointAnswer {
    fn from(save: CheckpointSave) -> CheckpointAnswer {
        match save {
            CheckpointSave::Saving { seq } => CheckpointAnswer::Saved { seq },
            CheckpointSave::Throttled { until } => CheckpointAnswer::Throttled { until },
        }
    }
}

/// A job as the socket carries it: the stored record plus its count of active runs, which
/// `Job` itself does not serialise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobView {
    #[serde(flatten)]
    pub(crate) job: Job,
    /// Runs of the job that are not terminal.
    pub(crate) active_runs: u32,
}

impl JobView {
    /// Wraps a job, keeping its count of active runs.
    pub(crate) fn new(job: Job) -> JobView {
        JobView {
            active_runs: job.active_runs,
            job,
        }
    }

    /// The job, with its count of active runs restored.
    pub(crate) fn into_job(self) -> Job {
        let mut job = self.job;
        job.active_runs = self.active_runs;
        job
    }
}

/// Reads a `Jobs` answer.
pub(crate) fn jobs_from(value: Value) -> Result<Vec<Job>, Failure> {
    let views: Vec<JobView> = from_value(value)?;
    Ok(views.into_iter().map(JobView::into_job).collect())
}

/// One page of runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunsPage {
    /// Newest first.
    pub(crate) runs: Vec<Run>,
    /// The cursor of the next page, if more match.
    pub(crate) next: Option<RunId>,
}

/// Who answered a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DaemonStatus {
    /// The daemon's process id, or `None` when the CLI read the store itself.
    pub(crate) pid: Option<u32>,
    /// The store adapter.
    pub(crate) store: String,
    /// The worker id of the daemon's own attempts.
    pub(crate) worker: String,
    /// With a store that daemons on several hosts share (Postgres): who leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) leader: Option<LeaderStatus>,
}

/// Who leads a shared store, in `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaderStatus {
    /// Whether the process that answered leads.
    pub(crate) leading: bool,
    /// The leader's id (`HOST:PID:RANDOM`), or `None` if nobody holds a live lease.
    pub(crate) holder: Option<String>,
    /// Its term, raised at every takeover.
    pub(crate) term: Option<u64>,
    /// Since when it leads (RFC 3339, the database's clock).
    pub(crate) since: Option<String>,
    /// The same, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub(crate) since_ms: Option<i64>,
    /// Until when its lease runs unless renewed (RFC 3339, the database's clock).
    pub(crate) expires: Option<String>,
    /// The same, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub(crate) expires_ms: Option<i64>,
    /// Where the leader serves its HTTP API (`http://host:port`), as it advertises it in the
    /// lease; `None` if it serves none (a command on another host cannot reach it then).
    #[serde(default)]
    pub(crate) api: Option<String>,
    /// How far the answering leader's wall clock was ahead of the database's when it took the
    /// lead (negative: behind); it runs on the database's time regardless. `None` from a
    /// process that does not lead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) clock_skew_ms: Option<i64>,
}

/// Answers a read request from a store (the daemon, and the CLI when no daemon runs).
pub(crate) fn answer_read(store: &dyn Store, request: &Request) -> Result<Value, Failure> {
    match request {
        Request::Jobs => to_value(
            store
                .read()?
                .jobs
                .into_iter()
                .map(JobView::new)
                .collect::<Vec<_>>(),
        ),
        Request::ActiveRuns => to_value(store.read()?.runs),
        Request::Runs { query } => {
            let page = store.runs(query)?;
            to_value(RunsPage {
                runs: page.runs,
                next: page.next,
            })
        }
        Request::Run { run } => to_value(store.run(*run)?),
        Request::Audit { query } => to_value(store.audit(query)?),
        Request::Incidents => to_value(store.incidents()?),
        memory if memory.needs_daemon() => Err(Failure::input(
            "queue health, worker health and the rules' live thresholds are the running \
             daemon's: start it (`keel run`), or ask it with --server",
        )),
        other => Err(Failure::runtime(format!("not a read request: {other:?}"))),
    }
}

/// Serialises an answer.
pub(crate) fn to_value(value: impl Serialize) -> Result<Value, Failure> {
    serde_json::to_value(value).map_err(|e| Failure::runtime(format!("cannot encode: {e}")))
}

/// Deserialises an answer into the type the request promises.
pub(crate) fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, Failure> {
    serde_json::from_value(value)
        .map_err(|e| Failure::runtime(format!("unexpected answer from the daemon: {e}")))
}

/// Pause and resume are idempotent for the CLI (SPEC O5's operator): pausing a paused job, or
/// resuming one that is not paused, changes nothing and is not an error. `Ok(true)` if it
/// changed.
pub(crate) fn changed(
    result: Result<(), keel_core::Rejected>,
) -> Result<bool, keel_core::Rejected> {
    match result {
        Ok(()) => Ok(true),
        Err(keel_core::Rejected::AlreadyPaused(_) | keel_core::Rejected::NotPaused(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_snake_case_json() {
        let request = Request::TriggerJob {
            job: JobId::new("backup").unwrap(),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(json, r#"{"request":"trigger_job","job":"backup"}"#);
        let back: Request = serde_json::from_str(&json).unwrap();
        assert_eq!(back, request);
        let complete: Request = serde_json::from_str(
            r#"{"request":"complete","run":3,"token":7,
                "outcome":{"outcome":"success","summary":"done"}}"#,
        )
        .unwrap();
        assert!(matches!(complete, Request::Complete { run: RunId(3), .. }));
    }

    #[test]
    fn jobs_keep_their_count_of_active_runs_across_the_socket() {
        let mut job = keel_core::Job {
            spec: JobSpec::new(
                JobId::new("x").unwrap(),
                "command",
                keel_core::ScheduleSpec::Once { at: Timestamp(5) },
            ),
            state: keel_core::JobState::Scheduled { next: Timestamp(5) },
            backlog: Default::default(),
            last_fired: None,
            active_runs: 2,
            delete_when_idle: false,
            last_run: None,
            failures_in_a_row: 0,
        };
        let value = to_value(vec![JobView::new(job.clone())]).unwrap();
        assert_eq!(value[0]["active_runs"], 2);
        assert_eq!(jobs_from(value).unwrap(), vec![job.clone()]);
        job.active_runs = 0;
        let bare = serde_json::to_value(&job).unwrap();
        assert!(bare.get("active_runs").is_none(), "Job itself skips it");
    }

    #[test]
    fn responses_are_ok_or_err() {
        let ok = serde_json::to_string(&Response::Ok(Value::from(17))).unwrap();
        assert_eq!(ok, r#"{"ok":17}"#);
        let err = serde_json::to_string(&Response::Err(Failure::input("no job named x"))).unwrap();
        assert_eq!(
            err,
            r#"{"err":{"code":"bad_input","message":"no job named x"}}"#
        );
    }
}

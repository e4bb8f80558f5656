//! Jobs: what to run and when, and the job's own small state machine.
//!
//! # States
//!
//! | state | waits for | leaves by |
//! |---|---|---|
//! | `Scheduled { next }` | its cursor `next` (the next unfired slot) | firing (cursor advances first), pause, update, remove |
//! | `Paused { next }` | an operator's resume | resume (the cursor is kept; slots passed meanwhile are misfires) |
//! | `Disabled { reason }` | an operator's update | update with a schedule that has a next slot |
//!
//! A job is `Disabled` by the scheduler, never by a user: a one-shot that has fired (and,
//! after its run settles, finished), a schedule with no slot left, or a stored schedule that no
//! longer parses (SPEC S2). A disabled job never fires; `resume` refuses it with a reason, and
//! only `update` re-arms it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, RunId};
use crate::retry::RetryPolicy;
use crate::run::StateName;
use crate::schedule::{MisfirePolicy, Schedule, ScheduleError, ScheduleSpec};
use crate::time::Timestamp;

/// A job as a user defines it. Validated by [`Scheduler::add_job`](crate::Scheduler::add_job).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job's unique name.
    pub id: JobId,
    /// Which handler runs it (the runtime's registry key, or an external worker's kind). Shared
    /// text: the scheduler keeps one copy per distinct kind.
    pub kind: Arc<str>,
    /// Opaque input handed to every attempt, at most
    /// [`limits::JOB_PAYLOAD_MAX_BYTES`](crate::limits::JOB_PAYLOAD_MAX_BYTES). Shared text:
    /// each run and attempt refers to it rather than copying it.
    #[serde(default, skip_serializing_if = "crate::omit::is_empty_text")]
    pub payload: Arc<str>,
    /// When it fires.
    pub schedule: ScheduleSpec,
    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    pub retry: RetryPolicy,
    /// What happens to slots missed while the scheduler was down or the clock jumped.
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    pub misfire: MisfirePolicy,
    /// What happens when a slot comes due while a run of this job is still active.
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    pub overlap: OverlapPolicy,
    /// Delete (rather than disable) a one-shot job once its run is terminal.
    #[serde(default, skip_serializing_if = "crate::omit::is_false")]
    pub delete_after_run: bool,
    /// Whether a run found mid-attempt after a crash is retried (if attempts remain) or ends
    /// `interrupted` at once.
    #[serde(default = "default_true", skip_serializing_if = "crate::omit::is_true")]
    pub resume_after_crash: bool,
    /// Run by external workers: runs wait in a queue until a worker of this job's `kind`
    /// claims them, instead of being handed to the in-process executor.
    #[serde(default, skip_serializing_if = "crate::omit::is_false")]
    pub external: bool,
    /// Attempt timeout: the attempt is asked to stop after this, killed `kill_grace_ms` later,
    /// and killed at the backstop (a multiple of it) whatever extension it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Named outputs a completion must carry; a completion without them is refused, recorded,
    /// and the run stays running. (A boxed slice, not a `Vec`: every idle job carries this
    /// field, and `vec![…].into()` builds one.)
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    pub required_artifacts: Box<[String]>,
    /// Where each finished run's result is delivered (sink names the driver knows).
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    pub sinks: Box<[Arc<str>]>,
    /// Which finished runs are delivered to the sinks: all of them, or failures only (SPEC
    /// O4). Read when a run finishes, so a change applies to runs finishing from then on.
    #[serde(default, skip_serializing_if = "NotifyOn::is_always")]
    pub notify_on: NotifyOn,
    /// Who manages this definition, if anyone but an operator's commands: a config file, as
    /// `config:/etc/keel/keel.toml`. A manager may remove the jobs it manages and no other
    /// (SPEC O2: a reloaded file removes the jobs it dropped, never one added from the CLI).
    /// At most [`limits::JOB_ORIGIN_MAX_BYTES`](crate::limits::JOB_ORIGIN_MAX_BYTES).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Arc<str>>,
}

/// Which finished runs a job's sinks hear of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOn {
    /// Every run, whatever its end.
    #[default]
    Always,
    /// Runs that ended `failed`, `failed_dropped` or `interrupted` (not a success, not a
    /// cancel).
    Failure,
}

impl NotifyOn {
    fn is_always(&self) -> bool {
        *self == NotifyOn::Always
    }

    /// Whether a run that ended in `state` is delivered.
    pub fn delivers(self, state: StateName) -> bool {
        match self {
            NotifyOn::Always => true,
            NotifyOn::Failure => matches!(
                state,
                StateName::Failed | StateName::FailedDropped | StateName::Interrupted
            ),
        }
    }
}

fn default_true() -> bool {
    true
}

impl JobSpec {
    /// A spec with default policies.
    pub fn new(id: JobId, kind: impl Into<Arc<str>>, schedule: ScheduleSpec) -> Self {
        JobSpec {
            id,
            kind: kind.into(),
            payload: "".into(),
            schedule,
            retry: RetryPolicy::default(),
            misfire: MisfirePolicy::default(),
            overlap: OverlapPolicy::default(),
            delete_after_run: false,
            resume_after_crash: true,
            external: false,
            timeout_ms: None,
            required_artifacts: Box::default(),
            sinks: Box::default(),
            notify_on: NotifyOn::Always,
            origin: None,
        }
    }

    /// With this payload (input handed to every attempt).
    #[must_use]
    pub fn with_payload(mut self, payload: impl Into<Arc<str>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// With `attempts` attempts in total, the first included, and the default backoff.
    #[must_use]
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.retry.attempts_max = attempts;
        self
    }

    /// With this retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// With an attempt timeout (see [`JobSpec::timeout_ms`]).
    #[must_use]
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// With this misfire policy.
    #[must_use]
    pub fn with_misfire(mut self, misfire: MisfirePolicy) -> Self {
        self.misfire = misfire;
        self
    }

    /// With this overlap policy.
    #[must_use]
    pub fn with_overlap(mut self, overlap: OverlapPolicy) -> Self {
        self.overlap = overlap;
        self
    }

    /// Deleted, rather than disabled, once its one-shot run is terminal.
    #[must_use]
    pub fn deleted_after_run(mut self) -> Self {
        self.delete_after_run = true;
        self
    }

    /// Run by external workers rather than an in-process handler.
    #[must_use]
    pub fn for_external_workers(mut self) -> Self {
        self.external = true;
        self
    }

    /// Each finished run's result is delivered to these sinks.
    #[must_use]
    pub fn with_sinks<S: Into<Arc<str>>>(mut self, sinks: impl IntoIterator<Item = S>) -> Self {
        self.sinks = sinks.into_iter().map(Into::into).collect();
        self
    }

    /// Managed by `origin` (see [`JobSpec::origin`]).
    #[must_use]
    pub fn with_origin(mut self, origin: impl Into<Arc<str>>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Which finished runs the sinks hear of.
    #[must_use]
    pub fn with_notify_on(mut self, notify_on: NotifyOn) -> Self {
        self.notify_on = notify_on;
        self
    }
}

/// What to do when a slot comes due while a run of the same job is active (SPEC S5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlapPolicy {
    /// Drop the slot (audited).
    #[default]
    Skip,
    /// Keep at most one slot waiting; it starts when the active run ends. Further slots are
    /// dropped.
    BufferOne,
    /// Start another run alongside.
    Allow,
}

/// The policy as users write it: `skip`, `buffer-one`, `allow`.
impl std::fmt::Display for OverlapPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverlapPolicy::Skip => "skip",
            OverlapPolicy::BufferOne => "buffer-one",
            OverlapPolicy::Allow => "allow",
        })
    }
}

/// Slots waiting for a job's active run to finish, oldest first. Almost always empty, so it is
/// one pointer wide until a slot waits: it sits in every idle job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
// One pointer in every idle job, where a `Vec` would be three.
#[allow(clippy::box_collection)]
pub struct Backlog(Option<Box<Vec<Timestamp>>>);

impl Backlog {
    /// How many slots wait.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |slots| slots.len())
    }

    /// True if no slot waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The waiting slots, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Timestamp> {
        self.0.iter().flat_map(|slots| slots.iter())
    }

    pub(crate) fn push(&mut self, slot: Timestamp) {
        self.0.get_or_insert_with(Default::default).push(slot);
    }

    /// O(backlog) for the shift, bounded by [`limits::BACKLOG_MAX`](crate::limits::BACKLOG_MAX):
    /// a `Vec` keeps the idle job one pointer wide and its stored form a plain list.
    pub(crate) fn pop_oldest(&mut self) -> Option<Timestamp> {
        let slots = self.0.as_mut()?;
        let slot = (!slots.is_empty()).then(|| slots.remove(0));
        if slots.is_empty() {
            self.0 = None;
        }
        slot
    }

    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}

/// A job's state (see the module docs for the table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobState {
    /// Waits for its next slot.
    Scheduled {
        /// The next unfired slot.
        next: Timestamp,
    },
    /// Paused by an operator; the cursor is kept.
    Paused {
        /// The next unfired slot, if the schedule has one.
        next: Option<Timestamp>,
    },
    /// Will not fire again until updated.
    Disabled {
        /// Why, in words.
        reason: String,
    },
}

/// A job in the scheduler, and the record a store persists for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The definition.
    pub spec: JobSpec,
    /// The state.
    pub state: JobState,
    /// Slots waiting for the active run to finish (overlap `buffer-one`, misfire `catch-up`),
    /// oldest first.
    #[serde(default, skip_serializing_if = "crate::omit::is_default")]
    pub backlog: Backlog,
    /// The latest slot ever fired; slots at or before it never fire again (SPEC S4, S6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired: Option<Timestamp>,
    /// Runs of this job that are not terminal. Derived from the runs on restore.
    #[serde(skip)]
    pub active_runs: u32,
    /// A finished one-shot with `delete_after_run` whose deletion waits for runs left over
    /// from an earlier definition to settle.
    #[serde(default, skip_serializing_if = "crate::omit::is_false")]
    pub delete_when_idle: bool,
    /// The last run of this job that ended, and how (SPEC O4: listings show it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
    /// Runs that ended failed in a row, up to the last one; a success resets it.
    #[serde(default, skip_serializing_if = "crate::omit::is_zero")]
    pub failures_in_a_row: u32,
}

/// How the last run of a job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    /// The run.
    pub run: RunId,
    /// Its terminal state.
    pub state: StateName,
    /// When it ended.
    pub finished_at: Timestamp,
}

impl Job {
    /// The parsed schedule, or why the stored spec no longer parses (such a job is disabled on
    /// restore). Parsed on each call: jobs keep only the spec, to stay small.
    pub fn schedule(&self) -> Result<Schedule, ScheduleError> {
        Schedule::parse(&self.spec.schedule)
    }

    /// The next slot, if the job is scheduled or paused with a cursor.
    pub fn next_fire(&self) -> Option<Timestamp> {
        match self.state {
            JobState::Scheduled { next } => Some(next),
            JobState::Paused { next } => next,
            JobState::Disabled { .. } => None,
        }
    }

    /// True if the job is a one-shot (fires at most once).
    pub fn is_one_shot(&self) -> bool {
        matches!(self.spec.schedule, ScheduleSpec::Once { .. })
    }
}

/// What [`Scheduler::ensure_job`](crate::Scheduler::ensure_job) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ensured {
    /// The job was not there: it was added.
    Added,
    /// Its definition differed: it was updated.
    Updated,
    /// It was there as defined: nothing changed.
    Unchanged,
    /// A one-shot that already fired under this name: it is done and was not re-armed.
    Done {
        /// The slot that fired.
        last: Timestamp,
    },
}

impl std::fmt::Display for Ensured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ensured::Added => f.write_str("added"),
            Ensured::Updated => f.write_str("updated"),
            Ensured::Unchanged => f.write_str("unchanged"),
            Ensured::Done { last } => write!(f, "done (its one-shot slot {last} fired)"),
        }
    }
}

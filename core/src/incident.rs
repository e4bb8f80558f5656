//! Incidents: things an operator should look at, as records that open and resolve (SPEC W5).
//!
//! | kind | opens when | resolves when |
//! |---|---|---|
//! | `lease_reclaimed` | the watchdog reclaims an expired lease | the run's next attempt runs, or the run ends |
//! | `stuck_run` | a running attempt shows no heartbeat or progress for `stuck_after_ms`; the details name its worker and last progress phase and message | the attempt shows life again, or ends |
//! | `unclaimed_queue` | a run of a kind external workers must claim waits unclaimed for `unclaimed_after_ms` (one per kind, `queue` names it); the details are a diagnosis: source job, runs waiting, oldest wait, eligible workers seen, a repair | a run of that kind is claimed, or none waits |
//! | `idle_claim_loop` | a worker's claims come back empty `idle_claims_max` times in a row while runs of other kinds wait (a capability mismatch); the details give the backlog's shape (runs waiting per kind) and the worker's kinds | the worker claims a run, or no run waits |
//! | `reclaim_escalation` | the write recording a reclaim failed twice | the reclaim is written |
//! | `operator` | an operator opens one by hand (`Scheduler::open_incident`) | an operator resolves it |
//! | `artifact_gate` | a completion is refused because a required artifact did not answer HTTP 200 or is missing | the run ends (its completion passing the gate, or otherwise) |
//! | `store_repaired` | a store was rewritten from what was readable (`keel doctor --repair`); the details say what was lost | at once: it records an operator's acknowledgement |
//!
//! Any open incident can be acknowledged (`Scheduler::acknowledge_incident`: who, when, a note)
//! and resolved (`Scheduler::resolve_incident`: who, when, why) by an operator; an incident
//! keel resolves itself has no `resolved_by`. Each operator action is an
//! [`Event`](crate::Event) the driver logs with the operator's name and reason, and the
//! incident record (written again) keeps who did it, when and why.
//!
//! Incidents are persisted (`Record::PutIncident`) when they open and when they resolve; at
//! most [`limits::INCIDENTS_OPEN_MAX`](crate::limits::INCIDENTS_OPEN_MAX) are open at once.
//!
//! # Notifications (SPEC A3)
//!
//! Each change is told to the sinks of `Config::incident_sinks` as an [`IncidentNotice`],
//! through the same durable outbox as run results (SPEC D1–D5: retries, classification,
//! capacity and overflow, the delivery counter), so a notification survives a restart:
//!
//! | event | when | to |
//! |---|---|---|
//! | `opened` | an incident opens (by keel or by hand) | `incident_sinks` |
//! | `acknowledged` | an operator acknowledges it | `incident_sinks` |
//! | `resolved` | it resolves (by keel or an operator) | `incident_sinks` |
//! | `escalated` | it is still open and unacknowledged `Config::escalate_after_ms` after it opened | `escalation_sinks`, or `incident_sinks` if there are none |
//!
//! An incident escalates at most once: `escalated_at` is set and persisted with it, so a
//! restart does not escalate it again. An incident not opened because too many are open
//! notifies no one.

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, RunId, WorkerId};
use crate::time::Timestamp;

/// What kind of trouble an incident reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IncidentKind {
    /// A lease expired and the watchdog reclaimed it.
    LeaseReclaimed,
    /// A running attempt stopped showing signs of life.
    StuckRun,
    /// Queued runs of one kind that external workers must claim wait unclaimed (the
    /// `queue_stuck` rule's queued half); `Incident::queue` names the kind.
    UnclaimedQueue,
    /// Opened by an operator by hand.
    Operator,
    /// A worker keeps claiming nothing while other work waits.
    IdleClaimLoop,
    /// Recording a reclaim failed twice.
    ReclaimEscalation,
    /// A damaged store was rewritten from what was readable; written by the store itself,
    /// resolved when it opens, with what was lost in its details.
    StoreRepaired,
    /// A job's runs failed `Config::failing_after` times in a row; its next success resolves
    /// it (SPEC O4).
    FailingJob,
    /// A completion was refused by the artifact gate: a required artifact did not answer HTTP
    /// 200 or was missing (SPEC A2); the details carry the evidence. Resolves when the run ends.
    ArtifactGate,
}

impl IncidentKind {
    /// Its name as stored and shown: `lease_reclaimed`, `unclaimed_queue`, …
    pub fn name(self) -> &'static str {
        match self {
            IncidentKind::LeaseReclaimed => "lease_reclaimed",
            IncidentKind::StuckRun => "stuck_run",
            IncidentKind::UnclaimedQueue => "unclaimed_queue",
            IncidentKind::Operator => "operator",
            IncidentKind::IdleClaimLoop => "idle_claim_loop",
            IncidentKind::ReclaimEscalation => "reclaim_escalation",
            IncidentKind::StoreRepaired => "store_repaired",
            IncidentKind::FailingJob => "failing_job",
            IncidentKind::ArtifactGate => "artifact_gate",
        }
    }
}

/// One incident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// Its id.
    pub id: u64,
    /// What it is about.
    pub kind: IncidentKind,
    /// When it opened.
    pub opened_at: Timestamp,
    /// When it resolved; `None` while open.
    pub resolved_at: Option<Timestamp>,
    /// The job concerned, if any.
    pub job: Option<JobId>,
    /// The run concerned, if any.
    pub run: Option<RunId>,
    /// The worker concerned, if any.
    pub worker: Option<WorkerId>,
    /// What is known: phase, message, counts.
    pub details: String,
    /// The handler kind whose queue it concerns (`unclaimed_queue`).
    #[serde(default)]
    pub queue: Option<String>,
    /// The operator who opened it by hand, when and why; `None`: keel opened it.
    #[serde(default)]
    pub opened_by: Option<OperatorAction>,
    /// The operator who acknowledged it, when, and their note; `None`: not acknowledged.
    #[serde(default)]
    pub acknowledged: Option<OperatorAction>,
    /// The operator who resolved it, when and why; `None` while open, or if keel resolved it.
    #[serde(default)]
    pub resolved_by: Option<OperatorAction>,
    /// When it escalated (open and unacknowledged `Config::escalate_after_ms` after it
    /// opened); `None`: it has not. Set once, so a restart never escalates it twice.
    #[serde(default)]
    pub escalated_at: Option<Timestamp>,
}

/// What happened to an incident, as its notification says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentEvent {
    /// It opened.
    Opened,
    /// An operator acknowledged it.
    Acknowledged,
    /// It resolved, by keel or by an operator.
    Resolved,
    /// It stayed open and unacknowledged `Config::escalate_after_ms` after it opened.
    Escalated,
}

impl IncidentEvent {
    /// Its name as sent: `opened`, `acknowledged`, `resolved` or `escalated`.
    pub fn name(self) -> &'static str {
        match self {
            IncidentEvent::Opened => "opened",
            IncidentEvent::Acknowledged => "acknowledged",
            IncidentEvent::Resolved => "resolved",
            IncidentEvent::Escalated => "escalated",
        }
    }
}

/// An incident notification on its way to a sink: what happened to which incident, with its
/// evidence, and who acted and why when an operator did. Persisted in the outbox's delivery
/// records and sent as the `incident` object of the sink's JSON document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentNotice {
    /// What happened.
    pub event: IncidentEvent,
    /// The incident's id.
    pub id: u64,
    /// Its kind.
    pub kind: IncidentKind,
    /// The job concerned, if any.
    pub job: Option<JobId>,
    /// The run concerned, if any.
    pub run: Option<RunId>,
    /// The worker concerned, if any.
    pub worker: Option<WorkerId>,
    /// The handler kind whose queue it concerns (`unclaimed_queue`).
    #[serde(default)]
    pub queue: Option<String>,
    /// The evidence: what is known (for `resolved`, with why it resolved).
    pub details: String,
    /// When the incident opened.
    pub opened_at: Timestamp,
    /// The operator behind this event, when, and why: who opened it by hand (`opened`),
    /// acknowledged it (`acknowledged`) or resolved it (`resolved`); `None` when keel did.
    #[serde(default)]
    pub operator: Option<OperatorAction>,
    /// When it happened.
    pub at: Timestamp,
}

impl IncidentNotice {
    /// The notice of `event` for `incident` as it is now, happening at `at`.
    pub fn new(event: IncidentEvent, incident: &Incident, at: Timestamp) -> Self {
        let operator = match event {
            IncidentEvent::Opened => incident.opened_by.clone(),
            IncidentEvent::Acknowledged => incident.acknowledged.clone(),
            IncidentEvent::Resolved => incident.resolved_by.clone(),
            IncidentEvent::Escalated => None,
        };
        IncidentNotice {
            event,
            id: incident.id,
            kind: incident.kind,
            job: incident.job.clone(),
            run: incident.run,
            worker: incident.worker.clone(),
            queue: incident.queue.clone(),
            details: incident.details.clone(),
            opened_at: incident.opened_at,
            operator,
            at,
        }
    }
}

/// What an operator did to an incident: who, when, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorAction {
    /// Who: the operator's name as the caller gave it (the HTTP API's token name, the CLI's
    /// user).
    pub by: String,
    /// When.
    pub at: Timestamp,
    /// Why, or a note.
    pub reason: String,
}

/// An incident an operator opens by hand ([`Scheduler::open_incident`](crate::Scheduler::open_incident)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewIncident {
    /// The job concerned, if any; must exist.
    pub job: Option<JobId>,
    /// The run concerned, if any; must be in memory (active, or just finished).
    pub run: Option<RunId>,
    /// The worker concerned, if any.
    pub worker: Option<WorkerId>,
    /// What the operator saw; must not be empty.
    pub details: String,
    /// Who opens it; must not be empty.
    pub by: String,
}

impl Incident {
    /// An open incident opened by keel, with no operator action yet.
    pub fn new(
        id: u64,
        kind: IncidentKind,
        opened_at: Timestamp,
        job: Option<JobId>,
        run: Option<RunId>,
        worker: Option<WorkerId>,
        details: String,
    ) -> Self {
        Incident {
            id,
            kind,
            opened_at,
            resolved_at: None,
            job,
            run,
            worker,
            details,
            queue: None,
            opened_by: None,
            acknowledged: None,
            resolved_by: None,
            escalated_at: None,
        }
    }
}

/// What an open incident is about, for the scheduler's index of them: its run, its worker and
/// its id. Ordered by run first, so one run's incidents (whatever their worker) are adjacent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct IncidentSubject(
    pub(crate) Option<RunId>,
    pub(crate) Option<WorkerId>,
    pub(crate) u64,
);

impl IncidentSubject {
    /// The subject of `incident`.
    pub(crate) fn of(incident: &Incident) -> Self {
        IncidentSubject(incident.run, incident.worker.clone(), incident.id)
    }
}

impl Incident {
    /// True if it concerns this subject (run or worker) and is of this kind.
    pub(crate) fn is_about(
        &self,
        kind: IncidentKind,
        run: Option<RunId>,
        worker: Option<&WorkerId>,
    ) -> bool {
        self.kind == kind && self.run == run && self.worker.as_ref() == worker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_stored_names() {
        for kind in [
            IncidentKind::LeaseReclaimed,
            IncidentKind::StuckRun,
            IncidentKind::UnclaimedQueue,
            IncidentKind::Operator,
            IncidentKind::IdleClaimLoop,
            IncidentKind::ReclaimEscalation,
            IncidentKind::StoreRepaired,
            IncidentKind::FailingJob,
        ] {
            let stored = serde_json::to_value(kind).unwrap();
            assert_eq!(stored.as_str(), Some(kind.name()));
        }
        for event in [
            IncidentEvent::Opened,
            IncidentEvent::Acknowledged,
            IncidentEvent::Resolved,
            IncidentEvent::Escalated,
        ] {
            let sent = serde_json::to_value(event).unwrap();
            assert_eq!(sent.as_str(), Some(event.name()));
        }
    }

    /// An incident record written before `escalated_at` existed still reads, as not escalated.
    #[test]
    fn an_incident_record_without_escalated_at_reads_as_not_escalated() {
        let stored = r#"{"id":3,"kind":"stuck_run","opened_at":1000,"resolved_at":null,
            "job":"report","run":7,"worker":"w1","details":"silent","queue":null,
            "opened_by":null,"acknowledged":null,"resolved_by":null}"#;
        let incident: Incident = serde_json::from_str(stored).unwrap();
        assert_eq!(incident.escalated_at, None);
        assert_eq!(incident.kind, IncidentKind::StuckRun);
    }
}

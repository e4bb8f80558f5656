//! Incidents: things an operator should look at, as records that open and resolve (SPEC W5).
//!
//! | kind | opens when | resolves when |
//! |---|---|---|
//! | `lease_reclaimed` | the watchdog reclaims an expired lease | the run's next attempt runs, or the run ends |
//! | `stuck_run` | a running attempt shows no heartbeat or progress for `stuck_after_ms` | the attempt shows life again, or ends |
//! | `idle_claim_loop` | a worker's claims come back empty `idle_claims_max` times in a row while runs of other kinds wait (a capability mismatch) | the worker claims a run, or no run waits |
//! | `reclaim_escalation` | the write recording a reclaim failed twice | the reclaim is written |
//! | `artifact_gate` | a completion is refused because a required artifact did not answer HTTP 200 or is missing | the run ends (its completion passing the gate, or otherwise) |
//! | `store_repaired` | a store was rewritten from what was readable (`keel doctor --repair`); the details say what was lost | at once: it records an operator's acknowledgement |
//!
//! Incidents are persisted (`Record::PutIncident`) when they open and when they resolve; at
//! most [`limits::INCIDENTS_OPEN_MAX`](crate::limits::INCIDENTS_OPEN_MAX) are open at once.

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

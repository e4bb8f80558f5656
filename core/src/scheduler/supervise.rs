//! Applying the watchdog's decisions (`crate::watchdog`) and keeping incidents
//! (`crate::incident`). Every automatic action is audited with the `watchdog` actor, old and
//! new state and the reason (SPEC W6); a reclaimed lease is never erased, the run's record
//! keeps the lost attempt and its error.

use super::*;
use crate::incident::{IncidentEvent, IncidentKind, IncidentNotice};
use crate::run::ErrorKind;
use crate::watchdog::{due_action, WatchAction};

impl Scheduler {
    /// Extends the running attempt's timeout by `by_ms` (capped at its backstop). Granted at
    /// most once per run (SPEC W1); refused for a run the watchdog killed (W2), one whose
    /// timeout already fired, or one without a timeout.
    pub fn extend(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        by_ms: u64,
        reason: &str,
    ) -> Result<Timestamp, Rejected> {
        let Some(run) = self.runs.get(&run_id) else {
            return Err(Rejected::UnknownRun(run_id));
        };
        if run.killed.is_some() {
            return Err(Rejected::Killed(run_id));
        }
        if !matches!(run.state, RunState::Running { .. }) {
            return Err(Rejected::NotRunning {
                run: run_id,
                state: run.state.name(),
            });
        }
        if run.extended {
            return Err(Rejected::AlreadyExtended(run_id));
        }
        let Some(timeout_at) = run.watch.timeout_at else {
            return Err(Rejected::NoTimeout(run_id));
        };
        if run.watch.kill_at.is_some() {
            return Err(Rejected::TimedOut(run_id));
        }
        let now = self.clamp(now);
        let run = self.runs.get_mut(&run_id).expect("checked above");
        let extended = timeout_at.max(now).plus_ms(by_ms);
        let new_deadline = run
            .watch
            .backstop_at
            .map_or(extended, |cap| extended.min(cap));
        run.watch.timeout_at = Some(new_deadline);
        run.extended = true;
        let job = run.job.clone();
        let reason = format!("timeout extended to {new_deadline} (once per run): {reason}");
        self.rewatch(&job, run_id, Actor::Operator, &reason);
        Ok(new_deadline)
    }

    /// A running attempt's watchdog deadline came due.
    pub(super) fn supervise(&mut self, now: Timestamp, id: RunId) {
        let Some(action) = due_action(&self.runs[&id], now, &self.config) else {
            // A heartbeat moved the deadline: look again then.
            self.index_run(id);
            return;
        };
        let run = self
            .runs
            .get_mut(&id)
            .expect("supervised runs are in memory");
        let job = run.job.clone();
        let attempt = run.attempt;
        match action {
            WatchAction::Reclaim => {
                let lease = run.lease.clone().expect("a running attempt holds a lease");
                let message = format!(
                    "lease {} held by {} expired at {}; reclaimed",
                    lease.token, lease.owner, lease.expires_at
                );
                let kind = run.kind.clone();
                let t = run.lose_attempt(now, ErrorKind::Lost, &message);
                self.after_run_transition(id, t, Actor::Watchdog);
                self.count_for_worker(&lease.owner, &kind, |h| h.lease_losses += 1);
                self.effects.push_back(Effect::Event(Event::LeaseReclaimed {
                    run: id,
                    token: lease.token,
                }));
                self.reclaim_failures.insert(id, 0);
                self.raise_incident(
                    now,
                    IncidentKind::LeaseReclaimed,
                    Some(job),
                    Some(id),
                    Some(&lease.owner),
                    message,
                );
            }
            WatchAction::Kill(reason) => {
                let t = run.kill(now, &reason, &mut self.rng);
                self.after_run_transition(id, t, Actor::Watchdog);
                self.effects
                    .push_back(Effect::KillAttempt { run: id, attempt });
            }
            WatchAction::Timeout { kill_at } => {
                run.watch.kill_at = Some(kill_at);
                let timeout = run.timeout_ms.unwrap_or_default();
                let reason = format!(
                    "attempt {attempt} timed out after {timeout} ms; asked to stop, killed at \
                     {kill_at} unless it stops"
                );
                self.rewatch(&job, id, Actor::Watchdog, &reason);
                self.effects.push_back(Effect::CancelAttempt {
                    run: id,
                    attempt,
                    reason: StopReason::Timeout,
                });
            }
            WatchAction::Stuck => {
                run.watch.stuck_reported = true;
                let owner = run.lease.as_ref().map(|l| l.owner.clone());
                let details = stuck_details(run, &job, now);
                self.journal.put_run(&job, id);
                self.index_run(id);
                self.raise_incident(
                    now,
                    IncidentKind::StuckRun,
                    Some(job),
                    Some(id),
                    owner.as_ref(),
                    details,
                );
            }
        }
    }

    /// A running attempt's watch changed (a deadline moved) but its state did not: persist the
    /// run, put it where its next deadline says, and audit the change.
    fn rewatch(&mut self, job: &JobId, id: RunId, actor: Actor, reason: &str) {
        self.journal.put_run(job, id);
        self.index_run(id);
        self.audit_run(
            id,
            Some(StateName::Running),
            StateName::Running,
            actor,
            reason,
        );
    }

    /// A batch carrying these runs failed: a reclaim whose record fails to persist twice
    /// escalates (SPEC W5).
    pub(super) fn note_failed_reclaims(&mut self, now: Timestamp, runs: &[RunId]) {
        for run in runs {
            let Some(failures) = self.reclaim_failures.get_mut(run) else {
                continue;
            };
            *failures += 1;
            if *failures == limits::RECLAIM_FAILURES_ESCALATE {
                let job = self.runs.get(run).map(|r| r.job.clone());
                let details = format!("recording the reclaim of {run} failed twice");
                self.raise_incident(
                    now,
                    IncidentKind::ReclaimEscalation,
                    job,
                    Some(*run),
                    None,
                    details,
                );
            }
        }
    }

    /// Opens an incident unless the same one is open already, or too many are; returns its id
    /// if it opened. An incident about neither a run nor a worker is the same one only for the
    /// same job.
    pub(super) fn raise_incident(
        &mut self,
        now: Timestamp,
        kind: IncidentKind,
        job: Option<JobId>,
        run: Option<RunId>,
        worker: Option<&WorkerId>,
        details: String,
    ) -> Option<u64> {
        self.raise_incident_about_queue(now, kind, job, run, worker, details, None)
    }

    /// [`Scheduler::raise_incident`], with the handler kind whose queue it concerns.
    #[allow(clippy::too_many_arguments)] // the incident's fields, named at each call
    pub(super) fn raise_incident_about_queue(
        &mut self,
        now: Timestamp,
        kind: IncidentKind,
        job: Option<JobId>,
        run: Option<RunId>,
        worker: Option<&WorkerId>,
        details: String,
        queue: Option<String>,
    ) -> Option<u64> {
        let about_job = run.is_none() && worker.is_none();
        let same = self.incident_ids(run, worker, |i| {
            i.is_about(kind, run, worker) && (!about_job || i.job == job)
        });
        if !same.is_empty() {
            return None;
        }
        if self.incidents.len() >= limits::INCIDENTS_OPEN_MAX {
            self.effects
                .push_back(Effect::Event(Event::IncidentSuppressed {
                    kind,
                    run,
                    details,
                }));
            return None;
        }
        let id = self.next_incident_id();
        let details = crate::run::truncate(&details);
        let mut incident = Incident::new(id, kind, now, job, run, worker.cloned(), details);
        incident.queue = queue;
        self.insert_incident(incident);
        Some(id)
    }

    /// The next incident id, counted in the store's meta record.
    pub(super) fn next_incident_id(&mut self) -> u64 {
        let id = self.meta.next_incident;
        self.meta.next_incident += 1;
        self.journal.meta();
        id
    }

    /// Adds a new open incident: persisted, announced, indexed and told to the incident sinks.
    pub(super) fn insert_incident(&mut self, incident: Incident) {
        self.journal.incident(incident.clone());
        self.effects
            .push_back(Effect::Event(Event::IncidentOpened(incident.clone())));
        self.incident_subjects
            .insert(IncidentSubject::of(&incident));
        if let Some(at) = self.escalation_at(&incident) {
            self.escalations.insert((at, incident.id));
        }
        self.notify_incident(IncidentEvent::Opened, &incident);
        self.incidents.insert(incident.id, incident);
    }

    /// When `incident` escalates, if it still may: open, not acknowledged, not escalated, and
    /// escalation is on (`Config::escalate_after_ms` > 0).
    pub(super) fn escalation_at(&self, incident: &Incident) -> Option<Timestamp> {
        let after = self.config.escalate_after_ms;
        if after == 0
            || incident.resolved_at.is_some()
            || incident.acknowledged.is_some()
            || incident.escalated_at.is_some()
        {
            return None;
        }
        Some(incident.opened_at.plus_ms(after))
    }

    /// Escalates every incident whose deadline is at or before `now`, once: it is marked
    /// `escalated_at` (persisted, so a restart does not escalate it again), announced, and
    /// told to the escalation sinks.
    pub(super) fn escalate_incidents(&mut self, now: Timestamp) {
        while let Some(&(at, id)) = self.escalations.first() {
            if at > now {
                break;
            }
            self.escalations.remove(&(at, id));
            let Some(incident) = self.incidents.get_mut(&id) else {
                continue;
            };
            incident.escalated_at = Some(now);
            let incident = incident.clone();
            self.journal.incident(incident.clone());
            self.effects
                .push_back(Effect::Event(Event::IncidentEscalated(incident.clone())));
            self.notify_incident(IncidentEvent::Escalated, &incident);
        }
    }

    /// Queues a notification of `event` about `incident` in the outbox, one delivery per sink:
    /// the escalation sinks for an escalation (the incident sinks if there are none), the
    /// incident sinks otherwise. Nothing when there is no sink.
    pub(super) fn notify_incident(&mut self, event: IncidentEvent, incident: &Incident) {
        let sinks = match event {
            IncidentEvent::Escalated if !self.config.escalation_sinks.is_empty() => {
                self.config.escalation_sinks.clone()
            }
            _ => self.config.incident_sinks.clone(),
        };
        if sinks.is_empty() {
            return;
        }
        let payload = DeliveryPayload::Incident {
            incident: IncidentNotice::new(event, incident, self.now),
        };
        self.outbox.enqueue(self.now, &sinks, &payload);
        self.pump_outbox();
    }

    /// True if an incident of `kind` about this subject is open. O(log incidents).
    pub(super) fn has_incident(
        &mut self,
        kind: IncidentKind,
        run: Option<RunId>,
        worker: Option<&WorkerId>,
    ) -> bool {
        !self
            .incident_ids(run, worker, |i| i.is_about(kind, run, worker))
            .is_empty()
    }

    /// The ids of the open incidents about `run` (with any worker) or, with no run, about
    /// exactly `worker`, that `keep` keeps: a range of the subject index, not a scan.
    fn incident_ids(
        &mut self,
        run: Option<RunId>,
        worker: Option<&WorkerId>,
        keep: impl Fn(&Incident) -> bool,
    ) -> Vec<u64> {
        let worker = if run.is_some() { None } else { worker.cloned() };
        let first = IncidentSubject(run, worker.clone(), 0);
        let mut visited = 0;
        let ids = self
            .incident_subjects
            .range(first..)
            .take_while(|s| s.0 == run && (run.is_some() || s.1 == worker))
            .inspect(|_| visited += 1)
            .filter(|s| self.incidents.get(&s.2).is_some_and(&keep))
            .map(|s| s.2)
            .collect();
        self.work.incidents_visited += visited;
        ids
    }

    /// Resolves every open incident about `run`.
    pub(super) fn resolve_incidents_of_run(&mut self, run: RunId, reason: &str) {
        let ids = self.incident_ids(Some(run), None, |_| true);
        for id in ids {
            self.close_incident(id, reason);
        }
    }

    /// Resolves the open incidents of one kind about `run`.
    pub(super) fn resolve_incidents_of_kind(
        &mut self,
        run: RunId,
        kind: IncidentKind,
        reason: &str,
    ) {
        let ids = self.incident_ids(Some(run), None, |i| i.kind == kind);
        for id in ids {
            self.close_incident(id, reason);
        }
    }

    /// Counts a job's failures in a row as one of its runs ends (SPEC O4): a failure (`failed`,
    /// `failed_dropped`, `interrupted`) adds one, and at `Config::failing_after` opens a
    /// `failing_job` incident; a success resets the count and resolves it. A cancelled run is
    /// neither. Records the run as the job's last.
    pub(super) fn count_failures(&mut self, id: &JobId, run: RunId, state: StateName) {
        let now = self.now;
        let threshold = self.config.failing_after;
        let Some(job) = self.jobs.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        let before = job.failures_in_a_row;
        match state {
            StateName::Succeeded => job.failures_in_a_row = 0,
            StateName::Failed | StateName::FailedDropped | StateName::Interrupted => {
                job.failures_in_a_row = before.saturating_add(1);
            }
            _ => {}
        }
        let after = job.failures_in_a_row;
        self.mark_job(id);
        if after == 0 && before > 0 {
            // Job-level incidents have no run or worker: a range of the subject index bounded
            // by the open-incident limit, filtered by job.
            let ids = self.incident_ids(None, None, |i| {
                i.kind == IncidentKind::FailingJob && i.job.as_ref() == Some(id)
            });
            let reason = format!("{run} succeeded after {before} failed run(s) in a row");
            for incident in ids {
                self.close_incident(incident, &reason);
            }
        } else if threshold > 0 && after >= threshold {
            let error = self.runs[&run]
                .last_error
                .as_ref()
                .map(|e| format!(": {}", e.message))
                .unwrap_or_default();
            let details =
                format!("job {id}: {after} runs failed in a row; the last, {run}, {state}{error}");
            self.raise_incident(
                now,
                IncidentKind::FailingJob,
                Some(id.clone()),
                None,
                None,
                details,
            );
        }
    }

    /// Resolves the idle-claim-loop incident of `worker`, if open.
    pub(super) fn resolve_idle_claims(&mut self, worker: &WorkerId, reason: &str) {
        let ids = self.incident_ids(None, Some(worker), |i| {
            i.is_about(IncidentKind::IdleClaimLoop, None, Some(worker))
        });
        for id in ids {
            self.close_incident(id, reason);
        }
    }

    /// Resolves open incident `id`, by keel; returns it resolved, if it was open.
    pub(super) fn close_incident(&mut self, id: u64, reason: &str) -> Option<Incident> {
        let mut incident = self.incidents.remove(&id)?;
        self.incident_subjects
            .remove(&IncidentSubject::of(&incident));
        if let Some(at) = self.escalation_at(&incident) {
            self.escalations.remove(&(at, id));
        }
        incident.resolved_at = Some(self.now);
        incident.details =
            crate::run::truncate(&format!("{}; resolved: {reason}", incident.details));
        // A kind whose report an operator resolved stays reported, with no incident, until a
        // claim or an empty queue ends its wait: otherwise it would open again at once.
        if let Some(report) = incident
            .queue
            .as_deref()
            .and_then(|kind| self.unclaimed.get_mut(kind))
        {
            *report = None;
        }
        self.journal.incident(incident.clone());
        self.effects
            .push_back(Effect::Event(Event::IncidentResolved(incident.clone())));
        self.notify_incident(IncidentEvent::Resolved, &incident);
        Some(incident)
    }
}

/// What a stuck report says (SPEC W5): the attempt, its job and kind, its worker, how long it
/// has been silent, and its last progress phase and message.
fn stuck_details(run: &Run, job: &JobId, now: Timestamp) -> String {
    let silent_since = run.last_activity.unwrap_or(now);
    let worker = run
        .lease
        .as_ref()
        .map_or_else(|| "no worker".to_owned(), |l| format!("worker {}", l.owner));
    let progress = match &run.progress {
        Some(p) => format!(
            "last progress at {}: phase {:?}, message {:?}",
            p.at, p.phase, p.message
        ),
        None => "no progress reported".to_owned(),
    };
    format!(
        "attempt {} of job {job} (kind {:?}), {worker}: no heartbeat or progress since \
         {silent_since} ({} s); {progress}",
        run.attempt,
        &*run.kind,
        now.ms_since(silent_since) / 1_000
    )
}

#[cfg(test)]
mod notice_tests;

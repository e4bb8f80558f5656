//! The watchdog rules about queues and workers (SPEC A2–A4), and operators' incidents.
//!
//! # Queued work nobody claims (`queue_stuck`, queued half)
//!
//! A run of an external job waits in the claim queue of its kind until a worker claims it.
//! Per kind, the queue's *wait* starts at the later of its oldest run's `since` and the last
//! claim of that kind; once a wait reaches `Config::unclaimed_after_ms` the kind is reported:
//!
//! | state of a kind | input | next |
//! |---|---|---|
//! | waiting (in `queued`, not in `unclaimed`) | its wait reaches `unclaimed_after_ms` (`handle_timeout`) | reported: an `unclaimed_queue` incident with a diagnosis opens |
//! | reported (in `unclaimed`) | a worker claims a run of it | waiting again, its wait starting at the claim; the incident resolves |
//! | reported | its last queued run leaves the queue (cancelled, job removed) | not waiting; the incident resolves |
//!
//! The deadline is named: `poll_timeout` includes the earliest wait's end
//! ([`Scheduler::unclaimed_deadline`]). A kind reported while
//! [`limits::INCIDENTS_OPEN_MAX`] incidents are open is still marked reported (with no
//! incident), so the deadline moves on instead of spinning.
//!
//! # Idle claim loops (`claim_loop_idle`)
//!
//! Counted in `workers.rs`; the incident this file opens gives the backlog's shape: runs
//! waiting per kind, the oldest wait, and the worker's kinds.
//!
//! # Worker health
//!
//! Counted here from claims, transitions and reclaims ([`crate::health`]).
//!
//! # Operators' incidents
//!
//! | command | refused when | effect |
//! |---|---|---|
//! | [`Scheduler::open_incident`] | empty `by` or `details`, unknown job or run, too many open | an `operator` incident opens (`Event::IncidentOpened`) |
//! | [`Scheduler::acknowledge_incident`] | empty `by`, no such open incident, acknowledged already | `acknowledged` is set (`Event::IncidentAcknowledged`) |
//! | [`Scheduler::resolve_incident`] | empty `by` or `reason`, no such open incident | it resolves with `resolved_by` (`Event::IncidentResolved`) |
//!
//! Every change is persisted with the incident's record (`Record::PutIncident`), which keeps
//! who, when and why ([`OperatorAction`]), and audited with actor `operator` in the trail of the
//! incident's run (if in memory) or else its job, old and new state being the current one (the
//! action changes no state), with a reason naming the incident, the operator and their words.

use super::*;
use crate::health::{WorkerHealth, WorkerStats};
use crate::incident::{IncidentEvent, NewIncident, OperatorAction};

/// One claim queue's health, the view the API's `queue` resource and the console show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueHealth {
    /// The handler kind.
    pub kind: String,
    /// Runs waiting to be claimed.
    pub queued: usize,
    /// Since when the oldest has waited.
    pub oldest_since: Timestamp,
    /// The last claim of this kind since the scheduler started, if any.
    pub last_claim_at: Option<Timestamp>,
    /// Workers that asked for this kind since the scheduler started, with when they last did.
    pub workers_seen: Vec<(WorkerId, Timestamp)>,
    /// The open `unclaimed_queue` incident about it, if any.
    pub incident: Option<u64>,
}

impl Scheduler {
    // ----- getters -----------------------------------------------------------------------

    /// An open incident by id.
    pub fn incident(&self, id: u64) -> Option<&Incident> {
        self.incidents.get(&id)
    }

    /// The health of every (worker, kind) pair seen since the scheduler started, ordered by
    /// worker then kind, each with its score ([`crate::health`]).
    pub fn worker_health(&self) -> Vec<WorkerHealth> {
        self.health
            .iter()
            .flat_map(|(worker, kinds)| {
                kinds.iter().map(move |(kind, stats)| WorkerHealth {
                    worker: worker.clone(),
                    kind: kind.clone(),
                    stats: *stats,
                    score: stats.score(),
                })
            })
            .collect()
    }

    /// The claim queues of external work, by kind.
    pub fn queue_health(&self) -> Vec<QueueHealth> {
        self.queued
            .iter()
            .filter_map(|(kind, queue)| {
                let (oldest_since, _) = *queue.first()?;
                Some(QueueHealth {
                    kind: kind.to_string(),
                    queued: queue.len(),
                    oldest_since,
                    last_claim_at: self.last_claimed.get(kind).copied(),
                    workers_seen: self.workers_seen(kind),
                    incident: self.unclaimed.get(kind).copied().flatten(),
                })
            })
            .collect()
    }

    // ----- commands ----------------------------------------------------------------------

    /// An operator opens an incident by hand (kind `operator`). Refused if `by` or `details`
    /// is empty, the job is unknown, the run is not in memory, or
    /// [`limits::INCIDENTS_OPEN_MAX`] incidents are open. Returns the incident.
    pub fn open_incident(
        &mut self,
        now: Timestamp,
        new: NewIncident,
    ) -> Result<Incident, Rejected> {
        non_empty("by", &new.by)?;
        non_empty("details", &new.details)?;
        if let Some(job) = new.job.as_ref().filter(|j| !self.jobs.contains_key(*j)) {
            return Err(Rejected::UnknownJob(job.clone()));
        }
        if let Some(run) = new.run.filter(|r| !self.runs.contains_key(r)) {
            return Err(Rejected::UnknownRun(run));
        }
        if self.incidents.len() >= limits::INCIDENTS_OPEN_MAX {
            return Err(Rejected::TooManyIncidents(limits::INCIDENTS_OPEN_MAX));
        }
        let now = self.clamp(now);
        let id = self.next_incident_id();
        let details = crate::run::truncate(&new.details);
        // A run's incident names its job even if the operator did not.
        let job = new.job.or_else(|| {
            new.run
                .and_then(|r| self.runs.get(&r))
                .map(|r| r.job.clone())
        });
        let mut incident = Incident::new(
            id,
            IncidentKind::Operator,
            now,
            job,
            new.run,
            new.worker,
            details.clone(),
        );
        incident.opened_by = Some(OperatorAction {
            by: crate::run::truncate(&new.by),
            at: now,
            reason: details,
        });
        self.insert_incident(incident.clone());
        self.audit_incident(&incident, "opened");
        Ok(incident)
    }

    /// An operator acknowledges open incident `id`: they have seen it and own it. Refused if
    /// `by` is empty, no open incident has that id, or it was acknowledged already. Returns
    /// the incident.
    pub fn acknowledge_incident(
        &mut self,
        now: Timestamp,
        id: u64,
        by: &str,
        note: &str,
    ) -> Result<Incident, Rejected> {
        non_empty("by", by)?;
        let Some(incident) = self.incidents.get(&id) else {
            return Err(Rejected::UnknownIncident(id));
        };
        if let Some(ack) = &incident.acknowledged {
            return Err(Rejected::AlreadyAcknowledged {
                incident: id,
                by: ack.by.clone(),
            });
        }
        // Acknowledged: an operator owns it, so it no longer escalates.
        let escalation = self.escalation_at(incident);
        let now = self.clamp(now);
        if let Some(at) = escalation {
            self.escalations.remove(&(at, id));
        }
        let incident = self.incidents.get_mut(&id).expect("checked above");
        incident.acknowledged = Some(OperatorAction {
            by: crate::run::truncate(by),
            at: now,
            reason: crate::run::truncate(note),
        });
        let incident = incident.clone();
        self.journal.incident(incident.clone());
        self.effects
            .push_back(Effect::Event(Event::IncidentAcknowledged(incident.clone())));
        self.notify_incident(IncidentEvent::Acknowledged, &incident);
        let note = if note.is_empty() { "" } else { ": " };
        self.audit_incident(
            &incident,
            &format!(
                "acknowledged by {by}{note}{}",
                incident
                    .acknowledged
                    .as_ref()
                    .map_or("", |a| a.reason.as_str())
            ),
        );
        Ok(incident)
    }

    /// An operator resolves open incident `id`, automatic or not, saying why. Refused if `by`
    /// or `reason` is empty or no open incident has that id. Returns the resolved incident.
    ///
    /// An automatic incident whose cause persists may open again: resolving a stuck queue
    /// does not start a worker.
    pub fn resolve_incident(
        &mut self,
        now: Timestamp,
        id: u64,
        by: &str,
        reason: &str,
    ) -> Result<Incident, Rejected> {
        non_empty("by", by)?;
        non_empty("reason", reason)?;
        if !self.incidents.contains_key(&id) {
            return Err(Rejected::UnknownIncident(id));
        }
        let now = self.clamp(now);
        let by = crate::run::truncate(by);
        let reason = crate::run::truncate(reason);
        let incident = self.incidents.get_mut(&id).expect("checked above");
        incident.resolved_by = Some(OperatorAction {
            by: by.clone(),
            at: now,
            reason: reason.clone(),
        });
        let resolved = self
            .close_incident(id, &format!("by {by}: {reason}"))
            .expect("checked above");
        self.audit_incident(&resolved, &format!("resolved by {by}: {reason}"));
        Ok(resolved)
    }

    /// Records an operator's action on `incident` in the audit trail of its run (if still in
    /// memory) or else its job (if it still exists), so the trail the console shows beside a
    /// run or job has it; the state does not change (old and new are the current one). An
    /// incident about neither is recorded only in its own record and the event.
    fn audit_incident(&mut self, incident: &Incident, what: &str) {
        let mut reason = format!(
            "incident #{} ({}) {what}",
            incident.id,
            incident.kind.name()
        );
        if what == "opened" {
            if let Some(op) = &incident.opened_by {
                reason = format!("{reason} by {}: {}", op.by, op.reason);
            }
        }
        if let Some(run) = incident.run.filter(|r| self.runs.contains_key(r)) {
            let state = self.runs[&run].state.name();
            self.audit_run(run, Some(state), state, Actor::Operator, &reason);
        } else if let Some(job) = incident.job.as_ref().filter(|j| self.jobs.contains_key(*j)) {
            let state = job_state_name(&self.jobs[job].state);
            let job = job.clone();
            self.audit_job(&job, Some(state), state, Actor::Operator, &reason);
        }
    }

    // ----- the queue_stuck rule, queued half ---------------------------------------------

    /// When the next kind's wait for a claim reaches `unclaimed_after_ms`, or now if a
    /// reported kind no longer waits (its incident resolves at the next `handle_timeout`).
    /// O(kinds queued + kinds reported).
    pub(super) fn unclaimed_deadline(&self) -> Option<Timestamp> {
        if self.unclaimed.keys().any(|k| !self.queued.contains_key(k)) {
            return Some(self.now);
        }
        let after = self.config.unclaimed_after_ms;
        if after == 0 {
            return None;
        }
        self.queued
            .keys()
            .filter(|kind| !self.unclaimed.contains_key(*kind))
            .filter_map(|kind| self.wait_start(kind))
            .map(|since| since.plus_ms(after))
            .min()
    }

    /// Reports every kind whose wait reached `unclaimed_after_ms` by `now`, and resolves the
    /// reports of kinds no longer waiting.
    pub(super) fn watch_queues(&mut self, now: Timestamp) {
        let gone: Vec<Arc<str>> = self
            .unclaimed
            .keys()
            .filter(|k| !self.queued.contains_key(*k))
            .cloned()
            .collect();
        for kind in gone {
            self.queue_emptied(&kind);
        }
        let after = self.config.unclaimed_after_ms;
        if after == 0 {
            return;
        }
        let due: Vec<Arc<str>> = self
            .queued
            .keys()
            .filter(|kind| !self.unclaimed.contains_key(*kind))
            .filter(|kind| {
                self.wait_start(kind)
                    .is_some_and(|s| s.plus_ms(after) <= now)
            })
            .cloned()
            .collect();
        for kind in due {
            let (details, job) = self.unclaimed_diagnosis(now, &kind);
            let id = self.raise_incident_about_queue(
                now,
                IncidentKind::UnclaimedQueue,
                Some(job),
                None,
                None,
                details,
                Some(kind.to_string()),
            );
            self.unclaimed.insert(kind, id);
        }
    }

    /// Since when `kind`'s queue has waited for a claim: its oldest run's `since`, or its last
    /// claim if later.
    fn wait_start(&self, kind: &Arc<str>) -> Option<Timestamp> {
        let (oldest, _) = *self.queued.get(kind)?.first()?;
        Some(
            self.last_claimed
                .get(kind)
                .map_or(oldest, |c| oldest.max(*c)),
        )
    }

    /// The `unclaimed_queue` diagnosis of `kind`: its source jobs, runs waiting, oldest wait,
    /// eligible workers seen, and a repair. Returns it with the job of the oldest run.
    fn unclaimed_diagnosis(&self, now: Timestamp, kind: &Arc<str>) -> (String, JobId) {
        let queue = &self.queued[kind];
        let &(oldest_since, oldest) = queue.first().expect("only waiting kinds are diagnosed");
        let source = self.runs[&oldest].job.clone();
        let mut jobs: Vec<&JobId> = Vec::new();
        for (_, run) in queue.iter().take(limits::DIAGNOSIS_RUNS_SCANNED) {
            let job = &self.runs[run].job;
            if jobs.len() < limits::DIAGNOSIS_JOBS_MAX && !jobs.contains(&job) {
                jobs.push(job);
            }
        }
        let jobs: Vec<&str> = jobs.iter().map(|j| j.as_str()).collect();
        let seen = self.workers_seen(kind);
        let last_claim = match self.last_claimed.get(kind) {
            Some(at) => format!("last claim of the kind at {at}"),
            None => "no claim of the kind since keel started".to_owned(),
        };
        let (workers, repair) = if seen.is_empty() {
            (
                "none".to_owned(),
                format!(
                    "start a worker for kind {:?}, or pause job {source}",
                    &**kind
                ),
            )
        } else {
            let names: Vec<String> = seen
                .iter()
                .take(limits::DIAGNOSIS_KINDS_MAX)
                .map(|(w, at)| format!("{w} (last asked at {at})"))
                .collect();
            (
                format!("{} ({} in all)", names.join(", "), seen.len()),
                format!(
                    "those workers ask for kind {:?} but claim nothing: check that they are \
                     not all busy or failing, start another, or pause job {source}",
                    &**kind
                ),
            )
        };
        let details = format!(
            "kind {:?}: {} run(s) wait unclaimed, from job(s) {jobs:?}; the oldest, {oldest} of \
             job {source}, queued at {oldest_since} ({} s ago); {last_claim}; eligible workers \
             seen: {workers}; repair: {repair}",
            &**kind,
            queue.len(),
            now.ms_since(oldest_since) / 1_000,
        );
        (details, source)
    }

    /// The workers that asked for `kind`, with when they last did, ordered by worker.
    fn workers_seen(&self, kind: &str) -> Vec<(WorkerId, Timestamp)> {
        self.health
            .iter()
            .filter_map(|(w, kinds)| Some((w.clone(), kinds.get(kind)?.last_seen)))
            .collect()
    }

    /// `kind`'s queue emptied: its report, if any, resolves.
    fn queue_emptied(&mut self, kind: &Arc<str>) {
        if let Some(Some(id)) = self.unclaimed.remove(kind) {
            self.close_incident(id, &format!("no run of kind {:?} waits", &**kind));
        }
    }

    // ----- claims, transitions and health ------------------------------------------------

    /// A worker asked for work of `kinds`: it is seen for each.
    pub(super) fn note_claim_request(&mut self, now: Timestamp, worker: &WorkerId, kinds: &[&str]) {
        for kind in kinds {
            self.note_worker(now, worker, kind, |_| {});
        }
    }

    /// Counts `change` in the health of (`worker`, `kind`), seen at `now`, unless the pair is
    /// new and [`limits::WORKER_HEALTH_MAX`] are tracked.
    pub(super) fn note_worker(
        &mut self,
        now: Timestamp,
        worker: &WorkerId,
        kind: &str,
        change: impl FnOnce(&mut WorkerStats),
    ) {
        self.count_for_worker(worker, kind, |stats| {
            stats.last_seen = stats.last_seen.max(now);
            change(stats);
        });
    }

    /// Counts `change` in the health of (`worker`, `kind`) without counting it as a sign of
    /// the worker: a lease the watchdog reclaims says the worker was *not* seen.
    pub(super) fn count_for_worker(
        &mut self,
        worker: &WorkerId,
        kind: &str,
        change: impl FnOnce(&mut WorkerStats),
    ) {
        let stats = match self.health.get_mut(worker).and_then(|k| k.get_mut(kind)) {
            Some(stats) => stats,
            None if self.health_pairs >= limits::WORKER_HEALTH_MAX => return,
            None => {
                self.health_pairs += 1;
                self.health
                    .entry(worker.clone())
                    .or_default()
                    .entry(kind.to_owned())
                    .or_default()
            }
        };
        change(stats);
    }

    /// A run changed state: count a worker's claim or attempt's end in its health, and keep
    /// the claim queues' reports (called by `after_run_transition`, after the run is
    /// re-indexed).
    pub(super) fn watch_transition(&mut self, id: RunId, t: &Transition, actor: &Actor) {
        let now = self.now;
        let run = &self.runs[&id];
        let kind = run.kind.clone();
        let worker = match actor {
            Actor::Worker(w) => WorkerId::new(w).ok(),
            _ => None,
        };
        if t.old == StateName::Queued && run.state.name() != StateName::Queued {
            if let Some(worker) = &worker {
                self.last_claimed.insert(kind.clone(), now);
                self.note_worker(now, worker, &kind, |h| h.claims += 1);
                if let Some(Some(incident)) = self.unclaimed.remove(&kind) {
                    let reason = format!("{worker} claimed {id}");
                    self.close_incident(incident, &reason);
                }
            } else if !self.queued.contains_key(&kind) {
                self.queue_emptied(&kind);
            }
        }
        let Some(worker) = worker else {
            return;
        };
        if t.old == StateName::Running {
            match t.new {
                StateName::Succeeded => self.note_worker(now, &worker, &kind, |h| h.successes += 1),
                StateName::BackingOff
                | StateName::Queued
                | StateName::Failed
                | StateName::FailedDropped => {
                    self.note_worker(now, &worker, &kind, |h| h.failures += 1)
                }
                _ => {}
            }
        }
    }

    /// Opens the idle-claim-loop incident of `worker`, which asked for `kinds` and found
    /// nothing `count` times in a row while other work waits, with the backlog's shape.
    pub(super) fn raise_idle_claim_loop(
        &mut self,
        now: Timestamp,
        worker: &WorkerId,
        kinds: &[&str],
        count: u32,
    ) {
        let backlog: Vec<String> = self
            .queued
            .iter()
            .take(limits::DIAGNOSIS_KINDS_MAX)
            .map(|(kind, queue)| {
                let since = queue.first().map_or(now, |(s, _)| *s);
                format!(
                    "{:?}: {} (oldest queued at {since}, {} s ago)",
                    &**kind,
                    queue.len(),
                    now.ms_since(since) / 1_000
                )
            })
            .collect();
        let more = self
            .queued
            .len()
            .saturating_sub(limits::DIAGNOSIS_KINDS_MAX);
        let more = if more > 0 {
            format!(" and {more} more kind(s)")
        } else {
            String::new()
        };
        let details = format!(
            "{count} empty claims in a row by {worker} for kinds {kinds:?} while runs wait; \
             backlog (runs waiting per kind): {}{more}; repair: start a worker for a waiting \
             kind, or give {worker} one of them",
            backlog.join(", ")
        );
        let opened = self.raise_incident(
            now,
            IncidentKind::IdleClaimLoop,
            None,
            None,
            Some(worker),
            details,
        );
        if opened.is_some() {
            for kind in kinds {
                self.note_worker(now, worker, kind, |h| h.idle_loops += 1);
            }
        }
    }
}

/// Refuses an empty operator field.
fn non_empty(field: &'static str, value: &str) -> Result<(), Rejected> {
    if value.trim().is_empty() {
        return Err(Rejected::InvalidField {
            field,
            reason: "must not be empty".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

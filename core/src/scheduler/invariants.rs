//! The whole-state invariants ([`Scheduler::check_invariants`]), for a simulator to check after
//! every step.

use super::*;

/// What the runs in memory say the indexes should hold, gathered in one pass over the runs.
#[derive(Default)]
struct Expected<'a> {
    /// The run due index: `(deadline, run)`.
    runs: BTreeSet<(Timestamp, RunId)>,
    /// The claim queue, by kind.
    queue: BTreeMap<&'a str, BTreeSet<(Timestamp, RunId)>>,
    /// Active (non-terminal) runs per job.
    active: BTreeMap<&'a JobId, u32>,
    /// Every `(job, slot)` a run was created for: no slot runs twice.
    slots: BTreeSet<(JobId, Timestamp)>,
    /// Every live lease's token: no two runs share one.
    tokens: BTreeSet<FencingToken>,
}

impl Scheduler {
    /// Checks whole-state invariants and panics with a description if one is broken. Cheap
    /// enough for a simulator to call after every step; not for production hot paths (it is
    /// O(jobs + runs)).
    pub fn check_invariants(&self) {
        let mut expected = Expected::default();
        assert_eq!(
            self.runs_by_job.len(),
            self.runs.len(),
            "runs_by_job and runs disagree"
        );
        for (id, run) in &self.runs {
            self.check_run(*id, run, &mut expected);
        }
        // A completion waiting for its artifact gate waits for a request in flight about its
        // own run, and no run keeps more evidence than the bound.
        for (run, id) in &self.gates {
            let pending = self.verifying.get(id);
            assert!(
                pending.is_some_and(|p| p.is_completion_of(*run)),
                "{run} waits for {id}, which is not its completion's request in flight"
            );
        }
        for run in self.runs.values() {
            assert!(
                run.verifications.len() <= limits::VERIFICATIONS_KEPT_MAX,
                "{} keeps {} verifications",
                run.id,
                run.verifications.len()
            );
        }
        let expected_jobs = self.check_jobs(&expected.active);
        assert_eq!(
            self.due_jobs, expected_jobs,
            "the job due index disagrees with job states"
        );
        assert_eq!(
            self.due_runs, expected.runs,
            "the run due index disagrees with run states"
        );
        let queue: BTreeMap<&str, BTreeSet<(Timestamp, RunId)>> = self
            .queued
            .iter()
            .filter(|(_, runs)| !runs.is_empty())
            .map(|(kind, runs)| (&**kind, runs.clone()))
            .collect();
        assert_eq!(
            queue, expected.queue,
            "the claim queue disagrees with run states"
        );
        assert!(self.incidents.len() <= limits::INCIDENTS_OPEN_MAX);
        // Each reported unclaimed queue points at its own open incident, if it has one.
        for (kind, id) in &self.unclaimed {
            let Some(id) = id else { continue };
            let incident = self.incidents.get(id);
            assert!(
                incident.is_some_and(|i| i.kind == IncidentKind::UnclaimedQueue
                    && i.queue.as_deref() == Some(&**kind)),
                "unclaimed kind {kind:?} points at {incident:?}"
            );
        }
        let subjects: BTreeSet<IncidentSubject> =
            self.incidents.values().map(IncidentSubject::of).collect();
        assert_eq!(
            subjects, self.incident_subjects,
            "incident_subjects disagrees with the open incidents"
        );
        let escalations: BTreeSet<(Timestamp, u64)> = self
            .incidents
            .values()
            .filter_map(|i| Some((self.escalation_at(i)?, i.id)))
            .collect();
        assert_eq!(
            escalations, self.escalations,
            "the escalation index disagrees with the open, unacknowledged, unescalated incidents"
        );
        for d in self.outbox.deliveries() {
            let incident = d.payload.incident().is_some();
            assert_eq!(
                self.notice_deliveries.contains(&d.id),
                incident,
                "{} is filed with the wrong group",
                d.id
            );
            assert_eq!(self.delivery_jobs.contains_key(&d.id), !incident);
        }
        self.check_gates();
    }

    /// Checks one run and notes what it says the indexes should hold.
    fn check_run<'a>(&self, id: RunId, run: &'a Run, expected: &mut Expected<'a>) {
        assert_eq!(id, run.id, "run stored under the wrong id");
        assert!(
            self.runs_by_job.contains(&(run.job.clone(), id)),
            "run {id} missing from runs_by_job"
        );
        assert!(
            run.id.0 < self.meta.next_run_id,
            "{id} not below next_run_id"
        );
        match run.state {
            RunState::BackingOff { until } if !self.shutting_down => {
                expected.runs.insert((until, run.id));
            }
            RunState::Queued { since } => {
                assert!(run.external, "{id} queued but not external");
                expected
                    .queue
                    .entry(&run.kind)
                    .or_default()
                    .insert((since, run.id));
            }
            RunState::Running { .. } => {
                if let Some(at) = crate::watchdog::next_deadline(run, &self.config) {
                    expected.runs.insert((at, run.id));
                }
            }
            _ => {}
        }
        self.check_run_lease(id, run, &mut expected.tokens);
        if !run.state.is_terminal() {
            *expected.active.entry(&run.job).or_default() += 1;
            check_active_run(id, run);
        } else {
            assert!(
                run.finished_at.is_some(),
                "{id} terminal without finished_at"
            );
        }
        if let Some(slot) = run.slot() {
            assert!(
                expected.slots.insert((run.job.clone(), slot)),
                "two runs for slot {slot} of job {}",
                run.job
            );
        }
    }

    /// L1: exactly the attempts in progress hold a lease; at most one live lease per run, and
    /// no two runs share a token. A killed attempt never runs again.
    fn check_run_lease(&self, id: RunId, run: &Run, tokens: &mut BTreeSet<FencingToken>) {
        let in_progress = matches!(
            run.state,
            RunState::Starting { .. } | RunState::Running { .. }
        );
        assert_eq!(
            run.lease.is_some(),
            in_progress,
            "{id} is {:?} with lease {:?}",
            run.state,
            run.lease
        );
        if let Some(lease) = &run.lease {
            assert!(
                lease.token.0 < self.meta.next_token,
                "{id} holds {} not below next_token {}",
                lease.token,
                self.meta.next_token
            );
            assert!(
                tokens.insert(lease.token),
                "{} held by two runs",
                lease.token
            );
        }
        if let Some(killed) = run.killed {
            assert!(
                !(in_progress && run.attempt == killed),
                "{id}: killed attempt {killed} is in progress again"
            );
        }
    }

    /// Checks every job against the active runs counted per job; returns what the job due
    /// index should hold.
    fn check_jobs(&self, active: &BTreeMap<&JobId, u32>) -> BTreeSet<(Timestamp, JobId)> {
        let mut expected_jobs = BTreeSet::new();
        for (id, job) in &self.jobs {
            assert_eq!(id, &job.spec.id, "job stored under the wrong id");
            if let JobState::Scheduled { next } = job.state {
                expected_jobs.insert((next, id.clone()));
                if let Some(last) = job.last_fired {
                    assert!(
                        next > last,
                        "job {id}: cursor {next} not after last fired {last}"
                    );
                }
            }
            let counted = active.get(id).copied().unwrap_or(0);
            assert_eq!(
                job.active_runs, counted,
                "job {id}: active_runs {} but {counted} active runs",
                job.active_runs
            );
            assert!(job.backlog.len() <= limits::BACKLOG_MAX);
            assert!(
                job.backlog.is_empty()
                    || job.active_runs > 0
                    || self.shutting_down
                    || matches!(job.state, JobState::Paused { .. }),
                "job {id} has a backlog but no active run to drain it"
            );
        }
        expected_jobs
    }

    /// Persist before act: no attempt gated on the batch in flight is running yet.
    fn check_gates(&self) {
        let Some(batch) = &self.journal.in_flight else {
            return;
        };
        for (run, attempt) in batch.groups.iter().flat_map(|(_, g)| &g.gates) {
            if let Some(r) = self.runs.get(run) {
                assert!(
                    !matches!(r.state, RunState::Running { attempt: a, .. } if a == *attempt),
                    "{run} attempt {attempt} running before its batch was acknowledged"
                );
            }
        }
    }
}

/// An active run has started an attempt (or waits for an external worker), within its
/// attempt and loss budgets.
fn check_active_run(id: RunId, run: &Run) {
    assert!(
        run.attempt.0 >= 1 || run.external,
        "{id} active with attempt 0"
    );
    assert!(
        run.attempts_counted() <= run.retry.attempts_max,
        "{id} started {} counted attempts, more than attempts_max {}",
        run.attempts_counted(),
        run.retry.attempts_max
    );
    assert!(
        run.lost < run.retry.lost_attempts_max,
        "{id} lost {} attempts but is not poison",
        run.lost
    );
}

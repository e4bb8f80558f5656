//! Firing: a job's cursor comes due, its slots are admitted by the overlap policy (run, buffer
//! or drop, SPEC S5) and runs are created; dropped slots are audited; deleted jobs leave a
//! tombstone of their last fired slot (SPEC S6). Also the job due index.

use super::*;

impl Scheduler {
    /// A `Scheduled` job's cursor came due.
    pub(super) fn fire(&mut self, now: Timestamp, id: &JobId) {
        let grace = self.config.misfire_grace_ms;
        let Some(job) = self.jobs.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        let JobState::Scheduled { next: cursor } = job.state else {
            unreachable!("only scheduled jobs are in the due index");
        };
        // The spec was validated when the job was added or restored.
        let schedule = Schedule::parse_trusted(&job.spec.schedule)
            .expect("a scheduled job's schedule was validated");
        let due = schedule.resolve_due(cursor, now, job.spec.misfire, grace);
        // SPEC S2: the next slot is decided (and persisted with the run) before any run starts.
        // A cursor that does not move past what fired would fire forever in this one tick; no
        // valid schedule does that, but a broken one must disable its job, not hang the loop.
        let fired_up_to = due.fire.last().copied().unwrap_or(cursor).max(cursor);
        job.state = match due.next {
            Some(next) if next > fired_up_to => JobState::Scheduled { next },
            Some(stuck) => JobState::Disabled {
                reason: format!("schedule did not advance: next slot {stuck} after {cursor}"),
            },
            None => JobState::Disabled {
                reason: if job.is_one_shot() && due.fire.is_empty() {
                    "one-shot slot was missed and dropped by the misfire policy".into()
                } else if job.is_one_shot() {
                    "one-shot job has fired".into()
                } else {
                    format!("schedule has no slot after {cursor}")
                },
            },
        };
        if let Some(last) = due.fire.last() {
            job.last_fired = Some(*last);
        }
        let policy = job.spec.misfire;
        let catching_up = matches!(policy, MisfirePolicy::CatchUp { .. }) && due.misfired;
        self.index_job(id);
        self.mark_job(id);
        if let JobState::Disabled { reason } = &self.jobs[id].state {
            let reason = reason.clone();
            self.audit_job(
                id,
                Some(StateName::Scheduled),
                StateName::Disabled,
                Actor::Scheduler,
                &reason,
            );
            // A one-shot that fired is only finished when its run settles; the event comes then,
            // with the final verdict (JobDisabled or JobDeleted).
            let fired_one_shot = self.jobs[id].is_one_shot() && !due.fire.is_empty();
            if !fired_one_shot {
                self.effects.push_back(Effect::Event(Event::JobDisabled {
                    job: id.clone(),
                    reason,
                }));
            }
        }
        if due.dropped.counted > 0 {
            let reason = format!(
                "misfire policy {policy} dropped {} missed slot(s)",
                due.dropped
            );
            let dropped = due.dropped;
            self.note_dropped(id, dropped.counted.into(), dropped.at_least, reason);
        }
        for slot in due.fire {
            self.admit(now, id, slot, catching_up);
        }
    }

    /// A slot fires: start a run, buffer it, or drop it, by the overlap policy (SPEC S5). The
    /// check and the creation happen in this one transition.
    fn admit(&mut self, now: Timestamp, id: &JobId, slot: Timestamp, catching_up: bool) {
        let job = self
            .jobs
            .get_mut(id)
            .map(Arc::make_mut)
            .expect("admit is called for a known job");
        let free = job.active_runs == 0
            || (job.spec.overlap == OverlapPolicy::Allow
                && job.active_runs < limits::ACTIVE_RUNS_PER_JOB_MAX);
        if free {
            self.create_run(now, id, Trigger::Scheduled { slot }, Actor::Scheduler);
            return;
        }
        // Slots a catch-up produced wait their turn whatever the overlap policy: dropping them
        // would defeat the catch-up. Live slots follow the overlap policy.
        let capacity = match (catching_up, job.spec.overlap) {
            (true, _) => limits::BACKLOG_MAX,
            (false, OverlapPolicy::BufferOne) => 1,
            (false, _) => 0,
        };
        if job.backlog.len() < capacity {
            job.backlog.push(slot);
            self.mark_job(id);
            return;
        }
        let reason = if job.spec.overlap == OverlapPolicy::Allow {
            format!(
                "slot {slot} dropped: {} runs active, the limit",
                job.active_runs
            )
        } else {
            format!(
                "overlap policy {}: slot {slot} dropped, a run is active",
                job.spec.overlap
            )
        };
        self.note_dropped(id, 1, false, reason);
    }

    pub(super) fn create_run(
        &mut self,
        now: Timestamp,
        id: &JobId,
        trigger: Trigger,
        actor: Actor,
    ) -> RunId {
        let job = self
            .jobs
            .get_mut(id)
            .map(Arc::make_mut)
            .expect("create_run is called for a known job");
        let run_id = RunId(self.meta.next_run_id);
        self.meta.next_run_id += 1;
        self.journal.meta();
        job.active_runs += 1;
        let terms = RunTerms {
            retry: job.spec.retry.clone(),
            resume_after_crash: job.spec.resume_after_crash,
            kind: job.spec.kind.clone(),
            payload: job.spec.payload.clone(),
            of_one_shot: match job.spec.schedule {
                ScheduleSpec::Once { at } => Some(at),
                _ => None,
            },
            external: job.spec.external,
            timeout_ms: job.spec.timeout_ms,
            required_artifacts: job.spec.required_artifacts.clone(),
            sinks: job.spec.sinks.clone(),
        };
        let run = Run::new(run_id, id.clone(), trigger, now, terms);
        let reason = match trigger {
            Trigger::Scheduled { slot } => format!("slot {slot} fired"),
            Trigger::Manual => "triggered by operator".into(),
        };
        let first = run.state.name();
        self.mark_job(id);
        self.runs_by_job.insert((id.clone(), run_id));
        self.runs.insert(run_id, run);
        self.audit_run(run_id, None, first, actor, &reason);
        self.begin_attempt(run_id);
        run_id
    }

    /// Starts the oldest waiting slot if the job may run it now.
    pub(super) fn start_from_backlog(&mut self, now: Timestamp, id: &JobId) {
        let Some(job) = self.jobs.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        let free = job.active_runs == 0 || job.spec.overlap == OverlapPolicy::Allow;
        let paused = matches!(job.state, JobState::Paused { .. });
        // A waiting slot waits for the next start once shutdown began.
        if job.backlog.is_empty() || !free || paused || self.shutting_down {
            return;
        }
        let slot = job.backlog.pop_oldest().expect("checked non-empty");
        self.create_run(now, id, Trigger::Scheduled { slot }, Actor::Scheduler);
    }

    /// Audits and reports slots dropped by a policy. While the job's writes are pending, drop
    /// records fold into one, so a slow store cannot make a job's pending writes grow.
    pub(super) fn note_dropped(&mut self, id: &JobId, slots: u64, at_least: bool, reason: String) {
        let state = job_state_name(&self.jobs[id].state);
        let record =
            self.job_audit_record(id, Some(state), state, Actor::Scheduler, reason.clone());
        self.journal.audit_drop(record, slots);
        let count = if at_least {
            format!("at least {slots}")
        } else {
            slots.to_string()
        };
        self.effects.push_back(Effect::Event(Event::SlotsDropped {
            job: id.clone(),
            count,
            reason,
        }));
    }

    pub(super) fn index_job(&mut self, id: &JobId) {
        if let Some(JobState::Scheduled { next }) = self.jobs.get(id).map(|j| &j.state) {
            self.due_jobs.insert((*next, id.clone()));
        }
    }

    pub(super) fn unindex_job(&mut self, id: &JobId) {
        if let Some(JobState::Scheduled { next }) = self.jobs.get(id).map(|j| &j.state) {
            self.due_jobs.remove(&(*next, id.clone()));
        }
    }

    /// Deletes a job, keeping a tombstone of its last fired slot (SPEC S6). A tombstone is
    /// kept until a job of that name is added again (which takes its cursor over): it is what
    /// remembers a deleted job's fired slots once the history policy pruned their runs, and
    /// their slot claims with them, so it does not expire with the history.
    pub(super) fn delete_job(&mut self, id: &JobId, actor: Actor, reason: &str) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        let old = job_state_name(&job.state);
        if let Some(last_fired) = job.last_fired {
            let tombstone = Tombstone {
                job: id.clone(),
                last_fired,
                deleted_at: self.now,
            };
            self.tombstones.insert(id.clone(), tombstone);
            self.journal.tombstone(id, JobWrite::Put);
        }
        self.unindex_job(id);
        self.jobs.remove(id);
        self.journal.delete_job(id);
        self.audit_job(id, Some(old), StateName::Removed, actor, reason);
    }
}

//! Rebuilding a scheduler from what a store persisted: the stored jobs are checked like new
//! input, runs found mid-attempt are recovered, and the clock resumes no earlier than the
//! persisted high-water mark.

use super::*;

impl Scheduler {
    /// Rebuilds a scheduler from what a store persisted (after a crash or a clean stop).
    ///
    /// Stored jobs are checked like new ones: a job whose definition no longer validates (a
    /// schedule that no longer parses, a policy an older version allowed) is disabled with the
    /// reason (SPEC S2), and a cursor at or before the job's last fired slot is moved past it.
    /// Runs found mid-attempt are recovered: cancelled if a cancel was requested, retried if
    /// the job resumes after crashes and attempts remain, otherwise ended `interrupted`. The
    /// clock resumes no earlier than the persisted high-water mark. Every such change is
    /// audited and persisted through the usual effects.
    pub fn restore(config: Config, seed: u64, now: Timestamp, snapshot: Snapshot) -> Self {
        let worker = WorkerId::new("local").expect("a valid worker id");
        Scheduler::restore_as(worker, config, seed, now, snapshot)
    }

    /// Like [`Scheduler::restore`], for an in-process executor named `worker` (see
    /// [`Scheduler::with_worker`]). The name decides which restored attempts were this
    /// executor's own, cut short by the restart and recovered at once, and which belong to
    /// external workers, whose leases stand until they expire. A daemon should therefore keep
    /// its name across restarts.
    pub fn restore_as(
        worker: WorkerId,
        config: Config,
        seed: u64,
        now: Timestamp,
        snapshot: Snapshot,
    ) -> Self {
        let Snapshot {
            jobs,
            runs,
            meta,
            tombstones,
            incidents,
            deliveries,
        } = snapshot;
        // Time never runs backwards, not even across a restart (SPEC S4).
        let now = now.max(meta.clock);
        let mut s = Scheduler::new(config, seed, now).with_worker(worker);
        s.meta = Meta {
            next_run_id: meta.next_run_id.max(1),
            next_audit_seq: meta.next_audit_seq.max(1),
            clock: now,
            epoch: meta.epoch + 1,
            next_token: meta.next_token.max(1),
            next_incident: meta.next_incident.max(1),
            next_delivery: meta.next_delivery.max(1),
        };
        s.delivery_jobs = deliveries
            .iter()
            .filter_map(|d| Some((d.id, d.payload.run_result()?.job.clone())))
            .collect();
        s.notice_deliveries = deliveries
            .iter()
            .filter(|d| d.payload.incident().is_some())
            .map(|d| d.id)
            .collect();
        s.outbox = Outbox::restore(s.config.outbox, deliveries, s.meta.next_delivery, now);
        s.journal.set_epoch(s.meta.epoch);
        s.tombstones = tombstones.into_iter().map(|t| (t.job.clone(), t)).collect();
        s.incidents = incidents
            .into_iter()
            .filter(|i| i.resolved_at.is_none())
            .map(|i| (i.id, i))
            .collect();
        s.incident_subjects = s.incidents.values().map(IncidentSubject::of).collect();
        // An incident that should have escalated while keel was down escalates at the first
        // `handle_timeout`; one that escalated before (`escalated_at`) never again.
        s.escalations = s
            .incidents
            .values()
            .filter_map(|i| Some((s.escalation_at(i)?, i.id)))
            .collect();
        // An unclaimed queue reported before the restart stays reported until a claim or an
        // empty queue resolves it.
        s.unclaimed = s
            .incidents
            .values()
            .filter(|i| i.kind == IncidentKind::UnclaimedQueue)
            .filter_map(|i| Some((Arc::from(i.queue.as_deref()?), Some(i.id))))
            .collect();
        for job in jobs {
            s.restore_job(job);
        }
        for run in runs {
            if run.state.is_terminal() {
                continue;
            }
            s.meta.next_run_id = s.meta.next_run_id.max(run.id.0 + 1);
            if let Some(job) = s.jobs.get_mut(&run.job).map(Arc::make_mut) {
                job.active_runs += 1;
            }
            let id = run.id;
            s.runs_by_job.insert((run.job.clone(), id));
            s.runs.insert(id, run);
            match s.runs[&id].state {
                RunState::BackingOff { .. } | RunState::Queued { .. } => s.index_run(id),
                // An attempt handed out to an external worker outlives this process: its
                // lease stands, and the watchdog reclaims it only if it expires (SPEC L3).
                RunState::Running { .. } if s.held_elsewhere(id) => s.index_run(id),
                RunState::Starting { .. } | RunState::Running { .. } => {
                    let run = s.runs.get_mut(&id).expect("just inserted");
                    let t = run.recover_after_crash(now);
                    s.after_run_transition(id, t, Actor::Scheduler);
                }
                _ => unreachable!("terminal runs were skipped"),
            }
        }
        // A slot left waiting by a shutdown starts now.
        let waiting: Vec<JobId> = s
            .jobs
            .values()
            .filter(|j| !j.backlog.is_empty() && j.active_runs == 0)
            .map(|j| j.spec.id.clone())
            .collect();
        for id in waiting {
            s.start_from_backlog(now, &id);
        }
        s.journal.meta();
        s.pump_outbox();
        s
    }

    /// Brings one stored job back, checked like new input (see `restore`).
    fn restore_job(&mut self, mut job: Job) {
        job.active_runs = 0;
        self.share_text(&mut job.spec);
        let id = job.spec.id.clone();
        let old = job_state_name(&job.state);
        match validate_fields(&job.spec) {
            Err(e) => {
                let reason = format!("stored definition is no longer valid: {e}");
                job.state = JobState::Disabled { reason };
            }
            Ok(schedule) => {
                // Data from an older version or a hand-edited store: never re-fire a slot.
                let fired = |next: Timestamp| job.last_fired.is_some_and(|last| next <= last);
                let past_fired = || job.last_fired.and_then(|last| schedule.next_after(last));
                match job.state {
                    JobState::Scheduled { next } if fired(next) => {
                        job.state = match past_fired() {
                            Some(next) => JobState::Scheduled { next },
                            None => JobState::Disabled {
                                reason: format!(
                                    "stored cursor {next} is not after the last fired slot and \
                                     the schedule has no later slot"
                                ),
                            },
                        };
                    }
                    JobState::Paused { next: Some(next) } if fired(next) => {
                        job.state = JobState::Paused { next: past_fired() };
                    }
                    _ => {}
                }
            }
        }
        let new = job_state_name(&job.state);
        let changed = old != new;
        if let (true, JobState::Disabled { reason }) = (changed, &job.state) {
            let reason = reason.clone();
            self.audit_job(&id, Some(old), new, Actor::Scheduler, &reason);
            self.effects.push_back(Effect::Event(Event::JobDisabled {
                job: id.clone(),
                reason,
            }));
        }
        if let JobState::Scheduled { next } = job.state {
            self.due_jobs.insert((next, id.clone()));
        }
        self.jobs.insert(id.clone(), Arc::new(job));
        self.journal.put_job(&id);
    }
}

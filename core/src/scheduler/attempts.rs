//! Attempts and outcomes: starting an attempt (lease, persist before act) and handing it out
//! once the batch granting it is durable, the bookkeeping after every run transition, settling
//! a finished run into its job (SPEC R5) and queueing its result for delivery. Also the run due
//! index and the claim queue.

use super::*;

impl Scheduler {
    /// A `BackingOff` run's `until` came due.
    fn start_next_attempt(&mut self, id: RunId) {
        let now = self.now;
        let run = self.runs.get_mut(&id).expect("due runs are in memory");
        let t = run.begin_next_attempt(now);
        self.after_run_transition(id, t, Actor::Scheduler);
        self.begin_attempt(id);
    }

    /// A run that just entered `Starting` (in-process) gets its lease and waits for the batch
    /// recording both (persist before act); one that entered `Queued` waits for a worker.
    pub(super) fn begin_attempt(&mut self, id: RunId) {
        let run = &self.runs[&id];
        let job = run.job.clone();
        match run.state {
            RunState::Starting { attempt } => {
                let owner = self.worker.clone();
                let lease = self.new_lease(owner);
                let run = self.runs.get_mut(&id).expect("checked above");
                run.grant(lease);
                self.journal.gate(&job, id, attempt);
            }
            RunState::Queued { .. } => {
                self.journal.put_run(&job, id);
                self.index_run(id);
            }
            _ => {}
        }
    }

    /// True if `run`'s lease is held by a worker other than this process's executor.
    pub(super) fn held_elsewhere(&self, run: RunId) -> bool {
        self.runs[&run]
            .lease
            .as_ref()
            .is_some_and(|lease| lease.owner != self.worker)
    }

    /// A new lease for `owner`, with the next fencing token (persisted with the batch; announced
    /// only when the attempt is handed out).
    pub(super) fn new_lease(&mut self, owner: WorkerId) -> Lease {
        let token = FencingToken(self.meta.next_token);
        self.meta.next_token += 1;
        self.journal.meta();
        Lease {
            owner,
            token,
            renewed_at: self.now,
            expires_at: self.now.plus_ms(self.config.lease.ttl_ms),
        }
    }

    /// Bookkeeping after any run transition: persist, audit, index, and settle if terminal.
    pub(super) fn after_run_transition(&mut self, id: RunId, t: Transition, actor: Actor) {
        let job = self.runs[&id].job.clone();
        self.journal.put_run(&job, id);
        self.audit_run(id, Some(t.old), t.new, actor.clone(), &t.reason);
        self.index_run(id);
        self.watch_transition(id, &t, &actor);
        let state = self.runs[&id].state;
        if !matches!(state, RunState::Running { .. }) {
            // A throttled save outlives its attempt: the next attempt resumes from it.
            let pending = self.throttles.remove(&id).and_then(|t| t.pending);
            let run = self
                .runs
                .get_mut(&id)
                .expect("transitions are of runs in memory");
            if let (Some(data), Some(checkpoint)) = (pending, &mut run.checkpoint) {
                checkpoint.seq += 1;
                checkpoint.data = data;
                checkpoint.saved_at = self.now;
            }
            self.resolve_incidents_of_kind(id, IncidentKind::StuckRun, "the attempt ended");
            // A success waiting for its artifact gate ended with the attempt; the gate's late
            // answer finds the token stale and is dropped.
            self.gates.remove(&id);
            // Refusals are audited once per attempt; the attempt is over, so is its entry.
            let attempts = (id, Attempt(0))..=(id, Attempt(u32::MAX));
            let ended: Vec<(RunId, Attempt)> =
                self.refused_completions.range(attempts).copied().collect();
            for key in ended {
                self.refused_completions.remove(&key);
            }
        }
        match state {
            RunState::BackingOff { until } => {
                self.effects
                    .push_back(Effect::Event(Event::RetryScheduled { run: id, at: until }));
            }
            state if state.is_terminal() => {
                self.resolve_incidents_of_run(id, "the run ended");
                self.enqueue_deliveries(id);
                self.effects.push_back(Effect::Event(Event::RunFinished {
                    run: id,
                    job: job.clone(),
                    state: state.name(),
                }));
                self.settle(id, &job);
            }
            _ => {}
        }
    }

    /// The one settle-after-run transition (SPEC R5), for scheduled and manual runs alike.
    fn settle(&mut self, run_id: RunId, id: &JobId) {
        let now = self.now;
        let history = self.config.history;
        self.journal.prune(
            Some(id),
            Record::PruneHistory {
                job: Some(id.clone()),
                keep_last: history.runs_max,
                finished_before: Timestamp(
                    now.as_millis().saturating_sub(history.age_max_ms as i64),
                ),
            },
        );
        let Some(job) = self.jobs.get_mut(id).map(Arc::make_mut) else {
            return; // the job was removed while the run was active
        };
        job.active_runs -= 1;
        let run = &self.runs[&run_id];
        let state = run.state.name();
        job.last_run = Some(LastRun {
            run: run_id,
            state,
            finished_at: run.finished_at.unwrap_or(now),
        });
        self.count_failures(id, run_id, state);
        let job = self
            .jobs
            .get_mut(id)
            .map(Arc::make_mut)
            .expect("checked above");
        let run = &self.runs[&run_id];
        // Only a run of this very one-shot finishes it: its slot, or a manual run made while the
        // job was this one-shot. A run left from an earlier definition does not.
        let own_one_shot = match (&job.spec.schedule, run.trigger) {
            (ScheduleSpec::Once { at }, Trigger::Manual) => run.of_one_shot == Some(*at),
            (ScheduleSpec::Once { at }, Trigger::Scheduled { slot }) => slot == *at,
            _ => false,
        };
        if own_one_shot {
            // A one-shot job never fires again, whatever the outcome.
            let dropped = job.backlog.len();
            if dropped > 0 {
                job.backlog.clear();
                let reason = format!("one-shot job finished; {dropped} waiting slot(s) dropped");
                self.note_dropped(id, dropped as u64, false, reason);
            }
            self.unindex_job(id);
            let job = self
                .jobs
                .get_mut(id)
                .map(Arc::make_mut)
                .expect("checked above");
            let old = job_state_name(&job.state);
            let reason = format!("one-shot job finished ({state})");
            job.delete_when_idle = job.spec.delete_after_run;
            job.state = JobState::Disabled {
                reason: reason.clone(),
            };
            let deleting_now = job.delete_when_idle && job.active_runs == 0;
            self.mark_job(id);
            self.audit_job(
                id,
                Some(old),
                StateName::Disabled,
                Actor::Scheduler,
                &reason,
            );
            if !deleting_now {
                self.effects.push_back(Effect::Event(Event::JobDisabled {
                    job: id.clone(),
                    reason,
                }));
            }
        }
        // A finished one-shot with delete_after_run goes once no run of it is left, including
        // runs left over from an earlier definition.
        let job = &self.jobs[id];
        if job.delete_when_idle && job.active_runs == 0 {
            let reason = format!("one-shot job finished ({state}); delete_after_run");
            self.delete_job(id, Actor::Scheduler, &reason);
            self.effects.push_back(Effect::Event(Event::JobDeleted {
                job: id.clone(),
                reason,
            }));
            return;
        }
        if own_one_shot {
            return;
        }
        // The cursor already moved when the slot fired; a waiting slot starts now, unless an
        // operator paused the job (it starts on resume).
        self.start_from_backlog(now, id);
    }

    /// A run's entry in the run due index came due.
    pub(super) fn run_due(&mut self, now: Timestamp, id: RunId) {
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        match run.state {
            RunState::BackingOff { .. } => self.start_next_attempt(id),
            RunState::Running { .. } => self.supervise(now, id),
            _ => {}
        }
    }

    /// Puts a run where its state says it waits: the run due index (a backoff's end, the
    /// watchdog's next deadline) or the claim queue. Idempotent.
    pub(crate) fn index_run(&mut self, id: RunId) {
        self.unindex_run(id);
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        let due = match run.state {
            // Nothing new starts once shutdown began: a retry waits for the next start.
            RunState::BackingOff { until } => (!self.shutting_down).then_some(until),
            RunState::Running { .. } => crate::watchdog::next_deadline(run, &self.config),
            _ => None,
        };
        if let Some(at) = due {
            self.due_runs.insert((at, id));
            self.run_due.insert(id, at);
        }
        if let RunState::Queued { since } = run.state {
            let kind = run.kind.clone();
            self.queued
                .entry(kind.clone())
                .or_default()
                .insert((since, id));
            self.run_queue.insert(id, (kind, since));
        }
    }

    /// Takes a run out of the run due index and the claim queue.
    pub(crate) fn unindex_run(&mut self, id: RunId) {
        if let Some(at) = self.run_due.remove(&id) {
            self.due_runs.remove(&(at, id));
        }
        if let Some((kind, since)) = self.run_queue.remove(&id) {
            if let Some(queue) = self.queued.get_mut(&kind) {
                queue.remove(&(since, id));
                if queue.is_empty() {
                    self.queued.remove(&kind);
                }
            }
        }
    }

    /// A run ended: its result goes to each of its sinks through the outbox (SPEC D1). A job
    /// retry creates a new run and so new deliveries; a delivery retry never re-runs a job (D2).
    fn enqueue_deliveries(&mut self, id: RunId) {
        let run = &self.runs[&id];
        if run.sinks.is_empty() {
            return;
        }
        // The job's current wish; a run of a removed job is delivered as it always was.
        let notify_on = self
            .jobs
            .get(&run.job)
            .map_or(NotifyOn::Always, |job| job.spec.notify_on);
        if !notify_on.delivers(run.state.name()) {
            return;
        }
        let payload = DeliveryPayload::Run(RunResult {
            run: run.id,
            job: run.job.clone(),
            state: run.state.name(),
            summary: run.summary.clone(),
            error: run.last_error.as_deref().cloned(),
            finished_at: run.finished_at.unwrap_or(self.now),
        });
        let sinks = run.sinks.clone();
        self.outbox.enqueue(self.now, &sinks, &payload);
        self.pump_outbox();
    }

    /// Hands out the attempts a durable batch gated (persist before act), in grant order.
    pub(super) fn hand_out_gated(
        &mut self,
        now: Timestamp,
        gates: impl IntoIterator<Item = (RunId, Attempt)>,
    ) {
        let mut starts = Vec::new();
        for (run_id, attempt) in gates {
            // A run cancelled (or otherwise moved on) while its record was in flight is not
            // started.
            let Some(run) = self.runs.get(&run_id) else {
                continue;
            };
            // Nothing new starts once shutdown began; the attempt is recovered at the next
            // start.
            if run.state != (RunState::Starting { attempt }) || self.shutting_down {
                continue;
            }
            let (ttl, factor) = (self.config.lease.ttl_ms, self.config.backstop_factor);
            let run = self.runs.get_mut(&run_id).expect("checked above");
            let t = run.mark_running(now, ttl, factor);
            let lease = run.lease.clone().expect("a starting run holds a lease");
            let start = AttemptStart {
                run: run_id,
                job: run.job.clone(),
                kind: run.kind.clone(),
                payload: run.payload.clone(),
                attempt,
                idempotency_key: run.idempotency_key(),
                trigger: run.trigger,
                lease,
                checkpoint: run.checkpoint.as_deref().cloned(),
            };
            self.resolve_incidents_of_run(run_id, "the run's next attempt is running");
            self.after_run_transition(run_id, t, Actor::Scheduler);
            starts.push(start);
        }
        // Hand out in grant order, so tokens handed out together rise with the hand-out. A
        // grant is announced only now that it is durable (a token announced earlier could be
        // granted again after a crash).
        starts.sort_by_key(|start| start.lease.token);
        for start in starts {
            let granted = Event::LeaseGranted {
                run: start.run,
                owner: start.lease.owner.clone(),
                token: start.lease.token,
            };
            self.effects.push_back(Effect::StartAttempt(start));
            self.effects.push_back(Effect::Event(granted));
        }
    }
}

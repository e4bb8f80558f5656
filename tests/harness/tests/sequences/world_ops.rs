//! The world's worker, watchdog, checkpoint, outbox and shutdown operations, and the liveness
//! phase.

use super::*;

impl World {
    /// A worker claims work of `kinds`: it gets the oldest queued run of those kinds, or
    /// nothing if none is queued; refused while shutting down. Returns the claimed run.
    pub(super) fn claim(&mut self, worker: usize, kinds: &[&str]) -> Option<RunId> {
        let worker = self.workers[worker % WORKERS].clone();
        let oldest = self
            .keel
            .runs()
            .filter_map(|r| match r.state() {
                RunState::Queued { since } if kinds.contains(&r.kind()) => {
                    Some((since, r.id(), r.attempt()))
                }
                _ => None,
            })
            .min();
        let shutting_down = self.keel.is_shutting_down();
        let before = fingerprint(&self.keel);
        let result = self.keel.claim(self.clock, &worker, kinds);
        if shutting_down {
            assert_eq!(result, Err(Rejected::ShuttingDown));
        }
        let claimed = self.refused_changes_nothing("claim", before, result)?;
        match (claimed, oldest) {
            (None, None) => {
                self.stats.empty_claims += 1;
                None
            }
            (Some(claimed), Some((_, id, attempt))) => {
                assert_eq!(
                    claimed.run, id,
                    "a claim for {kinds:?} gets the oldest queued run"
                );
                let run = self.keel.run(id).expect("a claimed run is in memory");
                assert_eq!(
                    run.state(),
                    RunState::Starting {
                        attempt: Attempt(attempt.0 + 1)
                    }
                );
                assert_eq!(run.lease().map(|l| &l.owner), Some(&worker));
                self.promises.claims.insert(id, worker);
                self.stats.claims += 1;
                Some(id)
            }
            (claimed, oldest) => panic!(
                "a claim for {kinds:?} returned {claimed:?}, but the oldest queued run is \
                 {oldest:?}"
            ),
        }
    }

    /// A write with a token that is not current must be refused and change nothing.
    pub(super) fn stale_refused<T: Debug>(
        &mut self,
        what: &str,
        pick: usize,
        write: impl FnOnce(&mut Scheduler, RunId, FencingToken) -> Result<T, Rejected>,
    ) {
        let (run, token) = self.stale_write(pick);
        let before = fingerprint(&self.keel);
        let result = write(&mut self.keel, run, token);
        self.assert_stale_refused(what, run, token, &result);
        self.stats.stale_refused += 1;
        self.refused_changes_nothing(what, before, result);
    }

    pub(super) fn progress(&mut self, pick: usize, stale: bool) {
        let clock = self.clock;
        if stale {
            return self.stale_refused("progress (stale)", pick, |k, run, token| {
                k.progress(clock, run, token, "upload", "from a stale holder")
            });
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let message = format!("{} items", pick % 1_000);
        self.keel
            .progress(clock, run, exec.token, "upload", &message)
            .unwrap_or_else(|e| panic!("progress of executing {run} ({}): {e}", exec.token));
        let now = self.keel.now();
        let r = self.keel.run(run).expect("an executing run is in memory");
        let progress = r.progress().expect("progress is recorded");
        assert_eq!(
            (
                progress.phase.as_str(),
                progress.message.as_str(),
                progress.at
            ),
            ("upload", message.as_str(), now)
        );
        assert_eq!(r.last_activity(), Some(now), "progress is a sign of life");
        self.stats.progress += 1;
    }

    pub(super) fn context(&mut self, pick: usize, stale: bool) {
        if stale {
            return self.stale_refused("context (stale)", pick, |k, run, token| {
                k.context(run, token)
            });
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let context = self
            .keel
            .context(run, exec.token)
            .unwrap_or_else(|e| panic!("context of executing {run} ({}): {e}", exec.token));
        let r = self.keel.run(run).expect("an executing run is in memory");
        assert_eq!(
            (context.run, context.attempt, context.lease.token),
            (run, exec.attempt, exec.token)
        );
        assert_eq!(context.lease.owner, exec.owner);
        assert_eq!(context.lease.expires_at, exec.expires_at);
        assert_eq!(&*context.payload, format!("payload of {}", context.job));
        assert_eq!(context.checkpoint.as_ref(), r.checkpoint());
        assert_eq!(context.progress.as_ref(), r.progress());
        self.stats.contexts += 1;
    }

    pub(super) fn release(&mut self, pick: usize, stale: bool) {
        if stale {
            // SPEC L4: releasing a lease that is no longer the holder's is "already released",
            // not an error, and changes nothing; a run the scheduler does not know is refused.
            let (run, token) = self.stale_write(pick);
            let known = self.keel.run(run).is_some();
            let before = fingerprint(&self.keel);
            let result = self.keel.release(self.clock, run, token);
            let expected = if known {
                Ok(Released::AlreadyReleased)
            } else {
                Err(Rejected::UnknownRun(run))
            };
            assert_eq!(result, expected, "release of {run} with {token}");
            assert_eq!(
                before,
                fingerprint(&self.keel),
                "a release of {run} with {token} changed the state"
            );
            if known {
                self.stats.already_released += 1;
            } else {
                self.stats.refusals += 1;
            }
            return;
        }
        if let Some((run, _)) = self.pick_executing(pick) {
            self.release_run(run);
        }
    }

    /// The executing attempt of `run` gives its lease back: it counts as lost, and the run
    /// retries at once or ends (poison, exhausted, cancelled).
    pub(super) fn release_run(&mut self, run: RunId) {
        let token = self.executing[&run].token;
        let lost = self.keel.run(run).expect("executing").lost();
        let result = self.keel.release(self.clock, run, token);
        assert_eq!(result, Ok(Released::Released), "release of executing {run}");
        self.retire(run);
        let now = self.keel.now();
        let r = self
            .keel
            .run(run)
            .expect("in memory until its record is acknowledged");
        assert_eq!(r.lost(), lost + 1, "a released attempt counts as lost");
        assert!(r.lease().is_none(), "{run} kept its lease after a release");
        assert!(
            r.state().is_terminal() || r.state() == RunState::BackingOff { until: now },
            "{run} is {:?} after a release",
            r.state()
        );
        if r.state().is_terminal() {
            self.stats.terminal_runs += 1;
        }
        self.stats.releases += 1;
    }

    /// `extend` a run: the answer is exactly what the run's state allows (SPEC W1, W2).
    pub(super) fn extend(&mut self, pick: usize, target: u8, by_ms: u64) {
        let in_memory: Vec<RunId> = self.keel.runs().map(|r| r.id()).collect();
        let killed: Vec<RunId> = self
            .keel
            .runs()
            .filter(|r| r.killed().is_some())
            .map(|r| r.id())
            .collect();
        let run_id = match target % 4 {
            0 | 1 if !self.executing.is_empty() => self.pick_executing(pick).expect("some").0,
            2 if !killed.is_empty() => killed[pick % killed.len()],
            _ => in_memory
                .get(pick % (in_memory.len() + 1))
                .copied()
                .unwrap_or(RunId(u64::MAX / 2)),
        };
        let expected = expected_extend(&self.keel, run_id, self.clock, by_ms);
        let before = fingerprint(&self.keel);
        let result = self
            .keel
            .extend(self.clock, run_id, by_ms, "the upstream is slow today");
        assert_eq!(result, expected, "extend({run_id}, {by_ms} ms)");
        self.promises.extend_answered(run_id, &result);
        match result {
            Ok(deadline) => {
                let run = self.keel.run(run_id).expect("extended");
                assert!(run.extended());
                assert_eq!(run.watch().timeout_at, Some(deadline));
                self.stats.extensions += 1;
            }
            Err(e) => {
                assert_eq!(
                    before,
                    fingerprint(&self.keel),
                    "refused extend ({e}) changed the state"
                );
                self.stats.extensions_refused += 1;
            }
        }
    }

    /// The watchdog killed an attempt (`Effect::KillAttempt`): only an attempt with a timeout,
    /// not before it, and for good (SPEC W1, W2).
    pub(super) fn kill(&mut self, run: RunId, attempt: Attempt) {
        let exec = self.retire(run);
        assert_eq!(
            exec.attempt, attempt,
            "{run}: attempt {attempt} killed, but attempt {} is executing",
            exec.attempt
        );
        let timeout = exec.timeout_ms.unwrap_or_else(|| {
            panic!("{run} attempt {attempt} killed, but its job has no timeout")
        });
        assert!(
            self.last_tick >= exec.started_at.plus_ms(timeout),
            "{run} attempt {attempt} killed at {}, before its timeout ({timeout} ms from {})",
            self.last_tick,
            exec.started_at
        );
        let r = self
            .keel
            .run(run)
            .expect("a killed run is in memory until its record is acknowledged");
        assert_eq!(r.killed(), Some(attempt));
        // The lease is revoked (a retry due at once may already hold a new one).
        assert!(
            r.lease().is_none_or(|l| l.token != exec.token),
            "a kill revokes the lease"
        );
        self.promises.killed.insert((run, attempt));
        self.stats.kills += 1;
    }

    pub(super) fn checkpoint(&mut self, pick: usize, stale: bool) {
        let clock = self.clock;
        if stale {
            return self.stale_refused("save_checkpoint (stale)", pick, |k, run, token| {
                k.save_checkpoint(clock, run, token, "from a stale holder".into())
            });
        }
        let Some((run, exec)) = self.pick_executing(pick) else {
            return;
        };
        let previous = self.keel.run(run).and_then(|r| r.checkpoint().cloned());
        let data = format!("{run} attempt {} at {}", exec.attempt, pick % 1_000);
        let result = self
            .keel
            .save_checkpoint(clock, run, exec.token, data.clone())
            .unwrap_or_else(|e| panic!("checkpoint of executing {run} ({}): {e}", exec.token));
        let now = self.keel.now();
        let current = self.keel.run(run).and_then(|r| r.checkpoint().cloned());
        if let Some(attempt) = self.promises.must_write.remove(&run) {
            // SPEC C1: a failed save never throttles the next one away.
            assert_eq!(attempt, exec.attempt);
            assert!(
                matches!(result, CheckpointSave::Saving { .. }),
                "SPEC C1: {run}: the save after a failed save was {result:?}"
            );
            self.stats.saves_after_failure += 1;
        }
        match result {
            CheckpointSave::Saving { seq } => {
                assert_eq!(seq, previous.as_ref().map_or(1, |c| c.seq + 1));
                assert_eq!(
                    current,
                    Some(Checkpoint {
                        seq,
                        attempt: exec.attempt,
                        saved_at: now,
                        data,
                    })
                );
                self.throttled.remove(&run);
                self.stats.checkpoints_saved += 1;
            }
            CheckpointSave::Throttled { until } => {
                assert!(until >= now, "throttled until {until}, before {now}");
                assert_eq!(current, previous, "a throttled save changed the checkpoint");
                self.throttled.insert(run, (exec.attempt, data));
                self.stats.checkpoints_throttled += 1;
            }
        }
    }

    /// After `flush_checkpoints` (or `begin_shutdown`): every throttled save was written
    /// (SPEC C3), and each write is the save that follows a failed one, if any.
    pub(super) fn after_flush(&mut self, before: &BTreeMap<RunId, Option<u64>>) {
        for (run, (attempt, data)) in std::mem::take(&mut self.throttled) {
            let r = self.keel.run(run).expect("an executing run is in memory");
            assert_eq!(
                r.checkpoint().map(|c| (c.attempt, c.data.as_str())),
                Some((attempt, data.as_str())),
                "SPEC C3: the flush did not write {run}'s throttled save"
            );
        }
        self.promises.flushed_since(&self.keel, before);
    }

    /// `Effect::Deliver`: released only once its record is durable, carrying a durable result,
    /// and never twice for one attempt, across crashes too (SPEC D1).
    pub(super) fn deliver(&mut self, send: SendRequest) {
        let (id, attempt) = (send.id, send.attempt);
        assert!(
            SINKS.contains(&&*send.sink),
            "{id} to unknown sink {}",
            send.sink
        );
        let attempts_max = self.keel.outbox().config().policy.attempts_max;
        assert!(
            (1..=attempts_max).contains(&attempt),
            "{id} attempt {attempt}"
        );
        if let Some(notice) = send.payload.incident() {
            self.stats.notice_sends += 1;
            if notice.event == keel_core::IncidentEvent::Escalated {
                self.stats.escalation_sends += 1;
            }
        }
        self.promises.sent(send, &self.store);
        self.stats.sends += 1;
    }

    /// A sink answers a send: accepted; the delivery ends, or retries after its backoff.
    pub(super) fn answer(&mut self, pick: usize, answer: AnswerChoice) {
        let Some(&id) = self
            .promises
            .sends
            .keys()
            .nth(pick % self.promises.sends.len().max(1))
        else {
            return;
        };
        self.answer_send(id, answer);
    }

    pub(super) fn answer_send(&mut self, id: DeliveryId, answer: AnswerChoice) {
        let send = self.promises.sends.remove(&id).expect("a send in flight");
        let attempt = send.attempt;
        let state = self.keel.outbox().delivery(id).map(|d| d.state);
        assert_eq!(state, Some(DeliveryState::Sending { attempt }));
        self.keel
            .handle_delivery_result(self.clock, id, attempt, answer.result())
            .unwrap_or_else(|e| panic!("answer to {id} attempt {attempt}: {e}"));
        self.promises.answered.push((id, attempt));
        self.stats.answers += 1;
        let now = self.keel.now();
        let after = self.keel.outbox().delivery(id);
        let attempts_max = self.keel.outbox().config().policy.attempts_max;
        match answer {
            AnswerChoice::Transient { .. } if attempt < attempts_max => {
                // SPEC D2, D3: the outbox retries it after its backoff, without the job.
                let state = after.map(|d| d.state);
                assert!(
                    matches!(state, Some(DeliveryState::Waiting { due }) if due > now),
                    "{id} is {state:?} after a transient failure of attempt {attempt}"
                );
            }
            _ => assert!(
                after.is_none(),
                "{id} still in the outbox after {answer:?} to attempt {attempt}"
            ),
        }
    }

    /// An answer for a send that is not current is refused and changes nothing.
    pub(super) fn stale_answer(&mut self, pick: usize) {
        let (id, attempt) = match pick % 3 {
            0 if !self.promises.answered.is_empty() => {
                self.promises.answered[(pick / 3) % self.promises.answered.len()]
            }
            1 if !self.promises.sends.is_empty() => {
                let send = self
                    .promises
                    .sends
                    .values()
                    .nth((pick / 3) % self.promises.sends.len())
                    .expect("not empty");
                (send.id, send.attempt + 1)
            }
            _ => (DeliveryId(u64::MAX / 2), 1),
        };
        let before = fingerprint(&self.keel);
        let result =
            self.keel
                .handle_delivery_result(self.clock, id, attempt, DeliveryResult::Delivered);
        assert!(
            matches!(result, Err(Rejected::Delivery(_))),
            "an answer for {id} attempt {attempt}, not current, was not refused: {result:?}"
        );
        self.stats.stale_answers += 1;
        self.refused_changes_nothing("handle_delivery_result (stale)", before, result);
    }

    /// SPEC D4: every delivery that ends is counted once (`Finished` or `Dropped`).
    pub(super) fn delivery_event(&mut self, event: OutboxEvent) {
        let id = match event {
            OutboxEvent::Finished { id, .. } => {
                self.stats.deliveries_finished += 1;
                Some(id)
            }
            OutboxEvent::Dropped { id, .. } => {
                self.stats.deliveries_dropped += 1;
                id
            }
            OutboxEvent::RetryScheduled { .. } => None,
        };
        let Some(id) = id else {
            return;
        };
        self.promises.ended(id, &self.store);
        assert!(
            self.keel.outbox().delivery(id).is_none(),
            "{id} ended but is still in the outbox"
        );
    }

    /// `begin_shutdown`: lists its own attempts in progress (they go on, with the driver's
    /// budget to finish: SPEC O1), lists the sends in flight (SPEC D5), flushes throttled
    /// checkpoints (C3), and nothing new fires or is claimed.
    pub(super) fn shutdown(&mut self) {
        if self.keel.is_shutting_down() {
            return;
        }
        let seqs = checkpoint_seqs(&self.keel);
        let running = own_attempts_in_progress(&self.keel);
        let in_flight = self.keel.outbox().in_flight();
        let shutdown = self.keel.begin_shutdown(self.clock);
        assert!(self.keel.is_shutting_down());
        let asked: BTreeSet<(RunId, Attempt)> = shutdown.attempts.iter().copied().collect();
        assert_eq!(
            asked, running,
            "begin_shutdown lists its own attempts in progress"
        );
        let own = self.keel.worker().clone();
        for (run, exec) in self.executing.iter().filter(|(_, e)| e.owner == own) {
            assert!(asked.contains(&(*run, exec.attempt)));
        }
        assert_eq!(shutdown.deliveries, in_flight);
        for id in self.promises.sends.keys() {
            assert!(shutdown.deliveries.contains(id), "{id} is being sent");
        }
        self.after_flush(&seqs);
        let highest = self
            .keel
            .runs()
            .map(|r| r.id())
            .chain(self.store.runs().map(|r| r.id()))
            .max();
        self.shutdown_floor = Some(highest.unwrap_or(RunId(0)));
        self.shutdown_backlog = self
            .keel
            .jobs()
            .flat_map(|j| j.backlog.iter().map(|slot| (j.spec.id.clone(), *slot)))
            .collect();
        self.stats.shutdowns += 1;
    }

    /// No run loops forever (the poison verdict, bounded retries and snoozes) and every
    /// delivery ends: faults stop, nothing new fires (every job is paused), workers claim what
    /// is queued, every attempt and send is answered, and time moves on in bounded steps. Within
    /// a bounded horizon every run must be terminal in the store and the outbox empty, and
    /// every delivery the store ever held must have ended.
    pub(super) fn liveness(&mut self) {
        self.faults = false;
        if let Some(batch) = self.held.take() {
            self.ack(batch);
        }
        if self.keel.is_shutting_down() {
            // After a graceful shutdown the process stops; it is started again.
            self.crash();
        }
        self.clock = self.clock.max(self.keel.now());
        let scheduled: Vec<JobId> = self
            .keel
            .jobs()
            .filter(|j| matches!(j.state, JobState::Scheduled { .. }))
            .map(|j| j.spec.id.clone())
            .collect();
        for id in scheduled {
            self.keel
                .pause_job(self.clock, &id)
                .expect("a scheduled job can be paused");
        }
        let horizon = self.clock.plus_ms(LIVENESS_HORIZON_MS);
        loop {
            self.drain();
            while !self.verifying.is_empty() {
                self.verified(0);
            }
            while self.claim(0, &["work"]).is_some() {}
            self.drain();
            let executing: Vec<RunId> = self.executing.keys().copied().collect();
            for run in executing {
                match self.rng.below_inclusive(9) {
                    0..=5 => self.complete_run(run, &OutcomeChoice::Success),
                    6 | 7 => self.complete_run(run, &OutcomeChoice::Retryable),
                    8 => self.complete_run(run, &OutcomeChoice::Permanent),
                    _ => self.release_run(run),
                }
            }
            let sends: Vec<DeliveryId> = self.promises.sends.keys().copied().collect();
            for id in sends {
                let answer = match self.rng.below_inclusive(9) {
                    0..=6 => AnswerChoice::Delivered,
                    7 | 8 => AnswerChoice::Transient {
                        retry_after_ms: None,
                    },
                    _ => AnswerChoice::Permanent,
                };
                self.answer_send(id, answer);
            }
            self.drain();
            self.keel.check_invariants();
            self.check_world();
            if self.settled() {
                break;
            }
            let step = self.clock.plus_ms(LIVENESS_STEP_MS);
            let next = self.keel.poll_timeout().map_or(step, |next| next.min(step));
            self.clock = self.clock.max(next);
            self.step(&Op::Timeout);
            self.stats.liveness_rounds += 1;
            assert!(
                self.clock <= horizon,
                "no run loops forever, but after {} h without faults: runs {:?}, stored active \
                 runs {:?}, outbox {:?}",
                LIVENESS_HORIZON_MS / HOUR_MS,
                self.keel.runs().collect::<Vec<_>>(),
                self.store
                    .runs()
                    .filter(|r| !r.state().is_terminal())
                    .collect::<Vec<_>>(),
                self.keel.outbox().deliveries().collect::<Vec<_>>()
            );
        }
        let missing: Vec<&DeliveryId> = self.promises.never_ended(&self.store);
        assert!(
            missing.is_empty(),
            "SPEC D4: deliveries {missing:?} were stored but never ended"
        );
    }

    /// Nothing is left to do: every run is terminal in memory and in the store, and no
    /// delivery is left.
    pub(super) fn settled(&self) -> bool {
        self.held.is_none()
            && self.keel.is_quiescent()
            && self.executing.is_empty()
            && self.promises.sends.is_empty()
            && self.keel.runs().all(|r| r.state().is_terminal())
            && self.store.runs().all(|r| r.state().is_terminal())
            && self.keel.outbox().is_empty()
            && self.store.deliveries().next().is_none()
    }

    /// Returns the command's value; if it was refused, asserts it changed nothing.
    pub(super) fn refused_changes_nothing<T: Debug>(
        &mut self,
        what: &str,
        before: String,
        result: Result<T, Rejected>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                let after = fingerprint(&self.keel);
                if before != after {
                    panic!("refused {what} ({e}) changed the state:\nbefore: {before}\nafter:  {after}");
                }
                self.stats.refusals += 1;
                None
            }
        }
    }
}

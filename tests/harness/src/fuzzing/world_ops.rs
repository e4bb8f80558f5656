//! What each [`CoreOp`](super::CoreOp) does to the world.

use super::*;

impl World {
    pub(super) fn apply(&mut self, op: CoreOp) {
        let now = self.now;
        let start = self.start;
        match op {
            CoreOp::AddJob(args) => {
                let _ = self.sched.add_job(now, canned_spec(args, now, start));
            }
            CoreOp::UpdateJob(args) => {
                let _ = self.sched.update_job(now, canned_spec(args, now, start));
            }
            CoreOp::Clock(ClockMove::Forward(ms)) => self.set_now(now.0 + ms),
            CoreOp::Clock(ClockMove::Backward(ms)) => self.set_now(now.0 - ms),
            CoreOp::Clock(ClockMove::ToNextDeadline) => self.advance_to_next_deadline(),
            CoreOp::Tick => self.tick(),
            CoreOp::Drain(mode) => self.drain(match mode % 4 {
                0 => PersistMode::Hold,
                3 => PersistMode::Fail,
                _ => PersistMode::Ack,
            }),
            CoreOp::Ack => self.ack(),
            CoreOp::Fail => self.fail(),
            CoreOp::Outcome { index, kind, arg } => {
                self.report(usize::from(index), outcome(kind, arg));
            }
            CoreOp::StaleOutcome { index, variant } => {
                let (run, token) = self.stale_target(usize::from(index), variant);
                let outcome = outcome(variant >> 2, variant);
                self.expect_refused("outcome", run, token, |s| {
                    s.handle_outcome(now, run, token, outcome)
                });
                self.expect_refused("heartbeat", run, token, |s| s.heartbeat(now, run, token));
            }
            CoreOp::Heartbeat { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("heartbeat", run, token, |s| s.heartbeat(now, run, token));
            }
            CoreOp::Heartbeat { index, .. } => self.heartbeat(usize::from(index)),
            CoreOp::Pause(id) => {
                let _ = self.sched.pause_job(now, &job_id(id));
            }
            CoreOp::Resume(id) => {
                let _ = self.sched.resume_job(now, &job_id(id));
            }
            CoreOp::Remove(id) => {
                let _ = self.sched.remove_job(now, &job_id(id));
            }
            CoreOp::Trigger(id) => {
                let _ = self.sched.trigger(now, &job_id(id));
            }
            CoreOp::Cancel(index) => {
                let runs: Vec<RunId> = self.sched.runs().map(|r| r.id()).collect();
                let run = if runs.is_empty() || index == 0xff {
                    RunId(u64::from(index))
                } else {
                    runs[usize::from(index) % runs.len()]
                };
                let _ = self.sched.cancel_run(now, run);
            }
            CoreOp::Crash { flags, seed } => self.crash(flags, u64::from(seed)),
            CoreOp::Step(kind) => {
                self.advance_to_next_deadline();
                self.tick();
                self.check();
                self.drain(PersistMode::Ack);
                for i in 0..self.started.len().min(STEP_MAX_OUTCOMES) {
                    self.report(0, outcome(kind.wrapping_add(i as u8), kind));
                    if i < DRAIN_CHECKED_EFFECTS {
                        self.check();
                    }
                }
                self.drain(PersistMode::Ack);
            }
            CoreOp::AddJobExt(args, features) => {
                let spec = with_features(canned_spec(args, now, start), features);
                let _ = self.sched.add_job(now, spec);
            }
            CoreOp::UpdateJobExt(args, features) => {
                let spec = with_features(canned_spec(args, now, start), features);
                let _ = self.sched.update_job(now, spec);
            }
            CoreOp::Claim { worker, kinds } => {
                let kinds: &[&str] = match kinds % 4 {
                    0 => &["work"],
                    1 => &["work", "other"],
                    2 => &["other"],
                    _ => &[],
                };
                self.claim(usize::from(worker), kinds);
            }
            CoreOp::Progress { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("progress", run, token, |s| {
                    s.progress(now, run, token, "phase", "stale")
                });
            }
            CoreOp::Progress { index, .. } => {
                if let Some(s) = self.pick_started(index) {
                    self.sched
                        .progress(now, s.run, s.token, "upload", "42 items")
                        .unwrap_or_else(|e| panic!("progress of executing {}: {e}", s.run));
                    let run = self.sched.run(s.run).expect("executing");
                    assert_eq!(run.last_activity(), Some(self.sched.now()));
                    assert_eq!(run.progress().map(|p| p.phase.as_str()), Some("upload"));
                }
            }
            CoreOp::Context { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("context", run, token, |s| s.context(run, token));
            }
            CoreOp::Context { index, .. } => {
                if let Some(s) = self.pick_started(index) {
                    let context = self
                        .sched
                        .context(s.run, s.token)
                        .unwrap_or_else(|e| panic!("context of executing {}: {e}", s.run));
                    let run = self.sched.run(s.run).expect("executing");
                    assert_eq!(
                        (
                            context.attempt,
                            context.lease.token,
                            context.lease.expires_at
                        ),
                        (s.attempt, s.token, s.expires_at)
                    );
                    assert_eq!(context.checkpoint, run.checkpoint().cloned());
                }
            }
            CoreOp::Release { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.stale_release(run, token);
            }
            CoreOp::Release { index, .. } => self.release(usize::from(index)),
            CoreOp::SaveCheckpoint { index, variant } if variant % 4 == 3 => {
                let (run, token) = self.stale_target(usize::from(index), variant >> 2);
                self.expect_refused("save_checkpoint", run, token, |s| {
                    s.save_checkpoint(now, run, token, "stale".into())
                });
            }
            CoreOp::SaveCheckpoint { index, variant } => {
                self.save_checkpoint(usize::from(index), variant);
            }
            CoreOp::Extend { index, target, by } => {
                self.extend(usize::from(index), target, 1_000 * (1 + u64::from(by)));
            }
            CoreOp::Flush => {
                let seqs = checkpoint_seqs(&self.sched);
                self.sched.flush_checkpoints(now);
                self.after_flush(&seqs);
            }
            CoreOp::Answer { index, kind, arg } => {
                let result = match kind % 4 {
                    0 => DeliveryResult::Delivered,
                    1 => DeliveryResult::Transient {
                        error: "HTTP 503".into(),
                        retry_after_ms: Some(1_000 * u64::from(arg)),
                    },
                    2 => DeliveryResult::Transient {
                        error: "connection reset".into(),
                        retry_after_ms: None,
                    },
                    _ => DeliveryResult::Permanent {
                        error: "HTTP 404".into(),
                    },
                };
                self.answer(usize::from(index), result);
            }
            CoreOp::StaleAnswer { index, variant } => {
                self.stale_answer(usize::from(index), variant);
            }
            CoreOp::Shutdown => self.shutdown(),
            CoreOp::Settle => self.settle(),
        }
    }

    /// The executing attempt at `index` (modulo their count).
    pub(super) fn pick_started(&self, index: u8) -> Option<Started> {
        if self.started.is_empty() {
            return None;
        }
        Some(self.started[usize::from(index) % self.started.len()])
    }

    /// A worker claims work of `kinds`: the oldest queued run of those kinds, or nothing;
    /// refused while shutting down. Returns the claimed run.
    pub(super) fn claim(&mut self, worker: usize, kinds: &[&str]) -> Option<RunId> {
        let worker = self.workers[worker % WORKERS].clone();
        let oldest = self
            .sched
            .runs()
            .filter_map(|r| match r.state() {
                RunState::Queued { since } if kinds.contains(&r.kind()) => Some((since, r.id())),
                _ => None,
            })
            .min();
        let shutting_down = self.sched.is_shutting_down();
        let result = self.sched.claim(self.now, &worker, kinds);
        match result {
            Err(Rejected::ShuttingDown) if shutting_down => None,
            Ok(None) if oldest.is_none() && !shutting_down => None,
            Ok(Some(claimed)) if oldest.map(|(_, id)| id) == Some(claimed.run) => {
                let run = self
                    .sched
                    .run(claimed.run)
                    .expect("a claimed run is in memory");
                assert!(matches!(run.state(), RunState::Starting { .. }));
                assert_eq!(run.lease().map(|l| &l.owner), Some(&worker));
                self.promises.claims.insert(claimed.run, worker);
                Some(claimed.run)
            }
            other => panic!(
                "claim for {kinds:?} (shutting down: {shutting_down}) returned {other:?}, but \
                 the oldest queued run is {oldest:?}"
            ),
        }
    }

    /// SPEC L4: releasing a lease that is not the holder's is "already released" (a run not in
    /// memory is unknown), and changes nothing.
    pub(super) fn stale_release(&mut self, run: RunId, token: FencingToken) {
        let before = self.sched.run(run).cloned();
        let timeout = self.sched.poll_timeout();
        let now = self.sched.now();
        let result = self.sched.release(self.now, run, token);
        let expected = if before.is_some() {
            Ok(Released::AlreadyReleased)
        } else {
            Err(Rejected::UnknownRun(run))
        };
        assert_eq!(result, expected, "stale release of {run} with {token}");
        assert_eq!(
            self.sched.run(run),
            before.as_ref(),
            "a stale release changed {run}"
        );
        assert_eq!(self.sched.poll_timeout(), timeout);
        assert_eq!(self.sched.now(), now, "a stale release moved the clock");
    }

    /// An executing attempt gives its lease back: accepted; it counts as lost.
    pub(super) fn release(&mut self, index: usize) {
        if self.started.is_empty() {
            return;
        }
        let s = self.started.remove(index % self.started.len());
        let lost = self.sched.run(s.run).map(|r| r.lost());
        let result = self.sched.release(self.now, s.run, s.token);
        assert_eq!(
            result,
            Ok(Released::Released),
            "release of executing {}",
            s.run
        );
        let run = self.sched.run(s.run).expect("in memory until acknowledged");
        assert_eq!(
            Some(run.lost()),
            lost.map(|l| l + 1),
            "a release counts as lost"
        );
        assert!(run.lease().is_none());
        self.stale.push((s.run, s.token));
    }

    /// An executing attempt saves a checkpoint (`variant % 8 == 7`: too large, refused).
    pub(super) fn save_checkpoint(&mut self, index: usize, variant: u8) {
        if self.started.is_empty() {
            return;
        }
        let s = self.started[index % self.started.len()];
        let previous = self.sched.run(s.run).and_then(|r| r.checkpoint().cloned());
        if variant % 8 == 7 {
            let data = "x".repeat(limits::CHECKPOINT_MAX_BYTES + 1);
            let timeout = self.sched.poll_timeout();
            let result = self.sched.save_checkpoint(self.now, s.run, s.token, data);
            assert!(
                matches!(
                    result,
                    Err(Rejected::InvalidField {
                        field: "checkpoint",
                        ..
                    })
                ),
                "an oversized checkpoint: {result:?}"
            );
            let current = self.sched.run(s.run).and_then(|r| r.checkpoint().cloned());
            assert_eq!(current, previous);
            assert_eq!(self.sched.poll_timeout(), timeout);
            return;
        }
        let data = format!("{} at {variant}", s.attempt);
        let result = self
            .sched
            .save_checkpoint(self.now, s.run, s.token, data.clone())
            .unwrap_or_else(|e| panic!("checkpoint of executing {} ({}): {e}", s.run, s.token));
        let current = self.sched.run(s.run).and_then(|r| r.checkpoint().cloned());
        if self.promises.must_write.remove(&s.run) == Some(s.attempt) {
            // SPEC C1: a failed save never throttles the next one away.
            assert!(
                matches!(result, CheckpointSave::Saving { .. }),
                "SPEC C1: {}: the save after a failed save was {result:?}",
                s.run
            );
        }
        match result {
            CheckpointSave::Saving { seq } => {
                assert_eq!(seq, previous.map_or(1, |c| c.seq + 1));
                assert_eq!(
                    current.map(|c| (c.seq, c.attempt, c.data)),
                    Some((seq, s.attempt, data))
                );
            }
            CheckpointSave::Throttled { .. } => assert_eq!(current, previous),
        }
    }

    /// `extend`: granted at most once per run, never for a killed run, and otherwise exactly
    /// as the run's state allows (SPEC W1, W2).
    pub(super) fn extend(&mut self, index: usize, target: u8, by_ms: u64) {
        let runs: Vec<RunId> = self.sched.runs().map(|r| r.id()).collect();
        let killed: Vec<RunId> = self
            .sched
            .runs()
            .filter(|r| r.killed().is_some())
            .map(|r| r.id())
            .collect();
        let run_id = match target % 4 {
            0 if !self.started.is_empty() => self.started[index % self.started.len()].run,
            1 if !killed.is_empty() => killed[index % killed.len()],
            2 if !runs.is_empty() => runs[index % runs.len()],
            _ => RunId(1_000_000 + index as u64),
        };
        let expected = expected_extend(&self.sched, run_id, self.now, by_ms);
        let before = self.sched.run(run_id).cloned();
        let timeout = self.sched.poll_timeout();
        let result = self.sched.extend(self.now, run_id, by_ms, "slow upstream");
        assert_eq!(result, expected, "extend({run_id}, {by_ms} ms)");
        self.promises.extend_answered(run_id, &result);
        if result.is_err() {
            assert_eq!(
                self.sched.run(run_id),
                before.as_ref(),
                "a refused extend changed it"
            );
            assert_eq!(self.sched.poll_timeout(), timeout);
        }
    }

    /// After a flush: what it wrote is the save after a failed one, if any.
    pub(super) fn after_flush(&mut self, before: &BTreeMap<RunId, Option<u64>>) {
        self.promises.flushed_since(&self.sched, before);
    }

    /// `Effect::Deliver`: only once the record of that attempt is durable, carrying a durable
    /// terminal result, never twice for one attempt (across crashes too).
    pub(super) fn deliver(&mut self, send: SendRequest) {
        self.promises.sent(send, &self.store);
    }

    /// The sink answers the send at `index`: accepted.
    pub(super) fn answer(&mut self, index: usize, result: DeliveryResult) {
        let Some(&id) = self
            .promises
            .sends
            .keys()
            .nth(index % self.promises.sends.len().max(1))
        else {
            return;
        };
        let send = self.promises.sends.remove(&id).expect("picked");
        let state = self.sched.outbox().delivery(id).map(|d| d.state);
        assert_eq!(
            state,
            Some(DeliveryState::Sending {
                attempt: send.attempt
            })
        );
        self.sched
            .handle_delivery_result(self.now, id, send.attempt, result)
            .unwrap_or_else(|e| panic!("answer to {id} attempt {}: {e}", send.attempt));
        self.promises.answered.push((id, send.attempt));
    }

    /// An answer that is not current is refused and changes nothing.
    pub(super) fn stale_answer(&mut self, index: usize, variant: u8) {
        let (id, attempt) = match variant % 3 {
            0 if !self.promises.answered.is_empty() => {
                self.promises.answered[index % self.promises.answered.len()]
            }
            1 if !self.promises.sends.is_empty() => {
                let send = self
                    .promises
                    .sends
                    .values()
                    .nth(index % self.promises.sends.len())
                    .expect("some");
                (send.id, send.attempt + 1 + u32::from(variant >> 4))
            }
            _ => (DeliveryId(1_000_000 + index as u64), 1),
        };
        let outbox = self.sched.outbox().clone();
        let now = self.sched.now();
        let timeout = self.sched.poll_timeout();
        let result =
            self.sched
                .handle_delivery_result(self.now, id, attempt, DeliveryResult::Delivered);
        assert!(
            matches!(result, Err(Rejected::Delivery(_))),
            "an answer for {id} attempt {attempt}, not current, was not refused: {result:?}"
        );
        assert_eq!(
            self.sched.outbox(),
            &outbox,
            "a stale answer changed the outbox"
        );
        assert_eq!(self.sched.now(), now, "a stale answer moved the clock");
        assert_eq!(self.sched.poll_timeout(), timeout);
    }

    /// SPEC D4: every delivery that ends is counted once.
    pub(super) fn delivery_event(&mut self, event: OutboxEvent) {
        let (OutboxEvent::Finished { id, .. } | OutboxEvent::Dropped { id: Some(id), .. }) = event
        else {
            return;
        };
        self.promises.ended(id, &self.store);
    }

    /// `begin_shutdown`: the scheduler's own attempts in progress are listed (they go on, with
    /// the driver's budget to finish), the sends in flight are listed, and throttled
    /// checkpoints are written.
    pub(super) fn shutdown(&mut self) {
        if self.sched.is_shutting_down() {
            return;
        }
        let seqs = checkpoint_seqs(&self.sched);
        let running = own_attempts_in_progress(&self.sched);
        let in_flight = self.sched.outbox().in_flight();
        let shutdown = self.sched.begin_shutdown(self.now);
        let listed: BTreeSet<(RunId, Attempt)> = shutdown.attempts.iter().copied().collect();
        assert_eq!(
            listed, running,
            "begin_shutdown lists the own attempts in progress"
        );
        assert_eq!(shutdown.deliveries, in_flight);
        for id in self.promises.sends.keys() {
            assert!(shutdown.deliveries.contains(id), "{id} is being sent");
        }
        self.after_flush(&seqs);
    }

    /// The liveness check: see [`CoreOp::Settle`].
    pub(super) fn settle(&mut self) {
        self.ack();
        if self.sched.is_shutting_down() {
            // After a graceful shutdown the process stops; it is started again.
            self.crash(0, 0);
        }
        let scheduled: Vec<JobId> = self
            .sched
            .jobs()
            .filter(|j| matches!(j.state, JobState::Scheduled { .. }))
            .map(|j| j.spec.id.clone())
            .collect();
        for id in scheduled {
            self.sched
                .pause_job(self.now, &id)
                .expect("a scheduled job can be paused");
        }
        let success = Outcome::Success {
            summary: None,
            artifacts: BTreeMap::from([(REPORT.to_owned(), "s3://reports/1".to_owned())]),
        };
        // Slots waiting in a backlog (a catch-up, even of a job disabled since) run one after
        // another, about a round each.
        let backlog: usize = self.sched.jobs().map(|j| j.backlog.len()).sum();
        let rounds = SETTLE_ROUNDS + 2 * backlog;
        for _ in 0..rounds {
            self.drain(PersistMode::Ack);
            for _ in 0..STEP_MAX_OUTCOMES {
                if self.claim(0, &["work"]).is_none() {
                    break;
                }
            }
            self.drain(PersistMode::Ack);
            while !self.started.is_empty() {
                self.report(0, success.clone());
            }
            while !self.promises.sends.is_empty() {
                self.answer(0, DeliveryResult::Delivered);
            }
            self.drain(PersistMode::Ack);
            self.check();
            if self.settled() {
                let missing = self.promises.never_ended(&self.store);
                assert!(
                    missing.is_empty(),
                    "SPEC D4: {missing:?} stored but never ended"
                );
                return;
            }
            // Jump to the next thing to wait for: a retry, a delivery retry, a persist retry
            // (the hourly history sweep is not worth a round).
            let retry = self
                .sched
                .runs()
                .filter_map(|r| match r.state() {
                    RunState::BackingOff { until } => Some(until),
                    _ => None,
                })
                .min();
            let next = [retry, self.sched.outbox().poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .or(self.sched.poll_timeout());
            if let Some(next) = next {
                if next.0 > self.start.0 + CLOCK_SPAN_MS {
                    return; // past the end of the fuzzed time span: nothing to assert
                }
                self.set_now(next.0.max(self.now.0));
            }
            self.tick();
            self.check();
        }
        panic!(
            "no run loops forever, but {rounds} rounds without faults left runs {:?} and \
             deliveries {:?}",
            self.sched
                .runs()
                .map(|r| (r.id(), r.state()))
                .collect::<Vec<_>>(),
            self.sched
                .outbox()
                .deliveries()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        );
    }

    /// Nothing is left to do: every run terminal in memory and in the store, no delivery left.
    pub(super) fn settled(&self) -> bool {
        self.in_flight.is_none()
            && self.sched.is_quiescent()
            && self.started.is_empty()
            && self.promises.sends.is_empty()
            && self.sched.runs().all(|r| r.state().is_terminal())
            && self.store.runs().all(|r| r.state().is_terminal())
            && self.sched.outbox().is_empty()
            && self.store.deliveries().next().is_none()
    }

    pub(super) fn advance_to_next_deadline(&mut self) {
        if let Some(t) = self.sched.poll_timeout() {
            if t > self.now {
                self.set_now(t.0.min(self.now.0 + 400 * 86_400_000));
            }
        }
    }
}

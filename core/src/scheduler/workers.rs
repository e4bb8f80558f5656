//! The worker protocol: claims and fenced writes (SPEC L1, L4, C1–C3, and the heartbeat
//! contract for external workers).
//!
//! Every write a holder makes carries its fencing token and is checked against the run's
//! current lease: an unknown run is `Rejected::UnknownRun`, an older (or newer) token is
//! `Rejected::StaleToken`, and a run that is not running is `Rejected::NotRunning`. A refused
//! write changes nothing, except a completion refused for missing artifacts, which is recorded
//! in the audit trail (the run stays running). Operator lease actions (release, reclaim,
//! restore) are in `leases.rs`.
//!
//! | call | who | effect |
//! |---|---|---|
//! | `claim(worker, kinds)` | external worker | the oldest queued run of those kinds gets a lease; its attempt, with the lease and its token, is handed out (`StartAttempt`) only once the grant is durable |
//! | `heartbeat` | holder | renews the lease for a TTL from now; clears a stuck report |
//! | `progress` | holder | records phase and message; counts as a heartbeat for stuck detection |
//! | `context` | holder | the run's job, attempt, payload, lease and last checkpoint |
//! | `save_checkpoint` | holder | saves a snapshot, throttled (see `checkpoint`) |
//! | `handle_outcome` | holder | ends the attempt: success (with artifacts; through the artifact gate, `gate.rs`, when they are to be checked), retryable or permanent failure, snooze, cancelled |
//! | `verify` (`gate.rs`) | holder | checks one artifact target now; evidence stored |
//! | `release` | holder | gives the attempt back (it counts as lost); after a loss, "already released" is not an error |
//! | `record_refused_result` | holder | after a success was refused because its lease was lost: audits it as evidence; the run does not change |

use super::*;
use crate::checkpoint::SaveDecision;
use crate::run::{ErrorKind, Progress};

/// A claim that found a run. The lease itself, with its fencing token, reaches the worker in
/// `Effect::StartAttempt` once the grant is durable: a token revealed before that could be
/// granted again by a scheduler restarted from the store (SPEC L1, T1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The run.
    pub run: RunId,
}

/// What a release did (SPEC L4: releasing a lease that was already lost is not an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The attempt was given back; it counts as lost and the run retries.
    Released,
    /// The lease was no longer the holder's (reclaimed, killed, or finished): nothing to do.
    AlreadyReleased,
}

/// What a checkpoint save did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointSave {
    /// Being written; `Event::CheckpointSaved` or `Event::CheckpointFailed` follows.
    Saving {
        /// The save's sequence number.
        seq: u64,
    },
    /// Throttled: kept as the run's pending save, written by the next save after `until` or
    /// by `flush_checkpoints`.
    Throttled {
        /// When saves are written again.
        until: Timestamp,
    },
}

/// What a holder may know about its run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunContext {
    /// The run.
    pub run: RunId,
    /// The job.
    pub job: JobId,
    /// The handler kind.
    pub kind: Arc<str>,
    /// The payload.
    pub payload: Arc<str>,
    /// The attempt in progress.
    pub attempt: Attempt,
    /// The holder's lease.
    pub lease: Lease,
    /// The last checkpoint, to resume from.
    pub checkpoint: Option<Checkpoint>,
    /// The last progress reported.
    pub progress: Option<Progress>,
}

/// What `begin_shutdown` asks of the driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shutdown {
    /// Attempts in progress; each was sent `CancelAttempt`. Whatever has not finished within
    /// the driver's budget stays durable and is recovered at the next start.
    pub attempts: Vec<(RunId, Attempt)>,
    /// Deliveries being sent (SPEC D5): the driver waits for them within the same budget; the
    /// rest stay in the outbox for the next start.
    pub deliveries: Vec<DeliveryId>,
}

impl Scheduler {
    /// A worker asks for work of some kinds: the oldest queued run of those kinds is granted to
    /// it, or nothing. Repeated empty claims while work of other kinds waits raise an
    /// idle-claim-loop incident (a capability mismatch). Refused while shutting down.
    pub fn claim(
        &mut self,
        now: Timestamp,
        worker: &WorkerId,
        kinds: &[&str],
    ) -> Result<Option<Claimed>, Rejected> {
        if self.shutting_down {
            return Err(Rejected::ShuttingDown);
        }
        let now = self.clamp(now);
        self.note_claim_request(now, worker, kinds);
        let oldest = kinds
            .iter()
            .filter_map(|kind| self.queued.get(*kind).and_then(|q| q.first()).copied())
            .min();
        let Some((_, run_id)) = oldest else {
            self.empty_claim(now, worker, kinds);
            return Ok(None);
        };
        self.empty_claims.remove(worker);
        self.resolve_idle_claims(worker, "the worker claimed a run");
        let lease = self.new_lease(worker.clone());
        let run = self
            .runs
            .get_mut(&run_id)
            .expect("queued runs are in memory");
        let t = run.claim(lease);
        let (job, attempt) = (run.job.clone(), run.attempt);
        self.journal.gate(&job, run_id, attempt);
        self.after_run_transition(run_id, t, Actor::Worker(worker.to_string()));
        Ok(Some(Claimed { run: run_id }))
    }

    /// The holder reports how its attempt ended. Refused, changing nothing, if the token is not
    /// the run's current one or the run is not running; a success without the job's required
    /// artifacts is refused and recorded, and the run stays running.
    ///
    /// A success whose required artifacts include values keel checks (URLs, absolute paths;
    /// see [`crate::artifact`]) goes through the artifact gate: `Ok` then means the success
    /// waits for `Effect::VerifyArtifacts`'s answer ([`Scheduler::gate`] names the request),
    /// and [`Scheduler::handle_verified`] applies or refuses it. While it waits, another
    /// success is refused with `VerificationPending`; any other outcome ends the attempt and
    /// the gate with it.
    pub fn handle_outcome(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
        outcome: Outcome,
    ) -> Result<(), Rejected> {
        let run = self.holder(run_id, token)?;
        let owner = run
            .lease
            .as_ref()
            .map(|l| l.owner.to_string())
            .unwrap_or_default();
        if let Outcome::Success { artifacts, .. } = &outcome {
            let missing: Vec<String> = run
                .required_artifacts
                .iter()
                .filter(|name| !artifacts.contains_key(*name))
                .cloned()
                .collect();
            if !missing.is_empty() {
                // Recorded once per attempt: a worker retrying in a loop cannot flood the trail.
                if self.refused_completions.insert((run_id, run.attempt)) {
                    self.clamp(now);
                    let reason = format!("completion refused: missing artifacts {missing:?}");
                    self.audit_run(
                        run_id,
                        Some(StateName::Running),
                        StateName::Running,
                        Actor::Worker(owner),
                        &reason,
                    );
                }
                return Err(Rejected::MissingArtifacts {
                    run: run_id,
                    missing,
                });
            }
            if self.gates.contains_key(&run_id) {
                return Err(Rejected::VerificationPending(run_id));
            }
            let checks = self.gate_checks(run, artifacts);
            if !checks.is_empty() {
                let attempt = run.attempt;
                self.clamp(now);
                self.request_verification(run_id, token, attempt, checks, Some(outcome));
                return Ok(());
            }
        }
        let now = self.clamp(now);
        self.accept_outcome(now, run_id, outcome, owner);
        Ok(())
    }

    /// Applies an outcome the holder reported and the core accepted.
    pub(super) fn accept_outcome(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        outcome: Outcome,
        owner: String,
    ) {
        // Whatever ends the attempt ends a gate waiting in it; its late answer is dropped.
        self.gates.remove(&run_id);
        let attempt = self.runs[&run_id].attempt;
        if self.stopped_for_shutdown.remove(&(run_id, attempt))
            && !matches!(outcome, Outcome::Success { .. })
        {
            // Stopped by the shutdown, not failed: whatever it says (a cancel, an error from
            // being stopped) is the shutdown's doing (SPEC O1).
            self.interrupt_for_shutdown(now, run_id);
            return;
        }
        let run = self.runs.get_mut(&run_id).expect("checked by the caller");
        let t = run.apply_outcome(now, outcome, &mut self.rng);
        self.after_run_transition(run_id, t, Actor::Worker(owner));
    }

    /// The holder is alive: its lease is renewed for a TTL from `now`. Returns the renewed
    /// lease.
    pub fn heartbeat(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
    ) -> Result<Lease, Rejected> {
        let lease = self.renew_lease(now, run_id, token)?;
        self.alive(self.now, run_id);
        Ok(lease)
    }

    /// The holder's lease is renewed for a TTL from `now`, without counting as a sign of life
    /// of the attempt. A runtime renews the leases of its own executor this way while a
    /// handler works, so stuck detection (SPEC W5) still watches the handler's own heartbeats
    /// and progress. Returns the renewed lease.
    pub fn renew_lease(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
    ) -> Result<Lease, Rejected> {
        self.holder(run_id, token)?;
        let now = self.clamp(now);
        let ttl = self.config.lease.ttl_ms;
        let run = self.runs.get_mut(&run_id).expect("checked above");
        let lease = run.lease.as_mut().expect("a holder's run has a lease");
        lease.renewed_at = now;
        lease.expires_at = now.plus_ms(ttl);
        let lease = lease.clone();
        let job = run.job.clone();
        self.journal.put_run(&job, run_id);
        self.index_run(run_id);
        Ok(lease)
    }

    /// The holder reports progress: a phase and a message (each truncated to
    /// [`limits::PROGRESS_MAX_BYTES`]). Counts as a sign of life, not as a lease renewal.
    pub fn progress(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
        phase: &str,
        message: &str,
    ) -> Result<(), Rejected> {
        self.holder(run_id, token)?;
        let now = self.clamp(now);
        let cut = |text: &str| {
            let mut end = text.len().min(limits::PROGRESS_MAX_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_owned()
        };
        let run = self.runs.get_mut(&run_id).expect("checked above");
        run.progress = Some(Box::new(Progress {
            phase: cut(phase),
            message: cut(message),
            at: now,
        }));
        self.alive(now, run_id);
        Ok(())
    }

    /// What the holder may know about its run.
    pub fn context(&self, run_id: RunId, token: FencingToken) -> Result<RunContext, Rejected> {
        let run = self.holder(run_id, token)?;
        Ok(RunContext {
            run: run.id,
            job: run.job.clone(),
            kind: run.kind.clone(),
            payload: run.payload.clone(),
            attempt: run.attempt,
            lease: run.lease.clone().expect("a holder's run has a lease"),
            checkpoint: run.checkpoint.as_deref().cloned(),
            progress: run.progress.as_deref().cloned(),
        })
    }

    /// The holder gives its attempt back without an outcome: the attempt counts as lost (its
    /// own budget) and the run retries. If the lease is no longer the holder's, this is
    /// `AlreadyReleased`, not an error (SPEC L4).
    pub fn release(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
    ) -> Result<Released, Rejected> {
        match self.holder(run_id, token) {
            Ok(_) => {}
            Err(Rejected::UnknownRun(id)) => return Err(Rejected::UnknownRun(id)),
            Err(_) => return Ok(Released::AlreadyReleased),
        }
        let now = self.clamp(now);
        let run = self.runs.get_mut(&run_id).expect("checked above");
        let owner = run
            .lease
            .as_ref()
            .map(|l| l.owner.to_string())
            .unwrap_or_default();
        let message = format!("attempt {} released by {owner}", run.attempt);
        let t = run.lose_attempt(now, ErrorKind::Lost, &message);
        self.after_run_transition(run_id, t, Actor::Worker(owner));
        Ok(Released::Released)
    }

    /// Records a result that was refused because its lease was lost (SPEC L4) as evidence in
    /// the audit trail: attempt `attempt` of `run_id`, under `token`, held by `worker`, reported
    /// a success that no longer counts, and the run will execute again. The run does not change
    /// (the record's old and new states are its current one); only the trail shows that the
    /// work may have been done, so that whoever reads it does not retry blindly. Refused with
    /// `UnknownRun` if the run is not active any more (nothing left to attach the record to),
    /// and with `StaleToken` if `token` is the run's current lease (its result was not refused:
    /// report it with `handle_outcome`).
    pub fn record_refused_result(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        attempt: Attempt,
        token: FencingToken,
        worker: &WorkerId,
        summary: &str,
    ) -> Result<(), Rejected> {
        let Some(run) = self.runs.get(&run_id) else {
            return Err(Rejected::UnknownRun(run_id));
        };
        let current = run.lease.as_ref().map(|l| l.token);
        if current == Some(token) {
            return Err(Rejected::StaleToken {
                run: run_id,
                got: token,
                current,
            });
        }
        let (job, state) = (run.job.clone(), run.state.name());
        self.clamp(now);
        let seq = self.next_seq();
        let mut reason = format!(
            "result refused: lease {token} of attempt {attempt} was lost; the run will execute again"
        );
        if !summary.is_empty() {
            reason.push_str(": ");
            reason.push_str(summary);
        }
        self.journal.audit(AuditRecord {
            seq,
            at: self.now,
            job,
            run: Some(run_id),
            attempt: Some(attempt),
            fencing_token: Some(token),
            old: Some(state),
            new: state,
            actor: Actor::Worker(worker.to_string()),
            reason: crate::run::truncate(&reason),
            output: None,
        });
        Ok(())
    }

    /// Saves a checkpoint for the holder's run, throttled: no more often than
    /// `Config::checkpoint_interval_ms`, counted from the last acknowledged save (SPEC C1).
    pub fn save_checkpoint(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
        data: String,
    ) -> Result<CheckpointSave, Rejected> {
        self.holder(run_id, token)?;
        if data.len() > limits::CHECKPOINT_MAX_BYTES {
            return Err(Rejected::InvalidField {
                field: "checkpoint",
                reason: format!(
                    "is {} bytes; the limit is {}",
                    data.len(),
                    limits::CHECKPOINT_MAX_BYTES
                ),
            });
        }
        let now = self.clamp(now);
        let interval = self.config.checkpoint_interval_ms;
        let throttle = self.throttles.entry(run_id).or_default();
        match throttle.save(now, interval) {
            SaveDecision::Write => Ok(CheckpointSave::Saving {
                seq: self.write_checkpoint(run_id, data),
            }),
            SaveDecision::Throttled { until } => {
                throttle.pending = Some(data);
                self.effects
                    .push_back(Effect::Event(Event::CheckpointThrottled { run: run_id }));
                Ok(CheckpointSave::Throttled { until })
            }
        }
    }

    /// Writes every throttled checkpoint now (SPEC C3: graceful shutdown flushes unthrottled).
    pub fn flush_checkpoints(&mut self, now: Timestamp) {
        self.clamp(now);
        let pending: Vec<(RunId, String)> = self
            .throttles
            .iter_mut()
            .filter_map(|(run, t)| t.pending.take().map(|data| (*run, data)))
            .collect();
        for (run, data) in pending {
            self.write_checkpoint(run, data);
        }
    }

    /// A sink answered a delivery attempt (classify HTTP answers with
    /// [`crate::outbox::classify_http`]). Delivery retries are the outbox's own (SPEC D2, D3).
    pub fn handle_delivery_result(
        &mut self,
        now: Timestamp,
        id: DeliveryId,
        attempt: u32,
        result: DeliveryResult,
    ) -> Result<(), Rejected> {
        // The outbox changes nothing when it refuses an answer; the clock moves only after.
        self.outbox
            .handle_result(self.now.max(now), id, attempt, result)
            .map_err(Rejected::Delivery)?;
        self.clamp(now);
        self.pump_outbox();
        Ok(())
    }

    /// Starts a graceful shutdown (SPEC O1): nothing new fires or is claimed, and throttled
    /// checkpoints are flushed. Attempts in progress go on: they have the driver's budget to
    /// finish. Near its end the driver calls [`Scheduler::stop_for_shutdown`], and at its end
    /// [`Scheduler::end_shutdown`]; what does not finish stays durable for the next start.
    pub fn begin_shutdown(&mut self, now: Timestamp) -> Shutdown {
        self.flush_checkpoints(now);
        self.shutting_down = true;
        // Retries wait for the next start: take backing-off runs off the due index.
        let backing_off: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| matches!(r.state, RunState::BackingOff { .. }))
            .map(|r| r.id)
            .collect();
        for run in backing_off {
            self.index_run(run);
        }
        Shutdown {
            attempts: self.own_attempts(|state| matches!(state, RunState::Running { .. })),
            deliveries: self.outbox.in_flight(),
        }
    }

    /// Asks this scheduler's own attempts still running to stop (`CancelAttempt`), because the
    /// shutdown's budget is nearly spent. Whatever such an attempt then reports, except a
    /// success, interrupts its run for the next start without using an attempt. Attempts of
    /// external workers are theirs to finish: their leases run on. Returns the attempts asked.
    pub fn stop_for_shutdown(&mut self, now: Timestamp) -> Vec<(RunId, Attempt)> {
        if !self.shutting_down {
            self.begin_shutdown(now);
        }
        let running = self.own_attempts(|state| matches!(state, RunState::Running { .. }));
        for &(run, attempt) in &running {
            if self.stopped_for_shutdown.insert((run, attempt)) {
                self.effects.push_back(Effect::CancelAttempt {
                    run,
                    attempt,
                    reason: StopReason::Shutdown,
                });
            }
        }
        running
    }

    /// The shutdown's budget is spent: this scheduler's own attempts that have not ended are
    /// interrupted for the next start, using no attempt (SPEC O1), and their leases end, so
    /// nothing they report later is accepted. The driver then stops their tasks, writes this
    /// change and exits. Returns the runs interrupted.
    pub fn end_shutdown(&mut self, now: Timestamp) -> Vec<RunId> {
        if !self.shutting_down {
            self.begin_shutdown(now);
        }
        let now = self.clamp(now);
        let left = self.own_attempts(|state| {
            matches!(state, RunState::Starting { .. } | RunState::Running { .. })
        });
        for &(run, _) in &left {
            self.interrupt_for_shutdown(now, run);
        }
        left.into_iter().map(|(run, _)| run).collect()
    }

    fn interrupt_for_shutdown(&mut self, now: Timestamp, run_id: RunId) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let attempt = run.attempt;
        self.stopped_for_shutdown.remove(&(run_id, attempt));
        let t = run.interrupt_for_shutdown(now);
        self.after_run_transition(run_id, t, Actor::Scheduler);
    }

    /// This scheduler's own attempts in a state `state` accepts, in run order.
    fn own_attempts(&self, state: impl Fn(&RunState) -> bool) -> Vec<(RunId, Attempt)> {
        self.runs
            .values()
            .filter(|r| state(&r.state))
            .filter(|r| r.lease.as_ref().is_some_and(|l| l.owner == self.worker))
            .map(|r| (r.id, r.attempt))
            .collect()
    }

    /// The worker id this scheduler's own executor holds leases under (`restore_as`).
    pub fn worker(&self) -> &WorkerId {
        &self.worker
    }

    /// True once `begin_shutdown` was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// The run, if `token` is its current lease and it is running.
    pub(super) fn holder(&self, run_id: RunId, token: FencingToken) -> Result<&Run, Rejected> {
        let Some(run) = self.runs.get(&run_id) else {
            return Err(Rejected::UnknownRun(run_id));
        };
        let current = run.lease.as_ref().map(|l| l.token);
        if current != Some(token) {
            return Err(Rejected::StaleToken {
                run: run_id,
                got: token,
                current,
            });
        }
        if !matches!(run.state, RunState::Running { .. }) {
            return Err(Rejected::NotRunning {
                run: run_id,
                state: run.state.name(),
            });
        }
        Ok(run)
    }

    /// A sign of life from the holder: stuck detection starts over.
    fn alive(&mut self, now: Timestamp, run_id: RunId) {
        let run = self
            .runs
            .get_mut(&run_id)
            .expect("the caller checked the run");
        run.last_activity = Some(now);
        let was_stuck = std::mem::take(&mut run.watch.stuck_reported);
        let job = run.job.clone();
        self.journal.put_run(&job, run_id);
        self.index_run(run_id);
        if was_stuck {
            self.resolve_incidents_of_kind(
                run_id,
                IncidentKind::StuckRun,
                "the run shows life again",
            );
        }
    }

    /// Records a checkpoint in the run and queues its write; returns its sequence number.
    pub(super) fn write_checkpoint(&mut self, run_id: RunId, data: String) -> u64 {
        let now = self.now;
        let run = self
            .runs
            .get_mut(&run_id)
            .expect("checkpoints belong to runs in memory");
        let seq = run.checkpoint.as_ref().map_or(1, |c| c.seq + 1);
        run.checkpoint = Some(Box::new(Checkpoint {
            seq,
            attempt: run.attempt,
            saved_at: now,
            data,
        }));
        let job = run.job.clone();
        self.journal.checkpoint(&job, run_id, seq);
        self.throttles.entry(run_id).or_default().writing(seq);
        seq
    }

    /// A claim found nothing: count it, and raise an idle-claim-loop incident if the worker
    /// keeps asking for kinds nobody queued while other work waits.
    fn empty_claim(&mut self, now: Timestamp, worker: &WorkerId, kinds: &[&str]) {
        if self.queued.is_empty() {
            // Only empty claims while work waits count, and they count in a row.
            self.empty_claims.remove(worker);
            self.resolve_idle_claims(worker, "no work waits");
            return;
        }
        if !self.empty_claims.contains_key(worker)
            && self.empty_claims.len() >= limits::WORKERS_TRACKED_MAX
        {
            return;
        }
        let count = self.empty_claims.entry(worker.clone()).or_default();
        *count = count.saturating_add(1);
        let count = *count;
        // Past the threshold a worker polling in a loop asks again and again: its incident is
        // already open, so look it up (O(log)) before describing the backlog (O(kinds)).
        if count >= self.config.idle_claims_max
            && !self.has_incident(IncidentKind::IdleClaimLoop, None, Some(worker))
        {
            self.raise_idle_claim_loop(now, worker, kinds, count);
        }
    }
}

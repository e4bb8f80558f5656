//! Operator lease actions (SPEC W6, `PATCH runs/{id}/lease`): take a running attempt's lease
//! away, apply the watchdog's reclaim now, and give a taken lease back. Each is audited with
//! the old and new state, the operator's name ([`Actor::Person`]) and their reason.
//!
//! | command | from | to | budget |
//! |---|---|---|---|
//! | `release_lease` | `Running` | external: `Queued { since: now }`; in-process: `BackingOff { until: now }` (its next attempt starts at once); `Cancelled` after a cancel request | none: like a shutdown's stop (SPEC O1) an operator's release is not the job's failure, so it uses no attempt and no lost-attempt budget (`Run::handed_back`) |
//! | `reclaim_lease` | `Running` | as the watchdog's reclaim of an expired lease (SPEC L3): the attempt is lost, the run retries or fails by its policy; a `lease_reclaimed` incident opens | one lost attempt, as an expiry would |
//! | `restore_lease` | `Queued` or `BackingOff`, not claimed or started since the release or reclaim | `Starting` with the same attempt, re-granted to the previous owner under a **new** token (tokens are never reused); handed out once durable, like a claim | the release's or reclaim's budget is given back |
//!
//! From the release on, the old token's writes are refused with `StaleToken` (which names the
//! current token, if any); a restored holder must use the new token. An attempt of this
//! process's own executor is stopped (`Event::LeaseReleased` or `Event::LeaseReclaimed`, which
//! the driver answers by aborting it). Refused with `UnknownRun` (not active), `NotRunning`
//! (release and reclaim of a run without a running attempt) and `NothingToRestore`.

use super::*;
use crate::run::ErrorKind;

/// What an operator's lease action did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// The lease was taken away; the run's state after.
    Released {
        /// Its holder.
        owner: WorkerId,
        /// Its token, refused from now on.
        token: FencingToken,
        /// The run's state now.
        state: StateName,
    },
    /// The lease was reclaimed as if it had expired; the run's state after.
    Reclaimed {
        /// Its holder.
        owner: WorkerId,
        /// Its token, refused from now on.
        token: FencingToken,
        /// The run's state now.
        state: StateName,
    },
    /// The lease was re-granted to its previous owner under a new token, durable once the
    /// command's write is; the old token stays refused.
    Restored {
        /// The new lease.
        lease: Lease,
        /// The token it replaces.
        previous: FencingToken,
    },
}

impl Scheduler {
    /// An operator takes the running attempt's lease away now (see the module docs).
    pub fn release_lease(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        actor: &str,
        reason: &str,
    ) -> Result<LeaseAction, Rejected> {
        let lease = self.running_lease(run_id)?;
        let now = self.clamp(now);
        let run = self.runs.get_mut(&run_id).expect("checked above");
        let attempt = run.attempt;
        let t = run.hand_back(now, actor);
        self.after_operator_action(run_id, t, actor, reason);
        self.stop_own_attempt(run_id, attempt, &lease);
        self.effects.push_back(Effect::Event(Event::LeaseReleased {
            run: run_id,
            token: lease.token,
        }));
        Ok(LeaseAction::Released {
            owner: lease.owner,
            token: lease.token,
            state: self.runs[&run_id].state.name(),
        })
    }

    /// An operator applies the watchdog's reclaim now, as if the lease had expired (SPEC L3):
    /// the attempt is lost and the run retries or fails by its policy.
    pub fn reclaim_lease(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        actor: &str,
        reason: &str,
    ) -> Result<LeaseAction, Rejected> {
        let lease = self.running_lease(run_id)?;
        let now = self.clamp(now);
        let run = self.runs.get_mut(&run_id).expect("checked above");
        let attempt = run.attempt;
        let message = format!(
            "lease {} held by {} reclaimed by {actor} before its expiry at {}",
            lease.token, lease.owner, lease.expires_at
        );
        let t = run.lose_attempt(now, ErrorKind::Lost, &message);
        run.note_reclaimed(&lease, attempt, now);
        let job = run.job.clone();
        self.after_operator_action(run_id, t, actor, reason);
        self.stop_own_attempt(run_id, attempt, &lease);
        self.effects.push_back(Effect::Event(Event::LeaseReclaimed {
            run: run_id,
            token: lease.token,
        }));
        self.raise_incident(
            now,
            IncidentKind::LeaseReclaimed,
            Some(job),
            Some(run_id),
            Some(&lease.owner),
            format!("{message}: {reason}"),
        );
        Ok(LeaseAction::Reclaimed {
            owner: lease.owner,
            token: lease.token,
            state: self.runs[&run_id].state.name(),
        })
    }

    /// An operator gives a released or reclaimed lease back to its previous owner, under a new
    /// token, if the run has not been claimed or started since (SPEC W6; see the module docs).
    pub fn restore_lease(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        actor: &str,
        reason: &str,
    ) -> Result<LeaseAction, Rejected> {
        let Some(run) = self.runs.get(&run_id).filter(|r| !r.state.is_terminal()) else {
            return Err(Rejected::UnknownRun(run_id));
        };
        let released = match run.restorable() {
            Ok(released) => released.clone(),
            Err(why) => return Err(Rejected::NothingToRestore { run: run_id, why }),
        };
        if self.shutting_down {
            return Err(Rejected::ShuttingDown);
        }
        self.clamp(now);
        // Off the claim queue and the due index before the state changes.
        self.unindex_run(run_id);
        let lease = self.new_lease(released.owner.clone());
        let run = self.runs.get_mut(&run_id).expect("checked above");
        let t = run.restore_lease(lease.clone());
        let (job, attempt) = (run.job.clone(), run.attempt);
        self.journal.gate(&job, run_id, attempt);
        self.after_operator_action(run_id, t, actor, reason);
        Ok(LeaseAction::Restored {
            lease,
            previous: released.token,
        })
    }

    /// The lease of a running attempt of `run_id`, or why there is none.
    fn running_lease(&self, run_id: RunId) -> Result<Lease, Rejected> {
        let Some(run) = self.runs.get(&run_id).filter(|r| !r.state.is_terminal()) else {
            return Err(Rejected::UnknownRun(run_id));
        };
        match (&run.state, &run.lease) {
            (RunState::Running { .. }, Some(lease)) => Ok(lease.clone()),
            _ => Err(Rejected::NotRunning {
                run: run_id,
                state: run.state.name(),
            }),
        }
    }

    /// Audits an operator's lease action and does the bookkeeping of its transition.
    fn after_operator_action(&mut self, run_id: RunId, t: Transition, actor: &str, reason: &str) {
        let t = Transition {
            reason: format!("{}: {reason}", t.reason),
            ..t
        };
        self.after_run_transition(run_id, t, Actor::Person(actor.to_owned()));
    }

    /// This process's own executor ran the attempt: ask it to stop, since nothing it reports
    /// will be accepted (the driver also aborts it on the event that follows).
    fn stop_own_attempt(&mut self, run: RunId, attempt: Attempt, lease: &Lease) {
        if lease.owner == self.worker {
            self.effects.push_back(Effect::CancelAttempt {
                run,
                attempt,
                reason: StopReason::LeaseLost,
            });
        }
    }
}

#[cfg(test)]
mod tests;

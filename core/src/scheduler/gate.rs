//! The artifact gate and explicit verifications (SPEC A2; states and rules in
//! [`crate::artifact`]).
//!
//! | call | who | effect |
//! |---|---|---|
//! | `handle_outcome(success)` with required artifacts to check | holder | `VerifyArtifacts`; the success waits in `gates`, the run stays running |
//! | `verify(target)` | holder | `VerifyArtifacts` for one target |
//! | `handle_verified(id, results)` | driver | evidence stored and audited; a waiting success applied or refused (`Rejected::ArtifactGate`, `artifact_gate` incident) |

use super::*;

/// A verification request in flight.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    run: RunId,
    token: FencingToken,
    attempt: Attempt,
    checks: Vec<ArtifactCheck>,
    /// The success waiting for this gate; `None` for an explicit `verify`.
    completion: Option<Outcome>,
}

impl Pending {
    /// True if this request decides a completion of `run`.
    pub(super) fn is_completion_of(&self, run: RunId) -> bool {
        self.run == run && self.completion.is_some()
    }
}

/// What a verification's answer decided ([`Scheduler::handle_verified`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verified {
    /// An explicit `verify`: its evidence, stored with the run.
    Checked(Vec<Verification>),
    /// A completion's gate passed: the success was applied. The evidence, stored with the run.
    Accepted(Vec<Verification>),
}

impl Verified {
    /// The evidence.
    pub fn evidence(&self) -> &[Verification] {
        match self {
            Verified::Checked(v) | Verified::Accepted(v) => v,
        }
    }
}

impl Scheduler {
    /// The holder asks for `target` (an http(s) URL, a `file://` URL or an absolute path) to
    /// be checked now, as the artifact gate would check it: `Effect::VerifyArtifacts` follows,
    /// and [`Scheduler::handle_verified`] stores the evidence and answers. A completion later in
    /// the same attempt reuses a passing check of the same target. Refused for a target keel
    /// does not check (`InvalidField`), with `VerificationPending` when the run has
    /// [`limits::VERIFICATIONS_PENDING_PER_RUN_MAX`] requests in flight, and as every fenced
    /// write is.
    pub fn verify(
        &mut self,
        now: Timestamp,
        run_id: RunId,
        token: FencingToken,
        target: &str,
    ) -> Result<VerifyId, Rejected> {
        let run = self.holder(run_id, token)?;
        let Some(kind) = TargetKind::classify(target) else {
            return Err(Rejected::InvalidField {
                field: "target",
                reason: "must be an http(s) URL, a file:// URL or an absolute path".into(),
            });
        };
        if target.len() > limits::MESSAGE_MAX_BYTES {
            return Err(Rejected::InvalidField {
                field: "target",
                reason: format!("is longer than {} bytes", limits::MESSAGE_MAX_BYTES),
            });
        }
        let in_flight = self
            .verifying_runs
            .range((run_id, VerifyId(0))..=(run_id, VerifyId(u64::MAX)))
            .count();
        if in_flight >= limits::VERIFICATIONS_PENDING_PER_RUN_MAX {
            return Err(Rejected::VerificationPending(run_id));
        }
        let attempt = run.attempt;
        self.clamp(now);
        let check = ArtifactCheck {
            name: None,
            target: target.to_owned(),
            kind,
        };
        Ok(self.request_verification(run_id, token, attempt, vec![check], None))
    }

    /// The driver checked what request `id` asked (`Effect::VerifyArtifacts`): one result per
    /// check, in order (a missing one counts as failed). If the run is still held under the
    /// request's token, the evidence is stored with the run and audited, and a waiting
    /// completion is applied ([`Verified::Accepted`]) or refused: `Rejected::ArtifactGate`,
    /// with an `artifact_gate` incident, the run still running under its lease. Refused as a
    /// fenced write is if the attempt ended or changed hands meanwhile (the evidence is then
    /// dropped: the attempt it was for is over), and with `UnknownVerification` if `id` is not
    /// in flight.
    pub fn handle_verified(
        &mut self,
        now: Timestamp,
        id: VerifyId,
        results: Vec<CheckResult>,
    ) -> Result<Verified, Rejected> {
        let Some(pending) = self.verifying.remove(&id) else {
            return Err(Rejected::UnknownVerification(id));
        };
        self.verifying_runs.remove(&(pending.run, id));
        if self.gates.get(&pending.run) == Some(&id) {
            self.gates.remove(&pending.run);
        }
        let run = self.holder(pending.run, pending.token)?;
        if run.attempt != pending.attempt {
            return Err(Rejected::StaleToken {
                run: pending.run,
                got: pending.token,
                current: run.lease.as_ref().map(|l| l.token),
            });
        }
        let now = self.clamp(now);
        let mut results = results.into_iter();
        let evidence: Vec<Verification> = pending
            .checks
            .iter()
            .map(|check| {
                let found = results.next().unwrap_or_else(|| CheckResult {
                    error: Some("the driver reported no result for this check".into()),
                    ..CheckResult::default()
                });
                Verification::judge(check, found, pending.attempt, now)
            })
            .collect();
        let run = self.runs.get_mut(&pending.run).expect("checked above");
        for v in &evidence {
            run.record_verification(v.clone());
        }
        let job = run.job.clone();
        let owner = run
            .lease
            .as_ref()
            .map(|l| l.owner.to_string())
            .unwrap_or_default();
        self.journal.put_run(&job, pending.run);
        let failed: Vec<Verification> = evidence.iter().filter(|v| !v.ok).cloned().collect();
        let output = evidence
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let Some(outcome) = pending.completion else {
            let reason = format!(
                "verified {}: {}",
                evidence.len(),
                if failed.is_empty() {
                    "passed"
                } else {
                    "failed"
                }
            );
            self.audit_running(pending.run, Actor::Worker(owner), &reason, output);
            return Ok(Verified::Checked(evidence));
        };
        if !failed.is_empty() {
            let reason = format!(
                "completion refused by the artifact gate: {}",
                crate::artifact::describe(&failed)
            );
            self.audit_running(pending.run, Actor::Watchdog, &reason, output);
            let details = format!("attempt {}: {reason}", pending.attempt);
            let worker = self.runs[&pending.run]
                .lease
                .as_ref()
                .map(|l| l.owner.clone());
            self.raise_incident(
                now,
                IncidentKind::ArtifactGate,
                Some(job),
                Some(pending.run),
                worker.as_ref(),
                details,
            );
            return Err(Rejected::ArtifactGate {
                run: pending.run,
                failed,
            });
        }
        let reason = format!("artifact gate passed: {} checked", evidence.len());
        self.audit_running(pending.run, Actor::Watchdog, &reason, output);
        self.accept_outcome(now, pending.run, outcome, owner);
        Ok(Verified::Accepted(evidence))
    }

    /// The verification request waiting to decide the run's completion, if one is.
    pub fn gate(&self, run: RunId) -> Option<VerifyId> {
        self.gates.get(&run).copied()
    }

    /// What request `id` asks to check, while it is in flight: for a driver that performs
    /// checks on the spot rather than from `Effect::VerifyArtifacts` (the CLI's direct mode).
    pub fn verification_checks(&self, id: VerifyId) -> Option<&[ArtifactCheck]> {
        self.verifying.get(&id).map(|p| &p.checks[..])
    }

    /// The checks a success must pass before it is accepted: each required artifact whose
    /// value keel checks, unless that target passed a check earlier in this attempt.
    pub(super) fn gate_checks(
        &self,
        run: &Run,
        artifacts: &BTreeMap<String, String>,
    ) -> Vec<ArtifactCheck> {
        run.required_artifacts
            .iter()
            .filter_map(|name| {
                let target = artifacts.get(name)?;
                let kind = TargetKind::classify(target)?;
                if run.passed_verification(target).is_some() {
                    return None;
                }
                Some(ArtifactCheck {
                    name: Some(name.clone()),
                    target: target.clone(),
                    kind,
                })
            })
            .collect()
    }

    /// Emits a verification request; a completion waiting for it is held in `gates`.
    pub(super) fn request_verification(
        &mut self,
        run: RunId,
        token: FencingToken,
        attempt: Attempt,
        checks: Vec<ArtifactCheck>,
        completion: Option<Outcome>,
    ) -> VerifyId {
        let id = VerifyId(self.next_verify);
        self.next_verify += 1;
        if completion.is_some() {
            self.gates.insert(run, id);
        }
        self.effects
            .push_back(Effect::VerifyArtifacts(VerifyRequest {
                id,
                run,
                token,
                checks: checks.clone(),
            }));
        self.verifying_runs.insert((run, id));
        self.verifying.insert(
            id,
            Pending {
                run,
                token,
                attempt,
                checks,
                completion,
            },
        );
        id
    }

    /// An audit record of a running run that stays running, with output.
    fn audit_running(&mut self, run: RunId, actor: Actor, reason: &str, output: String) {
        self.audit_run_with_output(
            run,
            Some(StateName::Running),
            StateName::Running,
            actor,
            reason,
            Some(output),
        );
    }
}

#[cfg(test)]
pub(super) mod tests;

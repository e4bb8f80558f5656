//! The artifact gate's transitions, with explicit timestamps.

use super::super::*;
use crate::artifact::{CheckResult, TargetKind, VerifyRequest};
use crate::scheduler::Verified;

/// A scheduler and a store model small enough for these tests: the latest copy of every
/// record the scheduler wrote, and every audit record.
pub(crate) struct World {
    pub(crate) s: Scheduler,
    pub(crate) t: Timestamp,
    jobs: BTreeMap<JobId, Job>,
    runs: BTreeMap<RunId, Run>,
    incidents: BTreeMap<u64, Incident>,
    meta: Option<Meta>,
    pub(crate) audit: Vec<AuditRecord>,
    pub(crate) verify: Vec<VerifyRequest>,
    pub(crate) starts: Vec<AttemptStart>,
    pub(crate) stopped: Vec<RunId>,
    pub(crate) events: Vec<Event>,
}

impl World {
    /// A job of kind `x` for external workers that requires artifact `report`, one run of it
    /// claimed by worker `w` and running.
    pub(crate) fn claimed(attempts: u32) -> (World, AttemptStart) {
        let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let at = t0.plus_ms(1_000);
        let mut spec = JobSpec::new(JobId::new("ext").unwrap(), "x", ScheduleSpec::once(at))
            .with_attempts(attempts)
            .for_external_workers();
        spec.required_artifacts = vec!["report".to_string()].into();
        let mut w = World::new(Scheduler::new(Config::default(), 1, t0), t0);
        w.s.add_job(t0, spec).unwrap();
        w.ack();
        w.at(at);
        w.s.handle_timeout(at);
        w.ack();
        let start = w.claim();
        (w, start)
    }

    fn new(s: Scheduler, t: Timestamp) -> World {
        World {
            s,
            t,
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            incidents: BTreeMap::new(),
            meta: None,
            audit: Vec::new(),
            verify: Vec::new(),
            starts: Vec::new(),
            stopped: Vec::new(),
            events: Vec::new(),
        }
    }

    pub(crate) fn at(&mut self, t: Timestamp) {
        self.t = t;
    }

    /// Worker `w` claims a run of kind `x` and gets its attempt once durable.
    pub(crate) fn claim(&mut self) -> AttemptStart {
        let worker = WorkerId::new("w").unwrap();
        self.s.claim(self.t, &worker, &["x"]).unwrap().unwrap();
        self.ack();
        self.starts.pop().expect("the claim was handed out")
    }

    /// Drains the effects, writing and acknowledging every batch.
    pub(crate) fn ack(&mut self) {
        while let Some(effect) = self.s.poll_effect() {
            match effect {
                Effect::Persist(batch) => {
                    for record in &batch.records {
                        match record {
                            Record::PutJob(job) => {
                                self.jobs.insert(job.spec.id.clone(), (**job).clone());
                            }
                            Record::PutRun(run) => {
                                self.runs.insert(run.id(), run.clone());
                            }
                            Record::PutIncident(i) => {
                                self.incidents.insert(i.id, i.clone());
                            }
                            Record::PutMeta(meta) => self.meta = Some(*meta),
                            Record::Audit(a) => self.audit.push(a.clone()),
                            _ => {}
                        }
                    }
                    self.s.handle_persisted(self.t, batch.id);
                }
                Effect::VerifyArtifacts(request) => self.verify.push(request),
                Effect::StartAttempt(start) => self.starts.push(start),
                Effect::CancelAttempt { run, .. } => self.stopped.push(run),
                Effect::Event(event) => self.events.push(event),
                _ => {}
            }
        }
        self.s.check_invariants();
    }

    /// A scheduler restored from what was written, as after a crash.
    pub(crate) fn restart(&mut self) {
        let snapshot = Snapshot {
            jobs: self.jobs.values().cloned().collect(),
            runs: self
                .runs
                .values()
                .filter(|r| !r.state().is_terminal())
                .cloned()
                .collect(),
            meta: self.meta.expect("a batch was written"),
            tombstones: Vec::new(),
            incidents: self
                .incidents
                .values()
                .filter(|i| i.resolved_at.is_none())
                .cloned()
                .collect(),
            deliveries: Vec::new(),
        };
        self.s = Scheduler::restore(Config::default(), 2, self.t, snapshot);
        self.verify.clear();
        self.ack();
    }

    pub(crate) fn stored_run(&self, run: RunId) -> &Run {
        &self.runs[&run]
    }

    pub(crate) fn open_incidents(&self, kind: IncidentKind) -> Vec<&Incident> {
        self.s.incidents().filter(|i| i.kind == kind).collect()
    }
}

fn success(report: &str) -> Outcome {
    Outcome::Success {
        summary: Some("done".into()),
        artifacts: BTreeMap::from([("report".to_string(), report.to_string())]),
    }
}

fn http(status: u16, body: &str) -> CheckResult {
    CheckResult {
        status: Some(status),
        error: None,
        excerpt: body.into(),
    }
}

#[test]
fn a_success_waits_for_its_gate_and_a_200_accepts_it() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(5_000);
    w.at(t1);
    let url = "https://files.example/r.pdf";
    w.s.handle_outcome(t1, start.run, start.lease.token, success(url))
        .unwrap();
    w.ack();
    // Nothing is decided yet: the run runs on, and the check is asked for.
    assert!(matches!(
        w.s.run(start.run).unwrap().state(),
        RunState::Running { .. }
    ));
    let request = w.verify.pop().expect("the gate asks for a check");
    assert_eq!(request.run, start.run);
    assert_eq!(request.token, start.lease.token);
    assert_eq!(request.checks.len(), 1);
    assert_eq!(request.checks[0].target, url);
    assert_eq!(request.checks[0].kind, TargetKind::Url);
    assert_eq!(request.checks[0].name.as_deref(), Some("report"));
    assert_eq!(w.s.gate(start.run), Some(request.id));
    // A second success while the first waits is refused.
    assert_eq!(
        w.s.handle_outcome(t1, start.run, start.lease.token, success(url)),
        Err(Rejected::VerificationPending(start.run))
    );

    let t2 = t1.plus_ms(300);
    w.at(t2);
    let decided =
        w.s.handle_verified(t2, request.id, vec![http(200, "%PDF-1.7")])
            .unwrap();
    w.ack();
    let Verified::Accepted(evidence) = decided else {
        panic!("a completion's gate answers Accepted: {decided:?}");
    };
    assert!(evidence[0].ok);
    assert_eq!(evidence[0].status, Some(200));
    assert_eq!(evidence[0].at, t2);
    assert_eq!(evidence[0].attempt, start.attempt);
    let stored = w.stored_run(start.run);
    assert_eq!(stored.state(), RunState::Succeeded);
    assert_eq!(stored.verifications(), &evidence[..]);
    assert_eq!(w.s.gate(start.run), None);
    let passed = w
        .audit
        .iter()
        .find(|a| a.reason.starts_with("artifact gate passed"))
        .expect("the gate's check is audited");
    assert_eq!(passed.actor, Actor::Watchdog);
    assert!(passed.output.as_deref().unwrap().contains("HTTP 200"));
    // An answer comes once.
    assert_eq!(
        w.s.handle_verified(t2, request.id, vec![http(200, "")]),
        Err(Rejected::UnknownVerification(request.id))
    );
}

#[test]
fn a_404_refuses_the_completion_with_evidence_and_an_incident_and_the_run_runs_on() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(5_000);
    w.at(t1);
    let url = "http://127.0.0.1:9/missing";
    w.s.handle_outcome(t1, start.run, start.lease.token, success(url))
        .unwrap();
    w.ack();
    let request = w.verify.pop().unwrap();
    let t2 = t1.plus_ms(40);
    w.at(t2);
    let refused =
        w.s.handle_verified(t2, request.id, vec![http(404, "<h1>Not Found</h1>")]);
    w.ack();
    let Err(Rejected::ArtifactGate { run, failed }) = &refused else {
        panic!("a 404 refuses the completion: {refused:?}");
    };
    assert_eq!(*run, start.run);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].status, Some(404));
    assert_eq!(failed[0].excerpt, "<h1>Not Found</h1>");
    let message = refused.clone().unwrap_err().to_string();
    assert!(
        message.contains("report http://127.0.0.1:9/missing: HTTP 404"),
        "{message}"
    );
    assert!(message.contains("Not Found"), "{message}");

    // The run stays running under the same lease; the evidence is stored and audited.
    let stored = w.stored_run(start.run);
    assert!(matches!(stored.state(), RunState::Running { .. }));
    assert_eq!(stored.lease().unwrap().token, start.lease.token);
    assert_eq!(stored.verifications(), &failed[..]);
    let audit = w
        .audit
        .iter()
        .find(|a| {
            a.reason
                .starts_with("completion refused by the artifact gate")
        })
        .expect("the refusal is audited");
    assert_eq!(audit.old, Some(StateName::Running));
    assert_eq!(audit.new, StateName::Running);
    assert_eq!(audit.actor, Actor::Watchdog);
    assert!(audit.output.as_deref().unwrap().contains("Not Found"));
    let incidents = w.open_incidents(IncidentKind::ArtifactGate);
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].run, Some(start.run));
    assert!(
        incidents[0].details.contains("HTTP 404"),
        "{}",
        incidents[0].details
    );

    // The worker fixes the artifact and completes again: checked again, accepted, and the
    // incident resolves with the run.
    let t3 = t2.plus_ms(60_000);
    w.at(t3);
    w.s.heartbeat(t3, start.run, start.lease.token).unwrap();
    w.s.handle_outcome(t3, start.run, start.lease.token, success(url))
        .unwrap();
    w.ack();
    let again = w
        .verify
        .pop()
        .expect("checked again: the first check failed");
    w.s.handle_verified(t3, again.id, vec![http(200, "ok")])
        .unwrap();
    w.ack();
    assert_eq!(w.stored_run(start.run).state(), RunState::Succeeded);
    assert!(w.open_incidents(IncidentKind::ArtifactGate).is_empty());
    assert_eq!(w.stored_run(start.run).verifications().len(), 2);
}

#[test]
fn a_missing_file_refuses_the_completion() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(1_000);
    w.at(t1);
    w.s.handle_outcome(
        t1,
        start.run,
        start.lease.token,
        success("file:///data/out.csv"),
    )
    .unwrap();
    w.ack();
    let request = w.verify.pop().unwrap();
    assert_eq!(request.checks[0].kind, TargetKind::File);
    let missing = CheckResult {
        status: None,
        error: Some("No such file or directory (os error 2)".into()),
        excerpt: String::new(),
    };
    let refused = w.s.handle_verified(t1, request.id, vec![missing]);
    w.ack();
    let Err(Rejected::ArtifactGate { failed, .. }) = refused else {
        panic!("a missing file refuses the completion: {refused:?}");
    };
    assert!(!failed[0].ok);
    assert!(failed[0].to_string().contains("missing (No such file"));
    assert!(matches!(
        w.s.run(start.run).unwrap().state(),
        RunState::Running { .. }
    ));
    assert_eq!(w.open_incidents(IncidentKind::ArtifactGate).len(), 1);
}

#[test]
fn values_keel_does_not_check_pass_on_their_name_as_before() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(1_000);
    w.s.handle_outcome(
        t1,
        start.run,
        start.lease.token,
        success("out/relative.csv"),
    )
    .unwrap();
    w.ack();
    assert!(w.verify.is_empty(), "a relative path is not checked");
    assert_eq!(w.stored_run(start.run).state(), RunState::Succeeded);
}

#[test]
fn an_explicit_verify_stores_evidence_and_a_later_completion_reuses_a_pass() {
    let (mut w, start) = World::claimed(3);
    let (run, token) = (start.run, start.lease.token);
    let t1 = w.t.plus_ms(1_000);
    w.at(t1);
    assert!(matches!(
        w.s.verify(t1, run, token, "out/relative.csv"),
        Err(Rejected::InvalidField {
            field: "target",
            ..
        })
    ));
    let stale = FencingToken(token.0 + 100);
    assert!(matches!(
        w.s.verify(t1, run, stale, "https://x/r"),
        Err(Rejected::StaleToken { .. })
    ));
    let id = w.s.verify(t1, run, token, "https://x/r").unwrap();
    w.ack();
    let request = w.verify.pop().unwrap();
    assert_eq!(request.id, id);
    assert_eq!(request.checks[0].name, None);
    let checked =
        w.s.handle_verified(t1, id, vec![http(200, "fine")])
            .unwrap();
    w.ack();
    assert!(matches!(&checked, Verified::Checked(v) if v[0].ok));
    assert_eq!(w.stored_run(run).verifications(), checked.evidence());
    assert!(w
        .audit
        .iter()
        .any(|a| a.reason.starts_with("verified 1: passed") && a.output.is_some()));
    // The completion reusing the pass is accepted at once.
    let t2 = t1.plus_ms(1_000);
    w.s.handle_outcome(t2, run, token, success("https://x/r"))
        .unwrap();
    w.ack();
    assert!(w.verify.is_empty(), "a pass in the same attempt is reused");
    assert_eq!(w.stored_run(run).state(), RunState::Succeeded);
}

#[test]
fn a_pass_in_an_earlier_attempt_is_checked_again() {
    let (mut w, first) = World::claimed(3);
    let t1 = w.t.plus_ms(1_000);
    w.at(t1);
    let id =
        w.s.verify(t1, first.run, first.lease.token, "https://x/r")
            .unwrap();
    w.ack();
    w.s.handle_verified(t1, id, vec![http(200, "")]).unwrap();
    w.verify.clear();
    w.s.release(t1, first.run, first.lease.token).unwrap();
    w.ack();
    w.s.handle_timeout(t1);
    w.ack();
    let second = w.claim();
    assert_eq!(second.attempt, Attempt(first.attempt.0 + 1));
    w.s.handle_outcome(t1, second.run, second.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    assert_eq!(w.verify.len(), 1, "a new attempt checks again");
}

#[test]
fn the_evidence_survives_a_restart_and_a_gate_in_flight_is_forgotten() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(1_000);
    w.at(t1);
    w.s.handle_outcome(t1, start.run, start.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    let request = w.verify.pop().unwrap();
    w.s.handle_verified(t1, request.id, vec![http(503, "busy")])
        .unwrap_err();
    w.ack();
    // A second completion's check is in flight when the process dies.
    w.s.handle_outcome(t1, start.run, start.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    let in_flight = w.verify.pop().unwrap();

    w.restart();
    let run = w.s.run(start.run).unwrap();
    assert_eq!(run.verifications().len(), 1);
    assert_eq!(run.verifications()[0].status, Some(503));
    assert_eq!(run.verifications()[0].excerpt, "busy");
    assert_eq!(w.open_incidents(IncidentKind::ArtifactGate).len(), 1);
    assert_eq!(w.s.gate(start.run), None);
    assert_eq!(
        w.s.handle_verified(t1, in_flight.id, vec![http(200, "")]),
        Err(Rejected::UnknownVerification(in_flight.id))
    );
    // The holder completes again under its token, which survived the restart.
    w.s.handle_outcome(t1, start.run, start.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    assert_eq!(w.verify.len(), 1);
}

#[test]
fn a_gate_answer_after_the_attempt_ended_is_dropped() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(1_000);
    w.s.handle_outcome(t1, start.run, start.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    let request = w.verify.pop().unwrap();
    // The worker gives up meanwhile: a failure ends the attempt and its gate.
    let failed = Outcome::Retryable {
        message: "gave up".into(),
    };
    w.s.handle_outcome(t1, start.run, start.lease.token, failed)
        .unwrap();
    w.ack();
    assert_eq!(w.s.gate(start.run), None);
    let late = w.s.handle_verified(t1, request.id, vec![http(200, "")]);
    assert!(matches!(late, Err(Rejected::StaleToken { .. })), "{late:?}");
    assert!(w.stored_run(start.run).verifications().is_empty());
    assert!(matches!(
        w.stored_run(start.run).state(),
        RunState::BackingOff { .. }
    ));
}

#[test]
fn verifications_in_flight_per_run_are_bounded() {
    let (mut w, start) = World::claimed(3);
    let (run, token) = (start.run, start.lease.token);
    let t = w.t;
    let ids: Vec<VerifyId> = (0..limits::VERIFICATIONS_PENDING_PER_RUN_MAX)
        .map(|i| {
            w.s.verify(t, run, token, &format!("https://x/{i}"))
                .unwrap()
        })
        .collect();
    assert_eq!(
        w.s.verify(t, run, token, "https://x/more"),
        Err(Rejected::VerificationPending(run))
    );
    w.s.handle_verified(t, ids[0], vec![http(200, "")]).unwrap();
    w.s.verify(t, run, token, "https://x/more").unwrap();
}

#[test]
fn a_gate_ends_with_its_attempt_and_does_not_hold_up_the_next() {
    let (mut w, first) = World::claimed(3);
    let t1 = w.t.plus_ms(1_000);
    w.at(t1);
    w.s.handle_outcome(t1, first.run, first.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    let stale = w.verify.pop().unwrap();
    // The operator takes the lease away while the check is out.
    w.s.release_lease(t1, first.run, "alice", "drain").unwrap();
    w.ack();
    assert_eq!(w.s.gate(first.run), None);
    let second = w.claim();
    w.s.handle_outcome(t1, second.run, second.lease.token, success("https://x/r"))
        .unwrap();
    w.ack();
    let fresh = w
        .verify
        .pop()
        .expect("the new attempt's success is checked");
    // The old answer is dropped; the new one decides.
    assert!(matches!(
        w.s.handle_verified(t1, stale.id, vec![http(200, "")]),
        Err(Rejected::StaleToken { .. })
    ));
    assert_eq!(w.s.gate(second.run), Some(fresh.id));
    w.s.handle_verified(t1, fresh.id, vec![http(200, "")])
        .unwrap();
    w.ack();
    assert_eq!(w.stored_run(first.run).state(), RunState::Succeeded);
}

//! SPEC sections 3 to 5: leases and fencing, external workers, the watchdog, incidents and
//! checkpoints. Precise timelines drive the core directly over a `MemStore`; whole-world
//! behaviour runs in the simulator.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::collections::BTreeMap;

use keel_core::scheduler::{CheckpointSave, Released};
use keel_core::{
    Actor, AttemptStart, Config, Effect, ErrorKind, Event, IncidentKind, JobId, JobSpec, Outcome,
    Rejected, RetryPolicy, RunState, ScheduleSpec, Scheduler, Timestamp, WorkerId,
};
use keel_testkit::{Execution, Faults, MemStore, Sim, SimConfig};

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

/// A scheduler over a `MemStore` that acknowledges every batch at once.
struct World {
    core: Scheduler,
    store: MemStore,
    now: Timestamp,
    starts: Vec<AttemptStart>,
    events: Vec<Event>,
    effects: Vec<Effect>,
}

impl World {
    fn new(config: Config) -> Self {
        World {
            core: Scheduler::new(config.clone(), 7, t0()),
            store: MemStore::new(),
            now: t0(),
            starts: Vec::new(),
            events: Vec::new(),
            effects: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(effect) = self.core.poll_effect() {
            match effect {
                Effect::Persist(batch) => {
                    self.store.apply(&batch);
                    self.core.handle_persisted(self.now, batch.id);
                }
                Effect::StartAttempt(start) => self.starts.push(start),
                Effect::Event(event) => self.events.push(event),
                other => self.effects.push(other),
            }
        }
        self.core.check_invariants();
    }

    /// Advances to `at`, delivering every deadline on the way.
    fn advance_to(&mut self, at: Timestamp) {
        while let Some(next) = self.core.poll_timeout().filter(|t| *t <= at) {
            self.now = next;
            self.core.handle_timeout(next);
            self.drain();
        }
        self.now = at;
    }

    fn add(&mut self, spec: JobSpec) {
        self.core.add_job(self.now, spec).unwrap();
        self.drain();
    }

    fn last_start(&self) -> AttemptStart {
        self.starts.last().cloned().expect("an attempt started")
    }

    /// A default world with `spec` (due one second in) added and its first attempt started.
    fn started(spec: JobSpec) -> (World, AttemptStart) {
        let mut w = World::new(Config::default());
        w.add(spec);
        w.advance_to(t0().plus_ms(SECOND));
        let start = w.last_start();
        (w, start)
    }
}

/// A one-shot due one second in, with a 20 s attempt timeout.
fn timed_once() -> JobSpec {
    let mut spec = once_in("j", "k", SECOND);
    spec.timeout_ms = Some(20 * SECOND);
    spec
}

fn once_in(name: &str, kind: &str, after_ms: u64) -> JobSpec {
    JobSpec::new(
        id(name),
        kind,
        ScheduleSpec::Once {
            at: t0().plus_ms(after_ms),
        },
    )
}

// SPEC L1: the token rises on every grant and a write with an older token changes nothing.
#[test]
fn every_grant_gets_a_higher_token_and_stale_writes_are_refused() {
    let mut w = World::new(Config::default());
    let mut spec = once_in("j", "k", SECOND);
    spec.retry.attempts_max = 3;
    w.add(spec);
    w.advance_to(t0().plus_ms(SECOND));
    let first = w.last_start();
    let outcome = Outcome::Retryable {
        message: "flaky".into(),
    };
    w.core
        .handle_outcome(w.now, first.run, first.lease.token, outcome)
        .unwrap();
    w.drain();
    // The retry backs off at most a second (full jitter), long before its lease could expire.
    w.advance_to(t0().plus_ms(10 * SECOND));
    let second = w.last_start();
    assert_eq!(second.run, first.run);
    assert!(second.lease.token > first.lease.token);

    // The old holder's writes: every one refused, nothing changed.
    let before = format!("{:?}", w.core.run(first.run));
    let stale = first.lease.token;
    assert!(matches!(
        w.core.heartbeat(w.now, first.run, stale),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(matches!(
        w.core
            .handle_outcome(w.now, first.run, stale, Outcome::ok()),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(matches!(
        w.core.save_checkpoint(w.now, first.run, stale, "x".into()),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(matches!(
        w.core.progress(w.now, first.run, stale, "p", "m"),
        Err(Rejected::StaleToken { .. })
    ));
    assert_eq!(before, format!("{:?}", w.core.run(first.run)));
    // L4: releasing a lease that is no longer yours is "already released", not an error.
    assert_eq!(
        w.core.release(w.now, first.run, stale),
        Ok(Released::AlreadyReleased)
    );
    // The audit trail records the token of each attempt.
    let tokens: Vec<_> = w
        .store
        .audit_of_run(first.run)
        .filter(|a| a.new == keel_core::StateName::Running)
        .map(|a| a.fencing_token.unwrap())
        .collect();
    assert_eq!(tokens, vec![first.lease.token, second.lease.token]);
}

// SPEC L3 and the failure in the brief: a holder whose event loop stalls loses its lease; its
// late (successful) report is refused, the run was already retried, and nothing is deleted.
#[test]
fn a_stalled_holder_is_reclaimed_after_ttl_plus_grace_and_its_late_report_is_refused() {
    let mut w = World::new(Config::default());
    w.add(once_in("j", "k", SECOND));
    w.advance_to(t0().plus_ms(SECOND));
    let stalled = w.last_start();
    // No heartbeat: the lease expires 30 s after hand-out and is reclaimed 10 s later.
    w.advance_to(stalled.lease.expires_at.plus_ms(10 * SECOND - 1));
    assert!(matches!(
        w.core.run(stalled.run).unwrap().state(),
        RunState::Running { .. }
    ));
    w.advance_to(stalled.lease.expires_at.plus_ms(10 * SECOND));
    let run = w.core.run(stalled.run).unwrap();
    assert_eq!(run.lost(), 1);
    assert_eq!(run.last_error().unwrap().kind, ErrorKind::Lost);
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, Event::LeaseReclaimed { run, .. } if *run == stalled.run)));
    let reclaim = w
        .store
        .audit_of_run(stalled.run)
        .find(|a| a.actor == Actor::Watchdog)
        .unwrap();
    assert!(reclaim.reason.contains("reclaimed"), "{}", reclaim.reason);
    let incident = w
        .store
        .incidents()
        .find(|i| i.kind == IncidentKind::LeaseReclaimed);
    assert!(incident.is_some());
    // The retry was handed out with a new token...
    let retry = w.last_start();
    assert!(retry.lease.token > stalled.lease.token);
    // ...and the stalled holder's late success is refused: it must not be counted twice.
    assert!(matches!(
        w.core
            .handle_outcome(w.now, stalled.run, stalled.lease.token, Outcome::ok()),
        Err(Rejected::StaleToken { .. })
    ));
    w.core
        .handle_outcome(w.now, retry.run, retry.lease.token, Outcome::ok())
        .unwrap();
    w.drain();
    assert_eq!(
        w.store.run(stalled.run).unwrap().state(),
        RunState::Succeeded
    );
    // The reclaim incident resolved when the next attempt ran.
    assert!(w.store.incidents().all(|i| i.resolved_at.is_some()));
}

#[test]
fn heartbeats_keep_a_long_attempt_alive() {
    let (mut w, start) = World::started(once_in("j", "k", SECOND));
    for i in 1..=40 {
        w.advance_to(t0().plus_ms(SECOND + i * 15 * SECOND));
        w.core
            .heartbeat(w.now, start.run, start.lease.token)
            .unwrap();
        w.drain();
    }
    assert_eq!(w.core.run(start.run).unwrap().lost(), 0);
    assert!(w.core.incidents().next().is_none());
    w.core
        .handle_outcome(w.now, start.run, start.lease.token, Outcome::ok())
        .unwrap();
    w.drain();
    assert_eq!(w.store.run(start.run).unwrap().state(), RunState::Succeeded);
}

// A runtime renews its own executor's leases while a handler works; that keeps the lease but
// is not a sign of life, so a silent handler is still reported stuck.
#[test]
fn lease_renewal_keeps_the_lease_without_hiding_a_silent_handler() {
    let (mut w, start) = World::started(once_in("j", "k", SECOND));
    for i in 1..=8 {
        w.advance_to(t0().plus_ms(SECOND + i * 15 * SECOND));
        let lease = w
            .core
            .renew_lease(w.now, start.run, start.lease.token)
            .unwrap();
        assert_eq!(
            lease.expires_at,
            w.now.plus_ms(Config::default().lease.ttl_ms)
        );
        w.drain();
    }
    let run = w.core.run(start.run).unwrap();
    assert_eq!(run.lost(), 0, "the renewed lease was never reclaimed");
    assert_eq!(
        w.store
            .run(start.run)
            .unwrap()
            .lease()
            .as_ref()
            .unwrap()
            .expires_at,
        run.lease().unwrap().expires_at,
        "the renewal is written"
    );
    assert!(
        w.core.incidents().any(|i| i.kind == IncidentKind::StuckRun),
        "renewals are not signs of life"
    );
    w.core
        .handle_outcome(w.now, start.run, start.lease.token, Outcome::ok())
        .unwrap();
    assert!(
        w.core.has_unwritten_changes(),
        "the outcome waits for a batch"
    );
    w.drain();
    assert!(
        !w.core.has_unwritten_changes(),
        "the batch was acknowledged"
    );
}

// Lost attempts have their own budget: a run whose attempts keep getting lost is poison.
#[test]
fn a_run_whose_attempts_keep_getting_lost_is_given_a_poison_verdict() {
    let mut sim = Sim::new(SimConfig::new(3).faults(Faults {
        stall_per_mille: 1000, // every holder stalls
        ..Faults::NONE
    }));
    sim.handle("k", |_, _| Execution::succeed_after(5 * MINUTE));
    sim.add_job(once_in("j", "k", SECOND)).unwrap();
    sim.run_for(30 * MINUTE);
    let runs = sim.runs_of("j");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state(), RunState::FailedDropped);
    assert_eq!(runs[0].lost(), 3);
    assert_eq!(runs[0].last_error().unwrap().kind, ErrorKind::Poison);
    // Each stalled holder's late success was refused.
    assert!(sim.refused_reports() >= 1);
}

#[test]
fn external_workers_claim_the_oldest_run_of_their_kinds() {
    let mut w = World::new(Config::default());
    for (name, kind, after) in [("a", "resize", 1), ("b", "email", 2), ("c", "resize", 3)] {
        let mut spec = once_in(name, kind, after * SECOND);
        spec.external = true;
        w.add(spec);
    }
    w.advance_to(t0().plus_ms(10 * SECOND));
    assert!(w.starts.is_empty(), "external runs wait for a claim");
    let resizer = worker("resizer-1");
    let first = w
        .core
        .claim(w.now, &resizer, &["resize", "thumbnail"])
        .unwrap()
        .unwrap();
    // The lease reaches the worker only once the grant is durable.
    assert!(w.starts.is_empty());
    w.drain();
    let start = w.last_start();
    assert_eq!(start.run, first.run);
    assert_eq!(start.job, id("a"));
    assert_eq!(start.lease.owner, resizer);
    w.core.claim(w.now, &resizer, &["resize"]).unwrap().unwrap();
    w.drain();
    let second = w.last_start();
    assert_eq!(second.job, id("c"));
    assert!(w
        .core
        .claim(w.now, &resizer, &["resize"])
        .unwrap()
        .is_none());
    // The worker completes through the fenced protocol.
    w.core
        .progress(w.now, second.run, second.lease.token, "render", "half done")
        .unwrap();
    let context = w.core.context(second.run, second.lease.token).unwrap();
    assert_eq!(context.progress.unwrap().phase, "render");
    w.core
        .handle_outcome(w.now, second.run, second.lease.token, Outcome::ok())
        .unwrap();
    w.drain();
    let audit: Vec<_> = w.store.audit_of_run(second.run).collect();
    assert_eq!(
        audit.last().unwrap().actor,
        Actor::Worker("resizer-1".into())
    );
}

// A capability mismatch: a worker keeps asking for a kind nobody queues while other work waits.
#[test]
fn repeated_empty_claims_while_other_work_waits_raise_an_idle_claim_loop() {
    let mut sim = Sim::new(SimConfig::new(4));
    let mut spec = once_in("needs-gpu", "gpu", SECOND);
    spec.external = true;
    sim.add_job(spec).unwrap();
    sim.add_worker("cpu-worker", &["cpu"], 5 * SECOND);
    sim.run_for(2 * MINUTE);
    let incident = sim
        .store()
        .incidents()
        .find(|i| i.kind == IncidentKind::IdleClaimLoop)
        .expect("an idle claim loop incident");
    assert_eq!(incident.worker, Some(worker("cpu-worker")));
    assert!(incident.details.contains("gpu"), "{}", incident.details);
    // A worker that can do the work claims it, runs it, and the queue empties.
    sim.handle("gpu", |_, _| Execution::succeed_after(SECOND));
    sim.add_worker("gpu-worker", &["gpu"], 5 * SECOND);
    sim.run_for(MINUTE);
    assert_eq!(sim.runs_of("needs-gpu")[0].state(), RunState::Succeeded);
}

#[test]
fn a_completion_without_required_artifacts_is_refused_recorded_and_the_run_keeps_running() {
    let mut w = World::new(Config::default());
    let mut spec = once_in("report", "pdf", SECOND);
    spec.external = true;
    spec.required_artifacts = vec!["report.pdf".into()].into();
    w.add(spec);
    w.advance_to(t0().plus_ms(SECOND));
    w.core
        .claim(w.now, &worker("w"), &["pdf"])
        .unwrap()
        .unwrap();
    w.drain();
    let start = w.last_start();
    let claim = (start.run, start.lease.token);
    let refused = w
        .core
        .handle_outcome(w.now, claim.0, claim.1, Outcome::ok());
    assert!(
        matches!(&refused, Err(Rejected::MissingArtifacts { missing, .. }) if missing == &["report.pdf"]),
        "{refused:?}"
    );
    w.drain();
    assert!(matches!(
        w.core.run(claim.0).unwrap().state(),
        RunState::Running { .. }
    ));
    assert!(w
        .store
        .audit_of_run(claim.0)
        .any(|a| a.reason.contains("missing artifacts")));
    let artifacts = BTreeMap::from([("report.pdf".to_owned(), "s3://bucket/r.pdf".to_owned())]);
    let done = Outcome::Success {
        summary: Some("12 pages".into()),
        artifacts,
    };
    w.core
        .handle_outcome(w.now, claim.0, claim.1, done)
        .unwrap();
    w.drain();
    let run = w.store.run(claim.0).unwrap();
    assert_eq!(run.state(), RunState::Succeeded);
    assert_eq!(run.artifacts()["report.pdf"], "s3://bucket/r.pdf");
}

// SPEC W1–W3: timeout, cooperative cancel, kill; the kill is sticky.
#[test]
fn a_timed_out_attempt_is_asked_to_stop_then_killed_and_the_kill_is_sticky() {
    let (mut w, start) = World::started(timed_once());
    let started = w.now;
    let heartbeat_until = |w: &mut World, at: Timestamp| {
        while w.now < at {
            let next = w.now.plus_ms(10 * SECOND).min(at);
            w.advance_to(next);
            let _ = w.core.heartbeat(w.now, start.run, start.lease.token);
            w.drain();
        }
    };
    heartbeat_until(&mut w, started.plus_ms(20 * SECOND));
    assert!(w
        .effects
        .iter()
        .any(|e| matches!(e, Effect::CancelAttempt { run, .. } if *run == start.run)));
    // The attempt ignores the cancel: 10 s later it is killed.
    heartbeat_until(&mut w, started.plus_ms(30 * SECOND));
    assert!(w
        .effects
        .iter()
        .any(|e| matches!(e, Effect::KillAttempt { run, .. } if *run == start.run)));
    let run = w.core.run(start.run).unwrap();
    assert_eq!(run.killed(), Some(start.attempt));
    assert_eq!(run.last_error().unwrap().kind, ErrorKind::TimedOut);
    // Sticky: the killed attempt can report nothing, and nothing extends the run.
    assert!(matches!(
        w.core
            .handle_outcome(w.now, start.run, start.lease.token, Outcome::ok()),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(matches!(
        w.core.extend(w.now, start.run, MINUTE, "operator"),
        Err(Rejected::Killed(_))
    ));
}

#[test]
fn a_deadline_extension_is_granted_once_per_run_and_capped_by_the_backstop() {
    let (mut w, start) = World::started(timed_once());
    let started = w.now;
    let deadline = w
        .core
        .extend(w.now, start.run, 10 * MINUTE, "long upload")
        .unwrap();
    assert_eq!(
        deadline,
        started.plus_ms(60 * SECOND),
        "capped at 3 x timeout"
    );
    assert!(matches!(
        w.core.extend(w.now, start.run, SECOND, "again"),
        Err(Rejected::AlreadyExtended(_))
    ));
    for i in 1..=5 {
        w.advance_to(started.plus_ms(i * 10 * SECOND));
        let _ = w.core.heartbeat(w.now, start.run, start.lease.token);
        w.drain();
    }
    assert!(matches!(
        w.core.run(start.run).unwrap().state(),
        RunState::Running { .. }
    ));
    w.advance_to(started.plus_ms(60 * SECOND));
    assert_eq!(w.core.run(start.run).unwrap().killed(), Some(start.attempt));
}

#[test]
fn silence_raises_a_stuck_incident_with_the_last_phase_and_life_resolves_it() {
    let (mut w, start) = World::started(once_in("j", "k", SECOND));
    w.core
        .progress(
            w.now,
            start.run,
            start.lease.token,
            "upload",
            "42 of 100 files",
        )
        .unwrap();
    w.drain();
    w.advance_to(w.now.plus_ms(20 * SECOND));
    let stuck = w
        .core
        .incidents()
        .find(|i| i.kind == IncidentKind::StuckRun)
        .cloned()
        .expect("a stuck incident");
    assert!(stuck.details.contains("upload") && stuck.details.contains("42 of 100"));
    w.core
        .heartbeat(w.now, start.run, start.lease.token)
        .unwrap();
    w.drain();
    assert!(w.core.incidents().next().is_none());
    let resolved = w.store.incidents().find(|i| i.id == stuck.id).unwrap();
    assert!(resolved.resolved_at.is_some());
}

// SPEC C1: saves are throttled; the clock advances only on a successful persist.
#[test]
fn checkpoint_saves_are_throttled_and_a_failed_save_is_not_throttled_away() {
    let (mut w, start) = World::started(once_in("j", "k", SECOND));
    let (run, token) = (start.run, start.lease.token);
    let save = |w: &mut World, data: &str| w.core.save_checkpoint(w.now, run, token, data.into());
    assert_eq!(save(&mut w, "1"), Ok(CheckpointSave::Saving { seq: 1 }));
    w.drain();
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, Event::CheckpointSaved { seq: 1, .. })));
    let throttled = save(&mut w, "2");
    assert!(
        matches!(throttled, Ok(CheckpointSave::Throttled { .. })),
        "{throttled:?}"
    );
    w.drain();
    w.advance_to(w.now.plus_ms(5 * SECOND));
    // This save's batch fails: the failure is reported and the next save is not throttled.
    assert_eq!(save(&mut w, "3"), Ok(CheckpointSave::Saving { seq: 2 }));
    let Some(Effect::Persist(batch)) = w.core.poll_effect() else {
        panic!("a persist effect");
    };
    w.core.handle_persist_failed(w.now, batch.id, "disk full");
    let mut failed = false;
    while let Some(effect) = w.core.poll_effect() {
        if let Effect::Event(Event::CheckpointFailed { seq: 2, .. }) = effect {
            failed = true;
        }
    }
    assert!(failed, "the failed save is reported");
    assert_eq!(save(&mut w, "4"), Ok(CheckpointSave::Saving { seq: 3 }));
}

// SPEC C2: an interrupted run keeps its checkpoint and the next attempt receives it;
// completion deletes it.
#[test]
fn an_interrupted_run_resumes_from_its_checkpoint_and_completion_deletes_it() {
    let mut w = World::new(Config::default());
    w.add(once_in("migrate", "k", SECOND));
    w.advance_to(t0().plus_ms(SECOND));
    let start = w.last_start();
    w.core
        .save_checkpoint(w.now, start.run, start.lease.token, "table 7 of 12".into())
        .unwrap();
    w.drain();
    // kill -9: rebuild from the store.
    let now = w.now.plus_ms(SECOND);
    w.core = Scheduler::restore(Config::default(), 8, now, w.store.restore());
    w.now = now;
    w.advance_to(now); // the recovered run retries at once
    w.drain();
    let resumed = w.last_start();
    assert_eq!(resumed.run, start.run);
    assert!(resumed.lease.token > start.lease.token);
    assert_eq!(resumed.checkpoint.as_ref().unwrap().data, "table 7 of 12");
    w.core
        .handle_outcome(w.now, resumed.run, resumed.lease.token, Outcome::ok())
        .unwrap();
    w.drain();
    let done = w.store.run(start.run).unwrap();
    assert_eq!(done.state(), RunState::Succeeded);
    assert!(
        done.checkpoint().is_none(),
        "completion deletes the checkpoint"
    );
}

#[test]
fn graceful_shutdown_stops_firing_flushes_checkpoints_and_cancels_attempts() {
    let mut w = World::new(Config::default());
    w.add(JobSpec::new(
        id("tick"),
        "k",
        ScheduleSpec::Cron {
            expr: "* * * * * *".into(),
            zone: "UTC".into(),
        },
    ));
    w.advance_to(t0().plus_ms(SECOND));
    let start = w.last_start();
    w.core
        .save_checkpoint(w.now, start.run, start.lease.token, "a".into())
        .unwrap();
    w.core
        .save_checkpoint(w.now, start.run, start.lease.token, "b".into())
        .unwrap();
    w.drain();
    let shutdown = w.core.begin_shutdown(w.now);
    assert_eq!(shutdown.attempts, vec![(start.run, start.attempt)]);
    w.drain();
    assert_eq!(
        w.store
            .run(start.run)
            .unwrap()
            .checkpoint()
            .as_ref()
            .unwrap()
            .data,
        "b",
        "the throttled save is flushed"
    );
    let runs_before = w.store.runs().count();
    w.advance_to(w.now.plus_ms(MINUTE));
    assert_eq!(
        w.store.runs().count(),
        runs_before,
        "nothing fires while shutting down"
    );
    assert!(matches!(
        w.core.claim(w.now, &worker("w"), &["k"]),
        Err(Rejected::ShuttingDown)
    ));
}

// The world-level view: stalls, crashes and external workers together keep every invariant,
// and every run ends (the simulator checks tokens, persist-before-act and fencing each step).
#[test]
fn hostile_worlds_with_external_workers_and_stalls() {
    for seed in 0..20 {
        let mut sim = Sim::new(SimConfig::new(seed).faults(Faults::HOSTILE));
        sim.handle("batch", |_, rng| {
            Execution::succeed_after(rng.below_inclusive(3 * MINUTE))
        });
        let mut spec = JobSpec::new(
            id("batch"),
            "batch",
            ScheduleSpec::Every {
                interval_ms: 5 * MINUTE,
                anchor: t0(),
            },
        );
        spec.external = true;
        spec.retry = RetryPolicy {
            attempts_max: 3,
            lost_attempts_max: 4,
            ..RetryPolicy::default()
        };
        sim.add_job(spec).unwrap();
        sim.add_worker("w1", &["batch"], 10 * SECOND);
        sim.add_worker("w2", &["batch"], 7 * SECOND);
        sim.run_for(60 * MINUTE);
        sim.check_liveness(60 * MINUTE);
        assert!(!sim.runs_of("batch").is_empty(), "seed {seed}");
    }
}

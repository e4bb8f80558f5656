//! Deterministic scenarios: regressions for core bugs this suite found, and the worker
//! protocol, watchdog, checkpoints and outbox step by step.

use super::*;

// ----- deterministic scenarios --------------------------------------------------------------

fn once_spec(name: &str, at: Timestamp) -> JobSpec {
    JobSpec::new(
        JobId::new(name).expect("a valid job id"),
        "work",
        ScheduleSpec::Once { at },
    )
}

fn every_minute(name: &str) -> JobSpec {
    JobSpec::new(
        JobId::new(name).expect("a valid job id"),
        "work",
        ScheduleSpec::Cron {
            expr: "0 * * * * *".into(),
            zone: "UTC".into(),
        },
    )
}

/// The next persist batch, skipping events (a one-shot that fires is also disabled).
fn next_batch(keel: &mut Scheduler) -> Batch {
    loop {
        match keel.poll_effect() {
            Some(Effect::Persist(batch)) => return batch,
            Some(Effect::Event(_)) => {}
            other => panic!("expected a persist batch, got {other:?}"),
        }
    }
}

fn expect_start(effect: Option<Effect>) -> AttemptStart {
    match effect {
        Some(Effect::StartAttempt(start)) => start,
        other => panic!("expected an attempt to start, got {other:?}"),
    }
}

fn drain_all(keel: &mut Scheduler) -> Vec<Effect> {
    std::iter::from_fn(|| keel.poll_effect())
        .take(1_000)
        .collect()
}

fn stored_run_states(batch: &Batch) -> Vec<(RunId, RunState)> {
    batch
        .records
        .iter()
        .filter_map(|r| match r {
            Record::PutRun(run) => Some((run.id(), run.state())),
            _ => None,
        })
        .collect()
}

/// A scheduler at `t0` with `spec` added and its first batch acknowledged.
fn with_job(t0: Timestamp, spec: JobSpec) -> Scheduler {
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, spec).expect("a valid job");
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t0, batch.id);
    assert_eq!(keel.poll_effect(), None);
    keel
}

/// A scheduler at `t0` over a model store, with `spec` added and written, and its config.
fn stored_with(t0: Timestamp, spec: JobSpec) -> (Scheduler, MemStore, Config) {
    let config = Config::default();
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(config.clone(), 7, t0);
    keel.add_job(t0, spec).expect("valid");
    flush(&mut keel, &mut store, t0);
    (keel, store, config)
}

/// A minutely job at `t0`, fired at `t1` (one minute later) and its first attempt handed out.
fn minutely_started() -> (Scheduler, Timestamp, AttemptStart) {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());
    (keel, t1, start)
}

/// A one-shot due one second after `2026-01-01`, fired: the batch recording its first attempt
/// is next. Returns the scheduler and the fire time.
fn once_fired() -> (Scheduler, Timestamp) {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(1_000);
    let mut keel = with_job(t0, once_spec("once", t1));
    keel.handle_timeout(t1);
    (keel, t1)
}

/// What the batch recording a first attempt holds for `run`.
fn starting(run: RunId) -> Vec<(RunId, RunState)> {
    vec![(
        run,
        RunState::Starting {
            attempt: Attempt(1),
        },
    )]
}

#[test]
fn a_failed_persist_holds_the_attempt_back_until_a_later_batch_is_acknowledged() {
    let (mut keel, t1) = once_fired();
    let first = next_batch(&mut keel);
    let run = keel.runs().next().expect("the slot fired").id();
    assert_eq!(stored_run_states(&first), starting(run));
    // Nothing is handed out while the batch is in flight.
    assert_eq!(keel.poll_effect(), None);

    keel.handle_persist_failed(t1, first.id, "disk full");
    let effects = drain_all(&mut keel);
    let retry_at = match effects.as_slice() {
        [Effect::Event(Event::PersistFailed {
            batch, retry_at, ..
        })] if *batch == first.id => *retry_at,
        other => panic!("expected only a PersistFailed event, got {other:?}"),
    };
    assert!(retry_at > t1);
    assert_eq!(keel.poll_timeout(), Some(retry_at));
    keel.check_invariants();

    // A late acknowledgement of the failed batch releases nothing.
    keel.handle_persisted(t1, first.id);
    assert_eq!(keel.poll_effect(), None);
    assert_eq!(
        keel.run(run).map(|r| r.state()),
        Some(RunState::Starting {
            attempt: Attempt(1)
        })
    );

    // No batch before the retry deadline.
    keel.handle_timeout(Timestamp(retry_at.0 - 1));
    assert_eq!(keel.poll_effect(), None);

    keel.handle_timeout(retry_at);
    let second = next_batch(&mut keel);
    assert_ne!(second.id, first.id);
    assert_eq!(stored_run_states(&second), starting(run));
    assert_eq!(
        keel.poll_effect(),
        None,
        "still held while the retry is in flight"
    );
    keel.check_invariants();

    keel.handle_persisted(retry_at, second.id);
    let start = expect_start(keel.poll_effect());
    assert_eq!((start.run, start.attempt), (run, Attempt(1)));
    assert_eq!(
        keel.run(run).map(|r| r.state().name()),
        Some(keel_core::StateName::Running)
    );
    keel.check_invariants();
}

#[test]
fn a_run_cancelled_while_starting_is_never_handed_out() {
    let t0 = ts("2026-01-01T00:00:00Z");
    // Cancelled while the batch recording its first attempt is in flight.
    let (mut keel, t1) = once_fired();
    let first = next_batch(&mut keel);
    let run = keel.runs().next().expect("the slot fired").id();
    keel.cancel_run(t1, run)
        .expect("a starting run can be cancelled");
    assert_eq!(keel.run(run).map(|r| r.state()), Some(RunState::Cancelled));
    keel.handle_persisted(t1, first.id);
    let effects = drain_all(&mut keel);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::StartAttempt(_) | Effect::CancelAttempt { .. })),
        "{effects:?}"
    );
    let second = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist(b) => Some(b.clone()),
            _ => None,
        })
        .expect("the cancellation is persisted");
    assert_eq!(stored_run_states(&second), vec![(run, RunState::Cancelled)]);
    keel.handle_persisted(t1, second.id);
    assert_eq!(keel.poll_effect(), None);
    assert!(
        keel.run(run).is_none(),
        "a settled, persisted run leaves memory"
    );
    keel.check_invariants();

    // Cancelled before its first batch was even emitted (a manual run).
    let mut keel = with_job(t0, every_minute("minutely"));
    let run = keel
        .trigger(t0, &JobId::new("minutely").expect("valid"))
        .expect("no run is active");
    keel.cancel_run(t0, run)
        .expect("a starting run can be cancelled");
    let effects = drain_all(&mut keel);
    let batch = effects
        .iter()
        .find_map(|e| match e {
            Effect::Persist(b) => Some(b.clone()),
            _ => None,
        })
        .expect("a batch");
    assert_eq!(stored_run_states(&batch), vec![(run, RunState::Cancelled)]);
    keel.handle_persisted(t0, batch.id);
    let effects = drain_all(&mut keel);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::StartAttempt(_))),
        "{effects:?}"
    );
    keel.check_invariants();
}

#[test]
fn refused_commands_change_nothing() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let later = t1.plus_ms(5_000);
    let id = JobId::new("minutely").expect("valid");
    let ghost = JobId::new("ghost").expect("valid");
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());
    let token = start.lease.token;
    let (older, newer) = (FencingToken(token.0 - 1), FencingToken(token.0 + 1));
    // Leave the Running record unpersisted too, so the journal has something pending.
    let _in_flight = next_batch(&mut keel);
    keel.check_invariants();

    type Command<'a> = Box<dyn Fn(&mut Scheduler) -> Result<(), Rejected> + 'a>;
    let refusals: Vec<(&str, Command)> = vec![
        (
            "pause an unknown job",
            Box::new(|k| k.pause_job(later, &ghost)),
        ),
        (
            "resume an unknown job",
            Box::new(|k| k.resume_job(later, &ghost)),
        ),
        (
            "remove an unknown job",
            Box::new(|k| k.remove_job(later, &ghost)),
        ),
        (
            "trigger an unknown job",
            Box::new(|k| k.trigger(later, &ghost).map(drop)),
        ),
        (
            "update an unknown job",
            Box::new(|k| k.update_job(later, every_minute("ghost"))),
        ),
        (
            "add a duplicate job",
            Box::new(|k| k.add_job(later, every_minute("minutely"))),
        ),
        (
            "add a job with an unknown zone",
            Box::new(|k| {
                let mut spec = every_minute("new");
                spec.schedule = ScheduleSpec::Cron {
                    expr: "0 * * * * *".into(),
                    zone: "Mars/Olympus_Mons".into(),
                };
                k.add_job(later, spec)
            }),
        ),
        (
            "update with a bad cron expression",
            Box::new(|k| {
                let mut spec = every_minute("minutely");
                spec.schedule = ScheduleSpec::Cron {
                    expr: "61 * * * * *".into(),
                    zone: "UTC".into(),
                };
                k.update_job(later, spec)
            }),
        ),
        (
            "resume a job that is not paused",
            Box::new(|k| k.resume_job(later, &id)),
        ),
        (
            "trigger while a run is active (overlap skip)",
            Box::new(|k| k.trigger(later, &id).map(drop)),
        ),
        (
            "cancel an unknown run",
            Box::new(|k| k.cancel_run(later, RunId(9_999))),
        ),
        (
            "report with a newer token",
            Box::new(|k| k.handle_outcome(later, start.run, newer, Outcome::ok())),
        ),
        (
            "report with an older token",
            Box::new(|k| k.handle_outcome(later, start.run, older, Outcome::ok())),
        ),
        (
            "report for an unknown run",
            Box::new(|k| k.handle_outcome(later, RunId(9_999), token, Outcome::ok())),
        ),
        (
            "heartbeat with a newer token",
            Box::new(|k| k.heartbeat(later, start.run, newer).map(drop)),
        ),
        (
            "heartbeat with an older token",
            Box::new(|k| k.heartbeat(later, start.run, older).map(drop)),
        ),
        (
            "heartbeat for an unknown run",
            Box::new(|k| k.heartbeat(later, RunId(9_999), token).map(drop)),
        ),
        (
            "extend a run whose job has no timeout",
            Box::new(|k| k.extend(later, start.run, 1_000, "more time").map(drop)),
        ),
    ];
    for (what, command) in &refusals {
        let before = fingerprint(&keel);
        let result = command(&mut keel);
        assert!(
            result.is_err(),
            "{what}: expected a refusal, got {result:?}"
        );
        assert_eq!(
            before,
            fingerprint(&keel),
            "{what}: refused, but state changed"
        );
        keel.check_invariants();
    }
    assert_eq!(keel.poll_effect(), None, "refusals emit no effects");

    // The fingerprint does see real changes, so the comparisons above can fail.
    let before = fingerprint(&keel);
    keel.pause_job(later, &id)
        .expect("a scheduled job can be paused");
    assert_ne!(before, fingerprint(&keel));
}

/// A job removed while its run is active and added again under the same name counts the old
/// run, so the invariants hold and settling it does not underflow `active_runs`.
#[test]
fn readding_a_job_removed_while_its_run_is_active_keeps_active_runs_consistent() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let id = JobId::new("minutely").expect("valid");
    let mut keel = with_job(t0, every_minute("minutely"));
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let start = expect_start(keel.poll_effect());

    keel.remove_job(t1, &id).expect("known job");
    keel.add_job(t1, every_minute("minutely"))
        .expect("the name is free again");
    keel.check_invariants();
    keel.handle_outcome(t1, start.run, start.lease.token, Outcome::ok())
        .expect("the attempt is current");
    keel.check_invariants();
}

// ----- core bugs found by these tests (ignored until core/src is fixed) --------------------

/// The run module's transition table and `cancel_run`'s docs say any failure after a cancel
/// request ends the run `cancelled`; a permanent error ends it `failed_dropped` instead.
#[test]
fn permanent_error_after_a_cancel_request_ends_the_run_cancelled() {
    let (mut keel, t1, start) = minutely_started();
    keel.cancel_run(t1, start.run).expect("running");
    let outcome = Outcome::Permanent {
        message: "stopped".into(),
    };
    keel.handle_outcome(t1, start.run, start.lease.token, outcome)
        .expect("current attempt");
    assert_eq!(
        keel.run(start.run).map(|r| r.state()),
        Some(RunState::Cancelled)
    );
}

/// SPEC R4: every terminal record keeps the concrete last error. A snooze after a cancel
/// request ends the run `cancelled` without recording any error.
#[test]
fn snooze_after_a_cancel_request_keeps_a_last_error() {
    let (mut keel, t1, start) = minutely_started();
    keel.cancel_run(t1, start.run).expect("running");
    keel.handle_outcome(
        t1,
        start.run,
        start.lease.token,
        Outcome::Snooze { for_ms: 1_000 },
    )
    .expect("current attempt");
    let run = keel.run(start.run).expect("in memory until persisted");
    assert_eq!(run.state(), RunState::Cancelled);
    assert!(run.last_error().is_some(), "{run:?}");
}

/// An operator's cancel request is persisted with the running attempt (`cancel_requested`),
/// but when a crash cuts that attempt short, `restore` retries the run like any interrupted
/// one: attempt 2 is handed out, and no `CancelAttempt` is ever sent for it. The cancelled run
/// runs again, and completes `succeeded` if its handler does. Recovery should end it
/// `cancelled` instead.
#[test]
fn a_cancel_request_survives_a_crash() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let (mut keel, mut store, _) = stored_with(t0, every_minute("minutely"));
    let start = first_start(&mut keel, &mut store, t1);
    keel.cancel_run(t1, start.run)
        .expect("a running run can be cancelled");
    flush(&mut keel, &mut store, t1);
    assert!(
        store.run(start.run).unwrap().cancel_requested(),
        "the request is durable"
    );

    // Crash before the handler reports.
    let t2 = t1.plus_ms(1_000);
    let mut keel = Scheduler::restore(Config::default(), 7, t2, store.restore());
    keel.handle_timeout(t2);
    let effects = flush(&mut keel, &mut store, t2);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::StartAttempt(s) if s.run == start.run)),
        "the cancelled run was handed out again: {effects:?}"
    );
    assert_eq!(store.run(start.run).unwrap().state(), RunState::Cancelled);
}

/// SPEC R5 finishes a one-shot job when its run settles, but settle treats any run of the job
/// as the one-shot's run. A recurring job updated to a one-shot while a run of the old
/// schedule is active is disabled ("one-shot job finished (succeeded)") the moment that old run
/// settles, so the new one-shot never fires. The same happens to a one-shot added under the
/// name of a removed job whose run is still active, and with `delete_after_run` the new job is
/// deleted before it ever fires.
#[test]
fn a_one_shot_is_not_finished_by_a_run_of_an_earlier_schedule() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let at = t1.plus_ms(3_600_000);
    let id = JobId::new("minutely").expect("valid");
    for readd in [false, true] {
        let mut keel = with_job(t0, every_minute("minutely"));
        keel.handle_timeout(t1);
        let batch = next_batch(&mut keel);
        keel.handle_persisted(t1, batch.id);
        let start = expect_start(keel.poll_effect());
        let mut once = once_spec("minutely", at);
        once.delete_after_run = readd;
        if readd {
            keel.remove_job(t1, &id).expect("known job");
            keel.add_job(t1, once).expect("the name is free");
        } else {
            keel.update_job(t1, once).expect("a valid update");
        }
        keel.handle_outcome(t1, start.run, start.lease.token, Outcome::ok())
            .expect("current attempt");
        let state = keel.job(&id).map(|j| j.state.clone());
        assert_eq!(
            state,
            Some(JobState::Scheduled { next: at }),
            "readd: {readd}: the one-shot at {at} has not fired yet"
        );
    }
}

/// Drains every effect, writing and acknowledging each batch into `store`; returns the other
/// effects.
fn flush(keel: &mut Scheduler, store: &mut MemStore, now: Timestamp) -> Vec<Effect> {
    let mut others = Vec::new();
    while let Some(effect) = keel.poll_effect() {
        match effect {
            Effect::Persist(batch) => {
                store.apply(&batch);
                keel.handle_persisted(now, batch.id);
            }
            other => others.push(other),
        }
        keel.check_invariants();
    }
    others
}

/// `remove_job` lets runs under way finish, but their later attempts are handed out with the
/// job's kind and payload looked up from the (now missing) job: both are empty, so no handler
/// can be found for the attempt. The same happens after a restore, and for a first attempt
/// whose job is removed before its batch is acknowledged.
#[test]
fn an_attempt_of_a_removed_job_keeps_its_kind_and_payload() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut spec = every_minute("minutely");
    spec.payload = "p".into();
    spec.retry.jitter = 0.0;
    let mut keel = with_job(t0, spec);
    keel.handle_timeout(t1);
    let batch = next_batch(&mut keel);
    keel.handle_persisted(t1, batch.id);
    let first = expect_start(keel.poll_effect());
    assert_eq!((&*first.kind, &*first.payload), ("work", "p"));

    keel.remove_job(t1, &JobId::new("minutely").expect("valid"))
        .expect("known job");
    let failed = Outcome::Retryable {
        message: "503".into(),
    };
    keel.handle_outcome(t1, first.run, first.lease.token, failed)
        .expect("current attempt");
    let retry_at = t1.plus_ms(1_000);
    let mut store = MemStore::keeping_history();
    flush(&mut keel, &mut store, t1);
    keel.handle_timeout(retry_at);
    let second = flush(&mut keel, &mut store, retry_at)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(start) => Some(start),
            _ => None,
        })
        .expect("the retry is handed out");
    assert_eq!(second.attempt, Attempt(2));
    assert_eq!((&*second.kind, &*second.payload), ("work", "p"));
}

/// SPEC W5 and `keel_core::incident`: incidents are persisted (`Record::PutIncident`) when
/// they open and when they resolve. (A first version of the lease work collected them in the
/// journal but never put them in a batch.)
#[test]
fn an_incident_is_persisted_when_it_opens_and_when_it_resolves() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let (mut keel, mut store, config) = stored_with(t0, every_minute("minutely"));
    let start = first_start(&mut keel, &mut store, t1);

    // The attempt goes silent: its lease is reclaimed, which opens an incident, and the retry
    // that starts at once resolves it.
    let t2 = start.lease.expires_at.plus_ms(config.lease.grace_ms);
    keel.handle_timeout(t2);
    let mut incidents = BTreeMap::new();
    for effect in flush(&mut keel, &mut store, t2) {
        if let Effect::Event(Event::IncidentOpened(i) | Event::IncidentResolved(i)) = effect {
            incidents.insert(i.id, i);
        }
    }
    assert!(
        incidents.values().any(|i| i.run == Some(start.run)),
        "the reclaim opened no incident"
    );
    assert!(keel.is_quiescent());
    assert_eq!(
        store
            .incidents()
            .map(|i| (i.id, i.clone()))
            .collect::<BTreeMap<_, _>>(),
        incidents,
        "the store does not hold the incidents in their latest state"
    );
}

/// Attempts granted together (in one batch) are handed out in grant order, so the tokens a
/// driver sees rise with the hand-out, not with job names. (Fencing itself is per run.)
#[test]
fn attempts_granted_together_are_handed_out_in_grant_order() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, once_spec("b", t0.plus_ms(1_000)))
        .expect("valid");
    keel.add_job(t0, once_spec("a", t0.plus_ms(2_000)))
        .expect("valid");
    let mut store = MemStore::keeping_history();
    flush(&mut keel, &mut store, t0);
    let t1 = t0.plus_ms(2_000);
    keel.handle_timeout(t1);
    let handed_out: Vec<(String, FencingToken)> = flush(&mut keel, &mut store, t1)
        .into_iter()
        .filter_map(|e| match e {
            Effect::StartAttempt(start) => Some((start.job.to_string(), start.lease.token)),
            _ => None,
        })
        .collect();
    assert_eq!(handed_out.len(), 2, "{handed_out:?}");
    assert!(
        handed_out[0].1 < handed_out[1].1,
        "handed out in this order: {handed_out:?}"
    );
}

/// SPEC L1: a token never repeats. `claim` once returned the granted token before the grant
/// (and the token counter) was durable; a crash then let the restored scheduler grant the same
/// token to another worker, and the first worker's completion was accepted as the new holder's.
/// Now a claim reveals only the run: the lease reaches the worker with the StartAttempt that
/// follows the durable grant.
#[test]
fn a_claimed_token_is_not_granted_again_after_a_crash() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut spec = once_spec("external", t0);
    spec.external = true;
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(Config::default(), 7, t0);
    keel.add_job(t0, spec).expect("valid");
    keel.handle_timeout(t0);
    flush(&mut keel, &mut store, t0);
    let a = WorkerId::new("worker-a").expect("valid");
    let first = keel
        .claim(t0, &a, &["work"])
        .expect("not shutting down")
        .expect("the run is queued");
    // The claim reveals no token: worker a gets its lease only with the StartAttempt that
    // follows the durable grant. The process dies before that batch is written.
    let mut keel = Scheduler::restore(Config::default(), 7, t0, store.restore());
    flush(&mut keel, &mut store, t0);
    let b = WorkerId::new("worker-b").expect("valid");
    let second = keel
        .claim(t0, &b, &["work"])
        .expect("not shutting down")
        .expect("the run is queued again");
    assert_eq!(second.run, first.run);
    let mut handed_out = Vec::new();
    while let Some(effect) = keel.poll_effect() {
        match effect {
            Effect::Persist(batch) => {
                store.apply(&batch);
                keel.handle_persisted(t0, batch.id);
            }
            Effect::StartAttempt(start) => handed_out.push(start),
            _ => {}
        }
    }
    assert_eq!(handed_out.len(), 1, "one hand-out, to worker b");
    assert_eq!(handed_out[0].lease.owner, b);
    keel.handle_outcome(t0, second.run, handed_out[0].lease.token, Outcome::ok())
        .expect("worker b holds the lease");
}

// ----- workers, watchdog, checkpoints, outbox ----------------------------------------------

/// Runs `keel` until its first attempt is handed out, persisting into `store`.
fn first_start(keel: &mut Scheduler, store: &mut MemStore, now: Timestamp) -> AttemptStart {
    keel.handle_timeout(now);
    flush(keel, store, now)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(start) => Some(start),
            _ => None,
        })
        .expect("an attempt was handed out")
}

/// Fails every batch until no effect is left; returns the effects other than batches.
fn fail_all(keel: &mut Scheduler, now: Timestamp) -> Vec<Effect> {
    let mut others = Vec::new();
    while let Some(effect) = keel.poll_effect() {
        match effect {
            Effect::Persist(batch) => keel.handle_persist_failed(now, batch.id, "disk full"),
            other => others.push(other),
        }
        keel.check_invariants();
    }
    others
}

/// SPEC C1: a save whose persist failed is reported, and the next save is written at once.
#[test]
fn the_save_after_a_failed_save_is_written_at_once() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let (mut keel, mut store, _) = stored_with(t0, every_minute("minutely"));
    let start = first_start(&mut keel, &mut store, t1);
    let (run, token) = (start.run, start.lease.token);
    let save = |keel: &mut Scheduler, at: Timestamp, data: &str| {
        keel.save_checkpoint(at, run, token, data.into())
            .expect("the holder may save")
    };
    assert!(matches!(
        save(&mut keel, t1, "1"),
        CheckpointSave::Saving { seq: 1 }
    ));
    flush(&mut keel, &mut store, t1);
    // Within the window after an acknowledged save: throttled.
    let t2 = t1.plus_ms(6_000);
    assert!(matches!(
        save(&mut keel, t1.plus_ms(1_000), "2"),
        CheckpointSave::Throttled { .. }
    ));
    // After it: written, and the store fails it.
    assert!(matches!(
        save(&mut keel, t2, "3"),
        CheckpointSave::Saving { seq: 2 }
    ));
    let events = fail_all(&mut keel, t2);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Effect::Event(Event::CheckpointFailed { run: r, seq: 2, .. }) if *r == run
        )),
        "{events:?}"
    );
    // The next save goes through at once, even a millisecond later.
    assert!(matches!(
        save(&mut keel, t2.plus_ms(1), "4"),
        CheckpointSave::Saving { seq: 3 }
    ));
}

/// SPEC C1 and docs/semantics.md ("A failed save is reported (`Event::CheckpointFailed`) and
/// the next save is written at once"): not so when the failed save was written by
/// `flush_checkpoints` (or `begin_shutdown`) inside the throttle window of an earlier
/// acknowledged save. `Throttle::failed` keeps the window "as it was", which the flush had
/// bypassed, so the next save is `Throttled` until `acked_at + interval`.
#[test]
fn the_save_after_a_failed_flushed_save_is_written_at_once() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let (mut keel, mut store, _) = stored_with(t0, every_minute("minutely"));
    let start = first_start(&mut keel, &mut store, t1);
    let (run, token) = (start.run, start.lease.token);
    keel.save_checkpoint(t1, run, token, "1".into())
        .expect("the holder may save");
    flush(&mut keel, &mut store, t1);
    let t2 = t1.plus_ms(1_000);
    let throttled = keel
        .save_checkpoint(t2, run, token, "2".into())
        .expect("the holder may save");
    assert!(matches!(throttled, CheckpointSave::Throttled { .. }));
    keel.flush_checkpoints(t2);
    let events = fail_all(&mut keel, t2);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Effect::Event(Event::CheckpointFailed { seq: 2, .. }))),
        "the flushed save failed: {events:?}"
    );
    let next = keel
        .save_checkpoint(t2.plus_ms(10), run, token, "3".into())
        .expect("the holder may save");
    assert!(
        matches!(next, CheckpointSave::Saving { .. }),
        "the save after a failed save must be written, got {next:?}"
    );
}

/// `begin_shutdown`: nothing new fires or starts; attempts in progress are asked to stop and
/// the rest waits for the next start. But a run that ends during the shutdown settles, and
/// settle takes its job's buffered slot (`overlap: buffer-one`, or a catch-up backlog): a new
/// run is created, with a lease, during the shutdown. Its attempt is held, so the next start
/// finds it cut short: a lost attempt, or, for a job that does not resume after crashes, a
/// run that ends `interrupted` without ever having run. The slot should stay buffered until
/// the next start.
#[test]
fn a_buffered_slot_waits_for_the_next_start_after_a_shutdown() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let t2 = t1.plus_ms(60_000);
    let mut spec = every_minute("minutely");
    spec.overlap = OverlapPolicy::BufferOne;
    spec.resume_after_crash = false;
    let (mut keel, mut store, config) = stored_with(t0, spec);
    let start = first_start(&mut keel, &mut store, t1);
    keel.heartbeat(t2, start.run, start.lease.token)
        .expect("the holder renews");
    keel.handle_timeout(t2);
    flush(&mut keel, &mut store, t2);
    let id = JobId::new("minutely").expect("valid");
    assert_eq!(
        keel.job(&id).map(|j| j.backlog.len()),
        Some(1),
        "slot 2 waits"
    );

    let shutdown = keel.begin_shutdown(t2);
    assert_eq!(shutdown.attempts, vec![(start.run, start.attempt)]);
    flush(&mut keel, &mut store, t2);
    keel.handle_outcome(t2, start.run, start.lease.token, Outcome::ok())
        .expect("the attempt stops in time");
    flush(&mut keel, &mut store, t2);
    // The process stops and starts again.
    let mut keel = Scheduler::restore(config.clone(), 7, t2, store.restore());
    flush(&mut keel, &mut store, t2);
    let interrupted: Vec<&Run> = store
        .runs()
        .filter(|r| r.state() == RunState::Interrupted)
        .collect();
    assert!(
        interrupted.is_empty(),
        "slot 2 ended interrupted without running: {interrupted:?}"
    );
    // The next start drains the backlog: slot 2 runs now.
    assert_eq!(keel.job(&id).map(|j| j.backlog.len()), Some(0));
    assert!(
        keel.runs()
            .any(|r| r.slot() == Some(t2) && !r.state().is_terminal()),
        "slot 2 runs after the restart"
    );
}

/// SPEC W1, W2: the timeout is extended once per run; a killed run is never extended, and
/// nothing its killed attempt reports is accepted.
#[test]
fn extend_once_and_a_kill_is_sticky() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let t1 = t0.plus_ms(60_000);
    let mut spec = every_minute("minutely");
    spec.timeout_ms = Some(20_000);
    let (mut keel, mut store, config) = stored_with(t0, spec);
    let start = first_start(&mut keel, &mut store, t1);
    let (run, token) = (start.run, start.lease.token);
    let deadline = keel
        .extend(t1, run, 5_000, "slow upstream")
        .expect("the first extension");
    assert_eq!(deadline, t1.plus_ms(25_000));
    assert_eq!(
        keel.extend(t1, run, 5_000, "again"),
        Err(Rejected::AlreadyExtended(run))
    );
    flush(&mut keel, &mut store, t1);
    assert!(
        store.run(run).unwrap().extended(),
        "the extension is durable"
    );
    // A restart does not grant a second one.
    let mut keel = Scheduler::restore(config.clone(), 7, t1, store.restore());
    flush(&mut keel, &mut store, t1);
    let retry = first_start(&mut keel, &mut store, t1);
    assert_eq!(retry.run, run);
    assert!(
        matches!(
            keel.heartbeat(t1, run, token),
            Err(Rejected::StaleToken { .. })
        ),
        "the attempt lost in the crash is fenced off"
    );
    assert_eq!(
        keel.extend(t1, run, 5_000, "after the restart"),
        Err(Rejected::AlreadyExtended(run))
    );
    // Time out, then kill.
    let token = retry.lease.token;
    let t2 = t1.plus_ms(20_000);
    keel.heartbeat(t2, run, token).expect("alive");
    keel.handle_timeout(t2);
    let effects = flush(&mut keel, &mut store, t2);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::CancelAttempt { run: r, .. } if *r == run)));
    let t3 = t2.plus_ms(config.kill_grace_ms);
    keel.handle_timeout(t3);
    let effects = flush(&mut keel, &mut store, t3);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::KillAttempt { run: r, attempt: a }
                if *r == run && *a == retry.attempt)),
        "{effects:?}"
    );
    assert_eq!(
        keel.extend(t3, run, 5_000, "too late"),
        Err(Rejected::Killed(run))
    );
    assert!(matches!(
        keel.heartbeat(t3, run, token),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(matches!(
        keel.handle_outcome(t3, run, token, Outcome::ok()),
        Err(Rejected::StaleToken { .. } | Rejected::NotRunning { .. })
    ));
    assert_eq!(
        keel.release(t3, run, token),
        Ok(Released::AlreadyReleased),
        "SPEC L4: releasing a lost lease is not an error"
    );
    assert_eq!(
        store.run(run).unwrap().killed(),
        Some(retry.attempt),
        "the kill is durable"
    );
}

/// SPEC D1, D4: a small outbox stays bounded (overflow evicts the oldest waiting delivery,
/// never one in flight), each delivery ends once, and a stale answer is refused and changes
/// nothing.
#[test]
fn a_small_outbox_stays_bounded_and_counts_each_delivery_once() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let config = Config {
        outbox: OutboxConfig {
            capacity: 3,
            ..OutboxConfig::default()
        },
        ..Config::default()
    };
    let mut store = MemStore::keeping_history();
    let mut keel = Scheduler::new(config.clone(), 7, t0);
    let mut spec = every_minute("minutely");
    spec.sinks = vec!["hook-a".into(), "hook-b".into()].into();
    spec.overlap = OverlapPolicy::Allow;
    keel.add_job(t0, spec).expect("valid");
    flush(&mut keel, &mut store, t0);
    let mut ended = BTreeMap::new();
    let mut evicted = 0;
    let mut sends = Vec::new();
    let mut note = |effects: Vec<Effect>, sends: &mut Vec<SendRequest>| {
        for effect in effects {
            match effect {
                Effect::Event(Event::Delivery(OutboxEvent::Finished { id, .. })) => {
                    *ended.entry(id).or_insert(0) += 1;
                }
                Effect::Event(Event::Delivery(OutboxEvent::Dropped { id, .. })) => {
                    let id = id.expect("evicted, not refused: one delivery waits");
                    *ended.entry(id).or_insert(0) += 1;
                    evicted += 1;
                }
                Effect::Deliver(send) => sends.push(send),
                _ => {}
            }
        }
    };
    // Two runs finish: four deliveries for an outbox of three. The first two are in flight
    // when the second run finishes; its first delivery is evicted for its second.
    for minute in 1..=2 {
        let now = t0.plus_ms(minute * 60_000);
        let start = first_start(&mut keel, &mut store, now);
        keel.handle_outcome(now, start.run, start.lease.token, Outcome::ok())
            .expect("current");
        let effects = flush(&mut keel, &mut store, now);
        note(effects, &mut sends);
        assert!(keel.outbox().len() <= 3);
    }
    let t3 = t0.plus_ms(3 * 60_000);
    keel.handle_timeout(t3);
    let effects = flush(&mut keel, &mut store, t3);
    note(effects, &mut sends);
    assert!(!sends.is_empty(), "deliveries were sent");
    for send in std::mem::take(&mut sends) {
        let before = format!("{keel:?}");
        assert!(keel
            .handle_delivery_result(t3, send.id, send.attempt + 1, DeliveryResult::Delivered)
            .is_err());
        assert_eq!(
            before,
            format!("{keel:?}"),
            "a stale answer changed nothing"
        );
        keel.handle_delivery_result(t3, send.id, send.attempt, DeliveryResult::Delivered)
            .expect("the current attempt");
        assert!(keel
            .handle_delivery_result(t3, send.id, send.attempt, DeliveryResult::Delivered)
            .is_err());
        let effects = flush(&mut keel, &mut store, t3);
        note(effects, &mut sends);
    }
    assert!(keel.outbox().is_empty());
    assert!(store.deliveries().next().is_none());
    assert_eq!(
        (ended.len(), evicted),
        (4, 1),
        "four deliveries ended, one evicted: {ended:?}"
    );
    assert!(
        ended.values().all(|n| *n == 1),
        "each counted once: {ended:?}"
    );
}

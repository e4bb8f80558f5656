//! Regression tests from an independent review of keel-core. Each failed before its fix; the
//! comment above each test describes the defect it guards against.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use keel_core::*;

fn ts(t: &str) -> Timestamp {
    Timestamp::parse_rfc3339(t).unwrap()
}

#[test]
fn forward_and_backward_slot_walks_agree_across_dst_days() {
    let exprs = [
        "0 30 2 * * *",
        "0 0 2 * * *",
        "0 59 1 * * *",
        "0 30 1 * * *",
        "0 */30 * * * *",
        "0 30 1,2 * * *",
        "0 0-59/7 1-3 * * *",
        "0 0 * * * *",
        "0 15 2 * * *",
        "30 45 0-3 * * *",
        "0 0 0 * * *",
    ];
    let zones = [
        "America/New_York",
        "Europe/London",
        "Australia/Lord_Howe",
        "America/Santiago",
        "Asia/Gaza",
        "America/Havana",
    ];
    let days = [
        ("2026-03-07T00:00:00Z", "2026-03-10T00:00:00Z"),
        ("2026-10-31T00:00:00Z", "2026-11-03T00:00:00Z"),
        ("2026-03-28T00:00:00Z", "2026-03-31T00:00:00Z"),
        ("2026-10-24T00:00:00Z", "2026-10-27T00:00:00Z"),
        ("2026-04-03T00:00:00Z", "2026-04-07T00:00:00Z"),
        ("2026-09-04T00:00:00Z", "2026-09-08T00:00:00Z"),
        ("2026-10-02T00:00:00Z", "2026-10-06T00:00:00Z"),
    ];
    let mut bad = 0;
    for z in zones {
        for e in exprs {
            for (a, b) in days {
                let s = Schedule::cron(e, z).unwrap();
                let (a, b) = (ts(a), ts(b));
                let mut fwd = vec![];
                let mut t = a;
                while let Some(n) = s.next_after(t) {
                    if n > b {
                        break;
                    }
                    fwd.push(n);
                    t = n;
                }
                let mut bwd = vec![];
                let mut t = b;
                while let Some(p) = s.latest_at_or_before(t) {
                    if p <= a {
                        break;
                    }
                    bwd.push(p);
                    t = Timestamp(p.0 - 1);
                }
                bwd.reverse();
                if fwd != bwd {
                    bad += 1;
                    let f: Vec<_> = fwd
                        .iter()
                        .filter(|x| !bwd.contains(x))
                        .map(|x| x.to_string())
                        .collect();
                    let g: Vec<_> = bwd
                        .iter()
                        .filter(|x| !fwd.contains(x))
                        .map(|x| x.to_string())
                        .collect();
                    println!("{z} {e}: only-forward {f:?} only-backward {g:?}");
                }
            }
        }
    }
    assert_eq!(bad, 0, "forward and backward slot walks disagree");
}

fn id(s: &str) -> JobId {
    JobId::new(s).unwrap()
}
fn every_second(name: &str) -> JobSpec {
    cron(name, "* * * * * *")
}
/// A job of kind `k` on the cron `expr`, in UTC.
fn cron(name: &str, expr: &str) -> JobSpec {
    JobSpec::new(
        id(name),
        "k",
        ScheduleSpec::Cron {
            expr: expr.into(),
            zone: "UTC".into(),
        },
    )
}
/// Drains effects, acking every batch, answering every attempt with `outcome`.
fn drain(s: &mut Scheduler, now: Timestamp, outcome: Option<Outcome>) -> Vec<Effect> {
    let mut out = vec![];
    while let Some(e) = s.poll_effect() {
        match &e {
            Effect::Persist(b) => s.handle_persisted(now, b.id),
            Effect::StartAttempt(a) => {
                if let Some(o) = &outcome {
                    s.handle_outcome(now, a.run, a.lease.token, o.clone())
                        .unwrap();
                }
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

/// Runs the scheduler's timers for three hours from `t0` while the store fails every write.
fn fail_every_write_for_3_hours(s: &mut Scheduler, t0: Timestamp) {
    let mut now = t0;
    while now < t0.plus_ms(3 * 3_600_000) {
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        while let Some(e) = s.poll_effect() {
            if let Effect::Persist(b) = e {
                s.handle_persist_failed(now, b.id, "disk full");
            }
        }
    }
}

/// A store outage of one hour: one job's pending group grows without bound, and the batch
/// after recovery is far beyond BATCH_RECORDS_MAX.
#[test]
fn a_store_outage_does_not_make_an_unbounded_batch() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    s.add_job(t0, every_second("tick")).unwrap();
    drain(&mut s, t0, None);
    // The store now fails every write.
    fail_every_write_for_3_hours(&mut s, t0);
    // The store heals: the next batch holds everything for the job.
    let mut biggest = 0;
    for _ in 0..20 {
        let now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        while let Some(e) = s.poll_effect() {
            if let Effect::Persist(b) = e {
                biggest = biggest.max(b.records.len());
                s.handle_persisted(now, b.id);
            }
        }
    }
    assert!(
        biggest <= limits::BATCH_RECORDS_MAX + 3,
        "one batch of {biggest} records"
    );
}

/// At the end of time, handle_timeout(now) leaves poll_timeout() == now: a busy loop.
#[test]
fn poll_timeout_is_later_than_now_even_at_the_end_of_time() {
    let now = Timestamp::MAX;
    let mut s = Scheduler::new(Config::default(), 1, now);
    s.handle_timeout(now);
    drain(&mut s, now, None);
    assert!(
        s.poll_timeout().is_none_or(|t| t > now),
        "poll_timeout {:?} after handle_timeout({now:?})",
        s.poll_timeout()
    );
}

/// A scheduler at `t0` with one every-second job, `tick`, whose runs may overlap, its addition
/// written.
fn overlapping_ticks(t0: Timestamp) -> Scheduler {
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let mut spec = every_second("tick");
    spec.overlap = OverlapPolicy::Allow;
    s.add_job(t0, spec).unwrap();
    drain(&mut s, t0, None);
    s
}

/// A 59-second stall (within grace) fires 59 runs of an every-second job, while a 61-second
/// stall fires one (fire-once-now).
#[test]
fn a_stall_shorter_than_the_grace_still_fires_once() {
    for stall_s in [59u64, 61] {
        let t0 = ts("2026-01-01T00:00:00Z");
        let mut s = overlapping_ticks(t0);
        let now = t0.plus_ms(stall_s * 1000);
        s.handle_timeout(now);
        let started = drain(&mut s, now, None)
            .iter()
            .filter(|e| matches!(e, Effect::StartAttempt(_)))
            .count();
        println!("stall {stall_s}s: {started} runs started");
        assert!(
            started <= 1,
            "stall of {stall_s}s started {started} runs under fire-once-now"
        );
    }
}

/// Same outage with overlap `allow`: every slot creates a run that cannot start, without bound.
#[test]
fn a_store_outage_does_not_pile_up_runs() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = overlapping_ticks(t0);
    fail_every_write_for_3_hours(&mut s, t0);
    let runs = s.runs().count();
    assert!(
        runs <= limits::BACKLOG_MAX,
        "{runs} runs in memory for one job"
    );
}

fn run_to_end(s: &mut Scheduler, now: Timestamp, id: RunId, outcome: Outcome) {
    // Ack batches until the attempt starts, then report.
    loop {
        let Some(e) = s.poll_effect() else {
            panic!("no start for {id}")
        };
        match e {
            Effect::Persist(b) => s.handle_persisted(now, b.id),
            Effect::StartAttempt(a) if a.run == id => {
                s.handle_outcome(now, a.run, a.lease.token, outcome)
                    .unwrap();
                break;
            }
            _ => {}
        }
    }
    drain(s, now, None);
}

/// A one-shot with delete_after_run is never deleted if a leftover run of its earlier,
/// recurring definition is still active when its own run settles.
#[test]
fn delete_after_run_waits_for_a_leftover_run() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let mut spec = cron("j", "0 * * * * *");
    spec.overlap = OverlapPolicy::Allow;
    s.add_job(t0, spec.clone()).unwrap();
    drain(&mut s, t0, None);
    let t1 = t0.plus_ms(60_000);
    s.handle_timeout(t1); // recurring run 1 starts and stays running
    let starts: Vec<_> = drain(&mut s, t1, None)
        .into_iter()
        .filter_map(|e| match e {
            Effect::StartAttempt(a) => Some(a),
            _ => None,
        })
        .collect();
    let leftover = starts[0].clone();
    // The job becomes a one-shot, deleted after its run.
    let at = t1.plus_ms(1_000);
    spec.schedule = ScheduleSpec::Once { at };
    spec.delete_after_run = true;
    s.update_job(t1, spec).unwrap();
    drain(&mut s, t1, None);
    s.handle_timeout(at);
    let own = s
        .runs()
        .find(|r| r.slot() == Some(at))
        .expect("one-shot fired")
        .id();
    run_to_end(&mut s, at, own, Outcome::ok());
    // The leftover recurring run finishes last.
    s.handle_outcome(at, leftover.run, leftover.lease.token, Outcome::ok())
        .unwrap();
    drain(&mut s, at, None);
    assert!(
        s.job(&id("j")).is_none(),
        "one-shot with delete_after_run still exists: {:?}",
        s.job(&id("j")).map(|j| &j.state)
    );
}

/// A manual run of one-shot A, made before the job was updated to one-shot B, finishes B
/// before B ever fires; a scheduled run of A would not (settle compares its slot).
#[test]
fn a_manual_run_of_an_earlier_one_shot_does_not_finish_the_new_one() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let a = t0.plus_ms(3_600_000);
    let mut spec = JobSpec::new(id("j"), "k", ScheduleSpec::Once { at: a });
    s.add_job(t0, spec.clone()).unwrap();
    drain(&mut s, t0, None);
    let run = s.trigger(t0, &id("j")).unwrap();
    let mut start = None;
    while let Some(e) = s.poll_effect() {
        match e {
            Effect::Persist(b) => s.handle_persisted(t0, b.id),
            Effect::StartAttempt(x) => start = Some(x),
            _ => {}
        }
    }
    let start = start.unwrap();
    let b = t0.plus_ms(2 * 3_600_000);
    spec.schedule = ScheduleSpec::Once { at: b };
    s.update_job(t0, spec).unwrap();
    s.handle_outcome(t0, run, start.lease.token, Outcome::ok())
        .unwrap();
    drain(&mut s, t0, None);
    assert_eq!(
        s.job(&id("j")).unwrap().next_fire(),
        Some(b),
        "state {:?}",
        s.job(&id("j")).unwrap().state
    );
}

/// What a store holds for one job, `spec` in `state` having last fired `last_fired`, and no
/// runs, as of `clock`.
fn snapshot_of(
    spec: JobSpec,
    state: JobState,
    last_fired: Option<Timestamp>,
    clock: Timestamp,
) -> Snapshot {
    let job = Job {
        spec,
        state,
        backlog: Default::default(),
        last_fired,
        active_runs: 0,
        delete_when_idle: false,
        last_run: None,
        failures_in_a_row: 0,
    };
    Snapshot {
        jobs: vec![job],
        runs: vec![],
        meta: Meta {
            next_run_id: 1,
            next_audit_seq: 1,
            clock,
            epoch: 0,
            ..Meta::default()
        },
        tombstones: vec![],
        ..Snapshot::default()
    }
}

/// Restore trusts every stored field except the schedule: a stored retry policy that
/// `validate` would refuse (jitter above 1) panics the scheduler on the run's first retry.
#[test]
fn restore_disables_a_job_whose_stored_policy_is_invalid() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut spec = cron("j", "0 * * * * *");
    spec.retry.jitter = 2.0; // e.g. written by an older version with looser validation
    let state = JobState::Scheduled {
        next: t0.plus_ms(60_000),
    };
    let snap = snapshot_of(spec, state, None, t0);
    let mut s = Scheduler::restore(Config::default(), 1, t0, snap);
    let JobState::Disabled { reason } = &s.job(&id("j")).unwrap().state else {
        panic!("a stored invalid policy must disable the job");
    };
    assert!(reason.contains("jitter"), "{reason}");
    drain(&mut s, t0, None);
    let t1 = t0.plus_ms(60_000);
    s.handle_timeout(t1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drain(
            &mut s,
            t1,
            Some(Outcome::Retryable {
                message: "boom".into(),
            }),
        );
    }));
    assert!(
        r.is_ok(),
        "a stored policy panicked the core instead of disabling the job"
    );
}

/// Restore repairs a stale cursor only for Scheduled jobs: a Paused job whose cursor is at its
/// last fired slot re-fires that slot on resume.
#[test]
fn restore_repairs_a_paused_cursor() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let slot = t0.plus_ms(60_000);
    let spec = cron("j", "0 * * * * *");
    let state = JobState::Paused { next: Some(slot) };
    let snap = snapshot_of(spec, state, Some(slot), slot);
    let mut s = Scheduler::restore(Config::default(), 1, slot, snap);
    s.check_invariants();
    s.resume_job(slot, &id("j")).unwrap();
    s.check_invariants(); // panics: cursor not after last fired
}

/// An empty cron field passes validation, and every slot search on it then walks croner's
/// whole year range (seconds of CPU per call) before finding nothing.
#[test]
fn an_empty_cron_field_is_refused() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let spec = cron("j", ", * * * * *");
    let result = s.add_job(t0, spec);
    assert!(
        matches!(
            result,
            Err(Rejected::Schedule(ScheduleError::InvalidCron {
                field: ScheduleField::Second,
                ..
            }))
        ),
        "{result:?}"
    );
}

/// `Config::misfire_grace_ms` has no limit, and every slot within grace is enumerated one by
/// one: a one-day jump with a one-day grace enumerates 86 400 slots in one handle_timeout.
#[test]
fn the_grace_is_bounded_and_never_enumerates_a_day_of_slots() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let config = Config {
        misfire_grace_ms: 24 * 3_600_000,
        ..Config::default()
    };
    let mut s = Scheduler::new(config.clone(), 1, t0);
    s.add_job(t0, every_second("tick")).unwrap();
    drain(&mut s, t0, None);
    let now = t0.plus_ms(24 * 3_600_000);
    s.handle_timeout(now);
    let drops = drain(&mut s, now, None)
        .iter()
        .filter(|e| matches!(e, Effect::Event(Event::SlotsDropped { .. })))
        .count();
    assert!(
        drops <= limits::CATCH_UP_MAX as usize,
        "{drops} slots enumerated in one tick"
    );
}

/// A one-shot with delete_after_run leaves no trace in the core once it finishes, so the usual
/// "register my jobs at start-up" pattern fires it again (same job, same nominal slot).
#[test]
fn a_deleted_one_shot_re_registered_at_start_up_does_not_fire_again() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let at = t0.plus_ms(1_000);
    let mut spec = JobSpec::new(id("migrate"), "k", ScheduleSpec::Once { at });
    spec.delete_after_run = true;
    let mut s = Scheduler::new(Config::default(), 1, t0);
    s.add_job(t0, spec.clone()).unwrap();
    drain(&mut s, t0, None);
    s.handle_timeout(at);
    let fired = drain(&mut s, at, Some(Outcome::ok()))
        .iter()
        .filter(|e| matches!(e, Effect::StartAttempt(_)))
        .count();
    assert_eq!(fired, 1);
    assert!(s.job(&id("migrate")).is_none());
    // The process restarts later and registers its jobs again, as it does on every start.
    let later = at.plus_ms(3_600_000);
    let readd = s.add_job(later, spec);
    s.handle_timeout(later);
    let again = drain(&mut s, later, Some(Outcome::ok())).iter().filter(|e| matches!(e, Effect::StartAttempt(a) if a.trigger == Trigger::Scheduled { slot: at })).count();
    assert_eq!(
        again, 0,
        "slot {at} of one-shot 'migrate' fired a second time (add_job returned {readd:?})"
    );
}

/// Batches always take job groups from the front of the id order. With a store that takes a
/// second per batch and enough busy jobs sorting before it, a job named "zz" never gets its
/// records into a batch, so its runs never start.
#[test]
fn busy_jobs_sorting_first_do_not_starve_a_job_sorting_last() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    for i in 0..1_500 {
        s.add_job(t0, every_second(&format!("a-{i:04}"))).unwrap();
    }
    s.add_job(t0, every_second("zz")).unwrap();
    let mut in_flight: Option<BatchId> = None;
    let mut started_zz = 0;
    let mut started_a = 0;
    let mut pending_outcomes = vec![];
    for sec in 1..=120u64 {
        let now = t0.plus_ms(sec * 1_000);
        // The batch emitted a second ago is acknowledged now (a store that takes a second).
        if let Some(b) = in_flight.take() {
            s.handle_persisted(now, b);
        }
        for (run, token) in pending_outcomes.drain(..) {
            let _ = s.handle_outcome(now, run, token, Outcome::ok());
        }
        s.handle_timeout(now);
        while let Some(e) = s.poll_effect() {
            match e {
                Effect::Persist(b) => in_flight = Some(b.id),
                Effect::StartAttempt(a) => {
                    if a.job.as_str() == "zz" {
                        started_zz += 1;
                    } else {
                        started_a += 1;
                    }
                    pending_outcomes.push((a.run, a.lease.token));
                }
                _ => {}
            }
        }
    }
    println!(
        "a-jobs started {started_a} attempts; zz state {:?}",
        s.runs()
            .filter(|r| r.job().as_str() == "zz")
            .map(|r| r.state())
            .collect::<Vec<_>>()
    );
    assert!(started_zz > 0, "job zz never started a run in 120 s");
}

/// A refused command still moves the scheduler's clock (and the next batch persists it as
/// the high-water mark), though lib.rs says a refused command "changes nothing".
#[test]
fn a_refused_command_does_not_move_the_clock() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let bogus = Timestamp(t0.0 * 1000); // a driver that passed microseconds by mistake
    assert!(s.pause_job(bogus, &id("nope")).is_err());
    assert_eq!(s.now(), t0, "a refused command moved now() to {}", s.now());
}

/// A scheduler at `t0` with one job, `j`, a one-shot due at `t0` whose attempt has started.
fn started_one_shot(t0: Timestamp) -> (Scheduler, AttemptStart) {
    let mut s = Scheduler::new(Config::default(), 1, t0);
    s.add_job(
        t0,
        JobSpec::new(id("j"), "k", ScheduleSpec::Once { at: t0 }),
    )
    .unwrap();
    s.handle_timeout(t0);
    let start = drain(&mut s, t0, None)
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(a) => Some(a),
            _ => None,
        })
        .unwrap();
    (s, start)
}

/// The audit records the persist effects among `effects` carry.
fn audits_in(effects: Vec<Effect>) -> Vec<AuditRecord> {
    effects
        .into_iter()
        .flat_map(|e| match e {
            Effect::Persist(b) => b
                .records
                .into_iter()
                .filter_map(|r| match r {
                    Record::Audit(a) => Some(a),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        })
        .collect()
}

/// An operator's cancel request on a running attempt leaves no audit record; the run's end is
/// later audited with actor `scheduler`.
#[test]
fn a_cancel_request_is_audited() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let (mut s, start) = started_one_shot(t0);
    s.cancel_run(t0, start.run).unwrap();
    let audits = audits_in(drain(&mut s, t0, None));
    assert!(
        audits
            .iter()
            .any(|a| a.actor == Actor::Operator && a.run == Some(start.run)),
        "no operator audit record for the cancel request: {audits:?}"
    );
}

/// Batch ids restart at 0 in every incarnation: a late acknowledgement of the previous
/// incarnation's batch 0 releases the new incarnation's attempt before its record is durable.
#[test]
fn batch_ids_are_unique_across_restores() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut old = Scheduler::new(Config::default(), 1, t0);
    old.add_job(
        t0,
        JobSpec::new(id("a"), "k", ScheduleSpec::Once { at: t0 }),
    )
    .unwrap();
    let Some(Effect::Persist(old_batch)) = old.poll_effect() else {
        panic!()
    };
    drop(old); // the process restarts in-place; the old write is still in flight in the store
    let mut new = Scheduler::restore(Config::default(), 1, t0, Snapshot::default());
    new.add_job(
        t0,
        JobSpec::new(id("b"), "k", ScheduleSpec::Once { at: t0 }),
    )
    .unwrap();
    new.handle_timeout(t0);
    let new_batch = std::iter::from_fn(|| new.poll_effect())
        .find_map(|e| match e {
            Effect::Persist(b) => Some(b),
            _ => None,
        })
        .unwrap();
    assert_ne!(
        old_batch.id, new_batch.id,
        "both incarnations emitted {}",
        new_batch.id
    );
}

// A command's writes may wait several batches behind a backlog (a batch holds at most
// BATCH_RECORDS_MAX records): a driver that answered "durable" at the next acknowledgement
// answered too early. `is_durable(write_mark())` is exact.
#[test]
fn a_write_mark_is_durable_only_once_its_batch_is_acknowledged() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let hourly = || ScheduleSpec::Cron {
        expr: "0 0 * * * *".into(),
        zone: "UTC".into(),
    };
    for i in 0..6_000 {
        let id = JobId::new(&format!("bulk-{i:05}")).unwrap();
        s.add_job(t0, JobSpec::new(id, "k", hourly())).unwrap();
    }
    let before = s.write_mark();
    let zz = JobId::new("zz-last").unwrap();
    s.add_job(t0, JobSpec::new(zz.clone(), "k", hourly()))
        .unwrap();
    let mark = s.write_mark();
    assert!(mark > before && !s.is_durable(mark));
    let mut written = false;
    let mut batches = 0;
    while let Some(effect) = s.poll_effect() {
        let Effect::Persist(batch) = effect else {
            continue;
        };
        batches += 1;
        let carries_zz = batch
            .records
            .iter()
            .any(|r| matches!(r, Record::PutJob(job) if job.spec.id == zz));
        assert!(
            !s.is_durable(mark),
            "durable before batch {batches} was acknowledged"
        );
        s.handle_persisted(t0, batch.id);
        written |= carries_zz;
        assert_eq!(
            s.is_durable(mark),
            written && !s.has_unwritten_changes(),
            "after batch {batches}"
        );
    }
    assert!(batches >= 2, "the backlog took {batches} batches");
    assert!(written && s.is_durable(mark));
}

/// SPEC L4: a success reported under a lease that was lost is refused, and recorded as evidence
/// in the audit trail without changing the run; the current holder's token is not "refused".
#[test]
fn a_result_refused_after_its_lease_was_lost_is_audited_as_evidence() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let (mut s, start) = started_one_shot(t0);
    let worker = start.lease.owner.clone();
    // The current holder's result is not a refused one.
    assert!(matches!(
        s.record_refused_result(t0, start.run, start.attempt, start.lease.token, &worker, ""),
        Err(Rejected::StaleToken { .. })
    ));
    assert!(!s.has_unwritten_changes());
    // The holder gives the lease up (lost); its late success is refused...
    s.release(t0, start.run, start.lease.token).unwrap();
    drain(&mut s, t0, None);
    let state = s.run(start.run).unwrap().state().name();
    let refused = s.handle_outcome(t0, start.run, start.lease.token, Outcome::ok());
    assert!(
        matches!(refused, Err(Rejected::StaleToken { .. })),
        "{refused:?}"
    );
    // ... and recorded as evidence.
    s.record_refused_result(
        t0.plus_ms(5),
        start.run,
        start.attempt,
        start.lease.token,
        &worker,
        "42 rows",
    )
    .unwrap();
    assert_eq!(
        s.run(start.run).unwrap().state().name(),
        state,
        "the run is unchanged"
    );
    let audits = audits_in(drain(&mut s, t0, None));
    assert_eq!(audits.len(), 1, "{audits:?}");
    let evidence = &audits[0];
    assert_eq!(evidence.run, Some(start.run));
    assert_eq!(evidence.attempt, Some(start.attempt));
    assert_eq!(evidence.fencing_token, Some(start.lease.token));
    assert_eq!((evidence.old, evidence.new), (Some(state), state));
    assert_eq!(evidence.actor, Actor::Worker(worker.to_string()));
    assert!(
        evidence.reason.starts_with("result refused: lease")
            && evidence
                .reason
                .ends_with("the run will execute again: 42 rows"),
        "{}",
        evidence.reason
    );
    assert!(matches!(
        s.record_refused_result(
            t0,
            RunId(999),
            start.attempt,
            start.lease.token,
            &worker,
            ""
        ),
        Err(Rejected::UnknownRun(_))
    ));
}

//! Pinned scenarios from SPEC sections 1 and 2, driven through the simulator. Each names the
//! production failure it guards against.

#![allow(clippy::unwrap_used)] // tests and examples state their expectations with unwrap

use keel_core::{
    Actor, ErrorKind, Job, JobId, JobSpec, JobState, MisfirePolicy, OverlapPolicy, Rejected,
    RetryPolicy, RunState, ScheduleSpec, Snapshot, StateName, Timestamp, Trigger,
};
use keel_testkit::{Execution, Faults, MemStore, Sim, SimConfig};

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

fn id(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

fn cron(expr: &str, zone: &str) -> ScheduleSpec {
    ScheduleSpec::Cron {
        expr: expr.into(),
        zone: zone.into(),
    }
}

fn spec(name: &str, kind: &str, schedule: ScheduleSpec) -> JobSpec {
    JobSpec::new(id(name), kind, schedule)
}

fn ticks(sim: &Sim) -> usize {
    sim.trace().iter().filter(|l| l.contains(" tick ")).count()
}

fn disabled_reason(job: Option<&Job>) -> String {
    match job.map(|j| &j.state) {
        Some(JobState::Disabled { reason }) => reason.clone(),
        other => panic!("expected a disabled job, found {other:?}"),
    }
}

/// A one-second heartbeat job keeps the scheduler ticking so "never fires again" is tested
/// against many ticks, not against an idle scheduler.
fn add_heartbeat(sim: &mut Sim) {
    sim.handle("noop", |_, _| Execution::succeed_after(1));
    sim.add_job(spec("heartbeat", "noop", cron("* * * * * *", "UTC")))
        .unwrap();
}

// Failure prevented: "a failed one-shot job re-fires every tick forever".
#[test]
fn one_shot_that_fails_permanently_never_fires_again() {
    let mut sim = Sim::new(SimConfig::new(1));
    add_heartbeat(&mut sim);
    sim.handle("bad", |_, _| {
        Execution::fail_permanently_after(10, "no such bucket")
    });
    let at = sim.wall().plus_ms(5 * SECOND);
    sim.add_job(spec("once", "bad", ScheduleSpec::Once { at }))
        .unwrap();

    sim.run_for(10_100 * SECOND);

    assert!(ticks(&sim) >= 10_000, "only {} ticks", ticks(&sim));
    let runs = sim.runs_of("once");
    assert_eq!(runs.len(), 1, "the one-shot fired {} times", runs.len());
    assert_eq!(runs[0].state(), RunState::FailedDropped);
    assert_eq!(runs[0].attempt().0, 1, "a permanent error is never retried");
    let error = runs[0].last_error().unwrap();
    assert_eq!(
        (error.kind, error.message.as_str()),
        (ErrorKind::Permanent, "no such bucket")
    );
    let reason = disabled_reason(sim.store().job(&id("once")));
    assert!(reason.contains("failed_dropped"), "{reason}");
}

#[test]
fn one_shot_that_exhausts_its_retries_never_fires_again() {
    let mut sim = Sim::new(SimConfig::new(2));
    add_heartbeat(&mut sim);
    sim.handle("flaky", |_, _| Execution::fail_after(10, "upstream 503"));
    let at = sim.wall().plus_ms(5 * SECOND);
    let mut once = spec("once", "flaky", ScheduleSpec::Once { at });
    once.retry.attempts_max = 4;
    sim.add_job(once).unwrap();

    sim.run_for(10_100 * SECOND);

    assert!(ticks(&sim) >= 10_000);
    let runs = sim.runs_of("once");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state(), RunState::Failed);
    assert_eq!(
        runs[0].attempt().0,
        4,
        "max_attempts includes the first attempt"
    );
    assert_eq!(runs[0].last_error().unwrap().message, "upstream 503");
    disabled_reason(sim.store().job(&id("once")));
}

#[test]
fn one_shot_with_delete_after_run_is_deleted_but_its_history_stays() {
    let mut sim = Sim::new(SimConfig::new(3));
    sim.handle("ok", |_, _| Execution::succeed_after(10));
    let mut once = spec(
        "once",
        "ok",
        ScheduleSpec::Once {
            at: sim.wall().plus_ms(SECOND),
        },
    );
    once.delete_after_run = true;
    sim.add_job(once).unwrap();
    sim.run_for(MINUTE);
    assert!(sim.store().job(&id("once")).is_none());
    assert!(sim.scheduler().job(&id("once")).is_none());
    let runs = sim.runs_of("once");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state(), RunState::Succeeded);
}

// SPEC R5: one settle transition for manual runs too.
#[test]
fn manual_run_of_a_one_shot_job_finishes_the_job() {
    let mut sim = Sim::new(SimConfig::new(4));
    sim.handle("ok", |_, _| Execution::succeed_after(10));
    let at = sim.wall().plus_ms(HOUR);
    sim.add_job(spec("once", "ok", ScheduleSpec::Once { at }))
        .unwrap();
    let run = sim
        .command("trigger", |s, now| s.trigger(now, &id("once")))
        .unwrap();
    sim.run_for(2 * HOUR);
    let runs = sim.runs_of("once");
    assert_eq!(
        runs.len(),
        1,
        "the scheduled slot must not fire after a manual run"
    );
    assert_eq!((runs[0].id(), runs[0].trigger()), (run, Trigger::Manual));
    disabled_reason(sim.store().job(&id("once")));
}

#[test]
fn recurring_job_advances_whatever_the_outcome() {
    let mut sim = Sim::new(SimConfig::new(5));
    sim.handle("bad", |_, _| {
        Execution::fail_permanently_after(10, "bad input")
    });
    sim.add_job(spec("hourly", "bad", cron("0 0 * * * *", "UTC")))
        .unwrap();
    sim.run_for(5 * HOUR + MINUTE);
    let runs = sim.runs_of("hourly");
    assert_eq!(runs.len(), 5);
    assert!(runs.iter().all(|r| r.state() == RunState::FailedDropped));
    let slots: Vec<_> = runs.iter().filter_map(|r| r.slot()).collect();
    let mut unique = slots.clone();
    unique.dedup();
    assert_eq!(slots, unique);
}

// SPEC S2: stored data that can no longer produce a next time disables the job, with a reason.
#[test]
fn job_whose_stored_zone_no_longer_exists_is_disabled_with_a_reason() {
    let mut store = MemStore::new();
    let _ = store.restore(); // the restored scheduler below becomes its writer
    let mut sim = Sim::new(SimConfig::new(6));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    sim.add_job(spec("legacy", "ok", cron("0 0 * * * *", "Europe/Kyiv")))
        .unwrap();
    sim.run_for(SECOND);
    // Rewrite the stored job as an older version might have left it: a zone that is gone.
    let mut job = sim.store().job(&id("legacy")).unwrap().clone();
    job.spec.schedule = cron("0 0 * * * *", "Europe/Atlantis");
    let snapshot = Snapshot {
        jobs: vec![job],
        runs: vec![],
        meta: sim.store().meta(),
        ..Snapshot::default()
    };
    let mut core = keel_core::Scheduler::restore(Default::default(), 1, sim.wall(), snapshot);
    while let Some(effect) = core.poll_effect() {
        if let keel_core::Effect::Persist(batch) = effect {
            store.apply(&batch);
            core.handle_persisted(sim.wall(), batch.id);
        }
    }
    let reason = disabled_reason(store.job(&id("legacy")));
    assert!(reason.contains("Europe/Atlantis"), "{reason}");
    let legacy = id("legacy");
    let audit: Vec<_> = store.audit_of(&legacy).collect();
    assert_eq!(audit.last().unwrap().new, StateName::Disabled);
    assert_eq!(audit.last().unwrap().actor, Actor::Scheduler);
    // Ten thousand ticks later it still has not run.
    for i in 0..10_000 {
        core.handle_timeout(sim.wall().plus_ms(i * SECOND));
    }
    assert!(core.runs().next().is_none());
}

#[test]
fn job_whose_stored_schedule_has_no_next_slot_is_disabled_when_it_fires() {
    let mut sim = Sim::new(SimConfig::new(7));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    sim.add_job(spec("feb", "ok", cron("0 0 0 * * *", "UTC")))
        .unwrap();
    sim.run_for(SECOND);
    // An older version stored a schedule that cannot fire again (30 February).
    let mut job = sim.store().job(&id("feb")).unwrap().clone();
    job.spec.schedule = cron("0 0 0 30 2 *", "UTC");
    let mut core = keel_core::Scheduler::restore(
        Default::default(),
        1,
        sim.wall(),
        Snapshot {
            jobs: vec![job],
            runs: vec![],
            meta: sim.store().meta(),
            ..Snapshot::default()
        },
    );
    let mut store = sim.store().clone();
    let _ = store.restore(); // the restored scheduler above becomes its writer
    let drain = |core: &mut keel_core::Scheduler, store: &mut MemStore, now| {
        while let Some(effect) = core.poll_effect() {
            if let keel_core::Effect::Persist(batch) = effect {
                store.apply(&batch);
                core.handle_persisted(now, batch.id);
            }
        }
    };
    drain(&mut core, &mut store, sim.wall());
    let first = core.job(&id("feb")).unwrap().next_fire().unwrap();
    core.handle_timeout(first);
    drain(&mut core, &mut store, first);
    let reason = disabled_reason(store.job(&id("feb")));
    assert!(reason.contains("no slot after"), "{reason}");
    // The stored cursor's slot fires once; after that nothing.
    let fired = core.runs().count();
    for i in 1..=10_000 {
        core.handle_timeout(first.plus_ms(i * SECOND));
    }
    assert_eq!(core.runs().count(), fired);
}

// SPEC S1: refused at registration, with the field named, never stored.
#[test]
fn bad_schedules_are_refused_at_registration() {
    let mut sim = Sim::new(SimConfig::new(8));
    let cases = [
        (cron("0 0 25 * * *", "UTC"), "hour"),
        (cron("0 0 * * *", "Nowhere/City"), "Nowhere/City"),
        (cron("0 0 0 30 2 *", "UTC"), "never fires"),
        (
            ScheduleSpec::Every {
                interval_ms: 0,
                anchor: Timestamp(0),
            },
            "interval",
        ),
    ];
    for (schedule, needle) in cases {
        let err = sim.add_job(spec("bad", "ok", schedule)).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(sim.scheduler().jobs().next().is_none());
    assert!(sim.store().jobs().next().is_none());
}

// SPEC S3, end to end: a daily job fires exactly once per local day across both 2026
// transitions in New York.
#[test]
fn daily_job_fires_once_per_day_across_both_dst_transitions() {
    for (start, expected) in [
        (
            "2026-03-06T12:00:00Z",
            [
                "2026-03-07T07:30:00Z", // 02:30 EST
                "2026-03-08T07:00:00Z", // 02:30 does not exist: 03:00 EDT
                "2026-03-09T06:30:00Z", // 02:30 EDT
            ],
        ),
        (
            "2026-10-30T12:00:00Z",
            [
                "2026-10-31T06:30:00Z", // 02:30 EDT
                "2026-11-01T07:30:00Z", // 02:30 EST (after the repeated hour)
                "2026-11-02T07:30:00Z",
            ],
        ),
    ] {
        let mut sim = Sim::new(SimConfig::new(9).start(ts(start)));
        sim.handle("ok", |_, _| Execution::succeed_after(1));
        sim.add_job(spec(
            "daily",
            "ok",
            cron("0 30 2 * * *", "America/New_York"),
        ))
        .unwrap();
        sim.run_for(3 * DAY);
        let slots: Vec<_> = sim
            .runs_of("daily")
            .iter()
            .filter_map(|r| r.slot())
            .collect();
        assert_eq!(slots, expected.map(ts).to_vec());
    }
    // And the repeated hour itself: 01:30 happens twice on 2026-11-01 but fires once.
    let mut sim = Sim::new(SimConfig::new(9).start(ts("2026-10-31T12:00:00Z")));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    sim.add_job(spec(
        "daily",
        "ok",
        cron("0 30 1 * * *", "America/New_York"),
    ))
    .unwrap();
    sim.run_for(DAY);
    let slots: Vec<_> = sim
        .runs_of("daily")
        .iter()
        .filter_map(|r| r.slot())
        .collect();
    assert_eq!(slots, vec![ts("2026-11-01T05:30:00Z")]);
}

// SPEC S4: a wall clock that jumps backwards never re-fires a slot that already fired.
#[test]
fn clock_jumping_back_an_hour_never_refires_a_slot() {
    let mut sim = Sim::new(SimConfig::new(10));
    sim.handle("ok", |_, _| Execution::succeed_after(10));
    sim.add_job(spec("quarter", "ok", cron("0 */15 * * * *", "UTC")))
        .unwrap();
    sim.run_for(HOUR + MINUTE); // fires at :15, :30, :45, 1:00
    assert_eq!(sim.runs_of("quarter").len(), 4);
    sim.jump_clock(-(HOUR as i64));
    sim.run_for(HOUR); // wall time replays 00:01 .. 01:01: nothing may fire again
    assert_eq!(sim.runs_of("quarter").len(), 4);
    sim.run_for(HOUR); // wall time 01:01 .. 02:01: new slots fire
    let slots: Vec<_> = sim
        .runs_of("quarter")
        .iter()
        .filter_map(|r| r.slot())
        .collect();
    assert_eq!(slots.len(), 8);
    assert!(slots.windows(2).all(|w| w[0] < w[1]), "{slots:?}");
}

fn jump_a_day(misfire: MisfirePolicy) -> Vec<Timestamp> {
    let mut sim = Sim::new(SimConfig::new(11));
    sim.handle("ok", |_, _| Execution::succeed_after(10));
    let mut hourly = spec("hourly", "ok", cron("0 0 * * * *", "UTC"));
    hourly.misfire = misfire;
    sim.add_job(hourly).unwrap();
    sim.run_for(90 * MINUTE); // fires at 01:00
    sim.jump_clock(DAY as i64); // wall: 01:30 the next day
    sim.run_for(10 * MINUTE);
    sim.runs_of("hourly")
        .iter()
        .filter_map(|r| r.slot())
        .collect()
}

// SPEC S4: misfire policies after a jump of a day; never an unbounded enumeration.
#[test]
fn clock_jumping_forward_a_day_applies_the_misfire_policy() {
    let base = ts("2026-01-01T01:00:00Z");
    let latest = ts("2026-01-02T01:00:00Z");
    assert_eq!(jump_a_day(MisfirePolicy::FireOnceNow), vec![base, latest]);
    assert_eq!(jump_a_day(MisfirePolicy::Skip), vec![base]);
    assert_eq!(
        jump_a_day(MisfirePolicy::CatchUp { max: 3 }),
        vec![
            base,
            ts("2026-01-01T23:00:00Z"),
            ts("2026-01-02T00:00:00Z"),
            latest
        ]
    );
}

fn overlap_slots(overlap: OverlapPolicy) -> Vec<u64> {
    let mut sim = Sim::new(SimConfig::new(12));
    // Each run takes 150 s; the job fires every minute.
    sim.handle("slow", |_, _| Execution::succeed_after(150 * SECOND));
    let mut job = spec("minutely", "slow", cron("0 * * * * *", "UTC"));
    job.overlap = overlap;
    sim.add_job(job).unwrap();
    sim.run_for(20 * MINUTE);
    let runs: Vec<_> = sim
        .runs_of("minutely")
        .into_iter()
        .filter(|r| r.slot().unwrap() <= ts("2026-01-01T00:06:00Z"))
        .collect();
    assert!(runs.iter().all(|r| r.state() == RunState::Succeeded));
    runs.iter()
        .map(|r| r.slot().unwrap().as_millis() as u64 % HOUR / MINUTE)
        .collect()
}

// SPEC S5: the overlap check and the run's creation are one transition. Slots every minute
// from 00:01; each run takes 2.5 minutes.
#[test]
fn overlap_policies() {
    // 1 runs to 3:30 (2 and 3 dropped); 4 runs to 6:30 (5 and 6 dropped).
    assert_eq!(overlap_slots(OverlapPolicy::Skip), vec![1, 4]);
    // 1 runs; 2 waits, 3 is dropped; 2 runs 3:30-6:00 while 4 waits and 5 is dropped; 6 comes
    // due a few milliseconds before 2 ends, finds 4 waiting, and is dropped.
    assert_eq!(overlap_slots(OverlapPolicy::BufferOne), vec![1, 2, 4]);
    assert_eq!(overlap_slots(OverlapPolicy::Allow), vec![1, 2, 3, 4, 5, 6]);
}

// SPEC R3: a retry is a timer, never a sleep.
#[test]
fn a_job_backing_off_never_delays_another_job() {
    let mut config = keel_core::Config::default();
    config.history.runs_max = 1_000;
    let mut sim = Sim::new(SimConfig::new(13).scheduler(config));
    sim.handle("flaky", |_, _| Execution::fail_after(1, "nope"));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    let mut flaky = spec("flaky", "flaky", cron("0 0 * * * *", "UTC"));
    flaky.retry = RetryPolicy {
        attempts_max: 5,
        backoff_base_ms: 10 * MINUTE,
        backoff_cap_ms: HOUR,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    sim.add_job(flaky).unwrap();
    sim.add_job(spec("tick", "ok", cron("0 * * * * *", "UTC")))
        .unwrap();
    sim.run_for(2 * HOUR + 15 * MINUTE + 30 * SECOND);
    // The minutely job ran on every slot, each attempt starting at its slot.
    let tick_runs = sim.runs_of("tick");
    assert_eq!(tick_runs.len(), 135);
    for run in &tick_runs {
        let started = sim
            .store()
            .audit_of_run(run.id())
            .find(|a| a.new == StateName::Running)
            .unwrap()
            .at;
        assert!(
            started.ms_since(run.slot().unwrap()) < 50,
            "{} started late",
            run.id()
        );
    }
    // Meanwhile the hourly job backed off for 10, 20, 40 minutes between attempts.
    let flaky = &sim.runs_of("flaky")[0];
    let starts: Vec<Timestamp> = sim
        .store()
        .audit_of_run(flaky.id())
        .filter(|a| a.new == StateName::Running)
        .map(|a| a.at)
        .collect();
    let gaps: Vec<u64> = starts
        .windows(2)
        .map(|w| w[1].ms_since(w[0]) / MINUTE)
        .collect();
    assert_eq!(gaps, vec![10, 20, 40]);
}

// Restore: a run found mid-attempt is retried (the lost attempt counts), or interrupted.
#[test]
fn crash_mid_attempt_retries_or_interrupts_by_policy() {
    for resume in [true, false] {
        let mut sim = Sim::new(SimConfig::new(14));
        sim.handle("long", |_, _| Execution::succeed_after(10 * MINUTE));
        let mut job = spec(
            "long",
            "long",
            ScheduleSpec::Once {
                at: sim.wall().plus_ms(SECOND),
            },
        );
        job.resume_after_crash = resume;
        sim.add_job(job).unwrap();
        sim.run_for(MINUTE);
        assert!(matches!(
            sim.runs_of("long")[0].state(),
            RunState::Running { .. }
        ));
        sim.crash();
        sim.check_liveness(HOUR);
        let run = &sim.runs_of("long")[0];
        if resume {
            assert_eq!(run.state(), RunState::Succeeded);
            assert_eq!(run.attempt().0, 2);
        } else {
            assert_eq!(run.state(), RunState::Interrupted);
            assert_eq!(run.last_error().unwrap().kind, ErrorKind::Interrupted);
        }
    }
}

#[test]
fn every_state_change_is_audited_with_actor_and_reason() {
    let mut sim = Sim::new(SimConfig::new(15));
    sim.handle("flaky", |start, _| {
        if start.attempt.0 == 1 {
            Execution::fail_after(5, "first try fails")
        } else {
            Execution::succeed_after(5)
        }
    });
    sim.add_job(spec(
        "job",
        "flaky",
        ScheduleSpec::Once {
            at: sim.wall().plus_ms(SECOND),
        },
    ))
    .unwrap();
    sim.run_for(MINUTE);
    let run = sim.runs_of("job")[0].id();
    let trail: Vec<(Option<StateName>, StateName)> = sim
        .store()
        .audit_of_run(run)
        .map(|a| (a.old, a.new))
        .collect();
    use StateName::*;
    assert_eq!(
        trail,
        vec![
            (None, Starting),
            (Some(Starting), Running),
            (Some(Running), BackingOff),
            (Some(BackingOff), Starting),
            (Some(Starting), Running),
            (Some(Running), Succeeded),
        ]
    );
    assert!(sim
        .store()
        .audit()
        .all(|a| !a.reason.is_empty() && a.seq > 0));
}

#[test]
fn history_is_pruned_by_count() {
    let mut config = keel_core::Config::default();
    config.history.runs_max = 5;
    let mut sim = Sim::new(SimConfig::new(16).scheduler(config));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    sim.add_job(spec("m", "ok", cron("0 * * * * *", "UTC")))
        .unwrap();
    sim.run_for(30 * MINUTE + 5 * SECOND);
    let runs = sim.runs_of("m");
    assert_eq!(runs.len(), 5);
    // The newest five are kept.
    assert_eq!(
        runs.last().unwrap().slot(),
        Some(ts("2026-01-01T00:30:00Z"))
    );
}

#[test]
fn refused_commands_change_nothing() {
    let mut sim = Sim::new(SimConfig::new(17));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    sim.add_job(spec("a", "ok", cron("0 * * * * *", "UTC")))
        .unwrap();
    sim.run_for(SECOND);
    let before = format!("{:?}", sim.scheduler().jobs().collect::<Vec<_>>());
    let batches = sim.store().batches_applied();
    assert!(matches!(
        sim.add_job(spec("a", "ok", cron("0 * * * * *", "UTC"))),
        Err(Rejected::JobExists(_))
    ));
    assert!(matches!(
        sim.command("resume", |s, now| s.resume_job(now, &id("a"))),
        Err(Rejected::NotPaused(_))
    ));
    assert!(matches!(
        sim.command("pause", |s, now| s.pause_job(now, &id("zzz"))),
        Err(Rejected::UnknownJob(_))
    ));
    let mut bad = spec("a", "ok", cron("0 * * * * *", "UTC"));
    bad.retry.attempts_max = 0;
    assert!(matches!(
        sim.command("update", |s, now| s.update_job(now, bad)),
        Err(Rejected::RetryPolicy(_))
    ));
    sim.run_for(1); // let anything stray be written
    assert_eq!(
        before,
        format!("{:?}", sim.scheduler().jobs().collect::<Vec<_>>())
    );
    assert_eq!(batches, sim.store().batches_applied());
}

#[test]
fn pause_and_resume_apply_the_misfire_policy_to_paused_slots() {
    let mut sim = Sim::new(SimConfig::new(18));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    sim.add_job(spec("m", "ok", cron("0 * * * * *", "UTC")))
        .unwrap();
    sim.run_for(90 * SECOND); // fires at 00:01
    sim.command("pause", |s, now| s.pause_job(now, &id("m")))
        .unwrap();
    sim.run_for(10 * MINUTE);
    assert_eq!(sim.runs_of("m").len(), 1);
    sim.command("resume", |s, now| s.resume_job(now, &id("m")))
        .unwrap();
    sim.run_for(20 * SECOND); // default fire-once-now: one run for the paused slots
    let slots: Vec<_> = sim.runs_of("m").iter().filter_map(|r| r.slot()).collect();
    assert_eq!(
        slots,
        vec![ts("2026-01-01T00:01:00Z"), ts("2026-01-01T00:11:00Z")]
    );
}

// The simulator's own promise: the same seed replays the same trace.
#[test]
fn same_seed_same_trace() {
    fn trace(seed: u64) -> Vec<String> {
        let mut sim = Sim::new(SimConfig::new(seed).faults(Faults::HOSTILE));
        sim.handle("mixed", |_, rng| match rng.below_inclusive(3) {
            0 => Execution::succeed_after(rng.below_inclusive(5_000)),
            1 => Execution::fail_after(100, "transient"),
            2 => Execution::fail_permanently_after(100, "permanent"),
            _ => Execution {
                takes_ms: 10,
                outcome: keel_core::Outcome::Snooze { for_ms: 30_000 },
            },
        });
        sim.add_job(spec("a", "mixed", cron("*/10 * * * * *", "UTC")))
            .unwrap();
        sim.add_job(spec("b", "mixed", cron("0 * * * * *", "America/New_York")))
            .unwrap();
        sim.run_for(HOUR);
        sim.check_liveness(HOUR);
        sim.trace().to_vec()
    }
    let first = trace(99);
    assert!(first.len() > 1_000);
    assert_eq!(first, trace(99));
    assert_ne!(first, trace(100));
}

#[test]
fn removing_and_re_adding_a_job_while_its_run_is_active_keeps_counts_straight() {
    let mut sim = Sim::new(SimConfig::new(19));
    sim.handle("slow", |_, _| Execution::succeed_after(10 * MINUTE));
    sim.add_job(spec("j", "slow", cron("0 * * * * *", "UTC")))
        .unwrap();
    sim.run_for(90 * SECOND); // the 00:01 run is active
    sim.command("remove", |s, now| s.remove_job(now, &id("j")))
        .unwrap();
    sim.add_job(spec("j", "slow", cron("0 * * * * *", "UTC")))
        .unwrap();
    assert_eq!(sim.scheduler().job(&id("j")).unwrap().active_runs, 1);
    sim.run_for(20 * MINUTE); // invariants are checked after every step
    sim.check_liveness(HOUR);
}

#[test]
fn editing_a_finished_one_shot_keeps_it_finished() {
    let mut sim = Sim::new(SimConfig::new(20));
    sim.handle("ok", |_, _| Execution::succeed_after(1));
    let once = spec(
        "once",
        "ok",
        ScheduleSpec::Once {
            at: sim.wall().plus_ms(SECOND),
        },
    );
    sim.add_job(once.clone()).unwrap();
    sim.run_for(MINUTE);
    let mut edited = once;
    edited.payload = "new payload".into();
    sim.command("update", |s, now| s.update_job(now, edited))
        .unwrap();
    sim.run_for(HOUR);
    assert_eq!(sim.runs_of("once").len(), 1);
    disabled_reason(sim.scheduler().job(&id("once")));
}

#[test]
fn catch_up_of_a_single_missed_slot_waits_for_the_active_run() {
    let mut sim = Sim::new(SimConfig::new(21));
    sim.handle("slow", |_, _| Execution::succeed_after(3 * HOUR));
    let mut job = spec("hourly", "slow", cron("0 0 * * * *", "UTC"));
    job.misfire = MisfirePolicy::CatchUp { max: 5 };
    sim.add_job(job).unwrap();
    sim.run_for(HOUR + MINUTE); // the 01:00 run is active until 04:00
    sim.jump_clock((HOUR + 10 * MINUTE) as i64); // wall 02:11: the 02:00 slot was missed
    sim.run_for(MINUTE);
    assert_eq!(sim.scheduler().job(&id("hourly")).unwrap().backlog.len(), 1);
    sim.run_for(4 * HOUR);
    let slots: Vec<_> = sim
        .runs_of("hourly")
        .iter()
        .filter_map(|r| r.slot())
        .collect();
    assert_eq!(
        slots[..2],
        [ts("2026-01-01T01:00:00Z"), ts("2026-01-01T02:00:00Z")]
    );
}

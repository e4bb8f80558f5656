use super::*;

fn every_minute(name: &str) -> JobSpec {
    JobSpec::new(
        JobId::new(name).unwrap(),
        "k",
        ScheduleSpec::Cron {
            expr: "0 * * * * *".into(),
            zone: "UTC".into(),
        },
    )
}

fn persist_batches(s: &mut Scheduler, now: Timestamp) -> Vec<Batch> {
    let mut batches = Vec::new();
    while let Some(effect) = s.poll_effect() {
        if let Effect::Persist(batch) = effect {
            s.handle_persisted(now, batch.id);
            batches.push(batch);
        }
    }
    batches
}

/// Acknowledges every write and finishes every attempt with success. Returns the number
/// of attempts started.
fn settle(s: &mut Scheduler, now: Timestamp) -> usize {
    let mut started = 0;
    while let Some(effect) = s.poll_effect() {
        match effect {
            Effect::Persist(batch) => s.handle_persisted(now, batch.id),
            Effect::StartAttempt(a) => {
                started += 1;
                s.handle_outcome(now, a.run, a.lease.token, Outcome::ok())
                    .unwrap();
            }
            _ => {}
        }
    }
    started
}

/// Acknowledges every write; returns the attempts started and the attempts asked to stop.
fn ack_all(s: &mut Scheduler, now: Timestamp) -> (Vec<AttemptStart>, Vec<RunId>) {
    let (mut started, mut stopped) = (Vec::new(), Vec::new());
    while let Some(effect) = s.poll_effect() {
        match effect {
            Effect::Persist(batch) => s.handle_persisted(now, batch.id),
            Effect::StartAttempt(a) => started.push(a),
            Effect::CancelAttempt { run, .. } => stopped.push(run),
            _ => {}
        }
    }
    (started, stopped)
}

/// The start of minute `k` after 2026-01-01T00:01:00Z.
fn minute(k: usize) -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:01:00Z")
        .unwrap()
        .plus_ms(k as u64 * 60_000)
}

/// Success, or a permanent failure with `message`.
fn ok_or_permanent(ok: bool, message: &str) -> Outcome {
    if ok {
        Outcome::ok()
    } else {
        Outcome::Permanent {
            message: message.into(),
        }
    }
}

/// A scheduler running two one-shot attempts of a job with one attempt in all: one its own,
/// one an external worker's.
fn shutdown_world() -> (Scheduler, Timestamp, AttemptStart, Claimed) {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let at = t0.plus_ms(1_000);
    let own =
        JobSpec::new(JobId::new("own").unwrap(), "k", ScheduleSpec::once(at)).with_attempts(1);
    let ext = JobSpec::new(JobId::new("ext").unwrap(), "x", ScheduleSpec::once(at))
        .with_attempts(1)
        .for_external_workers();
    s.add_job(t0, own).unwrap();
    s.add_job(t0, ext).unwrap();
    ack_all(&mut s, t0);
    s.handle_timeout(at);
    let (started, _) = ack_all(&mut s, at);
    let worker = WorkerId::new("w").unwrap();
    let claimed = s.claim(at, &worker, &["x"]).unwrap().unwrap();
    ack_all(&mut s, at);
    (s, at, started.into_iter().next().unwrap(), claimed)
}

#[test]
fn a_graceful_shutdown_lets_attempts_finish_and_stops_only_its_own_late() {
    let (mut s, at, own, ext) = shutdown_world();
    let shutdown = s.begin_shutdown(at);
    assert_eq!(
        shutdown.attempts,
        vec![(own.run, own.attempt)],
        "its own only"
    );
    let (_, stopped) = ack_all(&mut s, at);
    assert!(stopped.is_empty(), "attempts keep their budget to finish");
    // Near the end of the budget, its own attempt is asked to stop; the worker's is not.
    let late = at.plus_ms(7_500);
    assert_eq!(s.stop_for_shutdown(late), vec![(own.run, own.attempt)]);
    assert_eq!(ack_all(&mut s, late).1, vec![own.run]);
    // Stopped, the handler reports a failure: that is the shutdown's doing.
    let failed = Outcome::Retryable {
        message: "asked to stop".into(),
    };
    s.handle_outcome(late, own.run, own.lease.token, failed)
        .unwrap();
    ack_all(&mut s, late);
    let run = s.run(own.run).unwrap();
    assert_eq!(run.state, RunState::BackingOff { until: late });
    assert_eq!(
        (run.shutdowns, run.attempts_counted()),
        (1, 0),
        "no attempt used"
    );
    assert!(run
        .last_error
        .as_ref()
        .is_some_and(|e| e.message.contains("stopped by a shutdown")));
    let ext_run = s.run(ext.run).unwrap();
    assert!(matches!(ext_run.state, RunState::Running { .. }));
    // A retry waits for the next start.
    s.handle_timeout(late.plus_ms(60_000));
    assert!(ack_all(&mut s, late.plus_ms(60_000)).0.is_empty());
    s.check_invariants();
}

#[test]
fn a_success_after_the_stop_stands_and_the_budget_end_interrupts_the_rest() {
    let (mut s, at, own, _) = shutdown_world();
    s.begin_shutdown(at);
    s.stop_for_shutdown(at);
    ack_all(&mut s, at);
    s.handle_outcome(at, own.run, own.lease.token, Outcome::ok())
        .unwrap();
    assert_eq!(s.run(own.run).map(|r| r.state), Some(RunState::Succeeded));

    let (mut s, at, own, ext) = shutdown_world();
    s.begin_shutdown(at);
    let end = at.plus_ms(10_000);
    assert_eq!(s.end_shutdown(end), vec![own.run]);
    ack_all(&mut s, end);
    let run = s.run(own.run).unwrap();
    assert_eq!(
        (run.state, run.shutdowns),
        (RunState::BackingOff { until: end }, 1)
    );
    // The abandoned attempt's late word is refused: its lease ended with the shutdown.
    let late = s.handle_outcome(end, own.run, own.lease.token, Outcome::ok());
    assert!(late.is_err(), "{late:?}");
    assert!(matches!(
        s.run(ext.run).unwrap().state,
        RunState::Running { .. }
    ));
    s.check_invariants();
}

#[test]
fn a_cancelled_run_stopped_by_a_shutdown_ends_cancelled() {
    let (mut s, at, own, _) = shutdown_world();
    s.cancel_run(at, own.run).unwrap();
    s.begin_shutdown(at);
    s.end_shutdown(at);
    assert_eq!(s.run(own.run).map(|r| r.state), Some(RunState::Cancelled));
    s.check_invariants();
}

#[test]
fn a_job_failing_in_a_row_raises_one_incident_that_its_next_success_resolves() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let other = every_minute("other").with_attempts(1);
    s.add_job(t0, every_minute("check").with_attempts(1))
        .unwrap();
    s.add_job(t0, other).unwrap();
    ack_all(&mut s, t0);
    let id = JobId::new("check").unwrap();
    let failing = |s: &Scheduler| {
        s.incidents()
            .filter(|i| i.kind == IncidentKind::FailingJob)
            .map(|i| i.job.clone().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // Minute k: "check" ends as `outcomes[k]`, "other" fails every time.
    let outcomes = [false, false, false, false, true, false];
    let mut opened_at = Vec::new();
    for (k, ok) in outcomes.into_iter().enumerate() {
        let minute = minute(k);
        s.handle_timeout(minute);
        let (started, _) = ack_all(&mut s, minute);
        for a in started {
            let outcome = ok_or_permanent(ok && a.job == id, "exit 1");
            s.handle_outcome(minute, a.run, a.lease.token, outcome)
                .unwrap();
        }
        ack_all(&mut s, minute);
        let job = s.job(&id).unwrap();
        let last = job.last_run.as_ref().unwrap();
        assert_eq!(last.finished_at, minute);
        opened_at.push((job.failures_in_a_row, failing(&s)));
    }
    let check = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(
        opened_at,
        vec![
            (1, check(&[])),
            (2, check(&[])),
            (3, check(&["check", "other"])),
            (4, check(&["check", "other"])),
            (0, check(&["other"])),
            (1, check(&["other"])),
        ],
        "one incident per failing job, from the third failure, until a success"
    );
    let resolved = s.incidents().count();
    assert_eq!(resolved, 1, "the resolved one left the open set");
    s.check_invariants();
}

#[test]
fn a_job_notifying_on_failure_delivers_its_failures_only() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let job = every_minute("check")
        .with_attempts(1)
        .with_sinks(["ops"])
        .with_notify_on(NotifyOn::Failure);
    s.add_job(t0, job).unwrap();
    ack_all(&mut s, t0);
    let mut delivered = Vec::new();
    for (k, ok) in [true, false, true].into_iter().enumerate() {
        let minute = minute(k);
        s.handle_timeout(minute);
        for a in ack_all(&mut s, minute).0 {
            let outcome = ok_or_permanent(ok, "down");
            s.handle_outcome(minute, a.run, a.lease.token, outcome)
                .unwrap();
        }
        while let Some(effect) = s.poll_effect() {
            match effect {
                Effect::Persist(batch) => s.handle_persisted(minute, batch.id),
                Effect::Deliver(request) => {
                    delivered.extend(request.payload.run_result().map(|r| r.state))
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        delivered,
        vec![StateName::FailedDropped],
        "the failure only"
    );
    assert!(NotifyOn::Always.delivers(StateName::Succeeded));
    assert!(!NotifyOn::Failure.delivers(StateName::Cancelled));
    assert!(NotifyOn::Failure.delivers(StateName::Interrupted));
}

#[test]
fn the_schedule_and_job_helpers_build_what_the_fields_would() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:02:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let id = |name: &str| JobId::new(name).unwrap();
    let five_minutes = std::time::Duration::from_secs(300);
    let spec = JobSpec::new(id("grid"), "k", ScheduleSpec::every(five_minutes))
        .with_payload("p")
        .with_attempts(4)
        .with_timeout(std::time::Duration::from_secs(30))
        .with_sinks(["log"]);
    assert_eq!(
        (&*spec.payload, spec.retry.attempts_max, spec.timeout_ms),
        ("p", 4, Some(30_000))
    );
    assert_eq!(&*spec.sinks, &[Arc::<str>::from("log")]);
    s.add_job(t0, spec).unwrap();
    let next = |s: &Scheduler, name: &str| s.job(&id(name)).unwrap().next_fire();
    let at = |t: &str| Some(Timestamp::parse_rfc3339(t).unwrap());
    assert_eq!(
        next(&s, "grid"),
        at("2026-01-01T00:05:00Z"),
        "on the epoch grid"
    );
    s.add_job(
        t0,
        JobSpec::new(id("cron"), "k", ScheduleSpec::cron("*/10 * * * *")),
    )
    .unwrap();
    assert_eq!(next(&s, "cron"), at("2026-01-01T00:10:00Z"));
    let paris = ScheduleSpec::cron_in("0 0 9 * * *", "Europe/Paris");
    s.add_job(t0, JobSpec::new(id("paris"), "k", paris))
        .unwrap();
    assert_eq!(next(&s, "paris"), at("2026-01-01T08:00:00Z"));
    let once = ScheduleSpec::once(t0.plus_ms(1_000));
    s.add_job(t0, JobSpec::new(id("once"), "k", once).deleted_after_run())
        .unwrap();
    assert_eq!(next(&s, "once"), Some(t0.plus_ms(1_000)));
    assert!(s.job(&id("once")).unwrap().spec.delete_after_run);
}

#[test]
fn ensure_adds_updates_or_leaves_a_job_and_says_which() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let spec = every_minute("report");
    assert_eq!(s.ensure_job(t0, spec.clone()), Ok(Ensured::Added));
    assert_eq!(s.ensure_job(t0, spec.clone()), Ok(Ensured::Unchanged));
    let mut changed = spec.clone();
    changed.payload = "v2".into();
    assert_eq!(s.ensure_job(t0, changed.clone()), Ok(Ensured::Updated));
    assert_eq!(s.job(&spec.id).unwrap().spec, changed);
    assert_eq!(s.ensure_job(t0, changed), Ok(Ensured::Unchanged));
    let mut bad = every_minute("bad");
    bad.schedule = ScheduleSpec::Cron {
        expr: "nope".into(),
        zone: "UTC".into(),
    };
    assert!(matches!(s.ensure_job(t0, bad), Err(Rejected::Schedule(_))));
    settle(&mut s, t0);
    s.check_invariants();
}

#[test]
fn a_listing_in_pages_gives_each_job_once_in_id_order() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    for name in ["e", "a", "d", "b", "c", "f"] {
        s.add_job(t0, every_minute(name)).unwrap();
    }
    for page in [1, 2, 3, 4, 6, 7] {
        let mut listed = Vec::new();
        let mut after: Option<JobId> = None;
        let mut steps = 0;
        loop {
            let taken: Vec<JobId> = s
                .shared_jobs_after(after.as_ref())
                .take(page)
                .map(|job| job.spec.id.clone())
                .collect();
            steps += 1;
            after = taken.last().cloned().or(after);
            let last = taken.len() < page;
            listed.extend(taken);
            if last {
                break;
            }
        }
        let names: Vec<&str> = listed.iter().map(JobId::as_str).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e", "f"], "pages of {page}");
        // An exact multiple of the page ends with one empty step.
        assert_eq!(steps, 6 / page + 1, "pages of {page}");
    }
    assert_eq!(s.job_count(), 6);
}

#[test]
fn ensure_leaves_a_fired_one_shot_done_whatever_its_new_instant() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    // "In five seconds", computed at each start of the application.
    let in_5s = |now: Timestamp| {
        JobSpec::new(
            JobId::new("welcome").unwrap(),
            "k",
            ScheduleSpec::Once {
                at: now.plus_ms(5_000),
            },
        )
    };
    assert_eq!(s.ensure_job(t0, in_5s(t0)), Ok(Ensured::Added));
    // Before it fires, a new instant moves it.
    let t1 = t0.plus_ms(1_000);
    assert_eq!(s.ensure_job(t1, in_5s(t1)), Ok(Ensured::Updated));
    settle(&mut s, t1);
    let fired_at = t1.plus_ms(5_000);
    s.handle_timeout(fired_at);
    assert_eq!(settle(&mut s, fired_at), 1);
    let t2 = fired_at.plus_ms(60_000);
    let done = Ok(Ensured::Done { last: fired_at });
    assert_eq!(s.ensure_job(t2, in_5s(t2)), done);
    // Deleted, its tombstone still says it fired.
    s.remove_job(t2, &JobId::new("welcome").unwrap()).unwrap();
    assert_eq!(s.ensure_job(t2, in_5s(t2)), done);
    s.handle_timeout(t2.plus_ms(10_000));
    assert_eq!(settle(&mut s, t2.plus_ms(10_000)), 0, "fired once in total");
    // A recurring job under a fired name is not a one-shot: it is added.
    assert_eq!(
        s.ensure_job(t2, every_minute("welcome")),
        Ok(Ensured::Added)
    );
    s.check_invariants();
}

/// Slot claims go with their runs when the history policy prunes them, so a deleted job's
/// tombstone is what remembers its fired slot: it outlives the history's age, and a one-shot
/// added again under its name long after is still done, not fired again.
#[test]
fn a_deleted_one_shot_is_remembered_after_its_history_has_aged_out() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let config = Config {
        history: crate::audit::HistoryPolicy {
            runs_max: 1,
            age_max_ms: 60_000,
        },
        ..Config::default()
    };
    let mut s = Scheduler::new(config, 1, t0);
    let at = t0.plus_ms(5_000);
    let mut once = JobSpec::new(
        JobId::new("welcome").unwrap(),
        "k",
        ScheduleSpec::Once { at },
    );
    once.delete_after_run = true;
    s.add_job(t0, once.clone()).unwrap();
    settle(&mut s, t0);
    s.handle_timeout(at);
    assert_eq!(settle(&mut s, at), 1);
    assert!(s.job(&once.id).is_none(), "deleted after its run");
    // Two history sweeps later, far past the history's age.
    let later = at.plus_ms(3 * limits::HISTORY_SWEEP_INTERVAL_MS);
    s.handle_timeout(at.plus_ms(limits::HISTORY_SWEEP_INTERVAL_MS + 1));
    settle(&mut s, later);
    s.handle_timeout(later);
    settle(&mut s, later);
    assert_eq!(
        s.ensure_job(later, once.clone()),
        Ok(Ensured::Done { last: at })
    );
    assert!(matches!(
        s.add_job(later, once),
        Err(Rejected::AlreadyFired { .. })
    ));
    s.handle_timeout(later.plus_ms(10_000));
    assert_eq!(
        settle(&mut s, later.plus_ms(10_000)),
        0,
        "fired once in total"
    );
    s.check_invariants();
}

#[test]
fn batches_are_bounded_and_never_split_a_firing() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    let jobs = 3 * limits::BATCH_RECORDS_MAX;
    for i in 0..jobs {
        s.add_job(t0, every_minute(&format!("job-{i:05}"))).unwrap();
    }
    let batches = persist_batches(&mut s, t0);
    assert!(batches.len() >= 3, "{} batches", batches.len());
    // Each job group is 2 records (the job and its audit record); a batch stops at the
    // first group that reaches the bound, and carries the counters.
    for batch in &batches {
        assert!(batch.records.len() <= limits::BATCH_RECORDS_MAX + 2 + 1);
        assert!(matches!(batch.records.last(), Some(Record::PutMeta(_))));
    }
    // Every job fires at 00:01: each batch that carries a fired job's new cursor also
    // carries the run it fired.
    let t1 = Timestamp::parse_rfc3339("2026-01-01T00:01:00Z").unwrap();
    s.handle_timeout(t1);
    let batches = persist_batches(&mut s, t1);
    assert!(batches.len() >= 3);
    for batch in &batches {
        let jobs: BTreeSet<&JobId> = batch
            .records
            .iter()
            .filter_map(|r| match r {
                Record::PutJob(job) => Some(&job.spec.id),
                _ => None,
            })
            .collect();
        let run_jobs: BTreeSet<&JobId> = batch
            .records
            .iter()
            .filter_map(|r| match r {
                Record::PutRun(run) => Some(&run.job),
                _ => None,
            })
            .collect();
        // Runs may also appear alone (their next transition), but a moved cursor never
        // travels without the run it fired.
        let split = jobs.difference(&run_jobs).count();
        assert_eq!(
            split, 0,
            "{split} jobs persisted without the run they fired"
        );
    }
}

#[test]
fn after_a_timeout_the_next_deadline_is_in_the_future() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
    let mut s = Scheduler::new(Config::default(), 1, t0);
    s.add_job(t0, every_minute("a")).unwrap();
    let mut now = t0;
    for _ in 0..100 {
        persist_batches(&mut s, now);
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        assert!(s.poll_timeout().unwrap() > now);
    }
}

//! The run machine's unit tests, and the proof that a run is stored as its record.

use super::*;

#[test]
fn an_error_kind_displays_as_it_is_stored_and_an_error_says_its_attempt() {
    // `ALL` is every kind: a new one fails to compile here until it is listed.
    for kind in ErrorKind::ALL {
        match kind {
            ErrorKind::Retryable
            | ErrorKind::Permanent
            | ErrorKind::Interrupted
            | ErrorKind::Cancelled
            | ErrorKind::DeadlineExceeded
            | ErrorKind::SnoozeLimit
            | ErrorKind::Lost
            | ErrorKind::TimedOut
            | ErrorKind::Poison => {}
        }
        let stored = serde_json::to_value(kind).unwrap();
        assert_eq!(stored.as_str(), Some(kind.to_string().as_str()));
    }
    let error = RunError {
        kind: ErrorKind::Retryable,
        message: "upstream 503".into(),
        attempt: Attempt(2),
        at: Timestamp(0),
    };
    assert_eq!(error.to_string(), "attempt 2, retryable: upstream 503");
}

/// A manual run 1 of job `j` under `terms`, created at time 0: the unit tests' fixture.
pub(crate) fn manual_run(terms: RunTerms) -> Run {
    Run::new(
        RunId(1),
        JobId::new("j").unwrap(),
        Trigger::Manual,
        Timestamp(0),
        terms,
    )
}

fn running_run(policy: RetryPolicy) -> Run {
    let mut run = manual_run(RunTerms {
        retry: policy,
        ..RunTerms::new("k")
    });
    run.mark_running(Timestamp(0), 30_000, 3);
    run
}

fn retryable() -> Outcome {
    Outcome::Retryable {
        message: "boom".into(),
    }
}

#[test]
fn retryable_errors_back_off_then_fail_with_the_last_error() {
    let mut rng = SplitMix64::new(0);
    let mut run = running_run(RetryPolicy {
        attempts_max: 2,
        ..RetryPolicy::default()
    });
    let t = run.apply_outcome(Timestamp(10), retryable(), &mut rng);
    assert_eq!(t.new, StateName::BackingOff);
    run.begin_next_attempt(Timestamp(0));
    run.mark_running(Timestamp(2_000), 30_000, 3);
    let t = run.apply_outcome(
        Timestamp(2_010),
        Outcome::Retryable {
            message: "boom 2".into(),
        },
        &mut rng,
    );
    assert_eq!((t.old, t.new), (StateName::Running, StateName::Failed));
    let err = run.last_error.unwrap();
    assert_eq!(err.message, "boom 2");
    assert_eq!(err.attempt, Attempt(2));
    assert_eq!(run.finished_at, Some(Timestamp(2_010)));
}

#[test]
fn permanent_error_is_never_retried() {
    let mut run = running_run(RetryPolicy::default());
    let t = run.apply_outcome(
        Timestamp(1),
        Outcome::Permanent {
            message: "no such bucket".into(),
        },
        &mut SplitMix64::new(0),
    );
    assert_eq!(t.new, StateName::FailedDropped);
    assert_eq!(run.last_error.unwrap().kind, ErrorKind::Permanent);
}

#[test]
fn snooze_does_not_use_an_attempt() {
    let mut run = running_run(RetryPolicy {
        attempts_max: 1,
        ..RetryPolicy::default()
    });
    let mut rng = SplitMix64::new(0);
    run.apply_outcome(Timestamp(0), Outcome::Snooze { for_ms: 500 }, &mut rng);
    assert_eq!(
        run.state,
        RunState::BackingOff {
            until: Timestamp(500)
        }
    );
    run.begin_next_attempt(Timestamp(0));
    run.mark_running(Timestamp(500), 30_000, 3);
    assert_eq!(run.attempt, Attempt(2));
    assert_eq!(run.attempts_counted(), 1);
    // The only counted attempt now fails: attempts_max 1 means no retry.
    let t = run.apply_outcome(Timestamp(600), retryable(), &mut rng);
    assert_eq!(t.new, StateName::Failed);
}

#[test]
fn failure_after_cancel_request_is_cancelled_not_retried() {
    let mut run = running_run(RetryPolicy::default());
    assert!(run.cancel(Timestamp(1), "operator").is_none());
    let t = run.apply_outcome(Timestamp(2), retryable(), &mut SplitMix64::new(0));
    assert_eq!(t.new, StateName::Cancelled);
}

#[test]
fn crashes_use_the_lost_attempt_budget_then_the_run_is_poison() {
    let mut run = running_run(RetryPolicy {
        attempts_max: 2,
        lost_attempts_max: 3,
        ..RetryPolicy::default()
    });
    // Lost attempts do not count against attempts_max: three crashes in a row are
    // survived twice, and the third makes the run poison.
    for crash in 1..=2 {
        let t = run.recover_after_crash(Timestamp(crash));
        assert_eq!(t.new, StateName::BackingOff, "crash {crash}");
        assert_eq!(run.attempts_counted(), 0);
        run.begin_next_attempt(Timestamp(crash));
        run.mark_running(Timestamp(crash), 30_000, 3);
    }
    let t = run.recover_after_crash(Timestamp(9));
    assert_eq!(t.new, StateName::FailedDropped);
    assert!(t.reason.contains("poison"), "{}", t.reason);
    assert_eq!(run.last_error.unwrap().kind, ErrorKind::Poison);
}

#[test]
#[should_panic(expected = "left terminal state")]
fn terminal_states_have_no_way_out() {
    let mut run = running_run(RetryPolicy::default());
    let mut rng = SplitMix64::new(0);
    run.apply_outcome(Timestamp(0), Outcome::ok(), &mut rng);
    run.apply_outcome(Timestamp(1), retryable(), &mut rng);
}

#[test]
fn terminal_states_serialise_in_snake_case() {
    let names: Vec<String> = [
        RunState::Succeeded,
        RunState::Failed,
        RunState::FailedDropped,
        RunState::Cancelled,
        RunState::Interrupted,
    ]
    .iter()
    .map(|s| serde_json::to_string(&s.name()).unwrap())
    .collect();
    assert_eq!(
        names,
        [
            "\"succeeded\"",
            "\"failed\"",
            "\"failed_dropped\"",
            "\"cancelled\"",
            "\"interrupted\""
        ]
    );
}

#[test]
fn long_messages_are_truncated_on_a_char_boundary() {
    let long = "é".repeat(limits::MESSAGE_MAX_BYTES);
    let t = truncate(&long);
    assert!(t.len() <= limits::MESSAGE_MAX_BYTES + "…".len());
    assert!(t.ends_with('…'));
}

/// A stored run with every field away from its default, so that a field serialized
/// differently by `Run` and `RunRecord` shows. The literal is exhaustive: a new field must
/// be added here.
fn full_record() -> RunRecord {
    RunRecord {
        id: RunId(42),
        job: JobId::new("backup").unwrap(),
        trigger: Trigger::Scheduled {
            slot: Timestamp(60_000),
        },
        created_at: Timestamp(60_001),
        attempt: Attempt(3),
        snoozes: 1,
        state: RunState::Running {
            attempt: Attempt(3),
            started_at: Timestamp(70_000),
        },
        last_error: Some(Box::new(RunError {
            kind: ErrorKind::Retryable,
            message: "upstream 503".into(),
            attempt: Attempt(2),
            at: Timestamp(65_000),
        })),
        summary: Some("half".into()),
        cancel_requested: true,
        finished_at: Some(Timestamp(90_000)),
        retry: RetryPolicy {
            attempts_max: 5,
            backoff_factor: 1.7,
            jitter: 0.1,
            deadline_ms: Some(3_600_000),
            ..RetryPolicy::default()
        },
        resume_after_crash: true,
        kind: "copy".into(),
        payload: "{\"from\": \"a\"}".into(),
        of_one_shot: Some(Timestamp(60_000)),
        external: true,
        timeout_ms: Some(30_000),
        required_artifacts: vec!["report".to_string()].into(),
        sinks: vec![Arc::from("mail")].into(),
        lease: Some(Lease {
            owner: crate::WorkerId::new("w1").unwrap(),
            token: FencingToken(9),
            renewed_at: Timestamp(70_000),
            expires_at: Timestamp(100_000),
        }),
        last_token: Some(FencingToken(8)),
        lost: 1,
        shutdowns: 2,
        progress: Some(Box::new(Progress {
            phase: "upload".into(),
            message: "40 of 100".into(),
            at: Timestamp(75_000),
        })),
        last_activity: Some(Timestamp(75_000)),
        artifacts: BTreeMap::from([("report".to_string(), "s3://r".to_string())]),
        watch: Watch {
            timeout_at: Some(Timestamp(100_000)),
            kill_at: Some(Timestamp(110_000)),
            backstop_at: Some(Timestamp(200_000)),
            stuck_reported: true,
        },
        extended: true,
        killed: Some(Attempt(2)),
        checkpoint: Some(Box::new(Checkpoint {
            seq: 4,
            attempt: Attempt(3),
            saved_at: Timestamp(74_000),
            data: "copied 40".into(),
        })),
        verifications: vec![crate::artifact::Verification {
            name: Some("report".into()),
            target: "https://r/x".into(),
            kind: crate::artifact::TargetKind::Url,
            ok: false,
            status: Some(404),
            error: None,
            excerpt: "gone".into(),
            attempt: Attempt(3),
            at: Timestamp(76_000),
        }],
        handed_back: 1,
        released_lease: Some(ReleasedLease {
            owner: crate::WorkerId::new("w0").unwrap(),
            token: FencingToken(7),
            attempt: Attempt(2),
            at: Timestamp(69_000),
            reclaimed: false,
        }),
    }
}

/// The store format is `RunRecord`'s serde shape, and `Run` serializes exactly as it did
/// before `RunRecord` existed: both must give the same bytes, field order included.
#[test]
fn record_and_run_serialize_alike() {
    let mut fresh = running_run(RetryPolicy::default()).record();
    fresh.state = RunState::Queued {
        since: Timestamp(0),
    };
    // `fresh` leaves the skipped-when-default fields (`last_token`, `shutdowns`) at their
    // defaults, `full_record` sets every field.
    for record in [fresh, full_record()] {
        let run = Run::from_record(record.clone());
        let from_run = serde_json::to_string(&run).unwrap();
        assert_eq!(from_run, serde_json::to_string(&record).unwrap());
        assert_eq!(
            serde_json::to_string_pretty(&run).unwrap(),
            serde_json::to_string_pretty(&record).unwrap()
        );
    }
    let fresh = serde_json::to_value(running_run(RetryPolicy::default())).unwrap();
    assert!(fresh.get("last_token").is_none() && fresh.get("shutdowns").is_none());
}

/// The stored bytes of a run, pinned: a change here is a store format change (a new format
/// version and a migration, see the module docs).
#[test]
fn the_stored_form_of_a_run_is_pinned() {
    let golden = concat!(
        r#"{"#,
        r#""id":42,"#,
        r#""job":"backup","#,
        r#""trigger":{"trigger":"scheduled","slot":60000},"#,
        r#""created_at":60001,"#,
        r#""attempt":3,"#,
        r#""snoozes":1,"#,
        r#""state":{"state":"running","attempt":3,"started_at":70000},"#,
        r#""last_error":{"kind":"retryable","message":"upstream 503","attempt":2,"at":65000},"#,
        r#""summary":"half","#,
        r#""cancel_requested":true,"#,
        r#""finished_at":90000,"#,
        r#""retry":{"attempts_max":5,"backoff_base_ms":1000,"backoff_factor":1.7,"backoff_cap_ms":300000,"jitter":0.1,"deadline_ms":3600000,"lost_attempts_max":3},"#,
        r#""resume_after_crash":true,"#,
        r#""kind":"copy","#,
        r#""payload":"{\"from\": \"a\"}","#,
        r#""of_one_shot":60000,"#,
        r#""external":true,"#,
        r#""timeout_ms":30000,"#,
        r#""required_artifacts":["report"],"#,
        r#""sinks":["mail"],"#,
        r#""lease":{"owner":"w1","token":9,"renewed_at":70000,"expires_at":100000},"#,
        r#""last_token":8,"#,
        r#""lost":1,"#,
        r#""shutdowns":2,"#,
        r#""progress":{"phase":"upload","message":"40 of 100","at":75000},"#,
        r#""last_activity":75000,"#,
        r#""artifacts":{"report":"s3://r"},"#,
        r#""watch":{"timeout_at":100000,"kill_at":110000,"backstop_at":200000,"stuck_reported":true},"#,
        r#""extended":true,"#,
        r#""killed":2,"#,
        r#""checkpoint":{"seq":4,"attempt":3,"saved_at":74000,"data":"copied 40"},"#,
        r#""verifications":[{"name":"report","target":"https://r/x","kind":"url","ok":false,"status":404,"error":null,"excerpt":"gone","attempt":3,"at":76000}],"#,
        r#""handed_back":1,"#,
        r#""released_lease":{"owner":"w0","token":7,"attempt":2,"at":69000,"reclaimed":false}"#,
        r#"}"#,
    );
    assert_eq!(serde_json::to_string(&full_record()).unwrap(), golden);
    assert_eq!(
        serde_json::from_str::<RunRecord>(golden).unwrap(),
        full_record()
    );
}

/// Both read the same bytes to the same run, including a record written before the
/// defaulted fields existed.
#[test]
fn record_and_run_read_alike_and_round_trip() {
    let record = full_record();
    let run = Run::from_record(record.clone());
    assert_eq!(run.record(), record);
    assert_eq!(RunRecord::from(run.clone()), record);
    assert_eq!(Run::from(record.clone()), run);

    let json = serde_json::to_string(&run).unwrap();
    assert_eq!(serde_json::from_str::<Run>(&json).unwrap(), run);
    assert_eq!(serde_json::from_str::<RunRecord>(&json).unwrap(), record);

    // An old record: only the fields without `#[serde(default)]`.
    let mut old = serde_json::to_value(&record).unwrap();
    let fields = old.as_object_mut().unwrap();
    for defaulted in [
        "payload",
        "of_one_shot",
        "external",
        "timeout_ms",
        "required_artifacts",
        "sinks",
        "lease",
        "last_token",
        "lost",
        "shutdowns",
        "progress",
        "last_activity",
        "artifacts",
        "watch",
        "extended",
        "killed",
        "checkpoint",
        "verifications",
        "handed_back",
        "released_lease",
    ] {
        assert!(fields.remove(defaulted).is_some(), "{defaulted}");
    }
    let old_run: Run = serde_json::from_value(old.clone()).unwrap();
    let old_record: RunRecord = serde_json::from_value(old).unwrap();
    assert_eq!(old_run, Run::from_record(old_record.clone()));
    assert_eq!(old_record.payload.as_ref(), "");
    assert_eq!(old_record.watch, Watch::default());
}

#[test]
fn accessors_read_the_fields() {
    let record = full_record();
    let run = Run::from_record(record.clone());
    assert_eq!(run.id(), record.id);
    assert_eq!(run.job(), &record.job);
    assert_eq!(run.trigger(), record.trigger);
    assert_eq!(run.created_at(), record.created_at);
    assert_eq!(run.attempt(), record.attempt);
    assert_eq!(run.snoozes(), record.snoozes);
    assert_eq!(run.state(), record.state);
    assert_eq!(run.last_error(), record.last_error.as_deref());
    assert_eq!(run.summary(), record.summary.as_deref());
    assert_eq!(run.cancel_requested(), record.cancel_requested);
    assert_eq!(run.finished_at(), record.finished_at);
    assert_eq!(run.retry(), &record.retry);
    assert_eq!(run.resume_after_crash(), record.resume_after_crash);
    assert_eq!(run.kind(), &*record.kind);
    assert_eq!(run.payload(), &*record.payload);
    assert_eq!(run.of_one_shot(), record.of_one_shot);
    assert_eq!(run.external(), record.external);
    assert_eq!(run.timeout_ms(), record.timeout_ms);
    assert_eq!(run.required_artifacts(), &*record.required_artifacts);
    assert_eq!(run.sinks(), &*record.sinks);
    assert_eq!(run.lease(), record.lease.as_ref());
    assert_eq!(run.last_token(), record.last_token);
    assert_eq!(run.lost(), record.lost);
    assert_eq!(run.shutdowns(), record.shutdowns);
    assert_eq!(run.progress(), record.progress.as_deref());
    assert_eq!(run.last_activity(), record.last_activity);
    assert_eq!(run.artifacts(), &record.artifacts);
    assert_eq!(run.watch(), record.watch);
    assert_eq!(run.extended(), record.extended);
    assert_eq!(run.killed(), record.killed);
    assert_eq!(run.checkpoint(), record.checkpoint.as_deref());
    assert_eq!(run.verifications(), &*record.verifications);
    assert_eq!(run.handed_back(), record.handed_back);
    assert_eq!(run.released_lease(), record.released_lease.as_ref());
}

// Moved from core/tests/review_regressions.rs when the run machine's methods became
// private to the core: regressions an independent review found in the run machine.

/// limits::SNOOZES_MAX: "a run snoozed this many times ends `failed`". The 1 000th snooze
/// backs off; only the 1 001st fails the run.
#[test]
fn a_run_snoozed_snoozes_max_times_ends_failed() {
    let mut run = running_run(RetryPolicy::default());
    let mut rng = SplitMix64::new(0);
    for n in 1..=limits::SNOOZES_MAX {
        run.apply_outcome(Timestamp(0), Outcome::Snooze { for_ms: 1 }, &mut rng);
        if n < limits::SNOOZES_MAX {
            run.begin_next_attempt(Timestamp(0));
            run.mark_running(Timestamp(0), 30_000, 3);
        }
    }
    assert_eq!(
        run.state(),
        RunState::Failed,
        "after {} snoozes: {:?}",
        run.snoozes(),
        run.state()
    );
}

/// Crash recovery retries "at once", but asks the policy for a (random) backoff delay and
/// checks the deadline against it: a run with attempts left and time left before its
/// deadline ends `interrupted`, with the reason "no attempts left".
#[test]
fn crash_recovery_checks_the_deadline_against_now() {
    let retry = RetryPolicy {
        attempts_max: 5,
        backoff_base_ms: 5_000,
        backoff_cap_ms: 5_000,
        jitter: 0.0,
        deadline_ms: Some(10_000),
        ..RetryPolicy::default()
    };
    let mut run = running_run(retry);
    // Restored 6 s after creation: attempt 2 could start now, 4 s before the deadline.
    let t = run.recover_after_crash(Timestamp(6_000));
    assert_eq!(
        run.state(),
        RunState::BackingOff {
            until: Timestamp(6_000)
        },
        "{}",
        t.reason
    );
}

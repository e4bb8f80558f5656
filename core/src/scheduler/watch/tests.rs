//! The rules about queues and workers, and operators' incidents, on explicit timestamps.

use super::*;

const MINUTE: u64 = 60_000;

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

/// A job of `kind` that external workers run, never firing on its own (one slot in a year):
/// its runs come from `trigger`.
fn external(name: &str, kind: &str) -> JobSpec {
    JobSpec::new(
        JobId::new(name).unwrap(),
        kind,
        ScheduleSpec::once(t0().plus_ms(365 * 24 * 60 * MINUTE)),
    )
    .for_external_workers()
}

/// Acknowledges every write and keeps every other effect.
fn ack_all(s: &mut Scheduler, now: Timestamp) -> Vec<Effect> {
    let mut other = Vec::new();
    while let Some(effect) = s.poll_effect() {
        match effect {
            Effect::Persist(batch) => s.handle_persisted(now, batch.id),
            effect => other.push(effect),
        }
    }
    other
}

/// Acknowledges every write; returns the incident records the batches carried.
fn written_incidents(s: &mut Scheduler, now: Timestamp) -> Vec<Incident> {
    written_records(s, now).0
}

/// Acknowledges every write; returns the incident and audit records the batches carried.
fn written_records(s: &mut Scheduler, now: Timestamp) -> (Vec<Incident>, Vec<AuditRecord>) {
    let (mut incidents, mut audit) = (Vec::new(), Vec::new());
    while let Some(effect) = s.poll_effect() {
        if let Effect::Persist(batch) = effect {
            for record in &batch.records {
                match record {
                    Record::PutIncident(i) => incidents.push(i.clone()),
                    Record::Audit(a) => audit.push(a.clone()),
                    _ => {}
                }
            }
            s.handle_persisted(now, batch.id);
        }
    }
    (incidents, audit)
}

/// Delivers every deadline up to `until` in order, acknowledging writes, checking after each
/// `handle_timeout` that the next deadline is later. Returns the other effects.
fn advance(s: &mut Scheduler, until: Timestamp) -> Vec<Effect> {
    let mut effects = Vec::new();
    while let Some(at) = s.poll_timeout().filter(|at| *at <= until) {
        s.handle_timeout(at);
        effects.extend(ack_all(s, at));
        assert!(
            s.poll_timeout().is_none_or(|next| next > at),
            "busy loop at {at}"
        );
        s.check_invariants();
    }
    s.handle_timeout(until);
    effects.extend(ack_all(s, until));
    effects
}

fn open_of(s: &Scheduler, kind: IncidentKind) -> Vec<Incident> {
    s.incidents().filter(|i| i.kind == kind).cloned().collect()
}

/// A scheduler with `render` work queued by job `nightly` at t0 and no render worker.
fn queued_render(config: Config) -> (Scheduler, RunId) {
    let mut s = Scheduler::new(config, 1, t0());
    s.add_job(t0(), external("nightly", "render")).unwrap();
    let run = s.trigger(t0(), &JobId::new("nightly").unwrap()).unwrap();
    ack_all(&mut s, t0());
    (s, run)
}

#[test]
fn queued_work_no_worker_claims_raises_one_diagnosed_incident_within_the_hour() {
    let (mut s, run) = queued_render(Config::default());
    assert_eq!(s.poll_timeout(), Some(t0().plus_ms(10 * MINUTE)));
    advance(&mut s, t0().plus_ms(10 * MINUTE - 1));
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
    // Watched for one simulated hour: one incident, from the 10th minute on.
    let effects_up_to_now = advance(&mut s, t0().plus_ms(60 * MINUTE));
    let open = open_of(&s, IncidentKind::UnclaimedQueue);
    assert_eq!(open.len(), 1, "{open:?}");
    let incident = &open[0];
    assert_eq!(incident.opened_at, t0().plus_ms(10 * MINUTE));
    assert_eq!(incident.queue.as_deref(), Some("render"));
    let announced = effects_up_to_now
        .iter()
        .any(|e| matches!(e, Effect::Event(Event::IncidentOpened(i)) if i == incident));
    assert!(announced, "the opening event carries the queue");
    assert_eq!(incident.job, Some(JobId::new("nightly").unwrap()));
    for part in [
        "kind \"render\": 1 run(s) wait unclaimed",
        &format!("the oldest, {run} of job nightly"),
        "(600 s ago)",
        "no claim of the kind since keel started",
        "eligible workers seen: none",
        "repair: start a worker for kind \"render\", or pause job nightly",
    ] {
        assert!(
            incident.details.contains(part),
            "{part}: {}",
            incident.details
        );
    }
    assert_eq!(s.queue_health()[0].incident, Some(incident.id));
    // A worker of the kind claims it: resolved, and the queue has nothing left to report.
    let at = t0().plus_ms(61 * MINUTE);
    s.claim(at, &worker("r1"), &["render"]).unwrap().unwrap();
    let written = written_incidents(&mut s, at);
    assert!(written
        .iter()
        .any(|i| i.id == incident.id && i.resolved_at == Some(at)));
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
    assert!(s.queue_health().is_empty());
}

#[test]
fn an_unclaimed_incident_is_written_with_its_queue_and_survives_a_restart() {
    let (mut s, _) = queued_render(Config::default());
    let at = t0().plus_ms(10 * MINUTE);
    s.handle_timeout(at);
    let written = written_incidents(&mut s, at);
    let last = written.last().expect("the incident is written");
    assert_eq!(
        (last.kind, last.queue.as_deref()),
        (IncidentKind::UnclaimedQueue, Some("render"))
    );
    // A record written before the field existed still reads, with no queue.
    let mut old = serde_json::to_value(last).unwrap();
    for field in ["queue", "opened_by", "acknowledged", "resolved_by"] {
        old.as_object_mut().unwrap().remove(field);
    }
    let old: Incident = serde_json::from_value(old).unwrap();
    assert_eq!(old.queue, None);
}

#[test]
fn workers_seen_but_not_claiming_are_named_with_when_they_last_asked() {
    // A lease long enough for the busy worker to keep its run without heartbeats here.
    let mut config = Config::default();
    config.lease.ttl_ms = 3_600_000;
    let (mut s, first) = queued_render(config);
    let busy = worker("busy");
    s.claim(t0(), &busy, &["render"]).unwrap().unwrap();
    ack_all(&mut s, t0());
    assert_eq!(s.run(first).unwrap().state.name(), StateName::Running);
    // A second run waits; the worker is busy with the first and asks for nothing more.
    let at = t0().plus_ms(MINUTE);
    let second = s.trigger(at, &JobId::new("nightly").unwrap());
    // The overlap policy may refuse a second run of one job: use a second job then.
    let second = match second {
        Ok(run) => run,
        Err(_) => {
            s.add_job(at, external("weekly", "render")).unwrap();
            s.trigger(at, &JobId::new("weekly").unwrap()).unwrap()
        }
    };
    ack_all(&mut s, at);
    // The wait starts at the queued run (a minute after the claim).
    advance(&mut s, at.plus_ms(10 * MINUTE - 1));
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
    advance(&mut s, at.plus_ms(10 * MINUTE));
    let open = open_of(&s, IncidentKind::UnclaimedQueue);
    assert_eq!(open.len(), 1);
    let details = &open[0].details;
    assert!(
        details.contains(&format!(
            "eligible workers seen: busy (last asked at {})",
            t0()
        )),
        "{details}"
    );
    assert!(
        details.contains(&format!("last claim of the kind at {}", t0())),
        "{details}"
    );
    assert!(
        details.contains("check that they are not all busy or failing"),
        "{details}"
    );
    assert_eq!(s.run(second).unwrap().state.name(), StateName::Queued);
}

#[test]
fn the_report_resolves_when_no_run_waits_and_unclaimed_after_0_never_reports() {
    let (mut s, run) = queued_render(Config::default());
    let at = t0().plus_ms(10 * MINUTE);
    advance(&mut s, at);
    assert_eq!(open_of(&s, IncidentKind::UnclaimedQueue).len(), 1);
    s.cancel_run(at, run).unwrap();
    let written = written_incidents(&mut s, at);
    let resolved = written.iter().find(|i| i.resolved_at.is_some()).unwrap();
    assert!(
        resolved.details.contains("no run of kind \"render\" waits"),
        "{}",
        resolved.details
    );
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
    assert_eq!(s.poll_timeout().filter(|t| *t <= at.plus_ms(MINUTE)), None);

    let never = Config {
        unclaimed_after_ms: 0,
        ..Config::default()
    };
    let (mut s, _) = queued_render(never);
    advance(&mut s, t0().plus_ms(24 * 60 * MINUTE));
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
}

#[test]
fn an_operator_resolving_an_unclaimed_report_does_not_reopen_it_until_the_next_claim() {
    let (mut s, _) = queued_render(Config::default());
    advance(&mut s, t0().plus_ms(10 * MINUTE));
    let id = open_of(&s, IncidentKind::UnclaimedQueue)[0].id;
    let at = t0().plus_ms(11 * MINUTE);
    let resolved = s
        .resolve_incident(at, id, "ana", "render farm down for maintenance")
        .unwrap();
    assert_eq!(resolved.resolved_at, Some(at));
    assert_eq!(
        resolved.resolved_by.as_ref().map(|o| (o.by.as_str(), o.at)),
        Some(("ana", at))
    );
    ack_all(&mut s, at);
    advance(&mut s, t0().plus_ms(120 * MINUTE));
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
}

#[test]
fn operators_open_acknowledge_and_resolve_incidents_and_bad_input_changes_nothing() {
    let (mut s, run) = queued_render(Config::default());
    let at = t0().plus_ms(1_000);
    let new = NewIncident {
        job: None,
        run: Some(run),
        worker: None,
        details: "customer reports missing renders".into(),
        by: "ana".into(),
    };
    // Refusals, each naming what was wrong, each leaving the state as it was.
    let before = format!("{s:?}");
    let refusals = [
        NewIncident {
            by: " ".into(),
            ..new.clone()
        },
        NewIncident {
            details: String::new(),
            ..new.clone()
        },
        NewIncident {
            job: Some(JobId::new("nope").unwrap()),
            ..new.clone()
        },
        NewIncident {
            run: Some(RunId(999)),
            ..new.clone()
        },
    ];
    let errors: Vec<String> = refusals
        .into_iter()
        .map(|n| s.open_incident(at, n).unwrap_err().to_string())
        .collect();
    assert_eq!(
        errors,
        [
            "invalid by: must not be empty",
            "invalid details: must not be empty",
            "no job named nope",
            "no active run run-999",
        ]
    );
    assert_eq!(
        s.acknowledge_incident(at, 77, "ana", "").unwrap_err(),
        Rejected::UnknownIncident(77)
    );
    assert_eq!(format!("{s:?}"), before);

    let opened = s.open_incident(at, new).unwrap();
    assert_eq!(opened.kind, IncidentKind::Operator);
    assert_eq!(
        opened.job,
        Some(JobId::new("nightly").unwrap()),
        "the run's job"
    );
    assert_eq!(opened.opened_by.as_ref().unwrap().by, "ana");
    let effects = ack_all(&mut s, at);
    assert!(effects.contains(&Effect::Event(Event::IncidentOpened(opened.clone()))));

    let later = at.plus_ms(5_000);
    let acked = s
        .acknowledge_incident(later, opened.id, "bo", "looking")
        .unwrap();
    let ack = acked.acknowledged.clone().unwrap();
    assert_eq!(
        (ack.by.as_str(), ack.at, ack.reason.as_str()),
        ("bo", later, "looking")
    );
    let (written, audit) = written_records(&mut s, later);
    assert_eq!(
        written,
        std::slice::from_ref(&acked),
        "acknowledgement persisted"
    );
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].run, &audit[0].actor, audit[0].old, audit[0].new),
        (
            Some(run),
            &Actor::Operator,
            Some(StateName::Queued),
            StateName::Queued
        )
    );
    assert_eq!(
        audit[0].reason,
        format!(
            "incident #{} (operator) acknowledged by bo: looking",
            opened.id
        )
    );
    assert_eq!(
        s.acknowledge_incident(later, opened.id, "cy", ""),
        Err(Rejected::AlreadyAcknowledged {
            incident: opened.id,
            by: "bo".into()
        })
    );
    assert_eq!(
        s.resolve_incident(later, opened.id, "bo", "")
            .unwrap_err()
            .to_string(),
        "invalid reason: must not be empty"
    );
    let resolved = s
        .resolve_incident(later, opened.id, "bo", "re-rendered by hand")
        .unwrap();
    assert_eq!(resolved.resolved_at, Some(later));
    assert!(resolved
        .details
        .ends_with("resolved: by bo: re-rendered by hand"));
    assert_eq!(s.incident(opened.id), None);
    let (written, audit) = written_records(&mut s, later);
    assert_eq!(written, [resolved]);
    assert_eq!(
        audit.iter().map(|a| a.reason.as_str()).collect::<Vec<_>>(),
        [format!(
            "incident #{} (operator) resolved by bo: re-rendered by hand",
            opened.id
        )]
    );
    assert_eq!(
        s.resolve_incident(later, opened.id, "bo", "again"),
        Err(Rejected::UnknownIncident(opened.id))
    );
}

#[test]
fn an_idle_claim_loop_reports_the_backlog_shape_at_the_configured_threshold() {
    let config = Config {
        idle_claims_max: 3,
        ..Config::default()
    };
    let (mut s, _) = queued_render(config);
    let gpu = worker("gpu-1");
    for k in 0..2 {
        assert_eq!(
            s.claim(t0().plus_ms(k), &gpu, &["gpu", "cuda"]).unwrap(),
            None
        );
    }
    assert!(open_of(&s, IncidentKind::IdleClaimLoop).is_empty());
    let at = t0().plus_ms(30_000);
    assert_eq!(s.claim(at, &gpu, &["gpu", "cuda"]).unwrap(), None);
    let open = open_of(&s, IncidentKind::IdleClaimLoop);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].worker, Some(gpu.clone()));
    let details = &open[0].details;
    for part in [
        "3 empty claims in a row by gpu-1 for kinds [\"gpu\", \"cuda\"]",
        &format!("\"render\": 1 (oldest queued at {}, 30 s ago)", t0()),
        "repair: start a worker for a waiting kind, or give gpu-1 one of them",
    ] {
        assert!(details.contains(part), "{part}: {details}");
    }
    let health = s.worker_health();
    let gpu_health: Vec<(&str, u64)> = health
        .iter()
        .map(|h| (h.kind.as_str(), h.stats.idle_loops))
        .collect();
    assert_eq!(gpu_health, [("cuda", 1), ("gpu", 1)]);
    assert!(health
        .iter()
        .all(|h| h.score == 90 && h.stats.last_seen == at));
}

#[test]
fn worker_health_counts_claims_outcomes_and_lease_losses_per_kind() {
    let config = Config::default();
    let mut s = Scheduler::new(config.clone(), 1, t0());
    s.add_job(t0(), external("a", "render").with_attempts(5))
        .unwrap();
    let job = JobId::new("a").unwrap();
    let w = worker("w");
    let mut now = t0();
    let token_of = |s: &mut Scheduler, now: Timestamp| -> (RunId, FencingToken) {
        let claimed = s.claim(now, &w, &["render"]).unwrap().expect("a run waits");
        let start = ack_all(s, now)
            .into_iter()
            .find_map(|e| match e {
                Effect::StartAttempt(a) => Some(a),
                _ => None,
            })
            .expect("handed out once durable");
        assert_eq!(start.run, claimed.run);
        (start.run, start.lease.token)
    };
    // One success.
    s.trigger(now, &job).unwrap();
    let (run, token) = token_of(&mut s, now);
    s.handle_outcome(now, run, token, Outcome::ok()).unwrap();
    ack_all(&mut s, now);
    // One retryable failure, then its retry's lease is lost.
    now = now.plus_ms(1_000);
    s.trigger(now, &job).unwrap();
    let (run, token) = token_of(&mut s, now);
    let failed = Outcome::Retryable {
        message: "disk full".into(),
    };
    s.handle_outcome(now, run, token, failed).unwrap();
    ack_all(&mut s, now);
    let until = match s.run(run).unwrap().state {
        RunState::BackingOff { until } => until,
        RunState::Queued { .. } => now,
        ref other => panic!("{other:?}"),
    };
    advance(&mut s, until);
    now = until;
    let (_, _) = token_of(&mut s, now);
    let expiry = now.plus_ms(config.lease.ttl_ms + config.lease.grace_ms);
    advance(&mut s, expiry);
    let health = s.worker_health();
    assert_eq!(health.len(), 1);
    let h = &health[0];
    assert_eq!((h.worker.as_str(), h.kind.as_str()), ("w", "render"));
    assert_eq!(
        (
            h.stats.claims,
            h.stats.successes,
            h.stats.failures,
            h.stats.lease_losses
        ),
        (3, 1, 1, 1)
    );
    // Last seen at its last claim: the reclaim says it was *not* seen since.
    assert_eq!(h.stats.last_seen, now);
    assert!(h.stats.last_seen < expiry);
    // (1 + 1) / (1 + 1 + 2 + 1) = 40 %
    assert_eq!(h.score, 40);
    assert_eq!(h.score, h.stats.score());
}

#[test]
fn a_stuck_report_names_the_worker_and_the_last_progress() {
    let (mut s, _) = queued_render(Config::default());
    let w = worker("r1");
    s.claim(t0(), &w, &["render"]).unwrap().unwrap();
    let start = ack_all(&mut s, t0())
        .into_iter()
        .find_map(|e| match e {
            Effect::StartAttempt(a) => Some(a),
            _ => None,
        })
        .unwrap();
    let at = t0().plus_ms(1_000);
    s.progress(
        at,
        start.run,
        start.lease.token,
        "building_artifact",
        "frame 12 of 90",
    )
    .unwrap();
    // Renewals keep the lease but are no sign of life.
    let mut now = at;
    while now < at.plus_ms(25_000) {
        now = now.plus_ms(10_000);
        s.renew_lease(now, start.run, start.lease.token).unwrap();
        advance(&mut s, now);
    }
    let open = open_of(&s, IncidentKind::StuckRun);
    assert_eq!(open.len(), 1);
    let details = &open[0].details;
    for part in [
        "of job nightly (kind \"render\"), worker r1",
        &format!("no heartbeat or progress since {at} (20 s)"),
        "phase \"building_artifact\", message \"frame 12 of 90\"",
    ] {
        assert!(details.contains(part), "{part}: {details}");
    }
}

#[test]
fn a_claim_resolves_the_report_and_restarts_the_wait_of_the_runs_left() {
    let (mut s, _) = queued_render(Config::default());
    s.add_job(t0(), external("weekly", "render")).unwrap();
    s.trigger(t0(), &JobId::new("weekly").unwrap()).unwrap();
    ack_all(&mut s, t0());
    advance(&mut s, t0().plus_ms(10 * MINUTE));
    let first = open_of(&s, IncidentKind::UnclaimedQueue);
    assert_eq!(first.len(), 1);
    assert!(
        first[0].details.contains("2 run(s) wait"),
        "{}",
        first[0].details
    );
    let claim_at = t0().plus_ms(12 * MINUTE);
    s.claim(claim_at, &worker("slow"), &["render"])
        .unwrap()
        .unwrap();
    ack_all(&mut s, claim_at);
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
    // The run left has waited since t0, but a worker of its kind was there at 12 min.
    advance(&mut s, claim_at.plus_ms(10 * MINUTE - 1));
    assert!(open_of(&s, IncidentKind::UnclaimedQueue).is_empty());
    advance(&mut s, claim_at.plus_ms(10 * MINUTE));
    let second = open_of(&s, IncidentKind::UnclaimedQueue);
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].id, first[0].id);
    assert!(
        second[0]
            .details
            .contains(&format!("last claim of the kind at {claim_at}")),
        "{}",
        second[0].details
    );
}

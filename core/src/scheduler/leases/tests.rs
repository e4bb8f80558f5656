//! Operator lease actions and their fencing, with explicit timestamps.

use super::super::*;
use crate::scheduler::gate::tests::World;

fn refused_as_stale(w: &mut World, run: RunId, token: FencingToken) {
    let t = w.t;
    assert!(matches!(
        w.s.heartbeat(t, run, token),
        Err(Rejected::StaleToken { got, .. }) if got == token
    ));
    assert!(matches!(
        w.s.handle_outcome(t, run, token, Outcome::ok()),
        Err(Rejected::StaleToken { .. })
    ));
}

#[test]
fn a_release_fences_the_holder_out_queues_the_run_and_uses_no_attempt() {
    let (mut w, start) = World::claimed(1);
    let t1 = w.t.plus_ms(2_000);
    w.at(t1);
    let action =
        w.s.release_lease(t1, start.run, "alice", "worker host is being drained")
            .unwrap();
    w.ack();
    assert_eq!(
        action,
        LeaseAction::Released {
            owner: WorkerId::new("w").unwrap(),
            token: start.lease.token,
            state: StateName::Queued,
        }
    );
    let run = w.s.run(start.run).unwrap();
    assert_eq!(run.state(), RunState::Queued { since: t1 });
    assert_eq!(run.lease(), None);
    // One attempt in all, and it was released, not failed: the run can still be claimed.
    assert_eq!(run.attempts_counted(), 0);
    assert_eq!(run.lost(), 0);
    assert_eq!(run.handed_back(), 1);
    let released = run.released_lease().unwrap();
    assert_eq!(released.token, start.lease.token);
    assert!(!released.reclaimed);
    refused_as_stale(&mut w, start.run, start.lease.token);
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, Event::LeaseReleased { token, .. } if *token == start.lease.token)));
    let audit = w
        .audit
        .iter()
        .find(|a| a.actor == Actor::Person("alice".into()))
        .expect("the release is audited with the operator's name");
    assert_eq!(audit.old, Some(StateName::Running));
    assert_eq!(audit.new, StateName::Queued);
    assert!(
        audit.reason.contains("released by alice"),
        "{}",
        audit.reason
    );
    assert!(audit.reason.ends_with("worker host is being drained"));
    assert_eq!(audit.fencing_token, Some(start.lease.token));

    // Claimable again, under a new token, with the next attempt number.
    let again = w.claim();
    assert_eq!(again.run, start.run);
    assert!(again.lease.token > start.lease.token);
    let done = Outcome::Success {
        summary: None,
        artifacts: BTreeMap::from([("report".to_string(), "r-17".to_string())]),
    };
    w.s.handle_outcome(w.t, again.run, again.lease.token, done)
        .unwrap();
    w.ack();
    assert_eq!(w.stored_run(start.run).state(), RunState::Succeeded);
}

#[test]
fn a_restore_regrants_the_same_attempt_to_its_owner_under_a_new_token() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(2_000);
    w.at(t1);
    w.s.release_lease(t1, start.run, "alice", "by mistake")
        .unwrap();
    w.ack();
    let t2 = t1.plus_ms(1_000);
    w.at(t2);
    let action = w.s.restore_lease(t2, start.run, "alice", "undo").unwrap();
    let LeaseAction::Restored { lease, previous } = action else {
        panic!("a restore says what it granted: {action:?}");
    };
    assert_eq!(previous, start.lease.token);
    assert_eq!(lease.owner, start.lease.owner);
    assert!(lease.token > start.lease.token, "tokens are never reused");
    w.ack();
    let run = w.s.run(start.run).unwrap();
    assert!(matches!(run.state(), RunState::Running { attempt, .. } if attempt == start.attempt));
    assert_eq!(run.lease().unwrap().token, lease.token);
    assert_eq!(run.handed_back(), 0);
    assert_eq!(run.released_lease(), None);
    // The handed-out attempt is the same attempt, under the new token.
    let handed = w
        .starts
        .pop()
        .expect("the restored grant is handed out once durable");
    assert_eq!(handed.attempt, start.attempt);
    assert_eq!(handed.idempotency_key, start.idempotency_key);
    assert_eq!(handed.lease.token, lease.token);
    // The old token stays refused; the new one works.
    refused_as_stale(&mut w, start.run, start.lease.token);
    w.s.heartbeat(t2, start.run, lease.token).unwrap();
    assert!(w
        .audit
        .iter()
        .any(|a| a.actor == Actor::Person("alice".into())
            && a.old == Some(StateName::Queued)
            && a.new == StateName::Starting
            && a.reason.contains("restored to w")));
    // Nothing left to restore.
    assert!(matches!(
        w.s.restore_lease(t2, start.run, "alice", "again"),
        Err(Rejected::NothingToRestore { .. })
    ));
}

#[test]
fn a_lease_claimed_since_its_release_cannot_be_restored() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(2_000);
    w.at(t1);
    w.s.release_lease(t1, start.run, "alice", "drain").unwrap();
    w.ack();
    let again = w.claim();
    let before = w.s.run(start.run).unwrap().clone();
    let refused = w.s.restore_lease(t1, start.run, "alice", "undo");
    assert!(
        matches!(&refused, Err(Rejected::NothingToRestore { why, .. }) if why.contains("claimed")),
        "{refused:?}"
    );
    assert_eq!(
        w.s.run(start.run).unwrap(),
        &before,
        "a refusal changes nothing"
    );
    w.s.heartbeat(t1, again.run, again.lease.token).unwrap();
}

#[test]
fn a_reclaim_loses_the_attempt_now_and_a_restore_gives_it_back() {
    let (mut w, start) = World::claimed(3);
    let t1 = w.t.plus_ms(2_000);
    w.at(t1);
    let action =
        w.s.reclaim_lease(t1, start.run, "bob", "worker is wedged")
            .unwrap();
    w.ack();
    assert!(matches!(action, LeaseAction::Reclaimed { token, .. } if token == start.lease.token));
    let run = w.s.run(start.run).unwrap();
    assert_eq!(run.lost(), 1);
    assert!(!run.state().is_terminal());
    assert!(run.released_lease().unwrap().reclaimed);
    refused_as_stale(&mut w, start.run, start.lease.token);
    assert!(w
        .events
        .iter()
        .any(|e| matches!(e, Event::LeaseReclaimed { token, .. } if *token == start.lease.token)));
    assert_eq!(w.open_incidents(IncidentKind::LeaseReclaimed).len(), 1);
    let audit = w
        .audit
        .iter()
        .find(|a| a.actor == Actor::Person("bob".into()))
        .unwrap();
    assert_eq!(audit.old, Some(StateName::Running));
    assert!(audit.reason.ends_with("worker is wedged"));

    let LeaseAction::Restored { lease, .. } =
        w.s.restore_lease(t1, start.run, "bob", "it recovered")
            .unwrap()
    else {
        panic!("restored");
    };
    w.ack();
    let run = w.s.run(start.run).unwrap();
    assert_eq!(run.lost(), 0, "the restore gives the lost attempt back");
    assert_eq!(run.lease().unwrap().token, lease.token);
    // Running again: the reclaim's incident resolves.
    assert!(w.open_incidents(IncidentKind::LeaseReclaimed).is_empty());
}

#[test]
fn lease_actions_are_refused_for_unknown_and_waiting_runs_and_change_nothing() {
    let (mut w, start) = World::claimed(3);
    let t = w.t;
    let unknown = RunId(999);
    assert_eq!(
        w.s.release_lease(t, unknown, "a", "r"),
        Err(Rejected::UnknownRun(unknown))
    );
    assert_eq!(
        w.s.reclaim_lease(t, unknown, "a", "r"),
        Err(Rejected::UnknownRun(unknown))
    );
    assert_eq!(
        w.s.restore_lease(t, unknown, "a", "r"),
        Err(Rejected::UnknownRun(unknown))
    );
    assert!(matches!(
        w.s.restore_lease(t, start.run, "a", "r"),
        Err(Rejected::NothingToRestore { .. })
    ));
    w.s.release_lease(t, start.run, "a", "r").unwrap();
    w.ack();
    let before = w.s.run(start.run).unwrap().clone();
    assert_eq!(
        w.s.release_lease(t, start.run, "a", "r"),
        Err(Rejected::NotRunning {
            run: start.run,
            state: StateName::Queued
        })
    );
    assert!(matches!(
        w.s.reclaim_lease(t, start.run, "a", "r"),
        Err(Rejected::NotRunning { .. })
    ));
    assert_eq!(w.s.run(start.run).unwrap(), &before);
    assert!(!w.s.has_unwritten_changes());
}

#[test]
fn releasing_an_own_attempt_asks_it_to_stop() {
    let t0 = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let at = t0.plus_ms(1_000);
    let mut s = Scheduler::new(Config::default(), 1, t0);
    s.add_job(
        t0,
        JobSpec::new(JobId::new("own").unwrap(), "k", ScheduleSpec::once(at)),
    )
    .unwrap();
    let mut started = Vec::new();
    let mut stopped = Vec::new();
    fn drain(
        s: &mut Scheduler,
        now: Timestamp,
        started: &mut Vec<AttemptStart>,
        stopped: &mut Vec<(RunId, StopReason)>,
    ) {
        while let Some(effect) = s.poll_effect() {
            match effect {
                Effect::Persist(b) => s.handle_persisted(now, b.id),
                Effect::StartAttempt(a) => started.push(a),
                Effect::CancelAttempt { run, reason, .. } => stopped.push((run, reason)),
                _ => {}
            }
        }
    }
    drain(&mut s, t0, &mut started, &mut stopped);
    s.handle_timeout(at);
    drain(&mut s, at, &mut started, &mut stopped);
    let own = started.pop().unwrap();
    s.release_lease(at, own.run, "alice", "restart the host")
        .unwrap();
    assert_eq!(
        s.run(own.run).unwrap().state(),
        RunState::BackingOff { until: at }
    );
    drain(&mut s, at, &mut started, &mut stopped);
    assert_eq!(stopped, vec![(own.run, StopReason::LeaseLost)]);
    s.check_invariants();
}

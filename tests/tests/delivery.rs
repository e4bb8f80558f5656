//! SPEC section 6: delivering run results through the durable outbox.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::cell::Cell;
use std::rc::Rc;

use keel_core::outbox::{classify_http, DeliveryResult};
use keel_core::{JobId, JobSpec, RunState, ScheduleSpec, Timestamp};
use keel_testkit::{Execution, Faults, Sim, SimConfig};

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn job_with_sink(name: &str, sink: &str) -> JobSpec {
    let mut spec = JobSpec::new(
        JobId::new(name).unwrap(),
        "work",
        ScheduleSpec::Once {
            at: t0().plus_ms(SECOND),
        },
    );
    spec.sinks = vec![sink.into()].into();
    spec
}

fn count(sim: &Sim, sink: &str, status: &str) -> u64 {
    sim.delivery_counts()
        .get(&(sink.to_owned(), status.to_owned()))
        .copied()
        .unwrap_or(0)
}

// SPEC D3: 503 is transient (retried after 30 s), then 200 delivers.
#[test]
fn a_503_then_a_200_is_delivered_once_after_one_retry() {
    let mut sim = Sim::new(SimConfig::new(1));
    sim.handle("work", |_, _| Execution::succeed_after(SECOND));
    let answers = Rc::new(Cell::new(0));
    let seen = answers.clone();
    sim.sink("webhook", move |_, _| {
        seen.set(seen.get() + 1);
        let status = if seen.get() == 1 { 503 } else { 200 };
        (100, classify_http(status, None, ""))
    });
    sim.add_job(job_with_sink("report", "webhook")).unwrap();
    sim.run_for(20 * SECOND);
    assert_eq!(answers.get(), 1);
    sim.run_for(MINUTE);
    assert_eq!(answers.get(), 2, "retried once, 30 s later");
    assert_eq!(count(&sim, "webhook", "success"), 1);
    assert!(
        sim.store().deliveries().next().is_none(),
        "the outbox is empty"
    );
    // D2: re-sending the result never re-ran the job.
    assert_eq!(sim.runs_of("report").len(), 1);
    assert_eq!(sim.runs_of("report")[0].attempt().0, 1);
}

#[test]
fn a_404_is_dropped_as_permanent_without_a_retry() {
    let mut sim = Sim::new(SimConfig::new(2));
    sim.handle("work", |_, _| Execution::succeed_after(SECOND));
    let answers = Rc::new(Cell::new(0));
    let seen = answers.clone();
    sim.sink("webhook", move |_, _| {
        seen.set(seen.get() + 1);
        (100, classify_http(404, None, "no such hook"))
    });
    sim.add_job(job_with_sink("report", "webhook")).unwrap();
    sim.run_for(10 * MINUTE);
    assert_eq!(answers.get(), 1);
    assert_eq!(count(&sim, "webhook", "permanent"), 1);
    assert_eq!(count(&sim, "webhook", "success"), 0);
}

#[test]
fn a_sink_that_keeps_failing_is_exhausted_after_three_attempts_30_s_then_60_s_apart() {
    let mut sim = Sim::new(SimConfig::new(3));
    sim.handle("work", |_, _| Execution::succeed_after(SECOND));
    let times = Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = times.clone();
    sim.sink("webhook", move |send, _| {
        seen.borrow_mut().push(send.attempt);
        (
            0,
            DeliveryResult::Transient {
                error: "connection refused".into(),
                retry_after_ms: None,
            },
        )
    });
    sim.add_job(job_with_sink("report", "webhook")).unwrap();
    sim.run_for(10 * MINUTE);
    assert_eq!(*times.borrow(), vec![1, 2, 3]);
    assert_eq!(count(&sim, "webhook", "exhausted"), 1);
    let sends: Vec<u64> = sim
        .trace()
        .iter()
        .filter(|l| l.contains(" deliver "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let gaps: Vec<u64> = sends.windows(2).map(|w| (w[1] - w[0]) / SECOND).collect();
    assert_eq!(gaps, vec![30, 60]);
}

// SPEC D1: deliveries live in a durable outbox and survive a crash.
#[test]
fn pending_deliveries_survive_a_crash_and_are_sent_after_restart() {
    let mut sim = Sim::new(SimConfig::new(4));
    sim.handle("work", |_, _| Execution::succeed_after(SECOND));
    let up = Rc::new(Cell::new(false));
    let state = up.clone();
    sim.sink("webhook", move |_, _| {
        let status = if state.get() { 200 } else { 503 };
        (100, classify_http(status, Some("600"), ""))
    });
    sim.add_job(job_with_sink("report", "webhook")).unwrap();
    sim.run_for(30 * SECOND);
    assert_eq!(
        sim.store().deliveries().count(),
        1,
        "waiting in the durable outbox"
    );
    sim.crash();
    up.set(true);
    sim.run_for(15 * MINUTE);
    assert_eq!(count(&sim, "webhook", "success"), 1);
    assert!(sim.store().deliveries().next().is_none());
    assert_eq!(sim.runs_of("report")[0].state(), RunState::Succeeded);
}

// SPEC D4: every delivery ends exactly once and is counted once, by status and sink. Slow and
// failing writes, late acknowledgements and stalled holders do not change that. `Finished` is
// released only when the delivery's end is durable, so a crash never counts a delivery twice;
// a crash right after that write can lose a count (the event is not durable).
#[test]
fn each_delivery_is_counted_exactly_once() {
    let no_crashes = Faults {
        crash_per_mille: 0,
        ..Faults::HOSTILE
    };
    for (faults, exact) in [(no_crashes, true), (Faults::HOSTILE, false)] {
        for seed in 0..10 {
            let mut sim = Sim::new(SimConfig::new(seed).faults(faults));
            sim.handle("work", |_, rng| {
                Execution::succeed_after(rng.below_inclusive(5 * SECOND))
            });
            sim.sink("flaky", |_, rng| {
                let status = [200, 503, 429, 404, 500][rng.below_inclusive(4) as usize];
                (
                    rng.below_inclusive(2 * SECOND),
                    classify_http(status, None, ""),
                )
            });
            let mut spec = JobSpec::new(
                JobId::new("minutely").unwrap(),
                "work",
                ScheduleSpec::Cron {
                    expr: "0 * * * * *".into(),
                    zone: "UTC".into(),
                },
            );
            spec.sinks = vec!["flaky".into()].into();
            sim.add_job(spec).unwrap();
            sim.run_for(30 * MINUTE);
            sim.command("pause", |s, now| {
                s.pause_job(now, &JobId::new("minutely").unwrap())
            })
            .unwrap();
            sim.check_liveness(30 * MINUTE);
            // Let every outstanding delivery finish (they retry for a few minutes at most).
            sim.run_for(30 * MINUTE);
            assert!(
                sim.store().deliveries().next().is_none(),
                "seed {seed}: outbox drained"
            );
            let finished: u64 = sim.delivery_counts().values().sum();
            let results = sim
                .store()
                .runs()
                .filter(|r| r.state().is_terminal())
                .count() as u64;
            if exact {
                assert_eq!(finished, results, "seed {seed}: one count per result");
            } else {
                assert!(finished <= results, "seed {seed}: {finished} > {results}");
                assert!(
                    finished + sim.crashes() >= results,
                    "seed {seed}: {finished} counts for {results} results, {} crashes",
                    sim.crashes()
                );
            }
        }
    }
}

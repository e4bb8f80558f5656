//! The watchdog design's acceptance scenario (SPEC A2, issue 14), on the simulated clock with
//! the design's thresholds: one stale lease and one claim loop that finds no job, each detected
//! with its incident and the evidence an operator needs. (The third detection, an artifact gate
//! failing, belongs to the artifact gate's own tests.)

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use keel_core::{
    Actor, Config, IncidentKind, JobId, JobSpec, ScheduleSpec, StateName, WatchdogProfile,
};
use keel_testkit::{Execution, Faults, Sim, SimConfig};

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;

fn design_world() -> Sim {
    let config = WatchdogProfile::Design.apply(Config::default());
    // Every attempt stalls: its handler never heartbeats, so its lease goes stale.
    let faults = Faults {
        stall_per_mille: 1000,
        ..Faults::NONE
    };
    Sim::new(SimConfig::new(14).scheduler(config).faults(faults))
}

#[test]
fn a_stale_lease_is_reclaimed_after_the_design_grace_with_evidence() {
    let mut sim = design_world();
    sim.handle("slow", |_, _| Execution::succeed_after(60 * MINUTE));
    let start = sim.wall();
    let job = JobId::new("slow").unwrap();
    let spec = JobSpec::new(
        job.clone(),
        "slow",
        ScheduleSpec::once(start.plus_ms(SECOND)),
    )
    .with_attempts(2);
    sim.add_job(spec).unwrap();
    // Granted about 1 s in, expiring 30 s later; not reclaimed within the 60 s grace.
    sim.run_until(start.plus_ms(SECOND + 30 * SECOND + 59 * SECOND));
    let reclaimed = |sim: &Sim| -> Vec<keel_core::Incident> {
        sim.store()
            .incidents()
            .filter(|i| i.kind == IncidentKind::LeaseReclaimed)
            .cloned()
            .collect()
    };
    assert!(reclaimed(&sim).is_empty(), "reclaimed inside the grace");
    sim.run_until(start.plus_ms(3 * MINUTE));
    let incidents = reclaimed(&sim);
    assert!(!incidents.is_empty(), "the stale lease was not reclaimed");
    let first = &incidents[0];
    let run = first.run.unwrap();
    assert_eq!(first.job.as_ref(), Some(&job));
    assert_eq!(first.worker.as_ref().map(|w| w.as_str()), Some("local"));
    assert!(
        first.details.contains("held by local expired at") && first.details.contains("reclaimed"),
        "{}",
        first.details
    );
    // Detected at expiry + 60 s, not before.
    let granted = sim
        .store()
        .audit_of_run(run)
        .find(|a| a.new == StateName::Running)
        .unwrap()
        .at;
    assert!(first.opened_at >= granted.plus_ms(30 * SECOND + 60 * SECOND));
    // Evidence in the audit trail: the watchdog's reclaim, old and new state, and the reason.
    let reclaim = sim
        .store()
        .audit_of_run(run)
        .find(|a| a.actor == Actor::Watchdog)
        .expect("the reclaim is audited");
    assert_eq!(reclaim.old, Some(StateName::Running));
    assert!(reclaim.reason.contains("reclaimed"), "{}", reclaim.reason);
    // Pass evidence: the run ran again under a new lease (its second attempt, a higher token).
    let attempts: Vec<_> = sim
        .store()
        .audit_of_run(run)
        .filter(|a| a.new == StateName::Running)
        .map(|a| (a.attempt, a.fencing_token))
        .collect();
    assert!(attempts.len() >= 2, "{attempts:?}");
    assert!(attempts[1].1 > attempts[0].1, "{attempts:?}");
    // And the worker's health shows the lost lease.
    let health = sim.scheduler().worker_health();
    let local = health.iter().find(|h| h.kind == "slow").unwrap();
    assert!(local.stats.lease_losses >= 1);
    assert!(local.score < 100);
}

#[test]
fn a_claim_loop_finding_no_job_is_detected_with_the_backlog_shape_and_a_repair() {
    let mut sim = design_world();
    let start = sim.wall();
    let spec = JobSpec::new(
        JobId::new("nightly-render").unwrap(),
        "render",
        ScheduleSpec::once(start.plus_ms(SECOND)),
    )
    .for_external_workers();
    sim.add_job(spec).unwrap();
    // A worker that can only do "gpu" work polls every 5 s; nobody runs "render".
    sim.add_worker("gpu-1", &["gpu"], 5 * SECOND);
    sim.run_until(start.plus_ms(16 * SECOND));
    let open = |sim: &Sim, kind| -> Vec<keel_core::Incident> {
        sim.store()
            .open_incidents()
            .filter(|i| i.kind == kind)
            .cloned()
            .collect()
    };
    // Three empty claims in a row (5, 10, 15 s) while render work waits: the design's loop.
    let idle = open(&sim, IncidentKind::IdleClaimLoop);
    assert_eq!(idle.len(), 1, "{idle:?}");
    assert_eq!(idle[0].worker.as_ref().map(|w| w.as_str()), Some("gpu-1"));
    for part in [
        "3 empty claims in a row by gpu-1 for kinds [\"gpu\"]",
        "backlog (runs waiting per kind): \"render\": 1",
        "repair: start a worker for a waiting kind, or give gpu-1 one of them",
    ] {
        assert!(
            idle[0].details.contains(part),
            "{part}: {}",
            idle[0].details
        );
    }
    let gpu = sim.scheduler().worker_health();
    assert_eq!(gpu.len(), 1);
    assert_eq!((gpu[0].kind.as_str(), gpu[0].stats.idle_loops), ("gpu", 1));
    // Ten minutes on, the queue itself is diagnosed: nobody eligible was ever seen.
    assert!(open(&sim, IncidentKind::UnclaimedQueue).is_empty());
    sim.run_until(start.plus_ms(SECOND + 10 * MINUTE + SECOND));
    let stuck = open(&sim, IncidentKind::UnclaimedQueue);
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    for part in [
        "kind \"render\": 1 run(s) wait unclaimed",
        "eligible workers seen: none",
        "repair: start a worker for kind \"render\", or pause job nightly-render",
    ] {
        assert!(
            stuck[0].details.contains(part),
            "{part}: {}",
            stuck[0].details
        );
    }
    // Still one of each after an hour: incidents do not repeat.
    sim.run_until(start.plus_ms(60 * MINUTE));
    assert_eq!(open(&sim, IncidentKind::IdleClaimLoop).len(), 1);
    assert_eq!(open(&sim, IncidentKind::UnclaimedQueue).len(), 1);
    // A restart keeps the report (the store has it) and does not open a second one.
    sim.crash();
    sim.run_until(start.plus_ms(60 * MINUTE + 30 * SECOND));
    assert_eq!(sim.crashes(), 1);
    assert_eq!(open(&sim, IncidentKind::UnclaimedQueue), stuck);
    // A render worker arrives: its claim resolves the queue's incident.
    sim.handle("render", |_, _| Execution::succeed_after(SECOND));
    sim.add_worker("render-1", &["render"], 5 * SECOND);
    sim.run_until(start.plus_ms(61 * MINUTE));
    assert!(open(&sim, IncidentKind::UnclaimedQueue).is_empty());
    let resolved = sim
        .store()
        .incidents()
        .find(|i| i.kind == IncidentKind::UnclaimedQueue)
        .unwrap();
    assert!(
        resolved.details.contains("render-1 claimed"),
        "{}",
        resolved.details
    );
}

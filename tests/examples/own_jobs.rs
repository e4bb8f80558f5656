//! Testing your own jobs with the simulator: a day of an hourly job in a hostile world (slow
//! and failing writes, crashes), then a liveness check. Shown in docs/testing.md.
//!
//! Run it with `cargo run -p keel-testkit --example own_jobs [SEED]`.

#![allow(clippy::unwrap_used)] // an example states its expectations with unwrap

use keel_core::{JobId, JobSpec, ScheduleSpec};
use keel_testkit::{Execution, Faults, Sim, SimConfig};

fn main() {
    let seed = std::env::args().nth(1).map_or(7, |s| s.parse().unwrap());
    let mut sim = Sim::new(SimConfig::new(seed).faults(Faults::HOSTILE));
    sim.handle("invoice", |_attempt, rng| {
        // Decide, from the attempt and the seeded generator, how this attempt goes.
        Execution::succeed_after(rng.below_inclusive(5_000))
    });
    let every_hour = ScheduleSpec::Cron {
        expr: "0 0 * * * *".into(),
        zone: "UTC".into(),
    };
    // Returns once the store holds the job (faults are suspended until then).
    sim.add_job(JobSpec::new(
        JobId::new("invoices").unwrap(),
        "invoice",
        every_hour,
    ))
    .unwrap();
    sim.run_for(24 * 3600 * 1000 + 60_000); // a day, and the minute of the 24th slot
    sim.check_liveness(3600 * 1000);
    // Crashes cost attempts, never slots: one run per hour, whatever the seed.
    let runs = sim.runs_of("invoices");
    assert_eq!(runs.len(), 24);
    println!(
        "seed {seed}: {} runs, {} crashes survived, every invariant held",
        runs.len(),
        sim.crashes()
    );
}

//! A guided tour of keel-core, run in the simulator: three jobs, a failing handler that retries
//! on timers, a crash in the middle of an attempt, and what the store holds afterwards.
//!
//! Run it with `cargo run -p keel-testkit --example tour`.

#![allow(clippy::unwrap_used)] // tests and examples state their expectations with unwrap

use keel_core::{JobId, JobSpec, JobState, RetryPolicy, Run, ScheduleSpec};
use keel_testkit::{Execution, Faults, Sim, SimConfig};

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;

fn main() {
    let mut sim = Sim::new(SimConfig::new(2026).faults(Faults {
        persist_delay_min_ms: 1,
        persist_delay_max_ms: 20,
        ..Faults::NONE
    }));
    println!("keel tour: simulated clock starts at {}\n", sim.wall());

    // Handlers are plain closures here: how long an attempt takes and how it ends.
    sim.handle("report", |_, _| Execution::succeed_after(2 * SECOND));
    sim.handle("upload", |attempt, _| {
        if attempt.attempt.0 < 3 {
            Execution::fail_after(SECOND, "upstream answered 503")
        } else {
            Execution::succeed_after(SECOND)
        }
    });
    sim.handle("migrate", |_, _| Execution::succeed_after(5 * MINUTE));

    let add = |sim: &mut Sim, spec: JobSpec| {
        let name = spec.id.clone();
        sim.add_job(spec).expect("the tour's jobs are valid");
        let next = sim.scheduler().job(&name).and_then(|j| j.next_fire());
        println!(
            "added {name:<8} next fire {}",
            next.map(|t| t.to_string()).unwrap_or_default()
        );
    };
    add(
        &mut sim,
        JobSpec::new(
            JobId::new("report").unwrap(),
            "report",
            ScheduleSpec::Cron {
                expr: "0 */2 * * * *".into(),
                zone: "Europe/Paris".into(),
            },
        ),
    );
    let mut upload = JobSpec::new(
        JobId::new("upload").unwrap(),
        "upload",
        ScheduleSpec::Once {
            at: sim.wall().plus_ms(30 * SECOND),
        },
    );
    upload.retry = RetryPolicy {
        attempts_max: 5,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    add(&mut sim, upload);
    let in_a_minute = sim.wall().plus_ms(MINUTE);
    add(
        &mut sim,
        JobSpec::new(
            JobId::new("migrate").unwrap(),
            "migrate",
            ScheduleSpec::Once { at: in_a_minute },
        ),
    );
    let bad = JobSpec::new(
        JobId::new("broken").unwrap(),
        "report",
        ScheduleSpec::Cron {
            expr: "0 0 25 * * *".into(),
            zone: "UTC".into(),
        },
    );
    println!("refused broken: {}\n", sim.add_job(bad).unwrap_err());

    sim.run_for(3 * MINUTE);
    println!(
        "-- at {}: the process is killed while `migrate` is running --",
        sim.wall()
    );
    sim.crash();
    sim.run_for(10 * MINUTE);

    println!("\nruns in the store after 13 simulated minutes:");
    println!(
        "{:<8} {:<8} {:<26} {:>7}  {:<15} last error (of any attempt)",
        "run", "job", "slot", "attempt", "state"
    );
    for run in sim.store().runs() {
        print_run(run);
    }
    for job in ["upload", "migrate"] {
        let run = sim.runs_of(job)[0].clone();
        println!("\naudit trail of {} ({job}):", run.id());
        for entry in sim.store().audit_of_run(run.id()) {
            let old = entry
                .old
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "  {} {:>11} -> {:<11} {:<9} {}",
                entry.at, old, entry.new, entry.actor, entry.reason
            );
        }
    }
    println!();
    for job in sim.scheduler().jobs() {
        let state = match &job.state {
            JobState::Scheduled { next } => format!("scheduled, next fire {next}"),
            JobState::Paused { .. } => "paused".into(),
            JobState::Disabled { reason } => format!("disabled: {reason}"),
        };
        println!("job {:<8} {state}", job.spec.id.as_str());
    }
    println!(
        "\n{} simulated steps, {} store batches, {} crash; invariants checked after every step.",
        sim.trace().len(),
        sim.store().batches_applied(),
        sim.crashes()
    );
}

fn print_run(run: &Run) {
    let slot = run
        .slot()
        .map(|t| t.to_string())
        .unwrap_or_else(|| "manual".into());
    let error = run
        .last_error()
        .as_ref()
        .map(|e| e.message.as_str())
        .unwrap_or("");
    println!(
        "{:<8} {:<8} {:<26} {:>7}  {:<15} {error}",
        run.id().to_string(),
        run.job().as_str(),
        slot,
        run.attempt().0,
        run.state().name().to_string()
    );
}

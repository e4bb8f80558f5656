//! The driver's cost per acknowledgement does not grow with the number of commands waiting
//! for durability: counted with `DriverStats`, not timed. Before the driver kept its waiters in
//! mark order, every turn re-checked every waiting command, and adding 40,000 jobs through the
//! runtime never finished.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use keel_core::{JobId, JobSpec, ScheduleSpec, WorkerId};
use keel_runtime::{Clock, DriverStats, Runtime};
use keel_testkit::SharedMemStore;
use tokio::task::JoinSet;

mod common;
use common::T0;

fn job(i: usize) -> JobSpec {
    let mut spec = JobSpec::new(
        JobId::new(&format!("job-{i}")).unwrap(),
        "ext",
        ScheduleSpec::Cron {
            expr: format!("{} * * * * *", i % 60).into(),
            zone: "UTC".into(),
        },
    );
    spec.external = true;
    spec
}

/// What the driver did while the adds were answered.
#[derive(Debug)]
struct Spent {
    wake_checks: u64,
    waiters_checked: u64,
    waiters_woken: u64,
    waiters_max: u64,
}

fn spent(before: DriverStats, after: DriverStats) -> Spent {
    Spent {
        wake_checks: after.wake_checks - before.wake_checks,
        waiters_checked: after.waiters_checked - before.waiters_checked,
        waiters_woken: after.waiters_woken - before.waiters_woken,
        waiters_max: after.waiters_max,
    }
}

/// Adds `n` jobs through the runtime, all in flight at once, and returns the driver's work.
async fn add_all(n: usize) -> Spent {
    let store = SharedMemStore::new();
    let runtime = Runtime::builder(Arc::new(store))
        .clock(Clock::starting_at(T0))
        .seed(7)
        .worker(WorkerId::new("complexity").unwrap())
        .start()
        .await
        .unwrap();
    let handle = runtime.handle();
    let before = handle.driver_stats().await.unwrap();
    let mut adds = JoinSet::new();
    for i in 0..n {
        let handle = handle.clone();
        adds.spawn(async move { handle.add_job(job(i)).await });
    }
    while let Some(added) = adds.join_next().await {
        added.unwrap().unwrap();
    }
    let after = handle.driver_stats().await.unwrap();
    // A listing is taken a page at a time: every job once, in id order, across pages.
    let listed: Vec<JobId> = handle
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.spec.id)
        .collect();
    let mut added: Vec<JobId> = (0..n).map(|i| job(i).id).collect();
    added.sort();
    assert_eq!(listed, added);
    runtime.shutdown(std::time::Duration::ZERO).await.unwrap();
    spent(before, after)
}

#[tokio::test(start_paused = true)]
async fn waking_commands_costs_what_it_wakes_not_what_waits() {
    let mut per_add = Vec::new();
    // The larger case also lists its jobs in more than one page (`add_all`).
    const _: () = assert!(5_000 > keel_runtime::LISTING_PAGE);
    for n in [500, 5_000] {
        let stats = add_all(n).await;
        eprintln!("{n} adds: {stats:?}");
        // Every add was answered once, and each look stopped at the first waiter not durable.
        assert!(stats.waiters_woken >= n as u64);
        assert!(stats.waiters_checked <= stats.waiters_woken + stats.wake_checks);
        // The adds really did wait behind each other.
        assert!(stats.waiters_max >= n as u64 / 4, "{stats:?}");
        per_add.push(stats.waiters_checked as f64 / n as f64);
    }
    // A re-check of every waiter on every turn grows with n (hundreds of checks per add at
    // 5,000); waking a prefix stays near two per add, whatever n.
    assert!(
        per_add[1] <= per_add[0] * 1.25 + 0.5,
        "waiters checked per add grew with the number waiting: {per_add:?}"
    );
    assert!(per_add[1] < 4.0, "waiters checked per add: {per_add:?}");
}

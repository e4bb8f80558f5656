//! The core's cost per input does not grow with its size: counted, not timed.
//!
//! Each test builds the same world at two sizes (ten times apart), then measures the work a
//! firing and a command cost there, as [`Scheduler::work`] counts it (index entries visited)
//! plus the records written. A per-event path that walked a whole collection would cost ten
//! times more at the larger size; these tests fail then. What an acknowledgement costs a
//! driver that waits on write marks is counted in the runtime's tests (`DriverStats`), and
//! the durable mark's index is checked against a walk in `persist.rs`'s unit tests.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use keel_core::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);

fn cron_job(i: usize) -> JobSpec {
    JobSpec::new(
        JobId::new(&format!("job-{i}")).unwrap(),
        "work",
        ScheduleSpec::Cron {
            expr: format!("{} * * * * *", i % 60).into(),
            zone: "UTC".into(),
        },
    )
}

/// A job whose runs wait for an external worker: queued runs that stay in memory.
fn external_job(i: usize) -> JobSpec {
    let mut spec = JobSpec::new(
        JobId::new(&format!("ext-{i}")).unwrap(),
        "ext",
        ScheduleSpec::Cron {
            expr: "0 * * * * *".into(),
            zone: "UTC".into(),
        },
    );
    spec.external = true;
    spec
}

/// Drains effects (`keel_core::drive`): acknowledges every batch at once and completes every
/// attempt with success. Returns the records written.
fn drain(s: &mut Scheduler, now: Timestamp) -> u64 {
    drive::drain(s, now, drive::acknowledge, succeed)
        .unwrap()
        .records
}

fn succeed(s: &mut Scheduler, now: Timestamp, effect: Effect) {
    if let Effect::StartAttempt(a) = effect {
        s.handle_outcome(now, a.run, a.lease.token, Outcome::ok())
            .unwrap();
    }
}

/// A world of `n` cron jobs, `n / 10` queued external runs and `n / 50` open idle-claim
/// incidents (capped by the core's limit), settled at the top of a minute.
fn world(n: usize) -> (Scheduler, Timestamp) {
    let mut s = Scheduler::new(Config::default(), 7, T0);
    for i in 0..n {
        s.add_job(T0, cron_job(i)).unwrap();
    }
    for i in 0..n / 10 {
        s.add_job(T0, external_job(i)).unwrap();
    }
    drain(&mut s, T0);
    // The next whole minute: every external job fires, and its run waits in the queue.
    let minute = Timestamp((T0.0 / 60_000 + 1) * 60_000);
    s.handle_timeout(minute);
    drain(&mut s, minute);
    // Workers asking for a kind nobody queued, while `ext` runs wait: one incident each.
    let max = Config::default().idle_claims_max;
    for w in 0..(n / 50).min(limits::INCIDENTS_OPEN_MAX) {
        let worker = WorkerId::new(&format!("idle-{w}")).unwrap();
        for _ in 0..max {
            assert!(s.claim(minute, &worker, &["nothing"]).unwrap().is_none());
        }
    }
    drain(&mut s, minute);
    assert!(s.incidents().count() >= n / 50);
    s.check_invariants();
    (s, minute)
}

/// Work per firing over one minute in which every cron job fires once.
fn work_per_firing(n: usize) -> f64 {
    let (mut s, minute) = world(n);
    let before = s.work().total();
    let mut records = 0;
    let mut firings = 0;
    for second in 1..=60 {
        let now = minute.plus_ms(second * 1_000);
        let fired_before = s.work().timers_popped;
        s.handle_timeout(now);
        firings += s.work().timers_popped - fired_before;
        records += drain(&mut s, now);
    }
    assert!(
        firings as usize >= n,
        "every cron job fired ({firings} of {n})"
    );
    s.check_invariants();
    (s.work().total() - before + records) as f64 / firings as f64
}

/// Work per command: adding jobs, refusing triggers of jobs with a run waiting, claims.
fn work_per_command(n: usize) -> f64 {
    let (mut s, now) = world(n);
    let before = s.work().total();
    let mut records = 0;
    let commands = 1_000;
    for i in 0..commands {
        s.add_job(now, cron_job(n + i)).unwrap();
        // The external jobs have a queued run each: a trigger is refused, naming it.
        let ext = JobId::new(&format!("ext-{}", i % (n / 10))).unwrap();
        assert!(matches!(
            s.trigger(now, &ext),
            Err(Rejected::RunActive { .. })
        ));
        // An idle worker asks again: its incident is open already.
        let worker = WorkerId::new(&format!("idle-{}", i % (n / 50))).unwrap();
        assert!(s.claim(now, &worker, &["nothing"]).unwrap().is_none());
        records += drain(&mut s, now);
    }
    s.check_invariants();
    (s.work().total() - before + records) as f64 / (3 * commands) as f64
}

fn assert_flat(what: &str, small: f64, large: f64) {
    eprintln!("{what}: {small:.3} at the small size, {large:.3} at the large one");
    assert!(
        large <= small * 1.25 + 1.0,
        "{what} grows with size: {small:.3} -> {large:.3}"
    );
}

#[test]
fn a_firing_costs_the_same_with_ten_times_the_jobs_runs_and_incidents() {
    assert_flat(
        "work per firing",
        work_per_firing(500),
        work_per_firing(5_000),
    );
}

#[test]
fn a_command_costs_the_same_with_ten_times_the_jobs_runs_and_incidents() {
    assert_flat(
        "work per command",
        work_per_command(500),
        work_per_command(5_000),
    );
}

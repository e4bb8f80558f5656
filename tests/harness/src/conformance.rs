//! One conformance suite for every [`Store`] adapter.
//!
//! An adapter proves it implements the store contract (`keel_core::store`) by running this
//! suite: it implements [`Harness`] (how to create an empty store and open it again) and
//! expands [`conformance_suite!`](crate::conformance_suite) in an integration test:
//!
//! ```
//! use keel_harness::conformance::{Harness, Opener};
//! use keel_testkit::SharedMemStore;
//!
//! struct Memory;
//!
//! impl Harness for Memory {
//!     type Store = SharedMemStore;
//!     fn fresh(&self) -> Opener<SharedMemStore> {
//!         // A durable adapter opens a fresh `keel_harness::TempDir` here, and the opener
//!         // owns it, so the directory lives as long as the test needs it.
//!         let store = SharedMemStore::store_rules_only();
//!         Box::new(move || store.clone())
//!     }
//! }
//!
//! keel_harness::conformance_suite!(Memory);
//! # fn main() {}
//! ```
//!
//! | check | what it proves |
//! |---|---|
//! | `empty_store_restores_empty` | a new store restores to nothing, epoch 0 |
//! | `acknowledged_state_survives_reopen` | after a real scheduler's batches, a new handle reads and restores exactly what a model store holds after applying the same batches |
//! | `refused_batch_applies_nothing` | batch atomicity: one refused record keeps every other record of the batch out |
//! | `deposed_writer_is_refused` | `restore` fences every earlier writer; `read` fences nobody |
//! | `stale_token_is_refused` | a write with an older token never lands |
//! | `live_lease_is_not_granted_again` / `expired_lease_is_granted_again` | grant only if the lease is free or expired, at the batch's clock |
//! | `token_has_one_owner`, `slot_has_one_run`, `run_id_keeps_its_job`, `terminal_run_is_final` | the other write rules |
//! | `history_queries_filter_and_page` / `audit_queries_filter_and_page` | history by job, state and time, paged without gaps or repeats |
//! | `prune_forgets_runs_with_their_slot_claims` | the history policy deletes runs with their audit and their slot claims; a stored run's claim holds |
//! | `concurrent_writers_all_land` | batches from many threads (and handles) are all applied, none lost or mixed |
//! | `contended_grants_have_one_winner` | many writers granting one run at once: exactly one grant lands |

// A test suite: a panic is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use keel_core::{
    drive, Actor, AuditQuery, AuditRecord, Batch, BatchId, Conflict, Effect, FencingToken, JobId,
    JobSpec, Lease, Outcome, Record, RetryPolicy, Run, RunId, RunQuery, RunRecord, RunState,
    RunTerms, ScheduleSpec, Scheduler, Snapshot, StateName, Store, StoreError, Timestamp, Trigger,
    WorkerId,
};

use keel_testkit::MemStore;

/// Opens a handle on one store location; every call is like another process opening it.
pub type Opener<S> = Box<dyn Fn() -> S + Send + Sync>;

/// How the suite creates stores of one adapter.
pub trait Harness {
    /// The adapter.
    type Store: Store + 'static;

    /// A new, empty store at a fresh location, and the way to open it (again).
    fn fresh(&self) -> Opener<Self::Store>;

    /// True if several handles may be open on one location at once (store-fs: yes, several
    /// processes share a data directory; sled: no, it locks its directory). When false, the
    /// suite drops a handle before opening the next, and shares one handle between threads.
    fn concurrent_handles(&self) -> bool {
        true
    }
}

/// Expands to one `#[test]` per conformance check, for the harness expression given.
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance_suite!(@tests $harness;
            empty_store_restores_empty,
            acknowledged_state_survives_reopen,
            refused_batch_applies_nothing,
            deposed_writer_is_refused,
            stale_token_is_refused,
            live_lease_is_not_granted_again,
            expired_lease_is_granted_again,
            token_has_one_owner,
            slot_has_one_run,
            run_id_keeps_its_job,
            terminal_run_is_final,
            history_queries_filter_and_page,
            audit_queries_filter_and_page,
            prune_forgets_runs_with_their_slot_claims,
            concurrent_writers_all_land,
            contended_grants_have_one_winner,
        );
    };
    (@tests $harness:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::$check(&$harness);
            }
        )*
    };
}

/// The instant every fixture is built around.
pub const T0: Timestamp = Timestamp(1_800_000_000_000);

fn job_id(name: &str) -> JobId {
    JobId::new(name).expect("valid test job name")
}

/// A batch of `records` from writer `epoch`, built at `at`.
pub fn batch(epoch: u64, n: u64, at: Timestamp, records: Vec<Record>) -> Batch {
    Batch {
        id: BatchId((epoch << 32) + n),
        at,
        records,
    }
}

/// A scheduled run of `job` for `slot`, as a scheduler would first write it.
pub fn run(id: u64, job: &str, slot: Timestamp) -> Run {
    let terms = RunTerms {
        external: true,
        ..RunTerms::new("work")
    };
    run_with(id, job, slot, terms)
}

/// Like [`run`], under `terms`.
pub fn run_with(id: u64, job: &str, slot: Timestamp, terms: RunTerms) -> Run {
    Run::new(
        RunId(id),
        job_id(job),
        Trigger::Scheduled { slot },
        slot,
        terms,
    )
}

/// A one-shot job of kind `work` due at [`T0`], as stored before it fires.
pub fn once_job(name: &str) -> keel_core::Job {
    keel_core::Job {
        spec: JobSpec::new(job_id(name), "work", ScheduleSpec::Once { at: T0 }),
        state: keel_core::JobState::Scheduled { next: T0 },
        backlog: Default::default(),
        last_fired: None,
        active_runs: 0,
        delete_when_idle: false,
        last_run: None,
        failures_in_a_row: 0,
    }
}

/// Delivery `id` of run `run` (job `a`, succeeded) to sink `hook`, waiting to be sent at
/// [`T0`], as the outbox stores it.
pub fn delivery(id: u64, run: u64) -> keel_core::Delivery {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "sink": "hook",
        "payload": {
            "run": run,
            "job": "a",
            "state": "succeeded",
            "summary": "ok",
            "error": null,
            "finished_at": T0.0,
        },
        "attempt": 0,
        "state": { "state": "waiting", "due": T0.0 },
        "created_at": T0.0,
        "last_error": null,
    }))
    .expect("a valid delivery")
}

/// `run` leased to `owner` with `token` until `expires_at`.
pub fn leased(run: Run, owner: &str, token: u64, expires_at: Timestamp) -> Run {
    edit(run, |r| {
        r.state = RunState::Running {
            attempt: keel_core::Attempt(1),
            started_at: T0,
        };
        r.lease = Some(Lease {
            owner: WorkerId::new(owner).expect("valid worker id"),
            token: FencingToken(token),
            renewed_at: T0,
            expires_at,
        });
    })
}

/// `run` with its stored form changed by `change`: how a test makes a run in any state, since
/// only the scheduler changes a [`Run`].
pub fn edit(run: Run, change: impl FnOnce(&mut RunRecord)) -> Run {
    let mut record = run.record();
    change(&mut record);
    Run::from_record(record)
}

/// Writes one run in a batch of its own.
fn put_run(
    store: &impl Store,
    epoch: u64,
    n: u64,
    at: Timestamp,
    run: Run,
) -> Result<(), StoreError> {
    store.apply(&batch(epoch, n, at, vec![Record::PutRun(run)]))
}

fn unwrap_conflict(result: Result<(), StoreError>) -> Conflict {
    match result {
        Err(StoreError::Conflict(conflict)) => conflict,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Restores a writer on `store` and returns its epoch.
fn become_writer(store: &impl Store) -> u64 {
    store.restore().expect("restore").meta.epoch + 1
}

/// Drives a real scheduler against a store, acknowledging every batch the store accepts, and
/// keeps the acknowledged batches for a model store to replay.
struct Driver<'a, S: Store> {
    store: &'a S,
    scheduler: Scheduler,
    now: Timestamp,
    acknowledged: Vec<Batch>,
}

impl<'a, S: Store> Driver<'a, S> {
    fn new(store: &'a S) -> Self {
        let snapshot = store.restore().expect("restore");
        let scheduler = Scheduler::restore(Default::default(), 7, T0, snapshot);
        Driver {
            store,
            scheduler,
            now: T0,
            acknowledged: Vec::new(),
        }
    }

    /// Runs every effect to completion (`keel_core::drive`): batches go to the store, attempts
    /// end at once (every third fails retryably), external work is claimed by one worker.
    fn pump(&mut self) {
        let worker = WorkerId::new("worker-1").expect("valid worker id");
        loop {
            let _ = self.scheduler.claim(self.now, &worker, &["remote"]);
            let acknowledged = &mut self.acknowledged;
            let store = self.store;
            let write = |batch: &Batch| {
                store.apply(batch)?;
                acknowledged.push(batch.clone());
                Ok(())
            };
            let drained = drive::drain(&mut self.scheduler, self.now, write, end_at_once)
                .expect("the store accepts the writer's batch");
            if drained.is_empty() {
                break;
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
        self.scheduler.handle_timeout(self.now);
        self.pump();
    }
}

/// Ends an attempt at once: every third fails retryably, the rest succeed.
fn end_at_once(scheduler: &mut Scheduler, now: Timestamp, effect: Effect) {
    if let Effect::StartAttempt(start) = effect {
        let outcome = if start.run.0 % 3 == 0 {
            Outcome::Retryable {
                message: "flaky".into(),
            }
        } else {
            Outcome::Success {
                summary: Some("ok".into()),
                artifacts: Default::default(),
            }
        };
        scheduler
            .handle_outcome(now, start.run, start.lease.token, outcome)
            .expect("the holder's outcome is accepted");
    }
}

/// Sorts everything in a snapshot by id, so snapshots from different stores compare equal.
fn normalized(mut snapshot: Snapshot) -> Snapshot {
    snapshot.jobs.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
    // Derived on restore, never stored (`#[serde(skip)]`).
    for job in &mut snapshot.jobs {
        job.active_runs = 0;
    }
    snapshot.runs.sort_by_key(|r| r.id());
    snapshot.tombstones.sort_by(|a, b| a.job.cmp(&b.job));
    snapshot.incidents.sort_by_key(|i| i.id);
    snapshot.deliveries.sort_by_key(|d| d.id);
    snapshot
}

/// A new store restores to nothing, at epoch 0.
pub fn empty_store_restores_empty(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    assert_eq!(normalized(store.read().unwrap()), Snapshot::default());
    let snapshot = store.restore().unwrap();
    assert_eq!(snapshot.meta.epoch, 0);
    assert!(snapshot.jobs.is_empty() && snapshot.runs.is_empty());
    assert_eq!(store.runs(&RunQuery::default()).unwrap().runs, Vec::new());
    assert_eq!(store.incidents().unwrap(), Vec::new());
}

/// A real scheduler's acknowledged batches are exactly what a new handle reads and restores.
pub fn acknowledged_state_survives_reopen(harness: &impl Harness) {
    let open = harness.fresh();
    let acknowledged = {
        let store = open();
        let mut driver = Driver::new(&store);
        let every_second = ScheduleSpec::Cron {
            expr: "* * * * * *".into(),
            zone: "UTC".into(),
        };
        let mut local = JobSpec::new(job_id("local"), "work", every_second.clone());
        local.retry = RetryPolicy {
            attempts_max: 2,
            ..RetryPolicy::default()
        };
        let mut remote = JobSpec::new(job_id("remote-job"), "remote", every_second);
        remote.external = true;
        let once = JobSpec::new(
            job_id("once"),
            "work",
            ScheduleSpec::Once {
                at: T0.plus_ms(2_500),
            },
        );
        for spec in [local, remote, once] {
            driver.scheduler.add_job(driver.now, spec).unwrap();
        }
        driver.pump();
        for _ in 0..20 {
            driver.advance(500);
        }
        driver
            .scheduler
            .pause_job(driver.now, &job_id("local"))
            .unwrap();
        driver.pump();
        driver.acknowledged
    };
    assert!(
        acknowledged.len() > 5,
        "the scenario wrote {} batches",
        acknowledged.len()
    );

    let mut model = MemStore::new();
    let _ = model.restore(); // the scheduler's writer epoch
    for batch in &acknowledged {
        model.apply(batch);
    }
    let store = open();
    assert_eq!(
        normalized(store.read().unwrap()),
        normalized(model.snapshot()),
        "a new handle reads exactly what was acknowledged"
    );
    let mut restored = normalized(store.restore().unwrap());
    let mut expected = normalized(model.snapshot());
    // The one thing restore adds: the writer epoch it hands out.
    assert_eq!(restored.meta.epoch, expected.meta.epoch);
    restored.meta.epoch = 0;
    expected.meta.epoch = 0;
    assert_eq!(restored, expected);

    // History includes terminal runs the scheduler forgot.
    let all = store
        .runs(&RunQuery {
            limit: 1_000,
            ..RunQuery::default()
        })
        .unwrap();
    let stored: Vec<RunId> = all.runs.iter().map(|r| r.id()).collect();
    let mut modelled: Vec<RunId> = model.runs().map(|r| r.id()).collect();
    modelled.reverse();
    assert_eq!(stored, modelled);
    assert!(all.runs.iter().any(|r| r.state() == RunState::Succeeded));
    for run in model.runs() {
        assert_eq!(store.run(run.id()).unwrap().as_ref(), Some(run));
    }
    let audit = all_audit(&store);
    assert_eq!(audit, model.audit().cloned().collect::<Vec<_>>());
}

/// A batch with one refused record applies none of its records.
pub fn refused_batch_applies_nothing(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    let done = edit(run(1, "a", T0), |r| {
        r.state = RunState::Succeeded;
        r.finished_at = Some(T0);
    });
    put_run(&store, epoch, 0, T0, done.clone()).unwrap();

    let job = once_job("newcomer");
    let reopened = edit(done.clone(), |r| r.state = RunState::Queued { since: T0 });
    let records = vec![
        Record::PutJob(job.into()),
        Record::PutRun(run(2, "b", T0)),
        Record::PutRun(reopened),
    ];
    let conflict = unwrap_conflict(store.apply(&batch(epoch, 1, T0, records)));
    assert!(
        matches!(conflict, Conflict::TerminalRunChanged { run, .. } if run == RunId(1)),
        "{conflict:?}"
    );
    let after = store.read().unwrap();
    assert!(after.jobs.is_empty(), "the refused batch's job landed");
    assert_eq!(
        store.run(RunId(2)).unwrap(),
        None,
        "the refused batch's run landed"
    );
    assert_eq!(store.run(RunId(1)).unwrap(), Some(done));
}

/// `restore` fences every earlier writer; `read` fences nobody.
pub fn deposed_writer_is_refused(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let first = become_writer(&store);
    put_run(&store, first, 0, T0, run(1, "a", T0)).unwrap();
    let _ = store.read().unwrap();
    put_run(&store, first, 1, T0, run(2, "a", T0.plus_ms(1)))
        .expect("read does not depose the writer");

    let second = {
        // Another process (or a later incarnation) restores from the same store.
        let other = if harness.concurrent_handles() {
            Some(open())
        } else {
            None
        };
        become_writer(other.as_ref().unwrap_or(&store))
    };
    assert!(second > first, "epochs rise: {first} then {second}");
    let conflict = unwrap_conflict(put_run(&store, first, 2, T0, run(3, "a", T0.plus_ms(2))));
    assert_eq!(
        conflict,
        Conflict::Deposed {
            batch: first,
            current: second
        }
    );
    assert_eq!(store.run(RunId(3)).unwrap(), None);
    put_run(&store, second, 0, T0, run(3, "a", T0.plus_ms(2))).expect("the new writer writes");
    // A writer that never restored (epoch 0) is refused too.
    let conflict = unwrap_conflict(store.apply(&batch(0, 0, T0, vec![])));
    assert!(matches!(conflict, Conflict::Deposed { batch: 0, .. }));
}

fn stored_lease(harness: &impl Harness) -> (Opener<impl Store>, u64) {
    let open = harness.fresh();
    let epoch = {
        let store = open();
        let epoch = become_writer(&store);
        let held = leased(run(1, "a", T0), "w1", 5, T0.plus_ms(30_000));
        put_run(&store, epoch, 0, T0, held).unwrap();
        epoch
    };
    (open, epoch)
}

/// A write carrying an older token than the stored one never lands.
pub fn stale_token_is_refused(harness: &impl Harness) {
    let (open, epoch) = stored_lease(harness);
    let store = open();
    let stale = leased(run(1, "a", T0), "w0", 4, T0.plus_ms(30_000));
    let conflict = unwrap_conflict(put_run(&store, epoch, 1, T0, stale));
    assert_eq!(
        conflict,
        Conflict::StaleToken {
            run: RunId(1),
            token: FencingToken(4),
            current: FencingToken(5)
        }
    );
    // A write that knows no token at all is stale too.
    let unaware = unwrap_conflict(put_run(&store, epoch, 2, T0, run(1, "a", T0)));
    assert!(
        matches!(unaware, Conflict::StaleToken { .. }),
        "{unaware:?}"
    );
    // The holder's own write (same token) lands.
    let progressed = edit(leased(run(1, "a", T0), "w1", 5, T0.plus_ms(30_000)), |r| {
        r.summary = Some("half way".into())
    });
    put_run(&store, epoch, 3, T0, progressed.clone()).unwrap();
    assert_eq!(store.run(RunId(1)).unwrap(), Some(progressed));
}

/// A live lease is not granted again, unless the writer saw it end.
pub fn live_lease_is_not_granted_again(harness: &impl Harness) {
    let (open, epoch) = stored_lease(harness);
    let store = open();
    let before_expiry = T0.plus_ms(29_999);
    let grab = leased(run(1, "a", T0), "w2", 6, T0.plus_ms(60_000));
    let conflict = unwrap_conflict(put_run(&store, epoch, 1, before_expiry, grab.clone()));
    assert_eq!(
        conflict,
        Conflict::LeaseHeld {
            run: RunId(1),
            owner: "w1".into(),
            token: FencingToken(5),
            expires_at: T0.plus_ms(30_000)
        }
    );
    // The writer saw token 5 end (the holder finished), so it may grant 6 at once.
    let regrant = edit(grab, |r| r.last_token = Some(FencingToken(5)));
    put_run(&store, epoch, 2, before_expiry, regrant.clone()).unwrap();
    assert_eq!(store.run(RunId(1)).unwrap(), Some(regrant));
}

/// An expired lease may be granted to another holder.
pub fn expired_lease_is_granted_again(harness: &impl Harness) {
    let (open, epoch) = stored_lease(harness);
    let store = open();
    let grab = leased(run(1, "a", T0), "w2", 6, T0.plus_ms(60_000));
    put_run(&store, epoch, 1, T0.plus_ms(30_000), grab.clone()).unwrap();
    assert_eq!(store.run(RunId(1)).unwrap(), Some(grab));
    // The old holder's write is now stale.
    let old = leased(run(1, "a", T0), "w1", 5, T0.plus_ms(30_000));
    let conflict = unwrap_conflict(put_run(&store, epoch, 2, T0, old));
    assert!(
        matches!(conflict, Conflict::StaleToken { .. }),
        "{conflict:?}"
    );
}

/// A token is granted to one owner.
pub fn token_has_one_owner(harness: &impl Harness) {
    let (open, epoch) = stored_lease(harness);
    let store = open();
    let impostor = leased(run(1, "a", T0), "w9", 5, T0.plus_ms(30_000));
    let conflict = unwrap_conflict(put_run(&store, epoch, 1, T0, impostor));
    assert_eq!(
        conflict,
        Conflict::TokenReused {
            run: RunId(1),
            token: FencingToken(5),
            owner: "w1".into(),
            claimed_by: "w9".into()
        }
    );
}

/// A `(job, slot)` belongs to one run, in one batch or across batches.
pub fn slot_has_one_run(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    put_run(&store, epoch, 0, T0, run(1, "a", T0)).unwrap();
    let conflict = unwrap_conflict(put_run(&store, epoch, 1, T0, run(2, "a", T0)));
    assert_eq!(
        conflict,
        Conflict::SlotTaken {
            job: job_id("a"),
            slot: T0,
            owner: RunId(1),
            run: RunId(2)
        }
    );
    let slot = T0.plus_ms(1_000);
    let twice = vec![
        Record::PutRun(run(3, "a", slot)),
        Record::PutRun(run(4, "a", slot)),
    ];
    let conflict = unwrap_conflict(store.apply(&batch(epoch, 2, T0, twice)));
    assert!(matches!(
        conflict,
        Conflict::SlotTaken {
            owner: RunId(3),
            run: RunId(4),
            ..
        }
    ));
    assert_eq!(store.run(RunId(3)).unwrap(), None);
    // The same slot of another job is another slot.
    put_run(&store, epoch, 3, T0, run(5, "b", T0)).unwrap();
}

/// A run id stays with its job.
pub fn run_id_keeps_its_job(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    put_run(&store, epoch, 0, T0, run(1, "a", T0)).unwrap();
    let conflict = unwrap_conflict(put_run(&store, epoch, 1, T0, run(1, "b", T0)));
    assert_eq!(
        conflict,
        Conflict::RunIdTaken {
            run: RunId(1),
            job: job_id("b"),
            stored: job_id("a")
        }
    );
}

/// A terminal run never changes state.
pub fn terminal_run_is_final(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    let done = edit(run(1, "a", T0), |r| {
        r.state = RunState::Failed;
        r.finished_at = Some(T0);
    });
    put_run(&store, epoch, 0, T0, done.clone()).unwrap();
    // Writing it again unchanged is harmless (a retried batch).
    put_run(&store, epoch, 1, T0, done.clone()).unwrap();
    let revived = edit(done, |r| r.state = RunState::Succeeded);
    let conflict = unwrap_conflict(put_run(&store, epoch, 2, T0, revived));
    assert_eq!(
        conflict,
        Conflict::TerminalRunChanged {
            run: RunId(1),
            stored: StateName::Failed,
            new: StateName::Succeeded
        }
    );
}

/// Writes `count` runs of jobs `a` and `b` alternately, one second apart; runs with an even
/// id succeeded.
fn history(store: &impl Store, epoch: u64, count: u64) {
    let runs = (1..=count)
        .map(|i| {
            let job = if i % 2 == 1 { "a" } else { "b" };
            let mut r = run(i, job, T0.plus_ms(i * 1_000));
            if i % 2 == 0 {
                r = edit(r, |r| {
                    r.state = RunState::Succeeded;
                    r.finished_at = Some(r.created_at);
                });
            }
            Record::PutRun(r)
        })
        .collect();
    store.apply(&batch(epoch, 0, T0, runs)).unwrap();
}

/// Run history filtered by job, state and time, paged without gaps or repeats.
pub fn history_queries_filter_and_page(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    history(&store, epoch, 25);

    let ids = |page: &keel_core::RunPage| page.runs.iter().map(|r| r.id().0).collect::<Vec<_>>();
    let first = store
        .runs(&RunQuery {
            limit: 10,
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(ids(&first), (16..=25).rev().collect::<Vec<_>>());
    assert_eq!(first.next, Some(RunId(16)));
    let mut seen: Vec<u64> = ids(&first);
    let mut next = first.next;
    while let Some(before) = next {
        let page = store
            .runs(&RunQuery {
                limit: 10,
                before: Some(before),
                ..RunQuery::default()
            })
            .unwrap();
        seen.extend(ids(&page));
        next = page.next;
    }
    assert_eq!(
        seen,
        (1..=25).rev().collect::<Vec<_>>(),
        "paging has no gaps or repeats"
    );

    let of_a = store
        .runs(&RunQuery {
            job: Some(job_id("a")),
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(
        ids(&of_a),
        (1..=25).rev().filter(|i| i % 2 == 1).collect::<Vec<_>>()
    );
    assert_eq!(of_a.next, None);

    let succeeded = store
        .runs(&RunQuery {
            state: Some(StateName::Succeeded),
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(
        ids(&succeeded),
        (1..=25).rev().filter(|i| i % 2 == 0).collect::<Vec<_>>()
    );

    let window = store
        .runs(&RunQuery {
            created_from: Some(T0.plus_ms(5_000)),
            created_until: Some(T0.plus_ms(8_000)),
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(ids(&window), vec![7, 6, 5]);
}

/// An audit record `seq` of `job` (and `run`), as a scheduler would append it.
pub fn audit_record(seq: u64, job: &str, run: Option<u64>, at: Timestamp) -> AuditRecord {
    AuditRecord {
        seq,
        at,
        job: job_id(job),
        run: run.map(RunId),
        attempt: None,
        fencing_token: None,
        old: None,
        new: StateName::Queued,
        actor: Actor::Scheduler,
        reason: format!("record {seq}"),
        output: None,
    }
}

/// A stuck-run incident `id` about run 1 of job `a`, open or resolved 5 ms after it opened.
pub fn incident(id: u64, resolved: bool) -> keel_core::Incident {
    keel_core::Incident {
        id,
        kind: keel_core::IncidentKind::StuckRun,
        opened_at: T0,
        resolved_at: resolved.then_some(T0.plus_ms(5)),
        job: Some(job_id("a")),
        run: Some(RunId(1)),
        worker: None,
        details: "no heartbeat".into(),
        queue: None,
        opened_by: None,
        acknowledged: None,
        resolved_by: None,
        escalated_at: None,
    }
}

/// The audit trail filtered by job, run and time, oldest first, paged by sequence number.
pub fn audit_queries_filter_and_page(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    let records = (1..=30)
        .map(|seq| {
            let job = if seq % 3 == 0 { "b" } else { "a" };
            Record::Audit(audit_record(seq, job, Some(seq % 5), T0.plus_ms(seq * 10)))
        })
        .collect();
    store.apply(&batch(epoch, 0, T0, records)).unwrap();
    let seqs = |records: Vec<AuditRecord>| records.iter().map(|r| r.seq).collect::<Vec<_>>();

    let page = store
        .audit(&AuditQuery {
            limit: 7,
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(seqs(page), (1..=7).collect::<Vec<_>>());
    let page = store
        .audit(&AuditQuery {
            limit: 7,
            after: Some(7),
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(seqs(page), (8..=14).collect::<Vec<_>>());
    let of_b = store
        .audit(&AuditQuery {
            job: Some(job_id("b")),
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(
        seqs(of_b),
        (1..=30).filter(|s| s % 3 == 0).collect::<Vec<_>>()
    );
    let of_run = store
        .audit(&AuditQuery {
            run: Some(RunId(2)),
            from: Some(T0.plus_ms(100)),
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(seqs(of_run), vec![12, 17, 22, 27]);
    // Written again (a retried batch), nothing is duplicated.
    let again = vec![Record::Audit(audit_record(1, "a", Some(1), T0.plus_ms(10)))];
    store.apply(&batch(epoch, 1, T0, again)).unwrap();
    let all = store
        .audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .unwrap();
    assert_eq!(all.len(), 30);
}

/// The history policy deletes terminal runs with their audit and their slot claims, so claims
/// stay bounded by the history kept; a stored run's claim holds. Once a run is pruned, the
/// job's cursor (stored with the job) is what keeps its slot from firing again.
pub fn prune_forgets_runs_with_their_slot_claims(harness: &impl Harness) {
    let open = harness.fresh();
    let store = open();
    let epoch = become_writer(&store);
    history(&store, epoch, 10);
    let audit: Vec<Record> = (1..=10)
        .map(|i| {
            Record::Audit(audit_record(
                i,
                if i % 2 == 1 { "a" } else { "b" },
                Some(i),
                T0,
            ))
        })
        .collect();
    store.apply(&batch(epoch, 1, T0, audit)).unwrap();
    // Keep the newest two terminal runs of b (8 and 10); a's runs are not terminal.
    let prune = Record::PruneHistory {
        job: Some(job_id("b")),
        keep_last: 2,
        finished_before: Timestamp(0),
    };
    store.apply(&batch(epoch, 2, T0, vec![prune])).unwrap();
    let of_b = store
        .runs(&RunQuery {
            job: Some(job_id("b")),
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(
        of_b.runs.iter().map(|r| r.id().0).collect::<Vec<_>>(),
        vec![10, 8]
    );
    assert_eq!(store.runs(&RunQuery::default()).unwrap().runs.len(), 7);
    let audit = store.audit(&AuditQuery::default()).unwrap();
    let runs: BTreeSet<u64> = audit.iter().filter_map(|r| r.run).map(|r| r.0).collect();
    assert_eq!(runs, BTreeSet::from([1, 3, 5, 7, 9, 8, 10]));
    // Pruned by age, across all jobs.
    let prune = Record::PruneHistory {
        job: None,
        keep_last: 100,
        finished_before: T0.plus_ms(9_000),
    };
    store.apply(&batch(epoch, 3, T0, vec![prune])).unwrap();
    assert_eq!(store.run(RunId(8)).unwrap(), None);
    assert!(store.run(RunId(10)).unwrap().is_some());
    // Run 10 is stored: its slot is claimed.
    let conflict = unwrap_conflict(put_run(
        &store,
        epoch,
        4,
        T0,
        run(99, "b", T0.plus_ms(10_000)),
    ));
    assert!(
        matches!(
            conflict,
            Conflict::SlotTaken {
                owner: RunId(10),
                ..
            }
        ),
        "{conflict:?}"
    );
    // Run 2 was pruned, and its claim with it.
    put_run(&store, epoch, 5, T0, run(99, "b", T0.plus_ms(2_000)))
        .expect("a pruned run's slot claim goes with it");
}

fn handles<S: Store + 'static>(
    harness: &impl Harness<Store = S>,
    open: &Opener<S>,
    n: usize,
) -> Vec<Arc<S>> {
    if harness.concurrent_handles() {
        (0..n).map(|_| Arc::new(open())).collect()
    } else {
        let shared = Arc::new(open());
        (0..n).map(|_| Arc::clone(&shared)).collect()
    }
}

/// Runs `work(t, store, start)` on one thread per handle, `t` counting from 0; each calls
/// `start.wait()` when it is ready to race the others. Returns what each returned, in order.
fn race<S: Store + 'static, T: Send + 'static>(
    stores: Vec<Arc<S>>,
    work: impl Fn(u64, Arc<S>, &Barrier) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let start = Arc::new(Barrier::new(stores.len()));
    let work = Arc::new(work);
    let threads: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(t, store)| {
            let (start, work) = (Arc::clone(&start), Arc::clone(&work));
            std::thread::spawn(move || work(t as u64, store, &start))
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("a racing thread"))
        .collect()
}

/// Every audit record in `store`, oldest first.
fn all_audit(store: &impl Store) -> Vec<AuditRecord> {
    store
        .audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .unwrap()
}

/// Batches from many threads, each on its own handle where the adapter allows it, all land.
pub fn concurrent_writers_all_land(harness: &impl Harness) {
    const THREADS: u64 = 8;
    const BATCHES: u64 = 25;
    let open = harness.fresh();
    let epoch = become_writer(&open());
    race(
        handles(harness, &open, THREADS as usize),
        move |t, store, start| {
            start.wait();
            for b in 0..BATCHES {
                let id = 1 + t * BATCHES + b;
                let job = format!("job-{t}");
                let records = vec![
                    Record::PutRun(run(id, &job, T0.plus_ms(b))),
                    Record::Audit(audit_record(id, &job, Some(id), T0)),
                ];
                store
                    .apply(&batch(epoch, t * 1_000 + b, T0, records))
                    .expect("every writer's batch lands");
            }
        },
    );
    let store = open();
    let all = store
        .runs(&RunQuery {
            limit: 10_000,
            ..RunQuery::default()
        })
        .unwrap();
    assert_eq!(all.runs.len() as u64, THREADS * BATCHES);
    let audit = all_audit(&store);
    assert_eq!(audit.len() as u64, THREADS * BATCHES);
    for record in audit {
        let run = store.run(record.run.unwrap()).unwrap().unwrap();
        assert_eq!(run.job(), &record.job, "a batch's records landed together");
    }
}

/// Many writers grant the same free run at once: exactly one grant lands, and it is the one
/// stored.
pub fn contended_grants_have_one_winner(harness: &impl Harness) {
    const THREADS: u64 = 8;
    let open = harness.fresh();
    let epoch = {
        let store = open();
        let epoch = become_writer(&store);
        put_run(&store, epoch, 0, T0, run(1, "a", T0)).unwrap();
        epoch
    };
    let stores = handles(harness, &open, THREADS as usize);
    let results = race(stores, move |t, store, start| {
        let grant = leased(
            run(1, "a", T0),
            &format!("w{t}"),
            10 + t,
            T0.plus_ms(30_000),
        );
        // Each contender saw the run free (it never held a token).
        let grant = edit(grant, |r| r.last_token = None);
        start.wait();
        let result = put_run(&*store, epoch, 1 + t, T0, grant);
        (t, result)
    });
    let winners: Vec<u64> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "winners: {winners:?}; results: {results:?}"
    );
    for (_, result) in &results {
        if let Err(e) = result {
            assert!(
                matches!(
                    e,
                    StoreError::Conflict(Conflict::LeaseHeld { .. } | Conflict::StaleToken { .. })
                ),
                "{e:?}"
            );
        }
    }
    let stored = open().run(RunId(1)).unwrap().unwrap();
    let lease = stored.lease().expect("the winner's lease is stored");
    assert_eq!(lease.owner.to_string(), format!("w{}", winners[0]));
    assert_eq!(lease.token, FencingToken(10 + winners[0]));
}

//! What the scheduler promised, as keel's two model-checking worlds track it.
//!
//! The sequence proptest (`tests/sequences`) and the `core_events` fuzz body
//! ([`crate::fuzzing`]) drive a [`Scheduler`] with different inputs (proptest operations,
//! decoded bytes) but hold it to the same promises: claims, one extension per run (SPEC W1),
//! sticky kills (W2), the save after a failed save is written (C1), and each delivery sent once
//! per attempt, only once durable, and counted once when it ends (D1–D4). [`Promises`] is that
//! bookkeeping and its checks, written once; each world keeps what is its own (its executor,
//! its clock, its statistics).
//!
//! | event | method |
//! |---|---|
//! | `Effect::Deliver` | [`Promises::sent`] |
//! | a delivery's `Finished` or `Dropped` event | [`Promises::ended`] |
//! | a crash and restore | [`Promises::after_crash`] |
//! | `begin_shutdown` | [`own_attempts_in_progress`] |
//! | `extend` | [`expected_extend`] |
//! | a checkpoint flush | [`checkpoint_seqs`], [`Promises::flushed_since`] |

use std::collections::{BTreeMap, BTreeSet};

use keel_core::{
    Attempt, Batch, DeliveryId, DeliveryState, Lease, Record, Rejected, RunId, RunState, Scheduler,
    SendRequest, Timestamp, WorkerId,
};
use keel_testkit::MemStore;

/// The promises one world holds its scheduler to.
#[derive(Debug, Default)]
pub struct Promises {
    /// Runs claimed by an external worker, and by whom.
    pub claims: BTreeMap<RunId, WorkerId>,
    /// Extensions granted per run (SPEC W1: at most one).
    pub extended: BTreeMap<RunId, u32>,
    /// Attempts killed by the watchdog (SPEC W2: sticky).
    pub killed: BTreeSet<(RunId, Attempt)>,
    /// Runs whose last checkpoint save failed: the attempt's next save must be written (C1).
    pub must_write: BTreeMap<RunId, Attempt>,
    /// Checkpoint saves written by a flush.
    pub flushed: BTreeSet<(RunId, u64)>,
    /// Sends in flight, by delivery.
    pub sends: BTreeMap<DeliveryId, SendRequest>,
    /// Every `(delivery, attempt)` ever sent (D1: never twice, across crashes too).
    pub sent: BTreeSet<(DeliveryId, u32)>,
    /// Sends answered or lost: answers to them are stale.
    pub answered: Vec<(DeliveryId, u32)>,
    /// Deliveries that ended (were counted) in this incarnation and are still durable.
    pub ended: BTreeSet<DeliveryId>,
    /// Every delivery that ever ended.
    pub ended_ever: BTreeSet<DeliveryId>,
    /// Deliveries whose end was written but not yet announced.
    pub awaiting_end: BTreeSet<DeliveryId>,
    /// Deliveries whose end a crash may have swallowed between the write and its event.
    pub uncounted: BTreeSet<DeliveryId>,
}

impl Promises {
    /// `batch` became durable in `store`: the deliveries it deletes have ended, and their end
    /// is announced next.
    pub fn acknowledged(&mut self, batch: &Batch, store: &mut MemStore) {
        store.apply(batch);
        self.awaiting_end.extend(deleted_deliveries(batch));
    }

    /// `batch`, in flight when the process died, became durable without its acknowledgement:
    /// the ends of delivery it wrote may never be announced (a crash between the write and
    /// the event is allowed to swallow a count).
    pub fn durable_unacknowledged(&mut self, batch: &Batch, store: &mut MemStore) {
        store.apply(batch);
        self.uncounted.extend(deleted_deliveries(batch));
    }

    /// `Effect::Deliver`: released only once the record of that attempt is durable, carrying
    /// a durable terminal result, never twice for one attempt (across crashes too), and never
    /// while another attempt of the same delivery is in flight (SPEC D1).
    pub fn sent(&mut self, send: SendRequest, store: &MemStore) {
        let (id, attempt) = (send.id, send.attempt);
        assert!(
            self.sent.insert((id, attempt)),
            "{id} attempt {attempt} sent twice"
        );
        assert_eq!(
            store.delivery(id).map(|d| d.state),
            Some(DeliveryState::Sending { attempt }),
            "{id} attempt {attempt} sent before its record was durable"
        );
        // A run's result reports a durable terminal run; an incident notice, a durable
        // incident.
        if let Some(notice) = send.payload.incident() {
            assert!(
                store.incident(notice.id).is_some(),
                "{id} tells of incident #{} ({}), which the store does not hold",
                notice.id,
                notice.event.name()
            );
        }
        if let Some(result) = send.payload.run_result() {
            let run = store.run(result.run);
            assert!(
                run.is_some_and(|r| r.state().is_terminal() && r.state().name() == result.state),
                "{id} carries {} {}, but the store holds {run:?}",
                result.run,
                result.state
            );
        }
        let previous = self.sends.insert(id, send);
        assert!(previous.is_none(), "{id}: two attempts in flight");
    }

    /// A delivery's end was announced (SPEC D4): counted once, only once its end is durable
    /// (a delivery never written ends at once), and never with its send unanswered.
    pub fn ended(&mut self, id: DeliveryId, store: &MemStore) {
        assert!(
            self.ended.insert(id),
            "SPEC D4: {id} ended (was counted) twice"
        );
        self.ended_ever.insert(id);
        assert!(
            store.delivery(id).is_none(),
            "{id} ended before its end was durable"
        );
        self.awaiting_end.remove(&id);
        assert!(
            !self.sends.contains_key(&id),
            "{id} ended with its send unanswered"
        );
    }

    /// The process died and restarts from `store` (after any in-flight batch that became
    /// durable was applied): what was in flight is lost, and what outlives the process is what
    /// the store holds. An end of delivery is announced only once durable, so a delivery ends
    /// once across crashes too; only an id above the durable counter (of a delivery never
    /// written) may be handed out again.
    pub fn after_crash(&mut self, store: &MemStore) {
        self.uncounted.append(&mut self.awaiting_end);
        // Sends in flight die with the process: their answers are stale from now on.
        let lost = std::mem::take(&mut self.sends);
        self.answered
            .extend(lost.into_values().map(|send| (send.id, send.attempt)));
        self.claims.clear();
        self.must_write.clear();
        self.flushed.clear();
        let next_delivery = store.meta().next_delivery;
        self.ended.retain(|id| id.0 < next_delivery);
        self.extended = store
            .runs()
            .filter(|r| r.extended())
            .map(|r| (r.id(), 1))
            .collect();
        self.killed.retain(|(run, attempt)| {
            store
                .run(*run)
                .is_some_and(|r| r.killed() >= Some(*attempt))
        });
    }

    /// Who a lease of `run` must name: the worker that claimed it, or else `local`, the
    /// scheduler's own executor.
    pub fn owner_of(&self, run: RunId, local: &WorkerId) -> WorkerId {
        self.claims.get(&run).unwrap_or(local).clone()
    }

    /// `extend` answered `result` for `run_id`: a killed run is never extended (SPEC W2), and
    /// a run is extended at most once (W1).
    pub fn extend_answered(&mut self, run_id: RunId, result: &Result<Timestamp, Rejected>) {
        if self.killed.iter().any(|(run, _)| *run == run_id) {
            assert_eq!(result, &Err(Rejected::Killed(run_id)), "SPEC W2");
        }
        if result.is_ok() {
            let granted = self.extended.entry(run_id).or_default();
            *granted += 1;
            assert_eq!(*granted, 1, "SPEC W1: {run_id} extended twice");
        }
    }

    /// Every delivery the store ever held that never ended (bar those a crash may have
    /// swallowed): empty once a world has settled.
    pub fn never_ended<'a>(&'a self, store: &'a MemStore) -> Vec<&'a DeliveryId> {
        store
            .ever_delivered()
            .difference(&self.ended_ever)
            .filter(|id| !self.uncounted.contains(id))
            .collect()
    }

    /// After a flush: each save it wrote (a checkpoint whose sequence number moved since
    /// `before`) is the save that follows a failed one, if any.
    pub fn flushed_since(&mut self, core: &Scheduler, before: &BTreeMap<RunId, Option<u64>>) {
        let written: Vec<(RunId, u64)> = core
            .runs()
            .filter_map(|r| {
                let seq = r.checkpoint().map(|c| c.seq);
                (seq != before.get(&r.id()).copied().flatten()).then_some((r.id(), seq))
            })
            .map(|(run, seq)| (run, seq.expect("a flush writes checkpoints, never deletes")))
            .collect();
        for (run, seq) in written {
            self.flushed.insert((run, seq));
            self.must_write.remove(&run);
        }
    }
}

/// The deliveries a batch deletes: each one ended.
pub fn deleted_deliveries(batch: &Batch) -> impl Iterator<Item = DeliveryId> + '_ {
    batch.records.iter().filter_map(|r| match r {
        Record::DeleteDelivery { id } => Some(*id),
        _ => None,
    })
}

/// Whether `result` refuses a write for `run` with `token` as a stale holder's write must be
/// refused (SPEC L1): a stale token (naming the `current` one), a run no longer running, or a
/// run the scheduler does not `know`.
pub fn refused_as_stale<T>(
    result: &Result<T, Rejected>,
    run: RunId,
    token: keel_core::FencingToken,
    current: Option<keel_core::FencingToken>,
    known: bool,
) -> bool {
    match result {
        Err(Rejected::StaleToken {
            run: r,
            got,
            current: c,
        }) => *r == run && *got == token && *c == current,
        Err(Rejected::NotRunning { run: r, .. }) => *r == run,
        Err(Rejected::UnknownRun(r)) => *r == run && !known,
        _ => false,
    }
}

/// The artifacts `run` requires that `outcome` lacks: a success without them is refused and
/// the attempt keeps running. Empty for any other outcome.
pub fn missing_artifacts(run: &keel_core::Run, outcome: &keel_core::Outcome) -> Vec<String> {
    match outcome {
        keel_core::Outcome::Success { artifacts, .. } => run
            .required_artifacts()
            .iter()
            .filter(|name| !artifacts.contains_key(*name))
            .cloned()
            .collect(),
        _ => Vec::new(),
    }
}

/// The checkpoint sequence number of every run in memory.
pub fn checkpoint_seqs(core: &Scheduler) -> BTreeMap<RunId, Option<u64>> {
    core.runs()
        .map(|r| (r.id(), r.checkpoint().map(|c| c.seq)))
        .collect()
}

/// An attempt in progress, with its lease, as the scheduler holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InProgress {
    /// The run.
    pub run: RunId,
    /// The attempt.
    pub attempt: Attempt,
    /// When it started.
    pub started_at: Timestamp,
    /// Its lease.
    pub lease: Lease,
    /// The run's attempt timeout.
    pub timeout_ms: Option<u64>,
}

/// Every attempt in progress with a lease: after a restore, what outlived the process (SPEC
/// L3: attempts of external workers, with their leases as the store holds them).
pub fn attempts_in_progress(core: &Scheduler) -> Vec<InProgress> {
    core.runs()
        .filter_map(|r| match (r.state(), r.lease()) {
            (
                RunState::Running {
                    attempt,
                    started_at,
                },
                Some(lease),
            ) => Some(InProgress {
                run: r.id(),
                attempt,
                started_at,
                lease: lease.clone(),
                timeout_ms: r.timeout_ms(),
            }),
            _ => None,
        })
        .collect()
}

/// The scheduler's own attempts in progress: what `begin_shutdown` must list.
pub fn own_attempts_in_progress(core: &Scheduler) -> BTreeSet<(RunId, Attempt)> {
    core.runs()
        .filter(|r| r.lease().is_some_and(|l| &l.owner == core.worker()))
        .filter_map(|r| match r.state() {
            RunState::Running { attempt, .. } => Some((r.id(), attempt)),
            _ => None,
        })
        .collect()
}

/// What `extend(now, run_id, by_ms, _)` must answer (SPEC W1, W2): refused for an unknown,
/// killed, not running or already extended run, for one without a timeout or already timed
/// out; otherwise the new deadline, capped by the backstop.
pub fn expected_extend(
    core: &Scheduler,
    run_id: RunId,
    now: Timestamp,
    by_ms: u64,
) -> Result<Timestamp, Rejected> {
    let now = core.now().max(now);
    match core.run(run_id) {
        None => Err(Rejected::UnknownRun(run_id)),
        Some(run) if run.killed().is_some() => Err(Rejected::Killed(run_id)),
        Some(run) if !matches!(run.state(), RunState::Running { .. }) => {
            Err(Rejected::NotRunning {
                run: run_id,
                state: run.state().name(),
            })
        }
        Some(run) if run.extended() => Err(Rejected::AlreadyExtended(run_id)),
        Some(run) => match (run.watch().timeout_at, run.watch().kill_at) {
            (None, _) => Err(Rejected::NoTimeout(run_id)),
            (Some(_), Some(_)) => Err(Rejected::TimedOut(run_id)),
            (Some(timeout_at), None) => {
                let extended = timeout_at.max(now).plus_ms(by_ms);
                Ok(run
                    .watch()
                    .backstop_at
                    .map_or(extended, |cap| extended.min(cap)))
            }
        },
    }
}

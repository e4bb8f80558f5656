//! The property test: random sequences of enqueues, sends, answers, store writes and restarts
//! keep the invariants and end each delivery exactly once.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::super::*;
use super::{payload, T0};

/// One step of a random sequence.
#[derive(Clone, Debug)]
pub(super) enum Op {
    /// A run finishes with this many sinks (1 to 3).
    Enqueue(usize),
    /// Take the outbox's writes into a batch the store has not written yet.
    Take,
    /// The store writes the oldest pending batch and acknowledges it.
    Ack,
    /// The clock moves on by this many milliseconds and the timer fires.
    Advance(u64),
    /// The clock jumps to the next deadline and the timer fires.
    Fire,
    /// The driver takes a send.
    PollSend,
    /// A sink answers the send at this index (modulo) with this kind of result.
    Answer(usize, u8),
    /// An answer arrives again, late.
    Repeat(usize),
    /// Graceful restart: every write reaches the store, then the outbox is restored.
    Restart,
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..=3).prop_map(Op::Enqueue),
        3 => Just(Op::Take),
        3 => Just(Op::Ack),
        2 => (0u64..200_000).prop_map(Op::Advance),
        2 => Just(Op::Fire),
        4 => Just(Op::PollSend),
        5 => (any::<usize>(), 0u8..5).prop_map(|(i, k)| Op::Answer(i, k)),
        1 => any::<usize>().prop_map(Op::Repeat),
        1 => Just(Op::Restart),
    ]
}

pub(super) fn scenario() -> impl Strategy<Value = (usize, bool, u32, Vec<Op>)> {
    (
        1usize..6,
        any::<bool>(),
        1u32..=4,
        proptest::collection::vec(op(), 1..120),
    )
}

/// What a scenario reached, to show the property test is not vacuous.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) sends: usize,
    pub(super) retries: usize,
    pub(super) statuses: BTreeSet<DeliveryStatus>,
    pub(super) drops: BTreeSet<(bool, DropReason)>,
    pub(super) refusals: usize,
    pub(super) restarts_in_flight: usize,
}

struct World {
    outbox: Outbox,
    config: OutboxConfig,
    now: Timestamp,
    store: BTreeMap<DeliveryId, Delivery>,
    store_next_id: u64,
    pending: VecDeque<(Vec<Delivery>, Vec<DeliveryId>, u64)>,
    in_flight: Vec<SendRequest>,
    answered: Vec<(DeliveryId, u32)>,
    /// Terminal events (`Finished` or `Dropped` with an id) per delivery.
    terminal: BTreeMap<DeliveryId, u32>,
    sends_per_delivery: BTreeMap<DeliveryId, u32>,
    runs: u64,
    stats: Stats,
}

impl World {
    fn step(&mut self, op: &Op) {
        match op {
            Op::Enqueue(n) => {
                self.runs += 1;
                let sinks: Vec<Arc<str>> = (0..*n).map(|i| format!("sink-{i}").into()).collect();
                self.outbox.enqueue(self.now, &sinks, &payload(self.runs));
            }
            Op::Take => {
                let (upserts, deletes) = self.outbox.take_writes();
                let next_id = self.outbox.next_id();
                self.pending.push_back((upserts, deletes, next_id));
            }
            Op::Ack => {
                if let Some(batch) = self.pending.pop_front() {
                    let ids = self.write(batch);
                    self.outbox.mark_durable(&ids);
                }
            }
            Op::Advance(ms) => {
                self.now = self.now.plus_ms(*ms);
                self.fire();
            }
            Op::Fire => {
                if let Some(at) = self.outbox.poll_timeout() {
                    self.now = self.now.max(at);
                }
                self.fire();
            }
            Op::PollSend => {
                if let Some(request) = self.outbox.poll_send() {
                    // Persist before send: the store has the record already.
                    assert!(
                        self.store.contains_key(&request.id),
                        "{} sent before its record was written",
                        request.id
                    );
                    let sends = self.sends_per_delivery.entry(request.id).or_default();
                    *sends += 1;
                    assert!(
                        *sends <= self.config.policy.attempts_max,
                        "{} sent more than attempts_max times",
                        request.id
                    );
                    // A restart counts an attempt that was queued but never polled.
                    assert!(*sends <= request.attempt);
                    self.stats.sends += 1;
                    self.in_flight.push(request);
                }
            }
            Op::Answer(index, kind) => {
                if self.in_flight.is_empty() {
                    return;
                }
                let request = self.in_flight.remove(index % self.in_flight.len());
                let result = match kind {
                    0 | 1 => DeliveryResult::Delivered,
                    2 => classify_http(503, None, ""),
                    3 => classify_http(429, Some("100"), ""),
                    _ => classify_http(404, None, ""),
                };
                self.outbox
                    .handle_result(self.now, request.id, request.attempt, result)
                    .expect("an answer to the current attempt is accepted");
                self.answered.push((request.id, request.attempt));
            }
            Op::Repeat(index) => {
                if self.answered.is_empty() {
                    return;
                }
                let (id, attempt) = self.answered[index % self.answered.len()];
                let before = self.outbox.clone();
                let refused =
                    self.outbox
                        .handle_result(self.now, id, attempt, DeliveryResult::Delivered);
                assert!(refused.is_err(), "a repeated answer was accepted");
                assert_eq!(self.outbox, before, "a refused answer changed the outbox");
                self.stats.refusals += 1;
            }
            Op::Restart => {
                self.flush();
                self.stats.restarts_in_flight += self.outbox.in_flight().len();
                // Answers to the old process's sends are now stale.
                self.answered
                    .extend(self.in_flight.drain(..).map(|r| (r.id, r.attempt)));
                self.outbox = Outbox::restore(
                    self.config,
                    self.store.values().cloned().collect(),
                    self.store_next_id,
                    self.now,
                );
            }
        }
        self.outbox.check_invariants();
        self.drain_events();
    }

    fn fire(&mut self) {
        self.outbox.handle_timeout(self.now);
        assert!(self.outbox.poll_timeout().is_none_or(|t| t > self.now));
    }

    /// Writes a batch to the store and returns the ids it upserted.
    fn write(&mut self, batch: (Vec<Delivery>, Vec<DeliveryId>, u64)) -> Vec<DeliveryId> {
        let (upserts, deletes, next_id) = batch;
        let ids = upserts.iter().map(|d| d.id).collect();
        for d in upserts {
            self.store.insert(d.id, d);
        }
        for id in deletes {
            self.store.remove(&id);
        }
        self.store_next_id = next_id;
        ids
    }

    /// Writes every pending batch and every write not yet taken.
    fn flush(&mut self) {
        let (upserts, deletes) = self.outbox.take_writes();
        let next_id = self.outbox.next_id();
        self.pending.push_back((upserts, deletes, next_id));
        while let Some(batch) = self.pending.pop_front() {
            let ids = self.write(batch);
            self.outbox.mark_durable(&ids);
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.outbox.poll_event() {
            match event {
                OutboxEvent::Finished { id, status, .. } => {
                    self.stats.statuses.insert(status);
                    *self.terminal.entry(id).or_default() += 1;
                }
                OutboxEvent::Dropped { id, reason, .. } => {
                    self.stats.drops.insert((id.is_some(), reason));
                    if let Some(id) = id {
                        *self.terminal.entry(id).or_default() += 1;
                    }
                }
                OutboxEvent::RetryScheduled { at, .. } => {
                    assert!(at >= self.now);
                    self.stats.retries += 1;
                }
            }
        }
        if let Some((id, n)) = self.terminal.iter().find(|(_, n)| **n > 1) {
            panic!("{id} ended {n} times");
        }
    }

    /// Liveness: with every write acknowledged and every sink answering, the outbox
    /// empties, and then every delivery ever created has ended exactly once.
    fn drain(&mut self) {
        for _ in 0..1_000 {
            self.flush();
            self.outbox.check_invariants();
            for request in self.in_flight.drain(..) {
                self.outbox
                    .handle_result(
                        self.now,
                        request.id,
                        request.attempt,
                        DeliveryResult::Delivered,
                    )
                    .expect("current attempts are accepted");
            }
            self.drain_events();
            if self.outbox.is_empty() {
                break;
            }
            if let Some(at) = self.outbox.poll_timeout() {
                self.now = self.now.max(at);
            }
            self.fire();
            while let Some(request) = self.outbox.poll_send() {
                self.in_flight.push(request);
            }
        }
        assert!(self.outbox.is_empty(), "the outbox did not drain");
        for n in 1..self.outbox.next_id() {
            let id = DeliveryId(n);
            assert_eq!(self.terminal.get(&id), Some(&1), "{id} did not end once");
        }
    }
}

pub(super) fn run(scenario: &(usize, bool, u32, Vec<Op>)) -> Stats {
    let (capacity, drop_oldest, attempts_max, ops) = scenario;
    let config = OutboxConfig {
        capacity: *capacity,
        overflow: if *drop_oldest {
            OverflowPolicy::DropOldest
        } else {
            OverflowPolicy::RejectNewest
        },
        policy: DeliveryPolicy {
            attempts_max: *attempts_max,
            ..DeliveryPolicy::default()
        },
    };
    let mut world = World {
        outbox: Outbox::new(config),
        config,
        now: T0,
        store: BTreeMap::new(),
        store_next_id: 1,
        pending: VecDeque::new(),
        in_flight: Vec::new(),
        answered: Vec::new(),
        terminal: BTreeMap::new(),
        sends_per_delivery: BTreeMap::new(),
        runs: 0,
        stats: Stats::default(),
    };
    for op in ops {
        world.step(op);
    }
    world.drain();
    world.stats
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_sequences_keep_the_invariants_and_end_each_delivery_once(
        scenario in scenario()
    ) {
        run(&scenario);
    }
}

/// Guards against a vacuous property test: the same generator, with a fixed seed, must
/// reach every kind of step the property is about.
#[test]
fn random_sequences_reach_the_interesting_states() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let mut total = Stats::default();
    for _ in 0..32 {
        let scenario = strategy.new_tree(&mut runner).unwrap().current();
        let stats = run(&scenario);
        total.sends += stats.sends;
        total.retries += stats.retries;
        total.statuses.extend(stats.statuses);
        total.drops.extend(stats.drops);
        total.refusals += stats.refusals;
        total.restarts_in_flight += stats.restarts_in_flight;
    }
    assert!(total.sends > 50, "{total:?}");
    assert!(total.retries > 5, "{total:?}");
    assert_eq!(total.statuses.len(), 3, "{total:?}");
    assert!(
        total.drops.contains(&(true, DropReason::Evicted)),
        "{total:?}"
    );
    assert!(
        total.drops.contains(&(false, DropReason::Rejected)),
        "{total:?}"
    );
    assert!(total.refusals > 0, "{total:?}");
    assert!(total.restarts_in_flight > 0, "{total:?}");
}

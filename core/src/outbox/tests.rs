use super::*;

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn payload(run: u64) -> DeliveryPayload {
    DeliveryPayload::Run(RunResult {
        run: RunId(run),
        job: JobId::new("report").unwrap(),
        state: StateName::Succeeded,
        summary: Some("42 rows".into()),
        error: None,
        finished_at: T0,
    })
}

fn sink(name: &str) -> Arc<str> {
    name.into()
}

fn config(capacity: usize, overflow: OverflowPolicy) -> OutboxConfig {
    OutboxConfig {
        capacity,
        overflow,
        policy: DeliveryPolicy::default(),
    }
}

/// Persists the writes (here: drops them) and acknowledges the upserts, as a driver does.
fn persist(outbox: &mut Outbox) -> (Vec<Delivery>, Vec<DeliveryId>) {
    let (upserts, deletes) = outbox.take_writes();
    let ids: Vec<DeliveryId> = upserts.iter().map(|d| d.id).collect();
    outbox.mark_durable(&ids);
    (upserts, deletes)
}

/// One durable delivery to `hook`, enqueued at `now`.
fn durable_one(outbox: &mut Outbox, now: Timestamp) -> DeliveryId {
    let ids = outbox.enqueue(now, &[sink("hook")], &payload(1));
    persist(outbox);
    ids[0]
}

/// Fires the timer at `now` and takes the one send it must produce.
fn send_at(outbox: &mut Outbox, now: Timestamp) -> SendRequest {
    outbox.handle_timeout(now);
    let request = outbox.poll_send().expect("a send is due");
    assert_eq!(outbox.poll_send(), None);
    outbox.check_invariants();
    request
}

fn events(outbox: &mut Outbox) -> Vec<OutboxEvent> {
    std::iter::from_fn(|| outbox.poll_event()).collect()
}

/// The `Finished` event of a delivery of run 1 to `hook` (as `durable_one` makes).
fn finished(
    id: DeliveryId,
    status: DeliveryStatus,
    attempts: u32,
    error: Option<&str>,
) -> OutboxEvent {
    OutboxEvent::Finished {
        id,
        sink: sink("hook"),
        subject: DeliverySubject::Run(RunId(1)),
        status,
        attempts,
        error: error.map(String::from),
    }
}

fn transient(retry_after_ms: Option<u64>) -> DeliveryResult {
    DeliveryResult::Transient {
        error: "HTTP 503".into(),
        retry_after_ms,
    }
}

// ----- transitions ---------------------------------------------------------------------

#[test]
fn a_new_delivery_waits_for_durability_before_it_is_sent() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let ids = outbox.enqueue(T0, &[sink("hook")], &payload(1));
    assert_eq!(ids, vec![DeliveryId(1)]);
    assert_eq!(outbox.next_id(), 2);
    outbox.check_invariants();

    // Not durable: no timer, and even a late timeout sends nothing.
    assert_eq!(outbox.poll_timeout(), None);
    outbox.handle_timeout(T0.plus_ms(3_600_000));
    assert_eq!(outbox.poll_send(), None);
    assert!(!outbox.delivery(ids[0]).unwrap().is_durable());

    let (upserts, deletes) = outbox.take_writes();
    assert_eq!(deletes, vec![]);
    assert_eq!(upserts.len(), 1);
    assert_eq!(upserts[0].state, DeliveryState::Waiting { due: T0 });
    assert_eq!(upserts[0].attempt, 0);
    assert_eq!(outbox.take_writes(), (vec![], vec![]));

    outbox.mark_durable(&ids);
    outbox.check_invariants();
    // `now` has moved on to T0 + 1 h; the delivery was due at T0.
    assert_eq!(outbox.poll_timeout(), Some(T0));
    let request = send_at(&mut outbox, T0);
    assert_eq!(
        request,
        SendRequest {
            id: ids[0],
            sink: sink("hook"),
            payload: payload(1),
            attempt: 1
        }
    );
    let d = outbox.delivery(ids[0]).unwrap();
    assert_eq!(d.state, DeliveryState::Sending { attempt: 1 });
    assert_eq!(outbox.in_flight(), vec![ids[0]]);
    assert_eq!(outbox.poll_timeout(), None);
    let (upserts, _) = outbox.take_writes();
    assert_eq!(upserts[0].state, DeliveryState::Sending { attempt: 1 });
}

#[test]
fn delivered_finishes_success_once_and_deletes_the_record() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    let request = send_at(&mut outbox, T0);
    outbox
        .handle_result(
            T0.plus_ms(200),
            id,
            request.attempt,
            classify_http(200, None, ""),
        )
        .unwrap();
    outbox.check_invariants();
    assert_eq!(
        events(&mut outbox),
        vec![finished(id, DeliveryStatus::Success, 1, None)]
    );
    assert!(outbox.is_empty());
    assert_eq!(outbox.take_writes(), (vec![], vec![id]));
    // A repeated answer is refused and reports nothing.
    assert_eq!(
        outbox.handle_result(T0, id, 1, DeliveryResult::Delivered),
        Err(OutboxRejected::UnknownDelivery(id))
    );
    assert_eq!(events(&mut outbox), vec![]);
}

#[test]
fn a_404_is_permanent_and_never_retried() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0);
    let result = classify_http(404, Some("5"), "no such hook");
    outbox.handle_result(T0, id, 1, result).unwrap();
    outbox.check_invariants();
    assert_eq!(
        events(&mut outbox),
        vec![finished(
            id,
            DeliveryStatus::Permanent,
            1,
            Some("HTTP 404: no such hook")
        )]
    );
    assert!(outbox.is_empty());
    assert_eq!(outbox.poll_timeout(), None);
    assert_eq!(outbox.take_writes().1, vec![id]);
}

// SPEC D3: the delays are pinned, 30 s then 60 s, and the third attempt is the last.
#[test]
fn transient_failures_back_off_30_s_then_60_s_then_exhaust_after_3_attempts() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);

    send_at(&mut outbox, T0);
    outbox.handle_result(T0, id, 1, transient(None)).unwrap();
    let second = T0.plus_ms(30_000);
    assert_eq!(outbox.poll_timeout(), Some(second));
    assert_eq!(
        events(&mut outbox),
        vec![OutboxEvent::RetryScheduled {
            id,
            sink: sink("hook"),
            attempt: 1,
            at: second
        }]
    );
    // Not a millisecond early.
    outbox.handle_timeout(T0.plus_ms(29_999));
    assert_eq!(outbox.poll_send(), None);

    assert_eq!(send_at(&mut outbox, second).attempt, 2);
    outbox
        .handle_result(second, id, 2, transient(None))
        .unwrap();
    let third = second.plus_ms(60_000);
    assert_eq!(outbox.poll_timeout(), Some(third));
    events(&mut outbox);

    assert_eq!(send_at(&mut outbox, third).attempt, 3);
    outbox.handle_result(third, id, 3, transient(None)).unwrap();
    outbox.check_invariants();
    assert_eq!(
        events(&mut outbox),
        vec![finished(id, DeliveryStatus::Exhausted, 3, Some("HTTP 503"))]
    );
    assert!(outbox.is_empty());
    assert_eq!(outbox.poll_timeout(), None);
}

#[test]
fn backoff_doubles_from_30_s_up_to_the_5_minute_cap() {
    let policy = DeliveryPolicy::default();
    let delays: Vec<u64> = (1..=7).map(|n| policy.backoff_ms(n)).collect();
    assert_eq!(
        delays,
        vec![30_000, 60_000, 120_000, 240_000, 300_000, 300_000, 300_000]
    );
    assert_eq!(policy.backoff_ms(u32::MAX), 300_000);
}

#[test]
fn retry_after_can_lengthen_the_delay_up_to_its_cap_but_not_shorten_it() {
    let policy = DeliveryPolicy::default();
    assert_eq!(policy.retry_delay_ms(1, Some(120_000)), 120_000);
    assert_eq!(policy.retry_delay_ms(1, Some(10_000)), 30_000);
    assert_eq!(policy.retry_delay_ms(1, Some(86_400_000)), 3_600_000);
    assert_eq!(policy.retry_delay_ms(2, None), 60_000);

    // The same through the outbox, from a real header.
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0);
    let result = classify_http(429, Some("120"), "slow down");
    outbox.handle_result(T0, id, 1, result).unwrap();
    assert_eq!(outbox.poll_timeout(), Some(T0.plus_ms(120_000)));

    let later = T0.plus_ms(120_000);
    send_at(&mut outbox, later);
    let result = classify_http(503, Some("86400"), "");
    outbox.handle_result(later, id, 2, result).unwrap();
    assert_eq!(outbox.poll_timeout(), Some(later.plus_ms(3_600_000)));
    outbox.check_invariants();
}

#[test]
fn a_503_then_a_200_succeeds_on_the_second_attempt() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0);
    let failed = classify_http(503, None, "<html>maintenance</html>");
    outbox.handle_result(T0, id, 1, failed).unwrap();
    assert_eq!(
        outbox.delivery(id).unwrap().last_error.as_deref(),
        Some("HTTP 503: <html>maintenance</html>")
    );
    let (upserts, _) = outbox.take_writes();
    assert_eq!(
        upserts[0].state,
        DeliveryState::Waiting {
            due: T0.plus_ms(30_000)
        }
    );
    events(&mut outbox);

    let retry = outbox.poll_timeout().unwrap();
    let request = send_at(&mut outbox, retry);
    assert_eq!(request.attempt, 2);
    outbox
        .handle_result(retry, id, 2, classify_http(200, None, "ok"))
        .unwrap();
    let finished = events(&mut outbox);
    assert!(matches!(
        finished.as_slice(),
        [OutboxEvent::Finished {
            status: DeliveryStatus::Success,
            attempts: 2,
            ..
        }]
    ));
}

#[test]
fn one_delivery_per_sink_and_a_sink_named_twice_counts_once() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let sinks = [sink("a"), sink("b"), sink("a")];
    let ids = outbox.enqueue(T0, &sinks, &payload(9));
    assert_eq!(ids, vec![DeliveryId(1), DeliveryId(2)]);
    persist(&mut outbox);
    outbox.handle_timeout(T0);
    let sent: Vec<(DeliveryId, Arc<str>)> = std::iter::from_fn(|| outbox.poll_send())
        .map(|r| (r.id, r.sink))
        .collect();
    assert_eq!(
        sent,
        vec![(DeliveryId(1), sink("a")), (DeliveryId(2), sink("b"))]
    );
    outbox.check_invariants();
}

// ----- overflow ------------------------------------------------------------------------

#[test]
fn drop_oldest_evicts_the_oldest_waiting_delivery() {
    let mut outbox = Outbox::new(config(2, OverflowPolicy::DropOldest));
    outbox.enqueue(T0, &[sink("a")], &payload(1));
    outbox.enqueue(T0, &[sink("b")], &payload(2));
    let ids = outbox.enqueue(T0, &[sink("c")], &payload(3));
    outbox.check_invariants();
    assert_eq!(ids, vec![DeliveryId(3)]);
    assert_eq!(outbox.len(), 2);
    assert_eq!(
        events(&mut outbox),
        vec![OutboxEvent::Dropped {
            id: Some(DeliveryId(1)),
            sink: sink("a"),
            subject: DeliverySubject::Run(RunId(1)),
            reason: DropReason::Evicted,
        }]
    );
    // Never written, so nothing to upsert for it; the delete is harmless.
    let (upserts, deletes) = outbox.take_writes();
    let upserted: Vec<DeliveryId> = upserts.iter().map(|d| d.id).collect();
    assert_eq!(upserted, vec![DeliveryId(2), DeliveryId(3)]);
    assert_eq!(deletes, vec![DeliveryId(1)]);
    // A late acknowledgement for the evicted delivery is ignored.
    outbox.mark_durable(&[DeliveryId(1), DeliveryId(2), DeliveryId(3)]);
    outbox.check_invariants();
    assert_eq!(outbox.len(), 2);
}

#[test]
fn drop_oldest_never_evicts_a_delivery_in_flight() {
    let mut outbox = Outbox::new(config(1, OverflowPolicy::DropOldest));
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0);
    let ids = outbox.enqueue(T0, &[sink("late")], &payload(2));
    assert_eq!(ids, vec![]);
    assert_eq!(outbox.next_id(), 2);
    assert_eq!(
        events(&mut outbox),
        vec![OutboxEvent::Dropped {
            id: None,
            sink: sink("late"),
            subject: DeliverySubject::Run(RunId(2)),
            reason: DropReason::Rejected,
        }]
    );
    assert_eq!(outbox.in_flight(), vec![id]);
    outbox.check_invariants();
}

#[test]
fn drop_oldest_skips_deliveries_in_flight_and_evicts_the_lowest_waiting_id() {
    let mut outbox = Outbox::new(config(5, OverflowPolicy::DropOldest));
    let evicted = |outbox: &mut Outbox| -> Vec<DeliveryId> {
        events(outbox)
            .into_iter()
            .filter_map(|e| match e {
                OutboxEvent::Dropped {
                    id,
                    reason: DropReason::Evicted,
                    ..
                } => id,
                _ => None,
            })
            .collect()
    };
    // 1, 2 and 3 go out; 4 and 5 wait (not durable yet). The outbox is full.
    for run in 1..=3 {
        outbox.enqueue(T0, &[sink("hook")], &payload(run));
    }
    persist(&mut outbox);
    outbox.handle_timeout(T0);
    let sent: Vec<DeliveryId> = std::iter::from_fn(|| outbox.poll_send())
        .map(|r| r.id)
        .collect();
    assert_eq!(sent, vec![DeliveryId(1), DeliveryId(2), DeliveryId(3)]);
    for run in 4..=5 {
        outbox.enqueue(T0, &[sink("hook")], &payload(run));
    }
    outbox.check_invariants();
    assert_eq!(outbox.len(), 5);
    assert_eq!(outbox.oldest_waiting(), Some(DeliveryId(4)));

    // The oldest waiting delivery goes, not the older ones in flight.
    assert_eq!(
        outbox.enqueue(T0, &[sink("hook")], &payload(6)),
        vec![DeliveryId(6)]
    );
    outbox.check_invariants();
    assert_eq!(evicted(&mut outbox), vec![DeliveryId(4)]);
    assert_eq!(
        outbox.in_flight(),
        vec![DeliveryId(1), DeliveryId(2), DeliveryId(3)]
    );

    // A failed attempt puts 2 back to waiting: it is now the oldest waiting one.
    outbox
        .handle_result(T0, DeliveryId(2), 1, transient(None))
        .unwrap();
    outbox.check_invariants();
    assert_eq!(outbox.oldest_waiting(), Some(DeliveryId(2)));
    assert_eq!(
        outbox.enqueue(T0, &[sink("hook")], &payload(7)),
        vec![DeliveryId(7)]
    );
    outbox.check_invariants();
    assert_eq!(evicted(&mut outbox), vec![DeliveryId(2)]);

    // A finished delivery frees its place without touching the waiting ones; the next
    // overflow takes 5, then 6.
    outbox
        .handle_result(T0, DeliveryId(1), 1, DeliveryResult::Delivered)
        .unwrap();
    outbox.check_invariants();
    assert_eq!(
        outbox.enqueue(T0, &[sink("hook")], &payload(8)),
        vec![DeliveryId(8)]
    );
    assert_eq!(evicted(&mut outbox), vec![]);
    outbox.enqueue(T0, &[sink("hook")], &payload(9));
    outbox.enqueue(T0, &[sink("hook")], &payload(10));
    outbox.check_invariants();
    assert_eq!(evicted(&mut outbox), vec![DeliveryId(5), DeliveryId(6)]);
    let kept: Vec<DeliveryId> = outbox.deliveries().map(|d| d.id).collect();
    assert_eq!(kept, [3, 7, 8, 9, 10].map(DeliveryId).to_vec());
    assert_eq!(outbox.in_flight(), vec![DeliveryId(3)]);
}

#[test]
fn reject_newest_drops_the_new_deliveries() {
    let mut outbox = Outbox::new(config(2, OverflowPolicy::RejectNewest));
    let first = outbox.enqueue(T0, &[sink("a"), sink("b")], &payload(1));
    assert_eq!(first, vec![DeliveryId(1), DeliveryId(2)]);
    let rejected = outbox.enqueue(T0, &[sink("a"), sink("b")], &payload(2));
    assert_eq!(rejected, vec![]);
    assert_eq!(outbox.next_id(), 3);
    let dropped = events(&mut outbox);
    assert_eq!(
        dropped,
        vec![
            OutboxEvent::Dropped {
                id: None,
                sink: sink("a"),
                subject: DeliverySubject::Run(RunId(2)),
                reason: DropReason::Rejected,
            },
            OutboxEvent::Dropped {
                id: None,
                sink: sink("b"),
                subject: DeliverySubject::Run(RunId(2)),
                reason: DropReason::Rejected,
            },
        ]
    );
    let kept: Vec<RunId> = outbox
        .deliveries()
        .filter_map(|d| d.payload.run())
        .collect();
    assert_eq!(kept, vec![RunId(1), RunId(1)]);
    outbox.check_invariants();
}

// ----- refusals ------------------------------------------------------------------------

#[test]
fn stale_and_unknown_results_are_refused_and_change_nothing() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0);
    outbox.handle_result(T0, id, 1, transient(None)).unwrap();
    send_at(&mut outbox, T0.plus_ms(30_000));
    events(&mut outbox);
    outbox.take_writes();

    let before = outbox.clone();
    let late = T0.plus_ms(99_000_000);
    assert_eq!(
        outbox.handle_result(late, id, 1, DeliveryResult::Delivered),
        Err(OutboxRejected::StaleAttempt {
            id,
            got: 1,
            current: 2
        })
    );
    assert_eq!(
        outbox.handle_result(late, DeliveryId(77), 1, DeliveryResult::Delivered),
        Err(OutboxRejected::UnknownDelivery(DeliveryId(77)))
    );
    assert_eq!(outbox, before, "a refused result must not even move `now`");

    // Answer attempt 2, then answer it again: the delivery is waiting, not sending.
    outbox.handle_result(late, id, 2, transient(None)).unwrap();
    let before = outbox.clone();
    assert_eq!(
        outbox.handle_result(late, id, 2, DeliveryResult::Delivered),
        Err(OutboxRejected::NotSending(id))
    );
    assert_eq!(outbox, before);
    outbox.check_invariants();
}

#[test]
fn a_result_before_the_send_was_polled_cancels_the_request() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    outbox.handle_timeout(T0);
    outbox
        .handle_result(T0, id, 1, DeliveryResult::Delivered)
        .unwrap();
    outbox.check_invariants();
    assert_eq!(outbox.poll_send(), None);
}

#[test]
fn an_earlier_now_is_clamped() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0.plus_ms(10_000));
    // The clock went back 10 s: the retry is computed from the latest `now`.
    outbox.handle_result(T0, id, 1, transient(None)).unwrap();
    assert_eq!(outbox.poll_timeout(), Some(T0.plus_ms(40_000)));
}

// ----- restore -------------------------------------------------------------------------

#[test]
fn restore_counts_a_cut_short_attempt_and_needs_no_new_acknowledgement() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    send_at(&mut outbox, T0);
    let (records, _) = outbox.take_writes();
    assert_eq!(records[0].state, DeliveryState::Sending { attempt: 1 });

    // What the store hands back after a restart: the durable flag is not persisted.
    let records: Vec<Delivery> =
        serde_json::from_str(&serde_json::to_string(&records).unwrap()).unwrap();
    assert!(!records[0].is_durable());
    let later = T0.plus_ms(600_000);
    let mut restored = Outbox::restore(OutboxConfig::default(), records, outbox.next_id(), later);
    restored.check_invariants();
    let d = restored.delivery(id).unwrap();
    assert!(d.is_durable());
    assert_eq!(d.attempt, 1);
    assert_eq!(d.state, DeliveryState::Waiting { due: later });
    assert_eq!(
        d.last_error.as_deref(),
        Some("attempt 1 was cut short by a restart")
    );
    assert_eq!(restored.next_id(), 2);
    assert_eq!(restored.poll_timeout(), Some(later));
    // The record is rewritten to show the delivery waiting.
    let (upserts, _) = restored.take_writes();
    assert_eq!(upserts[0].state, DeliveryState::Waiting { due: later });
    assert_eq!(send_at(&mut restored, later).attempt, 2);
}

#[test]
fn restore_exhausts_a_delivery_whose_last_attempt_was_cut_short() {
    let mut outbox = Outbox::new(OutboxConfig::default());
    let id = durable_one(&mut outbox, T0);
    let mut now = T0;
    for attempt in 1..=2 {
        send_at(&mut outbox, now);
        outbox
            .handle_result(now, id, attempt, transient(None))
            .unwrap();
        now = outbox.poll_timeout().unwrap();
    }
    send_at(&mut outbox, now);
    let records: Vec<Delivery> = outbox.deliveries().cloned().collect();
    assert_eq!(records[0].state, DeliveryState::Sending { attempt: 3 });

    let mut restored = Outbox::restore(OutboxConfig::default(), records, 2, now);
    restored.check_invariants();
    assert!(restored.is_empty());
    assert_eq!(restored.take_writes(), (vec![], vec![id]));
    assert_eq!(
        events(&mut restored),
        vec![finished(
            id,
            DeliveryStatus::Exhausted,
            3,
            Some("attempt 3 was cut short by a restart")
        )]
    );
}

#[test]
fn restore_applies_the_overflow_policy_and_repairs_the_counter() {
    let records: Vec<Delivery> = (1..=4)
        .map(|n| Delivery {
            id: DeliveryId(n),
            sink: sink("hook"),
            payload: payload(n),
            attempt: 0,
            state: DeliveryState::Waiting { due: T0 },
            created_at: T0,
            last_error: None,
            durable: false,
        })
        .collect();
    let mut oldest = Outbox::restore(
        config(3, OverflowPolicy::DropOldest),
        records.clone(),
        1,
        T0,
    );
    oldest.check_invariants();
    assert_eq!(oldest.next_id(), 5);
    assert!(matches!(
        events(&mut oldest).as_slice(),
        [OutboxEvent::Dropped {
            id: Some(DeliveryId(1)),
            reason: DropReason::Evicted,
            ..
        }]
    ));
    let mut newest = Outbox::restore(config(3, OverflowPolicy::RejectNewest), records, 5, T0);
    newest.check_invariants();
    assert!(matches!(
        events(&mut newest).as_slice(),
        [OutboxEvent::Dropped {
            id: Some(DeliveryId(4)),
            reason: DropReason::Rejected,
            ..
        }]
    ));
    assert_eq!(newest.take_writes().1, vec![DeliveryId(4)]);
}

// SPEC D4: one `Finished` per delivery, first attempts included, across a restart.
#[test]
fn each_delivery_finishes_exactly_once_across_a_restart() {
    let mut store: BTreeMap<DeliveryId, Delivery> = BTreeMap::new();
    let apply = |outbox: &mut Outbox, store: &mut BTreeMap<DeliveryId, Delivery>| {
        let (upserts, deletes) = outbox.take_writes();
        let ids: Vec<DeliveryId> = upserts.iter().map(|d| d.id).collect();
        for d in upserts {
            store.insert(d.id, d);
        }
        for id in deletes {
            store.remove(&id);
        }
        outbox.mark_durable(&ids);
        outbox.next_id()
    };
    let mut outbox = Outbox::new(OutboxConfig::default());
    // a: delivered before the restart; b: in flight at the restart; c: waiting to retry.
    outbox.enqueue(T0, &[sink("a"), sink("b"), sink("c")], &payload(1));
    apply(&mut outbox, &mut store);
    outbox.handle_timeout(T0);
    let sends: Vec<SendRequest> = std::iter::from_fn(|| outbox.poll_send()).collect();
    assert_eq!(sends.len(), 3);
    outbox
        .handle_result(T0, sends[0].id, 1, DeliveryResult::Delivered)
        .unwrap();
    outbox
        .handle_result(T0, sends[2].id, 1, transient(None))
        .unwrap();
    let mut finished: Vec<OutboxEvent> = events(&mut outbox);
    let next_id = apply(&mut outbox, &mut store);

    let mut restored = Outbox::restore(
        OutboxConfig::default(),
        store.values().cloned().collect(),
        next_id,
        T0.plus_ms(1_000),
    );
    restored.check_invariants();
    assert_eq!(restored.len(), 2);
    let mut now = T0.plus_ms(1_000);
    while !restored.is_empty() {
        restored.handle_timeout(now);
        while let Some(request) = restored.poll_send() {
            restored
                .handle_result(now, request.id, request.attempt, DeliveryResult::Delivered)
                .unwrap();
        }
        restored.check_invariants();
        if let Some(next) = restored.poll_timeout() {
            now = next;
        }
    }
    finished.extend(events(&mut restored));
    let outcomes: Vec<(DeliveryId, DeliveryStatus, u32)> = finished
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Finished {
                id,
                status,
                attempts,
                ..
            } => Some((*id, *status, *attempts)),
            _ => None,
        })
        .collect();
    // a once on its first attempt; b on attempt 2 (1 was cut short); c on attempt 2.
    assert_eq!(
        outcomes,
        vec![
            (sends[0].id, DeliveryStatus::Success, 1),
            (sends[1].id, DeliveryStatus::Success, 2),
            (sends[2].id, DeliveryStatus::Success, 2),
        ]
    );
}

// ----- classification ------------------------------------------------------------------

#[test]
fn classify_http_follows_spec_d3() {
    for status in [200, 201, 202, 204, 299] {
        assert_eq!(
            classify_http(status, Some("10"), "x"),
            DeliveryResult::Delivered,
            "{status}"
        );
    }
    for status in [408, 429, 500, 502, 503, 504] {
        assert_eq!(
            classify_http(status, None, ""),
            DeliveryResult::Transient {
                error: format!("HTTP {status}"),
                retry_after_ms: None
            },
            "{status}"
        );
    }
    for status in [
        100, 301, 304, 400, 401, 403, 404, 410, 422, 501, 505, 0, 999,
    ] {
        assert!(
            matches!(
                classify_http(status, Some("10"), ""),
                DeliveryResult::Permanent { .. }
            ),
            "{status}"
        );
    }
}

#[test]
fn retry_after_is_read_as_delta_seconds_only() {
    let after = |value: &str| match classify_http(503, Some(value), "") {
        DeliveryResult::Transient { retry_after_ms, .. } => retry_after_ms,
        other => panic!("503 classified as {other:?}"),
    };
    assert_eq!(after("120"), Some(120_000));
    assert_eq!(after(" 5 "), Some(5_000));
    assert_eq!(after("0"), Some(0));
    assert_eq!(after("99999999999999999999999"), Some(u64::MAX));
    // An HTTP-date would need a clock; it is ignored and the backoff applies.
    assert_eq!(after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    for bad in ["", "-1", "+5", "1.5", "5s", "0x10"] {
        assert_eq!(after(bad), None, "{bad:?}");
    }
}

#[test]
fn errors_quote_a_bounded_excerpt_of_the_body() {
    let body = "é".repeat(limits::DELIVERY_BODY_EXCERPT_MAX_BYTES);
    let DeliveryResult::Permanent { error } = classify_http(400, None, &body) else {
        panic!("400 is permanent");
    };
    assert!(error.starts_with("HTTP 400: é"));
    assert!(error.len() <= limits::DELIVERY_BODY_EXCERPT_MAX_BYTES + 16);
    assert!(error.ends_with('…'));
}

#[test]
fn transport_errors_are_transient() {
    assert_eq!(
        classify_transport_error("connection refused"),
        DeliveryResult::Transient {
            error: "connection refused".into(),
            retry_after_ms: None
        }
    );
    let huge = "x".repeat(limits::MESSAGE_MAX_BYTES * 2);
    let DeliveryResult::Transient { error, .. } = classify_transport_error(&huge) else {
        panic!("transport errors are transient");
    };
    assert!(error.len() <= limits::MESSAGE_MAX_BYTES + '…'.len_utf8());
}

// ----- configuration and wire formats --------------------------------------------------

#[test]
fn configuration_is_clamped_into_its_limits() {
    let wild = OutboxConfig {
        capacity: 0,
        overflow: OverflowPolicy::RejectNewest,
        policy: DeliveryPolicy {
            attempts_max: 0,
            backoff_base_ms: u64::MAX,
            backoff_factor: f64::NAN,
            backoff_cap_ms: u64::MAX,
            retry_after_max_ms: u64::MAX,
        },
    };
    let outbox = Outbox::new(wild);
    let clamped = outbox.config();
    assert_eq!(clamped.capacity, 1);
    assert_eq!(clamped.policy.attempts_max, 1);
    assert_eq!(clamped.policy.backoff_cap_ms, limits::DELAY_MAX_MS);
    assert_eq!(clamped.policy.backoff_base_ms, limits::DELAY_MAX_MS);
    assert_eq!(clamped.policy.backoff_factor, 1.0);
    assert_eq!(clamped.policy.retry_after_max_ms, limits::DELAY_MAX_MS);
    let huge = OutboxConfig {
        capacity: usize::MAX,
        ..OutboxConfig::default()
    };
    assert_eq!(huge.clamped().capacity, limits::OUTBOX_CAPACITY_MAX);
    assert_eq!(OutboxConfig::default().clamped(), OutboxConfig::default());
    assert_eq!(OutboxConfig::default().capacity, 10_000);
}

#[test]
fn wire_formats_are_stable() {
    assert_eq!(DeliveryId(3).to_string(), "delivery-3");
    assert_eq!(serde_json::to_string(&DeliveryId(3)).unwrap(), "3");
    let labels: Vec<String> = [
        DeliveryStatus::Success,
        DeliveryStatus::Exhausted,
        DeliveryStatus::Permanent,
    ]
    .iter()
    .map(|s| serde_json::to_string(s).unwrap())
    .collect();
    assert_eq!(labels, ["\"success\"", "\"exhausted\"", "\"permanent\""]);
    assert_eq!(DeliveryStatus::Exhausted.to_string(), "exhausted");
    let config: OutboxConfig =
        serde_json::from_str(r#"{"overflow":"reject_newest","policy":{"attempts_max":5}}"#)
            .unwrap();
    assert_eq!(config.overflow, OverflowPolicy::RejectNewest);
    assert_eq!(config.capacity, limits::OUTBOX_CAPACITY_DEFAULT);
    assert_eq!(config.policy.attempts_max, 5);
    assert_eq!(config.policy.backoff_base_ms, 30_000);
    let state = serde_json::to_string(&DeliveryState::Sending { attempt: 2 }).unwrap();
    assert_eq!(state, r#"{"state":"sending","attempt":2}"#);
}

/// A delivery record exactly as stores held them before incidents were delivered (a run's
/// result, its fields flat in `payload`) still reads, as a run's result, and writes back to
/// the same bytes.
#[test]
fn a_delivery_record_in_the_format_before_incident_notices_still_decodes() {
    let stored = concat!(
        r#"{"id":7,"sink":"https://hooks.example.com/keel","#,
        r#""payload":{"run":12,"job":"report","state":"failed","summary":null,"#,
        r#""error":{"kind":"permanent","message":"exit 2","attempt":3,"at":1700000000500},"#,
        r#""finished_at":1700000000600},"#,
        r#""attempt":1,"state":{"state":"waiting","due":1700000030600},"#,
        r#""created_at":1700000000600,"last_error":"HTTP 503"}"#
    );
    let delivery: Delivery = serde_json::from_str(stored).unwrap();
    let DeliveryPayload::Run(result) = &delivery.payload else {
        panic!("an old record must read as a run's result: {delivery:?}");
    };
    assert_eq!(result.run, RunId(12));
    assert_eq!(result.job.as_str(), "report");
    assert_eq!(result.state, StateName::Failed);
    assert_eq!(result.error.as_ref().map(|e| e.attempt.0), Some(3));
    assert_eq!(delivery.payload.subject(), DeliverySubject::Run(RunId(12)));
    assert_eq!(
        delivery.state,
        DeliveryState::Waiting {
            due: Timestamp(1_700_000_030_600)
        }
    );
    assert_eq!(serde_json::to_string(&delivery).unwrap(), stored);
}

/// An incident notification is stored as `{"incident": {…}}` and reads back as one, never as
/// a run's result.
#[test]
fn an_incident_notice_round_trips_through_its_record() {
    use crate::incident::{Incident, IncidentEvent, IncidentKind, IncidentNotice};
    let mut incident = Incident::new(
        4,
        IncidentKind::StuckRun,
        T0,
        Some(JobId::new("report").unwrap()),
        Some(RunId(9)),
        None,
        "no heartbeat".into(),
    );
    incident.acknowledged = Some(crate::incident::OperatorAction {
        by: "ana".into(),
        at: T0.plus_ms(5),
        reason: "looking".into(),
    });
    let notice = IncidentNotice::new(IncidentEvent::Acknowledged, &incident, T0.plus_ms(5));
    assert_eq!(notice.operator.as_ref().map(|o| o.by.as_str()), Some("ana"));
    let mut outbox = Outbox::new(OutboxConfig::default());
    let payload = DeliveryPayload::Incident {
        incident: notice.clone(),
    };
    outbox.enqueue(T0, &[sink("ops")], &payload);
    let (upserts, _) = persist(&mut outbox);
    let text = serde_json::to_string(&upserts[0]).unwrap();
    assert!(
        text.contains(r#""payload":{"incident":{"event":"acknowledged","id":4,"kind":"stuck_run""#),
        "{text}"
    );
    let back: Delivery = serde_json::from_str(&text).unwrap();
    assert_eq!(back.payload.incident(), Some(&notice));
    assert_eq!(back.payload.subject(), DeliverySubject::Incident(4));
    assert_eq!(back.payload.run(), Some(RunId(9)));
    assert_eq!(back.payload.run_result(), None);
}

// ----- property test -------------------------------------------------------------------
mod model;

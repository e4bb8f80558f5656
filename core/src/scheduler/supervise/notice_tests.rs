//! Incident notifications through the outbox (SPEC A3, D1–D5), on the simulated clock.

use super::*;
use crate::incident::{IncidentEvent, NewIncident};
use crate::outbox::{DeliverySubject, DropReason, OverflowPolicy};
use crate::persist::Snapshot;

const MINUTE: u64 = 60_000;

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn sinks(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

/// Tells `ops` and `chat` about incidents, and `pager` about escalations after 15 minutes.
fn config() -> Config {
    Config {
        incident_sinks: sinks(&["ops", "chat"]),
        escalate_after_ms: 15 * MINUTE,
        escalation_sinks: sinks(&["pager"]),
        ..Config::default()
    }
}

/// What a store holds, applied record by record, enough to restore incidents and the outbox.
#[derive(Default)]
struct Stored {
    incidents: BTreeMap<u64, Incident>,
    deliveries: BTreeMap<DeliveryId, crate::outbox::Delivery>,
    meta: Meta,
}

impl Stored {
    fn apply(&mut self, batch: &Batch) {
        for record in &batch.records {
            // Every record round-trips through its stored form.
            let text = serde_json::to_string(record).unwrap();
            let back: Record = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), text);
            match record {
                Record::PutIncident(i) => {
                    self.incidents.insert(i.id, i.clone());
                }
                Record::PutDelivery(d) => {
                    self.deliveries.insert(d.id, d.clone());
                }
                Record::DeleteDelivery { id } => {
                    self.deliveries.remove(id);
                }
                Record::PutMeta(m) => self.meta = *m,
                _ => {}
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            meta: self.meta,
            incidents: self.incidents.values().cloned().collect(),
            deliveries: self.deliveries.values().cloned().collect(),
            ..Snapshot::default()
        }
    }
}

/// Persists and acknowledges every batch into `stored`; returns the other effects.
fn ack_all(s: &mut Scheduler, now: Timestamp, stored: &mut Stored) -> Vec<Effect> {
    let mut other = Vec::new();
    while let Some(effect) = s.poll_effect() {
        match effect {
            Effect::Persist(batch) => {
                stored.apply(&batch);
                s.handle_persisted(now, batch.id);
            }
            effect => other.push(effect),
        }
        s.check_invariants();
    }
    other
}

/// Delivers every deadline up to `until` in order, checking that each `handle_timeout` moves
/// the next deadline past it. Returns the effects other than writes.
fn advance(s: &mut Scheduler, until: Timestamp, stored: &mut Stored) -> Vec<Effect> {
    let mut effects = Vec::new();
    while let Some(at) = s.poll_timeout().filter(|at| *at <= until) {
        s.handle_timeout(at);
        effects.extend(ack_all(s, at, stored));
        assert!(
            s.poll_timeout().is_none_or(|next| next > at),
            "busy loop at {at}"
        );
    }
    s.handle_timeout(until);
    effects.extend(ack_all(s, until, stored));
    effects
}

/// The notifications sent: (sink, event, incident id).
fn notices(effects: &[Effect]) -> Vec<(String, IncidentEvent, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver(send) => {
                let notice = send.payload.incident()?;
                Some((send.sink.to_string(), notice.event, notice.id))
            }
            _ => None,
        })
        .collect()
}

fn by_hand(by: &str) -> NewIncident {
    NewIncident {
        job: None,
        run: None,
        worker: None,
        details: "the nightly export is missing".into(),
        by: by.into(),
    }
}

fn escalated_events(effects: &[Effect]) -> usize {
    effects
        .iter()
        .filter(|e| matches!(e, Effect::Event(Event::IncidentEscalated(_))))
        .count()
}

#[test]
fn an_incident_is_told_to_each_sink_when_it_opens_is_acknowledged_and_resolves() {
    let mut stored = Stored::default();
    let mut s = Scheduler::new(config(), 1, t0());
    let id = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    // Persist before send: nothing goes out before the batch holding the incident and its
    // deliveries is acknowledged, and that batch holds both.
    let batch = loop {
        match s.poll_effect() {
            Some(Effect::Persist(batch)) => break batch,
            Some(Effect::Event(_)) => {}
            other => panic!("before the write: {other:?}"),
        }
    };
    let kinds: Vec<&str> = batch
        .records
        .iter()
        .filter_map(|r| match r {
            Record::PutIncident(_) => Some("incident"),
            Record::PutDelivery(d) if d.payload.incident().is_some() => Some("notice"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["incident", "notice", "notice"]);
    assert!(
        s.poll_effect().is_none(),
        "a send before the write is durable"
    );
    stored.apply(&batch);
    s.handle_persisted(t0(), batch.id);
    let effects = ack_all(&mut s, t0(), &mut stored);
    assert_eq!(
        notices(&effects),
        [
            ("ops".into(), IncidentEvent::Opened, id),
            ("chat".into(), IncidentEvent::Opened, id)
        ]
    );
    let Some(Effect::Deliver(send)) = effects.iter().find(|e| matches!(e, Effect::Deliver(_)))
    else {
        unreachable!()
    };
    let notice = send.payload.incident().unwrap();
    assert_eq!(notice.kind, IncidentKind::Operator);
    assert_eq!(notice.details, "the nightly export is missing");
    assert_eq!(notice.operator.as_ref().map(|o| o.by.as_str()), Some("ana"));
    assert_eq!(notice.at, t0());

    let at = t0().plus_ms(MINUTE);
    s.acknowledge_incident(at, id, "bo", "on it").unwrap();
    let effects = ack_all(&mut s, at, &mut stored);
    let acknowledged = notices(&effects);
    assert_eq!(acknowledged.len(), 2, "{acknowledged:?}");
    assert!(acknowledged
        .iter()
        .all(|(_, e, i)| *e == IncidentEvent::Acknowledged && *i == id));
    let ack = effects
        .iter()
        .find_map(|e| match e {
            Effect::Deliver(send) => send.payload.incident().cloned(),
            _ => None,
        })
        .unwrap();
    let operator = ack.operator.unwrap();
    assert_eq!(
        (operator.by.as_str(), operator.reason.as_str()),
        ("bo", "on it")
    );

    let at = t0().plus_ms(2 * MINUTE);
    s.resolve_incident(at, id, "bo", "export re-run").unwrap();
    let effects = ack_all(&mut s, at, &mut stored);
    let resolved: Vec<_> = notices(&effects).into_iter().map(|(_, e, _)| e).collect();
    assert_eq!(resolved, [IncidentEvent::Resolved, IncidentEvent::Resolved]);
    // Six deliveries in all, one per sink and event, each with its own id.
    assert_eq!(s.outbox().len(), 6);
}

#[test]
fn an_unacknowledged_incident_escalates_once_at_its_deadline_even_across_a_restart() {
    let mut stored = Stored::default();
    let mut s = Scheduler::new(config(), 1, t0());
    let id = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    ack_all(&mut s, t0(), &mut stored);
    let deadline = t0().plus_ms(15 * MINUTE);
    assert_eq!(s.poll_timeout(), Some(deadline));
    let effects = advance(&mut s, Timestamp(deadline.as_millis() - 1), &mut stored);
    assert_eq!(escalated_events(&effects), 0);
    let effects = advance(&mut s, deadline, &mut stored);
    assert_eq!(
        notices(&effects),
        [("pager".into(), IncidentEvent::Escalated, id)]
    );
    assert_eq!(escalated_events(&effects), 1);
    assert_eq!(s.incident(id).unwrap().escalated_at, Some(deadline));
    assert_eq!(stored.incidents[&id].escalated_at, Some(deadline));

    // Restored after the escalation: it never escalates again.
    let later = deadline.plus_ms(60 * MINUTE);
    let mut s = Scheduler::restore(config(), 1, later, stored.snapshot());
    s.check_invariants();
    let effects = advance(&mut s, later.plus_ms(10 * 60 * MINUTE), &mut stored);
    assert_eq!(escalated_events(&effects), 0);
    let escalations = stored
        .deliveries
        .values()
        .filter(|d| d.payload.incident().map(|n| n.event) == Some(IncidentEvent::Escalated))
        .count();
    assert!(escalations <= 1, "{escalations} escalation deliveries");
}

#[test]
fn a_deadline_passed_while_keel_was_down_escalates_at_the_first_timeout_after_restore() {
    let mut stored = Stored::default();
    let mut s = Scheduler::new(config(), 1, t0());
    let id = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    ack_all(&mut s, t0(), &mut stored);
    drop(s);
    let back = t0().plus_ms(40 * MINUTE);
    let mut s = Scheduler::restore(config(), 1, back, stored.snapshot());
    assert!(
        s.poll_timeout().is_some_and(|t| t <= back),
        "the overdue escalation is due at once"
    );
    let effects = advance(&mut s, back, &mut stored);
    let escalated: Vec<_> = notices(&effects)
        .into_iter()
        .filter(|(_, e, _)| *e == IncidentEvent::Escalated)
        .collect();
    assert_eq!(escalated, [("pager".into(), IncidentEvent::Escalated, id)]);
    assert_eq!(stored.incidents[&id].escalated_at, Some(back));
    // And a second restart does not escalate it again.
    let mut s = Scheduler::restore(config(), 1, back.plus_ms(MINUTE), stored.snapshot());
    let effects = advance(&mut s, back.plus_ms(2 * 60 * MINUTE), &mut stored);
    assert_eq!(escalated_events(&effects), 0);
}

#[test]
fn an_acknowledged_or_resolved_incident_never_escalates() {
    let mut stored = Stored::default();
    let mut s = Scheduler::new(config(), 1, t0());
    let acknowledged = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    let resolved = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    ack_all(&mut s, t0(), &mut stored);
    let at = t0().plus_ms(5 * MINUTE);
    s.acknowledge_incident(at, acknowledged, "bo", "").unwrap();
    s.resolve_incident(at, resolved, "bo", "false alarm")
        .unwrap();
    ack_all(&mut s, at, &mut stored);
    assert!(
        s.poll_timeout()
            .is_none_or(|t| t > t0().plus_ms(15 * MINUTE)),
        "no escalation deadline is left"
    );
    let effects = advance(&mut s, t0().plus_ms(3 * 60 * MINUTE), &mut stored);
    assert_eq!(escalated_events(&effects), 0);
    assert!(notices(&effects)
        .iter()
        .all(|(_, e, _)| *e != IncidentEvent::Escalated));
    assert_eq!(s.incident(acknowledged).unwrap().escalated_at, None);
}

#[test]
fn escalation_goes_to_the_incident_sinks_when_none_are_named_and_0_turns_it_off() {
    let mut stored = Stored::default();
    let only_incident_sinks = Config {
        escalation_sinks: Vec::new(),
        ..config()
    };
    let mut s = Scheduler::new(only_incident_sinks, 1, t0());
    let id = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    ack_all(&mut s, t0(), &mut stored);
    let effects = advance(&mut s, t0().plus_ms(15 * MINUTE), &mut stored);
    let mut escalated: Vec<_> = notices(&effects)
        .into_iter()
        .filter(|(_, e, _)| *e == IncidentEvent::Escalated)
        .collect();
    escalated.sort();
    assert_eq!(
        escalated,
        [
            ("chat".into(), IncidentEvent::Escalated, id),
            ("ops".into(), IncidentEvent::Escalated, id)
        ]
    );

    let never = Config {
        escalate_after_ms: 0,
        ..config()
    };
    let mut s = Scheduler::new(never, 1, t0());
    s.open_incident(t0(), by_hand("ana")).unwrap();
    ack_all(&mut s, t0(), &mut stored);
    let effects = advance(&mut s, t0().plus_ms(24 * 60 * MINUTE), &mut stored);
    assert_eq!(escalated_events(&effects), 0);
}

#[test]
fn incident_notices_obey_the_outbox_capacity_and_overflow_policy() {
    let mut stored = Stored::default();
    let mut small = config();
    small.outbox.capacity = 1;
    small.outbox.overflow = OverflowPolicy::RejectNewest;
    let mut s = Scheduler::new(small, 1, t0());
    let id = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    let effects = ack_all(&mut s, t0(), &mut stored);
    let dropped: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(Event::Delivery(OutboxEvent::Dropped {
                subject, reason, ..
            })) => Some((*subject, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        dropped,
        [(DeliverySubject::Incident(id), DropReason::Rejected)]
    );
    assert_eq!(notices(&effects).len(), 1);
    assert_eq!(s.outbox().len(), 1);
}

#[test]
fn an_incident_refused_for_too_many_open_notifies_no_one() {
    let mut stored = Stored::default();
    let mut s = Scheduler::new(config(), 1, t0());
    for _ in 0..limits::INCIDENTS_OPEN_MAX {
        s.open_incident(t0(), by_hand("ana")).unwrap();
    }
    ack_all(&mut s, t0(), &mut stored);
    let before = s.outbox().len();
    assert!(s.open_incident(t0(), by_hand("ana")).is_err());
    let effects = ack_all(&mut s, t0(), &mut stored);
    assert!(notices(&effects).is_empty());
    assert_eq!(s.outbox().len(), before);
}

#[test]
fn a_delivered_notice_leaves_the_outbox_and_is_counted_with_its_incident() {
    let mut stored = Stored::default();
    let mut s = Scheduler::new(config(), 1, t0());
    let id = s.open_incident(t0(), by_hand("ana")).unwrap().id;
    let effects = ack_all(&mut s, t0(), &mut stored);
    for effect in effects {
        if let Effect::Deliver(send) = effect {
            s.handle_delivery_result(t0(), send.id, send.attempt, DeliveryResult::Delivered)
                .unwrap();
        }
    }
    let effects = ack_all(&mut s, t0(), &mut stored);
    let finished: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(Event::Delivery(OutboxEvent::Finished {
                subject, status, ..
            })) => Some((*subject, *status)),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 2, "{effects:?}");
    assert!(finished.iter().all(|f| *f
        == (
            DeliverySubject::Incident(id),
            crate::outbox::DeliveryStatus::Success
        )));
    assert!(s.outbox().is_empty());
    assert!(stored.deliveries.is_empty(), "the deletes were written");
}

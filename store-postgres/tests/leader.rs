//! The leadership lease on a real Postgres: one holder at a time, takeover after expiry or at
//! once after a resignation, and a deposed holder told so at its next renewal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::TestDb;
use keel_store_postgres::Leadership;

fn handle(db: &TestDb, holder: &str, ttl: Duration) -> Leadership {
    Leadership::new(db.config(), holder, ttl).unwrap()
}

#[test]
fn one_holder_at_a_time_and_a_resignation_hands_over_at_once() {
    let Some(db) = TestDb::new() else { return };
    let ttl = Duration::from_secs(60);
    let a = handle(&db, "host-a:1:x", ttl);
    let b = handle(&db, "host-b:2:y", ttl);
    assert_eq!(a.current().unwrap(), None, "nobody led yet");

    let first = a.try_acquire().unwrap().expect("a free lease is taken");
    assert_eq!((first.holder.as_str(), first.term), ("host-a:1:x", 1));
    assert!(first.live);
    assert!(first.expires_at.ms_since(first.acquired_at) >= 59_000);
    assert!(
        first.remaining > Duration::from_secs(59) && first.remaining <= ttl,
        "a new lease has its TTL left: {:?}",
        first.remaining
    );
    assert_eq!(b.try_acquire().unwrap(), None, "a live lease is not taken");
    assert_eq!(
        a.try_acquire().unwrap(),
        None,
        "not even by its holder again"
    );
    let seen = b.current().unwrap().unwrap();
    assert_eq!(
        (seen.holder.as_str(), seen.term, seen.live),
        ("host-a:1:x", 1, true)
    );

    let renewed = a.renew(1).unwrap().expect("the holder renews its term");
    assert!(renewed.expires_at >= first.expires_at);
    assert_eq!(b.renew(1).unwrap(), None, "only the holder renews");

    a.resign(1).unwrap();
    let resigned = b.current().unwrap().unwrap();
    assert!(!resigned.live, "a resigned lease is over");
    assert_eq!(
        resigned.remaining,
        Duration::ZERO,
        "nothing left to wait for"
    );
    let second = b
        .try_acquire()
        .unwrap()
        .expect("taken at once after a resignation");
    assert_eq!((second.holder.as_str(), second.term), ("host-b:2:y", 2));
    assert_eq!(
        a.renew(1).unwrap(),
        None,
        "the old holder learns it was deposed"
    );
    a.resign(1).unwrap();
    assert!(
        b.current().unwrap().unwrap().live,
        "a stale resignation ends nothing"
    );
}

#[test]
fn an_unrenewed_lease_is_taken_only_after_it_expired_by_the_database_clock() {
    let Some(db) = TestDb::new() else { return };
    let ttl = Duration::from_millis(400);
    let a = handle(&db, "a", ttl);
    let b = handle(&db, "b", ttl);
    let first = a.try_acquire().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        if let Some(lease) = b.try_acquire().unwrap() {
            break lease;
        }
        assert!(Instant::now() < deadline, "never taken over");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(second.term, 2);
    assert!(
        second.acquired_at >= first.expires_at,
        "taken at {:?}, before the first term expired at {:?}",
        second.acquired_at,
        first.expires_at
    );
    assert_eq!(a.renew(first.term).unwrap(), None);
}

#[test]
fn of_many_contenders_for_a_free_lease_exactly_one_wins() {
    let Some(db) = TestDb::new() else { return };
    let contenders = 8;
    let handles: Vec<_> = (0..contenders)
        .map(|i| handle(&db, &format!("c{i}"), Duration::from_secs(60)))
        .collect();
    let barrier = Arc::new(Barrier::new(contenders));
    let winners: usize = std::thread::scope(|scope| {
        let tasks: Vec<_> = handles
            .iter()
            .map(|h| {
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || {
                    barrier.wait();
                    h.try_acquire().unwrap().is_some()
                })
            })
            .collect();
        tasks
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum()
    });
    assert_eq!(winners, 1);
    assert_eq!(handles[0].current().unwrap().unwrap().term, 1);
}

#[test]
fn a_holder_whose_connection_the_server_ended_renews_on_a_new_one() {
    let Some(db) = TestDb::new() else { return };
    let a = handle(&db, "a", Duration::from_secs(60));
    let lease = a.try_acquire().unwrap().unwrap();
    let ended = db
        .client()
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&db.schema()],
        )
        .unwrap();
    assert_eq!(ended, 1, "the handle's one connection");
    // The first call may see the broken connection; the next one must not.
    let renewed = match a.renew(lease.term) {
        Ok(renewed) => renewed,
        Err(_) => a.renew(lease.term).unwrap(),
    };
    assert_eq!(renewed.map(|l| l.term), Some(lease.term));
}

#[test]
fn the_holder_advertises_its_api_and_a_takeover_never_keeps_the_previous_ones() {
    let Some(db) = TestDb::new() else { return };
    let ttl = Duration::from_secs(60);
    let a = handle(&db, "host-a:1:x", ttl);
    let b = handle(&db, "host-b:2:y", ttl);
    let first = a
        .try_acquire_advertising(Some("http://host-a:8080"))
        .unwrap()
        .unwrap();
    assert_eq!(first.api.as_deref(), Some("http://host-a:8080"));
    assert_eq!(
        b.current().unwrap().unwrap().api.as_deref(),
        Some("http://host-a:8080"),
        "another process reads where the holder serves"
    );
    let moved = a
        .advertise(first.term, Some("http://10.0.0.1:4711"))
        .unwrap()
        .expect("the holder changes its own lease");
    assert_eq!(moved.api.as_deref(), Some("http://10.0.0.1:4711"));
    assert_eq!(
        b.advertise(first.term, Some("http://host-b:1")).unwrap(),
        None,
        "only the holder advertises"
    );
    assert_eq!(
        a.renew(first.term).unwrap().unwrap().api.as_deref(),
        Some("http://10.0.0.1:4711"),
        "a renewal keeps it"
    );
    a.resign(first.term).unwrap();
    let second = b.try_acquire().unwrap().unwrap();
    assert_eq!(second.term, first.term + 1);
    assert_eq!(second.api, None, "the new holder serves no API yet");
    assert_eq!(
        a.advertise(first.term, Some("http://host-a:8080")).unwrap(),
        None,
        "a deposed holder cannot advertise over its successor"
    );
    assert_eq!(b.current().unwrap().unwrap().api, None);
}

#[test]
fn a_format_3_schema_migrates_to_4_and_its_lease_keeps_its_holder() {
    let Some(db) = TestDb::new() else { return };
    let a = handle(&db, "host-a:1:x", Duration::from_secs(60));
    let lease = a.try_acquire().unwrap().unwrap();
    drop(a);
    // Back to format 3 as an older build left it: no `api` column (nor format 5's).
    let mut client = db.client();
    client
        .batch_execute(
            "ALTER TABLE keel_leader DROP COLUMN api, DROP COLUMN backend_pid, \
             DROP COLUMN renewed_at; \
             UPDATE keel_meta SET format = 'keel-store-postgres 3'",
        )
        .unwrap();
    let b = handle(&db, "host-b:2:y", Duration::from_secs(60));
    let seen = b.current().unwrap().expect("the lease survived");
    assert_eq!(
        (seen.holder.as_str(), seen.term),
        ("host-a:1:x", lease.term)
    );
    assert_eq!(seen.api, None);
    let format: String = client
        .query_one("SELECT format FROM keel_meta WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(format, keel_store_postgres::FORMAT);
    assert_eq!(format, "keel-store-postgres 6");
}

#[test]
fn a_holder_whose_session_is_gone_is_replaced_at_once_not_after_its_ttl() {
    let Some(db) = TestDb::new() else { return };
    let ttl = Duration::from_secs(600);
    let a = handle(&db, "host-a:1:x", ttl);
    let b = handle(&db, "host-b:2:y", ttl);
    let first = a.try_acquire().unwrap().unwrap();
    assert_eq!(b.try_acquire().unwrap(), None, "a live holder keeps it");
    assert!(b.current().unwrap().unwrap().live);

    // The holder dies (its connection closes, as the kernel closes a killed process's): its
    // session ends, and the lease, ten minutes from expiry, is taken at once.
    drop(a);
    let started = Instant::now();
    let second = loop {
        if let Some(lease) = b.try_acquire().unwrap() {
            break lease;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not taken over though its holder's session is gone"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((second.holder.as_str(), second.term), ("host-b:2:y", 2));
    assert!(
        second.acquired_at < first.expires_at,
        "taken before the old term's expiry"
    );
    assert!(
        b.current().unwrap().unwrap().live,
        "the new holder's session is alive"
    );
}

//! The runtime holds its own attempts' leases with the core's `LeaseHolder` (SPEC L2, L4, M2):
//! an attempt whose renewals stop being durable is stopped at `sent_at + ttl - margin`, and a
//! success it reports afterwards is refused, logged at WARN and kept as audit evidence. On
//! tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::{Actor, AuditQuery, Config, Event, JobId, Outcome, StateName, Store, WorkerId};
use keel_runtime::AttemptContext;
use tokio::time::Instant;

mod common;
use common::{finished_within, once, paused, Started, TestStore};

const TTL_MS: u64 = 10_000;
const MARGIN_MS: u64 = 2_000;

/// The log lines written while it is the thread's default subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_whose_renewals_are_not_durable_is_stopped_and_its_late_success_refused() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let store = TestStore::default();
    let mut config = Config::default();
    config.lease.ttl_ms = TTL_MS;
    config.lease.margin_ms = MARGIN_MS;
    config.lease.grace_ms = 5_000;
    let started_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let cancelled_at = Arc::new(Mutex::new(None::<Instant>));
    let attempts = Arc::new(AtomicU32::new(0));
    let (starts, cancels, counted) = (
        Arc::clone(&started_at),
        Arc::clone(&cancelled_at),
        Arc::clone(&attempts),
    );
    let (runtime, handle) = paused(Arc::new(store.clone()))
        .worker(WorkerId::new("lease-test").unwrap())
        .config(config)
        .handler("work", move |mut ctx: AttemptContext| {
            starts.lock().unwrap().push(Instant::now());
            counted.fetch_add(1, Ordering::SeqCst);
            let cancels = Arc::clone(&cancels);
            async move {
                if ctx.attempt.0 == 1 {
                    // Works until asked to stop, then reports that it finished anyway.
                    ctx.cancelled().await;
                    *cancels.lock().unwrap() = Some(Instant::now());
                    return Outcome::Success {
                        summary: Some("wrote 42 rows".into()),
                        artifacts: Default::default(),
                    };
                }
                Outcome::ok()
            }
        })
        .started()
        .await;
    let mut events = handle.subscribe();
    handle.add_job(once("work", "work", 1_000)).await.unwrap();
    let token = loop {
        if let Event::LeaseGranted { token, .. } = events.recv().await.unwrap() {
            break token;
        }
    };
    handle.sync().await.unwrap();
    // The grant is durable and the handler runs; from now on no write lands.
    store.failing.store(true, Ordering::SeqCst);
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while cancelled_at.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the attempt was never asked to stop");
    let granted = started_at.lock().unwrap()[0];
    let cancelled = cancelled_at.lock().unwrap().unwrap();
    assert_eq!(
        cancelled.duration_since(granted),
        Duration::from_millis(TTL_MS - MARGIN_MS),
        "stopped at sent_at + ttl - margin"
    );

    // The store heals; the run executes again.
    store.failing.store(false, Ordering::SeqCst);
    let state = finished_within(&mut events, "work", Duration::from_secs(600)).await;
    assert_eq!(state, StateName::Succeeded);
    handle.sync().await.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);

    let text = logs.text();
    let refused = text
        .lines()
        .find(|line| line.contains("result refused: lease lost; the run will execute again"))
        .unwrap_or_else(|| panic!("no refusal in the log:\n{text}"));
    assert!(refused.contains("WARN"), "{refused}");
    assert!(!text.contains("late outcome refused"), "{text}");

    let audit = store
        .audit(&AuditQuery {
            job: Some(JobId::new("work").unwrap()),
            ..AuditQuery::default()
        })
        .unwrap();
    let evidence = audit
        .iter()
        .find(|a| a.reason.starts_with("result refused: lease"))
        .unwrap_or_else(|| panic!("no evidence in the audit trail: {audit:#?}"));
    assert_eq!(evidence.fencing_token, Some(token));
    assert_eq!(evidence.attempt.map(|a| a.0), Some(1));
    assert_eq!(evidence.actor, Actor::Worker("lease-test".into()));
    assert!(
        evidence.reason.ends_with(": wrote 42 rows"),
        "{}",
        evidence.reason
    );
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

//! The artifact gate (SPEC A2) and operator lease actions (SPEC W6) through the runtime: checks
//! against a local HTTP server on 127.0.0.1 and real files, and the `RuntimeHandle` calls the
//! HTTP API makes.
//!
//! The tests that talk to a server run on tokio's real clock: on a paused clock, time jumps
//! ahead whenever every task waits on a socket, which would time a local answer out. They
//! never sleep; the one test of the timeout runs on the paused clock against a server that
//! never answers, so it takes no real time.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use keel_core::scheduler::LeaseAction;
use keel_core::{
    ArtifactCheck, IncidentKind, JobId, JobSpec, Outcome, Rejected, RunState, ScheduleSpec,
    StateName, Store, TargetKind, WorkerId,
};
use keel_runtime::verify::Verifier;
use keel_runtime::{CommandError, Runtime, RuntimeHandle};
use keel_testkit::SharedMemStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;
use common::{paused, Started};

/// A local HTTP server: `/ok` answers 200, `/missing` 404 with a body, `/big` 200 with 100 KiB,
/// and `/hang` never answers. Returns its base URL.
async fn server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body) = match path.as_str() {
                    "/ok" => ("200 OK", "the report".to_string()),
                    "/missing" => ("404 Not Found", "no such report".to_string()),
                    "/big" => ("200 OK", "x".repeat(100 * 1024)),
                    "/hang" => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    _ => ("500 Internal Server Error", String::new()),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    base
}

fn url(target: String) -> ArtifactCheck {
    ArtifactCheck {
        name: Some("report".into()),
        target,
        kind: TargetKind::Url,
    }
}

#[tokio::test]
async fn a_url_check_reports_the_status_and_a_bounded_excerpt() {
    let base = server().await;
    let verifier = Verifier::new();
    let found = verifier.check(&url(format!("{base}/missing"))).await;
    assert_eq!(found.status, Some(404));
    assert_eq!(found.error, None);
    assert_eq!(found.excerpt, "no such report");
    let found = verifier.check(&url(format!("{base}/ok"))).await;
    assert_eq!(found.status, Some(200));
    let found = verifier.check(&url(format!("{base}/big"))).await;
    assert_eq!(found.status, Some(200));
    assert_eq!(
        found.excerpt.len(),
        keel_core::limits::ARTIFACT_BODY_READ_MAX_BYTES
    );
    // Nobody listens: the check fails with the cause.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}/r", closed.local_addr().unwrap());
    drop(closed);
    let found = verifier.check(&url(gone)).await;
    assert_eq!(found.status, None);
    assert!(found.error.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_url_that_never_answers_times_out() {
    let base = server().await;
    let verifier = Verifier::new().with_timeout(Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    let found = verifier.check(&url(format!("{base}/hang"))).await;
    assert_eq!(found.status, None);
    assert_eq!(found.error.as_deref(), Some("timed out after 10000 ms"));
    assert!(started.elapsed() >= Duration::from_secs(10));
}

#[tokio::test]
async fn a_file_check_looks_the_path_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.csv");
    std::fs::write(&path, "a,b\n").unwrap();
    let verifier = Verifier::new();
    let file = |target: String| ArtifactCheck {
        name: None,
        target,
        kind: TargetKind::File,
    };
    let found = verifier.check(&file(path.display().to_string())).await;
    assert_eq!(found.error, None);
    assert_eq!(found.excerpt, "a file of 4 bytes");
    let found = verifier
        .check(&file(format!("file://{}", path.display())))
        .await;
    assert_eq!(found.error, None);
    let missing = dir.path().join("nope.csv");
    let found = verifier.check(&file(missing.display().to_string())).await;
    assert!(found.error.is_some());
}

/// A runtime on the real clock with one job for external workers that requires `report`, and
/// one run of it claimed by a worker.
async fn claimed() -> (
    Runtime,
    RuntimeHandle,
    SharedMemStore,
    keel_core::AttemptStart,
) {
    let store = SharedMemStore::new();
    let runtime = Runtime::builder(Arc::new(store.clone()))
        .seed(7)
        .start()
        .await
        .unwrap();
    let handle = runtime.handle();
    let far = keel_runtime::now().plus_ms(3_600_000);
    let mut spec = JobSpec::new(
        JobId::new("render").unwrap(),
        "gpu",
        ScheduleSpec::once(far),
    )
    .for_external_workers();
    spec.required_artifacts = vec!["report".to_string()].into();
    handle.add_job(spec).await.unwrap();
    handle.trigger(JobId::new("render").unwrap()).await.unwrap();
    let attempt = handle
        .claim(WorkerId::new("gpu-box").unwrap(), vec!["gpu".into()])
        .await
        .unwrap()
        .expect("the triggered run is granted");
    (runtime, handle, store, attempt)
}

fn success(report: String) -> Outcome {
    Outcome::Success {
        summary: Some("rendered".into()),
        artifacts: [("report".to_string(), report)].into(),
    }
}

#[tokio::test]
async fn a_completion_whose_artifact_answers_404_is_refused_with_evidence_then_accepted() {
    let base = server().await;
    let (runtime, handle, store, attempt) = claimed().await;
    let (run, token) = (attempt.run, attempt.lease.token);

    let refused = handle
        .complete(run, token, success(format!("{base}/missing")))
        .await;
    let Err(CommandError::Rejected(Rejected::ArtifactGate { failed, .. })) = &refused else {
        panic!("a 404 refuses the completion: {refused:?}");
    };
    assert_eq!(failed[0].status, Some(404));
    assert_eq!(failed[0].excerpt, "no such report");
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("/missing: HTTP 404"), "{message}");
    // Durable by the time the call answered: the run runs on, with its evidence.
    let stored = store.run(run).unwrap().unwrap();
    assert!(matches!(stored.state(), RunState::Running { .. }));
    assert_eq!(stored.verifications().len(), 1);
    assert!(!stored.verifications()[0].ok);
    let incidents = handle
        .peek(|core, _| core.incidents().cloned().collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(incidents
        .iter()
        .any(|i| i.kind == IncidentKind::ArtifactGate && i.run == Some(run)));
    let audit = handle.audit_of_run(run, 100).await.unwrap();
    assert!(audit.iter().any(|a| a
        .output
        .as_deref()
        .is_some_and(|o| o.contains("no such report"))));

    // The worker checks the fixed artifact itself, then completes: the pass is reused.
    let verified = handle
        .verify(run, token, format!("{base}/ok"))
        .await
        .unwrap();
    assert!(verified.ok);
    assert_eq!(verified.status, Some(200));
    handle
        .complete(run, token, success(format!("{base}/ok")))
        .await
        .unwrap();
    let stored = store.run(run).unwrap().unwrap();
    assert_eq!(stored.state(), RunState::Succeeded);
    assert_eq!(stored.verifications().len(), 2, "the pass was reused");
    // The run is over: a verify is refused before anything is checked.
    assert!(matches!(
        handle.verify(run, token, format!("{base}/ok")).await,
        Err(CommandError::Rejected(Rejected::UnknownRun(r))) if r == run
    ));
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn operator_lease_actions_fence_the_old_token_and_restore_under_a_new_one() {
    let store = SharedMemStore::new();
    let (runtime, handle) = paused(Arc::new(store.clone())).started().await;
    let mut spec = common::once("render", "gpu", 1_000);
    spec.external = true;
    handle.add_job(spec).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let worker = WorkerId::new("gpu-box").unwrap();
    let attempt = handle
        .claim(worker.clone(), vec!["gpu".into()])
        .await
        .unwrap()
        .unwrap();
    let (run, token) = (attempt.run, attempt.lease.token);

    let released = handle
        .release_lease(run, "alice".into(), "drain the host".into())
        .await
        .unwrap();
    assert_eq!(
        released,
        LeaseAction::Released {
            owner: worker.clone(),
            token,
            state: StateName::Queued
        }
    );
    assert!(matches!(
        handle.heartbeat(run, token).await,
        Err(CommandError::Rejected(Rejected::StaleToken { .. }))
    ));
    let LeaseAction::Restored { lease, previous } = handle
        .restore_lease(run, "alice".into(), "undo".into())
        .await
        .unwrap()
    else {
        panic!("restored");
    };
    assert_eq!(previous, token);
    assert!(lease.token > token);
    assert_eq!(lease.owner, worker);
    // Durable when answered.
    assert_eq!(
        store.run(run).unwrap().unwrap().lease().map(|l| l.token),
        Some(lease.token)
    );
    assert!(matches!(
        handle.heartbeat(run, token).await,
        Err(CommandError::Rejected(Rejected::StaleToken { current: Some(current), .. }))
            if current == lease.token
    ));
    handle.heartbeat(run, lease.token).await.unwrap();
    assert!(matches!(
        handle
            .restore_lease(run, "alice".into(), "again".into())
            .await,
        Err(CommandError::Rejected(Rejected::NothingToRestore { .. }))
    ));
    let reclaimed = handle
        .reclaim_lease(run, "bob".into(), "wedged".into())
        .await
        .unwrap();
    assert!(matches!(reclaimed, LeaseAction::Reclaimed { token, .. } if token == lease.token));
    let audit = handle.audit_of_run(run, 100).await.unwrap();
    assert!(audit
        .iter()
        .any(|a| a.actor.to_string() == "operator:bob" && a.reason.ends_with("wedged")));
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn an_own_handler_refused_by_the_gate_is_retried_and_its_next_attempt_passes() {
    let base = server().await;
    let store = SharedMemStore::new();
    let answer = base.clone();
    let runtime = Runtime::builder(Arc::new(store.clone()))
        .seed(7)
        .handler("render", move |ctx: keel_runtime::AttemptContext| {
            // The first attempt reports an artifact that is not there; the next one fixes it.
            let path = if ctx.attempt.0 == 1 { "missing" } else { "ok" };
            let report = format!("{answer}/{path}");
            async move { success(report) }
        })
        .start()
        .await
        .unwrap();
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    let far = keel_runtime::now().plus_ms(3_600_000);
    let mut spec = JobSpec::new(
        JobId::new("render").unwrap(),
        "render",
        ScheduleSpec::once(far),
    );
    spec.required_artifacts = vec!["report".to_string()].into();
    handle.add_job(spec).await.unwrap();
    let run = handle.trigger(JobId::new("render").unwrap()).await.unwrap();
    let state = common::finished_within(&mut events, "render", Duration::from_secs(30)).await;
    assert_eq!(state, StateName::Succeeded);
    handle.sync().await.unwrap();
    let stored = store.run(run).unwrap().unwrap();
    assert_eq!(stored.attempt().0, 2);
    let evidence: Vec<(u32, bool)> = stored
        .verifications()
        .iter()
        .map(|v| (v.attempt.0, v.ok))
        .collect();
    assert_eq!(evidence, vec![(1, false), (2, true)]);
    runtime.shutdown(Duration::from_secs(1)).await.unwrap();
}

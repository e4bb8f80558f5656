//! The command sink, against `sh` scripts.

use std::time::Duration;

use keel_core::outbox::DeliveryResult;
use keel_harness::TempDir;
use keel_runtime::sinks::CommandSinkError;
use keel_runtime::{CommandSink, Sink};

use crate::{assert_document, assert_times_out, incident_request, request, transient};

fn sh(script: &str, args: &[&str]) -> CommandSink {
    let mut argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    CommandSink::new(argv).unwrap()
}

#[tokio::test]
async fn command_exit_0_is_delivered_and_stdin_carries_the_json() {
    let dir = TempDir::created("keel-command-sink");
    let out = dir.path().join("stdin.json");
    let env = dir.path().join("env");
    let sink = sh(
        r#"cat > "$0" && printf '%s %s %s' "$KEEL_DELIVERY_ID" "$KEEL_DELIVERY_ATTEMPT" "$KEEL_SINK" > "$1""#,
        &[out.to_str().unwrap(), env.to_str().unwrap()],
    );
    assert_eq!(sink.send(request(9, 2)).await, DeliveryResult::Delivered);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_document(&json, "delivery-9", 2);
    assert_eq!(std::fs::read_to_string(&env).unwrap(), "delivery-9 2 hook");
}

/// An incident notification reaches a command as a run's result does: the same environment,
/// and its document (the notice under `incident`) on stdin. The label names the program only.
#[tokio::test]
async fn a_command_gets_an_incident_notification_on_stdin_with_the_same_environment() {
    let dir = TempDir::created("keel-command-sink-incident");
    let out = dir.path().join("stdin.json");
    let env = dir.path().join("env");
    let sink = sh(
        r#"cat > "$0" && printf '%s %s %s' "$KEEL_DELIVERY_ID" "$KEEL_DELIVERY_ATTEMPT" "$KEEL_SINK" > "$1""#,
        &[out.to_str().unwrap(), env.to_str().unwrap()],
    );
    assert_eq!(
        sink.send(incident_request(9, 1)).await,
        DeliveryResult::Delivered
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(json["delivery_id"], "delivery-9", "{json}");
    assert_eq!(json["incident"]["event"], "resolved", "{json}");
    assert_eq!(json["incident"]["kind"], "stuck_run", "{json}");
    assert_eq!(json["incident"]["operator"]["by"], "ana", "{json}");
    assert!(json.get("run").is_none(), "{json}");
    assert_eq!(std::fs::read_to_string(&env).unwrap(), "delivery-9 1 ops");
    assert_eq!(sink.label().as_deref(), Some("command:sh"));
    assert_eq!(sink.named("pager").label().as_deref(), Some("pager"));
}

#[tokio::test]
async fn command_exit_75_is_transient() {
    let sink = sh(
        "cat > /dev/null; echo 'queue full, try later' >&2; exit 75",
        &[],
    );
    let (error, retry_after_ms) = transient(sink.send(request(1, 1)).await);
    assert_eq!(retry_after_ms, None);
    assert!(error.contains("75"), "{error}");
    assert!(error.contains("queue full, try later"), "{error}");
}

#[tokio::test]
async fn command_exit_1_is_permanent_with_the_end_of_stderr() {
    let sink = sh("echo 'bad payload' >&2; exit 1", &[]);
    match sink.send(request(1, 1)).await {
        DeliveryResult::Permanent { error } => {
            assert!(error.contains("exit status: 1"), "{error}");
            assert!(error.contains("bad payload"), "{error}");
        }
        other => panic!("expected permanent, got {other:?}"),
    }
    // A long stderr is quoted by its end, bounded.
    let sink = sh(
        "i=0; while [ $i -lt 500 ]; do echo \"noise line $i\" >&2; i=$((i+1)); done; echo 'the real cause' >&2; exit 3",
        &[],
    );
    match sink.send(request(1, 1)).await {
        DeliveryResult::Permanent { error } => {
            assert!(error.contains("the real cause"), "{error}");
            assert!(!error.contains("noise line 0\n"), "{error}");
            assert!(error.contains('…'), "the cut is marked: {error}");
            assert!(error.len() < 700, "{} bytes: {error}", error.len());
        }
        other => panic!("expected permanent, got {other:?}"),
    }
}

#[tokio::test]
async fn command_that_ignores_stdin_is_judged_by_its_exit_status() {
    assert_eq!(
        sh("exit 0", &[]).send(request(1, 1)).await,
        DeliveryResult::Delivered
    );
}

#[tokio::test]
async fn command_killed_at_its_timeout_is_transient() {
    let sink = sh("exec sleep 30", &[]).with_timeout(Duration::from_millis(200));
    assert_times_out(&sink, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn command_that_does_not_exist_is_permanent() {
    let sink = CommandSink::new(["/nonexistent/keel-notify"]).unwrap();
    assert!(matches!(
        sink.send(request(1, 1)).await,
        DeliveryResult::Permanent { .. }
    ));
    assert_eq!(
        CommandSink::new(Vec::<String>::new()).unwrap_err(),
        CommandSinkError::EmptyArgv
    );
}

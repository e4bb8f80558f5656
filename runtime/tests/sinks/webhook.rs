//! The webhook sink, against a scripted local HTTP server: one attempt at a time, then end to
//! end through the runtime's outbox.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::outbox::{
    DeliveryPolicy, DeliveryResult, DeliveryStatus, OutboxConfig, OutboxEvent,
};
use keel_core::{Config, Event, JobId, JobSpec, Outcome, ScheduleSpec, Store, WorkerId};
use keel_runtime::sinks::{WebhookError, IDEMPOTENCY_KEY_HEADER};
use keel_runtime::{AttemptContext, Clock, Runtime, Sink, WebhookSink};
use keel_testkit::SharedMemStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};

use crate::{assert_document, assert_times_out, request, transient, GUARD, T0};

// ---------------------------------------------------------------------------------------------
// A scripted HTTP/1.1 server.

/// What the server answers to one request.
#[derive(Clone, Debug)]
enum Reply {
    Status {
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: &'static str,
    },
    /// Reads the request and never answers.
    Hang,
}

fn status(status: u16) -> Reply {
    Reply::Status {
        status,
        headers: Vec::new(),
        body: "",
    }
}

/// A request as the server received it. Header names are lower case.
#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Answers each request with the next scripted reply (the last one repeats) and records it.
struct Server {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Recorded>,
}

impl Server {
    async fn start(replies: Vec<Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replies = Arc::new(Mutex::new(VecDeque::from(replies)));
        let (tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let replies = Arc::clone(&replies);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, replies, tx).await;
                });
            }
        });
        Server { addr, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn next_request(&mut self) -> Recorded {
        tokio::time::timeout(GUARD, self.requests.recv())
            .await
            .expect("a request arrives")
            .unwrap()
    }

    /// The requests received so far.
    fn received(&mut self) -> Vec<Recorded> {
        let mut all = Vec::new();
        while let Ok(request) = self.requests.try_recv() {
            all.push(request);
        }
        all
    }
}

async fn serve_one(
    mut stream: TcpStream,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    tx: mpsc::UnboundedSender<Recorded>,
) -> std::io::Result<()> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_string();
    let path = request_line.next().unwrap().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = data[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let reply = {
        let mut replies = replies.lock().unwrap();
        if replies.len() > 1 {
            replies.pop_front().unwrap()
        } else {
            replies.front().cloned().unwrap()
        }
    };
    let _ = tx.send(Recorded {
        method,
        path,
        headers,
        body,
    });
    match reply {
        Reply::Hang => {
            std::future::pending::<()>().await;
            Ok(())
        }
        Reply::Status {
            status,
            headers,
            body,
        } => {
            let mut response = format!(
                "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                response.push_str(&format!("{name}: {value}\r\n"));
            }
            response.push_str("\r\n");
            response.push_str(body);
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await
        }
    }
}
// ---------------------------------------------------------------------------------------------
// The webhook sink, one attempt at a time.

#[tokio::test]
async fn webhook_200_is_delivered_with_the_json_and_the_delivery_id_header() {
    let mut server = Server::start(vec![status(200)]).await;
    let sink = WebhookSink::new(&server.url("/hooks/keel?token=s3cret"))
        .unwrap()
        .with_header("Authorization", "Bearer hunter2")
        .unwrap();
    assert_eq!(sink.send(request(7, 1)).await, DeliveryResult::Delivered);
    let received = server.next_request().await;
    assert_eq!(received.method, "POST");
    assert_eq!(received.path, "/hooks/keel?token=s3cret");
    assert_eq!(received.header(IDEMPOTENCY_KEY_HEADER), Some("delivery-7"));
    assert_eq!(received.header("keel-delivery-attempt"), Some("1"));
    assert_eq!(received.header("content-type"), Some("application/json"));
    assert_eq!(received.header("authorization"), Some("Bearer hunter2"));
    assert_document(&received.json(), "delivery-7", 1);
    // Neither the token in the URL nor the header's value shows in Debug.
    let debug = format!("{sink:?}");
    assert!(
        !debug.contains("s3cret") && !debug.contains("hunter2"),
        "{debug}"
    );
}

#[tokio::test]
async fn webhook_503_with_retry_after_is_transient_and_passes_the_delay_on() {
    let server = Server::start(vec![Reply::Status {
        status: 503,
        headers: vec![("Retry-After", "7")],
        body: "down for maintenance",
    }])
    .await;
    let sink = WebhookSink::new(&server.url("/")).unwrap();
    let (error, retry_after_ms) = transient(sink.send(request(1, 1)).await);
    assert_eq!(retry_after_ms, Some(7_000));
    assert!(error.contains("503"), "{error}");
    assert!(error.contains("down for maintenance"), "{error}");
}

#[tokio::test]
async fn webhook_404_is_permanent_and_quotes_the_body() {
    let server = Server::start(vec![Reply::Status {
        status: 404,
        headers: Vec::new(),
        body: "no such hook",
    }])
    .await;
    let sink = WebhookSink::new(&server.url("/missing")).unwrap();
    match sink.send(request(1, 1)).await {
        DeliveryResult::Permanent { error } => {
            assert!(error.contains("404"), "{error}");
            assert!(error.contains("no such hook"), "{error}");
        }
        other => panic!("expected permanent, got {other:?}"),
    }
}

#[tokio::test]
async fn webhook_redirects_are_not_followed_and_are_permanent() {
    let mut server = Server::start(vec![Reply::Status {
        status: 302,
        headers: vec![("Location", "http://127.0.0.1:1/elsewhere")],
        body: "",
    }])
    .await;
    let sink = WebhookSink::new(&server.url("/")).unwrap();
    assert!(matches!(
        sink.send(request(1, 1)).await,
        DeliveryResult::Permanent { .. }
    ));
    server.next_request().await;
    assert!(server.received().is_empty(), "one request, not followed");
}

#[tokio::test]
async fn webhook_connection_refused_is_transient() {
    // A port that was just free: nothing listens on it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let sink = WebhookSink::new(&format!("http://{addr}/hook?token=s3cret")).unwrap();
    let (error, retry_after_ms) = transient(sink.send(request(1, 1)).await);
    assert_eq!(retry_after_ms, None);
    assert!(!error.contains("s3cret"), "the URL is kept out: {error}");
}

#[tokio::test]
async fn webhook_a_server_slower_than_the_timeout_is_transient() {
    let mut server = Server::start(vec![Reply::Hang]).await;
    let sink = WebhookSink::new(&server.url("/"))
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    assert_times_out(&sink, Duration::from_secs(5)).await;
    server.next_request().await;
}

#[test]
fn webhook_urls_must_be_http_or_https() {
    assert_eq!(
        WebhookSink::new("ftp://example.com/hook").unwrap_err(),
        WebhookError::UnsupportedScheme("ftp".into())
    );
    assert!(matches!(
        WebhookSink::new("not a url").unwrap_err(),
        WebhookError::InvalidUrl(_)
    ));
    assert!(matches!(
        WebhookSink::new("http://").unwrap_err(),
        WebhookError::InvalidUrl(_)
    ));
    assert!(WebhookSink::new("https://example.com/hook").is_ok());
    assert!(matches!(
        WebhookSink::new("https://example.com/")
            .unwrap()
            .with_header("bad header", "x")
            .unwrap_err(),
        WebhookError::InvalidHeader { .. }
    ));
}
// ---------------------------------------------------------------------------------------------
// End to end: a run's result goes through the runtime's outbox to the webhook.

fn fast_retries() -> Config {
    Config {
        outbox: OutboxConfig {
            policy: DeliveryPolicy {
                attempts_max: 3,
                backoff_base_ms: 20,
                ..DeliveryPolicy::default()
            },
            ..OutboxConfig::default()
        },
        ..Config::default()
    }
}

/// Runs one `report` job whose result goes to the sink `hook`; returns every outbox event up to
/// and including the delivery's `Finished`.
async fn deliver_one_run(sink: WebhookSink) -> (SharedMemStore, Vec<OutboxEvent>) {
    let store = SharedMemStore::new();
    let runtime = Runtime::builder(Arc::new(store.clone()))
        .clock(Clock::starting_at(T0))
        .seed(7)
        .worker(WorkerId::new("sinks-test").unwrap())
        .config(fast_retries())
        .handler("report", |_ctx: AttemptContext| async move {
            Outcome::Success {
                summary: Some("42 rows".into()),
                artifacts: Default::default(),
            }
        })
        .sink("hook", sink)
        .start()
        .await
        .unwrap();
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    let mut spec = JobSpec::new(
        JobId::new("report").unwrap(),
        "report",
        // Far away: the test triggers the run itself.
        ScheduleSpec::Once {
            at: T0.plus_ms(24 * 3600 * 1000),
        },
    );
    spec.sinks = vec!["hook".into()].into_boxed_slice();
    handle.add_job(spec.clone()).await.unwrap();
    handle.trigger(spec.id.clone()).await.unwrap();
    let seen = tokio::time::timeout(GUARD, outbox_events_until_finished(&mut events))
        .await
        .expect("the delivery finishes");
    handle.sync().await.unwrap();
    let outbox_empty = handle
        .call(|core, _| core.outbox().is_empty())
        .await
        .unwrap();
    assert!(outbox_empty, "the delivery left the outbox");
    runtime.shutdown(Duration::from_secs(5)).await.unwrap();
    (store, seen)
}

async fn outbox_events_until_finished(events: &mut broadcast::Receiver<Event>) -> Vec<OutboxEvent> {
    let mut seen = Vec::new();
    loop {
        if let Event::Delivery(event) = events.recv().await.unwrap() {
            let finished = matches!(event, OutboxEvent::Finished { .. });
            seen.push(event);
            if finished {
                return seen;
            }
        }
    }
}

#[tokio::test]
async fn a_result_the_webhook_refuses_once_with_503_is_delivered_on_the_second_attempt() {
    let mut server = Server::start(vec![status(503), status(200)]).await;
    let sink = WebhookSink::new(&server.url("/hook")).unwrap();
    let (store, events) = deliver_one_run(sink).await;

    let finished: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, OutboxEvent::Finished { .. }))
        .collect();
    assert_eq!(finished.len(), 1, "{events:?}");
    let OutboxEvent::Finished {
        sink,
        status,
        attempts,
        error,
        ..
    } = finished[0]
    else {
        unreachable!()
    };
    assert_eq!(&**sink, "hook");
    assert_eq!(*status, DeliveryStatus::Success);
    assert_eq!(*attempts, 2);
    assert_eq!(*error, None);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, OutboxEvent::RetryScheduled { attempt: 1, .. }))
            .count(),
        1,
        "{events:?}"
    );

    let received = server.received();
    assert_eq!(received.len(), 2, "two attempts reached the server");
    let keys: Vec<_> = received
        .iter()
        .map(|r| r.header(IDEMPOTENCY_KEY_HEADER).unwrap().to_string())
        .collect();
    assert_eq!(keys[0], keys[1], "the same delivery id on both attempts");
    let documents: Vec<_> = received.iter().map(Recorded::json).collect();
    assert_eq!(documents[0]["attempt"], 1);
    assert_eq!(documents[1]["attempt"], 2);
    assert_eq!(documents[1]["job"], "report");
    assert_eq!(documents[1]["state"], "succeeded");
    assert_eq!(documents[1]["summary"], "42 rows");
    assert_eq!(documents[1]["delivery_id"], keys[1].as_str());
    assert!(
        store.read().unwrap().deliveries.is_empty(),
        "the finished delivery's record is deleted"
    );
}

#[tokio::test]
async fn a_result_the_webhook_answers_404_is_dropped_as_permanent_after_one_attempt() {
    let mut server = Server::start(vec![Reply::Status {
        status: 404,
        headers: Vec::new(),
        body: "no such hook",
    }])
    .await;
    let sink = WebhookSink::new(&server.url("/missing")).unwrap();
    let (store, events) = deliver_one_run(sink).await;

    assert!(
        !events
            .iter()
            .any(|e| matches!(e, OutboxEvent::RetryScheduled { .. })),
        "{events:?}"
    );
    let Some(OutboxEvent::Finished {
        status,
        attempts,
        error,
        ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert_eq!(*status, DeliveryStatus::Permanent);
    assert_eq!(*attempts, 1);
    let error = error.as_deref().unwrap();
    assert!(
        error.contains("404") && error.contains("no such hook"),
        "{error}"
    );
    assert_eq!(server.received().len(), 1);
    assert!(store.read().unwrap().deliveries.is_empty());
}
/// Logs and metric labels name a webhook by scheme, host and port: the URL's user info,
/// path and query often carry secrets.
#[test]
fn a_webhook_is_labelled_without_its_secrets() {
    use keel_runtime::Sink;
    let sink = keel_runtime::WebhookSink::new(
        "https://user:hunter2@hooks.example.com:8443/services/T0/SECRET?token=abc",
    )
    .unwrap();
    assert_eq!(
        sink.label().as_deref(),
        Some("https://hooks.example.com:8443")
    );
    let plain = keel_runtime::WebhookSink::new("http://127.0.0.1/hook").unwrap();
    assert_eq!(plain.label().as_deref(), Some("http://127.0.0.1"));
}

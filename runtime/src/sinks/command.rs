//! The command sink: runs a program per delivery attempt, the JSON on its stdin.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use keel_core::limits;
use keel_core::outbox::{DeliveryResult, SendRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::{sleep_until, timeout, Instant};

use super::delivery_json;
use crate::child::{start_error_is_lasting, Tail, OUTPUT_OPEN_AFTER_EXIT_MAX};
use crate::sink::{BoxFuture, Sink};

/// How long the program may run, unless [`CommandSink::with_timeout`] says otherwise.
pub const COMMAND_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// The exit code that asks for another attempt (`EX_TEMPFAIL` of BSD's `sysexits.h`).
pub const EX_TEMPFAIL: i32 = 75;

/// How much of the end of the program's stderr a failure quotes.
const STDERR_TAIL_MAX_BYTES: usize = limits::DELIVERY_BODY_EXCERPT_MAX_BYTES;

/// Why a [`CommandSink`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandSinkError {
    /// The argv is empty: there is no program to run.
    #[error("a command sink needs a program to run, and its argv is empty")]
    EmptyArgv,
}

/// Delivers a result or an incident notification by running a program, given as an argv and
/// run without a shell, with the delivery's JSON document ([`super::DeliveryDocument`], then a
/// newline) on its stdin: the same document a webhook receives, so an incident notification
/// is the one with an `incident` key.
///
/// - Exit 0 is delivered; exit [`EX_TEMPFAIL`] (75) is transient; any other exit, or death by
///   a signal, is permanent. A failure quotes the last 512 bytes of the program's stderr.
/// - A program still running at the timeout ([`COMMAND_TIMEOUT_DEFAULT`]) is killed, and the
///   attempt is transient.
/// - A program that cannot be started because it does not exist or is not executable is
///   permanent; any other failure to start it (out of processes, say) is transient.
/// - The environment is inherited, plus `KEEL_DELIVERY_ID` (the delivery id, stable across
///   attempts, for deduplication), `KEEL_DELIVERY_ATTEMPT` and `KEEL_SINK`. Stdout is
///   discarded.
/// - The child is killed if the attempt is dropped (the runtime shut down mid-attempt).
#[derive(Clone, Debug)]
pub struct CommandSink {
    program: OsString,
    args: Vec<OsString>,
    timeout: Duration,
    name: Option<String>,
}

impl CommandSink {
    /// A sink that runs `argv[0]` with the arguments `argv[1..]` (a bare name is looked up in
    /// `PATH`).
    pub fn new<I, S>(argv: I) -> Result<Self, CommandSinkError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut argv = argv.into_iter().map(Into::into);
        let program = argv.next().ok_or(CommandSinkError::EmptyArgv)?;
        if program.is_empty() {
            return Err(CommandSinkError::EmptyArgv);
        }
        Ok(CommandSink {
            program,
            args: argv.collect(),
            timeout: COMMAND_TIMEOUT_DEFAULT,
            name: None,
        })
    }

    /// Names the sink: logs and metric labels say `name` rather than `command:PROGRAM`.
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Sets how long the program may run before it is killed.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout of one attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Makes one delivery attempt and classifies its outcome.
    pub async fn deliver(&self, request: &SendRequest) -> DeliveryResult {
        let name = Path::new(&self.program).display().to_string();
        let mut body = match delivery_json(request) {
            Ok(body) => body,
            Err(e) => {
                return DeliveryResult::Permanent {
                    error: format!("cannot encode the delivery as JSON: {e}"),
                }
            }
        };
        body.push(b'\n');
        let spawned = Command::new(&self.program)
            .args(&self.args)
            .env("KEEL_DELIVERY_ID", request.id.to_string())
            .env("KEEL_DELIVERY_ATTEMPT", request.attempt.to_string())
            .env("KEEL_SINK", &*request.sink)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return spawn_failure(&name, &e),
        };
        let stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let deadline = Instant::now() + self.timeout;
        let mut tail = Tail::new(STDERR_TAIL_MAX_BYTES);
        let status = {
            let feed = async move {
                let Some(mut stdin) = stdin else { return };
                // A program that exits without reading its stdin breaks the pipe; its exit
                // status says how the attempt went, not this write.
                let _ = stdin.write_all(&body).await;
                let _ = stdin.shutdown().await;
            };
            let exited = async {
                let ((), status) = tokio::join!(feed, child.wait());
                status
            };
            let collect = read_tail(stderr, &mut tail);
            tokio::pin!(exited, collect);
            let mut collected = false;
            let status = loop {
                tokio::select! {
                    status = &mut exited => break Some(status),
                    () = &mut collect, if !collected => collected = true,
                    () = sleep_until(deadline) => break None,
                }
            };
            if status.is_some() && !collected {
                // After the exit, stderr may stay open (held by a child the program left behind): the
                // failure is then reported with what was read so far.
                let _ = timeout(OUTPUT_OPEN_AFTER_EXIT_MAX, &mut collect).await;
            }
            status
        };
        match status {
            Some(Ok(status)) => classify_exit(&name, status, &tail),
            Some(Err(e)) => DeliveryResult::Transient {
                error: format!("cannot wait for {name}: {e}"),
                retry_after_ms: None,
            },
            None => {
                // kill_on_drop is the backstop; killing here also reaps the child.
                let _ = child.kill().await;
                DeliveryResult::Transient {
                    error: with_tail(
                        format!("{name} timed out after {:?} and was killed", self.timeout),
                        &tail,
                    ),
                    retry_after_ms: None,
                }
            }
        }
    }
}

impl Sink for CommandSink {
    fn send(&self, request: SendRequest) -> BoxFuture<DeliveryResult> {
        let sink = self.clone();
        Box::pin(async move { sink.deliver(&request).await })
    }

    /// Its name, or `command:` and the program alone: arguments may carry tokens.
    fn label(&self) -> Option<String> {
        if let Some(name) = &self.name {
            return Some(name.clone());
        }
        Some(format!("command:{}", Path::new(&self.program).display()))
    }
}

/// Exit 0 is delivered, [`EX_TEMPFAIL`] transient, anything else permanent.
fn classify_exit(name: &str, status: ExitStatus, tail: &Tail) -> DeliveryResult {
    if status.success() {
        return DeliveryResult::Delivered;
    }
    let error = with_tail(format!("{name} failed: {status}"), tail);
    if status.code() == Some(EX_TEMPFAIL) {
        DeliveryResult::Transient {
            error,
            retry_after_ms: None,
        }
    } else {
        DeliveryResult::Permanent { error }
    }
}

/// A program that is not there or not executable will not be on the next attempt either.
fn spawn_failure(name: &str, error: &io::Error) -> DeliveryResult {
    let error_text = format!("cannot run {name}: {error}");
    if start_error_is_lasting(error) {
        return DeliveryResult::Permanent { error: error_text };
    }
    DeliveryResult::Transient {
        error: error_text,
        retry_after_ms: None,
    }
}

/// Reads `from` to its end into `tail`.
async fn read_tail(from: Option<impl AsyncRead + Unpin>, tail: &mut Tail) {
    let Some(mut from) = from else { return };
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.push(&buf[..n]),
        }
    }
}

/// `message`, then the stderr tail if there is one, marked `…` at its start if it was cut.
fn with_tail(message: String, tail: &Tail) -> String {
    let cut = if tail.was_cut() { "…" } else { "" };
    let text = String::from_utf8_lossy(tail.bytes());
    let text = text.trim();
    if text.is_empty() {
        return message;
    }
    format!("{message}; stderr: {cut}{text}")
}

//! The client side of the control socket.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use crate::error::Failure;
use crate::place::Place;
use crate::protocol::{Request, Response};

/// How long a command waits for the daemon's answer unless `KEEL_TIMEOUT` (seconds) says
/// otherwise. The daemon answers once what the command changed is durable, so a daemon whose
/// store keeps failing would otherwise keep a command waiting for ever.
const ANSWER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(120);

/// `KEEL_TIMEOUT`, or the default. A value that is not a whole number of seconds, at least 1,
/// is refused by name rather than ignored.
pub(crate) fn answer_timeout() -> Result<Duration, Failure> {
    // Unset or empty: the default, as for `KEEL_LOG`.
    let Some(value) = std::env::var_os("KEEL_TIMEOUT").filter(|v| !v.is_empty()) else {
        return Ok(ANSWER_TIMEOUT_DEFAULT);
    };
    let text = value.to_string_lossy();
    match text.trim().parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(Failure::input(format!(
            "KEEL_TIMEOUT={text:?}: expected a whole number of seconds, at least 1 (how long a \
             command waits for the daemon's answer; default {})",
            ANSWER_TIMEOUT_DEFAULT.as_secs()
        ))),
    }
}

/// A connection to a running daemon.
#[derive(Debug)]
pub(crate) struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects if a daemon answers on the data directory's socket; `None` if none does (no
    /// socket, or a stale one left by a daemon that died).
    pub(crate) fn connect(place: &Place) -> Result<Option<Client>, Failure> {
        let path = place.socket();
        match UnixStream::connect(&path) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(answer_timeout()?))
                    .map_err(|e| Failure::runtime(format!("cannot use the control socket: {e}")))?;
                let reader = stream
                    .try_clone()
                    .map_err(|e| Failure::runtime(format!("cannot use the control socket: {e}")))?;
                Ok(Some(Client {
                    writer: stream,
                    reader: BufReader::new(reader),
                }))
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) => Err(Failure::runtime(format!(
                "cannot connect to the daemon's control socket {}: {e}",
                path.display()
            ))),
        }
    }

    /// Sends one request and waits for its answer.
    pub(crate) fn call(&mut self, request: &Request) -> Result<Value, Failure> {
        let lost = |e: std::io::Error| {
            Failure::runtime(format!(
                "lost the connection to the daemon ({e}); it may have stopped: check with \
                 `keel doctor` before retrying"
            ))
        };
        let mut line = serde_json::to_string(request)
            .map_err(|e| Failure::runtime(format!("cannot encode the request: {e}")))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(lost)?;
        let mut answer = String::new();
        let read = self.reader.read_line(&mut answer).map_err(|e| {
            if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                return lost(e);
            }
            let after = if request.is_read() {
                "it may be stopped or overloaded (see its log)"
            } else {
                "its store may be failing (see its log). The command may still take effect: \
                 check before retrying"
            };
            Failure::runtime(format!(
                "the daemon did not answer within {} s (KEEL_TIMEOUT): {after}",
                answer_timeout()
                    .map_or(ANSWER_TIMEOUT_DEFAULT, |t| t)
                    .as_secs()
            ))
        })?;
        if read == 0 {
            return Err(lost(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            )));
        }
        match serde_json::from_str::<Response>(&answer) {
            Ok(Response::Ok(value)) => Ok(value),
            Ok(Response::Err(failure)) => Err(failure),
            Err(e) => Err(Failure::runtime(format!(
                "the daemon sent an answer this keel does not read ({e}); is it another version?"
            ))),
        }
    }
}

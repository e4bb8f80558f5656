//! Reading the command's output: control lines, the kept tail, signs of life (module docs of
//! [`super`], "Talking to keel" and "Output").

use std::sync::{Mutex, PoisonError};

use keel_runtime::child::Tail;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{output, HEARTBEAT_INTERVAL, LINE_MAX_BYTES, READ_CHUNK_BYTES};

/// What the output readers tell the attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Control {
    /// The command wrote something (sent at most once a second per stream).
    Activity,
    /// A `::keel checkpoint` line.
    Checkpoint(String),
    /// A `::keel progress` line.
    Progress { phase: String, message: String },
    /// A `::keel summary` line: the run's summary if it succeeds (the last such line wins).
    Summary(String),
}

pub(super) fn lock(tail: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    // A reader never panics while holding the lock; if one did, its bytes are still good.
    tail.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads stdout: control lines go to the attempt, other bytes to `tail`.
pub(super) async fn read_stdout(
    mut stream: Stream<'_, impl AsyncRead + Unpin>,
    tail: &Mutex<Tail>,
) {
    let mut lines = Lines::new(LINE_MAX_BYTES);
    let mut pieces = Vec::new();
    while let Some(chunk) = stream.next().await {
        lines.push(chunk, &mut pieces);
        if !forward(&mut pieces, tail, &stream.tx).await {
            return;
        }
    }
    if stream.gone {
        return;
    }
    lines.finish(&mut pieces);
    forward(&mut pieces, tail, &stream.tx).await;
}

/// Hands control lines to the attempt and the rest to `tail`; false if the attempt is gone.
pub(super) async fn forward(
    pieces: &mut Vec<Piece>,
    tail: &Mutex<Tail>,
    tx: &mpsc::Sender<Control>,
) -> bool {
    for piece in pieces.drain(..) {
        match piece {
            Piece::Line(line) => match parse_control(&line) {
                Some(control) => {
                    if tx.send(control).await.is_err() {
                        return false;
                    }
                }
                None => lock(tail).push(&line),
            },
            Piece::Text(text) => lock(tail).push(&text),
        }
    }
    true
}

/// Reads stderr into `tail`.
pub(super) async fn read_stderr(
    mut stream: Stream<'_, impl AsyncRead + Unpin>,
    tail: &Mutex<Tail>,
) {
    while let Some(chunk) = stream.next().await {
        lock(tail).push(chunk);
    }
}

/// One of the command's output streams, read a chunk at a time: each chunk is kept (when the
/// handler keeps output) and is a sign of life, reported at most once per
/// [`HEARTBEAT_INTERVAL`].
pub(super) struct Stream<'a, R> {
    /// `None` if the command has no such stream: nothing to read.
    pipe: Option<R>,
    chunk: Vec<u8>,
    kept: Option<&'a mut output::Kept>,
    pulse: Pulse,
    tx: mpsc::Sender<Control>,
    /// The attempt stopped listening.
    gone: bool,
}

impl<'a, R: AsyncRead + Unpin> Stream<'a, R> {
    pub(super) fn new(
        pipe: Option<R>,
        kept: Option<&'a mut output::Kept>,
        tx: mpsc::Sender<Control>,
    ) -> Self {
        Stream {
            pipe,
            chunk: vec![0; READ_CHUNK_BYTES],
            kept,
            pulse: Pulse::default(),
            tx,
            gone: false,
        }
    }

    /// The next chunk, kept and reported; `None` at the end of the stream, after a read
    /// error, or once the attempt is gone (then `gone` is set).
    async fn next(&mut self) -> Option<&[u8]> {
        let pipe = self.pipe.as_mut()?;
        let n = match pipe.read(&mut self.chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        if let Some(kept) = self.kept.as_deref_mut() {
            kept.write(&self.chunk[..n]);
        }
        if self.pulse.due(Instant::now()) && self.tx.send(Control::Activity).await.is_err() {
            self.gone = true;
            return None;
        }
        Some(&self.chunk[..n])
    }
}

/// The control line in `line` (with its line ending), if it is one (module docs).
pub(super) fn parse_control(line: &[u8]) -> Option<Control> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("::keel ")?;
    let (command, argument) = match rest.split_once(' ') {
        Some((command, argument)) => (command, Some(argument)),
        None => (rest, None),
    };
    match command {
        "checkpoint" => Some(Control::Checkpoint(argument.unwrap_or("").to_string())),
        "summary" => Some(Control::Summary(argument.unwrap_or("").to_string())),
        "progress" => {
            let argument = argument.filter(|a| !a.is_empty())?;
            let (phase, message) = argument.split_once(' ').unwrap_or((argument, ""));
            if phase.is_empty() {
                return None;
            }
            Some(Control::Progress {
                phase: phase.to_string(),
                message: message.to_string(),
            })
        }
        _ => None,
    }
}

/// A piece of stdout.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// A whole line, with its `\n` (the last line may lack it): maybe a control line.
    Line(Vec<u8>),
    /// Part of a line too long to be a control line: ordinary output.
    Text(Vec<u8>),
}

/// Splits a byte stream into lines, holding at most `max` bytes of an unfinished line.
#[derive(Debug)]
pub(super) struct Lines {
    pending: Vec<u8>,
    /// The line being read outgrew `max`: the rest of it is ordinary output.
    overlong: bool,
    max: usize,
}

impl Lines {
    pub(super) fn new(max: usize) -> Lines {
        Lines {
            pending: Vec::new(),
            overlong: false,
            max,
        }
    }

    pub(super) fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Piece>) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&bytes[..=end]);
            bytes = &bytes[end + 1..];
            let line = std::mem::take(&mut self.pending);
            // Overlong whether it came in pieces or in one read: the same line is treated
            // the same however the pipe splits it.
            let overlong = std::mem::take(&mut self.overlong) || line.len() - 1 > self.max;
            out.push(if overlong {
                Piece::Text(line)
            } else {
                Piece::Line(line)
            });
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() > self.max {
            self.overlong = true;
            out.push(Piece::Text(std::mem::take(&mut self.pending)));
        }
    }

    pub(super) fn finish(&mut self, out: &mut Vec<Piece>) {
        if self.pending.is_empty() {
            return;
        }
        let rest = std::mem::take(&mut self.pending);
        out.push(if self.overlong {
            Piece::Text(rest)
        } else {
            Piece::Line(rest)
        });
    }
}

/// Rate-limits signs of life, on tokio's clock rather than a timer: `due` is true at most once
/// per [`HEARTBEAT_INTERVAL`].
#[derive(Debug, Default)]
pub(super) struct Pulse {
    last: Option<Instant>,
}

impl Pulse {
    pub(super) fn due(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < HEARTBEAT_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }

    pub(super) fn mark(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn control_lines_are_parsed_exactly_and_anything_else_is_output() {
        let checkpoint = |data: &str| Some(Control::Checkpoint(data.to_string()));
        let progress = |phase: &str, message: &str| {
            Some(Control::Progress {
                phase: phase.to_string(),
                message: message.to_string(),
            })
        };
        let parse = |line: &str| parse_control(line.as_bytes());
        assert_eq!(
            parse("::keel checkpoint {\"page\": 3}\n"),
            checkpoint("{\"page\": 3}")
        );
        assert_eq!(
            parse("::keel checkpoint  two  spaces \r\n"),
            checkpoint(" two  spaces ")
        );
        assert_eq!(parse("::keel checkpoint\n"), checkpoint(""));
        assert_eq!(parse("::keel checkpoint "), checkpoint(""));
        assert_eq!(
            parse("::keel progress upload 3 of 10 files\n"),
            progress("upload", "3 of 10 files")
        );
        assert_eq!(parse("::keel progress upload\n"), progress("upload", ""));
        assert_eq!(parse("::keel progress\n"), None);
        assert_eq!(parse("::keel progress \n"), None);
        assert_eq!(parse("::keel progress  x\n"), None);
        assert_eq!(parse("::keel heartbeat\n"), None);
        assert_eq!(parse("::keel  checkpoint x\n"), None);
        assert_eq!(parse("::keelcheckpoint x\n"), None);
        assert_eq!(parse(" ::keel checkpoint x\n"), None);
        assert_eq!(parse("echo ::keel checkpoint x\n"), None);
        assert_eq!(parse_control(b"::keel checkpoint \xff\n"), None);
    }

    #[test]
    fn lines_are_split_across_reads_and_an_overlong_line_is_plain_output() {
        let line = |bytes: &[u8]| Piece::Line(bytes.to_vec());
        let text = |bytes: &[u8]| Piece::Text(bytes.to_vec());
        let mut lines = Lines::new(8);
        let mut out = Vec::new();
        lines.push(b"ab", &mut out);
        lines.push(b"c\nde\nf", &mut out);
        assert_eq!(out, vec![line(b"abc\n"), line(b"de\n")]);
        out.clear();
        lines.push(b"0123456789", &mut out);
        assert_eq!(out, vec![text(b"f0123456789")]);
        out.clear();
        lines.push(b"rest\nnext", &mut out);
        assert_eq!(out, vec![text(b"rest\n")], "the same long line");
        out.clear();
        lines.finish(&mut out);
        assert_eq!(out, vec![line(b"next")]);
        // An overlong line that arrives in one read is plain output too; one of `max` bytes
        // (its newline aside) is a line.
        let mut lines = Lines::new(8);
        out.clear();
        lines.push(b"012345678\n01234567\n", &mut out);
        assert_eq!(out, vec![text(b"012345678\n"), line(b"01234567\n")]);
        out.clear();
        lines.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_pulse_is_due_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut pulse = Pulse::default();
        assert!(pulse.due(t0));
        assert!(!pulse.due(t0 + Duration::from_millis(999)));
        assert!(pulse.due(t0 + Duration::from_millis(1_000)));
        pulse.mark(t0 + Duration::from_millis(1_500));
        assert!(!pulse.due(t0 + Duration::from_millis(2_000)));
        assert!(pulse.due(t0 + Duration::from_millis(2_500)));
    }
}

//! What the programs keel runs as child processes share: the tail of their output, the grace
//! given to output still open after they exit, and which failures to start them are lasting.
//!
//! Two parts of keel run programs: the command sink ([`CommandSink`](crate::CommandSink)), one
//! per delivery attempt, and the CLI's command jobs (`keel_cli::command_job`), one per run
//! attempt. Both keep the end of what a program printed to quote it in a failure, both stop
//! reading a little after the program exits (a process it left behind may hold the pipe open),
//! and both decide from the error whether a program that could not be started is worth
//! another attempt. Those parts live here, once.
//!
//! What they do not share, on purpose, because sharing it would change what they do:
//!
//! - **The process group.** A command job runs in a process group of its own, so that a stop
//!   reaches whatever the command started and a crashed daemon's leftovers can be found and
//!   killed at the next start; the job signals the group with kill(2) (SIGTERM, then SIGKILL)
//!   and records it on disk first (the start gate). A sink's program is short, bounded by its
//!   timeout, and stays in the daemon's process group, so a Ctrl-C at the daemon's terminal
//!   reaches it as before; at its timeout only the program is killed (tokio's `kill`). Moving it
//!   into a group of its own would change both, and would also need a kill(2) binding this
//!   crate does not depend on.
//! - **Reading the output.** A command job reads stdout line by line for control lines, keeps
//!   the whole of each stream on disk and reports activity as heartbeats; a sink reads only
//!   the tail of stderr and discards stdout. Only the [`Tail`] both keep is common.
//! - **How an exit is described and classified.** Each has its own contract: exit 75 is the
//!   sink's only transient code, while command jobs follow a table with per-job overrides.
//! - **Which start failures are lasting** beyond [`start_error_is_lasting`]: a command job also
//!   counts the errors of arguments the system refuses (`InvalidInput`,
//!   `ArgumentListTooLong`), which a sink's fixed argv cannot meet at delivery time.

use std::io;
use std::time::Duration;

/// After a program exits, how long its output may stay open (held by a process it started and
/// left behind) before keel stops reading and goes on with what it has.
pub const OUTPUT_OPEN_AFTER_EXIT_MAX: Duration = Duration::from_secs(1);

/// Whether a program that could not be started will fail the same way at its next attempt: it
/// is not there, or not executable (or its working directory is not there).
pub fn start_error_is_lasting(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
    )
}

/// The last `max` bytes of a stream, in bounded memory.
#[derive(Debug)]
pub struct Tail {
    bytes: Vec<u8>,
    max: usize,
    /// Bytes pushed in all.
    seen: u64,
}

impl Tail {
    /// An empty tail that keeps the last `max` bytes.
    pub fn new(max: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            max,
            seen: 0,
        }
    }

    /// Adds what the stream delivered next.
    pub fn push(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        if bytes.len() >= self.max {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&bytes[bytes.len() - self.max..]);
            return;
        }
        self.bytes.extend_from_slice(bytes);
        // Trimmed in batches, so a stream of small writes costs amortised O(1) per byte.
        if self.bytes.len() >= 2 * self.max {
            let excess = self.bytes.len() - self.max;
            self.bytes.drain(..excess);
        }
    }

    /// The last `max` bytes pushed (all of them if there were fewer).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[self.bytes.len().saturating_sub(self.max)..]
    }

    /// Whether more was pushed than the tail keeps: its start was cut.
    pub fn was_cut(&self) -> bool {
        self.seen > self.bytes().len() as u64
    }

    /// The tail as text: invalid UTF-8 replaced, a character cut in half at the start dropped.
    pub fn text(&self) -> String {
        let mut kept = self.bytes();
        if self.was_cut() {
            // Skip the continuation bytes of a character whose start was dropped.
            let partial = kept
                .iter()
                .take(3)
                .take_while(|&&b| b & 0b1100_0000 == 0b1000_0000)
                .count();
            kept = &kept[partial..];
        }
        String::from_utf8_lossy(kept).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_bytes_as_valid_text() {
        let mut tail = Tail::new(5);
        tail.push(b"hello ");
        tail.push(b"wor");
        tail.push(b"ld");
        assert_eq!(tail.text(), "world");
        for _ in 0..100 {
            tail.push(b"xy");
        }
        assert!(
            tail.bytes.len() < 2 * 5 + 2,
            "bounded: {}",
            tail.bytes.len()
        );
        assert_eq!(tail.text(), "yxyxy");
        // A character cut in half at the start is dropped, not replaced.
        let mut tail = Tail::new(4);
        tail.push("aé€".as_bytes()); // a, 2 bytes, 3 bytes
        assert_eq!(tail.text(), "€");
        let mut tail = Tail::new(8);
        tail.push(b"ok \xff");
        assert_eq!(tail.text(), "ok \u{fffd}");
        let mut none = Tail::new(0);
        none.push(b"anything");
        assert_eq!(none.text(), "");
    }

    #[test]
    fn the_tail_says_whether_its_start_was_cut() {
        let mut tail = Tail::new(4);
        tail.push(b"abcd");
        assert_eq!((tail.bytes(), tail.was_cut()), (&b"abcd"[..], false));
        tail.push(b"e");
        assert_eq!((tail.bytes(), tail.was_cut()), (&b"bcde"[..], true));
    }

    #[test]
    fn only_a_missing_or_unexecutable_program_is_a_lasting_start_error() {
        let error = |kind| io::Error::new(kind, "test");
        assert!(start_error_is_lasting(&error(io::ErrorKind::NotFound)));
        assert!(start_error_is_lasting(&error(
            io::ErrorKind::PermissionDenied
        )));
        assert!(!start_error_is_lasting(&error(io::ErrorKind::OutOfMemory)));
        assert!(!start_error_is_lasting(&error(io::ErrorKind::WouldBlock)));
    }
}

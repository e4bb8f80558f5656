//! The attempt's outcome: how the command ended and what it printed, as an [`Outcome`]
//! (module docs of [`super`], "Exit codes" and "Output").

use std::collections::BTreeMap;
use std::process::ExitStatus;

use keel_core::text::{ceil_char_boundary, floor_char_boundary};
use keel_core::{limits, Outcome};
use keel_runtime::child::start_error_is_lasting;

use super::{CommandSpec, ExitCodes, SUMMARY_MAX_BYTES, TERM_GRACE};

/// What an exit status means for the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The work is done.
    Success,
    /// It failed; another attempt may succeed.
    Retryable,
    /// It failed; retrying cannot help.
    Permanent,
}

/// What an exit status means: `code` if the command exited, `signal` if a signal killed it.
/// A code listed in `overrides` wins over the default mapping (module docs, "Exit codes").
pub fn classify(code: Option<i32>, signal: Option<i32>, overrides: &ExitCodes) -> Verdict {
    let code = match (code, signal) {
        (Some(code), _) => code,
        // Killed by a signal: a crash or an OOM kill may not happen again.
        (None, Some(_)) | (None, None) => return Verdict::Retryable,
    };
    if overrides.success.contains(&code) {
        return Verdict::Success;
    }
    if overrides.permanent.contains(&code) {
        return Verdict::Permanent;
    }
    if overrides.retryable.contains(&code) {
        return Verdict::Retryable;
    }
    match code {
        0 => Verdict::Success,
        // Found but not executable; not found.
        126 | 127 => Verdict::Permanent,
        // EX_TEMPFAIL: "try again later".
        75 => Verdict::Retryable,
        // The rest of sysexits.h: usage, data, input, host, service, software, OS, file,
        // I/O, protocol, permission and configuration errors.
        64..=78 => Verdict::Permanent,
        _ => Verdict::Retryable,
    }
}

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Exit {
    pub(super) code: Option<i32>,
    pub(super) signal: Option<i32>,
}

impl Exit {
    pub(super) fn of(status: ExitStatus) -> Exit {
        #[cfg(unix)]
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        #[cfg(not(unix))]
        let signal = None;
        Exit {
            code: status.code(),
            signal,
        }
    }

    pub(super) fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(126), _) => "exited with code 126 (found but not executable)".into(),
            (Some(127), _) => "exited with code 127 (command not found)".into(),
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => match signal_name(signal) {
                Some(name) => format!("was killed by signal {signal} ({name})"),
                None => format!("was killed by signal {signal}"),
            },
            (None, None) => "ended without an exit status".into(),
        }
    }
}

/// Whether, and how, keel stopped the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stopped {
    /// It ended on its own.
    No,
    /// It was sent SIGTERM.
    Termed,
    /// It was sent SIGTERM, then SIGKILL.
    Killed,
}

/// What the command printed, for the outcome.
#[derive(Debug)]
pub(super) struct Output<'a> {
    pub(super) stdout: &'a str,
    pub(super) stderr: &'a str,
    /// Checkpoint lines that were not saved.
    pub(super) refused: Option<String>,
    /// A process the command started still held stdout or stderr open after it exited.
    pub(super) held_open: bool,
    /// The summary a `::keel summary` line gave.
    pub(super) said: Option<&'a str>,
    /// Why keel asked the command to stop, if it did.
    pub(super) stop_reason: Option<keel_core::StopReason>,
}

/// The attempt's outcome, from how the command ended and what it printed.
pub(super) fn outcome(
    spec: &CommandSpec,
    exit: Exit,
    stopped: Stopped,
    output: &Output<'_>,
) -> Outcome {
    let label = spec.label();
    let sent = match stopped {
        Stopped::No => None,
        Stopped::Termed => Some(format!("sent SIGTERM to {label}, which then")),
        Stopped::Killed => Some(format!(
            "sent SIGTERM to {label}, then SIGKILL {} ms later; it",
            TERM_GRACE.as_millis()
        )),
    };
    if let Some(sent) = sent {
        // Retryable, not `Cancelled`: the core ends the run `cancelled` after an operator's
        // cancel anyway, while a timeout or a shutdown must leave the run to retry.
        let why = output.stop_reason.map_or_else(
            || "asked to stop".to_string(),
            |r| format!("stopped because {r}"),
        );
        let head = format!("{why}: {sent} {}", exit.describe());
        return Outcome::Retryable {
            message: failure_message(&head, output),
        };
    }
    match classify(exit.code, exit.signal, &spec.exit_codes) {
        Verdict::Success => Outcome::Success {
            summary: match output.said {
                Some(said) => Some(bounded_head(said.to_string(), SUMMARY_MAX_BYTES))
                    .filter(|s| !s.is_empty()),
                None => summary(output.stdout),
            },
            artifacts: BTreeMap::new(),
        },
        Verdict::Retryable => Outcome::Retryable {
            message: failure_message(&format!("{label} {}", exit.describe()), output),
        },
        Verdict::Permanent => Outcome::Permanent {
            message: failure_message(
                &format!("{label} {} (permanent: not retried)", exit.describe()),
                output,
            ),
        },
    }
}

/// A failure message: `head`, a note on refused checkpoints, and the end of stderr (or of
/// stdout if stderr is empty), within keel's limit on stored messages.
pub(super) fn failure_message(head: &str, output: &Output<'_>) -> String {
    let mut message = head.to_string();
    if output.held_open {
        message.push_str("; a process it started still held its output open (not waited for)");
    }
    if let Some(note) = &output.refused {
        message.push_str("; ");
        message.push_str(note);
    }
    let (name, text) = match output.stderr.trim_end() {
        "" => ("stdout", output.stdout.trim_end()),
        stderr => ("stderr", stderr),
    };
    if text.is_empty() {
        return bounded_head(message, limits::MESSAGE_MAX_BYTES);
    }
    let label = format!("\n{name}:\n");
    let room = limits::MESSAGE_MAX_BYTES.saturating_sub(message.len() + label.len());
    if room == 0 {
        return bounded_head(message, limits::MESSAGE_MAX_BYTES);
    }
    message.push_str(&label);
    message.push_str(&tail_lines(text, room));
    message
}

/// The last line of stdout that is not blank, cut to [`SUMMARY_MAX_BYTES`]; `None` if the
/// command printed nothing (control lines aside). A command that printed fifty lines is
/// summed up by its last, not all fifty: the rest is in its output (`keel logs`).
pub(super) fn summary(stdout: &str) -> Option<String> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(tail_lines(line.trim_end(), SUMMARY_MAX_BYTES))
}

/// The last `max` bytes of `text` at most, starting at a line if a line break falls in them.
pub(super) fn tail_lines(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = ceil_char_boundary(text, text.len() - max);
    if let Some(newline) = text[start..].find('\n') {
        start += newline + 1;
    }
    text[start..].to_string()
}

/// `text` cut to `max` bytes at most, on a character boundary.
pub(super) fn bounded_head(mut text: String, max: usize) -> String {
    let cut = floor_char_boundary(&text, max);
    text.truncate(cut);
    text
}

/// A command that could not be started: permanent if it will not start next time either.
pub(super) fn spawn_failed(spec: &CommandSpec, error: &std::io::Error) -> Outcome {
    use std::io::ErrorKind;
    let place = match &spec.cwd {
        Some(cwd) => format!(" in {}", cwd.display()),
        None => String::new(),
    };
    let message = format!("cannot start {}{place}: {error}", spec.label());
    // Arguments the system refuses (a NUL byte, too long a list) are refused again next time.
    let lasting = start_error_is_lasting(error)
        || matches!(
            error.kind(),
            ErrorKind::InvalidInput | ErrorKind::ArgumentListTooLong
        );
    if lasting {
        Outcome::Permanent { message }
    } else {
        Outcome::Retryable { message }
    }
}

pub(super) fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::super::{checkpoint_refusal, CHECKPOINT_DATA_MAX_BYTES};
    use super::*;

    // ----- exit codes -------------------------------------------------------------------

    #[test]
    fn the_default_mapping_follows_the_table() {
        let none = ExitCodes::default();
        let exited = |code| classify(Some(code), None, &none);
        assert_eq!(exited(0), Verdict::Success);
        for code in [1, 2, 63, 79, 125, 128, 137, 143, 255] {
            assert_eq!(exited(code), Verdict::Retryable, "exit {code}");
        }
        for code in [64, 65, 70, 74, 76, 77, 78, 126, 127] {
            assert_eq!(exited(code), Verdict::Permanent, "exit {code}");
        }
        assert_eq!(exited(75), Verdict::Retryable, "EX_TEMPFAIL");
        assert_eq!(classify(None, Some(9), &none), Verdict::Retryable);
        assert_eq!(classify(None, Some(11), &none), Verdict::Retryable);
    }

    #[test]
    fn a_listed_exit_code_wins_over_the_default_and_signals_stay_retryable() {
        let overrides = ExitCodes {
            success: vec![1],
            retryable: vec![127],
            permanent: vec![3, 75],
        };
        assert_eq!(classify(Some(1), None, &overrides), Verdict::Success);
        assert_eq!(classify(Some(127), None, &overrides), Verdict::Retryable);
        assert_eq!(classify(Some(3), None, &overrides), Verdict::Permanent);
        assert_eq!(classify(Some(75), None, &overrides), Verdict::Permanent);
        assert_eq!(classify(Some(0), None, &overrides), Verdict::Success);
        assert_eq!(classify(Some(126), None, &overrides), Verdict::Permanent);
        assert_eq!(classify(None, Some(9), &overrides), Verdict::Retryable);
    }

    #[test]
    fn summaries_and_messages_are_bounded_and_keep_the_end() {
        assert_eq!(summary(""), None);
        assert_eq!(summary("\n\n"), None);
        assert_eq!(
            summary("one\ntwo\n\n  \n").as_deref(),
            Some("two"),
            "the last line"
        );
        let long: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(summary(&long).as_deref(), Some("line 1000"));
        // One line longer than the bound: its end, cut on a character boundary.
        let wide = "é".repeat(SUMMARY_MAX_BYTES);
        let s = summary(&wide).unwrap();
        assert!(s.len() <= SUMMARY_MAX_BYTES && s.chars().all(|c| c == 'é'));

        let big: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
        let output = Output {
            stdout: "ignored when stderr has text",
            stderr: &big,
            refused: None,
            held_open: false,
            said: None,
            stop_reason: None,
        };
        let message = failure_message("`x` exited with code 1", &output);
        assert!(message.len() <= limits::MESSAGE_MAX_BYTES);
        assert!(message.starts_with("`x` exited with code 1\nstderr:\n"));
        assert!(message.ends_with("\n100000"), "keeps the end");
        let output = Output {
            stdout: "only stdout\n",
            stderr: "",
            refused: Some("1 checkpoint line(s) were not saved".into()),
            held_open: true,
            said: None,
            stop_reason: None,
        };
        assert_eq!(
            failure_message("`x` exited with code 1", &output),
            "`x` exited with code 1; a process it started still held its output open (not \
             waited for); 1 checkpoint line(s) were not saved\nstdout:\nonly stdout"
        );
    }

    #[test]
    fn a_stopped_command_is_a_retryable_failure_whatever_its_exit() {
        let output = Output {
            stdout: "",
            stderr: "",
            refused: None,
            held_open: false,
            said: None,
            stop_reason: None,
        };
        let exit = Exit {
            code: Some(0),
            signal: None,
        };
        let Outcome::Retryable { message } = outcome(&spec(&["x"]), exit, Stopped::Termed, &output)
        else {
            panic!("not retryable");
        };
        assert_eq!(
            message,
            "asked to stop: sent SIGTERM to `x`, which then \
             exited with code 0"
        );
        assert_eq!(checkpoint_refusal("ok"), None);
        assert!(checkpoint_refusal("a\0b").is_some());
        assert!(checkpoint_refusal(&"x".repeat(CHECKPOINT_DATA_MAX_BYTES + 1)).is_some());
    }
}

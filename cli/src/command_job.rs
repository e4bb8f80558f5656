//! Command jobs: a job of kind `command` runs a program for each of its attempts.
//!
//! # The job's payload
//!
//! The payload is a [`CommandSpec`] as JSON:
//!
//! ```json
//! {
//!   "argv": ["/usr/local/bin/backup", "--full", "/srv/data"],
//!   "cwd": "/srv",
//!   "env": { "BACKUP_BUCKET": "s3://example-backups" },
//!   "exit_codes": { "retryable": [3] },
//!   "capture_bytes": 16384
//! }
//! ```
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `argv` | (required) | The program and its arguments. The program is run directly, never through a shell: `$HOME`, `*` and `;` reach it literally. A program without a `/` is looked up in `PATH`. |
//! | `shell` | `false` | Run `sh -c "<argv joined by single spaces>"` instead, so the shell expands variables, globs, pipes and redirections. Quoting is then yours. |
//! | `cwd` | the daemon's | The working directory. A relative path is relative to the daemon's working directory, so prefer an absolute one. |
//! | `env` | `{}` | Variables added to the environment the daemon was started with (a name given here replaces the inherited value). The `KEEL_*` names below are keel's and cannot be set here. |
//! | `exit_codes` | `{}` | Per-job overrides of the exit-code mapping: `{"success": [..], "retryable": [..], "permanent": [..]}`. |
//! | `capture_bytes` | 16384 | How much of stdout and of stderr is kept, each: the last N bytes (at most 1 MiB). |
//!
//! Any other field is refused, so a misspelt field name is an error rather than a silent default.
//! A payload that is not such an object, an empty `argv`, an empty program name, a NUL byte, an
//! invalid `env` name, an exit code outside 0–255 or listed twice, or a `capture_bytes` over the
//! limit ends the attempt as a permanent failure (`failed_dropped`, never retried) whose message
//! says what is wrong. The CLI checks the same ([`CommandSpec::validate`]) before it adds a job.
//!
//! # How an attempt runs
//!
//! Each attempt starts the program with stdin connected to `/dev/null` and stdout and stderr
//! read by keel. The command runs in a process group of its own, so that stopping it (below)
//! reaches the processes it started too, and a Ctrl-C at the daemon's terminal reaches only the
//! daemon, which then stops its commands itself.
//!
//! Besides the inherited environment and `env`, every attempt gets:
//!
//! | variable | value |
//! |---|---|
//! | `KEEL_RUN_ID` | the run, as keel shows it: `run-42` |
//! | `KEEL_JOB` | the job's name |
//! | `KEEL_ATTEMPT` | the attempt number, from 1 |
//! | `KEEL_IDEMPOTENCY_KEY` | `run-42-attempt-1`: pass it to the systems you change, so that a repeated attempt is recognised there (keel executes at least once) |
//! | `KEEL_FENCING_TOKEN` | the attempt's fencing token, a number that rises with every attempt keel hands out: storage that supports fencing refuses writes with a token lower than one it has seen |
//! | `KEEL_CHECKPOINT` | the data of the run's last checkpoint, when this attempt resumes from one; unset otherwise |
//!
//! # Talking to keel: control lines on stdout
//!
//! A command reports to keel by printing whole lines on **stdout** that start with `::keel `:
//!
//! | line | effect |
//! |---|---|
//! | `::keel checkpoint <data>` | Saves a checkpoint: the rest of the line after the single space that follows `checkpoint`, verbatim (it may be empty). The next attempt of this run (after a failure, a crash or a restart) gets it in `KEEL_CHECKPOINT`. |
//! | `::keel progress <phase> <message>` | Reports progress: `<phase>` is the first word, `<message>` the rest of the line after the single space that follows it (it may be empty). Shown by `keel runs show` and in stuck incidents. |
//!
//! For example, a copy that resumes where it stopped:
//!
//! ```sh
//! start=${KEEL_CHECKPOINT:-0}
//! for part in $(seq "$start" 99); do
//!   copy_part "$part"
//!   echo "::keel checkpoint $((part + 1))"
//!   echo "::keel progress copy part $((part + 1)) of 100"
//! done
//! ```
//!
//! Lines end at `\n` (a `\r` before it is dropped); the words are separated by exactly one
//! space. Control lines are not part of the captured output. A line that starts with `::keel `
//! but is not one of the two above, is not valid UTF-8, or a control line printed on stderr, is
//! ordinary output. Checkpoint data is text of at most 64 KiB without NUL bytes, because it
//! reaches the next attempt in an environment variable; a checkpoint line that breaks this is
//! not saved (a warning is logged, and the failure message of the attempt mentions it).
//! Checkpoints are throttled like every keel checkpoint (one write per 5 s by default): a save
//! inside the window is kept and written by a later one or when the attempt ends, so the next
//! attempt always sees the last checkpoint line of the one before, unless the daemon itself
//! crashed in between.
//!
//! Any output, on stdout or stderr, is a sign of life: keel records a heartbeat at most once a
//! second while the command writes. A command that stays silent for longer than the stuck
//! threshold (20 s by default) is reported in a `stuck_run` incident, and nothing more: print a
//! progress line now and then from long silent work.
//!
//! # Exit codes
//!
//! | exit | outcome |
//! |---|---|
//! | 0 | success |
//! | 126 (found but not executable), 127 (command not found) | permanent: never retried |
//! | 64–78 (`sysexits.h`: usage, data, config errors…) except 75 | permanent |
//! | 75 (`EX_TEMPFAIL`) | retryable |
//! | any other non-zero code | retryable |
//! | killed by a signal | retryable |
//!
//! A code listed in the job's `exit_codes` wins over this table: `{"success": [1]}` makes a
//! `grep` that found nothing a success, `{"permanent": [2]}` stops retries of a code your
//! program uses for bad input. A code may appear in only one of the three lists. Signals cannot
//! be overridden. With `shell: true`, the shell reports a command killed by signal N as exit
//! code 128+N, which is retryable unless overridden.
//!
//! A program that cannot be started is a permanent failure when it does not exist, is not
//! executable, or its `cwd` does not exist; any other failure to start (too many processes,
//! out of memory) is retryable.
//!
//! # Output
//!
//! keel keeps the last `capture_bytes` bytes of stdout (control lines left out) and of stderr,
//! decoded as UTF-8 with invalid bytes replaced. On success, the run's summary is the text of
//! the last `::keel summary TEXT` line, if the command printed one, or else the last line of
//! stdout that is not blank, at most 1 KiB (none if stdout was empty). With
//! [`handler_keeping_output`] (the daemon's), the whole of each stream is also kept per attempt,
//! bounded ([`output`]), for `keel logs`. On failure, the message names the
//! exit code or signal and quotes the end of stderr, or of stdout when stderr is empty; it is
//! at most 4 KiB, keel's limit on stored messages, keeping the end of the output. If the
//! command leaves a background process that holds its stdout or stderr open, keel stops
//! reading one second after the command itself exits, does not wait for that process (nor
//! stop it), and a failure message says "a process it started still held its output open".
//!
//! # Timeouts, cancels and shutdown
//!
//! When the attempt is asked to stop (the job's timeout passed, an operator cancelled the run,
//! or the daemon is shutting down), keel sends SIGTERM to the command's process group and
//! waits for the command to exit. If it has not exited 10 s later, keel sends SIGKILL. The
//! watchdog may kill the attempt sooner (`kill_grace`, 10 s after a timeout by default), and a
//! shutdown stops waiting when its time budget is spent; the command's process group is then
//! killed with SIGKILL at once.
//!
//! An attempt stopped this way ends as a retryable failure whose message says so, whatever the
//! command's exit status, because keel cannot tell whether the work was done. keel then decides
//! by why it asked: after an operator's cancel the run ends `cancelled`; after a timeout the run
//! is retried like any failure (or `failed` once its attempts are used up); after a shutdown it
//! is interrupted by shutdown and resumes at the next start, from its last checkpoint, using
//! none of its attempts (SPEC O1: the core records it so, whatever the command reports). A
//! command still running when a shutdown's budget is spent is killed, and its run is recovered
//! at the next start like one interrupted by a crash.
//!
//! # After a crash
//!
//! Its own process group lets a command outlive a daemon killed with SIGKILL, one that crashed,
//! or one stopped at once by a second signal. The next daemon recovers the run at once and starts
//! a new attempt. keel executes at least once, but an attempt known to be dead must not run
//! beside the one that replaces it, so on Linux:
//!
//! - While a command runs, [`handler`] records it in its attempts directory (`keel run`:
//!   `<data-dir>/attempts`, 0700) as `<run>-<attempt>` (`run-42-1`, 0600): the process group
//!   id (the command's pid), the command's start time (field 22 of `/proc/<pid>/stat`, in clock
//!   ticks since boot) and the boot id. The record is removed once the command has exited and
//!   been reaped, or was killed with its group (a watchdog abort, a shutdown whose budget ran
//!   out).
//! - The command cannot run before it is recorded. The pid is known only once the process
//!   exists, and writing the record (synced to disk) takes time a SIGKILL can land in, so keel
//!   starts a gate: `/bin/sh` in the command's new process group, waiting for a line on its
//!   stdin. Once the record is written, keel sends the line and the gate `exec`s the command in
//!   its place (same pid, same group, same start time; stdin `/dev/null` as before). A daemon
//!   that dies before that closes the gate's stdin, and the gate exits with code 125 without
//!   running anything. A program that cannot be found or is not executable is reported before
//!   the gate starts, as `cannot start …`, like a failed start.
//! - At its start, once it holds `daemon.lock` and before the runtime recovers any attempt, the
//!   daemon calls [`kill_leftovers`]. For each record whose process still runs with the recorded
//!   start time and boot, it sends SIGKILL to the whole process group (no SIGTERM first: nobody
//!   is left to wait for it), waits for the group to be gone (5 s at most) and logs `killed the
//!   leftover command of run-42 attempt 1 (pgid 4711) from a previous daemon`, before `ready`.
//!   A pid reused by another process since has another start time and is left alone. Every
//!   record is then removed; a file that cannot be read or parsed is logged and removed.
//! - A command whose record cannot be written is killed at once; the attempt ends as a
//!   retryable failure ("cannot record … it was killed rather than left to run untracked").
//!
//! Not covered: processes a command started that outlive the command itself (once its own process has
//! exited, the record is not acted on, just as keel does not stop such processes when a command
//! exits normally, see "Output"); processes that left the command's process group. On other
//! systems (no `/proc`) nothing is recorded and nothing is killed: a command left running by a
//! dead daemon runs on beside the next attempt until it ends: where that matters, fence the
//! command's writes with `KEEL_FENCING_TOKEN`, which storage that supports fencing refuses from
//! an older attempt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keel_core::text::{ceil_char_boundary, floor_char_boundary};
use keel_core::{limits, Outcome};
use keel_runtime::{AttemptContext, Handler};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

mod leftovers;
pub mod output;

pub use leftovers::{kill_leftovers, Decision, Leftover};

/// The job kind of command jobs.
pub const KIND: &str = "command";

/// Bytes of stdout, and of stderr, kept when a spec does not say.
pub const CAPTURE_BYTES_DEFAULT: usize = 16 * 1024;

/// Largest `capture_bytes` a spec may ask for.
pub const CAPTURE_BYTES_MAX: usize = 1024 * 1024;

/// Largest checkpoint a command may save. Its data reaches the next attempt in an environment
/// variable, and Linux refuses a single variable over 128 KiB.
pub const CHECKPOINT_DATA_MAX_BYTES: usize = 64 * 1024;

/// Longest success summary, in bytes.
const SUMMARY_MAX_BYTES: usize = 1024;

/// Longest stdout line examined as a control line; a longer line is ordinary output.
const LINE_MAX_BYTES: usize = CHECKPOINT_DATA_MAX_BYTES + 64;

/// Bytes read from a pipe at a time.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// Control messages from the output readers not yet applied; a reader that gets this far ahead
/// stops reading, and the command blocks on its full pipe.
const CONTROL_QUEUE_MAX: usize = 64;

/// At most one heartbeat per this much output time.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a command has between SIGTERM and SIGKILL when it is asked to stop (shorter in
/// this module's tests, which wait for it in real time).
const TERM_GRACE: Duration = if cfg!(test) {
    Duration::from_millis(500)
} else {
    Duration::from_secs(10)
};

/// How long output is still read after the command exited, for a background process that
/// holds the pipes open.
const OUTPUT_DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Longest rendering of the command in messages.
const COMMAND_LABEL_MAX_BYTES: usize = 80;

/// Variables keel sets for every attempt; a spec's `env` may not set them.
const RESERVED_ENV: [&str; 6] = [
    "KEEL_RUN_ID",
    "KEEL_JOB",
    "KEEL_ATTEMPT",
    "KEEL_IDEMPOTENCY_KEY",
    "KEEL_FENCING_TOKEN",
    "KEEL_CHECKPOINT",
];

/// Fields of a spec, for refusing unknown ones.
const SPEC_FIELDS: [&str; 6] = ["argv", "shell", "cwd", "env", "exit_codes", "capture_bytes"];

/// Fields of `exit_codes`.
const EXIT_CODES_FIELDS: [&str; 3] = ["success", "retryable", "permanent"];

/// What a command job runs: its payload, as JSON (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// The program and its arguments; run directly, never through a shell unless `shell`.
    pub argv: Vec<String>,
    /// Run `sh -c <argv joined by spaces>` instead.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shell: bool,
    /// The working directory (default: the daemon's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Variables added to the inherited environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Per-job overrides of the default exit-code mapping.
    #[serde(default, skip_serializing_if = "ExitCodes::is_empty")]
    pub exit_codes: ExitCodes,
    /// Bytes of stdout, and of stderr, kept: the tail (default [`CAPTURE_BYTES_DEFAULT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_bytes: Option<usize>,
}

/// Exit codes whose outcome a job overrides; a code listed here wins over the default mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCodes {
    /// Codes that mean success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub success: Vec<i32>,
    /// Codes that mean a failure worth retrying.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retryable: Vec<i32>,
    /// Codes that mean a failure that retrying cannot fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permanent: Vec<i32>,
}

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

/// Why a payload is not a valid [`CommandSpec`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandSpecError {
    /// Not JSON, or not an object of the right shape.
    #[error("the payload is not a command spec (a JSON object with an \"argv\" list): {0}")]
    Json(String),
    /// A field keel does not know (a typo, most likely).
    #[error("unknown field {field:?}; the fields are {known}")]
    UnknownField {
        /// The field, with its parent (`exit_codes.retry`).
        field: String,
        /// The fields allowed there.
        known: String,
    },
    /// `argv` has no program.
    #[error("argv is empty: give the program and its arguments, e.g. [\"backup.sh\", \"--full\"]")]
    EmptyArgv,
    /// `argv[0]` is the empty string.
    #[error("argv[0], the program, is empty")]
    EmptyProgram,
    /// A string the operating system cannot take.
    #[error("{field} contains a NUL byte")]
    NulByte {
        /// Where (`argv[2]`, `env.NAME`, `cwd`).
        field: String,
    },
    /// An environment variable name that cannot be set.
    #[error("env name {name:?} is invalid: {reason}")]
    EnvName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An environment variable keel sets itself.
    #[error("env name {name:?} is set by keel for every attempt and cannot be set by a job")]
    ReservedEnv {
        /// The name.
        name: String,
    },
    /// An exit code no process can exit with.
    #[error("exit_codes.{list} lists {code}; exit codes are 0 to 255")]
    ExitCodeRange {
        /// The list.
        list: &'static str,
        /// The code.
        code: i32,
    },
    /// An exit code listed twice, with different meanings.
    #[error("exit code {code} is listed in both exit_codes.{first} and exit_codes.{second}")]
    ExitCodeConflict {
        /// The code.
        code: i32,
        /// One list.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// `capture_bytes` over [`CAPTURE_BYTES_MAX`].
    #[error("capture_bytes is {got}; the limit is {max}")]
    CaptureBytes {
        /// The value given.
        got: usize,
        /// The limit.
        max: usize,
    },
}

impl CommandSpec {
    /// The spec as a job payload: compact JSON, without the fields left at their defaults.
    pub fn to_payload(&self) -> String {
        // Strings, booleans, integers and string-keyed maps always serialise.
        serde_json::to_string(self).expect("a CommandSpec serialises to JSON")
    }

    /// Parses and validates a job payload. Unknown fields are refused.
    pub fn from_payload(payload: &str) -> Result<CommandSpec, CommandSpecError> {
        let value: serde_json::Value =
            serde_json::from_str(payload).map_err(|e| CommandSpecError::Json(e.to_string()))?;
        check_fields(&value)?;
        let spec: CommandSpec =
            serde_json::from_value(value).map_err(|e| CommandSpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what the JSON shape cannot: a program to run, strings the operating system takes,
    /// environment names that can be set, exit codes that make sense, a bounded capture.
    pub fn validate(&self) -> Result<(), CommandSpecError> {
        let Some(program) = self.argv.first() else {
            return Err(CommandSpecError::EmptyArgv);
        };
        if program.is_empty() {
            return Err(CommandSpecError::EmptyProgram);
        }
        for (i, arg) in self.argv.iter().enumerate() {
            if arg.contains('\0') {
                return Err(CommandSpecError::NulByte {
                    field: format!("argv[{i}]"),
                });
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(CommandSpecError::NulByte {
                    field: "cwd".into(),
                });
            }
        }
        for (name, value) in &self.env {
            let reason = if name.is_empty() {
                Some("it is empty")
            } else if name.contains('=') {
                Some("it contains '='")
            } else if name.contains('\0') {
                Some("it contains a NUL byte")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(CommandSpecError::EnvName {
                    name: name.clone(),
                    reason,
                });
            }
            if RESERVED_ENV.contains(&name.as_str()) {
                return Err(CommandSpecError::ReservedEnv { name: name.clone() });
            }
            if value.contains('\0') {
                return Err(CommandSpecError::NulByte {
                    field: format!("env.{name}"),
                });
            }
        }
        self.exit_codes.validate()?;
        if let Some(got) = self.capture_bytes {
            if got > CAPTURE_BYTES_MAX {
                return Err(CommandSpecError::CaptureBytes {
                    got,
                    max: CAPTURE_BYTES_MAX,
                });
            }
        }
        Ok(())
    }

    /// The command, for messages: the program, or the shell command, shortened.
    fn label(&self) -> String {
        let text = if self.shell {
            format!("sh -c '{}'", self.argv.join(" "))
        } else {
            self.argv.first().cloned().unwrap_or_default()
        };
        if text.len() <= COMMAND_LABEL_MAX_BYTES {
            return format!("`{text}`");
        }
        let cut = floor_char_boundary(&text, COMMAND_LABEL_MAX_BYTES);
        format!("`{}…`", &text[..cut])
    }

    /// The process to start, with keel's variables `vars` added to its environment.
    ///
    /// On Unix it starts as the gate (module docs, "After a crash"): `/bin/sh` waits for a line
    /// on its stdin, then replaces itself with the command, same pid and process group; at the
    /// end of its stdin without that line it exits with [`GATE_CLOSED_EXIT`] instead.
    fn command(&self, vars: &[(&str, Option<String>)]) -> Command {
        #[cfg(unix)]
        let mut command = {
            let mut command = Command::new("/bin/sh");
            command.arg("-c").arg(GATE_SCRIPT).arg("keel-gate");
            if self.shell {
                command.arg("sh").arg("-c").arg(self.argv.join(" "));
            } else {
                command.args(&self.argv);
            }
            command.stdin(Stdio::piped());
            command
        };
        #[cfg(not(unix))]
        let mut command = {
            let mut command = if self.shell {
                let mut command = Command::new("sh");
                command.arg("-c").arg(self.argv.join(" "));
                command
            } else {
                let mut command = Command::new(self.argv.first().map_or("", String::as_str));
                command.args(self.argv.iter().skip(1));
                command
            };
            command.stdin(Stdio::null());
            command
        };
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        command.envs(&self.env);
        for (name, value) in vars {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Its own process group: a stop reaches everything the command started, and a Ctrl-C
        // at the daemon's terminal reaches only the daemon.
        #[cfg(unix)]
        command.process_group(0);
        command
    }
}

impl CommandSpec {
    /// Whether the program can be started, as `exec` would find it: the gate's shell finds it
    /// only once it runs, so without this a missing program would end as exit code 127 rather
    /// than as the error that names it. The job's own `PATH` wins over the daemon's, as it
    /// does for the command; a relative path is taken from the job's `cwd`. A program that
    /// goes between this check and the `exec` still ends the attempt as a permanent failure
    /// (exit code 127, see "Exit codes").
    #[cfg(unix)]
    fn find_program(&self) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        use std::os::unix::fs::PermissionsExt;
        let program = if self.shell {
            "sh"
        } else {
            self.argv.first().map_or("", String::as_str)
        };
        let candidates: Vec<PathBuf> = if program.contains('/') {
            let path = Path::new(program);
            vec![match &self.cwd {
                Some(cwd) if path.is_relative() => cwd.join(path),
                _ => path.to_path_buf(),
            }]
        } else {
            let search = match self.env.get("PATH") {
                Some(path) => Some(std::ffi::OsString::from(path)),
                None => std::env::var_os("PATH"),
            };
            let Some(search) = search else {
                // No search path at all: the shell's default applies; let it decide.
                return Ok(());
            };
            std::env::split_paths(&search)
                .map(|dir| match &self.cwd {
                    Some(cwd) if dir.is_relative() => cwd.join(dir).join(program),
                    _ => dir.join(program),
                })
                .collect()
        };
        let mut not_executable = false;
        for candidate in candidates {
            match std::fs::metadata(&candidate) {
                Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                    return Ok(())
                }
                Ok(_) => not_executable = true,
                Err(_) => {}
            }
        }
        Err(if not_executable {
            Error::new(ErrorKind::PermissionDenied, "not an executable file")
        } else {
            Error::new(ErrorKind::NotFound, "no such program")
        })
    }
}

impl ExitCodes {
    fn is_empty(&self) -> bool {
        self.success.is_empty() && self.retryable.is_empty() && self.permanent.is_empty()
    }

    fn validate(&self) -> Result<(), CommandSpecError> {
        let lists = [
            ("success", &self.success),
            ("retryable", &self.retryable),
            ("permanent", &self.permanent),
        ];
        for (i, (list, codes)) in lists.iter().enumerate() {
            for &code in codes.iter() {
                if !(0..=255).contains(&code) {
                    return Err(CommandSpecError::ExitCodeRange { list, code });
                }
                if let Some((other, _)) = lists[i + 1..].iter().find(|(_, c)| c.contains(&code)) {
                    return Err(CommandSpecError::ExitCodeConflict {
                        code,
                        first: list,
                        second: other,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The handler for jobs of kind [`KIND`]: runs the command of the job's payload (see the
/// module docs).
///
/// Each command is recorded in `attempts_dir` while it runs (module docs, "After a crash"), so
/// that [`kill_leftovers`] can kill the commands a crashed process left running: call it with
/// the same directory before the runtime starts, while no other process uses the directory.
/// `keel run` uses `<data-dir>/attempts`.
pub fn handler(attempts_dir: PathBuf) -> impl Handler {
    let attempts_dir: Arc<Path> = attempts_dir.into();
    move |ctx: AttemptContext| run_attempt(ctx, Arc::clone(&attempts_dir), None)
}

/// [`handler`], keeping each attempt's stdout and stderr under `output_dir` ([`output`]).
/// `keel run` uses `<data-dir>/output`.
pub fn handler_keeping_output(attempts_dir: PathBuf, output_dir: PathBuf) -> impl Handler {
    let attempts_dir: Arc<Path> = attempts_dir.into();
    let output_dir: Arc<Path> = output_dir.into();
    move |ctx: AttemptContext| {
        run_attempt(
            ctx,
            Arc::clone(&attempts_dir),
            Some(Arc::clone(&output_dir)),
        )
    }
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

// ----- running one attempt ------------------------------------------------------------------

/// What the output readers tell the attempt.
#[derive(Debug, PartialEq, Eq)]
enum Control {
    /// The command wrote something (sent at most once a second per stream).
    Activity,
    /// A `::keel checkpoint` line.
    Checkpoint(String),
    /// A `::keel progress` line.
    Progress { phase: String, message: String },
    /// A `::keel summary` line: the run's summary if it succeeds (the last such line wins).
    Summary(String),
}

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
}

impl Exit {
    fn of(status: ExitStatus) -> Exit {
        #[cfg(unix)]
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        #[cfg(not(unix))]
        let signal = None;
        Exit {
            code: status.code(),
            signal,
        }
    }

    fn describe(&self) -> String {
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

/// The attempt was asked to stop: when it gets SIGKILL if it has not exited.
#[derive(Clone, Copy, Debug)]
struct Stopping {
    kill_at: Instant,
    killed: bool,
}

/// Whether, and how, keel stopped the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stopped {
    /// It ended on its own.
    No,
    /// It was sent SIGTERM.
    Termed,
    /// It was sent SIGTERM, then SIGKILL.
    Killed,
}

async fn run_attempt(
    mut ctx: AttemptContext,
    attempts_dir: Arc<Path>,
    output_dir: Option<Arc<Path>>,
) -> Outcome {
    let spec = match CommandSpec::from_payload(&ctx.payload) {
        Ok(spec) => spec,
        Err(e) => {
            return Outcome::Permanent {
                message: format!("invalid command job payload: {e}"),
            }
        }
    };
    let vars = [
        ("KEEL_RUN_ID", Some(ctx.run.to_string())),
        ("KEEL_JOB", Some(ctx.job.to_string())),
        ("KEEL_ATTEMPT", Some(ctx.attempt.to_string())),
        (
            "KEEL_IDEMPOTENCY_KEY",
            Some(ctx.idempotency_key.to_string()),
        ),
        ("KEEL_FENCING_TOKEN", Some(ctx.token.0.to_string())),
        (
            "KEEL_CHECKPOINT",
            ctx.checkpoint.as_ref().map(|c| c.data.clone()),
        ),
    ];
    #[cfg(unix)]
    if let Err(e) = spec.find_program() {
        return spawn_failed(&spec, &e);
    }
    let mut child = match spec.command(&vars).spawn() {
        Ok(child) => child,
        Err(e) => return spawn_failed(&spec, &e),
    };
    // The gate's end: the command runs once this gets a line (see below).
    #[cfg(unix)]
    let gate = child.stdin.take();
    let pid = child.id();
    let mut group = GroupGuard {
        pgid: pid,
        record: None,
    };
    if let Some(pgid) = pid {
        // Before anything is awaited, so that the attempt cannot be dropped between the start
        // and the record. (A daemon killed in between leaves the command unrecorded.)
        match leftovers::record(&attempts_dir, ctx.run, ctx.attempt, pgid) {
            Ok(record) => group.record = record,
            Err(e) => {
                // Untracked, a daemon crash would leave it running beside the next attempt.
                signal_group(pid, "KILL", &mut child).await;
                if child.wait().await.is_ok() {
                    group.reaped();
                }
                return Outcome::Retryable {
                    message: format!(
                        "cannot record {} (process group {pgid}) in {}: {e}; it was killed \
                         rather than left to run untracked",
                        spec.label(),
                        attempts_dir.display()
                    ),
                };
            }
        }
    }
    // Recorded (or nothing to record): the command may run.
    #[cfg(unix)]
    open_gate(gate).await;
    let capture = spec.capture_bytes.unwrap_or(CAPTURE_BYTES_DEFAULT);
    let stdout_tail = Mutex::new(Tail::new(capture));
    let stderr_tail = Mutex::new(Tail::new(capture));
    let keep = |stream| {
        output_dir
            .as_deref()
            .map(|dir| output::Kept::open(dir, ctx.run, ctx.attempt, stream))
    };
    let (mut stdout_kept, mut stderr_kept) = (keep("stdout"), keep("stderr"));
    let (tx, mut rx) = mpsc::channel(CONTROL_QUEUE_MAX);
    let readers = {
        let stdout = read_stdout(
            child.stdout.take(),
            &stdout_tail,
            stdout_kept.as_mut(),
            tx.clone(),
        );
        let stderr = read_stderr(child.stderr.take(), &stderr_tail, stderr_kept.as_mut(), tx);
        async move {
            tokio::join!(stdout, stderr);
        }
    };
    tokio::pin!(readers);
    let mut readers_done = false;
    let mut controls_open = true;
    let mut status = None;
    let mut stopping: Option<Stopping> = None;
    let mut drain_until: Option<Instant> = None;
    let mut pulse = Pulse::default();
    let mut refused = Refused::default();
    // The summary a `::keel summary` line gave, if any.
    let mut said: Option<String> = None;
    let mut held_open = false;
    // Until the command has exited and every control line it printed is applied (its output
    // closed), or its output stays open too long after the exit.
    while status.is_none() || controls_open {
        tokio::select! {
            () = &mut readers, if !readers_done => readers_done = true,
            control = rx.recv(), if controls_open => match control {
                Some(control) => apply(&ctx, control, &mut pulse, &mut refused, &mut said).await,
                None => controls_open = false,
            },
            result = child.wait(), if status.is_none() => {
                if result.is_ok() {
                    // Reaped: its pid, and so the group's id, may be reused from now on.
                    group.reaped();
                }
                status = Some(result);
                drain_until = Some(Instant::now() + OUTPUT_DRAIN_AFTER_EXIT);
            }
            () = ctx.cancelled(), if stopping.is_none() && status.is_none() => {
                signal_group(pid, "TERM", &mut child).await;
                stopping = Some(Stopping { kill_at: Instant::now() + TERM_GRACE, killed: false });
            }
            () = sleep_until(stopping.map(|s| s.kill_at)),
                if stopping.is_some_and(|s| !s.killed) && status.is_none() =>
            {
                signal_group(pid, "KILL", &mut child).await;
                stopping = stopping.map(|s| Stopping { killed: true, ..s });
            }
            () = sleep_until(drain_until), if drain_until.is_some() && controls_open => {
                tracing::info!(
                    "the command exited, but a process it started holds its output open; not \
                     waiting for it"
                );
                while let Ok(control) = rx.try_recv() {
                    apply(&ctx, control, &mut pulse, &mut refused, &mut said).await;
                }
                held_open = true;
                break;
            }
        }
    }
    let stdout = lock(&stdout_tail).text();
    let stderr = lock(&stderr_tail).text();
    let exit = match status {
        Some(Ok(status)) => Exit::of(status),
        Some(Err(e)) => {
            return Outcome::Retryable {
                message: format!("cannot wait for {}: {e}", spec.label()),
            }
        }
        None => Exit {
            code: None,
            signal: None,
        },
    };
    let output = Output {
        stdout: &stdout,
        stderr: &stderr,
        refused: refused.note(),
        held_open,
        said: said.as_deref(),
        stop_reason: ctx.stop_reason(),
    };
    let stopped = match stopping {
        None => Stopped::No,
        Some(Stopping { killed: false, .. }) => Stopped::Termed,
        Some(Stopping { killed: true, .. }) => Stopped::Killed,
    };
    outcome(&spec, exit, stopped, &output)
}

/// Checkpoint lines that were not saved.
#[derive(Debug, Default)]
struct Refused {
    count: usize,
    first: Option<String>,
}

impl Refused {
    fn add(&mut self, reason: String) {
        tracing::warn!(%reason, "checkpoint line not saved");
        self.count += 1;
        self.first.get_or_insert(reason);
    }

    fn note(&self) -> Option<String> {
        let first = self.first.as_ref()?;
        Some(format!(
            "{} checkpoint line(s) were not saved; the first: {first}",
            self.count
        ))
    }
}

/// Carries out one control message.
async fn apply(
    ctx: &AttemptContext,
    control: Control,
    pulse: &mut Pulse,
    refused: &mut Refused,
    said: &mut Option<String>,
) {
    let now = Instant::now();
    match control {
        Control::Summary(text) => *said = Some(text),
        Control::Activity => {
            if pulse.due(now) {
                ctx.heartbeat();
            }
        }
        Control::Progress { phase, message } => {
            // Progress is a sign of life of its own.
            pulse.mark(now);
            ctx.progress(phase, message);
        }
        Control::Checkpoint(data) => {
            if let Some(reason) = checkpoint_refusal(&data) {
                refused.add(reason);
                return;
            }
            if let Err(e) = ctx.checkpoint(data).await {
                refused.add(e.to_string());
            }
        }
    }
}

/// Why checkpoint `data` cannot be saved, if it cannot.
fn checkpoint_refusal(data: &str) -> Option<String> {
    if data.len() > CHECKPOINT_DATA_MAX_BYTES {
        return Some(format!(
            "its data is {} bytes; the limit for command jobs is {CHECKPOINT_DATA_MAX_BYTES}",
            data.len()
        ));
    }
    if data.contains('\0') {
        return Some("its data contains a NUL byte".into());
    }
    None
}

/// What the command printed, for the outcome.
#[derive(Debug)]
struct Output<'a> {
    stdout: &'a str,
    stderr: &'a str,
    /// Checkpoint lines that were not saved.
    refused: Option<String>,
    /// A process the command started still held stdout or stderr open after it exited.
    held_open: bool,
    /// The summary a `::keel summary` line gave.
    said: Option<&'a str>,
    /// Why keel asked the command to stop, if it did.
    stop_reason: Option<keel_core::StopReason>,
}

/// The attempt's outcome, from how the command ended and what it printed.
fn outcome(spec: &CommandSpec, exit: Exit, stopped: Stopped, output: &Output<'_>) -> Outcome {
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
fn failure_message(head: &str, output: &Output<'_>) -> String {
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
fn summary(stdout: &str) -> Option<String> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(tail_lines(line.trim_end(), SUMMARY_MAX_BYTES))
}

/// The last `max` bytes of `text` at most, starting at a line if a line break falls in them.
fn tail_lines(text: &str, max: usize) -> String {
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
fn bounded_head(mut text: String, max: usize) -> String {
    let cut = floor_char_boundary(&text, max);
    text.truncate(cut);
    text
}

/// A command that could not be started: permanent if it will not start next time either.
fn spawn_failed(spec: &CommandSpec, error: &std::io::Error) -> Outcome {
    use std::io::ErrorKind;
    let place = match &spec.cwd {
        Some(cwd) => format!(" in {}", cwd.display()),
        None => String::new(),
    };
    let message = format!("cannot start {}{place}: {error}", spec.label());
    match error.kind() {
        ErrorKind::NotFound
        | ErrorKind::PermissionDenied
        | ErrorKind::InvalidInput
        | ErrorKind::ArgumentListTooLong => Outcome::Permanent { message },
        _ => Outcome::Retryable { message },
    }
}

/// The gate's shell script: `"$@"` is the command. `read` fails at the end of stdin without a
/// line: the daemon that started the gate died before it recorded the command.
#[cfg(unix)]
const GATE_SCRIPT: &str = "read -r keel_gate || exit 125; exec \"$@\" </dev/null";

/// The exit code of a gate that closed without letting its command run (in [`GATE_SCRIPT`]).
#[cfg(all(unix, test))]
const GATE_CLOSED_EXIT: i32 = 125;

/// Lets the command run: sends the gate its line and closes its stdin. A gate that is gone
/// (the command was killed already) is not an error here: the command's exit status says what
/// happened.
#[cfg(unix)]
async fn open_gate(gate: Option<tokio::process::ChildStdin>) {
    use tokio::io::AsyncWriteExt;
    if let Some(mut gate) = gate {
        if let Err(e) = gate.write_all(b"go\n").await {
            tracing::debug!(error = %e, "the command's gate was gone before it opened");
        }
    }
}

fn lock(tail: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    // A reader never panics while holding the lock; if one did, its bytes are still good.
    tail.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends `signal` to the command's process group; if that fails, SIGKILL to the command.
async fn signal_group(pgid: Option<u32>, signal: &str, child: &mut Child) {
    #[cfg(unix)]
    if let Some(pgid) = pgid {
        let sig = if signal == "KILL" {
            rustix::process::Signal::KILL
        } else {
            rustix::process::Signal::TERM
        };
        match send_to_group(pgid, sig) {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, signal, "kill of the command's group failed"),
        }
    }
    #[cfg(not(unix))]
    let _ = (pgid, signal);
    if let Err(e) = child.start_kill() {
        tracing::warn!(error = %e, "kill of the command failed");
    }
}

/// Sends `sig` to process group `pgid` with kill(2), through rustix's safe wrapper.
#[cfg(unix)]
fn send_to_group(pgid: u32, sig: rustix::process::Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("{pgid} is not a process group id")))?;
    rustix::process::kill_process_group(pid, sig).map_err(std::io::Error::from)
}

/// Kills the command's process group with SIGKILL when the attempt is dropped before the
/// command was reaped: the watchdog aborted the attempt, or the runtime stopped. (tokio's
/// `kill_on_drop` kills the command itself, not what it started.) Removes the command's record
/// once it is reaped, or killed.
#[derive(Debug)]
struct GroupGuard {
    /// Cleared once the command is reaped.
    pgid: Option<u32>,
    /// The command's record in the attempts directory, if it has one.
    record: Option<PathBuf>,
}

impl GroupGuard {
    /// The command was reaped: its pid may be reused from now on, and no crash can leave it
    /// running.
    fn reaped(&mut self) {
        self.pgid = None;
        if let Some(record) = self.record.take() {
            leftovers::remove(&record);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pgid) = self.pgid {
            if let Err(e) = kill_group(pgid) {
                // The record stays: the next start kills the group.
                tracing::warn!(error = %e, pgid, "kill of the command's group failed");
                return;
            }
        }
        if let Some(record) = self.record.take() {
            leftovers::remove(&record);
        }
    }
}

/// Sends SIGKILL to process group `pgid` (a system call: nothing blocks, so a `Drop` may).
fn kill_group(pgid: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    return send_to_group(pgid, rustix::process::Signal::KILL);
    #[cfg(not(unix))]
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("cannot signal process group {pgid} here"),
    ))
}

// ----- reading the output -------------------------------------------------------------------

/// Reads stdout: control lines go to the attempt, other bytes to `tail`.
async fn read_stdout(
    pipe: Option<impl AsyncRead + Unpin>,
    tail: &Mutex<Tail>,
    mut kept: Option<&mut output::Kept>,
    tx: mpsc::Sender<Control>,
) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut chunk = vec![0; READ_CHUNK_BYTES];
    let mut lines = Lines::new(LINE_MAX_BYTES);
    let mut pieces = Vec::new();
    let mut pulse = Pulse::default();
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(kept) = kept.as_deref_mut() {
            kept.write(&chunk[..n]);
        }
        if pulse.due(Instant::now()) && tx.send(Control::Activity).await.is_err() {
            return;
        }
        lines.push(&chunk[..n], &mut pieces);
        if !forward(&mut pieces, tail, &tx).await {
            return;
        }
    }
    lines.finish(&mut pieces);
    forward(&mut pieces, tail, &tx).await;
}

/// Hands control lines to the attempt and the rest to `tail`; false if the attempt is gone.
async fn forward(pieces: &mut Vec<Piece>, tail: &Mutex<Tail>, tx: &mpsc::Sender<Control>) -> bool {
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
async fn read_stderr(
    pipe: Option<impl AsyncRead + Unpin>,
    tail: &Mutex<Tail>,
    mut kept: Option<&mut output::Kept>,
    tx: mpsc::Sender<Control>,
) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut chunk = vec![0; READ_CHUNK_BYTES];
    let mut pulse = Pulse::default();
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        lock(tail).push(&chunk[..n]);
        if let Some(kept) = kept.as_deref_mut() {
            kept.write(&chunk[..n]);
        }
        if pulse.due(Instant::now()) && tx.send(Control::Activity).await.is_err() {
            return;
        }
    }
}

/// The control line in `line` (with its line ending), if it is one (module docs).
fn parse_control(line: &[u8]) -> Option<Control> {
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
enum Piece {
    /// A whole line, with its `\n` (the last line may lack it): maybe a control line.
    Line(Vec<u8>),
    /// Part of a line too long to be a control line: ordinary output.
    Text(Vec<u8>),
}

/// Splits a byte stream into lines, holding at most `max` bytes of an unfinished line.
#[derive(Debug)]
struct Lines {
    pending: Vec<u8>,
    /// The line being read outgrew `max`: the rest of it is ordinary output.
    overlong: bool,
    max: usize,
}

impl Lines {
    fn new(max: usize) -> Lines {
        Lines {
            pending: Vec::new(),
            overlong: false,
            max,
        }
    }

    fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Piece>) {
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

    fn finish(&mut self, out: &mut Vec<Piece>) {
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

/// The last `max` bytes of a stream.
#[derive(Debug)]
struct Tail {
    bytes: Vec<u8>,
    max: usize,
    /// Bytes pushed in all.
    seen: u64,
}

impl Tail {
    fn new(max: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            max,
            seen: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
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

    /// The tail as text: invalid UTF-8 replaced, a character cut in half at the start dropped.
    fn text(&self) -> String {
        let mut kept = &self.bytes[self.bytes.len().saturating_sub(self.max)..];
        if self.seen > kept.len() as u64 {
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

/// Rate-limits signs of life, on tokio's clock rather than a timer: `due` is true at most once
/// per [`HEARTBEAT_INTERVAL`].
#[derive(Debug, Default)]
struct Pulse {
    last: Option<Instant>,
}

impl Pulse {
    fn due(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < HEARTBEAT_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }

    fn mark(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
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

fn is_false(value: &bool) -> bool {
    !*value
}

/// Refuses fields a spec does not have, so a typo is an error instead of a silent default.
fn check_fields(value: &serde_json::Value) -> Result<(), CommandSpecError> {
    let Some(object) = value.as_object() else {
        // serde reports the wrong shape.
        return Ok(());
    };
    for field in object.keys() {
        if !SPEC_FIELDS.contains(&field.as_str()) {
            return Err(CommandSpecError::UnknownField {
                field: field.clone(),
                known: SPEC_FIELDS.join(", "),
            });
        }
    }
    if let Some(codes) = object.get("exit_codes").and_then(|c| c.as_object()) {
        for field in codes.keys() {
            if !EXIT_CODES_FIELDS.contains(&field.as_str()) {
                return Err(CommandSpecError::UnknownField {
                    field: format!("exit_codes.{field}"),
                    known: EXIT_CODES_FIELDS.join(", "),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Unit tests of the pure parts, then the handler end to end: real child processes under a
    //! real `keel_runtime::Runtime` on an in-memory store, on tokio's real clock (children run
    //! in real time). Tests wait on the runtime's events, never on sleeps.

    use std::collections::BTreeSet;
    use std::sync::Arc;

    use keel_core::{
        Config, ErrorKind, Event, JobId, JobSpec, RetryPolicy, Run, RunId, RunState, ScheduleSpec,
        Store, Timestamp,
    };
    use keel_runtime::{Clock, Runtime, RuntimeHandle};
    use keel_testkit::{SharedMemStore, TempDir};
    use tokio::sync::broadcast;

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

    // ----- the payload ------------------------------------------------------------------

    fn spec(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            shell: false,
            cwd: None,
            env: BTreeMap::new(),
            exit_codes: ExitCodes::default(),
            capture_bytes: None,
        }
    }

    /// `sh -c script`, run directly (not `shell: true`), with `args` as `$1`...
    fn sh(script: &str, args: &[&str]) -> CommandSpec {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        spec(&argv)
    }

    #[test]
    fn a_spec_round_trips_and_its_payload_leaves_defaults_out() {
        let minimal = spec(&["backup.sh", "--full"]);
        assert_eq!(minimal.to_payload(), r#"{"argv":["backup.sh","--full"]}"#);
        assert_eq!(
            CommandSpec::from_payload(&minimal.to_payload()).unwrap(),
            minimal
        );
        let full = CommandSpec {
            shell: true,
            cwd: Some("/srv".into()),
            env: BTreeMap::from([("BUCKET".to_string(), "s3://b".to_string())]),
            exit_codes: ExitCodes {
                success: vec![1],
                retryable: vec![3],
                permanent: vec![4],
            },
            capture_bytes: Some(100),
            ..minimal
        };
        assert_eq!(CommandSpec::from_payload(&full.to_payload()).unwrap(), full);
    }

    #[test]
    fn a_bad_payload_is_a_typed_error_that_says_what_is_wrong() {
        let error = |payload: &str| CommandSpec::from_payload(payload).unwrap_err();
        assert!(matches!(error("{argv"), CommandSpecError::Json(_)));
        assert!(matches!(error(r#"["ls"]"#), CommandSpecError::Json(_)));
        assert!(matches!(
            error(r#"{"argv": "ls"}"#),
            CommandSpecError::Json(_)
        ));
        assert!(matches!(
            error(r#"{"shell": true}"#),
            CommandSpecError::Json(_)
        ));
        assert_eq!(error(r#"{"argv": []}"#), CommandSpecError::EmptyArgv);
        assert_eq!(error(r#"{"argv": [""]}"#), CommandSpecError::EmptyProgram);
        assert_eq!(
            error(r#"{"argv": ["ls"], "enviroment": {}}"#),
            CommandSpecError::UnknownField {
                field: "enviroment".into(),
                known: SPEC_FIELDS.join(", ")
            }
        );
        assert!(matches!(
            error(r#"{"argv": ["ls"], "exit_codes": {"retry": [3]}}"#),
            CommandSpecError::UnknownField { field, .. } if field == "exit_codes.retry"
        ));
        assert_eq!(
            error(r#"{"argv": ["ls", "a\u0000b"]}"#),
            CommandSpecError::NulByte {
                field: "argv[1]".into()
            }
        );
        assert!(matches!(
            error(r#"{"argv": ["ls"], "env": {"A=B": "c"}}"#),
            CommandSpecError::EnvName { .. }
        ));
        assert!(matches!(
            error(r#"{"argv": ["ls"], "env": {"": "c"}}"#),
            CommandSpecError::EnvName { .. }
        ));
        assert_eq!(
            error(r#"{"argv": ["ls"], "env": {"KEEL_CHECKPOINT": "x"}}"#),
            CommandSpecError::ReservedEnv {
                name: "KEEL_CHECKPOINT".into()
            }
        );
        assert_eq!(
            error(r#"{"argv": ["ls"], "exit_codes": {"permanent": [256]}}"#),
            CommandSpecError::ExitCodeRange {
                list: "permanent",
                code: 256
            }
        );
        assert_eq!(
            error(r#"{"argv": ["ls"], "exit_codes": {"success": [3], "permanent": [3]}}"#),
            CommandSpecError::ExitCodeConflict {
                code: 3,
                first: "success",
                second: "permanent"
            }
        );
        assert_eq!(
            error(r#"{"argv": ["ls"], "capture_bytes": 1048577}"#),
            CommandSpecError::CaptureBytes {
                got: 1_048_577,
                max: CAPTURE_BYTES_MAX
            }
        );
        // Messages name the problem.
        assert!(CommandSpecError::EmptyArgv
            .to_string()
            .contains("argv is empty"));
    }

    // ----- control lines and output -----------------------------------------------------

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
        let mut lines = Lines::new(8);
        let mut out = Vec::new();
        lines.push(b"ab", &mut out);
        lines.push(b"c\nde\nf", &mut out);
        assert_eq!(
            out,
            vec![
                Piece::Line(b"abc\n".to_vec()),
                Piece::Line(b"de\n".to_vec())
            ]
        );
        out.clear();
        lines.push(b"0123456789", &mut out);
        assert_eq!(out, vec![Piece::Text(b"f0123456789".to_vec())]);
        out.clear();
        lines.push(b"rest\nnext", &mut out);
        assert_eq!(
            out,
            vec![Piece::Text(b"rest\n".to_vec())],
            "the same long line"
        );
        out.clear();
        lines.finish(&mut out);
        assert_eq!(out, vec![Piece::Line(b"next".to_vec())]);
        // An overlong line that arrives in one read is plain output too; one of `max` bytes
        // (its newline aside) is a line.
        let mut lines = Lines::new(8);
        out.clear();
        lines.push(b"012345678\n01234567\n", &mut out);
        assert_eq!(
            out,
            vec![
                Piece::Text(b"012345678\n".to_vec()),
                Piece::Line(b"01234567\n".to_vec())
            ]
        );
        out.clear();
        lines.finish(&mut out);
        assert!(out.is_empty());
    }

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

    // ----- end to end -------------------------------------------------------------------

    const T0: Timestamp = Timestamp(1_800_000_000_000);

    /// Longest a test waits for a run before it fails (a guard, not a synchronisation).
    const PATIENCE: Duration = Duration::from_secs(60);

    fn quick_retries(attempts_max: u32) -> RetryPolicy {
        RetryPolicy {
            attempts_max,
            backoff_base_ms: 10,
            backoff_cap_ms: 10,
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    /// A runtime with the command handler, over an in-memory store.
    struct Keel {
        runtime: Runtime,
        handle: RuntimeHandle,
        store: SharedMemStore,
        events: broadcast::Receiver<Event>,
        finished: BTreeSet<RunId>,
        /// The handler's attempts directory, and the temporary directory it is in.
        attempts: PathBuf,
        tmp: TempDir,
    }

    impl Keel {
        async fn start() -> Keel {
            Keel::start_with(Config::default()).await
        }

        async fn start_with(config: Config) -> Keel {
            let tmp = TempDir::created("keel-command-job");
            let attempts = tmp.path().join("attempts");
            Keel::start_at(config, tmp, attempts).await
        }

        /// A runtime whose handler records its commands in `attempts`.
        async fn start_at(config: Config, tmp: TempDir, attempts: PathBuf) -> Keel {
            let store = SharedMemStore::new();
            let runtime = Runtime::builder(Arc::new(store.clone()))
                .config(config)
                .clock(Clock::starting_at(T0))
                .seed(7)
                .handler(KIND, handler(attempts.clone()))
                .start()
                .await
                .unwrap();
            let handle = runtime.handle();
            let events = handle.subscribe();
            Keel {
                runtime,
                handle,
                store,
                events,
                finished: BTreeSet::new(),
                attempts,
                tmp,
            }
        }

        /// Adds a job with `payload` (due in an hour) and runs it now.
        async fn trigger_payload(&self, name: &str, payload: &str, retry: RetryPolicy) -> RunId {
            let at = T0.plus_ms(3_600_000);
            let mut job = JobSpec::new(JobId::new(name).unwrap(), KIND, ScheduleSpec::Once { at });
            job.payload = payload.into();
            job.retry = retry;
            self.trigger_job(job).await
        }

        async fn trigger_job(&self, job: JobSpec) -> RunId {
            let id = job.id.clone();
            self.handle.add_job(job).await.unwrap();
            self.handle.trigger(id).await.unwrap()
        }

        async fn trigger(&self, name: &str, command: &CommandSpec, retry: RetryPolicy) -> RunId {
            self.trigger_payload(name, &command.to_payload(), retry)
                .await
        }

        /// Waits for `run` to finish and its record to be durable, and reads it back.
        async fn finished(&mut self, run: RunId) -> Run {
            let events = &mut self.events;
            let finished = &mut self.finished;
            let wait = async {
                while !finished.contains(&run) {
                    match events.recv().await {
                        Ok(Event::RunFinished { run, .. }) => {
                            finished.insert(run);
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => panic!("runtime stopped"),
                    }
                }
            };
            tokio::time::timeout(PATIENCE, wait)
                .await
                .expect("the run finishes");
            self.handle.sync().await.unwrap();
            self.store.run(run).unwrap().unwrap()
        }

        /// Waits for the first checkpoint of `run` to be durable.
        async fn checkpoint_saved(&mut self, run: RunId) {
            let wait = async {
                loop {
                    if let Ok(Event::CheckpointSaved { run: saved, .. }) = self.events.recv().await
                    {
                        if saved == run {
                            return;
                        }
                    }
                }
            };
            tokio::time::timeout(PATIENCE, wait)
                .await
                .expect("the checkpoint is saved");
        }

        /// Stops the runtime, and checks that no command's record is left behind: each was
        /// removed once its command was reaped.
        async fn stop(self) {
            let attempts = self.attempts.clone();
            let _tmp = self.stop_unchecked().await;
            let left: Vec<PathBuf> = std::fs::read_dir(&attempts)
                .map(|dir| dir.map(|entry| entry.unwrap().path()).collect())
                .unwrap_or_default();
            assert_eq!(left, Vec::<PathBuf>::new(), "records left behind");
        }

        /// Stops the runtime; returns the temporary directory, still there.
        async fn stop_unchecked(self) -> TempDir {
            self.runtime.shutdown(Duration::from_secs(5)).await.unwrap();
            self.tmp
        }
    }

    /// Runs `command` as a job once, to its end.
    async fn run_once(command: &CommandSpec, retry: RetryPolicy) -> Run {
        let mut keel = Keel::start().await;
        let run = keel.trigger("job", command, retry).await;
        let record = keel.finished(run).await;
        keel.stop().await;
        record
    }

    fn error_of(run: &Run) -> (ErrorKind, String) {
        let error = run.last_error.as_ref().expect("an error is recorded");
        (error.kind, error.message.clone())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_that_exits_0_succeeds_with_its_last_line_or_its_summary_line() {
        let run = run_once(
            &sh(
                "echo starting; echo 'noise' >&2; printf 'one\\ntwo\\nthree\\n'",
                &[],
            ),
            quick_retries(1),
        )
        .await;
        assert_eq!(run.state, RunState::Succeeded);
        assert_eq!(run.attempt.0, 1);
        assert_eq!(run.summary.as_deref(), Some("three"));
        let said = sh(
            "echo '::keel summary 3 files, 2 MB'; echo 'cleaning up'",
            &[],
        );
        let run = run_once(&said, quick_retries(1)).await;
        assert_eq!(
            run.summary.as_deref(),
            Some("3 files, 2 MB"),
            "the line wins"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exit_127_and_a_missing_program_are_permanent_and_never_retried() {
        let mut keel = Keel::start().await;
        let exit_127 = keel
            .trigger(
                "exit-127",
                &sh("echo 'nope: not found' >&2; exit 127", &[]),
                quick_retries(3),
            )
            .await;
        let missing = keel
            .trigger(
                "missing",
                &spec(&["/nonexistent/keel-test-program"]),
                quick_retries(3),
            )
            .await;
        let run = keel.finished(exit_127).await;
        assert_eq!(run.state, RunState::FailedDropped);
        assert_eq!(run.attempt.0, 1);
        let (kind, message) = error_of(&run);
        assert_eq!(kind, ErrorKind::Permanent);
        assert!(message.contains("exited with code 127"), "{message}");
        assert!(message.ends_with("stderr:\nnope: not found"), "{message}");

        let run = keel.finished(missing).await;
        assert_eq!(run.state, RunState::FailedDropped);
        assert_eq!(run.attempt.0, 1);
        let (_, message) = error_of(&run);
        assert!(
            message.starts_with("cannot start `/nonexistent/keel-test-program`"),
            "{message}"
        );
        keel.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exit_75_and_other_codes_are_retried() {
        let mut keel = Keel::start().await;
        let tempfail = keel
            .trigger(
                "tempfail",
                &sh("[ \"$KEEL_ATTEMPT\" = 1 ] && exit 75; echo second try", &[]),
                quick_retries(3),
            )
            .await;
        let flaky = keel
            .trigger(
                "flaky",
                &sh("echo 'upstream 503' >&2; exit 1", &[]),
                quick_retries(2),
            )
            .await;
        let run = keel.finished(tempfail).await;
        assert_eq!(run.state, RunState::Succeeded);
        assert_eq!(run.attempt.0, 2);
        assert_eq!(run.summary.as_deref(), Some("second try"));
        let run = keel.finished(flaky).await;
        assert_eq!(run.state, RunState::Failed);
        assert_eq!(run.attempt.0, 2, "retried up to attempts_max");
        let (kind, message) = error_of(&run);
        assert_eq!(kind, ErrorKind::Retryable);
        assert_eq!(message, "`sh` exited with code 1\nstderr:\nupstream 503");
        keel.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exit_code_overrides_win_over_the_default_mapping() {
        let mut keel = Keel::start().await;
        let with = |script: &str, codes: ExitCodes| CommandSpec {
            exit_codes: codes,
            ..sh(script, &[])
        };
        let retry_3 = keel
            .trigger(
                "retry-3",
                &with(
                    "[ \"$KEEL_ATTEMPT\" = 1 ] && exit 3; echo ok",
                    ExitCodes {
                        retryable: vec![3],
                        ..ExitCodes::default()
                    },
                ),
                quick_retries(2),
            )
            .await;
        let retry_64 = keel
            .trigger(
                "retry-64",
                &with(
                    "exit 64",
                    ExitCodes {
                        retryable: vec![64],
                        ..ExitCodes::default()
                    },
                ),
                quick_retries(2),
            )
            .await;
        let permanent_3 = keel
            .trigger(
                "permanent-3",
                &with(
                    "exit 3",
                    ExitCodes {
                        permanent: vec![3],
                        ..ExitCodes::default()
                    },
                ),
                quick_retries(3),
            )
            .await;
        let success_1 = keel
            .trigger(
                "success-1",
                &with(
                    "echo no match; exit 1",
                    ExitCodes {
                        success: vec![1],
                        ..ExitCodes::default()
                    },
                ),
                quick_retries(3),
            )
            .await;
        let run = keel.finished(retry_3).await;
        assert_eq!((run.state, run.attempt.0), (RunState::Succeeded, 2));
        let run = keel.finished(retry_64).await;
        assert_eq!(
            (run.state, run.attempt.0),
            (RunState::Failed, 2),
            "64 is permanent by default, retried here"
        );
        let run = keel.finished(permanent_3).await;
        assert_eq!((run.state, run.attempt.0), (RunState::FailedDropped, 1));
        assert!(error_of(&run).1.contains("(permanent: not retried)"));
        let run = keel.finished(success_1).await;
        assert_eq!(run.state, RunState::Succeeded);
        assert_eq!(run.summary.as_deref(), Some("no match"));
        keel.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_line_is_saved_and_the_next_attempt_gets_it() {
        let script = r#"
            if [ -z "${KEEL_CHECKPOINT+set}" ]; then
                echo "first attempt, nothing to resume"
                echo '::keel checkpoint {"copied": 40}'
                exit 75
            fi
            echo "attempt $KEEL_ATTEMPT resumed from $KEEL_CHECKPOINT"
        "#;
        let run = run_once(&sh(script, &[]), quick_retries(3)).await;
        assert_eq!(run.state, RunState::Succeeded);
        assert_eq!(run.attempt.0, 2);
        assert_eq!(
            run.summary.as_deref(),
            Some(r#"attempt 2 resumed from {"copied": 40}"#)
        );
        assert_eq!(run.checkpoint, None, "deleted once the run completes (C2)");
        if let Some(error) = &run.last_error {
            assert!(!error.message.contains("::keel"), "{}", error.message);
            assert!(error.message.contains("first attempt"), "{}", error.message);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_progress_line_is_recorded_on_the_run_and_left_out_of_the_output() {
        let run = run_once(
            &sh(
                "echo '::keel progress upload 3 of 10 files'; echo done",
                &[],
            ),
            quick_retries(1),
        )
        .await;
        assert_eq!(run.state, RunState::Succeeded);
        let progress = run.progress.expect("progress is recorded");
        assert_eq!(progress.phase, "upload");
        assert_eq!(progress.message, "3 of 10 files");
        assert_eq!(run.summary.as_deref(), Some("done"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn argv_reaches_the_program_literally_and_shell_true_expands_it() {
        let home = BTreeMap::from([("HOME".to_string(), "/home/keel-test".to_string())]);
        let direct = CommandSpec {
            env: home.clone(),
            ..spec(&["echo", "$HOME", "*", ";", "ls"])
        };
        let shell = CommandSpec {
            shell: true,
            env: home,
            ..spec(&["echo", "$HOME", "|", "tr", "a-z", "A-Z"])
        };
        let mut keel = Keel::start().await;
        let direct = keel.trigger("direct", &direct, quick_retries(1)).await;
        let shell = keel.trigger("shell", &shell, quick_retries(1)).await;
        let run = keel.finished(direct).await;
        assert_eq!(run.summary.as_deref(), Some("$HOME * ; ls"));
        let run = keel.finished(shell).await;
        assert_eq!(run.summary.as_deref(), Some("/HOME/KEEL-TEST"));
        keel.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn env_cwd_and_keel_variables_reach_the_command() {
        let dir = TempDir::created("keel-command-job");
        let script = r#"
            echo "$GREETING from $(pwd -P)|$KEEL_JOB|$KEEL_ATTEMPT|$KEEL_RUN_ID|$KEEL_IDEMPOTENCY_KEY|$KEEL_FENCING_TOKEN|${KEEL_CHECKPOINT-unset}"
        "#;
        let command = CommandSpec {
            cwd: Some(dir.path().to_path_buf()),
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            ..sh(script, &[])
        };
        let mut keel = Keel::start().await;
        let id = keel.trigger("env-cwd", &command, quick_retries(1)).await;
        let run = keel.finished(id).await;
        keel.stop().await;
        let token = run.last_token.expect("the attempt's token is kept").0;
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(
            run.summary.unwrap(),
            format!(
                "hello from {}|env-cwd|1|{id}|{id}-attempt-1|{token}|unset",
                cwd.display()
            )
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn captured_output_is_bounded_and_keeps_the_tail() {
        let mut keel = Keel::start().await;
        let small = CommandSpec {
            capture_bytes: Some(100),
            ..sh("seq 1 2000; seq 1 2000 >&2; exit 1", &[])
        };
        let small = keel.trigger("small", &small, quick_retries(1)).await;
        let summary = CommandSpec {
            capture_bytes: Some(100),
            ..sh("seq 1 2000", &[])
        };
        let summary = keel.trigger("summary", &summary, quick_retries(1)).await;
        let large = keel
            .trigger(
                "large",
                &sh("seq 1 100000 >&2; exit 1", &[]),
                quick_retries(1),
            )
            .await;

        let run = keel.finished(small).await;
        let (_, message) = error_of(&run);
        let (head, tail) = message.split_once("\nstderr:\n").unwrap();
        assert_eq!(head, "`sh` exited with code 1");
        assert!(tail.len() <= 100, "{tail:?}");
        assert!(tail.ends_with("1999\n2000"), "{tail:?}");
        let first: u32 = tail.lines().next().unwrap().parse().unwrap();
        assert!(first > 1900, "whole lines from the end: {tail:?}");

        let run = keel.finished(summary).await;
        let summary = run.summary.unwrap();
        assert_eq!(summary, "2000", "the last line, whatever the capture");

        let run = keel.finished(large).await;
        let (_, message) = error_of(&run);
        assert!(message.len() <= limits::MESSAGE_MAX_BYTES);
        assert!(
            message.ends_with("\n99999\n100000"),
            "the end, not the start, is kept"
        );
        keel.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalid_payload_fails_permanently_with_a_clear_message() {
        let mut keel = Keel::start().await;
        let garbage = keel
            .trigger_payload("garbage", "rm -rf /", quick_retries(3))
            .await;
        let empty = keel
            .trigger_payload("empty", r#"{"argv": []}"#, quick_retries(3))
            .await;
        let run = keel.finished(garbage).await;
        assert_eq!((run.state, run.attempt.0), (RunState::FailedDropped, 1));
        let (_, message) = error_of(&run);
        assert!(
            message.starts_with("invalid command job payload: the payload is not a command spec"),
            "{message}"
        );
        let run = keel.finished(empty).await;
        assert_eq!(run.state, RunState::FailedDropped);
        assert!(error_of(&run).1.contains("argv is empty"));
        keel.stop().await;
    }

    /// Runs `script`, cancels the run once the script has printed its first checkpoint, and
    /// returns the finished run.
    async fn cancelled(name: &str, script: &str) -> Run {
        let mut keel = Keel::start().await;
        let run = keel.trigger(name, &sh(script, &[]), quick_retries(3)).await;
        keel.checkpoint_saved(run).await;
        keel.handle.cancel_run(run).await.unwrap();
        let record = keel.finished(run).await;
        keel.stop().await;
        record
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_run_terminates_the_command_and_what_it_started() {
        let script = r#"
            sleep 300 &
            echo '::keel checkpoint started'
            wait
        "#;
        let run = cancelled("cancelled", script).await;
        assert_eq!(run.state, RunState::Cancelled);
        assert_eq!(run.attempt.0, 1, "not retried");
        let (kind, message) = error_of(&run);
        assert_eq!(kind, ErrorKind::Cancelled);
        // Without "still held its output open": the background `sleep`, in the command's
        // process group, got SIGTERM too and closed its stdout.
        assert_eq!(
            message,
            "stopped because the run was cancelled: sent SIGTERM to `sh`, which \
             then was killed by signal 15 (SIGTERM)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_may_handle_sigterm_and_its_last_words_are_kept() {
        // The trap runs when the current short `sleep` ends.
        let script = r#"
            trap 'echo "got TERM, cleaning up" >&2; exit 143' TERM
            echo '::keel checkpoint started'
            while :; do sleep 0.05; done
        "#;
        let run = cancelled("trapped", script).await;
        assert_eq!(run.state, RunState::Cancelled);
        let (_, message) = error_of(&run);
        // (The shell may also report its `sleep`, killed by the same SIGTERM: "Terminated".)
        assert!(
            message.starts_with(
                "stopped because the run was cancelled: sent SIGTERM to `sh`, \
                 which then exited with code 143\nstderr:\n"
            ),
            "{message}"
        );
        assert!(message.ends_with("\ngot TERM, cleaning up"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_that_ignores_sigterm_is_killed_with_what_it_started() {
        // An ignored signal stays ignored across fork and exec: the `sleep` ignores it too.
        let script = r#"
            trap '' TERM
            sleep 300 &
            echo '::keel checkpoint started'
            wait
        "#;
        let run = cancelled("stubborn", script).await;
        assert_eq!(run.state, RunState::Cancelled);
        let (_, message) = error_of(&run);
        // Without "still held its output open": the background `sleep` was killed too.
        assert_eq!(
            message,
            "stopped because the run was cancelled: sent SIGTERM to `sh`, then \
             SIGKILL 500 ms later; it was killed by signal 9 (SIGKILL)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_killed_by_the_watchdog_takes_its_process_group_with_it() {
        let dir = TempDir::created("keel-command-job");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // The background `sleep` holds the FIFO's only write end: this reader sees the end of
        // the file once the `sleep` is gone. (A thread of its own, not `spawn_blocking`, so a
        // failing test cannot leave the runtime waiting for it.)
        let (gone_tx, gone) = tokio::sync::oneshot::channel();
        std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                let mut sink = Vec::new();
                let read = std::fs::File::open(fifo)
                    .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut sink));
                let _ = gone_tx.send(read.map(|_| ()));
            }
        });
        let script = r#"trap '' TERM; sleep 300 > "$1" & wait"#;
        // The watchdog kills the attempt 50 ms after its 200 ms timeout, before keel's own
        // SIGKILL (500 ms after the SIGTERM, in tests): the attempt is dropped mid-flight.
        let mut keel = Keel::start_with(Config {
            kill_grace_ms: 50,
            ..Config::default()
        })
        .await;
        let at = T0.plus_ms(3_600_000);
        let mut job = JobSpec::new(JobId::new("hung").unwrap(), KIND, ScheduleSpec::Once { at });
        job.payload = sh(script, &[fifo.to_str().unwrap()]).to_payload().into();
        job.retry = quick_retries(1);
        job.timeout_ms = Some(200);
        let run = keel.trigger_job(job).await;
        let record = keel.finished(run).await;
        // The attempt's task is dropped, killing the group and then removing the command's
        // record, after the run is recorded: not necessarily by now.
        keel.stop_unchecked().await;
        assert_eq!(record.state, RunState::Failed);
        assert_eq!(error_of(&record).0, ErrorKind::TimedOut);
        let read = tokio::time::timeout(PATIENCE, gone).await;
        assert!(
            matches!(read, Ok(Ok(Ok(())))),
            "the sleep was killed with the command: {read:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_stopped_by_its_timeout_says_so() {
        let mut keel = Keel::start().await;
        let at = T0.plus_ms(3_600_000);
        let mut job = JobSpec::new(JobId::new("slow").unwrap(), KIND, ScheduleSpec::Once { at });
        job.payload = sh("trap 'exit 3' TERM; sleep 30 & wait", &[])
            .to_payload()
            .into();
        job.retry = quick_retries(1);
        job.timeout_ms = Some(200);
        let run = keel.trigger_job(job).await;
        let record = keel.finished(run).await;
        keel.stop().await;
        let (_, message) = error_of(&record);
        assert!(
            message.starts_with("stopped because the job's timeout passed: sent SIGTERM"),
            "{message}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_on_stdout_or_stderr_is_a_sign_of_life() {
        // Silent for a moment (the command's own work, not the test waiting), then output.
        let mut keel = Keel::start().await;
        let stdout = keel
            .trigger("stdout", &sh("sleep 0.3; echo tick", &[]), quick_retries(1))
            .await;
        let stderr = keel
            .trigger(
                "stderr",
                &sh("sleep 0.3; echo tick >&2", &[]),
                quick_retries(1),
            )
            .await;
        let silent = keel
            .trigger("silent", &sh("sleep 0.3", &[]), quick_retries(1))
            .await;
        for (run, alive) in [(stdout, true), (stderr, true), (silent, false)] {
            let record = keel.finished(run).await;
            let activity = record.last_activity.unwrap();
            if alive {
                // A heartbeat after the silence (the attempt's start is earlier).
                assert!(
                    activity.ms_since(record.created_at) >= 300,
                    "{run}: {record:?}"
                );
            } else {
                // The attempt's start only: no heartbeat at its end.
                let finished = record.finished_at.unwrap();
                assert!(finished.ms_since(activity) >= 300, "{run}: {record:?}");
            }
        }
        keel.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_process_holding_the_output_does_not_hold_the_attempt() {
        let dir = TempDir::created("keel-command-job");
        let pids = [dir.path().join("ok.pid"), dir.path().join("failed.pid")];
        // Each exits at once, leaving a background process that holds stdout open.
        let script = r#"sleep 300 & echo $! > "$1"; echo done; exit "$2""#;
        let mut keel = Keel::start().await;
        let started = Instant::now();
        let ok = keel
            .trigger(
                "ok",
                &sh(script, &[pids[0].to_str().unwrap(), "0"]),
                quick_retries(1),
            )
            .await;
        let failed = keel
            .trigger(
                "failed",
                &sh(script, &[pids[1].to_str().unwrap(), "1"]),
                quick_retries(1),
            )
            .await;
        let ok = keel.finished(ok).await;
        let failed = keel.finished(failed).await;
        keel.stop().await;
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(ok.state, RunState::Succeeded);
        assert_eq!(ok.summary.as_deref(), Some("done"));
        assert_eq!(
            error_of(&failed).1,
            "`sh` exited with code 1; a process it started still held its output open (not \
             waited for)\nstdout:\ndone"
        );
        // Not keel's to stop (the commands exited normally): clean up after the test.
        for pid in pids {
            let pid = std::fs::read_to_string(pid).unwrap();
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
    }

    // ----- the gate ---------------------------------------------------------------------

    #[cfg(unix)]
    #[tokio::test]
    async fn a_gate_closed_without_its_line_exits_125_and_runs_nothing() {
        assert!(
            GATE_SCRIPT.contains(&format!("exit {GATE_CLOSED_EXIT};")),
            "{GATE_SCRIPT}"
        );
        let dir = TempDir::created("keel-command-job");
        let marker = dir.path().join("ran");
        let spec = sh(r#"touch "$1""#, &[marker.to_str().unwrap()]);
        let mut child = spec.command(&[]).spawn().unwrap();
        // What a daemon's death does: its end of the gate closes.
        drop(child.stdin.take());
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(GATE_CLOSED_EXIT));
        assert!(!marker.exists(), "the command ran");

        let mut child = spec.command(&[]).spawn().unwrap();
        open_gate(child.stdin.take()).await;
        assert!(child.wait().await.unwrap().success());
        assert!(marker.exists(), "the opened gate ran the command");
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gated_command_reads_nothing_on_stdin() {
        // (That it keeps the gate's pid: `a_running_command_is_recorded_until_it_is_reaped`.)
        let mut keel = Keel::start().await;
        // Exits 3 (retryable: the run fails, one attempt) if it could read anything.
        let spec = sh("if read -r line || [ -n \"$line\" ]; then exit 3; fi", &[]);
        let run = keel.trigger("stdin", &spec, quick_retries(1)).await;
        let run = keel.finished(run).await;
        assert_eq!(run.state, RunState::Succeeded, "{:?}", run.last_error);
        keel.stop().await;
    }

    #[cfg(unix)]
    #[test]
    fn a_program_is_looked_for_as_exec_would() {
        use std::io::ErrorKind as Io;
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::created("keel-command-job");
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
        let in_path = |argv: &[&str]| {
            let mut spec = spec(argv);
            spec.env
                .insert("PATH".into(), dir.path().to_str().unwrap().into());
            spec
        };
        assert_eq!(spec(&["sh"]).find_program().map_err(|e| e.kind()), Ok(()));
        let missing = spec(&["keel-test-no-such-program"]).find_program();
        assert_eq!(missing.map_err(|e| e.kind()), Err(Io::NotFound));
        let not_executable = in_path(&["tool"]).find_program();
        assert_eq!(
            not_executable.map_err(|e| e.kind()),
            Err(Io::PermissionDenied)
        );

        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            in_path(&["tool"]).find_program().map_err(|e| e.kind()),
            Ok(())
        );
        let mut relative = spec(&["./tool"]);
        assert_eq!(
            relative.find_program().map_err(|e| e.kind()),
            Err(Io::NotFound),
            "not in the daemon's directory"
        );
        relative.cwd = Some(dir.path().to_path_buf());
        assert_eq!(relative.find_program().map_err(|e| e.kind()), Ok(()));
        let mut shell = in_path(&["tool --flag"]);
        shell.shell = true;
        assert_eq!(
            shell.find_program().map_err(|e| e.kind()),
            Err(Io::NotFound),
            "a shell command needs `sh`, not in this PATH"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_command_is_recorded_until_it_is_reaped() {
        let dir = TempDir::created("keel-command-job");
        let pid_file = dir.path().join("pid");
        let script = r#"echo $$ > "$1"; echo '::keel checkpoint started'; exec sleep 300"#;
        let mut keel = Keel::start().await;
        let run = keel
            .trigger(
                "recorded",
                &sh(script, &[pid_file.to_str().unwrap()]),
                quick_retries(1),
            )
            .await;
        keel.checkpoint_saved(run).await;
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let record = leftovers::Record::read(&keel.attempts.join(format!("{run}-1"))).unwrap();
        assert_eq!((record.run, record.attempt.0, record.pgid), (run, 1, pid));
        assert_eq!(
            Some(record.start_ticks),
            leftovers::proc_stat(pid).map(|stat| stat.start_ticks)
        );
        assert_eq!(leftovers::decide(&record), Decision::Kill, "it runs");
        keel.handle.cancel_run(run).await.unwrap();
        assert_eq!(keel.finished(run).await.state, RunState::Cancelled);
        // `stop` checks that the record is gone.
        keel.stop().await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_that_cannot_be_recorded_is_killed_and_fails_retryable() {
        let tmp = TempDir::created("keel-command-job");
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        // Under a regular file: the directory cannot be created.
        let attempts = file.join("attempts");
        let mut keel = Keel::start_at(Config::default(), tmp, attempts).await;
        // Finishing within the test's patience shows the `sleep` did not run on.
        let run = keel
            .trigger("unrecorded", &spec(&["sleep", "300"]), quick_retries(1))
            .await;
        let run = keel.finished(run).await;
        assert_eq!(run.state, RunState::Failed);
        let (kind, message) = error_of(&run);
        assert_eq!(kind, ErrorKind::Retryable);
        assert!(
            message.starts_with("cannot record `sleep` (process group ")
                && message.ends_with("it was killed rather than left to run untracked"),
            "{message}"
        );
        keel.stop().await;
    }
}

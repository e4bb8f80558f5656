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
//! The daemon's own secrets are removed: a command never sees `KEEL_DATABASE_URL` (the store's
//! database, with its password) or `KEEL_TOKEN` (an API token), even when the daemon was started
//! with them in its environment. Pass what a command needs in the job's `env`.
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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::Outcome;
use keel_runtime::child::{Tail, OUTPUT_OPEN_AFTER_EXIT_MAX};
use keel_runtime::{AttemptContext, Handler};
use tokio::sync::mpsc;
use tokio::time::Instant;

mod capture;
mod gate;
mod group;
mod leftovers;
mod outcome;
pub mod output;
mod spec;
#[cfg(test)]
mod tests;

use capture::{lock, read_stderr, read_stdout, Control, Pulse, Stream};
#[cfg(unix)]
use gate::open_gate;
use group::{signal_group, GroupGuard};
use outcome::{outcome, spawn_failed, Exit, Output, Stopped};

pub use leftovers::{kill_leftovers, Decision, Leftover};
pub use outcome::{classify, Verdict};
pub use spec::{CommandSpec, CommandSpecError, ExitCodes};

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

// ----- running one attempt ------------------------------------------------------------------

/// The attempt was asked to stop: when it gets SIGKILL if it has not exited.
#[derive(Clone, Copy, Debug)]
struct Stopping {
    kill_at: Instant,
    killed: bool,
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
        // The daemon's own secrets are not the command's: its database URL (with its password)
        // and its API token would otherwise reach every command, and its kept output.
        ("KEEL_DATABASE_URL", None),
        ("KEEL_TOKEN", None),
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
        let stdout = Stream::new(child.stdout.take(), stdout_kept.as_mut(), tx.clone());
        let stderr = Stream::new(child.stderr.take(), stderr_kept.as_mut(), tx);
        let (stdout, stderr) = (
            read_stdout(stdout, &stdout_tail),
            read_stderr(stderr, &stderr_tail),
        );
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
                drain_until = Some(Instant::now() + OUTPUT_OPEN_AFTER_EXIT_MAX);
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

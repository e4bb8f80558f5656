//! The handler end to end: real child processes under a real `keel_runtime::Runtime` on an
//! in-memory store, on tokio's real clock (children run in real time). Tests wait on the
//! runtime's events, never on sleeps. (Unit tests of the pure parts are beside them.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use keel_core::{
    limits, Config, ErrorKind, Event, JobId, JobSpec, RetryPolicy, Run, RunId, RunState,
    ScheduleSpec, Store, Timestamp,
};
use keel_harness::TempDir;
use keel_runtime::{Clock, Runtime, RuntimeHandle};
use keel_testkit::SharedMemStore;
use tokio::sync::broadcast;

use super::*;

pub(super) fn spec(argv: &[&str]) -> CommandSpec {
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
pub(super) fn sh(script: &str, args: &[&str]) -> CommandSpec {
    let mut argv = vec!["sh", "-c", script, "sh"];
    argv.extend_from_slice(args);
    spec(&argv)
}

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
                if let Ok(Event::CheckpointSaved { run: saved, .. }) = self.events.recv().await {
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
    let error = run.last_error().expect("an error is recorded");
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
    assert_eq!(run.state(), RunState::Succeeded);
    assert_eq!(run.attempt().0, 1);
    assert_eq!(run.summary(), Some("three"));
    let said = sh(
        "echo '::keel summary 3 files, 2 MB'; echo 'cleaning up'",
        &[],
    );
    let run = run_once(&said, quick_retries(1)).await;
    assert_eq!(run.summary(), Some("3 files, 2 MB"), "the line wins");
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
    assert_eq!(run.state(), RunState::FailedDropped);
    assert_eq!(run.attempt().0, 1);
    let (kind, message) = error_of(&run);
    assert_eq!(kind, ErrorKind::Permanent);
    assert!(message.contains("exited with code 127"), "{message}");
    assert!(message.ends_with("stderr:\nnope: not found"), "{message}");

    let run = keel.finished(missing).await;
    assert_eq!(run.state(), RunState::FailedDropped);
    assert_eq!(run.attempt().0, 1);
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
    assert_eq!(run.state(), RunState::Succeeded);
    assert_eq!(run.attempt().0, 2);
    assert_eq!(run.summary(), Some("second try"));
    let run = keel.finished(flaky).await;
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(run.attempt().0, 2, "retried up to attempts_max");
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
    assert_eq!((run.state(), run.attempt().0), (RunState::Succeeded, 2));
    let run = keel.finished(retry_64).await;
    assert_eq!(
        (run.state(), run.attempt().0),
        (RunState::Failed, 2),
        "64 is permanent by default, retried here"
    );
    let run = keel.finished(permanent_3).await;
    assert_eq!((run.state(), run.attempt().0), (RunState::FailedDropped, 1));
    assert!(error_of(&run).1.contains("(permanent: not retried)"));
    let run = keel.finished(success_1).await;
    assert_eq!(run.state(), RunState::Succeeded);
    assert_eq!(run.summary(), Some("no match"));
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
    assert_eq!(run.state(), RunState::Succeeded);
    assert_eq!(run.attempt().0, 2);
    assert_eq!(
        run.summary(),
        Some(r#"attempt 2 resumed from {"copied": 40}"#)
    );
    assert_eq!(
        run.checkpoint(),
        None,
        "deleted once the run completes (C2)"
    );
    if let Some(error) = run.last_error() {
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
    assert_eq!(run.state(), RunState::Succeeded);
    let progress = run.progress().expect("progress is recorded");
    assert_eq!(progress.phase, "upload");
    assert_eq!(progress.message, "3 of 10 files");
    assert_eq!(run.summary(), Some("done"));
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
    assert_eq!(run.summary(), Some("$HOME * ; ls"));
    let run = keel.finished(shell).await;
    assert_eq!(run.summary(), Some("/HOME/KEEL-TEST"));
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
    let token = run.last_token().expect("the attempt's token is kept").0;
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(
        run.summary().unwrap(),
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
    let summary = run.summary().unwrap();
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
    assert_eq!((run.state(), run.attempt().0), (RunState::FailedDropped, 1));
    let (_, message) = error_of(&run);
    assert!(
        message.starts_with("invalid command job payload: the payload is not a command spec"),
        "{message}"
    );
    let run = keel.finished(empty).await;
    assert_eq!(run.state(), RunState::FailedDropped);
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
    assert_eq!(run.state(), RunState::Cancelled);
    assert_eq!(run.attempt().0, 1, "not retried");
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
    assert_eq!(run.state(), RunState::Cancelled);
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
    assert_eq!(run.state(), RunState::Cancelled);
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
    assert_eq!(record.state(), RunState::Failed);
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
        let activity = record.last_activity().unwrap();
        if alive {
            // A heartbeat after the silence (the attempt's start is earlier).
            assert!(
                activity.ms_since(record.created_at()) >= 300,
                "{run}: {record:?}"
            );
        } else {
            // The attempt's start only: no heartbeat at its end.
            let finished = record.finished_at().unwrap();
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
    assert_eq!(ok.state(), RunState::Succeeded);
    assert_eq!(ok.summary(), Some("done"));
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

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_command_reads_nothing_on_stdin() {
    // (That it keeps the gate's pid: `a_running_command_is_recorded_until_it_is_reaped`.)
    let mut keel = Keel::start().await;
    // Exits 3 (retryable: the run fails, one attempt) if it could read anything.
    let spec = sh("if read -r line || [ -n \"$line\" ]; then exit 3; fi", &[]);
    let run = keel.trigger("stdin", &spec, quick_retries(1)).await;
    let run = keel.finished(run).await;
    assert_eq!(run.state(), RunState::Succeeded, "{:?}", run.last_error());
    keel.stop().await;
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
    assert_eq!(keel.finished(run).await.state(), RunState::Cancelled);
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
    assert_eq!(run.state(), RunState::Failed);
    let (kind, message) = error_of(&run);
    assert_eq!(kind, ErrorKind::Retryable);
    assert!(
        message.starts_with("cannot record `sleep` (process group ")
            && message.ends_with("it was killed rather than left to run untracked"),
        "{message}"
    );
    keel.stop().await;
}

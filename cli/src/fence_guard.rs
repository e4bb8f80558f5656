//! The fence guard: kills a leader's commands when the leader cannot, before a successor may run
//! their runs again (SPEC M2, for the processes a daemon starts).
//!
//! A leader on a shared store fences itself ([`crate::lead::keep`]) once no lease renewal has
//! succeeded for TTL − margin: it stops its runtime and kills its commands. That needs the
//! leader to run. A leader stopped whole (SIGSTOP, a debugger, a pause of the process) or killed
//! (`kill -9`, a crash, the OOM killer) does neither, and its commands, each in a process group of
//! its own, run on: once their leases lapse, the next leader starts their runs again beside them.
//!
//! So a leader starts a guard, a process of its own (`keel fence-guard`, hidden; the same
//! binary), in a process group of its own, and tells it on a pipe when its lead ends unless
//! renewed:
//!
//! | the daemon writes | meaning |
//! |---|---|
//! | `MS\n` | "I lead for MS more milliseconds (until my fence deadline) unless I say so again" |
//! | `bye\n` | "I stopped cleanly; my commands are stopped" |
//!
//! | the guard sees | it |
//! |---|---|
//! | a number | moves its deadline to now + MS |
//! | `bye` | exits, killing nothing |
//! | the deadline passes with no word (the daemon is stopped or stalled) | kills every command in the attempts directory ([`command_job::kill_leftovers`]: recorded, still running, same start time) and exits |
//! | end of file without `bye` (the daemon died) | the same, at once |
//!
//! The deadline is the daemon's own fence deadline, which comes before its lease can lapse (by
//! the margin, TTL/5), and a successor reclaims a run only after that and the run's own lease
//! expire: the guard's kill always comes first. A daemon that wakes after its guard fired finds
//! its lead lost and stops, as it would have anyway. The guard reads the monotonic clock, so a
//! wall-clock step changes nothing. It runs only on a shared store (`--store postgres`): on fs and
//! sled a stopped daemon keeps `daemon.lock`, so no successor can start.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};

use crate::command_job;
use crate::daemon::log;
use crate::error::Failure;

/// A line from the daemon.
#[derive(Debug, PartialEq, Eq)]
enum Word {
    /// The lead lasts this much longer unless renewed.
    Lead(Duration),
    /// The daemon stopped cleanly.
    Bye,
}

fn parse(line: &str) -> Option<Word> {
    match line.trim_end() {
        "bye" => Some(Word::Bye),
        ms => ms
            .parse()
            .ok()
            .map(|ms| Word::Lead(Duration::from_millis(ms))),
    }
}

/// What the guard does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Wait for a word until then (`None`: no deadline yet).
    Wait(Option<Instant>),
    /// Kill the daemon's commands (and exit), for this reason.
    Kill(&'static str),
    /// Exit, killing nothing.
    Exit,
}

/// What the guard sees.
#[derive(Debug)]
enum Seen {
    Word(Option<Word>),
    /// The deadline passed.
    Timeout,
    /// The pipe ended.
    Closed,
}

/// The guard's rule (module docs): pure, on explicit instants.
#[derive(Debug, Default)]
struct Watch {
    deadline: Option<Instant>,
}

impl Watch {
    fn on(&mut self, now: Instant, seen: Seen) -> Next {
        match seen {
            Seen::Word(Some(Word::Lead(left))) => {
                self.deadline = Some(now + left);
                Next::Wait(self.deadline)
            }
            Seen::Word(Some(Word::Bye)) => Next::Exit,
            // A line it does not understand changes nothing: the deadline stands.
            Seen::Word(None) => self.wait_or_kill(now),
            Seen::Timeout => self.wait_or_kill(now),
            Seen::Closed => Next::Kill("the daemon exited without stopping its commands"),
        }
    }

    fn wait_or_kill(&self, now: Instant) -> Next {
        match self.deadline {
            Some(deadline) if deadline <= now => Next::Kill(
                "no word from the daemon before its lead's deadline (stopped or stalled)",
            ),
            deadline => Next::Wait(deadline),
        }
    }
}

/// `keel fence-guard --attempts-dir DIR --daemon PID`: the guard's process. Reads words on
/// stdin until it exits; returns after killing the commands, or after `bye`.
pub(crate) fn run(attempts_dir: &Path, daemon: u32) -> Result<(), Failure> {
    let (words, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if words.send(parse(&line)).is_err() {
                return;
            }
        }
        // End of file (or a read error): the channel closes when `words` drops.
    });
    let mut watch = Watch::default();
    let mut next = Next::Wait(None);
    loop {
        let seen = match next {
            Next::Wait(None) => heard.recv().map_or(Seen::Closed, Seen::Word),
            Next::Wait(Some(deadline)) => {
                match heard.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(word) => Seen::Word(word),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Seen::Timeout,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Seen::Closed,
                }
            }
            Next::Kill(why) => {
                kill(attempts_dir, daemon, why);
                return Ok(());
            }
            Next::Exit => return Ok(()),
        };
        next = watch.on(Instant::now(), seen);
    }
}

fn kill(attempts_dir: &Path, daemon: u32, why: &str) {
    match command_job::kill_leftovers(attempts_dir) {
        Ok(found) => {
            let killed = found
                .iter()
                .filter(|f| matches!(f, command_job::Leftover::Killed { .. }))
                .count();
            log(&format!(
                "fence guard of daemon {daemon}: {why}; killed {killed} of its commands so that \
                 the next leader does not run their runs beside them"
            ));
        }
        Err(e) => log(&format!(
            "fence guard of daemon {daemon}: {why}; cannot read {}: {e}",
            attempts_dir.display()
        )),
    }
}

/// The daemon's end of a guard.
pub(crate) struct Guard {
    child: Child,
    stdin: ChildStdin,
    /// The last fence deadline told (the fence's clock), so that an unchanged one is not
    /// written again.
    told: Option<keel_core::Timestamp>,
}

/// How long a word to the guard may take before the daemon gives up on it (a pipe never
/// blocks this long unless the guard stopped reading; the deadline it has stands).
const WRITE_WAIT: Duration = Duration::from_millis(200);

impl Guard {
    /// Starts the guard of this daemon's commands (in `attempts_dir`).
    pub(crate) fn start(attempts_dir: &Path) -> Result<Guard, Failure> {
        let exe = std::env::current_exe()
            .map_err(|e| Failure::runtime(format!("cannot find keel's own binary: {e}")))?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("fence-guard")
            .arg("--attempts-dir")
            .arg(PathBuf::from(attempts_dir))
            .arg("--daemon")
            .arg(std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // Its own process group: a Ctrl-C at the daemon's terminal must not end it.
        #[cfg(unix)]
        command.process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| Failure::runtime(format!("cannot start the fence guard: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| Failure::runtime("the fence guard has no stdin"))?;
        Ok(Guard {
            child,
            stdin,
            told: None,
        })
    }

    /// Tells the guard the lead lasts `left` more (until the fence deadline `fence_at`, on the
    /// fence's clock) unless renewed.
    pub(crate) async fn lead_until(&mut self, fence_at: keel_core::Timestamp, left: Duration) {
        if self.told == Some(fence_at) {
            return;
        }
        let line = format!("{}\n", left.as_millis());
        if self.write(&line).await {
            self.told = Some(fence_at);
        }
    }

    /// Tells the guard the daemon stopped cleanly, and waits for it to exit.
    pub(crate) async fn bye(mut self) {
        if self.write("bye\n").await {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
        }
    }

    async fn write(&mut self, line: &str) -> bool {
        match tokio::time::timeout(WRITE_WAIT, self.stdin.write_all(line.as_bytes())).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                log(&format!("the fence guard does not listen: {e}"));
                false
            }
            Err(_) => {
                log("the fence guard does not read: its last deadline stands");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_a_deadline_in_milliseconds_or_bye() {
        assert_eq!(parse("8000\n"), Some(Word::Lead(Duration::from_secs(8))));
        assert_eq!(parse("bye"), Some(Word::Bye));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("soon"), None);
    }

    #[test]
    fn each_word_moves_the_deadline_and_silence_past_it_kills() {
        let t0 = Instant::now();
        let mut watch = Watch::default();
        let lead = |ms| Seen::Word(Some(Word::Lead(Duration::from_millis(ms))));
        assert_eq!(
            watch.on(t0, lead(1_600)),
            Next::Wait(Some(t0 + Duration::from_millis(1_600)))
        );
        // Renewed a second later: the deadline moves on.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            watch.on(t1, lead(1_600)),
            Next::Wait(Some(t1 + Duration::from_millis(1_600)))
        );
        // A wake-up before the deadline (or junk) waits on for the same deadline.
        assert_eq!(
            watch.on(t1 + Duration::from_millis(10), Seen::Timeout),
            Next::Wait(Some(t1 + Duration::from_millis(1_600)))
        );
        assert_eq!(
            watch.on(t1 + Duration::from_millis(20), Seen::Word(None)),
            Next::Wait(Some(t1 + Duration::from_millis(1_600)))
        );
        // Silence past it: the daemon is stopped or stalled.
        assert!(matches!(
            watch.on(t1 + Duration::from_millis(1_600), Seen::Timeout),
            Next::Kill(why) if why.contains("stopped or stalled")
        ));
    }

    #[test]
    fn a_daemon_that_dies_has_its_commands_killed_at_once_and_a_clean_stop_kills_nothing() {
        let t0 = Instant::now();
        let mut watch = Watch::default();
        watch.on(t0, Seen::Word(Some(Word::Lead(Duration::from_secs(60)))));
        assert!(matches!(
            watch.on(t0, Seen::Closed),
            Next::Kill(why) if why.contains("exited")
        ));
        let mut watch = Watch::default();
        assert_eq!(watch.on(t0, Seen::Word(Some(Word::Bye))), Next::Exit);
        // Before any deadline, silence is no reason to kill.
        assert_eq!(Watch::default().on(t0, Seen::Timeout), Next::Wait(None));
    }
}

//! Commands left running by a daemon that died.
//!
//! A command runs in a process group of its own, so it outlives a daemon killed with SIGKILL or
//! one that crashed. The next daemon recovers the run and starts a new attempt; without more,
//! the old command would go on beside it, forever unseen. So the handler records every command
//! it starts in `<attempts dir>/<run>-<attempt>` (`run-42-1`; the directory 0700, the file
//! 0600), and removes the record once the command has exited and been reaped, or was killed
//! with its group. A record that outlives its daemon names a command that may still run:
//! [`kill_leftovers`], called before any attempt is recovered, kills its group.
//!
//! A record holds the process group id (the command's pid), the command's start time in clock
//! ticks since boot (field 22 of `/proc/<pid>/stat`) and the boot id: a pid reused by another
//! process since, or a record from before a reboot, is never taken for the command. A record is
//! written whole or not at all (`whole_file`: a temporary file, synced, renamed over the record,
//! the directory synced), so a full disk or a crash mid-write never leaves an empty or partial
//! record: the command is then killed rather than left to run unrecorded. A temporary file left
//! by a daemon killed mid-write is removed by the sweep as unreadable.
//!
//! Linux only: where there is no `/proc`, nothing is recorded and nothing is killed.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_core::{Attempt, RunId};
use serde::{Deserialize, Serialize};

/// How long [`kill_leftovers`] waits for the groups it killed to be gone.
const GONE_WAIT: Duration = Duration::from_secs(5);

/// How often it looks meanwhile.
const GONE_POLL: Duration = Duration::from_millis(10);

/// What identifies a command's process group, as recorded while it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) run: RunId,
    pub(crate) attempt: Attempt,
    /// The process group's id: the command's pid.
    pub(crate) pgid: u32,
    /// The command's start time, in clock ticks since boot.
    pub(crate) start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id` when it started, if readable.
    pub(crate) boot_id: Option<String>,
}

/// What to do about a recorded command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It still runs: kill its process group.
    Kill,
    /// It has ended: no process has its pid, or only its zombie.
    Ended,
    /// Its pid belongs to another process now (the start time differs): leave it alone.
    Reused,
    /// It was recorded before the machine last booted: it cannot be running.
    OtherBoot,
    /// Processes cannot be told apart here (no `/proc`): nothing is killed.
    Unchecked,
}

/// What [`kill_leftovers`] did about one file of the attempts directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftover {
    /// The command still ran and its process group was sent SIGKILL; `gone` says whether the
    /// group was gone within the wait (5 s). The record was removed.
    Killed {
        /// The command's run.
        run: RunId,
        /// The command's attempt.
        attempt: Attempt,
        /// Its process group.
        pgid: u32,
        /// Whether no process of the group was left alive when `kill_leftovers` returned.
        gone: bool,
    },
    /// Nothing to kill (see `decision`); the record was removed.
    Left {
        /// The command's run.
        run: RunId,
        /// The command's attempt.
        attempt: Attempt,
        /// Its process group.
        pgid: u32,
        /// Why it was left alone.
        decision: Decision,
    },
    /// The command still runs, but sending SIGKILL failed. The record is kept, for the next
    /// start to try again.
    NotKilled {
        /// The command's run.
        run: RunId,
        /// The command's attempt.
        attempt: Attempt,
        /// Its process group.
        pgid: u32,
        /// Why.
        error: String,
    },
    /// A file that is not a readable record: removed.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: String,
    },
    /// A file that could not be removed.
    NotRemoved {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

impl Leftover {
    /// Whether the daemon says so in its log: everything but a command that had ended.
    pub fn is_notable(&self) -> bool {
        !matches!(
            self,
            Leftover::Left {
                decision: Decision::Ended | Decision::OtherBoot,
                ..
            }
        )
    }
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Killed {
                run,
                attempt,
                pgid,
                gone: true,
            } => write!(
                f,
                "killed the leftover command of {run} attempt {attempt} (pgid {pgid}) from a \
                 previous daemon"
            ),
            Leftover::Killed {
                run,
                attempt,
                pgid,
                gone: false,
            } => write!(
                f,
                "sent SIGKILL to the leftover command of {run} attempt {attempt} (pgid {pgid}) \
                 from a previous daemon; some of its processes had not exited {} s later",
                GONE_WAIT.as_secs()
            ),
            Leftover::Left {
                run,
                attempt,
                pgid,
                decision,
            } => {
                let why = match decision {
                    Decision::Kill => "it runs",
                    Decision::Ended => "it had ended",
                    Decision::Reused => "its pid now belongs to another process",
                    Decision::OtherBoot => "it was started before the last boot",
                    Decision::Unchecked => "without /proc, keel cannot tell whether it runs",
                };
                write!(
                    f,
                    "left the command of {run} attempt {attempt} (pgid {pgid}) from a previous \
                     daemon alone: {why}"
                )
            }
            Leftover::NotKilled {
                run,
                attempt,
                pgid,
                error,
            } => write!(
                f,
                "cannot kill the leftover command of {run} attempt {attempt} (pgid {pgid}) from a \
                 previous daemon, which still runs: {error}"
            ),
            Leftover::Unreadable { path, error } => write!(
                f,
                "removed {}, not a readable record of a command: {error}",
                path.display()
            ),
            Leftover::NotRemoved { path, error } => {
                write!(f, "cannot remove {}: {error}", path.display())
            }
        }
    }
}

/// Records the command of `run`'s `attempt`, whose process group is `pgid`, in `dir` (created
/// 0700 if needed); returns the record's path. `Ok(None)` where processes cannot be told apart
/// (no `/proc`): nothing is recorded. Call it before the command is reaped, so that its pid
/// cannot have been reused.
pub(crate) fn record(
    dir: &Path,
    run: RunId,
    attempt: Attempt,
    pgid: u32,
) -> io::Result<Option<PathBuf>> {
    if !proc_available() {
        return Ok(None);
    }
    let stat = proc_stat(pgid)
        .ok_or_else(|| io::Error::other(format!("cannot read /proc/{pgid}/stat")))?;
    let record = Record {
        run,
        attempt,
        pgid,
        start_ticks: stat.start_ticks,
        boot_id: boot_id(),
    };
    let path = dir.join(format!("{run}-{attempt}"));
    record.write(dir, &path)?;
    Ok(Some(path))
}

/// Removes a record; one already gone is fine.
pub(crate) fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "cannot remove the record of a command that ended; the next daemon start removes it"
        ),
    }
}

impl Record {
    fn write(&self, dir: &Path, path: &Path) -> io::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
        let mut text = serde_json::to_vec(self).map_err(io::Error::other)?;
        text.push(b'\n');
        crate::whole_file::write(path, &text)
    }

    pub(crate) fn read(path: &Path) -> Result<Record, String> {
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }
}

/// What to do about `record`'s command, from what `/proc` says now.
pub(crate) fn decide(record: &Record) -> Decision {
    if !proc_available() {
        return Decision::Unchecked;
    }
    if record.boot_id.is_some() && record.boot_id != boot_id() {
        return Decision::OtherBoot;
    }
    match proc_stat(record.pgid) {
        None => Decision::Ended,
        Some(stat) if stat.start_ticks != record.start_ticks => Decision::Reused,
        // Exited, waiting to be reaped by its new parent.
        Some(stat) if stat.is_dead() => Decision::Ended,
        Some(_) => Decision::Kill,
    }
}

/// Kills the process group of every command recorded in `dir` that still runs, waits (5 s at
/// most) for the groups to be gone, and removes the records; unreadable files are removed too.
/// Call it while no handler uses `dir`, before any attempt is recovered: a daemon calls it at
/// its start, holding its lock. A missing `dir` holds nothing; the error is that of listing it.
///
/// Where there is no `/proc` nothing is recorded, so nothing is killed (the records of another
/// system are removed unchecked).
pub fn kill_leftovers(dir: &Path) -> io::Result<Vec<Leftover>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths = entries
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<io::Result<Vec<PathBuf>>>()?;
    paths.sort();
    let mut found = Vec::new();
    let mut killed = Vec::new();
    for path in paths {
        let record = match Record::read(&path) {
            Ok(record) => record,
            Err(error) => {
                found.push(Leftover::Unreadable {
                    path: path.clone(),
                    error,
                });
                removed(&path, &mut found);
                continue;
            }
        };
        let decision = decide(&record);
        if decision != Decision::Kill {
            found.push(left(&record, decision));
            removed(&path, &mut found);
            continue;
        }
        match super::group::kill_group(record.pgid) {
            Ok(()) => killed.push((record, path)),
            // The command may have ended since it was looked at.
            Err(_) if decide(&record) != Decision::Kill && !group_alive(record.pgid) => {
                found.push(left(&record, Decision::Ended));
                removed(&path, &mut found);
            }
            Err(e) => found.push(Leftover::NotKilled {
                run: record.run,
                attempt: record.attempt,
                pgid: record.pgid,
                error: e.to_string(),
            }),
        }
    }
    // SIGKILL cannot be caught, but each process goes in its own time: wait, so that a caller
    // who reads that a group was killed finds none of it alive.
    let deadline = Instant::now() + GONE_WAIT;
    for (record, path) in killed {
        let gone = wait_gone(&record, deadline);
        found.push(Leftover::Killed {
            run: record.run,
            attempt: record.attempt,
            pgid: record.pgid,
            gone,
        });
        removed(&path, &mut found);
    }
    Ok(found)
}

/// The command of `record`, left alone because of `decision`.
fn left(record: &Record, decision: Decision) -> Leftover {
    Leftover::Left {
        run: record.run,
        attempt: record.attempt,
        pgid: record.pgid,
        decision,
    }
}

/// Removes `path`, noting a failure in `found`.
fn removed(path: &Path, found: &mut Vec<Leftover>) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            found.push(Leftover::NotRemoved {
                path: path.to_path_buf(),
                error: e.to_string(),
            });
        }
    }
}

/// Waits until `record`'s command and every live process of its group are gone, or `deadline`;
/// whether they are gone.
fn wait_gone(record: &Record, deadline: Instant) -> bool {
    loop {
        if decide(record) != Decision::Kill && !group_alive(record.pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(GONE_POLL);
    }
}

/// What keel reads from `/proc/<pid>/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `R`, `S`, `Z`…
    pub(crate) state: char,
    /// Field 5: the process group.
    pub(crate) pgrp: u32,
    /// Field 22: the start time, in clock ticks since boot.
    pub(crate) start_ticks: u64,
}

impl Stat {
    /// A zombie, or on its way out.
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/<pid>/stat`: `pid (comm) state ppid pgrp …`, where `comm` may hold
/// spaces and parentheses, so the fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3.
    let field = |n: usize| fields.get(n - 3).copied();
    let mut state = field(3)?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return None;
    };
    Some(Stat {
        state,
        pgrp: field(5)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
    })
}

/// `/proc/<pid>/stat`, if there is such a process.
pub(crate) fn proc_stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether some process of group `pgid` is alive (zombies aside).
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .and_then(proc_stat)
            .is_some_and(|stat| stat.pgrp == pgid && !stat.is_dead())
    })
}

/// Whether this is Linux with its own `/proc`: one that shows this process under its pid (not
/// one of another pid namespace).
fn proc_available() -> bool {
    cfg!(target_os = "linux")
        && fs::read_to_string("/proc/self/stat").is_ok_and(|text| {
            text.split(' ')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok())
                == Some(std::process::id())
        })
}

fn boot_id() -> Option<String> {
    let text = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(text.trim().to_string()).filter(|id| !id.is_empty())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    use keel_harness::TempDir;

    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (a (b) c) S 1 4240 4240 0 -1 4194304 97 0 0 0 0 0 0 0 20 0 1 0 \
                    1103125 3133440 383 18446744073709551615 0 0 0\n";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                pgrp: 4240,
                start_ticks: 1_103_125
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1 2"), None, "too short");
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn a_record_round_trips_through_its_private_file() {
        let tmp = TempDir::created("keel-leftovers");
        let dir = tmp.path().join("attempts");
        let pid = std::process::id();
        let path = record(&dir, RunId(42), Attempt(3), pid).unwrap().unwrap();
        assert_eq!(path, dir.join("run-42-3"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        let read = Record::read(&path).unwrap();
        assert_eq!(
            read,
            Record {
                run: RunId(42),
                attempt: Attempt(3),
                pgid: pid,
                start_ticks: proc_stat(pid).unwrap().start_ticks,
                boot_id: boot_id(),
            }
        );
        assert!(read.boot_id.is_some());
        remove(&path);
        assert!(!path.exists());
        remove(&path);
    }

    #[test]
    fn a_pid_with_another_start_time_or_boot_is_never_killed() {
        let pid = std::process::id();
        let this = Record {
            run: RunId(1),
            attempt: Attempt(1),
            pgid: pid,
            start_ticks: proc_stat(pid).unwrap().start_ticks,
            boot_id: boot_id(),
        };
        // The decision only: this process is not a group leader, nothing is sent.
        assert_eq!(decide(&this), Decision::Kill);
        let reused = Record {
            start_ticks: this.start_ticks + 1,
            ..this.clone()
        };
        assert_eq!(decide(&reused), Decision::Reused);
        let before_boot = Record {
            boot_id: Some("another-boot".into()),
            ..this.clone()
        };
        assert_eq!(decide(&before_boot), Decision::OtherBoot);
        let unknown_boot = Record {
            boot_id: None,
            ..this.clone()
        };
        assert_eq!(decide(&unknown_boot), Decision::Kill);
        let no_such_process = Record {
            pgid: u32::MAX,
            ..this
        };
        assert_eq!(decide(&no_such_process), Decision::Ended);

        // The sweep leaves this process alone, and removes the record.
        let tmp = TempDir::created("keel-leftovers");
        let dir = tmp.path().join("attempts");
        let path = dir.join("run-1-1");
        reused.write(&dir, &path).unwrap();
        let found = kill_leftovers(&dir).unwrap();
        assert_eq!(
            found,
            vec![Leftover::Left {
                run: RunId(1),
                attempt: Attempt(1),
                pgid: pid,
                decision: Decision::Reused
            }]
        );
        assert!(found[0].is_notable());
        assert!(!path.exists());
    }

    #[test]
    fn a_leftover_command_is_killed_with_its_group_and_bad_files_are_removed() {
        let tmp = TempDir::created("keel-leftovers");
        let dir = tmp.path().join("attempts");
        // A command with a child of its own, in a group of its own, as the handler starts it.
        let mut leftover = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = leftover.id();
        record(&dir, RunId(7), Attempt(2), pgid).unwrap().unwrap();
        fs::write(dir.join("run-8-1"), "not json").unwrap();
        let ended = Record {
            run: RunId(9),
            attempt: Attempt(1),
            pgid: u32::MAX,
            start_ticks: 1,
            boot_id: boot_id(),
        };
        ended.write(&dir, &dir.join("run-9-1")).unwrap();

        let found = kill_leftovers(&dir).unwrap();
        // (The leader stays a zombie until this test reaps it; zombies do not count.)
        assert!(!group_alive(pgid), "the whole group is gone");
        let status = leftover.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            matches!(&found[0], Leftover::Unreadable { path, .. } if path.ends_with("run-8-1")),
            "{found:?}"
        );
        assert_eq!(
            found[1],
            Leftover::Left {
                run: RunId(9),
                attempt: Attempt(1),
                pgid: u32::MAX,
                decision: Decision::Ended
            }
        );
        assert!(!found[1].is_notable());
        assert_eq!(
            found[2],
            Leftover::Killed {
                run: RunId(7),
                attempt: Attempt(2),
                pgid,
                gone: true
            }
        );
        assert_eq!(
            found[2].to_string(),
            format!(
                "killed the leftover command of run-7 attempt 2 (pgid {pgid}) from a previous \
                 daemon"
            )
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "every file removed");
        assert_eq!(kill_leftovers(&tmp.path().join("missing")).unwrap(), []);
    }
}

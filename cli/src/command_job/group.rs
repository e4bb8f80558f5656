//! The command's process group: signalled to stop the command, killed with SIGKILL when the
//! attempt is dropped (module docs of [`super`], "Timeouts, cancels and shutdown").

use std::path::PathBuf;

use tokio::process::Child;

use super::leftovers;

/// Sends `signal` to the command's process group; if that fails, SIGKILL to the command.
pub(super) async fn signal_group(pgid: Option<u32>, signal: &str, child: &mut Child) {
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
pub(super) fn send_to_group(pgid: u32, sig: rustix::process::Signal) -> std::io::Result<()> {
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
pub(super) struct GroupGuard {
    /// Cleared once the command is reaped.
    pub(super) pgid: Option<u32>,
    /// The command's record in the attempts directory, if it has one.
    pub(super) record: Option<PathBuf>,
}

impl GroupGuard {
    /// The command was reaped: its pid may be reused from now on, and no crash can leave it
    /// running.
    pub(super) fn reaped(&mut self) {
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
pub(super) fn kill_group(pgid: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    return send_to_group(pgid, rustix::process::Signal::KILL);
    #[cfg(not(unix))]
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("cannot signal process group {pgid} here"),
    ))
}

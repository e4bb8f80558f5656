//! Direct mode: a command that changes something, run while no daemon answers on the control
//! socket, acts on the store itself.
//!
//! It takes the daemon lock (so a daemon starting meanwhile waits for it, a few milliseconds),
//! restores a scheduler from the store (becoming its writer), applies the command, writes the
//! batches it produces, and exits. It never fires a slot or starts an attempt: it does not
//! call `handle_timeout`, so time-driven work waits for the daemon. A command that starts an
//! attempt of a command job (`job trigger`) cannot run it: it gives the attempt back at once
//! (`release`, which counts it as lost, see docs/semantics.md), so the run waits in
//! `backing_off` and the daemon starts it on its first tick.

use std::time::{Duration, Instant};

use keel_core::{
    drive, Conflict, Effect, Rejected, RunId, Scheduler, Store, StoreError, Timestamp, WorkerId,
};
use serde_json::Value;

use crate::client::Client;
use crate::command_job;
use crate::error::Failure;
use crate::place::{DaemonLock, Holder, Place};
use crate::protocol::{to_value, Added, CheckpointAnswer, ClaimedAttempt, ContextView, Request};

/// The worker id of the daemon's own attempts: `local`, the id `Scheduler::restore` gives the
/// in-process executor while it sorts the restored runs. With the same id, a daemon that
/// restarts after a crash recovers its predecessor's attempts at once (lost attempt, retried
/// now) instead of waiting for their leases to expire; one daemon at a time holds a data
/// directory, so the name is never shared. External workers may not use it.
pub(crate) const DAEMON_WORKER: &str = "local";

/// The worker id of the daemon's own attempts on `kind`'s store: [`DAEMON_WORKER`], except on
/// Postgres, where daemons on several hosts share the store and each must know its own
/// attempts from another host's: `local:HOST`, HOST being `KEEL_HOSTNAME` if set (for several
/// daemons on one machine), else the host name. A new leader on another host then leaves the
/// old leader's attempts to their leases (that host stops them when it loses the lead).
pub(crate) fn daemon_worker(kind: crate::cli::StoreKind) -> String {
    if kind != crate::cli::StoreKind::Postgres {
        return DAEMON_WORKER.to_string();
    }
    let host = std::env::var("KEEL_HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if host.is_empty() {
        return format!("{DAEMON_WORKER}:unknown-host");
    }
    format!("{DAEMON_WORKER}:{host}")
}

/// Whether `worker` names a daemon's own executor (`local`, or `local:HOST` on Postgres).
pub(crate) fn is_daemon_worker(worker: &str) -> bool {
    worker == DAEMON_WORKER
        || worker
            .strip_prefix(DAEMON_WORKER)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// How long a command waits for a daemon that holds the lock to open its control socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Sends `request` to the daemon if one answers, or applies it to the store directly.
pub(crate) fn call(place: &Place, request: &Request) -> Result<Value, Failure> {
    if let Some(remote) = &place.remote {
        return remote.call(request);
    }
    if let Some(mut client) = Client::connect(place)? {
        return client.call(request);
    }
    if request.is_read() {
        return read_directly(place, request);
    }
    if place.kind == crate::cli::StoreKind::Postgres {
        // Acting on the store would restore a scheduler, whose new writer epoch deposes the
        // leading daemon on whatever host it runs (SPEC M3): the leader's API gets it instead.
        return crate::anyhost::forward(place, request);
    }
    place.prepare()?;
    let deadline = Instant::now() + SOCKET_WAIT;
    let lock = loop {
        match DaemonLock::try_take(place, "command")? {
            Ok(lock) => break lock,
            Err(holder) => {
                // A daemon takes the lock before it opens its socket, and another command
                // holds it for milliseconds: wait for either to finish.
                if let Some(mut client) = Client::connect(place)? {
                    return client.call(request);
                }
                if Instant::now() >= deadline {
                    return Err(locked_out(place, &holder));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let result = execute(place, request);
    drop(lock);
    match result {
        Ok(value) => value,
        // Nothing was written: the daemon that took over can apply it.
        Err(Deposed { wrote: false }) => match Client::connect(place)? {
            Some(mut client) => client.call(request),
            None => Err(Failure::runtime(format!(
                "another keel process took over the store in {} before this command was \
                 written, and no daemon answers on its control socket: try again",
                place.dir.display()
            ))),
        },
        // Sending it again could apply it twice.
        Err(Deposed { wrote: true }) => Err(Failure::runtime(format!(
            "another keel process took over the store in {} while this command was being \
             written; part of it may have landed: check with `keel job ls` and `keel runs` \
             before trying again",
            place.dir.display()
        ))),
    }
}

/// Reads with no daemon running.
fn read_directly(place: &Place, request: &Request) -> Result<Value, Failure> {
    // A Postgres store is read from any host, whether a daemon ever ran there or not.
    if place.kind != crate::cli::StoreKind::Postgres {
        place.require_existing()?;
    }
    if let Request::Status = request {
        let mut status = crate::protocol::DaemonStatus {
            pid: None,
            store: place.kind.name().into(),
            worker: daemon_worker(place.kind),
            leader: None,
        };
        if place.kind == crate::cli::StoreKind::Postgres {
            status.leader = Some(crate::lead::current(place, false)?);
        }
        return to_value(status);
    }
    let store = place.open_store()?.store();
    crate::protocol::answer_read(&*store, request)
}

fn locked_out(place: &Place, holder: &Holder) -> Failure {
    let who = match holder {
        Holder::Daemon(pid) => format!("a keel daemon (pid {pid})"),
        Holder::Command(pid) => format!("another keel command (pid {pid})"),
        Holder::Unknown => "another keel process".to_string(),
    };
    Failure::runtime(format!(
        "{who} holds {} but does not answer on {}; if it is stuck, stop it and try again",
        place.lock_path().display(),
        place.socket().display()
    ))
}

/// The store deposed this command's scheduler: another process restored meanwhile. `wrote`
/// says whether some batch of this command had landed before.
#[derive(Debug)]
struct Deposed {
    wrote: bool,
}

/// The scheduler's configuration for one command without a daemon: keel-core's defaults, but
/// a history policy that keeps the most any daemon may keep. A command does not know the
/// daemon's `[daemon] history_runs` and `history_age`, and a run it settles prunes its job's
/// history; so it prunes only what no daemon would keep, and the daemon's own sweep (hourly)
/// and settles prune by the daemon's policy.
fn direct_config() -> keel_core::Config {
    keel_core::Config {
        history: keel_core::HistoryPolicy {
            runs_max: keel_core::limits::HISTORY_RUNS_MAX,
            age_max_ms: crate::config::HISTORY_AGE_MAX_MS,
        },
        ..keel_core::Config::default()
    }
}

/// Restores, applies, writes. `Err(Deposed)` if another process became the writer.
fn execute(place: &Place, request: &Request) -> Result<Result<Value, Failure>, Deposed> {
    let store = match place.open_store() {
        Ok(store) => store.store(),
        Err(e) => return Ok(Err(e)),
    };
    let snapshot = match store.restore() {
        Ok(snapshot) => snapshot,
        Err(e) => return Ok(Err(e.into())),
    };
    let now = wall_clock();
    let worker = WorkerId::new(DAEMON_WORKER).expect("a valid worker id");
    let mut core = Scheduler::restore_as(worker, direct_config(), now.0 as u64, now, snapshot);
    let answer = apply(&mut core, now, request);
    // Whatever the command did (or the restore itself recovered) is written, even if the
    // command was refused: a refused command changed nothing.
    let claimed = match drain(&mut core, &*store, now) {
        Ok(claimed) => claimed,
        Err(Drained::Deposed { wrote }) => return Err(Deposed { wrote }),
        Err(Drained::Failed(e)) => return Ok(Err(e)),
    };
    Ok(answer.and_then(|answer| match answer {
        Answer::Value(value) => Ok(value),
        Answer::Claimed(run) => {
            let start = claimed
                .into_iter()
                .find(|start| start.run == run)
                .ok_or_else(|| Failure::runtime(format!("{run} was claimed but not granted")))?;
            to_value(Some(ClaimedAttempt::from(start)))
        }
    }))
}

enum Answer {
    Value(Value),
    /// A claim granted this run; the attempt is handed out once its grant is durable.
    Claimed(RunId),
}

fn apply(core: &mut Scheduler, now: Timestamp, request: &Request) -> Result<Answer, Failure> {
    let value = match request.clone() {
        Request::AddJob { spec, replace } => {
            if !spec.external && &*spec.kind != command_job::KIND {
                return Err(Failure::input(format!(
                    "no handler is registered for kind {:?}: keel runs command jobs itself; \
                     jobs of any other kind need --worker-kind (external workers)",
                    &*spec.kind
                )));
            }
            let id = spec.id.clone();
            let replaced = match core.add_job(now, spec.clone()) {
                Ok(()) => false,
                Err(Rejected::JobExists(_)) if replace => {
                    core.update_job(now, spec)?;
                    true
                }
                Err(e) => return Err(e.into()),
            };
            to_value(Added {
                replaced,
                job: core.job(&id).cloned(),
            })?
        }
        Request::RemoveJob { job } => to_value(core.remove_job(now, &job)?)?,
        Request::PauseJob { job } => {
            to_value(crate::protocol::changed(core.pause_job(now, &job))?)?
        }
        Request::ResumeJob { job } => {
            to_value(crate::protocol::changed(core.resume_job(now, &job))?)?
        }
        Request::TriggerJob { job } => to_value(core.trigger(now, &job)?)?,
        Request::CancelRun { run } => to_value(core.cancel_run(now, run)?)?,
        Request::Claim { worker, kinds } => {
            let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
            return match core.claim(now, &worker, &kinds)? {
                Some(claimed) => Ok(Answer::Claimed(claimed.run)),
                None => Ok(Answer::Value(Value::Null)),
            };
        }
        Request::Touch { run, token } => to_value(core.heartbeat(now, run, token)?)?,
        Request::Progress {
            run,
            token,
            phase,
            message,
        } => to_value(core.progress(now, run, token, &phase, &message)?)?,
        Request::Context { run, token } => to_value(ContextView::from(core.context(run, token)?))?,
        Request::Checkpoint { run, token, data } => to_value(CheckpointAnswer::from(
            core.save_checkpoint(now, run, token, data)?,
        ))?,
        Request::Complete {
            run,
            token,
            outcome,
        } => {
            core.handle_outcome(now, run, token, outcome)?;
            // A success waiting for the artifact gate: no driver runs here to answer
            // `VerifyArtifacts`, so the checks are made now, and the answer says how the gate
            // decided (its evidence is written either way).
            if let Some(id) = core.gate(run) {
                let checks = core.verification_checks(id).unwrap_or_default().to_vec();
                let results = keel_runtime::verify::Verifier::new().check_all_blocking(&checks);
                core.handle_verified(wall_clock(), id, results)?;
            }
            to_value(())?
        }
        Request::Verify { run, token, target } => {
            // No driver runs here: the check is made now, and its evidence written.
            let id = core.verify(now, run, token, &target)?;
            let checks = core.verification_checks(id).unwrap_or_default().to_vec();
            let results = keel_runtime::verify::Verifier::new().check_all_blocking(&checks);
            match core.handle_verified(wall_clock(), id, results)? {
                keel_core::Verified::Checked(mut evidence)
                | keel_core::Verified::Accepted(mut evidence) => {
                    let first = evidence.drain(..).next();
                    to_value(first)?
                }
            }
        }
        Request::Lease {
            run,
            action,
            by,
            reason,
        } => {
            let done = match action {
                crate::protocol::LeaseOp::Release => core.release_lease(now, run, &by, &reason)?,
                crate::protocol::LeaseOp::Reclaim => core.reclaim_lease(now, run, &by, &reason)?,
                crate::protocol::LeaseOp::Restore => core.restore_lease(now, run, &by, &reason)?,
            };
            crate::views::lease_action(run, &done)
        }
        Request::OpenIncident {
            job,
            run,
            worker,
            details,
            by,
        } => to_value(core.open_incident(
            now,
            keel_core::NewIncident {
                job,
                run,
                worker,
                details,
                by,
            },
        )?)?,
        Request::AcknowledgeIncident { incident, by, note } => {
            to_value(core.acknowledge_incident(now, incident, &by, &note)?)?
        }
        Request::ResolveIncident {
            incident,
            by,
            reason,
        } => to_value(core.resolve_incident(now, incident, &by, &reason)?)?,
        read => return Err(Failure::runtime(format!("not a command: {read:?}"))),
    };
    Ok(Answer::Value(value))
}

enum Drained {
    Deposed { wrote: bool },
    Failed(Failure),
}

/// Writes every batch the scheduler has, acknowledging each (`keel_core::drive`); returns the
/// attempts it released (claims of external workers).
fn drain(
    core: &mut Scheduler,
    store: &dyn Store,
    now: Timestamp,
) -> Result<Vec<keel_core::AttemptStart>, Drained> {
    let mut started = Vec::new();
    let mut written = 0;
    let write = |batch: &keel_core::Batch| {
        store.apply(batch)?;
        written += 1;
        Ok(())
    };
    let hand_on = |core: &mut Scheduler, now, effect| match effect {
        // An attempt for this process's executor (a triggered command job): nothing runs it
        // here, so it is given back and the run waits for the daemon. Left running, it would
        // wait for its lease to be reclaimed instead. The drain writes the release too.
        Effect::StartAttempt(start) if start.lease.owner.as_str() == DAEMON_WORKER => {
            let _ = core.release(now, start.run, start.lease.token);
        }
        // An external worker's claim: handed to it.
        Effect::StartAttempt(start) => started.push(start),
        // Nothing else runs here and nothing is delivered; events are the daemon's to log.
        // Artifact checks a completion asked for were made by `apply` already.
        _ => {}
    };
    match drive::drain(core, now, write, hand_on) {
        Ok(_) => Ok(started),
        Err(StoreError::Conflict(Conflict::Deposed { .. })) => {
            Err(Drained::Deposed { wrote: written > 0 })
        }
        Err(e) => Err(Drained::Failed(e.into())),
    }
}

/// The system's wall clock.
pub(crate) fn wall_clock() -> Timestamp {
    // One wall clock for all of keel: the runtime's.
    keel_runtime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command without a daemon keeps at least what any daemon's config may keep: the most
    /// `[daemon] history_runs` and `history_age` accept.
    #[test]
    fn a_direct_command_prunes_no_more_than_the_most_a_daemon_keeps() {
        let most = crate::config::parse(
            "[daemon]\nhistory_runs = 100000\nhistory_age = \"3650d\"\n",
            std::path::Path::new("keel.toml"),
        )
        .expect("the largest values are accepted");
        assert_eq!(direct_config().history, most.history);
        assert_eq!(
            keel_core::Config {
                history: keel_core::Config::default().history,
                ..direct_config()
            },
            keel_core::Config::default()
        );
    }
}

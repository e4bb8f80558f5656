//! What a command can fail with, and the exit code each failure maps to.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | keel or its store failed (I/O, a corrupt store, the daemon stopped) |
//! | 2 | bad input: an unknown job or run, a bad cron expression, zone, duration or time, a stale token, a command keel refused |
//! | 3 | `keel worker claim` found nothing due |

use std::fmt;

use keel_core::{Rejected, StoreError};
use keel_runtime::{CommandError, RuntimeError};
use serde::{Deserialize, Serialize};

/// Why a command failed. It crosses the control socket as `{"code": …, "message": …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub(crate) enum Failure {
    /// Exit 2: the input was wrong, or keel refused the command; nothing changed.
    BadInput(String),
    /// Exit 1: keel, its store or the daemon failed.
    #[serde(rename = "failure")]
    Runtime(String),
    /// Exit 3: `worker claim` found nothing due.
    NothingDue(String),
    /// Exit 2, as bad input: no such job or run (HTTP 404).
    NotFound(String),
    /// Exit 2, as bad input: a write under a fencing token that is not the run's current
    /// lease; nothing changed (HTTP 409).
    StaleToken(String),
    /// Exit 2, as bad input: the artifact gate refused a completion; the run stays running
    /// under the same lease, and the message names each failed artifact (HTTP 422).
    ArtifactGate(String),
    /// Exit 2, as bad input: a request too large to read (HTTP 413).
    TooLarge(String),
    /// Exit 2, as bad input: the caller's token may not do this (HTTP 403).
    Forbidden(String),
}

impl Failure {
    /// The process exit code for this failure.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Runtime(_) => 1,
            Failure::BadInput(_)
            | Failure::NotFound(_)
            | Failure::StaleToken(_)
            | Failure::ArtifactGate(_)
            | Failure::TooLarge(_)
            | Failure::Forbidden(_) => 2,
            Failure::NothingDue(_) => 3,
        }
    }

    /// The message, without the class.
    pub(crate) fn message(&self) -> &str {
        match self {
            Failure::BadInput(m)
            | Failure::Runtime(m)
            | Failure::NothingDue(m)
            | Failure::NotFound(m)
            | Failure::StaleToken(m)
            | Failure::ArtifactGate(m)
            | Failure::TooLarge(m)
            | Failure::Forbidden(m) => m,
        }
    }

    /// A bad-input failure.
    pub(crate) fn input(message: impl Into<String>) -> Failure {
        Failure::BadInput(message.into())
    }

    /// A runtime failure.
    pub(crate) fn runtime(message: impl Into<String>) -> Failure {
        Failure::Runtime(message.into())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl From<Rejected> for Failure {
    fn from(rejected: Rejected) -> Failure {
        match rejected {
            // Not the caller's fault: the daemon is stopping; try again once it is back.
            Rejected::ShuttingDown => {
                Failure::runtime("the daemon is shutting down; try again once it is back")
            }
            Rejected::JobExists(job) => Failure::input(format!(
                "a job named {job} already exists (pass --replace to change its definition, \
                 or remove it first with `keel job rm {job}`)"
            )),
            Rejected::StaleToken { run, got, current } => {
                let current = match current {
                    Some(token) => format!("the current lease is {token}"),
                    None => "the run holds no lease now".to_string(),
                };
                Failure::StaleToken(format!(
                    "{run}: {got} is not the current lease ({current}); the write was refused. \
                     The lease expired, was reclaimed or was released by an operator, and the run \
                     belongs to another attempt: \
                     stop working on it and drop this attempt's result"
                ))
            }
            Rejected::UnknownRun(run) => Failure::NotFound(format!(
                "no active run {run}: it never existed or it has finished \
                 (see `keel runs show {run}`)"
            )),
            Rejected::UnknownJob(job) => Failure::NotFound(format!("no job named {job}")),
            e @ Rejected::UnknownIncident(_) => Failure::NotFound(e.to_string()),
            e @ Rejected::ArtifactGate { .. } => Failure::ArtifactGate(e.to_string()),
            other => Failure::input(other.to_string()),
        }
    }
}

impl From<CommandError> for Failure {
    fn from(error: CommandError) -> Failure {
        match error {
            CommandError::Rejected(r) => r.into(),
            CommandError::NoHandler { kind, .. } => Failure::input(format!(
                "no handler is registered for kind {kind:?}: keel runs command jobs itself; \
                 jobs of any other kind need --worker-kind (external workers)"
            )),
            e @ CommandError::ReservedWorker { .. } => Failure::input(e.to_string()),
            CommandError::Runtime(e) => e.into(),
            e => Failure::runtime(e.to_string()),
        }
    }
}

impl From<RuntimeError> for Failure {
    fn from(error: RuntimeError) -> Failure {
        match error {
            // The daemon runs on; only this command's answer was lost.
            e @ RuntimeError::Interrupted(_) => Failure::runtime(e.to_string()),
            e => Failure::runtime(format!("the daemon's scheduler stopped: {e}")),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        Failure::runtime(format!("store: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{JobId, RunId, ScheduleError};

    #[test]
    fn bad_input_exits_2_failures_1_nothing_due_3() {
        let unknown: Failure = Rejected::UnknownJob(JobId::new("nightly").unwrap()).into();
        assert_eq!(unknown.exit_code(), 2);
        assert_eq!(unknown.message(), "no job named nightly");
        let zone: Failure = Rejected::Schedule(ScheduleError::UnknownZone {
            zone: "Mars/Olympus".into(),
        })
        .into();
        assert_eq!(zone.exit_code(), 2);
        assert!(zone.message().contains("Mars/Olympus"), "{zone}");
        let gone: Failure = Rejected::UnknownRun(RunId(4)).into();
        assert_eq!(gone.exit_code(), 2);
        assert!(gone.message().contains("run-4"));
        let stale: Failure = Rejected::StaleToken {
            run: RunId(5),
            got: keel_core::FencingToken(8),
            current: Some(keel_core::FencingToken(9)),
        }
        .into();
        assert_eq!(stale.exit_code(), 2);
        assert!(
            stale.message().starts_with(
                "run-5: token-8 is not the current lease (the current lease is token-9)"
            ),
            "{stale}"
        );
        assert_eq!(Failure::from(Rejected::ShuttingDown).exit_code(), 1);
        let store: Failure = StoreError::Io("disk full".into()).into();
        assert_eq!(store.exit_code(), 1);
        assert_eq!(Failure::NothingDue("nothing".into()).exit_code(), 3);
    }

    #[test]
    fn failures_cross_the_socket_as_code_and_message() {
        let json = serde_json::to_string(&Failure::input("bad cron")).unwrap();
        assert_eq!(json, r#"{"code":"bad_input","message":"bad cron"}"#);
        let json = serde_json::to_string(&Failure::runtime("disk")).unwrap();
        assert_eq!(json, r#"{"code":"failure","message":"disk"}"#);
        let back: Failure = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Failure::runtime("disk"));
    }
}

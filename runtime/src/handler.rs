//! Handlers: the async functions that do a job's work, and what each attempt is given.

use std::future::Future;
use std::sync::Arc;

use keel_core::run::Checkpoint;
use keel_core::scheduler::CheckpointSave;
use keel_core::{
    Attempt, FencingToken, IdempotencyKey, JobId, Outcome, Rejected, RunId, StopReason,
};
use tokio::sync::{oneshot, watch};

use crate::sink::BoxFuture;

/// Does the work of one job kind. Any `Fn(AttemptContext) -> impl Future<Output = O>` is a
/// handler, where `O` is an [`Outcome`] or a `Result` ([`IntoOutcome`]), so `?` works:
///
/// ```
/// use keel_runtime::{AttemptContext, Failure, ResultExt};
///
/// async fn backup(ctx: AttemptContext) -> Result<String, Failure> {
///     // A malformed payload will not get better on a retry: permanent.
///     let target: std::path::PathBuf = ctx.payload.parse().permanent()?;
///     let resume_from = ctx.checkpoint.as_ref().map(|c| c.data.clone());
///     // Any std error is a retryable failure: `?` retries the run (while attempts remain).
///     let files = std::fs::read_dir(&target)?.count();
///     // ... do the work, calling ctx.checkpoint(...) and ctx.progress(...) on the way,
///     // and stopping early if ctx.is_cancelled() ...
///     let _ = resume_from;
///     Ok(format!("{files} files"))
/// }
/// # let _ = keel_runtime::Runtime::builder(std::sync::Arc::new(keel_testkit::SharedMemStore::new()))
/// #     .handler("backup", backup);
/// ```
///
/// A handler that panics is caught: the attempt ends as a retryable failure whose message is
/// the panic's, and the runtime keeps running.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn call(&self, ctx: AttemptContext) -> BoxFuture<Outcome>;
}

impl<F, Fut> Handler for F
where
    F: Fn(AttemptContext) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoOutcome,
{
    fn call(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        let attempt = self(ctx);
        Box::pin(async move { attempt.await.into_outcome() })
    }
}

/// What a handler returns: an [`Outcome`], `()` (success), or a `Result` whose `Ok` is a success
/// ([`IntoSuccess`]) and whose `Err` is a [`Failure`] or anything that converts into one (any
/// `std::error::Error`: a retryable failure).
pub trait IntoOutcome {
    /// The attempt's outcome.
    fn into_outcome(self) -> Outcome;
}

/// A handler that returns nothing succeeded.
impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::ok()
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl<T: IntoSuccess, E: Into<Failure>> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(value) => value.into_success(),
            Err(e) => e.into().outcome,
        }
    }
}

/// A handler's `Ok` value: `()` (success), a `String` or `&'static str` (success with that
/// summary, kept in the run's record), or an [`Outcome`] (the handler decides).
pub trait IntoSuccess {
    /// The outcome of an attempt that returned `Ok(self)`.
    fn into_success(self) -> Outcome;
}

impl IntoSuccess for () {
    fn into_success(self) -> Outcome {
        Outcome::ok()
    }
}

impl IntoSuccess for String {
    fn into_success(self) -> Outcome {
        Outcome::Success {
            summary: Some(self),
            artifacts: Default::default(),
        }
    }
}

impl IntoSuccess for &'static str {
    fn into_success(self) -> Outcome {
        self.to_string().into_success()
    }
}

impl IntoSuccess for Outcome {
    fn into_success(self) -> Outcome {
        self
    }
}

/// Why an attempt did not succeed, as a handler's `Err`: retryable unless made otherwise.
///
/// `?` converts any `std::error::Error` into a retryable failure whose message is the error and
/// its sources (`connect: connection refused`). Say otherwise with the constructors, or with
/// [`ResultExt`] on a `Result`:
///
/// ```
/// use std::time::Duration;
/// use keel_runtime::{AttemptContext, Failure, ResultExt};
///
/// async fn import(ctx: AttemptContext) -> Result<(), Failure> {
///     let rows: u32 = ctx.payload.parse().permanent()?; // bad input: never retried
///     if rows == 0 {
///         return Err(Failure::snooze(Duration::from_secs(60))); // not now, no attempt used
///     }
///     Ok(())
/// }
/// # let _ = keel_runtime::Runtime::builder(std::sync::Arc::new(keel_testkit::SharedMemStore::new()))
/// #     .handler("import", import);
/// ```
///
/// It does not implement `std::error::Error` itself: that is what lets `?` convert every error
/// into it (the same trade as `anyhow::Error`). An error type that is not a `std` error (an
/// `anyhow::Error`) converts with `.map_err(Failure::retryable)` or [`ResultExt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    outcome: Outcome,
}

impl Failure {
    /// It failed, and trying again may help: the run is retried while its attempts last.
    pub fn retryable(error: impl std::fmt::Display) -> Failure {
        Failure {
            outcome: Outcome::Retryable {
                message: error.to_string(),
            },
        }
    }

    /// It failed, and trying again cannot help: the run fails now, whatever attempts remain.
    pub fn permanent(error: impl std::fmt::Display) -> Failure {
        Failure {
            outcome: Outcome::Permanent {
                message: error.to_string(),
            },
        }
    }

    /// Not now: the run is tried again after `delay`, without using up an attempt.
    pub fn snooze(delay: std::time::Duration) -> Failure {
        Failure {
            outcome: Outcome::Snooze {
                for_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            },
        }
    }

    /// The run should not happen (or the handler stopped because it was asked to): it ends
    /// `cancelled`.
    pub fn cancel(reason: impl std::fmt::Display) -> Failure {
        Failure {
            outcome: Outcome::Cancelled {
                reason: reason.to_string(),
            },
        }
    }

    /// The outcome the attempt ends with.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Outcome::Retryable { message } => write!(f, "retryable: {message}"),
            Outcome::Permanent { message } => write!(f, "permanent: {message}"),
            Outcome::Snooze { for_ms } => write!(f, "snoozed for {for_ms} ms"),
            Outcome::Cancelled { reason } => write!(f, "cancelled: {reason}"),
            Outcome::Success { .. } => f.write_str("success"),
        }
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(error: E) -> Failure {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            // Many errors repeat their source's text in their own; say it once.
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Failure::retryable(message)
    }
}

/// Says what kind of failure a `Result`'s error is, for `?` in a handler.
pub trait ResultExt<T> {
    /// An error here is permanent: the run fails now.
    fn permanent(self) -> Result<T, Failure>;
    /// An error here is retryable (for errors that are not `std` errors).
    fn retryable(self) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, Failure> {
        self.map_err(Failure::permanent)
    }

    fn retryable(self) -> Result<T, Failure> {
        self.map_err(Failure::retryable)
    }
}

/// Why a checkpoint was not saved.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Refused: the attempt no longer holds its lease, or the data is too large.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The store failed to write it. Treat it as not saved: the run's record still holds the
    /// data in memory, so the retried write may store it after all, but nothing promises that;
    /// save again to be sure.
    #[error("checkpoint {seq} was not saved: {error}")]
    Failed {
        /// The save.
        seq: u64,
        /// The store's error.
        error: String,
    },
}

/// How a handler's checkpoint save is answered.
pub(crate) type CheckpointReply = oneshot::Sender<Result<CheckpointSave, CheckpointError>>;

/// What a handler reports while it runs.
#[derive(Debug)]
pub(crate) enum Report {
    Checkpoint {
        data: String,
        reply: CheckpointReply,
    },
    Progress {
        phase: String,
        message: String,
    },
    Heartbeat,
}

/// Where an attempt's reports go (the driver's inbox), without the handler knowing the driver.
pub(crate) type Reporter = Arc<dyn Fn(RunId, FencingToken, Report) + Send + Sync>;

/// Everything one attempt is given: who it is, where to resume from, and how to talk back.
pub struct AttemptContext {
    /// The run.
    pub run: RunId,
    /// The job.
    pub job: JobId,
    /// The handler kind.
    pub kind: Arc<str>,
    /// The job's payload.
    pub payload: Arc<str>,
    /// This attempt, from 1.
    pub attempt: Attempt,
    /// `run id + attempt`: pass it to the systems you change, so a repeated attempt (keel
    /// executes at least once) is recognised there.
    pub idempotency_key: IdempotencyKey,
    /// The attempt's fencing token: pass it to storage that supports fencing (SPEC L1).
    pub token: FencingToken,
    /// The last checkpoint saved by an earlier attempt (or this run's earlier process), to
    /// resume from.
    pub checkpoint: Option<Checkpoint>,
    pub(crate) cancel: watch::Receiver<Option<StopReason>>,
    pub(crate) reports: Reporter,
}

impl std::fmt::Debug for AttemptContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptContext")
            .field("run", &self.run)
            .field("job", &self.job)
            .field("kind", &self.kind)
            .field("attempt", &self.attempt)
            .field("token", &self.token)
            .field("stop_reason", &self.stop_reason())
            .finish_non_exhaustive()
    }
}

impl AttemptContext {
    /// True once the attempt was asked to stop (a timeout, a cancelled run, a shutdown). The
    /// handler should return soon, with `Outcome::Cancelled` or whatever it managed. If it
    /// does not: after a timeout it is killed at the end of the kill grace (SPEC W1); at
    /// shutdown it is abandoned when the budget is spent and recovered at the next start; an
    /// operator's cancel waits for it.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.borrow().is_some()
    }

    /// Why the attempt was asked to stop, once it was: an operator's cancel, the job's
    /// timeout, a shutdown, or the lease lost. A handler can say so in its outcome.
    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.cancel.borrow()
    }

    /// Resolves when the attempt is asked to stop; use it in `tokio::select!`.
    pub async fn cancelled(&mut self) {
        while self.cancel.borrow_and_update().is_none() {
            if self.cancel.changed().await.is_err() {
                // The runtime is gone; nothing will ever ask again.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Saves a checkpoint: the next attempt of this run (after a retry, a crash or a restart)
    /// starts with it in [`AttemptContext::checkpoint`]. `Ok(Saving)` means the store has it;
    /// saves are throttled (SPEC C1), and a save inside the window returns `Ok(Throttled)` at
    /// once: it is kept and written by the next save after the window, by the end of the
    /// attempt, or at shutdown. Fails if the attempt no longer holds its lease, the data is too
    /// large, or the store failed to write it (the next save is then not throttled).
    pub async fn checkpoint(
        &self,
        data: impl Into<String>,
    ) -> Result<CheckpointSave, CheckpointError> {
        let (reply, answer) = oneshot::channel();
        let report = Report::Checkpoint {
            data: data.into(),
            reply,
        };
        self.report(report);
        answer
            .await
            .unwrap_or(Err(CheckpointError::Rejected(Rejected::ShuttingDown)))
    }

    /// Reports progress: a phase and a message, shown by `keel runs show` and in stuck
    /// incidents. Counts as a sign of life.
    pub fn progress(&self, phase: impl Into<String>, message: impl Into<String>) {
        self.report(Report::Progress {
            phase: phase.into(),
            message: message.into(),
        });
    }

    /// A sign of life, for a handler that has no progress to report: without one for
    /// `stuck_after` (20 s by default), the run is reported stuck (SPEC W5). The runtime renews
    /// the attempt's lease by itself.
    pub fn heartbeat(&self) {
        self.report(Report::Heartbeat);
    }

    fn report(&self, report: Report) {
        (self.reports)(self.run, self.token, report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot reach the ledger")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn outcome(result: Result<impl IntoSuccess, Failure>) -> Outcome {
        result.into_outcome()
    }

    #[test]
    fn ok_values_become_successes_with_their_summary() {
        assert_eq!(outcome(Ok(())), Outcome::ok());
        let summary = |s: &str| Outcome::Success {
            summary: Some(s.into()),
            artifacts: Default::default(),
        };
        assert_eq!(outcome(Ok("3 rows")), summary("3 rows"));
        assert_eq!(outcome(Ok(String::from("4 rows"))), summary("4 rows"));
        let snooze = Outcome::Snooze { for_ms: 5 };
        assert_eq!(outcome(Ok(snooze.clone())), snooze);
        assert_eq!(Outcome::ok().into_outcome(), Outcome::ok());
        assert_eq!(().into_outcome(), Outcome::ok());
    }

    #[test]
    fn a_std_error_is_retryable_with_its_sources_and_the_rest_say_what_they_are() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let failure = Failure::from(Outer(refused));
        assert_eq!(
            failure.outcome(),
            &Outcome::Retryable {
                message: "cannot reach the ledger: refused".into()
            }
        );
        // `?` in a handler: any std error converts.
        fn parse(text: &str) -> Result<u32, Failure> {
            Ok(text.parse::<u32>()?)
        }
        assert!(matches!(
            parse("x").map(drop).into_outcome(),
            Outcome::Retryable { message } if message == "invalid digit found in string"
        ));
        let permanent = "x".parse::<u32>().permanent().map(drop).into_outcome();
        assert!(
            matches!(permanent, Outcome::Permanent { .. }),
            "{permanent:?}"
        );
        let retryable = Err::<(), _>("busy").retryable().into_outcome();
        assert_eq!(
            retryable,
            Outcome::Retryable {
                message: "busy".into()
            }
        );
        let snooze = Failure::snooze(std::time::Duration::from_secs(2));
        assert_eq!(snooze.outcome(), &Outcome::Snooze { for_ms: 2_000 });
        assert_eq!(snooze.to_string(), "snoozed for 2000 ms");
        let cancel = Failure::cancel("not needed");
        assert_eq!(
            Err::<(), _>(cancel).into_outcome(),
            Outcome::Cancelled {
                reason: "not needed".into()
            }
        );
        assert_eq!(
            Failure::permanent("bad").to_string(),
            "permanent: bad",
            "Display names the kind"
        );
    }
}

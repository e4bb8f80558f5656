//! Handlers: the async functions that do a job's work, and what each attempt is given.

use std::future::Future;
use std::sync::Arc;

use keel_core::run::Checkpoint;
use keel_core::scheduler::CheckpointSave;
use keel_core::{Attempt, FencingToken, IdempotencyKey, JobId, Outcome, Rejected, RunId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::{Msg, Report};
use crate::sink::BoxFuture;

/// Does the work of one job kind. Any `Fn(AttemptContext) -> impl Future<Output = Outcome>`
/// is a handler:
///
/// ```
/// use keel_core::Outcome;
/// use keel_runtime::AttemptContext;
///
/// async fn backup(ctx: AttemptContext) -> Outcome {
///     let resume_from = ctx.checkpoint.as_ref().map(|c| c.data.clone());
///     // ... do the work, calling ctx.checkpoint(...) and ctx.progress(...) on the way,
///     // and stopping early if ctx.is_cancelled() ...
///     let _ = resume_from;
///     Outcome::ok()
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
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn call(&self, ctx: AttemptContext) -> BoxFuture<Outcome> {
        Box::pin(self(ctx))
    }
}

/// Why a checkpoint was not saved.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
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

/// Everything one attempt is given: who it is, where to resume from, and how to talk back.
#[derive(Debug)]
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
    pub(crate) cancel: watch::Receiver<bool>,
    pub(crate) reports: mpsc::UnboundedSender<Msg>,
}

impl AttemptContext {
    /// True once the attempt was asked to stop (a timeout, a cancelled run, a shutdown). The
    /// handler should return soon, with `Outcome::Cancelled` or whatever it managed. If it
    /// does not: after a timeout it is killed at the end of the kill grace (SPEC W1); at
    /// shutdown it is abandoned when the budget is spent and recovered at the next start; an
    /// operator's cancel waits for it.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when the attempt is asked to stop; use it in `tokio::select!`.
    pub async fn cancelled(&mut self) {
        while !*self.cancel.borrow_and_update() {
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
        let _ = self.reports.send(Msg::Report {
            run: self.run,
            token: self.token,
            report,
        });
    }
}

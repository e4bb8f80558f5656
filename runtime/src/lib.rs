//! keel-runtime: the tokio driver that runs keel-core for real.
//!
//! It drives a [`Scheduler`] by its documented contract (`keel_core`'s crate docs): one clock
//! source ([`Clock`]), tokio timers for `poll_timeout`, effects executed in order, one store
//! write in flight at a time with its acknowledgement fed back, and nothing handed to a handler
//! before the store has made it durable.
//!
//! The hello world (`runtime/examples/hello.rs`): a handler, a cron job and a one-shot on the
//! embedded store, in a directory given as its first argument. Jobs are *ensured* at each start
//! ([`RuntimeHandle::ensure_job`]): added the first time, left alone after, and a one-shot that
//! fired stays done. Run it twice on one directory: the one-shot fires once in total.
//!
//! ```no_run
#![doc = include_str!("../examples/hello.rs")]
//! ```
//!
//! - **Handlers** are async functions registered by job kind ([`RuntimeBuilder::handler`]).
//!   They return `Result<T, Failure>` so that `?` works (any error is retryable;
//!   [`Failure::permanent`] and [`ResultExt::permanent`] say it is not), `()`, or an `Outcome`.
//!   Each attempt gets an [`AttemptContext`]: run id, attempt, idempotency key, fencing token,
//!   the last checkpoint, a checkpointer, progress and heartbeat reporting, and a
//!   cancellation signal. A panicking handler is caught and recorded as a retryable failure
//!   with its message. Timeouts follow SPEC W1–W3: the core's watchdog asks the attempt to
//!   stop, then the runtime aborts its task.
//! - **Unknown kinds are refused**, never discovered at the first tick: `start` fails with
//!   [`StartError::NoHandler`] if a stored job's kind has no handler, and
//!   [`RuntimeHandle::add_job`] refuses one with [`CommandError::NoHandler`]. Jobs for
//!   external workers need no handler.
//! - **Commands answer once durable**: [`RuntimeHandle`] methods return after what they
//!   changed is acknowledged by the store.
//! - **Graceful shutdown** (SPEC O1; [`Runtime::shutdown`], [`Runtime::run_until_signal`] on
//!   SIGINT or SIGTERM), within one time budget: stop claiming and firing; let attempts
//!   finish; when half the budget is left (at most 10 s), ask those still running to stop; at
//!   its end, abort the rest. An attempt the shutdown stops is interrupted by shutdown: it uses
//!   no attempt and resumes at the next start. Checkpoints are flushed and deliveries drained;
//!   whatever is left stays durable. A second `begin_shutdown` with a shorter budget (a second
//!   signal) moves the end closer.
//! - **Observability**: a tracing span per attempt and an event per state change; counters
//!   through the `metrics` facade ([`metrics_names`]). The runtime only emits: install a
//!   `tracing` subscriber (`tracing_subscriber::fmt::init()`) to see its log lines, which
//!   include why it stopped (another process took over the store, a failing store).
//! - **It survives its own panics** (SPEC W4): a panic in the driver (the core, a sink, a
//!   command) is logged, the process's attempts are stopped and the scheduler is rebuilt from
//!   the store, as a restart would; [`PANICS_IN_A_ROW_MAX`] in a row stop the runtime with
//!   [`RuntimeError::Panicked`].
//! - **One writer**: if another process restores from the same store, this one's next write is
//!   refused (`Conflict::Deposed`) and the runtime stops with [`RuntimeError::Deposed`].
//!   A store that finds its database changed under it (`StoreError::Diverged`: a failover to a
//!   replica that may lack acknowledged writes) stops it too, with [`RuntimeError::Diverged`],
//!   rather than have it retry and write on.
//!
//! # Features
//!
//! Both are on by default; turn them off (`default-features = false`) to build without what
//! they pull in. Everything else, the command sink included, is always there.
//!
//! - **`webhook`**: [`WebhookSink`], which posts each run's result over HTTP(S), and the
//!   artifact gate's URL checks ([`verify`]; without it a URL check fails, saying why). Pulls in
//!   `reqwest` (with hyper) and `rustls` (with the `ring` crypto provider).
//! - **`prometheus`**: the [`prometheus`] module, a Prometheus recorder and renderer for the
//!   [`metrics_names`] counters. Pulls in `metrics-exporter-prometheus`. Without it the
//!   counters still go to whatever `metrics` recorder the application installs.

#![cfg_attr(docsrs, feature(doc_cfg))]
// Links to the feature-gated items cannot resolve with a feature off; the default build, which
// CI documents with warnings denied, checks every link.
#![cfg_attr(
    not(all(feature = "webhook", feature = "prometheus")),
    allow(rustdoc::broken_intra_doc_links)
)]
#![warn(missing_docs)]

pub mod child;
mod clock;
mod driver;
mod handler;
pub mod metrics_names;
mod observe;
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub mod prometheus;
mod sink;
pub mod sinks;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_core::lease::Lease;
use keel_core::scheduler::{CheckpointSave, LeaseAction, Released, RunContext, Verified};
use keel_core::{
    AttemptStart, AuditQuery, AuditRecord, Event, FencingToken, Job, Rejected, RunId, RunQuery,
    Scheduler, Store, StoreError, Verification, WorkerId,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// The core's types an embedding application names, re-exported so that it needs only this
/// crate and a store: jobs and their schedules, outcomes, runs and times.
pub use keel_core::{
    Config, Ensured, JobId, JobSpec, Outcome, RetryPolicy, Run, RunError, RunState, ScheduleSpec,
    StopReason, Timestamp,
};

pub use clock::Clock;
pub use driver::DriverStats;
pub use handler::{
    AttemptContext, CheckpointError, Failure, Handler, IntoOutcome, IntoSuccess, ResultExt,
};
pub use sink::{BoxFuture, Sink};
pub use sinks::CommandSink;
#[cfg(feature = "webhook")]
#[cfg_attr(docsrs, doc(cfg(feature = "webhook")))]
pub use sinks::WebhookSink;

use driver::{Driver, Msg};

/// The worker id a runtime holds its own attempts' leases under unless told otherwise (the
/// core's default too). External workers must use other names.
pub const DEFAULT_WORKER: &str = "local";

/// Why the runtime stopped, or why a command could not reach it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// Another process restored from the store and is its writer now.
    #[error("deposed: {0}")]
    Deposed(String),
    /// The store's database changed under the runtime (`StoreError::Diverged`: a failover to
    /// a replica that may lack acknowledged writes); the runtime stopped rather than write on.
    #[error("stopped: {0}")]
    Diverged(String),
    /// The runtime has stopped.
    #[error("the runtime has stopped")]
    Stopped,
    /// The driver panicked while the command waited for its write, and rebuilt its scheduler
    /// from the store (SPEC W4): what the command changed may or may not have been saved.
    #[error(
        "interrupted: the runtime recovered from an internal error ({0}); what this command \
         changed may not have been saved, check and retry"
    )]
    Interrupted(String),
    /// The driver panicked [`PANICS_IN_A_ROW_MAX`] times in a row and stopped.
    #[error("the runtime failed {PANICS_IN_A_ROW_MAX} times in a row and stopped: {0}")]
    Panicked(String),
}

/// How many panics of the driver in a row it recovers from before it stops with
/// [`RuntimeError::Panicked`]: a panic that comes back after every rebuild from the store is a
/// bug that recovering cannot fix. "In a row": without a step between them that succeeded and
/// left the driver settled (every write acknowledged), and less than a minute apart.
pub const PANICS_IN_A_ROW_MAX: u32 = 3;

/// Why a read through [`RuntimeHandle`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The runtime is gone.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The store could not be read.
    #[error("cannot read the store: {0}")]
    Store(#[from] StoreError),
}

/// The system's wall-clock time now, as a keel [`Timestamp`]: to compute a one-shot's instant
/// (`ScheduleSpec::once(keel_runtime::now().plus_ms(5_000))`). In a runtime on a simulated
/// clock, use [`RuntimeHandle::now`].
pub fn now() -> Timestamp {
    Clock::system().now()
}

/// `"a", "b"`, or `none`.
fn registered_list(kinds: &[String]) -> String {
    if kinds.is_empty() {
        return "none".into();
    }
    kinds
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the runtime did not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be read.
    #[error("cannot restore from the store: {0}")]
    Store(#[from] StoreError),
    /// A stored job's kind has no handler.
    #[error("job {job} has kind {kind:?}, and no handler is registered for it (register one, or remove the job)")]
    NoHandler {
        /// The job.
        job: JobId,
        /// Its kind.
        kind: String,
    },
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The core refused it; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The job's kind has no handler (and the job is not for external workers).
    #[error(
        "job {job} has kind {kind:?}, and no handler is registered for it (registered: {}); \
         register one with RuntimeBuilder::handler, or mark the job for external workers",
        registered_list(registered)
    )]
    NoHandler {
        /// The job.
        job: JobId,
        /// Its kind.
        kind: String,
        /// The kinds that have a handler.
        registered: Vec<String>,
    },
    /// An external worker asked for work under the runtime's own worker id.
    #[error("worker id {worker} is this runtime's own; external workers need another name")]
    ReservedWorker {
        /// The id.
        worker: WorkerId,
    },
    /// The runtime is gone.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Configures and starts a [`Runtime`].
pub struct RuntimeBuilder {
    store: Arc<dyn Store>,
    config: Config,
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    sinks: BTreeMap<String, Arc<dyn Sink>>,
    sink_factory: Option<SinkFactory>,
    seed: Option<u64>,
    worker: Option<WorkerId>,
    clock: Option<Clock>,
    store_inline: bool,
}

/// Makes the sink for a name no sink was registered under (`RuntimeBuilder::sink_factory`).
pub type SinkFactory = Arc<dyn Fn(&str) -> Option<Arc<dyn Sink>> + Send + Sync>;

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("store", &self.store)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("sinks", &self.sinks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// The scheduler's configuration (defaults: `keel_core::Config::default()`).
    #[must_use]
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Registers the handler for jobs of `kind`: an `async fn(AttemptContext) -> R`, or a
    /// closure, where `R` is `()`, an `Outcome` or a `Result` ([`IntoOutcome`]).
    ///
    /// A closure needs its types spelled out, since `handler` accepts any [`Handler`]: its
    /// argument (`|ctx: AttemptContext|`) and, if it returns a `Result`, the error type
    /// (`Ok::<_, Failure>(())`). An `async fn` needs neither:
    ///
    /// ```
    /// # use keel_runtime::{AttemptContext, Failure, Runtime};
    /// # let store = std::sync::Arc::new(keel_testkit::SharedMemStore::new());
    /// let greeting = String::from("hello");
    /// let builder = Runtime::builder(store).handler("greet", move |ctx: AttemptContext| {
    ///     let line = format!("{greeting} from {}", ctx.job);
    ///     async move {
    ///         println!("{line}");
    ///         Ok::<_, Failure>(())
    ///     }
    /// });
    /// # drop(builder);
    /// ```
    #[must_use]
    pub fn handler(mut self, kind: &str, handler: impl Handler) -> Self {
        self.handlers.insert(kind.to_string(), Arc::new(handler));
        self
    }

    /// Registers a sink, by the name jobs use in their `sinks`.
    #[must_use]
    pub fn sink(mut self, name: &str, sink: impl Sink) -> Self {
        self.sinks.insert(name.to_string(), Arc::new(sink));
        self
    }

    /// Makes sinks on demand: a delivery to a name no sink was registered under asks
    /// `factory` for one (once; the sink is kept). `None` leaves the delivery failing as to an
    /// unknown sink. The `keel` daemon makes a webhook sink for any http(s) URL this way, so a
    /// job added while it runs can notify.
    #[must_use]
    pub fn sink_factory(
        mut self,
        factory: impl Fn(&str) -> Option<Arc<dyn Sink>> + Send + Sync + 'static,
    ) -> Self {
        self.sink_factory = Some(Arc::new(factory));
        self
    }

    /// The seed of the core's jitter (default: from the clock).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// This process's worker id, which holds the leases of its handlers' attempts (default:
    /// [`DEFAULT_WORKER`]). Keep it across restarts: attempts held under it when the process
    /// stopped are recovered at once by the next start, while attempts held under any other
    /// name are external workers' and wait for their leases to expire.
    #[must_use]
    pub fn worker(mut self, worker: WorkerId) -> Self {
        self.worker = Some(worker);
        self
    }

    /// The clock (default: [`Clock::system`]).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Calls the store's writes on the driver's own task instead of tokio's blocking pool.
    /// Only for in-memory stores in tests: with tokio's clock paused on a current-thread
    /// runtime, it makes a run of the runtime exactly repeatable (no thread decides when a
    /// write lands). A store that does I/O would block the runtime on every write.
    #[must_use]
    pub fn store_calls_inline(mut self) -> Self {
        self.store_inline = true;
        self
    }

    /// Restores from the store (becoming its writer), checks that every stored job's kind has
    /// a handler, and starts the driver.
    pub async fn start(self) -> Result<Runtime, StartError> {
        let store = Arc::clone(&self.store);
        let snapshot = tokio::task::spawn_blocking(move || store.restore())
            .await
            .map_err(|e| StartError::Store(StoreError::Io(e.to_string())))??;
        for job in &snapshot.jobs {
            if !job.spec.external && !self.handlers.contains_key(&*job.spec.kind) {
                return Err(StartError::NoHandler {
                    job: job.spec.id.clone(),
                    kind: job.spec.kind.to_string(),
                });
            }
        }
        let clock = self.clock.unwrap_or_else(Clock::system);
        let now = clock.now();
        let seed = self.seed.unwrap_or(now.0 as u64);
        let worker = match self.worker {
            Some(worker) => worker,
            None => WorkerId::new(DEFAULT_WORKER).expect("a valid worker id"),
        };
        let core = Scheduler::restore_as(worker.clone(), self.config, seed, now, snapshot);
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let store = Arc::clone(&self.store);
        let mut driver = Driver::new(
            core,
            seed,
            clock,
            self.store,
            Arc::new(self.handlers),
            Arc::new(self.sinks),
            worker,
            tx.clone(),
            events.clone(),
        );
        driver.store_inline = self.store_inline;
        driver.sink_factory = self.sink_factory;
        let stop_reason = Arc::new(std::sync::OnceLock::new());
        let task = tokio::spawn(driver.run(rx, Arc::clone(&stop_reason)));
        let alive = Arc::new(Alive(tx.clone()));
        Ok(Runtime {
            handle: RuntimeHandle {
                tx,
                events,
                store,
                clock,
                stop_reason,
                _alive: alive,
            },
            task,
        })
    }
}

/// A running keel: the driver task and a handle to it.
#[derive(Debug)]
pub struct Runtime {
    handle: RuntimeHandle,
    task: JoinHandle<Result<(), RuntimeError>>,
}

impl Runtime {
    /// Starts configuring a runtime over `store`.
    pub fn builder(store: Arc<dyn Store>) -> RuntimeBuilder {
        RuntimeBuilder {
            store,
            config: Config::default(),
            handlers: BTreeMap::new(),
            sinks: BTreeMap::new(),
            sink_factory: None,
            seed: None,
            worker: None,
            clock: None,
            store_inline: false,
        }
    }

    /// A handle for commands; clone it freely.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Shuts down gracefully within `budget` and waits for the driver to stop.
    pub async fn shutdown(self, budget: Duration) -> Result<(), RuntimeError> {
        self.handle.begin_shutdown(budget);
        self.wait().await
    }

    /// Waits for the driver to stop (after a shutdown, or because it was deposed).
    pub async fn wait(self) -> Result<(), RuntimeError> {
        self.task.await.unwrap_or(Err(RuntimeError::Stopped))
    }

    /// Runs until SIGINT or SIGTERM (Ctrl-C elsewhere), then shuts down within `budget`.
    pub async fn run_until_signal(self, budget: Duration) -> Result<(), RuntimeError> {
        let handle = self.handle.clone();
        let mut task = self.task;
        tokio::select! {
            result = &mut task => return result.unwrap_or(Err(RuntimeError::Stopped)),
            () = signal() => {}
        }
        handle.begin_shutdown(budget);
        task.await.unwrap_or(Err(RuntimeError::Stopped))
    }
}

#[cfg(unix)]
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Jobs taken per step of [`RuntimeHandle::jobs`]: a page holds the driver for a fraction of
/// a millisecond (about 30 ns per job at a million jobs, `docs/performance.md`).
pub const LISTING_PAGE: usize = 4_096;

/// Commands to a running [`Runtime`]. Each returns once what it changed is durable. When the
/// last handle (and the `Runtime`) is dropped, the runtime shuts down at once: nothing could
/// reach it any more.
#[derive(Clone, Debug)]
pub struct RuntimeHandle {
    tx: mpsc::UnboundedSender<Msg>,
    events: broadcast::Sender<Event>,
    store: Arc<dyn Store>,
    clock: Clock,
    /// Why the driver stopped, once it has: what a call that finds it gone answers.
    stop_reason: Arc<std::sync::OnceLock<RuntimeError>>,
    _alive: Arc<Alive>,
}

/// Shared by every handle; the last one dropped asks the driver to stop.
#[derive(Debug)]
struct Alive(mpsc::UnboundedSender<Msg>);

impl Drop for Alive {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Shutdown {
            budget: Duration::ZERO,
        });
    }
}

impl RuntimeHandle {
    /// What a call that finds the driver gone answers: why it stopped (deposed by another
    /// process, failed), or [`RuntimeError::Stopped`] after a shutdown.
    fn gone(&self) -> RuntimeError {
        self.stop_reason
            .get()
            .cloned()
            .unwrap_or(RuntimeError::Stopped)
    }

    /// Every core event from now on (run finished, retry scheduled, lease reclaimed...). A
    /// subscriber that falls more than 1024 events behind misses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// **Escape hatch.** Runs `f` on the driver with the scheduler and the current time, and
    /// returns its result once everything it changed is durable. The typed methods below are
    /// built on it; prefer them. `f` may call any of the scheduler's commands (they keep its
    /// indexes and invariants), but it bypasses the runtime's own checks (a handler for the
    /// job's kind, the reserved worker id), so use it for reads and for commands the handle
    /// does not offer yet.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scheduler, Timestamp) -> T + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let (reply, answer) = oneshot::channel();
        let command: driver::Command = Box::new(move |driver: &mut Driver| {
            let now = driver.clock.now();
            let value = f(&mut driver.core, now);
            Some(Box::new(move |result: Result<(), RuntimeError>| {
                let _ = reply.send(result.map(|()| value));
            }))
        });
        self.tx
            .send(Msg::Command(command))
            .map_err(|_| self.gone())?;
        answer.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// Reads the scheduler as it is now, and answers at once, without waiting for any write:
    /// what it shows may not be durable yet (a change accepted while the store fails). For
    /// reads that must go on while the store is failing (SPEC O5). `f` must not change the
    /// scheduler: use [`RuntimeHandle::call`] for that.
    pub async fn peek<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Scheduler, Timestamp) -> T + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let (reply, answer) = oneshot::channel();
        let command: driver::Command = Box::new(move |driver: &mut Driver| {
            let now = driver.clock.now();
            let _ = reply.send(f(&driver.core, now));
            None
        });
        self.tx
            .send(Msg::Command(command))
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())
    }

    /// The driver's work counters (what it checked to answer commands), answered at once.
    /// For tests and diagnosis: they show that an acknowledgement costs what it wakes,
    /// however many commands wait.
    pub async fn driver_stats(&self) -> Result<DriverStats, RuntimeError> {
        let (reply, answer) = oneshot::channel();
        let command: driver::Command = Box::new(move |driver: &mut Driver| {
            let _ = reply.send(driver.stats());
            None
        });
        self.tx
            .send(Msg::Command(command))
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())
    }

    /// Returns once every change the scheduler made before this call is durable (events such
    /// as `RunFinished` are announced as the change happens, before its write lands).
    pub async fn sync(&self) -> Result<(), RuntimeError> {
        self.call(|_, _| ()).await
    }

    async fn command<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scheduler, Timestamp) -> Result<T, Rejected> + Send + 'static,
    ) -> Result<T, CommandError> {
        Ok(self.call(f).await??)
    }

    /// Adds a job. Refused if its kind has no handler, unless it is for external workers.
    pub async fn add_job(&self, spec: JobSpec) -> Result<(), CommandError> {
        self.with_handler_check(spec, |core, now, spec| core.add_job(now, spec))
            .await
    }

    /// Replaces a job's definition (same checks as `add_job`).
    pub async fn update_job(&self, spec: JobSpec) -> Result<(), CommandError> {
        self.with_handler_check(spec, |core, now, spec| core.update_job(now, spec))
            .await
    }

    /// Makes the job be as `spec` says: adds it, updates it, or leaves it alone, and says
    /// which. A one-shot that already fired is left done, whatever its instant now says, so an
    /// application can ensure its jobs at every start (see `Scheduler::ensure_job`). Same
    /// checks as `add_job`.
    ///
    /// A one-shot that has *not* fired yet takes the new instant: "in five seconds" computed
    /// at each start moves it on every restart until it fires. For an instant that must hold
    /// across restarts, compute it once (a fixed time, or one saved with your own state).
    pub async fn ensure_job(&self, spec: JobSpec) -> Result<Ensured, CommandError> {
        self.with_handler_check(spec, |core, now, spec| core.ensure_job(now, spec))
            .await
    }

    async fn with_handler_check<T: Send + 'static>(
        &self,
        spec: JobSpec,
        f: impl FnOnce(&mut Scheduler, Timestamp, JobSpec) -> Result<T, Rejected> + Send + 'static,
    ) -> Result<T, CommandError> {
        let (reply, answer) = oneshot::channel();
        let command: driver::Command = Box::new(move |driver: &mut Driver| {
            if !spec.external && !driver.has_handler(&spec.kind) {
                let _ = reply.send(Err(CommandError::NoHandler {
                    job: spec.id.clone(),
                    kind: spec.kind.to_string(),
                    registered: driver.handler_kinds(),
                }));
                return None;
            }
            let now = driver.clock.now();
            let result = f(&mut driver.core, now, spec);
            Some(Box::new(move |durable: Result<(), RuntimeError>| {
                let _ = reply.send(match durable {
                    Ok(()) => result.map_err(CommandError::from),
                    Err(e) => Err(e.into()),
                });
            }))
        });
        self.tx
            .send(Msg::Command(command))
            .map_err(|_| self.gone())?;
        answer.await.unwrap_or_else(|_| Err(self.gone().into()))
    }

    /// Deletes a job (its history stays, subject to the history policy).
    pub async fn remove_job(&self, id: JobId) -> Result<(), CommandError> {
        self.command(move |core, now| core.remove_job(now, &id))
            .await
    }

    /// Pauses a job: no slot fires until it is resumed.
    pub async fn pause_job(&self, id: JobId) -> Result<(), CommandError> {
        self.command(move |core, now| core.pause_job(now, &id))
            .await
    }

    /// Resumes a paused job.
    pub async fn resume_job(&self, id: JobId) -> Result<(), CommandError> {
        self.command(move |core, now| core.resume_job(now, &id))
            .await
    }

    /// Starts a run of the job now, outside its schedule.
    pub async fn trigger(&self, id: JobId) -> Result<RunId, CommandError> {
        self.command(move |core, now| core.trigger(now, &id)).await
    }

    /// Cancels an active run (a running attempt is asked to stop).
    pub async fn cancel_run(&self, id: RunId) -> Result<(), CommandError> {
        self.command(move |core, now| core.cancel_run(now, id))
            .await
    }

    /// Every job, ordered by id, as the scheduler holds it now (answered at once, even while
    /// the store fails: see [`RuntimeHandle::peek`]).
    ///
    /// The listing is taken [`LISTING_PAGE`] jobs at a time, and the driver only takes a
    /// pointer to each; the copies are made here, by the caller. So a listing of a million
    /// jobs never holds up firings and acknowledgements for more than a page of pointer
    /// copies at a time (`docs/performance.md`). Each job is as it was at one moment; a job
    /// added or deleted while the listing is taken may be in it or not.
    pub async fn jobs(&self) -> Result<Vec<Job>, RuntimeError> {
        let mut jobs = Vec::new();
        let mut after: Option<JobId> = None;
        loop {
            let from = after.take();
            let page: Vec<Arc<Job>> = self
                .peek(move |core, _| {
                    core.shared_jobs_after(from.as_ref())
                        .take(LISTING_PAGE)
                        .cloned()
                        .collect()
                })
                .await?;
            let last_page = page.len() < LISTING_PAGE;
            after = page.last().map(|job| job.spec.id.clone());
            jobs.extend(page.into_iter().map(Arc::unwrap_or_clone));
            if last_page {
                return Ok(jobs);
            }
        }
    }

    /// One job, as the scheduler holds it now (answered at once, like [`RuntimeHandle::jobs`]).
    pub async fn job(&self, id: &JobId) -> Result<Option<Job>, RuntimeError> {
        let id = id.clone();
        self.peek(move |core, _| core.job(&id).cloned()).await
    }

    /// How many jobs there are (answered at once, like [`RuntimeHandle::jobs`]).
    pub async fn job_count(&self) -> Result<usize, RuntimeError> {
        self.peek(|core, _| core.job_count()).await
    }

    /// The runtime's clock now: the system's wall clock, or the simulated one it was given
    /// ([`RuntimeBuilder::clock`]), which moves with tokio's paused time in tests.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// A run, active or finished: as the scheduler holds it while it is active, then as the
    /// store keeps it (until the history policy prunes it).
    pub async fn run(&self, id: RunId) -> Result<Option<Run>, ReadError> {
        if let Some(run) = self.peek(move |core, _| core.run(id).cloned()).await? {
            return Ok(Some(run));
        }
        self.read(move |store| store.run(id)).await
    }

    /// The runs of a job, newest first, at most `limit` of them, as durable now: what the
    /// scheduler changed before this call is in the store when it reads.
    pub async fn runs_of(&self, job: JobId, limit: usize) -> Result<Vec<Run>, ReadError> {
        self.sync().await?;
        let query = RunQuery {
            job: Some(job),
            limit,
            ..RunQuery::default()
        };
        Ok(self.read(move |store| store.runs(&query)).await?.runs)
    }

    /// A run's audit trail (every state change, who made it and why), oldest first, at most
    /// `limit` records, as durable now.
    pub async fn audit_of_run(
        &self,
        run: RunId,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, ReadError> {
        self.sync().await?;
        let query = AuditQuery {
            run: Some(run),
            limit,
            ..AuditQuery::default()
        };
        self.read(move |store| store.audit(&query)).await
    }

    /// Runs a store read off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ReadError> {
        let store = Arc::clone(&self.store);
        let read = tokio::task::spawn_blocking(move || f(&*store));
        match read.await {
            Ok(result) => Ok(result?),
            Err(e) => Err(ReadError::Store(StoreError::Io(format!(
                "the read did not finish: {e}"
            )))),
        }
    }

    /// An external worker asks for work of some kinds. Returns the attempt, with its lease
    /// and fencing token, once the grant is durable; `None` if nothing is queued, or if the
    /// run was cancelled while its grant was being written.
    pub async fn claim(
        &self,
        worker: WorkerId,
        kinds: Vec<String>,
    ) -> Result<Option<AttemptStart>, CommandError> {
        let (reply, answer) = oneshot::channel();
        let command: driver::Command = Box::new(move |driver: &mut Driver| {
            // The runtime's own name: a grant to it would be run here, by a handler.
            if worker == driver.worker {
                let _ = reply.send(Err(CommandError::ReservedWorker { worker }));
                return None;
            }
            let now = driver.clock.now();
            let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
            match driver.core.claim(now, &worker, &kinds) {
                Ok(Some(claimed)) => {
                    let (granted, attempt) = oneshot::channel();
                    driver.claims.insert(claimed.run, granted);
                    driver.wait_for_durable(driver::Waiter::Claim(claimed.run));
                    let _ = reply.send(Ok(Some(attempt)));
                }
                Ok(None) => {
                    let _ = reply.send(Ok(None));
                }
                Err(e) => {
                    let _ = reply.send(Err(CommandError::from(e)));
                }
            }
            None
        });
        self.tx
            .send(Msg::Command(command))
            .map_err(|_| self.gone())?;
        let pending = answer.await.unwrap_or_else(|_| Err(self.gone().into()))?;
        match pending {
            None => Ok(None),
            Some(attempt) => attempt
                .await
                .map_err(|_| CommandError::Runtime(self.gone())),
        }
    }

    /// The holder is alive: renews its lease.
    pub async fn heartbeat(&self, run: RunId, token: FencingToken) -> Result<Lease, CommandError> {
        self.command(move |core, now| core.heartbeat(now, run, token))
            .await
    }

    /// The holder reports progress.
    pub async fn progress(
        &self,
        run: RunId,
        token: FencingToken,
        phase: String,
        message: String,
    ) -> Result<(), CommandError> {
        self.command(move |core, now| core.progress(now, run, token, &phase, &message))
            .await
    }

    /// What the holder may know about its run: payload, lease, last checkpoint, progress.
    pub async fn context(
        &self,
        run: RunId,
        token: FencingToken,
    ) -> Result<RunContext, CommandError> {
        self.command(move |core, _| core.context(run, token)).await
    }

    /// The holder saves a checkpoint (throttled, SPEC C1).
    pub async fn save_checkpoint(
        &self,
        run: RunId,
        token: FencingToken,
        data: String,
    ) -> Result<CheckpointSave, CommandError> {
        self.command(move |core, now| core.save_checkpoint(now, run, token, data))
            .await
    }

    /// The holder reports how its attempt ended. Answers once the outcome is decided and
    /// durable: a success whose required artifacts are checked (SPEC A2, `keel_core::artifact`)
    /// answers only after the artifact gate decided, `Ok` if it passed, or
    /// `Rejected::ArtifactGate` naming each failed artifact with its status or error and an
    /// excerpt of the answer (the run stays running under the same lease: fix the artifact and
    /// complete again). The evidence is on the run ([`Run::verifications`]) and in its audit
    /// trail either way. Other refusals are as for any fenced write (`StaleToken`,
    /// `NotRunning`, `MissingArtifacts`, `VerificationPending`).
    pub async fn complete(
        &self,
        run: RunId,
        token: FencingToken,
        outcome: Outcome,
    ) -> Result<(), CommandError> {
        self.verification(move |driver, now| {
            driver.core.handle_outcome(now, run, token, outcome)?;
            Ok(driver.core.gate(run))
        })
        .await
        .map(|_| ())
    }

    /// The holder asks for `target` (an http(s) URL, a `file://` URL or an absolute path on
    /// the daemon's host) to be checked now, as the artifact gate would (the worker contract's
    /// `verify`): a URL passes if it answers HTTP 200 within 10 s, a file if it exists.
    /// Answers with the evidence, stored with the run and audited, once durable; a failed
    /// check is `Ok` with `ok: false`. A later completion in the same attempt reuses a passing
    /// check of the same target. Refused with `Rejected::InvalidField` for a target keel does
    /// not check, and as any fenced write.
    pub async fn verify(
        &self,
        run: RunId,
        token: FencingToken,
        target: String,
    ) -> Result<Verification, CommandError> {
        let verified = self
            .verification(move |driver, now| {
                let id = driver.core.verify(now, run, token, &target)?;
                Ok(Some(id))
            })
            .await?;
        let evidence = verified.map(|v| v.evidence().to_vec()).unwrap_or_default();
        Ok(evidence
            .into_iter()
            .next()
            .expect("a verify checks one target"))
    }

    /// Runs `f` on the driver; if it names a verification request, answers with its decision
    /// once durable, else (`None`) once what `f` changed is durable.
    async fn verification(
        &self,
        f: impl FnOnce(&mut Driver, Timestamp) -> Result<Option<keel_core::VerifyId>, Rejected>
            + Send
            + 'static,
    ) -> Result<Option<Verified>, CommandError> {
        let (reply, answer) = oneshot::channel::<Result<Option<Verified>, CommandError>>();
        let command: driver::Command = Box::new(move |driver: &mut Driver| {
            let now = driver.clock.now();
            let result = f(driver, now);
            match result {
                Ok(Some(id)) => {
                    driver.verifying.insert(
                        id,
                        Box::new(move |decided| {
                            let _ = reply.send(decided.map(Some));
                        }),
                    );
                    None
                }
                result => Some(Box::new(move |durable: Result<(), RuntimeError>| {
                    let _ = reply.send(match durable {
                        Ok(()) => result.map(|_| None).map_err(CommandError::from),
                        Err(e) => Err(e.into()),
                    });
                })),
            }
        });
        self.tx
            .send(Msg::Command(command))
            .map_err(|_| self.gone())?;
        answer.await.unwrap_or_else(|_| Err(self.gone().into()))
    }

    /// An operator takes a running run's lease away now (SPEC W6; `PATCH runs/{id}/lease`):
    /// the holder's token is refused from then on, and the run queues for a worker again (an
    /// in-process run starts its next attempt) without using an attempt. `actor` is the
    /// operator's name and `reason` says why; both go to the audit trail. Refused with
    /// `UnknownRun` or `NotRunning`.
    pub async fn release_lease(
        &self,
        run: RunId,
        actor: String,
        reason: String,
    ) -> Result<LeaseAction, CommandError> {
        self.command(move |core, now| core.release_lease(now, run, &actor, &reason))
            .await
    }

    /// An operator applies the watchdog's reclaim now, as if the lease had expired: the
    /// attempt counts as lost and the run retries or fails by its policy; a `lease_reclaimed`
    /// incident opens. Refused with `UnknownRun` or `NotRunning`.
    pub async fn reclaim_lease(
        &self,
        run: RunId,
        actor: String,
        reason: String,
    ) -> Result<LeaseAction, CommandError> {
        self.command(move |core, now| core.reclaim_lease(now, run, &actor, &reason))
            .await
    }

    /// An operator undoes a release or reclaim: the same attempt is re-granted to its previous
    /// owner under a new fencing token (`LeaseAction::Restored` carries it; the old token stays
    /// refused, and its 409 names the new one). Refused with `NothingToRestore` if the run was
    /// claimed or started since, or its lease was not taken by an operator.
    pub async fn restore_lease(
        &self,
        run: RunId,
        actor: String,
        reason: String,
    ) -> Result<LeaseAction, CommandError> {
        self.command(move |core, now| core.restore_lease(now, run, &actor, &reason))
            .await
    }

    /// The holder gives its attempt back (it counts as lost; the run retries).
    pub async fn release(&self, run: RunId, token: FencingToken) -> Result<Released, CommandError> {
        self.command(move |core, now| core.release(now, run, token))
            .await
    }

    /// Starts a graceful shutdown within `budget`; returns at once. Await
    /// [`Runtime::wait`] to see it finish.
    pub fn begin_shutdown(&self, budget: Duration) {
        let _ = self.tx.send(Msg::Shutdown { budget });
    }
}

//! The driver: one task that owns the [`Scheduler`] and carries out its effects.
//!
//! # States, inputs, effects
//!
//! The driver is `Running` until a shutdown is asked for, then `Draining` until nothing is left
//! or its budget is spent, then `Stopped`. Draining has three steps (SPEC O1): attempts run
//! undisturbed until `stop_at` (half the budget left, at most 10 s); then its own attempts
//! still running are asked to stop (`stop_for_shutdown`); at the budget's end those left are
//! interrupted (`end_shutdown`) and aborted, and the driver stops once that is written (or 2 s
//! later). Its inputs arrive on one channel ([`Msg`]) or from one timer:
//!
//! | input | what the driver does |
//! |---|---|
//! | the timer (`poll_timeout`, its attempts' lease timers, the shutdown's steps) | `handle_timeout(now)`; drives each own attempt's `LeaseHolder`: renews at half the TTL, and once no renewal was durable for `ttl - margin` stops the attempt (below); moves a shutdown to its next step |
//! | `Msg::Command` | runs it against the scheduler; answers once what it wrote is durable |
//! | `Msg::Persisted` | `handle_persisted` or `handle_persist_failed`; a `Deposed` or `Diverged` store stops the driver |
//! | `Msg::Finished` (a handler returned or panicked) | `handle_outcome` with the attempt's token; a success refused because the lease was lost is a WARN and audit evidence (SPEC L4) |
//! | `Msg::Report` (checkpoint, progress, heartbeat from a handler) | the matching core call, fenced by the attempt's token |
//! | `Msg::Delivered` (a sink answered) | `handle_delivery_result` |
//! | `Msg::Verified` (artifact checks done) | `handle_verified`; answers the `complete` or `verify` call waiting for it once its evidence is durable; a gate refusing this process's own attempt gives the attempt back (`release`), as a success missing an artifact does |
//!
//! # Its own attempts' leases (SPEC L2, L4, M2)
//!
//! Each attempt this process runs has a [`LeaseHolder`]: a renewal is sent at half the TTL
//! (`renew_lease`, whose write is the renewal) and succeeds when that write is acknowledged.
//! Once `sent_at + ttl - margin` passes with no renewal durable (a store that fails or stalls),
//! the lease is lost: the attempt is asked to stop (its cancellation token), the lease is given
//! back (`release`, so the run retries and anything the attempt still reports is refused), and
//! the attempt is aborted at `sent_at + ttl` if it has not ended, before any other holder could
//! be granted the run. A success reported after the loss goes through `guarded_outcome`: refused
//! (the usual case), it is logged at WARN ("result refused: lease lost; the run will execute
//! again") and recorded as evidence with `record_refused_result`; accepted (the store still took
//! the token), it stands with a WARN.
//!
//! Each step (one input, then draining the effects) runs under `catch_unwind`. A panic is
//! handled as a restart would be (SPEC W4): the driver's own attempts are aborted, waiting
//! commands are answered with [`RuntimeError::Interrupted`], and the core is rebuilt from
//! `Store::restore`; [`PANICS_IN_A_ROW_MAX`] panics in a row stop the runtime.
//!
//! After every input it drains `poll_effect` in order:
//!
//! | effect | what the driver does |
//! |---|---|
//! | `Persist(batch)` | one `Store::apply` at a time on the blocking pool; the answer comes back as `Msg::Persisted` |
//! | `StartAttempt` for its own worker id | spawns the kind's handler with an [`AttemptContext`] |
//! | `StartAttempt` for an external worker | answers that worker's pending claim |
//! | `CancelAttempt` | signals the attempt's cancellation token |
//! | `KillAttempt` | aborts the handler's task (its lease is already revoked) |
//! | `Deliver` | spawns the sink's `send`; an unknown sink is a permanent failure |
//! | `VerifyArtifacts` | spawns the checks ([`crate::verify::Verifier`]: a timeout and a bounded body read each); the results come back as `Msg::Verified` |
//! | `Event` | a tracing event, metrics, and a broadcast to subscribers |

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use keel_core::lease::{guarded_outcome, GuardedOutcome, LeaseHolder, SectionEnd};
use keel_core::outbox::{DeliveryId, DeliveryResult};
use keel_core::scheduler::{CheckpointSave, Verified};
use keel_core::{
    Attempt, AttemptStart, BatchId, CheckResult, Conflict, Effect, Event, FencingToken, Outcome,
    Rejected, RunId, RunState, Scheduler, StopReason, Store, StoreError, Timestamp, Trigger,
    VerifyId, WorkerId,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::handler::{AttemptContext, CheckpointError, CheckpointReply, Handler, Report};
use crate::metrics_names as m;
use crate::sink::Sink;
use crate::verify::Verifier;
use crate::{CommandError, RuntimeError, PANICS_IN_A_ROW_MAX};

/// Panics further apart than this are not counted as in a row, even if the driver was never
/// settled between them (a busy one may not be).
const PANIC_STREAK_RESET: Duration = Duration::from_secs(60);

/// How long a recovery waits for the attempts it aborted to be gone before it rebuilds the core.
const ATTEMPTS_STOP_WAIT: Duration = Duration::from_secs(5);

/// A command run on the driver against the scheduler. It returns a continuation that the
/// driver calls with `Ok` once what the command wrote is durable (or with the store's error
/// if the runtime stopped first).
pub(crate) type Command = Box<dyn FnOnce(&mut Driver) -> Option<Reply> + Send>;

/// An answer waiting for durability.
pub(crate) type Reply = Box<dyn FnOnce(Result<(), RuntimeError>) + Send>;

/// An answer waiting for a verification's decision (`complete` through the artifact gate, or
/// `verify`).
pub(crate) type VerifyReply = Box<dyn FnOnce(Result<Verified, CommandError>) + Send>;

/// What waits for a write mark to be durable.
pub(crate) enum Waiter {
    /// A command's answer.
    Reply(Reply),
    /// An external claim, answered by its `StartAttempt` or, if the grant was dropped before
    /// it became durable, with nothing.
    Claim(RunId),
}

/// How much work the driver has done: what it checked to wake waiters, so tests can assert
/// that an acknowledgement costs what it wakes, not what waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DriverStats {
    /// Times the driver looked for waiters to wake (once per turn of its loop).
    pub wake_checks: u64,
    /// Waiters it looked at: those woken plus at most one per look.
    pub waiters_checked: u64,
    /// Waiters woken: commands answered and claims settled.
    pub waiters_woken: u64,
    /// The most waiters ever waiting at once.
    pub waiters_max: u64,
}

/// The driver's inputs.
pub(crate) enum Msg {
    Command(Command),
    Persisted {
        batch: BatchId,
        result: Result<(), StoreError>,
    },
    Finished {
        run: RunId,
        attempt: Attempt,
        token: FencingToken,
        outcome: Outcome,
    },
    Report {
        run: RunId,
        token: FencingToken,
        report: Report,
    },
    Delivered {
        /// The scheduler the delivery was sent for: a result sent for one that a recovery
        /// replaced is dropped (the restored outbox sends again).
        generation: u64,
        id: DeliveryId,
        attempt: u32,
        result: DeliveryResult,
    },
    Verified {
        /// The scheduler the checks were asked by: an answer for one that a recovery replaced
        /// is dropped (its holder asks again).
        generation: u64,
        id: VerifyId,
        results: Vec<CheckResult>,
    },
    Shutdown {
        budget: Duration,
    },
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Command(_) => f.write_str("Command"),
            Msg::Persisted { batch, result } => write!(f, "Persisted({batch}, {result:?})"),
            Msg::Finished { run, outcome, .. } => write!(f, "Finished({run}, {outcome:?})"),
            Msg::Report { run, report, .. } => write!(f, "Report({run}, {report:?})"),
            Msg::Delivered { id, result, .. } => write!(f, "Delivered({id}, {result:?})"),
            Msg::Verified { id, results, .. } => write!(f, "Verified({id}, {results:?})"),
            Msg::Shutdown { budget } => write!(f, "Shutdown({budget:?})"),
        }
    }
}

/// An attempt this process is executing.
struct Executing {
    token: FencingToken,
    cancel: watch::Sender<Option<StopReason>>,
    abort: AbortHandle,
    /// The task that waits for the handler: it ends once the handler's task has ended
    /// (returned, panicked, or aborted and dropped).
    watcher: tokio::task::JoinHandle<()>,
    /// When to renew, and when the lease counts as lost (SPEC L2).
    holder: LeaseHolder,
    /// The renewal in flight: the write mark that makes it durable, and when it was sent.
    renewing: Option<(u64, Timestamp)>,
    /// Once the lease is lost: when the attempt is aborted if it has not ended by then.
    abort_at: Option<Instant>,
    /// This attempt's key in `lease_timers`.
    wake_at: Instant,
    started: Instant,
}

/// What the driver waits for next: one input per step of its loop.
enum Input {
    Msg(Msg),
    /// Every sender is gone.
    Closed,
    /// A timer is due.
    Tick,
}

/// The driver's state.
pub(crate) struct Driver {
    pub(crate) core: Scheduler,
    /// Makes a sink for a name none was registered under (`RuntimeBuilder::sink_factory`).
    pub(crate) sink_factory: Option<crate::SinkFactory>,
    /// Call the store on the driver's task rather than on tokio's blocking pool
    /// (`RuntimeBuilder::store_calls_inline`).
    pub(crate) store_inline: bool,
    /// The core's jitter seed, reused (plus the recovery count) when a panic rebuilds it.
    seed: u64,
    /// How many times a panic rebuilt the core from the store.
    generation: u64,
    /// Panics since the last step that succeeded and left the driver settled (SPEC W4).
    panics_in_a_row: u32,
    /// When the latest panic was caught.
    last_panic: Option<Instant>,
    /// The run the current step is about, if any, for the log of a panic.
    concerning: Option<RunId>,
    pub(crate) clock: Clock,
    store: Arc<dyn Store>,
    handlers: Arc<BTreeMap<String, Arc<dyn Handler>>>,
    sinks: Arc<BTreeMap<String, Arc<dyn Sink>>>,
    pub(crate) worker: WorkerId,
    tx: mpsc::UnboundedSender<Msg>,
    events: broadcast::Sender<Event>,
    /// The batch being written, if any, and how many batches were sent so far.
    in_flight: Option<BatchId>,
    /// What waits for every change up to its write mark to be acknowledged, in the order the
    /// marks were taken (marks only rise): each turn wakes a prefix of it, so an
    /// acknowledgement costs what it wakes, however many wait behind.
    waiting: VecDeque<(u64, Waiter)>,
    /// Work counters, for tests that prove the driver's cost does not grow with what waits.
    stats: DriverStats,
    executing: BTreeMap<RunId, Executing>,
    /// When each executing attempt's lease holder next acts (a renewal, the lost deadline, the
    /// abort after a loss), soonest first: the next wake and the timers due read its front
    /// instead of every attempt.
    lease_timers: BTreeSet<(Instant, RunId)>,
    /// Renewals in flight by the write mark that makes them durable, lowest first.
    renewals_writing: BTreeSet<(u64, RunId)>,
    /// Handlers waiting for a checkpoint save to be acknowledged, by run and save.
    checkpoints: BTreeMap<(RunId, u64), CheckpointReply>,
    /// The tracing span of each run this process has started an attempt of, until it ends.
    run_spans: HashMap<RunId, tracing::Span>,
    /// External claims waiting for their grant to be durable.
    /// `None` is sent if the grant was dropped before it became durable (the run was
    /// cancelled meanwhile).
    pub(crate) claims: HashMap<RunId, oneshot::Sender<Option<AttemptStart>>>,
    /// Performs artifact checks.
    verifier: Verifier,
    /// Calls waiting for a verification's decision, by request.
    pub(crate) verifying: HashMap<VerifyId, VerifyReply>,
    deliveries_in_flight: usize,
    drain_until: Option<Instant>,
    /// The shutdown's phases (SPEC O1): when its own attempts still running are asked to stop,
    /// and whether they were; and whether the budget's end interrupted the rest.
    stop_at: Option<Instant>,
    stop_sent: bool,
    ended: bool,
    stopped: Option<Result<(), RuntimeError>>,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        core: Scheduler,
        seed: u64,
        clock: Clock,
        store: Arc<dyn Store>,
        handlers: Arc<BTreeMap<String, Arc<dyn Handler>>>,
        sinks: Arc<BTreeMap<String, Arc<dyn Sink>>>,
        worker: WorkerId,
        tx: mpsc::UnboundedSender<Msg>,
        events: broadcast::Sender<Event>,
    ) -> Self {
        Driver {
            core,
            sink_factory: None,
            store_inline: false,
            seed,
            generation: 0,
            panics_in_a_row: 0,
            last_panic: None,
            concerning: None,
            clock,
            store,
            handlers,
            sinks,
            worker,
            tx,
            events,
            in_flight: None,
            waiting: VecDeque::new(),
            stats: DriverStats::default(),
            executing: BTreeMap::new(),
            lease_timers: BTreeSet::new(),
            renewals_writing: BTreeSet::new(),
            run_spans: HashMap::new(),
            checkpoints: BTreeMap::new(),
            claims: HashMap::new(),
            verifier: Verifier::new(),
            verifying: HashMap::new(),
            deliveries_in_flight: 0,
            drain_until: None,
            stop_at: None,
            stop_sent: false,
            ended: false,
            stopped: None,
        }
    }

    /// A sender for a task's answer.
    fn sender(&self) -> mpsc::UnboundedSender<Msg> {
        self.tx.clone()
    }

    /// How logs and metrics name a sink: its own label, else the name it is registered under.
    fn sink_label(&self, name: &str) -> String {
        match self.sinks.get(name).and_then(|sink| sink.label()) {
            Some(label) => label,
            // Not registered (any more): if the name is a URL, keep its secrets out anyway.
            None => match name.split_once("://") {
                Some((scheme, rest)) => {
                    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
                    let host = authority.rsplit('@').next().unwrap_or(authority);
                    format!("{scheme}://{host}")
                }
                None => name.to_string(),
            },
        }
    }

    /// The handlers, for commands that check a job's kind.
    pub(crate) fn has_handler(&self, kind: &str) -> bool {
        self.handlers.contains_key(kind)
    }

    /// The sink registered under `name`, or the one the factory makes for it (kept).
    fn sink(&mut self, name: &str) -> Option<Arc<dyn Sink>> {
        if let Some(sink) = self.sinks.get(name) {
            return Some(Arc::clone(sink));
        }
        let sink = (self.sink_factory.as_ref()?)(name)?;
        Arc::make_mut(&mut self.sinks).insert(name.to_string(), Arc::clone(&sink));
        Some(sink)
    }

    /// The kinds that have a handler, in order.
    pub(crate) fn handler_kinds(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// Runs until shut down (or the store deposes this process, or it panics
    /// [`PANICS_IN_A_ROW_MAX`] times in a row).
    ///
    /// Each step (handling one input, then draining the effects) runs under `catch_unwind`: a panic in
    /// the core, a sink or the driver's own code is logged and the core is rebuilt from the
    /// store, as a restart would (SPEC W4), instead of taking the daemon down.
    pub(crate) async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        stop_reason: Arc<std::sync::OnceLock<RuntimeError>>,
    ) -> Result<(), RuntimeError> {
        let result = self.run_until_stopped(&mut rx).await;
        // Before the channel closes: a caller that finds it closed reads why.
        let _ = stop_reason.set(result.clone().err().unwrap_or(RuntimeError::Stopped));
        drop(rx);
        result
    }

    async fn run_until_stopped(
        mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
    ) -> Result<(), RuntimeError> {
        // The input of the next step; none for the first, or after a recovery, when the
        // step only drains what the (restored) core has to say.
        let mut input = None;
        loop {
            if self.stopped.is_none() {
                let had_input = input.is_some();
                let step = self.guarded(|driver| {
                    if let Some(input) = input.take() {
                        driver.input(input);
                    }
                    driver.drain_effects();
                });
                match step {
                    // An input handled, its effects carried out and every write acknowledged:
                    // whatever panicked before did not come back.
                    Ok(()) if had_input && self.settled() => self.panics_in_a_row = 0,
                    Ok(()) => {}
                    Err(panic) => {
                        self.recover(panic).await;
                        continue;
                    }
                }
            }
            if let Some(result) = self.stopped.take() {
                self.stop_everything(result.clone());
                return result;
            }
            if self.drained() {
                self.stop_everything(Ok(()));
                return Ok(());
            }
            let wake = match self.guarded(|driver| driver.next_wake()) {
                Ok(wake) => wake,
                Err(panic) => {
                    self.recover(panic).await;
                    continue;
                }
            };
            // Biased, so that one run of the driver on a paused clock repeats exactly (an
            // unbiased select picks a ready branch at random). Due timers first: a flood of
            // messages must not make slots late, and a tick does bounded work and moves the
            // next wake forward, so messages wait at most one tick.
            input = Some(tokio::select! {
                biased;
                () = sleep_until(wake) => Input::Tick,
                msg = rx.recv() => match msg {
                    Some(msg) => Input::Msg(msg),
                    None => Input::Closed,
                },
            });
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Msg(msg) => self.handle(msg),
            // Every handle is gone: nobody can ask for a shutdown, so start one.
            Input::Closed => self.begin_shutdown(Duration::ZERO),
            Input::Tick => self.tick(),
        }
    }

    /// Nothing is being written and nothing waits to be: the core has caught up with the store.
    fn settled(&self) -> bool {
        self.in_flight.is_none() && !self.core.has_unwritten_changes()
    }

    /// Runs one step of the loop, catching a panic.
    fn guarded<T>(
        &mut self,
        step: impl FnOnce(&mut Driver) -> T,
    ) -> Result<T, Box<dyn std::any::Any + Send>> {
        self.concerning = None;
        // Unwind safety: after a panic nothing of the driver's state is trusted that the
        // panic could have left half changed. `recover` drops the core and every table that
        // follows it, and rebuilds them from the store.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(self)))
    }

    /// After a panic in a step: stops this process's attempts, answers what waits with an
    /// error, and rebuilds the core from the store, as a restart of the process would; or
    /// stops the runtime once [`PANICS_IN_A_ROW_MAX`] panics came in a row.
    async fn recover(&mut self, panic: Box<dyn std::any::Any + Send>) {
        // A busy driver may never be settled between two panics far apart: those are not in a
        // row either.
        let now = Instant::now();
        if self
            .last_panic
            .is_some_and(|last| now.duration_since(last) >= PANIC_STREAK_RESET)
        {
            self.panics_in_a_row = 0;
        }
        self.last_panic = Some(now);
        self.panics_in_a_row += 1;
        metrics::counter!(m::DRIVER_PANICS).increment(1);
        let message = panic_message(panic);
        let run = self.concerning.take();
        // The run's job, if the (suspect) core still answers; a lookup that panics too says
        // nothing.
        let job = run.and_then(|run| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.core.run(run).map(|r| r.job().to_string())
            }))
            .ok()
            .flatten()
        });
        let run_name = run.map(|run| run.to_string());
        let in_a_row = self.panics_in_a_row;
        if in_a_row >= PANICS_IN_A_ROW_MAX {
            tracing::error!(
                run = run_name,
                job,
                panics_in_a_row = in_a_row,
                "the scheduler panicked: {message}; it panicked {in_a_row} times in a row, \
                 stopping"
            );
            self.stopped = Some(Err(RuntimeError::Panicked(message)));
            return;
        }
        tracing::error!(
            run = run_name,
            job,
            panics_in_a_row = in_a_row,
            "the scheduler panicked: {message}; its attempts are stopped and it is rebuilt \
             from the store"
        );
        // As a restart would: this process's attempts stop (their runs are recovered by the
        // restore, under this worker id, so none runs twice and none is left behind), and
        // whatever waited for the old core is answered.
        let stopping = self.abandon(RuntimeError::Interrupted(message.clone()));
        // An aborted task is dropped (a command job's process group killed with it) at its
        // next poll: wait for that, so the restored runs do not start beside what they replace.
        let deadline = Instant::now() + ATTEMPTS_STOP_WAIT;
        for watcher in stopping {
            if tokio::time::timeout_at(deadline, watcher).await.is_err() {
                tracing::warn!(
                    "an attempt did not stop within {ATTEMPTS_STOP_WAIT:?} (a handler blocking \
                     its thread?); the scheduler is rebuilt anyway"
                );
                break;
            }
        }
        let store = Arc::clone(&self.store);
        let snapshot = match tokio::task::spawn_blocking(move || store.restore()).await {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(e)) => return self.unrecoverable(&message, &e.to_string()),
            Err(e) => return self.unrecoverable(&message, &e.to_string()),
        };
        let now = self.clock.now();
        self.generation += 1;
        let config = self.core.config().clone();
        let seed = self.seed.wrapping_add(self.generation);
        let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Scheduler::restore_as(self.worker.clone(), config, seed, now, snapshot)
        }));
        let Ok(core) = rebuilt else {
            return self.unrecoverable(&message, "the restore panicked");
        };
        self.core = core;
        // A write of the old core may still be in flight: its answer is recognised as stale
        // by its batch id, and the store refuses it anyway (an older writer epoch).
        self.in_flight = None;
        self.deliveries_in_flight = 0;
        if self.drain_until.is_some() {
            self.core.begin_shutdown(now);
            self.core.flush_checkpoints(now);
            // The rebuilt core runs none of the old attempts (they were aborted above); the
            // shutdown's steps go on from where they were.
            self.ended = false;
        }
    }

    /// The core cannot be rebuilt: the runtime stops.
    fn unrecoverable(&mut self, panic: &str, why: &str) {
        tracing::error!("the scheduler panicked ({panic}) and cannot be rebuilt: {why}");
        self.stopped = Some(Err(RuntimeError::Panicked(format!(
            "{panic}; rebuilding from the store failed: {why}"
        ))));
    }

    /// Stops this process's attempts and drops every table that follows the core; commands
    /// waiting for a write are answered with `error`. Returns the attempts' watchers, which end
    /// once the attempts are gone.
    fn abandon(&mut self, error: RuntimeError) -> Vec<tokio::task::JoinHandle<()>> {
        self.lease_timers.clear();
        self.renewals_writing.clear();
        let mut stopping = Vec::new();
        for (run, executing) in std::mem::take(&mut self.executing) {
            let _ = executing.cancel.send(Some(StopReason::Shutdown));
            executing.abort.abort();
            stopping.push(executing.watcher);
            tracing::warn!(%run, "attempt stopped: the scheduler is being rebuilt; the run is recovered");
        }
        for (_, waiter) in self.waiting.drain(..) {
            match waiter {
                Waiter::Reply(reply) => reply(Err(error.clone())),
                // Its claimer sees the sender dropped below.
                Waiter::Claim(_) => {}
            }
        }
        self.claims.clear();
        for (_, reply) in self.verifying.drain() {
            reply(Err(error.clone().into()));
        }
        self.checkpoints.clear();
        self.run_spans.clear();
        stopping
    }

    fn next_wake(&self) -> Option<Instant> {
        let core = self.core.poll_timeout().map(|at| self.clock.instant_at(at));
        let renew = self.lease_timers.first().map(|(at, _)| *at);
        let shutdown = match (self.stop_sent, self.ended) {
            (false, _) => self.stop_at,
            (true, false) => self.drain_until,
            (true, true) => self.drain_until.map(|until| until + END_WRITE_GRACE),
        };
        [core, renew, shutdown].into_iter().flatten().min()
    }

    fn tick(&mut self) {
        let now = self.clock.now();
        // Renew first: after a stall (a paused VM, a busy host) the watchdog must not reclaim
        // a lease whose holder is this very process and still working.
        let due_by = Instant::now();
        while let Some(&(at, run)) = self.lease_timers.first() {
            if at > due_by {
                break;
            }
            self.lease_timers.pop_first();
            self.lease_timer(now, run);
        }
        self.core.handle_timeout(now);
        self.shutdown_phase(now);
    }

    /// Moves a shutdown on (SPEC O1): at `stop_at` its own attempts still running are asked to
    /// stop; at the budget's end those left are interrupted for the next start (no attempt
    /// used) and their tasks aborted, and the driver stops once that is written.
    fn shutdown_phase(&mut self, now: Timestamp) {
        let (Some(stop_at), Some(until)) = (self.stop_at, self.drain_until) else {
            return;
        };
        let at = Instant::now();
        if !self.stop_sent && at >= stop_at {
            self.stop_sent = true;
            let asked = self.core.stop_for_shutdown(now);
            if !asked.is_empty() {
                tracing::info!(
                    attempts = asked.len(),
                    "shutdown: asking the attempts still running to stop"
                );
            }
        }
        if !self.ended && at >= until {
            self.ended = true;
            let interrupted = self.core.end_shutdown(now);
            for run in &interrupted {
                if let Some(executing) = self.untrack(*run) {
                    executing.abort.abort();
                }
                tracing::info!(
                    %run,
                    "attempt interrupted by shutdown; it resumes at the next start and uses no attempt"
                );
            }
        }
    }

    /// An attempt's lease timer is due: abort it (its lease was lost and it has not ended),
    /// renew its lease, or find the lease lost.
    fn lease_timer(&mut self, now: Timestamp, run: RunId) {
        let Some(executing) = self.executing.get_mut(&run) else {
            return;
        };
        if executing.abort_at.is_some() {
            if let Some(executing) = self.untrack(run) {
                executing.abort.abort();
                tracing::warn!(
                    %run,
                    token = executing.token.0,
                    "attempt aborted: it had not stopped when its lost lease expired"
                );
            }
            return;
        }
        if let Some(renewal) = executing.holder.poll_renew(now) {
            match self.core.renew_lease(now, run, renewal.token) {
                // Sent: it succeeds when the write that carries it is acknowledged.
                Ok(_) => {
                    let mark = self.core.write_mark();
                    executing.renewing = Some((mark, renewal.sent_at));
                    self.renewals_writing.insert((mark, run));
                }
                Err(e) => {
                    tracing::debug!(%run, error = %e, "lease not renewed");
                    executing.holder.on_renew_failed(renewal.sent_at, now);
                }
            }
        }
        if executing.holder.is_lost(now) {
            self.lose_lease(now, run);
        } else {
            self.schedule_lease_timer(run);
        }
    }

    /// No renewal of this attempt's lease was durable for `ttl - margin` (SPEC L2, M2): ask the
    /// attempt to stop, give the lease back, and abort the attempt when the lease would expire.
    fn lose_lease(&mut self, now: Timestamp, run: RunId) {
        let margin_ms = self.holder_policy().margin_ms;
        let Some(executing) = self.executing.get_mut(&run) else {
            return;
        };
        let lost_at = executing.holder.lost_at();
        // `sent_at + ttl`: the store's expiry of the last durable renewal. The attempt is gone
        // by then, before the watchdog (expiry + grace) could hand the run to anyone else.
        let abort_at = self.clock.instant_at(lost_at.plus_ms(margin_ms));
        executing.abort_at = Some(abort_at);
        if let Some((mark, _)) = executing.renewing.take() {
            self.renewals_writing.remove(&(mark, run));
        }
        let _ = executing.cancel.send(Some(StopReason::LeaseLost));
        let token = executing.token;
        tracing::warn!(
            %run,
            token = token.0,
            %lost_at,
            "lease lost: no renewal was durable in time; the attempt is asked to stop"
        );
        // Given back, the run retries now rather than after expiry and grace, and whatever
        // the attempt still reports under this token is refused. After a reclaim the core
        // answers "already released", which is fine.
        if let Err(e) = self.core.release(now, run, token) {
            tracing::debug!(%run, error = %e, "lost lease not released");
        }
        self.schedule_lease_timer(run);
    }

    /// The lease policy this process's attempts are held under: the core's, except that a
    /// margin of half the TTL or more, which would lose every lease before its first renewal,
    /// is cut to the default share of the TTL (a sixth, as the `keel` config does).
    fn holder_policy(&self) -> keel_core::lease::LeasePolicy {
        let mut policy = self.core.config().lease;
        if policy.margin_ms.saturating_mul(2) >= policy.ttl_ms {
            policy.margin_ms = policy.ttl_ms / 6;
        }
        policy
    }

    /// Sets an attempt's lease timer from its holder (or its abort deadline, once lost).
    fn schedule_lease_timer(&mut self, run: RunId) {
        let Some(executing) = self.executing.get_mut(&run) else {
            return;
        };
        self.lease_timers.remove(&(executing.wake_at, run));
        let at = match (executing.abort_at, executing.holder.poll_timeout()) {
            (Some(abort_at), _) => abort_at,
            (None, Some(at)) => self.clock.instant_at(at),
            // Lost, found at the next timer.
            (None, None) => Instant::now(),
        };
        executing.wake_at = at;
        self.lease_timers.insert((at, run));
    }

    /// Renewals whose writes are now durable have succeeded.
    fn renewals_durable(&mut self, durable: u64) {
        let now = self.clock.now();
        while let Some(&(mark, run)) = self.renewals_writing.first() {
            if mark > durable {
                break;
            }
            self.renewals_writing.pop_first();
            let Some(executing) = self.executing.get_mut(&run) else {
                continue;
            };
            let Some((renewing_mark, sent_at)) = executing.renewing else {
                continue;
            };
            if renewing_mark != mark {
                continue;
            }
            executing.renewing = None;
            executing.holder.on_renewed(sent_at, now);
            self.schedule_lease_timer(run);
        }
    }

    fn handle(&mut self, msg: Msg) {
        let now = self.clock.now();
        self.concerning = match &msg {
            Msg::Finished { run, .. } | Msg::Report { run, .. } => Some(*run),
            _ => None,
        };
        match msg {
            Msg::Command(command) => {
                if let Some(reply) = command(self) {
                    // Everything the command changed is at or before this mark.
                    self.wait_for_durable(Waiter::Reply(reply));
                }
            }
            Msg::Persisted { batch, result } => self.persisted(now, batch, result),
            Msg::Finished {
                run,
                attempt,
                token,
                outcome,
            } => self.finished(now, run, attempt, token, outcome),
            Msg::Report { run, token, report } => self.report(now, run, token, report),
            Msg::Delivered { generation, .. } if generation != self.generation => {
                tracing::debug!("result of a delivery sent before a recovery dropped");
            }
            Msg::Delivered {
                id,
                attempt,
                result,
                ..
            } => {
                self.deliveries_in_flight = self.deliveries_in_flight.saturating_sub(1);
                if let Err(e) = self.core.handle_delivery_result(now, id, attempt, result) {
                    tracing::debug!(%id, error = %e, "delivery result refused");
                }
            }
            Msg::Verified { generation, .. } if generation != self.generation => {
                tracing::debug!("artifact checks asked before a recovery dropped");
            }
            Msg::Verified { id, results, .. } => self.verified(now, id, results),
            Msg::Shutdown { budget } => self.begin_shutdown(budget),
        }
    }

    /// Artifact checks came back: the core decides, and the call waiting for the decision is
    /// answered once the evidence is durable.
    fn verified(&mut self, now: Timestamp, id: VerifyId, results: Vec<CheckResult>) {
        let decision = self.core.handle_verified(now, id, results);
        if let Err(e @ Rejected::ArtifactGate { run, .. }) = &decision {
            let own = self
                .core
                .run(*run)
                .and_then(|r| r.lease())
                .filter(|lease| lease.owner == self.worker)
                .map(|lease| lease.token);
            // This process's handler is done: nobody can fix its artifacts, so the attempt is
            // given back (it is retried), as for a success missing an artifact.
            if let Some(token) = own {
                tracing::warn!(%run, error = %e, "success refused by the artifact gate; the attempt is retried");
                let _ = self.core.release(now, *run, token);
            }
        }
        if let Some(reply) = self.verifying.remove(&id) {
            self.wait_for_durable(Waiter::Reply(Box::new(move |durable| {
                reply(match durable {
                    Ok(()) => decision.map_err(CommandError::from),
                    Err(e) => Err(e.into()),
                });
            })));
        }
    }

    /// An attempt of this process ended. Its outcome is reported under its token; a success
    /// is judged by the L4 table, the lease counting as lost if the holder found it lost, if
    /// the attempt was stopped for its lease (untracked), or if the core refused the token.
    fn finished(
        &mut self,
        now: Timestamp,
        run: RunId,
        attempt: Attempt,
        token: FencingToken,
        outcome: Outcome,
    ) {
        let label = outcome.name();
        // Only this attempt's entry: a later attempt of the run may be executing.
        let mut held = false;
        if self.executing.get(&run).is_some_and(|e| e.token == token) {
            if let Some(executing) = self.untrack(run) {
                held = executing.abort_at.is_none() && !executing.holder.is_lost(now);
                metrics::histogram!(m::ATTEMPT_SECONDS, "outcome" => label)
                    .record(executing.started.elapsed().as_secs_f64());
            }
        }
        metrics::counter!(m::ATTEMPTS_FINISHED, "outcome" => label).increment(1);
        let summary = match &outcome {
            Outcome::Success { summary, .. } => Some(summary.clone().unwrap_or_default()),
            _ => None,
        };
        let result = self.core.handle_outcome(now, run, token, outcome);
        // The handler is done but its success lacks a required artifact: nobody can complete
        // it any more, so give the attempt back (it is retried) rather than wait for its lease
        // to expire.
        if let Err(e @ Rejected::MissingArtifacts { .. }) = &result {
            tracing::warn!(%run, error = %e, "success refused; the attempt is retried");
            let _ = self.core.release(now, run, token);
            return;
        }
        let end = match summary {
            Some(summary) => SectionEnd::Succeeded(summary),
            None => SectionEnd::Failed(()),
        };
        let reported = match &end {
            SectionEnd::Succeeded(summary) => summary.clone(),
            _ => String::new(),
        };
        let lease_lost = !held || result.is_err();
        match guarded_outcome(token, end, lease_lost, result.is_ok()) {
            GuardedOutcome::Ok(_) => {}
            GuardedOutcome::OkLeaseLost(_, warning) => {
                tracing::warn!(%run, token = token.0, "result accepted: {warning}");
            }
            GuardedOutcome::LeaseLost(lost) => {
                let refusal = match &result {
                    Err(e) => e.to_string(),
                    Ok(()) => String::new(),
                };
                tracing::warn!(
                    %run,
                    attempt = attempt.0,
                    token = token.0,
                    error = %lost,
                    %refusal,
                    "result refused: lease lost; the run will execute again"
                );
                // Evidence that the work may have been done (do not retry blindly). A run
                // that is not active any more has nothing to attach it to.
                let worker = self.worker.clone();
                if let Err(e) = self
                    .core
                    .record_refused_result(now, run, attempt, token, &worker, &reported)
                {
                    tracing::debug!(%run, error = %e, "refused result not recorded");
                }
            }
            // A failure (or any outcome but success) refused: the late report changes nothing
            // (SPEC L4).
            GuardedOutcome::Err(()) => {
                if let Err(e) = result {
                    tracing::info!(%run, error = %e, "late outcome refused");
                }
            }
        }
    }

    fn report(&mut self, now: Timestamp, run: RunId, token: FencingToken, report: Report) {
        match report {
            Report::Checkpoint { data, reply } => {
                match self.core.save_checkpoint(now, run, token, data) {
                    // Answered when the store says (SPEC C1: a failed save returns the error).
                    Ok(CheckpointSave::Saving { seq }) => {
                        metrics::counter!(m::CHECKPOINT_SAVES).increment(1);
                        self.checkpoints.insert((run, seq), reply);
                    }
                    Ok(throttled @ CheckpointSave::Throttled { .. }) => {
                        metrics::counter!(m::CHECKPOINT_THROTTLED).increment(1);
                        let _ = reply.send(Ok(throttled));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Report::Progress { phase, message } => {
                if let Err(e) = self.core.progress(now, run, token, &phase, &message) {
                    tracing::debug!(%run, error = %e, "progress refused");
                }
            }
            Report::Heartbeat => {
                if let Err(e) = self.core.heartbeat(now, run, token) {
                    tracing::debug!(%run, error = %e, "heartbeat refused");
                }
            }
        }
    }

    fn persisted(&mut self, now: Timestamp, batch: BatchId, result: Result<(), StoreError>) {
        if self.in_flight != Some(batch) {
            // Written for a core that a recovery replaced since.
            tracing::debug!(%batch, "answer of a write of a replaced scheduler ignored");
            return;
        }
        self.in_flight = None;
        match result {
            Ok(()) => {
                self.core.handle_persisted(now, batch);
            }
            Err(StoreError::Conflict(conflict @ Conflict::Deposed { .. })) => {
                tracing::error!(%conflict, "another keel process took over this store; stopping");
                self.stopped = Some(Err(RuntimeError::Deposed(conflict.to_string())));
            }
            Err(error @ StoreError::Diverged(_)) => {
                // Retrying would write on a database that may lack acknowledged batches.
                tracing::error!(%error, "stopping");
                self.stopped = Some(Err(RuntimeError::Diverged(error.to_string())));
            }
            Err(error) => {
                metrics::counter!(m::PERSIST_FAILURES).increment(1);
                tracing::warn!(%batch, %error, "store write failed; retrying");
                self.core
                    .handle_persist_failed(now, batch, &error.to_string());
            }
        }
    }

    fn drain_effects(&mut self) {
        // The core emits at most one batch until it is acknowledged.
        while let Some(effect) = self.core.poll_effect() {
            self.effect(effect);
        }
        self.wake_durable();
    }

    /// Waits for everything changed so far to be acknowledged.
    pub(crate) fn wait_for_durable(&mut self, waiter: Waiter) {
        let mark = self.core.write_mark();
        debug_assert!(self.waiting.back().is_none_or(|(last, _)| *last <= mark));
        self.waiting.push_back((mark, waiter));
        self.stats.waiters_max = self.stats.waiters_max.max(self.waiting.len() as u64);
    }

    /// Wakes the waiters whose writes are all acknowledged (or that wrote nothing), in any
    /// number of batches: a prefix of the queue, since marks rise with it.
    fn wake_durable(&mut self) {
        let durable = self.core.durable_mark();
        self.renewals_durable(durable);
        self.stats.wake_checks += 1;
        while let Some((mark, _)) = self.waiting.front() {
            self.stats.waiters_checked += 1;
            if *mark > durable {
                break;
            }
            let Some((_, waiter)) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiters_woken += 1;
            match waiter {
                Waiter::Reply(reply) => reply(Ok(())),
                // The batch that carried the grant is acknowledged and gave no `StartAttempt`
                // for it (drained before this): the run was cancelled or moved on while the
                // grant was being written, and the claimer gets nothing. A run still starting
                // was claimed again since, under a later mark that answers that claim.
                Waiter::Claim(run) => {
                    let starting = matches!(
                        self.core.run(run).map(|r| r.state()),
                        Some(RunState::Starting { .. })
                    );
                    if !starting {
                        if let Some(claimer) = self.claims.remove(&run) {
                            let _ = claimer.send(None);
                        }
                    }
                }
            }
        }
    }

    /// The driver's work counters so far.
    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }

    fn effect(&mut self, effect: Effect) {
        self.concerning = effect_run(&effect);
        match effect {
            Effect::Persist(batch) => {
                self.in_flight = Some(batch.id);
                metrics::counter!(m::BATCHES).increment(1);
                let store = Arc::clone(&self.store);
                let tx = self.sender();
                let write = move || {
                    let id = batch.id;
                    // Given away: a store that keeps records in memory moves them in.
                    let result = store.apply_owned(batch);
                    let _ = tx.send(Msg::Persisted { batch: id, result });
                };
                if self.store_inline {
                    // Answered through the channel all the same: the driver sees the
                    // acknowledgement on its next turn, as it would from the pool.
                    write();
                } else {
                    tokio::task::spawn_blocking(write);
                }
            }
            Effect::StartAttempt(start) if start.lease.owner == self.worker => self.start(start),
            Effect::StartAttempt(start) => {
                metrics::counter!(m::LEASE_GRANTS, "holder" => "external").increment(1);
                match self.claims.remove(&start.run) {
                    Some(waiter) => {
                        let _ = waiter.send(Some(start));
                    }
                    // The claimer went away: the lease expires and the run is reclaimed.
                    None => {
                        tracing::info!(run = %start.run, "granted attempt has no claimer waiting")
                    }
                }
            }
            Effect::CancelAttempt { run, reason, .. } => {
                if let Some(executing) = self.executing.get(&run) {
                    let _ = executing.cancel.send(Some(reason));
                }
            }
            Effect::KillAttempt { run, .. } => {
                if let Some(executing) = self.untrack(run) {
                    executing.abort.abort();
                    tracing::warn!(%run, "attempt killed by the watchdog");
                }
            }
            Effect::VerifyArtifacts(request) => {
                let tx = self.sender();
                let generation = self.generation;
                let verifier = self.verifier.clone();
                tokio::spawn(async move {
                    let results = verifier.check_all(&request.checks).await;
                    let _ = tx.send(Msg::Verified {
                        generation,
                        id: request.id,
                        results,
                    });
                });
            }
            Effect::Deliver(request) => {
                let tx = self.sender();
                let generation = self.generation;
                let (id, attempt) = (request.id, request.attempt);
                self.deliveries_in_flight += 1;
                match self.sink(&request.sink) {
                    Some(sink) => {
                        let label = self.sink_label(&request.sink);
                        tokio::spawn(async move {
                            // A panicking sink is a failed attempt, retried like any other,
                            // not a delivery stuck in flight forever.
                            let result = match tokio::spawn(sink.send(request)).await {
                                Ok(result) => result,
                                Err(e) => DeliveryResult::Transient {
                                    error: match e.try_into_panic() {
                                        Ok(payload) => {
                                            format!("sink panicked: {}", panic_message(payload))
                                        }
                                        Err(e) => format!("sink task failed: {e}"),
                                    },
                                    retry_after_ms: None,
                                },
                            };
                            metrics::counter!(m::DELIVERY_ATTEMPTS, "sink" => label, "result" => delivery_label(&result)).increment(1);
                            let _ = tx.send(Msg::Delivered {
                                generation,
                                id,
                                attempt,
                                result,
                            });
                        });
                    }
                    None => {
                        let result = DeliveryResult::Permanent {
                            error: format!(
                                "no sink named {:?} is configured",
                                self.sink_label(&request.sink)
                            ),
                        };
                        let _ = tx.send(Msg::Delivered {
                            generation,
                            id,
                            attempt,
                            result,
                        });
                    }
                }
            }
            Effect::Event(event) => {
                match &event {
                    Event::RunFinished { run, .. } => {
                        self.run_spans.remove(run);
                        // Nobody is left to answer: the attempt is over.
                        drop(self.take_checkpoints(*run, None));
                    }
                    // This process's own attempt lost its lease (a stall longer than the TTL
                    // and grace): it must not run on beside the run's next attempt (SPEC L2).
                    Event::LeaseReclaimed { run, token } | Event::LeaseReleased { run, token } => {
                        self.stop_attempt(*run, *token)
                    }
                    // A save is answered by its own acknowledgement or by a newer save's of
                    // the same run (a flush may write a newer save before the older's batch
                    // is acknowledged, and the store then holds the newer data).
                    Event::CheckpointSaved { run, seq } => {
                        for (saved, reply) in self.take_checkpoints(*run, Some(*seq)) {
                            let _ = reply.send(Ok(CheckpointSave::Saving { seq: saved }));
                        }
                    }
                    Event::CheckpointFailed { run, seq, error } => {
                        for (failed, reply) in self.take_checkpoints(*run, Some(*seq)) {
                            let _ = reply.send(Err(CheckpointError::Failed {
                                seq: failed,
                                error: error.clone(),
                            }));
                        }
                    }
                    _ => {}
                }
                crate::observe::event(&event, self.clock.now(), &|name| self.sink_label(name));
                let _ = self.events.send(event);
            }
        }
    }

    fn start(&mut self, start: AttemptStart) {
        metrics::counter!(m::LEASE_GRANTS, "holder" => "runtime").increment(1);
        let Some(handler) = self.handlers.get(&*start.kind).cloned() else {
            // Refused at add and at start; a job whose kind lost its handler since (an older
            // definition left running) fails permanently instead of panicking.
            let message = format!("no handler is registered for kind {:?}", &*start.kind);
            let _ = self.sender().send(Msg::Finished {
                run: start.run,
                attempt: start.attempt,
                token: start.lease.token,
                outcome: Outcome::Permanent { message },
            });
            return;
        };
        let (cancel, cancel_rx) = watch::channel(None);
        let ctx = AttemptContext {
            run: start.run,
            job: start.job.clone(),
            kind: start.kind.clone(),
            payload: start.payload.clone(),
            attempt: start.attempt,
            idempotency_key: start.idempotency_key,
            token: start.lease.token,
            checkpoint: start.checkpoint.clone(),
            cancel: cancel_rx,
            reports: {
                let tx = self.sender();
                Arc::new(move |run, token, report| {
                    let _ = tx.send(Msg::Report { run, token, report });
                })
            },
        };
        if let (Trigger::Scheduled { slot }, 1) = (start.trigger, start.attempt.0) {
            let late_ms = self.clock.now().ms_since(slot);
            metrics::histogram!(m::FIRING_LATENESS_SECONDS).record(late_ms as f64 / 1_000.0);
        }
        // One span per run, the parent of one span per attempt (which repeats the run and job, so a
        // subscriber that shows only the innermost span still names them).
        let run_span = self
            .run_spans
            .entry(start.run)
            .or_insert_with(|| tracing::info_span!("run", run = %start.run, job = %start.job))
            .clone();
        let span = tracing::info_span!(
            parent: &run_span,
            "attempt",
            run = %start.run,
            job = %start.job,
            attempt = start.attempt.0,
            token = start.lease.token.0
        );
        // tokio catches a panicking handler and reports it through the `JoinError`.
        let task = tokio::spawn(tracing::Instrument::instrument(handler.call(ctx), span));
        let abort = task.abort_handle();
        let tx = self.sender();
        let (run, attempt, token) = (start.run, start.attempt, start.lease.token);
        let watcher = tokio::spawn(async move {
            let outcome = match task.await {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Outcome::Retryable {
                    message: format!("handler panicked: {}", panic_message(e.into_panic())),
                },
                // Killed: the lease is revoked, nothing to report.
                Err(_) => return,
            };
            let _ = tx.send(Msg::Finished {
                run,
                attempt,
                token,
                outcome,
            });
        });
        if let Some(previous) = self.executing.get(&start.run) {
            let token = previous.token;
            self.stop_attempt(start.run, token);
        }
        // The grant is durable (the core releases `StartAttempt` only then): it is the first
        // successful "renewal", sent when the lease was stamped.
        let holder = LeaseHolder::new(
            self.holder_policy(),
            start.lease.token,
            start.lease.renewed_at,
        );
        self.executing.insert(
            start.run,
            Executing {
                token: start.lease.token,
                cancel,
                abort,
                watcher,
                holder,
                renewing: None,
                abort_at: None,
                wake_at: Instant::now(),
                started: Instant::now(),
            },
        );
        self.schedule_lease_timer(start.run);
    }

    /// Forgets an attempt this process was executing, with its renewal.
    fn untrack(&mut self, run: RunId) -> Option<Executing> {
        let executing = self.executing.remove(&run)?;
        self.lease_timers.remove(&(executing.wake_at, run));
        if let Some((mark, _)) = executing.renewing {
            self.renewals_writing.remove(&(mark, run));
        }
        Some(executing)
    }

    /// Removes the checkpoint waiters of `run` (those up to save `through`, or all).
    fn take_checkpoints(
        &mut self,
        run: RunId,
        through: Option<u64>,
    ) -> Vec<(u64, CheckpointReply)> {
        let keys: Vec<(RunId, u64)> = self
            .checkpoints
            .range((run, 0)..=(run, through.unwrap_or(u64::MAX)))
            .map(|(key, _)| *key)
            .collect();
        keys.into_iter()
            .filter_map(|key| self.checkpoints.remove(&key).map(|reply| (key.1, reply)))
            .collect()
    }

    /// Stops an attempt of this process that no longer holds its lease: its task is aborted
    /// (its command, for command jobs, killed with it), and nothing it reports is accepted.
    fn stop_attempt(&mut self, run: RunId, token: FencingToken) {
        if self.executing.get(&run).is_some_and(|e| e.token == token) {
            if let Some(executing) = self.untrack(run) {
                let _ = executing.cancel.send(Some(StopReason::LeaseLost));
                executing.abort.abort();
                tracing::warn!(%run, token = token.0, "attempt stopped: its lease was lost");
            }
        }
    }

    fn begin_shutdown(&mut self, budget: Duration) {
        let now = self.clock.now();
        let until = Instant::now() + budget;
        if let Some(current) = self.drain_until {
            // A second request with a shorter budget (a second signal) moves the end closer.
            if until < current {
                self.drain_until = Some(until);
                self.stop_at = self.stop_at.map(|at| at.min(until));
                self.shutdown_phase(now);
            }
            return;
        }
        let shutdown = self.core.begin_shutdown(now);
        tracing::info!(
            attempts = shutdown.attempts.len(),
            deliveries = shutdown.deliveries.len(),
            ?budget,
            "shutting down"
        );
        self.core.flush_checkpoints(now);
        self.drain_until = Some(until);
        self.stop_at = Some(until - stop_window(budget));
        for (_, waiter) in self.claims.drain() {
            drop(waiter);
        }
        self.shutdown_phase(now);
    }

    /// True when a shutdown has nothing left to wait for; or its budget is spent, what that
    /// interrupted is written (or the write's grace is spent too).
    fn drained(&self) -> bool {
        let Some(until) = self.drain_until else {
            return false;
        };
        let written = self.in_flight.is_none() && !self.core.has_unwritten_changes();
        let idle = self.executing.is_empty() && self.deliveries_in_flight == 0 && written;
        let now = Instant::now();
        idle || (self.ended && (written || now >= until + END_WRITE_GRACE))
    }

    fn stop_everything(&mut self, result: Result<(), RuntimeError>) {
        self.lease_timers.clear();
        self.renewals_writing.clear();
        for (run, executing) in std::mem::take(&mut self.executing) {
            executing.abort.abort();
            tracing::info!(%run, "attempt left running at shutdown; it is recovered at the next start");
        }
        let error = result.err().unwrap_or(RuntimeError::Stopped);
        for (_, reply) in self.verifying.drain() {
            reply(Err(error.clone().into()));
        }
        for (_, waiter) in self.waiting.drain(..) {
            match waiter {
                Waiter::Reply(reply) => reply(Err(error.clone())),
                // Its claimer sees the runtime stop when the driver drops its sender.
                Waiter::Claim(_) => {}
            }
        }
    }
}

/// How long before the end of a shutdown's budget its attempts still running are asked to
/// stop: half the budget, at most [`STOP_WINDOW_MAX`]. Until then they finish undisturbed.
fn stop_window(budget: Duration) -> Duration {
    (budget / 2).min(STOP_WINDOW_MAX)
}

/// The longest a shutdown leaves its attempts undisturbed is its budget less this.
const STOP_WINDOW_MAX: Duration = Duration::from_secs(10);

/// After the budget's end, how long the driver waits for the write recording the attempts it
/// interrupted; past it they are recovered at the next start as lost attempts instead.
const END_WRITE_GRACE: Duration = Duration::from_secs(2);

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The run an effect is about, if any.
fn effect_run(effect: &Effect) -> Option<RunId> {
    match effect {
        Effect::StartAttempt(start) => Some(start.run),
        Effect::CancelAttempt { run, .. } | Effect::KillAttempt { run, .. } => Some(*run),
        Effect::Deliver(request) => request.payload.run(),
        Effect::VerifyArtifacts(request) => Some(request.run),
        Effect::Persist(_) | Effect::Event(_) => None,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-text panic payload".to_string()
    }
}

fn delivery_label(result: &DeliveryResult) -> &'static str {
    match result {
        DeliveryResult::Delivered => "delivered",
        DeliveryResult::Transient { .. } => "transient",
        DeliveryResult::Permanent { .. } => "permanent",
    }
}

//! Test your application's real handlers: the runtime on a simulated clock, crashes and
//! restarts, and a store that fails.
//!
//! [`crate::Sim`] tests a model of a job (a closure that says how long an attempt takes). An
//! [`App`] runs the real thing: your async handlers, registered as in production, under
//! `keel_runtime::Runtime` on tokio's paused clock, so an hour of schedule takes milliseconds
//! and the same seed replays the same trace. [`Faults`] decides, from the seed, when the
//! process crashes (every task dropped where it stood, as `kill -9` would) and how many store
//! writes fail or lose their acknowledgement; after each crash the app starts again on the
//! same store and ensures its jobs, as your `main` would. Your handlers' side effects go
//! wherever your handlers put them (a shared map standing for the system they change), which
//! survives the crashes as that system would.
//!
//! The property keel promises (at-least-once execution, fenced) is then yours to check, for
//! any seed. Here, a billing job that charges once a minute: every slot's charge happens at
//! least once, and an attempt's idempotency key is never charged twice.
//!
//! ```
//! use std::time::Duration;
//! use keel_runtime::{AttemptContext, Failure, JobId, JobSpec, RunState, ScheduleSpec};
//! use keel_testkit::app::{App, Faults, Ledger};
//!
//! for seed in 0..8 {
//!     let ledger = Ledger::default();
//!     let charges = ledger.clone();
//!     let charge = move |ctx: AttemptContext| {
//!         charges.commit(&ctx);
//!         async { Ok::<_, Failure>(()) }
//!     };
//!     let every_minute = ScheduleSpec::every(Duration::from_secs(60));
//!     let report = App::new(seed)
//!         .handler("charge", charge)
//!         .job(JobSpec::new(JobId::new("billing").unwrap(), "charge", every_minute))
//!         .faults(Faults::CRASHY)
//!         .run_for(Duration::from_secs(3600));
//!     for run in report.runs("billing") {
//!         assert_eq!(run.state(), RunState::Succeeded, "seed {seed}");
//!         assert!(ledger.commits(run.id()) >= 1, "seed {seed}: at least once");
//!     }
//!     assert!(ledger.most_per_key() <= 1, "seed {seed}: once per idempotency key");
//!     assert!(report.crashes > 0 && report.runs("billing").len() >= 55);
//! }
//! ```
//!
//! Determinism: everything runs on one thread, on tokio's paused clock, with the store called
//! on the driver's task (`RuntimeBuilder::store_calls_inline`); handlers that spawn threads
//! or wait on real I/O make it only as repeatable as they are.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::rng::SplitMix64;
use keel_core::{
    AuditRecord, Batch, Config, IdempotencyKey, JobSpec, Run, RunId, Store, StoreError, Timestamp,
};
use keel_runtime::{AttemptContext, Clock, Handler, Runtime};

use crate::store::SharedMemStore;

/// Where the simulated clock starts unless told otherwise: 2027-01-15T08:00:00Z.
pub const START: Timestamp = Timestamp(1_800_000_000_000);

/// Faults an [`App`] run injects, drawn from its seed. Start from a preset and change what
/// you need: `Faults { crash_every: Some(Duration::from_secs(60)), ..Faults::CRASHY }`.
/// (Not the simulator's [`crate::Faults`], which models a core without a runtime.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// The mean time between crashes (exponentially distributed), or none.
    pub crash_every: Option<Duration>,
    /// How long the process stays down after a crash, at most (uniformly from zero).
    pub down_for: Duration,
    /// The chance that a store write fails before anything is applied (the runtime retries).
    pub write_fails: f64,
    /// The chance that a store write is applied but reported as failed (its acknowledgement
    /// lost: the runtime retries a write that already landed).
    pub ack_lost: f64,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        crash_every: None,
        down_for: Duration::ZERO,
        write_fails: 0.0,
        ack_lost: 0.0,
    };

    /// A crash every ten minutes on average, down for up to 30 s, and 2% of writes failing
    /// (half of them after landing).
    pub const CRASHY: Faults = Faults {
        crash_every: Some(Duration::from_secs(600)),
        down_for: Duration::from_secs(30),
        write_fails: 0.01,
        ack_lost: 0.01,
    };
}

/// An application under test: its handlers and jobs, a seed, and the faults to inject.
pub struct App {
    seed: u64,
    start: Timestamp,
    config: Config,
    handlers: Vec<(String, Arc<dyn Handler>)>,
    jobs: Vec<JobSpec>,
    faults: Faults,
    settle: Duration,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("seed", &self.seed)
            .field("start", &self.start)
            .field("jobs", &self.jobs.len())
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl App {
    /// An app with no handlers or jobs yet, seeded with `seed`, starting at [`START`], with
    /// `Config::default()` except that the store keeps the most history it can
    /// (`limits::HISTORY_RUNS_MAX` runs per job), so that [`Report::runs`] shows every run of
    /// a long test.
    pub fn new(seed: u64) -> App {
        let mut config = Config::default();
        config.history.runs_max = keel_core::limits::HISTORY_RUNS_MAX;
        App {
            seed,
            start: START,
            config,
            handlers: Vec::new(),
            jobs: Vec::new(),
            faults: Faults::NONE,
            settle: Duration::from_secs(600),
        }
    }

    /// Registers the handler for a job kind, as `RuntimeBuilder::handler` does.
    #[must_use]
    pub fn handler(mut self, kind: &str, handler: impl Handler) -> App {
        self.handlers.push((kind.to_string(), Arc::new(handler)));
        self
    }

    /// A job the app ensures at every start (`RuntimeHandle::ensure_job`).
    #[must_use]
    pub fn job(mut self, spec: JobSpec) -> App {
        self.jobs.push(spec);
        self
    }

    /// The faults to inject (default: none).
    #[must_use]
    pub fn faults(mut self, faults: Faults) -> App {
        self.faults = faults;
        self
    }

    /// The scheduler's configuration (default: see [`App::new`]). The store prunes each job's
    /// history to `history.runs_max` runs, and [`Report::runs`] shows what it kept.
    #[must_use]
    pub fn config(mut self, config: Config) -> App {
        self.config = config;
        self
    }

    /// The simulated clock's start (default: [`START`]).
    #[must_use]
    pub fn starting_at(mut self, start: Timestamp) -> App {
        self.start = start;
        self
    }

    /// How long the app runs without faults after the faulty window, so that what the last
    /// crash interrupted is recovered and finishes (default: 10 minutes). Slots of this time
    /// fire too; then the jobs are paused, and runs under way are given as long again to
    /// finish.
    #[must_use]
    pub fn settle_for(mut self, settle: Duration) -> App {
        self.settle = settle;
        self
    }

    /// Runs the app for `window` of simulated time with the faults, then `settle_for` without
    /// them; then pauses its jobs, waits (up to `settle_for` again) for the runs under way to
    /// finish, and stops it gracefully. Panics if the runtime refuses to start or a job is
    /// refused (a test setup error), with the reason.
    pub fn run_for(self, window: Duration) -> Report {
        let store = FaultyStore::new(self.seed, self.faults);
        let mut rng = SplitMix64::new(self.seed ^ 0x0A99_5EED);
        let end = self.start.plus_ms(ms(window));
        let mut now = self.start;
        let mut report = Report {
            store: store.inner.clone(),
            crashes: 0,
            writes_failed: 0,
            acks_lost: 0,
        };
        let mut incarnation = 0u64;
        loop {
            let crash_at = self
                .faults
                .crash_every
                .map(|mean| now.plus_ms(exponential(&mut rng, ms(mean))))
                .filter(|at| *at < end);
            let stop_at = crash_at.unwrap_or(end);
            let ending = match crash_at {
                Some(_) => Ending::Crash,
                // The faulty window ends with a restart, as a deploy would.
                None => Ending::Restart,
            };
            self.incarnation(&store, incarnation, now, stop_at, ending);
            incarnation += 1;
            match crash_at {
                Some(at) => {
                    report.crashes += 1;
                    let down = rng.below_inclusive(ms(self.faults.down_for));
                    now = at.plus_ms(down.max(1));
                }
                None => break,
            }
        }
        store.heal();
        let settled = end.plus_ms(ms(self.settle));
        self.incarnation(&store, incarnation, end, settled, Ending::Last);
        report.writes_failed = store.failed.load(Ordering::SeqCst);
        report.acks_lost = store.lost.load(Ordering::SeqCst);
        report
    }

    /// One life of the process, from `from` to `until` on the simulated clock: start, ensure
    /// the jobs, run; then end as `ending` says.
    fn incarnation(
        &self,
        store: &FaultyStore,
        incarnation: u64,
        from: Timestamp,
        until: Timestamp,
        ending: Ending,
    ) {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread tokio runtime");
        let left = tokio.block_on(async {
            let mut builder = Runtime::builder(Arc::new(store.clone()))
                .config(self.config.clone())
                .clock(Clock::starting_at(from))
                .seed(self.seed.wrapping_add(incarnation))
                .store_calls_inline();
            for (kind, handler) in &self.handlers {
                let handler = Arc::clone(handler);
                builder = builder.handler(kind, move |ctx| handler.call(ctx));
            }
            let runtime = match builder.start().await {
                Ok(runtime) => runtime,
                Err(e) => panic!("the app did not start at {from}: {e}"),
            };
            let handle = runtime.handle();
            for job in &self.jobs {
                if let Err(e) = handle.ensure_job(job.clone()).await {
                    panic!("job {} was refused at {from}: {e}", job.id);
                }
            }
            tokio::time::sleep(Duration::from_millis(until.ms_since(from))).await;
            if ending == Ending::Crash {
                return Some(runtime);
            }
            // The end: no new slots, and the runs under way finish (within the settle time).
            for job in self.jobs.iter().filter(|_| ending == Ending::Last) {
                let _ = handle.pause_job(job.id.clone()).await;
            }
            for _ in 0..ms(self.settle) / 1_000 {
                match handle.jobs().await {
                    Ok(jobs) if jobs.iter().all(|job| job.active_runs == 0) => break,
                    _ => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            drop(handle);
            if let Err(e) = runtime.shutdown(Duration::from_secs(30)).await {
                panic!("the app did not stop cleanly at {until}: {e}");
            }
            None
        });
        // A crash: the tokio runtime goes first, dropping every task (the driver, handlers
        // mid-await, deliveries) without running another step of any.
        drop(tokio);
        drop(left);
    }
}

/// How one life of the app's process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Every task dropped where it stood, as `kill -9` would.
    Crash,
    /// A graceful shutdown; the app starts again.
    Restart,
    /// The jobs paused, the runs under way awaited (up to the settle time), then a graceful
    /// shutdown.
    Last,
}

/// A stand-in for the system a job changes: it counts commits by idempotency key, and, like
/// that system, it survives the app's crashes. Clone it into a handler.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    commits: Arc<Mutex<BTreeMap<IdempotencyKey, u32>>>,
}

impl Ledger {
    /// Records one commit by the attempt `ctx` belongs to.
    pub fn commit(&self, ctx: &AttemptContext) {
        *self.lock().entry(ctx.idempotency_key).or_default() += 1;
    }

    /// Commits made by a run's attempts, all of them.
    pub fn commits(&self, run: RunId) -> u32 {
        self.lock()
            .iter()
            .filter(|(key, _)| key.run == run)
            .map(|(_, n)| n)
            .sum()
    }

    /// The most commits made under any one idempotency key (0 if none).
    pub fn most_per_key(&self) -> u32 {
        self.lock().values().copied().max().unwrap_or(0)
    }

    /// Every commit, by idempotency key.
    pub fn all(&self) -> BTreeMap<IdempotencyKey, u32> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<IdempotencyKey, u32>> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an [`App`] run left behind, for assertions.
#[derive(Debug)]
pub struct Report {
    store: SharedMemStore,
    /// How many times the process crashed.
    pub crashes: u32,
    /// Store writes that failed before landing.
    pub writes_failed: u64,
    /// Store writes that landed but were reported failed.
    pub acks_lost: u64,
}

impl Report {
    /// The runs of a job, oldest first, as the store holds them: its history is pruned to the
    /// config's `history.runs_max` runs per job (the most it can keep, unless the test set
    /// less).
    pub fn runs(&self, job: &str) -> Vec<Run> {
        let store = self.store.lock();
        let mut runs: Vec<Run> = store
            .runs()
            .filter(|run| run.job().as_str() == job)
            .cloned()
            .collect();
        runs.sort_by_key(|run| run.id());
        runs
    }

    /// A run's audit trail, oldest first.
    pub fn audit_of_run(&self, run: RunId) -> Vec<AuditRecord> {
        self.store.lock().audit_of_run(run).cloned().collect()
    }

    /// The store, for anything else.
    pub fn store(&self) -> &SharedMemStore {
        &self.store
    }
}

/// The shared in-memory store, with writes that fail as [`Faults`] says.
#[derive(Clone, Debug)]
struct FaultyStore {
    inner: SharedMemStore,
    faults: Arc<Mutex<(Faults, SplitMix64)>>,
    failed: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
}

impl FaultyStore {
    fn new(seed: u64, faults: Faults) -> FaultyStore {
        FaultyStore {
            inner: SharedMemStore::new(),
            faults: Arc::new(Mutex::new((faults, SplitMix64::new(seed ^ 0x0005_704E)))),
            failed: Arc::default(),
            lost: Arc::default(),
        }
    }

    fn heal(&self) {
        self.lock().0 = Faults::NONE;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Faults, SplitMix64)> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Draws whether this write fails before landing, after, or not at all.
    fn draw(&self) -> (bool, bool) {
        let mut guard = self.lock();
        let (faults, rng) = &mut *guard;
        let roll = rng.next_u64() as f64 / u64::MAX as f64;
        (
            roll < faults.write_fails,
            roll >= faults.write_fails && roll < faults.write_fails + faults.ack_lost,
        )
    }
}

impl Store for FaultyStore {
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let (fails, lost) = self.draw();
        if fails {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io("injected: the write failed".into()));
        }
        self.inner.apply(batch)?;
        if lost {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io(
                "injected: the acknowledgement was lost".into(),
            ));
        }
        Ok(())
    }

    crate::store_reads_from!(inner);
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// An exponentially distributed delay with mean `mean_ms`, at least 1 ms.
fn exponential(rng: &mut SplitMix64, mean_ms: u64) -> u64 {
    // 1 - u in (0, 1], so the logarithm is finite.
    let u = 1.0 - rng.next_u64() as f64 / (u64::MAX as f64 + 1.0);
    ((-u.ln()) * mean_ms as f64).max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use keel_core::{JobId, RunState, ScheduleSpec};
    use keel_runtime::Failure;

    use super::*;

    type Log = Arc<Mutex<Vec<String>>>;

    /// An app whose handler takes 20 simulated seconds, logging when each attempt starts and
    /// ends, under `faults`.
    fn slow_app(seed: u64, faults: Faults, log: &Log) -> Report {
        let log = Arc::clone(log);
        let handler = move |ctx: AttemptContext| {
            let log = Arc::clone(&log);
            async move {
                let key = ctx.idempotency_key.to_string();
                log.lock().unwrap().push(format!("start {key}"));
                tokio::time::sleep(Duration::from_secs(20)).await;
                log.lock().unwrap().push(format!("end {key}"));
                Ok::<_, Failure>(())
            }
        };
        let every_minute = ScheduleSpec::every(Duration::from_secs(60));
        App::new(seed)
            .handler("slow", handler)
            .job(JobSpec::new(
                JobId::new("slow").unwrap(),
                "slow",
                every_minute,
            ))
            .faults(faults)
            .run_for(Duration::from_secs(3600))
    }

    /// What a report says about each run: its state, attempts and creation time.
    fn trace(report: &Report) -> Vec<(RunState, u32, Timestamp)> {
        let runs = report.runs("slow");
        runs.iter()
            .map(|r| (r.state(), r.attempt().0, r.created_at()))
            .collect()
    }

    #[test]
    fn without_faults_every_slot_runs_once_and_finishes() {
        let log = Log::default();
        let report = slow_app(1, Faults::NONE, &log);
        assert_eq!(report.crashes, 0);
        assert_eq!(report.writes_failed + report.acks_lost, 0);
        let runs = report.runs("slow");
        // 60 slots in the window and 10 while settling (the first at START + 1 min).
        assert_eq!(runs.len(), 70, "{:?}", trace(&report));
        assert!(runs
            .iter()
            .all(|r| r.state() == RunState::Succeeded && r.attempt().0 == 1));
        let log = log.lock().unwrap();
        assert_eq!(log.iter().filter(|l| l.starts_with("end ")).count(), 70);
    }

    #[test]
    fn crashes_cut_handlers_off_mid_await_and_the_runs_are_retried_to_success() {
        let mut cut = 0;
        for seed in 0..4 {
            let log = Log::default();
            let report = slow_app(seed, Faults::CRASHY, &log);
            assert!(report.crashes > 0, "seed {seed}");
            assert!(report.writes_failed + report.acks_lost > 0, "seed {seed}");
            let log = log.lock().unwrap();
            let ended: Vec<&str> = log.iter().filter_map(|l| l.strip_prefix("end ")).collect();
            let started: Vec<&str> = log
                .iter()
                .filter_map(|l| l.strip_prefix("start "))
                .collect();
            // An attempt a crash dropped mid-sleep never ended; its run went on to succeed.
            let dropped: Vec<&&str> = started.iter().filter(|k| !ended.contains(k)).collect();
            cut += dropped.len();
            for run in report.runs("slow") {
                assert_eq!(run.state(), RunState::Succeeded, "seed {seed}: {run:?}");
                let prefix = format!("{}-", run.id());
                assert!(ended.iter().any(|k| k.starts_with(&prefix)), "seed {seed}");
            }
            // Each attempt ran at most once: a key never starts twice.
            let mut starts: BTreeMap<&str, u32> = BTreeMap::new();
            for key in &started {
                *starts.entry(key).or_default() += 1;
            }
            assert!(starts.values().all(|&n| n == 1), "seed {seed}: {starts:?}");
        }
        assert!(
            cut > 0,
            "no crash landed inside a 20 s attempt in four hours"
        );
    }

    #[test]
    fn the_same_seed_replays_the_same_trace() {
        let (a, b) = (Log::default(), Log::default());
        let first = slow_app(9, Faults::CRASHY, &a);
        let second = slow_app(9, Faults::CRASHY, &b);
        assert_eq!(trace(&first), trace(&second));
        assert_eq!(
            (first.crashes, first.writes_failed, first.acks_lost),
            (second.crashes, second.writes_failed, second.acks_lost)
        );
        assert_eq!(*a.lock().unwrap(), *b.lock().unwrap());
        let other = slow_app(10, Faults::CRASHY, &Log::default());
        assert_ne!(trace(&first), trace(&other), "another seed, another trace");
    }
}

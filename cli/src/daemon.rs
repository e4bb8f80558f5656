//! `keel run`: the daemon.
//!
//! 1. Reads and checks the config (a bad one stops here, exit 2).
//! 2. Takes `<data-dir>/daemon.lock`. If another daemon holds it, says so and waits
//!    (standby); it takes over when that daemon stops or dies. Only the lock holder writes,
//!    so two daemons never run the same slot twice (the store's writer epochs would refuse
//!    the loser's writes anyway). With `--store postgres` it then also takes the leadership
//!    lease in the database, standing by while a daemon on another host leads (`lead`).
//! 3. Kills the commands a previous daemon that died left running (`<data-dir>/attempts`, see
//!    `command_job`), before any attempt is recovered, so that none runs beside the attempt
//!    that replaces it.
//! 4. Starts a `keel_runtime::Runtime` with the command-job handler, the config's lease and
//!    delivery timings, a webhook sink for every `notify` URL of the stored and configured
//!    jobs, and the incident sinks of `[watchdog] notify` and `escalate_to` (webhooks or
//!    commands), then adds or updates the config's jobs.
//! 5. Serves `<data-dir>/keel.sock` (0600, line-delimited JSON, see `protocol`), logs every
//!    event as one line on stderr, and serves Prometheus metrics if the config asks.
//! 6. Stops gracefully on SIGINT or SIGTERM within the shutdown budget, removes the socket and
//!    releases the lock. A second signal stops at once (attempts interrupted, no attempt
//!    used); a third exits without waiting for the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use keel_core::{Ensured, Event, Job, JobId, Rejected, Snapshot, Store, Timestamp, WorkerId};
use keel_runtime::prometheus;
use keel_runtime::{CommandError, Runtime, RuntimeHandle, StartError, WebhookSink};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast::error::RecvError;

use crate::cli::StoreKind;
use crate::command_job;
use crate::config::{core_config, Config, SHUTDOWN_BUDGET_DEFAULT};
use crate::direct::wall_clock;
use crate::error::Failure;
use crate::http::auth::HttpSettings;
use crate::jobdef::{Prior, Resolve};
use crate::place::{DaemonLock, Holder, Place};
use crate::protocol::{
    answer_read, to_value, Added, CheckpointAnswer, ClaimedAttempt, ContextView, DaemonStatus,
    JobView, LeaseOp, Request, Response,
};
use crate::show;

/// Runs the daemon until a signal stops it.
pub(crate) fn run(
    place: &Place,
    config: Option<Config>,
    http: Option<std::net::SocketAddr>,
    leader_ttl: Duration,
) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(daemon(place, config, http, leader_ttl));
    // A store write stuck on a dead disk must not keep the process from exiting.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn daemon(
    place: &Place,
    config: Option<Config>,
    http: Option<std::net::SocketAddr>,
    leader_ttl: Duration,
) -> Result<(), Failure> {
    let mut signals = Signals::new()?;
    // Listened to from the start: SIGHUP's default action would end the daemon silently.
    let hangup = signal(SignalKind::hangup())
        .map_err(|e| Failure::runtime(format!("cannot listen for SIGHUP: {e}")))?;
    let budget = config
        .as_ref()
        .map_or(SHUTDOWN_BUDGET_DEFAULT, |c| c.shutdown_budget);
    place.prepare()?;
    // `--http ADDR` overrides `[http] listen`, and keeps the rest of `[http]`.
    let http = HttpSettings::merged(http, config.as_ref().and_then(|c| c.http.clone()));
    // Checked before waiting for the lock or the lead: a standby that could not serve would
    // find out only on taking over, and leave the store with no leader.
    if let Some(settings) = &http {
        check_http(settings)?;
    }
    let Some(lock) = take_lock(place, &mut signals).await? else {
        log("stopped while waiting for the other daemon");
        return Ok(());
    };
    // This host's commands left by a daemon that died, killed before standing by: on a shared
    // store another host may lead meanwhile and run their runs again once their leases lapse.
    // Only this data directory's records are read (this host's attempts, under its lock), so a
    // daemon never kills another host's commands.
    kill_leftover_commands(place).await?;
    let lead = match place.kind {
        StoreKind::Postgres => {
            let api = crate::anyhost::planned(http.as_ref());
            match crate::lead::stand_by(place, leader_ttl, &[command_job::KIND], api, &mut signals)
                .await?
            {
                Some(lead) => Some(lead),
                None => {
                    log("stopped while standing by");
                    return Ok(());
                }
            }
        }
        StoreKind::Fs | StoreKind::Sled => None,
    };
    // A standby may have waited for hours: taking the lead, it applies the config file as it is
    // now (another host may have changed and reloaded it), not as it read it at its start.
    let config = match (&lead, config) {
        (Some(_), Some(read)) => Some(reread(read)),
        (_, config) => config,
    };
    let worker = crate::direct::daemon_worker(place.kind);
    // The lease is kept from now on: restoring a large store and starting may take longer
    // than it lasts.
    let fenced = Arc::new(std::sync::Mutex::new(None));
    let running = Arc::new(std::sync::Mutex::new(None::<RuntimeHandle>));
    // A leader's commands must stop even if it cannot stop them itself (`fence_guard`).
    let guard = match &lead {
        Some(_) => Some(Arc::new(tokio::sync::Mutex::new(Some(
            crate::fence_guard::Guard::start(&place.attempts_dir())?,
        )))),
        None => None,
    };
    let keeper = lead.clone().map(|lead| {
        let running = Arc::clone(&running);
        let attempts_dir = place.attempts_dir();
        let socket_path = place.socket();
        let guard = guard.clone();
        tokio::spawn(crate::lead::keep(
            lead,
            Arc::clone(&fenced),
            guard,
            move || {
                // Under the lock that start-up takes to publish the runtime, so that a runtime
                // never starts unfenced after this.
                let running = running
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(handle) = running.as_ref() else {
                    log("lost the lead while starting: exiting now");
                    let _ = command_job::kill_leftovers(&attempts_dir);
                    std::process::exit(1);
                };
                handle.begin_shutdown(Duration::ZERO);
                // The runtime may wait for an unreachable store (a partition); a leader that lost
                // the lead must not linger, so it exits after a bound whatever the store does.
                tokio::spawn(async move {
                    tokio::time::sleep(crate::lead::FENCED_EXIT_WAIT).await;
                    log("lost the lead and the store does not answer: exiting now");
                    let _ = command_job::kill_leftovers(&attempts_dir);
                    let _ = std::fs::remove_file(&socket_path);
                    std::process::exit(1);
                });
            },
        ))
    });
    // Postgres's client blocks on a runtime of its own, which tokio allows only here.
    let opened = tokio::task::block_in_place(|| place.open_store_with_stall_limit(leader_ttl / 2))?;
    let store = opened.store();
    let snapshot = read(&store).await?;

    let mut builder = Runtime::builder(Arc::clone(&store))
        .config(core_config(config.as_ref()))
        .handler(
            command_job::KIND,
            command_job::handler_keeping_output(place.attempts_dir(), place.output_dir()),
        )
        .worker(WorkerId::new(&worker).expect("a valid worker id"));
    // On a shared store the leader fires on the database's clock, read when it took the lead,
    // so that hosts whose clocks disagree fire the same slots at the same times.
    if let Some(lead) = &lead {
        builder = builder.clock(lead.clock());
    }
    // A job added while the daemon runs may notify a URL no job had at its start.
    builder = builder.sink_factory(|entry| {
        let sink = webhook(entry).ok()??;
        Some(Arc::new(sink) as Arc<dyn keel_runtime::Sink>)
    });
    let webhooks = notify_urls(&snapshot, config.as_ref());
    for url in &webhooks {
        match webhook(url) {
            Ok(Some(sink)) => builder = builder.sink(url, sink),
            Ok(None) => {}
            Err(e) => log(&format!(
                "webhook {}: {e}; its deliveries will fail",
                crate::jobdef::redact_url(url)
            )),
        }
    }
    // The sinks incidents are told to (`[watchdog] notify`, `escalate_to`), webhooks or
    // commands, registered under their entries as the core names them.
    for entry in config.iter().flat_map(|c| c.incidents.entries()) {
        if webhooks.contains(entry) {
            continue;
        }
        match incident_sink(entry) {
            Ok(IncidentSink::Command(sink)) => builder = builder.sink(entry, sink),
            Ok(IncidentSink::Webhook(sink)) => builder = builder.sink(entry, sink),
            Err(e) => log(&format!(
                "incident sink {}: {e}; its deliveries will fail",
                crate::jobdef::redact_url(entry)
            )),
        }
    }
    let runtime = builder.start().await.map_err(|e| match e {
        StartError::NoHandler { job, kind } => Failure::runtime(format!(
            "job {job} has kind {kind:?}, which nothing here runs (keel runs kind \
             {:?}; other kinds must be jobs for external workers); remove it with \
             `keel job rm {job}` (the daemon is not running, so this acts on the store)",
            command_job::KIND
        )),
        StartError::Store(e) => Failure::from(e),
        e => Failure::runtime(e.to_string()),
    })?;
    let handle = runtime.handle();
    *running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle.clone());
    let (stop_printer, printer_stop) = tokio::sync::watch::channel(false);
    let printer = tokio::spawn(print_events(
        handle.clone(),
        Arc::clone(&store),
        printer_stop,
    ));

    let metrics_addr = config.as_ref().and_then(|c| c.metrics);
    let recorder = if http.is_some() || metrics_addr.is_some() {
        match prometheus::install_recorder() {
            Ok(recorder) => {
                tokio::spawn(metrics_upkeep(recorder.clone()));
                Some(recorder)
            }
            Err(e) => {
                stop(runtime, handle, Duration::ZERO).await;
                return Err(Failure::runtime(format!("metrics: {e}")));
            }
        }
    } else {
        None
    };
    let _metrics = match (metrics_addr, &recorder) {
        (Some(addr), Some(recorder)) => {
            match crate::http::serve(addr, crate::http::metrics_only(recorder.clone())).await {
                Ok(server) => {
                    log(&format!(
                        "metrics at http://{}/metrics",
                        server.local_addr()
                    ));
                    Some(server)
                }
                Err(e) => {
                    stop(runtime, handle, Duration::ZERO).await;
                    return Err(Failure::input(format!("[daemon] metrics: {e}")));
                }
            }
        }
        _ => None,
    };

    if let Some(config) = &config {
        if let Err(e) = apply_config(&handle, config, &snapshot).await {
            stop(runtime, handle, Duration::ZERO).await;
            return Err(e);
        }
    }
    tokio::spawn(prune_output(place.output_dir(), Arc::clone(&store)));
    tokio::spawn(reload_on_hangup(
        hangup,
        handle.clone(),
        Arc::clone(&store),
        config.clone(),
    ));

    let socket = match Socket::bind(place) {
        Ok(socket) => socket,
        Err(e) => {
            stop(runtime, handle, Duration::ZERO).await;
            return Err(e);
        }
    };
    let status = DaemonStatus {
        pid: Some(std::process::id()),
        store: place.kind.name().into(),
        worker: worker.clone(),
        leader: lead.as_ref().map(crate::lead::Lead::status),
    };
    let shared = Server {
        handle: handle.clone(),
        store: Arc::clone(&store),
        status,
        lead: lead.clone(),
        output_dir: place.output_dir(),
        changes: tokio::sync::broadcast::channel(1024).0,
    };
    let _http = match &http {
        Some(settings) => {
            let started = match settings.tokens() {
                Ok(tokens) => {
                    let api = crate::http::Api {
                        server: shared.clone(),
                        tokens: Arc::new(tokens),
                        metrics: recorder.clone(),
                    };
                    crate::http::serve(settings.listen, crate::http::app(api)).await
                }
                Err(e) => Err(Failure::input(format!("http: {e}"))),
            };
            match started {
                Ok(server) => {
                    if let Some(lead) = &lead {
                        let api = crate::anyhost::advertised(settings, server.local_addr());
                        crate::lead::advertise(lead, api).await;
                    }
                    log(&format!(
                        "http api and console at http://{}/ ({})",
                        server.local_addr(),
                        if settings.tokens.is_some() {
                            "bearer tokens required"
                        } else {
                            "loopback, open to local users"
                        }
                    ));
                    Some(server)
                }
                Err(e) => {
                    stop(runtime, handle, Duration::ZERO).await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let server = tokio::spawn(serve(socket.listener, shared));
    let jobs = handle.job_count().await.unwrap_or(0);
    // A Postgres store lives in its database; the directory holds only the lock and socket.
    let store = match place.kind {
        StoreKind::Postgres => format!("postgres store, data directory {}", place.dir.display()),
        kind => format!("{} store in {}", kind.name(), place.dir.display()),
    };
    log(&format!(
        "ready: {store}, {jobs} job{}, control socket {} (pid {})",
        if jobs == 1 { "" } else { "s" },
        socket.path.display(),
        std::process::id()
    ));

    // The runtime listens for the same signals; this listener also catches one that came
    // during start-up, and a second one, which stops at once.
    let stopper = handle.clone();
    let socket_path = socket.path.clone();
    let attempts_dir = place.attempts_dir();
    tokio::spawn(async move {
        signals.recv().await;
        log(&format!(
            "stopping: finishing running attempts within {} (a second signal stops at once)",
            show::duration(budget)
        ));
        stopper.begin_shutdown(budget);
        signals.recv().await;
        log(
            "second signal: stopping now; running attempts are interrupted (no attempt used) \
             and resume at the next start (a third signal exits at once)",
        );
        // The same accounting as a budget that ran out, only now (SPEC O1).
        stopper.begin_shutdown(Duration::ZERO);
        signals.recv().await;
        log("third signal: exiting now; unfinished attempts are recovered at the next start");
        // Their commands must not outlive the daemon: the next start would run the recovered
        // attempt beside them.
        let left = command_job::kill_leftovers(&attempts_dir).unwrap_or_default();
        let killed = left
            .iter()
            .filter(|l| matches!(l, command_job::Leftover::Killed { .. }))
            .count();
        if killed > 0 {
            log(&format!("killed {killed} running command(s)"));
        }
        let _ = std::fs::remove_file(&socket_path);
        std::process::exit(130);
    });

    let result = runtime.run_until_signal(budget).await;
    if let Some(keeper) = keeper {
        keeper.abort();
    }
    // The runtime stopped its attempts (and a fenced or deposed daemon kills what is left just
    // below): the guard has nothing to do.
    if let Some(guard) = guard {
        if let Some(guard) = guard.lock().await.take() {
            guard.bye().await;
        }
    }
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let fenced = fenced
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let deposed = matches!(
        result,
        Err(keel_runtime::RuntimeError::Deposed(_) | keel_runtime::RuntimeError::Diverged(_))
    );
    if fenced.is_some() || (deposed && lead.is_some()) {
        // The runtime stopped its attempts; a command that outlived its task must not run
        // beside the attempt the next leader starts once the lease expires.
        let _ = kill_leftover_commands(place).await;
    }
    server.abort();
    drop(socket.guard);
    drop(handle);
    let _ = stop_printer.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), printer).await;
    if let (Some(lead), None, Ok(())) = (&lead, &fenced, &result) {
        crate::lead::resign(lead).await;
    }
    drop(lock);
    if let Some(why) = fenced {
        return Err(Failure::runtime(format!(
            "lost the lead of the postgres store ({why}); this daemon stopped"
        )));
    }
    match result {
        Ok(()) => {
            log("stopped");
            Ok(())
        }
        Err(keel_runtime::RuntimeError::Deposed(why)) => Err(Failure::runtime(format!(
            "another keel process took over the store ({why}); this daemon stopped"
        ))),
        Err(keel_runtime::RuntimeError::Diverged(why)) => {
            Err(Failure::runtime(format!("{why}; this daemon stopped")))
        }
        Err(keel_runtime::RuntimeError::Panicked(why)) => Err(Failure::runtime(format!(
            "the scheduler failed {} times in a row and stopped: {why}; this is a bug in keel \
             (please report it with the log above)",
            keel_runtime::PANICS_IN_A_ROW_MAX
        ))),
        Err(e) => Err(Failure::runtime(format!("the scheduler stopped: {e}"))),
    }
}

/// Drains the recorder's histogram samples now and then, as its exporter would.
async fn metrics_upkeep(recorder: keel_runtime::prometheus::PrometheusHandle) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        recorder.run_upkeep();
    }
}

/// Takes the daemon lock, waiting (standby) while another daemon holds it. `None` if a signal
/// came first.
async fn take_lock(place: &Place, signals: &mut Signals) -> Result<Option<DaemonLock>, Failure> {
    // "daemon STORE": commands run here read the store kind from it (`place::daemon_store`).
    let role = format!("daemon {}", place.kind.name());
    let holder = match DaemonLock::try_take(place, &role)? {
        Ok(lock) => return Ok(Some(lock)),
        Err(holder) => holder,
    };
    match holder {
        Holder::Daemon(pid) => log(&format!(
            "another keel daemon (pid {pid}) is running on {}; waiting to take over",
            place.dir.display()
        )),
        Holder::Command(pid) => log(&format!(
            "a keel command (pid {pid}) is using {}; waiting for it",
            place.dir.display()
        )),
        Holder::Unknown => log(&format!(
            "another keel process holds {}; waiting to take over",
            place.lock_path().display()
        )),
    }
    // A plain thread: a blocking task would keep the async runtime from shutting down.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiting = place.clone();
    std::thread::spawn(move || {
        let _ = tx.send(DaemonLock::take_blocking(&waiting, &role));
    });
    tokio::select! {
        taken = rx => {
            let lock = taken.map_err(|_| Failure::runtime("the lock waiter died"))??;
            log("took over");
            Ok(Some(lock))
        }
        () = signals.recv() => Ok(None),
    }
}

/// Kills the commands that a previous daemon, which died, left running: the runtime is about
/// to recover their attempts and start new ones. Fails if the records cannot be listed, rather
/// than risk running two attempts of a run at once.
async fn kill_leftover_commands(place: &Place) -> Result<(), Failure> {
    let dir = place.attempts_dir();
    let listed = dir.clone();
    let found = tokio::task::spawn_blocking(move || command_job::kill_leftovers(&listed))
        .await
        .map_err(|e| Failure::runtime(format!("the search for leftover commands failed: {e}")))?
        .map_err(|e| {
            Failure::runtime(format!(
                "cannot list {} (the commands a previous daemon may have left running): {e}",
                dir.display()
            ))
        })?;
    for leftover in found.iter().filter(|leftover| leftover.is_notable()) {
        log(&leftover.to_string());
    }
    Ok(())
}

async fn read(store: &Arc<dyn Store>) -> Result<Snapshot, Failure> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.read())
        .await
        .map_err(|e| Failure::runtime(format!("store read failed: {e}")))?
        .map_err(Failure::from)
}

/// The webhook for a `notify` entry (`URL` or `NAME=URL`), or `None` if it is not one.
fn webhook(entry: &str) -> Result<Option<WebhookSink>, keel_runtime::sinks::WebhookError> {
    let (name, url) = crate::jobdef::notify_entry(entry);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Ok(None);
    }
    let sink = WebhookSink::new(url)?;
    Ok(Some(match name {
        Some(name) => sink.named(name),
        None => sink,
    }))
}

/// An incident sink, of one of the two kinds an entry names.
enum IncidentSink {
    Command(keel_runtime::CommandSink),
    Webhook(WebhookSink),
}

/// The sink of a `[watchdog] notify` or `escalate_to` entry: a webhook, or a command run
/// without a shell (`command:PROGRAM ARG…`, named by `NAME=`).
fn incident_sink(entry: &str) -> Result<IncidentSink, String> {
    if let Some(argv) = crate::jobdef::command_entry(entry) {
        let sink = keel_runtime::CommandSink::new(argv).map_err(|e| e.to_string())?;
        let sink = match crate::jobdef::notify_entry(entry) {
            (Some(name), _) => sink.named(name),
            (None, _) => sink,
        };
        return Ok(IncidentSink::Command(sink));
    }
    match webhook(entry) {
        Ok(Some(sink)) => Ok(IncidentSink::Webhook(sink)),
        Ok(None) => Err("neither a webhook URL nor command:PROGRAM".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Every distinct `notify` URL of the stored jobs and the config's.
fn notify_urls(snapshot: &Snapshot, config: Option<&Config>) -> BTreeSet<String> {
    let stored = snapshot
        .jobs
        .iter()
        .flat_map(|job| job.spec.sinks.iter().map(|s| s.to_string()));
    let configured = config.into_iter().flat_map(|c| {
        c.jobs
            .iter()
            .flat_map(|(def, _)| def.notify.iter().cloned())
    });
    stored.chain(configured).collect()
}

/// Removes the kept output of runs the history policy pruned: at start, then every 10 minutes.
async fn prune_output(dir: std::path::PathBuf, store: Arc<dyn Store>) {
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        every.tick().await;
        let (dir, store) = (dir.clone(), Arc::clone(&store));
        let _ =
            tokio::task::spawn_blocking(move || command_job::output::prune(&dir, &*store)).await;
    }
}

/// The HTTP settings a daemon will serve with, checked now: the tokens file loads (a
/// non-loopback listener needs one), and the address can be bound. The address is bound once
/// and let go, so another process may still take it before the daemon serves; that is then
/// reported when it tries.
fn check_http(settings: &HttpSettings) -> Result<(), Failure> {
    settings
        .tokens()
        .map_err(|e| Failure::input(format!("http: {e}")))?;
    if settings.listen.port() != 0 {
        std::net::TcpListener::bind(settings.listen).map_err(|e| {
            Failure::runtime(format!("http: cannot listen on {}: {e}", settings.listen))
        })?;
    }
    Ok(())
}

/// The config file `read` came from, read again; `read` itself if it no longer loads (said in
/// the log: a file broken since the start does not keep a standby from leading).
fn reread(read: Config) -> Config {
    match crate::config::load(&read.path) {
        Ok(now) => {
            if now.daemon_settings() != read.daemon_settings() {
                log(
                    "settings changed in the file since this daemon started: the scheduler's \
                     (leases, delivery, watchdog) apply now; where it runs (store, [http], \
                     metrics, shutdown_budget, leader_ttl) at its next start",
                );
            }
            log(&format!(
                "read {} again on taking the lead",
                read.path.display()
            ));
            now
        }
        Err(e) => {
            log(&format!(
                "warning: {} no longer loads ({}); taking the lead with the config read at the \
                 start",
                read.path.display(),
                e.message()
            ));
            read
        }
    }
}

/// SIGHUP reloads the config file (SPEC O2): its jobs are applied as at a start (added,
/// updated, removed, each logged). A file that does not load leaves everything as it was, with
/// the reason logged. `[daemon]` settings take effect at the next start.
async fn reload_on_hangup(
    mut hangup: Signal,
    handle: RuntimeHandle,
    store: Arc<dyn Store>,
    mut running: Option<Config>,
) {
    while hangup.recv().await.is_some() {
        let Some(path) = running.as_ref().map(|c| c.path.clone()) else {
            log("SIGHUP: there is no config file to reload (the daemon was started without --config)");
            continue;
        };
        log(&format!("SIGHUP: reloading {}", path.display()));
        let config = match crate::config::load(&path) {
            Ok(config) => config,
            Err(e) => {
                log(&format!(
                    "reload failed; the jobs stay as they were: {}",
                    e.message()
                ));
                continue;
            }
        };
        let snapshot = match read(&store).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                log(&format!("reload failed: {}", e.message()));
                continue;
            }
        };
        match apply_config(&handle, &config, &snapshot).await {
            Ok(()) => log(&format!("reloaded {}", path.display())),
            Err(e) => log(&format!("reload stopped at an error: {}", e.message())),
        }
        if running
            .as_ref()
            .is_some_and(|old| old.daemon_settings() != config.daemon_settings())
        {
            log("[daemon] settings changed in the file; they take effect at the next start");
        }
        running = Some(config);
    }
}

/// The origin a config file's jobs carry (`JobSpec::origin`).
fn config_origin(config: &Config) -> String {
    format!("config:{}", config.path_for_origin().display())
}

/// Config jobs a reload ensures at once (`apply_config`).
const ENSURES_IN_FLIGHT: usize = 256;

/// Makes the stored jobs what the config says (SPEC O2): adds the config's jobs that are not
/// stored, updates those whose definition changed, leaves the rest, and removes the jobs this
/// file defined before and defines no more. A job added from the CLI is never the file's to
/// remove. Each change is one log line.
async fn apply_config(
    handle: &RuntimeHandle,
    config: &Config,
    snapshot: &Snapshot,
) -> Result<(), Failure> {
    let now = wall_clock();
    let base_dir = config.base_dir();
    let origin = config_origin(config);
    // Taken in pages (`RuntimeHandle::jobs`), so not at one instant; it never was atomic with
    // the ensures below either. The jobs this config owns (its origin) change only here, so
    // what is removed below is exact; a job the API changes meanwhile may be seen before or
    // after its change, as before.
    let stored: BTreeMap<JobId, Job> = handle
        .jobs()
        .await?
        .into_iter()
        .map(|job| (job.spec.id.clone(), job))
        .collect();
    // One lookup per job, not a walk of every tombstone for each.
    let tombstones: BTreeMap<&JobId, Timestamp> = snapshot
        .tombstones
        .iter()
        .map(|t| (&t.job, t.last_fired))
        .collect();
    let mut specs = Vec::with_capacity(config.jobs.len());
    for (def, line) in &config.jobs {
        let id = JobId::new(&def.name).map_err(|e| Failure::input(e.to_string()))?;
        let prior = match stored.get(&id).map(|job| &job.spec.schedule) {
            Some(keel_core::ScheduleSpec::Once { at }) => Prior::OneShot(*at),
            Some(_) => Prior::None,
            None => tombstones
                .get(&id)
                .map_or(Prior::None, |last| Prior::Deleted(*last)),
        };
        let spec = def
            .to_spec(Resolve {
                now,
                base_dir: &base_dir,
                prior,
            })
            .map_err(|e| config_error(config, *line, &def.name, &e))?
            .with_origin(origin.as_str());
        specs.push((id, def.name.as_str(), *line, spec));
    }
    // Ensured in the file's order, up to ENSURES_IN_FLIGHT at once: each waits for its write,
    // and the store writes those in flight together, so a config of 100 000 jobs applies in
    // seconds rather than one durable write after the other (40 s). Answers come in the
    // file's order too; after a refused job, the reload stops, and jobs after it that were
    // already in flight may have been applied.
    let mut specs = specs.into_iter();
    let mut ensured = FuturesOrdered::new();
    loop {
        while ensured.len() < ENSURES_IN_FLIGHT {
            let Some((id, name, line, spec)) = specs.next() else {
                break;
            };
            let handle = handle.clone();
            ensured.push_back(async move { (id, name, line, handle.ensure_job(spec).await) });
        }
        let Some((id, name, line, result)) = ensured.next().await else {
            break;
        };
        match result {
            Ok(Ensured::Unchanged) => {
                let state = stored.get(&id).map(show::job_state).unwrap_or_default();
                log(&format!("job {name}: unchanged ({state})"));
            }
            Ok(Ensured::Done { last }) => log(&format!(
                "job {name}: already done (its one-shot slot {last} fired before); not re-armed"
            )),
            Ok(what) => {
                let next = handle
                    .job(&id)
                    .await?
                    .map_or_else(String::new, |job| format!(" ({})", show::job_state(&job)));
                log(&format!("job {name}: {what}{next}"));
            }
            Err(e) => {
                let failure = Failure::from(e);
                return Err(config_error(config, line, name, failure.message()));
            }
        }
    }
    let defined: BTreeSet<&str> = config
        .jobs
        .iter()
        .map(|(def, _)| def.name.as_str())
        .collect();
    let dropped = stored.values().filter(|job| {
        job.spec.origin.as_deref() == Some(origin.as_str())
            && !defined.contains(job.spec.id.as_str())
    });
    for job in dropped {
        let name = &job.spec.id;
        match handle.remove_job(name.clone()).await {
            Ok(()) => log(&format!(
                "job {name}: removed (no longer in {})",
                config.path.display()
            )),
            Err(e) => log(&format!(
                "job {name}: no longer in {}, but not removed: {}",
                config.path.display(),
                Failure::from(e).message()
            )),
        }
    }
    Ok(())
}

fn config_error(config: &Config, line: usize, name: &str, error: &str) -> Failure {
    Failure::input(format!(
        "config {} line {line}: job {name:?}: {error}",
        config.path.display()
    ))
}

/// Shuts the runtime down after a start-up failure.
async fn stop(runtime: Runtime, handle: RuntimeHandle, budget: Duration) {
    drop(handle);
    let _ = runtime.shutdown(budget).await;
}

// ----- the control socket --------------------------------------------------------------------

struct Socket {
    listener: UnixListener,
    path: std::path::PathBuf,
    guard: SocketGuard,
}

/// Removes the socket file when the daemon stops.
struct SocketGuard(std::path::PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Socket {
    fn bind(place: &Place) -> Result<Socket, Failure> {
        let path = place.socket();
        // The socket is created with the umask's mode and restricted just after; in a data
        // directory only its owner can enter, nobody else can connect in between.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let private = |dir: &std::path::Path| {
                std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
            };
            if !private(&place.dir) {
                // Not ours to change (another owner): refuse rather than expose the socket.
                std::fs::set_permissions(&place.dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| {
                        Failure::runtime(format!(
                            "{} is open to other users and cannot be made private ({e}); the \
                             control socket would be reachable by them: use a data directory \
                             only you can enter (chmod 700)",
                            place.dir.display()
                        ))
                    })?;
            }
        }
        // Left by a daemon that died: this process holds the lock, so no daemon uses it.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Failure::runtime(format!("cannot listen on {}: {e}", path.display())))?;
        let guard = SocketGuard(path.clone());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| Failure::runtime(format!("cannot restrict {}: {e}", path.display())),
            )?;
        }
        Ok(Socket {
            listener,
            path,
            guard,
        })
    }
}

/// What the control socket and the HTTP API answer from: the runtime, its store, and who
/// this daemon is.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) handle: RuntimeHandle,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) status: DaemonStatus,
    /// On a shared store, this daemon's lead: `status` reads the lease as it stands.
    pub(crate) lead: Option<crate::lead::Lead>,
    /// Where command jobs' output is kept (`keel logs`, `GET /api/v1/runs/{id}/logs`).
    pub(crate) output_dir: std::path::PathBuf,
    /// Changes made by commands that the core announces no event for (a job added, paused,
    /// …), for the API's event stream: `{"event", "job" or "run", "line"}`.
    pub(crate) changes: tokio::sync::broadcast::Sender<Value>,
}

impl Server {
    /// Logs a change made by a command, and announces it on the event stream.
    fn changed(&self, event: &str, subject: (&str, String), line: String) {
        log(&line);
        let _ = self.changes.send(serde_json::json!({
            "event": event,
            subject.0: subject.1,
            "line": line,
        }));
    }
}

async fn serve(listener: UnixListener, server: Server) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, server.clone()));
            }
            Err(e) => {
                log(&format!("control socket: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The longest request line the control socket reads: room for a checkpoint at its limit
/// (1 MiB), JSON-escaped. A longer line is refused and the connection closed, rather than
/// buffered without bound.
const REQUEST_MAX_BYTES: u64 = 4 * 1024 * 1024;

async fn connection(stream: UnixStream, server: Server) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(REQUEST_MAX_BYTES + 1)
            .read_until(b'\n', &mut line)
            .await;
        let too_long = line.len() as u64 > REQUEST_MAX_BYTES;
        let response = match read {
            Ok(0) | Err(_) => return,
            Ok(_) if too_long => Response::Err(Failure::input(format!(
                "request longer than {REQUEST_MAX_BYTES} bytes; the connection is closed"
            ))),
            Ok(_) => match serde_json::from_slice::<Request>(&line) {
                Ok(request) => Response::from_result(dispatch(&server, request, "a command").await),
                Err(e) => Response::Err(Failure::input(format!("malformed request: {e}"))),
            },
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|e| {
            format!(r#"{{"err":{{"code":"failure","message":"cannot encode the answer: {e}"}}}}"#)
        });
        text.push('\n');
        if writer.write_all(text.as_bytes()).await.is_err() || too_long {
            return;
        }
    }
}

/// How long a read waits for earlier changes to be durable before it answers from what is.
const READ_SYNC_WAIT: Duration = Duration::from_secs(2);

/// A command's refusal by the core, apart from the runtime's own failures.
fn command(result: Result<(), CommandError>) -> Result<Result<(), Rejected>, Failure> {
    match result {
        Ok(()) => Ok(Ok(())),
        Err(CommandError::Rejected(rejected)) => Ok(Err(rejected)),
        Err(e) => Err(e.into()),
    }
}

/// Answers one request, from the control socket or the HTTP API.
///
/// `actor` says who asked, in the log line of a change (SPEC O5): `a command` for the socket,
/// `token NAME over HTTP` for the API.
pub(crate) async fn dispatch(
    server: &Server,
    request: Request,
    actor: &str,
) -> Result<Value, Failure> {
    let handle = &server.handle;
    match request {
        Request::Status => match &server.lead {
            Some(lead) => to_value(DaemonStatus {
                leader: Some(crate::lead::fresh_status(lead).await),
                ..server.status.clone()
            }),
            None => to_value(&server.status),
        },
        // From memory: the jobs as the scheduler runs them, answered even while the store fails.
        Request::Jobs => to_value(
            handle
                .jobs()
                .await?
                .into_iter()
                .map(JobView::new)
                .collect::<Vec<_>>(),
        ),
        Request::Queue => {
            let (kinds, at) = handle
                .peek(|s, now| (crate::http::queue::health(s, now), now))
                .await?;
            to_value(crate::http::queue::view(kinds, at))
        }
        Request::Workers => to_value(handle.peek(|s, _| s.worker_health()).await?),
        Request::Rules => to_value(
            handle
                .peek(|s, _| keel_core::watchdog::rules(s.config()))
                .await?,
        ),
        read if read.is_read() => {
            // Everything changed before this read is on disk before it reads, unless the store
            // is failing: then the read shows what is durable rather than wait (SPEC O5).
            if let Ok(synced) = tokio::time::timeout(READ_SYNC_WAIT, handle.sync()).await {
                synced?;
            }
            let store = Arc::clone(&server.store);
            tokio::task::spawn_blocking(move || answer_read(&*store, &read))
                .await
                .map_err(|e| Failure::runtime(format!("read failed: {e}")))?
        }
        Request::AddJob { spec, replace } => {
            let id = spec.id.clone();
            let replaced = match handle.add_job(spec.clone()).await {
                Ok(()) => false,
                Err(CommandError::Rejected(Rejected::JobExists(_))) if replace => {
                    handle.update_job(spec).await?;
                    true
                }
                Err(e) => return Err(e.into()),
            };
            let job = handle.job(&id).await?;
            let what = if replaced { "replaced" } else { "added" };
            let state = job.as_ref().map(show::job_state).unwrap_or_default();
            let line = format!("job {id}: {what} by {actor} ({state})");
            server.changed("job_changed", ("job", id.to_string()), line);
            to_value(Added { replaced, job })
        }
        // Each change an operator makes through the socket is a line in the log, when it
        // happens (SPEC O5); `keel job history` keeps it.
        Request::RemoveJob { job } => {
            handle.remove_job(job.clone()).await?;
            let line = format!("job {job}: removed by {actor}");
            server.changed("job_changed", ("job", job.to_string()), line);
            to_value(())
        }
        Request::PauseJob { job } => {
            let changed = crate::protocol::changed(command(handle.pause_job(job.clone()).await)?)?;
            if changed {
                let line = format!("job {job}: paused by {actor}");
                server.changed("job_changed", ("job", job.to_string()), line);
            }
            to_value(changed)
        }
        Request::ResumeJob { job } => {
            let changed = crate::protocol::changed(command(handle.resume_job(job.clone()).await)?)?;
            if changed {
                let line = format!("job {job}: resumed by {actor}");
                server.changed("job_changed", ("job", job.to_string()), line);
            }
            to_value(changed)
        }
        Request::TriggerJob { job } => {
            let run = handle.trigger(job.clone()).await?;
            let line = format!("job {job}: {run} triggered by {actor}");
            server.changed("job_changed", ("job", job.to_string()), line);
            to_value(run)
        }
        Request::CancelRun { run } => {
            handle.cancel_run(run).await?;
            let line = format!("{run}: cancel requested by {actor}");
            server.changed("run_changed", ("run", run.to_string()), line);
            to_value(())
        }
        Request::Claim { worker, kinds } => {
            let claimed = handle.claim(worker, kinds).await?;
            to_value(claimed.map(ClaimedAttempt::from))
        }
        Request::Touch { run, token } => to_value(handle.heartbeat(run, token).await?),
        Request::Progress {
            run,
            token,
            phase,
            message,
        } => to_value(handle.progress(run, token, phase, message).await?),
        Request::Context { run, token } => {
            to_value(ContextView::from(handle.context(run, token).await?))
        }
        Request::Checkpoint { run, token, data } => to_value(CheckpointAnswer::from(
            handle.save_checkpoint(run, token, data).await?,
        )),
        Request::Complete {
            run,
            token,
            outcome,
        } => to_value(handle.complete(run, token, outcome).await?),
        Request::Verify { run, token, target } => {
            to_value(handle.verify(run, token, target).await?)
        }
        Request::Lease {
            run,
            action,
            by,
            reason,
        } => {
            let why = reason.clone();
            let done = match action {
                LeaseOp::Release => handle.release_lease(run, by, reason).await?,
                LeaseOp::Reclaim => handle.reclaim_lease(run, by, reason).await?,
                LeaseOp::Restore => handle.restore_lease(run, by, reason).await?,
            };
            let view = crate::views::lease_action(run, &done);
            let what = view["action"].as_str().unwrap_or("changed");
            let line = format!("{run}: lease {what} by {actor}: {why}");
            server.changed("run_changed", ("run", run.to_string()), line);
            Ok(view)
        }
        Request::OpenIncident {
            job,
            run,
            worker,
            details,
            by,
        } => {
            let new = keel_core::NewIncident {
                job,
                run,
                worker,
                details,
                by,
            };
            // The event's line logs it, with who (SPEC O5), as for acknowledge and resolve.
            to_value(
                handle
                    .call(move |s, now| s.open_incident(now, new))
                    .await??,
            )
        }
        Request::AcknowledgeIncident { incident, by, note } => to_value(
            handle
                .call(move |s, now| s.acknowledge_incident(now, incident, &by, &note))
                .await??,
        ),
        Request::ResolveIncident {
            incident,
            by,
            reason,
        } => to_value(
            handle
                .call(move |s, now| s.resolve_incident(now, incident, &by, &reason))
                .await??,
        ),
        // Every read was matched above.
        other => Err(Failure::runtime(format!("unexpected request {other:?}"))),
    }
}

// ----- events and signals --------------------------------------------------------------------

/// Prints every event as one line on stderr, until `stop` says the runtime has stopped (then
/// it prints what is left and returns). A start names the job and attempt; a finished run's
/// line carries its summary or error, read from the store once it is durable; a retry's line
/// carries the error that caused it.
async fn print_events(
    handle: RuntimeHandle,
    store: Arc<dyn Store>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut events = handle.subscribe();
    // Between a failed write and the next success (SPEC O5: an outage's start and end).
    let mut outage = false;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.changed() => {
                // The driver is gone: what is left is printed without looking anything up.
                while let Ok(event) = events.try_recv() {
                    log(&show::event_line(&event));
                }
                return;
            }
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                log(&format!("({missed} events not shown: the log fell behind)"));
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match &event {
            Event::PersistFailed { .. } if !outage => {
                outage = true;
                log(
                    "store outage: writes are failing; keel keeps running and retries them, \
                     commands that change something wait for the store, and reads show what \
                     is durable",
                );
            }
            Event::StoreRecovered { .. } => outage = false,
            _ => {}
        }
        log(&describe(&handle, &store, &event).await);
    }
}

/// An event's line, with what the runtime and the store know about its run.
async fn describe(handle: &RuntimeHandle, store: &Arc<dyn Store>, event: &Event) -> String {
    let mut line = show::event_line(event);
    let detail = match event {
        Event::LeaseGranted { run, owner, token } => {
            // A fast attempt may have finished (and left the scheduler's memory) already; its
            // record is durable, since a grant is announced only then.
            let id = *run;
            let stored = Arc::clone(store);
            let run = match handle.run(id).await {
                Ok(Some(run)) => Some(run),
                _ => tokio::task::spawn_blocking(move || stored.run(id))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten(),
            };
            if let Some(run) = run {
                let what = if crate::direct::is_daemon_worker(owner.as_str()) {
                    "started".to_string()
                } else {
                    format!("claimed by worker {owner}")
                };
                line = format!(
                    "{} of job {}: attempt {} {what} ({token})",
                    run.id(),
                    run.job(),
                    run.attempt()
                );
            }
            None
        }
        // An operator's reclaim is announced as the watchdog's is; its error says which.
        Event::LeaseReclaimed { run, token } => {
            if let Some(by) = handle.run(*run).await.ok().flatten().and_then(|r| {
                let message = &r.last_error()?.message;
                let by = message.split(" reclaimed by ").nth(1)?;
                Some(by.split(" before its expiry").next()?.to_string())
            }) {
                line = format!(
                    "{run}: lease {token} reclaimed by {by} before it expired; the attempt \
                     counts as lost"
                );
            }
            None
        }
        // From memory, where a finished run stays until its record is durable: the line is
        // written when the run ends, even while the store fails (SPEC O5).
        Event::RunFinished { run, .. } => handle
            .run(*run)
            .await
            .ok()
            .flatten()
            .and_then(|run| show::run_note(&run)),
        Event::RetryScheduled { run, at } => match handle.run(*run).await.ok().flatten() {
            Some(run)
                if run.last_error().is_some_and(|e| {
                    e.kind == keel_core::ErrorKind::Interrupted
                        && e.message.contains("by a shutdown")
                }) =>
            {
                line = format!(
                    "{} of job {}: attempt {} interrupted by shutdown; it resumes at the next \
                     start and uses no attempt",
                    run.id(),
                    run.job(),
                    run.attempt()
                );
                None
            }
            Some(run) => {
                line = format!(
                    "{} of job {} failed; retrying at {}",
                    run.id(),
                    run.job(),
                    show::time(*at)
                );
                run.last_error()
                    .map(|e| crate::table::terminal_safe(&e.message))
            }
            None => None,
        },
        _ => None,
    };
    if let Some(detail) = detail.filter(|d| !d.is_empty()) {
        line.push_str(": ");
        line.push_str(&crate::table::clip(&detail, 200));
    }
    line
}

/// SIGINT and SIGTERM, listened to from the start so that none is missed.
pub(crate) struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> Result<Signals, Failure> {
        let listen = |kind| {
            signal(kind).map_err(|e| Failure::runtime(format!("cannot listen for signals: {e}")))
        };
        Ok(Signals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
        })
    }

    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// One line on stderr, stamped with the time.
pub(crate) fn log(line: &str) {
    eprintln!("{} keel: {line}", wall_clock());
}

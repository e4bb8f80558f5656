//! `keel doctor`: checks what can be checked without changing anything, and says what to do
//! about each finding. Exit 1 if any finding is a problem.
//!
//! | check | problem when |
//! |---|---|
//! | daemon | a process holds the daemon lock but does not answer on the control socket (on Postgres, such a daemon stands by: fine) |
//! | store | the store does not open, or it may have lost acknowledged writes: damaged frames, a missing or emptied log, a damaged fallback generation (fs: `FsStore::verify`, which checks every generation kept) |
//! | leases | a running attempt's lease expired and nobody reclaimed it |
//! | jobs | a job's kind has no handler (the daemon would refuse to start), a command job's payload does not read, a stored definition no longer validates |
//! | config | `--config` does not parse or check |
//!
//! Warnings (exit 0): a stale socket, torn log tails and rebuilt snapshots (nothing
//! acknowledged was lost), open incidents, a lease expired within the watchdog's grace.
//!
//! `--repair` (fs store only) first rewrites a damaged store from what is readable
//! (`FsStore::repair`), under the daemon lock, so never while a daemon runs; what was lost is
//! printed (as `repair` findings) and recorded as a `store_repaired` incident. The checks
//! then run on the repaired store.

use keel_core::{Job, JobState, LeasePolicy, Run, RunState};
use keel_store_fs::FsStore;
use serde::Serialize;

use crate::cli::{DoctorArgs, StoreKind};
use crate::client::Client;
use crate::command_job::{self, CommandSpec};
use crate::direct::wall_clock;
use crate::error::Failure;
use crate::place::{lock_holder, DaemonLock, Holder, Place};
use crate::protocol::{from_value, DaemonStatus, Request};
use crate::show;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Level {
    Ok,
    Warning,
    Problem,
}

#[derive(Debug, Serialize)]
struct Finding {
    level: Level,
    check: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Debug, Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn add(&mut self, level: Level, check: &'static str, message: String, fix: Option<&str>) {
        self.0.push(Finding {
            level,
            check,
            message,
            fix: fix.map(str::to_string),
        });
    }

    fn count(&self, level: Level) -> usize {
        self.0.iter().filter(|f| f.level == level).count()
    }
}

/// Runs every check and prints the findings.
pub(crate) fn run(place: &Place, json: bool, args: &DoctorArgs) -> Result<(), Failure> {
    let config = args.config.as_deref();
    let mut findings = Findings::default();
    if args.repair {
        repair_store(place, &mut findings)?;
    }
    if args.accept_database {
        accept_database(place, &mut findings)?;
    }
    // The watchdog's grace: the config's when it is given and valid, keel's default otherwise.
    let mut lease = LeasePolicy::default();
    if let Some(path) = config {
        match crate::config::load(path) {
            Ok(config) => {
                lease = config.lease;
                findings.add(
                    Level::Ok,
                    "config",
                    format!("{}: {} job(s), valid", path.display(), config.jobs.len()),
                    None,
                );
            }
            Err(e) => findings.add(
                Level::Problem,
                "config",
                e.message().to_string(),
                Some("fix the lines named; `keel run` refuses a config with problems"),
            ),
        }
    }
    // On Postgres the store is the database: a host with no daemon has no data directory, and
    // needs none.
    if place.dir.is_dir() || place.kind == StoreKind::Postgres {
        check_store(place, lease, &mut findings);
    } else {
        findings.add(
            Level::Problem,
            "store",
            format!("no data directory at {}", place.dir.display()),
            Some("`keel run` or `keel job add` creates it; or pass --data-dir / KEEL_DATA_DIR"),
        );
    }
    print(place, json, &findings)?;
    match findings.count(Level::Problem) {
        0 => Ok(()),
        // The findings say it all.
        _ => Err(Failure::runtime("")),
    }
}

/// `--repair`: rewrites a damaged fs store under the daemon lock, and says what was lost.
/// `--accept-database`: the Postgres database the store is on now becomes its own.
fn accept_database(place: &Place, findings: &mut Findings) -> Result<(), Failure> {
    if place.kind != StoreKind::Postgres {
        return Err(Failure::input(
            "--accept-database applies to the postgres store (--store postgres)",
        ));
    }
    let config = place.database_config()?;
    let (before, now) = keel_store_postgres::PgStore::accept_database(&config)
        .map_err(|e| Failure::runtime(format!("cannot accept the database: {e}")))?;
    let message = match before {
        Some(before) if before == now => format!("the store's database is already {now}"),
        Some(before) => format!("accepted {now} as the store's database (it was {before})"),
        None => format!("accepted {now} as the store's database (none was recorded)"),
    };
    findings.add(Level::Ok, "database", message, None);
    Ok(())
}

fn repair_store(place: &Place, findings: &mut Findings) -> Result<(), Failure> {
    if place.kind != StoreKind::Fs {
        return Err(Failure::input(
            "--repair applies to the fs store; sled checks and repairs its own files",
        ));
    }
    place.require_existing()?;
    let _lock = match DaemonLock::try_take(place, "command")? {
        Ok(lock) => lock,
        Err(Holder::Daemon(pid)) => {
            return Err(Failure::runtime(format!(
                "a daemon (pid {pid}) holds the store in {}: stop it (SIGTERM), then run \
                 `keel doctor --repair` again; a store is only repaired while nothing writes to it",
                place.dir.display()
            )))
        }
        Err(_) => {
            return Err(Failure::runtime(format!(
                "another keel command holds the store in {} (see {}): run `keel doctor \
                 --repair` again when it has finished",
                place.dir.display(),
                place.lock_path().display()
            )))
        }
    };
    let store = FsStore::open(&place.dir).map_err(Failure::from)?;
    match store.repair(wall_clock()).map_err(Failure::from)? {
        None => findings.add(
            Level::Ok,
            "repair",
            "nothing to repair: every generation kept reads whole".into(),
            None,
        ),
        Some(repaired) => {
            findings.add(
                Level::Ok,
                "repair",
                format!(
                    "rewrote the store from what was readable (now generation {}); recorded as \
                     incident #{}",
                    repaired.generation, repaired.incident
                ),
                Some("see `keel incidents --json` for what it records"),
            );
            for lost in &repaired.lost {
                findings.add(Level::Warning, "repair", format!("lost: {lost}"), None);
            }
            for damaged in &repaired.fallback {
                findings.add(
                    Level::Ok,
                    "repair",
                    format!("replaced the damaged fallback generation (nothing lost): {damaged}"),
                    None,
                );
            }
            for kept in &repaired.kept {
                findings.add(
                    Level::Ok,
                    "repair",
                    format!("kept the damaged file as {kept}"),
                    None,
                );
            }
            if !repaired.lost.is_empty() {
                findings.add(
                    Level::Warning,
                    "repair",
                    "what was lost is gone from the schedule too: a one-shot whose run was lost \
                     can fire again, and a lost run's slot can run again (at least once)"
                        .into(),
                    None,
                );
            }
        }
    }
    Ok(())
}

fn check_store(place: &Place, lease: LeasePolicy, findings: &mut Findings) {
    let mut daemon = match Client::connect(place) {
        Ok(Some(mut client)) => match client.call(&Request::Status) {
            Ok(value) => {
                let status: Option<DaemonStatus> = from_value(value).ok();
                let pid = status
                    .and_then(|s| s.pid)
                    .map_or("?".into(), |p| p.to_string());
                findings.add(Level::Ok, "daemon", format!("running (pid {pid})"), None);
                Some(client)
            }
            Err(e) => {
                findings.add(
                    Level::Problem,
                    "daemon",
                    format!("the control socket answers with an error: {e}"),
                    Some("restart the daemon"),
                );
                None
            }
        },
        Ok(None) => {
            match lock_holder(place) {
                // On a shared store a daemon that does not lead stands by, with no socket.
                Some(Holder::Daemon(pid)) if place.kind == StoreKind::Postgres => {
                    let leader = crate::lead::current(place, false)
                        .ok()
                        .and_then(|status| status.holder)
                        .map_or_else(|| "nobody leads yet".to_owned(), |h| format!("{h} leads"));
                    findings.add(
                        Level::Ok,
                        "daemon",
                        format!("standing by (pid {pid}): {leader}"),
                        None,
                    );
                }
                Some(Holder::Daemon(pid)) => findings.add(
                    Level::Problem,
                    "daemon",
                    format!(
                        "a daemon (pid {pid}) holds {} but does not answer on {}",
                        place.lock_path().display(),
                        place.socket().display()
                    ),
                    Some("it may be starting, or stuck: if it stays like this, stop it and start it again"),
                ),
                Some(_) => findings.add(
                    Level::Ok,
                    "daemon",
                    "not running (a keel command holds the store for a moment)".into(),
                    None,
                ),
                None => findings.add(Level::Ok, "daemon", "not running".into(), None),
            }
            if place.socket().exists() {
                findings.add(
                    Level::Warning,
                    "daemon",
                    format!("stale control socket {}", place.socket().display()),
                    Some("left by a daemon that died; the next `keel run` removes it"),
                );
            }
            None
        }
        Err(e) => {
            findings.add(
                Level::Problem,
                "daemon",
                e.message().to_string(),
                Some("check the permissions of the data directory"),
            );
            None
        }
    };

    // Integrity: a handle of our own shows what opening the files finds.
    let store = match (place.kind, daemon.is_some()) {
        (StoreKind::Fs, _) => match FsStore::open(&place.dir) {
            Ok(store) => {
                check_fs_integrity(&store, findings);
                Some(std::sync::Arc::new(store) as std::sync::Arc<dyn keel_core::Store>)
            }
            Err(e) => {
                findings.add(
                    Level::Problem,
                    "store",
                    format!("the fs store does not open: {e}"),
                    Some("see docs/storage.md, recovery rules; keep a copy of the data directory"),
                );
                None
            }
        },
        (StoreKind::Sled, true) => {
            findings.add(
                Level::Ok,
                "store",
                "sled store open in the daemon (sled checks its files when it opens them)".into(),
                None,
            );
            None
        }
        (StoreKind::Sled | StoreKind::Postgres, _) => match place.open_store() {
            Ok(store) => {
                let what = format!("{} store opens", place.kind.name());
                findings.add(Level::Ok, "store", what, None);
                Some(store.store())
            }
            Err(e) => {
                findings.add(Level::Problem, "store", e.message().to_string(), None);
                None
            }
        },
    };

    // The data: through the daemon when it runs (it holds sled), else from the store.
    let read = |request: Request| -> Result<serde_json::Value, Failure> {
        match (&mut daemon, &store) {
            (Some(client), _) => client.call(&request),
            (None, Some(store)) => crate::protocol::answer_read(&**store, &request),
            (None, None) => Err(Failure::runtime("the store is not readable")),
        }
    };
    let mut read = read;
    let jobs: Vec<Job> = match read(Request::Jobs).and_then(crate::protocol::jobs_from) {
        Ok(jobs) => jobs,
        Err(e) => {
            if store.is_some() || daemon_answered(findings) {
                findings.add(
                    Level::Problem,
                    "store",
                    format!("cannot read jobs: {e}"),
                    None,
                );
            }
            return;
        }
    };
    check_jobs(&jobs, findings);
    if let Ok(runs) = read(Request::ActiveRuns).and_then(from_value::<Vec<Run>>) {
        check_leases(&runs, lease, daemon_answered(findings), findings);
    }
    if let Ok(incidents) = read(Request::Incidents).and_then(from_value::<Vec<keel_core::Incident>>)
    {
        let open = incidents.iter().filter(|i| i.resolved_at.is_none()).count();
        if open > 0 {
            findings.add(
                Level::Warning,
                "incidents",
                format!("{open} open incident(s)"),
                Some("see `keel incidents --open`"),
            );
        }
    }
}

/// Every generation the fs store keeps, as `FsStore::verify` finds it: damage is a problem
/// (writes are refused until a repair), torn tails and rebuilt snapshots are warnings.
fn check_fs_integrity(store: &FsStore, findings: &mut Findings) {
    let report = match store.verify() {
        Ok(report) => report,
        Err(e) => {
            findings.add(
                Level::Problem,
                "store",
                format!("the fs store cannot be verified: {e}"),
                Some("keep a copy of the data directory; see docs/storage.md, recovery rules"),
            );
            return;
        }
    };
    if report.is_clean() {
        findings.add(Level::Ok, "store", "fs store: no damage found".into(), None);
        return;
    }
    let repair = "acknowledged writes may be lost and the store refuses writes: keep a copy of \
                  the data directory, then run `keel doctor --repair` (with the daemon stopped)";
    for q in &report.quarantined {
        findings.add(
            Level::Problem,
            "store",
            format!(
                "fs store: corrupt frame in {} at byte {} ({} bytes, copied to quarantine/): {}",
                q.file, q.offset, q.len, q.reason
            ),
            Some(repair),
        );
    }
    for d in &report.damage {
        findings.add(
            Level::Problem,
            "store",
            format!("fs store: damage: {d}"),
            Some(repair),
        );
    }
    for d in &report.fallback_damage {
        findings.add(
            Level::Problem,
            "store",
            format!("fs store: damage in the fallback generation: {d}"),
            Some(
                "nothing is lost yet and writes go on, but the store could not be rebuilt from \
                 this generation if its newest snapshot were lost: keep a copy of the data \
                 directory, then run `keel doctor --repair` (with the daemon stopped) to start \
                 fresh generations",
            ),
        );
    }
    let harmless = "interrupted writes and rebuilt snapshots lose nothing that was \
                    acknowledged; no action needed";
    for t in &report.torn_tails {
        findings.add(
            Level::Warning,
            "store",
            format!(
                "fs store: torn tail (a write cut short) in {} at byte {} ({} bytes)",
                t.file, t.offset, t.len
            ),
            Some(harmless),
        );
    }
    for s in &report.snapshot_fallbacks {
        findings.add(
            Level::Warning,
            "store",
            format!(
                "fs store: snapshot of generation {} unusable ({}); rebuilt from generation {}",
                s.generation, s.reason, s.restored_from
            ),
            Some(harmless),
        );
    }
}

fn daemon_answered(findings: &Findings) -> bool {
    findings
        .0
        .iter()
        .any(|f| f.check == "daemon" && f.level == Level::Ok && f.message.starts_with("running"))
}

fn check_jobs(jobs: &[Job], findings: &mut Findings) {
    let mut fine = 0;
    for job in jobs {
        let name = &job.spec.id;
        if !job.spec.external && &*job.spec.kind != command_job::KIND {
            findings.add(
                Level::Problem,
                "jobs",
                format!(
                    "job {name} has kind {:?}, which nothing runs: the daemon refuses to start",
                    &*job.spec.kind
                ),
                Some("remove it (`keel job rm NAME`), or add it again with --worker-kind"),
            );
        } else if &*job.spec.kind == command_job::KIND && !job.spec.external {
            if let Err(e) = CommandSpec::from_payload(&job.spec.payload) {
                findings.add(
                    Level::Problem,
                    "jobs",
                    format!("job {name}: its command does not read: {e}"),
                    Some("add it again with `keel job add NAME --replace …`"),
                );
                continue;
            }
            fine += 1;
        } else {
            fine += 1;
        }
        if job.failures_in_a_row > 0 {
            // SPEC O4: a job that keeps failing is not a healthy one.
            let last = job
                .last_run
                .as_ref()
                .map(|l| format!("; the last, {}, {}", l.run, l.state))
                .unwrap_or_default();
            let fix =
                format!("see `keel runs --job {name}`, and `keel logs RUN` for a run's output");
            findings.add(
                Level::Warning,
                "jobs",
                format!(
                    "job {name}: {} run(s) failed in a row{last}",
                    job.failures_in_a_row
                ),
                Some(&fix),
            );
        }
        if let JobState::Disabled { reason } = &job.state {
            if reason.contains("no longer valid") {
                findings.add(
                    Level::Problem,
                    "jobs",
                    format!("job {name} is disabled: {reason}"),
                    Some("add it again with a valid definition (`keel job add NAME --replace …`)"),
                );
            }
        }
    }
    findings.add(
        Level::Ok,
        "jobs",
        format!(
            "{} job(s): {fine} with a handler, {} disabled",
            jobs.len(),
            jobs.iter()
                .filter(|job| matches!(job.state, JobState::Disabled { .. }))
                .count()
        ),
        None,
    );
}

fn check_leases(runs: &[Run], policy: LeasePolicy, daemon_running: bool, findings: &mut Findings) {
    let now = wall_clock();
    let grace = policy.grace_ms;
    let mut stale = 0;
    for run in runs {
        let running = matches!(
            run.state(),
            RunState::Running { .. } | RunState::Starting { .. }
        );
        let Some(lease) = run.lease().filter(|_| running) else {
            continue;
        };
        if lease.expires_at > now {
            continue;
        }
        stale += 1;
        let what = format!(
            "{} of job {}: the lease {} held by {} expired {}",
            run.id(),
            run.job(),
            lease.token,
            lease.owner,
            show::relative(lease.expires_at, now)
        );
        // Past twice the grace (and at least 1 s, for a grace of 0), a running watchdog would
        // have reclaimed it.
        let overdue = now.ms_since(lease.expires_at) > grace.saturating_mul(2).max(1_000);
        let (level, fix) = match (daemon_running, overdue) {
            (false, _) => (
                Level::Problem,
                "start the daemon (`keel run`): its watchdog reclaims the lease and retries the run",
            ),
            (true, false) => (
                Level::Warning,
                "the daemon's watchdog reclaims it within the grace period; no action needed",
            ),
            (true, true) => (
                Level::Problem,
                "the daemon should have reclaimed it: check the daemon's log, and restart it",
            ),
        };
        findings.add(level, "leases", what, Some(fix));
    }
    if stale == 0 {
        findings.add(Level::Ok, "leases", "no expired lease".into(), None);
    }
}

fn print(place: &Place, json: bool, findings: &Findings) -> Result<(), Failure> {
    let problems = findings.count(Level::Problem);
    let warnings = findings.count(Level::Warning);
    if json {
        return crate::views::print_json(&serde_json::json!({
            "data_dir": place.dir,
            "store": place.kind.name(),
            "findings": findings.0,
            "problems": problems,
            "warnings": warnings,
        }));
    }
    println!(
        "keel doctor: {} ({} store)",
        place.dir.display(),
        place.kind.name()
    );
    for f in &findings.0 {
        let level = match f.level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Problem => "PROBLEM",
        };
        println!("{level:<8} {:<10} {}", f.check, f.message);
        if let Some(fix) = &f.fix {
            println!("{:<8} {:<10} fix: {fix}", "", "");
        }
    }
    println!(
        "\n{problems} problem{}, {warnings} warning{}",
        if problems == 1 { "" } else { "s" },
        if warnings == 1 { "" } else { "s" }
    );
    Ok(())
}

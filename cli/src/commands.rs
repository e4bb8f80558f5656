//! What each command does: build a request, send it (to the daemon, or to the store
//! directly), print the answer.

use std::io::Read;

use keel_core::{
    limits, AuditQuery, AuditRecord, FencingToken, Incident, Job, JobId, JobState, Outcome, Run,
    RunId, RunQuery, StateName, WorkerId,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{
    AddArgs, Cli, Command, CompleteArgs, FailArgs, IncidentCommand, IncidentsArgs, JobCommand,
    NextArgs, RunsArgs, RunsCommand, StoreKind, TokenArgs, WorkerCommand,
};
use crate::direct::{self, wall_clock};
use crate::error::Failure;
use crate::jobdef::{parse_pair, JobDef, Prior, Resolve};
use crate::place::Place;
use crate::protocol::{
    from_value, jobs_from, Added, CheckpointAnswer, ClaimedAttempt, ContextView, Request, RunsPage,
};
use crate::{config, daemon, doctor, show, views};

/// Runs the parsed command line.
pub(crate) fn run(cli: Cli) -> Result<(), Failure> {
    // Generated from the parser; they need no data directory.
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "keel", &mut std::io::stdout());
            return Ok(());
        }
        Command::FenceGuard {
            attempts_dir,
            daemon,
        } => return crate::fence_guard::run(attempts_dir, *daemon),
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            return match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
                // `keel man | head`: the reader had enough.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => {
                    other.map_err(|e| Failure::runtime(format!("cannot write the man page: {e}")))
                }
            };
        }
        _ => {}
    }
    if let Some(url) = &cli.server {
        let remote = crate::remote::Remote::new(url, cli.token_file.as_deref())?;
        let what = match &cli.command {
            Command::Run(_) => Some("`keel run` starts a daemon here"),
            Command::Doctor(_) => Some("`keel doctor` checks a local data directory"),
            _ => None,
        };
        if let Some(what) = what {
            return Err(Failure::input(format!(
                "{what}; --server (or KEEL_SERVER) is for commands that act on a daemon \
                 elsewhere: unset it"
            )));
        }
        let place = Place {
            // Never opened: every command goes to the server.
            dir: std::path::PathBuf::new(),
            kind: cli.store.unwrap_or(StoreKind::Fs),
            remote: Some(std::sync::Arc::new(remote)),
            database: None,
            token_file: cli.token_file.clone(),
        };
        let out = Output { json: cli.json };
        return commands(cli.command, &place, out, None);
    }
    // `keel run --config`'s file may say where the data lives; the command line wins.
    let config = match &cli.command {
        Command::Run(args) => args.config.as_deref().map(config::load).transpose()?,
        _ => None,
    };
    let from_file = config.as_ref();
    let place = Place {
        dir: match cli.data_dir {
            Some(dir) => dir,
            None => crate::place::default_data_dir()?,
        },
        kind: cli
            .store
            .or(from_file.and_then(|c| c.store))
            .unwrap_or(StoreKind::Fs),
        remote: None,
        database: cli
            .database_url
            .map(crate::place::DatabaseUrl)
            .or_else(|| from_file.and_then(|c| c.database_url.clone())),
        token_file: cli.token_file,
    };
    place.check()?;
    if !matches!(cli.command, Command::Run(_)) {
        crate::place::check_daemon_store(&place)?;
    }
    // Refused by name before anything runs, not ignored.
    crate::client::answer_timeout()?;
    let out = Output { json: cli.json };
    commands(cli.command, &place, out, config)
}

fn commands(
    command: Command,
    place: &Place,
    out: Output,
    config: Option<config::Config>,
) -> Result<(), Failure> {
    let place = place.clone();
    match command {
        Command::Run(args) => {
            if args.leader_ttl.is_some() && place.kind != StoreKind::Postgres {
                eprintln!(
                    "keel: warning: --leader-ttl applies only with --store postgres; the {} \
                     store has one daemon per data directory, chosen by its lock",
                    place.kind.name()
                );
            }
            let leader_ttl = args
                .leader_ttl
                .or(config.as_ref().and_then(|c| c.leader_ttl))
                .unwrap_or(crate::cli::LEADER_TTL_DEFAULT);
            daemon::run(&place, config, args.http, leader_ttl)
        }
        Command::Job(command) => job(&place, out, command),
        Command::Next(args) => next(&place, out, &args),
        Command::Runs(args) => runs(&place, out, args),
        Command::Interrupted(args) => {
            let runs = list_runs(&place, None, Some(StateName::Interrupted), args.limit)?;
            out.print(&views::all(&runs, views::run), || {
                let mut text = show::runs_table(&runs, wall_clock());
                if !runs.is_empty() {
                    text.push_str(
                        "\nThese runs were found unfinished after a crash or shutdown and their \
                         jobs do not resume after a crash. Start one again with \
                         `keel job trigger JOB`.\n",
                    );
                }
                text
            })
        }
        Command::Logs(args) => logs(&place, &args),
        Command::Incidents(args) => incidents(&place, out, args),
        Command::Queue => {
            let value = call(&place, &Request::Queue)?;
            out.print(&value, || show::queue_table(&value))
        }
        Command::Workers => {
            let workers: Vec<keel_core::WorkerHealth> =
                from_value(call(&place, &Request::Workers)?)?;
            out.print(&workers, || show::workers_table(&workers))
        }
        Command::Rules => {
            let rules: Vec<keel_core::watchdog::Rule> = from_value(call(&place, &Request::Rules)?)?;
            out.print(&rules, || show::rules_table(&rules))
        }
        Command::Status => {
            let found = crate::anyhost::status(&place)?;
            out.print(&views::status(&found), || {
                show::status(&found, wall_clock())
            })
        }
        Command::Doctor(args) => doctor::run(&place, out.json, &args),
        Command::Worker(command) => worker(&place, out, command),
        // Answered above, before a data directory is looked for.
        Command::Completions { .. } | Command::Man | Command::FenceGuard { .. } => Ok(()),
    }
}

/// Human text or JSON on stdout.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Output {
    pub(crate) json: bool,
}

impl Output {
    fn print(&self, value: &impl Serialize, human: impl FnOnce() -> String) -> Result<(), Failure> {
        if self.json {
            views::print_json(value)
        } else {
            print!("{}", human());
            Ok(())
        }
    }
}

fn call(place: &Place, request: &Request) -> Result<Value, Failure> {
    direct::call(place, request)
}

fn job_id(name: &str) -> Result<JobId, Failure> {
    JobId::new(name).map_err(|e| Failure::input(format!("invalid job name {name:?}: {e}")))
}

// ----- jobs --------------------------------------------------------------------------------

fn job(place: &Place, out: Output, command: JobCommand) -> Result<(), Failure> {
    match command {
        JobCommand::Add(args) => add(place, out, *args),
        JobCommand::Ls => {
            let jobs = jobs(place)?;
            out.print(&views::all(&jobs, views::job), || {
                show::jobs_table(&jobs, wall_clock())
            })
        }
        JobCommand::Show(arg) => {
            let job = find_job(place, &arg.name)?;
            let recent = list_runs(place, Some(job.spec.id.clone()), None, 5)?;
            let view = json!({
                "job": views::job(&job),
                "recent_runs": views::all(&recent, views::run),
            });
            out.print(&view, || show::job_detail(&job, &recent, wall_clock()))
        }
        JobCommand::History(arg) => {
            let job = job_id(&arg.name)?;
            let records: Vec<AuditRecord> = job_history(place, &job)?;
            if records.is_empty() {
                // Unknown, and never known (its history outlives it otherwise).
                find_job(place, job.as_str())?;
            }
            out.print(&views::all(&records, views::audit), || {
                show::job_history(&job, &records)
            })
        }
        JobCommand::Rm(arg) => {
            let job = job_id(&arg.name)?;
            call(place, &Request::RemoveJob { job: job.clone() })?;
            out.print(&views::acted("job", json!(job), "removed", true), || {
                format!("removed job {job} (its run history stays)\n")
            })
        }
        JobCommand::Pause(arg) => {
            let job = job_id(&arg.name)?;
            let changed: bool = from_value(call(place, &Request::PauseJob { job: job.clone() })?)?;
            let view = find_job(place, job.as_str()).map_or(json!(job), |j| views::job(&j));
            out.print(&views::acted("job", view, "paused", changed), || {
                if changed {
                    format!("paused job {job}\n")
                } else {
                    format!("job {job} was already paused\n")
                }
            })
        }
        JobCommand::Resume(arg) => {
            let job = job_id(&arg.name)?;
            let changed: bool = from_value(call(place, &Request::ResumeJob { job: job.clone() })?)?;
            let found = find_job(place, job.as_str());
            let view = found.as_ref().map_or(json!(job), views::job);
            let state = found.map(|j| show::job_state(&j));
            let word = if changed { "resumed" } else { "not paused" };
            out.print(
                &views::acted("job", view, "resumed", changed),
                || match state {
                    Ok(state) => format!("{word}: job {job}: {state}\n"),
                    Err(_) => format!("{word}: job {job}\n"),
                },
            )
        }
        JobCommand::Trigger(arg) => {
            let job = job_id(&arg.name)?;
            // On Postgres a change is made by the leading daemon, here or where it was sent.
            let daemon_up = place.kind == StoreKind::Postgres
                || crate::client::Client::connect(place)?.is_some();
            let run: RunId = from_value(call(place, &Request::TriggerJob { job: job.clone() })?)?;
            let external = find_job(place, job.as_str()).is_ok_and(|j| j.spec.external);
            let triggered: Option<Run> = from_value(call(place, &Request::Run { run })?)?;
            let view = views::acted(
                "run",
                triggered
                    .as_ref()
                    .map_or(json!(run.to_string()), views::run),
                "triggered",
                true,
            );
            out.print(&view, || {
                let then = match (external, daemon_up) {
                    (true, _) => "; it is queued for a worker to claim",
                    (false, true) => "",
                    (false, false) => "; no daemon is running, so it starts when `keel run` does",
                };
                format!("triggered job {job}: {run}{then}\n")
            })
        }
    }
}

fn add(place: &Place, out: Output, args: AddArgs) -> Result<(), Failure> {
    let mut env = std::collections::BTreeMap::new();
    for pair in &args.env {
        let (name, value) = parse_pair(pair, "--env").map_err(Failure::input)?;
        env.insert(name, value);
    }
    let def = JobDef {
        name: args.name,
        cron: args.cron,
        tz: args.tz,
        at: args.at,
        every: args.every,
        command: args.program,
        shell: args.shell,
        cwd: args.cwd,
        env,
        attempts: args.attempts,
        backoff: args.backoff,
        jitter: args.jitter,
        timeout: args.timeout,
        overlap: args.overlap,
        misfire: args.misfire,
        delete_after_run: args.delete_after_run,
        notify: args.notify,
        notify_on: args.notify_on,
        worker_kind: args.worker_kind,
        payload: args.payload,
        require_artifacts: args.require_artifacts,
        exit_success: args.exit_success,
        exit_retryable: args.exit_retryable,
        exit_permanent: args.exit_permanent,
    };
    let base_dir = std::env::current_dir()
        .map_err(|e| Failure::runtime(format!("cannot read the current directory: {e}")))?;
    let spec = def
        .to_spec(Resolve {
            now: wall_clock(),
            base_dir: &base_dir,
            prior: Prior::None,
        })
        .map_err(|e| Failure::input(format!("job {}: {e}", def.name)))?;
    let added: Added = from_value(call(
        place,
        &Request::AddJob {
            spec,
            replace: args.replace,
        },
    )?)?;
    let view = json!({
        "job": added.job.as_ref().map(views::job),
        "action": if added.replaced { "replaced" } else { "added" },
        "changed": true,
    });
    out.print(&view, || {
        let verb = if added.replaced { "replaced" } else { "added" };
        match &added.job {
            Some(job) => format!("{verb} job {}: {}\n", job.spec.id, show::job_state(job)),
            None => format!("{verb} job {}\n", def.name),
        }
    })
}

fn jobs(place: &Place) -> Result<Vec<Job>, Failure> {
    jobs_from(call(place, &Request::Jobs)?)
}

fn find_job(place: &Place, name: &str) -> Result<Job, Failure> {
    let id = job_id(name)?;
    jobs(place)?
        .into_iter()
        .find(|job| job.spec.id == id)
        .ok_or_else(|| Failure::NotFound(format!("no job named {name} (see `keel job ls`)")))
}

fn next(place: &Place, out: Output, args: &NextArgs) -> Result<(), Failure> {
    let job = find_job(place, &args.name)?;
    let now = wall_clock();
    let zone = show::zone_of(&job.spec.schedule);
    let mut times = Vec::new();
    if let (Some(first), Ok(schedule)) = (job.next_fire(), job.schedule()) {
        let mut at = Some(first);
        while let Some(t) = at.filter(|_| times.len() < args.count) {
            times.push(t);
            at = schedule.next_after(t);
        }
    }
    let rows: Vec<Value> = times
        .iter()
        .map(|t| {
            json!({
                "at": t.to_string(),
                "at_ms": t.0,
                "local": show::local_time(*t, zone),
                "zone": zone.name(),
            })
        })
        .collect();
    out.print(&rows, || {
        let mut text = String::new();
        match &job.state {
            JobState::Disabled { reason } => {
                text.push_str(&format!(
                    "job {} is disabled ({reason}): it does not fire\n",
                    job.spec.id
                ));
                return text;
            }
            JobState::Paused { .. } => text.push_str(&format!(
                "job {} is paused; once resumed it fires at:\n",
                job.spec.id
            )),
            JobState::Scheduled { .. } => {}
        }
        if times.is_empty() {
            text.push_str("no fire time left\n");
            return text;
        }
        let mut table =
            crate::table::Table::new(&[&format!("LOCAL ({})", zone.name()), "UTC", "WHEN"]);
        for t in &times {
            let when = if *t <= now {
                "due now (fires when the daemon runs)".to_string()
            } else {
                show::relative(*t, now)
            };
            table.row(vec![show::local_time(*t, zone), show::time(*t), when]);
        }
        text.push_str(&table.render());
        text
    })
}

// ----- runs --------------------------------------------------------------------------------

fn runs(place: &Place, out: Output, args: RunsArgs) -> Result<(), Failure> {
    match args.command {
        Some(RunsCommand::Show(arg)) => {
            let run_id = parse_run(&arg.run)?;
            let run: Option<Run> = from_value(call(place, &Request::Run { run: run_id })?)?;
            let Some(run) = run else {
                return Err(Failure::input(format!(
                    "no run {run_id} (it never existed, or the history policy pruned it)"
                )));
            };
            let audit = audit_of(place, run_id)?;
            let view = json!({
                "run": views::run(&run),
                "audit": views::all(&audit, views::audit),
            });
            out.print(&view, || show::run_detail(&run, &audit, wall_clock()))
        }
        Some(RunsCommand::Cancel(arg)) => {
            let run = parse_run(&arg.run)?;
            call(place, &Request::CancelRun { run })?;
            let view = views::acted("run", json!(run.to_string()), "cancel_requested", true);
            out.print(&view, || {
                format!("{run}: cancelled (an attempt in progress is asked to stop first)\n")
            })
        }
        Some(RunsCommand::Lease(args)) => {
            use crate::cli::LeaseAction;
            use crate::protocol::LeaseOp;
            let run = parse_run(&args.run)?;
            let action = match args.action {
                LeaseAction::Release => LeaseOp::Release,
                LeaseAction::Reclaim => LeaseOp::Reclaim,
                LeaseAction::Restore => LeaseOp::Restore,
            };
            let request = Request::Lease {
                run,
                action,
                by: operator(),
                reason: args.reason,
            };
            let done = call(place, &request)?;
            out.print(&done, || {
                let action = done["action"].as_str().unwrap_or("changed");
                match done["token"].as_str() {
                    Some(token) => format!(
                        "{run}: lease {action}: {} holds it again under {token}\n",
                        done["owner"].as_str().unwrap_or("?")
                    ),
                    None => format!(
                        "{run}: lease {} of {} {action}; the run is {}\n",
                        done["previous_token"].as_str().unwrap_or("?"),
                        done["previous_owner"].as_str().unwrap_or("?"),
                        done["state"].as_str().unwrap_or("?")
                    ),
                }
            })
        }
        None => {
            let job = args.job.as_deref().map(job_id).transpose()?;
            let state = args.state.as_deref().map(parse_state).transpose()?;
            let runs = list_runs(place, job.clone(), state, args.limit)?;
            if let Some(job) = job.filter(|_| runs.is_empty()) {
                // No runs, and no such job either: a typo, not an empty history.
                find_job(place, job.as_str())?;
            }
            out.print(&views::all(&runs, views::run), || {
                show::runs_table(&runs, wall_clock())
            })
        }
    }
}

/// Up to `limit` runs, newest first, across as many pages as that takes.
fn list_runs(
    place: &Place,
    job: Option<JobId>,
    state: Option<StateName>,
    limit: usize,
) -> Result<Vec<Run>, Failure> {
    let mut runs = Vec::new();
    let mut before = None;
    while runs.len() < limit {
        let query = RunQuery {
            job: job.clone(),
            state,
            before,
            limit: (limit - runs.len()).min(limits::HISTORY_PAGE_MAX),
            ..RunQuery::default()
        };
        let page: RunsPage = from_value(call(place, &Request::Runs { query })?)?;
        runs.extend(page.runs);
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    runs.truncate(limit);
    Ok(runs)
}

/// The audit records of a job's own changes (not of its runs), oldest first.
fn job_history(place: &Place, job: &JobId) -> Result<Vec<AuditRecord>, Failure> {
    let mut records: Vec<AuditRecord> = Vec::new();
    // Pages follow the last record read, whether it was kept (a job's) or not (a run's).
    let mut after = None;
    loop {
        let query = AuditQuery {
            job: Some(job.clone()),
            after,
            limit: limits::HISTORY_PAGE_MAX,
            ..AuditQuery::default()
        };
        let page: Vec<AuditRecord> = from_value(call(place, &Request::Audit { query })?)?;
        let full = page.len() == limits::HISTORY_PAGE_MAX;
        after = page.last().map(|r| r.seq).or(after);
        records.extend(page.into_iter().filter(|r| r.run.is_none()));
        if !full {
            return Ok(records);
        }
    }
}

fn audit_of(place: &Place, run: RunId) -> Result<Vec<AuditRecord>, Failure> {
    let mut records: Vec<AuditRecord> = Vec::new();
    loop {
        let query = AuditQuery {
            run: Some(run),
            after: records.last().map(|r| r.seq),
            limit: limits::HISTORY_PAGE_MAX,
            ..AuditQuery::default()
        };
        let page: Vec<AuditRecord> = from_value(call(place, &Request::Audit { query })?)?;
        let full = page.len() == limits::HISTORY_PAGE_MAX;
        records.extend(page);
        if !full {
            return Ok(records);
        }
    }
}

fn parse_state(text: &str) -> Result<StateName, Failure> {
    let state: StateName =
        serde_json::from_value(Value::String(text.replace('-', "_"))).map_err(|_| {
            Failure::input(format!(
                "unknown run state {text:?}: use queued, backing_off, starting, running, \
                 succeeded, failed, failed_dropped, cancelled or interrupted"
            ))
        })?;
    if matches!(
        state,
        StateName::Scheduled | StateName::Paused | StateName::Disabled | StateName::Removed
    ) {
        return Err(Failure::input(format!(
            "{text:?} is a job state, not a run state"
        )));
    }
    Ok(state)
}

/// `keel logs`: the kept output of one attempt (`command_job::output`), stdout then stderr,
/// each under a header, control characters shown rather than obeyed. With `--follow`, what the
/// command writes next is printed as it comes, until the run ends.
fn logs(place: &Place, args: &crate::cli::LogsArgs) -> Result<(), Failure> {
    use crate::command_job::output;
    use std::io::Write;
    let run_id = parse_run(&args.run)?;
    if let Some(remote) = &place.remote {
        return remote_logs(remote, run_id, args);
    }
    let run: Option<Run> = from_value(call(place, &Request::Run { run: run_id })?)?;
    let Some(run) = run else {
        return Err(Failure::input(format!(
            "no run {run_id} (it never existed, or the history policy pruned it)"
        )));
    };
    let dir = place.output_dir();
    let kept = output::attempts(&dir, run_id);
    let running = !run.state().is_terminal();
    let attempt = match args.attempt {
        Some(n) if kept.contains(&keel_core::Attempt(n)) => keel_core::Attempt(n),
        Some(n) if args.follow && running && run.attempt().0 == n => run.attempt(),
        Some(n) => {
            let have: Vec<String> = kept.iter().map(|a| a.to_string()).collect();
            return Err(Failure::input(format!(
                "{run_id} has no output kept for attempt {n} (attempts with output: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        }
        None => match kept.last() {
            Some(last) => *last,
            None if args.follow && !run.state().is_terminal() => run.attempt(),
            None => {
                return Err(Failure::input(if place.kind == StoreKind::Postgres {
                    format!(
                        "no output kept on this host for {run_id}: each host keeps the output of \
                         the commands it ran; run `keel logs` on the host that ran it (see \
                         `keel runs show {run_id}` for its worker, local:HOST), or it ran no \
                         command (a job for external workers)"
                    )
                } else {
                    format!(
                        "no output kept for {run_id}: it ran no command here (a job for external \
                         workers, or a run from before keel kept output)"
                    )
                }))
            }
        },
    };
    let paths = ["stdout", "stderr"].map(|s| output::attempt_path(&dir, run_id, attempt, s));
    let mut printed = [0u64; 2];
    let mut stdout = std::io::stdout().lock();
    let print = |stdout: &mut std::io::StdoutLock<'_>, bytes: &[u8]| {
        let text = crate::table::terminal_safe(&String::from_utf8_lossy(bytes));
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    };
    for (i, path) in paths.iter().enumerate() {
        let older = std::fs::read(output::rotated(path)).unwrap_or_default();
        let current = std::fs::read(path).unwrap_or_default();
        let stream = if i == 0 { "stdout" } else { "stderr" };
        let _ = writeln!(stdout, "== {run_id} attempt {attempt}: {stream} ==");
        if older.is_empty() && current.is_empty() && !args.follow {
            let _ = writeln!(stdout, "(nothing)");
            continue;
        }
        if !older.is_empty() {
            let _ = writeln!(
                stdout,
                "(older output was cut: the first part shown is not the start)"
            );
            print(&mut stdout, &older);
        }
        print(&mut stdout, &current);
        printed[i] = current.len() as u64;
    }
    if !args.follow {
        return Ok(());
    }
    // Follow: poll both files for what was appended, and the run for its end.
    let mut checked = std::time::Instant::now();
    let mut ended = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if checked.elapsed() >= std::time::Duration::from_secs(1) {
            checked = std::time::Instant::now();
            let now: Option<Run> = from_value(call(place, &Request::Run { run: run_id })?)?;
            // Read once more below: what was written before the end.
            ended = now.is_none_or(|r| r.state().is_terminal() || r.attempt() != attempt);
        }
        for (i, path) in paths.iter().enumerate() {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            // A rotation starts the file again.
            let from = if (bytes.len() as u64) < printed[i] {
                0
            } else {
                printed[i]
            };
            if (bytes.len() as u64) > from {
                print(&mut stdout, &bytes[from as usize..]);
            }
            printed[i] = bytes.len() as u64;
        }
        if ended {
            return Ok(());
        }
    }
}

/// `keel logs` over `--server`: one read of `GET /api/v1/runs/{run}/logs`, printed as the
/// local command prints it.
fn remote_logs(
    remote: &crate::remote::Remote,
    run: RunId,
    args: &crate::cli::LogsArgs,
) -> Result<(), Failure> {
    if args.follow {
        return Err(Failure::input(
            "--follow reads the output files as they grow, on the daemon's host; over --server, \
             run `keel logs` again to see more",
        ));
    }
    let query = args
        .attempt
        .map_or_else(String::new, |n| format!("?attempt={n}"));
    let kept = remote.get(&format!("/api/v1/runs/{run}/logs{query}"))?;
    let attempt = kept["attempt"].as_u64().unwrap_or(0);
    for stream in ["stdout", "stderr"] {
        println!("== {run} attempt {attempt}: {stream} ==");
        let text = kept[stream]["text"].as_str().unwrap_or("");
        if kept[stream]["cut"].as_bool() == Some(true) {
            println!("(older output was cut: the first part shown is not the start)");
        }
        if text.is_empty() {
            println!("(nothing)");
        } else {
            print!("{}", crate::table::terminal_safe(text));
        }
    }
    Ok(())
}

fn incidents(place: &Place, out: Output, args: IncidentsArgs) -> Result<(), Failure> {
    if let Some(command) = args.command {
        return incident_action(place, out, command);
    }
    let mut incidents: Vec<Incident> = from_value(call(place, &Request::Incidents)?)?;
    if args.open {
        incidents.retain(|i| i.resolved_at.is_none());
    }
    incidents.sort_by_key(|i| (i.resolved_at.is_some(), std::cmp::Reverse(i.id)));
    out.print(&views::all(&incidents, views::incident), || {
        show::incidents_table(&incidents)
    })
}

/// Who an operator action from the CLI is recorded as: the local user.
fn operator() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "cli".into())
}

fn incident_action(place: &Place, out: Output, command: IncidentCommand) -> Result<(), Failure> {
    let (request, verb) = match command {
        IncidentCommand::Open {
            details,
            job,
            run,
            worker,
        } => (
            Request::OpenIncident {
                job: job.as_deref().map(job_id).transpose()?,
                run: run.as_deref().map(parse_run).transpose()?,
                worker: worker
                    .as_deref()
                    .map(|w| {
                        keel_core::WorkerId::new(w).map_err(|e| {
                            Failure::input(format!("--worker: invalid worker id {w:?}: {e}"))
                        })
                    })
                    .transpose()?,
                details,
                by: operator(),
            },
            "opened",
        ),
        IncidentCommand::Ack { id, note } => (
            Request::AcknowledgeIncident {
                incident: id,
                by: operator(),
                note,
            },
            "acknowledged",
        ),
        IncidentCommand::Resolve { id, reason } => (
            Request::ResolveIncident {
                incident: id,
                by: operator(),
                reason,
            },
            "resolved",
        ),
    };
    let incident: Incident = from_value(call(place, &request)?)?;
    out.print(&views::incident(&incident), || {
        format!("incident #{} {verb}\n", incident.id)
    })
}

// ----- workers -----------------------------------------------------------------------------

fn worker(place: &Place, out: Output, command: WorkerCommand) -> Result<(), Failure> {
    match command {
        WorkerCommand::Claim(args) => {
            let worker = WorkerId::new(&args.worker)
                .map_err(|e| Failure::input(format!("invalid worker id {:?}: {e}", args.worker)))?;
            if direct::is_daemon_worker(worker.as_str()) {
                return Err(Failure::input(format!(
                    "worker id {:?} is a daemon's own executor (`local`, `local:HOST`); pick \
                     another",
                    worker.as_str()
                )));
            }
            let request = Request::Claim {
                worker,
                kinds: args.kinds.clone(),
            };
            let claimed: Option<ClaimedAttempt> = from_value(call(place, &request)?)?;
            match claimed {
                Some(attempt) => views::print_json(&attempt),
                None => Err(Failure::NothingDue(format!(
                    "nothing due for kind {}",
                    args.kinds.join(", ")
                ))),
            }
        }
        WorkerCommand::Touch(args) => {
            let (run, token) = attempt_of(&args)?;
            let lease: keel_core::Lease = from_value(call(place, &Request::Touch { run, token })?)?;
            out.print(&lease, || {
                format!(
                    "{run}: lease renewed until {}\n",
                    show::time(lease.expires_at)
                )
            })
        }
        WorkerCommand::Progress(args) => {
            let (run, token) = attempt_of(&args.attempt)?;
            let request = Request::Progress {
                run,
                token,
                phase: args.phase,
                message: args.message,
            };
            call(place, &request)?;
            Ok(())
        }
        WorkerCommand::Context(args) => {
            let (run, token) = attempt_of(&args)?;
            let context: ContextView = from_value(call(place, &Request::Context { run, token })?)?;
            views::print_json(&context)
        }
        WorkerCommand::Verify(args) => {
            let (run, token) = attempt_of(&args.attempt)?;
            let request = Request::Verify {
                run,
                token,
                target: args.target,
            };
            let evidence: keel_core::artifact::Verification = from_value(call(place, &request)?)?;
            out.print(&views::verification(&evidence), || {
                let what = match (evidence.status, &evidence.error) {
                    (Some(status), _) => format!("HTTP {status}"),
                    (None, Some(error)) => crate::table::terminal_safe(error),
                    (None, None) => "exists".into(),
                };
                let verdict = if evidence.ok { "passed" } else { "FAILED" };
                format!("{run}: {} {verdict} ({what})\n", evidence.target)
            })?;
            if evidence.ok {
                Ok(())
            } else {
                Err(Failure::ArtifactGate(String::new()))
            }
        }
        WorkerCommand::Checkpoint(args) => {
            let (run, token) = attempt_of(&args)?;
            let mut data = String::new();
            std::io::stdin().read_to_string(&mut data).map_err(|e| {
                Failure::input(format!(
                    "cannot read the checkpoint from stdin (UTF-8 text): {e}"
                ))
            })?;
            let answer: CheckpointAnswer =
                from_value(call(place, &Request::Checkpoint { run, token, data })?)?;
            out.print(&answer, || match answer {
                CheckpointAnswer::Saved { seq } => format!("{run}: checkpoint #{seq} saved\n"),
                CheckpointAnswer::Throttled { until } => format!(
                    "{run}: checkpoint kept; it is written by a save after {} or when the \
                     daemon stops\n",
                    show::time(until)
                ),
            })
        }
        WorkerCommand::Complete(args) => complete(place, out, args),
        WorkerCommand::Fail(args) => fail(place, out, args),
    }
}

fn complete(place: &Place, out: Output, args: CompleteArgs) -> Result<(), Failure> {
    let (run, token) = attempt_of(&args.attempt)?;
    let mut artifacts = std::collections::BTreeMap::new();
    for pair in &args.artifacts {
        let (name, value) = parse_pair(pair, "--artifact").map_err(Failure::input)?;
        artifacts.insert(name, value);
    }
    let outcome = Outcome::Success {
        summary: args.summary,
        artifacts,
    };
    end_attempt(place, run, token, outcome)?;
    out.print(&json!({ "run": run, "completed": true }), || {
        format!("{run}: completed\n")
    })
}

fn fail(place: &Place, out: Output, args: FailArgs) -> Result<(), Failure> {
    let (run, token) = attempt_of(&args.attempt)?;
    let outcome = if args.permanent {
        Outcome::Permanent {
            message: args.message,
        }
    } else {
        Outcome::Retryable {
            message: args.message,
        }
    };
    end_attempt(place, run, token, outcome)?;
    out.print(
        &json!({ "run": run, "failed": true, "permanent": args.permanent }),
        || {
            if args.permanent {
                format!("{run}: failed permanently; it is not retried\n")
            } else {
                format!("{run}: failed; it is retried if the job's attempts allow\n")
            }
        },
    )
}

/// Ends the attempt that `token` holds on `run` with `outcome`, through the daemon.
fn end_attempt(
    place: &Place,
    run: RunId,
    token: FencingToken,
    outcome: Outcome,
) -> Result<(), Failure> {
    call(
        place,
        &Request::Complete {
            run,
            token,
            outcome,
        },
    )?;
    Ok(())
}

fn attempt_of(args: &TokenArgs) -> Result<(RunId, FencingToken), Failure> {
    Ok((parse_run(&args.run)?, parse_token(&args.token)?))
}

/// `run-42` or `42`.
pub(crate) fn parse_run(text: &str) -> Result<RunId, Failure> {
    text.strip_prefix("run-")
        .unwrap_or(text)
        .parse()
        .map(RunId)
        .map_err(|_| Failure::input(format!("invalid run {text:?}: expected run-42 or 42")))
}

/// `token-7` or `7`.
pub(crate) fn parse_token(text: &str) -> Result<FencingToken, Failure> {
    text.strip_prefix("token-")
        .unwrap_or(text)
        .parse()
        .map(FencingToken)
        .map_err(|_| {
            Failure::input(format!(
                "invalid token {text:?}: expected a number such as 7"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_tokens_parse_with_or_without_their_prefix() {
        assert_eq!(parse_run("run-42").unwrap(), RunId(42));
        assert_eq!(parse_run("42").unwrap(), RunId(42));
        assert_eq!(parse_run("job-42").unwrap_err().exit_code(), 2);
        assert_eq!(parse_token("token-7").unwrap(), FencingToken(7));
        assert_eq!(parse_token("7").unwrap(), FencingToken(7));
        assert_eq!(parse_token("x").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn run_states_parse_and_job_states_are_refused() {
        assert_eq!(
            parse_state("failed_dropped").unwrap(),
            StateName::FailedDropped
        );
        assert_eq!(parse_state("backing-off").unwrap(), StateName::BackingOff);
        let e = parse_state("done").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message().contains("\"done\""));
        assert!(parse_state("paused")
            .unwrap_err()
            .message()
            .contains("job state"));
    }
}

//! The command tree, as clap declares it. Every flag's help text is the reference; `docs/cli.md`
//! is the guide.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

const CRON_HELP: &str = "A cron expression with SECONDS: 6 fields, \
`sec min hour day-of-month month day-of-week`, e.g. '0 30 2 * * *' (02:30:00 daily) or \
'*/10 * * * * *' (every 10 seconds). 5 fields mean sec = 0. Quote it.";

const AFTER_HELP: &str = "\
Exit codes: 0 done, 1 keel or its store failed, 2 bad input (unknown job or run, bad cron, \
zone, duration or time, stale token, refused command), 3 `worker claim` found nothing due.

Commands talk to the daemon through <data-dir>/keel.sock when it runs, and work on the store \
directly when it does not. Library warnings go to stderr; KEEL_LOG chooses what is shown \
(`info`, `warn,keel_runtime=debug`; default `warn`). See docs/cli.md.";

/// keel: a crash-safe job scheduler.
#[derive(Debug, Parser)]
#[command(name = "keel", version, after_help = AFTER_HELP, max_term_width = 100)]
pub(crate) struct Cli {
    /// The data directory: the store, the daemon's lock and its control socket. Default: one
    /// per user, wherever you run keel from: /var/lib/keel as root, $STATE_DIRECTORY under
    /// systemd, else $XDG_STATE_HOME/keel (~/.local/state/keel).
    #[arg(
        long,
        global = true,
        env = "KEEL_DATA_DIR",
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub(crate) data_dir: Option<PathBuf>,
    /// The store adapter: `fs` (the default, shared by several processes), `sled` (one
    /// process at a time; see docs/storage.md) or `postgres`. Wins over keel.toml's `[daemon]
    /// store`.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "KEEL_STORE",
        help_heading = "Global options"
    )]
    pub(crate) store: Option<StoreKind>,
    /// With --store postgres: the database, as a libpq key-value string or a postgresql:// URL
    /// (docs/cli.md, "Several hosts on Postgres"). Never printed with its password. Wins over
    /// keel.toml's `[daemon] database_url`.
    #[arg(
        long,
        global = true,
        env = "KEEL_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Global options"
    )]
    pub(crate) database_url: Option<String>,
    /// Print listings and results as JSON view objects: flat states, RFC 3339 times with `_ms`
    /// twins, run-7 style names (docs/cli.md, "JSON output").
    #[arg(long, global = true, help_heading = "Global options")]
    pub(crate) json: bool,
    /// Act on the daemon at URL (e.g. http://10.0.0.5:8080) over its HTTP API instead of the
    /// local data directory; the token comes from KEEL_TOKEN or --token-file (docs/api.md).
    #[arg(
        long,
        global = true,
        env = "KEEL_SERVER",
        value_name = "URL",
        help_heading = "Global options"
    )]
    pub(crate) server: Option<String>,
    /// With --server (or a command sent on to the leader of a Postgres store): a file whose
    /// first line is the bearer token.
    #[arg(
        long,
        global = true,
        env = "KEEL_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub(crate) token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Which store adapter holds the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StoreKind {
    /// keel-store-fs: a crash-safe directory several processes share.
    Fs,
    /// keel-store-sled: one process at a time.
    Sled,
    /// keel-store-postgres: daemons on several hosts share it, one leading (--database-url).
    Postgres,
}

impl StoreKind {
    /// The name, as `--store` takes it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StoreKind::Fs => "fs",
            StoreKind::Sled => "sled",
            StoreKind::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the daemon: fire jobs, run command jobs, serve workers and commands.
    ///
    /// Takes <data-dir>/daemon.lock; if another daemon holds it, waits (standby) and takes over
    /// when it stops. Stops gracefully on SIGINT or SIGTERM.
    Run(RunArgs),
    /// Add, list, show, remove, pause, resume or trigger jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Show a job's next fire times, in its time zone and in UTC.
    Next(NextArgs),
    /// List runs, newest first; `runs show RUN` for one run and its audit trail.
    Runs(RunsArgs),
    /// List runs that ended `interrupted` (found unfinished after a crash, not resumable).
    Interrupted(LimitArgs),
    /// Print what a run's command wrote (stdout, then stderr), as the daemon kept it.
    Logs(LogsArgs),
    /// List incidents (reclaimed leases, stuck runs, idle claim loops…); open, acknowledge or
    /// resolve one.
    Incidents(IncidentsArgs),
    /// Queue health per kind, from the running daemon: waiting, running, expired leases,
    /// workers seen.
    Queue,
    /// Worker health per worker and kind since the daemon started, with a score.
    Workers,
    /// The watchdog's rules with the running daemon's thresholds.
    Rules,
    /// The daemon's status: its store and worker id and, on Postgres, who leads, since when,
    /// and whether this host's daemon leads or stands by.
    Status,
    /// Check the store, leases, jobs and (with --config) a config file; exit 1 on any problem.
    Doctor(DoctorArgs),
    /// The external worker protocol: claim work, report on it, finish it.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    ///
    /// bash: `keel completions bash > /etc/bash_completion.d/keel`; zsh: into a directory of
    /// your $fpath as `_keel`; fish: `~/.config/fish/completions/keel.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print keel's man page (roff): `keel man > /usr/local/share/man/man1/keel.1`.
    Man,
    /// The fence guard a leading daemon starts for itself (`cli/src/fence_guard.rs`): kills
    /// its commands if it stops or dies while leading. Not for people.
    #[command(hide = true)]
    FenceGuard {
        /// The daemon's attempts directory.
        #[arg(long)]
        attempts_dir: PathBuf,
        /// The daemon's pid, for the log.
        #[arg(long)]
        daemon: u32,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// A keel.toml: daemon settings and jobs to add or update at start.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Serve the HTTP API and console on ADDR (e.g. 127.0.0.1:8080), as keel.toml's `[http]
    /// listen` does; a non-loopback ADDR needs `[http] tokens` (docs/api.md).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub(crate) http: Option<std::net::SocketAddr>,
    /// With --store postgres: the leadership lease's time to live (e.g. 10s). The leader
    /// renews it every third of it and stops itself when it could not for TTL minus a margin.
    /// A standby takes over within about a second of a leader's death (its sessions end),
    /// and within the TTL of a leader that is stopped or cut off. Wins over
    /// keel.toml's `[daemon] leader_ttl`; 10s unless either sets it.
    #[arg(
        long,
        env = "KEEL_LEADER_TTL",
        value_name = "DURATION",
        value_parser = leader_ttl
    )]
    pub(crate) leader_ttl: Option<std::time::Duration>,
}

/// The leader TTL when neither `--leader-ttl` nor keel.toml sets it.
pub(crate) const LEADER_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(10);

/// `--leader-ttl` (and keel.toml's `leader_ttl`): a duration from 1 s to 10 min.
pub(crate) fn leader_ttl(text: &str) -> Result<std::time::Duration, String> {
    let ms = crate::duration::parse_duration_ms(text)?;
    if !(1_000..=600_000).contains(&ms) {
        return Err("the leader TTL must be between 1s and 10m".into());
    }
    Ok(std::time::Duration::from_millis(ms))
}

#[derive(Debug, Subcommand)]
pub(crate) enum JobCommand {
    /// Add a job: a command keel runs, or (--worker-kind) work for external workers.
    #[command(
        group(ArgGroup::new("schedule").required(true).args(["cron", "at", "every"])),
        after_help = "Examples:\n  \
            keel job add backup --cron '0 30 2 * * *' --tz Europe/Paris -- /usr/local/bin/backup --full\n  \
            keel job add ping --every 5m --attempts 5 --backoff 1s..1m -- curl -fsS https://example.com/\n  \
            keel job add report --at 2026-06-01T09:00:00Z --worker-kind render --payload '{\"id\": 7}'"
    )]
    Add(Box<AddArgs>),
    /// List jobs.
    #[command(visible_alias = "list")]
    Ls,
    /// Show a job: its definition, state, next fire time and recent runs.
    Show(NameArg),
    /// A job's history: every change to its definition and state, who made it and why.
    History(NameArg),
    /// Remove a job (its history stays; a run under way finishes).
    #[command(visible_alias = "remove")]
    Rm(NameArg),
    /// Pause a job: no slot fires until it is resumed.
    Pause(NameArg),
    /// Resume a paused job (missed slots follow its misfire policy).
    Resume(NameArg),
    /// Start a run of a job now, outside its schedule.
    Trigger(NameArg),
}

#[derive(Debug, Args)]
pub(crate) struct NameArg {
    /// The job's name.
    pub(crate) name: String,
}

#[derive(Debug, Args)]
pub(crate) struct AddArgs {
    /// The job's name: letters, digits, '-', '_', '.', ':'.
    pub(crate) name: String,
    #[arg(long, value_name = "EXPR", help = CRON_HELP)]
    pub(crate) cron: Option<String>,
    /// The IANA time zone of --cron (default UTC), e.g. Europe/Paris; `local`: the system's
    /// zone, resolved now and shown by `job show`.
    #[arg(long, value_name = "ZONE")]
    pub(crate) tz: Option<String>,
    /// Fire once: an RFC 3339 instant (2026-01-01T09:00:00Z) or +DURATION from now (+10m).
    #[arg(long, value_name = "TIME")]
    pub(crate) at: Option<String>,
    /// Fire every DURATION (at least 1s) on a grid aligned to the Unix epoch (5m fires at
    /// :00, :05, … UTC).
    #[arg(long, value_name = "DURATION")]
    pub(crate) every: Option<String>,
    /// Attempts in total, the first included (default 3).
    #[arg(long, value_name = "N")]
    pub(crate) attempts: Option<u32>,
    /// Retry backoff: the first delay, optionally ..the largest (default 1s..5m), doubling
    /// per failed attempt, with full jitter.
    #[arg(long, value_name = "DURATION[..MAX]")]
    pub(crate) backoff: Option<String>,
    /// Retry delay jitter: `full` (default: a random delay up to the backoff, so retries of many
    /// runs spread out) or `none` (exactly the backoff).
    #[arg(long, value_name = "none|full")]
    pub(crate) jitter: Option<String>,
    /// Attempt timeout: the attempt is asked to stop, then killed 10 s later.
    #[arg(long, value_name = "DURATION")]
    pub(crate) timeout: Option<String>,
    /// What a slot does while a run of the job is still active.
    #[arg(long, value_name = "POLICY", value_parser = ["skip", "buffer-one", "allow"])]
    pub(crate) overlap: Option<String>,
    /// What happens to slots missed while keel was down: fire-once-now (default), skip, or
    /// catch-up:N (the N latest).
    #[arg(long, value_name = "POLICY")]
    pub(crate) misfire: Option<String>,
    /// Delete a one-shot job (--at) once its run has finished, instead of disabling it.
    #[arg(long)]
    pub(crate) delete_after_run: bool,
    /// POST each finished run's result as JSON to this http(s) URL (repeatable).
    #[arg(long, value_name = "URL")]
    pub(crate) notify: Vec<String>,
    /// Which runs --notify posts: `always` (default) or `failure` (failed runs only).
    #[arg(long, value_name = "WHEN")]
    pub(crate) notify_on: Option<String>,
    /// Run by external workers that claim this kind (`keel worker claim --kind KIND`); no
    /// PROGRAM.
    #[arg(long, value_name = "KIND")]
    pub(crate) worker_kind: Option<String>,
    /// The payload handed to external workers (with --worker-kind).
    #[arg(long, value_name = "TEXT")]
    pub(crate) payload: Option<String>,
    /// An artifact a worker's completion must report (repeatable; with --worker-kind). A URL
    /// must answer HTTP 200 and a path must exist before the completion is accepted.
    #[arg(long = "require-artifact", value_name = "NAME")]
    pub(crate) require_artifacts: Vec<String>,
    /// Run `sh -c "PROGRAM ARGS…"` (joined by spaces) instead of the program itself.
    #[arg(long)]
    pub(crate) shell: bool,
    /// The command's working directory (made absolute here).
    #[arg(long, value_name = "DIR")]
    pub(crate) cwd: Option<PathBuf>,
    /// An environment variable for the command (repeatable).
    #[arg(long, value_name = "K=V")]
    pub(crate) env: Vec<String>,
    /// An exit code that means success (repeatable); overrides the default mapping (0 only).
    #[arg(long, value_name = "CODE", allow_negative_numbers = true)]
    pub(crate) exit_success: Vec<i32>,
    /// An exit code that means "retry" (repeatable); overrides the default mapping.
    #[arg(long, value_name = "CODE", allow_negative_numbers = true)]
    pub(crate) exit_retryable: Vec<i32>,
    /// An exit code that means "never retry" (repeatable); overrides the default mapping.
    #[arg(long, value_name = "CODE", allow_negative_numbers = true)]
    pub(crate) exit_permanent: Vec<i32>,
    /// Replace the definition of an existing job of this name instead of refusing.
    #[arg(long)]
    pub(crate) replace: bool,
    /// The program and its arguments, after `--`. Run directly, never through a shell unless
    /// --shell.
    #[arg(last = true, value_name = "PROGRAM [ARGS]")]
    pub(crate) program: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct NextArgs {
    /// The job's name.
    pub(crate) name: String,
    /// How many fire times to show (1 to 1000).
    #[arg(short = 'n', long = "count", default_value_t = 5, value_name = "N", value_parser = count)]
    pub(crate) count: usize,
}

/// A count of fire times: at least one (zero would read as "the job never fires again").
fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a count from 1 to 1000")),
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct RunsArgs {
    #[command(subcommand)]
    pub(crate) command: Option<RunsCommand>,
    /// Only this job's runs.
    #[arg(long, value_name = "NAME")]
    pub(crate) job: Option<String>,
    /// Only runs in this state: queued, backing_off, starting, running, succeeded, failed,
    /// failed_dropped, cancelled, interrupted.
    #[arg(long, value_name = "STATE")]
    pub(crate) state: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) limit: usize,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunsCommand {
    /// Show one run and its audit trail.
    Show(RunArg),
    /// Cancel an active run (a running attempt is asked to stop).
    Cancel(RunArg),
    /// Release, reclaim or restore a running run's lease, saying why (audited, reversible).
    Lease(LeaseArgs),
}

#[derive(Debug, Args)]
pub(crate) struct LeaseArgs {
    /// The run: `run-42` or `42`.
    pub(crate) run: String,
    /// `release` (the run waits for a worker; no attempt used), `reclaim` (as the watchdog
    /// would: the attempt counts as lost), or `restore` (undo either: the previous owner gets
    /// the lease back under a new token).
    #[arg(value_enum)]
    pub(crate) action: LeaseAction,
    /// Why, for the audit trail.
    #[arg(long)]
    pub(crate) reason: String,
}

/// `keel runs lease`'s actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LeaseAction {
    Release,
    Reclaim,
    Restore,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// The run: `run-42` or `42`.
    pub(crate) run: String,
    /// The attempt (default: the last one with output).
    #[arg(long, value_name = "N")]
    pub(crate) attempt: Option<u32>,
    /// Keep printing what the command writes until its run ends.
    #[arg(long, short)]
    pub(crate) follow: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RunArg {
    /// The run: `run-42` or `42`.
    pub(crate) run: String,
}

#[derive(Debug, Args)]
pub(crate) struct LimitArgs {
    /// At most this many runs.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) limit: usize,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct IncidentsArgs {
    #[command(subcommand)]
    pub(crate) command: Option<IncidentCommand>,
    /// Only incidents that are still open.
    #[arg(long)]
    pub(crate) open: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum IncidentCommand {
    /// Open an incident by hand: what you saw, and what it concerns.
    Open {
        /// What you saw.
        details: String,
        /// The job concerned.
        #[arg(long, value_name = "NAME")]
        job: Option<String>,
        /// The run concerned (`run-42` or `42`).
        #[arg(long, value_name = "RUN")]
        run: Option<String>,
        /// The worker concerned.
        #[arg(long, value_name = "ID")]
        worker: Option<String>,
    },
    /// Acknowledge an open incident: someone is on it.
    Ack {
        /// The incident's number.
        id: u64,
        /// A note for the others.
        #[arg(long, visible_alias = "reason", default_value = "")]
        note: String,
    },
    /// Resolve an open incident, saying why.
    Resolve {
        /// The incident's number.
        id: u64,
        /// Why it is resolved.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Also check this config file.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Repair a damaged fs store first: rewrite it from what is readable (the damaged bytes
    /// stay in quarantine/), record what was lost as a `store_repaired` incident, and print
    /// it. Refused while a daemon holds the store.
    #[arg(long)]
    pub(crate) repair: bool,
    /// On a Postgres store that refuses its database after a failover or a restore ("the
    /// store's database changed"): accept the database it is on now as the store's own. Check
    /// first that no acknowledged batch was lost (see docs/storage.md, "A database that failed
    /// over").
    #[arg(long)]
    pub(crate) accept_database: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum WorkerCommand {
    /// Claim the oldest queued run of these kinds; print the attempt as JSON. Exit 3 if
    /// nothing is due.
    Claim(ClaimArgs),
    /// Renew the lease (a heartbeat): do it at least every half lease (15 s with the daemon's
    /// default lease_ttl of 30 s) while working.
    Touch(TokenArgs),
    /// Report progress (also a sign of life).
    Progress(ProgressArgs),
    /// Print the attempt's context as JSON: payload, lease, last checkpoint, progress.
    Context(TokenArgs),
    /// Save a checkpoint, read from stdin; the run's next attempt gets it.
    Checkpoint(TokenArgs),
    /// Finish the attempt successfully.
    Complete(CompleteArgs),
    /// Fail the attempt: retried by the job's retry policy, or never with --permanent.
    Fail(FailArgs),
    /// Ask keel to check an artifact (an http(s) URL must answer 200, an absolute path must
    /// exist); the evidence is kept with the run, and a completion reporting it reuses it.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ClaimArgs {
    /// A job kind this worker runs (repeatable).
    #[arg(long = "kind", required = true, value_name = "KIND")]
    pub(crate) kinds: Vec<String>,
    /// This worker's id (letters, digits, '-', '_', '.', ':'); it holds the lease.
    #[arg(long, value_name = "ID")]
    pub(crate) worker: String,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    pub(crate) attempt: TokenArgs,
    /// The artifact: an http(s) URL, a file:// URL or an absolute path.
    pub(crate) target: String,
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The run, as `worker claim` printed it.
    pub(crate) run: String,
    /// The attempt's fencing token, as `worker claim` printed it.
    #[arg(long, value_name = "TOKEN")]
    pub(crate) token: String,
}

#[derive(Debug, Args)]
pub(crate) struct ProgressArgs {
    #[command(flatten)]
    pub(crate) attempt: TokenArgs,
    /// A short phase name (download, render, upload).
    #[arg(long, value_name = "PHASE")]
    pub(crate) phase: String,
    /// What is happening.
    pub(crate) message: String,
}

#[derive(Debug, Args)]
pub(crate) struct CompleteArgs {
    #[command(flatten)]
    pub(crate) attempt: TokenArgs,
    /// A named output (repeatable); a job may require some.
    #[arg(long = "artifact", value_name = "NAME=VALUE")]
    pub(crate) artifacts: Vec<String>,
    /// A short result, kept with the run.
    #[arg(long, value_name = "TEXT")]
    pub(crate) summary: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct FailArgs {
    #[command(flatten)]
    pub(crate) attempt: TokenArgs,
    /// Never retry this run.
    #[arg(long)]
    pub(crate) permanent: bool,
    /// What went wrong.
    pub(crate) message: String,
}

/// `--http ADDR`: an IP address and a port.
fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address and port, such as 127.0.0.1:8080 or [::1]:8080 (names \
             such as localhost are not resolved)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn next_shows_at_least_one_fire_time() {
        assert!(Cli::try_parse_from(["keel", "next", "job", "-n", "0"]).is_err());
        assert!(Cli::try_parse_from(["keel", "next", "job", "-n", "3"]).is_ok());
    }

    #[test]
    fn job_add_takes_the_program_after_the_separator() {
        let cli = Cli::try_parse_from([
            "keel",
            "job",
            "add",
            "x",
            "--every",
            "5m",
            "--",
            "echo",
            "--not-a-flag",
        ])
        .unwrap();
        let Command::Job(JobCommand::Add(args)) = cli.command else {
            panic!("not job add");
        };
        assert_eq!(args.program, ["echo", "--not-a-flag"]);
        assert_eq!(args.every.as_deref(), Some("5m"));
    }

    #[test]
    fn job_add_needs_exactly_one_schedule() {
        let none = Cli::try_parse_from(["keel", "job", "add", "x", "--", "true"]).unwrap_err();
        assert_eq!(none.exit_code(), 2);
        let two = Cli::try_parse_from([
            "keel", "job", "add", "x", "--at", "+1m", "--every", "1m", "--", "true",
        ])
        .unwrap_err();
        assert_eq!(two.exit_code(), 2);
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli =
            Cli::try_parse_from(["keel", "job", "ls", "--json", "--data-dir", "/tmp/k"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.data_dir, Some(PathBuf::from("/tmp/k")));
    }
}

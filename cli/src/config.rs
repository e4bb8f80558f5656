//! keel.toml: the daemon's settings and the jobs it adds or updates when it starts.
//!
//! ```toml
//! [daemon]
//! shutdown_budget = "30s"          # how long a graceful stop may take
//! metrics = "127.0.0.1:9464"       # serve Prometheus metrics (off unless set)
//! lease_ttl = "30s"                # how long a lease lasts unless renewed
//! lease_grace = "10s"              # how long after expiry the watchdog reclaims it
//! delivery_backoff = "30s"         # first retry delay of a result delivery (doubling)
//! delivery_attempts = 3            # delivery attempts in total, the first included
//! store = "postgres"               # "fs" (the default), "sled" or "postgres"
//! database_url = "postgresql://keel@db.internal/keel"  # with store = "postgres"
//! leader_ttl = "10s"               # with store = "postgres": the leadership lease's TTL
//! history_runs = 100               # finished runs kept per job (with their audit records)
//! history_age = "30d"              # finished runs older than this are deleted
//!
//! [watchdog]
//! profile = "design"               # "keel" (the default) or "design": a set of thresholds
//! lease_grace = "60s"              # reclaim a lease this long after it expires
//! stuck_after = "10m"              # running work silent this long is stuck
//! unclaimed_after = "10m"          # queued work unclaimed this long is stuck ("0s": never)
//! idle_claims = 3                  # empty claims in a row that make an idle claim loop
//! failing_after = 3                # failed runs in a row that make a job failing (0: never)
//! notify = ["ops=https://hooks.example.com/keel", "command:/usr/local/bin/page-oncall"]
//! escalate_after = "15m"           # open and unacknowledged this long: escalate ("0s": never)
//! escalate_to = ["pager=https://pager.example.com/hook"]  # where escalations go (else notify)
//!
//! [[job]]
//! name = "heartbeat"
//! cron = "*/10 * * * * *"
//! command = ["echo", "alive"]
//! ```
//!
//! Every `[[job]]` key is a `keel job add` flag ([`JobDef`]). Unknown keys are errors that
//! name the key and its line.
//!
//! `[watchdog]` picks a profile ([`WatchdogProfile`]) and overrides it key by key. `[daemon]
//! lease_grace` and `[daemon] failing_after`, which came first, still work as aliases of the
//! `[watchdog]` keys; setting a key in both sections is an error naming both lines.
//!
//! `store`, `database_url` and `leader_ttl` are what `--store`, `--database-url` (and
//! `KEEL_DATABASE_URL`) and `--leader-ttl` (and `KEEL_LEADER_TTL`) set; the command line and
//! the environment win over the file. A database URL read from the file is never printed
//! whole: not in an error, not in `Debug`; an error about the connection names only where it
//! went (host, port, user, database, `sslmode`), never the password.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::cli::StoreKind;
use crate::duration::{format_duration_ms, parse_duration_ms};
use crate::error::Failure;
use crate::jobdef::{JobDef, Prior, Resolve};
use crate::place::DatabaseUrl;
use keel_core::outbox::{DeliveryPolicy, OutboxConfig, OverflowPolicy};
use keel_core::{limits, HistoryPolicy, LeasePolicy, Timestamp, WatchdogProfile};

/// The shutdown budget when the config does not set one.
pub(crate) const SHUTDOWN_BUDGET_DEFAULT: Duration = Duration::from_secs(30);

/// The shortest `lease_ttl`: the daemon renews its own attempts' leases every half TTL, and an
/// external worker must touch its lease as often.
const LEASE_TTL_MIN_MS: u64 = 1_000;

/// A loaded, checked config file.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// Where it was read from.
    pub(crate) path: PathBuf,
    /// How long a graceful shutdown may take.
    pub(crate) shutdown_budget: Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub(crate) metrics: Option<SocketAddr>,
    /// Lease timing (`lease_ttl`, `lease_grace`).
    pub(crate) lease: LeasePolicy,
    /// How result deliveries are retried (`delivery_backoff`, `delivery_attempts`).
    pub(crate) delivery: DeliveryPolicy,
    /// Failed runs in a row that raise a `failing_job` incident (`failing_after`; 0: never).
    pub(crate) failing_after: u32,
    /// How much history is kept per job (`history_runs`, `history_age`).
    pub(crate) history: HistoryPolicy,
    /// The `[watchdog]` thresholds not kept above: `profile`, `stuck_after`,
    /// `unclaimed_after`, `idle_claims`.
    pub(crate) watchdog: Watchdog,
    /// Where incidents are told (`[watchdog] notify`, `escalate_after`, `escalate_to`).
    pub(crate) incidents: IncidentNotify,
    /// The delivery outbox's capacity and overflow policy (`outbox_capacity`,
    /// `outbox_overflow`).
    pub(crate) outbox: (usize, OverflowPolicy),
    /// The HTTP API's listener and tokens file (`[http]`), if it is on.
    pub(crate) http: Option<crate::http::auth::HttpSettings>,
    /// The store adapter (`store`), unless the file leaves it to the command line.
    pub(crate) store: Option<StoreKind>,
    /// The database (`database_url`), redacted in `Debug`.
    pub(crate) database_url: Option<DatabaseUrl>,
    /// The leadership lease's time to live (`leader_ttl`).
    pub(crate) leader_ttl: Option<Duration>,
    /// The jobs, in file order, each with its line.
    pub(crate) jobs: Vec<(JobDef, usize)>,
}

/// The `[watchdog]` thresholds, resolved: the profile's, overridden key by key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Watchdog {
    /// The profile named (`keel` unless set).
    pub(crate) profile: WatchdogProfile,
    /// `stuck_after`.
    pub(crate) stuck_after_ms: u64,
    /// `unclaimed_after`; 0: never.
    pub(crate) unclaimed_after_ms: u64,
    /// `idle_claims`.
    pub(crate) idle_claims_max: u32,
}

/// `[watchdog] notify`, `escalate_after` and `escalate_to`: the sinks incidents are told to
/// (SPEC A3), each entry a webhook URL (`NAME=URL` names it) or `command:PROGRAM ARG…`
/// (`NAME=command:…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IncidentNotify {
    /// `notify`: told when an incident opens, is acknowledged and resolves.
    pub(crate) sinks: Vec<String>,
    /// `escalate_after`; 0: never.
    pub(crate) escalate_after_ms: u64,
    /// `escalate_to`: told when an incident escalates; empty: `sinks`.
    pub(crate) escalation_sinks: Vec<String>,
}

impl IncidentNotify {
    /// Every distinct entry, for registering the sinks at start.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &String> {
        self.sinks.iter().chain(&self.escalation_sinks)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    daemon: Daemon,
    #[serde(default)]
    http: Option<Spanned<HttpSection>>,
    #[serde(default)]
    watchdog: WatchdogKeys,
    #[serde(default)]
    job: Vec<Spanned<JobDef>>,
}

/// `[http]`: the HTTP API and console (docs/api.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: String,
    tokens: Option<PathBuf>,
    /// Where other hosts reach this API (`http://host-a.internal:8080`): what a leader of a
    /// Postgres store advertises in its lease.
    advertise: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Daemon {
    shutdown_budget: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<String>>,
    lease_grace: Option<Spanned<String>>,
    delivery_backoff: Option<Spanned<String>>,
    delivery_attempts: Option<Spanned<i64>>,
    failing_after: Option<Spanned<i64>>,
    outbox_capacity: Option<Spanned<i64>>,
    outbox_overflow: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    database_url: Option<Spanned<String>>,
    leader_ttl: Option<Spanned<String>>,
    history_runs: Option<Spanned<i64>>,
    history_age: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchdogKeys {
    profile: Option<Spanned<String>>,
    lease_grace: Option<Spanned<String>>,
    stuck_after: Option<Spanned<String>>,
    unclaimed_after: Option<Spanned<String>>,
    idle_claims: Option<Spanned<i64>>,
    failing_after: Option<Spanned<i64>>,
    notify: Option<Spanned<Vec<String>>>,
    escalate_after: Option<Spanned<String>>,
    escalate_to: Option<Spanned<Vec<String>>>,
}

impl Config {
    /// The directory relative paths in the file (a job's `cwd`) are resolved against.
    pub(crate) fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The `[daemon]` settings, to tell whether a reloaded file changed them.
    pub(crate) fn daemon_settings(&self) -> String {
        format!(
            "{:?}",
            (
                self.shutdown_budget,
                self.metrics,
                self.lease,
                self.delivery,
                (self.failing_after, self.history),
                self.outbox,
                self.watchdog,
                &self.incidents,
                &self.http,
                self.store,
                self.leader_ttl,
                // Compared, never printed.
                self.database_url.as_ref().map(|url| {
                    use std::hash::{Hash, Hasher};
                    let mut hasher = std::hash::DefaultHasher::new();
                    url.0.hash(&mut hasher);
                    hasher.finish()
                }),
            )
        )
    }

    /// The file's path as its jobs' origin names it: absolute, so that the same file started
    /// from another directory still owns its jobs.
    pub(crate) fn path_for_origin(&self) -> PathBuf {
        std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone())
    }

    /// Where relative `cwd`s of this config's jobs resolve, as an absolute path when possible.
    pub(crate) fn base_dir(&self) -> PathBuf {
        std::path::absolute(self.dir()).unwrap_or_else(|_| self.dir().to_path_buf())
    }

    /// The scheduler's configuration: keel-core's defaults with this file's lease, delivery and
    /// watchdog settings.
    pub(crate) fn core(&self) -> keel_core::Config {
        let default = keel_core::Config::default();
        keel_core::Config {
            lease: self.lease,
            outbox: OutboxConfig {
                policy: self.delivery,
                capacity: self.outbox.0,
                overflow: self.outbox.1,
            },
            failing_after: self.failing_after,
            history: self.history,
            stuck_after_ms: self.watchdog.stuck_after_ms,
            unclaimed_after_ms: self.watchdog.unclaimed_after_ms,
            idle_claims_max: self.watchdog.idle_claims_max,
            incident_sinks: self
                .incidents
                .sinks
                .iter()
                .map(|s| s.as_str().into())
                .collect(),
            escalate_after_ms: self.incidents.escalate_after_ms,
            escalation_sinks: (self.incidents.escalation_sinks.iter())
                .map(|s| s.as_str().into())
                .collect(),
            ..default
        }
    }
}

/// The scheduler's configuration for a daemon started with `config`, or without one.
pub(crate) fn core_config(config: Option<&Config>) -> keel_core::Config {
    config.map_or_else(keel_core::Config::default, Config::core)
}

/// Reads and checks a config file. Every problem is reported, each with its line.
pub(crate) fn load(path: &Path) -> Result<Config, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read config {}: {e}", path.display())))?;
    parse(&text, path).map_err(|problems| {
        Failure::input(format!(
            "config {} is not valid:\n  {}",
            path.display(),
            problems.join("\n  ")
        ))
    })
}

/// Parses and checks config text; `Err` lists every problem found.
pub(crate) fn parse(text: &str, path: &Path) -> Result<Config, Vec<String>> {
    let file: File = toml::from_str(text).map_err(|e| vec![toml_error(&e)])?;
    let mut problems = Vec::new();
    let daemon = &file.daemon;
    let shutdown_budget = daemon
        .shutdown_budget
        .as_ref()
        .and_then(|value| match parse_duration_ms(value.get_ref()) {
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(e) => {
                problems.push(daemon_problem(text, value, "shutdown_budget", &e));
                None
            }
        })
        .unwrap_or(SHUTDOWN_BUDGET_DEFAULT);
    let metrics = daemon.metrics.as_ref().and_then(|value| {
        let problem = match value.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => return Some(addr),
            Ok(addr) => format!(
                "{addr} is not a loopback address; metrics say what runs and where results go, \
                 so keel serves them on 127.0.0.1 or ::1 only"
            ),
            Err(_) => format!(
                "{:?} is not an address such as \"127.0.0.1:9464\"",
                value.get_ref()
            ),
        };
        problems.push(daemon_problem(text, value, "metrics", &problem));
        None
    });
    let profile = watchdog_profile(text, &file.watchdog, &mut problems);
    let base = profile.apply(keel_core::Config::default());
    let (lease, delivery) = timings(text, daemon, base.lease, &mut problems);
    let (mut lease, mut failing_after) = (lease, base.failing_after);
    if let Some(value) = &daemon.failing_after {
        failing_after =
            count(text, value, "[daemon] failing_after", 0, &mut problems).unwrap_or(failing_after);
    }
    let watchdog = watchdog(
        text,
        daemon,
        &file.watchdog,
        (profile, base),
        (&mut lease, &mut failing_after),
        &mut problems,
    );
    let incidents = incident_notify(text, &file.watchdog, &mut problems);
    let outbox = outbox(text, daemon, &mut problems);
    let history = history(text, daemon, &mut problems);
    let (store, database_url, leader_ttl) = placement(text, daemon, &mut problems);
    let http = file.http.as_ref().and_then(|section| {
        let line = line_of(text, section.span().start);
        let section = section.get_ref();
        let listen = match section.listen.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                problems.push(format!(
                    "line {line}: [http] listen: {:?} is not an address such as \
                     \"127.0.0.1:8080\"",
                    section.listen
                ));
                return None;
            }
        };
        // A relative tokens file is the config file's neighbour.
        let tokens = section
            .tokens
            .as_ref()
            .map(|t| path.parent().unwrap_or(Path::new(".")).join(t));
        let advertise = match section
            .advertise
            .as_deref()
            .map(crate::anyhost::advertise_url)
        {
            None => None,
            Some(Ok(url)) => Some(url),
            Some(Err(e)) => {
                problems.push(format!("line {line}: [http] advertise: {e}"));
                return None;
            }
        };
        let settings = crate::http::auth::HttpSettings {
            listen,
            tokens,
            advertise,
        };
        if let Err(e) = settings.tokens() {
            problems.push(format!("line {line}: {e}"));
            return None;
        }
        Some(settings)
    });
    let mut config = Config {
        path: path.to_path_buf(),
        shutdown_budget,
        metrics,
        lease,
        delivery,
        failing_after,
        history,
        watchdog,
        incidents,
        outbox,
        http,
        store,
        database_url,
        leader_ttl,
        jobs: Vec::new(),
    };
    let base_dir = config.base_dir();
    let mut names = std::collections::BTreeMap::new();
    let lines = Lines::new(text);
    for job in file.job {
        let line = lines.of(job.span().start);
        let def = job.into_inner();
        if let Some(first) = names.insert(def.name.clone(), line) {
            problems.push(format!(
                "line {line}: job {:?} is defined twice (first at line {first})",
                def.name
            ));
        }
        let resolve = Resolve {
            now: Timestamp::EPOCH,
            base_dir: &base_dir,
            prior: Prior::None,
        };
        if let Err(e) = check(&def, resolve) {
            problems.push(format!("line {line}: job {:?}: {e}", def.name));
        }
        config.jobs.push((def, line));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// `lease_ttl`, `lease_grace`, `delivery_backoff` and `delivery_attempts` over `lease` (the
/// watchdog profile's) and keel-core's delivery defaults; a bad value is a problem (and its
/// default is kept meanwhile).
fn timings(
    text: &str,
    daemon: &Daemon,
    lease: LeasePolicy,
    problems: &mut Vec<String>,
) -> (LeasePolicy, DeliveryPolicy) {
    let mut lease = lease;
    let mut delivery = DeliveryPolicy::default();
    let max = format_duration_ms(limits::DELAY_MAX_MS);
    // A duration within `min..=DELAY_MAX_MS`.
    let duration = |value: &Spanned<String>, min: u64| -> Result<u64, String> {
        let ms = parse_duration_ms(value.get_ref())?;
        if ms < min {
            Err(format!(
                "{} is too short: the least is {}",
                value.get_ref(),
                format_duration_ms(min)
            ))
        } else if ms > limits::DELAY_MAX_MS {
            Err(format!(
                "{} is too long: the most is {max}",
                value.get_ref()
            ))
        } else {
            Ok(ms)
        }
    };
    if let Some(value) = &daemon.lease_ttl {
        match duration(value, LEASE_TTL_MIN_MS) {
            Ok(ttl_ms) => {
                lease.ttl_ms = ttl_ms;
                // The holder's safety margin keeps its default share of the TTL (5 s of 30 s),
                // so that a short lease is not given up as lost the moment it is granted.
                lease.margin_ms = lease.margin_ms.min(ttl_ms / 6);
            }
            Err(e) => problems.push(daemon_problem(
                text,
                value,
                "lease_ttl",
                &format!("{e} (the daemon renews its leases every half TTL)"),
            )),
        }
    }
    if let Some(value) = &daemon.lease_grace {
        match duration(value, 0) {
            Ok(ms) => lease.grace_ms = ms,
            Err(e) => problems.push(daemon_problem(text, value, "lease_grace", &e)),
        }
    }
    if let Some(value) = &daemon.delivery_backoff {
        match duration(value, 1) {
            Ok(ms) => {
                delivery.backoff_base_ms = ms;
                // The delay doubles per failure up to the cap (5 min); a longer first delay
                // raises the cap rather than being cut to it.
                delivery.backoff_cap_ms = delivery.backoff_cap_ms.max(ms);
            }
            Err(e) => problems.push(daemon_problem(text, value, "delivery_backoff", &e)),
        }
    }
    if let Some(value) = &daemon.delivery_attempts {
        let attempts = *value.get_ref();
        match u32::try_from(attempts) {
            Ok(n) if (1..=limits::DELIVERY_ATTEMPTS_MAX).contains(&n) => delivery.attempts_max = n,
            _ => problems.push(daemon_problem(
                text,
                value,
                "delivery_attempts",
                &format!(
                    "{attempts} is out of range: attempts in total, the first included, from 1 \
                     to {}",
                    limits::DELIVERY_ATTEMPTS_MAX
                ),
            )),
        }
    }
    (lease, delivery)
}

/// `outbox_capacity` and `outbox_overflow` over keel-core's defaults.
fn outbox(text: &str, daemon: &Daemon, problems: &mut Vec<String>) -> (usize, OverflowPolicy) {
    let default = OutboxConfig::default();
    let capacity = match &daemon.outbox_capacity {
        None => default.capacity,
        Some(value) => match usize::try_from(*value.get_ref()) {
            Ok(n) if (1..=limits::OUTBOX_CAPACITY_MAX).contains(&n) => n,
            _ => {
                problems.push(daemon_problem(
                    text,
                    value,
                    "outbox_capacity",
                    &format!(
                        "{} is out of range: deliveries held at once, from 1 to {}",
                        value.get_ref(),
                        limits::OUTBOX_CAPACITY_MAX
                    ),
                ));
                default.capacity
            }
        },
    };
    let overflow = match daemon.outbox_overflow.as_ref() {
        None => default.overflow,
        Some(value) => match value.get_ref().as_str() {
            "drop-oldest" => OverflowPolicy::DropOldest,
            "reject-newest" => OverflowPolicy::RejectNewest,
            other => {
                problems.push(daemon_problem(
                    text,
                    value,
                    "outbox_overflow",
                    &format!(
                        "{other:?}: expected \"drop-oldest\" (make room by dropping the oldest \
                         waiting delivery) or \"reject-newest\" (drop the new one)"
                    ),
                ));
                default.overflow
            }
        },
    };
    (capacity, overflow)
}

/// The shortest `history_age`: a younger limit would delete a run's record about as soon as it
/// is written, before anyone could read it.
const HISTORY_AGE_MIN_MS: u64 = 60 * 1000;

/// The longest `history_age`: ten years.
pub(crate) const HISTORY_AGE_MAX_MS: u64 = 3650 * 24 * 3600 * 1000;

/// `history_runs` and `history_age` over keel-core's `HistoryPolicy::default()` (100 runs, 30
/// days). The scheduler holds the history the policy keeps, in memory and in the store: about
/// 2 KB per finished run with its audit records, so `jobs × history_runs` bounds it.
fn history(text: &str, daemon: &Daemon, problems: &mut Vec<String>) -> HistoryPolicy {
    let mut policy = HistoryPolicy::default();
    if let Some(value) = &daemon.history_runs {
        match u32::try_from(*value.get_ref()) {
            Ok(n) if (1..=limits::HISTORY_RUNS_MAX).contains(&n) => policy.runs_max = n,
            _ => problems.push(daemon_problem(
                text,
                value,
                "history_runs",
                &format!(
                    "{} is out of range: finished runs kept per job, from 1 to {}",
                    value.get_ref(),
                    limits::HISTORY_RUNS_MAX
                ),
            )),
        }
    }
    if let Some(value) = &daemon.history_age {
        match parse_duration_ms(value.get_ref()) {
            Ok(ms) if (HISTORY_AGE_MIN_MS..=HISTORY_AGE_MAX_MS).contains(&ms) => {
                policy.age_max_ms = ms;
            }
            Ok(_) => problems.push(daemon_problem(
                text,
                value,
                "history_age",
                &format!(
                    "{} is out of range: from {} to {}",
                    value.get_ref(),
                    format_duration_ms(HISTORY_AGE_MIN_MS),
                    format_duration_ms(HISTORY_AGE_MAX_MS)
                ),
            )),
            Err(e) => problems.push(daemon_problem(text, value, "history_age", &e)),
        }
    }
    policy
}

/// The most failed runs in a row `failing_after` may wait for.
const FAILING_AFTER_MAX: u32 = 1_000;

/// The most empty claims in a row `idle_claims` may wait for.
const IDLE_CLAIMS_MAX: u32 = 1_000;

/// The shortest `stuck_after` and non-zero `unclaimed_after`: a threshold under a second
/// would report every attempt between two heartbeats.
const WATCHDOG_THRESHOLD_MIN_MS: u64 = 1_000;

/// `[watchdog] profile`, or `keel`.
fn watchdog_profile(
    text: &str,
    keys: &WatchdogKeys,
    problems: &mut Vec<String>,
) -> WatchdogProfile {
    let Some(value) = &keys.profile else {
        return WatchdogProfile::default();
    };
    WatchdogProfile::from_name(value.get_ref()).unwrap_or_else(|| {
        problems.push(problem(
            text,
            value,
            "[watchdog] profile",
            &format!(
                "{:?}: expected \"keel\" (keel's defaults) or \"design\" (the reference \
                 design's thresholds)",
                value.get_ref()
            ),
        ));
        WatchdogProfile::default()
    })
}

/// The `[watchdog]` keys over the profile's values (`base`); `lease_grace` and `failing_after`
/// land in `lease` and `failing_after`, where `[daemon]`'s aliases may have set them already:
/// a key set in both sections is a problem naming both lines.
fn watchdog(
    text: &str,
    daemon: &Daemon,
    keys: &WatchdogKeys,
    (profile, base): (WatchdogProfile, keel_core::Config),
    (lease, failing_after): (&mut LeasePolicy, &mut u32),
    problems: &mut Vec<String>,
) -> Watchdog {
    let mut watchdog = Watchdog {
        profile,
        stuck_after_ms: base.stuck_after_ms,
        unclaimed_after_ms: base.unclaimed_after_ms,
        idle_claims_max: base.idle_claims_max,
    };
    if let Some(value) = &keys.lease_grace {
        both(
            text,
            problems,
            "lease_grace",
            daemon
                .lease_grace
                .as_ref()
                .map(|d| line_of(text, d.span().start)),
            value.span().start,
        );
        if let Some(ms) = duration(text, value, "[watchdog] lease_grace", 0, problems) {
            lease.grace_ms = ms;
        }
    }
    if let Some(value) = &keys.failing_after {
        both(
            text,
            problems,
            "failing_after",
            daemon
                .failing_after
                .as_ref()
                .map(|d| line_of(text, d.span().start)),
            value.span().start,
        );
        if let Some(n) = count(text, value, "[watchdog] failing_after", 0, problems) {
            *failing_after = n;
        }
    }
    if let Some(value) = &keys.stuck_after {
        let min = WATCHDOG_THRESHOLD_MIN_MS;
        if let Some(ms) = duration(text, value, "[watchdog] stuck_after", min, problems) {
            watchdog.stuck_after_ms = ms;
        }
    }
    if let Some(value) = &keys.unclaimed_after {
        // 0 turns the rule off; anything else must be a real threshold.
        let min = match parse_duration_ms(value.get_ref()) {
            Ok(0) => 0,
            _ => WATCHDOG_THRESHOLD_MIN_MS,
        };
        if let Some(ms) = duration(text, value, "[watchdog] unclaimed_after", min, problems) {
            watchdog.unclaimed_after_ms = ms;
        }
    }
    if let Some(value) = &keys.idle_claims {
        if let Some(n) = count(text, value, "[watchdog] idle_claims", 1, problems) {
            watchdog.idle_claims_max = n;
        }
    }
    watchdog
}

/// `[watchdog] notify`, `escalate_after` and `escalate_to`: every entry a webhook URL or a
/// `command:` sink, `escalate_after` a duration ("0s": never) that needs somewhere to go.
fn incident_notify(text: &str, keys: &WatchdogKeys, problems: &mut Vec<String>) -> IncidentNotify {
    let mut notify = IncidentNotify::default();
    let mut entries = |value: &Option<Spanned<Vec<String>>>, key: &str| -> Vec<String> {
        let Some(value) = value else {
            return Vec::new();
        };
        for entry in value.get_ref() {
            if let Err(e) = crate::jobdef::check_sink_entry(entry) {
                problems.push(problem(text, value, key, &e));
            }
        }
        value.get_ref().clone()
    };
    notify.sinks = entries(&keys.notify, "[watchdog] notify");
    notify.escalation_sinks = entries(&keys.escalate_to, "[watchdog] escalate_to");
    if let Some(value) = &keys.escalate_after {
        if let Some(ms) = duration(text, value, "[watchdog] escalate_after", 0, problems) {
            notify.escalate_after_ms = ms;
            if ms > 0 && notify.sinks.is_empty() && notify.escalation_sinks.is_empty() {
                problems.push(problem(
                    text,
                    value,
                    "[watchdog] escalate_after",
                    "an escalation needs somewhere to go: give notify or escalate_to",
                ));
            }
        }
    }
    if let (Some(value), true) = (&keys.escalate_to, notify.escalate_after_ms == 0) {
        problems.push(problem(
            text,
            value,
            "[watchdog] escalate_to",
            "says where escalations go: give escalate_after too (how long an incident stays \
             open and unacknowledged before it escalates)",
        ));
    }
    notify
}

/// A key set in `[watchdog]` (at byte `watchdog_at`) and as its `[daemon]` alias (on line
/// `daemon_line`, if set) is a problem.
fn both(
    text: &str,
    problems: &mut Vec<String>,
    key: &str,
    daemon_line: Option<usize>,
    watchdog_at: usize,
) {
    if let Some(daemon_line) = daemon_line {
        problems.push(format!(
            "line {}: [watchdog] {key}: also set as [daemon] {key} on line {daemon_line}; keep \
             one (the [daemon] key is the older alias)",
            line_of(text, watchdog_at)
        ));
    }
}

/// `store`, `database_url` and `leader_ttl`: where the daemon's data lives.
fn placement(
    text: &str,
    daemon: &Daemon,
    problems: &mut Vec<String>,
) -> (Option<StoreKind>, Option<DatabaseUrl>, Option<Duration>) {
    let store = daemon.store.as_ref().and_then(|value| {
        let kind = match value.get_ref().as_str() {
            "fs" => StoreKind::Fs,
            "sled" => StoreKind::Sled,
            "postgres" => StoreKind::Postgres,
            other => {
                problems.push(daemon_problem(
                    text,
                    value,
                    "store",
                    &format!("{other:?} is not a store: use \"fs\", \"sled\" or \"postgres\""),
                ));
                return None;
            }
        };
        Some(kind)
    });
    let database_url = daemon.database_url.as_ref().and_then(|value| {
        let url = DatabaseUrl(value.get_ref().clone());
        // The parser's message does not quote the string, so it cannot leak the password.
        match keel_store_postgres::parse_config(value.get_ref()) {
            Ok(_) => Some(url),
            Err(e) => {
                let detail = match e {
                    keel_core::StoreError::Io(detail) => detail,
                    other => other.to_string(),
                };
                problems.push(daemon_problem(
                    text,
                    value,
                    "database_url",
                    &format!("not a Postgres connection string ({detail}); the value is not shown"),
                ));
                None
            }
        }
    });
    let leader_ttl = daemon.leader_ttl.as_ref().and_then(|value| {
        crate::cli::leader_ttl(value.get_ref())
            .map_err(|e| problems.push(daemon_problem(text, value, "leader_ttl", &e)))
            .ok()
    });
    if database_url.is_some() && store.is_some_and(|kind| kind != StoreKind::Postgres) {
        if let Some(value) = &daemon.database_url {
            problems.push(daemon_problem(
                text,
                value,
                "database_url",
                "is for store = \"postgres\"; drop it or set that store",
            ));
        }
    }
    (store, database_url, leader_ttl)
}

/// A duration within `min..=DELAY_MAX_MS`, or a problem naming `key` and its line.
fn duration(
    text: &str,
    value: &Spanned<String>,
    key: &str,
    min: u64,
    problems: &mut Vec<String>,
) -> Option<u64> {
    let checked = parse_duration_ms(value.get_ref()).and_then(|ms| {
        if ms < min {
            Err(format!(
                "{} is too short: the least is {}",
                value.get_ref(),
                format_duration_ms(min)
            ))
        } else if ms > limits::DELAY_MAX_MS {
            Err(format!(
                "{} is too long: the most is {}",
                value.get_ref(),
                format_duration_ms(limits::DELAY_MAX_MS)
            ))
        } else {
            Ok(ms)
        }
    });
    checked
        .map_err(|e| problems.push(problem(text, value, key, &e)))
        .ok()
}

/// A count within `min..=1000` (`failing_after`, `idle_claims`), or a problem naming `key`
/// and its line.
fn count(
    text: &str,
    value: &Spanned<i64>,
    key: &str,
    min: u32,
    problems: &mut Vec<String>,
) -> Option<u32> {
    const MAX: u32 = if FAILING_AFTER_MAX > IDLE_CLAIMS_MAX {
        FAILING_AFTER_MAX
    } else {
        IDLE_CLAIMS_MAX
    };
    match u32::try_from(*value.get_ref()) {
        Ok(n) if (min..=MAX).contains(&n) => Some(n),
        _ => {
            let never = if min == 0 { ", or 0 for never" } else { "" };
            let least = min.max(1);
            problems.push(problem(
                text,
                value,
                key,
                &format!(
                    "{} is out of range: from {least} to {MAX}{never}",
                    value.get_ref()
                ),
            ));
            None
        }
    }
}

/// A problem with the value of `key` (with its section: "[watchdog] idle_claims"), on its
/// line.
fn problem<T>(text: &str, value: &Spanned<T>, key: &str, problem: &str) -> String {
    let line = line_of(text, value.span().start);
    format!("line {line}: {key}: {problem}")
}

/// A problem with the value of a `[daemon]` key, on its line.
fn daemon_problem<T>(text: &str, value: &Spanned<T>, key: &str, problem: &str) -> String {
    let line = line_of(text, value.span().start);
    format!("line {line}: [daemon] {key}: {problem}")
}

/// Checks a job definition without depending on the time: a one-shot in the past is fine here
/// (it fires at once, or it already ran).
fn check(def: &JobDef, resolve: Resolve<'_>) -> Result<(), String> {
    def.to_spec(resolve).map(drop)
}

/// toml's message, which names the key and quotes the line, on one line of ours.
fn toml_error(error: &toml::de::Error) -> String {
    let message = error.message();
    match error.span() {
        Some(span) => {
            let text_line = error.to_string();
            // "TOML parse error at line L, column C" is the first line of the full text.
            let at = text_line
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("TOML parse error at "))
                .unwrap_or("");
            if at.is_empty() {
                format!("bytes {}..{}: {message}", span.start, span.end)
            } else {
                format!("{at}: {message}")
            }
        }
        None => message.to_string(),
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |before| {
        before.bytes().filter(|b| *b == b'\n').count() + 1
    })
}

/// The lines of one text, for a line number per job: [`line_of`] counts from the start each
/// time, which is right for a problem or a section and quadratic for every job of a config
/// with a hundred thousand (the daemon spent minutes before its first job).
struct Lines(Vec<usize>);

impl Lines {
    /// Finds the text's newlines once.
    fn new(text: &str) -> Self {
        Lines(
            text.bytes()
                .enumerate()
                .filter_map(|(i, b)| (b == b'\n').then_some(i))
                .collect(),
        )
    }

    /// The line of byte `offset`, from 1: as [`line_of`] says, by a binary search.
    fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_number_every_offset_as_line_of_does() {
        let text = "a = 1\n\n[[job]]\nname = \"é\"\n\nend";
        let lines = Lines::new(text);
        for offset in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            assert_eq!(lines.of(offset), line_of(text, offset), "offset {offset}");
        }
        assert_eq!(lines.of(text.find("[[job]]").unwrap()), 3);
    }

    /// `examples/keel.service` stops keel the way SPEC O1 needs: SIGTERM to the daemon alone,
    /// and time for the whole shutdown budget before systemd kills anything.
    #[test]
    fn the_example_unit_gives_keel_its_budget_and_reloads_with_sighup() {
        let unit = include_str!("../../examples/keel.service");
        let value = |key: &str| {
            unit.lines()
                .find_map(|line| line.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{key} missing"))
        };
        assert_eq!(value("KillMode"), "mixed");
        assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
        let timeout: u64 = value("TimeoutStopSec").parse().unwrap();
        assert!(
            timeout > SHUTDOWN_BUDGET_DEFAULT.as_secs(),
            "TimeoutStopSec {timeout} leaves no room beyond the budget"
        );
        assert_eq!(value("StateDirectoryMode"), "0700");
    }

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("/etc/keel/keel.toml")).unwrap()
    }

    /// Checks that the errors `e` mention every one of `parts`.
    #[track_caller]
    fn expect_errors(e: &str, parts: &[&str]) {
        for part in parts {
            assert!(e.contains(part), "{e}");
        }
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("keel.toml")).unwrap_err().join("\n")
    }

    #[test]
    fn a_full_config_parses() {
        let config = parse_ok(
            r#"
[daemon]
shutdown_budget = "10s"
metrics = "127.0.0.1:9464"

[[job]]
name = "tick"
cron = "*/10 * * * * *"
tz = "Europe/Paris"
command = ["echo", "tick"]
env = { GREETING = "hi" }
cwd = "work"
attempts = 5
backoff = "1s..30s"
timeout = "1m"
overlap = "allow"
misfire = "skip"
notify = ["https://hooks.example.com/keel"]
exit_success = [1]
exit_retryable = [75]
exit_permanent = [2]

[[job]]
name = "once"
at = "+5s"
delete_after_run = true
shell = true
command = ["echo $KEEL_JOB"]

[[job]]
name = "render"
every = "1m"
worker_kind = "render"
payload = "scene-1"
"#,
        );
        assert_eq!(config.shutdown_budget, Duration::from_secs(10));
        assert_eq!(config.metrics, "127.0.0.1:9464".parse().ok());
        let names: Vec<&str> = config.jobs.iter().map(|(j, _)| j.name.as_str()).collect();
        assert_eq!(names, ["tick", "once", "render"]);
        assert_eq!(config.jobs[0].1, 6);
        assert_eq!(
            config.jobs[0].0.env.get("GREETING").map(String::as_str),
            Some("hi")
        );
        assert_eq!(config.base_dir(), PathBuf::from("/etc/keel"));
    }

    #[test]
    fn the_store_keys_parse_and_the_url_is_never_printed() {
        let config = parse_ok(
            "[daemon]\nstore = \"postgres\"\n\
             database_url = \"postgresql://keel:s3cret@db.internal/keel\"\nleader_ttl = \"4s\"\n",
        );
        assert_eq!(config.store, Some(StoreKind::Postgres));
        assert_eq!(config.leader_ttl, Some(Duration::from_secs(4)));
        let url = config.database_url.as_ref().unwrap();
        assert_eq!(url.0, "postgresql://keel:s3cret@db.internal/keel");
        assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
        assert!(!config.daemon_settings().contains("s3cret"));
        // A changed URL is a changed setting, though it is not printed.
        let other = parse_ok(
            "[daemon]\nstore = \"postgres\"\n\
             database_url = \"postgresql://keel:other@db.internal/keel\"\nleader_ttl = \"4s\"\n",
        );
        assert_ne!(config.daemon_settings(), other.daemon_settings());
        let unset = parse_ok("[daemon]\n");
        assert_eq!(
            (unset.store, unset.database_url.is_none(), unset.leader_ttl),
            (None, true, None)
        );
    }

    #[test]
    fn bad_store_keys_are_named_with_their_lines_and_hide_the_url() {
        let e = parse_err(
            "[daemon]\nstore = \"mysql\"\n\
             database_url = \"postgresql://keel:s3cret@db.internal:notaport/keel\"\n\
             leader_ttl = \"500ms\"\n",
        );
        expect_errors(
            &e,
            &[
                "line 2: [daemon] store: \"mysql\" is not a store",
                "line 3: [daemon] database_url: not a Postgres connection string",
                "line 4: [daemon] leader_ttl: the leader TTL must be between 1s and 10m",
            ],
        );
        assert!(!e.contains("s3cret"), "{e}");
        let e =
            parse_err("[daemon]\nstore = \"sled\"\ndatabase_url = \"host=db password=s3cret\"\n");
        expect_errors(
            &e,
            &["line 3: [daemon] database_url: is for store = \"postgres\""],
        );
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn an_empty_config_is_valid() {
        let config = parse_ok("");
        assert!(config.jobs.is_empty());
        assert_eq!(config.shutdown_budget, SHUTDOWN_BUDGET_DEFAULT);
        assert_eq!(config.metrics, None);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e =
            parse_err("[[job]]\nname = \"x\"\nevery = \"1m\"\ncommand = [\"true\"]\nretries = 3\n");
        assert!(e.contains("retries") && e.contains("line 5"), "{e}");
        let e = parse_err("[daemon]\nbudget = \"1s\"\n");
        assert!(e.contains("budget") && e.contains("line 2"), "{e}");
        let e = parse_err("[deamon]\n");
        assert!(e.contains("deamon") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn bad_values_are_reported_per_job_with_their_lines() {
        let e = parse_err(
            r#"[daemon]
shutdown_budget = "soon"

[[job]]
name = "a"
cron = "0 0 25 * * *"
command = ["true"]

[[job]]
name = "b"
every = "1m"
command = ["true"]

[[job]]
name = "b"
every = "5x"
command = ["true"]
"#,
        );
        assert!(
            e.contains("shutdown_budget") && e.contains("\"soon\""),
            "{e}"
        );
        assert!(
            e.contains("line 4: job \"a\"") && e.contains("hour field"),
            "{e}"
        );
        expect_errors(
            &e,
            &[
                "line 14: job \"b\" is defined twice (first at line 9)",
                "line 14: job \"b\": every",
            ],
        );
    }

    #[test]
    fn a_wrong_type_is_an_error_with_its_line() {
        let e = parse_err("[[job]]\nname = \"x\"\nevery = \"1m\"\ncommand = \"echo hi\"\n");
        expect_errors(&e, &["line 4"]);
    }

    #[test]
    fn watchdog_notify_and_escalation_reach_the_core_and_bad_ones_name_their_line() {
        let config = parse_ok(
            r#"
[watchdog]
notify = ["ops=https://hooks.example.com/keel", "command:/usr/local/bin/page --team db"]
escalate_after = "15m"
escalate_to = ["pager=https://pager.example.com/x"]
"#,
        );
        let core = config.core();
        let names = |sinks: &[std::sync::Arc<str>]| -> Vec<String> {
            sinks.iter().map(|s| s.to_string()).collect()
        };
        assert_eq!(
            names(&core.incident_sinks),
            [
                "ops=https://hooks.example.com/keel",
                "command:/usr/local/bin/page --team db"
            ]
        );
        assert_eq!(core.escalate_after_ms, 15 * 60_000);
        assert_eq!(
            names(&core.escalation_sinks),
            ["pager=https://pager.example.com/x"]
        );
        assert_eq!(
            crate::jobdef::command_entry("command:/usr/local/bin/page --team db"),
            Some(vec!["/usr/local/bin/page", "--team", "db"])
        );
        // Off unless set.
        let core = parse_ok("").core();
        assert!(core.incident_sinks.is_empty() && core.escalate_after_ms == 0);

        let e = parse_err("[watchdog]\nnotify = [\"ftp://x/y\"]\nescalate_after = \"soon\"\n\n\n");
        expect_errors(
            &e,
            &[
                "line 2: [watchdog] notify: invalid notify URL",
                "line 3: [watchdog] escalate_after",
            ],
        );
        let e = parse_err("[watchdog]\n\nnotify = [\"command:\"]\n");
        expect_errors(&e, &["line 3: [watchdog] notify", "needs a program"]);
        let e = parse_err("[watchdog]\nescalate_after = \"10m\"\n");
        expect_errors(
            &e,
            &["line 2: [watchdog] escalate_after", "somewhere to go"],
        );
        let e =
            parse_err("[watchdog]\nnotify = [\"https://h/x\"]\nescalate_to = [\"https://h/y\"]\n");
        expect_errors(
            &e,
            &["line 3: [watchdog] escalate_to", "give escalate_after too"],
        );
    }

    #[test]
    fn outbox_and_failing_after_settings_reach_the_core_and_bad_ones_name_their_line() {
        let config = parse_ok(
            "[daemon]\noutbox_capacity = 50\noutbox_overflow = \"reject-newest\"\n\
             failing_after = 5\n",
        );
        let core = config.core();
        assert_eq!(core.outbox.capacity, 50);
        assert_eq!(core.outbox.overflow, OverflowPolicy::RejectNewest);
        assert_eq!(core.failing_after, 5);
        let e = parse_err("[daemon]\noutbox_capacity = 0\noutbox_overflow = \"spill\"\n");
        expect_errors(
            &e,
            &[
                "line 2: [daemon] outbox_capacity: 0 is out of range",
                "line 3: [daemon] outbox_overflow: \"spill\"",
            ],
        );
        let e = parse_err("[daemon]\nfailing_after = -1\n");
        expect_errors(&e, &["line 2: [daemon] failing_after: -1 is out of range"]);
    }

    #[test]
    fn history_keys_set_the_core_history_policy_and_bad_values_are_named() {
        let core = parse_ok("[daemon]\nhistory_runs = 5\nhistory_age = \"7d\"\n").core();
        assert_eq!(
            core.history,
            HistoryPolicy {
                runs_max: 5,
                age_max_ms: 7 * 24 * 3600 * 1000
            }
        );
        assert_eq!(
            keel_core::Config {
                history: HistoryPolicy::default(),
                ..core
            },
            keel_core::Config::default()
        );
        let e = parse_err("[daemon]\nhistory_runs = 0\nhistory_age = \"10s\"\n");
        expect_errors(
            &e,
            &[
                "line 2: [daemon] history_runs: 0 is out of range: finished runs kept per job, \
                 from 1 to 100000",
                "line 3: [daemon] history_age: 10s is out of range: from 1m to 3650d",
            ],
        );
        let e = parse_err("[daemon]\nhistory_age = \"soon\"\n");
        expect_errors(&e, &["line 2: [daemon] history_age: "]);
        // A change is a change of the daemon's settings.
        assert_ne!(
            parse_ok("[daemon]\nhistory_runs = 5\n").daemon_settings(),
            parse_ok("").daemon_settings()
        );
    }

    #[test]
    fn timings_apply_to_the_core_config_and_default_to_keel_cores() {
        let config = parse_ok("");
        assert_eq!(config.core(), keel_core::Config::default());
        assert_eq!(core_config(None), keel_core::Config::default());
        let config = parse_ok(
            "[daemon]\nlease_ttl = \"1s\"\nlease_grace = \"1s\"\n\
             delivery_backoff = \"100ms\"\ndelivery_attempts = 5\n",
        );
        let core = config.core();
        assert_eq!(core.lease.ttl_ms, 1_000);
        assert_eq!(core.lease.grace_ms, 1_000);
        assert!(
            core.lease.margin_ms < core.lease.ttl_ms / 2,
            "{:?}",
            core.lease
        );
        assert_eq!(core.outbox.policy.backoff_base_ms, 100);
        assert_eq!(core.outbox.policy.attempts_max, 5);
        // Everything else is keel-core's default.
        let default = keel_core::Config::default();
        assert_eq!(
            core.outbox.policy.backoff_cap_ms,
            default.outbox.policy.backoff_cap_ms
        );
        assert_eq!(
            keel_core::Config {
                lease: default.lease,
                outbox: default.outbox,
                ..core
            },
            default
        );
        // A first delay past the cap raises the cap instead of being cut to it.
        let core = parse_ok("[daemon]\ndelivery_backoff = \"1h\"\n").core();
        assert_eq!(core.outbox.policy.clamped().backoff_base_ms, 3_600_000);
        // A lease_grace of 0 reclaims at expiry; the default TTL's margin is kept.
        let core = parse_ok("[daemon]\nlease_grace = \"0s\"\n").core();
        assert_eq!(core.lease.grace_ms, 0);
        assert_eq!(core.lease.margin_ms, LeasePolicy::default().margin_ms);
    }

    #[test]
    fn bad_timings_are_each_reported_with_their_lines() {
        let e = parse_err(
            r#"[daemon]
lease_ttl = "500ms"
lease_grace = "soon"
delivery_backoff = "0s"
delivery_attempts = 0
"#,
        );
        expect_errors(
            &e,
            &[
                "line 2: [daemon] lease_ttl: 500ms is too short: the least is 1s",
                "line 3: [daemon] lease_grace: invalid duration \"soon\"",
                "line 4: [daemon] delivery_backoff: 0s is too short: the least is 1ms",
                "line 5: [daemon] delivery_attempts: 0 is out of range",
            ],
        );
        let e = parse_err("[daemon]\ndelivery_attempts = 101\nlease_ttl = \"31d\"\n");
        expect_errors(
            &e,
            &[
                "line 2: [daemon] delivery_attempts: 101",
                "from 1 to 100",
                "line 3: [daemon] lease_ttl: 31d is too long: the most is 30d",
            ],
        );
        let e = parse_err("[daemon]\ndelivery_attempts = -1\n");
        expect_errors(&e, &["delivery_attempts: -1 is out of range"]);
        let e = parse_err("[daemon]\ndelivery_attempts = \"3\"\n");
        expect_errors(&e, &["line 2"]);
        let e = parse_err("[daemon]\nlease_tll = \"1s\"\n");
        assert!(e.contains("lease_tll") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn the_watchdog_profile_sets_the_thresholds_and_each_key_overrides_it() {
        let keel = parse_ok("").core();
        assert_eq!(keel, keel_core::Config::default());
        let design = parse_ok("[watchdog]\nprofile = \"design\"\n").core();
        assert_eq!(
            design,
            WatchdogProfile::Design.apply(keel_core::Config::default())
        );
        assert_eq!(
            (
                design.lease.grace_ms,
                design.stuck_after_ms,
                design.unclaimed_after_ms,
                design.idle_claims_max,
                design.failing_after
            ),
            (60_000, 600_000, 600_000, 3, 3)
        );
        let config = parse_ok(
            "[watchdog]\nprofile = \"design\"\nlease_grace = \"90s\"\nstuck_after = \"5m\"\n\
             unclaimed_after = \"0s\"\nidle_claims = 5\nfailing_after = 0\n",
        );
        let core = config.core();
        assert_eq!(
            (
                core.lease.grace_ms,
                core.stuck_after_ms,
                core.unclaimed_after_ms,
                core.idle_claims_max,
                core.failing_after
            ),
            (90_000, 300_000, 0, 5, 0)
        );
        assert_eq!(core.lease.ttl_ms, LeasePolicy::default().ttl_ms);
        // The [daemon] aliases still work, over the profile.
        let core = parse_ok(
            "[daemon]\nlease_grace = \"2s\"\nfailing_after = 7\n[watchdog]\nprofile = \"design\"\n",
        )
        .core();
        assert_eq!((core.lease.grace_ms, core.failing_after), (2_000, 7));
        assert_eq!(core.idle_claims_max, 3);
        // A changed threshold is a changed [daemon]-level setting for a reload's warning.
        assert_ne!(
            parse_ok("[watchdog]\nidle_claims = 4\n").daemon_settings(),
            parse_ok("").daemon_settings()
        );
    }

    #[test]
    fn the_example_config_parses_with_keels_watchdog_profile() {
        let example = include_str!("../../examples/keel.toml");
        let config = parse_ok(example);
        assert_eq!(config.watchdog.profile, WatchdogProfile::Keel);
        assert_eq!(
            config.core().idle_claims_max,
            keel_core::Config::default().idle_claims_max
        );
    }

    #[test]
    fn bad_watchdog_keys_and_values_are_each_named_with_their_lines() {
        let e = parse_err(
            r#"[daemon]
lease_grace = "5s"
[watchdog]
profile = "strict"
lease_grace = "1m"
stuck_after = "500ms"
unclaimed_after = "soon"
idle_claims = 0
failing_after = 1001
"#,
        );
        expect_errors(
            &e,
            &[
                "line 4: [watchdog] profile: \"strict\": expected \"keel\"",
                "line 5: [watchdog] lease_grace: also set as [daemon] lease_grace on line 2",
                "line 6: [watchdog] stuck_after: 500ms is too short: the least is 1s",
                "line 7: [watchdog] unclaimed_after: invalid duration \"soon\"",
                "line 8: [watchdog] idle_claims: 0 is out of range: from 1 to 1000",
                "line 9: [watchdog] failing_after: 1001 is out of range: from 1 to 1000, or 0 \
                 for never",
            ],
        );
        let e = parse_err("[watchdog]\nunclaimed_after = \"10ms\"\n");
        expect_errors(
            &e,
            &["line 2: [watchdog] unclaimed_after: 10ms is too short"],
        );
        let e = parse_err("\n[watchdog]\nidle_claim = 3\n");
        assert!(e.contains("idle_claim") && e.contains("line 3"), "{e}");
        let e = parse_err("[daemon]\nfailing_after = 2\n[watchdog]\nfailing_after = 3\n");
        expect_errors(
            &e,
            &["line 4: [watchdog] failing_after: also set as [daemon] failing_after on line 2"],
        );
    }

    #[test]
    fn http_advertise_is_a_base_url_or_named_as_wrong_with_its_line() {
        let config = parse_ok(
            "[http]\nlisten = \"127.0.0.1:8080\"\nadvertise = \"http://host-a.internal:8080/\"\n",
        );
        let http = config.http.unwrap();
        assert_eq!(
            http.advertise.as_deref(),
            Some("http://host-a.internal:8080")
        );
        let none = parse_ok("[http]\nlisten = \"127.0.0.1:8080\"\n");
        assert_eq!(
            none.http.unwrap().advertise,
            None,
            "derived from the listener"
        );
        let e = parse_err("[http]\nlisten = \"127.0.0.1:8080\"\nadvertise = \"host-a:8080\"\n");
        expect_errors(
            &e,
            &["line 1", "[http] advertise", "\"host-a:8080\"", "http://"],
        );
        let e = parse_err(
            "[http]\nlisten = \"127.0.0.1:8080\"\nadvertise = \"http://host-a:8080/keel\"\n",
        );
        expect_errors(&e, &["[http] advertise", "path"]);
    }

    #[test]
    fn metrics_must_be_a_loopback_address() {
        let e = parse_err("[daemon]\nmetrics = \"0.0.0.0:9464\"\n");
        expect_errors(&e, &["loopback"]);
        let e = parse_err("[daemon]\nmetrics = \"localhost\"\n");
        expect_errors(&e, &["\"localhost\""]);
    }
}

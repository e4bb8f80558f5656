//! Leading a store that daemons on several hosts share (`--store postgres`).
//!
//! The fs and sled stores have one writer per data directory, chosen by the `daemon.lock`
//! flock (`place::DaemonLock`). On Postgres the writer is the holder of the leadership lease
//! (`keel_store_postgres::Leadership`, judged by the database's clock):
//!
//! 1. [`stand_by`]: try to take the lease about once a second ([`STANDBY_POLL`]), or sooner
//!    when the holder's lease ends sooner (it has that long left by the database's clock), so
//!    that a dead leader is replaced as soon as its lease lapses; say who leads whenever that
//!    changes.
//! 2. Once leading, the daemon restores the store (raising its writer epoch, which deposes any
//!    previous writer) and starts; [`keep`] renews the lease every third of the TTL.
//! 3. [`keep`] drives `keel_core::fence::Fence` (SPEC M2's self-fencing, modelled in the core
//!    so that it is tested on explicit timestamps): it fences this process when no renewal
//!    *sent* in the last `ttl - margin` was acknowledged (counted from the acquisition's
//!    sending at first), or when a renewal finds another holder. Fenced, it stops the runtime
//!    at once (attempts are interrupted), kills its commands and the daemon exits non-zero,
//!    within [`FENCED_EXIT_WAIT`] even if the store does not answer. A deposed leader's late
//!    batches are refused by the store's writer epoch regardless.
//! 4. A graceful stop resigns ([`resign`]), so a standby takes over at its next poll.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keel_core::fence::{Fence, FenceEffect, FencePolicy, FenceReason};
use keel_core::Timestamp;
use keel_store_postgres::{Leadership, Lease};
use tokio::time::Instant;

use crate::daemon::{log, Signals};
use crate::error::Failure;
use crate::place::Place;
use crate::protocol::LeaderStatus;

/// How often a standby tries to take the lease.
pub(crate) const STANDBY_POLL: Duration = Duration::from_secs(1);

/// How long a leader that lost the lead waits for its runtime to stop before it exits anyway.
pub(crate) const FENCED_EXIT_WAIT: Duration = Duration::from_secs(5);

/// The leadership of this process: the handle and the term it holds.
#[derive(Debug, Clone)]
pub(crate) struct Lead {
    leadership: Arc<Leadership>,
    lease: Lease,
    /// When the acquisition that won the lease was sent: the lead counts from it.
    acquire_sent: Instant,
    /// The database's clock, read by the acquisition: what this process's keel clock runs on.
    anchor: Anchor,
    /// A connection of its own for `status` to read the lease as it stands (`fresh_status`),
    /// opened at the first status asked: never the renewals' connection, which a slow read
    /// must not hold up.
    reader: Arc<Mutex<Option<Arc<Leadership>>>>,
    config: Redacted,
}

/// Connection settings, which may hold a password: never printed.
#[derive(Clone)]
struct Redacted(keel_store_postgres::Config);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Config(..)")
    }
}

impl Lead {
    /// Who leads, for `status`: this process.
    pub(crate) fn status(&self) -> LeaderStatus {
        LeaderStatus {
            clock_skew_ms: Some(self.anchor.skew_ms),
            ..status(Some(&self.lease), true)
        }
    }

    /// The keel clock of a runtime this leader starts: the database's time, as the acquisition
    /// read it, carried forward on this process's monotonic clock. Every leader fires on the
    /// one clock the hosts share, whatever its own wall clock says (SPEC M4).
    pub(crate) fn clock(&self) -> keel_runtime::Clock {
        let since = Instant::now().saturating_duration_since(self.anchor.at);
        keel_runtime::Clock::starting_at(self.anchor.database.plus_ms(millis(since)))
    }
}

/// This host's clock against the database's, read at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    /// The instant (this process's monotonic clock) of the reading.
    at: Instant,
    /// The database's time then.
    database: Timestamp,
    /// How far this host's wall clock was ahead of the database's then (negative: behind).
    skew_ms: i64,
}

impl Anchor {
    /// The anchor a statement gives that read the database's clock (`database`) between `sent`
    /// and `received`, when this host's wall clock read `wall` at `received`: the database's
    /// reading is taken to be the round trip's midpoint.
    fn read(sent: Instant, received: Instant, database: Timestamp, wall: Timestamp) -> Anchor {
        let half = received.saturating_duration_since(sent) / 2;
        let database = database.plus_ms(millis(half));
        Anchor {
            at: received,
            database,
            skew_ms: wall.0.saturating_sub(database.0),
        }
    }
}

/// How far from the database's clock this host's may be before the daemon warns.
const SKEW_WARNING: Duration = Duration::from_secs(1);

/// Waits until this process holds the lease (`None` if a signal came first), advertising `api`
/// in it (where its HTTP API will be, when that is known before it is bound).
///
/// It takes a free lease only if it runs every stored job it would have to: a job that is not
/// for external workers and whose kind is not in `kinds` makes it say so, by name, and keep
/// standing by, so that a daemon that runs it can take over (rather than this one taking the
/// lease and failing to start).
pub(crate) async fn stand_by(
    place: &Place,
    ttl: Duration,
    kinds: &'static [&'static str],
    api: Option<String>,
    signals: &mut Signals,
) -> Result<Option<Lead>, Failure> {
    let mut config = place.database_config()?;
    // A connection attempt must not outlast a renewal period.
    config.connect_timeout(ttl / 3);
    let holder = holder_id();
    let reader_config = config.clone();
    let at = keel_store_postgres::describe(&config);
    let leadership = blocking(move || Leadership::new(config, &holder, ttl))
        .await?
        .map_err(|e| Failure::runtime(format!("cannot open the postgres store ({at}): {e}")))?;
    let leadership = Arc::new(leadership);
    let mut said: Option<(String, u64)> = None;
    let mut said_unhandled: Vec<(String, String)> = Vec::new();
    let mut failing = false;
    let store = {
        let place = place.clone();
        blocking(move || place.open_store().map(|s| s.store())).await??
    };
    loop {
        let mut wait = STANDBY_POLL;
        let handle = Arc::clone(&leadership);
        let jobs = Arc::clone(&store);
        let api = api.clone();
        let tried = blocking(move || -> Result<Tried, keel_core::StoreError> {
            // The jobs are read only when the lease could be taken: a live leader's cannot.
            if let Some(current) = handle.current()?.filter(|l| l.live) {
                return Ok(Tried::Held(Some(current)));
            }
            let unhandled = unhandled(&jobs.read()?.jobs, kinds);
            if !unhandled.is_empty() {
                return Ok(Tried::Unhandled(unhandled));
            }
            let sent = Instant::now();
            Ok(match handle.try_acquire_advertising(api.as_deref())? {
                Some(lease) => {
                    let anchor =
                        Anchor::read(sent, Instant::now(), lease.acquired_at, keel_runtime::now());
                    Tried::Led(lease, sent, anchor)
                }
                None => Tried::Held(handle.current()?),
            })
        })
        .await?;
        match tried {
            Ok(Tried::Unhandled(unhandled)) => {
                if failing {
                    log("standby: the database answers again");
                }
                failing = false;
                if said_unhandled != unhandled {
                    let named: Vec<String> = unhandled
                        .iter()
                        .map(|(job, kind)| format!("job {job} has kind {kind:?}"))
                        .collect();
                    log(&format!(
                        "standby: not taking the lead: {}, which this daemon does not run (it \
                         runs {kinds:?}; other kinds must be jobs for external workers); a \
                         daemon that runs it can take over",
                        named.join(", ")
                    ));
                    said_unhandled = unhandled;
                }
            }
            Ok(Tried::Led(lease, acquire_sent, anchor)) => {
                log(&format!(
                    "leading the postgres store as {} (term {}, lease ttl {})",
                    lease.holder,
                    lease.term,
                    crate::show::duration(ttl)
                ));
                log(&skew_line(anchor.skew_ms));
                return Ok(Some(Lead {
                    leadership,
                    lease,
                    acquire_sent,
                    anchor,
                    reader: Arc::default(),
                    config: Redacted(reader_config),
                }));
            }
            Ok(Tried::Held(current)) => {
                if failing {
                    log("standby: the database answers again");
                }
                failing = false;
                said_unhandled.clear();
                if let Some(lease) = current.filter(|l| l.live) {
                    wait = next_try(&lease);
                    let key = (lease.holder.clone(), lease.term);
                    if said.as_ref() != Some(&key) {
                        log(&format!(
                            "standby: {} leads the postgres store (term {}, since {}); taking \
                             over when its lease lapses",
                            lease.holder,
                            lease.term,
                            crate::show::time(lease.acquired_at)
                        ));
                        said = Some(key);
                    }
                }
            }
            Err(e) => {
                if !failing {
                    log(&format!(
                        "standby: cannot reach the database ({e}); retrying"
                    ));
                }
                failing = true;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = signals.recv() => return Ok(None),
        }
    }
}

/// How long a standby waits before it tries again, having found `lease` live: until just after
/// it lapses if that is within a poll, else a poll.
fn next_try(lease: &Lease) -> Duration {
    /// Past the expiry, so that the database's `now()` has surely passed it too.
    const AFTER_EXPIRY: Duration = Duration::from_millis(5);
    STANDBY_POLL.min(lease.remaining + AFTER_EXPIRY)
}

/// The log line on this host's clock against the database's.
fn skew_line(skew_ms: i64) -> String {
    let size = crate::show::duration(Duration::from_millis(skew_ms.unsigned_abs()));
    let side = if skew_ms >= 0 { "ahead of" } else { "behind" };
    let said = format!(
        "clock: this host's clock is {size} {side} the database's; keel runs on the database's \
         time while it leads"
    );
    if Duration::from_millis(skew_ms.unsigned_abs()) > SKEW_WARNING {
        format!("warning: {said} (check NTP on this host)")
    } else {
        said
    }
}

/// What one try to take the lease found.
enum Tried {
    /// This process took it; the acquisition was sent then, and read the database's clock.
    Led(Lease, Instant, Anchor),
    /// Another holds it (or held it last).
    Held(Option<Lease>),
    /// Stored jobs this daemon cannot run: `(job, kind)`.
    Unhandled(Vec<(String, String)>),
}

/// The stored jobs, not for external workers, whose kind is not in `kinds`: `(job, kind)`, in
/// job order.
fn unhandled(jobs: &[keel_core::Job], kinds: &[&str]) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = jobs
        .iter()
        .filter(|job| !job.spec.external && !kinds.contains(&&*job.spec.kind))
        .map(|job| (job.spec.id.to_string(), job.spec.kind.to_string()))
        .collect();
    found.sort();
    found
}

/// Renews the lease until the process stops; on losing it, records why in `fenced` and calls
/// `stop` (which must stop the runtime at once). Runs as a task of its own.
pub(crate) async fn keep(
    lead: Lead,
    fenced: Arc<Mutex<Option<String>>>,
    guard: Option<Arc<tokio::sync::Mutex<Option<crate::fence_guard::Guard>>>>,
    stop: impl FnOnce() + Send + 'static,
) {
    let ttl = lead.leadership.ttl();
    let policy = FencePolicy::for_ttl(millis(ttl));
    let fence_after = Duration::from_millis(policy.fence_after_ms());
    // The fence's clock: milliseconds of this process's monotonic clock since the acquisition
    // was sent, so that a wall-clock step changes nothing.
    let origin = lead.acquire_sent;
    let at = |instant: Instant| Timestamp(millis(instant.saturating_duration_since(origin)) as i64);
    let instant = |t: Timestamp| origin + Duration::from_millis(t.0.max(0) as u64);
    let mut fence = Fence::new(policy);
    if let Err(e) = fence.handle_acquired(at(origin), at(origin), lead.lease.term) {
        // Not leading, the loop below fences at once.
        log(&format!("cannot lead term {}: {e}", lead.lease.term));
    }
    let mut failing = false;
    let why = 'lead: loop {
        fence.handle_timeout(at(Instant::now()));
        while let Some(effect) = fence.poll_effect() {
            let (term, sent_at) = match effect {
                FenceEffect::Fence { reason, .. } => break 'lead reason,
                FenceEffect::Renew { term, sent_at } => (term, sent_at),
            };
            let handle = Arc::clone(&lead.leadership);
            // No reply is awaited past the fence deadline: fencing must not wait for the store.
            let give_up = fence.fence_at().map_or_else(Instant::now, instant);
            let renewal = tokio::time::timeout_at(give_up, blocking(move || handle.renew(term)));
            let replied = renewal.await;
            let now = at(Instant::now());
            match replied {
                Err(_) => {}
                Ok(Ok(Ok(Some(_)))) => {
                    if failing {
                        log("leadership lease renewed again");
                    }
                    failing = false;
                    fence.handle_renew_acked(now, sent_at);
                }
                Ok(Ok(Ok(None))) => fence.handle_deposed(now),
                Ok(Ok(Err(e))) => {
                    if !failing {
                        let left = fence
                            .fence_at()
                            .map_or(0, |t| t.ms_since(now))
                            .min(millis(fence_after));
                        log(&format!(
                            "cannot renew the leadership lease ({e}); stopping unless a renewal \
                             succeeds within {}",
                            crate::show::duration(Duration::from_millis(left))
                        ));
                    }
                    failing = true;
                    fence.handle_renew_failed(now, sent_at);
                }
                Ok(Err(e)) => {
                    log(&format!("cannot renew the leadership lease: {e}"));
                    fence.handle_renew_failed(now, sent_at);
                }
            }
            fence.handle_timeout(now);
        }
        // The guard kills this process's commands at the fence deadline unless told again.
        if let (Some(guard), Some(fence_at)) = (&guard, fence.fence_at()) {
            if let Some(guard) = guard.lock().await.as_mut() {
                let left = instant(fence_at).saturating_duration_since(Instant::now());
                guard.lead_until(fence_at, left).await;
            }
        }
        let Some(wake) = fence.poll_timeout() else {
            // Not leading and no fence effect: cannot happen while this task runs, but a
            // process that does not know it leads must not act as if it did.
            break FenceReason::RenewalsLapsed;
        };
        tokio::time::sleep_until(instant(wake)).await;
    };
    let why = match why {
        FenceReason::RenewalsLapsed => format!(
            "no renewal of the leadership lease succeeded for {}",
            crate::show::duration(fence_after)
        ),
        FenceReason::Deposed => {
            "another daemon holds the leadership lease (this one was deposed)".to_string()
        }
    };
    log(&format!(
        "lost the lead: {why}; stopping now (running attempts are interrupted) so that the \
         next leader can take over"
    ));
    *fenced.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    stop();
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Ends this process's term, so that a standby takes over at its next poll.
pub(crate) async fn resign(lead: &Lead) {
    let handle = Arc::clone(&lead.leadership);
    let term = lead.lease.term;
    let resigned = tokio::time::timeout(
        Duration::from_secs(2),
        blocking(move || handle.resign(term)),
    )
    .await;
    match resigned {
        Ok(Ok(Ok(()))) => log("resigned the lead"),
        Ok(Ok(Err(e))) => log(&format!(
            "could not resign the lead ({e}); a standby takes over when the lease lapses"
        )),
        _ => log("could not resign the lead in time; a standby takes over when the lease lapses"),
    }
}

/// Who leads the store, read from the database (for `status` with no daemon).
pub(crate) fn current(place: &Place, leading: bool) -> Result<LeaderStatus, Failure> {
    Ok(status(live_lease(place)?.as_ref(), leading))
}

fn status(lease: Option<&Lease>, leading: bool) -> LeaderStatus {
    let rfc3339 = |t: keel_core::Timestamp| {
        t.to_utc()
            .map(|utc| utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    LeaderStatus {
        leading,
        holder: lease.map(|l| l.holder.clone()),
        term: lease.map(|l| l.term),
        since: lease.and_then(|l| rfc3339(l.acquired_at)),
        since_ms: lease.map(|l| l.acquired_at.0),
        expires: lease.and_then(|l| rfc3339(l.expires_at)),
        expires_ms: lease.map(|l| l.expires_at.0),
        api: lease.and_then(|l| l.api.clone()),
        clock_skew_ms: None,
    }
}

/// The lease as it stands, for callers other than a daemon's own lead (`keel status` with no
/// daemon, and forwarding a command to the leader): `None` if nobody holds a live one.
pub(crate) fn live_lease(place: &Place) -> Result<Option<Lease>, Failure> {
    let config = place.database_config()?;
    let at = keel_store_postgres::describe(&config);
    let leadership = Leadership::new(config, &holder_id(), Duration::ZERO)
        .map_err(|e| Failure::runtime(format!("cannot open the postgres store ({at}): {e}")))?;
    let lease = leadership
        .current()
        .map_err(|e| Failure::runtime(format!("cannot read the leadership lease: {e}")))?;
    Ok(lease.filter(|l| l.live))
}

/// Who leads, as the lease stands now, for `status` asked of the leading daemon: read on a
/// connection of its own within [`STATUS_READ_WAIT`], else what the acquisition said.
pub(crate) async fn fresh_status(lead: &Lead) -> LeaderStatus {
    let reader = Arc::clone(&lead.reader);
    let config = lead.config.0.clone();
    let read = blocking(move || -> Result<Option<Lease>, keel_core::StoreError> {
        let handle = {
            let mut reader = reader.lock().unwrap_or_else(PoisonError::into_inner);
            match reader.as_ref() {
                Some(handle) => Arc::clone(handle),
                None => {
                    let handle = Arc::new(Leadership::new(config, "status", Duration::ZERO)?);
                    *reader = Some(Arc::clone(&handle));
                    handle
                }
            }
        };
        handle.current()
    });
    match tokio::time::timeout(STATUS_READ_WAIT, read).await {
        Ok(Ok(Ok(lease))) => {
            let lease = lease.filter(|l| l.live);
            let leading = lease
                .as_ref()
                .is_some_and(|l| l.holder == lead.lease.holder && l.term == lead.lease.term);
            LeaderStatus {
                clock_skew_ms: Some(lead.anchor.skew_ms),
                ..status(lease.as_ref(), leading)
            }
        }
        _ => lead.status(),
    }
}

/// How long `status` waits for the lease as it stands before it answers with what it knew.
const STATUS_READ_WAIT: Duration = Duration::from_secs(2);

/// Advertises `api` in this leader's lease, if the acquisition did not already: for a listener
/// whose address is known only once bound (port 0). Logs where it is advertised.
pub(crate) async fn advertise(lead: &Lead, api: String) {
    if lead.lease.api.as_deref() == Some(api.as_str()) {
        log(&format!(
            "advertising the http api at {api} in the leadership lease"
        ));
        return;
    }
    let handle = Arc::clone(&lead.leadership);
    let term = lead.lease.term;
    let said = api.clone();
    let done = tokio::time::timeout(
        Duration::from_secs(2),
        blocking(move || handle.advertise(term, Some(&api))),
    )
    .await;
    match done {
        Ok(Ok(Ok(Some(_)))) => log(&format!(
            "advertising the http api at {said} in the leadership lease"
        )),
        Ok(Ok(Ok(None))) => log("could not advertise the http api: this daemon no longer leads"),
        Ok(Ok(Err(e))) => log(&format!(
            "could not advertise the http api at {said} ({e}); commands on other hosts cannot \
             reach this leader"
        )),
        _ => log(&format!(
            "could not advertise the http api at {said} in time; commands on other hosts \
             cannot reach this leader"
        )),
    }
}

/// This process's name in the lease: `HOST:PID:RANDOM`, unique even when a pid is reused.
fn holder_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Randomly keyed by the standard library: enough to tell two processes apart.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let worker = crate::direct::daemon_worker(crate::cli::StoreKind::Postgres);
    let host = worker.strip_prefix("local:").unwrap_or(&worker);
    format!("{host}:{}:{:08x}", std::process::id(), random as u32)
}

/// Runs a blocking database call off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::runtime(format!("a database call failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(remaining: Duration) -> Lease {
        Lease {
            holder: "host-a:1:x".to_owned(),
            term: 1,
            acquired_at: Timestamp(0),
            expires_at: Timestamp(10_000),
            live: true,
            remaining,
            api: None,
        }
    }

    #[test]
    fn a_standby_tries_again_just_after_the_lease_lapses_or_after_a_poll() {
        assert_eq!(
            next_try(&lease(Duration::from_millis(300))),
            Duration::from_millis(305),
            "a lease about to lapse is tried for just after"
        );
        assert_eq!(next_try(&lease(Duration::ZERO)), Duration::from_millis(5));
        assert_eq!(
            next_try(&lease(Duration::from_secs(8))),
            STANDBY_POLL,
            "a long lease is still looked at every poll (it may be resigned)"
        );
    }

    #[test]
    fn the_anchor_takes_the_database_reading_at_the_round_trips_midpoint() {
        let sent = Instant::now();
        let received = sent + Duration::from_millis(40);
        let database = Timestamp(1_000_000);
        // This host's wall clock is 5 s ahead: it read 1_005_020 when the database read 1_000_020.
        let anchor = Anchor::read(sent, received, database, Timestamp(1_005_020));
        assert_eq!(anchor.database, Timestamp(1_000_020));
        assert_eq!(anchor.at, received);
        assert_eq!(anchor.skew_ms, 5_000);
        let behind = Anchor::read(sent, received, database, Timestamp(999_020));
        assert_eq!(behind.skew_ms, -1_000);
    }

    #[test]
    fn a_skew_past_a_second_is_a_warning_naming_the_side() {
        let ahead = skew_line(3_600_000);
        assert!(ahead.starts_with("warning: "), "{ahead}");
        assert!(ahead.contains("ahead of the database's"), "{ahead}");
        let behind = skew_line(-2_500);
        assert!(
            behind.starts_with("warning: ") && behind.contains("behind"),
            "{behind}"
        );
        let close = skew_line(12);
        assert!(!close.contains("warning"), "{close}");
    }
}

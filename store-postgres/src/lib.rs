//! keel-store-postgres: a keel [`Store`] in a PostgreSQL schema, shared by processes on any
//! number of hosts.
//!
//! ```no_run
//! use keel_core::Store;
//! use keel_store_postgres::PgStore;
//!
//! # fn main() -> Result<(), keel_core::StoreError> {
//! let store = PgStore::connect("host=/run/postgresql user=keel dbname=keel")?;
//! let snapshot = store.restore()?; // the caller is now the store's only writer
//! # let _ = snapshot;
//! # Ok(())
//! # }
//! ```
//!
//! The connection string is either key-value (`host=… user=… dbname=…`) or a URL
//! (`postgresql://user@host/db`), as libpq takes it. The schema is the connection's
//! `search_path` (add `options='-c search_path=NAME'` for a schema other than `public`), so
//! one database can hold several stores.
//!
//! # Bridging a synchronous trait
//!
//! [`Store`] is synchronous, so each connection owns a current-thread tokio runtime that drives
//! tokio-postgres, blocking the calling thread for each call (the `client` module; the blocking
//! `postgres` crate does the same, but cannot pipeline a batch's writes with its commit).
//! keel-runtime calls every store method through `tokio::task::spawn_blocking`, where
//! that is allowed (`tests/postgres.rs` checks it from a multi-threaded runtime). Calling a
//! method directly from an async task would panic inside tokio ("Cannot start a runtime from
//! within a runtime"), as it would with any blocking client: do not. A pool is not needed yet:
//! the daemon has one writer, and its writes are serialised by the store row lock anyway.
//!
//! A handle holds one connection behind a mutex, so its calls run one at a time; open more
//! handles for parallel readers. A connection that broke (a database restart) is replaced at
//! the handle's next call; the call that saw it break fails with [`StoreError::Io`], whose
//! outcome for `apply` is unknown, as the trait allows.
//!
//! # Schema
//!
//! | table | key | holds |
//! |---|---|---|
//! | `keel_meta` | the single row `id = 1` | the format marker (`keel-store-postgres 6`), the writer epoch, the scheduler's counters ([`Meta`]), the database the store was last written on (`SYSTEM/TIMELINE`) |
//! | `keel_jobs`, `keel_tombstones` | job name | the job, the tombstone |
//! | `keel_runs` | run id | the run (terminal ones until pruned), with its job, state, creation and finish times and whether it is active beside it for the indexes |
//! | `keel_slots` | job, slot | the run that claimed the slot (SPEC S6); pruned with its run |
//! | `keel_audit` | seq | the audit record, with its job, run and time |
//! | `keel_incidents`, `keel_deliveries` | id | the incident (and whether it is open), the outbox delivery |
//! | `keel_leader` | the single row `id = 1` | the leadership lease of daemons sharing the store ([`Leadership`]): holder, term, since when, until when by the database's clock, where the holder serves its HTTP API |
//!
//! Bodies are `json` (the record's serde form, exactly as written), **not `jsonb`**: `jsonb`
//! refuses the escape `\u0000`, and one NUL in an error message would make a batch fail on
//! every retry, forever. Every number is a `bigint`; an id or counter above `i64::MAX` is
//! refused as [`StoreError::Io`] rather than wrapped.
//!
//! A new schema is created, and an older format migrated, when a handle connects, under an
//! advisory lock so that processes starting at once do not race. A `keel_meta.format` newer than
//! this build's is refused with [`StoreError::Version`] naming it; a schema with `keel_*`
//! tables but no `keel_meta` is refused, never adopted.
//!
//! # How a batch is applied
//!
//! [`Store::apply`] is one READ COMMITTED transaction:
//!
//! 1. `SELECT … FROM keel_meta WHERE id = 1 FOR UPDATE`: the store row lock. Every `apply`
//!    and every `restore` takes it first, so they are totally ordered, and once it is held
//!    every later statement of the transaction sees everything committed before;
//! 2. reads the stored runs the batch writes and the slot claims it makes (one query);
//! 3. runs [`check_batch`], the write rules every keel store
//!    runs, in Rust, against the writer epoch from step 1 and the rows from step 2: a deposed
//!    writer's batch is refused with [`Conflict::Deposed`](keel_core::Conflict::Deposed), and
//!    any refusal rolls the transaction back;
//! 4. writes the records as a few multi-row statements: the `batch` module groups them into
//!    phases, each phase's writes one statement (an `INSERT … SELECT FROM unnest(…)` or a
//!    `DELETE … = ANY(…)` per table, as parts of one `WITH`), its prunes one more (each job's
//!    terminal runs ranked over the finish-time index). Records move only past records they
//!    commute with, so the result is that of writing them one by one, in order; a scheduler's
//!    batch is one phase;
//! 5. commits. `Ok` means the commit returned, so the batch is as durable as the database
//!    makes a commit (see `docs/storage.md` on `synchronous_commit` and replication).
//!
//! Round trips were most of what a batch cost beyond the commit's WAL flush, so a batch takes
//! two, whatever its phases: `BEGIN`, the lock (after the planner settings of
//! `sql::GENERIC_PLANS`) and the read in one simple query; then every
//! phase's writes and prunes and the `COMMIT`, sent together before any answer is read
//! (pipelined). A statement that fails aborts the transaction, and the server answers the
//! `COMMIT` behind it by rolling back, so `Ok` means every statement succeeded and the commit
//! did. Steps stay statements of their own, so the read's snapshot is still taken once the lock is held. A
//! simple query takes no parameters: the read and the prunes carry only numbers and job
//! names, as escaped constants (`literal` module), and run statements prepared by name when
//! the connection opens; record bodies always travel as parameters.
//!
//! [`Store::restore`] takes the same lock, raises the writer epoch and reads the snapshot in
//! the same transaction. [`Store::read`] reads in one REPEATABLE READ, read-only transaction,
//! so its snapshot is one consistent cut without blocking writers.
//!
//! # TLS
//!
//! `sslmode=require` (or libpq's `verify-ca`/`verify-full`) connects over TLS (rustls) and
//! checks the server's certificate against the system's trusted roots, or the PEM file
//! `SSL_CERT_FILE` names, and its name against the host, as libpq's `verify-full` does; the
//! default, `prefer`, and `disable` connect without TLS. See [`parse_config`].
//!
//! # A database that failed over
//!
//! `keel_meta` records the database's system identifier and WAL timeline the store was last
//! written on; a connection to a database with another pair (a replica promoted after a
//! failover, a restored backup) fails with [`StoreError::Diverged`] until an operator accepts
//! it with [`PgStore::accept_database`], since with asynchronous replication it may lack
//! acknowledged batches. A replica in recovery is refused: keel writes on the primary. The
//! rules are in the `identity` module ([`DatabaseIdentity`]).
//!
//! # A writer stopped in the middle of a batch
//!
//! A process stopped inside `apply` (SIGSTOP, a long pause, a frozen VM, a host cut off without
//! a reset) keeps the store row lock, and every other writer's transaction, a successor's
//! `restore` too, would wait for it. So each session sets `idle_in_transaction_session_timeout`
//! to the handle's stall limit ([`DEFAULT_STALL_LIMIT`], or [`PgStore::with_stall_limit`]): the
//! server ends a session idle that long inside a transaction, the batch rolls back, nothing of
//! it was acknowledged, and the waiting writer goes on. keel never waits on its caller between
//! a transaction's statements, so a live writer does not reach the limit.
//!
//! # Corrupt data
//!
//! A row that does not decode is reported as [`StoreError::Corrupt`] naming its table and
//! key; nothing panics on stored data. [`Store::restore`] and [`Store::read`] fail rather
//! than leave out a record they cannot decode.

#![warn(missing_docs)]

mod batch;
mod client;
mod identity;
mod leader;
mod literal;
mod sql;
mod tls;

pub use identity::DatabaseIdentity;
pub use leader::{Leadership, Lease};
pub use tls::{describe, parse_config};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use keel_core::store::{check_batch, next_writer_epoch, AuditQuery, RunPage, RunQuery, StoredView};
use keel_core::{
    AuditRecord, Batch, Delivery, Incident, Job, JobId, Meta, Record, Run, RunId, Snapshot, Store,
    StoreError, Timestamp, Tombstone,
};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Row, SimpleQueryMessage, SimpleQueryRow, Statement};

use client::{Client, Request, Transaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The connection settings [`PgStore::with_config`] takes (tokio-postgres's).
pub use tokio_postgres::Config;

/// The format marker this build reads and writes (`keel_meta.format`).
pub const FORMAT: &str = sql::FORMAT;

/// How long a transaction of a handle may sit idle before the server ends its session, unless
/// [`PgStore::with_stall_limit`] says otherwise. keel's transactions never wait on the caller
/// between statements, so only a stalled or cut-off process reaches it.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(5);

/// A keel store in a PostgreSQL schema. See the [crate docs](crate) for the schema and the
/// transaction every write is.
pub struct PgStore {
    config: Config,
    /// The session's `idle_in_transaction_session_timeout` ([`PgStore::with_stall_limit`]).
    stall_limit: Duration,
    /// The connection, replaced at the next call once it broke.
    conn: Mutex<Option<Conn>>,
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// Left inside a transaction on purpose ([`PgStore::stall_in_a_transaction`]): never
    /// reused.
    stalled: bool,
    /// Batches begun since the connection's plans were last made ([`sql::REPLAN`]).
    batches_since_planned: u32,
}

impl PgStore {
    /// Connects to the database `params` names (key-value pairs or a `postgresql://` URL),
    /// creating the store's tables in the connection's schema if they are missing. Fails with
    /// [`StoreError::Version`] if the schema holds a store of a newer format or tables this
    /// store did not create. `sslmode=require` connects over TLS, checking the server's
    /// certificate (see [`parse_config`] and the crate docs, "TLS").
    pub fn connect(params: &str) -> Result<PgStore, StoreError> {
        PgStore::with_config(parse_config(params)?)
    }

    /// Like [`PgStore::connect`], with the settings built by the caller.
    pub fn with_config(config: Config) -> Result<PgStore, StoreError> {
        PgStore::with_stall_limit(config, DEFAULT_STALL_LIMIT)
    }

    /// Like [`PgStore::with_config`], with a stall limit other than [`DEFAULT_STALL_LIMIT`]:
    /// how long the server lets a transaction of this handle sit idle before it ends the
    /// session, rolling the batch back unacknowledged. A process stopped in the middle of
    /// `apply` (SIGSTOP, a frozen VM, a host cut off) holds the store row lock; without the
    /// limit every other writer, a successor's `restore` too, would wait until it woke.
    /// Keep it well under the time after which another process may take over (keel's daemon
    /// uses half its leader TTL). `Duration::ZERO` leaves the server's setting alone.
    pub fn with_stall_limit(config: Config, stall_limit: Duration) -> Result<PgStore, StoreError> {
        let conn = Conn::open(&config, stall_limit)?;
        Ok(PgStore {
            config,
            stall_limit,
            conn: Mutex::new(Some(conn)),
        })
    }

    /// Accepts the database `config` connects to as the store's own, after an operator has
    /// checked a failover or a restore that [`StoreError::Diverged`] reported: from now on
    /// handles open on it. Returns the identity the store had before (`None` if none) and the
    /// database's. See the `identity` rules in the crate docs.
    pub fn accept_database(
        config: &Config,
    ) -> Result<(Option<DatabaseIdentity>, DatabaseIdentity), StoreError> {
        let mut conn = Conn::connect(config, DEFAULT_STALL_LIMIT)?;
        identity::accept(&mut conn.client)
    }

    /// Begins a transaction that takes the store row lock and returns without ending it, as a
    /// process stopped in the middle of `apply` would leave its session: for tests of what the
    /// stall limit does. The handle's next call finds the session ended or ends it.
    #[doc(hidden)]
    pub fn stall_in_a_transaction(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            conn.client
                .batch_execute(&format!("BEGIN; {}", sql::LOCK_META))
                .map_err(pg_error)?;
            conn.stalled = true;
            Ok(())
        })
    }

    /// The plan this handle's connection has cached for the read of a batch (`keel_stored`)
    /// that writes runs `ids` and claims `slots` of `job`: for the tests of re-planning.
    #[cfg(test)]
    fn cached_read_plan(&self, ids: &[i64], job: &str, slots: &[i64]) -> String {
        self.with_conn(|conn| {
            let jobs = vec![job; slots.len()];
            let explain = format!(
                "BEGIN; {}; EXPLAIN EXECUTE keel_stored({}, {}, {}); ROLLBACK",
                sql::GENERIC_PLANS.join("; "),
                literal::ints(ids),
                literal::texts(jobs.into_iter())?,
                literal::ints(slots)
            );
            let messages = conn.client.simple_query(&explain).map_err(pg_error)?;
            Ok(messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"))
        })
        .unwrap()
    }

    /// Runs `f` on the handle's connection, connecting again first if it broke.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A panic while the lock was held may have left the connection inside a transaction:
        // it is replaced rather than trusted.
        let mut guard = self.conn.lock().unwrap_or_else(|poisoned| {
            self.conn.clear_poison();
            let mut guard = poisoned.into_inner();
            if let Some(conn) = guard.take() {
                close_apart(conn);
            }
            guard
        });
        let conn = match guard.take() {
            Some(conn) if !conn.client.is_closed() && !conn.stalled => conn,
            _ => Conn::open(&self.config, self.stall_limit)?,
        };
        let conn = guard.insert(conn);
        let result = f(conn);
        // A connection the server ended may not know it yet (`is_closed` turns true only once
        // its background task has seen the end): after a failed call a ping decides, so a
        // broken connection is never reused and a live one is kept.
        if conn.client.is_closed() || (result.is_err() && !alive(&mut conn.client)) {
            *guard = None;
        }
        result
    }
}

impl Conn {
    /// A connection ready for the store: connected, its schema migrated, and its database the
    /// one the store was last written on (`identity`).
    fn open(config: &Config, stall_limit: Duration) -> Result<Conn, StoreError> {
        let mut conn = Conn::connect(config, stall_limit)?;
        identity::check(&mut conn.client)?;
        Ok(conn)
    }

    /// A connection with its schema migrated, whatever its database.
    fn connect(config: &Config, stall_limit: Duration) -> Result<Conn, StoreError> {
        let client = tls::connect(config)?;
        if !stall_limit.is_zero() {
            // Whole milliseconds, at least one: zero would mean no limit to the server.
            let ms = stall_limit.as_millis().clamp(1, i32::MAX as u128);
            client
                .batch_execute(&format!("SET idle_in_transaction_session_timeout = {ms}"))
                .map_err(pg_error)?;
        }
        let mut conn = Conn {
            client,
            statements: HashMap::new(),
            stalled: false,
            batches_since_planned: 0,
        };
        conn.migrate()?;
        conn.client
            .batch_execute(&sql::prepare_named())
            .map_err(pg_error)?;
        Ok(conn)
    }

    /// Creates the schema, or migrates it to [`FORMAT`], or refuses it.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self.client.transaction("BEGIN").map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&sql::SCHEMA_LOCK])
            .map_err(pg_error)?;
        let has_meta: bool = column(&tx.query_one(sql::HAS_META, &[]).map_err(pg_error)?, 0, "")?;
        let found = if has_meta {
            let rows = tx.query(sql::READ_FORMAT, &[]).map_err(pg_error)?;
            let Some(row) = rows.first() else {
                return Err(corrupt("keel_meta", "id=1", "the store row is missing"));
            };
            format_number(&column::<String>(row, 0, "keel_meta id=1")?)?
        } else {
            let others = tx.query(sql::OTHER_KEEL_TABLES, &[]).map_err(pg_error)?;
            if !others.is_empty() {
                let names: Vec<String> = others
                    .iter()
                    .map(|row| column(row, 0, "information_schema.tables"))
                    .collect::<Result<_, _>>()?;
                return Err(StoreError::Version {
                    found: format!("no keel_meta table, but {} exist", names.join(", ")),
                    supported: FORMAT.to_owned(),
                });
            }
            0
        };
        if found == sql::MIGRATIONS.len() {
            return tx.commit().map_err(pg_error);
        }
        for (from, step) in sql::MIGRATIONS.iter().enumerate().skip(found) {
            tx.batch_execute(step).map_err(pg_error)?;
            tracing::info!(from, to = from + 1, "postgres store: schema migrated");
        }
        tx.execute(sql::WRITE_FORMAT, &[&FORMAT])
            .map_err(pg_error)?;
        tx.commit().map_err(pg_error)
    }
}

impl Store for PgStore {
    fn restore(&self) -> Result<Snapshot, StoreError> {
        self.with_conn(|conn| {
            let mut tx = conn
                .client
                .transaction("BEGIN ISOLATION LEVEL READ COMMITTED")
                .map_err(pg_error)?;
            let mut s = Session {
                client: &mut tx,
                statements: &mut conn.statements,
            };
            let (writer_epoch, meta) = s.meta(sql::LOCK_META)?;
            let epoch = next_writer_epoch(writer_epoch, meta.epoch);
            s.execute(sql::WRITE_EPOCH, &[&int(epoch, "the writer epoch")?])?;
            // The scheduler adds one to the snapshot's epoch: that is the epoch now accepted.
            let snapshot = s.snapshot(Meta {
                epoch: epoch - 1,
                ..meta
            })?;
            tx.commit().map_err(pg_error)?;
            tracing::info!(epoch, "postgres store: new writer epoch");
            Ok(snapshot)
        })
    }

    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            let replan = conn.batches_since_planned >= sql::REPLAN_EVERY;
            // Counted once the transaction began: a batch that failed before may not have
            // sent its re-plan, and the next one sends it.
            let (mut tx, stored) = BatchTransaction::begin(&mut conn.client, batch, replan)?;
            conn.batches_since_planned = if replan {
                1
            } else {
                conn.batches_since_planned + 1
            };
            // Planned before anything is written: a record that cannot be written (a number
            // above `bigint`) fails the batch before any statement changed a row.
            let phases = batch::plan(&batch.records)?;
            if let Err(conflict) = check_batch(&stored, batch) {
                tracing::debug!(batch = %batch.id, %conflict, "postgres store: batch refused");
                // Dropping the transaction rolls it back.
                return Err(conflict.into());
            }
            let write = Session {
                client: &mut tx,
                statements: &mut conn.statements,
            }
            .statement(sql::WRITE)?;
            // Each phase's writes in one statement, then its prunes; all sent with the
            // `COMMIT`, in one round trip.
            let params: Vec<_> = phases
                .iter()
                .map(|phase| {
                    let empty = phase.writes == batch::Writes::default();
                    let params = (!empty).then(|| batch::WriteParams::new(&phase.writes));
                    Ok((params, prune_statements(&phase.prunes)?))
                })
                .collect::<Result<_, StoreError>>()?;
            let lists: Vec<_> = params
                .iter()
                .map(|(params, _)| params.as_ref().map(batch::WriteParams::params))
                .collect();
            let mut requests = Vec::new();
            for (list, (_, prunes)) in lists.iter().zip(&params) {
                if let Some(list) = list {
                    requests.push(Request::Execute(&write, list));
                }
                if !prunes.is_empty() {
                    requests.push(Request::Simple(prunes.clone()));
                }
            }
            tx.commit_pipelined(requests).map_err(pg_error)
        })
    }

    fn read(&self) -> Result<Snapshot, StoreError> {
        self.with_conn(|conn| {
            let mut tx = conn
                .client
                .transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .map_err(pg_error)?;
            let mut s = Session {
                client: &mut tx,
                statements: &mut conn.statements,
            };
            // The counters as stored: `restore` alone reports the epoch before its writer.
            let (_, meta) = s.meta(sql::READ_META)?;
            let snapshot = s.snapshot(meta)?;
            tx.commit().map_err(pg_error)?;
            Ok(snapshot)
        })
    }

    fn run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        // No stored id is above i64::MAX: `apply` refuses them.
        let Ok(key) = i64::try_from(id.0) else {
            return Ok(None);
        };
        self.with_conn(|conn| {
            let mut s = Session::of(conn);
            let rows = s.query(sql::ONE_RUN, &[&key])?;
            rows.first().map(run_row).transpose()
        })
    }

    fn runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let before = query
            .before
            .map_or(i64::MAX, |b| i64::try_from(b.0).unwrap_or(i64::MAX));
        let from = query.created_from.map_or(i64::MIN, |t| t.0);
        let until = match query.created_until {
            None => i64::MAX,
            Some(until) => match until.0.checked_sub(1) {
                Some(last) => last,
                None => return Ok(RunPage::default()),
            },
        };
        let state = query.state.map(|s| s.to_string());
        // One run more than a page, so `page` can tell whether there is a next one.
        let limit = int(query.page_size() as u64 + 1, "the page size")?;
        let job = query.job.as_ref().map(JobId::as_str);
        let sql = sql::runs_page(job.is_some());
        self.with_conn(|conn| {
            let mut s = Session::of(conn);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&before, &from, &until, &state, &limit];
            if let Some(job) = &job {
                params.push(job);
            }
            let rows = s.query(&sql, &params)?;
            let runs = rows.iter().map(run_row).collect::<Result<Vec<_>, _>>()?;
            Ok(query.page(&runs))
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let after = match query.after {
            None => -1,
            Some(after) => match i64::try_from(after) {
                Ok(after) => after,
                Err(_) => return Ok(Vec::new()),
            },
        };
        let from = query.from.map_or(i64::MIN, |t| t.0);
        let limit = int(query.page_size() as u64, "the page size")?;
        let run = match query.run {
            None => None,
            Some(run) => match i64::try_from(run.0) {
                Ok(run) => Some(run),
                Err(_) => return Ok(Vec::new()),
            },
        };
        let job = query.job.as_ref().map(JobId::as_str);
        let sql = sql::audit_page(run.is_some(), job.is_some());
        self.with_conn(|conn| {
            let mut s = Session::of(conn);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after, &from, &limit];
            if let Some(run) = &run {
                params.push(run);
            }
            if let Some(job) = &job {
                params.push(job);
            }
            let rows = s.query(&sql, &params)?;
            let records = rows
                .iter()
                .map(|row| body::<AuditRecord>(row, "keel_audit", "seq"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(query.page(&records))
        })
    }

    fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.with_conn(|conn| {
            let mut s = Session::of(conn);
            let rows = s.query(sql::ALL_INCIDENTS, &[])?;
            rows.iter()
                .map(|row| body(row, "keel_incidents", "id"))
                .collect()
        })
    }
}

impl Drop for PgStore {
    /// Closes the connection on a thread of its own: the client blocks on its runtime to
    /// close, which would panic inside an async runtime, where a daemon may drop its last
    /// handle.
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(conn) = conn {
            close_apart(conn);
        }
    }
}

/// Drops `value` (a connection) on a new thread; if none can be started, leaks it (the process
/// is in trouble, and the server ends the session when the socket closes at exit).
fn close_apart<T: Send + 'static>(value: T) {
    let spare = std::sync::Arc::new(Mutex::new(Some(value)));
    let moved = std::sync::Arc::clone(&spare);
    let started = std::thread::Builder::new()
        .name("keel-pg-close".into())
        .spawn(move || drop(moved.lock().unwrap_or_else(PoisonError::into_inner).take()));
    if started.is_err() {
        std::mem::forget(spare.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

impl fmt::Debug for PgStore {
    // Not derived: the settings may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .finish_non_exhaustive()
    }
}

/// The READ COMMITTED transaction of one `apply`, begun by hand so that `BEGIN` travels in one
/// round trip with the statements that must come first: [`sql::GENERIC_PLANS`] and the store row
/// lock. Rolled back when dropped unless committed.
struct BatchTransaction;

impl BatchTransaction {
    /// Begins the transaction, takes the store row lock ([`sql::LOCK_META`]) and reads what
    /// [`check_batch`] needs of the stored state (`keel_stored`, [`sql::STORED`]), in one round
    /// trip. Each is a statement of its own, so the read's snapshot is taken once the lock is
    /// held and sees every batch committed before.
    fn begin<'a>(
        client: &'a mut Client,
        batch: &Batch,
        replan: bool,
    ) -> Result<(Transaction<'a>, Stored), StoreError> {
        let keys = StoredKeys::of(batch)?;
        // `DISCARD PLANS` after `BEGIN`: before it, it would take a snapshot in the implicit
        // transaction, and `BEGIN ISOLATION LEVEL …` would then be refused wherever the
        // session's default isolation level is not READ COMMITTED.
        let mut statements = vec!["BEGIN ISOLATION LEVEL READ COMMITTED".to_owned()];
        if replan {
            statements.push(sql::REPLAN.to_owned());
        }
        statements.extend(sql::GENERIC_PLANS.map(str::to_owned));
        let lock = statements.len();
        statements.push(sql::LOCK_META.to_owned());
        let read = statements.len();
        if !keys.ids.is_empty() {
            statements.push(format!(
                "EXECUTE keel_stored({}, {}, {})",
                literal::ints(&keys.ids),
                literal::texts(keys.jobs.iter().copied())?,
                literal::ints(&keys.slots)
            ));
        }
        // Open from here: if a statement after BEGIN fails, the transaction is left aborted
        // and must be rolled back before the connection serves another call.
        let tx = Transaction::begun(client);
        let messages = tx.simple_query(&statements.join("; ")).map_err(pg_error)?;
        let results = rows_by_statement(&messages);
        let epoch = writer_epoch(results.get(lock).map_or(&[][..], Vec::as_slice))?;
        let stored = Stored::from_rows(epoch, results.get(read).map_or(&[][..], Vec::as_slice))?;
        Ok((tx, stored))
    }
}

/// The rows of each statement of a simple query's answer, in order.
fn rows_by_statement(messages: &[SimpleQueryMessage]) -> Vec<Vec<&SimpleQueryRow>> {
    let mut results = Vec::new();
    let mut rows = Vec::new();
    for message in messages {
        match message {
            SimpleQueryMessage::Row(row) => rows.push(row),
            SimpleQueryMessage::CommandComplete(_) => results.push(std::mem::take(&mut rows)),
            _ => {}
        }
    }
    results
}

/// The writer epoch in the rows of [`sql::LOCK_META`] sent in a simple query.
fn writer_epoch(rows: &[&SimpleQueryRow]) -> Result<u64, StoreError> {
    let Some(row) = rows.first() else {
        return Err(corrupt("keel_meta", "id=1", "the store row is missing"));
    };
    let epoch = text_int(row, 0, "keel_meta", "id=1")?;
    uint(epoch, "keel_meta", "id=1")
}

/// Column `index` of a simple query's row: its text, or a corrupt-data error naming the
/// table and key if it is null.
fn text_column<'r>(
    row: &'r SimpleQueryRow,
    index: usize,
    table: &str,
    key: &str,
) -> Result<&'r str, StoreError> {
    match row.try_get(index) {
        Ok(Some(text)) => Ok(text),
        Ok(None) => Err(corrupt(table, key, format!("column {index} is null"))),
        Err(e) => Err(corrupt(table, key, format!("column {index}: {e}"))),
    }
}

/// Column `index` of a simple query's row as a number.
fn text_int(row: &SimpleQueryRow, index: usize, table: &str, key: &str) -> Result<i64, StoreError> {
    let text = text_column(row, index, table, key)?;
    text.parse().map_err(|_| {
        corrupt(
            table,
            key,
            format!("column {index}: {text:?} is not a number"),
        )
    })
}

/// A client (a connection or a transaction on it) with the connection's prepared statements.
struct Session<'a> {
    client: &'a mut Client,
    statements: &'a mut HashMap<String, Statement>,
}

impl<'a> Session<'a> {
    fn of(conn: &'a mut Conn) -> Self {
        Session {
            client: &mut conn.client,
            statements: &mut conn.statements,
        }
    }
}

impl Session<'_> {
    /// The statement for `sql`, prepared once per connection.
    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).map_err(pg_error)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params).map_err(pg_error)
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params).map_err(pg_error)
    }

    /// The writer epoch and the counters, read (or, with [`sql::LOCK_META`], locked) by `sql`.
    fn meta(&mut self, sql: &str) -> Result<(u64, Meta), StoreError> {
        let rows = self.query(sql, &[])?;
        let Some(row) = rows.first() else {
            return Err(corrupt("keel_meta", "id=1", "the store row is missing"));
        };
        let epoch = uint(column(row, 0, "keel_meta id=1")?, "keel_meta", "id=1")?;
        let counters: String = column(row, 1, "keel_meta id=1")?;
        let meta = decode(&counters, "keel_meta", "id=1 (counters)")?;
        Ok((epoch, meta))
    }

    /// What `restore` and `read` return, with `meta` as the counters.
    fn snapshot(&mut self, meta: Meta) -> Result<Snapshot, StoreError> {
        let runs: Vec<Run> = self.bodies(sql::ACTIVE_RUNS, "keel_runs", "id")?;
        Ok(Snapshot {
            jobs: self.bodies::<Job>(sql::ALL_JOBS, "keel_jobs", "id")?,
            runs: runs
                .into_iter()
                .filter(|run| !run.state().is_terminal())
                .collect(),
            meta,
            tombstones: self.bodies::<Tombstone>(sql::ALL_TOMBSTONES, "keel_tombstones", "job")?,
            incidents: self.bodies::<Incident>(sql::OPEN_INCIDENTS, "keel_incidents", "id")?,
            deliveries: self.bodies::<Delivery>(sql::ALL_DELIVERIES, "keel_deliveries", "id")?,
        })
    }

    /// Every row of `sql` (key, body), decoded.
    fn bodies<T: DeserializeOwned>(
        &mut self,
        sql: &str,
        table: &str,
        key: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rows = self.query(sql, &[])?;
        rows.iter().map(|row| body(row, table, key)).collect()
    }
}

/// One phase's prunes as statements for a simple query, each ending in `; ` (none: empty):
/// the prunes of every job one by one, those of single jobs (distinct: see `batch`) as one.
fn prune_statements(prunes: &[batch::Prune]) -> Result<String, StoreError> {
    let mut statements = String::new();
    let mut jobs = Vec::new();
    for prune in prunes {
        match &prune.job {
            // Ranks every terminal run, so a sequential scan may be its best plan: allowed
            // for it alone (`sql::GENERIC_PLANS` turns them off for the rest of the batch).
            None => statements.push_str(&format!(
                "SET LOCAL enable_seqscan = on; EXECUTE keel_prune_all({}, {}); \
                 SET LOCAL enable_seqscan = off; ",
                prune.keep_last, prune.finished_before
            )),
            Some(job) => jobs.push((job.as_str(), prune.keep_last, prune.finished_before)),
        }
    }
    if !jobs.is_empty() {
        let names = literal::texts(jobs.iter().map(|(job, _, _)| *job))?;
        let keep: Vec<i64> = jobs.iter().map(|(_, keep, _)| *keep).collect();
        let before: Vec<i64> = jobs.iter().map(|(_, _, before)| *before).collect();
        statements.push_str(&format!(
            "EXECUTE keel_prune_jobs({names}, {}, {}); ",
            literal::ints(&keep),
            literal::ints(&before)
        ));
    }
    Ok(statements)
}

/// What [`check_batch`] needs of the stored state for one batch, read under the store row
/// lock: the writer epoch, every run the batch writes and every slot it claims.
#[derive(Debug)]
struct Stored {
    writer_epoch: u64,
    runs: BTreeMap<RunId, Run>,
    slots: BTreeMap<(String, i64), RunId>,
}

/// The stored rows a batch's check needs: the runs it writes and the slots it claims
/// (`jobs` and `slots` pairwise).
struct StoredKeys<'b> {
    ids: Vec<i64>,
    jobs: Vec<&'b str>,
    slots: Vec<i64>,
}

impl<'b> StoredKeys<'b> {
    fn of(batch: &'b Batch) -> Result<Self, StoreError> {
        let mut keys = StoredKeys {
            ids: Vec::new(),
            jobs: Vec::new(),
            slots: Vec::new(),
        };
        for record in &batch.records {
            let Record::PutRun(run) = record else {
                continue;
            };
            keys.ids.push(int(run.id().0, "a run id")?);
            if let Some(slot) = run.slot() {
                keys.jobs.push(run.job().as_str());
                keys.slots.push(slot.0);
            }
        }
        Ok(keys)
    }
}

impl Stored {
    /// From the rows of `keel_stored` ([`sql::STORED`]) sent in a simple query.
    fn from_rows(writer_epoch: u64, rows: &[&SimpleQueryRow]) -> Result<Stored, StoreError> {
        let mut stored = Stored {
            writer_epoch,
            runs: BTreeMap::new(),
            slots: BTreeMap::new(),
        };
        for row in rows {
            if text_column(row, 0, "keel_runs or keel_slots", "")? == "run" {
                let id = text_int(row, 1, "keel_runs", "")?;
                let key = format!("id={id}");
                let run = checked_run(id, text_column(row, 2, "keel_runs", &key)?)?;
                stored.runs.insert(run.id(), run);
                continue;
            }
            let job = text_column(row, 3, "keel_slots", "")?;
            let slot = text_int(row, 4, "keel_slots", job)?;
            let key = format!("job={job} slot={slot}");
            let run = uint(text_int(row, 1, "keel_slots", &key)?, "keel_slots", &key)?;
            stored.slots.insert((job.to_owned(), slot), RunId(run));
        }
        Ok(stored)
    }
}

impl StoredView for Stored {
    fn writer_epoch(&self) -> u64 {
        self.writer_epoch
    }

    fn stored_run(&self, id: RunId) -> Option<Run> {
        self.runs.get(&id).cloned()
    }

    fn slot_owner(&self, job: &JobId, slot: Timestamp) -> Option<RunId> {
        self.slots.get(&(job.as_str().to_owned(), slot.0)).copied()
    }
}

/// A `keel_runs` row (id, body), decoded, checked to be the run its key says.
fn run_row(row: &Row) -> Result<Run, StoreError> {
    let id: i64 = column(row, 0, "keel_runs")?;
    let body: String = column(row, 1, &format!("keel_runs id={id}"))?;
    checked_run(id, &body)
}

/// The body of `keel_runs` row `id`, decoded, checked to be the run its key says.
fn checked_run(id: i64, body: &str) -> Result<Run, StoreError> {
    let key = format!("id={id}");
    let run: Run = decode(body, "keel_runs", &key)?;
    if i64::try_from(run.id().0) != Ok(id) {
        return Err(corrupt(
            "keel_runs",
            &key,
            format!("the row holds {}", run.id()),
        ));
    }
    Ok(run)
}

/// A row (key, body) of `table`, its body decoded; `key` names the key column.
fn body<T: DeserializeOwned>(row: &Row, table: &str, key: &str) -> Result<T, StoreError> {
    let key = match row.try_get::<_, i64>(0) {
        Ok(id) => format!("{key}={id}"),
        Err(_) => format!("{key}={}", row.try_get::<_, String>(0).unwrap_or_default()),
    };
    let text: String = column(row, 1, &format!("{table} {key}"))?;
    decode(&text, table, &key)
}

/// Column `index` of `row`, or a corrupt-data error naming `location`.
fn column<'a, T: FromSql<'a>>(row: &'a Row, index: usize, location: &str) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| StoreError::Corrupt {
        location: location.to_owned(),
        detail: format!("column {index}: {e}"),
    })
}

fn decode<T: DeserializeOwned>(text: &str, table: &str, key: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(table, key, format!("undecodable body: {e}")))
}

fn encode(value: &impl Serialize) -> Result<String, StoreError> {
    // keel's records serialise to JSON by construction; a failure is a bug, reported as a
    // failed write rather than a panic.
    serde_json::to_string(value).map_err(|e| StoreError::Io(format!("cannot encode a record: {e}")))
}

fn corrupt(table: &str, key: &str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: format!("table {table}, {key}"),
        detail: detail.into(),
    }
}

/// A number for a `bigint` column.
fn int(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| {
        StoreError::Io(format!(
            "{what} ({value}) does not fit a Postgres bigint; this store keeps numbers up to {}",
            i64::MAX
        ))
    })
}

/// A stored `bigint` that must not be negative.
fn uint(value: i64, table: &str, key: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(table, key, format!("negative number {value}")))
}

/// The number of a format marker, if it is this store's; refuses a newer one.
fn format_number(found: &str) -> Result<usize, StoreError> {
    let version = |found: &str| StoreError::Version {
        found: found.to_owned(),
        supported: FORMAT.to_owned(),
    };
    let number = found
        .strip_prefix(sql::FORMAT_PREFIX)
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| version(found))?;
    // Format 0 is an empty schema: no marker ever says it.
    if number == 0 || number > sql::MIGRATIONS.len() {
        return Err(version(found));
    }
    Ok(number)
}

/// How long [`alive`] waits for the server's answer.
const ALIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a connection on which a call just failed still answers. A session the server ended
/// is not always marked closed by the time the failed call returns, and a connection kept in
/// that state would fail every later call instead of being replaced.
pub(crate) fn alive(client: &mut Client) -> bool {
    !client.is_closed() && client.answers_within(ALIVE_WAIT)
}

/// A client failure as a store error.
fn pg_error(error: tokio_postgres::Error) -> StoreError {
    match error.as_db_error() {
        Some(db) => StoreError::Io(format!(
            "postgres: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        )),
        None => StoreError::Io(format!("postgres: {}", with_causes(&error))),
    }
}

/// `error` and its causes: the client's own message ("error performing TLS handshake", "invalid
/// connection string") leaves what went wrong to its source.
fn with_causes(error: &tokio_postgres::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_or_foreign_format_is_refused_by_name() {
        assert_eq!(format_number(FORMAT), Ok(sql::MIGRATIONS.len()));
        assert_eq!(FORMAT, "keel-store-postgres 6");
        for found in [
            "keel-store-postgres 7",
            "keel-store-postgres 0",
            "keel-store-postgres x",
            "keel-store-sled 1",
        ] {
            assert_eq!(
                format_number(found),
                Err(StoreError::Version {
                    found: found.to_owned(),
                    supported: FORMAT.to_owned()
                })
            );
        }
    }

    #[test]
    fn numbers_above_bigint_are_refused_not_wrapped() {
        assert_eq!(int(i64::MAX as u64, "x"), Ok(i64::MAX));
        assert!(matches!(
            int(i64::MAX as u64 + 1, "x"),
            Err(StoreError::Io(_))
        ));
        assert!(matches!(
            uint(-1, "t", "k"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn audit_pages_name_their_parameters_in_order() {
        assert!(sql::audit_page(true, true).contains("run = $4 AND job = $5"));
        assert!(sql::audit_page(false, true).contains("job = $4"));
        assert!(!sql::audit_page(false, false).contains("$4"));
    }
}

// The integration tests' Postgres support, shared so the plan tests can see `sql`.
#[cfg(test)]
extern crate self as keel_store_postgres;
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(test)]
mod plans;

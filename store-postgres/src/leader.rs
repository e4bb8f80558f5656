//! Leadership: which of the processes sharing a store is its writer, through a lease row.
//!
//! The row `keel_leader id = 1` names the holder, its term (raised at every takeover), since
//! when it leads and until when. Expiry is judged by the **database's clock** (`now()`), the
//! one clock every host shares; a holder measures its own renewals with its local monotonic
//! clock, which only has to run at the same rate.
//!
//! The intended loop (keel's daemon runs it):
//!
//! - a standby calls [`Leadership::try_acquire`] about once a second, and [`Leadership::current`]
//!   to say who leads;
//! - the leader calls [`Leadership::renew`] every third of the TTL, and stops itself once no
//!   renewal sent in the last `ttl - margin` succeeded: by then a standby may take the lease;
//! - a leader that stops cleanly calls [`Leadership::resign`], so that a standby takes over at
//!   its next poll instead of after the TTL.
//!
//! The lease decides who *should* write; the store's writer epoch decides who *can*: the new
//! leader's `restore` raises it, so a late batch of the old leader is refused
//! ([`Conflict::Deposed`](keel_core::Conflict::Deposed)) even if the old leader has not yet
//! noticed that it lost the lease.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use keel_core::{StoreError, Timestamp};
use tokio_postgres::Row;

use crate::client::Client;
use crate::{column, pg_error, sql, Config, Conn};

/// The lease as the database holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Who holds (or last held) it, as the holder named itself.
    pub holder: String,
    /// Raised at every takeover: one term, one leader.
    pub term: u64,
    /// When this term began, by the database's clock.
    pub acquired_at: Timestamp,
    /// When it ends unless renewed, by the database's clock.
    pub expires_at: Timestamp,
    /// Whether it had not expired when it was read (by the database's clock).
    pub live: bool,
    /// How long it had left when it was read, by the database's clock (zero once expired): a
    /// standby sleeps that long, rather than a whole poll, before it tries to take over.
    pub remaining: Duration,
    /// Where the holder serves its HTTP API (`http://host:port`), if it advertises one: a
    /// process that does not lead sends a change there. Set by the acquisition or by
    /// [`Leadership::advertise`], cleared at every takeover.
    pub api: Option<String>,
}

/// One process's handle on the leadership lease: its own connection, apart from the store's,
/// so that a store write in progress never delays a renewal.
pub struct Leadership {
    config: Config,
    holder: String,
    ttl: Duration,
    /// Replaced at the next call once it broke.
    client: Mutex<Option<Client>>,
}

impl Leadership {
    /// A handle for `holder` (unique among the processes sharing the store: keel's daemon uses
    /// host, pid and a random number), with leases of `ttl`. Creates or migrates the schema
    /// like [`PgStore::connect`](crate::PgStore::connect).
    pub fn new(config: Config, holder: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        let conn = Conn::open(&config, crate::DEFAULT_STALL_LIMIT)?;
        Ok(Leadership {
            config,
            holder: holder.to_owned(),
            ttl,
            client: Mutex::new(Some(conn.client)),
        })
    }

    /// This handle's holder name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes the lease if nobody holds a live one (a new term), and returns it; `None` if
    /// someone else (or an earlier term of this handle) holds it.
    pub fn try_acquire(&self) -> Result<Option<Lease>, StoreError> {
        self.try_acquire_advertising(None)
    }

    /// [`Leadership::try_acquire`], advertising `api` (where this process serves its HTTP API)
    /// in the lease from the start. A previous holder's API is never kept.
    pub fn try_acquire_advertising(&self, api: Option<&str>) -> Result<Option<Lease>, StoreError> {
        let ttl = self.ttl_ms();
        self.with_client(|client| {
            let rows = client
                .query(sql::LEADER_ACQUIRE, &[&self.holder, &ttl, &api])
                .map_err(pg_error)?;
            rows.first().map(lease).transpose()
        })
    }

    /// Advertises `api` (or none) in the lease of `term`, if this holder still holds it:
    /// `Ok(None)` if another process took over meanwhile. For a holder that learns its API's
    /// address only after it took the lease (a listener on port 0).
    pub fn advertise(&self, term: u64, api: Option<&str>) -> Result<Option<Lease>, StoreError> {
        let term = term_int(term)?;
        self.with_client(|client| {
            let rows = client
                .query(sql::LEADER_ADVERTISE, &[&self.holder, &term, &api])
                .map_err(pg_error)?;
            rows.first().map(lease).transpose()
        })
    }

    /// Extends `term` by the TTL from the database's `now()`. `Ok(None)` if the lease is no
    /// longer this holder's term: another process took over, and this one must stop writing.
    pub fn renew(&self, term: u64) -> Result<Option<Lease>, StoreError> {
        let ttl = self.ttl_ms();
        let term = term_int(term)?;
        self.with_client(|client| {
            let rows = client
                .query(sql::LEADER_RENEW, &[&self.holder, &term, &ttl])
                .map_err(pg_error)?;
            rows.first().map(lease).transpose()
        })
    }

    /// Ends `term` now, if it is still this holder's, so that a standby takes over at once.
    pub fn resign(&self, term: u64) -> Result<(), StoreError> {
        let term = term_int(term)?;
        self.with_client(|client| {
            client
                .execute(sql::LEADER_RESIGN, &[&self.holder, &term])
                .map(drop)
                .map_err(pg_error)
        })
    }

    /// The lease as it stands (live or not); `None` if nobody ever led.
    pub fn current(&self) -> Result<Option<Lease>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(sql::LEADER_CURRENT, &[]).map_err(pg_error)?;
            rows.first().map(lease).transpose()
        })
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Runs `f` on the handle's connection, connecting again first if it broke.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // The mutex guards a connection whose statements each commit alone (no transaction is
        // ever left open on it), so a poisoned lock is still good.
        let mut guard = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        let client = match guard.take() {
            Some(client) if !client.is_closed() => client,
            _ => crate::tls::connect(&self.config)?,
        };
        let client = guard.insert(client);
        let result = f(client);
        if client.is_closed() || (result.is_err() && !crate::alive(client)) {
            *guard = None;
        }
        result
    }
}

impl Drop for Leadership {
    /// As `PgStore`'s: closes the connection apart, so that dropping a handle in an async
    /// runtime does not panic.
    fn drop(&mut self) {
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(client) = client {
            crate::close_apart(client);
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the config: it may hold a password.
        f.debug_struct("Leadership")
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn lease(row: &Row) -> Result<Lease, StoreError> {
    let at = "keel_leader id=1";
    let ms = |index| -> Result<Timestamp, StoreError> {
        let ms: i64 = column(row, index, at)?;
        Ok(Timestamp::from_millis(ms))
    };
    let term: i64 = column(row, 1, at)?;
    Ok(Lease {
        holder: column(row, 0, at)?,
        term: u64::try_from(term).unwrap_or(0),
        acquired_at: ms(2)?,
        expires_at: ms(3)?,
        live: column(row, 4, at)?,
        remaining: Duration::from_millis(u64::try_from(column::<i64>(row, 5, at)?).unwrap_or(0)),
        api: column(row, 6, at)?,
    })
}

fn term_int(term: u64) -> Result<i64, StoreError> {
    i64::try_from(term).map_err(|_| StoreError::Io(format!("leader term {term} out of range")))
}

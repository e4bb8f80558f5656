//! Which database a store lives on, so that a failover that may have lost acknowledged batches
//! stops keel instead of being written over.
//!
//! A database is named by its **system identifier**, fixed when the cluster was created and the
//! same on a primary and every physical replica of it, and the **timeline** it writes on, which
//! every promotion of a replica and every point-in-time recovery raises. `keel_meta` keeps the
//! pair the store was last written on (`database_identity`, `SYSTEM/TIMELINE`). Every connection
//! a handle opens compares it with the database's own:
//!
//! | stored | found | verdict |
//! |---|---|---|
//! | nothing (a new store, or one from before format 3) | any | recorded, go on |
//! | the same pair | | go on |
//! | another pair | | [`StoreError::Diverged`]: nothing is read or written |
//!
//! A new timeline means the writer may now be on a replica that was promoted: with asynchronous
//! replication it can lack the last batches the old primary acknowledged, a slot whose run was
//! lost would fire again, and a leader whose connection moved over would write on from a state
//! the database does not have. keel cannot tell a lossless switchover from a lossy failover, so
//! it refuses both until an operator has checked and called [`PgStore::accept_database`]
//! (`keel doctor --accept-database`). A database whose identity cannot be read (a managed
//! service that hides `pg_control_system()`) is not checked, and says so in the log.
//!
//! [`PgStore::accept_database`]: crate::PgStore::accept_database

use std::fmt;

use keel_core::StoreError;
use tokio_postgres::error::SqlState;

use crate::client::Client;

use crate::{column, corrupt, pg_error, sql};

/// A database's identity: its system identifier and the timeline it writes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseIdentity {
    /// `pg_control_system().system_identifier`, the same on a primary and its replicas.
    pub system: String,
    /// The WAL timeline the primary writes on, raised by each promotion and point-in-time
    /// recovery.
    pub timeline: u32,
}

impl fmt::Display for DatabaseIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system {} timeline {}", self.system, self.timeline)
    }
}

impl DatabaseIdentity {
    /// The form `keel_meta.database_identity` holds.
    fn stored(&self) -> String {
        format!("{}/{}", self.system, self.timeline)
    }

    /// Reads the stored form; `None` if it is not one.
    fn parse(stored: &str) -> Option<DatabaseIdentity> {
        let (system, timeline) = stored.split_once('/')?;
        if system.is_empty() || !system.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(DatabaseIdentity {
            system: system.to_owned(),
            timeline: timeline.parse().ok()?,
        })
    }

    /// The timeline of a WAL file's name (`pg_walfile_name`): its first 8 hex digits.
    fn timeline_of(walfile: &str) -> Option<u32> {
        u32::from_str_radix(walfile.get(..8)?, 16).ok()
    }
}

/// What a handle does on a connection, given the stored identity and the database's.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The same database: go on.
    Same,
    /// Nothing stored yet: store the database's, and go on.
    Record,
    /// Another database, or another timeline of it: refuse.
    Diverged(DatabaseIdentity),
}

fn judge(stored: Option<&DatabaseIdentity>, found: &DatabaseIdentity) -> Verdict {
    match stored {
        None => Verdict::Record,
        Some(stored) if stored == found => Verdict::Same,
        Some(stored) => Verdict::Diverged(stored.clone()),
    }
}

/// The database's identity; `None` if it cannot be read (no privilege on, or no,
/// `pg_control_system()`). A replica in recovery is refused: keel writes on the primary.
pub(crate) fn current(client: &mut Client) -> Result<Option<DatabaseIdentity>, StoreError> {
    let row = match client.query_one(sql::DATABASE_IDENTITY, &[]) {
        Ok(row) => row,
        Err(e)
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
                || e.code() == Some(&SqlState::UNDEFINED_FUNCTION) =>
        {
            tracing::warn!(error = %e, "postgres store: cannot read the database's identity; a failover will not be detected");
            return Ok(None);
        }
        Err(e) => return Err(pg_error(e)),
    };
    let at = "pg_control_system()";
    if column::<bool>(&row, 0, at)? {
        return Err(StoreError::Io(
            "postgres: the database is a replica in recovery (read-only); connect to the primary"
                .into(),
        ));
    }
    let system: String = column(&row, 1, at)?;
    let walfile: String = column(&row, 2, at)?;
    let timeline = DatabaseIdentity::timeline_of(&walfile)
        .ok_or_else(|| StoreError::Io(format!("postgres: unexpected WAL file name {walfile:?}")))?;
    Ok(Some(DatabaseIdentity { system, timeline }))
}

/// The identity stored in `keel_meta`, if any.
fn stored(client: &mut Client) -> Result<Option<DatabaseIdentity>, StoreError> {
    let row = client
        .query_one(sql::READ_STORED_IDENTITY, &[])
        .map_err(pg_error)?;
    let Some(text) = column::<Option<String>>(&row, 0, "keel_meta id=1")? else {
        return Ok(None);
    };
    DatabaseIdentity::parse(&text).map(Some).ok_or_else(|| {
        corrupt(
            "keel_meta",
            "id=1",
            format!("database_identity {text:?} is not SYSTEM/TIMELINE"),
        )
    })
}

/// Compares the database's identity with the stored one: records it if none is stored,
/// refuses with [`StoreError::Diverged`] if another is.
pub(crate) fn check(client: &mut Client) -> Result<(), StoreError> {
    let Some(found) = current(client)? else {
        return Ok(());
    };
    match judge(stored(client)?.as_ref(), &found) {
        Verdict::Same => Ok(()),
        Verdict::Record => {
            client
                .execute(sql::WRITE_STORED_IDENTITY, &[&found.stored()])
                .map_err(pg_error)?;
            Ok(())
        }
        Verdict::Diverged(stored) => Err(StoreError::Diverged(format!(
            "the store was last written on {stored} and this database is {found}: a replica \
             promoted after a failover, or a restored backup, may lack batches that were \
             acknowledged, and writing on could run a slot twice. Nothing was read or written. \
             Check the database, then accept it (keel doctor --accept-database, or \
             PgStore::accept_database)"
        ))),
    }
}

/// Stores the database's identity as the store's own, whatever was stored: what an operator
/// does after checking a failover. Returns the identity stored before, and the one now.
pub(crate) fn accept(
    client: &mut Client,
) -> Result<(Option<DatabaseIdentity>, DatabaseIdentity), StoreError> {
    let found = current(client)?.ok_or_else(|| {
        StoreError::Io(
            "postgres: cannot read the database's identity (pg_control_system()), so there is \
             nothing to accept"
                .into(),
        )
    })?;
    let before = match stored(client) {
        Ok(before) => before,
        // A stored value keel cannot read is replaced too: that is what accepting means.
        Err(StoreError::Corrupt { .. }) => None,
        Err(e) => return Err(e),
    };
    client
        .execute(sql::WRITE_STORED_IDENTITY, &[&found.stored()])
        .map_err(pg_error)?;
    Ok((before, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(system: &str, timeline: u32) -> DatabaseIdentity {
        DatabaseIdentity {
            system: system.into(),
            timeline,
        }
    }

    #[test]
    fn the_same_database_goes_on_a_new_store_records_and_any_change_is_refused() {
        let primary = id("7716612235449413979", 1);
        assert_eq!(judge(None, &primary), Verdict::Record);
        assert_eq!(judge(Some(&primary), &primary), Verdict::Same);
        // A promoted replica: the same system, a new timeline.
        assert_eq!(
            judge(Some(&primary), &id("7716612235449413979", 2)),
            Verdict::Diverged(primary.clone())
        );
        // Another cluster altogether (a dump restored elsewhere).
        assert_eq!(
            judge(Some(&primary), &id("7716612235449413980", 1)),
            Verdict::Diverged(primary.clone())
        );
    }

    #[test]
    fn the_stored_form_round_trips_and_junk_is_not_an_identity() {
        let identity = id("7716612235449413979", 12);
        assert_eq!(identity.stored(), "7716612235449413979/12");
        assert_eq!(DatabaseIdentity::parse(&identity.stored()), Some(identity));
        for junk in ["", "/", "7716/", "/3", "x1/2", "1/x", "1/2/3", "77 16/1"] {
            assert_eq!(DatabaseIdentity::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_timeline_is_the_wal_file_names_first_eight_hex_digits() {
        assert_eq!(
            DatabaseIdentity::timeline_of("000000010000000000000001"),
            Some(1)
        );
        assert_eq!(
            DatabaseIdentity::timeline_of("0000001A00000003000000C4"),
            Some(26)
        );
        assert_eq!(DatabaseIdentity::timeline_of("0001"), None);
        assert_eq!(DatabaseIdentity::timeline_of("zzzzzzzz0000"), None);
    }
}

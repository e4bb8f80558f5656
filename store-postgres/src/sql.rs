//! Every SQL statement of the store, and its schema migrations, in one place.
//!
//! Table names are unqualified: the connection's `search_path` chooses the schema, so one
//! database can hold several keel stores (one per schema).

/// The format marker this build writes and reads, in `keel_meta.format`.
pub(crate) const FORMAT: &str = "keel-store-postgres 5";

/// The prefix of every format marker of this store; what follows it is the format number.
pub(crate) const FORMAT_PREFIX: &str = "keel-store-postgres ";

/// The advisory lock key that serialises schema creation and migration between processes
/// connecting at once (`pg_advisory_xact_lock`): "keel" in ASCII.
pub(crate) const SCHEMA_LOCK: i64 = 0x6b65_656c;

/// Migrations, in order: `MIGRATIONS[n]` takes a schema from format `n` to format `n + 1`
/// (format 0 is an empty schema). The last one's number is [`FORMAT`]'s.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

/// Format 5: the holder's lease session (`backend_pid`) and when it last acquired or renewed
/// (`renewed_at`), so that a standby takes over at once when that session is gone (the holder
/// died) rather than after the TTL; see `takeable!`.
const V5: &str = "ALTER TABLE keel_leader ADD COLUMN backend_pid integer, \
                  ADD COLUMN renewed_at timestamptz;";

/// Format 4: where the leader serves its HTTP API (`http://host:port`), so that a command run
/// on any host can send it a change; NULL while it serves none, and cleared at every takeover.
const V4: &str = "ALTER TABLE keel_leader ADD COLUMN api text;";

/// Format 3: which database the store was last written on (`identity` module), as
/// `SYSTEM_IDENTIFIER/TIMELINE`; NULL until a handle records it.
const V3: &str = "ALTER TABLE keel_meta ADD COLUMN database_identity text;";

/// Format 2: the leadership lease (`leader` module), one row `id = 1` once anyone led. Times are
/// the database's (`now()`), so that one clock judges every host's lease.
const V2: &str = r#"
CREATE TABLE keel_leader (
    id smallint PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    term bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
"#;

/// Format 1. Bodies are `json`, not `jsonb`: `jsonb` refuses the escape `\u0000`, so one NUL
/// in an error message would make a batch fail forever; `json` keeps the text as written.
/// Columns beside a body are copies of its fields that the queries filter, order or join on.
const V1: &str = r#"
CREATE TABLE keel_meta (
    id smallint PRIMARY KEY CHECK (id = 1),
    format text NOT NULL,
    writer_epoch bigint NOT NULL,
    counters json NOT NULL
);
INSERT INTO keel_meta (id, format, writer_epoch, counters)
    VALUES (1, 'keel-store-postgres 1', 0, '{"next_run_id": 0, "next_audit_seq": 0}');
CREATE TABLE keel_jobs (id text PRIMARY KEY, body json NOT NULL);
CREATE TABLE keel_tombstones (job text PRIMARY KEY, body json NOT NULL);
CREATE TABLE keel_runs (
    id bigint PRIMARY KEY,
    job text NOT NULL,
    state text NOT NULL,
    created_at bigint NOT NULL,
    finished_at bigint,
    active boolean NOT NULL,
    body json NOT NULL
);
CREATE INDEX keel_runs_by_job ON keel_runs (job, id);
CREATE INDEX keel_runs_active ON keel_runs (id) WHERE active;
CREATE INDEX keel_runs_finished ON keel_runs (job, finished_at, id) WHERE finished_at IS NOT NULL;
CREATE TABLE keel_slots (
    job text NOT NULL,
    slot bigint NOT NULL,
    run bigint NOT NULL,
    PRIMARY KEY (job, slot)
);
CREATE TABLE keel_audit (
    seq bigint PRIMARY KEY,
    job text NOT NULL,
    run bigint,
    at bigint NOT NULL,
    body json NOT NULL
);
CREATE INDEX keel_audit_by_run ON keel_audit (run, seq) WHERE run IS NOT NULL;
CREATE INDEX keel_audit_by_job ON keel_audit (job, seq);
CREATE TABLE keel_incidents (id bigint PRIMARY KEY, open boolean NOT NULL, body json NOT NULL);
CREATE TABLE keel_deliveries (id bigint PRIMARY KEY, body json NOT NULL);
"#;

/// Whether the schema has a `keel_meta` table (in the `search_path`).
pub(crate) const HAS_META: &str = "SELECT to_regclass('keel_meta') IS NOT NULL";

/// Any other table whose name starts with `keel_` in the current schema: a schema without
/// `keel_meta` but with these is not adopted.
pub(crate) const OTHER_KEEL_TABLES: &str =
    "SELECT table_name::text FROM information_schema.tables \
     WHERE table_schema = current_schema() AND table_name LIKE 'keel\\_%' ORDER BY 1";

pub(crate) const READ_FORMAT: &str = "SELECT format FROM keel_meta WHERE id = 1";
pub(crate) const WRITE_FORMAT: &str = "UPDATE keel_meta SET format = $1 WHERE id = 1";

/// The store row every write and every `restore` locks first: it orders them all, and holds
/// the writer epoch that `check_batch` compares the batch's with.
pub(crate) const LOCK_META: &str =
    "SELECT writer_epoch, counters::text FROM keel_meta WHERE id = 1 FOR UPDATE";
pub(crate) const READ_META: &str =
    "SELECT writer_epoch, counters::text FROM keel_meta WHERE id = 1";
pub(crate) const WRITE_EPOCH: &str = "UPDATE keel_meta SET writer_epoch = $1 WHERE id = 1";
pub(crate) const WRITE_COUNTERS: &str =
    "UPDATE keel_meta SET counters = $1::text::json WHERE id = 1";

/// The stored runs a batch writes (`$1`: their ids).
pub(crate) const STORED_RUNS: &str =
    "SELECT id, body::text FROM keel_runs WHERE id = ANY($1::bigint[])";
/// The claims of the slots a batch claims (`$1`, `$2`: jobs and slots, pairwise).
pub(crate) const STORED_SLOTS: &str = "SELECT s.job, s.slot, s.run FROM keel_slots s \
     JOIN unnest($1::text[], $2::bigint[]) AS k(job, slot) \
     ON s.job = k.job AND s.slot = k.slot";

pub(crate) const PUT_JOB: &str = "INSERT INTO keel_jobs (id, body) VALUES ($1, $2::text::json) \
     ON CONFLICT (id) DO UPDATE SET body = excluded.body";
pub(crate) const DELETE_JOB: &str = "DELETE FROM keel_jobs WHERE id = $1";
pub(crate) const PUT_TOMBSTONE: &str = "INSERT INTO keel_tombstones (job, body) \
     VALUES ($1, $2::text::json) ON CONFLICT (job) DO UPDATE SET body = excluded.body";
pub(crate) const DELETE_TOMBSTONE: &str = "DELETE FROM keel_tombstones WHERE job = $1";
pub(crate) const PUT_RUN: &str = "INSERT INTO keel_runs \
     (id, job, state, created_at, finished_at, active, body) \
     VALUES ($1, $2, $3, $4, $5, $6, $7::text::json) \
     ON CONFLICT (id) DO UPDATE SET job = excluded.job, state = excluded.state, \
     created_at = excluded.created_at, finished_at = excluded.finished_at, \
     active = excluded.active, body = excluded.body";
/// `check_batch` has already refused a claim by another run, so an existing claim is this
/// run's own.
pub(crate) const PUT_SLOT: &str = "INSERT INTO keel_slots (job, slot, run) VALUES ($1, $2, $3) \
     ON CONFLICT (job, slot) DO UPDATE SET run = excluded.run";
pub(crate) const PUT_AUDIT: &str = "INSERT INTO keel_audit (seq, job, run, at, body) \
     VALUES ($1, $2, $3, $4, $5::text::json) \
     ON CONFLICT (seq) DO UPDATE SET job = excluded.job, run = excluded.run, at = excluded.at, \
     body = excluded.body";
pub(crate) const PUT_INCIDENT: &str = "INSERT INTO keel_incidents (id, open, body) \
     VALUES ($1, $2, $3::text::json) \
     ON CONFLICT (id) DO UPDATE SET open = excluded.open, body = excluded.body";
pub(crate) const PUT_DELIVERY: &str = "INSERT INTO keel_deliveries (id, body) \
     VALUES ($1, $2::text::json) ON CONFLICT (id) DO UPDATE SET body = excluded.body";
pub(crate) const DELETE_DELIVERY: &str = "DELETE FROM keel_deliveries WHERE id = $1";

/// `PruneHistory`: for job `$1` (or every job if null), deletes every terminal run but the
/// newest `$2` (latest finish, then highest id) and every one finished before `$3`, with the
/// audit records of the deleted runs. Slot claims stay (SPEC S6).
pub(crate) const PRUNE: &str = "WITH ranked AS ( \
         SELECT id, finished_at, \
             row_number() OVER (PARTITION BY job ORDER BY finished_at DESC, id DESC) AS newer \
         FROM keel_runs WHERE finished_at IS NOT NULL AND ($1::text IS NULL OR job = $1) \
     ), doomed AS ( \
         DELETE FROM keel_runs r USING ranked d \
         WHERE r.id = d.id AND (d.newer > $2 OR d.finished_at < $3) \
         RETURNING r.id \
     ) \
     DELETE FROM keel_audit WHERE run IN (SELECT id FROM doomed)";

/// Byte order (`COLLATE "C"`), as keel orders names, whatever the database's collation.
pub(crate) const ALL_JOBS: &str = "SELECT id, body::text FROM keel_jobs ORDER BY id COLLATE \"C\"";
pub(crate) const ACTIVE_RUNS: &str =
    "SELECT id, body::text FROM keel_runs WHERE active ORDER BY id";
pub(crate) const ALL_TOMBSTONES: &str =
    "SELECT job, body::text FROM keel_tombstones ORDER BY job COLLATE \"C\"";
pub(crate) const OPEN_INCIDENTS: &str =
    "SELECT id, body::text FROM keel_incidents WHERE open ORDER BY id";
pub(crate) const ALL_INCIDENTS: &str = "SELECT id, body::text FROM keel_incidents ORDER BY id";
pub(crate) const ALL_DELIVERIES: &str = "SELECT id, body::text FROM keel_deliveries ORDER BY id";
pub(crate) const ONE_RUN: &str = "SELECT id, body::text FROM keel_runs WHERE id = $1";

/// A page of runs, newest first: `$1` the cursor (ids below it), `$2`..`$3` the creation
/// window (inclusive), `$4` the state or null, `$5` the row limit; with a job, `$6`. Each
/// filter that an index serves is a plain comparison, so the primary key (or, for one job,
/// `keel_runs_by_job`) is walked backwards and the scan stops at the limit.
pub(crate) fn runs_page(by_job: bool) -> String {
    let job = if by_job { " AND job = $6" } else { "" };
    format!(
        "SELECT id, body::text FROM keel_runs \
         WHERE id < $1 AND created_at >= $2 AND created_at <= $3 \
         AND ($4::text IS NULL OR state = $4){job} \
         ORDER BY id DESC LIMIT $5"
    )
}

/// A page of audit records, oldest first: `$1` the cursor (seqs above it), `$2` the earliest
/// instant, `$3` the row limit; then the run (`keel_audit_by_run`) and the job
/// (`keel_audit_by_job`) if given, in that order.
pub(crate) fn audit_page(by_run: bool, by_job: bool) -> String {
    let mut filters = String::new();
    let mut next = 4;
    if by_run {
        filters.push_str(&format!(" AND run = ${next}"));
        next += 1;
    }
    if by_job {
        filters.push_str(&format!(" AND job = ${next}"));
    }
    format!(
        "SELECT seq, body::text FROM keel_audit WHERE seq > $1 AND at >= $2{filters} \
         ORDER BY seq LIMIT $3"
    )
}

// ----- leadership (`leader` module) ----------------------------------------------------------

/// The columns every leadership statement returns: holder, term, acquired_at and expires_at as
/// milliseconds since the epoch, whether the lease is live by the database's clock, how many
/// milliseconds it has left by that clock (0 once expired), and the API the holder advertises.
macro_rules! leader_columns {
    () => {
        concat!(
            "l.holder, l.term, (extract(epoch FROM l.acquired_at) * 1000)::bigint, \
             (extract(epoch FROM l.expires_at) * 1000)::bigint, NOT ",
            takeable!(),
            ", greatest(ceil(extract(epoch FROM l.expires_at - now()) * 1000), 0)::bigint, l.api"
        )
    };
}

/// Whether the lease row `l` may be taken: it expired by the database's clock, or its holder's
/// lease session is gone (no backend has its pid: the holder was killed, crashed, or its host
/// went down and the server noticed), unless the server itself restarted since the holder last
/// renewed (then every session is gone, and a live holder reconnects: the lease runs its TTL).
/// A pid reused by another session since reads as alive: the lease then runs its TTL too.
macro_rules! takeable {
    () => {
        "(l.expires_at <= now() OR (l.backend_pid IS NOT NULL \
         AND l.renewed_at > pg_postmaster_start_time() \
         AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid)))"
    };
}

/// Takes the lease if nobody holds a live one: a new term, expiring `$2` ms from the
/// database's `now()`, advertising the API `$3` (or none: the previous holder's is never kept).
/// One statement, so two processes racing for it cannot both win: the loser's `ON CONFLICT`
/// re-checks the `WHERE` against the winner's row and updates nothing.
pub(crate) const LEADER_ACQUIRE: &str = concat!(
    "INSERT INTO keel_leader AS l \
     (id, holder, term, acquired_at, expires_at, api, backend_pid, renewed_at) \
     VALUES (1, $1, 1, now(), now() + $2::bigint * interval '1 millisecond', $3, \
     pg_backend_pid(), now()) \
     ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, term = l.term + 1, \
     acquired_at = now(), expires_at = EXCLUDED.expires_at, api = EXCLUDED.api, \
     backend_pid = EXCLUDED.backend_pid, renewed_at = now() \
     WHERE ",
    takeable!(),
    " RETURNING ",
    leader_columns!()
);

/// Extends the holder's term by `$3` ms from `now()`. Also after the lease expired, if nobody
/// took it meanwhile: holder and term unchanged mean nobody else led in between.
/// The renewal records the holder's lease session as it is now (a reconnect changes it).
pub(crate) const LEADER_RENEW: &str = concat!(
    "UPDATE keel_leader AS l SET expires_at = now() + $3::bigint * interval '1 millisecond', \
     backend_pid = pg_backend_pid(), renewed_at = now() \
     WHERE id = 1 AND holder = $1 AND term = $2 RETURNING ",
    leader_columns!()
);

/// Sets the API the holder of term `$2` advertises (`$3`, or none), if it still holds it.
pub(crate) const LEADER_ADVERTISE: &str = concat!(
    "UPDATE keel_leader AS l SET api = $3 WHERE id = 1 AND holder = $1 AND term = $2 \
     RETURNING ",
    leader_columns!()
);

/// Ends the holder's term now, so that a standby takes over at its next poll.
pub(crate) const LEADER_RESIGN: &str =
    "UPDATE keel_leader SET expires_at = now() WHERE id = 1 AND holder = $1 AND term = $2";

/// The lease as it stands.
pub(crate) const LEADER_CURRENT: &str = concat!(
    "SELECT ",
    leader_columns!(),
    " FROM keel_leader AS l WHERE id = 1"
);

/// This database's identity: whether it is a replica in recovery, its system identifier, and
/// (on a primary) the name of its current WAL file, whose first 8 hex digits are the timeline
/// it writes on.
pub(crate) const DATABASE_IDENTITY: &str =
    "SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system()), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END";

/// The identity the store was last written on (`$1` none yet: NULL).
pub(crate) const READ_STORED_IDENTITY: &str =
    "SELECT database_identity FROM keel_meta WHERE id = 1";
pub(crate) const WRITE_STORED_IDENTITY: &str =
    "UPDATE keel_meta SET database_identity = $1 WHERE id = 1";

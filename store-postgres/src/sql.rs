//! Every SQL statement of the store, and its schema migrations, in one place.
//!
//! Table names are unqualified: the connection's `search_path` chooses the schema, so one
//! database can hold several keel stores (one per schema).

/// The format marker this build writes and reads, in `keel_meta.format`.
pub(crate) const FORMAT: &str = "keel-store-postgres 6";

/// The prefix of every format marker of this store; what follows it is the format number.
pub(crate) const FORMAT_PREFIX: &str = "keel-store-postgres ";

/// The advisory lock key that serialises schema creation and migration between processes
/// connecting at once (`pg_advisory_xact_lock`): "keel" in ASCII.
pub(crate) const SCHEMA_LOCK: i64 = 0x6b65_656c;

/// Migrations, in order: `MIGRATIONS[n]` takes a schema from format `n` to format `n + 1`
/// (format 0 is an empty schema). The last one's number is [`FORMAT`]'s.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6];

/// Format 6: a slot claim lives as long as its run (the prunes delete it with the run), so the
/// claims that earlier formats kept after pruning their runs go, once. A prune reads the
/// claims of the jobs it deletes runs of, and those would otherwise grow with every firing.
const V6: &str = "DELETE FROM keel_slots s \
                  WHERE NOT EXISTS (SELECT 1 FROM keel_runs r WHERE r.id = s.run);";

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
/// Set, for its transaction only, before a batch's statements.
///
/// - `plan_cache_mode = force_generic_plan`: the statements take arrays whose length changes
///   with every batch, and Postgres's default (`auto`) then re-plans them at every execution,
///   and a custom plan costs more to make than the statement to run (the read: about 120 µs
///   more per execution than with its generic plan, measured from the client).
/// - `enable_seqscan = off`: a generic plan is made once per connection, with the statistics
///   of that moment, and kept until the table's statistics change (an `ANALYZE`). A connection opened on a new store planned the read as a hash
///   join over a sequential scan of `keel_slots` (an empty table looks cheapest to read
///   whole), and kept that plan while the table grew: the read cost 0.35–0.8 ms at 8,700
///   claims and would grow with every slot ever claimed. Every statement of a batch finds rows by
///   key, so an index probe is the right plan at any size; this setting prices a table scan
///   out of the planner's choices (`keel_prune_all`, which ranks every terminal run, is
///   exempt: see `prune_statements`). A tiny table can still make
///   a whole-index scan look as cheap as a probe, so the store also re-plans now and then
///   ([`REPLAN`]).
///
/// The plans are checked in `plans`, made on an empty store. Needs Postgres 12 or later.
pub(crate) const GENERIC_PLANS: [&str; 2] = [
    "SET LOCAL plan_cache_mode = force_generic_plan",
    "SET LOCAL enable_seqscan = off",
];

/// Sent right after a batch's `BEGIN` every [`REPLAN_EVERY`] batches of a connection: the
/// connection's cached plans are dropped (its prepared statements stay) and made again at
/// their next execution, with the tables' sizes of then. A plan made while a table was tiny
/// is kept no longer than that, even if no `ANALYZE` (which also invalidates plans) runs.
pub(crate) const REPLAN: &str = "DISCARD PLANS";
/// How many batches a connection applies between two [`REPLAN`]s: re-planning costs a few
/// hundred microseconds once, against a plan that could cost more with every batch.
pub(crate) const REPLAN_EVERY: u32 = 1_000;
pub(crate) const READ_META: &str =
    "SELECT writer_epoch, counters::text FROM keel_meta WHERE id = 1";
pub(crate) const WRITE_EPOCH: &str = "UPDATE keel_meta SET writer_epoch = $1 WHERE id = 1";

/// What `check_batch` needs of the stored state, in one round trip: the stored runs a batch
/// writes (`$1`: their ids) as `('run', id, body, null, null)`, and the claims of the slots it
/// claims (`$2`, `$3`: jobs and slots, pairwise) as `('slot', run, null, job, slot)`.
///
/// Each slot is a lookup of its own (a lateral subquery with `LIMIT 1`, which the planner
/// cannot turn into a join), so the plan is a probe of `keel_slots_pkey` per slot whatever
/// the table's size or statistics, never a hash join that reads the table whole.
pub(crate) const STORED: &str = "SELECT 'run', id, body::text, NULL::text, NULL::bigint \
     FROM keel_runs WHERE id = ANY($1::bigint[]) \
     UNION ALL \
     SELECT 'slot', s.run, NULL::text, k.job, k.slot \
     FROM unnest($2::text[], $3::bigint[]) AS k(job, slot) \
     CROSS JOIN LATERAL (SELECT run FROM keel_slots \
         WHERE job = k.job AND slot = k.slot LIMIT 1) AS s";

/// Prepares, by name, the statements a batch sends inside simple queries (with `BEGIN`, with
/// `COMMIT`: see `BatchTransaction`), once per connection, so that their plans are cached as
/// the extended protocol's are: `keel_stored` is [`STORED`], `keel_prune_jobs` is
/// [`PRUNE_JOBS`], `keel_prune_all` is [`PRUNE_ALL`].
pub(crate) fn prepare_named() -> String {
    format!(
        "PREPARE keel_stored(bigint[], text[], bigint[]) AS {STORED}; \
         PREPARE keel_prune_jobs(text[], bigint[], bigint[]) AS {PRUNE_JOBS}; \
         PREPARE keel_prune_all(bigint, bigint) AS {PRUNE_ALL}"
    )
}

/// Every write of one phase of a batch (`batch` module), in one statement: one array per
/// column, one data-modifying `WITH` part per table and kind, each run whatever the primary
/// query reads. A part whose arrays are empty writes nothing. Within a phase each key is
/// written once (the planner kept the last write of each), because one statement cannot
/// change a row twice and its parts do not see each other's rows.
///
/// A slot's existing claim is the run's own (`check_batch` refused a claim by another run).
/// `$28`, the counters, is null if the phase does not write them.
pub(crate) const WRITE: &str = "WITH \
     jobs_put AS (INSERT INTO keel_jobs (id, body) \
         SELECT id, body::json FROM unnest($1::text[], $2::text[]) AS r(id, body) \
         ON CONFLICT (id) DO UPDATE SET body = excluded.body), \
     jobs_deleted AS (DELETE FROM keel_jobs WHERE id = ANY($3::text[])), \
     tombstones_put AS (INSERT INTO keel_tombstones (job, body) \
         SELECT job, body::json FROM unnest($4::text[], $5::text[]) AS r(job, body) \
         ON CONFLICT (job) DO UPDATE SET body = excluded.body), \
     tombstones_deleted AS (DELETE FROM keel_tombstones WHERE job = ANY($6::text[])), \
     runs_put AS (INSERT INTO keel_runs (id, job, state, created_at, finished_at, active, body) \
         SELECT id, job, state, created_at, finished_at, active, body::json \
         FROM unnest($7::bigint[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], \
             $12::boolean[], $13::text[]) \
             AS r(id, job, state, created_at, finished_at, active, body) \
         ON CONFLICT (id) DO UPDATE SET job = excluded.job, state = excluded.state, \
         created_at = excluded.created_at, finished_at = excluded.finished_at, \
         active = excluded.active, body = excluded.body), \
     slots_put AS (INSERT INTO keel_slots (job, slot, run) \
         SELECT job, slot, run FROM unnest($14::text[], $15::bigint[], $16::bigint[]) \
             AS r(job, slot, run) \
         ON CONFLICT (job, slot) DO UPDATE SET run = excluded.run), \
     audit_put AS (INSERT INTO keel_audit (seq, job, run, at, body) \
         SELECT seq, job, run, at, body::json \
         FROM unnest($17::bigint[], $18::text[], $19::bigint[], $20::bigint[], $21::text[]) \
             AS r(seq, job, run, at, body) \
         ON CONFLICT (seq) DO UPDATE SET job = excluded.job, run = excluded.run, \
         at = excluded.at, body = excluded.body), \
     incidents_put AS (INSERT INTO keel_incidents (id, open, body) \
         SELECT id, open, body::json \
         FROM unnest($22::bigint[], $23::boolean[], $24::text[]) AS r(id, open, body) \
         ON CONFLICT (id) DO UPDATE SET open = excluded.open, body = excluded.body), \
     deliveries_put AS (INSERT INTO keel_deliveries (id, body) \
         SELECT id, body::json FROM unnest($25::bigint[], $26::text[]) AS r(id, body) \
         ON CONFLICT (id) DO UPDATE SET body = excluded.body), \
     deliveries_deleted AS (DELETE FROM keel_deliveries WHERE id = ANY($27::bigint[])), \
     counters_put AS (UPDATE keel_meta SET counters = $28::text::json \
         WHERE id = 1 AND $28::text IS NOT NULL) \
     SELECT 1";

/// `PruneHistory` for every job: deletes every terminal run but the newest `$1` of its job
/// (latest finish, then highest id) and every one finished before `$2`, with the audit records
/// of the deleted runs and their slot claims (a claim lives as long as its run).
///
/// The audit records go by `run = ANY(ARRAY(…))`, an index probe per deleted run
/// (`keel_audit_by_run`), whatever the planner guesses of their number: as `run IN (…)` a
/// generic plan hashed the deleted ids and read all of `keel_audit` for each prune. The
/// claims go the same way, by `job = ANY(ARRAY(…))`: a probe of `keel_slots_pkey` per job
/// with a deleted run, reading that job's claims (no more than its history and its active
/// runs), of which those of the deleted runs go.
pub(crate) const PRUNE_ALL: &str = "WITH ranked AS ( \
         SELECT id, finished_at, \
             row_number() OVER (PARTITION BY job ORDER BY finished_at DESC, id DESC) AS newer \
         FROM keel_runs WHERE finished_at IS NOT NULL \
     ), doomed AS ( \
         DELETE FROM keel_runs r USING ranked d \
         WHERE r.id = d.id AND (d.newer > $1 OR d.finished_at < $2) \
         RETURNING r.id, r.job \
     ), claims AS ( \
         DELETE FROM keel_slots WHERE job = ANY(ARRAY(SELECT DISTINCT job FROM doomed)) \
         AND run = ANY(ARRAY(SELECT id FROM doomed)) \
     ) \
     DELETE FROM keel_audit WHERE run = ANY(ARRAY(SELECT id FROM doomed))";

/// `PruneHistory` for several jobs at once, each with its own policy (`$1`, `$2`, `$3`: jobs,
/// runs kept, finished-before cut-offs, one per job, the jobs distinct): what [`PRUNE_ALL`]
/// does, for those jobs only, claims included. Each job's terminal runs are ranked on their own
/// (`keel_runs_finished`), so the statement costs what the jobs' histories do, not the table.
pub(crate) const PRUNE_JOBS: &str = "WITH doomed AS ( \
         DELETE FROM keel_runs WHERE id = ANY(ARRAY( \
             SELECT d.id FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
                 AS p(job, keep_last, finished_before) \
             CROSS JOIN LATERAL ( \
                 SELECT id, finished_at, \
                     row_number() OVER (ORDER BY finished_at DESC, id DESC) AS newer \
                 FROM keel_runs WHERE finished_at IS NOT NULL AND job = p.job \
             ) d \
             WHERE d.newer > p.keep_last OR d.finished_at < p.finished_before \
         )) \
         RETURNING id, job \
     ), claims AS ( \
         DELETE FROM keel_slots WHERE job = ANY(ARRAY(SELECT DISTINCT job FROM doomed)) \
         AND run = ANY(ARRAY(SELECT id FROM doomed)) \
     ) \
     DELETE FROM keel_audit WHERE run = ANY(ARRAY(SELECT id FROM doomed))";

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

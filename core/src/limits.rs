//! Every bound in keel-core, in one place. A queue, batch, retry or catch-up without a named
//! limit here is a bug.

/// Longest job name, in bytes.
pub const JOB_ID_MAX_BYTES: usize = 128;

/// Longest job kind (handler name), in bytes.
pub const JOB_KIND_MAX_BYTES: usize = 128;

/// Payloads up to this many bytes are shared between jobs that carry the same one (the empty
/// payload above all).
pub const SHARED_PAYLOAD_MAX_BYTES: usize = 64;

/// Largest opaque payload a job may carry to its handler, in bytes.
pub const JOB_PAYLOAD_MAX_BYTES: usize = 64 * 1024;

/// The longest `JobSpec::origin` (who manages a job: a config file's path, with its tag).
pub const JOB_ORIGIN_MAX_BYTES: usize = 4096;

/// Longest cron expression accepted, in bytes.
pub const CRON_EXPR_MAX_BYTES: usize = 256;

/// Error messages and reasons are truncated to this many bytes (on a char boundary) before they
/// are stored, so a handler that returns a megabyte of stderr cannot bloat every record.
pub const MESSAGE_MAX_BYTES: usize = 4 * 1024;

/// Upper bound on `RetryPolicy::attempts_max`.
pub const ATTEMPTS_MAX: u32 = 1_000;

/// Snoozes do not consume attempts, so they need a bound of their own: a run snoozed this many
/// times ends `failed`.
pub const SNOOZES_MAX: u32 = 1_000;

/// Longest snooze or backoff delay, in milliseconds (30 days).
pub const DELAY_MAX_MS: u64 = 30 * 24 * 3600 * 1000;

/// How many years past (or before) an instant a cron search looks before concluding that the
/// expression has no slot there. Every 5- or 6-field pattern that fires at all repeats within
/// 28 years of the Gregorian calendar (40 across a non-leap century year).
pub const CRON_SEARCH_YEARS: i32 = 100;

/// Upper bound on `Config::misfire_grace_ms` (one hour); a larger grace is clamped.
pub const MISFIRE_GRACE_MAX_MS: u64 = 3600 * 1000;

/// Runs of one job that may be active at once (overlap `allow`, manual triggers); a slot that
/// would exceed it is dropped and audited, like an overlap drop.
pub const ACTIVE_RUNS_PER_JOB_MAX: u32 = 100;

/// Upper bound on `MisfirePolicy::CatchUp { max }`: missed slots are never enumerated past this.
pub const CATCH_UP_MAX: u32 = 1_000;

/// Runs of one job that may wait behind an active run (buffer-one holds 1, catch-up holds up to
/// its `max`).
pub const BACKLOG_MAX: usize = CATCH_UP_MAX as usize;

/// Largest number of terminal runs kept per job by the history policy.
pub const HISTORY_RUNS_MAX: u32 = 100_000;

/// Records per persist batch, a soft bound: a batch takes whole job groups until it reaches
/// this many, so one job's writes are never split (docs/architecture.md, persist before act).
pub const BATCH_RECORDS_MAX: usize = 4_096;

/// Delay before a failed persist batch is retried, doubling per consecutive failure up to
/// [`PERSIST_RETRY_MAX_MS`].
pub const PERSIST_RETRY_BASE_MS: u64 = 100;

/// Cap on the delay between persist retries.
pub const PERSIST_RETRY_MAX_MS: u64 = 10_000;

/// Incidents open at once; beyond this, new ones are not opened and the driver is told with an
/// `Event::IncidentSuppressed`.
pub const INCIDENTS_OPEN_MAX: usize = 1_000;

/// Workers whose consecutive empty claims are tracked (idle claim loop detection); claims of
/// further workers are not counted.
pub const WORKERS_TRACKED_MAX: usize = 10_000;

/// (worker, kind) pairs whose health is counted (`Scheduler::worker_health`); pairs first seen
/// beyond this are not counted.
pub const WORKER_HEALTH_MAX: usize = 10_000;

/// Jobs an `unclaimed_queue` diagnosis names.
pub const DIAGNOSIS_JOBS_MAX: usize = 5;

/// Queued runs, oldest first, an `unclaimed_queue` diagnosis looks at to find their jobs.
pub const DIAGNOSIS_RUNS_SCANNED: usize = 100;

/// Kinds an `idle_claim_loop` or `unclaimed_queue` diagnosis lists (waiting kinds, workers
/// seen); the rest are counted.
pub const DIAGNOSIS_KINDS_MAX: usize = 20;

/// Failed writes of a reclaim after which it escalates (SPEC W5: "failing to reclaim a lease
/// twice escalates").
pub const RECLAIM_FAILURES_ESCALATE: u32 = 2;

/// Largest checkpoint, in bytes.
pub const CHECKPOINT_MAX_BYTES: usize = 1024 * 1024;

/// Longest progress phase or message kept, in bytes (longer ones are truncated).
pub const PROGRESS_MAX_BYTES: usize = 1024;

/// How often the history age policy sweeps every job's history.
pub const HISTORY_SWEEP_INTERVAL_MS: u64 = 3600 * 1000;

/// Longest pause before a lease holder retries a renewal that failed or was refused; the pause
/// is `ttl / 10`, at least 1 ms, at most this, so a short lease still gets several tries before
/// its lost deadline.
pub const LEASE_RENEW_RETRY_MAX_MS: u64 = 1_000;

/// Longest pause before a leader retries a leadership renewal that failed; the pause is the
/// renewal period (a third of the leader TTL), at most this, so a leader gets several tries
/// before it fences itself.
pub const LEADER_RENEW_RETRY_MAX_MS: u64 = 1_000;

/// First ceiling of a lease contender's backoff, doubling per check up to
/// [`CONTENDER_BACKOFF_CAP_MS`].
pub const CONTENDER_BACKOFF_BASE_MS: u64 = 500;

/// Longest single wait of a lease contender between two checks, well below the default stale
/// threshold (40 s), so a released lease is noticed within 5 s.
pub const CONTENDER_BACKOFF_CAP_MS: u64 = 5_000;

/// Deliveries the outbox holds by default, waiting and in flight (`OutboxConfig::capacity`);
/// beyond it the overflow policy drops one (SPEC D1).
pub const OUTBOX_CAPACITY_DEFAULT: usize = 10_000;

/// Upper bound on `OutboxConfig::capacity`; a larger capacity is clamped.
pub const OUTBOX_CAPACITY_MAX: usize = 1_000_000;

/// Upper bound on `DeliveryPolicy::attempts_max`; a larger value is clamped.
pub const DELIVERY_ATTEMPTS_MAX: u32 = 100;

/// Longest part of a sink's response body quoted in a delivery error, in bytes.
pub const DELIVERY_BODY_EXCERPT_MAX_BYTES: usize = 512;

/// Runs or audit records a history query returns when it does not set a limit.
pub const HISTORY_PAGE_DEFAULT: usize = 100;

/// Most runs or audit records one history query returns; larger limits are capped.
pub const HISTORY_PAGE_MAX: usize = 10_000;

/// Longest excerpt of an artifact check's answer kept as verification evidence, in bytes. Kept
/// small because the evidence lives on the run record, which is rewritten at every heartbeat;
/// the driver reads at most [`ARTIFACT_BODY_READ_MAX_BYTES`] of a body.
pub const VERIFICATION_EXCERPT_MAX_BYTES: usize = 1024;

/// Most bytes of an artifact URL's body the driver reads for the excerpt.
pub const ARTIFACT_BODY_READ_MAX_BYTES: usize = 4 * 1024;

/// How long the driver waits for one artifact check (connect, answer, body excerpt).
pub const ARTIFACT_CHECK_TIMEOUT_MS: u64 = 10_000;

/// Verifications kept on a run, newest first out; older ones stay in the audit trail.
pub const VERIFICATIONS_KEPT_MAX: usize = 8;

/// Verification requests in flight per run: an explicit `verify` beyond it is refused.
pub const VERIFICATIONS_PENDING_PER_RUN_MAX: usize = 4;

/// Longest command output or evidence kept in an audit record (`AuditRecord::output`), in bytes.
pub const AUDIT_OUTPUT_MAX_BYTES: usize = 4 * 1024;

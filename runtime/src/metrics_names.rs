//! The names of the metrics the runtime records through the `metrics` facade. Install any
//! recorder (the `keel` binary installs a Prometheus one) to collect them.

/// Runs that reached a terminal state, by `job` and `state` (SPEC O4: per-job outcomes).
pub const RUNS_FINISHED: &str = "keel_runs_finished_total";
/// When each job's last run succeeded, in seconds since the Unix epoch, by `job`: alert on
/// `time() - keel_job_last_success_timestamp_seconds > ...` (SPEC O4).
pub const JOB_LAST_SUCCESS: &str = "keel_job_last_success_timestamp_seconds";
/// Attempts that ended, by `outcome` (success, retryable, permanent, snooze, cancelled).
pub const ATTEMPTS_FINISHED: &str = "keel_attempts_finished_total";
/// Retries scheduled.
pub const RETRIES: &str = "keel_retries_total";
/// Leases granted, by `holder` (runtime: this process's handlers; external: workers).
pub const LEASE_GRANTS: &str = "keel_lease_grants_total";
/// Leases reclaimed after they expired.
pub const LEASE_RECLAIMS: &str = "keel_lease_reclaims_total";
/// Delivery attempts, by `sink` and `result` (delivered, transient, permanent).
pub const DELIVERY_ATTEMPTS: &str = "keel_delivery_attempts_total";
/// Deliveries that ended, by `status` (success, exhausted, permanent, dropped...).
pub const DELIVERIES_FINISHED: &str = "keel_deliveries_finished_total";
/// Checkpoint saves written.
pub const CHECKPOINT_SAVES: &str = "keel_checkpoint_saves_total";
/// Checkpoint saves throttled (kept, written by a later save).
pub const CHECKPOINT_THROTTLED: &str = "keel_checkpoint_throttled_total";
/// Checkpoint saves that failed.
pub const CHECKPOINT_FAILURES: &str = "keel_checkpoint_failures_total";
/// Batches sent to the store.
pub const BATCHES: &str = "keel_store_batches_total";
/// Store writes that failed (and were retried).
pub const PERSIST_FAILURES: &str = "keel_store_failures_total";
/// Slots dropped by misfire or overlap policies.
pub const SLOTS_DROPPED: &str = "keel_slots_dropped_total";
/// Seconds an attempt's handler ran, by `outcome` (a histogram).
pub const ATTEMPT_SECONDS: &str = "keel_attempt_seconds";
/// Seconds from a scheduled slot to its attempt's handler starting: firing lateness, persist
/// included (a histogram; retries and manual runs are not counted).
pub const FIRING_LATENESS_SECONDS: &str = "keel_firing_lateness_seconds";
/// Panics of the driver caught and recovered from by rebuilding the scheduler (SPEC W4).
pub const DRIVER_PANICS: &str = "keel_driver_panics_total";

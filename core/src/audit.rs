//! The audit trail: one record per state change (SPEC R6), and the history retention policy.
//!
//! The core does not keep audit records in memory: each one leaves in the next persist batch
//! and is the store's to keep. Retention is a policy the core applies by emitting
//! [`Record::PruneHistory`](crate::Record::PruneHistory) when a job's run settles and on an hourly
//! sweep; the store deletes what the policy no longer keeps.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, FencingToken, JobId, RunId};
use crate::limits;
use crate::run::StateName;
use crate::time::Timestamp;

/// Who caused a state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "actor", content = "id")]
pub enum Actor {
    /// The scheduler itself (a slot fired, a backoff elapsed, a crash was recovered).
    Scheduler,
    /// A worker reporting an outcome, by worker id.
    Worker(String),
    /// The watchdog (timeouts, lease reclaims).
    Watchdog,
    /// A person or tool issuing a command.
    Operator,
    /// An operator, by the name the caller gave (an API token's name, a login): lease actions
    /// and other operator commands that say who asked.
    Person(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Scheduler => f.write_str("scheduler"),
            Actor::Worker(id) => write!(f, "worker:{id}"),
            Actor::Watchdog => f.write_str("watchdog"),
            Actor::Operator => f.write_str("operator"),
            Actor::Person(name) => write!(f, "operator:{name}"),
        }
    }
}

/// One state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail; unique and increasing, so a store can apply it idempotently.
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// The job.
    pub job: JobId,
    /// The run, for run state changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<RunId>,
    /// The attempt, for run state changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// The fencing token of the attempt's lease, for run changes made under a lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<FencingToken>,
    /// The state before, or `None` for a creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<StateName>,
    /// The state after.
    pub new: StateName,
    /// Who did it.
    pub actor: Actor,
    /// Why, in words.
    pub reason: String,
    /// What an automatic action or a check printed or found (SPEC A3): verification evidence,
    /// command output. At most [`limits::AUDIT_OUTPUT_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// How much history a store keeps per job (SPEC R6): terminal runs beyond the newest
/// `runs_max`, or finished longer than `age_max_ms` ago, are deleted with their audit records.
/// Runs that are not terminal are never pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPolicy {
    /// Terminal runs kept per job; 1 to [`limits::HISTORY_RUNS_MAX`].
    pub runs_max: u32,
    /// Age after which terminal runs are deleted.
    pub age_max_ms: u64,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        HistoryPolicy {
            runs_max: 100,
            age_max_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

impl HistoryPolicy {
    /// Clamps the policy into its limits.
    pub fn clamped(self) -> Self {
        HistoryPolicy {
            runs_max: self.runs_max.clamp(1, limits::HISTORY_RUNS_MAX),
            age_max_ms: self.age_max_ms,
        }
    }
}

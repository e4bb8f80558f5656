//! Identifiers that cross the API. Each is a newtype so a run id can never be passed where a
//! job id or an attempt number is expected.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::limits;

/// A job's name, chosen by the user: 1 to [`limits::JOB_ID_MAX_BYTES`] bytes of ASCII letters,
/// digits, `-`, `_`, `.` and `:`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
// `Arc<str>`: the scheduler keeps a job's id in its job map, in the job's spec and in the due
// index; sharing one allocation keeps an idle job small.
pub struct JobId(Arc<str>);

/// Why a string is not a valid [`JobId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobIdError {
    /// The name is empty.
    #[error("job name is empty")]
    Empty,
    /// The name is longer than [`limits::JOB_ID_MAX_BYTES`].
    #[error("job name is {len} bytes long; the limit is {max}", max = limits::JOB_ID_MAX_BYTES)]
    TooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._:-]`.
    #[error("job name contains {ch:?}; use letters, digits, '-', '_', '.' or ':'")]
    BadChar {
        /// The first offending character.
        ch: char,
    },
}

impl JobId {
    /// Validates `name` and makes it a job id.
    pub fn new(name: &str) -> Result<Self, JobIdError> {
        if name.is_empty() {
            return Err(JobIdError::Empty);
        }
        if name.len() > limits::JOB_ID_MAX_BYTES {
            return Err(JobIdError::TooLong { len: name.len() });
        }
        if let Some(ch) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(JobIdError::BadChar { ch });
        }
        Ok(JobId(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = JobIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        JobId::new(&s)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0.to_string()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run: one firing of a job (scheduled or manual), across all of its attempts. Run ids are
/// allocated by the core from a persisted counter and never reused once acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub u64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "run-{}", self.0)
    }
}

/// One execution of a run, numbered from 1. Retries and snoozes each start a new attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The idempotency key of an attempt, `run id + attempt`, for handlers to pass to their own
/// side effects so that a repeated attempt can be recognised downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey {
    /// The run.
    pub run: RunId,
    /// The attempt within the run.
    pub attempt: Attempt,
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-attempt-{}", self.run, self.attempt)
    }
}

/// A fencing token: rises on every lease grant, across restarts and processes (it is
/// persisted), and never repeats. A write carrying an older token than the run's current lease
/// is refused (SPEC L1); handlers pass it to their own side effects so downstream systems can
/// refuse stale writers too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token-{}", self.0)
    }
}

/// A worker: the in-process runtime, or an external process that claims runs. 1 to
/// [`limits::JOB_ID_MAX_BYTES`] bytes of the same characters as a job name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerId(Arc<str>);

impl WorkerId {
    /// Validates `name` (same rules as [`JobId`]) and makes it a worker id.
    pub fn new(name: &str) -> Result<Self, JobIdError> {
        JobId::new(name).map(|id| WorkerId(id.0))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WorkerId {
    type Error = JobIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        WorkerId::new(&s)
    }
}

impl From<WorkerId> for String {
    fn from(id: WorkerId) -> String {
        id.0.to_string()
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies one [`Batch`](crate::Batch) of persist effects, so the driver can acknowledge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchId(pub u64);

impl BatchId {
    /// The epoch of the scheduler incarnation that built the batch (its high 32 bits); a store
    /// accepts batches only from its current writer epoch.
    pub fn epoch(self) -> u64 {
        self.0 >> 32
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_validated() {
        assert!(JobId::new("nightly-backup.eu:1").is_ok());
        assert_eq!(JobId::new(""), Err(JobIdError::Empty));
        assert_eq!(JobId::new("a b"), Err(JobIdError::BadChar { ch: ' ' }));
        let long = "x".repeat(limits::JOB_ID_MAX_BYTES + 1);
        assert!(matches!(JobId::new(&long), Err(JobIdError::TooLong { .. })));
    }

    #[test]
    fn job_id_deserialisation_validates() {
        let bad: Result<JobId, _> = serde_json::from_str("\"has space\"");
        assert!(bad.is_err());
        let good: JobId = serde_json::from_str("\"ok\"").unwrap();
        assert_eq!(good.as_str(), "ok");
    }
}

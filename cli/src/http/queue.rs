//! `GET /api/v1/queue`: queue health per kind, from the scheduler's memory (SPEC A2, A4).
//!
//! | field | what |
//! |---|---|
//! | `queued` | runs waiting for a worker to claim them |
//! | `backing_off` | runs waiting for their next attempt's time |
//! | `running` | attempts under a lease |
//! | `oldest_wait_ms` | how long the oldest queued run has waited |
//! | `lease_expired` | running attempts whose lease has expired and is not yet reclaimed |
//! | `stuck` | running attempts with an open `stuck_run` incident |
//! | `holders` | the workers holding this kind's leases now |
//! | `workers_seen` | workers that claimed (or asked for) this kind, with when they were last seen |
//! | `last_claim_at` | when a run of this kind was last claimed |
//! | `claims` | claims of this kind since the daemon started (the claim rate, sampled twice) |
//! | `unclaimed_incident` | the open `unclaimed_queue` incident of this kind, if any |

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::State;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use keel_core::{IncidentKind, RunState, Scheduler, Timestamp};
use serde::Serialize;
use serde_json::json;

use super::{Api, ApiError, Reader};

/// The health of one kind's queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct KindHealth {
    pub(crate) kind: String,
    pub(crate) external: bool,
    pub(crate) queued: u64,
    pub(crate) backing_off: u64,
    pub(crate) running: u64,
    pub(crate) oldest_wait_ms: Option<u64>,
    pub(crate) lease_expired: u64,
    pub(crate) stuck: u64,
    pub(crate) holders: BTreeSet<String>,
    pub(crate) workers_seen: BTreeMap<String, String>,
    pub(crate) last_claim_at: Option<String>,
    pub(crate) claims: u64,
    pub(crate) unclaimed_incident: Option<u64>,
}

/// Every kind with work, from the scheduler as it is at `now`.
pub(crate) fn health(scheduler: &Scheduler, now: Timestamp) -> Vec<KindHealth> {
    let stuck_runs: BTreeSet<_> = scheduler
        .incidents()
        .filter(|i| i.resolved_at.is_none() && i.kind == IncidentKind::StuckRun)
        .filter_map(|i| i.run)
        .collect();
    let mut kinds: BTreeMap<String, KindHealth> = BTreeMap::new();
    for run in scheduler.runs() {
        let entry = kinds
            .entry(run.kind().to_string())
            .or_insert_with(|| KindHealth {
                kind: run.kind().to_string(),
                external: run.external(),
                ..KindHealth::default()
            });
        match run.state() {
            RunState::Queued { since } => {
                entry.queued += 1;
                let waited = u64::try_from(now.0.saturating_sub(since.0)).unwrap_or(0);
                entry.oldest_wait_ms = Some(entry.oldest_wait_ms.map_or(waited, |w| w.max(waited)));
            }
            RunState::BackingOff { .. } => entry.backing_off += 1,
            RunState::Starting { .. } | RunState::Running { .. } => {
                entry.running += 1;
                if let Some(lease) = run.lease() {
                    entry.holders.insert(lease.owner.to_string());
                    if lease.expires_at < now {
                        entry.lease_expired += 1;
                    }
                }
                if stuck_runs.contains(&run.id()) {
                    entry.stuck += 1;
                }
            }
            _ => {}
        }
    }
    for queue in scheduler.queue_health() {
        let entry = kinds
            .entry(queue.kind.clone())
            .or_insert_with(|| KindHealth {
                kind: queue.kind.clone(),
                external: true,
                ..KindHealth::default()
            });
        entry.workers_seen = queue
            .workers_seen
            .iter()
            .map(|(worker, at)| (worker.to_string(), at.to_string()))
            .collect();
        entry.last_claim_at = queue.last_claim_at.map(|at| at.to_string());
        entry.unclaimed_incident = queue.incident;
    }
    for health in scheduler.worker_health() {
        if let Some(entry) = kinds.get_mut(&health.kind) {
            entry.claims += health.stats.claims;
        }
    }
    kinds.into_values().collect()
}

/// The `queue` answer: when, and each kind.
pub(crate) fn view(kinds: Vec<KindHealth>, at: Timestamp) -> serde_json::Value {
    json!({
        "at": at.to_string(),
        "at_ms": at.0,
        "kinds": kinds,
    })
}

pub(crate) async fn queue(_: Reader, State(api): State<Api>) -> Result<HttpResponse, ApiError> {
    let value = crate::daemon::dispatch(&api.server, crate::protocol::Request::Queue, "")
        .await
        .map_err(ApiError)?;
    Ok(Json(value).into_response())
}

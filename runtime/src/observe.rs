//! What the driver tells the outside world about each core event: a tracing event and the
//! matching metrics.

use keel_core::outbox::OutboxEvent;
use keel_core::{Event, StateName, Timestamp};

use crate::metrics_names as m;

/// Logs `event` and counts it at `now`; `label` names a sink in logs and metric labels.
pub(crate) fn event(event: &Event, now: Timestamp, label: &dyn Fn(&str) -> String) {
    match event {
        Event::RunFinished { run, job, state } => {
            let state_name = state.to_string();
            tracing::info!(%run, %job, state = %state_name, "run finished");
            metrics::counter!(m::RUNS_FINISHED, "job" => job.to_string(), "state" => state_name)
                .increment(1);
            if *state == StateName::Succeeded {
                metrics::gauge!(m::JOB_LAST_SUCCESS, "job" => job.to_string())
                    .set(now.0 as f64 / 1000.0);
            }
        }
        Event::RetryScheduled { run, at } => {
            tracing::info!(%run, %at, "retry scheduled");
            metrics::counter!(m::RETRIES).increment(1);
        }
        Event::JobDisabled { job, reason } => tracing::warn!(%job, %reason, "job disabled"),
        Event::JobDeleted { job, reason } => tracing::info!(%job, %reason, "job deleted"),
        Event::SlotsDropped { job, count, reason } => {
            tracing::warn!(%job, %count, %reason, "slots dropped");
            metrics::counter!(m::SLOTS_DROPPED).increment(1);
        }
        Event::LeaseGranted { run, owner, token } => {
            tracing::debug!(%run, %owner, token = token.0, "lease granted");
        }
        Event::LeaseReclaimed { run, token } => {
            tracing::warn!(%run, token = token.0, "lease reclaimed");
            metrics::counter!(m::LEASE_RECLAIMS).increment(1);
        }
        Event::LeaseReleased { run, token } => {
            tracing::warn!(%run, token = token.0, "lease released by an operator");
        }
        Event::IncidentOpened(incident) => {
            let by = incident.opened_by.as_ref().map(|op| op.by.as_str());
            tracing::warn!(id = incident.id, kind = ?incident.kind, by, details = %incident.details, "incident opened");
        }
        Event::IncidentSuppressed { kind, details, .. } => {
            tracing::debug!(?kind, %details, "incident suppressed");
        }
        Event::IncidentResolved(incident) => match &incident.resolved_by {
            Some(op) => {
                tracing::info!(id = incident.id, kind = ?incident.kind, by = %op.by, reason = %op.reason, "incident resolved by an operator")
            }
            None => tracing::info!(id = incident.id, kind = ?incident.kind, "incident resolved"),
        },
        Event::IncidentEscalated(incident) => {
            tracing::warn!(id = incident.id, kind = ?incident.kind, details = %incident.details, "incident escalated: open and unacknowledged past escalate_after");
        }
        Event::IncidentAcknowledged(incident) => {
            if let Some(op) = &incident.acknowledged {
                tracing::info!(id = incident.id, kind = ?incident.kind, by = %op.by, note = %op.reason, "incident acknowledged");
            }
        }
        Event::CheckpointSaved { run, seq } => tracing::debug!(%run, seq, "checkpoint saved"),
        Event::CheckpointThrottled { run } => tracing::debug!(%run, "checkpoint throttled"),
        Event::CheckpointFailed { run, seq, error } => {
            tracing::warn!(%run, seq, %error, "checkpoint save failed");
            metrics::counter!(m::CHECKPOINT_FAILURES).increment(1);
        }
        Event::Delivery(OutboxEvent::Finished {
            id,
            sink,
            subject,
            status,
            attempts,
            error,
        }) => {
            let status = status.to_string();
            let sink = label(sink);
            tracing::info!(%id, %sink, %subject, %status, attempts, ?error, "delivery finished");
            metrics::counter!(m::DELIVERIES_FINISHED, "sink" => sink, "status" => status)
                .increment(1);
        }
        Event::Delivery(OutboxEvent::Dropped {
            sink,
            subject,
            reason,
            ..
        }) => {
            let sink = label(sink);
            tracing::warn!(%sink, %subject, ?reason, "delivery dropped");
            metrics::counter!(m::DELIVERIES_FINISHED, "sink" => sink, "status" => "dropped")
                .increment(1);
        }
        Event::Delivery(OutboxEvent::RetryScheduled {
            id,
            sink,
            attempt,
            at,
        }) => {
            let sink = label(sink);
            tracing::info!(%id, %sink, attempt, %at, "delivery retry scheduled");
        }
        Event::PersistFailed {
            batch,
            error,
            retry_at,
        } => tracing::warn!(%batch, %error, %retry_at, "store write failed"),
        Event::StoreRecovered {
            failing_since,
            failures,
        } => tracing::warn!(%failing_since, failures, "store writes succeed again"),
    }
}

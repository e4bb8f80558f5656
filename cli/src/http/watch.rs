//! The watchdog's resources: its rules, worker health, and operators' incident actions
//! (SPEC A2, A3).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use keel_core::watchdog::Rule;
use keel_core::{Incident, JobId, RunId, WorkerHealth, WorkerId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Api, ApiError, Body, Operator, Reader};
use crate::daemon::dispatch;
use crate::error::Failure;
use crate::protocol::{from_value, Request};
use crate::views;

type Answer = Result<HttpResponse, ApiError>;

/// `GET /rules`: each rule with the daemon's live threshold.
pub(crate) async fn rules(_: Reader, State(api): State<Api>) -> Answer {
    let rules: Vec<Rule> = from_value(dispatch(&api.server, Request::Rules, "").await?)?;
    let view: Vec<Value> = rules
        .iter()
        .map(|rule| {
            json!({
                "rule": rule.name,
                "signal": rule.signal,
                "threshold": rule.threshold,
                "settings": rule.settings.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "action": rule.action,
                "escalation": rule.escalation,
                "evidence": rule.pass_evidence,
                "incident_kinds": rule.incidents.iter().map(|k| k.name()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(view).into_response())
}

/// `GET /workers`: health per worker and kind, since the daemon started.
pub(crate) async fn workers(_: Reader, State(api): State<Api>) -> Answer {
    let workers: Vec<WorkerHealth> =
        from_value(dispatch(&api.server, Request::Workers, "").await?)?;
    let view: Vec<Value> = workers
        .iter()
        .map(|w| {
            json!({
                "worker": w.worker.as_str(),
                "kind": w.kind,
                "score": w.score,
                "claims": w.stats.claims,
                "successes": w.stats.successes,
                "failures": w.stats.failures,
                "lease_losses": w.stats.lease_losses,
                "idle_loops": w.stats.idle_loops,
                "last_seen": w.stats.last_seen.to_string(),
                "last_seen_ms": w.stats.last_seen.0,
            })
        })
        .collect();
    Ok(Json(view).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OpenBody {
    #[serde(default)]
    job: Option<String>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    worker: Option<String>,
    details: String,
}

/// `POST /incidents`: an operator opens one by hand.
pub(crate) async fn open(
    Operator(caller): Operator,
    State(api): State<Api>,
    Body(body): Body<OpenBody>,
) -> Answer {
    let job = body
        .job
        .as_deref()
        .map(|j| {
            JobId::new(j)
                .map_err(|e| ApiError(Failure::input(format!("job: invalid job name {j:?}: {e}"))))
        })
        .transpose()?;
    let run: Option<RunId> = body
        .run
        .as_deref()
        .map(crate::commands::parse_run)
        .transpose()?;
    let worker = body
        .worker
        .as_deref()
        .map(|w| {
            WorkerId::new(w)
                .map_err(|e| ApiError(Failure::input(format!("worker: invalid id {w:?}: {e}"))))
        })
        .transpose()?;
    let request = Request::OpenIncident {
        job,
        run,
        worker,
        details: body.details,
        by: caller.name(),
    };
    let incident: Incident = from_value(dispatch(&api.server, request, &caller.actor()).await?)?;
    Ok((StatusCode::CREATED, Json(views::incident(&incident))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonBody {
    #[serde(default, alias = "note")]
    reason: String,
}

/// `POST /incidents/{id}/acknowledge`: `{"reason": …}` (optional: a note).
pub(crate) async fn acknowledge(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(id): Path<String>,
    Body(body): Body<ReasonBody>,
) -> Answer {
    let request = Request::AcknowledgeIncident {
        incident: incident_id(&id)?,
        by: caller.name(),
        note: body.reason,
    };
    let incident: Incident = from_value(dispatch(&api.server, request, &caller.actor()).await?)?;
    Ok(Json(views::incident(&incident)).into_response())
}

/// `POST /incidents/{id}/resolve`: `{"reason": …}` (required).
pub(crate) async fn resolve(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(id): Path<String>,
    Body(body): Body<ReasonBody>,
) -> Answer {
    let request = Request::ResolveIncident {
        incident: incident_id(&id)?,
        by: caller.name(),
        reason: body.reason,
    };
    let incident: Incident = from_value(dispatch(&api.server, request, &caller.actor()).await?)?;
    Ok(Json(views::incident(&incident)).into_response())
}

fn incident_id(text: &str) -> Result<u64, ApiError> {
    text.trim_start_matches('#').parse().map_err(|_| {
        ApiError(Failure::input(format!(
            "invalid incident {text:?}: expected its number, as in 12"
        )))
    })
}

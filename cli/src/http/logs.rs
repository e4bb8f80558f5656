//! `GET /api/v1/runs/{run}/logs`: an attempt's kept output (SPEC O7), as `keel logs` shows it.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use keel_core::{Attempt, Run};
use serde::Deserialize;
use serde_json::json;

use super::{Api, ApiError, Params, Reader};
use crate::command_job::output;
use crate::daemon::dispatch;
use crate::error::Failure;
use crate::protocol::{from_value, Request};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    attempt: Option<u32>,
}

/// Both streams of one attempt (the last with output, unless `?attempt=N`), each with whether
/// its start was cut (output beyond the kept size rotates out).
pub(crate) async fn logs(
    _: Reader,
    State(api): State<Api>,
    Path(run): Path<String>,
    Params(query): Params<LogsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = crate::commands::parse_run(&run)?;
    let stored: Option<Run> =
        from_value(dispatch(&api.server, Request::Run { run: id }, "an HTTP client").await?)?;
    if stored.is_none() {
        return Err(ApiError(Failure::NotFound(format!(
            "no run {id} (it never existed, or the history policy pruned it)"
        ))));
    }
    let dir = api.server.output_dir.clone();
    let kept = output::attempts(&dir, id);
    let attempt = match query.attempt {
        Some(n) if kept.contains(&Attempt(n)) => Attempt(n),
        Some(n) => {
            return Err(ApiError(Failure::NotFound(format!(
                "{id} has no output kept for attempt {n} (attempts with output: {:?})",
                kept.iter().map(|a| a.0).collect::<Vec<_>>()
            ))))
        }
        None => match kept.last() {
            Some(last) => *last,
            None => {
                return Err(ApiError(Failure::NotFound(format!(
                    "no output kept for {id}: it ran no command here (a job for external \
                     workers, or a run from before keel kept output)"
                ))))
            }
        },
    };
    let read = move |stream: &str| {
        let path = output::attempt_path(&dir, id, attempt, stream);
        let older = std::fs::read(output::rotated(&path)).unwrap_or_default();
        let current = std::fs::read(&path).unwrap_or_default();
        let mut text = String::from_utf8_lossy(&older).into_owned();
        text.push_str(&String::from_utf8_lossy(&current));
        json!({ "text": text, "cut": !older.is_empty() })
    };
    let (stdout, stderr) = tokio::task::spawn_blocking(move || (read("stdout"), read("stderr")))
        .await
        .map_err(|e| ApiError(Failure::runtime(format!("cannot read the output: {e}"))))?;
    Ok(Json(json!({
        "run": id.to_string(),
        "attempt": attempt.0,
        "attempts_kept": kept.iter().map(|a| a.0).collect::<Vec<_>>(),
        "stdout": stdout,
        "stderr": stderr,
    }))
    .into_response())
}
